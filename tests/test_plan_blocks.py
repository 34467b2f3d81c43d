"""A rank's own chunks in one kernel call: where one document runs through two of a rank's chunks (zigzag's chunks r
and 2R-1-r of a long document), causal attention over their concatenation is exact, so the plan's step 0 is one
causal segment there instead of two, a full block between them and a merge (`plan.diagonal_segments`). Not under a
sliding window, whose reach the gap between the chunks would break. Exact against dense attention (float32,
rtol 1e-5) on 2 and 4 gloo ranks."""

from __future__ import annotations

import itertools

import pytest
from distributed import run_distributed
from reference import bounds_of, check_cp_attention

from transformers_cp.config import ContextParallelConfig
from transformers_cp.layout import Layout
from transformers_cp.mesh import build_mesh
from transformers_cp.plan import Documents, ring_plan


def _step0(lengths: list[int], window: int | None, rank: int = 0) -> list[tuple]:
    """Rank `rank`'s step-0 blocks, zigzag over 2 ranks of a 64-token row (its chunks [16r, 16r+16) and the mirror)."""
    (step, blocks), *_ = ring_plan(Documents(bounds_of(lengths), 64), Layout("zigzag", 2, 1), rank, window)
    assert step == 0
    return [(b.q, b.k, b.seg.cu_q, b.seg.causal) for b in blocks]


def test_one_document_through_both_chunks_is_one_causal_segment():
    assert _step0([64], None) == [((0, 32), (0, 32), (0, 32), True)]
    assert _step0([64], None, rank=1) == [((0, 32), (0, 32), (0, 32), True)]


def test_only_the_document_that_runs_through_is_joined():
    # [10, 60) runs from chunk 0 into chunk 3: rows 10-15 and 48-59 are one segment; [0, 10) and [60, 64) their own
    assert _step0([10, 50, 4], None) == [((0, 32), (0, 32), (0, 10, 28, 32), True)]


def test_different_documents_in_the_two_chunks_stay_apart():
    # chunk 0 in [0, 20), chunk 3 in [20, 64): two segments and no block between them (nothing is visible)
    assert _step0([20, 44], None) == [((0, 32), (0, 32), (0, 16, 32), True)]


def test_a_window_keeps_the_chunks_apart():
    # under a window the chunks stay two segments, and chunk 3's rows see chunk 0 through a block of their own
    blocks = _step0([64], 40)
    assert blocks[0] == ((0, 32), (0, 32), (0, 16, 32), True)
    assert [(q, k) for q, k, _, _ in blocks[1:]] == [((16, 24), (8, 16))]


def _worker(rank, world):
    seq = 16 * world
    chunk = seq // (2 * world)
    rows = {
        "one document": [seq],
        "documents running through a rank's two chunks": [chunk // 2, seq - chunk, chunk // 2],
        "a document through the middle, short ones around it": [
            3,
            5,
            chunk - 8 + 1,
            seq - 2 * chunk - 2,
            chunk - 7,
            8,
        ],
    }
    for mode, (name, lengths), (heads, window) in itertools.product(
        ("zigzag", "llama3"), rows.items(), (((4, 4), None), ((4, 2), None), ((4, 2), 5))
    ):
        mesh = build_mesh(ContextParallelConfig(size=world, mode=mode), "cpu")
        check_cp_attention(
            mesh, seq, bounds_of(lengths), heads, window, f"{mode} {name} heads={heads} window={window}"
        )


@pytest.mark.parametrize("world", [2, 4])
def test_joined_chunks_stay_exact(world):
    run_distributed(_worker, world)
