"""Automatic partial recomputation: after the first optimizer steps, recompute fewer decoder layers where the device
has room for their activations.

The long-sequence savings (CP shards, chunked loss, tiled MLP) leave most of a GPU free under the default activation
checkpointing of every layer (21.7 GiB of 141 at the 1.5B shape and 64k tokens on two H200s), while each layer that is
not recomputed saves one forward of it in backward. Step 1 measures both sides: the peak memory of a full step, and
what each decoder layer keeps for backward, read as the device memory its forward leaves allocated when it runs with
autograd recording (the recomputation in backward, which keeps exactly what an uncheckpointed forward keeps). The
headroom left below `RESERVE` of the device, the smallest over all ranks, then buys the last layers whose kept bytes
(the largest over all ranks, times `MARGIN`) fit (`choose_recompute_layers`), and `recompute.apply_partial_recompute`
turns checkpointing off on them. After step 2, which ran with that choice, the same rule looks again at the headroom
that step really left (the margin and the measurement are upper bounds, so room often remains) and may leave more
layers out; it never puts one back. Measured, not estimated, so it holds for any layer: attention, MoE, or a hybrid's
recurrent mixers, whose kept tensors no formula of the widths gives. The math is the same either way (a
recomputation gives what the first forward computed), so losses and weights do not change.

It acts where activation checkpointing is on, the run has not chosen `context_parallel_recompute_layers`, the device
reports its memory (CUDA), and `context_parallel_auto_recompute` is on (the default); elsewhere (CPU) it keeps the
configured choice and changes nothing in step 1. Each decision is logged.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.distributed as dist
import torch.utils.checkpoint
import transformers

from .config import MemorySavings
from .recompute import apply_partial_recompute, checkpointable_layers

logger = transformers.utils.logging.get_logger(f"transformers.{__name__}")

RESERVE = 0.9
"""Fraction of the device's memory the run may fill (the rest absorbs fragmentation and rows longer than step 1's)."""
MARGIN = 1.25
"""Factor on each layer's measured kept bytes, for the allocator's rounding and blocks split by later steps."""


def choose_recompute_layers(checkpointed: int, headroom: int, per_layer: list[int]) -> int:
    """How many of the first decoder layers to keep checkpointed: `checkpointed` now (at most the layers), fewer by as
    many of the last of them as `headroom` bytes hold, layer i keeping `per_layer[i]` bytes; never more than now, and
    nothing changes where a layer's bytes are unknown (0)."""
    n = min(checkpointed, len(per_layer))
    if headroom <= 0 or any(b <= 0 for b in per_layer[:n]):
        return n
    while n > 0 and per_layer[n - 1] <= headroom:
        headroom -= per_layer[n - 1]
        n -= 1
    return n


def allocated_bytes() -> int | None:
    """Device memory held by tensors now, or None where the device does not report it (CPU)."""
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    return torch.cuda.memory_allocated()


def device_headroom() -> int | None:
    """Bytes between this process's peak reserved memory and `RESERVE` of the device, or None where the device does
    not report its memory (CPU)."""
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    return int(total * RESERVE) - torch.cuda.max_memory_reserved()


class AutoRecompute(transformers.TrainerCallback):
    """Measures each decoder layer's kept bytes in step 1 (around what it checkpoints), then decides after it (see the
    module)."""

    def __init__(self, config: MemorySavings | None) -> None:
        self.config = config
        self.kept: dict[int, int] = {}  # layer index -> the most its forward left allocated with autograd recording
        self._wrapped: list[tuple[torch.nn.Module, object]] = []  # (layer, its own checkpointing function)
        self.hooks: list = []
        self._whole = contextlib.nullcontext()  # step 1: checkpointing without its early stop
        self.chosen: int | None = None  # the decoder layers checkpointed from the last decision on
        self.second_look = False  # after step 2: decide again from the headroom step 2 left

    def wanted(self, args) -> bool:
        config = self.config
        return (
            config is not None
            and config.auto_recompute
            and config.recompute_layers is None
            and bool(args.gradient_checkpointing)
        )

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        measurable = device_headroom() is not None
        if self.wanted(args) and measurable and model is not None and not self.hooks and state.global_step == 0:
            # step 1's recomputations run whole, so that each layer's checkpointed function returns with what it
            # keeps allocated; by default non-reentrant checkpointing stops at the last tensor backward needs
            self._whole = torch.utils.checkpoint.set_checkpoint_early_stop(False)
            self._whole.__enter__()
            self.hooks.append(model.register_forward_pre_hook(self._measure_layers))

    def _measure_layers(self, model, args) -> None:
        """At step 1's first forward, when checkpointing is on: wrap what each layer checkpoints in a measurement.
        (transformers checkpoints a layer's `forward`, not its `__call__`, so module hooks never see the
        recomputation.)"""
        if self._wrapped:
            return
        for i, layer in enumerate(checkpointable_layers(model)):
            if (func := getattr(layer, "_gradient_checkpointing_func", None)) is not None:
                self._wrapped.append((layer, func))
                layer._gradient_checkpointing_func = functools.partial(self._checkpoint, i, func)

    def _checkpoint(self, index: int, func, fn, *args, **kwargs):
        return func(functools.partial(self._measured, index, fn), *args, **kwargs)

    def _measured(self, index: int, fn, *args, **kwargs):
        start = allocated_bytes()
        out = fn(*args, **kwargs)
        if start is not None and torch.is_grad_enabled():
            self.kept[index] = max(self.kept.get(index, 0), allocated_bytes() - start)
        return out

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.hooks:
            self._stop_measuring()
            self.second_look = self._decide(args, model, after="step 1")
        elif self.second_look:
            self.second_look = False
            self._decide(args, model, after="step 2")

    def _stop_measuring(self) -> None:
        for hook in self.hooks:
            hook.remove()
        self.hooks = []
        for layer, func in self._wrapped:
            layer._gradient_checkpointing_func = func
        self._wrapped = []
        self._whole.__exit__(None, None, None)

    def _decide(self, args, model, after: str) -> bool:
        """Leave out of checkpointing as many of the last layers as the headroom now holds; whether it decided."""
        headroom = device_headroom()
        if headroom is None or model is None:
            return False
        layers = checkpointable_layers(model)
        kept = [self.kept.get(i, 0) for i in range(len(layers))]
        if dist.is_initialized():  # every rank takes the same decision: the tightest rank's
            values = torch.tensor([-headroom, *kept], dtype=torch.int64, device=args.device)
            dist.all_reduce(values, op=dist.ReduceOp.MAX)
            headroom, kept = -int(values[0].item()), [int(b) for b in values[1:].tolist()]
        if self.chosen is None:
            checkpointed = sum(bool(getattr(layer, "gradient_checkpointing", False)) for layer in layers)
        else:  # the flags change at the next forward (`recompute`): the last decision is what holds
            checkpointed = self.chosen
        per_layer = [int(b * MARGIN) for b in kept]
        chosen = choose_recompute_layers(checkpointed, headroom, per_layer)
        changed = chosen < checkpointed
        if changed:
            apply_partial_recompute(model, chosen)
        self.chosen = chosen
        if args.process_index == 0 and (changed or after == "step 1"):
            measured = [b for b in kept if b > 0]
            sizes = f"{min(measured) / 2**30:.2f}–{max(measured) / 2**30:.2f}" if measured else "unmeasured"
            logger.warning(
                f"context_parallel_auto_recompute: {headroom / 2**30:.1f} GiB free after {after}, decoder layers "
                f"keep {sizes} GiB each (measured in step 1): recomputing {chosen} of {len(layers)} layers from now "
                "on (context_parallel_auto_recompute=False recomputes all)."
            )
        return True
