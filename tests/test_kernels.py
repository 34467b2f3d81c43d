"""Every kernel against the exact math kernel on the segment shapes the planner produces.

The math kernel is itself checked against dense reference attention in test_attention; the fused kernels need CUDA
and are compared in bf16 at the bf16 level (their own rounding against float32 math is ~2e-3 relative)."""

from __future__ import annotations

import pytest
import torch
from reference import assert_close, document_ids

from transformers_cp.kernels import Segments, select_kernel
from transformers_cp.kernels.math import MathKernel

CASES = {
    "causal one": ((0, 256), (0, 256), True, None),
    "causal two equal chunks": ((0, 128, 256), (0, 128, 256), True, None),
    "causal documents": ((0, 5, 100, 101, 256), (0, 5, 100, 101, 256), True, None),
    "causal documents window": ((0, 5, 100, 101, 256), (0, 5, 100, 101, 256), True, 31),
    "dense rectangle": ((0, 256), (0, 128), False, None),
    "dense window": ((0, 40), (0, 128), False, 100),
    "prefix causal": ((0, 64, 192), (0, 128, 256), True, None),
    "long and short documents": ((0, 5, 2105, 2106, 4300), (0, 5, 2105, 2106, 4300), True, None),
    "two long equal chunks": ((0, 2048, 4096), (0, 2048, 4096), True, None),  # a zigzag diagonal: one batched call
    # 2100 and 2200 tokens run in cuDNN at 2112 and 2240 (`_bucket`), reading on into the rows after them
    "long documents borrowing the next rows": ((0, 2100, 4300, 4400), (0, 2100, 4300, 4400), True, None),
    # a short lone document off its bucket runs in the varlen op (`_cudnn_shape`), alone or around a long one
    "short document off its bucket": ((0, 553), (0, 553), True, None),
    "short documents around a long one": ((0, 553, 3299, 4096), (0, 553, 3299, 4096), True, None),
}


def _inputs(seg: Segments, hq: int, hk: int, dtype, device):
    g = torch.Generator(device=device).manual_seed(0)
    mk = lambda n, h: torch.randn(n, h, 64, generator=g, device=device).to(dtype)  # noqa: E731
    return mk(seg.cu_q[-1], hq), mk(seg.cu_k[-1], hk), mk(seg.cu_k[-1], hk), mk(seg.cu_q[-1], hq)


def test_math_kernel_matches_dense_softmax():
    """Causal documents with a window and GQA, float32, against plain masked softmax with autograd in float64."""
    seg = Segments((0, 7, 50, 64), (0, 7, 50, 64), causal=True, window_left=9)
    q, k, v, dout = _inputs(seg, 4, 2, torch.float32, "cpu")
    out, lse = MathKernel().forward(q, k, v, seg, 0.125)
    dq, dk, dv = MathKernel().backward(dout, q, k, v, out, lse, seg, 0.125)
    qr, kr, vr = (t.double().requires_grad_() for t in (q, k, v))
    doc = document_ids([7, 43, 14])
    i, j = torch.arange(64)[:, None], torch.arange(64)[None]
    visible = (doc[:, None] == doc[None]) & (j <= i) & (j >= i - 9)
    s = torch.einsum("qhd,khd->hqk", qr, kr.repeat_interleave(2, 1)) * 0.125
    s = s.masked_fill(~visible, float("-inf"))
    ref = torch.einsum("hqk,khd->qhd", s.softmax(-1), vr.repeat_interleave(2, 1))
    ref.backward(dout.double())
    for got, want, name in (
        (out, ref, "out"),
        (lse, s.logsumexp(-1), "lse"),
        (dq, qr.grad, "dq"),
        (dk, kr.grad, "dk"),
        (dv, vr.grad, "dv"),
    ):
        assert_close(got.double(), want.detach(), 1e-5, name)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fused kernels need CUDA")
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("heads", [(8, 8), (8, 2)])
def test_fused_kernel_matches_math(case, heads):
    cu_q, cu_k, causal, window = CASES[case]
    seg = Segments(cu_q, cu_k, causal=causal, window_left=window)
    q, k, v, dout = _inputs(seg, *heads, torch.bfloat16, "cuda")
    kernel = select_kernel("torch", q)
    exact = MathKernel()
    out, lse = kernel.forward(q, k, v, seg, 0.125)
    ref_out, ref_lse = exact.forward(q, k, v, seg, 0.125)
    assert_close(out.float(), ref_out, 2e-2, "out")
    assert_close(lse.float(), ref_lse, 1e-3, "lse")
    # backward from the exact out/lse, as the blockwise algorithms call it with merged results
    grads = kernel.backward(dout, q, k, v, ref_out.to(q.dtype), ref_lse, seg, 0.125)
    ref_grads = exact.backward(dout, q, k, v, ref_out, ref_lse, seg, 0.125)
    for g, r, name in zip(grads, ref_grads, ("dq", "dk", "dv")):
        assert_close(g.float(), r, 2e-2, name)


def test_cudnn_lengths_are_rounded_to_few_reusable_sizes():
    """A lone causal document runs in cuDNN at `_bucket(n)`: never shorter, at most n/32 longer, a fixed point (the
    padded call is not padded again), and few distinct lengths, so cuDNN's per-shape plans are reused."""
    from transformers_cp.kernels.torch_fused import CUDNN_BUCKETS, _bucket

    for n in range(1, 140_000):
        m = _bucket(n)
        assert n <= m <= n + n // CUDNN_BUCKETS and _bucket(m) == m, (n, m)
    assert len({_bucket(n) for n in range(2048, 131073)}) < 200


def test_short_lone_documents_skip_cudnn_padding():
    """One causal document shorter than `CUDNN_MIN_DOCUMENT` at a length off its bucket goes to the varlen op rather
    than to cuDNN padded (copies of every input and output); at its bucket's length, or from 2048 tokens on, cuDNN."""
    from transformers_cp.kernels.torch_fused import _cudnn_shape

    def route(n, causal=True):
        t = torch.empty(n, 2, 8)
        return _cudnn_shape(Segments((0, n), (0, n), causal, None), t, t)

    assert route(553) is None  # bucket 560
    assert route(512) == (1, 512, 512) and route(31) == (1, 31, 31)  # their own buckets
    assert route(553, causal=False) == (1, 553, 553)  # no padding off the causal square
    assert route(2746) == (1, 2746, 2746)  # long: cuDNN at its bucket (2752)


def test_long_documents_of_one_shape_share_a_cudnn_call():
    """Consecutive long documents of one shape (a zigzag diagonal's two chunks) are one batched cuDNN call, unless
    their length is rounded (`_bucket`: each then runs padded alone); short ones and windows go to the varlen op."""
    from transformers_cp.kernels.torch_fused import _pieces

    def calls(cu, causal=True, window=None):
        return [(s.cu_q, s.cu_k, q0, k0) for s, q0, k0 in _pieces(Segments(cu, cu, causal, window), 128)]

    assert calls((0, 2048, 4096)) == [((0, 2048, 4096), (0, 2048, 4096), 0, 0)]
    assert calls((0, 2048, 4096), causal=False) == [((0, 2048, 4096), (0, 2048, 4096), 0, 0)]
    assert calls((0, 2048, 4096, 4100, 6148, 8196)) == [
        ((0, 2048, 4096), (0, 2048, 4096), 0, 0),
        ((0, 4), (0, 4), 4096, 4096),
        ((0, 2048, 4096), (0, 2048, 4096), 4100, 4100),
    ]
    assert calls((0, 2100, 4200)) == [((0, 2100), (0, 2100), 0, 0), ((0, 2100), (0, 2100), 2100, 2100)]
    assert calls((0, 2048, 6144)) == [((0, 2048), (0, 2048), 0, 0), ((0, 4096), (0, 4096), 2048, 2048)]
    assert calls((0, 2048, 4096), window=100) == [((0, 2048, 4096), (0, 2048, 4096), 0, 0)]
