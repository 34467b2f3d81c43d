"""The entry points that transformers' own `TrainingArguments` and `Trainer` call when they hand over to
transformers_cp (`upstream/transformers.patch`, `docs/upstream.md`).

With the patch, transformers' `TrainingArguments` carries the `context_parallel_*` fields. When one of them is set,
it calls `check_training_arguments(args)` at construction, and transformers' `Trainer` calls
`enable_context_parallel(self)` as the last step of its `__init__`. Everything else stays here, so transformers only
holds the fields and two calls:

- the checks are those of transformers_cp's own `TrainingArguments` (`training_args.check_arguments`);
- the trainer instance takes `ContextParallelTrainerMixin` in front of its own class, and sets up as
  `transformers_cp.Trainer` does after transformers' `__init__`: the same mesh, model changes, data and loss.
"""

from __future__ import annotations

import functools
from typing import Any

import transformers

from .config import ContextParallelConfigError
from .trainer import ContextParallelTrainerMixin
from .training_args import arguments_config, check_arguments

# What the mixin defines for the Trainer. A trainer class that defines one of these itself would sit behind the mixin
# (the mixin goes in front of the instance's class), so its version would be skipped or see other values.
_MIXIN_NAMES = frozenset(
    name for name in vars(ContextParallelTrainerMixin) if not (name.startswith("__") and name.endswith("__"))
)
# The mixin's properties: transformers' `__init__` has already stored their values as instance attributes.
_MIXIN_PROPERTIES = tuple(
    name for name, value in vars(ContextParallelTrainerMixin).items() if isinstance(value, property)
)


def check_training_arguments(args: Any) -> None:
    """Validate the `context_parallel_*` settings of transformers' `TrainingArguments` (patched), as transformers_cp's
    own `TrainingArguments` does at construction; raises `ContextParallelConfigError` naming the setting and the fix."""
    check_arguments(args)


def enable_context_parallel(trainer: transformers.Trainer) -> transformers.Trainer:
    """Give an initialised transformers `Trainer` the behaviour of `transformers_cp.Trainer` for its `args`' settings.

    Its class becomes `ContextParallelTrainerMixin` in front of its own class; then the mesh is built, the model is
    changed and the collator replaced, as `transformers_cp.Trainer.__init__` does after transformers' `__init__`.
    A trainer that already has the mixin (transformers_cp's own trainers) sets itself up and is returned unchanged.
    Trainer classes that override what the mixin overrides are refused: derive them from `transformers_cp.Trainer`.
    """
    if isinstance(trainer, ContextParallelTrainerMixin):
        return trainer
    if arguments_config(trainer.args) is None:
        raise TypeError(
            f"{type(trainer.args).__name__} has no context_parallel_* fields: use transformers_cp.TrainingArguments, "
            "or transformers' own with upstream/transformers.patch applied."
        )
    check_arguments(trainer.args)
    cls = type(trainer)
    _check_overrides(cls)
    stored = {name: trainer.__dict__.pop(name) for name in _MIXIN_PROPERTIES if name in trainer.__dict__}
    trainer.__class__ = _with_context_parallel(cls)
    for name, value in stored.items():
        setattr(trainer, name, value)  # through the mixin's property setters
    trainer._setup_context_parallel()
    return trainer


def _check_overrides(cls: type) -> None:
    """Refuse a trainer class whose own methods the mixin would shadow (TRL's trainers and custom subclasses)."""
    for klass in cls.__mro__:
        if klass is transformers.Trainer:
            return
        clashes = sorted(_MIXIN_NAMES.intersection(vars(klass)))
        if clashes:
            if cls.__module__.split(".")[0] == "trl":
                fix = "use transformers_cp.trl's trainers (SFTTrainer, DPOTrainer) with its configs instead of TRL's"
            else:
                fix = f"derive {cls.__name__} from transformers_cp.Trainer instead of transformers.Trainer"
            raise ContextParallelConfigError(
                f"{cls.__name__} defines {', '.join(clashes)} (in {klass.__qualname__}), which context parallelism "
                f"overrides too, so transformers' Trainer cannot hand it over without skipping that code: {fix}, or "
                "leave the context_parallel_* arguments at their defaults."
            )


@functools.cache
def _with_context_parallel(cls: type) -> type:
    """`cls` with `ContextParallelTrainerMixin` in front, one class per trainer class, named as the original."""
    namespace = {"__module__": cls.__module__, "__qualname__": cls.__qualname__, "__doc__": cls.__doc__}
    return type(cls.__name__, (ContextParallelTrainerMixin, cls), namespace)
