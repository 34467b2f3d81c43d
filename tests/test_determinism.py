"""Two CP Trainer runs with the same seed (torchrun, 2 CPU processes each) give bitwise-identical per-step losses
and final weights."""

from __future__ import annotations

import cp_job
import torch


def test_same_seed_same_bits(tmp_path):
    first, second = cp_job.uninterrupted(), cp_job.result(str(tmp_path))
    assert len(first["step_losses"]) == cp_job.MAX_STEPS * cp_job.GRADIENT_ACCUMULATION
    assert first["step_losses"] == second["step_losses"]
    assert first["logged_losses"] == second["logged_losses"]
    assert first["weights"].keys() == second["weights"].keys()
    for name, weight in first["weights"].items():
        assert torch.equal(second["weights"][name], weight), name
