"""GRPO with long completions: transformers_cp.trl's GRPOTrainer under CP against TRL's GRPOTrainer on one GPU.

Random-init Qwen2.5-1.5B shape in bf16 with gradient checkpointing and TRL's default loss (dapo, beta 0: no reference
model). Each optimizer step trains one prompt of P tokens with its G = 2 completions of exactly C tokens, one
completion per micro-batch (per_device_train_batch_size 1, gradient accumulation 2), so each forward is one sequence
of P + C tokens: under CP it is sharded over the GPUs, with TRL alone it runs on one GPU.

Rollouts: by default a fixed rollout (TRL's `rollout_func`) returns C - 1 random tokens and <eos> per completion, the
same on every rank (seeded by the step): a random-init model's `generate` of 16k-64k tokens takes minutes a step and
runs without CP in both trainers, so the benchmark measures what CP changes, the scoring and training of the long
sequences. `--generate` uses TRL's `generate` instead, with min_new_tokens = max_new_tokens = C (slow).

Reports step time (median after the first step) and peak memory per completion length, and with `--search` the
longest completion length that trains one optimizer step (doubling from the last listed length, then bisecting to
`--search-step`).

    torchrun --nproc_per_node 2 benchmarks/grpo.py --completions 16384,32768,65536 --search \
        --out benchmarks/results/grpo_1.5b_2xH200.json
    python benchmarks/grpo.py --trl --completions 16384,32768,65536 --search \
        --out benchmarks/results/grpo_1.5b_trl_1xH200.json
CPU smoke test (gloo; tiny shape, short completions, both trainers):
    torchrun --nproc_per_node 2 benchmarks/grpo.py --smoke && python benchmarks/grpo.py --smoke --trl
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.distributed as dist
import transformers
from dpo import word_tokenizer
from train import CUDA, SHAPES, StepTimer, failure_recorded, progress, record_peak

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # rollout_func is experimental in TRL
GENERATIONS = 2


def fixed_rollout(completion_tokens: int, vocab_size: int):
    """TRL's `rollout_func`: the prompts' ids and completions of `completion_tokens` random ids ending in <eos>."""

    def rollout(prompts: list[str], trainer) -> dict:
        eos = trainer.processing_class.eos_token_id
        g = torch.Generator().manual_seed(trainer.state.global_step)
        completions = [
            [*torch.randint(0, vocab_size - 1, (completion_tokens - 1,), generator=g).tolist(), eos] for _ in prompts
        ]
        prompt_ids = trainer.processing_class(prompts, add_special_tokens=False)["input_ids"]
        return {"prompt_ids": prompt_ids, "completion_ids": completions, "logprobs": None}

    return rollout


def parity_reward(completion_ids: list[list[int]], **kwargs) -> list[float]:
    return [sum(i % 2 for i in ids) / len(ids) for ids in completion_ids]


def run_one(shape: str, prompt: int, completion: int, steps: int, world: int, use_trl: bool, generate: bool) -> dict:
    import datasets

    if use_trl:
        from trl import GRPOConfig, GRPOTrainer

        cp = {}
    else:
        from transformers_cp.trl import GRPOConfig, GRPOTrainer

        cp = dict(context_parallel_size=world, context_parallel_mode="zigzag")
    config = transformers.Qwen2Config(**SHAPES[shape])
    torch.manual_seed(0)
    with torch.device("cuda" if CUDA else "cpu"):
        model = transformers.Qwen2ForCausalLM(config)
    if CUDA:
        model = model.to(torch.bfloat16)
    g = torch.Generator().manual_seed(1)
    prompts = [
        {"prompt": " ".join(f"w{i}" for i in torch.randint(0, config.vocab_size - 1, (prompt,), generator=g).tolist())}
        for _ in range(steps)
    ]
    args = GRPOConfig(
        output_dir="/tmp/transformers_cp_grpo_bench", per_device_train_batch_size=1, gradient_accumulation_steps=2,
        num_generations=GENERATIONS, max_completion_length=completion, max_steps=steps, learning_rate=1e-6,
        generation_kwargs={"min_new_tokens": completion} if generate else None, bf16=CUDA, use_cpu=not CUDA,
        gradient_checkpointing=True, logging_steps=1, save_strategy="no", report_to=[], disable_tqdm=True,
        optim="adamw_torch_fused" if CUDA else "adamw_torch", dataloader_num_workers=0, **cp,
    )  # fmt: skip
    timer = StepTimer()
    if CUDA:
        torch.cuda.reset_peak_memory_stats()
    row: dict = dict(shape=shape, trainer="trl" if use_trl else f"transformers_cp cp={world}", gpus=world,
                     prompt_tokens=prompt, completion_tokens=completion, rollout="generate" if generate else "fixed")  # fmt: skip
    with failure_recorded(row):
        trainer = GRPOTrainer(
            model=model, reward_funcs=parity_reward, args=args, train_dataset=datasets.Dataset.from_list(prompts),
            processing_class=word_tokenizer(config.vocab_size), callbacks=[timer],
            rollout_func=None if generate else fixed_rollout(completion, config.vocab_size),
        )  # fmt: skip
        trainer.train()
        times = timer.times[1:] or timer.times
        history = [h for h in trainer.state.log_history if "loss" in h]
        row.update(step_s=round(sorted(times)[len(times) // 2], 3), losses=[round(h["loss"], 5) for h in history],
                   completion_lengths=[h["completions/mean_length"] for h in history])  # fmt: skip
        del trainer
    del model
    record_peak(row)
    progress(json.dumps(row))
    return row


def longest(run, ok: int, bad: int | None, limit: int, step: int) -> dict:
    """From the longest length known to train (`ok`) and the shortest known to fail (`bad`, None if none): double
    until a step fails, then bisect to a multiple of `step`."""
    tried = []
    while bad is None and ok * 2 <= limit:
        tried.append(run(ok * 2))
        ok, bad = (ok, ok * 2) if "error" in tried[-1] else (ok * 2, None)
    while bad is not None and bad - ok > step:
        mid = (ok + bad) // 2 // step * step
        tried.append(run(mid))
        ok, bad = (mid, bad) if "error" not in tried[-1] else (ok, mid)
    return dict(longest_ok=ok, first_failing=bad, tried=tried)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="1.5b", choices=list(SHAPES))
    p.add_argument("--prompt-tokens", type=int, default=1024)
    p.add_argument("--completions", default="16384,32768,65536", help="completion lengths to time, comma-separated")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--trl", action="store_true", help="TRL's GRPOTrainer (one process, no CP)")
    p.add_argument("--generate", action="store_true", help="generate completions (slow), not a fixed rollout")
    p.add_argument("--search", action="store_true", help="also search the longest completion length that trains")
    p.add_argument("--search-limit", type=int, default=1 << 20)
    p.add_argument("--search-step", type=int, default=16384)
    p.add_argument("--smoke", action="store_true", help="tiny shape, 64-token prompts, 128/256-token completions")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    if a.smoke:
        a.shape, a.prompt_tokens, a.completions, a.steps, a.search_limit, a.search_step = "tiny", 64, "128", 2, 256, 64
    from transformers_cp.mesh import init_distributed

    if not a.trl:
        init_distributed()
    world = dist.get_world_size() if dist.is_initialized() else 1
    if a.trl and world != 1:
        raise SystemExit("--trl runs TRL's trainer on one GPU: launch it with python, not torchrun")
    lengths = [int(x) for x in a.completions.split(",")]

    def run(length: int) -> dict:
        return run_one(a.shape, a.prompt_tokens, length, a.steps, world, a.trl, a.generate)

    results: dict = {"timed": [run(length) for length in lengths]}
    if a.search:
        trained = [r["completion_tokens"] for r in results["timed"] if "error" not in r]
        failed = [r["completion_tokens"] for r in results["timed"] if "error" in r]
        results["longest"] = longest(
            lambda length: run_one(a.shape, a.prompt_tokens, length, 1, world, a.trl, a.generate),
            max(trained, default=0),
            min(failed, default=None),
            a.search_limit,
            a.search_step,
        )
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(json.dumps(results), flush=True)
        if a.out:
            import trl

            os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
            launcher = "python" if world == 1 else f"torchrun --nproc_per_node {world}"
            meta = dict(command=f"{launcher} {' '.join(sys.argv)}",
                        machine=f"{world}x {torch.cuda.get_device_name() if CUDA else 'cpu'}", torch=torch.__version__,
                        transformers=transformers.__version__, trl=trl.__version__, date=time.strftime("%Y-%m-%d"))  # fmt: skip
            with open(a.out, "w") as f:
                json.dump({"meta": meta, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
