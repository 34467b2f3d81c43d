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


class _ReplicaCount:
    """TRL's GRPO and RLOO configs size the generation batch (`generation_batch_size`, `steps_per_generation`) and
    check the eval batch against `world_size` in `__post_init__`. Under CP the c ranks of a group train on one batch,
    so there `world_size` counts the data-parallel replicas (world / c), as the trainers' process count does."""

    _counting_replicas = False

    def __post_init__(self) -> None:
        if self.context_parallel_size != 1:
            for flag in ("use_vllm", "use_transformers_continuous_batching"):
                if getattr(self, flag, False):
                    raise ValueError(
                        f"{flag}=True is not supported with context_parallel_size={self.context_parallel_size}: under "
                        "context parallelism the completions are generated with the policy's own attention by "
                        "`model.generate` on every rank of a CP group (rank 0's completions are kept), and scored "
                        f"under CP; set {flag}=False (vLLM generation, server or colocate, is not supported yet)."
                    )
        self._counting_replicas = True
        try:
            super().__post_init__()
        finally:
            self._counting_replicas = False

    @property
    def world_size(self) -> int:
        world = super().world_size
        size = self.context_parallel_size or world
        return world // size if self._counting_replicas and world % size == 0 else world


@dataclass
class GRPOConfig(_ReplicaCount, ContextParallelArguments, trl.GRPOConfig):
    """TRL's `GRPOConfig` with context parallelism (off while `context_parallel_size` is 1)."""


@dataclass
class RLOOConfig(_ReplicaCount, ContextParallelArguments, trl.RLOOConfig):
    """TRL's `RLOOConfig` with context parallelism (off while `context_parallel_size` is 1)."""
