"""Local attention kernels behind one interface (see `base`), and the choice among them."""

from __future__ import annotations

import torch

from .base import AttentionKernel, Segments
from .flash_attn import FlashAttnKernel, is_flash_attn_available
from .math import MathKernel
from .torch_fused import TorchKernel

__all__ = ["AttentionKernel", "Segments", "select_kernel", "is_flash_attn_available"]


def _fused_ok(q: torch.Tensor) -> bool:
    d = q.shape[-1]
    return q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and d % 8 == 0 and d <= 256


def select_kernel(backend: str, q: torch.Tensor) -> AttentionKernel:
    """The kernel for `backend` ('auto' | 'torch' | 'flash_attn') and these inputs.

    Fused kernels need CUDA half precision; float32 inputs and CPU run the exact math kernel, so that the float32
    equivalence that the tests check holds on every device.
    """
    if backend == "flash_attn":
        if not is_flash_attn_available():
            raise ImportError(
                "context_parallel_backend='flash_attn' needs flash-attn on a CUDA machine "
                "(`pip install flash-attn --no-build-isolation`, after torch); or set context_parallel_backend='torch'."
            )
        return FlashAttnKernel() if _fused_ok(q) else MathKernel()
    if backend == "auto" and is_flash_attn_available() and _fused_ok(q):
        return FlashAttnKernel()
    return TorchKernel() if _fused_ok(q) else MathKernel()
