"""flash-attn's varlen kernels, imported lazily: used only when flash-attn is installed and chosen."""

from __future__ import annotations

import functools
import importlib.util

import torch

from .base import Segments, flash_windows


@functools.cache
def is_flash_attn_available() -> bool:
    """Looked up once: a module search on every attention call would cost host time per layer."""
    return importlib.util.find_spec("flash_attn") is not None and torch.cuda.is_available()


class FlashAttnKernel:
    name = "flash_attn"

    def __init__(self, softcap: float | None = None) -> None:
        from flash_attn import flash_attn_interface

        self._fa = flash_attn_interface
        self.softcap = softcap

    def forward(self, q, k, v, seg: Segments, scale: float):
        cu_q, cu_k = seg.tensors(q.device)
        out, lse = self._fa._flash_attn_varlen_forward(
            q,
            k,
            v,
            cu_q,
            cu_k,
            seg.max_q,
            seg.max_k,
            0.0,
            scale,
            seg.causal,
            softcap=self.softcap or 0.0,
            alibi_slopes=None,
            return_softmax=False,
            **flash_windows(seg),
        )[:2]
        return out, lse

    def backward(self, dout, q, k, v, out, lse, seg: Segments, scale: float):
        cu_q, cu_k = seg.tensors(q.device)
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        self._fa._flash_attn_varlen_backward(
            dout.contiguous(),
            q,
            k,
            v,
            out,
            lse,
            dq,
            dk,
            dv,
            cu_q,
            cu_k,
            seg.max_q,
            seg.max_k,
            0.0,
            scale,
            seg.causal,
            softcap=self.softcap or 0.0,
            alibi_slopes=None,
            deterministic=False,
            rng_state=None,
            **flash_windows(seg),
        )
        return dq, dk, dv
