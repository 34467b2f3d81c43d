"""Hybrid and recurrent models (Mamba/Mamba2, gated delta rule, KDA, short convolutions, lightning attention, RG-LRU)
under CP equal each document run alone through the stock model: logits and every parameter gradient (fp32, relative
1e-5), in every mode on 2 and 4 gloo ranks, on one packed row with documents of one token, shorter than a shard and
longer than a shard; transformers_cp.Trainer with gradient accumulation equals the stock Trainer on one document per
row (right-padded, which causal mixers and causal attention ignore), also under gradient checkpointing. One
distributed job per world size loops over every family and mode.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import pytest
import torch
import torch.distributed as dist
import transformers
from distributed import run_distributed
from reference import assert_close, per_document
from trainer_cases import CPTrainer, StockTrainer, arguments, sft_dataset, train_and_record

import transformers_cp
from transformers_cp import (
    ContextParallelConfig,
    apply_context_parallel,
    build_mesh,
    delta_rule,
    remove_context_parallel,
)
from transformers_cp.mixers import MIXERS, HaloMixer, find_mixers

RTOL = 1e-5
VOCAB = 97
DOCS = [1, 3, 20, 1, 7]  # 32 tokens: shards of 16 (2 ranks) or 8 (4 ranks); chunks of 8 or 4 in zigzag
COMMON = dict(
    vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
    max_position_embeddings=256, attention_dropout=0.0, use_cache=False, pad_token_id=0, bos_token_id=1,
    eos_token_id=2,
)  # fmt: skip
_MAMBA2 = dict(mamba_n_heads=4, mamba_d_head=16, mamba_d_state=8, mamba_n_groups=2, mamba_chunk_size=8, mamba_d_conv=4)
_GDN = dict(
    linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8, linear_value_head_dim=8,
    linear_conv_kernel_dim=4, layer_types=["linear_attention", "full_attention"], num_hidden_layers=2,
)  # fmt: skip
FAMILIES = {  # tiny configs: one layer of each kind, SSM chunks of 8 tokens so that documents cross them
    "qwen3_next": dict(
        _GDN, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, shared_expert_intermediate_size=16
    ),
    "qwen3_5_text": dict(_GDN),
    "nemotron_h": dict(
        layers_block_type=["linear_attention", "full_attention", "mlp"],
        mamba_num_heads=4,
        mamba_head_dim=16,
        ssm_state_size=8,
        n_groups=2,
        chunk_size=8,
        conv_kernel=4,
    ),  # fmt: skip
    "granitemoehybrid": dict(
        _MAMBA2,
        shared_intermediate_size=16,
        layer_types=["linear_attention", "full_attention"],
        num_hidden_layers=2,
        num_local_experts=4,
        num_experts_per_tok=2,
    ),  # fmt: skip
    "bamba": dict(_MAMBA2, attn_layer_indices=[1], num_hidden_layers=2),
    "falcon_h1": dict(_MAMBA2, num_hidden_layers=2, mamba_d_ssm=64),
    "zamba2": dict(
        mamba_d_state=8,
        n_mamba_heads=4,
        mamba_ngroups=2,
        chunk_size=8,
        num_hidden_layers=2,
        layers_block_type=["linear_attention", "hybrid"],
        use_mem_rope=True,
    ),  # fmt: skip
    "jamba": dict(
        mamba_d_state=8,
        mamba_dt_rank=4,
        attn_layer_period=2,
        attn_layer_offset=1,
        num_hidden_layers=2,
        num_experts=2,
        expert_layer_period=2,
        expert_layer_offset=1,
    ),  # fmt: skip
    "lfm2": dict(
        layer_types=["conv", "full_attention"], num_hidden_layers=2, conv_L_cache=3, block_auto_adjust_ff_dim=False
    ),
    "kimi_linear": dict(
        layer_types=["linear_attention", "full_attention"],
        num_hidden_layers=2,
        linear_num_heads=4,
        linear_head_dim=8,
        qk_rope_head_dim=4,
        qk_nope_head_dim=4,
        v_head_dim=8,
        kv_lora_rank=8,
        q_lora_rank=None,
        num_key_value_heads=4,
        mlp_layer_types=["dense", "dense"],
    ),  # fmt: skip
    "minimax": dict(
        layer_types=["linear_attention", "full_attention"],
        num_hidden_layers=2,
        block_size=8,
        num_local_experts=2,
        num_experts_per_tok=1,
    ),  # fmt: skip
    "recurrent_gemma": dict(
        block_types=["recurrent", "attention"],
        num_hidden_layers=2,
        lru_width=32,
        conv1d_width=4,
        attention_window_size=64,
        num_key_value_heads=1,
    ),  # fmt: skip
    "mamba": dict(state_size=8, num_hidden_layers=2, conv_kernel=4, time_step_rank=4),
}
MODES = {2: ("zigzag", "ring", "llama3", "ulysses"), 4: ("zigzag", "ring", "llama3", "ulysses", "hybrid")}


def build(family: str, configs: dict | None = None) -> transformers.PreTrainedModel:
    """The tiny float32 model of `family` (eager attention), from `configs` (default FAMILIES) over COMMON."""
    config = transformers.CONFIG_MAPPING[family](**{**COMMON, **(configs or FAMILIES)[family]})
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").float()


def packed_row(
    lengths: list[int] | None = None, seed: int = 1
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list]:
    """input_ids, position_ids (restarting per document), next-token targets (-100 at document ends) and the document
    bounds of one packed row of documents of `lengths` (DOCS)."""
    lengths = lengths or DOCS
    ids = torch.randint(3, VOCAB, (1, sum(lengths)), generator=torch.Generator().manual_seed(seed))
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    bounds = [0, *torch.tensor(lengths).cumsum(0).tolist()]
    targets = torch.full_like(ids, -100)
    targets[:, :-1] = ids[:, 1:]
    targets[0, torch.tensor(bounds[1:]) - 1] = -100
    return ids, position_ids, targets, bounds


def _assert_gradient(
    actual: torch.Tensor, expected: torch.Tensor, floor: float, name: str, tolerance: float = RTOL
) -> None:
    """`reference.assert_close` with the sweep's measure of a gradient: relative to the larger of its own scale and
    `floor` (1e-3 of the model's largest gradient), so that one which nearly cancels (fp32 rounding of its terms moves
    it with the summation order) is not measured against its own tiny scale."""
    scale = max(expected.abs().max().item(), floor)
    torch.testing.assert_close(actual, expected, rtol=tolerance, atol=tolerance * scale, msg=lambda m: f"{name}: {m}")


def compare_row(
    model, mesh, lengths: list[int], seed: int, reference: tuple, name: str, form: type | None = None,
    tolerance: float = RTOL, watch: Callable | None = None, cu_seq_lens: bool = True,
) -> list:  # fmt: skip
    """One packed row (`packed_row`) through `model` under CP (applied here, removed after) against `reference`, its
    documents run alone (`reference.per_document`): logits and every parameter gradient. `form`: the class every
    mixer's forward must take (None: not checked); `watch(mixers, name)`: a context manager around the forward that
    checks what the mixers ran; `cu_seq_lens`: pass the row's cu_seq_lens_q (else the documents come from the
    position_ids, except under the `documents` balance, which needs them). Returns the model's mixers."""

    ids, position_ids, targets, bounds = packed_row(lengths, seed)
    ref_logits, ref_grads = reference
    floor = 1e-3 * max(g.abs().max().item() for g in ref_grads.values())
    apply_context_parallel(model, mesh.config, mesh=mesh)
    mixers = [m for _, m in find_mixers(model)]
    assert not form or mixers and all(isinstance(m.forward, form) for m in mixers), f"{name}: {form} not installed"
    layout = mesh.layout.for_row(bounds, ids.shape[1])
    shard = lambda t: layout.shard(t, mesh.cp_rank, dim=1)  # noqa: E731
    extra = {"cu_seq_lens_q": torch.tensor(bounds)} if cu_seq_lens or mesh.config.balance == "documents" else {}
    with watch(mixers, name) if watch else contextlib.nullcontext():
        logits = model(input_ids=shard(ids), position_ids=shard(position_ids), **extra).logits
    torch.nn.functional.cross_entropy(logits[0], shard(targets)[0], reduction="sum").backward()
    assert_close(logits.detach(), shard(ref_logits), tolerance, f"{name}: logits")
    for key, p in model.named_parameters():
        grad = p.grad if p.grad is not None else torch.zeros_like(p)
        dist.all_reduce(grad, group=mesh.cp_group)
        expected = ref_grads.get(key, torch.zeros_like(p))
        _assert_gradient(grad, expected, floor, f"{name}: gradient of {key}", tolerance)
    model.zero_grad()
    remove_context_parallel(model)
    assert not any("forward" in vars(m) for m in mixers), f"{name}: mixer forward not restored"
    return mixers


def assert_refused(model, mesh) -> None:
    """A forward of `model` (CP applied, a mixer's forward replaced by one that another transformers version might
    have) is refused on every rank, naming the way out (USE_STATE = False); CP comes off after."""
    ids, position_ids, _, _ = packed_row(seed=0)
    shard = lambda t: mesh.layout.shard(t, mesh.cp_rank, dim=1)  # noqa: E731
    with pytest.raises(RuntimeError, match="USE_STATE = False"):
        model(input_ids=shard(ids), position_ids=shard(position_ids))
    remove_context_parallel(model)


def _families_worker(rank: int, world: int) -> None:
    delta_rule.USE_STATE = False  # the gathered form for every family; tests/test_hybrid_state.py the state passing
    meshes = [build_mesh(ContextParallelConfig(size=world, mode=m, ulysses_size=2 if m == "hybrid" else None), "cpu")
              for m in MODES[world]]  # fmt: skip
    for family in FAMILIES:
        model = build(family)
        reference = per_document(model, packed_row()[0], DOCS)
        for mesh in meshes:
            compare_row(model, mesh, DOCS, 1, reference, f"{family} {mesh.config.mode} on {world} ranks",
                        watch=_windowed_take_the_halo, cu_seq_lens=False)  # fmt: skip


@contextlib.contextmanager
def _windowed_take_the_halo(mixers: list, name: str) -> Iterator[None]:
    """Around a forward: the mixers with a window (short convolutions) run the halo form."""
    windowed = [m for m in mixers if MIXERS[type(m).__name__].window]
    assert all(isinstance(m.forward, HaloMixer) for m in windowed), f"{name}: halo path not installed"
    yield


@pytest.mark.parametrize("world", [2, 4])
def test_families_equal_each_document_alone(world):
    run_distributed(_families_worker, world, timeout=900)


def test_stock_packed_rows():
    """Whether the stock model on a packed row (position_ids restarting per document, as DataCollatorWithFlattening
    gives them) equals each document run alone, as `MIXERS` records per mixer (where it does not, the stock Trainer
    on packed rows is no reference for the family)."""
    ids, position_ids, _, _ = packed_row()
    for family in FAMILIES:
        model = build(family)
        alone, _ = per_document(model, ids, DOCS)
        with torch.no_grad():
            packed = model(input_ids=ids, position_ids=position_ids).logits
        kinds = {type(m).__name__ for _, m in find_mixers(model)}
        assert len(kinds) == 1, family
        exact = torch.allclose(packed, alone, rtol=RTOL, atol=RTOL * alone.abs().max().item())
        assert exact == MIXERS[kinds.pop()].stock_packed_exact, family


TRAINER_FAMILY = "qwen3_next"


def _pad_rows(examples: list[dict]) -> dict[str, torch.Tensor]:
    """One document per row, right-padded: the stock reference for a causal model whose mixers ignore packing."""
    width = max(len(e["input_ids"]) for e in examples)
    rows = {"input_ids": [], "labels": [], "attention_mask": []}
    for e in examples:
        pad = width - len(e["input_ids"])
        rows["input_ids"].append(e["input_ids"] + [0] * pad)
        rows["labels"].append(e["labels"] + [-100] * pad)
        rows["attention_mask"].append([1] * len(e["input_ids"]) + [0] * pad)
    return {k: torch.tensor(v) for k, v in rows.items()}


def _trainer_run(context_parallel_size: int, mode: str = "zigzag", family: str = TRAINER_FAMILY, **kwargs) -> dict:
    data = dict(model=build(family), train_dataset=sft_dataset(13, 0), eval_dataset=sft_dataset(7, 1))
    if context_parallel_size == 1:
        args = transformers.TrainingArguments(**arguments())
        return train_and_record(StockTrainer(args=args, data_collator=_pad_rows, **data))
    cp = arguments(context_parallel_size=context_parallel_size, context_parallel_mode=mode, **kwargs)
    return train_and_record(CPTrainer(args=transformers_cp.TrainingArguments(**cp), **data))


def _assert_same_training(actual: dict, expected: dict, name: str) -> None:
    """The per-step losses, gradient norms, every rank's step loss, eval loss and final weights as
    `trainer_cases.assert_same_run` compares them; each step's gradients with the sweep's measure (`_assert_gradient`)."""
    for key in ("losses", "grad_norms", "step_losses", "eval_loss"):
        assert_close(torch.tensor(actual[key]), torch.tensor(expected[key]), RTOL, f"{name} {key}")
    assert len(actual["grads"]) == len(expected["grads"]) > 0, name
    for step, (grads, expected_grads) in enumerate(zip(actual["grads"], expected["grads"])):
        assert grads.keys() == expected_grads.keys(), name
        floor = 1e-3 * max(g.abs().max().item() for g in expected_grads.values())
        for key, value in expected_grads.items():
            _assert_gradient(grads[key], value, floor, f"{name} step {step} gradient of {key}")
    for key, value in expected["weights"].items():
        assert_close(actual["weights"][key], value, RTOL, f"{name} weight {key}")


def _trainer_worker(rank: int, world: int, expected: dict) -> None:
    delta_rule.USE_STATE = False  # the gathered form (tests/test_hybrid_state.py trains the state-passing one)
    _assert_same_training(_trainer_run(world, "zigzag"), expected, f"{TRAINER_FAMILY} Trainer zigzag")
    # recomputation runs each mixer's gather again in backward, in the same order on every rank
    checkpointed = _trainer_run(world, "ulysses", gradient_checkpointing=True)
    _assert_same_training(checkpointed, expected, f"{TRAINER_FAMILY} Trainer ulysses, gradient checkpointing")


def test_trainer_gradient_accumulation():
    run_distributed(_trainer_worker, 2, _trainer_run(1), timeout=900)
