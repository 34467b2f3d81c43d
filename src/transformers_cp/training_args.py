"""`TrainingArguments`: transformers' arguments plus the `context_parallel_*` fields that build a
`ContextParallelConfig`. The fields and their checks live in `ContextParallelArguments`, a dataclass mixin that any
`transformers.TrainingArguments` subclass can take (TRL's configs do, in `transformers_cp.trl`).

Every field is validated at construction, on every rank and before any process group exists, so a bad setting fails
with the same clear message everywhere instead of hanging in a collective. The size is checked against the number of
processes where the Trainer (or the mesh) is built, so arguments can be made and saved in a single process (a login
node, a notebook, a config tool).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import transformers

from .config import BACKENDS, BALANCES, DEFAULT_MODE, MODES, ContextParallelConfig, ContextParallelConfigError
from .engines import check_engine_support

# transformers 5.23 renamed `gradient_checkpointing` to `activation_checkpointing` (the old name is a deprecated alias);
# messages name the flag the installed version takes.
CHECKPOINTING_FLAG = (
    "activation_checkpointing"
    if "activation_checkpointing" in {f.name for f in dataclasses.fields(transformers.TrainingArguments)}
    else "gradient_checkpointing"
)


@dataclass
class ContextParallelArguments:
    """The `context_parallel_*` fields and their validation: `class Args(ContextParallelArguments, HfArgs)`."""

    context_parallel_size: int = field(
        default=1,
        metadata={
            "help": "Ranks that share one packed sequence (1 = off). Must divide the number of processes; the rest "
            "is data parallelism."
        },
    )
    context_parallel_mode: str = field(
        default=DEFAULT_MODE,
        metadata={
            "help": "ring (contiguous shards), zigzag (load-balanced ring), llama3 (all-gathered KV), ulysses "
            "(all-to-all over heads), hybrid (Ulysses inside, zigzag ring across) or odysseus (attention heads split "
            "around an all-gather / reduce-scatter of the sequence).",
            "choices": list(MODES),
        },
    )
    context_parallel_ulysses_size: int | None = field(
        default=None,
        metadata={"help": "For context_parallel_mode=hybrid: the Ulysses degree (the rest is the ring degree)."},
    )
    context_parallel_heads_k_stride: int | None = field(
        default=None,
        metadata={
            "help": "For context_parallel_mode=llama3: key/value heads all-gathered at a time (default: half of them, "
            "so the second gather overlaps the first half's attention)."
        },
    )
    context_parallel_backend: str = field(
        default="auto",
        metadata={
            "help": "Local attention kernel: torch, flash_attn, or auto (flash_attn when installed on CUDA).",
            "choices": list(BACKENDS),
        },
    )
    context_parallel_loss_chunk_size: int | None = field(
        default=None,
        metadata={
            "help": "Tokens per chunk of the LM head + cross-entropy, so the full logits are never formed (0 = off; "
            "unset = auto: on whenever a micro-batch's logits exceed 2^28 elements). Works without CP too."
        },
    )
    context_parallel_mlp_tile_size: int | None = field(
        default=None,
        metadata={
            "help": "Tokens per tile of each decoder MLP, recomputed per tile in backward (0 = off; unset = auto: "
            "8192-token tiles above 32768 tokens). Works without CP too."
        },
    )
    context_parallel_offload_activations: bool = field(
        default=False,
        metadata={
            "help": f"With {CHECKPOINTING_FLAG}: keep each decoder layer's checkpointed input in pinned host memory "
            "until backward, copied on a side stream. Works without CP too."
        },
    )

    context_parallel_offload_attention_outputs: bool = field(
        default=False,
        metadata={
            "help": "With context_parallel_offload_activations: also keep in host memory the attention outputs that "
            "context parallelism keeps for the recomputation (as large as the layer inputs)."
        },
    )
    context_parallel_recompute_layers: int | None = field(
        default=None,
        metadata={
            "help": f"With {CHECKPOINTING_FLAG}: checkpoint only the first N decoder layers (0 = none; unset = all); "
            "the others keep their activations and are not recomputed in backward. Works without CP too."
        },
    )
    context_parallel_auto_recompute: bool = field(
        default=True,
        metadata={
            "help": f"With {CHECKPOINTING_FLAG} and context_parallel_recompute_layers unset: after the first step, "
            "recompute only as many decoder layers as the free device memory requires (CUDA; logged), from what "
            "each layer was measured to keep in step 1, and again after step 2. False recomputes every layer. Works "
            "without CP too."
        },
    )
    context_parallel_balance: str = field(
        default="tokens",
        metadata={
            "help": "How ring, zigzag and llama3 split a packed row: 'tokens' (equal token ranges) or 'documents' "
            "(equal tokens and equal causal work per rank, following the row's documents).",
            "choices": list(BALANCES),
        },
    )

    def __post_init__(self) -> None:
        check_arguments(self)
        super().__post_init__()  # this starts the process group: every check comes first

    @property
    def context_parallel_config(self) -> ContextParallelConfig:
        """The `ContextParallelConfig` these arguments describe (validated on construction)."""
        return arguments_config(self)


def arguments_config(args: Any) -> ContextParallelConfig | None:
    """The `ContextParallelConfig` that the `context_parallel_*` fields of `args` describe: those of this module's
    arguments, or of transformers' own `TrainingArguments` with the upstream patch (`integration.py`); None for
    arguments without the fields."""
    if not hasattr(args, "context_parallel_size"):
        return None
    names = (f.name for f in dataclasses.fields(ContextParallelConfig))
    return ContextParallelConfig(**{name: getattr(args, f"context_parallel_{name}") for name in names})


def check_arguments(args: Any) -> None:
    """Every check of the `context_parallel_*` settings of `args` (training arguments that have the fields), raising
    `ContextParallelConfigError`: pure, so that it runs on every rank before any process group exists. The size is
    checked against the job where the Trainer or the mesh is built (`mesh.job_config`), so that arguments can be made
    and saved in a single process."""
    config = arguments_config(args)  # raises ContextParallelConfigError on a bad field
    checkpointing = getattr(args, "gradient_checkpointing", False) or getattr(args, "activation_checkpointing", False)
    if config.offload_activations and not checkpointing:
        raise ContextParallelConfigError(
            "context_parallel_offload_activations=True offloads the inputs of checkpointed layers; set "
            f"{CHECKPOINTING_FLAG}=True too."
        )
    if config.enabled:
        _check_support(args)


def _check_support(args: Any) -> None:
    """Reject the settings that context parallelism cannot honour exactly."""
    check_engine_support(args)
    if args.label_smoothing_factor:
        raise ContextParallelConfigError(
            f"label_smoothing_factor={args.label_smoothing_factor} is not supported with context_parallel_size > 1 "
            "(the label smoother shifts labels itself, which a sequence shard cannot); set it to 0."
        )
    if args.train_sampling_strategy == "batch_rebalance":
        raise ContextParallelConfigError(
            "train_sampling_strategy='batch_rebalance' is not supported with context_parallel_size > 1 (it splits "
            "batches over all processes itself); use 'random', 'sequential' or 'group_by_length'."
        )
    if getattr(args, "neftune_noise_alpha", None):
        raise ContextParallelConfigError(
            f"neftune_noise_alpha={args.neftune_noise_alpha} is not supported with context_parallel_size > 1 (its "
            "noise is scaled by the sequence length, which a rank sees only a shard of); leave it unset."
        )


@dataclass
class TrainingArguments(ContextParallelArguments, transformers.TrainingArguments):
    """transformers' `TrainingArguments` with context parallelism (off while `context_parallel_size` is 1)."""
