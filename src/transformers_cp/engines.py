"""Context parallelism on the training engines: DDP, FSDP2 (through accelerate) and DeepSpeed ZeRO-1/2/3.

Why the gradients are exact on each engine. `loss.py` gives rank r of CP group g the loss ℓ_r = c·k·S_r/N, chosen so
that the AVERAGE of ∇ℓ_r over all c·d processes is the stock Trainer's gradient on d processes. Each engine must
therefore average gradients over every process of the job, CP ranks included, and nothing else:

- DDP: all-reduces gradients over the default (world) group and divides by its size c·d.
- FSDP2 (`fsdp_config={"version": 2}`): with no accelerate `ParallelismConfig`, accelerate calls `fully_shard` with
  the default mesh, i.e. the whole world, so every one of the c·d ranks holds a parameter shard (memory falls with
  c·d, not d) and the reduce-scatter averages over c·d. Data still go over the d dp ranks only (`sampler.py`).
- DeepSpeed ZeRO-1/2/3 (with or without CPU offload): with no model-parallel unit and no DeepSpeed sequence
  parallelism, DeepSpeed's data-parallel group is the world, and its gradient reduction (all-reduce for ZeRO-1/2,
  reduce-scatter for ZeRO-3) divides by c·d. The Trainer passes `scale_wrt_gas=False`, so DeepSpeed does not divide
  by the accumulation steps a second time (ℓ_r already holds the step's token count N).

A second sequence-parallel or tensor-parallel layer would shrink the averaging group below c·d (or split the batch a
second time): `check_engine_support` rejects those settings before any process group exists.

DeepSpeed's optimizer checkpoints pickle a few DeepSpeed classes. Since torch 2.6 `torch.load` defaults to
`weights_only=True`, which refuses them; `deepspeed_checkpoint_loading` allows exactly those classes for the duration
of one load (`torch.serialization.safe_globals`), never switching the check off for the process.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import json
import os
import sys
from collections.abc import Iterator
from typing import Any

from .config import ContextParallelConfigError

# The non-tensor classes in DeepSpeed ZeRO-1/2/3 checkpoints (optimizer partitions), as torch reports them with
# `torch.serialization.get_unsafe_globals_in_checkpoint` on checkpoints written by the Trainer (tests/test_engines.py).
DEEPSPEED_CHECKPOINT_GLOBALS = (
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.utils.tensor_fragment.fragment_address",
)


def deepspeed_checkpoint_globals() -> list[Any]:
    """The objects of `DEEPSPEED_CHECKPOINT_GLOBALS` (DeepSpeed must be installed)."""
    objects = []
    for path in DEEPSPEED_CHECKPOINT_GLOBALS:
        module, name = path.rsplit(".", 1)
        objects.append(getattr(importlib.import_module(module), name))
    return objects


@contextlib.contextmanager
def deepspeed_checkpoint_loading() -> Iterator[None]:
    """Allow DeepSpeed's checkpoint classes in `torch.load(weights_only=True)` inside this block only."""
    import torch

    with torch.serialization.safe_globals(deepspeed_checkpoint_globals()):
        yield


def scope_checkpoint_loads(engine: Any) -> Any:
    """Make `engine.load_checkpoint` (a DeepSpeed engine's) run inside `deepspeed_checkpoint_loading`. Idempotent."""
    load = engine.load_checkpoint
    if getattr(load, "_context_parallel_scoped", False):
        return engine

    @functools.wraps(load)
    def scoped_load(*args: Any, **kwargs: Any) -> Any:
        with deepspeed_checkpoint_loading():
            return load(*args, **kwargs)

    scoped_load._context_parallel_scoped = True
    engine.load_checkpoint = scoped_load
    return engine


def is_deepspeed_engine(model: Any) -> bool:
    deepspeed = sys.modules.get("deepspeed")  # never imported here: only an imported DeepSpeed can have built one
    return deepspeed is not None and isinstance(model, deepspeed.DeepSpeedEngine)


# ---- validation before training ------------------------------------------------------------------------------------


def _deepspeed_config(args: Any) -> dict | None:
    """The DeepSpeed config of `TrainingArguments(deepspeed=...)` or of an accelerate config, as a dict."""
    source = getattr(args, "deepspeed", None)
    if source is None and os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        source = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if source is None or isinstance(source, dict):
        return source
    if isinstance(source, str) and os.path.isfile(source):
        with open(source) as f:
            return json.load(f)
    return None  # a config object or an unreadable path: DeepSpeed validates it itself


def _positive(value: Any) -> int:
    return value if isinstance(value, int) else 1


def check_engine_support(args: Any) -> None:
    """Reject engine settings that would average gradients over fewer than all ranks, or split sequences twice.

    Called by `TrainingArguments` when `context_parallel_size > 1`, on every rank before any process group exists.
    """
    parallelism = getattr(args, "parallelism_config", None)
    if parallelism is not None:
        sizes = {name: _positive(getattr(parallelism, f"{name}_size", 1)) for name in ("cp", "sp", "tp")}
        used = {name: size for name, size in sizes.items() if size > 1}
        if used:
            fields = ", ".join(f"parallelism_config.{name}_size={size}" for name, size in used.items())
            raise ContextParallelConfigError(
                f"{fields} (accelerate's own sequence or tensor splitting) cannot be combined with "
                "context_parallel_size > 1: both would split the sequence (or the weights) and the loss scaling "
                "assumes gradients averaged over every rank; use one of them: drop parallelism_config (FSDP2 then "
                "shards over all ranks) or set context_parallel_size=1."
            )
    config = _deepspeed_config(args)
    if config is None:
        return
    sequence_parallel = _positive(config.get("sequence_parallel_size", 1))
    if sequence_parallel > 1:
        raise ContextParallelConfigError(
            f"context_parallel_size > 1 cannot be combined with DeepSpeed's sequence_parallel_size="
            f"{sequence_parallel} (DeepSpeed Ulysses): it would split each sequence a second time and shrink the "
            "gradient-averaging group. Remove sequence_parallel_size from the DeepSpeed config."
        )
    tensor_parallel = _positive(config.get("tensor_parallel", {}).get("autotp_size", 1))
    if tensor_parallel > 1:
        raise ContextParallelConfigError(
            f"context_parallel_size > 1 cannot be combined with DeepSpeed's tensor_parallel.autotp_size="
            f"{tensor_parallel}: the loss scaling assumes gradients averaged over every rank. Remove autotp_size."
        )
