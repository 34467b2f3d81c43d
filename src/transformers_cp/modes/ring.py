"""`ring`: contiguous shards, keys and values passed around a ring of the CP ranks."""

from __future__ import annotations

from .base import Mode


class Ring(Mode):
    name = "ring"
    balances_documents = True


RING = Ring()
