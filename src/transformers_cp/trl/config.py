"""TRL's configs with the `context_parallel_*` fields of `transformers_cp.TrainingArguments` (same fields, same
checks, before any process group starts)."""

from __future__ import annotations

from dataclasses import dataclass

import trl

from ..training_args import ContextParallelArguments


@dataclass
class SFTConfig(ContextParallelArguments, trl.SFTConfig):
    """TRL's `SFTConfig` with context parallelism (off while `context_parallel_size` is 1)."""


@dataclass
class DPOConfig(ContextParallelArguments, trl.DPOConfig):
    """TRL's `DPOConfig` with context parallelism (off while `context_parallel_size` is 1)."""
