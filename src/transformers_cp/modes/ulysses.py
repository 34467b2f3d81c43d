"""`ulysses`: all-to-all from sequence shards to head shards before attention and back after it, on contiguous
shards (`algorithms.ulysses`)."""

from __future__ import annotations

from ..algorithms.local import LocalAttention
from ..algorithms.ulysses import UlyssesAttention, check_heads
from ..plan import local_segments
from .base import Mode

STAGES = 1
"""Pipeline stages of `UlyssesAttention` unless the caller of `context_parallel_attention` asks for others: on 2×H200
one stage was fastest at every length (benchmarks/results/ulysses_stages_2xH200.json), the all-to-all being a few
percent of the time there. Deeper pipelines are for links where the exchange takes a larger share."""


def check_ulysses_heads(config, heads: int | None) -> None:
    """The Ulysses degree must divide the model's query heads."""
    if heads is not None and config.ulysses_degree > 1:
        check_heads(heads, config.ulysses_degree)


class Ulysses(Mode):
    name = "ulysses"

    def accepts_ulysses_size(self, config) -> bool:
        return config.ulysses_size == config.size  # the one degree plain Ulysses has

    def degrees(self, config) -> tuple[int, int]:
        return 1, config.size

    def check_model(self, model, config, heads, kv_heads) -> None:
        check_ulysses_heads(config, heads)

    def attention(self, q, k, v, mesh, docs, kernel, scale, left, reuse, sinks=None, stages=STAGES):
        seg = local_segments(docs, left)
        if mesh.layout.ulysses == 1:
            return LocalAttention.apply(q, k, v, seg, kernel, scale, reuse, sinks)
        return UlyssesAttention.apply(q, k, v, seg, mesh.ulysses_group, kernel, scale, reuse, stages, sinks)


ULYSSES = Ulysses()
