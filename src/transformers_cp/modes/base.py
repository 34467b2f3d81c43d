"""What a CP mode states: its token layout, its ring and Ulysses degrees, the settings and models it accepts, and its
attention on one rank's shard. One instance per mode, registered in `modes.MODES`."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..algorithms.local import LocalAttention
from ..algorithms.reuse import ForwardReuse
from ..algorithms.ring import RingAttention
from ..kernels import AttentionKernel
from ..plan import Documents, local_segments, ring_plan, sent_rows

if TYPE_CHECKING:
    from ..config import ContextParallelConfig
    from ..mesh import ContextParallelMesh


class Mode:
    """A mode of context parallelism. Subclasses override what differs from a plain ring on contiguous shards."""

    name: str
    layout: str = "contiguous"  # `layout.Layout` kind: "contiguous" or "zigzag"
    whole_rows: bool = False  # each rank attends whole rows with its share of the heads instead of its shard
    combines_ulysses_and_ring: bool = False  # a Ulysses degree (`ulysses_size`) and a ring degree of its own
    uses_heads_k_stride: bool = False
    # takes `balance="documents"`: a ring over whole chunks (U = 1), whose per-row layout may follow the documents
    balances_documents: bool = False

    def accepts_ulysses_size(self, config: ContextParallelConfig) -> bool:
        """Whether `config.ulysses_size` (set) means something in this mode."""
        return False

    def validate(self, config: ContextParallelConfig) -> str | None:
        """What is wrong with `config`'s mode-specific settings for this mode (the message), or None."""
        if config.ulysses_size is not None and not self.accepts_ulysses_size(config):
            return (
                f"context_parallel_ulysses_size is only used with context_parallel_mode='hybrid' (mode is "
                f"{self.name!r}); leave it unset or switch the mode to 'hybrid'."
            )
        if config.heads_k_stride is not None and not self.uses_heads_k_stride:
            return (
                f"context_parallel_heads_k_stride is only used with context_parallel_mode='llama3' (mode is "
                f"{self.name!r}); leave it unset or switch the mode to 'llama3'."
            )
        return None

    def degrees(self, config: ContextParallelConfig) -> tuple[int, int]:
        """(ring degree, Ulysses degree) of a config resolved against the world size."""
        return config.size, 1

    def picks_ulysses_degree(self, config: ContextParallelConfig) -> bool:
        """Whether the Ulysses degree is left to the model's heads (`ContextParallelConfig.with_auto_ulysses_size`)."""
        return False

    def check_model(
        self, model: torch.nn.Module, config: ContextParallelConfig, heads: int | None, kv_heads: int | None
    ) -> None:
        """Raise, before any collective, for a model this mode cannot split (`heads`/`kv_heads`: its config's)."""

    def attention(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        mesh: ContextParallelMesh,
        docs: Documents,
        kernel: AttentionKernel,
        scale: float,
        left: int | None,
        reuse: ForwardReuse | None,
        sinks: torch.Tensor | None = None,
        stages: int = 1,
    ) -> torch.Tensor:
        """This rank's output (L, Hq, D) for its q (L, Hq, D), k, v (L, Hk, D); see `attention.py`. `sinks`: the
        model's sink logit per query head (`sinks.py`), None without; a mode that splits the heads gives each head
        block its sinks. `stages`: the most pipeline stages a head exchange (Ulysses) splits the heads into; modes
        without one have nothing to split."""
        return ring_or_local(q, k, v, mesh, docs, kernel, scale, left, reuse, sinks)


def ring_or_local(
    q, k, v, mesh: ContextParallelMesh, docs: Documents, kernel, scale, left, reuse, sinks=None
) -> torch.Tensor:
    """Ring attention over the ring dimension, or local attention when the whole row is here (ring degree 1)."""
    if mesh.layout.ring == 1:
        return LocalAttention.apply(q, k, v, local_segments(docs, left), kernel, scale, reuse, sinks)
    steps = ring_plan(docs, mesh.layout, mesh.ring_rank, left)
    if len(steps) == 1 and len(blocks := steps[0][1]) == 1 and blocks[0].q == blocks[0].k == (0, q.shape[0]):
        # every query of this rank sees only its own keys, in one call: no merge, no float32 buffers
        return LocalAttention.apply(q, k, v, blocks[0].seg, kernel, scale, reuse, sinks)
    sent = sent_rows(docs, mesh.layout, left)
    return RingAttention.apply(q, k, v, steps, sent, mesh.ring_group, kernel, scale, reuse, sinks)
