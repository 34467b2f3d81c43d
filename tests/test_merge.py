"""The blockwise sums start from nothing: a row's first block is copied in instead of merged into (-inf, 0) or added
to zeros, bit for bit the values of the merge from an initialised buffer (`algorithms.merge`)."""

from __future__ import annotations

import torch

from transformers_cp.algorithms.merge import Accumulator, Rows, Sum

ROWS, HEADS, DIM = 12, 3, 4
# whole rows first; a fresh block, then one over seen and fresh rows; overlapping blocks; rows 10-11 never reached
BLOCK_ORDERS = [[(0, 12), (4, 12), (0, 6)], [(2, 5), (0, 8), (6, 10), (2, 5)], [(0, 4), (4, 8), (1, 7)]]


def _merge_from_empty(blocks):
    """The merge as it was written before the first-block copy: every block folded into (0, -inf)."""
    out = torch.zeros(ROWS, HEADS, DIM)
    lse = torch.full((HEADS, ROWS), float("-inf"))
    for (a, b), o, block_lse in blocks:
        acc_out, acc_lse = out[a:b], lse[:, a:b]
        new_lse = torch.logaddexp(acc_lse, block_lse)
        w_acc = torch.exp(acc_lse - new_lse).T.unsqueeze(-1)
        w_new = torch.exp(block_lse - new_lse).T.unsqueeze(-1)
        acc_out.mul_(w_acc).add_(o.float() * w_new)
        acc_lse.copy_(new_lse)
    return out, lse


def test_rows_hands_out_each_row_once():
    rows = Rows(10)
    assert rows.take(2, 5) == [(2, 5)]
    assert rows.take(0, 8) == [(0, 2), (5, 8)]
    assert rows.take(3, 7) == []
    assert rows.unseen == [(8, 10)]


def test_accumulator_equals_the_merge_from_an_empty_buffer():
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        for order in BLOCK_ORDERS:
            blocks = [
                ((a, b), torch.randn(b - a, HEADS, DIM, generator=g).to(dtype), torch.randn(HEADS, b - a, generator=g))
                for a, b in order
            ]
            acc = Accumulator(torch.empty(ROWS, HEADS, DIM, dtype=dtype))
            for rows, o, block_lse in blocks:
                acc.add(rows, o, block_lse)
            want_out, want_lse = _merge_from_empty(blocks)
            assert torch.equal(acc.out, want_out) and torch.equal(acc.lse, want_lse), (dtype, order)


def test_sum_equals_adding_to_zeros():
    g = torch.Generator().manual_seed(1)
    for order in BLOCK_ORDERS:
        buf = torch.empty(2, ROWS, HEADS, DIM)
        grads = Sum(buf, [buf[0], buf[1]])
        want = torch.zeros(2, ROWS, HEADS, DIM)
        for a, b in order:
            dk, dv = (torch.randn(b - a, HEADS, DIM, generator=g).bfloat16() for _ in range(2))
            grads.add(slice(a, b), dk, dv)
            want[0, a:b] += dk
            want[1, a:b] += dv
        assert torch.equal(grads.result, want), order
    held = torch.randn(ROWS, HEADS, DIM, generator=g)  # dK/dV that arrived from another rank: added to, not copied
    buf = held.clone()
    grads = Sum(buf, [buf], written=True)
    grads.add(slice(0, 4), torch.ones(4, HEADS, DIM))
    held[0:4] += 1
    assert torch.equal(grads.result, held)
