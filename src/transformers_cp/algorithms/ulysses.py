"""Ulysses: all-to-all from sequence shards to head shards before attention, and back after it.

Query heads are split evenly over the U ranks (they must divide). KV heads follow their query heads: each rank
receives exactly the KV heads its query heads use, so with fewer KV heads than ranks a KV head is replicated only
to the ranks that need it, and the GQA mapping stays the model's own (autograd sums the replicas' gradients).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..comm import AllToAll


def check_heads(num_heads: int, degree: int) -> None:
    if num_heads % degree:
        divisors = [d for d in range(2, num_heads + 1) if num_heads % d == 0 and d <= degree]
        raise ValueError(
            f"Ulysses splits attention heads over ranks, but the model's {num_heads} query heads are not divisible "
            f"by the Ulysses degree {degree}; use context_parallel_mode='hybrid' with context_parallel_ulysses_size "
            f"in {divisors or [1]}, or a ring mode ('zigzag', 'llama3')."
        )


def kv_heads_for_rank(num_q: int, num_kv: int, degree: int, rank: int) -> list[int]:
    """KV head indices rank `rank` needs, in the order that keeps its local GQA mapping (q head j -> j // group)."""
    per = num_q // degree
    q_heads = range(rank * per, (rank + 1) * per)
    needed = sorted({h // (num_q // num_kv) for h in q_heads})
    local_group = per // len(needed) if per % len(needed) == 0 else 0
    aligned = local_group > 0 and all(
        needed[j // local_group] == h // (num_q // num_kv) for j, h in enumerate(q_heads)
    )
    return needed if aligned else [h // (num_q // num_kv) for h in q_heads]


def _reorder(recv: torch.Tensor, chunks: int) -> torch.Tensor:
    """(U, L, h, D) rank-major rows -> (U·L, h, D) chunk-major, so that whole chunks come out contiguous."""
    degree, length = recv.shape[:2]
    return recv.unflatten(1, (chunks, length // chunks)).transpose(0, 1).flatten(0, 2)


def scatter_heads(q, k, v, group: dist.ProcessGroup, chunks: int):
    """Sequence shards (L, H, D) -> this rank's heads of the whole sequence (U·L, h, D), for q, k and v at once.

    One all-to-all carries all three: each rank's send buffer holds, per destination, its query heads followed by
    the KV heads they use. Autograd runs the reverse all-to-all in backward and sums replicated KV heads.
    """
    degree = dist.get_world_size(group)
    hq, hk = q.shape[1], k.shape[1]
    check_heads(hq, degree)
    plan = [kv_heads_for_rank(hq, hk, degree, r) for r in range(degree)]
    if any(len(p) != len(plan[0]) for p in plan):
        plan = [[h // (hq // hk) for h in range(r * hq // degree, (r + 1) * hq // degree)] for r in range(degree)]
    flat = [h for p in plan for h in p]
    if flat != list(range(hk)):
        index = torch.tensor(flat, device=k.device)
        k, v = k.index_select(1, index), v.index_select(1, index)
    per_rank = [t.unflatten(1, (degree, -1)).transpose(0, 1) for t in (q, k, v)]  # (U, L, h, D) each
    send = torch.cat(per_rank, dim=2)
    recv = _reorder(AllToAll.apply(send, group), chunks)
    h_q, h_kv = hq // degree, len(plan[0])
    return recv[:, :h_q], recv[:, h_q : h_q + h_kv], recv[:, h_q + h_kv :]


def gather_heads(out: torch.Tensor, group: dist.ProcessGroup, chunks: int) -> torch.Tensor:
    """Inverse of the query part of `scatter_heads`: (U·L, h, D) -> (L, U·h, D)."""
    degree = dist.get_world_size(group)
    total, h, d = out.shape
    length = total // degree
    send = out.unflatten(0, (chunks, degree, length // chunks)).transpose(0, 1).flatten(1, 2)  # (U, L, h, D)
    recv = AllToAll.apply(send, group)  # recv[i] = my rows of rank i's heads
    return recv.transpose(0, 1).flatten(1, 2)
