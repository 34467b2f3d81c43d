"""The MoE router load-balancing (aux) loss is the stock one under context parallelism and under the memory savings.

MoE families Mixtral and Qwen2-MoE (shared experts), with `output_router_logits=True` and a coefficient large enough
to matter (0.3), against stock transformers.Trainer with DataCollatorWithFlattening: per-step losses, grad norms,
every rank's step loss, eval loss, per-step gradients and final weights (fp32, relative 1e-5; `trainer_cases`).

- c=2 d=1 (one job looping over the cases): zigzag, ulysses and llama3 for both families, with the chunked LM-head
  loss and the tiled MLP forced on the tiny rows (chunks of 7 tokens, tiles of 5) and off. The CP padding tail is part
  of the rows of both families' data, so it being left out of the aux loss is checked too.
- c=2 d=2 (4 processes) against stock d=2, with and without average_tokens_across_devices.
- context_parallel_size=1 with the memory savings on against the stock Trainer (the tiled MLP records the router
  logits once per layer, with their gradient; the chunked loss adds coef · aux_loss).
- A family whose `load_balancing_loss_func` is not the standard formula (Doge) is refused when its aux loss is on, and
  the model's own function is what runs outside a CP forward.

DPO and SFT with an MoE model are in test_trl.py.
"""

from __future__ import annotations

import os

import pytest
import torch
import transformers
from distributed import run_distributed
from test_trainer import _stock_dp_worker
from trainer_cases import (
    arguments,
    assert_same_run,
    build_model,
    flattening_cp_trainer,
    run_cp,
    run_stock,
    train_and_record,
)

import transformers_cp
from transformers_cp.router_loss import check_router_loss, row_load_balancing_loss

FAMILIES = ("mixtral", "qwen2_moe")
SAVINGS = dict(context_parallel_loss_chunk_size=7, context_parallel_mlp_tile_size=5)
# (family, mode, memory savings on)
CP2_DP1 = [
    ("mixtral", "zigzag", True),
    ("mixtral", "zigzag", False),
    ("mixtral", "ulysses", False),
    ("mixtral", "llama3", True),
    ("qwen2_moe", "zigzag", False),
    ("qwen2_moe", "ulysses", True),
    ("qwen2_moe", "llama3", False),
    ("qwen2_moe", "llama3", True),
]
# (family, mode, memory savings on, average_tokens_across_devices)
CP2_DP2 = [("mixtral", "llama3", True, True), ("qwen2_moe", "zigzag", False, False)]


@pytest.fixture(scope="module")
def references(tmp_path_factory) -> str:
    out_dir = str(tmp_path_factory.mktemp("stock_moe"))
    for family in FAMILIES:
        torch.save(run_stock(family), os.path.join(out_dir, f"dp1_{family}.pt"))
    run_distributed(_stock_dp_worker, 2, out_dir, [(family, average) for family, _, _, average in CP2_DP2])
    return out_dir


def _cp_worker(rank, world, ref_dir, cases):
    for family, mode, savings, average_tokens in cases:
        dp = world // 2
        name = f"{family} {mode} c=2 d={dp} savings={savings} average_tokens={average_tokens} rank {rank}"
        extra = SAVINGS if savings else {}
        result = run_cp(family, 2, mode, average_tokens_across_devices=average_tokens, **extra)
        expected = torch.load(os.path.join(ref_dir, f"dp{dp}_{family}.pt"))
        assert_same_run(result, expected, name, dp_rank=rank // 2 if dp > 1 else None)
    _check_stock_function_outside_cp()


def _check_stock_function_outside_cp() -> None:
    """In a process with CP models, a model outside any CP forward gets its family's own function's value."""
    from transformers.models.mixtral import modeling_mixtral

    original = modeling_mixtral.load_balancing_loss_func._context_parallel_original
    model = build_model("mixtral", reference=True)
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    out = model(input_ids=ids, attention_mask=mask, labels=ids)
    want = original(out.router_logits, 4, 2, mask)
    torch.testing.assert_close(out.aux_loss, want, rtol=0, atol=0)


def test_cp2_dp1(references):
    run_distributed(_cp_worker, 2, references, [(f, m, s, True) for f, m, s in CP2_DP1], timeout=600)


def test_cp2_dp2(references):
    run_distributed(_cp_worker, 4, references, CP2_DP2, timeout=600)


@pytest.mark.parametrize("family", FAMILIES)
def test_memory_savings_without_cp(references, family):
    """context_parallel_size=1: the chunked loss returns cross-entropy + coef · aux, the tiled MLP trains the router."""
    args = transformers_cp.TrainingArguments(**arguments(**SAVINGS))
    trainer = flattening_cp_trainer(family, args)
    assert trainer.cp_mesh is None
    expected = torch.load(os.path.join(references, f"dp1_{family}.pt"))
    assert_same_run(train_and_record(trainer), expected, f"{family} size 1 with savings")


def test_other_aux_formulas_are_refused():
    config = transformers.DogeConfig(
        vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, is_moe=True, num_experts=16, num_experts_per_tok=2, output_router_logits=True,
        router_aux_loss_coef=0.1,
    )  # fmt: skip
    model = transformers.AutoModelForCausalLM.from_config(config)
    with pytest.raises(ValueError, match="router auxiliary loss of DogeForCausalLM.*router_aux_loss_coef=0.0"):
        check_router_loss(model)
    check_router_loss(model, coef=0.0)  # off: nothing to refuse
    check_router_loss(model, enabled=False)
    for family in FAMILIES:
        check_router_loss(build_model(family, reference=True))


def test_row_loss_without_a_group_is_the_stock_function():
    """The CP form on one rank (no group) is transformers' function, padding mask included."""
    from transformers.models.qwen2_moe import modeling_qwen2_moe

    function = modeling_qwen2_moe.load_balancing_loss_func
    original = getattr(function, "_context_parallel_original", function)
    g = torch.Generator().manual_seed(1)
    logits = tuple(torch.randn(12, 6, generator=g, requires_grad=True) for _ in range(3))
    mask = torch.ones(3, 4, dtype=torch.long)
    mask[2, 1:] = 0

    class _Mesh:
        cp_group, cp_size = None, 1

    from transformers_cp.router_loss import _Row

    for m in (None, mask):
        got = row_load_balancing_loss(logits, 6, 2, m, row=_Row(_Mesh(), None, False))
        want = original(logits, 6, 2, m)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
        grads = torch.autograd.grad(got, logits)
        want_grads = torch.autograd.grad(want, logits)
        for a, b in zip(grads, want_grads):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)
