"""The Triton softcap attention kernel (`kernels.triton_softcap`) against the exact math kernel, in float32 under the
Triton interpreter on CPU tensors (`softcap_kernel_job.py`, in a fresh process): documents, causal and not,
bottom-right alignment (prefix rows that see no key), a window, GQA, head dims that are not powers of two, softcap on
and off, the backward from a merged (out, lse) as a ring calls it, strided inputs. The interpreter computes the 'exp'
tanh; the GPU's half-precision speed and error are measured by benchmarks/softcap_kernels.py. And the choice of the
kernel with and without Triton installed."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
from softcap_kernel_job import CASES, HEADS, SOFTCAPS

from transformers_cp.kernels import kernel_class
from transformers_cp.kernels.flex import FlexKernel
from transformers_cp.kernels.math import MathKernel
from transformers_cp.kernels.torch_fused import TorchKernel

JOB = os.path.join(os.path.dirname(__file__), "softcap_kernel_job.py")
NAMES = [
    *(f"{c} heads={h[0]}:{h[1]} d={h[2]} softcap={s}" for c in CASES for h in HEADS for s in SOFTCAPS),
    *(f"merged blocks softcap={s}" for s in SOFTCAPS),
    "strided inputs",
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


def test_kernel_class_keeps_float32_and_cpu_exact():
    """The fused choice never reaches float32 or CPU inputs: those keep the exact math kernel."""
    assert kernel_class("auto", False, torch.bfloat16, 128, 50.0) is MathKernel
    assert kernel_class("auto", True, torch.float32, 128, 50.0) is MathKernel


def test_softcap_kernel_without_triton_is_flex(monkeypatch):
    """Without Triton the package still imports and a softcap on CUDA half precision goes to FlexAttention."""
    import transformers_cp.kernels as kernels

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "triton" else real(name, *a))
    monkeypatch.setattr(kernels, "is_flash_attn_available", lambda: False)
    assert kernels.kernel_class("auto", True, torch.bfloat16, 128, 50.0) is FlexKernel
    assert kernels.kernel_class("torch", True, torch.bfloat16, 128, None) is TorchKernel
