"""Faults under torchrun (CPU, gloo, 2 processes): a rank that raises mid-step brings the whole job down with its error
within a bounded time, and a job whose worker is SIGKILLed mid-training, resumed from its last checkpoint, gives
exactly the losses and weights of the uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import cp_job
import torch

FAULT_BOUND = 60.0  # seconds from the fault to the end of every process


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _pids(out: str) -> list[int]:
    return [int(open(os.path.join(out, f"pid{rank}")).read()) for rank in range(2)]


def test_a_rank_that_raises_mid_step_ends_the_job(tmp_path):
    out = str(tmp_path)
    job = cp_job.run(out, "--fail_rank", "1", "--fail_step", "3")
    ended = time.time()
    output = job.stdout + job.stderr
    assert job.returncode != 0, output[-3000:]
    assert "RuntimeError: injected fault on rank 1 at step 3" in output, output[-3000:]
    fault = float(open(os.path.join(out, "fault_time")).read())
    assert ended - fault < FAULT_BOUND, f"the job took {ended - fault:.0f}s to end after the fault"
    assert not any(_alive(pid) for pid in _pids(out)), "a worker outlived the job"
    assert not os.path.exists(os.path.join(out, "result.pt"))


def _wait_for_checkpoint(out: str, step: int, job: subprocess.Popen, timeout: float = 240.0) -> str:
    """The checkpoint directory once both ranks' parts of it are written (rank 0 writes trainer_state.json last)."""
    path = os.path.join(out, f"checkpoint-{step}")
    deadline = time.monotonic() + timeout
    while not all(os.path.exists(os.path.join(path, f)) for f in ("trainer_state.json", "rng_state_1.pth")):
        assert job.poll() is None, "the job ended before writing its first checkpoint"
        assert time.monotonic() < deadline, f"no {path} within {timeout:.0f}s"
        time.sleep(0.05)
    return path


def test_sigkill_then_resume_reproduces_the_uninterrupted_run(tmp_path):
    expected = cp_job.uninterrupted()
    killed = str(tmp_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = cp_job.command(killed, "--step_sleep", "0.5")
    log = tmp_path / "killed.log"
    with open(log, "w") as stream:  # a file, not a pipe: an unread pipe could fill up and stall the job
        job = subprocess.Popen(command, stdout=stream, stderr=subprocess.STDOUT, env=env)
        checkpoint = _wait_for_checkpoint(killed, cp_job.SAVE_STEPS, job)
        os.kill(_pids(killed)[1], signal.SIGKILL)
        job.wait(timeout=FAULT_BOUND)
    assert job.returncode != 0, log.read_text()[-3000:]
    assert not os.path.exists(os.path.join(killed, "result.pt")), "the worker was killed only after the run ended"
    assert not any(_alive(pid) for pid in _pids(killed)), "a worker outlived the job"

    resumed = cp_job.result(killed, "--resume", checkpoint)
    done = cp_job.SAVE_STEPS * cp_job.GRADIENT_ACCUMULATION  # training_step calls before the checkpoint
    assert len(resumed["step_losses"]) == len(expected["step_losses"]) - done > 0
    assert resumed["step_losses"] == expected["step_losses"][done:]
    assert resumed["logged_losses"] == expected["logged_losses"]
    for name, weight in expected["weights"].items():
        assert torch.equal(resumed["weights"][name], weight), name
