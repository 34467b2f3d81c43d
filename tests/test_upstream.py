"""upstream/transformers.patch (docs/upstream.md) on a copy of the installed transformers: it applies with `patch -p1`;
its `context_parallel_*` fields are transformers_cp's (names, types, defaults, help); while they are at their defaults
the stock Trainer stays stock and transformers_cp unimported, and any of them set hands the Trainer over; with
transformers_cp missing, setting one raises an ImportError naming `pip install transformers_cp`; and
`transformers.Trainer(args=transformers.TrainingArguments(context_parallel_size=2))` under torchrun (2 CPU processes,
gloo) trains as the stock Trainer without CP on one process: logged losses, gradient norms, every optimizer step's
gradients, eval loss and final weights (fp32, relative 1e-5), for two families and modes; transformers_cp's own Trainer
keeps doing so on the patched transformers (a third family and mode).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from reference import assert_close
from trainer_cases import RTOL, build_model, run_stock

from transformers_cp import enable_context_parallel

TESTS = Path(__file__).resolve().parent
PATCH = TESTS.parent / "upstream" / "transformers.patch"
UPSTREAM_JOB = TESTS / "upstream_job.py"


@pytest.fixture(scope="module")
def patched(tmp_path_factory) -> Path:
    """A copy of the installed transformers laid out as a source tree (src/transformers), patched; returns src."""
    if shutil.which("patch") is None:
        pytest.skip(
            "the `patch` program is not installed (apt-get install patch), so the upstream patch cannot be applied"
        )
    tree = tmp_path_factory.mktemp("transformers_tree")
    shutil.copytree(Path(transformers.__file__).parent, tree / "src" / "transformers")  # keeps mtimes: .pyc stay valid
    job = subprocess.run(
        ["patch", "-p1", "--forward", "--batch", "-i", str(PATCH)], cwd=tree, capture_output=True, text=True
    )
    assert job.returncode == 0, (
        f"upstream/transformers.patch does not apply to transformers {transformers.__version__} (remake it as "
        f"docs/upstream.md says):\n{job.stdout}{job.stderr}"
    )
    return tree / "src"


def _environment(patched: Path) -> dict[str, str]:
    path = [str(patched), os.environ.get("PYTHONPATH", "")]
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(p for p in path if p),
        "PATCHED_TRANSFORMERS": str(patched),
        "OMP_NUM_THREADS": "1",
        "PYTHONFAULTHANDLER": "1",
    }


# In one process: the fields are transformers_cp's; defaults leave the Trainer stock and transformers_cp unimported;
# then, with transformers_cp hidden, setting a field raises the ImportError.
SINGLE_PROCESS_CHECKS = """
import dataclasses, os, sys
import transformers
assert transformers.__file__.startswith(os.environ["PATCHED_TRANSFORMERS"]), transformers.__file__
args = transformers.TrainingArguments(output_dir=sys.argv[1], use_cpu=True, report_to=[])
config = transformers.LlamaConfig(vocab_size=11, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                                  num_attention_heads=2)
trainer = transformers.Trainer(model=transformers.LlamaForCausalLM(config), args=args)
assert type(trainer) is transformers.Trainer, type(trainer)
assert not [name for name in sys.modules if name.startswith("transformers_cp")], "transformers_cp was imported"

# A field other than the size (a memory saving that works without CP) hands over too, with no mesh.
args = transformers.TrainingArguments(output_dir=sys.argv[1], use_cpu=True, report_to=[],
                                      context_parallel_loss_chunk_size=16)
trainer = transformers.Trainer(model=transformers.LlamaForCausalLM(config), args=args)
from transformers_cp import ContextParallelTrainerMixin
from transformers_cp.chunked_loss import chunked_loss_state
assert isinstance(trainer, ContextParallelTrainerMixin) and trainer.cp_mesh is None, type(trainer)
assert chunked_loss_state(trainer.model) is not None, "the chunked loss was not installed"

import typing
from transformers_cp.training_args import ContextParallelArguments
types = typing.get_type_hints(ContextParallelArguments)  # ours are strings (postponed annotations), theirs types
ours = {f.name: (types[f.name], f.default, f.metadata["help"]) for f in dataclasses.fields(ContextParallelArguments)}
theirs = {f.name: (f.type, f.default, f.metadata["help"]) for f in dataclasses.fields(transformers.TrainingArguments)
          if f.name.startswith("context_parallel_")}
assert theirs == ours, (f"the patch's fields differ from transformers_cp's (python upstream/regenerate_patch.py):"
                        f"\\n{theirs}\\n{ours}")

for name in [name for name in sys.modules if name.startswith("transformers_cp")]:
    del sys.modules[name]
sys.modules["transformers_cp"] = None  # as if not installed
transformers.utils.import_utils.is_transformers_cp_available.cache_clear()  # it was found above
try:
    transformers.TrainingArguments(output_dir=sys.argv[1], use_cpu=True, context_parallel_size=2)
except ImportError as error:
    assert "pip install transformers_cp" in str(error) and "context_parallel_size" in str(error), error
else:
    raise AssertionError("no ImportError without transformers_cp")
"""


def test_patch_fields_defaults_and_missing_package(patched, tmp_path):
    job = subprocess.run(
        [sys.executable, "-c", SINGLE_PROCESS_CHECKS, str(tmp_path)],
        env=_environment(patched),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert job.returncode == 0, (job.stdout + job.stderr)[-4000:]


def test_stock_trainer_hands_over_and_trains_as_without_cp(patched, tmp_path):
    from upstream_job import CASES

    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    job = subprocess.run(
        [*command, str(UPSTREAM_JOB), str(tmp_path)],
        env=_environment(patched),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert job.returncode == 0, (job.stdout + job.stderr)[-4000:]
    for family, mode, _ in CASES:
        actual = torch.load(tmp_path / f"{family}.pt")
        expected = run_stock(family)  # transformers as installed, one process, DataCollatorWithFlattening
        name = f"{family} {mode}"
        assert len(actual["losses"]) == len(expected["losses"]) > 0, name
        assert_close(torch.tensor(actual["losses"]), torch.tensor(expected["losses"]), RTOL, f"{name} losses")
        grad_norms = torch.tensor(actual["grad_norms"]), torch.tensor(expected["grad_norms"])
        assert_close(*grad_norms, RTOL, f"{name} grad norms")
        eval_loss = torch.tensor(actual["eval_loss"]), torch.tensor(expected["eval_loss"])
        assert_close(*eval_loss, RTOL, f"{name} eval loss")
        assert len(actual["grads"]) == len(expected["grads"]) > 0, name
        for step, (grads, expected_grads) in enumerate(zip(actual["grads"], expected["grads"])):
            assert grads.keys() == expected_grads.keys(), name
            for key, value in expected_grads.items():
                assert_close(grads[key], value, RTOL, f"{name} step {step} gradient of {key}")
        assert actual["weights"].keys() == expected["weights"].keys(), name
        for key, value in expected["weights"].items():
            assert_close(actual["weights"][key], value, RTOL, f"{name} weight {key}")


def test_arguments_without_the_fields_are_refused(tmp_path):
    """Without the patch, transformers' arguments have no context_parallel_* fields to hand over."""
    args = transformers.TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    trainer = transformers.Trainer(model=build_model("llama", reference=False), args=args)
    with pytest.raises(TypeError, match="no context_parallel_\\* fields.*transformers_cp.TrainingArguments"):
        enable_context_parallel(trainer)


def test_trl_trainers_are_pointed_to_transformers_cp_trl():
    """TRL's trainers override what the mixin overrides: the refusal names transformers_cp.trl (the torchrun job checks
    the refusal of a user's subclass, raised on every rank)."""
    trl = pytest.importorskip("trl")
    from transformers_cp.integration import _check_overrides

    for trainer_class in (trl.SFTTrainer, trl.DPOTrainer):
        with pytest.raises(ValueError, match=f"{trainer_class.__name__} defines compute_loss.*transformers_cp.trl"):
            _check_overrides(trainer_class)
