"""Ring attention over any chunked layout (`ring`: contiguous, `zigzag`: balanced 2N chunks, or one that follows the
documents).

KV travels around the ring by P2P, the next block in flight while the current one is computed. What travels is only
the rows of a rank's KV that some other rank attends to (`plan.sent_rows`): all of them for one long document, few
when most documents stay on one rank. In backward the KV goes around again, and the dK/dV (float32) of those rows
starts at the first rank that attends to them, travels with them and comes home after the last, where it is added to
the rank's own. Steps that hold no pairs on any rank are not in the plan (`plan.ring_plan`): KV and dK/dV jump them
in one hop, and when only step 0 is left nothing travels at all.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

from ..comm import RingComm, copy_rows
from ..kernels import AttentionKernel, accumulation_dtype
from ..layout import Range
from ..plan import Block
from ..sinks import sinks_grad, with_sinks
from .merge import Accumulator, Sum
from .reuse import ForwardReuse, forward_once

Steps = list[tuple[int, list[Block]]]
Sent = Sequence[Sequence[Range]]  # per ring rank, the rows of its KV that travel (`plan.sent_rows`)


def pack_rows(k: torch.Tensor, v: torch.Tensor, rows: Sequence[Range], dim: int = 0, length: int | None = None):
    """The `rows` of K and of V, concatenated, stacked along `dim`: (2, n, H, D) for the ring's P2P, or (n, 2, H, D),
    interleaved per token, for llama3's all-gather; rows up to `length` after them are never read."""
    n = sum(b - a for a, b in rows)
    length = n if length is None else length
    if len(rows) == 1 and n == length:  # one copy
        ((a, b),) = rows
        return torch.stack([k[a:b], v[a:b]], dim=dim)
    shape = [length, *k.shape[1:]]
    shape.insert(dim, 2)
    kv = torch.empty(shape, dtype=k.dtype, device=k.device)
    offset = 0
    for a, b in rows:
        copy_rows(kv.select(dim, 0)[offset : offset + b - a], k[a:b])
        copy_rows(kv.select(dim, 1)[offset : offset + b - a], v[a:b])
        offset += b - a
    return kv


def add_packed(total: Sum, rows: Sequence[Range], packed: torch.Tensor, dim: int = 0) -> None:
    """Add `packed` (dK and dV laid out as `pack_rows` lays out K and V) to the rows `rows` of `total`'s parts."""
    dk, dv = packed.select(dim, 0), packed.select(dim, 1)
    offset = 0
    for a, b in rows:
        total.add(slice(a, b), dk[offset : offset + b - a], dv[offset : offset + b - a])
        offset += b - a


def _shape(kv: torch.Tensor, sent: Sent, ring_rank: int) -> tuple[int, ...]:
    """The shape of the sent buffer (or of its dK/dV) of ring rank `ring_rank`, given one of ours."""
    return (kv.shape[0], sum(b - a for a, b in sent[ring_rank % len(sent)]), *kv.shape[2:])


def _ring_forward(q, k, v, steps: Steps, sent: Sent, group: dist.ProcessGroup, kernel, scale):
    """(out, lse) of the local queries over every KV block of the ring."""
    comm = RingComm(group)
    acc = Accumulator(q)
    kv = pack_rows(k, v, sent[comm.rank]) if len(steps) > 1 else None
    for i, (s, blocks) in enumerate(steps):
        if i + 1 < len(steps):  # the sent KV of the rank whose KV we hold at the next step
            nxt = comm.start(kv, steps[i + 1][0] - s, _shape(kv, sent, comm.rank - steps[i + 1][0]))
        else:
            nxt = None
        acc.attend(q, *((k, v) if i == 0 else kv), blocks, kernel, scale)
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
        sent: Sent,
        group,
        kernel: AttentionKernel,
        scale,
        reuse: ForwardReuse | None = None,
        sinks: torch.Tensor | None = None,
    ):
        out, lse = forward_once(reuse, lambda: _ring_forward(q, k, v, steps, sent, group, kernel, scale))
        if sinks is not None:
            out, lse = with_sinks(out, lse, sinks)
        ctx.save_for_backward(q, k, v, out, lse, sinks)
        ctx.steps, ctx.sent, ctx.group, ctx.kernel, ctx.scale = steps, sent, group, kernel, scale
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, sinks = ctx.saved_tensors
        kv_comm, grad_comm = RingComm(ctx.group), RingComm(ctx.group)
        steps, sent = ctx.steps, ctx.sent
        acc = accumulation_dtype(q.dtype)
        dq_buf = torch.empty(q.shape, dtype=acc, device=q.device)
        dq = Sum(dq_buf, [dq_buf])
        home_buf = torch.empty((2, *k.shape), dtype=acc, device=q.device)
        home = Sum(home_buf, [home_buf[0], home_buf[1]])  # dK/dV of this rank's own KV from its own queries
        rank = kv_comm.rank
        kv = pack_rows(k, v, sent[rank]) if len(steps) > 1 else None
        incoming = None
        for i, (s, blocks) in enumerate(steps):
            last = i + 1 == len(steps)
            nxt = None if last else kv_comm.start(kv, steps[i + 1][0] - s, _shape(kv, sent, rank - steps[i + 1][0]))
            k_s, v_s = (k, v) if i == 0 else (kv[0], kv[1])
            grads = []
            for b in blocks:
                qs = b.rows
                dq_b, dk_b, dv_b = ctx.kernel.backward(
                    dout[qs], q[qs], k_s[b.keys], v_s[b.keys], out[qs], lse[:, qs], b.seg, ctx.scale
                )
                dq.add(qs, dq_b)
                grads.append((b.keys, dk_b, dv_b))
            if i == 0:
                dkv = home
            elif incoming is None:  # the first rank to attend to the rows we hold: their dK/dV starts here
                buf = torch.empty(kv.shape, dtype=acc, device=q.device)
                dkv = Sum(buf, [buf[0], buf[1]])
            else:  # the dK/dV of the rows we hold, accumulated by the ranks before us
                grad_comm.wait()
                dkv = Sum(incoming, [incoming[0], incoming[1]], written=True)
            for keys, dk_b, dv_b in grads:
                dkv.add(keys, dk_b, dv_b)
            if i > 0:  # along with the KV, or home (to the rank s steps back, whose KV we hold) after the last step
                hops, held_next = (-s, rank) if last else (steps[i + 1][0] - s, rank - steps[i + 1][0])
                incoming = grad_comm.start(dkv.result, hops, _shape(dkv.result, sent, held_next))
            if nxt is not None:
                kv_comm.wait()
                kv = nxt
        if incoming is not None:  # our sent rows' dK/dV from every other rank
            grad_comm.wait()
            add_packed(home, sent[rank], incoming)
        dsinks = None if sinks is None else sinks_grad(dout, out, lse, sinks)
        dkv_home = home.result.to(k.dtype)  # k and v share a dtype: one conversion for both
        dk, dv = dkv_home[0], dkv_home[1]
        return dq.result.to(q.dtype), dk, dv, None, None, None, None, None, None, dsinks
