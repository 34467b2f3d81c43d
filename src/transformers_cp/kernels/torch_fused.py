"""PyTorch's fused flash-attention op (the varlen kernel behind `torch.nn.attention.varlen`) on CUDA.

It takes packed documents through cumulative lengths, GQA without repeating KV, sliding windows and bottom-right
causal alignment, and returns the log-sum-exp the blockwise algorithms merge with.
"""

from __future__ import annotations

import torch

from .base import Segments


def _windows(seg: Segments) -> tuple[int, int]:
    left = -1 if seg.window_left is None else seg.window_left
    right = 0 if seg.causal else -1
    return left, right


class TorchFlashKernel:
    name = "torch"

    def forward(self, q, k, v, seg: Segments, scale: float):
        cu_q, cu_k = seg.tensors(q.device)
        left, right = _windows(seg)
        out, lse = torch.ops.aten._flash_attention_forward(
            q,
            k,
            v,
            cu_q,
            cu_k,
            seg.max_q,
            seg.max_k,
            0.0,
            seg.causal,
            False,
            scale=scale,
            window_size_left=left,
            window_size_right=right,
        )[:2]
        return out, lse

    def backward(self, dout, q, k, v, out, lse, seg: Segments, scale: float):
        cu_q, cu_k = seg.tensors(q.device)
        left, right = _windows(seg)
        rng = torch.zeros(2, dtype=torch.uint64, device=q.device)
        unused = torch.empty(0, device=q.device)
        return torch.ops.aten._flash_attention_backward(
            dout.contiguous(),
            q,
            k,
            v,
            out,
            lse.contiguous(),
            cu_q,
            cu_k,
            seg.max_q,
            seg.max_k,
            0.0,
            seg.causal,
            rng,
            unused,
            scale=scale,
            window_size_left=left,
            window_size_right=right,
        )
