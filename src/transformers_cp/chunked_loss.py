"""The causal-LM loss without the logits: the LM head and cross-entropy run over chunks of tokens.

Full float32 logits of 500k tokens and a 152k vocabulary would take 300 GB; here at most one chunk's logits exist at a
time. The gradients with respect to the hidden states and the head's weight are computed chunk by chunk during the
forward (as fused linear-cross-entropy implementations do) rather than by recomputing each chunk's logits in backward:
it saves one LM-head matrix product per token and keeps only two tensors for backward (the hidden states' gradient,
the size of the hidden states, and the head's weight gradient in float32).

Each chunk runs the operations the model runs (head, optional final soft-capping in the logits' dtype, float32
log-softmax, cross-entropy with ignore index -100) and writes out by hand the gradient autograd would give, with the
same operations in the same dtypes (`_chunk_loss`): d CE / d logits = softmax − one-hot in float32, rounded to the
logits' dtype, zero on ignored rows; through the soft-capping, × (1 − tanh²); then the head's two matrix products.
By hand, the float32 log-probabilities are the only full-size buffer, exponentiated straight into the logits' dtype:
about a third of the memory traffic of autograd's cross-entropy, which writes the log-probabilities, a one-hot
gradient and the log-softmax gradient, each in float32, before the cast.

`apply_chunked_loss(model)` makes a Hugging Face causal LM return this loss whenever it is called with `labels` or
`shift_labels`: the same value as its own loss (sum over tokens / `num_items_in_batch`, or the token mean, plus
`coef · aux_loss` for an MoE model that outputs its router load-balancing loss, as its forward adds it), so any
trainer, and transformers_cp's loss scaling (`loss.py`), works unchanged on top.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from . import changes
from .loss import IGNORE_INDEX, causal_lm_loss
from .model_info import text_config
from .router_loss import aux_loss_coefficient

# Auto chunking keeps one chunk's logits at this many elements (1 GiB in float32) and turns on when a micro-batch's
# logits would be larger than one chunk.
AUTO_LOGITS_PER_CHUNK = 1 << 28
NAME = "chunked_loss"
# Config fields that rescale the logits in some models' forward, which the chunked loss does not reproduce.
_UNSUPPORTED_SCALING = ("logit_scale", "logits_scaling")


def _chunk_plan(labels: torch.Tensor, chunk_size: int) -> list[tuple[int, bool]]:
    """(first row, every row a target) of the chunks that hold a target (a label other than -100), read from the
    device in one synchronisation for all chunks (a short last chunk counts as having rows without one)."""
    targets = F.pad(labels.ne(IGNORE_INDEX), (0, -labels.shape[0] % chunk_size)).view(-1, chunk_size)
    flags = torch.stack([targets.any(1), targets.all(1)], 1).tolist()
    return [(i * chunk_size, every) for i, (some, every) in enumerate(flags) if some]


def _chunk_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    every_target: bool,
    softcap: float | None,
    with_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(Σ CE over the chunk's rows in float32, d Σ CE / d (h·Wᵀ + b) in the logits' dtype or None)."""
    logits = F.linear(hidden, weight, bias)
    capped = None
    if softcap is not None:
        capped = torch.tanh(logits / softcap)
        logits = capped * softcap
    logp = torch.log_softmax(logits, dim=-1, dtype=torch.float32)  # = log_softmax(logits.float())
    valid = labels.ne(IGNORE_INDEX)
    index = labels.clamp(min=0).unsqueeze(1)  # an ignored row picks column 0, and counts for nothing
    picked = logp.gather(1, index).squeeze(1)
    loss = -torch.where(valid, picked, 0.0).sum()
    if not with_grad:
        return loss, None
    grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    torch.exp(logp, out=grad)  # softmax, rounded once to the logits' dtype
    del logp
    grad.scatter_(1, index, (picked.exp() - 1).unsqueeze(1).to(grad.dtype))  # minus the one-hot, in float32
    if not every_target:
        grad.mul_(valid.unsqueeze(1))
    if capped is not None:  # d softcap·tanh(x / softcap) / dx
        grad = grad * (1 - capped * capped)
    return loss, grad


def _add_float(total: torch.Tensor | None, grad: torch.Tensor) -> torch.Tensor:
    """`total + grad` in float32, `grad` in float32 when there is no total yet."""
    return grad.float() if total is None else total.add_(grad)


@functools.cache
def _products_take_out_dtype() -> bool:
    """Whether torch's matrix products take `out_dtype` (the `dtype` overloads, from torch 2.8 on)."""
    return all("dtype" in op.overloads() for op in (torch.ops.aten.mm, torch.ops.aten.addmm))


def _add_product(total: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """`total + a·b` in float32. On CUDA with half-precision factors the product is summed into the float32 total by
    the matrix product itself (`out_dtype`), never rounded to the factors' dtype nor written out apart: for the head's
    weight gradient that is one vocabulary × hidden buffer less to write, read and add per chunk."""
    if a.is_cuda and a.dtype == b.dtype and a.dtype in (torch.bfloat16, torch.float16) and _products_take_out_dtype():
        if total is None:
            return torch.mm(a, b, out_dtype=torch.float32)
        return torch.addmm(total, a, b, out_dtype=torch.float32, out=total)
    return _add_float(total, a.mm(b))


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Σ CE(softcap(h·Wᵀ + b), labels) over chunks of `chunk_size` rows, gradients computed in forward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, chunk_size: int, softcap: float | None, with_grads: bool):
        needs = [need and with_grads for need in ctx.needs_input_grad[:3]]  # no gradient work without autograd
        grad_hidden = torch.zeros_like(hidden) if needs[0] else None
        # float32 sums over the chunks (None until the first chunk, copied in rather than added to zeros)
        grad_weight = grad_bias = None
        total = torch.zeros((), device=hidden.device, dtype=torch.float32)
        for start, every_target in _chunk_plan(labels, chunk_size):
            rows = slice(start, start + chunk_size)
            h = hidden[rows]
            loss, grad = _chunk_loss(h, weight, bias, labels[rows], every_target, softcap, any(needs))
            if needs[0]:
                grad_hidden[rows] = grad.mm(weight)  # under autocast both in its dtype, as the head's backward
            if needs[1]:
                grad_weight = _add_product(grad_weight, grad.t(), h)
            if bias is not None and needs[2]:
                grad_bias = _add_float(grad_bias, grad.sum(0))
            total += loss
        if needs[1] and grad_weight is None:  # no chunk has a target
            grad_weight = torch.zeros_like(weight, dtype=torch.float32)
        if bias is not None and needs[2] and grad_bias is None:
            grad_bias = torch.zeros_like(bias, dtype=torch.float32)
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        weight_dtype, bias_dtype = ctx.dtypes
        return (
            None if grad_hidden is None else grad_hidden * grad_output.to(grad_hidden.dtype),
            None if grad_weight is None else (grad_weight * grad_output).to(weight_dtype),
            None if grad_bias is None else (grad_bias * grad_output).to(bias_dtype),
            None,
            None,
            None,
            None,
        )


def chunked_cross_entropy_sum(
    hidden: torch.Tensor,
    head: torch.nn.Module,
    shift_labels: torch.Tensor,
    chunk_size: int,
    softcap: float | None = None,
) -> torch.Tensor:
    """Σ over tokens of the float32 cross-entropy of `head(hidden)` against `shift_labels` (-100 ignored)."""
    if hidden.shape[:-1] != shift_labels.shape:
        raise ValueError(
            f"the chunked loss got hidden states of shape {tuple(hidden.shape)} for labels of shape "
            f"{tuple(shift_labels.shape)}; call the model without logits_to_keep."
        )
    hidden = hidden.reshape(-1, hidden.shape[-1])
    labels = shift_labels.reshape(-1).to(hidden.device)
    with_grads = torch.is_grad_enabled()
    return ChunkedLinearCrossEntropy.apply(hidden, head.weight, head.bias, labels, chunk_size, softcap, with_grads)


@dataclass
class ChunkedLossState:
    chunk_size: int | None  # None: auto (see AUTO_LOGITS_PER_CHUNK)
    vocab_size: int
    softcap: float | None
    head_forward: Any  # the head's own forward, used whenever no loss is being chunked
    enabled: bool = True  # off while a caller needs the logits (the Trainer's prediction)
    labels: torch.Tensor | None = None  # shift labels of the call in flight
    ce_sum: torch.Tensor | None = None  # its cross-entropy sum, set by the head

    def chunk_for(self, tokens: int) -> int:
        """Tokens per chunk for a micro-batch of `tokens` tokens (0: this call does not chunk)."""
        if self.chunk_size is not None:
            return self.chunk_size
        per_chunk = max(1, AUTO_LOGITS_PER_CHUNK // self.vocab_size)
        return per_chunk if tokens > per_chunk else 0


def chunked_loss_supported(model: torch.nn.Module) -> str | None:
    """None if the chunked loss reproduces `model`'s loss, else why not."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, torch.nn.Linear):
        return f"{type(model).__name__} has no linear output embedding (lm_head)"
    config = text_config(model)
    for name in _UNSUPPORTED_SCALING:
        if getattr(config, name, None) not in (None, 1, 1.0):
            return f"{type(model).__name__} scales its logits (config.{name}={getattr(config, name)})"
    return None


def apply_chunked_loss(model: torch.nn.Module, chunk_size: int | None = None) -> torch.nn.Module:
    """Make `model` compute its loss chunk by chunk, never forming the logits (idempotent).

    `chunk_size`: tokens per chunk, or None to chunk automatically when a micro-batch's logits exceed 2^28 elements.
    Calls that pass `labels` or `shift_labels` return `loss` and no logits; other calls are unchanged.
    """
    reason = chunked_loss_supported(model)
    if reason is not None:
        raise ValueError(f"context_parallel_loss_chunk_size: {reason}; set context_parallel_loss_chunk_size=0.")
    existing = chunked_loss_state(model)
    if existing is not None:
        existing.chunk_size = chunk_size
        return model
    head = model.get_output_embeddings()
    config = text_config(model)
    state = ChunkedLossState(
        chunk_size, head.out_features, getattr(config, "final_logit_softcapping", None), head.forward
    )

    def head_forward(hidden: torch.Tensor) -> torch.Tensor:
        if state.labels is None or state.ce_sum is not None:
            return state.head_forward(hidden)
        chunk = state.chunk_for(state.labels.numel())
        state.ce_sum = chunked_cross_entropy_sum(hidden, head, state.labels, chunk, state.softcap)
        return hidden.new_empty(hidden.shape[0], 0, state.vocab_size)  # no logits

    def pre_forward(module, args, kwargs):
        state.labels = state.ce_sum = None
        shift_labels = kwargs.get("shift_labels")
        labels = kwargs.get("labels")
        if not state.enabled or (shift_labels is None and labels is None):
            return None
        if shift_labels is None:  # as transformers' ForCausalLMLoss: tokens < n predict n
            shift_labels = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]
        if not state.chunk_for(shift_labels.numel()):
            return None
        state.labels = shift_labels
        # Liger's forward (use_liger_kernel) refuses `skip_logits` without labels: the head is ours now (see liger.md)
        return args, {k: v for k, v in kwargs.items() if k not in ("labels", "shift_labels", "skip_logits")}

    def post_forward(module, args, kwargs, output):
        labels, ce_sum = state.labels, state.ce_sum
        state.labels = state.ce_sum = None
        if labels is None:
            return output
        if ce_sum is None or not isinstance(output, dict):
            raise RuntimeError(
                f"{type(model).__name__} did not run its lm_head on the hidden states (or returned a tuple), so the "
                "chunked loss cannot replace its loss; set context_parallel_loss_chunk_size=0."
            )
        loss = causal_lm_loss(ce_sum, labels, kwargs.get("num_items_in_batch"))
        aux_loss = output.get("aux_loss")
        if torch.is_tensor(aux_loss):  # the model adds its router loss only with labels, which were held back
            loss = loss + aux_loss_coefficient(model) * aux_loss.to(loss.device)
        fields = {k: v for k, v in output.items() if k not in ("loss", "logits")}
        return type(output)(loss=loss, **fields)

    change = changes.install(model, NAME, state=state, pre=pre_forward, post=post_forward)
    change.replace_forward(head, head_forward)
    return model


def remove_chunked_loss(model: torch.nn.Module) -> torch.nn.Module:
    """Undo `apply_chunked_loss`."""
    changes.remove(model, NAME)
    return model


def chunked_loss_state(model: torch.nn.Module) -> ChunkedLossState | None:
    return changes.state(model, NAME)
