"""What the ring sends: only the rows of a rank's KV that other ranks attend to (`plan.sent_rows`), so ranks send
different amounts, or nothing; a rank whose queries see only its own keys runs one local call. Exact against dense
attention (float32, rtol 1e-5) on 2 and 4 gloo ranks."""

from __future__ import annotations

import itertools

import pytest
from distributed import run_distributed
from reference import bounds_of, check_cp_attention

from transformers_cp.config import ContextParallelConfig
from transformers_cp.layout import Layout
from transformers_cp.mesh import build_mesh
from transformers_cp.plan import Documents, ring_plan, sent_rows


def test_one_document_sends_what_later_ranks_see():
    """One document, zigzag over 4 ranks (chunks of 8): rank r holds chunks r and 7-r, and every other rank attends to
    both, except that nobody after rank 0 attends to its chunk 7, the last one."""
    docs = Documents([0, 64], 64)
    assert sent_rows(docs, Layout("zigzag", 4, 1), None) == (((0, 8),), ((0, 16),), ((0, 16),), ((0, 16),))


def test_a_document_crossing_one_boundary_sends_only_its_rows():
    """Contiguous halves of 32 tokens; the document [10, 30) crosses from rank 0 into rank 1: rank 0 sends its rows
    10-15 (local), rank 1 sends nothing, and rank 1's step-1 block reads rows 0-6 of what arrives."""
    docs = Documents(bounds_of([10, 20, 2]), 32)
    layout = Layout("contiguous", 2, 1)
    assert sent_rows(docs, layout, None) == (((10, 16),), ())
    (_, local), (step, blocks) = ring_plan(docs, layout, 1, None)
    assert step == 1 and [(b.q, b.k) for b in blocks] == [((0, 14), (0, 6))]
    # with a window of 3 keys before each query, only rows 13-15 are seen from rank 1
    assert sent_rows(docs, layout, 3) == (((13, 16),), ())


def _worker(rank, world):
    seq = 16 * world
    ring = build_mesh(ContextParallelConfig(size=world, mode="ring"), "cpu")
    rows = {
        "one crossing document": [seq // world - 6, 12, seq - seq // world - 6],
        "crossings of different lengths": [3, seq // 2 - 1, seq // 4, seq - 3 - seq // 2 + 1 - seq // 4],
        "documents inside the shards": [8] * (seq // 8),
    }
    for (name, lengths), (heads, window) in itertools.product(rows.items(), (((4, 4), None), ((4, 2), 5))):
        sent = sent_rows(Documents(bounds_of(lengths), seq), ring.layout, window)
        if name != "documents inside the shards":
            assert len({sum(b - a for a, b in r) for r in sent}) > 1, "ranks send different amounts"
        check_cp_attention(ring, seq, bounds_of(lengths), heads, window, f"ring {name} heads={heads} window={window}")
    # whole documents on every rank under the documents balance: nothing travels, one local call per rank
    balanced = build_mesh(ContextParallelConfig(size=world, mode="zigzag", balance="documents"), "cpu")
    lengths = [4] * (seq // 4)
    docs = Documents(bounds_of(lengths), seq)
    assert [s for s, _ in ring_plan(docs, balanced.layout, balanced.ring_rank, None)] == [0]
    for mode in ("zigzag", "llama3"):
        mesh = build_mesh(ContextParallelConfig(size=world, mode=mode, balance="documents"), "cpu")
        check_cp_attention(mesh, seq, bounds_of(lengths), (4, 2), None, f"{mode} documents balance, whole documents")


@pytest.mark.parametrize("world", [2, 4])
def test_ranks_sending_different_rows_stay_exact(world):
    run_distributed(_worker, world)
