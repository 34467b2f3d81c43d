"""Layouts (shard ∘ unshard = identity, every token held exactly once) and config validation messages."""

from __future__ import annotations

import pytest
import torch

from transformers_cp.config import ContextParallelConfig, ContextParallelConfigError
from transformers_cp.layout import Layout, padded_length

LAYOUTS = [
    Layout("contiguous", 4, 1),
    Layout("zigzag", 4, 1),
    Layout("zigzag", 2, 2),
    Layout("zigzag", 1, 4),
    Layout("contiguous", 1, 4),
    Layout("zigzag", 3, 2),
]


@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
def test_shard_unshard_round_trip(layout):
    seq = layout.multiple * 5
    full = torch.arange(seq * 3).reshape(1, seq, 3)
    shards = [layout.shard(full, r, dim=1) for r in range(layout.size)]
    assert all(s.shape[1] == seq // layout.size for s in shards)
    assert torch.equal(layout.unshard(shards, dim=1), full)
    held = torch.cat([layout.index(seq, r) for r in range(layout.size)])
    assert torch.equal(held.sort().values, torch.arange(seq))


def test_zigzag_pairs_early_and_late_chunks():
    layout = Layout("zigzag", 4, 1)
    assert layout.ranges(16, 0) == [(0, 2), (14, 16)]
    assert layout.ranges(16, 3) == [(6, 8), (8, 10)]


def test_hybrid_ranks_gather_whole_ring_chunks():
    """Ulysses peers of one ring rank hold sub-chunks that together make that ring rank's zigzag chunks."""
    layout = Layout("zigzag", 2, 2)
    for ring_rank in range(2):
        peers = [layout.index(32, ring_rank * 2 + u) for u in range(2)]
        expect = torch.cat([torch.arange(s, e) for s, e in layout.ring_ranges(32, ring_rank)])
        assert torch.equal(torch.cat(peers).sort().values, expect.sort().values)


def test_length_must_be_a_multiple():
    layout = Layout("zigzag", 2, 1)
    with pytest.raises(ValueError, match="multiple of 4"):
        layout.ranges(10, 0)
    assert padded_length(10, layout) == 12


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(size=0), "context_parallel_size"),
        (dict(mode="ringo"), "context_parallel_mode"),
        (dict(backend="cuda"), "context_parallel_backend"),
        (dict(heads_k_stride=0), "context_parallel_heads_k_stride"),
        (dict(mode="hybrid", size=4, ulysses_size=3), "context_parallel_ulysses_size"),
        (dict(mode="zigzag", ulysses_size=2), "context_parallel_ulysses_size"),
    ],
)
def test_config_errors_name_the_setting(kwargs, field):
    with pytest.raises(ContextParallelConfigError, match=field):
        ContextParallelConfig(**kwargs)


def test_size_must_divide_world():
    with pytest.raises(ContextParallelConfigError, match="must divide the number of processes"):
        ContextParallelConfig(size=4).resolved(6)
    assert ContextParallelConfig().resolved(8).size == 8


def test_degrees():
    cfg = ContextParallelConfig(size=8, mode="hybrid", ulysses_size=2).resolved(8)
    assert (cfg.ring_size, cfg.ulysses_degree, cfg.layout) == (4, 2, "zigzag")
    cfg = ContextParallelConfig(size=4, mode="ulysses").resolved(4)
    assert (cfg.ring_size, cfg.ulysses_degree, cfg.layout) == (1, 4, "contiguous")
    assert ContextParallelConfig(mode="llama3").kv_stride(8) == 4
    assert ContextParallelConfig(mode="llama3", heads_k_stride=2).kv_stride(8) == 2
    assert ContextParallelConfig(mode="llama3").kv_stride(8, few_rows=True) == 8  # one gather when it is small
    assert ContextParallelConfig(mode="llama3", heads_k_stride=2).kv_stride(8, few_rows=True) == 2


@pytest.mark.parametrize(
    "size, heads, per_node, degree",
    [
        (4, 4, None, 4),  # all of the CP group when the heads allow it
        (4, 4, 2, 2),  # ... but a Ulysses group stays inside a node of 2 processes
        (8, 12, 8, 4),  # the largest divisor of both the size and the heads
        (4, 6, 8, 2),
        (8, 28, 8, 4),  # Qwen2.5-7B's 28 query heads (4 KV heads) on 8 CP ranks
        (4, 3, 4, 1),  # no common divisor: Ulysses 1, a zigzag ring of 4
        (16, 16, 8, 8),  # CP over two nodes of 8: Ulysses within a node, ring across
        (6, 12, 4, 2),  # 6 CP ranks on nodes of 4: a Ulysses group of 3 or 6 would cross a node boundary
    ],
)
def test_hybrid_ulysses_degree_is_chosen(size, heads, per_node, degree):
    config = ContextParallelConfig(size=size, mode="hybrid").with_auto_ulysses_size(heads, per_node)
    assert (config.ulysses_degree, config.ring_size) == (degree, size // degree)
    given = ContextParallelConfig(size=size, mode="hybrid", ulysses_size=1)
    assert given.with_auto_ulysses_size(heads, per_node) is given  # a degree the user set is kept


def test_hybrid_without_a_degree_needs_the_model():
    config = ContextParallelConfig(size=4, mode="hybrid")  # valid: the degree is chosen once the model is known
    with pytest.raises(ContextParallelConfigError, match="takes the Ulysses degree from the model's attention heads"):
        Layout.from_config(config)
