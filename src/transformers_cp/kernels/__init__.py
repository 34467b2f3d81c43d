"""Local attention kernels behind one interface (see `base`), and the choice among them."""

from __future__ import annotations

import torch

from .base import AttentionKernel, Segments, accumulation_dtype
from .flash_attn import FlashAttnKernel, is_flash_attn_available
from .flex import FlexKernel
from .math import MathKernel
from .torch_fused import TorchKernel

__all__ = [
    "AttentionKernel",
    "Segments",
    "accumulation_dtype",
    "kernel_class",
    "select_kernel",
    "is_flash_attn_available",
]


SOFTCAP_KERNEL = "triton"
"""The logit-softcap kernel for CUDA half precision, 'triton' (`triton_softcap`) or 'flex' (`flex`): the fastest exact
one that benchmarks/softcap_kernels.py measured (benchmarks/results/softcap_kernels_1xH200.json). 'triton' falls back to
'flex' where Triton is not installed."""


def _softcap_kernel() -> type[AttentionKernel]:
    if SOFTCAP_KERNEL == "triton":
        try:
            from .triton_softcap import TritonSoftcapKernel
        except ImportError:  # no Triton
            return FlexKernel
        return TritonSoftcapKernel
    return FlexKernel


def _fused_ok(is_cuda: bool, dtype: torch.dtype, head_dim: int) -> bool:
    return is_cuda and dtype in (torch.float16, torch.bfloat16) and head_dim % 8 == 0 and head_dim <= 256


def kernel_class(
    backend: str, is_cuda: bool, dtype: torch.dtype, head_dim: int, softcap: float | None = None
) -> type[AttentionKernel]:
    """The kernel class for `backend` ('auto' | 'torch' | 'flash_attn') and inputs of this device, dtype, head size
    and logit softcap.

    Fused kernels need CUDA half precision; float32 inputs and CPU run the exact math kernel, so that the float32
    equivalence that the tests check holds on every device. A softcap goes to flash-attn where it is chosen or
    installed, else to `SOFTCAP_KERNEL` (the SDPA ops take none).
    """
    fused = _fused_ok(is_cuda, dtype, head_dim)
    if backend == "flash_attn":
        if not is_flash_attn_available():
            raise ImportError(
                "context_parallel_backend='flash_attn' needs flash-attn on a CUDA machine "
                "(`pip install flash-attn --no-build-isolation`, after torch); or set context_parallel_backend='torch'."
            )
        return FlashAttnKernel if fused else MathKernel
    if not fused:
        return MathKernel
    if backend == "auto" and is_flash_attn_available():
        return FlashAttnKernel
    return _softcap_kernel() if softcap else TorchKernel


def select_kernel(backend: str, q: torch.Tensor, softcap: float | None = None) -> AttentionKernel:
    """The kernel for `backend`, these inputs and the layer's logit softcap (see `kernel_class`)."""
    return kernel_class(backend, q.is_cuda, q.dtype, q.shape[-1], softcap)(softcap or None)
