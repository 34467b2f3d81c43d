"""Automatic partial recomputation: the decision as a pure function, and training that stays exact (float32, rtol
1e-5 against the stock Trainer) when the number of recomputed layers changes after step 1."""

from __future__ import annotations

import os

import pytest
import torch
import transformers
from distributed import run_distributed
from trainer_cases import assert_same_run, cp_trainer, run_stock, train_and_record

from transformers_cp import auto_recompute
from transformers_cp.auto_recompute import AutoRecompute, choose_recompute_layers, layer_activation_bytes
from transformers_cp.config import ContextParallelConfig, ContextParallelConfigError

GiB = 2**30


@pytest.mark.parametrize(
    "layers,checkpointed,headroom,per_layer,expected",
    [
        (28, 28, 80 * GiB, 3 * GiB, 2),  # 26 layers' activations fit
        (28, 28, 200 * GiB, 3 * GiB, 0),  # all fit: nothing recomputed
        (28, 28, 2 * GiB, 3 * GiB, 28),  # not one layer fits
        (28, 28, -5 * GiB, 3 * GiB, 28),  # already above the reserve: never more than now, never fewer
        (28, 10, 9 * GiB, 3 * GiB, 7),  # counted from what is checkpointed now
        (4, 6, 0, GiB, 4),  # no more than the model has
        (28, 28, 80 * GiB, 0, 28),  # no estimate: keep the choice
    ],
)
def test_choose_recompute_layers(layers, checkpointed, headroom, per_layer, expected):
    assert choose_recompute_layers(layers, checkpointed, headroom, per_layer) == expected


def test_the_estimate_matches_the_measured_layer_at_the_1_5b_shape():
    """3.04 GiB per layer was measured (2×H200, 32k tokens per rank, bf16: 107 GiB with no layer recomputed against
    21.7 GiB with all 28); the estimate before its margin is within 5 %, and it drops the MLP part when tiled."""
    model = torch.nn.Module()
    model.config = transformers.Qwen2Config(hidden_size=1536, intermediate_size=8960, num_attention_heads=12)
    plain = layer_activation_bytes(model, 32768, 2, mlp_tiled=False) / auto_recompute.MARGIN
    assert abs(plain / GiB - 3.04) / 3.04 < 0.05, plain / GiB
    assert layer_activation_bytes(model, 32768, 2, mlp_tiled=True) / auto_recompute.MARGIN < plain / 2


def test_on_cpu_the_choice_stays():
    """No device memory to read: the callback decides nothing and the layers stay as configured."""
    callback = AutoRecompute(ContextParallelConfig())
    callback.hook = torch.nn.Linear(1, 1).register_forward_pre_hook(lambda *a: None)
    callback.on_step_end(transformers.TrainingArguments("out", use_cpu=True), None, None, model=torch.nn.Linear(1, 1))
    assert callback.chosen is None and callback.hook is None


def test_auto_recompute_must_be_a_bool():
    with pytest.raises(ContextParallelConfigError, match="context_parallel_auto_recompute must be True or False"):
        ContextParallelConfig(auto_recompute="yes")


CASES = [(1, [True, False]), (5, [False, False])]  # room for 1 layer: one recomputed; for 5: none


def _worker(rank, world, ref_path):
    for headroom_layers, expected_flags in CASES:
        # Device memory as a GPU would report it after step 1: room for `headroom_layers` layers' activations.
        auto_recompute.device_headroom = lambda n=headroom_layers: n * 10**9
        auto_recompute.layer_activation_bytes = lambda *args, **kwargs: 10**9
        trainer = cp_trainer("qwen2", 2, "zigzag", gradient_checkpointing=True, context_parallel_auto_recompute=True)
        result = train_and_record(trainer)
        name = f"auto recompute, room for {headroom_layers} layers, rank {rank}"
        assert_same_run(result, torch.load(ref_path), name)
        (callback,) = [c for c in trainer.callback_handler.callbacks if isinstance(c, AutoRecompute)]
        assert callback.chosen == expected_flags.count(True), name
        assert [layer.gradient_checkpointing for layer in trainer.model.model.layers] == expected_flags, name
        assert len(result["grads"]) > 1, name  # steps ran after the change


def test_training_stays_exact_when_the_choice_changes_after_step_one(tmp_path):
    ref_path = os.path.join(tmp_path, "stock.pt")
    torch.save(run_stock("qwen2"), ref_path)
    run_distributed(_worker, 2, ref_path)
