"""Automatic partial recomputation: after the first optimizer step, recompute fewer decoder layers where the device
has room for their activations.

The long-sequence savings (CP shards, chunked loss, tiled MLP) leave most of a GPU free under the default activation
checkpointing of every layer (21.7 GiB of 141 at the 1.5B shape and 64k tokens on two H200s), while each layer that is
not recomputed saves one forward of it in backward. After step 1 the peak memory of a full step is known: the
headroom left below `RESERVE` of the device, taken as the smallest over all ranks, buys as many layers' activations as
it fits (`choose_recompute_layers`), estimated per layer as tokens × (10 × hidden + 4 × intermediate) × the
activation's element size (without the intermediate part where the MLP is tiled). That is what was measured: 3.04 GiB
per layer for 32k tokens per rank at the 1.5B shape, and the estimate gives 3.1. Then `recompute.apply_partial_recompute`
turns checkpointing off on the last layers. The math is the same either way (a recomputation gives what the first
forward computed), so losses and weights do not change.

It acts only where activation checkpointing is on, the run has not chosen `context_parallel_recompute_layers`, the
device reports its memory (CUDA), and `context_parallel_auto_recompute` is on; elsewhere (CPU) it keeps the
configured choice. The decision is logged.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import transformers

from .config import MemorySavings
from .model_info import text_config
from .recompute import apply_partial_recompute, checkpointable_layers
from .tiled_mlp import AUTO_MIN_TOKENS

logger = transformers.utils.logging.get_logger(f"transformers.{__name__}")

RESERVE = 0.9
"""Fraction of the device's memory the run may fill (the rest absorbs fragmentation and rows longer than step 1's)."""
MARGIN = 1.25
"""Factor on the per-layer estimate, for what it leaves out (norms' float32 copies, the allocator's rounding)."""


def choose_recompute_layers(layers: int, checkpointed: int, headroom: int, per_layer: int) -> int:
    """How many of the first decoder layers to keep checkpointed: `checkpointed` now, fewer by as many layers' kept
    activations (`per_layer` bytes each) as `headroom` bytes hold; never more than now, never below 0."""
    if per_layer <= 0 or headroom <= 0:
        return min(checkpointed, layers)
    return max(0, min(checkpointed, layers) - headroom // per_layer)


def layer_activation_bytes(model: torch.nn.Module, tokens: int, element_size: int, mlp_tiled: bool) -> int:
    """Estimated bytes a decoder layer keeps for backward when it is not checkpointed, for `tokens` tokens."""
    config = text_config(model)
    hidden = int(getattr(config, "hidden_size", 0))
    intermediate = 0 if mlp_tiled else int(getattr(config, "intermediate_size", 0) or 0)
    return int(tokens * (10 * hidden + 4 * intermediate) * element_size * MARGIN)


def device_headroom() -> int | None:
    """Bytes between this process's peak reserved memory and `RESERVE` of the device, or None where the device does
    not report its memory (CPU)."""
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    return int(total * RESERVE) - torch.cuda.max_memory_reserved()


class AutoRecompute(transformers.TrainerCallback):
    """Counts the longest micro-batch of step 1 (a forward pre-hook), then decides after it (see the module)."""

    def __init__(self, config: MemorySavings | None) -> None:
        self.config = config
        self.tokens = 0
        self.element_size = 2
        self.hook = None
        self.chosen: int | None = None

    def wanted(self, args) -> bool:
        config = self.config
        return (
            config is not None
            and config.auto_recompute
            and config.recompute_layers is None
            and bool(args.gradient_checkpointing)
        )

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.wanted(args) and model is not None and self.hook is None and state.global_step == 0:
            self.hook = model.register_forward_pre_hook(self._count, with_kwargs=True)

    def _count(self, module, args, kwargs) -> None:
        inputs = kwargs.get("input_ids", args[0] if args else None)
        inputs = inputs if inputs is not None else kwargs.get("inputs_embeds")
        if inputs is not None and module.training:
            self.tokens = max(self.tokens, inputs.shape[0] * inputs.shape[1])
            floating = [p for p in module.parameters() if p.is_floating_point()]
            self.element_size = floating[0].element_size() if floating else 2
            if torch.is_autocast_enabled():
                self.element_size = 2

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.hook is None:
            return
        self.hook.remove()
        self.hook = None
        headroom = device_headroom()
        if headroom is None or model is None:
            return
        if dist.is_initialized():  # every rank takes the same decision: the tightest rank's
            value = torch.tensor([headroom], dtype=torch.int64, device=args.device)
            dist.all_reduce(value, op=dist.ReduceOp.MIN)
            headroom = int(value.item())
        layers = checkpointable_layers(model)
        checkpointed = sum(bool(getattr(layer, "gradient_checkpointing", False)) for layer in layers)
        tile = self.config.mlp_tile_size
        mlp_tiled = tile != 0 and self.tokens > (tile if tile is not None else AUTO_MIN_TOKENS)
        per_layer = layer_activation_bytes(model, self.tokens, self.element_size, mlp_tiled)
        self.chosen = choose_recompute_layers(len(layers), checkpointed, headroom, per_layer)
        if self.chosen < checkpointed:
            apply_partial_recompute(model, self.chosen)
        if args.process_index == 0:
            logger.warning(
                f"context_parallel_auto_recompute: {headroom / 2**30:.1f} GiB free after step 1 at "
                f"{per_layer / 2**30:.2f} GiB per decoder layer ({self.tokens} tokens per micro-batch): recomputing "
                f"{self.chosen} of {len(layers)} layers from now on (context_parallel_auto_recompute=False keeps all)."
            )
