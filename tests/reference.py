"""Plain dense attention with an explicit mask: the single-process reference the CP results are compared with."""

from __future__ import annotations

import itertools

import torch


def bounds_of(lengths: list[int]) -> list[int]:
    """Document bounds (0 first) of a packed row of documents of `lengths`."""
    return list(itertools.accumulate(lengths, initial=0))


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


def check_cp_attention(
    mesh, seq: int, bounds: list[int], heads: tuple[int, int], window, case: str, head_dim: int = 8
):
    """This rank's CP attention output and q, k, v gradients on a packed row with document `bounds` against dense
    attention of the whole row (float32, rtol 1e-5), in the row's own layout."""
    from transformers_cp.attention import context_parallel_attention
    from transformers_cp.plan import Documents

    hq, hk = heads
    g = torch.Generator().manual_seed(len(bounds) + hq)
    q, k, v, dout = (torch.randn(seq, h, head_dim, generator=g) for h in (hq, hk, hk, hq))
    scale = head_dim**-0.5
    ref_in = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = reference_attention(*ref_in, [b - a for a, b in zip(bounds, bounds[1:])], scale, window)
    ref.backward(dout)
    docs = Documents(bounds, seq)
    layout = docs.layout(mesh.layout)
    shard = lambda t: layout.shard(t, mesh.cp_rank, dim=0)  # noqa: E731
    local = [shard(t).requires_grad_() for t in (q, k, v)]
    out = context_parallel_attention(*local, mesh, docs, scale, sliding_window=window)
    out.backward(shard(dout))
    assert_close(out, shard(ref.detach()), 1e-5, f"out [{case}]")
    for name, t, r in zip("qkv", local, ref_in):
        assert_close(t.grad, shard(r.grad), 1e-5, f"d{name} [{case}]")
