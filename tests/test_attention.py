"""Every CP mode against single-process dense attention: outputs and dq, dk, dv at float32 round-off."""

from __future__ import annotations

import itertools

import pytest
import torch
from distributed import run_distributed
from reference import assert_close, reference_attention

from transformers_cp.attention import context_parallel_attention
from transformers_cp.config import ContextParallelConfig
from transformers_cp.mesh import build_mesh
from transformers_cp.modes.ulysses import STAGES
from transformers_cp.plan import Documents

SEQ = 96
HEAD_DIM = 8
DOCS = {"one": [SEQ], "packed": [1, 30, 5, 2, 41, 9], "packed+pad": [13, 1, 50, 20]}  # the last two leave a tail
WINDOWS = [None, 7, 29]
RTOL = 1e-5


def _heads(kind: str, world: int) -> tuple[int, int]:
    """MHA; GQA with fewer KV heads than ranks; and an odd number of query heads per rank (one Ulysses stage)."""
    return {"mha": (2 * world, 2 * world), "gqa": (2 * world, max(1, world // 2)), "odd": (3 * world, world)}[kind]


def _inputs(seed: int, hq: int, hk: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(SEQ, hq, HEAD_DIM, generator=g)
    k = torch.randn(SEQ, hk, HEAD_DIM, generator=g)
    v = torch.randn(SEQ, hk, HEAD_DIM, generator=g)
    dout = torch.randn(SEQ, hq, HEAD_DIM, generator=g)
    return [t.to(dtype) for t in (q, k, v, dout)]


def _full_lengths(lengths: list[int]) -> list[int]:
    return lengths + ([SEQ - sum(lengths)] if sum(lengths) < SEQ else [])


def _check_case(mesh, hq, hk, lengths, window, seed, dtype, rtol, ulysses_stages=STAGES):
    q, k, v, dout = _inputs(seed, hq, hk, dtype)
    scale = HEAD_DIM**-0.5
    ref_in = [t.float().requires_grad_() for t in (q, k, v)]
    ref = reference_attention(*ref_in, _full_lengths(lengths), scale, window)
    ref.backward(dout.float())
    layout, rank = mesh.layout, mesh.cp_rank
    shard = lambda t: layout.shard(t, rank, dim=0)  # noqa: E731
    local = [shard(t).detach().requires_grad_() for t in (q, k, v)]
    cum = list(itertools.accumulate(lengths, initial=0))
    out = context_parallel_attention(
        *local, mesh, Documents(cum, SEQ), scale, sliding_window=window, ulysses_stages=ulysses_stages
    )
    out.backward(shard(dout))
    case = f"{mesh.config.mode} hq={hq} hk={hk} docs={lengths} window={window} {dtype}"
    assert out.dtype == dtype, case
    assert_close(out.float(), shard(ref.detach()), rtol, f"out [{case}]")
    for name, t, r in zip("qkv", local, ref_in):
        assert t.grad.dtype == dtype, case
        assert_close(t.grad.float(), shard(r.grad), rtol, f"d{name} [{case}]")


def _worker(rank, world, mode, ulysses_size, cp_size, dtype, rtol, ulysses_stages=STAGES, docs=DOCS, windows=WINDOWS):
    config = ContextParallelConfig(size=cp_size, mode=mode, ulysses_size=ulysses_size)
    mesh = build_mesh(config, "cpu")
    kinds = ("mha", "gqa", "odd") if mode in ("ulysses", "hybrid") else ("mha", "gqa")
    for heads, (_doc_name, lengths), window in itertools.product(kinds, docs.items(), windows):
        hq, hk = _heads(heads, cp_size)
        _check_case(mesh, hq, hk, lengths, window, 17 + mesh.dp_rank, dtype, rtol, ulysses_stages)


MODES = [("ring", None), ("zigzag", None), ("llama3", None), ("ulysses", None), ("hybrid", 1), ("hybrid", 2)]


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("mode,ulysses_size", MODES, ids=[f"{m}{u or ''}" for m, u in MODES])
def test_modes_match_dense_attention_fp32(world, mode, ulysses_size):
    if mode == "hybrid" and ulysses_size == 1 and world == 2:
        ulysses_size = 2  # at N=2 hybrid degenerates: exercise a pure-Ulysses split on the zigzag layout
    run_distributed(_worker, world, mode, ulysses_size, world, torch.float32, RTOL)


@pytest.mark.parametrize("world", [2, 4])
def test_ulysses_pipeline_stages(world):
    """Ulysses with its heads in two pipeline stages (where the heads per rank are even) is exact too."""
    run_distributed(_worker, world, "ulysses", None, world, torch.float32, RTOL, 2)


EIGHT = [("zigzag", None), ("llama3", None), ("ulysses", None), ("hybrid", 2), ("hybrid", 4)]


@pytest.mark.parametrize("mode,ulysses_size", EIGHT, ids=[f"{m}{u or ''}" for m, u in EIGHT])
def test_eight_ranks(mode, ulysses_size):
    """N = 8 (the largest GPU count the benchmarks target): each Ulysses degree of the hybrid, and GQA with fewer KV
    heads than ranks, on packed documents with and without a window."""
    docs = {"packed+pad": DOCS["packed+pad"]}
    run_distributed(_worker, 8, mode, ulysses_size, 8, torch.float32, RTOL, STAGES, docs, [None, 7], timeout=600)


def test_data_parallel_groups_keep_their_own_data():
    """4 processes = 2 data-parallel replicas x CP 2, each replica with its own inputs."""
    run_distributed(_worker, 4, "zigzag", None, 2, torch.float32, RTOL)


# bf16: inputs and outputs are bf16, accumulation is float32; compared with the float32 reference on the same
# (rounded) inputs, the error is that of rounding the result and the per-block partials to bf16: 2e-2 relative.
BF16_RTOL = 2e-2


@pytest.mark.parametrize("mode,ulysses_size", [("zigzag", None), ("llama3", None), ("hybrid", 2)])
def test_modes_bf16(mode, ulysses_size):
    run_distributed(_worker, 4, mode, ulysses_size, 4, torch.bfloat16, BF16_RTOL)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("head_dim", [128, 80, 6, 3])
def test_copy_rows_is_bit_identical(dtype, head_dim):
    """The exchange buffers' pack/unpack copies move the same bits whatever element type they are moved as: into a
    head slice of a wider buffer and out of a transposed view, NaN payloads and signed zeros included."""
    from transformers_cp.comm import contiguous as packed
    from transformers_cp.comm import copy_rows

    bits = {torch.bfloat16: torch.int16, torch.float32: torch.int32, torch.float64: torch.int64}[dtype]
    g = torch.Generator().manual_seed(head_dim)
    raw = torch.randint(-(2**15), 2**15, (5, 2, 3, head_dim), generator=g).to(bits)
    src = raw.view(dtype).transpose(0, 1)  # every bit pattern, NaNs among them
    buf = torch.zeros(2, 5, 7, head_dim, dtype=dtype)
    copy_rows(buf[:, :, 2:5], src)
    assert torch.equal(buf[:, :, 2:5].view(bits), src.view(bits))
    assert not buf[:, :, :2].view(bits).any() and not buf[:, :, 5:].view(bits).any()
    contiguous = packed(src)
    assert contiguous.is_contiguous() and torch.equal(contiguous.view(bits), src.view(bits))
