"""What a model does along the sequence besides the attention that context parallelism splits.

CP shards the sequence and exchanges only attention's keys and values. A layer that looks along the sequence in any
other way (a 1-D convolution, a state-space or linear-attention recurrence, compressed, chunked or indexed sparse
attention) would run on this rank's shard alone or without its pattern, and attention sinks add a term the CP kernels
do not compute: each would make the result silently wrong, so `check_model` refuses such models, on every rank, before
any process group is made.
"""

from __future__ import annotations

import torch

ATTENTION_LAYER_TYPES = frozenset({"full_attention", "sliding_attention", "attention", "mlp", "moe"})
"""Layer kinds CP computes exactly: (sliding-window) softmax attention, and blocks that act on each token alone."""

LAYER_TYPE_FIELDS = ("layer_types", "layers_block_type", "block_types")
"""Config fields in which transformers' models declare the kind of each layer."""

MIXER_CLASS_WORDS = ("mamba", "lightning", "deltanet", "rglru", "rwkv", "lstm", "shortconv")
"""Lower-case words in the class names of transformers' sequence mixers that are not softmax attention."""


def foreign_layer_types(text_config) -> list[str]:
    """'field: [kinds]' for each config field that declares layers other than attention and per-token blocks."""
    found = []
    for name in LAYER_TYPE_FIELDS:
        kinds = getattr(text_config, name, None)
        if isinstance(kinds, (list, tuple)):
            other = sorted({k for k in kinds if isinstance(k, str) and k not in ATTENTION_LAYER_TYPES})
            if other:
                found.append(f"{name}: {other}")
    return found


SPARSE_ATTENTION_FIELDS = ("index_topk", "keep_window_size")
"""Config fields of sparse attention that picks, per query, which keys softmax sees: an indexer's top-k
(DeepSeek-V3.2 style) or a dynamic mask's (Doge)."""


def sparse_attention(text_config) -> list[str]:
    """'field=value' for each sparse-attention setting the config holds."""
    return [
        f"{name}={getattr(text_config, name)}" for name in SPARSE_ATTENTION_FIELDS if getattr(text_config, name, None)
    ]


def sequence_mixers(model: torch.nn.Module) -> list[str]:
    """'module (class)' for the modules of the language model's decoder layers that mix tokens without attention."""
    decoder = (model.get_decoder() if hasattr(model, "get_decoder") else None) or model
    layers = getattr(decoder, "layers", None)
    scope = layers if isinstance(layers, torch.nn.ModuleList) else decoder
    inside = set(scope.modules())  # the decoder layers: not a vision or audio tower, nor an embedding extension
    found = []
    for name, module in model.named_modules():
        kind = type(module).__name__
        if module in inside and (
            isinstance(module, torch.nn.Conv1d) or any(word in kind.lower() for word in MIXER_CLASS_WORDS)
        ):
            found.append(f"{name} ({kind})")
    return found


def attention_sinks(model: torch.nn.Module) -> list[str]:
    """Names of attention-sink parameters (a learned logit per head that joins every softmax)."""
    return [name for name, _ in model.named_parameters() if name.rsplit(".", 1)[-1] in ("sinks", "s_aux")]
