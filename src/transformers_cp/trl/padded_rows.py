"""Padded batches of whole sequences through a context-parallel model, for TRL's preference trainers.

TRL's DPO calls `model(input_ids, attention_mask, labels, fused_lm_head=True)` on a right-padded (2B, L) batch
(B prompt+chosen rows, then B prompt+rejected rows) and reads per-token outputs of shape (2B, L-1). Under CP the
model is wrapped so that such a call
  1. packs the 2B sequences as documents of one row (`pack_row`: global positions, next-token `shift_labels` within
     each document, as each is a row of its own without CP, padding to the layout's multiple) and runs the model on
     this rank's shard (`shard_row`);
  2. gathers each per-token output over the CP group (`gather_sequence`, differentiable) and puts it back in the
     padded (2B, L-1) layout, zero where there is no target, as TRL's fused head returns it without CP.
Every CP rank then holds the group's full per-sequence quantities, so any loss TRL builds from them (sums, token
counts, length normalisation, sorting across pairs) and every metric is the one of a run without CP. An MoE model's
`aux_loss` passes through: it is already the whole row's (`router_loss.replicate_router_loss`). `loss.py` says
how the gradient of such a replicated loss is scaled.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..loss import IGNORE_INDEX
from ..mesh import ContextParallelMesh
from ..sharding import BATCH_PROBLEM, ROW_CHECKSUM, build_shard, gather_sequence, pack_row

_PER_TOKEN_OUTPUTS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1", "label_mask")
"""Per-token fields of TRL's `FusedCausalLMOutput`."""


@dataclass
class _PaddedRowsState:
    mesh: ContextParallelMesh
    pad_token_id: int
    masks: list[torch.Tensor] = field(default_factory=list)  # attention masks of the calls in flight
    hooks: list = field(default_factory=list)
    enabled: bool = True  # off while the model generates without CP (`rl.own_attention`)


def shard_padded_rows(model: torch.nn.Module, mesh: ContextParallelMesh, pad_token_id: int = 0) -> None:
    """Make `model` (on which `apply_context_parallel` was called) take TRL's padded fused-head calls (idempotent)."""
    if getattr(model, "_cp_padded_rows", None) is not None:
        return
    state = _PaddedRowsState(mesh, pad_token_id)
    # Prepended: packing must run before the CP pre-forward hook, which reads the packed row's document bounds.
    state.hooks.append(model.register_forward_pre_hook(_pack(state), with_kwargs=True, prepend=True))
    state.hooks.append(model.register_forward_hook(_unpack(state)))
    model._cp_padded_rows = state


def _pack(state: _PaddedRowsState):
    def hook(module, args, kwargs: dict[str, Any]):
        if not state.enabled:
            return None
        if args or not kwargs.get("fused_lm_head"):
            raise ValueError(
                "under context parallelism TRL's preference trainers run the model only through its fused LM head "
                "(log-probabilities, no logits): `compute_metrics` and `predict` with logits are not supported; "
                "leave compute_metrics unset (evaluation then returns the loss and the DPO metrics)."
            )
        input_ids = kwargs.pop("input_ids")
        device = input_ids.device
        mask = kwargs.pop("attention_mask", None)
        mask = torch.ones_like(input_ids, dtype=torch.bool) if mask is None else mask.bool()
        labels = kwargs.pop("labels")
        # Packed on the CPU (token ids only), then this rank's shard goes to the device.
        ids_cpu, mask_cpu, labels_cpu = input_ids.cpu(), mask.cpu(), labels.cpu()
        lengths = mask_cpu.sum(dim=1).tolist()
        bounds = torch.tensor([0, *lengths]).cumsum(0)
        packed_labels = labels_cpu[mask_cpu][None].clone()
        packed_labels[:, bounds[:-1]] = IGNORE_INDEX  # a sequence's first token is no one's target
        layout = state.mesh.layout
        shard = build_shard(
            lambda: pack_row(
                {
                    "input_ids": ids_cpu[mask_cpu][None],
                    "labels": packed_labels,
                    "position_ids": torch.cat([torch.arange(n) for n in lengths])[None],
                    "cu_seq_lens_q": bounds.to(torch.int32),
                },
                layout.multiple,
                state.pad_token_id,
            ),
            layout,
            state.mesh.cp_rank,
            state.pad_token_id,
        )
        keys = ("input_ids", "position_ids", "shift_labels", "cu_seq_lens_q", ROW_CHECKSUM, BATCH_PROBLEM)
        # cu_seq_lens_q goes where the Trainer puts the collator's; the checksum and a problem go to the CP hook
        kwargs.update({key: shard[key].to(device) for key in keys if key in shard})
        state.masks.append(mask)
        return (), kwargs

    return hook


def _unpack(state: _PaddedRowsState):
    def hook(module, args, output):
        if not state.enabled:
            return None
        mask = state.masks.pop()
        fields = {}
        for name, value in output.items():
            if name in _PER_TOKEN_OUTPUTS and value is not None:
                row = gather_sequence(value, state.mesh, dim=1)[0, : int(mask.sum())]
                fields[name] = value.new_zeros(mask.shape).masked_scatter(mask, row)[:, :-1]
            elif name != "loss":  # the fused head's loss is the shard's token mean, which TRL's DPO does not read
                fields[name] = value
        return type(output)(**fields)

    return hook
