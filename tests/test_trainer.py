"""transformers_cp.Trainer on c·d processes equals stock transformers.Trainer with DataCollatorWithFlattening on d
processes: per-step losses, gradient norms, every rank's step loss, eval loss, predictions, the inputs that
compute_metrics gets with include_for_metrics=["inputs"] (whole rows) and final weights (fp32, relative 1e-5), with gradient accumulation 2, two examples per micro-batch, prompt tokens masked with -100, and a
partial last batch (13 training and 7 eval examples).

The stock references are computed once: d = 1 in this process, d = 2 in one 2-process job. Each CP job loops over
several (family, mode) cases so that processes start once. Combinations (family, mode[, ulysses size]):
  c=2 d=1: llama × every mode, qwen2 zigzag/ulysses, qwen3 llama3/ring, mistral zigzag/ulysses
  c=4 d=1: llama hybrid(2×2), qwen2 ulysses, qwen3 zigzag, mistral ring
  c=2 d=2: llama llama3, qwen2 hybrid, mistral ring (with average_tokens_across_devices=False)
  c=4 d=2: qwen3 zigzag
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator

import pytest
import torch
import torch.distributed as dist
import transformers
from distributed import run_distributed
from reference import assert_close
from trainer_cases import (
    CPTrainer,
    arguments,
    assert_same_run,
    build_model,
    cp_trainer,
    run_cp,
    run_stock,
    sft_dataset,
    train_and_record,
)

import transformers_cp
from transformers_cp import ContextParallelConfig, apply_context_parallel, build_mesh, gather_sequence, shard_batch

FAMILIES = ("llama", "qwen2", "qwen3", "mistral")
PREDICT_FAMILY = "llama"  # predictions are compared for this family's runs
# Stock d=2 references: (family, average_tokens_across_devices).
DP2_REFERENCES = [("llama", True), ("qwen2", True), ("qwen3", True), ("mistral", False)]

CP2_DP1 = [
    (2, "llama", "ring", None),
    (2, "llama", "zigzag", None),
    (2, "llama", "llama3", None),
    (2, "llama", "ulysses", None),
    (2, "llama", "hybrid", 2),
    (2, "qwen2", "zigzag", None),
    (2, "qwen2", "ulysses", None),
    (2, "qwen3", "llama3", None),
    (2, "qwen3", "ring", None),
    (2, "mistral", "zigzag", None),
    (2, "mistral", "ulysses", None),
]
CP4_DP1 = [
    (4, "llama", "hybrid", 2),
    (4, "qwen2", "ulysses", None),
    (4, "qwen3", "zigzag", None),
    (4, "mistral", "ring", None),
]
# mistral: with average_tokens_across_devices=False (token counts per dp rank, no world-size factor)
CP2_DP2 = [(2, "llama", "llama3", None), (2, "qwen2", "hybrid", 2), (2, "mistral", "ring", None)]
CP4_DP2 = [(4, "qwen3", "zigzag", None)]


def _average_tokens(family: str, dp: int) -> bool:
    return dict(DP2_REFERENCES)[family] if dp == 2 else True


def _stock_dp_worker(rank, world, out_dir, references):
    for family, average_tokens in references:
        result = run_stock(family, predict=family == PREDICT_FAMILY, average_tokens_across_devices=average_tokens)
        per_rank = [None] * world
        dist.all_gather_object(per_rank, result["step_losses"])
        result["step_losses"] = per_rank
        if rank == 0:
            torch.save(result, os.path.join(out_dir, f"dp{world}_{family}.pt"))


@pytest.fixture(scope="module")
def references(tmp_path_factory) -> str:
    out_dir = str(tmp_path_factory.mktemp("stock"))
    for family in FAMILIES:
        torch.save(run_stock(family, predict=family == PREDICT_FAMILY), os.path.join(out_dir, f"dp1_{family}.pt"))
    run_distributed(_stock_dp_worker, 2, out_dir, DP2_REFERENCES)
    return out_dir


def _cp_worker(rank, world, ref_dir, cases, checks=()):
    for size, family, mode, ulysses_size in cases:
        dp = world // size
        average_tokens = _average_tokens(family, dp)
        name = f"{family} {mode} c={size} d={dp} average_tokens={average_tokens} rank {rank}"
        predict = family == PREDICT_FAMILY
        result = run_cp(family, size, mode, ulysses_size, predict, average_tokens_across_devices=average_tokens)
        expected = torch.load(os.path.join(ref_dir, f"dp{dp}_{family}.pt"))
        assert_same_run(result, expected, name, dp_rank=rank // size if dp > 1 else None)
    for check in checks:  # in the same processes
        check(rank, world, ref_dir)


@contextlib.contextmanager
def _library_logs() -> Iterator[list[str]]:
    """The messages transformers_cp logs (through transformers' logging, at INFO) while open."""
    logger = logging.getLogger("transformers.transformers_cp")
    messages: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield messages
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def _size_beyond_the_job(rank, world, ref_dir):
    """Arguments for 4 CP ranks build on 2 processes; the Trainer raises on every rank, before any group is made."""
    args = transformers_cp.TrainingArguments(**arguments(context_parallel_size=2 * world))
    with pytest.raises(transformers_cp.ContextParallelConfigError) as error:
        CPTrainer(model=build_model("llama", reference=False), args=args, train_dataset=sft_dataset(4, 0))
    assert f"context_parallel_size={2 * world} must divide the number of processes ({world})" in str(error.value)


def _fsdp_on_cpu(rank, world, ref_dir):
    """fsdp on CPU processes trains with DDP, says so, and gives the run without CP (and without FSDP)."""
    with _library_logs() as messages:
        trainer = cp_trainer("llama", world, "zigzag", fsdp=True)
    assert not trainer.is_fsdp_enabled
    warned = [m for m in messages if "fsdp is set" in m and "trains with DDP" in m]
    setup = [m for m in messages if m.startswith("Context parallelism:")]
    assert (len(warned), len(setup)) == ((1, 1) if rank == 0 else (0, 0)), messages  # once, on the main process
    if setup:
        for words in ("mode zigzag", f"{world} CP ranks × 1 data-parallel", "attention kernel 'math'", "chunked LM"):
            assert words in setup[0], setup[0]
    expected = torch.load(os.path.join(ref_dir, "dp1_llama.pt"))
    assert_same_run(train_and_record(trainer), expected, f"fsdp on CPU rank {rank}")


def _auto_hybrid(rank, world, ref_dir):
    """hybrid without a Ulysses degree on nodes of 2 processes: Ulysses 2 × ring 2, chosen from the model, logged."""
    os.environ["LOCAL_WORLD_SIZE"] = "2"  # as torchrun sets it on nodes of 2 processes
    with _library_logs() as messages:
        trainer = cp_trainer("llama", world, "hybrid")
    assert (trainer.cp_mesh.layout.ulysses, trainer.cp_mesh.layout.ring) == (2, 2)
    if rank == 0:
        assert any("Ulysses degree 2 × ring degree 2" in m for m in messages), messages
        assert any("(Ulysses 2 × ring 2)" in m for m in messages if m.startswith("Context parallelism:")), messages
    else:
        assert not messages, messages
    expected = torch.load(os.path.join(ref_dir, "dp1_llama.pt"))
    assert_same_run(train_and_record(trainer), expected, f"auto hybrid rank {rank}")


def test_cp2_dp1_every_family_and_mode(references):
    run_distributed(_cp_worker, 2, references, CP2_DP1, (_size_beyond_the_job, _fsdp_on_cpu))


def test_cp4_dp1_and_cp2_dp2(references):
    run_distributed(_cp_worker, 4, references, CP4_DP1 + CP2_DP2, (_auto_hybrid,))


def test_cp4_dp2(references):
    run_distributed(_cp_worker, 8, references, CP4_DP2)


# ---- checkpoints, resume, two models -----------------------------------------------------------------------------


def _checkpoint_worker(rank, world, out_dir):
    kwargs = dict(context_parallel_size=2, save_strategy="steps", save_steps=2)

    def trainer(output_dir):
        args = transformers_cp.TrainingArguments(**arguments(output_dir, **kwargs))
        return CPTrainer(model=build_model("qwen2", reference=False), args=args, train_dataset=sft_dataset(12, 0))

    full = trainer(os.path.join(out_dir, "full"))
    full.step_losses = []
    full.train()
    checkpoint = os.path.join(out_dir, "full", "checkpoint-2")
    dist.barrier()
    if rank == 0:
        files = sorted(os.listdir(checkpoint))
        assert files.count("model.safetensors") == 1 and "optimizer.pt" in files, files
        assert {f"rng_state_{r}.pth" for r in range(world)} <= set(files), files
        with open(os.path.join(checkpoint, "config.json")) as f:
            saved = json.load(f)
        # The checkpoint loads without transformers_cp: the CP attention is not saved as the model's attention.
        assert saved.get("_attn_implementation", saved.get("attn_implementation")) != "context_parallel", saved
        model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint)
        assert model.config._attn_implementation != "context_parallel"

    resumed = trainer(os.path.join(out_dir, "resumed"))
    resumed.step_losses = []
    resumed.train(resume_from_checkpoint=checkpoint)
    losses = {h["step"]: h["loss"] for h in full.state.log_history if "loss" in h}
    resumed_losses = {h["step"]: h["loss"] for h in resumed.state.log_history if "loss" in h}
    assert len(resumed.step_losses) == 2 and sorted(resumed_losses) == sorted(losses) == [1, 2, 3]  # 2 micro-batches
    assert_close(torch.tensor(resumed_losses[3]), torch.tensor(losses[3]), 1e-5, "loss after resume")
    for (name, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert_close(b, a, 1e-5, f"weight {name} after resume")


def test_checkpoint_written_once_and_resumable(tmp_path):
    run_distributed(_checkpoint_worker, 2, str(tmp_path))


def _two_models_worker(rank, world):
    flatten = transformers.DataCollatorWithFlattening(return_tensors="pt")
    batch = flatten(sft_dataset(3, 5))
    models, meshes, expected = {}, {}, {}
    for family, mode in (("llama", "zigzag"), ("qwen2", "ulysses")):
        models[family] = build_model(family, reference=True)
        with torch.no_grad():
            expected[family] = models[family](input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
        meshes[family] = build_mesh(ContextParallelConfig(size=world, mode=mode), "cpu")
        apply_context_parallel(models[family], meshes[family].config, mesh=meshes[family])
    num_tokens = batch["input_ids"].shape[1]
    for family in ("llama", "qwen2", "llama"):  # interleaved: each model keeps its own CP settings
        shard = shard_batch(batch, meshes[family])
        inputs = {k: shard[k] for k in ("input_ids", "position_ids", "cu_seq_lens_q")}
        with torch.no_grad():
            logits = models[family](**inputs).logits
        full = gather_sequence(logits, meshes[family])[:, :num_tokens]
        assert_close(full, expected[family], 1e-5, f"{family} logits")


def test_two_models_in_one_process():
    run_distributed(_two_models_worker, 2)


# ---- context_parallel_size == 1 ------------------------------------------------------------------------------------


def test_size_one_is_the_stock_trainer():
    """transformers_cp.Trainer with context_parallel_size=1 and the user's collator is the stock Trainer."""
    args = transformers_cp.TrainingArguments(**arguments())
    trainer = CPTrainer(
        model=build_model("llama", reference=True),
        args=args,
        data_collator=transformers.DataCollatorWithFlattening(),
        train_dataset=sft_dataset(13, 0),
        eval_dataset=sft_dataset(7, 1),
    )
    assert trainer.cp_mesh is None and isinstance(trainer.data_collator, transformers.DataCollatorWithFlattening)
    assert_same_run(train_and_record(trainer), run_stock("llama"), "size 1")
