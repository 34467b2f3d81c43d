"""`ContextParallelConfig`: the settings of context parallelism and, for one place to set them, of the memory
savings, which it hands on as their own object (`MemorySavings`); the mesh carries the CP settings alone."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

from .modes import DEFAULT_MODE
from .modes import MODES as _REGISTRY
from .modes.base import Mode

MODES = tuple(_REGISTRY)
BACKENDS = ("auto", "torch", "flash_attn")
BALANCES = ("tokens", "documents")


class ContextParallelConfigError(ValueError):
    """A context-parallel setting is invalid; the message names the setting and the fix."""


def _is_count(value: object, minimum: int = 1) -> bool:
    """An integer >= `minimum` (a bool is not a count)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


@dataclass(frozen=True)
class MemorySavings:
    """The long-sequence memory savings (`memory.apply_memory_savings`), which work with and without context
    parallelism; the fields are `ContextParallelConfig`'s of the same names."""

    loss_chunk_size: int | None = None
    mlp_tile_size: int | None = None
    offload_activations: bool = False
    offload_attention_outputs: bool = False
    recompute_layers: int | None = None
    auto_recompute: bool = True

    def __post_init__(self) -> None:
        counts = (  # (field, what the count is, what None means)
            ("loss_chunk_size", "tokens; 0 = off", "auto"),
            ("mlp_tile_size", "tokens; 0 = off", "auto"),
            ("recompute_layers", "decoder layers to checkpoint; 0 = none", "every layer"),
        )
        for name, meaning, unset in counts:
            value = getattr(self, name)
            if value is not None and not _is_count(value, minimum=0):
                raise ContextParallelConfigError(
                    f"context_parallel_{name} must be an integer >= 0 ({meaning}) or None ({unset}), got {value!r}."
                )
        for name in ("offload_activations", "offload_attention_outputs", "auto_recompute"):
            if not isinstance(getattr(self, name), bool):
                raise ContextParallelConfigError(
                    f"context_parallel_{name} must be True or False, got {getattr(self, name)!r}."
                )
        if self.offload_attention_outputs and not self.offload_activations:
            raise ContextParallelConfigError(
                "context_parallel_offload_attention_outputs=True needs context_parallel_offload_activations=True."
            )


_SAVINGS = tuple(fields(MemorySavings))


@dataclass(frozen=True)
class ContextParallelSettings:
    """The settings of context parallelism proper (see `ContextParallelConfig` for the fields): what a mesh carries
    and every CP module reads."""

    size: int | None = None
    mode: str = DEFAULT_MODE
    ulysses_size: int | None = None
    heads_k_stride: int | None = None
    backend: str = "auto"
    balance: str = "tokens"

    def __post_init__(self) -> None:
        if self.size is not None and not _is_count(self.size):
            raise ContextParallelConfigError(
                f"context_parallel_size must be an integer >= 1 (got {self.size!r}); use 1 to turn context "
                "parallelism off."
            )
        if self.mode not in MODES:
            raise ContextParallelConfigError(
                f"context_parallel_mode={self.mode!r} is unknown; choose one of {', '.join(MODES)}."
            )
        if self.backend not in BACKENDS:
            raise ContextParallelConfigError(
                f"context_parallel_backend={self.backend!r} is unknown; choose one of {', '.join(BACKENDS)}."
            )
        if self.balance not in BALANCES:
            raise ContextParallelConfigError(
                f"context_parallel_balance={self.balance!r} is unknown; choose one of {', '.join(BALANCES)}."
            )
        if self.balance == "documents" and not self.spec.balances_documents:
            taking = ", ".join(name for name, mode in _REGISTRY.items() if mode.balances_documents)
            raise ContextParallelConfigError(
                f"context_parallel_balance='documents' balances the ring modes ({taking}); mode {self.mode!r} does "
                "not take it (ulysses and odysseus attend whole rows, which are balanced already; hybrid splits each "
                "chunk over its Ulysses group): leave context_parallel_balance='tokens' or pick one of those modes."
            )
        if self.heads_k_stride is not None and not _is_count(self.heads_k_stride):
            raise ContextParallelConfigError(
                f"context_parallel_heads_k_stride must be an integer >= 1 (got {self.heads_k_stride!r})."
            )
        if self.ulysses_size is not None and not _is_count(self.ulysses_size):
            raise ContextParallelConfigError(
                f"context_parallel_ulysses_size must be an integer >= 1 (got {self.ulysses_size!r})."
            )
        problem = self.spec.validate(self)
        if problem is not None:
            raise ContextParallelConfigError(problem)

    @property
    def enabled(self) -> bool:
        return self.size is None or self.size > 1

    def resolved(self, world_size: int) -> ContextParallelConfig:
        """The config with `size` filled in from the job's world size, checked against it."""
        size = world_size if self.size is None else self.size
        if world_size % size != 0:
            raise ContextParallelConfigError(
                f"context_parallel_size={size} must divide the number of processes ({world_size}); launch a "
                f"multiple of {size} processes or pick a size that divides {world_size}."
            )
        return replace(self, size=size)

    def with_auto_ulysses_size(self, heads: int, per_node: int | None) -> ContextParallelConfig:
        """For `hybrid` without a Ulysses degree: the config with the largest degree that divides the (resolved) size
        and the `heads` query heads (Ulysses splits query heads; fewer KV heads are replicated as far as needed, so
        they set no limit) and divides the `per_node` processes per node (CP ranks are adjacent, so each Ulysses
        group, whose all-to-all moves the most bytes, then stays inside one node). Other configs are returned as is."""
        if not self.picks_ulysses_degree:
            return self
        assert self.size is not None, "resolve the config against the world size first"
        fits = [d for d in range(1, self.size + 1) if self.size % d == 0 and heads % d == 0]
        return replace(self, ulysses_size=max(d for d in fits if per_node is None or per_node % d == 0))

    def kv_stride(self, kv_heads: int, few_rows: bool = False) -> int:
        """KV heads per llama3 all-gather for a model with `kv_heads` KV heads: `heads_k_stride`, else half of them
        (the second half gathered while the first is attended), or all at once when `few_rows` are gathered (the
        documents balance keeps most documents whole), where the overlap would hide little and halve every call."""
        if self.heads_k_stride is not None:
            return self.heads_k_stride
        if few_rows:
            return kv_heads
        return kv_heads // 2 if kv_heads % 2 == 0 else 1

    @property
    def spec(self) -> Mode:
        """The mode's registered description (`modes`): layout, degrees, checks and attention."""
        return _REGISTRY[self.mode]

    @property
    def ring_size(self) -> int:
        """Degree of the ring (P2P / all-gather) dimension."""
        assert self.size is not None, "resolve the config against the world size first"
        return self.spec.degrees(self)[0]

    @property
    def ulysses_degree(self) -> int:
        """Degree of the Ulysses (all-to-all) dimension."""
        assert self.size is not None, "resolve the config against the world size first"
        return self.spec.degrees(self)[1]

    @property
    def whole_rows(self) -> bool:
        """Whether each rank attends whole rows with its share of the heads (odysseus) instead of its sequence shard."""
        return self.spec.whole_rows

    @property
    def combines_ulysses_and_ring(self) -> bool:
        """Whether the mode's Ulysses degree is a setting of its own beside the ring (hybrid)."""
        return self.spec.combines_ulysses_and_ring

    @property
    def picks_ulysses_degree(self) -> bool:
        """Whether the Ulysses degree is left to the model's heads (`with_auto_ulysses_size`)."""
        return self.spec.picks_ulysses_degree(self)

    @property
    def layout(self) -> str:
        """Sequence layout the mode runs on: `contiguous` or `zigzag` (causal work balanced across the ring)."""
        return self.spec.layout


@dataclass(frozen=True)
class ContextParallelConfig(MemorySavings, ContextParallelSettings):
    """Settings of context parallelism.

    Args:
        size: ranks that share one sequence (1 = off). `None` means every rank of the job.
        mode: `ring` (contiguous shards, KV passed around a ring), `zigzag` (ring on the balanced 2N-chunk layout),
            `llama3` (KV all-gathered `heads_k_stride` heads at a time, on the zigzag layout), `ulysses` (all-to-all
            between sequence and head shards), `hybrid` (Ulysses inside groups of `ulysses_size`, zigzag ring across)
            or `odysseus` (attention projections split by heads over the group around an all-gather / reduce-scatter
            of the sequence, MLP on the sequence shard; see `odysseus.py`).
        ulysses_size: for `hybrid`, the Ulysses degree; `size // ulysses_size` is the ring degree. `None` chooses the
            largest degree that divides `size` and the model's attention heads and keeps each Ulysses group inside
            one node, when the model is known (`apply_context_parallel`, the Trainer).
        heads_k_stride: for `llama3`, how many KV heads are all-gathered at a time (must divide the KV heads);
            `None` gathers half of them at a time, so that the second gather overlaps the first half's attention.
        backend: local attention kernel: `torch` (PyTorch's fused ops, exact math on CPU), `flash_attn`
            (flash-attn, when installed) or `auto` (flash_attn when installed and on CUDA, else torch).
        balance: how the ring modes (those whose `Mode.balances_documents`: `ring`, `zigzag`, `llama3`) split a
            packed row: `tokens` (the mode's layout: equal token ranges) or `documents` (equal tokens and equal causal
            work per rank, following the row's documents: long documents are zigzagged alone, short ones go whole to
            one rank, and ring steps that hold no pairs are skipped; see `balance.py`).
        loss_chunk_size: tokens per chunk of the LM head + cross-entropy, which then never forms the full logits
            (0 = off; `None` = auto: chunks of 2^28 logits whenever a micro-batch's logits are larger). Saves the
            logits and their gradient: tokens × vocabulary × about 12 bytes, 0.96 TB for 500k tokens of a 152k
            vocabulary.
        mlp_tile_size: tokens per tile of each decoder layer's MLP, recomputed per tile in backward (0 = off;
            `None` = auto: tiles of 8192 tokens above 32768 tokens). Saves the MLP's intermediate activations,
            tokens × intermediate size × about 8 bytes per layer; costs one more MLP forward per layer.
        offload_activations: under activation checkpointing, keep each decoder layer's input in pinned host memory
            until its recomputation, copied on a side stream. Saves layers × tokens × hidden × 2 bytes of device
            memory (45 GB for 500k tokens of the 1.5B shape) for as much pinned host memory.
        offload_attention_outputs: with `offload_activations`, also keep in pinned host memory the attention outputs
            that context parallelism keeps for the recomputation (as large as the layer inputs).
        recompute_layers: under activation checkpointing, checkpoint only the first n decoder layers in model order
            (0 = none; `None` = every layer, as transformers does; n at or above the number of layers = every layer).
            Each layer left out keeps its activations until backward, about tokens × (a few × hidden + 4 ×
            intermediate) × 2 bytes in bf16 (without the intermediate part under the tiled MLP), and saves one forward
            of the layer in backward. No effect without activation checkpointing.
        auto_recompute: under activation checkpointing with `recompute_layers` unset, choose after the first step how
            many layers to recompute from the device memory left free and what each layer was measured to keep in
            step 1, and look again after step 2 at the memory that step really left (CUDA; elsewhere every layer
            stays recomputed). On by default; False recomputes every layer. See `auto_recompute.py`.

    The first six fields are the CP settings (`ContextParallelSettings`, what a mesh carries), the others the memory
    savings, handed on as `memory_savings` (`MemorySavings`, what `memory.apply_memory_savings` installs).
    """

    def __post_init__(self) -> None:
        ContextParallelSettings.__post_init__(self)
        MemorySavings.__post_init__(self)

    @property
    def memory_savings(self) -> MemorySavings:
        """The memory-saving fields as their own object (what `memory.apply_memory_savings` installs)."""
        return MemorySavings(**{f.name: getattr(self, f.name) for f in _SAVINGS})

    def without_memory_savings(self) -> ContextParallelConfig:
        """The CP settings alone (memory savings at their defaults): what a mesh carries."""
        return replace(self, **{f.name: f.default for f in _SAVINGS})
