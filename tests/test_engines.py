"""Context parallelism on the engines (CPU, gloo): DDP, FSDP2 and DeepSpeed ZeRO-1/2/3 (ZeRO-3 with parameter and
optimizer CPU offload) with `context_parallel_size=2` equal the stock Trainer without CP on d processes: per-step
losses, gradient norms, eval loss and final weights (fp32, relative 1e-5). Checkpoints are written by the processes
that should write, and a fresh Trainer resumed from the middle step continues with the uninterrupted run's losses and weights. ZeRO-1 and the
c=2 d=2 FSDP2 run use gradient checkpointing.

  c=2 d=1: FSDP2, ZeRO-2, ZeRO-3+offload (each with save/resume), ZeRO-1; DeepSpeed's resume runs under torch.load's
           weights_only default with the classes of `engines.deepspeed_checkpoint_loading` allowed for the load only
  c=2 d=2: DDP (with save/resume), FSDP2 (parameters sharded over all 4 ranks, gradient checkpointing)
  two "nodes" of 2 processes each, launched with `torchrun --nnodes 2` on this machine: groups and training
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import warnings

import pytest
import torch
import torch.distributed as dist
from distributed import run_distributed
from engine_cases import OPTIM_ARGS, run_engine, stock_record
from reference import assert_close
from trainer_cases import run_stock

import transformers_cp
from transformers_cp import ContextParallelConfigError
from transformers_cp.mesh import check_node_placement

RTOL = 1e-5
TESTS = os.path.dirname(os.path.abspath(__file__))
SAVE = dict(save_strategy="steps", save_steps=1)  # a checkpoint per optimizer step (4 with d=1, 2 with d=2)


def _deepspeed_available() -> bool:
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        return False
    return True


needs_deepspeed = pytest.mark.skipif(not _deepspeed_available(), reason="deepspeed is not installed")


@pytest.fixture(scope="module")
def references(tmp_path_factory) -> str:
    """The stock Trainer (no CP, DDP) on d = 1 (this process) and d = 2 processes."""
    out_dir = str(tmp_path_factory.mktemp("stock"))
    torch.save(stock_record(run_stock("llama", optim_args=OPTIM_ARGS)), os.path.join(out_dir, "dp1.pt"))
    run_distributed(_stock_worker, 2, out_dir)
    return out_dir


def _stock_worker(rank, world, out_dir):
    record = stock_record(run_stock("llama", optim_args=OPTIM_ARGS))
    if rank == 0:
        torch.save(record, os.path.join(out_dir, f"dp{world}.pt"))


def assert_same(actual: dict, expected: dict, name: str, steps: list[int] | None = None) -> None:
    """`steps`: the optimizer steps to compare (default: all); a resumed run's history holds the checkpoint's too."""
    steps = sorted(expected["losses"]) if steps is None else steps
    assert len(steps) > 0 and sorted(actual["losses"]) == sorted(expected["losses"]), (name, actual["losses"])
    for key in ("losses", "grad_norms"):
        got = torch.tensor([actual[key][s] for s in steps])
        assert_close(got, torch.tensor([expected[key][s] for s in steps]), RTOL, f"{name} {key}")
    assert_close(torch.tensor(actual["eval_loss"]), torch.tensor(expected["eval_loss"]), RTOL, f"{name} eval loss")
    assert actual["weights"].keys() <= expected["weights"].keys(), name
    for key, value in actual["weights"].items():
        assert_close(value, expected["weights"][key], RTOL, f"{name} weight {key}")


def _checkpoint_files(checkpoint: str) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, f), checkpoint) for d, _, fs in os.walk(checkpoint) for f in fs)


def assert_written_once(checkpoint: str, engine: str, world: int) -> None:
    """One model file; one optimizer/engine state per process only where each process holds a distinct part."""
    files = _checkpoint_files(checkpoint)
    assert files.count("model.safetensors") == 1, files
    assert {f"rng_state_{r}.pth" for r in range(world)} <= set(files), files
    partitions = [f for f in files if f.endswith("optim_states.pt")]
    if engine.startswith("zero"):  # ZeRO partitions the optimizer over all c·d processes
        assert len(partitions) == world, files
        model_states = [f for f in files if f.endswith("model_states.pt")]
        assert len(model_states) == (world if engine.startswith("zero3") else 1), files
    elif engine == "fsdp2":  # full state dicts, gathered to rank 0
        assert partitions == [] and files.count("pytorch_model_fsdp.bin") == files.count("optimizer.bin") == 1, files
    else:
        assert partitions == [] and files.count("optimizer.pt") == 1, files


def _train_and_resume(engine: str, cp: int, out_dir: str, expected: dict, rank: int, world: int) -> None:
    name = f"{engine} c={cp} d={world // cp} rank {rank}"
    full = run_engine(engine, cp, os.path.join(out_dir, engine, "full"), **SAVE)
    assert_same(full, expected, name)
    steps = sorted(full["losses"])
    middle = steps[len(steps) // 2 - 1]
    checkpoint = os.path.join(out_dir, engine, "full", f"checkpoint-{middle}")
    dist.barrier()
    if rank == 0:
        assert_written_once(checkpoint, engine, world)
    resumed = run_engine(engine, cp, os.path.join(out_dir, engine, "resumed"), resume=checkpoint)
    assert_same(resumed, full, f"{name} resumed at step {middle}", steps=[s for s in steps if s > middle])


def _torch_default_deepspeed_loads() -> None:
    """Make DeepSpeed load its checkpoints with torch.load's own default (weights_only=True since torch 2.6), as
    DeepSpeed's other checkpoint engines and older releases do, so that resuming needs the scoped allow-list."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    def load(self, path, map_location=None):
        return torch.load(path, map_location=map_location)

    TorchCheckpointEngine.load = load


def _check_weights_only(checkpoint: str) -> None:
    """Every DeepSpeed file loads with weights_only=True inside the scoped allow-list; optimizer partitions do not
    outside it (the check stays on for the process)."""
    import pickle

    from transformers_cp.engines import deepspeed_checkpoint_loading

    files = [f for f in _checkpoint_files(checkpoint) if f.startswith("global_step")]
    assert files, checkpoint
    for file in files:
        with deepspeed_checkpoint_loading():
            torch.load(os.path.join(checkpoint, file), weights_only=True)
        if file.endswith("optim_states.pt"):
            with pytest.raises(pickle.UnpicklingError):
                torch.load(os.path.join(checkpoint, file), weights_only=True)


def _cp2_dp1_worker(rank, world, ref_dir, out_dir):
    expected = torch.load(os.path.join(ref_dir, "dp1.pt"))
    _torch_default_deepspeed_loads()
    for engine in ("fsdp2", "zero2", "zero3_offload"):
        _train_and_resume(engine, 2, out_dir, expected, rank, world)
        if rank == 0 and engine.startswith("zero"):
            _check_weights_only(os.path.join(out_dir, engine, "full", "checkpoint-1"))
    zero1 = run_engine("zero1", 2, os.path.join(out_dir, "zero1"), gradient_checkpointing=True)
    assert_same(zero1, expected, f"zero1 with gradient checkpointing c=2 d=1 rank {rank}")


@needs_deepspeed
def test_cp2_dp1_fsdp2_and_zero_with_resume(references, tmp_path):
    run_distributed(_cp2_dp1_worker, 2, references, str(tmp_path))


def _cp2_dp2_worker(rank, world, ref_dir, out_dir):
    expected = torch.load(os.path.join(ref_dir, "dp2.pt"))
    _train_and_resume("ddp", 2, out_dir, expected, rank, world)
    fsdp2 = run_engine("fsdp2", 2, os.path.join(out_dir, "fsdp2"), gradient_checkpointing=True)
    assert_same(fsdp2, expected, f"fsdp2 with gradient checkpointing c=2 d=2 rank {rank}")


def test_cp2_dp2_ddp_and_fsdp2(references, tmp_path):
    run_distributed(_cp2_dp2_worker, 4, references, str(tmp_path))


# ---- two nodes -------------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_node_launch(references, tmp_path):
    """`torchrun --nnodes 2 --nproc-per-node 2` twice on this machine: CP groups stay inside a node ({0,1}, {2,3}),
    dp groups span the nodes, and training equals the stock run on 2 processes."""
    port = _free_port()
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([TESTS, os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
        "PYTHONFAULTHANDLER": "1",  # a native abort prints each stack
    }
    launches = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes",
                "2",
                "--node-rank",
                str(node),
                "--nproc-per-node",
                "2",
                "--master-addr",
                "127.0.0.1",
                "--master-port",
                str(port),
                os.path.join(TESTS, "two_node_job.py"),
                str(tmp_path),
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for node in (0, 1)
    ]
    outputs = []
    try:
        for launch in launches:
            outputs.append(launch.communicate(timeout=240)[0])
    finally:
        for launch in launches:
            launch.kill()
    for launch, output in zip(launches, outputs):
        assert launch.returncode == 0, output[-4000:]
    expected = torch.load(os.path.join(references, "dp2.pt"))
    for rank in range(4):
        with open(os.path.join(tmp_path, f"groups_{rank}.json")) as f:
            groups = json.load(f)
        assert groups["node"] == rank // 2, groups
        assert groups["cp"] == [2 * (rank // 2), 2 * (rank // 2) + 1], groups
        assert groups["dp"] == [rank % 2, rank % 2 + 2], groups
        assert_same(torch.load(os.path.join(tmp_path, f"run_{rank}.pt")), expected, f"two nodes rank {rank}")


# ---- bad inputs and placement ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "engine_kwargs, match",
    [
        ({"deepspeed": {"sequence_parallel_size": 2}}, "sequence_parallel_size=2"),
        ({"deepspeed": {"tensor_parallel": {"autotp_size": 2}}}, "autotp_size=2"),
    ],
)
def test_incompatible_deepspeed_settings_fail_before_training(monkeypatch, tmp_path, engine_kwargs, match):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ContextParallelConfigError, match=match):
        transformers_cp.TrainingArguments(output_dir=str(tmp_path), context_parallel_size=2, **engine_kwargs)


def test_deepspeed_config_file_is_checked(monkeypatch, tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"sequence_parallel_size": 2}))
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ContextParallelConfigError, match="sequence_parallel_size"):
        transformers_cp.TrainingArguments(output_dir=str(tmp_path), context_parallel_size=2, deepspeed=str(path))


def test_accelerate_parallelism_config_is_rejected(monkeypatch, tmp_path):
    from accelerate.parallelism_config import ParallelismConfig

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ContextParallelConfigError, match="cp_size=2"):
        transformers_cp.TrainingArguments(
            output_dir=str(tmp_path), context_parallel_size=2, parallelism_config=ParallelismConfig(cp_size=2)
        )


@pytest.mark.parametrize(
    "cp, world, per_node, warns",
    [(2, 8, 4, False), (4, 8, 4, False), (8, 16, 4, False), (3, 12, 4, True), (4, 12, 6, True), (2, 4, None, False)],
)
def test_node_placement_warning(cp, world, per_node, warns):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_node_placement(cp, world, per_node)
    assert bool(caught) == warns and all("processes per node" in str(w.message) for w in caught)
