"""The delta-rule mixers' state-passing form (`transformers_cp.delta_rule`: each rank runs its own tokens, the
convolution's look-back and the recurrence's state cross ranks) equals each document run alone through the stock
model: logits and every parameter gradient, for Qwen3-Next, Qwen3.5, OLMo hybrid (gated delta rule) and Kimi-Linear
(Kimi delta attention) in zigzag, ring, llama3, ulysses (and hybrid 2 × 2 on 4 ranks, the `documents` balance of
zigzag and ring) on 2 and 4 gloo ranks, on rows whose documents are of one token, shorter
than a chunk, longer than a shard (spanning 3 and more chunks), and start just before a chunk edge (a look-back
partly in another document); transformers_cp.Trainer with gradient accumulation equals the stock Trainer on one
document per row. One distributed job per world size loops over every case.

Precision. The state-passing form computes the same function in another order (the kernel's chunks start at the
rank's chunk, not at the document's start; the incoming state is added afterwards), so its float32 rounding differs
from the reference's. The stock model differs from itself by as much under such a reordering: its gradients of
`A_log` / `dt_bias` (sums over every token of terms of very different decay) move by up to 3e-5 of the sweep's
measure when only the kernel's chunk size changes from 64 to 16. So exactness is checked in float64 at the suite's
relative 1e-5, with the stock kernels' internal float32 casts lifted to float64 (`_float64_kernels`: the same
transformers code, float32 meaning float64), and float32 at the sweep's tolerance (benchmarks/model_sweep.py).
"""

from __future__ import annotations

import functools
import types

import pytest
import torch
import transformers
from distributed import run_distributed
from reference import assert_close, per_document
from test_hybrid import (
    _GDN,
    COMMON,
    FAMILIES,
    _assert_same_training,
    _pad_rows,
    assert_refused,
    compare_row,
    packed_row,
)
from trainer_cases import CPTrainer, StockTrainer, arguments, sft_dataset, train_and_record

import transformers_cp
from transformers_cp import (
    ContextParallelConfig,
    apply_context_parallel,
    build_mesh,
    delta_rule,
)
from transformers_cp.delta_rule import StateMixer, _Dispatch
from transformers_cp.mixers import GatheredMixer, find_mixers

RTOL = 1e-5
SWEEP_TOLERANCE = 1e-4  # benchmarks/model_sweep.py's TOLERANCE, the float32 criterion of issue 19
VOCAB = COMMON["vocab_size"]
STATE_FAMILIES = {  # model type -> modeling module
    "qwen3_next": "qwen3_next", "qwen3_5_text": "qwen3_5", "olmo_hybrid": "olmo_hybrid", "kimi_linear": "kimi_linear"
}  # fmt: skip
CONFIGS = {**FAMILIES, "olmo_hybrid": _GDN}
ROWS = (  # 32 tokens: shards of 16 or 8, zigzag chunks of 8 or 4; the convolution has 4 taps (look-back 3)
    [1, 3, 20, 1, 7],
    [32],
    [2, 1, 9, 1, 1, 18],  # documents start 1 and 2 tokens before a chunk edge (12 + 1 = 13, 14 before 16)
    [5, 1, 1, 25],
)
MODES = {2: ("zigzag", "ring", "llama3", "ulysses"), 4: ("zigzag", "ring", "llama3", "ulysses", "hybrid")}
BALANCED = ("zigzag", "ring")


def _float64_kernels() -> list[tuple[types.ModuleType, object]]:
    """Make the modeling modules of `STATE_FAMILIES` compute in float64 where they cast to float32 (the gated delta
    rule and its norms); returns what to put back."""
    lifted = types.SimpleNamespace(**{**vars(torch), "float32": torch.float64})
    undo = []
    for name in STATE_FAMILIES.values():
        module = getattr(transformers.models, name)
        modeling = getattr(module, f"modeling_{name}")
        undo.append((modeling, modeling.torch))
        modeling.torch = lifted
    return undo


def build(family: str, dtype: torch.dtype, **config) -> transformers.PreTrainedModel:
    config = transformers.CONFIG_MAPPING[family](**{**COMMON, **CONFIGS[family], **config})
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(
        config, attn_implementation="eager", experts_implementation="eager"
    )
    return model.to(dtype)


def _state_worker(rank: int, world: int) -> None:
    configs = [
        ContextParallelConfig(size=world, mode=m, ulysses_size=2 if m == "hybrid" else None) for m in MODES[world]
    ]
    configs += [ContextParallelConfig(size=world, mode=m, balance="documents") for m in BALANCED]
    meshes = [build_mesh(c, "cpu") for c in configs]
    undo = _float64_kernels()
    for family in STATE_FAMILIES:  # float64: exact up to float64 rounding
        model = build(family, torch.float64)
        for seed, lengths in enumerate(ROWS if world == 2 else ROWS[:3]):  # (the last adds little on 4 ranks)
            reference = per_document(model, packed_row(lengths, seed)[0], lengths)
            for mesh in meshes:
                name = f"{family} float64 {mesh.config.mode} ({mesh.config.balance}) on {world} ranks, {lengths}"
                compare_row(model, mesh, lengths, seed, reference, name, StateMixer)
    for modeling, original in undo:
        modeling.torch = original
    for family in STATE_FAMILIES:  # float32, the stock kernels as they are: the sweep's criterion
        model = build(family, torch.float32)
        lengths = ROWS[0]
        reference = per_document(model, packed_row(lengths, 0)[0], lengths)
        for mesh in meshes[: len(MODES[world])]:
            name = f"{family} float32 {mesh.config.mode} on {world} ranks, {lengths}"
            compare_row(model, mesh, lengths, 0, reference, name, StateMixer, SWEEP_TOLERANCE)
    if world == 2:
        _gathered_balanced(meshes[len(MODES[world]) :])
        _refuses_a_forward_that_skips_the_kernels(meshes[0])
        _kernel_in_pieces(meshes[0], meshes[3])
    for name in STATE_FAMILIES.values():  # the kernel functions are the stock ones again once no model runs CP
        modeling = getattr(getattr(transformers.models, name), f"modeling_{name}")
        assert not any(isinstance(v, _Dispatch) for v in vars(modeling).values()), f"{name}: dispatcher left installed"


def _gathered_balanced(meshes: list) -> None:
    """The gathered and halo forms under the `documents` balance, whose ranks hold different numbers of ranges of
    different lengths: they follow the row's own layout (float32, the suite's 1e-5, as tests/test_hybrid.py)."""
    from test_hybrid import build as build_float32

    lengths = ROWS[0]
    ids = packed_row(lengths, 0)[0]
    delta_rule.USE_STATE = False
    try:
        for family in ("lfm2", "nemotron_h", "qwen3_next"):
            model = build_float32(family)
            reference = per_document(model, ids, lengths)
            for mesh in meshes:
                name = f"{family} gathered {mesh.config.mode} (documents), {lengths}"
                compare_row(model, mesh, lengths, 0, reference, name, GatheredMixer)
    finally:
        delta_rule.USE_STATE = True


def _refuses_a_forward_that_skips_the_kernels(mesh) -> None:
    """A mixer forward that does not call the two kernel functions once each (another transformers version's) is
    refused on every rank, naming the way out, instead of running without state passing."""
    model = apply_context_parallel(build("qwen3_5_text", torch.float32), mesh.config, mesh=mesh)
    mixer = next(m for _, m in find_mixers(model))
    mixer.forward.original = lambda x: x  # reaches neither kernel function
    assert_refused(model, mesh)


def _kernel_in_pieces(*meshes) -> None:
    """With the recurrence's kernel over pieces of one chunk (64 tokens) on rows longer than several, zigzag and
    ulysses equal each document run alone (float64, the suite's 1e-5): pieces inside a document that starts in the
    shard and inside one that continues from another rank."""
    undo = _float64_kernels()
    default, delta_rule.PIECE_BYTES = delta_rule.PIECE_BYTES, 1
    try:
        for family in ("qwen3_next", "kimi_linear"):
            model = build(family, torch.float64, max_position_embeddings=512)
            lengths = [5, 290, 1, 88]  # 384 tokens: 192 per rank, 96 per zigzag chunk
            reference = per_document(model, packed_row(lengths, 0)[0], lengths)
            for mesh in meshes:
                name = f"{family} float64 {mesh.config.mode}, kernel in pieces, {lengths}"
                compare_row(model, mesh, lengths, 0, reference, name, StateMixer)
    finally:
        delta_rule.PIECE_BYTES = default
        for modeling, original in undo:
            modeling.torch = original


KERNELS = {"qwen3_next": "torch_chunk_gated_delta_rule", "kimi_linear": "chunk_kimi_delta_attention"}


@pytest.mark.parametrize("family", KERNELS)
def test_kernel_in_pieces_equals_one_call(family, monkeypatch):
    """The torch-path kernel over pieces of one chunk (`delta_rule.in_pieces`) equals one call over the whole length:
    output, final state and the gradient of every input (float32, relative 1e-5), from a zero and from a given
    state, with a last piece shorter than a chunk."""
    modeling = getattr(getattr(transformers.models, family), f"modeling_{family}")
    kernel = getattr(modeling, KERNELS[family])
    monkeypatch.setattr(delta_rule, "PIECE_BYTES", 1)
    monkeypatch.setattr(delta_rule, "_fla", lambda: False)
    delta_rule.in_pieces.cache_clear()
    calls = []

    @functools.wraps(kernel)
    def counted(*args, **kwargs):
        calls.append(1)
        return kernel(*args, **kwargs)

    pieces = delta_rule.in_pieces(counted)
    delta_rule.in_pieces.cache_clear()
    length, heads, dk, dv = 5 * 64 - 3, 2, 8, 12
    g = torch.Generator().manual_seed(0)
    decay = (1, length, heads, dk) if family == "kimi_linear" else (1, length, heads)
    shapes = dict(query=(1, length, heads, dk), key=(1, length, heads, dk), value=(1, length, heads, dv), g=decay,
                  beta=(1, length, heads), initial_state=(1, heads, dk, dv))  # fmt: skip
    for incoming in (False, True):
        inputs = {k: torch.randn(v, generator=g, requires_grad=True) for k, v in shapes.items()}
        with torch.no_grad():
            inputs["g"].copy_(-inputs["g"].abs() / 4)  # decays exp(g) in (0, 1]
            inputs["beta"].copy_(inputs["beta"].sigmoid())
        if not incoming:
            inputs["initial_state"] = None
        results = []
        for run in (kernel, pieces):
            calls.clear()
            out, final = run(**inputs, output_final_state=True, use_qk_l2norm_in_kernel=True)
            grads = torch.autograd.grad(
                (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum() + final.square().sum(),
                [v for v in inputs.values() if v is not None],
            )
            results.append((out.detach(), final.detach(), grads))
        assert len(calls) == 5, f"{family}: {len(calls)} kernel calls for 5 chunks in pieces of one"
        name = f"{family}, incoming state {incoming}"
        (out, final, grads), (out_p, final_p, grads_p) = results
        assert_close(out_p, out, RTOL, f"{name}: output")
        assert_close(final_p, final, RTOL, f"{name}: final state")
        for key, a, b in zip([k for k, v in inputs.items() if v is not None], grads_p, grads):
            assert_close(a, b, RTOL, f"{name}: gradient of {key}")


@pytest.mark.parametrize("world", [2, 4])
def test_state_passing_equals_each_document_alone(world):
    run_distributed(_state_worker, world, timeout=900)


def _trainer_run(context_parallel_size: int, mode: str = "zigzag", **kwargs) -> dict:
    """Qwen3-Next in float64 (kernels lifted): the stock Trainer on one right-padded document per row, or
    transformers_cp.Trainer (gradient accumulation 2) on packed rows."""
    undo = _float64_kernels()
    try:
        data = dict(model=build("qwen3_next", torch.float64), train_dataset=sft_dataset(13, 0),
                    eval_dataset=sft_dataset(7, 1))  # fmt: skip
        if context_parallel_size == 1:
            args = transformers.TrainingArguments(**arguments())
            return train_and_record(StockTrainer(args=args, data_collator=_pad_rows, **data))
        cp = arguments(context_parallel_size=context_parallel_size, context_parallel_mode=mode, **kwargs)
        return train_and_record(CPTrainer(args=transformers_cp.TrainingArguments(**cp), **data))
    finally:
        for modeling, original in undo:
            modeling.torch = original


def _trainer_worker(rank: int, world: int, expected: dict) -> None:
    _assert_same_training(_trainer_run(world), expected, "qwen3_next float64 Trainer zigzag, state passing")
    # recomputation runs each mixer's gathers again in backward, in the same order on every rank
    checkpointed = _trainer_run(world, "ulysses", gradient_checkpointing=True)
    _assert_same_training(checkpointed, expected, "qwen3_next float64 Trainer ulysses, gradient checkpointing")


def test_trainer_gradient_accumulation():
    run_distributed(_trainer_worker, 2, _trainer_run(1), timeout=900)


def test_gathered_path_when_switched_off(monkeypatch):
    """`delta_rule.USE_STATE = False` (benchmarks/hybrid.py --mixer-path gathered) keeps the gathered form."""
    module = next(m for _, m in find_mixers(build("qwen3_next", torch.float32)))
    assert delta_rule.fits(module)
    monkeypatch.setattr(delta_rule, "USE_STATE", False)
    assert not delta_rule.fits(module)
