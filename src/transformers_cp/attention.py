"""The context-parallel attention entry point: one rank's shard of q, k, v in, its shard of the output out."""

from __future__ import annotations

import torch

from .algorithms.reuse import ForwardReuse
from .kernels import select_kernel
from .mesh import ContextParallelMesh
from .modes.ulysses import STAGES
from .plan import Documents


def window_left(sliding_window: int | None, seq_len: int) -> int | None:
    """HF's `sliding_window` W lets a query see itself and the W-1 keys before it."""
    if sliding_window is None or sliding_window <= 0 or sliding_window >= seq_len:
        return None
    return sliding_window - 1


def context_parallel_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mesh: ContextParallelMesh,
    docs: Documents,
    scale: float,
    sliding_window: int | None = None,
    reuse: ForwardReuse | None = None,
    ulysses_stages: int = STAGES,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of this rank's shard of a packed row against the whole row.

    q: (L, Hq, D), k and v: (L, Hk, D), L = row length / CP size, in the layout of `mesh` (for `odysseus`, the
    whole row with this rank's heads); `docs` holds the row's global document boundaries. Returns (L, Hq, D). With
    `reuse`, a recomputation under activation checkpointing takes the first forward's result instead of computing it
    again (see `algorithms.reuse`). `ulysses_stages`: the most pipeline stages plain Ulysses splits its heads into.
    `softcap` caps the scores (softcap·tanh(s / softcap)); `sinks` (one logit per query head of the model) join each
    softmax's denominator (see `sinks`).
    """
    kernel = select_kernel(mesh.config.backend, q, softcap)
    left = window_left(sliding_window, docs.seq_len)
    return mesh.config.spec.attention(
        q, k, v, mesh, docs, kernel, scale, left, reuse, sinks=sinks, stages=ulysses_stages
    )
