"""Document-aware load balancing for the ring family: which global ranges of one packed row each ring rank holds.

With packed documents the causal work of a row is the number of (query, key) pairs in the same document, key not
after query: a document of n tokens holds n(n+1)/2, and a token at offset i of its document is the query of i+1 of
them. The `zigzag` layout balances that work for one document filling the row; for packed documents it balances
tokens, and the work follows wherever the documents happen to fall. The `documents` balance instead gives every ring
rank exactly the same number of tokens (MLPs, exchanges and buffers stay equal) and about the same causal work:

- a document whose work is a noticeable share of a rank's (more than 1/`SPLIT_SHARE` of it) is cut into 2R chunks
  (sizes differing by at most one token), and rank r takes chunks r and 2R-1-r: the zigzag of that document alone,
  which gives every rank the same work at every ring step;
- the other documents go whole to one rank each, largest first, to the rank with the least work that still has room
  (a document that fits nowhere whole fills the remaining room of the least loaded ranks, in pieces).

Whole documents see only themselves, so they cost no ring step but the first: when no document is cut, the KV
never travels (see `plan.ring_plan`, which skips the ring steps that hold no pairs on any rank). The ranges depend
only on the row's document boundaries, so every rank computes the same ones, on the host, once per row.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

Range = tuple[int, int]

SPLIT_SHARE = 32
"""A document is cut when its causal work exceeds 1/SPLIT_SHARE of a rank's share: the whole documents then each
hold at most that much, which bounds what the greedy assignment can leave unbalanced."""


def document_bounds(bounds: Sequence[int], seq_len: int) -> list[int]:
    """Boundaries starting at 0 and ending at `seq_len` (the padding tail is a document of its own), as
    `plan.Documents` reads them."""
    out = [int(b) for b in bounds]
    if not out or out[0] != 0:
        out = [0, *out]
    if out[-1] < seq_len:
        out.append(seq_len)
    return out


def pairs(start: int, end: int, doc_start: int) -> int:
    """Causal pairs whose query lies in [start, end) of a document starting at `doc_start`."""
    a, b = start - doc_start, end - doc_start
    return (b * (b + 1) - a * (a + 1)) // 2


def range_work(bounds: Sequence[int], ranges: Sequence[Range]) -> int:
    """Causal pairs (query and key in one document, key not after query) whose query lies in `ranges`; `bounds` as
    `document_bounds` gives them."""
    total = 0
    for start, end in ranges:
        i = bisect.bisect_right(bounds, start) - 1
        while start < end:
            stop = min(end, bounds[i + 1])
            total += pairs(start, stop, bounds[i])
            start, i = stop, i + 1
    return total


def balanced_ranges(bounds: Sequence[int], seq_len: int, ring: int) -> tuple[tuple[Range, ...], ...]:
    """Per ring rank, the sorted global ranges it holds: seq_len / ring tokens each, causal work balanced."""
    if seq_len % ring:
        raise ValueError(f"a row of {seq_len} tokens cannot be split evenly over {ring} ranks; pad it to a multiple.")
    bounds = document_bounds(bounds, seq_len)
    docs = list(zip(bounds, bounds[1:]))
    share = sum(pairs(a, b, a) for a, b in docs) / ring
    held: list[list[Range]] = [[] for _ in range(ring)]
    tokens, work = [0] * ring, [0] * ring

    def give(rank: int, start: int, end: int, doc_start: int) -> None:
        if end > start:
            held[rank].append((start, end))
            tokens[rank] += end - start
            work[rank] += pairs(start, end, doc_start)

    whole = []
    for a, b in docs:
        n = b - a
        if n >= 2 * ring and pairs(a, b, a) * SPLIT_SHARE > share:
            _zigzag(a, n, ring, tokens, give)
        else:
            whole.append((a, b))
    room = [seq_len // ring - t for t in tokens]
    for a, b in sorted(whole, key=lambda d: (d[0] - d[1], d[0])):  # largest first
        fits = [r for r in range(ring) if room[r] >= b - a]
        if fits:
            rank = min(fits, key=lambda r: (work[r], r))
            give(rank, a, b, a)
            room[rank] -= b - a
            continue
        pos = a
        for rank in sorted(range(ring), key=lambda r: (work[r], r)):
            take = min(room[rank], b - pos)
            give(rank, pos, pos + take, a)
            room[rank] -= take
            pos += take
    return tuple(_merged(ranges) for ranges in held)


def _zigzag(start: int, n: int, ring: int, tokens: list[int], give) -> None:
    """Cut the document [start, start + n) into 2R chunks; rank r takes chunks r and 2R-1-r. The n mod 2R tokens
    over 2R·floor(n / 2R) go one each to the ranks holding the fewest tokens so far (a second one each only when
    more than R are left), so that every rank ends with the same number of tokens over all cut documents, ±1."""
    base, extra = divmod(n, 2 * ring)
    order = sorted(range(ring), key=lambda r: (tokens[r], r))
    extras = [0] * ring
    for i in range(extra):
        extras[order[i % ring]] += 1
    sizes = [0] * (2 * ring)
    for r in range(ring):
        sizes[r] = base + (extras[r] >= 1)
        sizes[2 * ring - 1 - r] = base + (extras[r] >= 2)
    pos = start
    for chunk, size in enumerate(sizes):
        rank = chunk if chunk < ring else 2 * ring - 1 - chunk
        give(rank, pos, pos + size, start)
        pos += size


def _merged(ranges: list[Range]) -> tuple[Range, ...]:
    """Sorted, with touching ranges joined (fewer pieces to shard and to copy)."""
    out: list[Range] = []
    for s, e in sorted(ranges):
        if out and out[-1][1] == s:
            out[-1] = (out[-1][0], e)
        else:
            out.append((s, e))
    return tuple(out)
