"""llama3-style CP: all-gather KV `heads_k_stride` heads at a time (the next stride in flight while the current
one is computed), attend the local chunks to the gathered KV, and reduce-scatter dK/dV in backward.

On the zigzag layout each rank holds one early and one late chunk, so the causal work is balanced.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..comm import all_gather, reduce_scatter
from ..kernels import AttentionKernel
from ..plan import Block
from .merge import Accumulator
from .reuse import ForwardReuse, forward_once


def _heads(stride_index: int, kv_stride: int, group_size: int) -> tuple[slice, slice]:
    """(q heads, kv heads) of one stride."""
    k0 = stride_index * kv_stride
    return slice(k0 * group_size, (k0 + kv_stride) * group_size), slice(k0, k0 + kv_stride)


def _gather(kv: torch.Tensor, group, order: torch.Tensor | None):
    """Start gathering this rank's (2, L, h, D) KV stride; returns a function giving (2, S, h, D) in global order."""
    gathered, work = all_gather(kv, group, async_op=True)

    def finish() -> torch.Tensor:
        work.wait()
        full = gathered.transpose(0, 1).flatten(1, 2)  # (2, R*L, h, D), rank-major
        return full if order is None else full.index_select(1, order)

    return finish


def _llama3_forward(q, k, v, blocks: list[Block], order, group, kernel: AttentionKernel, scale, kv_stride: int):
    """(out, lse) of the local queries against the all-gathered KV, one stride of KV heads at a time."""
    g = q.shape[1] // k.shape[1]
    n_strides = k.shape[1] // kv_stride
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((q.shape[1], q.shape[0]), dtype=torch.float32, device=q.device)
    kv = torch.stack([k, v])
    pending = _gather(kv[:, :, _heads(0, kv_stride, g)[1]], group, order)
    for i in range(n_strides):
        full = pending()
        if i + 1 < n_strides:
            pending = _gather(kv[:, :, _heads(i + 1, kv_stride, g)[1]], group, order)
        qh, _ = _heads(i, kv_stride, g)
        qs = q[:, qh]
        acc = Accumulator(qs)
        acc.attend(qs, full[0], full[1], blocks, kernel, scale)
        out[:, qh] = acc.out.to(q.dtype)
        lse[qh] = acc.lse
    return out, lse


class Llama3Attention(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        q,
        k,
        v,
        blocks: list[Block],
        order,
        group,
        kernel: AttentionKernel,
        scale,
        kv_stride: int,
        reuse: ForwardReuse | None = None,
    ):
        out, lse = forward_once(
            reuse, lambda: _llama3_forward(q, k, v, blocks, order, group, kernel, scale, kv_stride)
        )
        ctx.save_for_backward(q, k, v, out, lse, order)
        ctx.blocks, ctx.group, ctx.kernel, ctx.scale, ctx.kv_stride = blocks, group, kernel, scale, kv_stride
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, order = ctx.saved_tensors
        g, stride = q.shape[1] // k.shape[1], ctx.kv_stride
        n_strides = k.shape[1] // stride
        world = dist.get_world_size(ctx.group)
        dq = torch.empty_like(q)
        dk, dv = torch.empty_like(k), torch.empty_like(v)
        kv = torch.stack([k, v])
        pending = _gather(kv[:, :, _heads(0, stride, g)[1]], ctx.group, order)
        scatters = []
        for i in range(n_strides):
            full = pending()
            if i + 1 < n_strides:
                pending = _gather(kv[:, :, _heads(i + 1, stride, g)[1]], ctx.group, order)
            qh, kh = _heads(i, stride, g)
            dq_acc = torch.zeros(q[:, qh].shape, dtype=torch.float32, device=q.device)
            dfull = torch.zeros(full.shape, dtype=torch.float32, device=q.device)
            for b in ctx.blocks:
                rows, keys = b.rows, b.keys
                dq_b, dk_b, dv_b = ctx.kernel.backward(
                    dout[rows, qh],
                    q[rows, qh],
                    full[0, keys],
                    full[1, keys],
                    out[rows, qh],
                    lse[qh, rows],
                    b.seg,
                    ctx.scale,
                )
                dq_acc[rows] += dq_b
                dfull[0, keys] += dk_b
                dfull[1, keys] += dv_b
            dq[:, qh] = dq_acc.to(q.dtype)
            if order is not None:  # back to rank-major order
                dfull = torch.empty_like(dfull).index_copy_(1, order, dfull)
            per_rank = dfull.unflatten(1, (world, -1)).transpose(0, 1)  # (R, 2, L, h, D)
            scatters.append((kh, *reduce_scatter(per_rank, ctx.group, async_op=True)))
        for kh, mine, work in scatters:
            work.wait()
            dk[:, kh] = mine[0].to(dk.dtype)
            dv[:, kh] = mine[1].to(dv.dtype)
        return dq, dk, dv, None, None, None, None, None, None, None
