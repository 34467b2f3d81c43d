"""A tiny context-parallel training job for the fault, resume and determinism tests (CPU, gloo, under torchrun):

    torchrun --standalone --nproc_per_node 2 tests/cp_job.py OUT [--fail_rank R --fail_step K] [--step_sleep S]
        [--resume CHECKPOINT]

It trains the tiny Qwen2 of trainer_cases with context_parallel_size 2 (zigzag) and AdamW for 12 steps, saving a
checkpoint every 4. It writes OUT/pid<rank> at start (for a test that kills a worker) and, on rank 0 at the end,
OUT/result.pt: the per-step losses each `training_step` returned (full precision), the logged losses and the final
weights. `--fail_rank/--fail_step` make that rank raise inside the model's forward at that step, while its peer waits
in an attention collective; `--step_sleep` slows every step so that a test can kill a worker mid-run.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import transformers
from distributed import leave  # the script's directory is on sys.path
from trainer_cases import CPTrainer, arguments, build_model, sft_dataset

import transformers_cp

MAX_STEPS = 12
SAVE_STEPS = 4
GRADIENT_ACCUMULATION = 2  # trainer_cases.arguments' default: two training_step calls per optimizer step


def command(out: str, *flags: str) -> list[str]:
    """The torchrun command line of this job on 2 CPU processes (a free port each time)."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        __file__,
        out,
        *flags,
    ]


def run(out: str, *flags: str, timeout: float = 300.0) -> subprocess.CompletedProcess:
    """Run the job to its end; its output (both ranks, and torchrun's) is returned as text."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}  # a native abort prints each stack
    return subprocess.run(command(out, *flags), capture_output=True, text=True, timeout=timeout, env=env)


def result(out: str, *flags: str) -> dict:
    """Run the job to its end in `out` and return what it saved (it must succeed)."""
    job = run(out, *flags)
    assert job.returncode == 0, (job.stdout + job.stderr)[-3000:]
    return torch.load(os.path.join(out, "result.pt"))


_UNINTERRUPTED: list[dict] = []


def uninterrupted() -> dict:
    """The default job's result, run once per test session (the fault and determinism tests both compare with it)."""
    if not _UNINTERRUPTED:
        _UNINTERRUPTED.append(result(tempfile.mkdtemp(prefix="cp_job_")))
    return _UNINTERRUPTED[0]


class Sleep(transformers.TrainerCallback):
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def on_step_end(self, args, state, control, **kwargs):
        time.sleep(self.seconds)


def inject_fault(trainer: transformers.Trainer, step: int, out: str) -> None:
    """Raise in the second decoder layer's forward at `step`: the peers are then inside the first layer's ring."""

    def hook(module, args):
        if trainer.state.global_step == step:
            with open(os.path.join(out, "fault_time"), "w") as f:
                f.write(str(time.time()))
            raise RuntimeError(f"injected fault on rank {dist.get_rank()} at step {step}")

    trainer.model.model.layers[1].register_forward_pre_hook(hook)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--fail_rank", type=int, default=None)
    parser.add_argument("--fail_step", type=int, default=None)
    parser.add_argument("--step_sleep", type=float, default=0.0)
    parser.add_argument("--resume", default=None)
    cli = parser.parse_args()
    rank = int(os.environ["RANK"])
    with open(os.path.join(cli.out, f"pid{rank}"), "w") as f:
        f.write(str(os.getpid()))
    torch.set_num_threads(1)

    args = transformers_cp.TrainingArguments(
        **arguments(
            cli.out,
            context_parallel_size=2,
            optim="adamw_torch",
            learning_rate=1e-2,
            max_steps=MAX_STEPS,
            save_strategy="steps",
            save_steps=SAVE_STEPS,
            eval_strategy="no",
        )
    )
    trainer = CPTrainer(model=build_model("qwen2", reference=False), args=args, train_dataset=sft_dataset(64, 0))
    trainer.step_losses = []
    if cli.step_sleep:
        trainer.add_callback(Sleep(cli.step_sleep))
    if cli.fail_rank == rank:
        inject_fault(trainer, cli.fail_step, cli.out)
    trainer.train(resume_from_checkpoint=cli.resume)
    if rank == 0:
        result = {
            "step_losses": trainer.step_losses,
            "logged_losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
            "weights": {k: v.detach().clone() for k, v in trainer.model.state_dict().items()},
        }
        torch.save(result, os.path.join(cli.out, "result.pt"))
    leave()


if __name__ == "__main__":
    main()
