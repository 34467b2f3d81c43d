"""The one local attention kernel interface every algorithm calls.

Tensors are token-major (the varlen layout): q (Tq, Hq, D), k and v (Tk, Hk, D) with Hq a multiple of Hk (GQA is handled by the kernel, KV
heads are never repeated in memory). Segments pair q rows [cu_q[i], cu_q[i+1]) with k rows [cu_k[i], cu_k[i+1]) and are
aligned bottom-right as in flash-attn: with lq, lk the segment lengths, query row a may see key row b when
`b <= a + lk - lq` (if causal) and `b >= a + lk - lq - window_left` (if window_left is not None). The forward returns
`(out, lse)` with lse of shape (Hq, Tq) in float32; the backward takes `(dout, q, k, v, out, lse)`, where out and
lse may be the final merged ones of a blockwise computation, and returns `(dq, dk, dv)`. The algorithms only build
segments in which every query row sees at least one key.

A kernel is made per attention call with the layer's logit softcap (Gemma 2's `attn_logit_softcapping`): with `softcap`
set, every score s = scale·q·k becomes softcap·tanh(s / softcap) before the softmax, in forward and backward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass(frozen=True)
class Segments:
    """Where the documents of one kernel call lie. Host lists serve the exact path, device tensors the fused ones."""

    cu_q: tuple[int, ...]
    cu_k: tuple[int, ...]
    causal: bool
    window_left: int | None = None

    @property
    def max_q(self) -> int:
        return max(b - a for a, b in zip(self.cu_q, self.cu_q[1:]))

    @property
    def max_k(self) -> int:
        return max(b - a for a, b in zip(self.cu_k, self.cu_k[1:]))

    def tensors(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cu_seqlens as int32 device tensors, made once per segments object and device."""
        cache = self.__dict__.setdefault("_tensors", {})
        if device not in cache:
            cache[device] = (
                torch.tensor(self.cu_q, dtype=torch.int32).to(device, non_blocking=True),
                torch.tensor(self.cu_k, dtype=torch.int32).to(device, non_blocking=True),
            )
        return cache[device]


def flash_windows(seg: Segments) -> dict:
    """flash-attn's window arguments for `seg` (its varlen functions and PyTorch's flash ops take the same)."""
    left = -1 if seg.window_left is None else seg.window_left
    return {"window_size_left": left, "window_size_right": 0 if seg.causal else -1}


class AttentionKernel(Protocol):
    name: str
    softcap: float | None

    def __init__(self, softcap: float | None = None) -> None: ...

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seg: Segments, scale: float
    ) -> tuple[torch.Tensor, torch.Tensor]: ...

    def backward(
        self,
        dout: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        out: torch.Tensor,
        lse: torch.Tensor,
        seg: Segments,
        scale: float,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype attention accumulates in: float32 for half-precision and float32 inputs, float64 for float64 ones
    (so that a float64 check measures the model, not CP's rounding)."""
    return torch.promote_types(dtype, torch.float32)
