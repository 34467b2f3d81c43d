"""Automatic partial recomputation: the decision as a pure function, and training that stays exact (float32, rtol
1e-5 against the stock Trainer) when the number of recomputed layers changes after step 1 and again after step 2."""

from __future__ import annotations

import itertools
import os

import pytest
import torch
import transformers
from distributed import run_distributed
from trainer_cases import VOCAB, assert_same_run, cp_trainer, run_stock, tiny_config, train_and_record

from transformers_cp import auto_recompute
from transformers_cp.auto_recompute import AutoRecompute, choose_recompute_layers
from transformers_cp.config import ContextParallelConfig, ContextParallelConfigError

GiB = 2**30


@pytest.mark.parametrize(
    "checkpointed,headroom,per_layer,expected",
    [
        (28, 80 * GiB, [3 * GiB] * 28, 2),  # 26 layers' activations fit
        (28, 200 * GiB, [3 * GiB] * 28, 0),  # all fit: nothing recomputed
        (28, 2 * GiB, [3 * GiB] * 28, 28),  # not one layer fits
        (28, -5 * GiB, [3 * GiB] * 28, 28),  # already above the reserve: never more than now, never fewer
        (10, 9 * GiB, [3 * GiB] * 28, 7),  # counted from what is checkpointed now
        (6, 0, [GiB] * 4, 4),  # no more than the model has
        (28, 80 * GiB, [3 * GiB] * 27 + [0], 28),  # a layer not measured: keep the choice
        (4, 7 * GiB, [GiB, 5 * GiB, GiB, 2 * GiB], 2),  # kept from the last layer back while they fit: 2 + 1, not 5
    ],
)
def test_choose_recompute_layers(checkpointed, headroom, per_layer, expected):
    assert choose_recompute_layers(checkpointed, headroom, per_layer) == expected


def test_kept_bytes_are_measured_in_the_whole_recomputation():
    """Each layer's kept bytes are read around what transformers checkpoints (its `forward`, which module hooks never
    see recomputed), where autograd records: in step 1's first forward and in its recomputation, which runs whole
    (no early stop), so the measurement closes in both; a forward under no_grad is not measured. After step 1 the
    layers get their own checkpointing function back."""
    model = transformers.AutoModelForCausalLM.from_config(tiny_config("qwen2", layers=3))
    model.train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    own = [layer._gradient_checkpointing_func for layer in model.model.layers]
    callback = AutoRecompute(ContextParallelConfig(auto_recompute=True))
    args = transformers.TrainingArguments("out", use_cpu=True, gradient_checkpointing=True)
    reads = []

    def fake_allocated():  # every read 10 bytes more, and which one it was
        reads.append(torch.is_grad_enabled())
        return 10 * len(reads)

    original = auto_recompute.allocated_bytes, auto_recompute.device_headroom
    auto_recompute.allocated_bytes = fake_allocated
    auto_recompute.device_headroom = lambda: 0  # a device that reports its memory, no room: nothing is decided
    try:
        callback.on_train_begin(args, transformers.TrainerState(), None, model=model)
        ids = torch.randint(0, VOCAB, (1, 16))
        with torch.no_grad():
            model(input_ids=ids)
        assert callback.kept == {}
        model(input_ids=ids, labels=ids).loss.backward()
        callback.on_step_end(args, transformers.TrainerState(), None, model=model)
    finally:
        auto_recompute.allocated_bytes, auto_recompute.device_headroom = original
    # 3 layers × (forward + recomputation) × 2 reads (the no_grad forward is not checkpointed), each call measured
    # to its end: with the early stop the recomputation would stop inside the layer, before its second read
    assert reads == [True] * (3 * 2 * 2)
    assert callback.kept == {0: 10, 1: 10, 2: 10}
    assert [layer._gradient_checkpointing_func for layer in model.model.layers] == own


def test_on_cpu_nothing_changes():
    """No device memory to read: step 1 runs as configured (nothing wrapped, checkpointing's early stop kept), the
    callback decides nothing, and the layers stay as configured."""
    model = transformers.AutoModelForCausalLM.from_config(tiny_config("qwen2", layers=3))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    callback = AutoRecompute(ContextParallelConfig())
    args = transformers.TrainingArguments("out", use_cpu=True, gradient_checkpointing=True)
    assert callback.wanted(args)  # on by default
    callback.on_train_begin(args, transformers.TrainerState(), None, model=model)
    assert callback.hooks == [] and callback._wrapped == []
    callback.hooks = [torch.nn.Linear(1, 1).register_forward_pre_hook(lambda *a: None)]
    callback.on_step_end(args, None, None, model=model)
    assert callback.chosen is None and callback.hooks == [] and not callback.second_look
    assert all(layer.gradient_checkpointing for layer in model.model.layers)


def test_auto_recompute_must_be_a_bool():
    with pytest.raises(ContextParallelConfigError, match="context_parallel_auto_recompute must be True or False"):
        ContextParallelConfig(auto_recompute="yes")


GB = 10**9
CASES = [  # (headroom after step 1, bytes each kept layer really holds in step 2), layers checkpointed after 1 and 2
    (1 * GB * auto_recompute.MARGIN, GB, 1, 1),  # room for 1 layer, which step 2 fills: one recomputed
    (5 * GB * auto_recompute.MARGIN, GB, 0, 0),  # room for 5: none recomputed
    (1.9 * GB, GB // 2, 1, 0),  # room for 1; it holds half its measure in step 2: the second look keeps the other
]


def _worker(rank, world, ref_path, family, savings):
    for room, real, after_one, after_two in CASES:
        # auto recompute: the default
        trainer = cp_trainer(family, 2, "zigzag", gradient_checkpointing=True, **savings)
        (callback,) = [c for c in trainer.callback_handler.callbacks if isinstance(c, AutoRecompute)]

        def headroom(room=room, real=real, callback=callback):
            """Device memory as a GPU would report it: `room` after step 1; after step 2 what the layers left out
            of checkpointing really took is gone from it."""
            left_out = 0 if callback.chosen is None else 2 - callback.chosen
            return int(room - left_out * real)

        auto_recompute.device_headroom = headroom
        allocated = itertools.count(0, GB)  # each layer's forward leaves 1 GB allocated
        auto_recompute.allocated_bytes = lambda allocated=allocated: next(allocated)
        decisions = []
        trainer.add_callback(Decisions(callback, decisions))
        result = train_and_record(trainer)
        name = f"auto recompute, {family} {savings}, {room / GB:.2f} GB free after step 1, rank {rank}"
        assert_same_run(result, torch.load(ref_path), name)
        assert decisions[:2] == [after_one, after_two], (name, decisions)
        flags = [i < after_two for i in range(2)]
        assert [layer.gradient_checkpointing for layer in trainer.model.model.layers] == flags, name
        assert len(result["grads"]) > 2, name  # steps ran after both decisions


class Decisions(transformers.TrainerCallback):
    """The checkpointed layer count the auto-recompute callback holds at the end of each step (it runs first)."""

    def __init__(self, callback: AutoRecompute, out: list) -> None:
        self.callback, self.out = callback, out

    def on_step_end(self, args, state, control, **kwargs):
        self.out.append(self.callback.chosen)


@pytest.mark.parametrize(
    "family,savings",
    [
        ("qwen2", {}),  # GQA; at these lengths the chunked loss and the tiled MLP stay off
        ("llama", dict(context_parallel_loss_chunk_size=8, context_parallel_mlp_tile_size=8)),  # MHA, savings on
    ],
)
def test_training_stays_exact_when_the_choice_changes_after_step_one(tmp_path, family, savings):
    ref_path = os.path.join(tmp_path, "stock.pt")
    torch.save(run_stock(family), ref_path)
    run_distributed(_worker, 2, ref_path, family, savings)
