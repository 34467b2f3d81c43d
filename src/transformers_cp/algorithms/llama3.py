"""llama3-style CP: all-gather KV `heads_k_stride` heads at a time (the next stride in flight while the current
one is computed), attend the local queries to it, and reduce-scatter dK/dV in backward.

What is gathered is only the rows of each rank's KV that other ranks attend to (`plan.sent_rows`; all of a zigzag
shard but its last chunk on rank 0, little when the documents balance keeps most documents whole), padded to the
longest rank's. The blocks are the ring's (`plan.ring_plan`): those of step 0 against the rank's own KV, those of step
s against the gathered rows of ring rank r - s, which is what makes the two algorithms exact alike. K and V travel
together, interleaved per token ((n, 2, h, D)).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..comm import all_gather, contiguous, copy_rows, reduce_scatter
from ..kernels import AttentionKernel, accumulation_dtype
from ..sinks import sinks_grad, with_sinks
from .merge import Accumulator, Sum
from .reuse import ForwardReuse, forward_once
from .ring import Sent, Steps, add_packed, pack_rows


def _heads(stride_index: int, kv_stride: int, group_size: int) -> tuple[slice, slice]:
    """(q heads, kv heads) of one stride."""
    k0 = stride_index * kv_stride
    return slice(k0 * group_size, (k0 + kv_stride) * group_size), slice(k0, k0 + kv_stride)


def gathered_rows(sent: Sent) -> int:
    """Rows each rank contributes to the all-gather: its sent rows, padded to the longest rank's."""
    return max(sum(b - a for a, b in rows) for rows in sent)


class _Plan:
    """Who this rank is, and the length every rank's gathered rows are padded to."""

    def __init__(self, steps: Steps, sent: Sent, group) -> None:
        self.steps, self.sent = steps, sent
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        self.length = gathered_rows(sent)

    def source(self, step: int) -> int:
        """Whose gathered rows the blocks of `step` read."""
        return (self.rank - step) % self.world

    def gather(self, k, v, heads: slice, group):
        """Start gathering one stride's sent rows of every rank; returns a function giving (R, n, 2, h, D)."""
        gathered, work = all_gather(
            pack_rows(k[:, heads], v[:, heads], self.sent[self.rank], 1, self.length), group, async_op=True
        )

        def finish() -> torch.Tensor:
            work.wait()
            return gathered

        return finish


def _local_kv(k: torch.Tensor, v: torch.Tensor, heads: slice, n_strides: int) -> tuple[torch.Tensor, torch.Tensor]:
    if n_strides == 1:
        return k, v
    return contiguous(k[:, heads]), contiguous(v[:, heads])


def _llama3_forward(q, k, v, plan: _Plan, group, kernel: AttentionKernel, scale, kv_stride: int):
    """(out, lse) of the local queries against their own and the gathered KV, one stride of KV heads at a time."""
    g = q.shape[1] // k.shape[1]
    n_strides = k.shape[1] // kv_stride
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device) if n_strides > 1 else None
    lse = torch.empty((q.shape[1], q.shape[0]), dtype=accumulation_dtype(q.dtype), device=q.device)
    pending = plan.gather(k, v, _heads(0, kv_stride, g)[1], group)
    for i in range(n_strides):
        gathered = pending()
        if i + 1 < n_strides:
            pending = plan.gather(k, v, _heads(i + 1, kv_stride, g)[1], group)
        qh, kh = _heads(i, kv_stride, g)
        qs = contiguous(q[:, qh])
        acc = Accumulator(qs, lse[qh])  # its lse is this stride's rows of `lse`, settled when `out` is read
        for s, blocks in plan.steps:
            kv = (
                _local_kv(k, v, kh, n_strides)
                if s == 0
                else (gathered[plan.source(s), :, 0], gathered[plan.source(s), :, 1])
            )
            acc.attend(qs, *kv, blocks, kernel, scale)
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
        steps: Steps,
        sent: Sent,
        group,
        kernel: AttentionKernel,
        scale,
        kv_stride: int,
        reuse: ForwardReuse | None = None,
        sinks: torch.Tensor | None = None,
    ):
        plan = _Plan(steps, sent, group)
        out, lse = forward_once(reuse, lambda: _llama3_forward(q, k, v, plan, group, kernel, scale, kv_stride))
        if sinks is not None:
            out, lse = with_sinks(out, lse, sinks)
        ctx.save_for_backward(q, k, v, out, lse, sinks)
        ctx.plan, ctx.group, ctx.kernel, ctx.scale, ctx.kv_stride = plan, group, kernel, scale, kv_stride
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, sinks = ctx.saved_tensors
        plan, group = ctx.plan, ctx.group
        g, stride = q.shape[1] // k.shape[1], ctx.kv_stride
        n_strides = k.shape[1] // stride
        acc = accumulation_dtype(q.dtype)
        dq = torch.empty_like(q) if n_strides > 1 else None
        dk, dv = (torch.empty_like(k), torch.empty_like(v)) if n_strides > 1 else (None, None)
        pending = plan.gather(k, v, _heads(0, stride, g)[1], group)
        scatters = []
        for i in range(n_strides):
            gathered = pending()
            if i + 1 < n_strides:
                pending = plan.gather(k, v, _heads(i + 1, stride, g)[1], group)
            qh, kh = _heads(i, stride, g)
            qs, outs, douts = (contiguous(t[:, qh]) for t in (q, out, dout))
            lse_h = lse[qh]
            dq_buf = torch.empty(qs.shape, dtype=acc, device=q.device)
            dq_acc = Sum(dq_buf, [dq_buf])
            home_buf = torch.empty((k.shape[0], 2, *gathered.shape[3:]), dtype=acc, device=q.device)
            home = Sum(home_buf, [home_buf[:, 0], home_buf[:, 1]])  # this rank's own KV, from its own queries
            dgath_buf = torch.empty(gathered.shape, dtype=acc, device=q.device)
            dgath = [Sum(d, [d[:, 0], d[:, 1]]) for d in dgath_buf]  # per source rank, for the reduce-scatter
            for s, blocks in plan.steps:
                if s == 0:
                    ks, vs = _local_kv(k, v, kh, n_strides)
                    sums = home
                else:
                    ks, vs = gathered[plan.source(s), :, 0], gathered[plan.source(s), :, 1]
                    sums = dgath[plan.source(s)]
                for b in blocks:
                    rows, keys = b.rows, b.keys
                    dq_b, dk_b, dv_b = ctx.kernel.backward(
                        douts[rows], qs[rows], ks[keys], vs[keys], outs[rows], lse_h[:, rows], b.seg, ctx.scale
                    )
                    dq_acc.add(rows, dq_b)
                    sums.add(keys, dk_b, dv_b)
            if dq is None:  # one stride: all heads
                dq = dq_acc.result.to(q.dtype)
            else:
                copy_rows(dq[:, qh], dq_acc.result.to(q.dtype))
            for d in dgath:  # rows no block reached, every row of our own slot among them, are zero
                d.settle()
            scatters.append((kh, home, *reduce_scatter(dgath_buf, group, async_op=True)))
        for kh, home, mine, work in scatters:
            work.wait()  # our sent rows' dK/dV from every other rank
            add_packed(home, plan.sent[plan.rank], mine, dim=1)
            grads = home.result
            if dk is None:  # one stride: all heads
                dk, dv = grads[:, 0].to(k.dtype), grads[:, 1].to(v.dtype)
            else:
                copy_rows(dk[:, kh], grads[:, 0].to(dk.dtype))
                copy_rows(dv[:, kh], grads[:, 1].to(dv.dtype))
        dsinks = None if sinks is None else sinks_grad(dout, out, lse, sinks)
        return dq, dk, dv, None, None, None, None, None, None, None, dsinks
