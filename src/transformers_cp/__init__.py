"""transformers_cp: context parallelism for Hugging Face causal LMs.

Names are resolved lazily so that `import transformers_cp` stays light and soft dependencies stay untouched.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_EXPORTS = {
    "ContextParallelConfig": "config",
    "ContextParallelConfigError": "config",
    "Layout": "layout",
    "build_mesh": "mesh",
    "ContextParallelMesh": "mesh",
    "context_parallel_attention": "attention",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from .attention import context_parallel_attention
    from .config import ContextParallelConfig, ContextParallelConfigError
    from .layout import Layout
    from .mesh import ContextParallelMesh, build_mesh


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
