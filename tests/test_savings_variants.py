"""The long-sequence memory savings together with the attention variants, the hybrids' mixers and GRPO under CP.

transformers_cp.Trainer on 2 ranks with the chunked LM-head loss (7-token chunks), the tiled MLP (5-token tiles) and
the offload of the checkpointed layers' inputs forced on, under gradient checkpointing, equals the stock Trainer with
none of them (losses, gradient norms, every rank's step loss, eval loss, every step's gradients and the final
weights; float32, relative 1e-5) for attention sinks (gpt-oss), logit softcapping and a final logit softcap (Gemma 2),
chunked attention (Llama 4) and a hybrid (Jamba: Mamba layers passing their state across ranks, MoE); the tiled MLP
of MoE blocks that return their router output too. GRPO scores the
logits itself, so it takes the tiled MLP (equal to TRL's GRPO without CP) but refuses an explicit chunked loss, on
every rank as the trainer is built.
"""

from __future__ import annotations

import os

import pytest
import test_attention_variants as variants
import test_hybrid as hybrid
import torch
from distributed import run_distributed
from reference import assert_close
from trainer_cases import RTOL, CPTrainer, arguments, assert_same_run, sft_dataset, train_and_record

import transformers_cp
from transformers_cp.memory import memory_savings_on
from transformers_cp.tiled_mlp import apply_tiled_mlp
from transformers_cp.training_args import arguments_config

SAVINGS = dict(
    context_parallel_loss_chunk_size=7,
    context_parallel_mlp_tile_size=5,
    context_parallel_offload_activations=True,
    gradient_checkpointing=True,
)
ON = ["chunked LM-head loss (7-token chunks)", "tiled MLP (5-token tiles)", "activation offload"]
VARIANT_CASES = [("gpt_oss", "zigzag"), ("gemma2", "ulysses"), ("llama4_text", "llama3")]
HYBRID_FAMILY = "jamba"  # Mamba layers passing their state across ranks, MoE and MLP blocks
HYBRID_MODE = "zigzag"


def _assert_savings_on(trainer: CPTrainer, name: str) -> None:
    on = memory_savings_on(trainer.model, arguments_config(trainer.args).memory_savings)
    assert on == ON, f"{name}: savings on {on}"


def _variant_run(family: str, mode: str) -> dict:
    args = transformers_cp.TrainingArguments(
        **arguments(context_parallel_size=2, context_parallel_mode=mode, **SAVINGS)
    )
    trainer = CPTrainer(
        model=variants.build(family, reference=False, attn=variants.TRAINER_FAMILIES[family]),
        args=args,
        train_dataset=sft_dataset(13, 0),
        eval_dataset=sft_dataset(7, 1),
    )
    _assert_savings_on(trainer, f"{family} {mode}")
    return train_and_record(trainer)


def _trainer_worker(rank: int, world: int, ref_dir: str, hybrid_expected: dict) -> None:
    for family, mode in VARIANT_CASES:
        expected = torch.load(os.path.join(ref_dir, f"{family}.pt"))
        assert_same_run(_variant_run(family, mode), expected, f"{family} {mode} with savings, rank {rank}")
    actual = hybrid._trainer_run(world, HYBRID_MODE, HYBRID_FAMILY, **SAVINGS)
    name = f"{HYBRID_FAMILY} {HYBRID_MODE} with savings, rank {rank}"
    hybrid._assert_same_training(actual, hybrid_expected, name)


def test_savings_with_attention_variants_and_mixers_equal_the_stock_trainer(tmp_path):
    for family, _ in VARIANT_CASES:
        torch.save(variants._stock_run(family), tmp_path / f"{family}.pt")
    run_distributed(_trainer_worker, 2, str(tmp_path), hybrid._trainer_run(1, family=HYBRID_FAMILY), timeout=900)


@pytest.mark.parametrize("family", ["gpt_oss", "llama4_text"])
def test_tiled_mlp_of_moe_blocks_that_return_their_router_output(family):
    """gpt-oss's MoE block returns (output, router scores), Llama 4's (`feed_forward`) its output flattened to
    (B·S, H) and its router logits: tiled over two rows, with the router aux loss on (gpt-oss), the loss and every
    gradient are the plain model's."""
    model = variants.build(family)
    model.config.output_router_logits, model.config.router_aux_loss_coef = True, 0.3
    ids = torch.randint(3, variants.VOCAB, (2, 13), generator=torch.Generator().manual_seed(1))

    def loss_and_grads() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model.zero_grad()
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        assert family != "gpt_oss" or out.aux_loss > 0, family  # Llama 4's causal LM computes no aux loss
        return out.loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}

    expected = loss_and_grads()
    apply_tiled_mlp(model, 5)
    loss, grads = loss_and_grads()
    assert_close(loss, expected[0], RTOL, f"{family} loss")
    assert grads.keys() == expected[1].keys(), family
    for key, value in expected[1].items():
        assert_close(grads[key], value, RTOL, f"{family} gradient of {key}")


# --- GRPO -----------------------------------------------------------------------------------------------------------

GRPO_CASE = {"trainer": "grpo", "loss_type": "grpo", "beta": 0.04, "mode": "zigzag"}


def _grpo_worker(rank: int, world: int, out_dir: str) -> None:
    from test_grpo import _classes
    from trl_cases import run_rl

    cp = dict(context_parallel_size=2, context_parallel_mode=GRPO_CASE["mode"])
    with pytest.raises(ValueError, match=r"context_parallel_loss_chunk_size=7 cannot be used with GRPOTrainer"):
        run_rl(*_classes(GRPO_CASE, True), os.path.join(out_dir, "policy"), GRPO_CASE,
               context_parallel_loss_chunk_size=7, **cp)  # fmt: skip
    result = run_rl(
        *_classes(GRPO_CASE, True), os.path.join(out_dir, "policy"), GRPO_CASE, context_parallel_mlp_tile_size=5, **cp
    )
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))


def test_grpo_with_tiled_mlp_equals_trl_and_refuses_the_chunked_loss(tmp_path):
    pytest.importorskip("trl")
    from test_grpo import _classes
    from trl_cases import assert_same_run as assert_same_rl_run
    from trl_cases import run_rl

    run_distributed(_grpo_worker, 2, str(tmp_path), timeout=900)
    expected = run_rl(*_classes(GRPO_CASE, False), str(tmp_path / "policy"), GRPO_CASE)
    for rank in range(2):
        actual = torch.load(tmp_path / f"rank{rank}.pt")
        assert_same_rl_run(actual, expected, f"GRPO with the tiled MLP, rank {rank}")
