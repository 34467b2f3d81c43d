"""Plain dense attention with an explicit mask: the single-process reference the CP results are compared with."""

from __future__ import annotations

import torch


def document_ids(lengths: list[int]) -> torch.Tensor:
    return torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])


def reference_attention(q, k, v, lengths: list[int], scale: float, sliding_window: int | None = None):
    """q (S, Hq, D), k/v (S, Hk, D): causal attention within documents (and a window), by dense softmax."""
    s_len, hq, _ = q.shape
    hk = k.shape[1]
    doc = document_ids(lengths)
    i = torch.arange(s_len)[:, None]
    j = torch.arange(s_len)[None, :]
    visible = (doc[:, None] == doc[None, :]) & (j <= i)
    if sliding_window is not None:
        visible &= j > i - sliding_window
    kr = k.repeat_interleave(hq // hk, dim=1)
    vr = v.repeat_interleave(hq // hk, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, kr) * scale
    scores = scores.masked_fill(~visible, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), vr)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float, name: str = "") -> None:
    """Elementwise closeness relative to the tensor's scale (an absolute floor of rtol·max|expected|)."""
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * scale, msg=lambda m: f"{name}: {m}")


def per_document(model, ids: torch.Tensor, lengths: list[int]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Logits and parameter gradients (summed next-token loss) of each document of the packed row `ids` run alone
    through the stock model: what a packed row means, the reference for layers whose packed-row behaviour is not per
    document (recurrences, convolutions) as for attention."""
    logits, start = [], 0
    model.zero_grad()
    for n in lengths:
        doc = ids[:, start : start + n]
        out = model(input_ids=doc, position_ids=torch.arange(n, device=ids.device)[None], use_cache=False).logits
        logits.append(out.detach())
        if n > 1:
            torch.nn.functional.cross_entropy(out[0, :-1], doc[0, 1:], reduction="sum").backward()
        start += n
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    return torch.cat(logits, 1), grads
