"""Blockwise softmax bookkeeping: partial outputs merge through their log-sum-exp, in float32 (float64 for float64 inputs).

Both sums here start from nothing: a row's first block is copied in rather than merged into (-inf, 0) or added to
zeros, which gives the same values (logaddexp(-inf, l) = l, exp(0) = 1, 0 + x = x) for one copy instead of the
initial fill and a merge's half-dozen kernels. Which rows are still empty is known on the host (`Rows`), so this
costs no synchronisation; rows that no block reaches are filled as before when the result is read.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..kernels import AttentionKernel, accumulation_dtype
from ..plan import Block


class Rows:
    """The row ranges [a, b) of a buffer that nothing has been written to yet."""

    def __init__(self, count: int) -> None:
        self.unseen: list[tuple[int, int]] = [(0, count)] if count else []

    def take(self, a: int, b: int) -> list[tuple[int, int]]:
        """The unseen parts of [a, b), which count as written from now on."""
        taken, left = [], []
        for s, e in self.unseen:
            if e <= a or s >= b:
                left.append((s, e))
                continue
            taken.append((max(s, a), min(e, b)))
            if s < a:
                left.append((s, a))
            if e > b:
                left.append((b, e))
        self.unseen = left
        return taken


class Accumulator:
    """Running (out, lse) of local queries over the KV blocks seen so far; `lse`: the (H, L) buffer in the
    accumulation dtype that the lse is kept in (the caller's, which then needs no copy of it), else one of its own."""

    def __init__(self, q: torch.Tensor, lse: torch.Tensor | None = None) -> None:
        acc = accumulation_dtype(q.dtype)
        self._out = torch.empty(q.shape, dtype=acc, device=q.device)
        self._lse = torch.empty((q.shape[1], q.shape[0]), dtype=acc, device=q.device) if lse is None else lse
        self._empty = Rows(q.shape[0])

    def _clear(self, a: int, b: int) -> None:
        """Rows [a, b) as the merge of no block: output 0, lse -inf."""
        self._out[a:b].zero_()
        self._lse[:, a:b].fill_(float("-inf"))

    def _settle(self) -> None:
        for a, b in self._empty.take(0, self._out.shape[0]):
            self._clear(a, b)

    @property
    def out(self) -> torch.Tensor:
        """The merged output; reading it (or `lse`) settles both, rows no block reached being (0, -inf)."""
        self._settle()
        return self._out

    @property
    def lse(self) -> torch.Tensor:
        self._settle()
        return self._lse

    def add(self, rows: tuple[int, int], out: torch.Tensor, lse: torch.Tensor) -> None:
        """Fold a block's result for query rows [a, b) in. Every row of a block sees at least one key."""
        a, b = rows
        empty = self._empty.take(a, b)
        if empty == [(a, b)]:  # the merge with nothing: the block itself
            self._out[a:b].copy_(out)
            self._lse[:, a:b].copy_(lse)
            return
        for s, e in empty:
            self._clear(s, e)
        acc_out, acc_lse = self._out[a:b], self._lse[:, a:b]
        new_lse = torch.logaddexp(acc_lse, lse)
        w_acc = torch.exp(acc_lse - new_lse).T.unsqueeze(-1)
        w_new = torch.exp(lse - new_lse).T.unsqueeze(-1)
        acc_out.mul_(w_acc).add_(out * w_new)  # w_new has the accumulation dtype: out is promoted, as `.to` did
        acc_lse.copy_(new_lse)

    def attend(self, q, k, v, blocks: list[Block], kernel: AttentionKernel, scale: float) -> None:
        """Fold in every block of the local queries `q` against the KV buffers `k`, `v`."""
        for b in blocks:
            out, lse = kernel.forward(q[b.rows], k[b.keys], v[b.keys], b.seg, scale)
            self.add(b.q, out, lse)


class Sum:
    """A gradient summed over blocks in `buffer` (the accumulation dtype). `parts` are views of it whose dim 0 is the
    rows the blocks address (dK and dV of one KV buffer share them); `written`: the buffer already holds values to
    add to (a dK/dV that arrived from another rank), else it starts empty and a block's first rows are copied in."""

    def __init__(self, buffer: torch.Tensor, parts: Sequence[torch.Tensor], written: bool = False) -> None:
        self.buffer, self.parts = buffer, parts
        self._empty = Rows(0 if written else parts[0].shape[0])

    def _clear(self, empty: list[tuple[int, int]]) -> None:
        for a, b in empty:
            for part in self.parts:
                part[a:b].zero_()

    def add(self, rows: slice, *values: torch.Tensor) -> None:
        """Add one block's gradients (one per part) to rows `rows`."""
        empty = self._empty.take(rows.start, rows.stop)
        if empty == [(rows.start, rows.stop)]:
            for part, value in zip(self.parts, values):
                part[rows].copy_(value)
            return
        self._clear(empty)
        for part, value in zip(self.parts, values):
            part[rows].add_(value)

    def settle(self) -> None:
        """Zero the rows that no block reached."""
        self._clear(self._empty.take(0, self.parts[0].shape[0]))

    @property
    def result(self) -> torch.Tensor:
        """The buffer, rows that no block reached being zero."""
        self.settle()
        return self.buffer
