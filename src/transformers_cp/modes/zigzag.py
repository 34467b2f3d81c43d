"""`zigzag`: the ring on the zigzag layout (2N chunks, rank r holds r and 2N-1-r), which balances causal work."""

from __future__ import annotations

from .base import Mode


class Zigzag(Mode):
    name = "zigzag"
    layout = "zigzag"
    balances_documents = True


ZIGZAG = Zigzag()
