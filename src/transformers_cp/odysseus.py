"""The `odysseus` mode: attention as sequence-sharded tensor parallelism, the rest of the layer on the sequence shard.

Each CP rank holds a contiguous shard (1, S/N, H) of the packed row. Around every attention module:

1. the shard is all-gathered to the whole row (1, S, H) (backward: reduce-scatter of its gradient);
2. q/k/v are projected for this rank's heads only (query heads split evenly over the group, KV heads following their
   query heads as Ulysses plans them, replicated where there are fewer KV heads than ranks);
3. the model's own attention forward runs on the whole row with these heads: RoPE from the gathered position
   embeddings, Qwen3's q/k norms, and the registered attention function, which runs the local kernel over the row's
   documents (packed documents and sliding windows are exact, as on one rank);
4. o_proj of the local heads gives a partial sum (1, S, H), reduce-scattered back to the shard (backward: all-gather).

Norms, MLP, embeddings and the LM head run on the shard with their own weights, as in data parallelism.

Weights stay whole on every rank; only the local heads' rows (q/k/v) and columns (o_proj) are used. A projection
weight's gradient is then the gradient of the rank's share of the loss through its heads, zero elsewhere, and the
sum over the CP group is the full gradient: the same algebra as every other parameter under `loss.py`'s convention,
so DDP, FSDP2 and ZeRO average it unchanged, and checkpoints stay ordinary Hugging Face weights. The price is that
projection weights (with their gradients and optimizer state) are not divided by the CP size; under FSDP2 / ZeRO-3
they are divided by all ranks anyway.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from .algorithms.ulysses import kv_heads_for_rank
from .changes import Change
from .comm import AllGather, ReduceScatter, all_gather
from .model_info import decoder_layers

if TYPE_CHECKING:
    from .mesh import ContextParallelMesh

_PROJECTIONS = ("q_proj", "k_proj", "v_proj")
_OUTPUT_PROJECTIONS = ("o_proj", "out_proj")  # out_proj: LFM2's (inside the decoder layers only, see below)
_HEAD_NORMS = ("q_norm", "k_norm", "q_layernorm", "k_layernorm")


@dataclass(frozen=True)
class HeadPlan:
    """Rows of q_proj, k_proj/v_proj and columns of o_proj that one rank uses (slices when contiguous)."""

    q: slice
    kv: slice | list[int]


def _rows(heads: list[int], head_dim: int) -> slice | list[int]:
    rows = [h * head_dim + i for h in heads for i in range(head_dim)]
    if rows == list(range(rows[0], rows[-1] + 1)):
        return slice(rows[0], rows[-1] + 1)
    return rows


def plan_heads(num_q: int, num_kv: int, head_dim: int, size: int, rank: int) -> HeadPlan:
    """This rank's share of the heads: query heads [rank·Hq/N, (rank+1)·Hq/N) and the KV heads they use."""
    check_heads(num_q, num_kv, size)
    per = num_q // size
    return HeadPlan(
        slice(rank * per * head_dim, (rank + 1) * per * head_dim),
        _rows(kv_heads_for_rank(num_q, num_kv, size, rank), head_dim),
    )


def check_heads(num_q: int, num_kv: int, size: int) -> None:
    if num_q % size or num_q % num_kv:
        divisors = [d for d in range(2, num_q + 1) if num_q % d == 0]
        raise ValueError(
            f"context_parallel_mode='odysseus' splits the model's {num_q} query heads over the "
            f"context_parallel_size={size} ranks, which must divide them; pick a size in {divisors or [1]}, or a "
            "ring mode ('zigzag', 'llama3')."
        )


def _projection(module: torch.nn.Module, name: str) -> tuple[torch.nn.Linear, list[tuple]] | None:
    """A projection's linear layer and its LoRA (A, B) pairs: a plain `nn.Linear`, or one that peft's LoRA wraps
    (`base_layer` plus `lora_A` / `lora_B`, whose output is base(x) + B(A(x)) · scaling); None for anything else."""
    projection = getattr(module, name, None)
    if isinstance(projection, torch.nn.Linear):
        return projection, []
    base = getattr(projection, "base_layer", None)
    if isinstance(base, torch.nn.Linear) and hasattr(projection, "lora_A"):
        return base, [(projection.lora_A[k], projection.lora_B[k]) for k in projection.lora_A]
    return None


def _output_name(module: torch.nn.Module) -> str:
    """The name of an attention module's output projection (`_named_attention_modules` found one)."""
    return next(name for name in _OUTPUT_PROJECTIONS if isinstance(getattr(module, name, None), torch.nn.Module))


def _named_attention_modules(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """Modules with a head_dim, q/k/v projections and an output projection: o_proj, or out_proj within the decoder
    layers (vision towers name theirs out_proj too, and run on their own inputs, not the sequence shard)."""
    inside = set(decoder_layers(model)[1].modules())
    outputs = lambda m: _OUTPUT_PROJECTIONS if m in inside else _OUTPUT_PROJECTIONS[:1]  # noqa: E731
    found = [
        (name, m)
        for name, m in model.named_modules()
        if hasattr(m, "head_dim")
        and all(isinstance(getattr(m, p, None), torch.nn.Module) for p in _PROJECTIONS)
        and any(isinstance(getattr(m, p, None), torch.nn.Module) for p in outputs(m))
    ]
    if not found:
        raise ValueError(
            f"context_parallel_mode='odysseus' needs attention modules with separate q_proj, k_proj, v_proj and "
            f"o_proj (or out_proj) linear layers, which {type(model).__name__} does not have; use another "
            "context_parallel_mode."
        )
    return found


def attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Attention modules with separate q/k/v/o projections and a `head_dim` (Llama, Qwen2/3, Mistral, ...)."""
    return [m for _, m in _named_attention_modules(model)]


def _check_projection(path: str, module: torch.nn.Module, name: str) -> None:
    """Odysseus splits a projection by heads, through its linear layers' forwards: a plain linear layer or peft's
    plain LoRA on one. Raise (before any collective) for what that split would compute wrongly."""
    projection = getattr(module, name)
    found = _projection(module, name)
    if found is None:
        raise ValueError(
            f"context_parallel_mode='odysseus' splits {path}.{name} by heads, which it can do for a linear layer "
            f"(plain, or with peft LoRA adapters), but that is a {type(projection).__name__}; use another "
            "context_parallel_mode (e.g. 'zigzag' or 'ulysses') with this model."
        )
    if getattr(projection, "lora_variant", None) or any(getattr(projection, "use_dora", {}).values()):
        raise ValueError(
            f"context_parallel_mode='odysseus' cannot split {path}.{name} by heads: its LoRA variant (e.g. DoRA) "
            "scales outputs by norms of the whole adapted weight, which the split does not compute; use plain LoRA "
            "or another context_parallel_mode."
        )
    for adapter, dropout in getattr(projection, "lora_dropout", {}).items():
        if getattr(dropout, "p", 0):
            raise ValueError(
                f"context_parallel_mode='odysseus' computes each rank's heads of {path}.{name} from its own copy of "
                f"the row, so LoRA dropout (adapter {adapter!r}, lora_dropout={dropout.p}) would draw a mask per rank "
                "where the model draws one for all heads; set lora_dropout=0.0 or use another context_parallel_mode."
            )


def check_model(model: torch.nn.Module, size: int) -> None:
    """Raise before any collective if the model's heads cannot be split over `size` ranks."""
    for path, module in _named_attention_modules(model):
        for name in (*_PROJECTIONS, _output_name(module)):
            _check_projection(path, module, name)
        d = module.head_dim
        q, k, v, o = (_projection(module, name)[0] for name in (*_PROJECTIONS, _output_name(module)))
        if q.out_features != o.in_features or v.out_features != k.out_features:
            raise ValueError(
                f"context_parallel_mode='odysseus' splits q_proj, k_proj, v_proj and o_proj by heads of size {d}, "
                f"but {type(module).__name__}'s q_proj computes more than its heads' queries (a gate) or its value "
                "heads differ in size from its key heads; use another context_parallel_mode for this model."
            )
        check_heads(
            _projection(module, "q_proj")[0].out_features // d,
            _projection(module, "k_proj")[0].out_features // d,
            size,
        )
        for name in _HEAD_NORMS:
            weight = getattr(getattr(module, name, None), "weight", None)
            if weight is not None and weight.numel() != d:
                raise ValueError(
                    f"context_parallel_mode='odysseus' needs {name} to normalise each head (size {d}), but "
                    f"{type(module).__name__}.{name} spans {weight.numel()} features across heads; use another "
                    "context_parallel_mode for this model."
                )


def _take(tensor: torch.Tensor, index: slice | list[int], dim: int) -> torch.Tensor:
    if isinstance(index, slice):
        return tensor[(slice(None),) * dim + (index,)]
    return tensor.index_select(dim, torch.tensor(index, device=tensor.device))


def _row_projection(linear: torch.nn.Linear, rows: slice | list[int]):
    def forward(x: torch.Tensor) -> torch.Tensor:
        bias = None if linear.bias is None else _take(linear.bias, rows, 0)
        return F.linear(x, _take(linear.weight, rows, 0), bias)

    return forward


def _column_projection(linear: torch.nn.Linear, cols: slice, with_bias: bool):
    """o_proj of the local heads: a partial sum. The bias counts on one rank so that the sum has it once; the others
    add it times zero, so that every rank uses every parameter (DDP expects a gradient from each)."""

    def forward(x: torch.Tensor) -> torch.Tensor:
        bias = linear.bias
        if bias is not None and not with_bias:
            bias = bias * 0
        return F.linear(x, _take(linear.weight, cols, 1), bias)

    return forward


def _gather_rows(t: torch.Tensor, group) -> torch.Tensor:
    """(1, L, ...) -> (1, U·L, ...) over the group; complex tensors (Llama 4's freqs_cis) as their real pairs."""
    if t.is_complex():
        return torch.view_as_complex(_gather_rows(torch.view_as_real(t), group).contiguous())
    return all_gather(t.transpose(0, 1), group).flatten(0, 1).transpose(0, 1)


class RotaryCache:
    """The whole row's (cos, sin), gathered once per forward: every layer receives the same position embeddings."""

    def __init__(self) -> None:
        self.entries: dict[int, tuple] = {}

    def full(self, embeddings: tuple[torch.Tensor, ...], group) -> tuple[torch.Tensor, ...]:
        entry = self.entries.get(id(embeddings[0]))
        if entry is None or entry[0] is not embeddings[0]:
            gathered = tuple(_gather_rows(t.detach(), group) for t in embeddings)
            entry = (embeddings[0], gathered)
            self.entries[id(embeddings[0])] = entry
        return entry[1]

    def clear(self) -> None:
        """Forget the last forward's rows (a new forward gathers its own)."""
        self.entries.clear()


def _attention_forward(module: torch.nn.Module, mesh: ContextParallelMesh, rotary: RotaryCache):
    original = module.forward
    signature = inspect.signature(original)
    group = mesh.cp_group
    # attention without positions (Jamba's, Nemotron-H's: the recurrent layers place the tokens) takes neither
    # parameter; one that computes rotary embeddings itself takes position_ids, which would be the shard's
    positionless = not {"position_embeddings", "position_ids"} & set(signature.parameters)

    def forward(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        hidden = bound.arguments["hidden_states"]
        if hidden.shape[0] != 1:
            raise ValueError(
                f"context parallel attention takes one packed row per step, got a batch of {hidden.shape[0]}; "
                "flatten the batch into one row (transformers_cp's collator does)."
            )
        embeddings = bound.arguments.get("position_embeddings")
        if embeddings is None and not positionless:
            raise ValueError(
                f"context_parallel_mode='odysseus' needs the position embeddings that {type(module).__name__} "
                "receives from its decoder layer; use another context_parallel_mode for this model."
            )
        bound.arguments["hidden_states"] = AllGather.apply(hidden[0], group)[None]
        if embeddings is not None:
            single = isinstance(embeddings, torch.Tensor)  # Llama 4: one complex tensor, not (cos, sin)
            full = rotary.full((embeddings,) if single else embeddings, group)
            bound.arguments["position_embeddings"] = full[0] if single else full
        out, weights = original(*bound.args, **bound.kwargs)
        return ReduceScatter.apply(out[0], group)[None], weights

    return forward


def install(model: torch.nn.Module, mesh: ContextParallelMesh, change: Change) -> RotaryCache:
    """Replace the attention and projection forwards of every attention module, as part of `change` (CP's, which
    restores them on removal); returns the per-forward cache that the CP state clears. A LoRA adapter follows its
    layer's split: B keeps the rows of the local heads of q/k/v; on o_proj, A keeps their columns and B (whose bias,
    like the layer's, counts on one rank) the partial sum."""
    rotary = RotaryCache()
    first = mesh.cp_rank == 0
    for module in attention_modules(model):
        d = module.head_dim
        (q, _), (k, _) = _projection(module, "q_proj"), _projection(module, "k_proj")
        plan = plan_heads(q.out_features // d, k.out_features // d, d, mesh.cp_size, mesh.cp_rank)
        for name, rows in (("q_proj", plan.q), ("k_proj", plan.kv), ("v_proj", plan.kv)):
            base, adapters = _projection(module, name)
            change.replace_forward(base, _row_projection(base, rows))
            for _, lora_b in adapters:
                change.replace_forward(lora_b, _row_projection(lora_b, rows))
        base, adapters = _projection(module, _output_name(module))
        change.replace_forward(base, _column_projection(base, plan.q, with_bias=first))
        for lora_a, lora_b in adapters:
            change.replace_forward(lora_a, _column_projection(lora_a, plan.q, with_bias=first))
            change.replace_forward(lora_b, _column_projection(lora_b, slice(None), with_bias=first))
        change.replace_forward(module, _attention_forward(module, mesh, rotary))
    return rotary
