"""Document boundaries for attention that its decoder layer calls without the layer's keyword arguments (Nemotron),
so that the model's `cp_documents` never reach the attention function.

The model's pre-forward hook makes the documents current (`begin`) and its forward hook, which runs also when the
forward raises, drops them (`end`): they are current for exactly one forward. The mask function, which the model
calls inside that forward, puts them into the `MaskWindow` it returns, and the model hands that mask to every
attention call positionally, recomputation under activation checkpointing included (the checkpoint keeps the
layer's inputs); attention reads the documents from its call first, then from its mask. A mask built outside a CP
forward carries none, and attention then raises.
"""

from __future__ import annotations

import torch

from .plan import Documents

_current: Documents | None = None


def begin(docs: Documents) -> None:
    global _current
    _current = docs


def end() -> None:
    global _current
    _current = None


def current() -> Documents | None:
    """The documents of the CP forward in progress, or None outside one."""
    return _current


def install(model: torch.nn.Module) -> torch.utils.hooks.RemovableHandle:
    """Drop the documents when `model`'s forward ends or raises (the pre-forward hook makes them current)."""
    return model.register_forward_hook(lambda module, args, output: end(), always_call=True)
