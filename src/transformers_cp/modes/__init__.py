"""The registry of context-parallel modes. Each mode's module states its layout, degrees, setting and model checks
and attention (`base.Mode`); adding a mode is one new module here and one line below. The rest of the package asks
the config's mode (`ContextParallelConfig.spec`) what it does and never compares mode names."""

from __future__ import annotations

from .base import Mode
from .hybrid import HYBRID
from .llama3 import LLAMA3
from .odysseus import ODYSSEUS
from .ring import RING
from .ulysses import ULYSSES
from .zigzag import ZIGZAG

MODES: dict[str, Mode] = {
    mode.name: mode
    for mode in (
        RING,
        ZIGZAG,
        LLAMA3,
        ULYSSES,
        HYBRID,
        ODYSSEUS,
    )
}
DEFAULT_MODE = ZIGZAG.name

__all__ = ["DEFAULT_MODE", "MODES", "Mode"]
