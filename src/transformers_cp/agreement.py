"""The ranks of one CP group must feed their shards of the same packed row: one small all-gather per forward checks it.

A rank whose shard has another length, dtype or document layout than its peers would otherwise enter the attention's
P2P / all-to-all with mismatched sizes and deadlock (or, worse, compute on inconsistent metadata). Each rank
therefore summarises its batch in a few integers (a fingerprint) and the CP group all-gathers them once per forward,
before any attention collective. Every rank then runs the same checks on the same gathered table, so a mismatch, or a
problem that only one rank's inputs have, raises the same clear error on every rank instead of a hang.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

AGREED_FIELDS = (
    "local sequence length",
    "number of rows",
    "input kind and dtype",
    "inputs_embeds width",
    "number of document boundaries",
    "document boundaries (checksum of cu_seq_lens_q)",
    "training mode",
    "checkpointed decoder layers",
    "labels given",
    "num_items_in_batch",
)
"""What every rank of a CP group must agree on, in fingerprint order."""

_DTYPES = (torch.int64, torch.int32, torch.float32, torch.bfloat16, torch.float16, torch.float64)


def dtype_code(dtype: torch.dtype) -> int:
    """A small integer naming a dtype (0 for any dtype outside the common ones)."""
    return _DTYPES.index(dtype) + 1 if dtype in _DTYPES else 0


def bounds_checksum(bounds: Sequence[int]) -> int:
    """A checksum of document boundaries: equal bounds give equal checksums on every rank."""
    return zlib.crc32(",".join(map(str, bounds)).encode())


@dataclass(frozen=True)
class Fingerprint:
    """One rank's summary of its batch.

    Args:
        agreed: one integer per `AGREED_FIELDS` entry; every rank must have the same.
        problem: 0, or 1 + the index of a problem that this rank's inputs have (the caller's list).
        max_position: largest position id of the shard (-1 when unknown).
        min_token, max_token: range of the shard's token ids (0 and -1 without input_ids).
    """

    agreed: tuple[int, ...]
    problem: int = 0
    max_position: int = -1
    min_token: int = 0
    max_token: int = -1

    def as_list(self) -> list[int]:
        return [*self.agreed, self.problem, self.max_position, self.min_token, self.max_token]


def gather_fingerprints(
    fingerprint: Fingerprint, group: dist.ProcessGroup | None, device: torch.device
) -> list[Fingerprint]:
    """Every rank's fingerprint, in CP rank order: one all-gather of a few int64 over the CP group."""
    if group is None:
        return [fingerprint]
    local = torch.tensor(fingerprint.as_list(), dtype=torch.int64, device=device)
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, local, group=group)
    n = len(AGREED_FIELDS)
    return [Fingerprint(tuple(row[:n]), *row[n:]) for row in torch.stack(parts).tolist()]


def check_agreement(fingerprints: Sequence[Fingerprint]) -> None:
    """Raise, identically on every rank, if the CP ranks' batches do not describe shards of one packed row."""
    disagree = []
    for i, name in enumerate(AGREED_FIELDS):
        values = [fp.agreed[i] for fp in fingerprints]
        if len(set(values)) > 1:
            disagree.append(f"{name}: {values}")
    if disagree:
        raise ValueError(
            "the ranks of one context-parallel group got inconsistent inputs (values by CP rank): "
            + "; ".join(disagree)
            + ". Every CP rank must get its own shard of the same packed row: build batches with "
            "transformers_cp.ContextParallelCollator (or shard_batch) and give the CP ranks of a group the same "
            "examples (transformers_cp.ContextParallelSampler, or the transformers_cp Trainer)."
        )
