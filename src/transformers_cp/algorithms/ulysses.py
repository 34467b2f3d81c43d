"""Ulysses: all-to-all from sequence shards to head shards before attention, and back after it.

Query heads are split evenly over the U ranks (they must divide). KV heads follow their query heads: each rank
receives exactly the KV heads its query heads use, so with fewer KV heads than ranks a KV head is replicated only
to the ranks that need it, and the GQA mapping stays the model's own (the replicas' gradients add up).

One exchange, `HeadGroups`, serves both users: plain Ulysses (`UlyssesAttention`, its heads in pipeline stages
around the local kernel) and the hybrid mode (`scatter_heads` / `gather_heads`, one stage around the ring).
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist

from ..comm import Exchange, copy_rows
from ..sinks import heads_block, sinks_grad, with_sinks
from .reuse import ForwardReuse


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


def head_plan(num_q: int, num_kv: int, parts: int) -> list[list[int]]:
    """KV heads that each of `parts` equal blocks of query heads uses (the same count for every block)."""
    plan = [kv_heads_for_rank(num_q, num_kv, parts, r) for r in range(parts)]
    if any(len(p) != len(plan[0]) for p in plan):
        plan = [
            [h // (num_q // num_kv) for h in range(r * num_q // parts, (r + 1) * num_q // parts)] for r in range(parts)
        ]
    return plan


class HeadGroups:
    """The pipeline stages of `UlyssesAttention`: stage g sends rank r the query heads of block r·G + g (of U·G equal
    blocks) and the KV heads they use, so each stage is a Ulysses exchange of its own. Made once per head shape."""

    @staticmethod
    @functools.cache
    def of(num_q: int, num_kv: int, degree: int, device: torch.device, max_stages: int) -> HeadGroups:
        return HeadGroups(num_q, num_kv, degree, device, max_stages)

    def __init__(self, num_q: int, num_kv: int, degree: int, device: torch.device, max_stages: int) -> None:
        check_heads(num_q, degree)
        self.degree = degree
        per_rank = num_q // degree
        self.count = max(s for s in range(1, max_stages + 1) if per_rank % s == 0)
        plan = head_plan(num_q, num_kv, degree * self.count)
        self.hq, self.hk = num_q // (degree * self.count), len(plan[0])
        identity = [h for p in plan for h in p] == list(range(num_kv))
        self.kv_index = None
        if not identity:  # KV heads replicated or out of block order: pick them by index per stage
            self.kv_index = [
                torch.tensor([h for r in range(degree) for h in plan[r * self.count + g]], device=device)
                for g in range(self.count)
            ]

    def _stage(self, x: torch.Tensor, heads: int, g: int) -> torch.Tensor:
        """(L, U·G·heads, D) -> stage g's (U, L, heads, D) view: destination rank first."""
        return x.unflatten(1, (self.degree, self.count, heads))[:, :, g].transpose(0, 1)

    def send_inputs(self, q, k, v, g: int, group) -> Exchange:
        length, _, dim = q.shape
        send = torch.empty((self.degree, length, self.hq + 2 * self.hk, dim), dtype=q.dtype, device=q.device)
        copy_rows(send[:, :, : self.hq], self._stage(q, self.hq, g))
        for i, t in enumerate((k, v)):
            cols = slice(self.hq + i * self.hk, self.hq + (i + 1) * self.hk)
            if self.kv_index is None:
                copy_rows(send[:, :, cols], self._stage(t, self.hk, g))
            else:
                copy_rows(
                    send[:, :, cols],
                    t.index_select(1, self.kv_index[g]).unflatten(1, (self.degree, -1)).transpose(0, 1),
                )
        return Exchange(send, group)

    def split(self, recv: torch.Tensor):
        """A stage's received (U, L, h, D) -> q, k, v of its heads over the whole sequence, (U·L, h, D) views."""
        flat = recv.flatten(0, 1)
        return flat[:, : self.hq], flat[:, self.hq : self.hq + self.hk], flat[:, self.hq + self.hk :]

    def send_output(self, out_heads: torch.Tensor, group) -> Exchange:
        """This stage's (U·L, hq, D) result -> back to the sequence shards (one slice of rows per rank)."""
        return Exchange(out_heads.unflatten(0, (self.degree, -1)), group)

    def place_output(self, recv: torch.Tensor, g: int, out: torch.Tensor) -> None:
        copy_rows(self._stage(out, self.hq, g), recv)

    def send_grad_output(self, dout: torch.Tensor, g: int, group) -> Exchange:
        return Exchange(self._stage(dout, self.hq, g), group)

    def send_grads(self, dq, dk, dv, group) -> Exchange:
        parts = [t.unflatten(0, (self.degree, -1)) for t in (dq, dk, dv)]
        return Exchange(torch.cat(parts, dim=2), group)

    def place_grads(self, recv: torch.Tensor, g: int, dq, dk, dv) -> None:
        """Write stage g's returned gradients into this rank's (L, H, D) shards; replicated KV heads add up."""
        copy_rows(self._stage(dq, self.hq, g), recv[:, :, : self.hq])
        for i, grad in enumerate((dk, dv)):
            part = recv[:, :, self.hq + i * self.hk : self.hq + (i + 1) * self.hk]
            if self.kv_index is None:
                copy_rows(self._stage(grad, self.hk, g), part)
            else:
                grad.index_add_(1, self.kv_index[g], part.transpose(0, 1).flatten(1, 2).to(grad.dtype))


class UlyssesAttention(torch.autograd.Function):
    """Ulysses on whole local sequences, its heads in up to `max_stages` pipeline stages (`HeadGroups`; the largest
    count that divides the heads per rank): while one stage's attention
    runs, the next stage's input exchange and the previous stage's output exchange are in flight, in forward and in
    backward. Each send buffer is packed by one copy and each received one unpacked by one copy."""

    @staticmethod
    def forward(
        ctx, q, k, v, seg, group, kernel, scale: float, reuse: ForwardReuse | None, max_stages: int, sinks=None
    ):
        stages = HeadGroups.of(q.shape[1], k.shape[1], dist.get_world_size(group), q.device, max_stages)
        kept = reuse.take() if reuse is not None else None
        block = dist.get_rank(group) * stages.count  # stage g attends the query heads of block `block + g`
        recvs, results, finals, outgoing = [], [], [], []
        incoming = stages.send_inputs(q, k, v, 0, group)
        for g in range(stages.count):
            following = stages.send_inputs(q, k, v, g + 1, group) if g + 1 < stages.count else None
            recvs.append(incoming.wait())
            if kept is None:
                out_h, lse = kernel.forward(*stages.split(recvs[g]), seg, scale)
                results.append((out_h.to(q.dtype), lse))
            else:
                results.append(kept[g])
            # the sinks join what the backward keeps, not what a recomputation takes
            sinks_g = heads_block(sinks, stages.hq, block + g)
            finals.append(results[g] if sinks is None else with_sinks(*results[g], sinks_g))
            outgoing.append(stages.send_output(finals[g][0], group))
            incoming = following
        if reuse is not None and kept is None:
            reuse.keep(results)
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        for g, exchange in enumerate(outgoing):
            stages.place_output(exchange.wait(), g, out)
        ctx.save_for_backward(*recvs, *(t for pair in finals for t in pair), sinks)
        ctx.stages, ctx.block, ctx.seg, ctx.group, ctx.kernel, ctx.scale = stages, block, seg, group, kernel, scale
        ctx.kv_shape, ctx.kv_dtype = k.shape, k.dtype
        return out

    @staticmethod
    def backward(ctx, dout):
        stages, group = ctx.stages, ctx.group
        saved = ctx.saved_tensors
        recvs, results, sinks = saved[: stages.count], saved[stages.count : -1], saved[-1]
        dsinks = None if sinks is None else torch.zeros_like(sinks)
        dq = torch.empty(dout.shape, dtype=dout.dtype, device=dout.device)
        alloc = torch.empty if stages.kv_index is None else torch.zeros
        dk, dv = (alloc(ctx.kv_shape, dtype=ctx.kv_dtype, device=dout.device) for _ in range(2))
        returning = []
        incoming = stages.send_grad_output(dout, 0, group)
        for g in range(stages.count):
            following = stages.send_grad_output(dout, g + 1, group) if g + 1 < stages.count else None
            dout_h = incoming.wait().flatten(0, 1)
            q_h, k_h, v_h = stages.split(recvs[g])
            out_h, lse = results[2 * g], results[2 * g + 1]
            grads = ctx.kernel.backward(dout_h, q_h, k_h, v_h, out_h, lse, ctx.seg, ctx.scale)
            if sinks is not None:
                mine = heads_block(dsinks, stages.hq, ctx.block + g)
                mine.copy_(sinks_grad(dout_h, out_h, lse, heads_block(sinks, stages.hq, ctx.block + g)))
            returning.append(stages.send_grads(*(t.to(dout.dtype) for t in grads), group))
            incoming = following
        for g, exchange in enumerate(returning):
            stages.place_grads(exchange.wait(), g, dq, dk, dv)
        return dq, dk, dv, None, None, None, None, None, None, dsinks


def _chunk_major(recv: torch.Tensor, chunks: int) -> torch.Tensor:
    """(U, L, h, D) rank-major rows -> (U·L, h, D) chunk-major, so that whole chunks of the layout come out
    contiguous (the hybrid's ring sees the zigzag layout of the Ulysses group's rows)."""
    return recv.unflatten(1, (chunks, recv.shape[1] // chunks)).transpose(0, 1).flatten(0, 2)


def _rank_major(x: torch.Tensor, degree: int, chunks: int) -> torch.Tensor:
    """Inverse of `_chunk_major`, flattened: (U·L, h, D) chunk-major -> (U·L, h, D) rank-major."""
    length = x.shape[0] // degree
    return x.unflatten(0, (chunks, degree, length // chunks)).transpose(0, 1).flatten(0, 2)


class _ToHeads(torch.autograd.Function):
    """Sequence shards (L, H, D) of q, k, v -> this rank's heads of the Ulysses group's rows (U·L, h, D), in chunk
    order; backward sends the gradients back, replicated KV heads adding up."""

    @staticmethod
    def forward(ctx, q, k, v, heads: HeadGroups, group, chunks: int):
        recv = _chunk_major(heads.send_inputs(q, k, v, 0, group).wait(), chunks)
        ctx.heads, ctx.group, ctx.chunks = heads, group, chunks
        ctx.kv_shape, ctx.kv_dtype = k.shape, k.dtype
        return recv[:, : heads.hq], recv[:, heads.hq : heads.hq + heads.hk], recv[:, heads.hq + heads.hk :]

    @staticmethod
    def backward(ctx, dq_h, dk_h, dv_h):
        heads = ctx.heads
        grads = (_rank_major(t, heads.degree, ctx.chunks) for t in (dq_h, dk_h, dv_h))
        recv = heads.send_grads(*grads, ctx.group).wait()
        length = ctx.kv_shape[0]
        dq = torch.empty((length, heads.hq * heads.degree, dq_h.shape[-1]), dtype=dq_h.dtype, device=dq_h.device)
        alloc = torch.empty if heads.kv_index is None else torch.zeros
        dk, dv = (alloc(ctx.kv_shape, dtype=ctx.kv_dtype, device=dq_h.device) for _ in range(2))
        heads.place_grads(recv, 0, dq, dk, dv)
        return dq, dk, dv, None, None, None


class _FromHeads(torch.autograd.Function):
    """Inverse of `_ToHeads` for the output: (U·L, hq, D) in chunk order -> this rank's shard (L, Hq, D)."""

    @staticmethod
    def forward(ctx, out_h, heads: HeadGroups, group, chunks: int):
        ctx.heads, ctx.group, ctx.chunks = heads, group, chunks
        recv = heads.send_output(_rank_major(out_h, heads.degree, chunks), group).wait()
        out = torch.empty(
            (out_h.shape[0] // heads.degree, heads.hq * heads.degree, out_h.shape[-1]),
            dtype=out_h.dtype,
            device=out_h.device,
        )
        heads.place_output(recv, 0, out)
        return out

    @staticmethod
    def backward(ctx, dout):
        return _chunk_major(ctx.heads.send_grad_output(dout, 0, ctx.group).wait(), ctx.chunks), None, None, None


def scatter_heads(q, k, v, group: dist.ProcessGroup, chunks: int):
    """Sequence shards (L, H, D) -> this rank's heads of the Ulysses group's rows (U·L, h, D), for q, k and v in one
    exchange (one `HeadGroups` stage); returns them and the `HeadGroups` that `gather_heads` takes."""
    heads = HeadGroups.of(q.shape[1], k.shape[1], dist.get_world_size(group), q.device, 1)
    return (*_ToHeads.apply(q, k, v, heads, group, chunks), heads)


def gather_heads(out: torch.Tensor, heads: HeadGroups, group: dist.ProcessGroup, chunks: int) -> torch.Tensor:
    """Inverse of the query part of `scatter_heads`: (U·L, h, D) -> (L, U·h, D)."""
    return _FromHeads.apply(out, heads, group, chunks)
