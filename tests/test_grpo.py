"""transformers_cp.trl's GRPOTrainer and RLOOTrainer with CP equal TRL's trainers without CP: every logged metric
(loss, grad norm, rewards per function, advantages' statistics, completion lengths, KL, entropy, clip ratios, token
counts, eval metrics) at every step and the final weights, in float32 at relative 1e-5.

Completions are sampled (TRL's default sampling, seeded as TRL seeds each process) and rewarded by deterministic
functions of the completion tokens, so both runs train on the same completions. c = 2 on 2 processes against TRL on
1; c = 2 × d = 2 on 4 against TRL on 2. Cases: GRPO's grpo, dr_grpo, bnpo (with the entropy mask, which gathers the
entropies of all ranks, and batch-scaled rewards) and dapo (with num_iterations = 2: old-policy log-probs and
importance ratios that move off 1) losses; a reference model (beta > 0); LoRA with the adapter disabled as the
reference; RLOO with a reference model and a generation batch that spans two optimizer steps (old-policy log-probs),
and with LoRA and num_iterations = 2.
"""

from __future__ import annotations

import os

import pytest
import torch
from distributed import run_distributed

pytest.importorskip("trl")
pytest.importorskip("peft")

CASES = [
    {"trainer": "grpo", "loss_type": "grpo", "beta": 0.04, "mode": "zigzag"},
    {"trainer": "grpo", "loss_type": "dapo", "num_iterations": 2, "mode": "ring"},
    {"trainer": "grpo", "loss_type": "dr_grpo", "beta": 0.04, "lora": True, "mode": "llama3"},
    {
        "trainer": "grpo",
        "loss_type": "bnpo",
        "top_entropy_quantile": 0.5,
        "scale_rewards": "batch",
        "mode": "ulysses",
    },
    {"trainer": "rloo", "beta": 0.05, "steps_per_generation": 4, "mode": "zigzag"},
    {"trainer": "rloo", "beta": 0.05, "lora": True, "num_iterations": 2, "mode": "ring"},
]
DP2_CASES = [CASES[0], CASES[4]]  # c=2 × d=2 against TRL on d=2


def _classes(case: dict, cp: bool):
    import trl

    import transformers_cp.trl as cp_trl

    module = cp_trl if cp else trl
    name = case["trainer"].upper()
    return getattr(module, f"{name}Trainer"), getattr(module, f"{name}Config")


def _cp(case: dict) -> dict:
    return dict(context_parallel_size=2, context_parallel_mode=case["mode"])


def _worker(rank, world, out_dir, cases, cp_size):
    """Each case with CP (cp_size 2) or TRL's trainer (cp_size 1); rank 0 and, with CP, rank 1 save their runs."""
    from trl_cases import run_rl

    for i, case in enumerate(cases):
        cp = _cp(case) if cp_size > 1 else {}
        result = run_rl(*_classes(case, bool(cp)), os.path.join(out_dir, "policy"), case, **cp)
        if rank < cp_size:
            torch.save(result, os.path.join(out_dir, f"w{world}_cp{cp_size}_{i}_rank{rank}.pt"))


@pytest.fixture(scope="module")
def cp_runs(tmp_path_factory):
    out_dir = str(tmp_path_factory.mktemp("grpo_cp"))
    run_distributed(_worker, 2, out_dir, CASES, 2, timeout=900)
    return out_dir


@pytest.mark.parametrize("index", range(len(CASES)), ids=[str(c) for c in CASES])
def test_matches_trl(cp_runs, tmp_path, index):
    from trl_cases import assert_same_run, run_rl

    case = CASES[index]
    expected = run_rl(*_classes(case, False), str(tmp_path / "policy"), case)
    for rank in range(2):
        actual = torch.load(os.path.join(cp_runs, f"w2_cp2_{index}_rank{rank}.pt"))
        assert_same_run(actual, expected, f"{case} rank {rank}")


def test_data_parallel_matches_trl(tmp_path):
    """c=2 on 4 processes equals TRL on 2: rewards are grouped and normalised over the same 2 replicas' batches."""
    from trl_cases import assert_same_run

    run_distributed(_worker, 2, str(tmp_path), DP2_CASES, 1, timeout=600)
    run_distributed(_worker, 4, str(tmp_path), DP2_CASES, 2, timeout=900)
    for i, case in enumerate(DP2_CASES):
        expected = torch.load(tmp_path / f"w2_cp1_{i}_rank0.pt")
        for rank in range(2):
            assert_same_run(torch.load(tmp_path / f"w4_cp2_{i}_rank{rank}.pt"), expected, f"d=2 {case} rank {rank}")


@pytest.mark.parametrize("trainer", ["grpo", "rloo"])
@pytest.mark.parametrize("flag", ["use_vllm", "use_transformers_continuous_batching"])
def test_generation_engines_are_refused_under_cp(tmp_path, trainer, flag):
    """vLLM (server or colocate) and continuous batching are refused at config time, on every rank alike."""
    _, config_class = _classes({"trainer": trainer}, cp=True)
    with pytest.raises(ValueError, match=f"{flag}=True is not supported with context_parallel_size=2"):
        config_class(output_dir=str(tmp_path), use_cpu=True, bf16=False, context_parallel_size=2, **{flag: True})
    assert getattr(config_class(output_dir=str(tmp_path), use_cpu=True, bf16=False, **{flag: True}), flag)


def test_generation_batch_counts_data_parallel_replicas(tmp_path, monkeypatch):
    """TRL sizes the generation batch by its processes: under CP those are the world / c data-parallel replicas."""
    import transformers

    _, config_class = _classes({"trainer": "grpo"}, cp=True)
    monkeypatch.setattr(transformers.TrainingArguments, "world_size", property(lambda self: 4))
    common = dict(output_dir=str(tmp_path), use_cpu=True, bf16=False, per_device_train_batch_size=2, num_generations=2)
    assert config_class(**common, context_parallel_size=2).generation_batch_size == 2 * 2 * 1
    assert config_class(**common).generation_batch_size == 2 * 4 * 1
    with pytest.raises(ValueError, match=r"divisible by the global batch size \(4\)"):
        config_class(**common, context_parallel_size=2, generation_batch_size=6)
