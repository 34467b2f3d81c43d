"""transformers' own `Trainer` and `TrainingArguments`, patched with upstream/transformers.patch, under torchrun
(CPU, gloo, 2 processes); run by tests/test_upstream.py with the patched copy of transformers first on PYTHONPATH:

    torchrun --standalone --nproc_per_node 2 tests/upstream_job.py OUT

Each case trains `transformers.Trainer(args=transformers.TrainingArguments(context_parallel_size=2, ...))` on a tiny
model of trainer_cases (no transformers_cp class named; one case uses transformers_cp's own classes) and, on rank 0, saves to OUT/<family>.pt the logged losses and
gradient norms, the gradients of every optimizer step, the eval loss and the final weights. Before that, every rank
checks that the patched arguments refuse a conflicting setting, and that a Trainer subclass whose overrides the
hand-over would skip is refused, both before any collective.
"""

from __future__ import annotations

import os
import sys

import torch
import transformers
from distributed import leave  # the script's directory is on sys.path
from trainer_cases import GradientRecorder, arguments, build_model, sft_dataset

import transformers_cp

# (family, mode, whose Trainer and TrainingArguments): transformers_cp's own classes must keep working on the patched
# transformers (they set themselves up; the hand-over leaves them alone).
CASES = [("llama", "zigzag", transformers), ("qwen2", "ulysses", transformers), ("qwen3", "llama3", transformers_cp)]


def expect_error(build, *words: str) -> None:
    try:
        build()
    except ValueError as error:
        assert all(word in str(error) for word in words), f"{words} not all in: {error}"
    else:
        raise AssertionError(f"no error; expected one naming {words}")


def check_refusals(out: str) -> None:
    from accelerate.parallelism_config import ParallelismConfig

    both = dict(context_parallel_size=2, parallelism_config=ParallelismConfig(cp_size=2))
    expect_error(lambda: transformers.TrainingArguments(**arguments(out, **both)), "parallelism_config.cp_size=2")

    class OwnLossTrainer(transformers.Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    args = transformers.TrainingArguments(**arguments(out, context_parallel_size=2))
    words = ("OwnLossTrainer defines compute_loss", "transformers_cp.Trainer")
    expect_error(lambda: OwnLossTrainer(model=build_model("llama", reference=False), args=args), *words)


def train(out: str, family: str, mode: str, classes) -> dict:
    args = classes.TrainingArguments(**arguments(out, context_parallel_size=2, context_parallel_mode=mode))
    trainer = classes.Trainer(
        model=build_model(family, reference=False),
        args=args,
        train_dataset=sft_dataset(13, 0),
        eval_dataset=sft_dataset(7, 1),
    )
    assert isinstance(trainer, transformers_cp.ContextParallelTrainerMixin) and type(trainer).__name__ == "Trainer"
    assert trainer.cp_mesh.cp_size == 2 and trainer.cp_mesh.config.mode == mode
    recorder = GradientRecorder()
    trainer.add_callback(recorder)
    trainer.train()
    return {
        "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
        "grad_norms": [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h],
        "eval_loss": trainer.evaluate()["eval_loss"],
        "grads": recorder.grads,
        "weights": {k: v.detach().clone() for k, v in trainer.model.state_dict().items()},
    }


def main(out: str) -> None:
    assert transformers.__file__.startswith(os.environ["PATCHED_TRANSFORMERS"]), transformers.__file__
    check_refusals(out)
    for family, mode, classes in CASES:
        result = train(out, family, mode, classes)
        if int(os.environ["RANK"]) == 0:
            torch.save(result, os.path.join(out, f"{family}.pt"))
    leave()


if __name__ == "__main__":
    main(sys.argv[1])
