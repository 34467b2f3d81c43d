"""Which decoder layers activation checkpointing recomputes, and partial recomputation: only the first `n` of them.

transformers checkpoints each decoder layer (its `GradientCheckpointingLayer`s) whose `gradient_checkpointing` flag
`gradient_checkpointing_enable()` set: the layer keeps only its input, and backward runs its forward again to rebuild
the rest. When the other savings leave device memory free, that recomputation is time spent for nothing. Partial
recomputation keeps the flag on for the first `n` layers in model order only: the others keep their activations (about
tokens × (a few × hidden + 4 × intermediate) × 2 bytes each in bf16; with the tiled MLP the intermediate part is not
kept, its tiles recompute it anyway) and skip one forward of the layer in backward. The math is the same either way:
a recomputation gives exactly what the first forward computed.

Whoever enables checkpointing sets the flags (the HF Trainer does at the start of `train()`, after the model was set
up), so a pre-forward stage (`changes.STAGES`: before the chunked loss, activation offload and context parallelism,
which read the flags in theirs) turns the flag off on layers n, n+1, ... at each forward and remembers which it turned
off.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from . import changes

NAME = "recompute"


def checkpointable_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The layers transformers can checkpoint (its `GradientCheckpointingLayer`s: the decoder layers), in model
    order."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [module for module in model.modules() if isinstance(module, GradientCheckpointingLayer)]


def is_checkpointed(layer: torch.nn.Module) -> bool:
    """Whether `layer`'s next forward is checkpointed (recomputed in backward), as transformers decides it."""
    return layer.training and bool(getattr(layer, "gradient_checkpointing", False))


@dataclass
class PartialRecompute:
    """What `apply_partial_recompute` installed: the number of layers left checkpointed and the layers whose flag it
    turned off."""

    layers: int
    turned_off: set = field(default_factory=set)


def apply_partial_recompute(model: torch.nn.Module, layers: int) -> torch.nn.Module:
    """Under activation checkpointing, checkpoint only the first `layers` decoder layers of `model` (0: none; as many
    as the model has or more: all, as without this). No effect while checkpointing is off. Undone by
    `remove_partial_recompute`."""
    remove_partial_recompute(model)
    decoder = checkpointable_layers(model)
    if not decoder:
        raise ValueError(
            f"context_parallel_recompute_layers: {type(model).__name__} has no checkpointable decoder layers "
            "(transformers' GradientCheckpointingLayer); leave context_parallel_recompute_layers unset."
        )
    state = PartialRecompute(layers)

    def pre_forward(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        for layer in decoder[layers:]:
            if getattr(layer, "gradient_checkpointing", False):
                layer.gradient_checkpointing = False
                state.turned_off.add(layer)

    def undo() -> None:
        """The flags turned off come back on if checkpointing is still on in the model (a
        `gradient_checkpointing_disable()` since then turned every flag off, and they stay off)."""
        if any(getattr(module, "gradient_checkpointing", False) for module in model.modules()):
            for layer in state.turned_off:
                layer.gradient_checkpointing = True

    changes.install(model, NAME, state=state, pre=pre_forward, undo=undo)
    return model


def remove_partial_recompute(model: torch.nn.Module) -> torch.nn.Module:
    """Remove the stage and turn back on the flags it turned off (see `apply_partial_recompute`)."""
    changes.remove(model, NAME)
    return model
