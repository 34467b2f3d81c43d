"""The Triton softcap attention kernel (`kernels.triton_softcap`) against the exact math kernel, in float32 under the
Triton interpreter on CPU tensors (`softcap_kernel_job.py`, in a fresh process): documents, causal and not,
bottom-right alignment (prefix rows that see no key), a window, GQA, head dims that are not powers of two, softcap on
and off, the backward from a merged (out, lse) as a ring calls it, strided inputs. The interpreter computes the 'exp'
and 'rational' tanh; the GPU's half-precision speed and error are measured by benchmarks/softcap_kernels.py. And the
choice of the kernel with and without Triton installed."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
from reference import assert_close
from softcap_kernel_job import CASES, HEADS, SOFTCAPS

from transformers_cp.kernels import Segments, flex, kernel_class
from transformers_cp.kernels.flex import FlexKernel
from transformers_cp.kernels.math import MathKernel
from transformers_cp.kernels.torch_fused import TorchKernel

CUDA_CASES = {  # as test_kernels.py's
    "causal one": ((0, 1000), (0, 1000), True, None),
    "causal documents window": ((0, 5, 700, 701, 1500), (0, 5, 700, 701, 1500), True, 131),
    "dense rectangle": ((0, 512), (0, 300), False, None),
    "prefix causal": ((0, 64, 700), (0, 128, 900), True, None),
}
JOB = os.path.join(os.path.dirname(__file__), "softcap_kernel_job.py")
NAMES = [
    *(f"{c} heads={h[0]}:{h[1]} d={h[2]} softcap={s}" for c in CASES for h in HEADS for s in SOFTCAPS),
    *(f"merged blocks softcap={s}" for s in SOFTCAPS),
    "strided inputs",
    "atomic dq causal documents window",
    "atomic dq prefix causal",
    "atomic dq merged blocks",
    "rational tanh causal documents window",
    "rational tanh prefix causal",
    "rational tanh merged blocks",
    "64-bit offsets dq=separate",
    "64-bit offsets dq=atomic",
    "bad setting refused",
]


@pytest.fixture(scope="module")
def job_results() -> dict:
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed (the kernel's tests run it under Triton's interpreter)")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, JOB], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", NAMES)
def test_triton_kernel_matches_math(job_results, name):
    assert name in job_results, f"the job ran no check {name!r}"
    assert job_results[name] is None, job_results[name]


def test_kernel_class_keeps_float32_and_cpu_exact(monkeypatch):
    """A softcap on CUDA half precision goes to SOFTCAP_KERNEL where Triton is installed; the fused choice never
    reaches float32 or CPU inputs: those keep the exact math kernel."""
    import transformers_cp.kernels as kernels

    monkeypatch.setattr(kernels, "is_flash_attn_available", lambda: False)
    if importlib.util.find_spec("triton") is not None:
        assert kernels.SOFTCAP_KERNEL == "triton"
        assert kernel_class("auto", True, torch.bfloat16, 128, 50.0).name == "triton"
    assert kernel_class("auto", True, torch.bfloat16, 128, None) is TorchKernel
    assert kernel_class("auto", False, torch.bfloat16, 128, 50.0) is MathKernel
    assert kernel_class("auto", True, torch.float32, 128, 50.0) is MathKernel


def test_softcap_kernel_without_triton_is_flex(monkeypatch):
    """Without Triton the package still imports and a softcap on CUDA half precision goes to FlexAttention."""
    import transformers_cp.kernels as kernels

    monkeypatch.setitem(sys.modules, "triton", None)  # `import triton` raises ImportError
    monkeypatch.delitem(sys.modules, "transformers_cp.kernels.triton_softcap", raising=False)
    monkeypatch.setattr(kernels, "is_flash_attn_available", lambda: False)
    assert kernels.kernel_class("auto", True, torch.bfloat16, 128, 50.0) is FlexKernel
    assert kernels.kernel_class("torch", True, torch.bfloat16, 128, None) is TorchKernel


def test_flex_exp_score_mod_is_the_softcap():
    """FlexKernel's 'exp' score_mod is softcap·tanh(s / softcap), value and derivative, also where exp(2|s|/softcap)
    overflows float32; and its FlexAttention forward (CPU) matches the math kernel."""
    score = torch.cat([torch.linspace(-400.0, 400.0, 801), torch.tensor([-1e-6, 0.0, 1e-6])]).double()
    for dtype in (torch.float32, torch.float64):
        got_s, want_s = (score.to(dtype).requires_grad_() for _ in range(2))
        got = flex._softcap_mod(0.7, "exp")(got_s, 0, 0, 0, 0)
        want = flex._softcap_mod(0.7, "tanh")(want_s, 0, 0, 0, 0)
        got.sum().backward()
        want.sum().backward()
        tol = 1e-6 if dtype == torch.float32 else 1e-12
        assert_close(got.detach(), want.detach(), tol, f"{dtype} value")
        assert_close(got_s.grad, want_s.grad, tol, f"{dtype} derivative")
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(40, 2, 8, generator=g) * 2 for _ in range(3))
    seg = Segments((0, 13, 40), (0, 13, 40), True, 9)
    out, lse = flex.FlexKernel(0.7, tanh="exp").forward(q, k, v, seg, 0.9)
    ref_out, ref_lse = MathKernel(0.7).forward(q, k, v, seg, 0.9)
    assert_close(out, ref_out, 1e-5, "flex exp out")
    assert_close(lse, ref_lse, 1e-5, "flex exp lse")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the compiled kernel needs CUDA")
@pytest.mark.parametrize("tanh", [None, "rational", "approx"])
@pytest.mark.parametrize("dq", ["separate", "atomic"])
@pytest.mark.parametrize("case", list(CUDA_CASES))
def test_triton_kernel_on_cuda_matches_math(case, dq, tanh):
    """bf16 on the GPU against the math kernel on the same inputs, at the bf16 level of the fused kernels (see
    test_kernels.py), GQA 8:2, with a softcap that bends the scores; the backward from the math kernel's out/lse."""
    from transformers_cp.kernels.triton_softcap import TritonSoftcapKernel

    cu_q, cu_k, causal, window = CUDA_CASES[case]
    seg = Segments(cu_q, cu_k, causal=causal, window_left=window)
    g = torch.Generator(device="cuda").manual_seed(0)
    mk = lambda n, h, s=1.0: (s * torch.randn(n, h, 128, generator=g, device="cuda")).to(torch.bfloat16)  # noqa: E731
    q, k, v, dout = mk(cu_q[-1], 8, 4.0), mk(cu_k[-1], 2), mk(cu_k[-1], 2), mk(cu_q[-1], 8)
    kernel, exact = TritonSoftcapKernel(5.0, tanh=tanh, dq=dq), MathKernel(5.0)
    out, lse = kernel.forward(q, k, v, seg, 128**-0.5)
    ref_out, ref_lse = exact.forward(q, k, v, seg, 128**-0.5)
    assert_close(out.float(), ref_out, 2e-2, "out")
    assert_close(lse, ref_lse, 1e-3, "lse")
    grads = kernel.backward(dout, q, k, v, ref_out.to(q.dtype), ref_lse, seg, 128**-0.5)
    ref_grads = exact.backward(dout, q, k, v, ref_out.to(q.dtype), ref_lse, seg, 128**-0.5)
    for got, want, name in zip(grads, ref_grads, ("dq", "dk", "dv")):
        assert_close(got.float(), want, 2e-2, name)
