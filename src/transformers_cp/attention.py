"""The context-parallel attention entry point: one rank's shard of q, k, v in, its shard of the output out."""

from __future__ import annotations

import torch

from .algorithms.llama3 import Llama3Attention, Span, Spans
from .algorithms.local import LocalAttention
from .algorithms.reuse import ForwardReuse
from .algorithms.ring import RingAttention
from .algorithms.ulysses import UlyssesAttention, gather_heads, scatter_heads
from .kernels import select_kernel
from .layout import Layout
from .mesh import ContextParallelMesh
from .plan import Documents, gathered_plan, local_segments, ring_plan


def window_left(sliding_window: int | None, seq_len: int) -> int | None:
    """HF's `sliding_window` W lets a query see itself and the W-1 keys before it."""
    if sliding_window is None or sliding_window <= 0 or sliding_window >= seq_len:
        return None
    return sliding_window - 1


def _gather_spans(row: Layout, seq_len: int) -> Spans:
    """Where each chunk of the KV all-gathered in ring-rank order belongs in the global order (adjacent chunks of one
    rank merged)."""
    spans: list[Span] = []
    for rank in range(row.ring):
        local = 0
        for start, end in row.ring_ranges(seq_len, rank):
            last = spans[-1] if spans else None
            if last is not None and last.rank == rank and last.start + last.length == start:
                spans[-1] = last._replace(length=last.length + end - start)
            else:
                spans.append(Span(rank, local, start, end - start))
            local += end - start
    return tuple(spans)


def context_parallel_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mesh: ContextParallelMesh,
    docs: Documents,
    scale: float,
    sliding_window: int | None = None,
    reuse: ForwardReuse | None = None,
) -> torch.Tensor:
    """Causal attention of this rank's shard of a packed row against the whole row.

    q: (L, Hq, D), k and v: (L, Hk, D), L = row length / CP size, in the layout of `mesh` (for `odysseus`, the
    whole row with this rank's heads); `docs` holds the row's global document boundaries. Returns (L, Hq, D). With
    `reuse`, a recomputation under activation checkpointing takes the first forward's result instead of computing it
    again (see `algorithms.reuse`).
    """
    config, layout = mesh.config, mesh.layout
    kernel = select_kernel(config.backend, q)
    left = window_left(sliding_window, docs.seq_len)
    if layout.ring == 1 and layout.ulysses > 1 and layout.chunks_per_rank == 1:
        return UlyssesAttention.apply(q, k, v, local_segments(docs, left), mesh.ulysses_group, kernel, scale, reuse)
    if layout.ulysses > 1:
        q, k, v = scatter_heads(q, k, v, mesh.ulysses_group, layout.chunks_per_rank)
    if layout.ring == 1 or config.whole_rows:  # the whole row is here (Ulysses, odysseus, or one rank)
        out = LocalAttention.apply(q, k, v, local_segments(docs, left), kernel, scale, reuse)
    elif config.gathers_keys:
        stride = config.kv_stride(k.shape[1])  # divides the KV heads: `model_checks.check_model`
        spans = docs.cached(("spans", layout), lambda: _gather_spans(docs.layout(layout), docs.seq_len))
        blocks = gathered_plan(docs, layout, mesh.ring_rank, left)
        out = Llama3Attention.apply(q, k, v, blocks, spans, mesh.ring_group, kernel, scale, stride, reuse)
    else:
        steps = ring_plan(docs, layout, mesh.ring_rank, left)
        out = RingAttention.apply(q, k, v, steps, mesh.ring_group, kernel, scale, reuse)
    if layout.ulysses > 1:
        out = gather_heads(out, mesh.ulysses_group, layout.chunks_per_rank)
    return out
