"""RoPE whose frequencies depend on the sequence (dynamic NTK scaling, longrope) sees the whole row's positions.

transformers' rotary modules of these types choose their frequencies (and PhiMoE its scale) from the largest
position id of each forward: `dynamic_rope_update` grows or resets dynamic NTK's frequencies from it and picks
longrope's long or short factors by it. Under CP a rank sees only its shard's positions, so ranks would choose
differently from each other and from the run without CP. The CP pre-forward hook learns the row's largest position
id (gathered with the batch checks, before the layers run); a pre-hook on each such rotary module appends it to the
module's position_ids, so that whatever the module derives from their maximum is the whole row's, and a forward hook
drops that extra position's embeddings from its outputs. Embeddings are computed per position, so the others are
unchanged. Rotary modules of static types (default, linear, llama3, yarn, ...) get no hooks.

The row's largest position counts the padding tail (positions 0 .. p-1, p below the layout's multiple); it changes a
choice only for a model whose original length is below that multiple.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def depends_on_sequence(rope_type: str) -> bool:
    """Whether transformers recomputes this RoPE type's frequencies from the positions of each forward (the types
    `dynamic_rope_update` acts on)."""
    return "dynamic" in rope_type or rope_type == "longrope"


def sequence_dependent_rotaries(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's rotary modules whose RoPE type (one, or one per layer type) depends on the sequence."""
    found = []
    for module in model.modules():
        kinds = getattr(module, "rope_type", None)
        kinds = list(kinds.values()) if isinstance(kinds, dict) else [kinds]
        if any(isinstance(kind, str) and depends_on_sequence(kind) for kind in kinds):
            found.append(module)
    return found


def follow_row_positions(
    model: torch.nn.Module, row_max_position: Callable[[], int | None]
) -> list[torch.utils.hooks.RemovableHandle]:
    """Hook every sequence-dependent rotary module of `model` so that it sees `row_max_position()` (the packed row's
    largest position id, None outside a CP forward) among its positions. Returns the hooks' handles."""
    handles = []
    for module in sequence_dependent_rotaries(model):
        pre, post = _row_position_hooks(row_max_position)
        handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(module.register_forward_hook(post, with_kwargs=True))
    return handles


def _positions(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """The position_ids of a rotary module's call `(x, position_ids, ...)`."""
    return kwargs["position_ids"] if "position_ids" in kwargs else (args[1] if len(args) > 1 else None)


def _row_position_hooks(row_max_position: Callable[[], int | None]):
    appended = [False]  # whether this call's positions were extended

    def pre(module: torch.nn.Module, args: tuple, kwargs: dict):
        top, positions = row_max_position(), _positions(args, kwargs)
        appended[0] = top is not None and positions is not None
        if not appended[0]:
            return None
        extended = torch.cat([positions, positions.new_full((*positions.shape[:-1], 1), top)], dim=-1)
        if "position_ids" in kwargs:
            return args, {**kwargs, "position_ids": extended}
        return (args[0], extended, *args[2:]), kwargs

    def post(module: torch.nn.Module, args: tuple, kwargs: dict, output):
        if not appended[0]:
            return None
        appended[0] = False
        length = _positions(args, kwargs).shape[-1]

        def drop(t: torch.Tensor) -> torch.Tensor:
            if t.dim() < 2 or t.shape[-2] != length:
                raise ValueError(
                    f"{type(module).__name__} returned position embeddings of shape {tuple(t.shape)} for {length} "
                    "positions, not laid out along the second-to-last dimension, so context parallelism cannot give "
                    "its sequence-dependent RoPE the whole row's positions; use a static RoPE type (default, linear, "
                    "llama3, yarn) with this model."
                )
            return t[..., : length - 1, :]

        return drop(output) if isinstance(output, torch.Tensor) else type(output)(drop(t) for t in output)

    return pre, post
