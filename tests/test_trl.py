"""transformers_cp.trl's SFTTrainer and DPOTrainer with CP (c = 2, one data-parallel rank) equal TRL's trainers
without CP on the same data: every logged number (losses, grad norms, DPO rewards / accuracies / margins / log-probs,
entropy, token counts, eval metrics) and the final weights, in float32 at relative 1e-5, with gradient accumulation 2
and partial last batches.

DPO cases (loss type, reference): sigmoid and IPO (length-normalised) with a separate reference model, sigmoid_norm
(length-normalised) with precomputed reference log-probs, sigmoid and IPO with LoRA (the reference is the policy
without its adapter). TRL's DPO has no padding-free mode (it is disabled in trl 1.16), so the reference is its padded
mode. SFT cases: padding-free, packing, LoRA, against TRL's SFTTrainer with padding_free=True. One DPO case also
runs with c = 2 on 4 processes against TRL on 2 (data parallelism).
"""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch
from distributed import run_distributed

pytest.importorskip("trl")
pytest.importorskip("peft")

DPO_CASES = [
    {"loss_type": "sigmoid", "ref": "model", "mode": "zigzag"},
    {"loss_type": "ipo", "ref": "model", "mode": "ring"},
    {"loss_type": "sigmoid_norm", "ref": "precompute", "mode": "zigzag"},
    {"loss_type": "sigmoid", "ref": "lora", "mode": "llama3"},
    {"loss_type": "ipo", "ref": "lora", "mode": "ulysses"},
]
DP2_CASE = {"loss_type": "sigmoid", "ref": "model", "mode": "zigzag"}  # c=2 × d=2 against TRL on d=2
SFT_CASES = [{"mode": "zigzag"}, {"mode": "ring", "packing": True}, {"mode": "zigzag", "lora": True}]


def _cp(case: dict) -> dict:
    return dict(context_parallel_size=2, context_parallel_mode=case["mode"])


def _worker(rank, world, out_dir, dpo_cases, sft_cases):
    from trl_cases import run_dpo, run_sft

    import transformers_cp.trl as cp_trl

    for i, case in enumerate(dpo_cases):
        result = run_dpo(cp_trl.DPOTrainer, cp_trl.DPOConfig, os.path.join(out_dir, f"cp_data_{i}"), case, **_cp(case))
        torch.save(result, os.path.join(out_dir, f"dpo_{i}_rank{rank}.pt"))
    for i, case in enumerate(sft_cases):
        result = run_sft(cp_trl.SFTTrainer, cp_trl.SFTConfig, case, **_cp(case))
        torch.save(result, os.path.join(out_dir, f"sft_{i}_rank{rank}.pt"))


def _dp_worker(rank, world, out_dir, cp_size):
    """TRL's DPOTrainer on 2 processes (cp_size 1) or ours on 4 (c=2, d=2); rank 0 saves its run."""
    import trl
    from trl_cases import run_dpo

    import transformers_cp.trl as cp_trl

    data_dir = os.path.join(out_dir, f"data_cp{cp_size}")
    if cp_size == 1:
        result = run_dpo(trl.DPOTrainer, trl.DPOConfig, data_dir, DP2_CASE)
    else:
        result = run_dpo(cp_trl.DPOTrainer, cp_trl.DPOConfig, data_dir, DP2_CASE, **_cp(DP2_CASE))
    if rank == 0:
        torch.save(result, os.path.join(out_dir, f"dp2_cp{cp_size}.pt"))


def test_dpo_data_parallel_matches_trl(tmp_path):
    """c=2 on 4 processes equals TRL on 2: DDP averages over 4 ranks, and the loss needs no dp factor."""
    from trl_cases import assert_same_run

    run_distributed(_dp_worker, 2, str(tmp_path), 1, timeout=600)
    run_distributed(_dp_worker, 4, str(tmp_path), 2, timeout=600)
    expected = torch.load(tmp_path / "dp2_cp1.pt")
    assert_same_run(torch.load(tmp_path / "dp2_cp2.pt"), expected, f"dpo d=2 {DP2_CASE}")


@pytest.fixture(scope="module")
def cp_runs(tmp_path_factory):
    out_dir = str(tmp_path_factory.mktemp("trl_cp"))
    run_distributed(_worker, 2, out_dir, DPO_CASES, SFT_CASES, timeout=900)
    return out_dir


@pytest.mark.parametrize("index", range(len(DPO_CASES)), ids=[f"{c['loss_type']}-{c['ref']}" for c in DPO_CASES])
def test_dpo_matches_trl(cp_runs, tmp_path, index):
    import trl
    from trl_cases import assert_same_run, run_dpo

    expected = run_dpo(trl.DPOTrainer, trl.DPOConfig, str(tmp_path), DPO_CASES[index])
    for rank in range(2):
        actual = torch.load(os.path.join(cp_runs, f"dpo_{index}_rank{rank}.pt"))
        assert_same_run(actual, expected, f"dpo {DPO_CASES[index]} rank {rank}")


@pytest.mark.parametrize("index", range(len(SFT_CASES)), ids=[str(c) for c in SFT_CASES])
def test_sft_matches_trl(cp_runs, index):
    import trl
    from trl_cases import assert_same_run, run_sft

    expected = run_sft(trl.SFTTrainer, trl.SFTConfig, SFT_CASES[index])
    for rank in range(2):
        actual = torch.load(os.path.join(cp_runs, f"sft_{index}_rank{rank}.pt"))
        assert_same_run(actual, expected, f"sft {SFT_CASES[index]} rank {rank}")


def test_import_is_lazy_and_names_the_extra(monkeypatch):
    import importlib
    import subprocess

    code = "import sys, transformers_cp; assert 'trl' not in sys.modules and 'transformers_cp.trl' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ})
    monkeypatch.setitem(sys.modules, "trl", None)  # as if trl were not installed
    monkeypatch.delitem(sys.modules, "transformers_cp.trl", raising=False)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "trl" else object())
    with pytest.raises(ImportError, match=r'pip install -e "\.\[trl\]"\` in the transformers_cp checkout'):
        importlib.import_module("transformers_cp.trl")


def test_config_validates_context_parallel_fields(tmp_path, monkeypatch):
    from transformers_cp import ContextParallelConfigError
    from transformers_cp.trl import DPOConfig, SFTConfig

    for config_class in (SFTConfig, DPOConfig):
        common = dict(output_dir=str(tmp_path), use_cpu=True, bf16=False)
        args = config_class(**common, context_parallel_mode="ring")
        assert args.context_parallel_config.mode == "ring" and not args.context_parallel_config.enabled
        assert json.loads(args.to_json_string())["context_parallel_mode"] == "ring"
        # Checked before TRL's and transformers' own setup, against the job's size.
        monkeypatch.setenv("WORLD_SIZE", "4")
        with pytest.raises(ContextParallelConfigError, match="context_parallel_size=3"):
            config_class(**common, context_parallel_size=3)
        with pytest.raises(ContextParallelConfigError, match="context_parallel_mode='rings'"):
            config_class(**common, context_parallel_size=2, context_parallel_mode="rings")
        monkeypatch.delenv("WORLD_SIZE")
