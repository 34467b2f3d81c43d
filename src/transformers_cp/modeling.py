"""Installing context parallelism on a Hugging Face model: `apply_context_parallel` / `remove_context_parallel`.

The model's attention is switched to the registered implementation `"context_parallel"` (with a mask function that
builds no dense mask), whatever it was loaded with, so no flash-attn is needed. The CP settings live on the model's
modules, so two models in one process keep their own. A forward pre-hook turns the batch's document boundaries into a
`Documents` object once per forward (every layer reuses it) and rejects inputs CP cannot honour.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from . import odysseus
from .algorithms.reuse import ForwardReuse
from .attention import context_parallel_attention
from .config import ContextParallelConfig
from .mesh import ContextParallelMesh, build_mesh, init_distributed
from .plan import Documents
from .sharding import document_bounds, gather_sequence

ATTENTION_NAME = "context_parallel"
_STATE_ATTR = "_context_parallel_state"


@dataclass
class ContextParallelState:
    mesh: ContextParallelMesh
    requested: ContextParallelConfig
    original_attention: str
    hooks: list = field(default_factory=list)
    checkpointing: bool = False  # set per forward: training with activation checkpointing
    kept: dict = field(default_factory=dict)  # attention results kept for the recomputation, per attention module
    rotary: object | None = None  # odysseus: the whole row's position embeddings, gathered once per forward


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
        raise _unsupported("bidirectional attention", "context parallelism is for causal language models.")
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
    out = context_parallel_attention(
        query_states[0], key_states[0], value_states[0], cp_mesh, cp_documents, scale, sliding_window, cp_reuse
    )
    return out.unsqueeze(0)


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
        raise _unsupported("output_attentions=True", "attention weights are never materialised under CP.")
    state = _state(module)
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
        cp_reuse=ForwardReuse(state.kept, module) if state.checkpointing else None,
        **kwargs,
    )
    return out, None


def context_parallel_mask(*args, attention_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor | None:
    """Mask function for the registered implementation: documents come from position_ids, so no dense mask is
    built; a padding mask is handed to attention, which rejects it with a clear error."""
    if attention_mask is not None and not bool(attention_mask.all()):
        return attention_mask
    return None


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTENTION_NAME, context_parallel_attention_forward)
    AttentionMaskInterface.register(ATTENTION_NAME, context_parallel_mask)


def documents_from_position_ids(position_ids: torch.Tensor, mesh: ContextParallelMesh) -> Documents:
    """Global document boundaries from this rank's shard of global position_ids (one all-gather per forward)."""
    full = gather_sequence(position_ids.reshape(1, -1), mesh, dim=1)
    return Documents(document_bounds(full), full.shape[1])


def _pre_forward_hook(state: ContextParallelState):
    mesh = state.mesh

    def hook(module, args, kwargs):
        state.checkpointing = module.training and any(
            getattr(m, "gradient_checkpointing", False) for m in module.modules()
        )
        state.kept.clear()  # a new forward: whatever the last one kept is stale
        if state.rotary is not None:
            state.rotary.entries.clear()
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        inputs = input_ids if input_ids is not None else kwargs.get("inputs_embeds")
        if inputs is None:
            return None
        if kwargs.get("past_key_values") is not None:
            raise _unsupported("a KV cache (past_key_values)", "run generation without context parallelism.")
        mask = kwargs.get("attention_mask")
        if mask is not None:
            if not bool(mask.all()):
                raise _unsupported(
                    "padding in attention_mask",
                    "remove padding and pack the batch into one row with position_ids "
                    "(transformers_cp.ContextParallelCollator does this).",
                )
            kwargs["attention_mask"] = None
        if "cp_documents" not in kwargs:
            if kwargs.get("cu_seq_lens_q") is not None:
                cu = kwargs["cu_seq_lens_q"]
                docs = Documents(cu.tolist(), inputs.shape[1] * mesh.cp_size)
            elif kwargs.get("position_ids") is not None:
                docs = documents_from_position_ids(kwargs["position_ids"], mesh)
            else:
                raise ValueError(
                    "under context parallelism the model needs position_ids (global positions of this rank's tokens): "
                    "without them every shard would restart at position 0. Shard batches with the transformers_cp "
                    "collator or `shard_batch`, which provide them."
                )
            kwargs["cp_documents"] = docs
        kwargs["use_cache"] = False
        return args, kwargs

    return hook


def _check_model(model: torch.nn.Module, mesh: ContextParallelMesh) -> None:
    """Reject model settings CP cannot honour, on every rank, before any collective."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    cp = mesh.config
    heads = getattr(config, "num_attention_heads", None)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    if getattr(config, "attention_dropout", 0.0):
        raise _unsupported(
            f"attention dropout (attention_dropout={config.attention_dropout})", "set attention_dropout=0.0."
        )
    if getattr(config, "alibi", False) or getattr(config, "use_alibi", False):
        raise _unsupported("ALiBi position biases", "use a RoPE model.")
    if heads is not None and mesh.layout.ulysses > 1:
        from .algorithms.ulysses import check_heads

        check_heads(heads, mesh.layout.ulysses)
    if cp.mode == "odysseus":
        odysseus.check_model(model, cp.size)
    if cp.mode == "llama3" and kv_heads is not None and kv_heads % cp.kv_stride(kv_heads):
        raise ValueError(
            f"context_parallel_heads_k_stride={cp.heads_k_stride} must divide the model's {kv_heads} key/value heads; "
            f"pick one of {[d for d in range(1, kv_heads + 1) if kv_heads % d == 0]}."
        )


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
        mesh = build_mesh(config)
    _check_model(model, mesh)
    _register()
    state = ContextParallelState(mesh, config, model.config._attn_implementation)
    for module in model.modules():
        setattr(module, _STATE_ATTR, state)
    model.set_attn_implementation(ATTENTION_NAME)
    if mesh.config.mode == "odysseus" and mesh.cp_group is not None:
        state.rotary = odysseus.install(model, mesh)
    state.hooks.append(model.register_forward_pre_hook(_pre_forward_hook(state), with_kwargs=True))
    return model


def remove_context_parallel(model: torch.nn.Module) -> torch.nn.Module:
    """Restore the attention implementation the model had before `apply_context_parallel`."""
    state = getattr(model, _STATE_ATTR, None)
    if state is None:
        return model
    for hook in state.hooks:
        hook.remove()
    odysseus.uninstall(model)
    for module in model.modules():
        if getattr(module, _STATE_ATTR, None) is state:
            delattr(module, _STATE_ATTR)
    model.set_attn_implementation(state.original_attention)
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
    "context_parallel_flash_attention_forward",
    "documents_from_position_ids",
]
