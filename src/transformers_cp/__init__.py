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
    "ContextParallelMesh": "mesh",
    "build_mesh": "mesh",
    "context_parallel_attention": "attention",
    "apply_context_parallel": "modeling",
    "remove_context_parallel": "modeling",
}

__all__ = [
    "ContextParallelConfig",
    "ContextParallelConfigError",
    "ContextParallelMesh",
    "Layout",
    "apply_context_parallel",
    "build_mesh",
    "context_parallel_attention",
    "remove_context_parallel",
]

if TYPE_CHECKING:
    from .attention import context_parallel_attention
    from .config import ContextParallelConfig, ContextParallelConfigError
    from .layout import Layout
    from .mesh import ContextParallelMesh, build_mesh
    from .modeling import apply_context_parallel, remove_context_parallel


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
