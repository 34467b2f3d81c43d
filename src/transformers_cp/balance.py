"""Document-aware load balancing for the ring family: which global ranges of one packed row each ring rank holds.

With packed documents the causal work of a row is the number of (query, key) pairs in the same document, key not
after query: a document of n tokens holds n(n+1)/2, and a token at offset i of its document is the query of i+1 of
them. The `zigzag` layout balances that work for one document filling the row; for packed documents it balances
tokens, and the work follows wherever the documents happen to fall. The `documents` balance instead gives every ring
rank exactly the same number of tokens (MLPs, exchanges and buffers stay equal) and about the same causal work, and
cuts as few documents as it can, since a cut document costs: its chunks run as smaller kernel calls (more of them,
more merges), and its rows of KV travel round the ring (`plan.sent_rows`). A document kept whole on one rank needs no
other rank's keys and runs as one full-size call.

- To cut a document is to zigzag it alone: it is cut into 2R chunks (sizes differing by at most one token) and rank
  r takes chunks r and 2R-1-r, which gives every rank the same work of it at every ring step.
- Only a document of at least 2R tokens whose work exceeds 1/`SPLIT_SHARE` of a rank's share may be cut (the
  *cuttable* ones); the others always stay whole.
- Candidates k = 0, 1, 2, ...: cut the k cuttable documents of most work (ties: the earlier one), and place every
  other document whole: first the uncut cuttable ones, then the rest largest first, each to the rank with the least
  work that still has room (a document that fits nowhere whole fills the remaining room of the least loaded ranks,
  in pieces). The uncut cuttable documents are tried in up to `ORDERS` orders (largest first, then fixed shuffles); an
  order whose ranks already exceed the tolerance is dropped (placing the rest only adds work), and the rest is
  placed after each of the others in turn, those whose ranks look most even first (their work plus the rest's work
  spread over their room), within the budget `ORDERS` sets.
- The first placement whose ring time is within `WORK_TOLERANCE` of the mean work is taken: the ring time is the
  most loaded rank's pairs at each ring step, summed over the steps (a document filled in pieces meets its earlier
  pieces at later steps, on the rank holding the later piece only), so the most loaded rank's total work is within
  the tolerance too. The last candidate cuts every cuttable document, whatever the order (the rule of earlier
  versions) and is always placed in full; if no candidate meets the tolerance, of those placed in full the one with
  the least work on its most loaded rank is taken (ties: fewer cuts), so the work is never worse than with every
  cuttable document cut.

When no document is cut and the whole documents fill the ranks exactly, the KV never travels (see `plan.ring_plan`,
which skips the ring steps that hold no pairs on any rank). The ranges depend only on the row's document boundaries
(fixed orders, no randomness), so every rank computes the same ones, on the host, once per row.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

Range = tuple[int, int]

SPLIT_SHARE = 32
"""A document may be cut only when its causal work exceeds 1/SPLIT_SHARE of a rank's share: with every such
document cut, the whole documents each hold at most that much, which bounds what the assignment can leave
unbalanced; smaller ones are not worth a cut."""

WORK_TOLERANCE = 0.03
"""How far above the mean causal work of a rank the ring time (the most loaded rank's work at each ring step, summed)
may be before another document is cut: the ring runs each step at the pace of its slowest rank, so at most 3 % of
the attention time is lost, less than cut documents cost in smaller kernel calls and in KV sent round the ring."""

ORDERS = 16
"""Orders in which the uncut cuttable documents are tried per candidate: the greedy placement depends on the order,
and a few more orders find a balance with fewer cuts on many rows. Per candidate at most about `ORDERS`² documents
are placed in those orders, and as many for the rest after them (so fewer orders where the documents are many, and
there the order matters little), which keeps the host time of a row within milliseconds."""


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
    """Per ring rank, the sorted global ranges it holds: seq_len / ring tokens each, causal work within
    `WORK_TOLERANCE` of the mean, cutting as few documents as the search finds (see the module docstring)."""
    if seq_len % ring:
        raise ValueError(f"a row of {seq_len} tokens cannot be split evenly over {ring} ranks; pad it to a multiple.")
    bounds = document_bounds(bounds, seq_len)
    docs = list(zip(bounds, bounds[1:]))
    work = [pairs(a, b, a) for a, b in docs]
    share = sum(work) / ring
    limit = (1 + WORK_TOLERANCE) * share
    cuttable = sorted(
        (i for i, (a, b) in enumerate(docs) if b - a >= 2 * ring and work[i] * SPLIT_SHARE > share),
        key=lambda i: (-work[i], i),
    )
    largest_first = lambda i: (docs[i][0] - docs[i][1], i)  # noqa: E731
    rest = sorted(set(range(len(docs))) - set(cuttable), key=largest_first)
    rest_work = sum(work[i] for i in rest)
    best: tuple[int, _Ranks] | None = None
    for k in range(len(cuttable) + 1):
        cut = _Ranks(ring, seq_len // ring)
        for i in sorted(cuttable[:k]):
            a, b = docs[i]
            _zigzag(a, b - a, ring, cut.tokens, cut.give)
        whole = sorted(cuttable[k:], key=largest_first)
        tries = max(1, min(ORDERS, ORDERS**2 // max(1, len(whole))))
        orders = dict.fromkeys(tuple(_shuffled(whole, seed)) for seed in range(tries))
        bound = limit if k < len(cuttable) else None  # the last candidate is always placed in full
        placed = [p for p, order in ((cut.copy(), order) for order in orders) if p.place(docs, order, bound)]
        if not placed:
            continue
        placed.sort(key=lambda p: p.spread(rest_work))
        for chosen in placed[: max(1, ORDERS**2 // max(1, len(rest)))]:
            chosen.place(docs, rest)
            if max(chosen.work) <= limit and chosen.ring_time() <= limit:  # the ring time is at least the first
                return chosen.ranges()
            if best is None or max(chosen.work) < best[0]:
                best = (max(chosen.work), chosen)
    return best[1].ranges()


class _Ranks:
    """What each ring rank holds so far: its ranges, tokens and causal work, out of `cap` tokens, and the work of
    each ring step s >= 1 (`later[s][r]`: a piece of a split document on rank r against the earlier pieces on rank
    r-s, whose keys arrive at step s; everything else is step 0)."""

    def __init__(self, ring: int, cap: int) -> None:
        self.held: list[list[Range]] = [[] for _ in range(ring)]
        self.tokens, self.work, self.cap = [0] * ring, [0] * ring, cap
        self.later = [[0] * ring for _ in range(ring)]
        self.doc, self.before = -1, {}  # the document given last, and its tokens on each rank so far

    @property
    def room(self) -> list[int]:
        return [self.cap - t for t in self.tokens]

    def copy(self) -> _Ranks:
        other = _Ranks(len(self.held), self.cap)
        other.held, other.tokens, other.work = [list(h) for h in self.held], list(self.tokens), list(self.work)
        other.later = [list(step) for step in self.later]
        return other

    def give(self, rank: int, start: int, end: int, doc_start: int) -> None:
        """[start, end) of the document starting at `doc_start` to `rank`; a document's pieces come one after the
        other, in order."""
        if end > start:
            self.held[rank].append((start, end))
            self.tokens[rank] += end - start
            self.work[rank] += pairs(start, end, doc_start)
            if doc_start != self.doc:
                self.doc, self.before = doc_start, {}
            ring = len(self.held)
            for q, tokens in self.before.items():
                self.later[(rank - q) % ring][rank] += (end - start) * tokens
            self.before[rank] = self.before.get(rank, 0) + end - start

    def place(self, docs: Sequence[Range], order: Sequence[int], limit: float | None = None) -> bool:
        """Each document of `order` whole to the least loaded rank with room; one that fits nowhere whole fills the
        room of the least loaded ranks, in pieces. Stops with False as soon as a rank's work passes `limit`
        (placing more documents only adds work)."""
        ring, tokens, work, cap = len(self.held), self.tokens, self.work, self.cap
        for i in order:
            a, b = docs[i]
            fits = [r for r in range(ring) if cap - tokens[r] >= b - a]
            if fits:
                self.give(min(fits, key=lambda r: (work[r], r)), a, b, a)
            else:
                pos = a
                for rank in sorted(range(ring), key=lambda r: (work[r], r)):
                    take = min(cap - tokens[rank], b - pos)
                    self.give(rank, pos, pos + take, a)
                    pos += take
            if limit is not None and max(work) > limit:
                return False
        return True

    def spread(self, work: int) -> float:
        """The most loaded rank's work once `work` more is spread over the room left, in proportion: what the rest
        of the documents will roughly make of this placement."""
        room = self.room
        total = max(1, sum(room))
        return max(w + work * r / total for w, r in zip(self.work, room))

    def ring_time(self) -> int:
        """The ring's causal work in time: at each ring step the most loaded rank's pairs, summed over the steps."""
        ring = len(self.held)
        first = [w - sum(self.later[s][r] for s in range(1, ring)) for r, w in enumerate(self.work)]
        return max(first) + sum(max(self.later[s]) for s in range(1, ring))

    def ranges(self) -> tuple[tuple[Range, ...], ...]:
        return tuple(merged_ranges(ranges) for ranges in self.held)


def _shuffled(items: list[int], seed: int) -> list[int]:
    """`items` for seed 0, else a Fisher-Yates shuffle driven by a 64-bit LCG of `seed`: plain integer arithmetic, so
    every rank (and every Python) gets the same order."""
    items = list(items)
    state = seed
    for i in range(len(items) - 1, 0, -1) if seed else ():
        state = (state * 6364136223846793005 + 1442695040888963407) % 2**64
        j = (state >> 33) % (i + 1)
        items[i], items[j] = items[j], items[i]
    return items


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


def merged_ranges(ranges: Sequence[Range]) -> tuple[Range, ...]:
    """Sorted, with touching or overlapping ranges joined (fewer pieces to shard, copy and send)."""
    out: list[Range] = []
    for s, e in sorted(ranges):
        if out and s <= out[-1][1]:
            out[-1] = (out[-1][0], max(e, out[-1][1]))
        else:
            out.append((s, e))
    return tuple(out)
