"""`odysseus`: attention as sequence-sharded tensor parallelism (see the top-level `odysseus.py`): each rank attends
the whole row with its share of the heads, the rest of the layer runs on its contiguous shard."""

from __future__ import annotations

from .. import odysseus
from ..algorithms.local import LocalAttention
from ..plan import local_segments
from ..sinks import heads_block
from .base import Mode


class Odysseus(Mode):
    name = "odysseus"
    whole_rows = True

    def check_model(self, model, config, heads, kv_heads) -> None:
        odysseus.check_model(model, config.size)

    def attention(self, q, k, v, mesh, docs, kernel, scale, left, reuse, sinks=None, stages=1):
        sinks = heads_block(sinks, q.shape[1], mesh.cp_rank)  # q holds this rank's block of the heads
        return LocalAttention.apply(q, k, v, local_segments(docs, left), kernel, scale, reuse, sinks)


ODYSSEUS = Odysseus()
