"""PyTorch's FlexAttention for scores the SDPA ops cannot modify: the logit softcap (Gemma 2), on CUDA in half
precision where the Triton kernel (`triton_softcap`, faster: its backward needs no recomputed forward) is not
chosen. Imported lazily (it compiles its kernels through torch.compile on first use).

The forward is one FlexAttention call over the segments' block mask, with a tanh score_mod and its log-sum-exp.
The backward must take the (out, lse) of the whole blockwise attention, which may differ from this block's own
(ring and llama3 merge several blocks), while FlexAttention's backward is its forward's autograd. So it recomputes the
block's (out_b, lse_b) with autograd and feeds it gradients that turn the block's own softmax gradient into the
merged one: with c = exp(lse_b − lse) (so P = c·P_b), delta = rowsum(dout ∘ out), delta_b = rowsum(dout ∘ out_b),

    d out_b = c·dout,    d lse_b = c·(delta_b − delta),

FlexAttention's backward gives dS = P_b ∘ (c·dout·Vᵀ − c·delta_b + c·(delta_b − delta)) = P ∘ (dP − delta), and
dV = P_bᵀ·c·dout = Pᵀ·dout: the exact gradients of the merged attention (the softcap's derivative is FlexAttention's).
"""

from __future__ import annotations

import functools

import torch

from .base import Segments

KERNEL_OPTIONS: dict = {}
"""FlexAttention `kernel_options` (BLOCK_M, BLOCK_N, num_warps, num_stages, ...), chosen by
benchmarks/attention_variants.py; empty: FlexAttention's own defaults."""


@functools.cache
def _flex():
    """FlexAttention compiled (on CUDA; CPU runs its reference forward). Shapes are left to torch.compile's automatic
    dynamic shapes: the blocks of a ring change length with the documents of each batch, and a compilation per length
    would soon exhaust the recompilation limit."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention) if torch.cuda.is_available() else flex_attention


SCORE_MOD = "tanh"
"""How the score_mod computes softcap·tanh(s / softcap): 'tanh' (torch.tanh), or 'exp', the same through one exp,
softcap·sign(s)·(1 − e) / (1 + e) with e = exp(−2|s| / softcap) (no overflow, and its derivative has none either);
benchmarks/softcap_kernels.py times both."""


@functools.cache
def _softcap_mod(softcap: float, tanh: str):
    if tanh == "exp":

        def score_mod(score, b, h, q_idx, kv_idx):
            e = torch.exp(torch.where(score < 0, score, -score) * (2.0 / softcap))  # not abs(): its gradient at 0 is 0
            capped = softcap * (1 - e) / (1 + e)
            return torch.where(score < 0, -capped, capped)

    else:

        def score_mod(score, b, h, q_idx, kv_idx):
            return softcap * torch.tanh(score / softcap)

    return score_mod


def _positions(cu: tuple[int, ...], lengths_other: tuple[int, ...] | None, device) -> tuple[torch.Tensor, ...]:
    """(segment id, position) per row; query positions shifted by lk − lq (bottom-right alignment)."""
    lens = torch.tensor([b - a for a, b in zip(cu, cu[1:])])
    seg_id = torch.repeat_interleave(torch.arange(len(lens)), lens)
    pos = torch.arange(int(lens.sum())) - torch.repeat_interleave(torch.tensor(cu[:-1]), lens)
    if lengths_other is not None:
        pos = pos + torch.repeat_interleave(torch.tensor(lengths_other) - lens, lens)
    return seg_id.to(device), pos.to(device)


def block_mask(seg: Segments, device: torch.device):
    """The FlexAttention block mask of `seg` (documents, causal, window), made once per segments and device."""
    cache = seg.__dict__.setdefault("_flex_mask", {})
    if device not in cache:
        from torch.nn.attention.flex_attention import create_block_mask

        lk = tuple(b - a for a, b in zip(seg.cu_k, seg.cu_k[1:]))
        q_seg, q_pos = _positions(seg.cu_q, lk, device)
        k_seg, k_pos = _positions(seg.cu_k, None, device)
        causal, left = seg.causal, seg.window_left

        def mask_mod(b, h, q_idx, kv_idx):
            visible = q_seg[q_idx] == k_seg[kv_idx]
            if causal:
                visible = visible & (k_pos[kv_idx] <= q_pos[q_idx])
            if left is not None:
                visible = visible & (k_pos[kv_idx] >= q_pos[q_idx] - left)
            return visible

        cache[device] = create_block_mask(
            mask_mod, None, None, seg.cu_q[-1], seg.cu_k[-1], device=device, _compile=device.type == "cuda"
        )
    return cache[device]


def _lse_kwargs() -> dict:
    from torch.nn.attention import flex_attention as flex

    return {"return_aux": flex.AuxRequest(lse=True)} if hasattr(flex, "AuxRequest") else {"return_lse": True}


class FlexKernel:
    name = "flex"

    def __init__(self, softcap: float | None = None, tanh: str | None = None) -> None:
        self.softcap = softcap
        self.tanh = tanh or SCORE_MOD

    def _attend(self, q, k, v, seg: Segments, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(T, H, D) in; out (T, H, D) and lse (H, T) float32."""
        result = _flex()(
            *(t.transpose(0, 1).unsqueeze(0) for t in (q, k, v)),
            score_mod=_softcap_mod(float(self.softcap), self.tanh) if self.softcap else None,
            block_mask=block_mask(seg, q.device),
            scale=scale,
            enable_gqa=q.shape[1] != k.shape[1],
            kernel_options=KERNEL_OPTIONS or None,
            **_lse_kwargs(),
        )
        out, aux = result
        lse = aux.lse if hasattr(aux, "lse") else aux
        return out[0].transpose(0, 1), lse[0].float()

    def forward(self, q, k, v, seg: Segments, scale: float):
        return self._attend(q, k, v, seg, scale)

    def backward(self, dout, q, k, v, out, lse, seg: Segments, scale: float):
        with torch.enable_grad():
            qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))
            out_b, lse_b = self._attend(qg, kg, vg, seg, scale)
            c = torch.exp(lse_b.detach() - lse)  # (H, T)
            delta = (dout.float() * out.float()).sum(-1).T
            delta_b = (dout.float() * out_b.detach().float()).sum(-1).T
            grad_out = (dout.float() * c.T.unsqueeze(-1)).to(out_b.dtype)
            return torch.autograd.grad((out_b, lse_b), (qg, kg, vg), (grad_out, c * (delta_b - delta)))
