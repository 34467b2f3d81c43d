"""Mamba1-family mixers under CP by state passing (`mixers_mamba1.ScanMixer`: each rank runs only its own tokens)
equal each document run alone through the stock model: logits and every parameter gradient (fp32, relative 1e-5),
for Mamba, FalconMamba, Jamba and Zamba, in zigzag, ring, llama3 and ulysses and the documents-balanced zigzag and
ring layouts on 2 and 4 gloo ranks (and hybrid 2 × 2 on 4), on test_hybrid_mamba2's rows (documents of one token,
shorter than a shard, spanning 3 and more chunks, starting a token before a chunk edge; on 4 ranks chunks of 2
tokens, shorter than the convolution's halo of 3). Every mixer call is checked to have run the convolution and the
scan in their CP form. `transformers_cp.Trainer` on Jamba equals the stock Trainer. One distributed job per world
size loops over every case.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
import transformers
from distributed import run_distributed
from test_hybrid import FAMILIES, _assert_same_training, _trainer_run, assert_refused, compare_row
from test_hybrid import build as build_hybrid
from test_hybrid_mamba2 import LAYOUTS, check_rows

from transformers_cp import (
    ContextParallelConfig,
    apply_context_parallel,
    build_mesh,
    delta_rule,
    mixers_mamba1,
)
from transformers_cp.delta_rule import _Active, _Dispatch
from transformers_cp.mixers import find_mixers
from transformers_cp.mixers_mamba1 import CLASSES, SCAN, ScanMixer

RTOL = 1e-5
CONFIGS = {
    "mamba": FAMILIES["mamba"],
    "falcon_mamba": dict(state_size=8, num_hidden_layers=2, conv_kernel=4, time_step_rank=4),  # rms-normalised B, C, Δ
    "jamba": FAMILIES["jamba"],  # layernorms on B, C and Δ
    "zamba": dict(
        mamba_d_state=8, mamba_dt_rank=4, n_mamba_heads=2, layers_block_type=["hybrid", "hybrid"], num_hidden_layers=2
    ),  # one scan per Mamba head  # fmt: skip
}


def build(family: str) -> transformers.PreTrainedModel:
    return build_hybrid(family, CONFIGS)


def _check(model, mesh, lengths: list[int], seed: int, reference: tuple, name: str) -> None:
    """CP on one row against `reference` (each document alone), every mixer call in the state-passing form."""
    mixers = compare_row(
        model, mesh, lengths, seed, reference, name, ScanMixer, watch=_ran_both_kernels, cu_seq_lens=False
    )
    assert all(type(m).__name__ in CLASSES for m in mixers), name


@contextlib.contextmanager
def _ran_both_kernels(mixers: list, name: str) -> Iterator[None]:
    """Around a forward: every mixer call ran both kernel functions in their CP form."""
    calls = []
    handles = [m.register_forward_hook(lambda *_: calls.append(list(_Active.ran))) for m in mixers]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
    assert len(calls) == len(mixers) and all(delta_rule.CONV in c and SCAN in c for c in calls), f"{name}: {calls}"


def _families_worker(rank: int, world: int) -> None:
    mixers_mamba1.BLOCK = 3  # continuing pieces' corrections in several blocks, each recomputed in backward
    layouts = LAYOUTS + ([dict(mode="hybrid", ulysses_size=2)] if world == 4 else [])  # hybrid's sub-chunks
    meshes = [build_mesh(ContextParallelConfig(size=world, **layout), "cpu") for layout in layouts]
    for family in CONFIGS:
        model = build(family)
        check_rows(model, family, meshes, world, _check)
        if world == 2:
            _refuses_a_forward_that_skips_the_scan(model, meshes[0])
        modeling = __import__(type(find_mixers(model)[0][1]).__module__, fromlist=["_"])
        assert not any(isinstance(v, _Dispatch) for v in vars(modeling).values()), f"{family}: dispatcher left"


def _refuses_a_forward_that_skips_the_scan(model, mesh) -> None:
    """A mixer forward that runs the convolution but not the scan (another transformers version's) is refused on
    every rank, naming the way out, instead of running without state passing."""
    apply_context_parallel(model, mesh.config, mesh=mesh)
    mixer = find_mixers(model)[0][1]
    conv = mixer.conv1d.weight.squeeze(1)
    namespace = __import__(type(mixer).__module__, fromlist=["_"])
    width = conv.shape[0]
    mixer.forward.original = lambda x: namespace.causal_conv1d_fn(mixer.in_proj(x).transpose(1, 2)[:, :width], conv)
    assert_refused(model, mesh)


@pytest.mark.parametrize("world", [2, 4])
def test_families_equal_each_document_alone(world):
    run_distributed(_families_worker, world, timeout=900)


TRAINER_FAMILY = "jamba"  # Mamba1 and attention layers


def _trainer_worker(rank: int, world: int, expected: dict) -> None:
    _assert_same_training(_trainer_run(world, "zigzag", TRAINER_FAMILY), expected, f"{TRAINER_FAMILY} Trainer zigzag")
    # recomputation runs each mixer again in backward, with its dispatchers and gathers, alike on every rank
    checkpointed = _trainer_run(world, "ring", TRAINER_FAMILY, gradient_checkpointing=True)
    _assert_same_training(checkpointed, expected, f"{TRAINER_FAMILY} Trainer ring, gradient checkpointing")


def test_trainer_gradient_accumulation():
    """transformers_cp.Trainer (zigzag; ring with gradient checkpointing; gradient accumulation 2) on Jamba with state
    passing equals the stock Trainer on one right-padded document per row."""
    run_distributed(_trainer_worker, 2, _trainer_run(1, family=TRAINER_FAMILY), timeout=900)
