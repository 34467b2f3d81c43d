"""Attention on whole local sequences: no communication (Ulysses after its all-to-all, or one rank)."""

from __future__ import annotations

import torch

from ..kernels import AttentionKernel, Segments
from ..sinks import sinks_grad, with_sinks
from .reuse import ForwardReuse, forward_once


class LocalAttention(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        q,
        k,
        v,
        seg: Segments,
        kernel: AttentionKernel,
        scale: float,
        reuse: ForwardReuse | None = None,
        sinks: torch.Tensor | None = None,
    ):
        def compute():
            out, lse = kernel.forward(q, k, v, seg, scale)
            return out.to(q.dtype), lse

        out, lse = forward_once(reuse, compute)
        if sinks is not None:
            out, lse = with_sinks(out, lse, sinks)
        ctx.save_for_backward(q, k, v, out, lse, sinks)
        ctx.seg, ctx.kernel, ctx.scale = seg, kernel, scale
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, sinks = ctx.saved_tensors
        dq, dk, dv = ctx.kernel.backward(dout, q, k, v, out, lse, ctx.seg, ctx.scale)
        dsinks = None if sinks is None else sinks_grad(dout, out, lse, sinks)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, dsinks
