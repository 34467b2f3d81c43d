"""One registry of what transformers_cp changes in a model: per model, each feature's state, its pre-forward stage,
its forward replacements and its hooks, installed through here and undone exactly by `remove`.

The model gets one pre-forward hook (prepended: it runs before hooks registered earlier by others) and one forward
hook (`always_call`) that run the installed features' stages in the declared order `STAGES`, whatever order the
features were installed in; the forward hooks run in the reverse order (the first stage's is the outermost).

A feature installs under its name:

    change = changes.install(model, "offload", state=offloader, pre=pre_forward, undo=restore_flags)
    change.replace_forward(layer, offloaded_forward)   # restored on removal: the instance forward it had, or none
    change.track(handle)                               # a hook on a submodule (e.g. a rotary module), removed too

and finds its state again with `changes.state(model, name)`; `changes.remove(model, name)` removes its stage and
hooks, restores its forwards and calls its `undo`, after removing the changes installed with `depends_on=name`. Stage functions take `(module, args, kwargs)` and return None or
new `(args, kwargs)`; forward functions take `(module, args, kwargs, output)` and return None or a new output.

The attention results that CP keeps for the recomputation (`algorithms.reuse`) live in the registry's
`KeptOutputs` store of the model, so another feature (activation offload) can watch them without touching CP's state.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

STAGES = ("padded_rows", "recompute", "chunked_loss", "offload", "context_parallel", "mixers", "router_loss")
"""The pre-forward stages in the order they run: TRL's padded rows become one packed row first (the CP stage reads its
document bounds); partial recomputation sets the layers' checkpointing flags, which the chunked loss, activation
offload and CP read; CP checks the batch and gives every layer its documents; the mixers' stage hands them to the
recurrent and convolution mixers (`mixers.py`); the router-loss stage opens the row of the MoE auxiliary loss."""

_ATTR = "_transformers_cp_changes"
_NO_FORWARD = object()  # a module that had no instance forward (it used its class's)


class KeptWatcher(Protocol):
    def kept(self, key: object, value: Any) -> None: ...

    def taking(self, key: object) -> None: ...


class KeptOutputs(dict):
    """The attention results kept by the first forward for the recomputation, per attention module (the store of
    `algorithms.reuse.ForwardReuse`); watchers see each value kept and each taken back."""

    def __init__(self) -> None:
        super().__init__()
        self.watchers: list[KeptWatcher] = []

    def __setitem__(self, key, value) -> None:
        super().__setitem__(key, value)
        for watcher in self.watchers:
            watcher.kept(key, value)

    def pop(self, key, default=None):
        for watcher in self.watchers:
            watcher.taking(key)
        return super().pop(key, default)


@dataclass
class Change:
    """What one feature installed on one model."""

    name: str
    state: Any = None
    pre: Callable | None = None
    post: Callable | None = None
    post_always: bool = False  # the forward function runs also when the forward raised
    undo: Callable[[], None] | None = None
    depends_on: str | None = None  # removed with that change
    forwards: list = field(default_factory=list)  # (module, the instance forward it had or _NO_FORWARD)
    handles: list = field(default_factory=list)

    def replace_forward(self, module: torch.nn.Module, forward: Callable) -> None:
        """Give `module` the instance forward `forward` (hooks of other engines still run through `__call__`)."""
        self.forwards.append((module, vars(module).get("forward", _NO_FORWARD)))
        module.forward = forward

    def track(self, handle: torch.utils.hooks.RemovableHandle) -> None:
        self.handles.append(handle)

    def _remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        for module, previous in reversed(self.forwards):
            if previous is _NO_FORWARD:
                del module.forward
            else:
                module.forward = previous
        if self.undo is not None:
            self.undo()


@dataclass
class ModelChanges:
    """The changes installed on one model, and the two hooks that run their stages."""

    installed: dict = field(default_factory=dict)  # name -> Change
    kept: KeptOutputs = field(default_factory=KeptOutputs)
    hooks: tuple = ()

    def ordered(self) -> list[Change]:
        return [self.installed[name] for name in STAGES if name in self.installed]

    def run_stages(self, module: torch.nn.Module, args: tuple, kwargs: dict):
        changed = False
        for change in self.ordered():
            if change.pre is not None:
                result = change.pre(module, args, kwargs)
                if result is not None:
                    args, kwargs, changed = *result, True
        return (args, kwargs) if changed else None

    def run_forward_hooks(self, module: torch.nn.Module, args: tuple, kwargs: dict, output):
        failed = output is None  # torch calls an always_call hook with None when the forward raised
        error = None
        for change in reversed(self.ordered()):
            if change.post is None or ((failed or error is not None) and not change.post_always):
                continue
            try:
                result = change.post(module, args, kwargs, output)
            except Exception as exc:  # the stages that always run still do; the first error is raised after them
                error = error or exc
                continue
            if result is not None:
                output = result
        if error is not None:
            raise error
        return output


def _registry(model: torch.nn.Module, create: bool = False) -> ModelChanges | None:
    registry = vars(model).get(_ATTR)
    if registry is None and create:
        registry = ModelChanges()
        registry.hooks = (
            model.register_forward_pre_hook(registry.run_stages, with_kwargs=True, prepend=True),
            model.register_forward_hook(registry.run_forward_hooks, with_kwargs=True, always_call=True),
        )
        setattr(model, _ATTR, registry)
    return registry


def install(
    model: torch.nn.Module,
    name: str,
    *,
    state: Any = None,
    pre: Callable | None = None,
    post: Callable | None = None,
    post_always: bool = False,
    undo: Callable[[], None] | None = None,
    depends_on: str | None = None,
) -> Change:
    """Install feature `name` on `model` (replacing an earlier install of it); `pre`/`post` run at its position of
    `STAGES`, which must name it. With `depends_on`, removing that change removes this one first."""
    if (pre is not None or post is not None) and name not in STAGES:
        raise ValueError(f"{name!r} has a pre-forward stage but no position in changes.STAGES; declare it there.")
    remove(model, name)
    change = Change(name, state, pre, post, post_always, undo, depends_on)
    _registry(model, create=True).installed[name] = change
    return change


def state(model: torch.nn.Module, name: str) -> Any:
    """The state feature `name` installed on `model`, or None."""
    registry = _registry(model)
    change = None if registry is None else registry.installed.get(name)
    return None if change is None else change.state


def installed(model: torch.nn.Module, name: str) -> bool:
    registry = _registry(model)
    return registry is not None and name in registry.installed


def remove(model: torch.nn.Module, name: str) -> bool:
    """Undo what feature `name` installed on `model`, and first what depends on it; False when it was not installed."""
    registry = _registry(model)
    if registry is None or name not in registry.installed:
        return False
    for dependent in [c.name for c in registry.installed.values() if c.depends_on == name]:
        remove(model, dependent)
    registry.installed.pop(name)._remove()
    if not registry.installed:
        for hook in registry.hooks:
            hook.remove()
        delattr(model, _ATTR)
    return True


def kept_outputs(model: torch.nn.Module) -> KeptOutputs:
    """The model's store of attention results kept for the recomputation (made with the first installed change)."""
    registry = _registry(model)
    if registry is None:
        raise RuntimeError("kept_outputs: install a change on the model first")
    return registry.kept
