"""transformers_cp: context parallelism for Hugging Face causal LMs.

Names are resolved lazily so that `import transformers_cp` stays light and soft dependencies stay untouched.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_EXPORTS = {
    "ContextParallelConfig": "config",
    "ContextParallelConfigError": "config",
    "Layout": "layout",
    "ContextParallelMesh": "mesh",
    "build_mesh": "mesh",
    "context_parallel_attention": "attention",
    "apply_context_parallel": "modeling",
    "remove_context_parallel": "modeling",
    "enable_context_parallel": "integration",
    "context_parallel_mesh": "modeling",
    "Trainer": "trainer",
    "ContextParallelTrainerMixin": "trainer",
    "TrainingArguments": "training_args",
    "ContextParallelCollator": "collator",
    "ContextParallelSampler": "sampler",
    "shard_batch": "sharding",
    "gather_sequence": "sharding",
    "count_label_tokens": "loss",
    "context_parallel_loss": "loss",
    "reduce_loss_for_logging": "loss",
}

__all__ = [
    "ContextParallelCollator",
    "ContextParallelConfig",
    "ContextParallelConfigError",
    "ContextParallelMesh",
    "ContextParallelSampler",
    "ContextParallelTrainerMixin",
    "Layout",
    "Trainer",
    "TrainingArguments",
    "apply_context_parallel",
    "build_mesh",
    "context_parallel_attention",
    "context_parallel_loss",
    "context_parallel_mesh",
    "count_label_tokens",
    "enable_context_parallel",
    "gather_sequence",
    "reduce_loss_for_logging",
    "remove_context_parallel",
    "shard_batch",
]

if TYPE_CHECKING:
    from .attention import context_parallel_attention
    from .collator import ContextParallelCollator
    from .config import ContextParallelConfig, ContextParallelConfigError
    from .integration import enable_context_parallel
    from .layout import Layout
    from .loss import context_parallel_loss, count_label_tokens, reduce_loss_for_logging
    from .mesh import ContextParallelMesh, build_mesh
    from .modeling import apply_context_parallel, context_parallel_mesh, remove_context_parallel
    from .sampler import ContextParallelSampler
    from .sharding import gather_sequence, shard_batch
    from .trainer import ContextParallelTrainerMixin, Trainer
    from .training_args import TrainingArguments


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
