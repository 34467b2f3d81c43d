"""Batch checks: each forward's inputs, checked on every rank of the job before any attention collective.

A rank's batch is summarised in a `Fingerprint` (`agreement.py`), each field declared next to its value: what the
ranks of one CP group must share, and the extremes the job checks (positions, token and label ids). All ranks gather
the table once per forward and raise the same error; the pre-forward hook (`modeling.py`) runs `check_batch`.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .agreement import (
    Fingerprint,
    Value,
    bounds_checksum,
    check_agreement,
    dtype_code,
    gather_fingerprints,
    raise_problems,
)
from .loss import IGNORE_INDEX
from .mesh import ContextParallelMesh
from .plan import Documents
from .sharding import document_bounds, gather_sequence
from .state import ContextParallelState


def documents_from_position_ids(position_ids: torch.Tensor, mesh: ContextParallelMesh) -> Documents:
    """Global document boundaries from this rank's shard of global position_ids (one all-gather per forward)."""
    full = gather_sequence(position_ids.reshape(1, -1), mesh, dim=1)
    return Documents(document_bounds(full), full.shape[1])


_NONE = 2**62
"""The extremes of no ids: a minimum above, and (negated) a maximum below, any id that is checked."""


def input_problem(inputs: torch.Tensor, kwargs: dict, marked: torch.Tensor | None) -> str | None:
    """The first problem this rank's own inputs have, or None. `marked`: the text of a problem the collator found in
    this rank's data (`sharding.BatchError`), carried by a stand-in batch."""
    if marked is not None:
        return bytes(marked.tolist()).decode()
    mask = kwargs.get("attention_mask")
    problems = (
        (
            kwargs.get("past_key_values") is not None,
            "context parallel attention does not support a KV cache (past_key_values); run generation without "
            "context parallelism.",
        ),
        (
            mask is not None and mask.dim() == 2 and not bool(mask.all()),
            "context parallel attention does not support padding in attention_mask; remove padding and pack the batch "
            "into one row with position_ids (transformers_cp.ContextParallelCollator does this).",
        ),
        (
            mask is not None and mask.dim() != 2,
            "context parallel attention does not support a custom (4D) attention mask: a dense mask cannot be split "
            "across ranks; pass packed rows whose position_ids restart at 0 per document instead.",
        ),
        (
            inputs.shape[0] != 1,
            "context parallel attention takes one packed row per step, got a batch of several rows; flatten the batch "
            "into one row (transformers_cp.ContextParallelCollator does).",
        ),
        (
            kwargs.get("position_ids") is None,
            "under context parallelism the model needs position_ids (global positions of this rank's tokens): without "
            "them every shard would restart at position 0. Shard batches with the transformers_cp collator or "
            "`shard_batch`, which provide them.",
        ),
    )
    return next((message for found, message in problems if found), None)


def _value(value) -> Value:
    """An int, or a one-element tensor left on its device (read with the gathered table)."""
    return value.reshape(()) if isinstance(value, torch.Tensor) else int(value)


def fingerprint(
    module: torch.nn.Module,
    state: ContextParallelState,
    inputs: torch.Tensor,
    kwargs: dict,
    bounds: list[int],
    checksum: torch.Tensor | None,
    problem: str | None,
) -> Fingerprint:
    """This rank's batch summary (see `agreement`); `bounds` are cu_seq_lens_q's, empty when not given; `checksum`
    is the packed row's (`sharding.row_checksum`), None for shards made without the collator or `shard_batch`."""
    is_ids = not inputs.is_floating_point()
    labels = kwargs.get("labels"), kwargs.get("shift_labels")
    items = kwargs.get("num_items_in_batch")
    agreed = {
        "local sequence length": inputs.shape[1] if inputs.dim() > 1 else -1,
        "number of rows": inputs.shape[0],
        "input kind and dtype": dtype_code(inputs.dtype) * (1 if is_ids else -1),
        "inputs_embeds width": 0 if is_ids else inputs.shape[-1],
        "number of document boundaries": len(bounds),
        "document boundaries (checksum of cu_seq_lens_q)": bounds_checksum(bounds),
        "packed row (checksum of its tokens, positions and labels)": -1 if checksum is None else _value(checksum),
        "training mode": int(module.training),
        "checkpointed decoder layers": state.checkpointed_layers,
        "labels given": (labels[0] is not None) + 2 * (labels[1] is not None),
        "num_items_in_batch": -1 if items is None else _value(items),
    }
    position_ids = kwargs.get("position_ids")
    if position_ids is not None and position_ids.numel():
        max_position = position_ids.max()
    else:
        max_position = max((b - a for a, b in zip(bounds, bounds[1:])), default=0) - 1
    ids = inputs if is_ids and inputs.numel() else None
    targets = [t.reshape(-1) for t in labels if t is not None and t.numel()]
    targets = torch.cat(targets).long() if targets else None
    real = None if targets is None else targets != IGNORE_INDEX
    facts = {
        "max position": max_position,
        "min token": _NONE if ids is None else ids.min(),
        "max token": -_NONE if ids is None else ids.max(),
        "min label": _NONE if targets is None else torch.where(real, targets, _NONE).min(),
        "max label": -_NONE if targets is None else torch.where(real, targets, -_NONE).max(),
    }
    return Fingerprint(agreed, facts, problem)


def check_batch(
    module: torch.nn.Module,
    state: ContextParallelState,
    inputs: torch.Tensor,
    kwargs: dict,
    bounds: list[int],
    checksum: torch.Tensor | None = None,
    marked: torch.Tensor | None = None,
) -> int:
    """Every rank's input checks, decided on the job's gathered fingerprints so that all ranks raise together.
    Returns the largest position id of this CP group's row (what sequence-dependent RoPE must see).

    The table spans the whole job, not only the CP group: a problem on one data-parallel rank would otherwise leave
    the others waiting in their next collective."""
    mesh = state.mesh
    mine = fingerprint(module, state, inputs, kwargs, bounds, checksum, input_problem(inputs, kwargs, marked))
    group = dist.group.WORLD if mesh.cp_group is not None else None
    table = gather_fingerprints(mine, group, (mesh.dp_rank, mesh.cp_rank), inputs.device)
    raise_problems(mine, table, group, inputs.device)
    check_agreement(table)

    def extreme(pick, name: str) -> int:
        return pick(rank.facts[name] for rank in table)

    top = extreme(max, "max position")
    row_top = max(rank.facts["max position"] for rank in table if rank.dp_rank == mesh.dp_rank)
    if state.max_positions is not None and top >= state.max_positions:
        raise ValueError(
            f"the packed row has a document of {top + 1} tokens, but the model's positions cover {state.max_positions} "
            "(max_position_embeddings, times its RoPE scaling factor if any); truncate examples to at most "
            f"{state.max_positions} tokens (e.g. tokenizer truncation / max_length) or raise the model's "
            "max_position_embeddings (with a RoPE scaling that covers the longer documents)."
        )
    embeddings = module.get_input_embeddings() if hasattr(module, "get_input_embeddings") else None
    vocab = getattr(embeddings, "num_embeddings", None)
    low, high = extreme(min, "min token"), extreme(max, "max token")
    if vocab is not None and high >= low and (low < 0 or high >= vocab):
        raise ValueError(
            f"input_ids range from {low} to {high}, outside the model's vocabulary of {vocab} embeddings (vocab_size); "
            "use the model's own tokenizer, keep -100 in labels only, or resize_token_embeddings."
        )
    head = module.get_output_embeddings() if hasattr(module, "get_output_embeddings") else None
    classes = getattr(head, "out_features", None) or vocab
    low, high = extreme(min, "min label"), extreme(max, "max label")
    if classes is not None and high >= low and (low < 0 or high >= classes):
        raise ValueError(
            f"labels range from {low} to {high}, but a target must be a token id below the model's {classes} output "
            f"classes (vocab_size) or {IGNORE_INDEX} (no target); use the model's own tokenizer, mark tokens without a "
            f"target with {IGNORE_INDEX}, or resize_token_embeddings."
        )
    return row_top
