"""`hybrid`: Ulysses inside groups of `ulysses_size` adjacent ranks, the zigzag ring across the groups."""

from __future__ import annotations

from ..algorithms.ulysses import gather_heads, scatter_heads
from ..sinks import heads_block
from .base import Mode, ring_or_local
from .ulysses import check_ulysses_heads


class Hybrid(Mode):
    name = "hybrid"
    layout = "zigzag"
    combines_ulysses_and_ring = True

    def accepts_ulysses_size(self, config) -> bool:
        return True

    def validate(self, config) -> str | None:
        # Without a Ulysses degree, the largest that the model's heads and one node allow is chosen where the model is
        # known (`ContextParallelConfig.with_auto_ulysses_size`).
        if config.ulysses_size is not None and config.size is not None and config.size % config.ulysses_size:
            return (
                f"context_parallel_ulysses_size={config.ulysses_size} must divide context_parallel_size="
                f"{config.size}; pick a divisor of {config.size}."
            )
        return super().validate(config)

    def degrees(self, config) -> tuple[int, int]:
        if config.ulysses_size is None:
            from ..config import ContextParallelConfigError  # config imports the modes

            raise ContextParallelConfigError(
                "context_parallel_mode='hybrid' without context_parallel_ulysses_size takes the Ulysses degree from "
                "the model's attention heads: pass the model (apply_context_parallel(model, config), or the Trainer) "
                "or set context_parallel_ulysses_size."
            )
        return config.size // config.ulysses_size, config.ulysses_size

    def picks_ulysses_degree(self, config) -> bool:
        return config.ulysses_size is None

    def check_model(self, model, config, heads, kv_heads) -> None:
        check_ulysses_heads(config, heads)

    def attention(self, q, k, v, mesh, docs, kernel, scale, left, reuse, sinks=None, stages=1):
        if mesh.layout.ulysses == 1:  # a ring alone
            return ring_or_local(q, k, v, mesh, docs, kernel, scale, left, reuse, sinks)
        chunks = mesh.layout.chunks_per_rank
        q, k, v, heads = scatter_heads(q, k, v, mesh.ulysses_group, chunks)
        sinks = heads_block(sinks, q.shape[1], mesh.ulysses_rank)
        out = ring_or_local(q, k, v, mesh, docs, kernel, scale, left, reuse, sinks)
        return gather_heads(out, heads, mesh.ulysses_group, chunks)


HYBRID = Hybrid()
