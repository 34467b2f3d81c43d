"""Between a packed row and its CP shards: `pack_row` readies a (1, T) row, `shard_batch` keeps this rank's part,
`gather_sequence` rebuilds full-row outputs.

The row is readied once, before sharding, so that what depends on neighbours is computed on the whole row:
`shift_labels` (the next token's label, as the stock loss shifts a row, so no target is lost at a shard boundary) and
the global document boundaries `cu_seq_lens_q` that the attention needs. The row is padded to the layout's multiple
with a tail that is a document of its own and has no targets.

Documents are marked as transformers marks them: position_ids that restart (a document starts wherever they do not
count on by one, as transformers' masks detect packed sequences), `cu_seq_lens_q`/`cu_seq_lens_k` (flash attention's)
and `seq_idx` (the SSM kernels'; no model CP accepts reads it). Markers that disagree are an error, and a row without
position_ids gets positions restarting at 0 per document, as `DataCollatorWithFlattening` gives them.

Two batch keys travel with every shard to the model's pre-forward hook, which pops them (see `agreement.py`):
`cp_row_checksum`, a checksum of the whole row's tokens, positions and labels, which the CP ranks of a group must
share; and, where the row could not be built from this rank's data (`BatchError`), `cp_batch_problem`, the error's
text, carried by a stand-in shard so that every rank of the job raises it together instead of this rank alone.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Mapping

import torch
import torch.distributed as dist

from .layout import Layout, padded_length
from .loss import IGNORE_INDEX
from .mesh import ContextParallelMesh

ROW_CHECKSUM = "cp_row_checksum"
BATCH_PROBLEM = "cp_batch_problem"
_DROPPED_KEYS = ("cu_seq_lens_k", "max_length_q", "max_length_k", "seq_idx", "attention_mask")
"""Keys of flattening collators that `cu_seq_lens_q` replaces (an all-ones mask says nothing for a packed row)."""
EMPTY_BATCH = (
    "the packed row has no tokens (every example of the batch is empty); filter empty examples out of the dataset, "
    "e.g. dataset.filter(lambda e: len(e['input_ids']) > 0)."
)
DOCUMENT_MARKERS = ("position_ids", "cu_seq_lens_q", "cu_seq_lens_k", "seq_idx")
"""Keys by which transformers marks the documents of a packed row (see `row_documents`)."""
_SEQUENCE_KEYS = ("input_ids", "position_ids", "labels", "shift_labels")
"""Per-token inputs that are sharded along the row."""


class BatchError(ValueError):
    """A problem in the data of one batch. The collator and `shard_batch` hand it to the model (see the module
    docstring) rather than raise it on this rank only, where the other ranks would wait in their next collective."""


def document_bounds(position_ids: torch.Tensor) -> list[int]:
    """Document boundaries [0, ..., T] of a packed row: a document starts wherever positions do not count on by one."""
    pos = position_ids.reshape(-1)
    starts = (pos[1:] != pos[:-1] + 1).nonzero().flatten() + 1
    return [0, *starts.tolist(), pos.numel()]


def _changes(values: torch.Tensor) -> list[int]:
    """Boundaries [0, ..., T] of the runs of equal values in a (1, T) row (documents of `seq_idx`)."""
    v = values.reshape(-1)
    return [0, *((v[1:] != v[:-1]).nonzero().flatten() + 1).tolist(), v.numel()]


def _shown(bounds: list[int]) -> str:
    return str(bounds) if len(bounds) <= 12 else f"[{', '.join(map(str, bounds[:10]))}, ..., {bounds[-1]}]"


def row_documents(batch: Mapping[str, torch.Tensor], length: int) -> tuple[list[int], torch.Tensor]:
    """The document boundaries [0, ..., T] of a (1, T) row from every marker it carries (checked to agree), and its
    position_ids (the batch's, or restarting at 0 per document where it has none). Without markers the row is one
    document."""
    marked: dict[str, list[int]] = {}
    for key in ("cu_seq_lens_q", "cu_seq_lens_k"):
        if batch.get(key) is not None:
            bounds = [int(b) for b in torch.as_tensor(batch[key]).reshape(-1)]
            if bounds[:1] != [0] or bounds[-1:] != [length] or any(b <= a for a, b in zip(bounds, bounds[1:])):
                raise BatchError(
                    f"{key}={_shown(bounds)} does not describe the documents of a packed row of {length} tokens: it "
                    "must start at 0, strictly increase and end at the row's length; build it from the documents' "
                    "lengths (e.g. DataCollatorWithFlattening(return_flash_attn_kwargs=True))."
                )
            marked[key] = bounds
    for key, derive in (("seq_idx", _changes), ("position_ids", document_bounds)):
        if batch.get(key) is not None:
            values = torch.as_tensor(batch[key])
            if values.shape[-1] != length or values.numel() != length:
                raise BatchError(
                    f"{key} has shape {tuple(values.shape)} but the packed row has {length} tokens; give one {key} "
                    "entry per token."
                )
            marked[key] = derive(values)
    names = list(marked)
    for key in names[1:]:
        if marked[key] != marked[names[0]]:
            raise BatchError(
                f"the batch marks its documents inconsistently: {names[0]} gives boundaries {_shown(marked[names[0]])} "
                f"but {key} gives {_shown(marked[key])} (a document starts where position_ids do not count on by one, "
                "where seq_idx changes, at each cu_seq_lens entry); pass markers that agree (position_ids restarting "
                "at 0 at every document, as DataCollatorWithFlattening returns them with any of its options) or only "
                "one of them."
            )
    bounds = marked[names[0]] if names else [0, length]
    position_ids = batch.get("position_ids")
    if position_ids is None:
        position_ids = torch.cat([torch.arange(b - a) for a, b in zip(bounds, bounds[1:])])
    return bounds, torch.as_tensor(position_ids).reshape(1, length)


def _pad(tensor: torch.Tensor, pad: int, value: int) -> torch.Tensor:
    return torch.nn.functional.pad(tensor, (0, pad), value=value) if pad else tensor


def pack_row(batch: Mapping[str, torch.Tensor], multiple: int, pad_token_id: int = 0) -> dict[str, torch.Tensor]:
    """Ready a packed (1, T) row for sharding: `shift_labels`, `cu_seq_lens_q`, and padding to `multiple`.

    `batch` is what `DataCollatorWithFlattening` returns, with any of its options: `input_ids`, its documents marked
    by position_ids restarting at 0, `cu_seq_lens_q`/`_k` or `seq_idx` (see `row_documents`; without any the row is
    one document), and optionally `labels` (shifted once over the row, as the stock loss does; without them every
    token but each document's first is a target) or ready-made `shift_labels`. Keys that are not per-token pass
    through.
    """
    input_ids = torch.as_tensor(batch["input_ids"])
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise BatchError(
            f"context parallelism takes one packed row per step, got input_ids of shape {tuple(input_ids.shape)}; "
            "flatten the batch first (transformers_cp.ContextParallelCollator does)."
        )
    length = input_ids.shape[1]
    if length == 0:
        raise BatchError(EMPTY_BATCH)
    for key in ("labels", "shift_labels"):
        if batch.get(key) is not None and torch.as_tensor(batch[key]).shape != input_ids.shape:
            raise BatchError(
                f"{key} has shape {tuple(torch.as_tensor(batch[key]).shape)} but input_ids {tuple(input_ids.shape)}; "
                f"every example needs one {key} entry per token (-100 where there is no target)."
            )
    bounds, position_ids = row_documents(batch, length)
    if batch.get("labels") is not None:
        labels = torch.as_tensor(batch["labels"])
    else:
        labels = input_ids.clone()
        labels[:, bounds[:-1]] = IGNORE_INDEX  # as DataCollatorWithFlattening: a document's first token has no label
    shift_labels = batch.get("shift_labels")
    if shift_labels is None:  # as the stock loss shifts the row: -100 labels (the separator) end the examples
        shift_labels = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], IGNORE_INDEX)], dim=1)

    shift_labels = torch.as_tensor(shift_labels)
    checksum = row_checksum(input_ids, position_ids, labels, shift_labels)
    pad = padded_length(length, Layout("contiguous", multiple, 1)) - length
    out = {k: v for k, v in batch.items() if k not in _DROPPED_KEYS}
    for key, value in out.items():
        if (
            isinstance(value, torch.Tensor)
            and value.dim() >= 2
            and value.shape[1] == length
            and key not in _SEQUENCE_KEYS
        ):
            raise BatchError(
                f"cannot shard the per-token input {key!r}; pass only input_ids, position_ids and labels."
            )
    out.update(
        input_ids=_pad(input_ids, pad, pad_token_id),
        position_ids=torch.cat([position_ids, torch.arange(pad, dtype=position_ids.dtype)[None]], dim=1),
        labels=_pad(labels, pad, IGNORE_INDEX),
        shift_labels=_pad(shift_labels, pad, IGNORE_INDEX),
        cu_seq_lens_q=torch.tensor(bounds, dtype=torch.int32),
    )
    out[ROW_CHECKSUM] = torch.tensor([checksum])
    return out


def row_checksum(*tensors: torch.Tensor) -> int:
    """CRC-32 of the tensors' values as int64 (so independent of their dtype and device)."""
    checksum = 0
    for tensor in tensors:
        checksum = zlib.crc32(tensor.detach().to("cpu", torch.int64).contiguous().numpy(), checksum)
    return checksum


def _stand_in_row(error: BatchError, multiple: int, pad_token_id: int) -> dict[str, torch.Tensor]:
    """A row of `multiple` pad tokens without targets that carries `error` to the model's pre-forward hook: every
    step before the model (token counts, the Trainer's collectives) runs on it as on a real row."""
    row = pack_row(
        {"input_ids": torch.full((1, multiple), pad_token_id), "labels": torch.full((1, multiple), IGNORE_INDEX)},
        multiple,
        pad_token_id,
    )
    row[BATCH_PROBLEM] = torch.tensor(list(str(error).encode()), dtype=torch.uint8)
    return row


def build_shard(
    make_row: Callable[[], Mapping[str, torch.Tensor]], layout: Layout, cp_rank: int, pad_token_id: int = 0
) -> dict[str, torch.Tensor]:
    """This rank's shard of the row `make_row` readies (with `pack_row`); if that raises a `BatchError`, a stand-in
    shard that carries it (see the module docstring)."""
    try:
        row = make_row()
    except BatchError as error:
        row = _stand_in_row(error, layout.multiple, pad_token_id)
    return shard_row(row, layout, cp_rank)


def shard_row(row: Mapping[str, torch.Tensor], layout: Layout, cp_rank: int) -> dict[str, torch.Tensor]:
    """This rank's part of a row readied by `pack_row` (`cu_seq_lens_q` stays global)."""
    layout = layout.for_row(row["cu_seq_lens_q"].tolist(), row["input_ids"].shape[1])
    return {k: layout.shard(v, cp_rank, dim=1) if k in _SEQUENCE_KEYS else v for k, v in row.items()}


def shard_batch(
    batch: Mapping[str, torch.Tensor], mesh: ContextParallelMesh, pad_token_id: int = 0
) -> dict[str, torch.Tensor]:
    """This rank's shard of a packed (1, T) row (e.g. `DataCollatorWithFlattening`'s output), ready for a model that
    `apply_context_parallel` was called on: input_ids, position_ids, labels, shift_labels, cu_seq_lens_q and the
    row's checksum (a batch that cannot be sharded gives a stand-in shard whose forward raises on every rank)."""
    return build_shard(
        lambda: pack_row(batch, mesh.layout.multiple, pad_token_id), mesh.layout, mesh.cp_rank, pad_token_id
    )


def gather_sequence(
    tensor: torch.Tensor, mesh: ContextParallelMesh, dim: int = 1, cu_seq_lens_q: torch.Tensor | None = None
) -> torch.Tensor:
    """The full row of a per-token output (logits, labels, log-probs) from every CP rank's shard, in global token order.

    Differentiable: the backward keeps this rank's slice of the row's gradient. That is the gradient of a value every
    CP rank computes alike from the full row (a replicated loss, see `loss.py`), through this rank's tokens.

    Under `balance="documents"` each row is sharded by its own documents: the layout is the one of the model's last
    forward (`mesh.current_layout`), right for the model's outputs; to gather a shard of another row (its labels
    before the forward, say) pass that row's `cu_seq_lens_q` (global, as the collator and `shard_batch` give it).
    """
    if mesh.cp_group is None:
        return tensor
    layout = _row_layout(mesh, cu_seq_lens_q, tensor.shape[dim] * mesh.cp_size)
    if tensor.requires_grad:
        return _GatherReplicated.apply(tensor, mesh, dim, layout)
    return _all_gather_row(tensor, mesh, dim, layout)


def _row_layout(mesh: ContextParallelMesh, cu_seq_lens_q: torch.Tensor | None, seq_len: int) -> Layout:
    """The layout a row was sharded with: from its boundaries, else the last forward's. Decided before the gather,
    from what every rank holds alike."""
    if cu_seq_lens_q is not None:
        bounds = [int(b) for b in cu_seq_lens_q.reshape(-1).tolist()]
        if not bounds or bounds[0] != 0 or any(b < a for a, b in zip(bounds, bounds[1:])) or bounds[-1] > seq_len:
            raise ValueError(
                f"gather_sequence: cu_seq_lens_q={bounds[:6]}{'...' if len(bounds) > 6 else ''} is not this row's: "
                f"it starts at 0, never decreases and ends at most at the row's {seq_len} tokens (the shard's length "
                f"× {mesh.cp_size} ranks); pass the cu_seq_lens_q of the batch this shard came from."
            )
        return mesh.layout.for_row(bounds, seq_len)
    if mesh.layout.balance == "documents" and mesh.row_layout is None:
        raise ValueError(
            "gather_sequence under context_parallel_balance='documents' needs the row's layout, and the model has "
            "run no forward yet: pass the row's cu_seq_lens_q (gather_sequence(..., cu_seq_lens_q=batch["
            "'cu_seq_lens_q'])) or gather after the forward."
        )
    return mesh.current_layout


def _all_gather_row(tensor: torch.Tensor, mesh: ContextParallelMesh, dim: int, layout: Layout) -> torch.Tensor:
    shards = [torch.empty_like(tensor) for _ in range(mesh.cp_size)]
    dist.all_gather(shards, tensor.contiguous(), group=mesh.cp_group)
    return layout.unshard(shards, dim=dim)


class _GatherReplicated(torch.autograd.Function):
    """The row from every rank's shard, for a value every CP rank computes alike: backward keeps this rank's slice."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, mesh: ContextParallelMesh, dim: int, layout: Layout) -> torch.Tensor:
        ctx.mesh, ctx.dim, ctx.layout = mesh, dim, layout
        return _all_gather_row(tensor.detach(), mesh, dim, layout)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return ctx.layout.shard(grad, ctx.mesh.cp_rank, dim=ctx.dim), None, None, None
