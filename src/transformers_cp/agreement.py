"""Every rank's inputs are checked on one table, all-gathered over the whole job once per forward.

The ranks of one CP group must feed their shards of the same packed row: a rank whose shard has another length, dtype
or document layout than its peers would enter the attention's P2P / all-to-all with mismatched sizes and deadlock (or
compute on inconsistent metadata), and one whose tokens differ would train on mixed data. A problem that only one
rank's inputs have (a label outside the vocabulary, a batch its collator could not build) must stop every rank: raised
on that rank alone, its CP peers would wait in the attention's collectives and the other data-parallel ranks in their
next gradient reduction. So each rank summarises its batch in a few named integers (a fingerprint), every rank of the
job all-gathers them once per forward, before any attention collective, and then runs the same checks on the same
table, so that all raise the same clear error. Only a problem's flag travels in the table; its text is broadcast from
the first rank that has one, in a second collective that runs only when some rank has a problem.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

Value = int | torch.Tensor
"""A fingerprint value: a Python int, or a 0-dim integer tensor still on the device (read with the gather)."""

_DTYPES = (torch.int64, torch.int32, torch.float32, torch.bfloat16, torch.float16, torch.float64)


def dtype_code(dtype: torch.dtype) -> int:
    """A small integer naming a dtype (0 for any dtype outside the common ones)."""
    return _DTYPES.index(dtype) + 1 if dtype in _DTYPES else 0


def bounds_checksum(bounds: Sequence[int]) -> int:
    """A checksum of document boundaries: equal bounds give equal checksums on every rank."""
    return zlib.crc32(",".join(map(str, bounds)).encode())


@dataclass(frozen=True)
class Fingerprint:
    """One rank's summary of its batch. The same code builds it on every rank, so names and order agree.

    Args:
        agreed: what the ranks of one CP group must share, by name.
        facts: what the caller checks over the whole job (extremes of positions, token and label ids), by name.
        problem: the error that this rank's own inputs have, if any.
    """

    agreed: dict[str, Value]
    facts: dict[str, Value]
    problem: str | None = None


@dataclass(frozen=True)
class RankSummary:
    """A rank's row of the gathered table: its place in the (dp, cp) mesh and its fingerprint's values."""

    dp_rank: int
    cp_rank: int
    agreed: dict[str, int]
    facts: dict[str, int]
    has_problem: bool


def gather_fingerprints(
    fingerprint: Fingerprint, group: dist.ProcessGroup | None, place: tuple[int, int], device: torch.device
) -> list[RankSummary]:
    """Every rank's summary, in rank order of `group` (None: this rank's alone): one all-gather of a few int64.

    `place` is this rank's (dp rank, cp rank)."""
    values = [*fingerprint.agreed.values(), *fingerprint.facts.values(), int(fingerprint.problem is not None), *place]
    local = torch.tensor([0 if isinstance(v, torch.Tensor) else v for v in values], dtype=torch.int64).to(device)
    for i, value in enumerate(values):
        if isinstance(value, torch.Tensor):
            local[i] = value  # stays on the device: read once, with the gathered table
    if group is None:
        rows = [local.tolist()]
    else:
        parts = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, local, group=group)
        rows = torch.stack(parts).tolist()
    names, facts = list(fingerprint.agreed), list(fingerprint.facts)
    n, m = len(names), len(facts)
    return [
        RankSummary(
            dp_rank=row[n + m + 1],
            cp_rank=row[n + m + 2],
            agreed=dict(zip(names, row[:n])),
            facts=dict(zip(facts, row[n : n + m])),
            has_problem=bool(row[n + m]),
        )
        for row in rows
    ]


def _where(ranks: Sequence[RankSummary], dp_size: int) -> str:
    by_dp: dict[int, list[int]] = {}
    for rank in ranks:
        by_dp.setdefault(rank.dp_rank, []).append(rank.cp_rank)
    if dp_size == 1:
        return f"CP rank(s) {by_dp[0]}"
    return "; ".join(f"CP rank(s) {cps} of data-parallel rank {dp}" for dp, cps in sorted(by_dp.items()))


def raise_problems(
    fingerprint: Fingerprint, table: Sequence[RankSummary], group: dist.ProcessGroup | None, device: torch.device
) -> None:
    """Raise, identically on every rank, the problem of the first rank that has one (its text is broadcast)."""
    failing = [i for i, rank in enumerate(table) if rank.has_problem]
    if not failing:
        return
    text = [fingerprint.problem]
    if group is not None:
        dist.broadcast_object_list(text, src=dist.get_global_rank(group, failing[0]), group=group, device=device)
    dp_size = 1 + max(rank.dp_rank for rank in table)
    raise ValueError(f"{text[0]} (found on {_where([table[i] for i in failing], dp_size)})")


def check_agreement(table: Sequence[RankSummary]) -> None:
    """Raise, identically on every rank, if the ranks of some CP group do not hold shards of one packed row."""
    dp_size = 1 + max(rank.dp_rank for rank in table)
    for dp in range(dp_size):
        group = sorted((rank for rank in table if rank.dp_rank == dp), key=lambda rank: rank.cp_rank)
        disagree = []
        for name in group[0].agreed:
            values = [rank.agreed[name] for rank in group]
            if len(set(values)) > 1:
                disagree.append(f"{name}: {values}")
        if disagree:
            which = f" (data-parallel rank {dp})" if dp_size > 1 else ""
            raise ValueError(
                f"the ranks of one context-parallel group{which} got inconsistent inputs (values by CP rank): "
                + "; ".join(disagree)
                + ". Every CP rank must get its own shard of the same packed row: build batches with "
                "transformers_cp.ContextParallelCollator (or shard_batch) and give the CP ranks of a group the same "
                "examples (transformers_cp.ContextParallelSampler, or the transformers_cp Trainer)."
            )
