"""Attention sinks: a learned logit per head that joins every query's softmax denominator (gpt-oss `sinks`, the
`s_aux` of other models).

A sink is one more key that every query sees, with logit `sink_h` (not scaled) and a value of zero. With (out, lse)
the attention of a query row over the real keys, the attention with the sink is

    lse' = logaddexp(lse, sink),    out' = out · exp(lse − lse') = out · σ(lse − sink),

so CP applies it once, to the merged (out, lse) of its blockwise attention (`with_sinks`), whatever the mode.

Backward: the attention backward of any kernel computes, per block, P = exp(S − lse) from the lse it is given and
dS = P ∘ (dP − rowsum(dout ∘ out)) from the out it is given. Fed the sink-including (out', lse'), P is the
probability of each real key under the softmax with the sink and rowsum(dout ∘ out') is that softmax's delta; the
sink's own column has value 0, so it adds nothing to dQ, dK, dV. The algorithms therefore keep (out', lse') for
their backward, unchanged, and the sink's gradient is that of a score whose value row is zero (`sinks_grad`):

    d sink_h = Σ_i P'_ih,sink · (0 − delta_ih) = −Σ_i exp(sink_h − lse'_ih) · rowsum(dout_ih ∘ out'_ih).
"""

from __future__ import annotations

import torch


def with_sinks(out: torch.Tensor, lse: torch.Tensor, sinks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out', lse') of the softmax with the sinks: out (L, H, D), lse (H, L) in the accumulation dtype, sinks (H,)."""
    new_lse = torch.logaddexp(lse, sinks.detach().to(lse.dtype)[:, None])
    scaled = out.to(lse.dtype) * torch.exp(lse - new_lse).T.unsqueeze(-1)
    return scaled.to(out.dtype), new_lse


def sinks_grad(dout: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, sinks: torch.Tensor) -> torch.Tensor:
    """The sinks' gradient, from the sink-including (out', lse') that `with_sinks` returned."""
    delta = (dout.to(lse.dtype) * out.to(lse.dtype)).sum(-1)  # (L, H)
    return -(torch.exp(sinks.detach().to(lse.dtype)[:, None] - lse) * delta.T).sum(-1).to(sinks.dtype)


def heads_block(sinks: torch.Tensor | None, heads: int, block: int) -> torch.Tensor | None:
    """The sinks of query heads [block·heads, (block+1)·heads): the share of a rank that attends those heads."""
    return None if sinks is None else sinks[block * heads : (block + 1) * heads]
