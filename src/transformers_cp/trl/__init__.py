"""TRL's trainers with context parallelism: `SFTTrainer`, `DPOTrainer`, `GRPOTrainer`, `RLOOTrainer` and their
configs (TRL's, plus the `context_parallel_*` fields). Needs `trl` (`pip install -e ".[trl]"` in the checkout); supported:
trl 1.16.
"""

from __future__ import annotations

import importlib
import importlib.util

if importlib.util.find_spec("trl") is None:
    raise ImportError(
        'transformers_cp.trl needs the `trl` package, which is not installed; run `pip install -e ".[trl]"` in the '
        "transformers_cp checkout (or `pip install 'trl>=1.16' 'peft>=0.17'`)."
    )

from importlib.metadata import version as _version  # noqa: E402

from packaging.version import Version  # noqa: E402

if Version(_version("trl")) < Version("1.16"):
    raise ImportError(
        f"transformers_cp.trl needs trl >= 1.16 (its fused LM head and DPO internals), found {_version('trl')}; run "
        "`pip install -U 'trl>=1.16'`."
    )

_EXPORTS = {
    "SFTConfig": "config",
    "DPOConfig": "config",
    "GRPOConfig": "config",
    "RLOOConfig": "config",
    "SFTTrainer": "sft",
    "DPOTrainer": "dpo",
    "GRPOTrainer": "rl",
    "RLOOTrainer": "rl",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
