"""Which kernel calls each rank makes: global document boundaries + layout -> blocks of (q rows, k rows, segments).

Everything here runs on the host, once per batch and window size (the `Documents` object caches its plans), so the
per-layer path never synchronises with the device. Chunks of a layout are contiguous global ranges, and two chunks
are either the same chunk, or one lies wholly before the other. A chunk seen against itself is a causal varlen call
over the documents inside it. A k chunk wholly before a q chunk can only matter through the single document that
spans both (documents are contiguous), so that pair is one dense, non-causal block, trimmed to the sliding window.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .balance import merged_ranges
from .kernels import Segments
from .layout import Layout, Range


@dataclass(frozen=True)
class Block:
    q: tuple[int, int]  # local query rows [a, b)
    k: tuple[int, int]  # rows of the KV buffer [a, b)
    seg: Segments

    @property
    def rows(self) -> slice:
        return slice(*self.q)

    @property
    def keys(self) -> slice:
        return slice(*self.k)


class Documents:
    """Document boundaries of one packed row (global positions), with the plans derived from them."""

    def __init__(self, cu_seqlens: Sequence[int], seq_len: int) -> None:
        bounds = [int(x) for x in cu_seqlens]
        if not bounds or bounds[0] != 0:
            bounds = [0, *bounds]
        if bounds[-1] > seq_len or any(b <= a for a, b in zip(bounds, bounds[1:])):
            raise ValueError(
                f"cu_seq_lens {bounds} do not describe documents of a packed row of {seq_len} tokens: they must "
                "start at 0, strictly increase and end at most at the row length."
            )
        if bounds[-1] < seq_len:  # the collator's padding tail is a document of its own
            bounds.append(seq_len)
        self.bounds = bounds
        self.seq_len = seq_len
        # this rank's shard of the row's position ids, set by the model's pre-forward hook (chunked attention reads it)
        self.position_ids: torch.Tensor | None = None
        self._plans: dict[tuple, object] = {}

    def span(self, pos: int) -> Range:
        """The document [start, end) containing global position `pos`."""
        i = bisect.bisect_right(self.bounds, pos) - 1
        return self.bounds[i], self.bounds[i + 1]

    def pieces(self, start: int, end: int) -> list[int]:
        """Lengths of the document pieces that tile [start, end)."""
        out, pos = [], start
        while pos < end:
            e = min(self.span(pos)[1], end)
            out.append(e - pos)
            pos = e
        return out

    def layout(self, layout: Layout) -> Layout:
        """The layout this row is sharded with under the policy `layout` (`Layout.for_row`)."""
        return self.cached(("layout", layout), lambda: layout.for_row(self.bounds, self.seq_len))

    def cached(self, key: tuple, build):
        if key not in self._plans:
            self._plans[key] = build()
        return self._plans[key]


def _cumulative(lengths: list[int]) -> tuple[int, ...]:
    out = [0]
    for n in lengths:
        out.append(out[-1] + n)
    return tuple(out)


def diagonal_segments(docs: Documents, ranges: Sequence[Range], window_left: int | None) -> Segments:
    """Causal varlen segments of the concatenated `ranges` (in ascending order) against themselves. Without a window,
    one document's pieces in consecutive ranges form one segment (`_joined`): each row of a later piece sees all of
    the earlier ones, as causal attention over their concatenation gives, so zigzag's two chunks of one document are
    one kernel call rather than a causal one, a full one and a merge of the two."""
    lengths: list[int] = []
    previous: Range | None = None
    for s, e in ranges:
        if e <= s:
            continue
        for i, n in enumerate(docs.pieces(s, e)):
            if i == 0 and previous is not None and _joined(docs, (s, e), previous, window_left):
                lengths[-1] += n
            else:
                lengths.append(n)
        previous = (s, e)
    cu = _cumulative(lengths)
    return Segments(cu, cu, causal=True, window_left=window_left)


def _joined(docs: Documents, q: Range, k: Range, window_left: int | None) -> bool:
    """Whether the diagonal segments hold the block of chunk `q` against an earlier chunk `k` of the same buffer: the
    first row of `q` and the last of `k` lie in one document, and no window cuts what a row sees."""
    return window_left is None and k[1] <= q[0] and docs.span(q[0]) == docs.span(k[1] - 1)


def earlier_block(
    docs: Documents, q: Range, q_off: int, k: Range, k_off: int, window_left: int | None
) -> Block | None:
    """The block of q chunk `q` against k chunk `k` that lies wholly before it, or None if nothing is visible."""
    ds, de = docs.span(q[0])
    qa, qe = q[0], min(q[1], de)
    ks, kb = max(k[0], ds), k[1]
    if window_left is not None:  # keep query rows that still reach back into k, and keys some row reaches
        qe = min(qe, kb + window_left)
        ks = max(ks, qa - window_left)
    if ds >= kb or qe <= qa or ks >= kb:
        return None
    # Bottom-right alignment puts key kb-1 on the diagonal of query qe-1; the window must reach back
    # window_left positions from each query: left = window_left - (qe - kb).
    left = None if window_left is None else window_left - (qe - kb)
    seg = Segments((0, qe - qa), (0, kb - ks), causal=False, window_left=left)
    return Block((q_off, q_off + qe - qa), (k_off + ks - k[0], k_off + kb - k[0]), seg)


def _offsets(ranges: Sequence[Range]) -> list[int]:
    out, pos = [], 0
    for s, e in ranges:
        out.append(pos)
        pos += e - s
    return out


def _full(b: Block) -> bool:
    return not b.seg.causal and b.seg.window_left is None


def _coalesce(blocks: list[Block]) -> list[Block]:
    """Merge consecutive dense full-visibility blocks that share their keys (queries adjacent) or their queries (keys
    adjacent) into one kernel call. Both blocks then see the same document (their shared rows lie in it) with nothing
    masked, so the merged rectangle is exact."""
    out: list[Block] = []
    for b in blocks:
        prev = out[-1] if out else None
        if prev is not None and _full(prev) and _full(b):
            if prev.k == b.k and prev.q[1] == b.q[0]:
                q, k = (prev.q[0], b.q[1]), b.k
            elif prev.q == b.q and prev.k[1] == b.k[0]:
                q, k = b.q, (prev.k[0], b.k[1])
            else:
                q = None
            if q is not None:
                out[-1] = Block(q, k, Segments((0, q[1] - q[0]), (0, k[1] - k[0]), causal=False))
                continue
        out.append(b)
    return out


def pair_blocks(
    docs: Documents, q_ranges: Sequence[Range], k_ranges: Sequence[Range], window_left: int | None
) -> list[Block]:
    """All blocks of local queries (chunks `q_ranges`) against one KV buffer (chunks `k_ranges`)."""
    blocks = []
    diagonal = list(q_ranges) == list(k_ranges)
    if diagonal:
        n = sum(e - s for s, e in q_ranges)
        blocks.append(Block((0, n), (0, n), diagonal_segments(docs, q_ranges, window_left)))
    for q, q_off in zip(q_ranges, _offsets(q_ranges)):
        for k, k_off in zip(k_ranges, _offsets(k_ranges)):
            if k[1] <= q[0] and not (diagonal and _joined(docs, q, k, window_left)):
                block = earlier_block(docs, q, q_off, k, k_off, window_left)
                if block is not None:
                    blocks.append(block)
    return _coalesce(blocks)


def _step_blocks(docs: Documents, layout: Layout, ring_rank: int, window_left: int | None) -> list[list[Block]]:
    """Blocks per ring step of one ring rank; at step s it holds the KV of ring rank (rank - s) mod R."""

    def build():
        row = docs.layout(layout)
        mine = row.ring_ranges(docs.seq_len, ring_rank)
        steps = []
        for s in range(layout.ring):
            src = (ring_rank - s) % layout.ring
            steps.append(pair_blocks(docs, mine, row.ring_ranges(docs.seq_len, src), window_left))
        return steps

    return docs.cached(("ring steps", layout, ring_rank, window_left), build)


def ring_plan(
    docs: Documents, layout: Layout, ring_rank: int, window_left: int | None
) -> list[tuple[int, list[Block]]]:
    """(step, blocks) for the ring steps that hold pairs on some rank, in order; step 0 (the rank's own KV) always.

    A step whose blocks are empty on every rank is skipped by all of them alike: the KV then travels the skipped
    steps in one hop (`algorithms.ring`), so no rank waits for KV that nobody attends to. Short documents that stay
    on one rank (the `documents` balance, or documents inside a chunk) leave the later steps empty. What travels is
    only the rows of a rank's KV that some other rank attends to (`sent_rows`), concatenated: the blocks of the
    later steps index that buffer.
    """

    def build():
        every = _every_rank(docs, layout, window_left)
        sent = sent_rows(docs, layout, window_left)
        used = [s for s in range(layout.ring) if s == 0 or any(steps[s] for steps in every)]
        steps = []
        for s in used:
            held = sent[(ring_rank - s) % layout.ring]  # the sent rows of the rank whose KV this one holds at step s
            steps.append((s, [_in_sent(b, held) for b in every[ring_rank][s]] if s else every[ring_rank][0]))
        return steps

    return docs.cached(("ring", layout, ring_rank, window_left), build)


def _every_rank(docs: Documents, layout: Layout, window_left: int | None) -> list[list[list[Block]]]:
    """Every ring rank's blocks per step, in the KV buffers' own rows (each rank plans every rank's, on the host)."""
    return [_step_blocks(docs, layout, r, window_left) for r in range(layout.ring)]


def sent_rows(docs: Documents, layout: Layout, window_left: int | None) -> tuple[tuple[Range, ...], ...]:
    """Per ring rank, the rows of its KV that some other ring rank attends to (the union of the keys of the blocks
    that hold its KV at steps 1 and on), merged: what leaves the rank in `algorithms.ring`. All of them for one
    document filling the row, none when every document stays on one rank."""

    def build():
        every = _every_rank(docs, layout, window_left)
        return tuple(
            merged_ranges([b.k for s in range(1, layout.ring) for b in every[(src + s) % layout.ring][s]])
            for src in range(layout.ring)
        )

    return docs.cached(("sent", layout, window_left), build)


def _in_sent(block: Block, sent: Sequence[Range]) -> Block:
    """`block` with its keys as rows of the sent buffer (the `sent` ranges concatenated); they lie in one range."""
    offset = 0
    for a, b in sent:
        if a <= block.k[0] and block.k[1] <= b:
            start = offset + block.k[0] - a
            return Block(block.q, (start, start + block.k[1] - block.k[0]), block.seg)
        offset += b - a
    raise AssertionError(f"keys {block.k} are not among the sent rows {sent}")


def local_segments(docs: Documents, window_left: int | None) -> Segments:
    """The whole row against itself (Ulysses after the all-to-all, or no CP)."""
    return docs.cached(("local", window_left), lambda: diagonal_segments(docs, [(0, docs.seq_len)], window_left))
