"""`odysseus`: attention as sequence-sharded tensor parallelism (see the top-level `odysseus.py`): each rank attends
the whole row with its share of the heads, the rest of the layer runs on its contiguous shard."""

from __future__ import annotations

from .. import odysseus
from ..algorithms.local import LocalAttention
from ..plan import local_segments
from .base import Mode


class Odysseus(Mode):
    name = "odysseus"
    whole_rows = True

    def check_model(self, model, config, heads, kv_heads) -> None:
        odysseus.check_model(model, config.size)

    def attention(self, q, k, v, mesh, docs, kernel, scale, left, reuse, stages=1):
        return LocalAttention.apply(q, k, v, local_segments(docs, left), kernel, scale, reuse)


ODYSSEUS = Odysseus()
