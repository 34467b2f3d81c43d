"""Blockwise softmax bookkeeping: partial outputs merge through their log-sum-exp, in float32 (float64 for float64 inputs)."""

from __future__ import annotations

import torch

from ..kernels import AttentionKernel, accumulation_dtype
from ..plan import Block


class Accumulator:
    """Running (out, lse) of local queries over the KV blocks seen so far."""

    def __init__(self, q: torch.Tensor) -> None:
        acc = accumulation_dtype(q.dtype)
        self.out = torch.zeros(q.shape, dtype=acc, device=q.device)
        self.lse = torch.full((q.shape[1], q.shape[0]), float("-inf"), dtype=acc, device=q.device)

    def add(self, rows: tuple[int, int], out: torch.Tensor, lse: torch.Tensor) -> None:
        """Fold a block's result for query rows [a, b) in. Every row of a block sees at least one key."""
        a, b = rows
        acc_out, acc_lse = self.out[a:b], self.lse[:, a:b]
        new_lse = torch.logaddexp(acc_lse, lse)
        w_acc = torch.exp(acc_lse - new_lse).T.unsqueeze(-1)
        w_new = torch.exp(lse - new_lse).T.unsqueeze(-1)
        acc_out.mul_(w_acc).add_(out.to(acc_out.dtype) * w_new)
        acc_lse.copy_(new_lse)

    def attend(self, q, k, v, blocks: list[Block], kernel: AttentionKernel, scale: float) -> None:
        """Fold in every block of the local queries `q` against the KV buffers `k`, `v`."""
        for b in blocks:
            out, lse = kernel.forward(q[b.rows], k[b.keys], v[b.keys], b.seg, scale)
            self.add(b.q, out, lse)
