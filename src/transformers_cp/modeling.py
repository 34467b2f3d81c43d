"""Installing context parallelism on a Hugging Face model: `apply_context_parallel` / `remove_context_parallel`.

The model's attention is switched to the registered implementation `"context_parallel"` (with a mask function that
builds no dense mask), whatever it was loaded with, so no flash-attn is needed. The CP settings live on the model's
modules, and the model gets its own copy of its config (transformers reads the attention implementation from the
config, which models made from one config object share), so two models in one process keep their own. A forward
pre-hook turns the batch's document boundaries into a `Documents` object once per forward (every layer reuses it) and
rejects inputs CP cannot honour.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import transformers

from . import odysseus
from .agreement import (
    Fingerprint,
    Value,
    bounds_checksum,
    check_agreement,
    dtype_code,
    gather_fingerprints,
    raise_problems,
)
from .algorithms.reuse import ForwardReuse
from .attention import context_parallel_attention
from .config import ContextParallelConfig, ContextParallelConfigError
from .loss import IGNORE_INDEX
from .mesh import ContextParallelMesh, build_mesh, init_distributed, job_config, node_size
from .mixing import attention_sinks, foreign_layer_types, sequence_mixers, sparse_attention
from .plan import Documents
from .recompute import checkpointable_layers, is_checkpointed
from .rope import depends_on_sequence, follow_row_positions
from .router_loss import check_router_loss, install_router_loss, remove_router_loss
from .sharding import BATCH_PROBLEM, ROW_CHECKSUM, document_bounds, gather_sequence

ATTENTION_NAME = "context_parallel"
_STATE_ATTR = "_context_parallel_state"
logger = transformers.utils.logging.get_logger(f"transformers.{__name__}")  # shown as transformers' own logs are


@dataclass
class ContextParallelState:
    mesh: ContextParallelMesh
    requested: ContextParallelConfig
    # (module, attribute, config) for every config the model's modules held before CP gave the model its own copy
    original_configs: list = field(default_factory=list)
    hooks: list = field(default_factory=list)
    # Each module of a decoder layer -> that layer: attention keeps its results for the recomputation only when its
    # layer is checkpointed (a layer that is not recomputed would leave them in `kept` unused).
    layer_of: dict = field(default_factory=dict)
    layers: list = field(default_factory=list)  # the decoder layers, in model order
    checkpointed_layers: int = 0  # set per forward
    kept: dict = field(default_factory=dict)  # attention results kept for the recomputation, per attention module
    rotary: object | None = None  # odysseus: the whole row's position embeddings, gathered once per forward
    max_positions: int | None = None  # longest document the model's positions cover (None: no limit known)
    row_max_position: int | None = None  # the packed row's largest position id, set per forward (see rope.py)


@dataclass(frozen=True)
class MaskWindow:
    """What the model's mask function asked for, handed to attention in place of a dense mask.

    `sliding_window` is HF's W for a sliding-window mask, None for a plain causal one; `overlay` marks a mask function
    extended by the model (e.g. bidirectional attention over image tokens), which CP cannot follow. Attention takes the
    window from here, as the eager and sdpa backends take it from their mask: some models build a sliding-window mask
    but pass their attention no `sliding_window` (or the reverse).
    """

    sliding_window: int | None
    overlay: bool = False


def _state(module: torch.nn.Module) -> ContextParallelState:
    state = getattr(module, _STATE_ATTR, None)
    if state is None:
        raise RuntimeError(
            f"attention implementation {ATTENTION_NAME!r} is set on a model that context parallelism was not "
            "applied to; call transformers_cp.apply_context_parallel(model) instead of setting it by hand."
        )
    return state


def _unsupported(setting: str, fix: str) -> ValueError:
    return ValueError(f"context parallel attention does not support {setting}; {fix}")


def context_parallel_flash_attention_forward(
    query_states: torch.Tensor,
    key_states: torch.Tensor,
    value_states: torch.Tensor,
    attention_mask: torch.Tensor | None,
    query_length: int,
    is_causal: bool,
    dropout: float = 0.0,
    position_ids: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    sliding_window: int | None = None,
    use_top_left_mask: bool = False,
    softcap: float | None = None,
    deterministic: bool | None = None,
    cu_seq_lens_q: torch.Tensor | None = None,
    cu_seq_lens_k: torch.Tensor | None = None,
    max_length_q: int | None = None,
    max_length_k: int | None = None,
    target_dtype: torch.dtype | None = None,
    attn_implementation: str | None = None,
    *,
    cp_mesh: ContextParallelMesh,
    cp_documents: Documents | None = None,
    cp_reuse: ForwardReuse | None = None,
    s_aux: torch.Tensor | None = None,
    **kwargs,
) -> torch.Tensor:
    """The CP attention entry point, with the signature of transformers' `_flash_attention_forward`.

    Inputs are (1, L, H, D): this rank's shard of one packed row. `cu_seq_lens_q` (or the pre-computed
    `cp_documents`) gives the row's global document boundaries.
    """
    if dropout:
        raise _unsupported(f"attention dropout ({dropout})", "set the model's attention_dropout to 0.")
    if softcap:
        raise _unsupported(f"attention logit softcapping ({softcap})", "use a model without attn_logit_softcapping.")
    if s_aux is not None:
        raise _unsupported("attention sinks (s_aux)", "use a model without attention sinks.")
    if not is_causal:
        raise _unsupported(
            "bidirectional attention",
            "use a causal language model (context parallelism is for causal language models).",
        )
    if attention_mask is not None:
        raise _unsupported(
            "an attention mask",
            "pass packed rows with position_ids (the transformers_cp collator removes padding) instead of a mask.",
        )
    if query_states.shape[0] != 1:
        raise ValueError(
            f"context parallel attention takes one packed row per step, got a batch of {query_states.shape[0]}; "
            "flatten the batch into one row (transformers_cp's collator does)."
        )
    if cp_documents is None:
        if cu_seq_lens_q is None:
            raise ValueError(
                "context parallel attention needs the packed row's global document boundaries: pass cu_seq_lens_q "
                "(or call the model after apply_context_parallel, whose hook derives them from position_ids)."
            )
        cp_documents = Documents(cu_seq_lens_q.tolist(), query_states.shape[1] * cp_mesh.cp_size)
    # odysseus attends whole rows (its heads' share of them); the other modes get this rank's shard
    local = cp_documents.seq_len // (1 if cp_mesh.config.mode == "odysseus" else cp_mesh.cp_size)
    if query_states.shape[1] != local:
        raise ValueError(
            f"this rank holds {query_states.shape[1]} tokens, but a packed row of {cp_documents.seq_len} tokens over "
            f"{cp_mesh.cp_size} context-parallel ranks gives {local} per rank; shard the row with the "
            "transformers_cp collator or `shard_batch`."
        )
    scale = softmax_scale if softmax_scale is not None else query_states.shape[-1] ** -0.5
    q, k, v = equal_head_dims(query_states[0], key_states[0], value_states[0])
    out = context_parallel_attention(q, k, v, cp_mesh, cp_documents, scale, sliding_window, cp_reuse)
    return out[..., : value_states.shape[-1]].unsqueeze(0)


def equal_head_dims(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Zero-pad q/k or v to one head size, for models whose values are narrower or wider than their queries and keys
    (multi-head latent attention, e.g. DeepSeek-V3): the kernels and the exchanges take one size. Zeros change
    neither the scores nor the first v-width columns of the output, which the caller keeps."""
    width = max(q.shape[-1], v.shape[-1])
    return tuple(
        t if t.shape[-1] == width else torch.nn.functional.pad(t, (0, width - t.shape[-1])) for t in (q, k, v)
    )


def context_parallel_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers `AttentionInterface` adapter: (B, H, L, D) in, (B, L, H, D) out, as the other backends."""
    if kwargs.get("output_attentions"):
        raise _unsupported(
            "output_attentions=True",
            "leave output_attentions off (attention weights are never materialised under CP).",
        )
    state = _state(module)
    if isinstance(attention_mask, MaskWindow):
        if attention_mask.overlay:
            raise _unsupported(
                "a mask the model extends beyond causal documents (e.g. bidirectional attention over image tokens)",
                "train on text-only inputs (no token_type_ids / image inputs) under context parallelism.",
            )
        sliding_window, attention_mask = attention_mask.sliding_window, None
    out = context_parallel_flash_attention_forward(
        query.transpose(1, 2),
        key.transpose(1, 2),
        value.transpose(1, 2),
        attention_mask,
        query_length=query.shape[2],
        is_causal=is_causal if is_causal is not None else getattr(module, "is_causal", True),
        dropout=dropout,
        softmax_scale=scaling,
        sliding_window=sliding_window,
        cp_mesh=state.mesh,
        cp_reuse=ForwardReuse(state.kept, module) if _recomputed(state, module) else None,
        **kwargs,
    )
    return out, None


def _recomputed(state: ContextParallelState, module: torch.nn.Module) -> bool:
    """Whether `module` lies in a decoder layer that activation checkpointing recomputes in this forward."""
    layer = state.layer_of.get(module)
    return layer is not None and is_checkpointed(layer)


def context_parallel_mask(
    *args, attention_mask: torch.Tensor | None = None, local_size: int | None = None, use_vmap: bool = False, **kwargs
) -> torch.Tensor | MaskWindow:
    """Mask function for the registered implementation: documents come from position_ids, so no dense mask is
    built, only a `MaskWindow` saying which window the model's mask has (transformers passes a sliding-window mask's
    W as `local_size`, and sets `use_vmap` when the model adds its own mask function to the causal one); a padding
    mask is handed to attention, which rejects it with a clear error."""
    if attention_mask is not None and not bool(attention_mask.all()):
        return attention_mask
    return MaskWindow(local_size, overlay=use_vmap)


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTENTION_NAME, context_parallel_attention_forward)
    AttentionMaskInterface.register(ATTENTION_NAME, context_parallel_mask)


def documents_from_position_ids(position_ids: torch.Tensor, mesh: ContextParallelMesh) -> Documents:
    """Global document boundaries from this rank's shard of global position_ids (one all-gather per forward)."""
    full = gather_sequence(position_ids.reshape(1, -1), mesh, dim=1)
    return Documents(document_bounds(full), full.shape[1])


_NONE = 2**62
"""The extremes of no ids: a minimum above, and (negated) a maximum below, any id that is checked."""


def _input_problem(inputs: torch.Tensor, kwargs: dict, marked: torch.Tensor | None) -> str | None:
    """The first problem this rank's own inputs have, or None. `marked`: the text of a problem the collator found in
    this rank's data (`sharding.BatchError`), carried by a stand-in batch."""
    if marked is not None:
        return bytes(marked.tolist()).decode()
    mask = kwargs.get("attention_mask")
    problems = (
        (
            kwargs.get("past_key_values") is not None,
            "context parallel attention does not support a KV cache (past_key_values); run generation without "
            "context parallelism.",
        ),
        (
            mask is not None and mask.dim() == 2 and not bool(mask.all()),
            "context parallel attention does not support padding in attention_mask; remove padding and pack the batch "
            "into one row with position_ids (transformers_cp.ContextParallelCollator does this).",
        ),
        (
            mask is not None and mask.dim() != 2,
            "context parallel attention does not support a custom (4D) attention mask: a dense mask cannot be split "
            "across ranks; pass packed rows whose position_ids restart at 0 per document instead.",
        ),
        (
            inputs.shape[0] != 1,
            "context parallel attention takes one packed row per step, got a batch of several rows; flatten the batch "
            "into one row (transformers_cp.ContextParallelCollator does).",
        ),
        (
            kwargs.get("position_ids") is None,
            "under context parallelism the model needs position_ids (global positions of this rank's tokens): without "
            "them every shard would restart at position 0. Shard batches with the transformers_cp collator or "
            "`shard_batch`, which provide them.",
        ),
    )
    return next((message for found, message in problems if found), None)


def _value(value) -> Value:
    """An int, or a one-element tensor left on its device (read with the gathered table)."""
    return value.reshape(()) if isinstance(value, torch.Tensor) else int(value)


def _fingerprint(
    module: torch.nn.Module,
    state: ContextParallelState,
    inputs: torch.Tensor,
    kwargs: dict,
    bounds: list[int],
    checksum: torch.Tensor | None,
    problem: str | None,
) -> Fingerprint:
    """This rank's batch summary (see `agreement`); `bounds` are cu_seq_lens_q's, empty when not given; `checksum`
    is the packed row's (`sharding.row_checksum`), None for shards made without the collator or `shard_batch`."""
    is_ids = not inputs.is_floating_point()
    labels = kwargs.get("labels"), kwargs.get("shift_labels")
    items = kwargs.get("num_items_in_batch")
    agreed = {
        "local sequence length": inputs.shape[1] if inputs.dim() > 1 else -1,
        "number of rows": inputs.shape[0],
        "input kind and dtype": dtype_code(inputs.dtype) * (1 if is_ids else -1),
        "inputs_embeds width": 0 if is_ids else inputs.shape[-1],
        "number of document boundaries": len(bounds),
        "document boundaries (checksum of cu_seq_lens_q)": bounds_checksum(bounds),
        "packed row (checksum of its tokens, positions and labels)": -1 if checksum is None else _value(checksum),
        "training mode": int(module.training),
        "checkpointed decoder layers": state.checkpointed_layers,
        "labels given": (labels[0] is not None) + 2 * (labels[1] is not None),
        "num_items_in_batch": -1 if items is None else _value(items),
    }
    position_ids = kwargs.get("position_ids")
    if position_ids is not None and position_ids.numel():
        max_position = position_ids.max()
    else:
        max_position = max((b - a for a, b in zip(bounds, bounds[1:])), default=0) - 1
    ids = inputs if is_ids and inputs.numel() else None
    targets = [t.reshape(-1) for t in labels if t is not None and t.numel()]
    targets = torch.cat(targets).long() if targets else None
    real = None if targets is None else targets != IGNORE_INDEX
    facts = {
        "max position": max_position,
        "min token": _NONE if ids is None else ids.min(),
        "max token": -_NONE if ids is None else ids.max(),
        "min label": _NONE if targets is None else torch.where(real, targets, _NONE).min(),
        "max label": -_NONE if targets is None else torch.where(real, targets, -_NONE).max(),
    }
    return Fingerprint(agreed, facts, problem)


def _check_batch(
    module: torch.nn.Module,
    state: ContextParallelState,
    inputs: torch.Tensor,
    kwargs: dict,
    bounds: list[int],
    checksum: torch.Tensor | None = None,
    marked: torch.Tensor | None = None,
) -> int:
    """Every rank's input checks, decided on the job's gathered fingerprints so that all ranks raise together.
    Returns the largest position id of this CP group's row (what sequence-dependent RoPE must see).

    The table spans the whole job, not only the CP group: a problem on one data-parallel rank would otherwise leave
    the others waiting in their next collective."""
    mesh = state.mesh
    mine = _fingerprint(module, state, inputs, kwargs, bounds, checksum, _input_problem(inputs, kwargs, marked))
    group = dist.group.WORLD if mesh.cp_group is not None else None
    table = gather_fingerprints(mine, group, (mesh.dp_rank, mesh.cp_rank), inputs.device)
    raise_problems(mine, table, group, inputs.device)
    check_agreement(table)

    def extreme(pick, name: str) -> int:
        return pick(rank.facts[name] for rank in table)

    top = extreme(max, "max position")
    row_top = max(rank.facts["max position"] for rank in table if rank.dp_rank == mesh.dp_rank)
    if state.max_positions is not None and top >= state.max_positions:
        raise ValueError(
            f"the packed row has a document of {top + 1} tokens, but the model's positions cover {state.max_positions} "
            "(max_position_embeddings, times its RoPE scaling factor if any); truncate examples to at most "
            f"{state.max_positions} tokens (e.g. tokenizer truncation / max_length) or raise the model's "
            "max_position_embeddings (with a RoPE scaling that covers the longer documents)."
        )
    embeddings = module.get_input_embeddings() if hasattr(module, "get_input_embeddings") else None
    vocab = getattr(embeddings, "num_embeddings", None)
    low, high = extreme(min, "min token"), extreme(max, "max token")
    if vocab is not None and high >= low and (low < 0 or high >= vocab):
        raise ValueError(
            f"input_ids range from {low} to {high}, outside the model's vocabulary of {vocab} embeddings (vocab_size); "
            "use the model's own tokenizer, keep -100 in labels only, or resize_token_embeddings."
        )
    head = module.get_output_embeddings() if hasattr(module, "get_output_embeddings") else None
    classes = getattr(head, "out_features", None) or vocab
    low, high = extreme(min, "min label"), extreme(max, "max label")
    if classes is not None and high >= low and (low < 0 or high >= classes):
        raise ValueError(
            f"labels range from {low} to {high}, but a target must be a token id below the model's {classes} output "
            f"classes (vocab_size) or {IGNORE_INDEX} (no target); use the model's own tokenizer, mark tokens without a "
            f"target with {IGNORE_INDEX}, or resize_token_embeddings."
        )
    return row_top


def _pre_forward_hook(state: ContextParallelState):
    mesh = state.mesh

    def hook(module, args, kwargs):
        state.checkpointed_layers = sum(is_checkpointed(layer) for layer in state.layers)
        state.kept.clear()  # a new forward: whatever the last one kept is stale
        if state.rotary is not None:
            state.rotary.entries.clear()
        checksum, marked = kwargs.pop(ROW_CHECKSUM, None), kwargs.pop(BATCH_PROBLEM, None)  # not for the model
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        inputs = input_ids if input_ids is not None else kwargs.get("inputs_embeds")
        if inputs is None:
            return args, kwargs
        cu = kwargs.get("cu_seq_lens_q")
        bounds = [] if cu is None else [int(b) for b in cu.tolist()]  # read from the device once per forward
        # before any collective, decided alike on every rank
        state.row_max_position = _check_batch(module, state, inputs, kwargs, bounds, checksum, marked)
        if kwargs.get("attention_mask") is not None:
            kwargs["attention_mask"] = None  # all ones (checked): packed rows need none
        if "cp_documents" not in kwargs:
            if cu is not None:
                docs = Documents(bounds, inputs.shape[1] * mesh.cp_size)
            else:
                docs = documents_from_position_ids(kwargs["position_ids"], mesh)
            kwargs["cp_documents"] = docs
        kwargs["use_cache"] = False
        return args, kwargs

    return hook


_DROPOUT_FIELDS = ("attention_dropout", "attention_probs_dropout_prob", "attn_pdrop")
"""Config fields that hold the attention dropout probability in transformers' models."""


def _text_config(model: torch.nn.Module):
    return model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config


def max_positions(model: torch.nn.Module) -> int | None:
    """The longest document the model's positions cover: max_position_embeddings, times the RoPE scaling factor
    where the config scales RoPE beyond it; for longrope, whose max_position_embeddings is the extended length, the
    larger of it and original_max_position_embeddings times the factor. None where the config states no limit, and
    for dynamic NTK scaling, whose frequencies follow the sequence to any length."""
    config = _text_config(model)
    limit = getattr(config, "max_position_embeddings", None)
    if not isinstance(limit, int):
        return None
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    scalings = [p for p in rope.values() if isinstance(p, dict)] or [rope]  # per layer type, or one
    covered = [limit]
    for p in scalings:
        kind = p.get("rope_type", p.get("type", "default"))
        if kind == "longrope":
            covered.append(int(p.get("original_max_position_embeddings", limit) * (p.get("factor") or 1)))
        elif depends_on_sequence(kind):
            return None
        elif kind != "default":
            covered.append(int(limit * (p.get("factor") or 1)))
    return max(covered)


def check_model(model: torch.nn.Module, config: ContextParallelConfig) -> None:
    """Reject model settings CP cannot honour. `config` is resolved against the world size; nothing here talks to
    other ranks, so every rank raises the same error before the mesh's groups are made or any collective runs."""
    if not getattr(model, "_supports_attention_backend", True):
        raise _unsupported(
            f"{type(model).__name__}, whose attention is not pluggable through transformers' AttentionInterface "
            "(its attention, e.g. ALiBi in Bloom, Falcon or MPT, would silently run on the local shard only)",
            "use a model whose attention supports attn_implementation choices (Llama, Qwen2/3, Mistral, ...).",
        )
    text = _text_config(model)
    heads = getattr(text, "num_attention_heads", None)
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    for name in _DROPOUT_FIELDS:
        if getattr(text, name, None):
            raise _unsupported(f"attention dropout ({name}={getattr(text, name)})", f"set the model's {name}=0.0.")
    if getattr(text, "alibi", False) or getattr(text, "use_alibi", False):
        raise _unsupported("ALiBi position biases", "use a RoPE model.")
    sparse = sparse_attention(text)
    if sparse:
        raise _unsupported(
            f"sparse attention that picks the keys each query sees ({', '.join(sparse)})",
            "use a model with dense (full or sliding-window) attention.",
        )
    layer_kinds = foreign_layer_types(text)
    if layer_kinds:
        raise _unsupported(
            f"these layer kinds ({'; '.join(layer_kinds)}): across ranks it computes exactly only causal full or "
            "sliding-window softmax attention and blocks that act on each token alone (MLP, MoE)",
            "use a model whose layers are all of those kinds.",
        )
    mixers = sequence_mixers(model)
    if mixers:
        more = f" and {len(mixers) - 3} more" if len(mixers) > 3 else ""
        raise _unsupported(
            f"modules that mix tokens outside attention ({', '.join(mixers[:3])}{more}): they would see this rank's "
            "shard of the sequence alone",
            "use a model without convolutions or recurrent / state-space / linear-attention layers.",
        )
    sinks = attention_sinks(model)
    if sinks:
        raise _unsupported(
            f"attention sinks ({sinks[0]}{' and more' if len(sinks) > 1 else ''})",
            "use a model without attention sinks.",
        )
    if getattr(text, "attn_logit_softcapping", None):
        raise _unsupported(
            f"attention logit softcapping (attn_logit_softcapping={text.attn_logit_softcapping})",
            "set the model's attn_logit_softcapping=None, or use a model without it.",
        )
    if heads is not None and config.ulysses_degree > 1:
        from .algorithms.ulysses import check_heads

        check_heads(heads, config.ulysses_degree)
    if config.mode == "odysseus":
        odysseus.check_model(model, config.size)
    check_router_loss(model)
    if config.mode == "llama3" and kv_heads is not None and kv_heads % config.kv_stride(kv_heads):
        raise ValueError(
            f"context_parallel_heads_k_stride={config.heads_k_stride} must divide the model's {kv_heads} key/value "
            f"heads; pick one of {[d for d in range(1, kv_heads + 1) if kv_heads % d == 0]}."
        )


def model_config(model: torch.nn.Module, config: ContextParallelConfig) -> ContextParallelConfig:
    """`config` as it runs on `model` in this job: the size resolved against the processes (`job_config`, which
    raises the same error on every rank) and, for `hybrid` without a Ulysses degree, the largest degree the model's
    attention heads and one node allow (`with_auto_ulysses_size`), logged on the main process."""
    config = job_config(config)
    if config.mode != "hybrid" or config.ulysses_size is not None:
        return config
    heads = getattr(_text_config(model), "num_attention_heads", None)
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


def _own_config(model: torch.nn.Module) -> list:
    """Give `model` a copy of its config, held by every module that held the config or one of its sub-configs (the
    attention modules keep `self.config`); returns (module, attribute, original) to put back on removal."""
    copies: dict = {}
    copy.deepcopy(model.config, copies)  # `copies` maps id(original) -> copy for the config and all it holds
    originals = [
        (module, name, value)
        for module in model.modules()
        for name, value in vars(module).items()
        if isinstance(value, transformers.PretrainedConfig) and id(value) in copies
    ]
    for module, name, value in originals:
        setattr(module, name, copies[id(value)])
    return originals


def apply_context_parallel(
    model: torch.nn.Module,
    config: ContextParallelConfig | None = None,
    mesh: ContextParallelMesh | None = None,
) -> torch.nn.Module:
    """Make `model`'s attention context parallel. Idempotent; undone by `remove_context_parallel`.

    With no config the CP group is every rank of the job, in the default mode. The model must then be called with
    this rank's shard of one packed row and its global position_ids (see `shard_batch`).
    """
    config = config or ContextParallelConfig()
    existing = getattr(model, _STATE_ATTR, None)
    if existing is not None:
        if mesh in (None, existing.mesh) and existing.requested == config:
            return model
        remove_context_parallel(model)
    if mesh is None:
        init_distributed()
        resolved = model_config(model, config)
        check_model(model, resolved)  # before build_mesh makes the CP groups
        mesh = build_mesh(resolved)
    else:
        check_model(model, mesh.config)
    _register()
    state = ContextParallelState(mesh, config, max_positions=max_positions(model))
    state.layers = checkpointable_layers(model)
    state.layer_of = {module: layer for layer in state.layers for module in layer.modules()}
    for module in model.modules():
        setattr(module, _STATE_ATTR, state)
    state.original_configs = _own_config(model)  # so that other models of the same config keep their attention
    model.set_attn_implementation(ATTENTION_NAME)
    if mesh.config.mode == "odysseus" and mesh.cp_group is not None:
        state.rotary = odysseus.install(model, mesh)
    state.hooks.append(model.register_forward_pre_hook(_pre_forward_hook(state), with_kwargs=True))
    state.hooks.extend(follow_row_positions(model, lambda: state.row_max_position))
    state.hooks.extend(install_router_loss(model, mesh))  # after the hook above: the row's MoE aux loss
    return model


def remove_context_parallel(model: torch.nn.Module) -> torch.nn.Module:
    """Restore the attention implementation the model had before `apply_context_parallel`, by giving its modules back
    the config objects they held then."""
    state = getattr(model, _STATE_ATTR, None)
    if state is None:
        return model
    for hook in state.hooks:
        hook.remove()
    odysseus.uninstall(model)
    remove_router_loss(model)
    for module in model.modules():
        if getattr(module, _STATE_ATTR, None) is state:
            delattr(module, _STATE_ATTR)
    for module, name, original in state.original_configs:
        setattr(module, name, original)
    return model


def context_parallel_mesh(model: torch.nn.Module) -> ContextParallelMesh | None:
    """The mesh CP was applied with, or None."""
    state = getattr(model, _STATE_ATTR, None)
    return None if state is None else state.mesh


__all__ = [
    "ATTENTION_NAME",
    "apply_context_parallel",
    "remove_context_parallel",
    "context_parallel_mesh",
    "check_model",
    "context_parallel_flash_attention_forward",
    "documents_from_position_ids",
]
