"""The Triton softcap attention kernel (`kernels.triton_softcap`) against the exact math kernel, in float32 under the
Triton interpreter on CPU tensors: documents, causal and not, bottom-right alignment (prefix rows that see no key),
a window, GQA, head dims that are not powers of two, softcap on and off, and the backward from a merged (out, lse) as
a ring calls it. The interpreter computes the 'exp' tanh; the GPU's half-precision speed and error are measured by
benchmarks/softcap_kernels.py."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch
from reference import assert_close

from transformers_cp.algorithms.merge import Accumulator
from transformers_cp.kernels import Segments, kernel_class
from transformers_cp.kernels.math import MathKernel

triton_available = importlib.util.find_spec("triton") is not None
pytestmark = pytest.mark.skipif(not triton_available, reason="triton is not installed (the kernel is CUDA-only)")
RTOL = 1e-5  # float32 flash accumulation against float32 matrix products: ~1e-6 here

CASES = {
    "causal one": ((0, 40), (0, 40), True, None),
    "causal documents window": ((0, 5, 37, 38, 70), (0, 5, 37, 38, 70), True, 9),
    "prefix causal": ((0, 20, 50), (0, 45, 90), True, None),
    "rows without keys": ((0, 50), (0, 30), True, None),
    "dense window": ((0, 33), (0, 70), False, 40),
    "dense rectangle": ((0, 50), (0, 30), False, None),
}


@pytest.fixture(scope="module")
def kernel_module(tmp_path_factory):
    """The kernel module loaded anew with TRITON_INTERPRET=1 (Triton reads it when the kernels are defined)."""
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        import transformers_cp.kernels as kernels

        path = Path(kernels.__file__).parent / "triton_softcap.py"
        spec = importlib.util.spec_from_file_location("transformers_cp.kernels._triton_softcap_interpreted", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        yield module
    finally:
        if old is None:
            os.environ.pop("TRITON_INTERPRET")
        else:
            os.environ["TRITON_INTERPRET"] = old


def _inputs(nq: int, nk: int, hq: int, hk: int, d: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    q = 2 * torch.randn(nq, hq, d, generator=g)  # large enough scores that a softcap of 1.5 bends them
    return (
        q,
        torch.randn(nk, hk, d, generator=g),
        torch.randn(nk, hk, d, generator=g),
        torch.randn(nq, hq, d, generator=g),
    )


def _check_lse(got: torch.Tensor, want: torch.Tensor, name: str) -> None:
    """Rows that see no key have lse −inf in both; the others agree."""
    seen = want.isfinite()
    assert torch.equal(got.isfinite(), seen), f"{name}: rows without keys differ"
    assert_close(got[seen], want[seen], RTOL, name)


@pytest.mark.parametrize("softcap", [None, 1.5])
@pytest.mark.parametrize("heads", [(4, 4), (4, 2)])
@pytest.mark.parametrize("case", list(CASES))
def test_kernel_matches_math(kernel_module, case, heads, softcap):
    cu_q, cu_k, causal, window = CASES[case]
    seg = Segments(cu_q, cu_k, causal, window)
    head_dim = 24 if heads[1] == 2 else 16  # 24: the tile is padded to 32
    q, k, v, dout = _inputs(cu_q[-1], cu_k[-1], *heads, head_dim, seed=len(case))
    kernel, exact = kernel_module.TritonSoftcapKernel(softcap), MathKernel(softcap)
    out, lse = kernel.forward(q, k, v, seg, 0.3)
    ref_out, ref_lse = exact.forward(q, k, v, seg, 0.3)
    assert_close(out, ref_out, RTOL, f"{case} out")
    _check_lse(lse, ref_lse, f"{case} lse")
    grads = kernel.backward(dout, q, k, v, ref_out, ref_lse, seg, 0.3)
    for got, want, name in zip(grads, exact.backward(dout, q, k, v, ref_out, ref_lse, seg, 0.3), ("dq", "dk", "dv")):
        assert_close(got, want, RTOL, f"{case} {name}")


def _merged(kernel, q, k, v, dout, split: int, scale: float):
    """Keys [0, split) and [split, T) of one causal document as two blocks (a ring's earlier block and its diagonal),
    merged through the lse; each block's backward takes the merged (out, lse), as ring attention calls it."""
    rows = q.shape[0] - split
    blocks = [
        (slice(0, split), Segments((0, rows), (0, split), causal=False)),
        (slice(split, q.shape[0]), Segments((0, rows), (0, rows), causal=True)),
    ]
    qs, acc = q[split:], Accumulator(q[split:])
    for keys, seg in blocks:
        acc.add((0, rows), *kernel.forward(qs, k[keys], v[keys], seg, scale))
    dq, dk, dv = torch.zeros_like(qs), torch.zeros_like(k), torch.zeros_like(v)
    for keys, seg in blocks:
        g = kernel.backward(dout[split:], qs, k[keys], v[keys], acc.out, acc.lse, seg, scale)
        dq += g[0]
        dk[keys] += g[1]
        dv[keys] += g[2]
    return acc.out, acc.lse, dq, dk, dv


@pytest.mark.parametrize("softcap", [None, 1.5])
def test_merged_blocks_match_math(kernel_module, softcap):
    """The backward from the merged (out, lse) of two blocks gives the whole attention's gradients."""
    q, k, v, dout = _inputs(60, 60, 4, 2, 16, seed=3)
    got = _merged(kernel_module.TritonSoftcapKernel(softcap), q, k, v, dout, 22, 0.3)
    want = _merged(MathKernel(softcap), q, k, v, dout, 22, 0.3)
    for a, b, name in zip(got, want, ("out", "lse", "dq", "dk", "dv")):
        assert_close(a, b, RTOL, f"softcap={softcap} {name}")


def test_strided_inputs(kernel_module):
    """Token-major views with other strides (q, k, v sliced out of one fused projection) give the same results."""
    qkv = torch.randn(48, 3, 4, 16, generator=torch.Generator().manual_seed(5))
    q, k, v = qkv.unbind(1)
    seg = Segments((0, 48), (0, 48), True, 11)
    kernel = kernel_module.TritonSoftcapKernel(1.5)
    got = kernel.forward(q, k, v, seg, 0.25)
    want = kernel.forward(q.contiguous(), k.contiguous(), v.contiguous(), seg, 0.25)
    for a, b, name in zip(got, want, ("out", "lse")):
        assert torch.equal(a, b), name


def test_unknown_tanh_mode_is_refused(kernel_module):
    with pytest.raises(ValueError, match="tanh="):
        kernel_module.TritonSoftcapKernel(1.0, tanh="fast")


def test_kernel_class_keeps_float32_and_cpu_exact():
    """The fused choice never reaches float32 or CPU inputs: those keep the exact math kernel."""
    assert kernel_class("auto", False, torch.bfloat16, 128, 50.0) is MathKernel
    assert kernel_class("auto", True, torch.float32, 128, 50.0) is MathKernel
