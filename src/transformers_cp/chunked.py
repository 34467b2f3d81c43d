"""Llama 4's attention under CP. Chunked attention (the `chunked_attention` layers, `attention_chunk_size` C): a query sees the keys of its own
chunk only, the chunks being runs of C positions. transformers' mask compares position_ids // C (with packed
documents, the position ids restart per document), intersected with the documents; so for those layers the row's
documents are cut again wherever a position id is a multiple of C, and attention runs causally within the pieces.
The model's other layers keep the documents as they are.

Llama 4 also scales the queries of its layers without RoPE by 1 + attn_scale·log1p(floor((i + 1) / floor_scale)),
i the token's index in the attention's input (a shard's index under CP, the packed row's in the stock model, neither
the document's position); `check_temperature_tuning` admits the rows on which that is 1 for every token.
"""

from __future__ import annotations

import torch

from .mesh import ContextParallelMesh
from .model_checks import unsupported
from .plan import Documents
from .sharding import gather_sequence


def chunk_size(module: torch.nn.Module) -> int | None:
    """C if `module` is the attention of a `chunked_attention` layer, else None."""
    config, index = getattr(module, "config", None), getattr(module, "layer_idx", None)
    kinds = getattr(config, "layer_types", None)
    if index is None or not isinstance(kinds, (list, tuple)) or kinds[index] != "chunked_attention":
        return None
    return getattr(config, "attention_chunk_size", None)


def chunked_documents(docs: Documents, chunk: int, mesh: ContextParallelMesh) -> Documents:
    """`docs` cut at every position id that is a multiple of `chunk`. Made once per forward: the first chunked layer
    gathers the row's position ids (every rank runs the same layers, so every rank gathers alike)."""

    def build() -> Documents:
        if docs.position_ids is None:
            raise ValueError(
                "chunked attention under context parallelism needs the row's position_ids; call the model after "
                "apply_context_parallel with position_ids (the transformers_cp collator passes them)."
            )
        full = gather_sequence(docs.position_ids.reshape(1, -1), mesh, dim=1).reshape(-1)
        starts = (full % chunk == 0).nonzero().flatten().tolist()
        return Documents(sorted({*docs.bounds, *starts}), docs.seq_len)

    return docs.cached(("chunks", chunk), build)


def check_temperature_tuning(module: torch.nn.Module, seq_len: int) -> None:
    """Refuse a row on which Llama 4's attention temperature tuning would scale a query: it needs i + 1 ≥ floor_scale
    for some index i, and every index is below the row's length. Raised by every rank alike at the same layer."""
    if getattr(module, "attn_temperature_tuning", False) and not getattr(module, "use_rope", True):
        if seq_len >= module.floor_scale:
            raise unsupported(
                f"attention temperature tuning on a row of {seq_len} tokens (floor_scale={module.floor_scale}): it "
                "scales each query of the layers without RoPE by its index in the rank's shard, not by its position",
                f"set the model's attn_temperature_tuning=False, or train on rows shorter than {module.floor_scale}.",
            )
