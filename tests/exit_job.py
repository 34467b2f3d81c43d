"""A user's script that ends normally (no destroy_process_group, no os._exit), for the clean-exit test:

    torchrun --standalone --nproc_per_node 2 tests/exit_job.py OUT {trainer,custom}

`trainer`: the Trainer trains the tiny Qwen2 of trainer_cases with context_parallel_size 2 for 2 steps, as the README's
main job does, and the script ends. `custom`: a custom loop (`apply_context_parallel`, one forward and backward) that
ends right after its last collective, an all-reduce of the loss for logging: the ending most exposed to gloo's exit
race (see `transformers_cp.mesh._settle_gloo_workers`). Rank 0 writes OUT/done with the loss when the work is done, so
that a failure at exit is told apart from a failure before.
"""

from __future__ import annotations

import os
import sys

import torch
import transformers
from trainer_cases import CPTrainer, arguments, build_model, sft_dataset  # the script's directory is on sys.path

import transformers_cp


def trainer_run(out: str) -> float:
    args = transformers_cp.TrainingArguments(**arguments(out, context_parallel_size=2, max_steps=2))
    trainer = CPTrainer(model=build_model("qwen2", reference=False), args=args, train_dataset=sft_dataset(16, 0))
    trainer.step_losses = []
    return trainer.train().training_loss


def custom_run() -> float:
    model = transformers_cp.apply_context_parallel(build_model("qwen2", reference=False))
    mesh = transformers_cp.context_parallel_mesh(model)
    batch = transformers_cp.ContextParallelCollator(mesh)(sft_dataset(4, 0))
    num_items = transformers_cp.count_label_tokens([batch["shift_labels"]], mesh)
    inputs = {k: batch[k] for k in ("input_ids", "position_ids", "cu_seq_lens_q")}
    loss = transformers_cp.context_parallel_loss(model(**inputs).logits, batch["shift_labels"], num_items, mesh)
    loss.backward()
    return float(transformers_cp.reduce_loss_for_logging(loss, mesh))  # the last collective; the script ends here


def main() -> None:
    out, kind = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    transformers.set_seed(0)
    loss = trainer_run(out) if kind == "trainer" else custom_run()
    if int(os.environ["RANK"]) == 0:
        with open(os.path.join(out, "done"), "w") as f:
            f.write(str(loss))


if __name__ == "__main__":
    main()
