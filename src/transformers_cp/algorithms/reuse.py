"""Attention is not recomputed under activation checkpointing.

Checkpointing re-runs a layer's forward during backward to rebuild its activations. The attention Functions only need
(q, k, v, out, lse) for their backward, and q, k, v come back from the cheap projections; so the first forward keeps
its (out, lse) and the recomputation takes them instead of running the kernels (and, for ring and llama3, the
communication) again. The cost is the attention output and log-sum-exp of each layer until its backward. Only the
attention inside a layer that is checkpointed in this forward keeps them (`state.ContextParallelState.recomputed`, per forward): a layer that
is not recomputed would never take them.
"""

from __future__ import annotations

import torch


def in_backward() -> bool:
    """True while the autograd engine runs a backward pass, which is when checkpointing recomputes."""
    return torch._C._current_graph_task_id() != -1


class ForwardReuse:
    """What one attention call site's first forward computed (its (out, lse), or per-part pairs), taken by its
    recomputation. Values come from inside `autograd.Function.forward`, so they carry no graph."""

    def __init__(self, store: dict, key: object) -> None:
        self.store, self.key = store, key

    def take(self):
        return self.store.pop(self.key, None) if in_backward() else None

    def keep(self, value) -> None:
        if not in_backward():
            self.store[self.key] = value


def forward_once(reuse: ForwardReuse | None, compute) -> tuple[torch.Tensor, torch.Tensor]:
    """`compute()`'s (out, lse), or what the first forward kept when this call is its recomputation."""
    kept = reuse.take() if reuse is not None else None
    if kept is not None:
        return kept
    out, lse = compute()
    if reuse is not None:
        reuse.keep((out, lse))
    return out, lse
