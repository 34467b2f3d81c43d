"""The per-model state of context parallelism, held by every module of the model (attention reads it per call)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .changes import KeptOutputs
from .config import ContextParallelConfig
from .mesh import ContextParallelMesh
from .recompute import is_checkpointed

ATTENTION_NAME = "context_parallel"
"""The name of the attention implementation (and mask function) registered with transformers."""

STATE_ATTR = "_context_parallel_state"
"""The attribute under which every module of a CP model holds its `ContextParallelState`."""


@dataclass
class ContextParallelState:
    mesh: ContextParallelMesh
    requested: ContextParallelConfig
    # (module, attribute, config) for every config the model's modules held before CP gave the model its own copy
    original_configs: list = field(default_factory=list)
    # Each module of a decoder layer -> that layer: attention keeps its results for the recomputation only when its
    # layer is checkpointed (a layer that is not recomputed would leave them in `kept` unused).
    layer_of: dict = field(default_factory=dict)
    layers: list = field(default_factory=list)  # the decoder layers, in model order
    checkpointed_layers: int = 0  # set per forward
    # attention results kept for the recomputation, per attention module: the model's store (`changes.kept_outputs`)
    kept: KeptOutputs = field(default_factory=KeptOutputs)
    rotary: object | None = None  # odysseus: the whole row's position embeddings, gathered once per forward
    max_positions: int | None = None  # longest document the model's positions cover (None: no limit known)
    row_max_position: int | None = None  # the packed row's largest position id, set per forward (see rope.py)

    def new_forward(self) -> None:
        """Reset what one forward sets: the checkpointed layers are counted again, kept results and the gathered
        rotary rows of the last forward are stale."""
        self.checkpointed_layers = sum(is_checkpointed(layer) for layer in self.layers)
        self.kept.clear()
        if self.rotary is not None:
            self.rotary.clear()

    def recomputed(self, module: torch.nn.Module) -> bool:
        """Whether `module` lies in a decoder layer that activation checkpointing recomputes in this forward."""
        layer = self.layer_of.get(module)
        return layer is not None and is_checkpointed(layer)


def find_state(module: torch.nn.Module) -> ContextParallelState | None:
    """The CP state `module` holds, or None where CP is not applied."""
    return getattr(module, STATE_ATTR, None)


def require_state(module: torch.nn.Module) -> ContextParallelState:
    """The CP state of a module whose attention runs as `ATTENTION_NAME`, with a clear error where it has none."""
    state = find_state(module)
    if state is None:
        raise RuntimeError(
            f"attention implementation {ATTENTION_NAME!r} is set on a model that context parallelism was not "
            "applied to; call transformers_cp.apply_context_parallel(model) instead of setting it by hand."
        )
    return state
