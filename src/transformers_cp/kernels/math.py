"""Exact attention in float32 matrix products (float64 for float64 inputs): the CPU path, and the reference for float32
inputs anywhere.

Query rows are processed in blocks so that memory stays bounded by `block_rows × keys` scores per head. With a logit
softcap c the scores are c·tanh(s / c); the backward multiplies each score's gradient by the derivative
1 − tanh²(s / c) (the softmax gradient flows to the capped score, and through the cap to s).
"""

from __future__ import annotations

import torch

from .base import Segments, accumulation_dtype

BLOCK_ROWS = 1024


def _mask(rows: range, lk: int, lq: int, seg: Segments, device: torch.device) -> torch.Tensor | None:
    """Boolean (len(rows), lk) mask of visible keys for query rows `rows` of a segment, or None if all visible."""
    if not seg.causal and seg.window_left is None:
        return None
    a = torch.arange(rows.start, rows.stop, device=device)[:, None] + (lk - lq)
    b = torch.arange(lk, device=device)[None, :]
    visible = torch.ones(len(rows), lk, dtype=torch.bool, device=device)
    if seg.causal:
        visible &= b <= a
    if seg.window_left is not None:
        visible &= b >= a - seg.window_left
    return visible


def _blocks(seg: Segments):
    """(q offset, k offset, lq, lk, rows) for every query-row block of every segment."""
    for i in range(len(seg.cu_q) - 1):
        q0, k0 = seg.cu_q[i], seg.cu_k[i]
        lq, lk = seg.cu_q[i + 1] - q0, seg.cu_k[i + 1] - k0
        for r in range(0, lq, BLOCK_ROWS):
            yield q0, k0, lq, lk, range(r, min(lq, r + BLOCK_ROWS))


def _grouped(x: torch.Tensor, hk: int) -> torch.Tensor:
    """(L, Hq, D) -> (Hk, G, L, D) in the accumulation dtype, so that GQA broadcasts instead of repeating KV."""
    length, hq, d = x.shape
    return x.to(accumulation_dtype(x.dtype)).permute(1, 0, 2).reshape(hk, hq // hk, length, d)


def _ungrouped(x: torch.Tensor) -> torch.Tensor:
    hk, g, length, d = x.shape
    return x.reshape(hk * g, length, d).permute(1, 0, 2)


class MathKernel:
    name = "math"

    def __init__(self, softcap: float | None = None) -> None:
        self.softcap = softcap

    def _scores(self, qs, ks, rows, lk, lq, seg, scale) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Masked (capped) scores of a block, and tanh(s / softcap) for the backward (None without a cap)."""
        s = torch.matmul(qs, ks.transpose(-1, -2)) * scale
        t = None
        if self.softcap:
            t = torch.tanh(s / self.softcap)
            s = self.softcap * t
        mask = _mask(rows, lk, lq, seg, qs.device)
        if mask is not None:
            s = s.masked_fill(~mask, float("-inf"))
        return s, t

    def forward(self, q, k, v, seg: Segments, scale: float):
        hk, acc = k.shape[1], accumulation_dtype(q.dtype)
        out = torch.zeros(q.shape, dtype=acc, device=q.device)
        lse = torch.full((q.shape[1], q.shape[0]), float("-inf"), dtype=acc, device=q.device)
        for q0, k0, lq, lk, rows in _blocks(seg):
            qs = _grouped(q[q0 + rows.start : q0 + rows.stop], hk)
            ks = k[k0 : k0 + lk].to(acc).permute(1, 0, 2)[:, None]
            vs = v[k0 : k0 + lk].to(acc).permute(1, 0, 2)[:, None]
            s, _ = self._scores(qs, ks, rows, lk, lq, seg, scale)
            m = torch.logsumexp(s, dim=-1, keepdim=True)
            p = torch.exp(s - m.nan_to_num(neginf=0.0))
            sl = slice(q0 + rows.start, q0 + rows.stop)
            out[sl] = _ungrouped(torch.matmul(p, vs))
            lse[:, sl] = m.squeeze(-1).reshape(-1, len(rows))
        return out, lse

    def backward(self, dout, q, k, v, out, lse, seg: Segments, scale: float):
        hk, acc = k.shape[1], accumulation_dtype(q.dtype)
        dq = torch.zeros(q.shape, dtype=acc, device=q.device)
        dk = torch.zeros(k.shape, dtype=acc, device=q.device)
        dv = torch.zeros(v.shape, dtype=acc, device=q.device)
        for q0, k0, lq, lk, rows in _blocks(seg):
            sl = slice(q0 + rows.start, q0 + rows.stop)
            qs, dos, os_ = (_grouped(t[sl], hk) for t in (q, dout, out))
            ks = k[k0 : k0 + lk].to(acc).permute(1, 0, 2)[:, None]
            vs = v[k0 : k0 + lk].to(acc).permute(1, 0, 2)[:, None]
            m = lse[:, sl].reshape(hk, -1, len(rows), 1)
            s, t = self._scores(qs, ks, rows, lk, lq, seg, scale)
            p = torch.exp(s - m.nan_to_num(neginf=0.0, posinf=0.0))
            dp = torch.matmul(dos, vs.transpose(-1, -2))
            delta = (dos * os_).sum(-1, keepdim=True)
            ds = p * (dp - delta) * scale
            if t is not None:
                ds = ds * (1 - t * t)
            dq[sl] = _ungrouped(torch.matmul(ds, ks))
            dk[k0 : k0 + lk] += torch.matmul(ds.transpose(-1, -2), qs).sum(1).permute(1, 0, 2)
            dv[k0 : k0 + lk] += torch.matmul(p.transpose(-1, -2), dos).sum(1).permute(1, 0, 2)
        return dq, dk, dv
