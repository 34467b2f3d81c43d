"""The transformers adapter: CP attention and its mask function, registered as the implementation `"context_parallel"`.

transformers calls the attention function per layer with (B, H, L, D) tensors and the mask its mask function built.
The mask function builds no dense mask (documents come from position_ids, turned into a `Documents` object once per
forward by the model's pre-forward hook), only a `MaskWindow` saying which window the model's mask has.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import chunked, forward_documents
from .algorithms.reuse import ForwardReuse
from .attention import context_parallel_attention
from .model_checks import unsupported
from .plan import Documents
from .state import ATTENTION_NAME, require_state


@dataclass(frozen=True)
class MaskWindow:
    """What the model's mask function asked for, handed to attention in place of a dense mask.

    `sliding_window` is HF's W for a sliding-window mask, None for a plain causal one; `overlay` marks a mask function
    extended by the model (e.g. bidirectional attention over image tokens), which CP cannot follow. Attention takes the
    window from here, as the eager and sdpa backends take it from their mask: some models build a sliding-window mask
    but pass their attention no `sliding_window` (or the reverse). `documents` are the forward's own (see
    `forward_documents`).
    """

    sliding_window: int | None
    overlay: bool = False
    documents: Documents | None = None  # the forward's documents, for attention called without them (Nemotron)


def equal_head_dims(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Zero-pad q/k or v to one head size, for models whose values are narrower or wider than their queries and keys
    (multi-head latent attention, e.g. DeepSeek-V3): the kernels and the exchanges take one size. Zeros change
    neither the scores nor the first v-width columns of the output, which the caller keeps."""
    width = max(q.shape[-1], v.shape[-1])
    return tuple(
        t if t.shape[-1] == width else torch.nn.functional.pad(t, (0, width - t.shape[-1])) for t in (q, k, v)
    )


def _documents(kwargs: dict, local_len: int, cp_size: int, mask: MaskWindow | None) -> Documents:
    """The row's global document boundaries: the hook's `cp_documents` (from the call, or from the forward's mask for
    layers that do not hand them on), else the caller's `cu_seq_lens_q`."""
    docs = kwargs.get("cp_documents")
    if docs is None and mask is not None:
        docs = mask.documents
    if docs is not None:
        return docs
    cu = kwargs.get("cu_seq_lens_q")
    if cu is None:
        raise ValueError(
            "context parallel attention needs the packed row's global document boundaries: pass cu_seq_lens_q "
            "(or call the model after apply_context_parallel, whose hook derives them from position_ids)."
        )
    return Documents(cu.tolist(), local_len * cp_size)


def context_parallel_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | MaskWindow | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers `AttentionInterface` entry: (1, H, L, D) in, (1, L, H, D) out, as the other backends.

    The model's settings CP cannot honour (dropout) are refused by `model_checks.check_model` from its config and its
    inputs (padding masks, several rows) by the pre-forward hook; what only the call shows is checked here, among it
    the dropout the model really passes (held under a config field the checks do not know, it would otherwise be
    dropped silently). The call's logit softcap (`softcap`) and attention sinks (`s_aux` / `sinks`) are computed
    exactly; a chunked-attention layer's chunks cut its documents (`chunked`)."""
    if dropout:
        raise unsupported(f"attention dropout ({dropout})", "set the model's attention dropout to 0.0.")
    sinks = kwargs.get("s_aux", kwargs.get("sinks"))
    if kwargs.get("output_attentions"):
        raise unsupported(
            "output_attentions=True",
            "leave output_attentions off (attention weights are never materialised under CP).",
        )
    state = require_state(module)
    mesh = state.mesh
    window = attention_mask if isinstance(attention_mask, MaskWindow) else None
    if window is not None:
        if attention_mask.overlay:
            raise unsupported(
                "a mask the model extends beyond causal documents (e.g. bidirectional attention over image tokens)",
                "train on text-only inputs (no token_type_ids / image inputs) under context parallelism.",
            )
        sliding_window, attention_mask = attention_mask.sliding_window, None
    if attention_mask is not None:  # the hook refuses the model's padding and 4D masks; this is a caller's own
        raise unsupported(
            "an attention mask",
            "pass packed rows with position_ids (the transformers_cp collator removes padding) instead of a mask.",
        )
    if not (is_causal if is_causal is not None else getattr(module, "is_causal", True)):
        raise unsupported(
            "bidirectional attention",
            "use a causal language model (context parallelism is for causal language models).",
        )
    docs = _documents(kwargs, query.shape[2], mesh.cp_size, window)
    chunked.check_temperature_tuning(module, docs.seq_len)
    chunk = chunked.chunk_size(module)
    if chunk is not None:  # the mask's window is the chunk size; the chunks are documents of their own instead
        docs, sliding_window = chunked.chunked_documents(docs, chunk, mesh), None
    # odysseus attends whole rows (its heads' share of them); the other modes get this rank's shard
    local = docs.seq_len // (1 if mesh.config.whole_rows else mesh.cp_size)
    if query.shape[2] != local:
        raise ValueError(
            f"this rank holds {query.shape[2]} tokens, but a packed row of {docs.seq_len} tokens over "
            f"{mesh.cp_size} context-parallel ranks gives {local} per rank; shard the row with the "
            "transformers_cp collator or `shard_batch`."
        )
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    # squeeze, not [0]: a select's backward writes a zero tensor and copies the gradient into it, per tensor and layer
    q, k, v = equal_head_dims(*(t.squeeze(0).transpose(0, 1) for t in (query, key, value)))
    reuse = ForwardReuse(state.kept, module) if state.recomputed(module) else None
    softcap = kwargs.get("softcap") or None
    out = context_parallel_attention(q, k, v, mesh, docs, scale, sliding_window, reuse, softcap=softcap, sinks=sinks)
    return out[..., : value.shape[-1]].unsqueeze(0), None


def context_parallel_mask(
    *args, attention_mask: torch.Tensor | None = None, local_size: int | None = None, use_vmap: bool = False, **kwargs
) -> torch.Tensor | MaskWindow:
    """Mask function for the registered implementation: no dense mask, only a `MaskWindow` (transformers passes a
    sliding-window mask's W as `local_size`, and sets `use_vmap` when the model adds its own mask function to the
    causal one) with the forward's documents; a padding mask is handed on, and the pre-forward hook has already
    refused it."""
    if attention_mask is not None and not bool(attention_mask.all()):
        return attention_mask
    return MaskWindow(local_size, overlay=use_vmap, documents=forward_documents.current())


def register() -> None:
    """Register the attention and mask functions with transformers under `ATTENTION_NAME` (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTENTION_NAME, context_parallel_attention_forward)
    AttentionMaskInterface.register(ATTENTION_NAME, context_parallel_mask)
