"""DPO throughput with transformers_cp.trl's DPOTrainer: long preference pairs under context parallelism.

Random-init Qwen2.5 shapes in bf16 with gradient checkpointing, one preference pair per step: a prompt of P tokens with
a chosen and a rejected completion of C tokens each, so one packed row of 2·(P + C) tokens (two documents that never
attend to each other) is sharded over the CP group. The reference model is a separate copy of the initial policy
(`--ref model`, one more forward per step) or its log-probabilities are precomputed (`--ref precompute`).

    torchrun --nproc_per_node 2 benchmarks/dpo.py --shape 1.5b --pair-tokens 65536 --steps 4 \
        --out $OUT/dpo_1.5b_2xH200.json
CPU smoke test (gloo):
    torchrun --nproc_per_node 2 benchmarks/dpo.py --shape tiny --pair-tokens 512 --steps 2
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import sys
import time

import torch
import torch.distributed as dist
import transformers
from train import CUDA, SHAPES, StepTimer

EOS = "<eos>"


def word_tokenizer(vocab_size: int) -> transformers.PreTrainedTokenizerFast:
    """Words w0..w{V-2} and <eos> (= pad) as ids 0..V-1: text of random words tokenizes to exactly those ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(vocab_size - 1)} | {EOS: vocab_size - 1}
    core = Tokenizer(models.WordLevel(vocab, unk_token=EOS))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=core, eos_token=EOS, pad_token=EOS)


def pairs(n: int, prompt: int, completion: int, vocab_size: int, seed: int = 1) -> list[dict[str, str]]:
    """Preference pairs of random words: the chosen and rejected texts get an <eos> from TRL (one token each)."""
    g = torch.Generator().manual_seed(seed)

    def text(length: int) -> str:
        return " ".join(f"w{i}" for i in torch.randint(0, vocab_size - 1, (length,), generator=g).tolist())

    return [
        {"prompt": text(prompt), "chosen": " " + text(completion - 1), "rejected": " " + text(completion - 1)}
        for _ in range(n)
    ]


def run(shape: str, pair_tokens: int, mode: str, steps: int, ref: str, world: int) -> dict:
    import datasets

    from transformers_cp.trl import DPOConfig, DPOTrainer

    config = transformers.Qwen2Config(**SHAPES[shape], use_cache=False)
    torch.manual_seed(0)
    with torch.device("cuda" if CUDA else "cpu"):
        model = transformers.Qwen2ForCausalLM(config)
    if CUDA:
        model = model.to(torch.bfloat16)
    ref_model = copy.deepcopy(model) if ref == "model" else None
    prompt = completion = pair_tokens // 4  # prompt+chosen and prompt+rejected: pair_tokens / 2 each
    # On disk, so that every rank finds the cache files TRL writes next to it (precomputed reference log-probs).
    data_dir = f"/tmp/transformers_cp_dpo_bench/data_{shape}_{pair_tokens}_{steps}"
    distributed = dist.is_initialized()
    if not distributed or dist.get_rank() == 0:
        shutil.rmtree(data_dir, ignore_errors=True)
        # A fixed fingerprint: hashing the table pickles pyarrow types, which fails for some pyarrow/dill/Python mixes.
        table = datasets.table.InMemoryTable.from_pylist(pairs(steps, prompt, completion, config.vocab_size))
        datasets.Dataset(table, fingerprint=f"dpo-bench-{shape}-{pair_tokens}-{steps}").save_to_disk(data_dir)
    if distributed:
        dist.barrier()
    data = datasets.load_from_disk(data_dir)
    args = DPOConfig(
        output_dir="/tmp/transformers_cp_dpo_bench", per_device_train_batch_size=1, max_steps=steps,
        learning_rate=1e-6, max_length=None, precompute_ref_log_probs=ref == "precompute", bf16=CUDA,
        use_cpu=not CUDA, gradient_checkpointing=True, logging_steps=1, save_strategy="no", report_to=[],
        disable_tqdm=True, optim="adamw_torch_fused" if CUDA else "adamw_torch", dataloader_num_workers=0,
        context_parallel_size=world, context_parallel_mode=mode,
    )  # fmt: skip
    timer = StepTimer()
    if CUDA:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    trainer = DPOTrainer(
        model=model, ref_model=ref_model, args=args, train_dataset=data,
        processing_class=word_tokenizer(config.vocab_size), callbacks=[timer],
    )  # fmt: skip
    setup_s = time.perf_counter() - start
    trainer.train()
    steady = sorted(timer.times[1:] or timer.times)[len(timer.times[1:] or timer.times) // 2]
    history = [h for h in trainer.state.log_history if "loss" in h]
    row = dict(
        shape=shape, mode=mode, world=world, ref=ref, prompt_tokens=prompt, completion_tokens=completion,
        tokens_per_pair=2 * (prompt + completion), setup_s=round(setup_s, 1), step_s=round(steady, 3),
        tokens_per_s_per_gpu=round(2 * (prompt + completion) / steady / world, 1),
        losses=[round(h["loss"], 5) for h in history],
        rewards_margins=[round(h["rewards/margins"], 5) for h in history],
    )  # fmt: skip
    if CUDA:
        peak = torch.tensor(torch.cuda.max_memory_allocated() / 2**30, device="cuda")
        if distributed:
            dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        row["peak_gib"] = round(peak.item(), 1)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="1.5b", choices=list(SHAPES))
    p.add_argument("--pair-tokens", type=int, default=65536, help="tokens of prompt+chosen plus prompt+rejected")
    p.add_argument("--mode", default="zigzag")
    p.add_argument("--ref", default="model", choices=["model", "precompute"])
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--out", default=None)
    a = p.parse_args()
    from transformers_cp.mesh import init_distributed

    init_distributed()
    world = dist.get_world_size() if dist.is_initialized() else 1
    row = run(a.shape, a.pair_tokens, a.mode, a.steps, a.ref, world)
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(json.dumps(row), flush=True)
        if a.out:
            import trl

            os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
            meta = dict(command=f"torchrun --nproc_per_node {world} {' '.join(sys.argv)}",
                        machine=f"{world}x {torch.cuda.get_device_name() if CUDA else 'cpu'}", torch=torch.__version__,
                        transformers=transformers.__version__, trl=trl.__version__, date=time.strftime("%Y-%m-%d"))  # fmt: skip
            with open(a.out, "w") as f:
                json.dump({"meta": meta, "results": [row]}, f, indent=1)


if __name__ == "__main__":
    main()
