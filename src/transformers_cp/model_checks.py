"""Model checks: the settings context parallelism cannot honour, refused on every rank before any process group.

CP shards the sequence and exchanges attention's keys and values, and the inputs of the recurrent and convolution
mixers `mixers.py` makes exact. A layer that looks along the sequence in any other way (another 1-D convolution or
recurrence, compressed or indexed sparse attention) would run on this rank's shard alone or without its pattern, and
dropout changes a softmax the CP kernels compute without it; attention a model computes itself, or positions its
decoder numbers from the input's length, would be the shard's (`undeclared_attention`, for models that do not declare
transformers' AttentionInterface); LayerDrop would skip layers per rank: each would make the result silently wrong (or
hang), so `check_model` refuses such models. Attention sinks, logit softcapping and chunked attention are computed exactly
(`sinks`, the kernels' softcap, `chunked`). Nothing here talks to other ranks, so every rank raises the same error.
"""

from __future__ import annotations

import inspect

import torch
import transformers

from .config import ContextParallelConfig, ContextParallelConfigError
from .mesh import job_config, node_size
from .mixers import check_mixers
from .model_info import decoder_layers, text_config
from .router_loss import check_router_loss

logger = transformers.utils.logging.get_logger(f"transformers.{__name__}")  # shown as transformers' own logs are

ATTENTION_LAYER_TYPES = frozenset(
    {"full_attention", "sliding_attention", "chunked_attention", "attention", "mlp", "moe"}
)
"""Layer kinds CP computes exactly: (sliding-window, chunked) softmax attention, and blocks that act on each token
alone."""

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


SPARSE_ATTENTION_FIELDS = ("index_topk",)
"""Config fields of sparse attention that picks, per query, which keys softmax sees: an indexer's top-k
(DeepSeek-V3.2 style)."""


def sparse_attention(text_config) -> list[str]:
    """'field=value' for each sparse-attention setting the config holds."""
    return [
        f"{name}={getattr(text_config, name)}" for name in SPARSE_ATTENTION_FIELDS if getattr(text_config, name, None)
    ]


def _dispatches_attention(cls: type) -> bool:
    """Whether `cls.forward` looks its attention function up in transformers' registry (ALL_ATTENTION_FUNCTIONS),
    read from the names its code uses."""
    code = getattr(inspect.unwrap(cls.forward), "__code__", None)
    return code is not None and "ALL_ATTENTION_FUNCTIONS" in code.co_names


def undeclared_attention(model: torch.nn.Module) -> str | None:
    """Why CP cannot take a model whose class leaves `_supports_attention_backend` unset, or None where it can all the
    same: every attention module of its decoder layers calls the attention function through transformers' registry
    (so CP's replaces it) and its decoder reads position_ids (so each token gets its place in the whole row and in its
    document). BioGPT, StableLM and Whisper's decoder are such models; the model sweep checks them."""
    decoder, scope = decoder_layers(model)
    kinds = {type(m) for m in scope.modules() if type(m).__name__.lower().endswith("attention")}
    own = sorted(cls.__name__ for cls in kinds if not _dispatches_attention(cls))
    name = type(model).__name__
    if own or not kinds:
        modules = f"its attention modules ({', '.join(own)}) compute" if own else "it computes"
        return (
            f"{name}, which does not declare transformers' AttentionInterface (_supports_attention_backend), and "
            f"{modules} attention themselves, not through it (e.g. ALiBi in Bloom, Falcon or MPT): it would see this "
            "rank's shard of the sequence alone"
        )
    if "position_ids" not in inspect.signature(decoder.forward).parameters:
        return (
            f"{name}, which does not declare transformers' AttentionInterface (_supports_attention_backend), and whose "
            f"decoder ({type(decoder).__name__}) takes no position_ids: it numbers its position embeddings from its "
            "input's own length, so each rank's shard, and each packed document, would be embedded at the wrong "
            "positions"
        )
    return None


def sequence_mixers(model: torch.nn.Module) -> list[str]:
    """'module (class)' for the modules of the language model's decoder layers that mix tokens without attention."""
    inside = set(decoder_layers(model)[1].modules())
    found = []
    for name, module in model.named_modules():
        kind = type(module).__name__
        if module in inside and (
            isinstance(module, torch.nn.Conv1d) or any(word in kind.lower() for word in MIXER_CLASS_WORDS)
        ):
            found.append(f"{name} ({kind})")
    return found


DROPOUT_FIELDS = ("attention_dropout", "attention_probs_dropout_prob", "attn_pdrop")
"""Config fields that hold the attention dropout probability in transformers' models."""

LAYERDROP_FIELDS = ("layerdrop", "decoder_layerdrop")
"""Config fields of LayerDrop in transformers' decoders (BioGPT, OPT, Whisper, ...): in training each process draws
which layers to skip, so ranks could skip different layers and their attention exchanges would not pair up."""


def unsupported(setting: str, fix: str) -> ValueError:
    return ValueError(f"context parallel attention does not support {setting}; {fix}")


def check_model(model: torch.nn.Module, config: ContextParallelConfig) -> None:
    """Reject model settings CP cannot honour. `config` is resolved against the world size; nothing here talks to
    other ranks, so every rank raises the same error before the mesh's groups are made or any collective runs."""
    exact_mixers = check_mixers(model)  # recurrent / conv mixers with an exact path, or a refusal naming them
    text = text_config(model)
    heads = getattr(text, "num_attention_heads", None)
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    for name in DROPOUT_FIELDS:
        if getattr(text, name, None):
            raise unsupported(f"attention dropout ({name}={getattr(text, name)})", f"set the model's {name}=0.0.")
    for name in LAYERDROP_FIELDS:
        if getattr(text, name, None):
            raise unsupported(
                f"LayerDrop ({name}={getattr(text, name)}): each rank would draw on its own which layers to skip",
                f"set the model's {name}=0.0.",
            )
    if getattr(text, "alibi", False) or getattr(text, "use_alibi", False):
        raise unsupported("ALiBi position biases", "use a RoPE model.")
    sparse = sparse_attention(text)
    if sparse:
        raise unsupported(
            f"sparse attention that picks the keys each query sees ({', '.join(sparse)})",
            "use a model with dense (full or sliding-window) attention.",
        )
    if hasattr(text, "keep_window_size"):
        raise unsupported(
            "Doge's dynamic mask: a learned, input-dependent bias per key and head added to every score (CP's "
            f"attention kernels take none) and, on rows longer than keep_window_size={text.keep_window_size}, only "
            "each query's top keep_window_size keys kept (sparse attention that picks the keys each query sees)",
            "use a model with dense (full or sliding-window) attention.",
        )
    layer_kinds = [] if exact_mixers else foreign_layer_types(text)
    if layer_kinds:
        raise unsupported(
            f"these layer kinds ({'; '.join(layer_kinds)}): across ranks it computes exactly only causal full or "
            "sliding-window softmax attention and blocks that act on each token alone (MLP, MoE)",
            "use a model whose layers are all of those kinds.",
        )
    mixers = [] if exact_mixers else sequence_mixers(model)
    if mixers:
        more = f" and {len(mixers) - 3} more" if len(mixers) > 3 else ""
        raise unsupported(
            f"modules that mix tokens outside attention ({', '.join(mixers[:3])}{more}): they would see this rank's "
            "shard of the sequence alone",
            "use a model without convolutions or recurrent / state-space / linear-attention layers.",
        )
    undeclared = (
        None if exact_mixers or getattr(model, "_supports_attention_backend", True) else undeclared_attention(model)
    )
    if undeclared:
        raise unsupported(
            undeclared,
            "use a model whose attention supports attn_implementation choices (Llama, Qwen2/3, Mistral, ...).",
        )
    config.spec.check_model(model, config, heads, kv_heads)
    check_router_loss(model)


def model_config(model: torch.nn.Module, config: ContextParallelConfig) -> ContextParallelConfig:
    """`config` as it runs on `model` in this job: the size resolved against the processes (`job_config`, which
    raises the same error on every rank) and, for `hybrid` without a Ulysses degree, the largest degree the model's
    attention heads and one node allow (`with_auto_ulysses_size`), logged on the main process."""
    config = job_config(config)
    if not config.picks_ulysses_degree:
        return config
    heads = getattr(text_config(model), "num_attention_heads", None)
    if not isinstance(heads, int):
        raise ContextParallelConfigError(
            f"context_parallel_mode='hybrid' takes its Ulysses degree from the model's attention heads, but "
            f"{type(model).__name__}'s config states none (num_attention_heads); set context_parallel_ulysses_size."
        )
    per_node = node_size()
    chosen = config.with_auto_ulysses_size(heads, per_node)
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        node = f" and the {per_node} processes per node" if per_node is not None else ""
        logger.info(
            f"context_parallel_mode='hybrid': Ulysses degree {chosen.ulysses_size} × ring degree {chosen.ring_size}, "
            f"the largest Ulysses degree dividing context_parallel_size={config.size}, the model's {heads} attention "
            f"heads{node} (set context_parallel_ulysses_size to choose another)."
        )
    return chosen
