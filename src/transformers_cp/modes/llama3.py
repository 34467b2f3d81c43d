"""`llama3`: keys and values all-gathered `heads_k_stride` KV heads at a time, on the zigzag layout."""

from __future__ import annotations

from ..algorithms.llama3 import Llama3Attention, gathered_rows
from ..plan import ring_plan, sent_rows
from .base import Mode, ring_or_local


class AllGatherKeys(Mode):
    name = "llama3"
    layout = "zigzag"
    uses_heads_k_stride = True
    balances_documents = True

    def check_model(self, model, config, heads, kv_heads) -> None:
        if kv_heads is not None and kv_heads % config.kv_stride(kv_heads):
            raise ValueError(
                f"context_parallel_heads_k_stride={config.heads_k_stride} must divide the model's {kv_heads} "
                f"key/value heads; pick one of {[d for d in range(1, kv_heads + 1) if kv_heads % d == 0]}."
            )

    def attention(self, q, k, v, mesh, docs, kernel, scale, left, reuse, sinks=None, stages=1):
        if mesh.layout.ring == 1 or not any(sent_rows(docs, mesh.layout, left)):
            # the whole row here, or no rank attends to another's keys (documents kept whole): nothing to gather
            return ring_or_local(q, k, v, mesh, docs, kernel, scale, left, reuse, sinks)
        steps = ring_plan(docs, mesh.layout, mesh.ring_rank, left)
        sent = sent_rows(docs, mesh.layout, left)
        few_rows = 4 * gathered_rows(sent) <= q.shape[0]
        stride = mesh.config.kv_stride(k.shape[1], few_rows=few_rows)  # divides the KV heads
        return Llama3Attention.apply(q, k, v, steps, sent, mesh.ring_group, kernel, scale, stride, reuse, sinks)


LLAMA3 = AllGatherKeys()
