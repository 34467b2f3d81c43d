"""A user's script that ends normally exits with 0 on gloo, without `destroy_process_group()` or `os._exit`.

gloo's worker threads release a finished collective's tensors after waking the caller; a script that ended right then
aborted in interpreter finalisation ("terminate called without an active exception") now and then (see
docs/reliability.md). transformers_cp lets those threads finish at exit (`mesh._settle_gloo_workers`). Each repeat
starts two fresh processes under torchrun (`exit_job.py`): a Trainer run as in the README, and a custom loop that ends
right after a collective, the ending most exposed to the race. A failure here is rare by nature: a repeat that aborts
fails the test, with its output.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

EXIT_JOB = os.path.join(os.path.dirname(__file__), "exit_job.py")
REPEATS = {"trainer": 3, "custom": 5}  # about a minute in all on 2 CPU cores


def _run(out: str, kind: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", EXIT_JOB]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}  # an abort prints every thread's stack
    return subprocess.run([*command, out, kind], capture_output=True, text=True, timeout=300, env=env)


@pytest.mark.parametrize("kind", sorted(REPEATS))
def test_script_ending_normally_exits_cleanly(tmp_path, kind):
    for repeat in range(REPEATS[kind]):
        out = tmp_path / str(repeat)
        out.mkdir()
        job = _run(str(out), kind)
        output = (job.stdout + job.stderr)[-4000:]
        assert (out / "done").exists(), f"repeat {repeat}: the work did not finish\n{output}"
        assert job.returncode == 0, f"repeat {repeat}: finished, then failed at exit\n{output}"
        assert "terminate called" not in job.stderr, f"repeat {repeat}\n{output}"
