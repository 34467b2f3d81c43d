"""Mamba2-family mixers under CP by state passing (`mixers_mamba2.StatePassingMixer`: each rank runs only its own
tokens) equal each document run alone through the stock model: logits and every parameter gradient (fp32, relative
1e-5), for Nemotron-H, Bamba, GraniteMoeHybrid, Falcon-H1, Zamba2 and Mamba2, in zigzag, ring, llama3 and ulysses and
the documents-balanced zigzag and ring layouts, on 2 and 4 gloo ranks; two packed rows: documents of one token,
shorter than a shard and longer than one (spanning every chunk of the row), starting at a chunk boundary and a
token before one (the convolution's halo then mixes zeros and inputs). On 4 ranks, chunks of 2 tokens
(shorter than the halo of 3) take it from two chunks. `transformers_cp.Trainer` with gradient accumulation equals the stock Trainer on one document per
row. One distributed job per world size loops over every case. The stock chunk scan called in pieces
(`mixers_mamba2.scan_in_pieces`) equals one call, and under CP each document alone; with it the largest tensor of a
mixer grows linearly with the local length (a dispatch-mode recorder at two lengths).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

import pytest
import torch
import transformers
from distributed import run_distributed
from reference import assert_close, per_document
from test_hybrid import FAMILIES, VOCAB, _assert_same_training, _trainer_run, compare_row, packed_row
from test_hybrid import build as build_other

from transformers_cp import (
    ContextParallelConfig,
    apply_context_parallel,
    build_mesh,
    delta_rule,
    mixers_mamba2,
    remove_context_parallel,
)
from transformers_cp.mixers import find_mixers
from transformers_cp.mixers_mamba2 import CLASSES, StatePassingMixer

RTOL = 1e-5
CONFIGS = {
    **{f: FAMILIES[f] for f in ("nemotron_h", "bamba", "granitemoehybrid", "falcon_h1", "zamba2")},
    "mamba2": dict(num_heads=4, head_dim=16, state_size=8, n_groups=2, chunk_size=8, conv_kernel=4,
                   num_hidden_layers=2, use_bias=True),  # in_proj's bias: zero inputs do not give zeros
}  # fmt: skip
ROWS = ([1, 3, 20, 1, 7], [7, 23, 2])  # 32 tokens each: chunks of 8 (2 ranks, zigzag) or 4 (4 ranks)
LAYOUTS = [dict(mode=m) for m in ("zigzag", "ring", "llama3", "ulysses")] + [
    dict(mode=m, balance="documents") for m in ("zigzag", "ring")
]


def build(family: str) -> transformers.PreTrainedModel:
    model = build_other(family, CONFIGS)
    for module in model.modules():  # in_proj's bias starts at zero: make it count where the config has one
        if type(module).__name__ in CLASSES and module.in_proj.bias is not None:
            with torch.no_grad():
                module.in_proj.bias.normal_(std=0.5)
    return model


def _check(model, mesh, lengths: list[int], seed: int, reference: tuple, name: str, passing: bool = True) -> None:
    """CP on one row against `reference` (each document alone); `passing`: the mixers are Mamba2's and pass state."""
    if not passing:
        compare_row(model, mesh, lengths, seed, reference, name, cu_seq_lens=False)
        return
    mixers = compare_row(
        model, mesh, lengths, seed, reference, name, StatePassingMixer, watch=_ran_state_passing, cu_seq_lens=False
    )
    assert all(type(m).__name__ in CLASSES for m in mixers), name
    assert not any(m.in_proj._forward_hooks for m in mixers), f"{name}: in_proj hook not removed"


@contextlib.contextmanager
def _ran_state_passing(mixers: list, name: str) -> Iterator[None]:
    """Around a forward: every mixer call ran the state-passing form (not its gathered fallback)."""
    calls = []

    def seen(module, args, out) -> None:
        calls.append(next(m for m in mixers if m.in_proj is module).forward.call is not None)

    handles = [m.in_proj.register_forward_hook(seen) for m in mixers]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
    assert calls and all(calls), f"{name}: a mixer took the gathered form"


def check_rows(model, family: str, meshes: list, world: int, check) -> None:
    """`check(model, mesh, lengths, seed, reference, name)` on every row of ROWS in every mesh and, on 4 ranks, on a
    row whose zigzag chunks of 2 tokens are shorter than the convolution's halo of 3 (it comes from two chunks)."""
    for seed, lengths in enumerate(ROWS):
        reference = per_document(model, packed_row(lengths, seed)[0], lengths)
        for mesh in meshes:
            name = f"{family} {mesh.config.mode} balance={mesh.config.balance} on {world} ranks, row {lengths}"
            check(model, mesh, lengths, seed, reference, name)
    if world == 4:
        lengths = [3, 12, 1]
        reference = per_document(model, packed_row(lengths, 2)[0], lengths)
        check(model, meshes[0], lengths, 2, reference, f"{family} zigzag, chunks of 2 tokens")


def _families_worker(rank: int, world: int) -> None:
    meshes = [build_mesh(ContextParallelConfig(size=world, **layout), "cpu") for layout in LAYOUTS]
    for family in CONFIGS:
        check_rows(build(family), family, meshes, world, _check)


@pytest.mark.parametrize("world", [2, 4])
def test_families_equal_each_document_alone(world):
    run_distributed(_families_worker, world, timeout=900)


def _other_forms_worker(rank: int, world: int) -> None:
    delta_rule.USE_STATE = False  # Jamba's gathered form (tests/test_hybrid_mamba1.py its state passing)
    for family in ("jamba", "lfm2"):  # the gathered form, and the halo form (or its gathered fallback)
        model = build_other(family)
        for seed, lengths in enumerate(ROWS):
            reference = per_document(model, packed_row(lengths, seed)[0], lengths)
            for layout in LAYOUTS[-2:]:
                mesh = build_mesh(ContextParallelConfig(size=world, **layout), "cpu")
                name = f"{family} {layout} on {world} ranks, row {lengths}"
                _check(model, mesh, lengths, seed, reference, name, passing=False)


def test_other_forms_follow_balanced_rows():
    """The gathered and halo forms of the other mixers take the row's own ranges under
    `context_parallel_balance="documents"`, where ranks hold chunks of other lengths and counts."""
    run_distributed(_other_forms_worker, 2, timeout=600)


TRAINER_FAMILY = "nemotron_h"


def _trainer_worker(rank: int, world: int, expected: dict) -> None:
    _assert_same_training(_trainer_run(world, "zigzag", TRAINER_FAMILY), expected, f"{TRAINER_FAMILY} Trainer zigzag")
    # recomputation runs each mixer again in backward, with its hooks and collectives, in the same order on every rank
    checkpointed = _trainer_run(world, "ring", TRAINER_FAMILY, gradient_checkpointing=True)
    _assert_same_training(checkpointed, expected, f"{TRAINER_FAMILY} Trainer ring, gradient checkpointing")


def test_trainer_gradient_accumulation():
    """transformers_cp.Trainer (zigzag; ring with gradient checkpointing; gradient accumulation 2) on Nemotron-H equals the stock Trainer on one
    right-padded document per row (its mixers do not see the padding after a document)."""
    run_distributed(_trainer_worker, 2, _trainer_run(1, family=TRAINER_FAMILY), timeout=900)


def _scan_families() -> list[tuple[str, torch.nn.Module]]:
    """(family, its first Mamba2 mixer) for every family of CONFIGS."""
    return [(f, next(m for _, m in find_mixers(build(f)))) for f in CONFIGS]


def test_scan_in_pieces_equals_one_call():
    """Each family's chunk scan over pieces of one scan chunk (entering with the state the piece before left) equals
    one call over the row: output, final state and the gradients of every input (fp32, relative 1e-5), with and
    without an incoming state."""
    mixers_mamba2.SCAN_BYTES, default = 1, mixers_mamba2.SCAN_BYTES  # one scan chunk per call
    try:
        for family, mixer in _scan_families():
            scan = sys.modules[type(mixer).__module__].mamba2_chunk_scan
            heads, dim, groups, state = mixer.num_heads, mixer.head_dim, mixer.n_groups, mixer.ssm_state_size
            g = torch.Generator().manual_seed(0)
            length = 5 * mixer.chunk_size - 3  # the last piece is a part of a chunk
            shapes = dict(hidden_states=(1, length, heads, dim), dt=(1, length, heads), B=(1, length, groups, state),
                          C=(1, length, groups, state), initial_states=(1, heads, dim, state))  # fmt: skip
            for incoming in (False, True):
                inputs = {k: torch.randn(v, generator=g, requires_grad=True) for k, v in shapes.items()}
                if not incoming:
                    inputs["initial_states"] = None
                fixed = dict(A=-torch.exp(mixer.A_log.detach()), chunk_size=mixer.chunk_size, D=mixer.D.detach(),
                             dt_bias=mixer.dt_bias.detach(), dt_softplus=True, return_final_states=True)  # fmt: skip
                results = []
                for pieces in (False, True):
                    if pieces:
                        with mixers_mamba2.scan_in_pieces(mixer):
                            call = sys.modules[type(mixer).__module__].mamba2_chunk_scan
                            assert call is not scan, f"{family}: the scan is not called in pieces"
                            out, final = call(**inputs, **fixed)
                    else:
                        out, final = scan(**inputs, **fixed)
                    grads = torch.autograd.grad(
                        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum() + final.square().sum(),
                        [v for v in inputs.values() if v is not None],
                    )
                    results.append((out.detach(), final.detach(), grads))
                name = f"{family}, incoming state {incoming}"
                (out, final, grads), (out_p, final_p, grads_p) = results
                assert_close(out_p, out, RTOL, f"{name}: output")
                assert_close(final_p, final, RTOL, f"{name}: final state")
                for key, a, b in zip(inputs, grads_p, grads):
                    assert_close(a, b, RTOL, f"{name}: gradient of {key}")
            assert sys.modules[type(mixer).__module__].mamba2_chunk_scan is scan, f"{family}: the scan not restored"
    finally:
        mixers_mamba2.SCAN_BYTES = default


def _pieces_worker(rank: int, world: int) -> None:
    mixers_mamba2.SCAN_BYTES = 1  # the chunk scan over pieces of one scan chunk
    meshes = [build_mesh(ContextParallelConfig(size=world, mode=m), "cpu") for m in ("zigzag", "ulysses")]
    for family in ("nemotron_h", "falcon_h1", "mamba2"):
        check_rows(build(family), f"{family} (scan in pieces)", meshes, world, _check)


def test_scan_in_pieces_equal_each_document_alone():
    """The state-passing form with its stock scan called over pieces of one scan chunk equals each document run
    alone (`_check`), for three families."""
    run_distributed(_pieces_worker, 2, timeout=600)


def test_scan_that_cannot_run_on_meta_tensors_runs_in_one_call():
    """A chunk scan that the meta-tensor measurement cannot run is called whole, as the stock model calls it."""

    def scan(hidden_states, dt, A, B, C, chunk_size, initial_states=None, return_final_states=False):
        if hidden_states.is_meta:
            raise NotImplementedError("no meta kernel")
        return hidden_states

    call = dict(hidden_states=torch.zeros(1, 64, 2, 4), dt=torch.zeros(1, 64, 2), A=torch.zeros(2),
                B=torch.zeros(1, 64, 1, 4), C=torch.zeros(1, 64, 1, 4), chunk_size=8)  # fmt: skip
    default, mixers_mamba2.SCAN_BYTES = mixers_mamba2.SCAN_BYTES, 1
    try:
        assert mixers_mamba2._piece_tokens(scan, call, ["hidden_states", "dt", "B", "C"], 8) == 64
    finally:
        mixers_mamba2.SCAN_BYTES = default


MEMORY_CONFIG = dict(layers_block_type=["linear_attention"], num_hidden_layers=1, mamba_num_heads=4, mamba_head_dim=8,
                     ssm_state_size=8, n_groups=2, chunk_size=2, conv_kernel=4, max_position_embeddings=4096)  # fmt: skip
"""One Nemotron-H Mamba2 layer with scan chunks of 2 tokens: at these lengths the largest tensor of transformers'
torch-path scan is its recurrence between chunks, (chunks + 1)² per head (more in transformers ≤ 5.17)."""


def _largest(model, mesh, length: int) -> int:
    """The largest tensor of one CP forward and backward of a single-document row of `length` tokens."""
    ids = torch.randint(3, VOCAB, (1, length), generator=torch.Generator().manual_seed(length))
    apply_context_parallel(model, mesh.config, mesh=mesh)
    shard = lambda t: mesh.layout.for_row([0, length], length).shard(t, mesh.cp_rank, dim=1)  # noqa: E731
    with mixers_mamba2.LargestTensor() as largest:
        logits = model(input_ids=shard(ids), position_ids=shard(torch.arange(length)[None])).logits
        logits.square().sum().backward()
    remove_context_parallel(model)
    model.zero_grad()
    return largest.bytes


def _memory_worker(rank: int, world: int) -> None:
    mesh = build_mesh(ContextParallelConfig(size=world, mode="zigzag"), "cpu")
    model = build_other("nemotron_h", {"nemotron_h": MEMORY_CONFIG})
    lengths = (1024, 2048)  # 512 and 1024 tokens per rank
    mixers_mamba2.SCAN_BYTES = 1 << 14  # pieces of 64 tokens at these widths (the default: 512 at Nemotron-H 1.5B's)
    ours = [_largest(model, mesh, n) for n in lengths]
    mixers_mamba2.SCAN_BYTES = 1 << 62  # control: one scan call per mixer
    whole = [_largest(model, mesh, n) for n in lengths]
    assert whole[1] > 3 * whole[0], f"control: the one-call scan's largest tensor {whole} does not grow with L²"
    assert ours[1] <= 2.1 * ours[0], f"the largest tensor {ours} grows faster than the local length"
    assert ours[1] * 4 < whole[1], f"the scan in pieces {ours} is not smaller than in one call {whole}"


def test_largest_tensor_linear_in_local_length():
    """Under CP (2 ranks), the largest tensor of a Nemotron-H Mamba2 layer's forward and backward grows at most
    linearly with the local length (the chunk scan runs in pieces of `SCAN_BYTES`), where one call of the stock
    scan per mixer grows with its square (the control, same recorder)."""
    run_distributed(_memory_worker, 2, timeout=300)
