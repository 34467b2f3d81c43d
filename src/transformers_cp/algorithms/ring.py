"""Ring attention over any chunked layout (`ring`: contiguous, `zigzag`: balanced 2N chunks).

KV travels around the ring by P2P, the next block in flight while the current one is computed. In backward the
KV goes around again and each block's dK/dV (float32) travels with it, so it is home after a full turn. Steps that
hold no pairs on any rank are not in the plan (`plan.ring_plan`): KV and dK/dV jump them in one hop, and when only
step 0 is left nothing travels at all.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..comm import RingComm
from ..kernels import AttentionKernel, accumulation_dtype
from ..plan import Block
from ..sinks import sinks_grad, with_sinks
from .merge import Accumulator, Sum
from .reuse import ForwardReuse, forward_once

Steps = list[tuple[int, list[Block]]]


def _ring_forward(q, k, v, steps: Steps, group: dist.ProcessGroup, kernel: AttentionKernel, scale):
    """(out, lse) of the local queries over every KV block of the ring."""
    comm = RingComm(group)
    kv = torch.stack([k, v])
    acc = Accumulator(q)
    for i, (s, blocks) in enumerate(steps):
        nxt = comm.start(kv, steps[i + 1][0] - s) if i + 1 < len(steps) else None
        acc.attend(q, kv[0], kv[1], blocks, kernel, scale)
        if nxt is not None:
            comm.wait()
            kv = nxt
    return acc.out.to(q.dtype), acc.lse


class RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        q,
        k,
        v,
        steps: Steps,
        group,
        kernel: AttentionKernel,
        scale,
        reuse: ForwardReuse | None = None,
        sinks: torch.Tensor | None = None,
    ):
        out, lse = forward_once(reuse, lambda: _ring_forward(q, k, v, steps, group, kernel, scale))
        if sinks is not None:
            out, lse = with_sinks(out, lse, sinks)
        ctx.save_for_backward(q, k, v, out, lse, sinks)
        ctx.steps, ctx.group, ctx.kernel, ctx.scale = steps, group, kernel, scale
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, sinks = ctx.saved_tensors
        kv_comm, grad_comm = RingComm(ctx.group), RingComm(ctx.group)
        steps = ctx.steps
        kv = torch.stack([k, v])
        acc = accumulation_dtype(q.dtype)
        dq_buf = torch.empty(q.shape, dtype=acc, device=q.device)
        dq = Sum(dq_buf, [dq_buf])
        dkv_buf = torch.empty(kv.shape, dtype=acc, device=q.device)
        dkv = Sum(dkv_buf, [dkv_buf[0], dkv_buf[1]])
        incoming = None
        for i, (s, blocks) in enumerate(steps):
            last = i + 1 == len(steps)
            nxt = None if last else kv_comm.start(kv, steps[i + 1][0] - s)
            grads = []
            k_s, v_s = kv[0], kv[1]
            for b in blocks:
                qs = b.rows
                dq_b, dk_b, dv_b = ctx.kernel.backward(
                    dout[qs], q[qs], k_s[b.keys], v_s[b.keys], out[qs], lse[:, qs], b.seg, ctx.scale
                )
                dq.add(qs, dq_b)
                grads.append((b.keys, dk_b, dv_b))
            if incoming is not None:  # the dK/dV of the block we hold, accumulated by the ranks before us
                grad_comm.wait()
                dkv = Sum(incoming, [incoming[0], incoming[1]], written=True)
            for keys, dk_b, dv_b in grads:
                dkv.add(keys, dk_b, dv_b)
            # along with the KV, or home (to the rank s steps back, whose KV we hold) after the last step
            incoming = grad_comm.start(dkv.result, -s if last else steps[i + 1][0] - s)
            if nxt is not None:
                kv_comm.wait()
                kv = nxt
        grad_comm.wait()
        dsinks = None if sinks is None else sinks_grad(dout, out, lse, sinks)
        dkv_home = incoming.to(k.dtype)  # k and v share a dtype (stacked in forward): one conversion for both
        dk, dv = dkv_home[0], dkv_home[1]
        return dq.result.to(q.dtype), dk, dv, None, None, None, None, None, dsinks
