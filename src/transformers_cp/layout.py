"""Sequence layouts: which global token ranges each CP rank holds, and how to shard and unshard along them.

A layout is described by ranges of the packed row. `contiguous`: rank r holds [r·S/N, (r+1)·S/N). `zigzag`: the
row is cut into 2R chunks and ring rank r holds chunks r and 2R−1−r, which balances causal work over the ring.
With a Ulysses dimension of degree U (the `hybrid` mode) every chunk is further cut into U equal sub-chunks, one per
Ulysses rank, so that the Ulysses all-to-all gathers whole chunks back and the ring sees the plain zigzag layout.
CP rank = ring rank · U + Ulysses rank: the Ulysses peers are adjacent ranks.

With `balance="documents"` (the ring family, U = 1) the layout is a policy: `for_row` gives the layout of one row,
whose ranges follow the row's documents (`balance.py`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch

from .balance import balanced_ranges

if TYPE_CHECKING:
    from .config import ContextParallelConfig

Range = tuple[int, int]


@dataclass(frozen=True)
class Layout:
    kind: str  # "contiguous" | "zigzag"
    ring: int  # ring degree R
    ulysses: int  # Ulysses degree U
    balance: str = "tokens"  # "tokens" | "documents" (see `for_row`)
    assigned: tuple[tuple[Range, ...], ...] | None = None  # per ring rank, the ranges of one row (`for_row`)

    @classmethod
    def from_config(cls, config: ContextParallelConfig) -> Layout:
        return cls(config.layout, config.ring_size, config.ulysses_degree, config.balance)

    def for_row(self, bounds: Sequence[int], seq_len: int) -> Layout:
        """The layout of one row with document boundaries `bounds`: itself, or under `balance="documents"` the ranges
        that give every ring rank the same tokens and about the same causal work (`balance.balanced_ranges`)."""
        if self.balance != "documents" or self.assigned is not None or self.ring == 1:
            return self
        self.check_length(seq_len)
        return replace(self, assigned=balanced_ranges(bounds, seq_len, self.ring))

    @property
    def size(self) -> int:
        return self.ring * self.ulysses

    @property
    def chunks_per_rank(self) -> int:
        return 2 if self.kind == "zigzag" else 1

    @property
    def multiple(self) -> int:
        """The packed row length must be a multiple of this (the collator pads to it)."""
        return self.size * self.chunks_per_rank

    def check_length(self, seq_len: int) -> None:
        if seq_len % self.multiple != 0:
            raise ValueError(
                f"the packed row has {seq_len} tokens, which is not a multiple of {self.multiple} as the "
                f"{self.kind} layout over {self.size} context-parallel ranks needs; pad the row to a multiple of "
                f"{self.multiple} (the transformers_cp collator does this)."
            )

    def ring_ranges(self, seq_len: int, ring_rank: int) -> list[Range]:
        """Global ranges a ring rank holds once its Ulysses group has gathered the sequence (whole chunks)."""
        self.check_length(seq_len)
        if self.assigned is not None:
            if sum(e - s for s, e in self.assigned[0]) * self.ring != seq_len:
                raise ValueError(
                    f"this layout was balanced for another row than one of {seq_len} tokens; take the row's own "
                    "layout (Layout.for_row)."
                )
            return list(self.assigned[ring_rank])
        if self.kind == "contiguous":
            n = seq_len // self.ring
            return [(ring_rank * n, (ring_rank + 1) * n)]
        c = seq_len // (2 * self.ring)
        return [
            (ring_rank * c, (ring_rank + 1) * c),
            ((2 * self.ring - 1 - ring_rank) * c, (2 * self.ring - ring_rank) * c),
        ]

    def ranges(self, seq_len: int, cp_rank: int) -> list[Range]:
        """Global ranges CP rank `cp_rank` holds, in the order they are concatenated in its shard."""
        ring_rank, uly_rank = divmod(cp_rank, self.ulysses)
        out = []
        for start, end in self.ring_ranges(seq_len, ring_rank):
            sub = (end - start) // self.ulysses
            out.append((start + uly_rank * sub, start + (uly_rank + 1) * sub))
        return out

    def index(self, seq_len: int, cp_rank: int, device: torch.device | str | None = None) -> torch.Tensor:
        """Global token indices of a rank's shard, in shard order."""
        return torch.cat([torch.arange(s, e, device=device) for s, e in self.ranges(seq_len, cp_rank)])

    def shard(self, tensor: torch.Tensor, cp_rank: int, dim: int = 1) -> torch.Tensor:
        """The part of a full-row tensor that `cp_rank` holds (a copy when the ranges are not one slice)."""
        pieces = [tensor.narrow(dim, s, e - s) for s, e in self.ranges(tensor.shape[dim], cp_rank)]
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=dim)

    def unshard(self, shards: list[torch.Tensor], dim: int = 1) -> torch.Tensor:
        """Inverse of `shard`: the full row from every rank's shard (in CP rank order)."""
        seq_len = sum(s.shape[dim] for s in shards)
        pieces: list[tuple[int, torch.Tensor]] = []
        for rank, shard in enumerate(shards):
            offset = 0
            for s, e in self.ranges(seq_len, rank):
                pieces.append((s, shard.narrow(dim, offset, e - s)))
                offset += e - s
        return torch.cat([p for _, p in sorted(pieces, key=lambda item: item[0])], dim=dim)


def padded_length(seq_len: int, layout: Layout) -> int:
    """Smallest length >= seq_len that the layout can shard."""
    m = layout.multiple
    return -(-seq_len // m) * m
