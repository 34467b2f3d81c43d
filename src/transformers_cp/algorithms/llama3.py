"""llama3-style CP: all-gather KV `heads_k_stride` heads at a time (the next stride in flight while the current
one is computed), attend the local chunks to the gathered KV, and reduce-scatter dK/dV in backward.

On the zigzag layout each rank holds one early and one late chunk, so the causal work is balanced. K and V travel
together, interleaved per token ((L, 2, h, D)), so that the gathered buffer is already one sequence in rank order;
`Spans` moves its chunks to global order (and the gradients back) with one wide copy per chunk.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import torch.distributed as dist

from ..comm import all_gather, contiguous, copy_rows, reduce_scatter
from ..kernels import AttentionKernel, accumulation_dtype
from ..plan import Block
from ..sinks import sinks_grad, with_sinks
from .merge import Accumulator, Sum
from .reuse import ForwardReuse, forward_once


class Span(NamedTuple):
    rank: int  # ring rank holding the chunk
    local: int  # its first row in that rank's shard
    start: int  # its first global position
    length: int


Spans = tuple[Span, ...]


SPAN_COPIES = 8
"""Up to this many chunks move with one wide copy each; more (a layout that follows documents) with one indexed copy."""


@functools.lru_cache(maxsize=16)
def _order_index(spans: Spans, device: torch.device) -> torch.Tensor:
    """For each global position, its row in the flattened (R·L, ...) per-rank buffer."""
    length = sum(s.length for s in spans) // len({s.rank for s in spans})
    index = torch.empty(sum(s.length for s in spans), dtype=torch.long)
    for s in spans:
        index[s.start : s.start + s.length] = torch.arange(s.length) + s.rank * length + s.local
    return index.to(device)


def _move_chunks(spans: Spans, by_rank: torch.Tensor, in_order: torch.Tensor, to_order: bool) -> None:
    """Copy each chunk between its rows in the (R, L, ...) per-rank buffer and in the (S, ...) global-order one, in
    the direction `to_order` says."""
    if len(spans) > SPAN_COPIES:
        index, flat = _order_index(spans, in_order.device), by_rank.flatten(0, 1)
        if to_order:
            torch.index_select(flat, 0, index, out=in_order)
        else:
            flat.index_copy_(0, index, in_order)
        return
    for s in spans:
        rank_rows = by_rank[s.rank, s.local : s.local + s.length]
        order_rows = in_order[s.start : s.start + s.length]
        if to_order:
            copy_rows(order_rows, rank_rows)
        else:
            copy_rows(rank_rows, order_rows)


def _heads(stride_index: int, kv_stride: int, group_size: int) -> tuple[slice, slice]:
    """(q heads, kv heads) of one stride."""
    k0 = stride_index * kv_stride
    return slice(k0 * group_size, (k0 + kv_stride) * group_size), slice(k0, k0 + kv_stride)


def _stride_kv(k: torch.Tensor, v: torch.Tensor, heads: slice) -> torch.Tensor:
    """One stride's KV heads interleaved per token, (L, 2, h, D): what each rank sends to the all-gather (one copy)."""
    return torch.stack([k[:, heads], v[:, heads]], dim=1)


def _gather(kv: torch.Tensor, group, spans: Spans):
    """Start gathering this rank's (L, 2, h, D) KV stride; returns a function giving (S, 2, h, D) in global order."""
    gathered, work = all_gather(contiguous(kv), group, async_op=True)

    def finish() -> torch.Tensor:
        work.wait()
        full = torch.empty((sum(s.length for s in spans), *kv.shape[1:]), dtype=kv.dtype, device=kv.device)
        _move_chunks(spans, gathered, full, to_order=True)
        return full

    return finish


def _scatter_grads(dfull: torch.Tensor, group, spans: Spans, world: int):
    """Start summing the (S, 2, h, D) KV gradients over the ranks, each keeping its own chunks' (L, 2, h, D)."""
    per_rank = torch.empty((world, dfull.shape[0] // world, *dfull.shape[1:]), dtype=dfull.dtype, device=dfull.device)
    _move_chunks(spans, per_rank, dfull, to_order=False)
    return reduce_scatter(per_rank, group, async_op=True)


def _llama3_forward(q, k, v, blocks: list[Block], spans, group, kernel: AttentionKernel, scale, kv_stride: int):
    """(out, lse) of the local queries against the all-gathered KV, one stride of KV heads at a time."""
    g = q.shape[1] // k.shape[1]
    n_strides = k.shape[1] // kv_stride
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device) if n_strides > 1 else None
    lse = torch.empty((q.shape[1], q.shape[0]), dtype=accumulation_dtype(q.dtype), device=q.device)
    pending = _gather(_stride_kv(k, v, _heads(0, kv_stride, g)[1]), group, spans)
    for i in range(n_strides):
        full = pending()
        if i + 1 < n_strides:
            pending = _gather(_stride_kv(k, v, _heads(i + 1, kv_stride, g)[1]), group, spans)
        qh, _ = _heads(i, kv_stride, g)
        qs = contiguous(q[:, qh])
        acc = Accumulator(qs, lse[qh])  # its lse is this stride's rows of `lse`, settled when `out` is read
        acc.attend(qs, full[:, 0], full[:, 1], blocks, kernel, scale)
        if out is None:  # one stride: all heads
            out = acc.out.to(q.dtype)
        else:
            copy_rows(out[:, qh], acc.out.to(q.dtype))
    return out, lse


class Llama3Attention(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        q,
        k,
        v,
        blocks: list[Block],
        spans: Spans,
        group,
        kernel: AttentionKernel,
        scale,
        kv_stride: int,
        reuse: ForwardReuse | None = None,
        sinks: torch.Tensor | None = None,
    ):
        out, lse = forward_once(
            reuse, lambda: _llama3_forward(q, k, v, blocks, spans, group, kernel, scale, kv_stride)
        )
        if sinks is not None:
            out, lse = with_sinks(out, lse, sinks)
        ctx.save_for_backward(q, k, v, out, lse, sinks)
        ctx.blocks, ctx.spans, ctx.group, ctx.kernel, ctx.scale = blocks, spans, group, kernel, scale
        ctx.kv_stride = kv_stride
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, sinks = ctx.saved_tensors
        g, stride = q.shape[1] // k.shape[1], ctx.kv_stride
        n_strides = k.shape[1] // stride
        world = dist.get_world_size(ctx.group)
        dq = torch.empty_like(q) if n_strides > 1 else None
        dk, dv = (torch.empty_like(k), torch.empty_like(v)) if n_strides > 1 else (None, None)
        pending = _gather(_stride_kv(k, v, _heads(0, stride, g)[1]), ctx.group, ctx.spans)
        scatters = []
        for i in range(n_strides):
            full = pending()
            if i + 1 < n_strides:
                pending = _gather(_stride_kv(k, v, _heads(i + 1, stride, g)[1]), ctx.group, ctx.spans)
            qh, kh = _heads(i, stride, g)
            qs, outs, douts = (contiguous(t[:, qh]) for t in (q, out, dout))
            dq_buf = torch.empty(qs.shape, dtype=accumulation_dtype(q.dtype), device=q.device)
            dfull_buf = torch.empty(full.shape, dtype=accumulation_dtype(q.dtype), device=q.device)
            dq_acc, dfull = Sum(dq_buf, [dq_buf]), Sum(dfull_buf, [dfull_buf[:, 0], dfull_buf[:, 1]])
            full_k, full_v, lse_h = full[:, 0], full[:, 1], lse[qh]
            for b in ctx.blocks:
                rows, keys = b.rows, b.keys
                dq_b, dk_b, dv_b = ctx.kernel.backward(
                    douts[rows], qs[rows], full_k[keys], full_v[keys], outs[rows], lse_h[:, rows], b.seg, ctx.scale
                )
                dq_acc.add(rows, dq_b)
                dfull.add(keys, dk_b, dv_b)
            if dq is None:  # one stride: all heads
                dq = dq_acc.result.to(q.dtype)
            else:
                copy_rows(dq[:, qh], dq_acc.result.to(q.dtype))
            scatters.append((kh, *_scatter_grads(dfull.result, ctx.group, ctx.spans, world)))
        for kh, mine, work in scatters:
            work.wait()
            if dk is None:  # one stride: all heads
                dk, dv = mine[:, 0].to(k.dtype), mine[:, 1].to(v.dtype)
            else:
                copy_rows(dk[:, kh], mine[:, 0].to(dk.dtype))
                copy_rows(dv[:, kh], mine[:, 1].to(dv.dtype))
        dsinks = None if sinks is None else sinks_grad(dout, out, lse, sinks)
        return dq, dk, dv, None, None, None, None, None, None, None, dsinks
