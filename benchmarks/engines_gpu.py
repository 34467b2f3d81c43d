"""DeepSpeed ZeRO-2 and ZeRO-3 (parameters and optimizer offloaded to CPU) with context parallelism, against the same
engine without it, in bf16 on GPUs.

For each setting the driver launches two torchrun jobs on this machine:
- reference: the stock `transformers.Trainer` with `DataCollatorWithFlattening` on 1 GPU under the same DeepSpeed
  config (the same global batch; with one process ZeRO partitions nothing, but the bf16 engine, its fp32 master
  weights, optimizer, offload and gradient clipping are the same code);
- CP: `transformers_cp.Trainer` with `context_parallel_size=2` on 2 GPUs (d = 1), which equals the stock run on 1 process
  (README: same losses and weights as the stock Trainer on d processes).
It writes one JSON with both loss sequences, the largest relative loss difference and the largest relative weight
difference (max |w_cp - w_ref| / max |w_ref| over each tensor, the worst tensor reported) per setting.

    python benchmarks/engines_gpu.py --out $OUT/engines_2xH200.json            # GPU, ~2-4 minutes
    python benchmarks/engines_gpu.py --out /tmp/engines_cpu.json --tiny --device cpu   # CPU smoke test

The model is a random-init Qwen2-like decoder (hidden 512, 8 layers, 8 query / 2 KV heads, vocab 32000: 57M
parameters); the data are random token documents of 256-2048 tokens, packed per batch. The optimizer is torch's SGD
with momentum (`zero_force_ds_cpu_optimizer: false`: offloading compiles no DeepSpeed CPU Adam), as in the CPU tests:
Adam's first steps are lr · g / |g|, which turns the rounding of a gradient that cancels to ~0 into an O(lr) weight
change and would hide the comparison.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

SETTINGS = {
    "zero2": {"stage": 2},
    "zero3_offload": {
        "stage": 3,
        "offload_optimizer": {"device": "cpu"},
        "offload_param": {"device": "cpu"},
        "stage3_gather_16bit_weights_on_model_save": True,
    },
}


def deepspeed_config(setting: str, bf16: bool) -> dict:
    return {
        "zero_optimization": SETTINGS[setting],
        "zero_force_ds_cpu_optimizer": False,
        "bf16": {"enabled": bf16},
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "train_batch_size": "auto",
        "gradient_clipping": "auto",
    }


def model_config(tiny: bool):
    import transformers

    if tiny:
        sizes = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, vocab_size=1000)
    else:
        sizes = dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=8, vocab_size=32000)
    return transformers.Qwen2Config(
        num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=8192, use_cache=False, **sizes
    )


def dataset(tiny: bool, vocab: int) -> list[dict[str, list[int]]]:
    import torch

    g = torch.Generator().manual_seed(0)
    low, high = (16, 64) if tiny else (256, 2048)
    out = []
    for _ in range(16):
        length = int(torch.randint(low, high + 1, (1,), generator=g))
        out.append({"input_ids": torch.randint(0, vocab, (length,), generator=g).tolist()})
    return out


def worker(setting: str, cp: int, tiny: bool, device: str, out_file: str) -> None:
    """One process of a torchrun job: train, then rank 0 saves losses and the full weights."""
    import torch
    import transformers

    import transformers_cp

    config = model_config(tiny)
    torch.manual_seed(0)
    # Built before the arguments: no zero.Init, so both runs start from these seeded weights.
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    common = dict(
        output_dir=os.path.join(os.path.dirname(out_file), f"run_{setting}_cp{cp}"),
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        max_steps=4,
        learning_rate=0.05,
        optim="sgd",
        optim_args="momentum=0.9",
        bf16=device == "cuda",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        seed=0,
        disable_tqdm=True,
        deepspeed=deepspeed_config(setting, bf16=device == "cuda"),
        use_cpu=device == "cpu",
    )
    data = dataset(tiny, config.vocab_size)
    if cp == 1:
        args = transformers.TrainingArguments(**common)
        trainer = transformers.Trainer(
            model=model, args=args, train_dataset=data, data_collator=transformers.DataCollatorWithFlattening()
        )
    else:
        args = transformers_cp.TrainingArguments(context_parallel_size=cp, **common)
        trainer = transformers_cp.Trainer(model=model, args=args, train_dataset=data)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    weights = full_weights(trainer)
    if trainer.args.process_index == 0:
        engine = type(trainer.model_wrapped).__name__  # DeepSpeedEngine where DeepSpeed really ran
        torch.save({"losses": losses, "weights": weights, "train_seconds": seconds, "engine": engine}, out_file)


def full_weights(trainer) -> dict:
    import torch

    params = list(trainer.model.named_parameters())
    if trainer.is_deepspeed_enabled and trainer.accelerator.state.deepspeed_plugin.zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters([p for _, p in params]):
            return {name: p.detach().float().cpu().clone() for name, p in params}
    return {name: p.detach().to(torch.float32).cpu().clone() for name, p in params}


def launch(setting: str, cp: int, tiny: bool, device: str, work: str) -> dict:
    out_file = os.path.join(work, f"{setting}_cp{cp}.pt")
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={cp}", os.path.abspath(__file__),
        "--worker", setting, "--cp", str(cp), "--device", device, "--result", out_file,
    ] + (["--tiny"] if tiny else [])  # fmt: skip
    start = time.perf_counter()
    subprocess.run(command, check=True)
    import torch

    result = torch.load(out_file)
    result["wall_seconds"] = time.perf_counter() - start
    return result


def compare(reference: dict, cp: dict) -> dict:
    import torch

    ref_losses, cp_losses = torch.tensor(reference["losses"]), torch.tensor(cp["losses"])
    worst_name, worst = None, 0.0
    for name, expected in reference["weights"].items():
        diff = ((cp["weights"][name] - expected).abs().max() / expected.abs().max()).item()
        if diff >= worst:
            worst_name, worst = name, diff
    return {
        "reference_losses": reference["losses"],
        "cp_losses": cp["losses"],
        "max_rel_loss_diff": ((cp_losses - ref_losses).abs() / ref_losses.abs()).max().item(),
        "max_rel_weight_diff": worst,
        "worst_weight": worst_name,
        "engines": [reference["engine"], cp["engine"]],
        "reference_wall_seconds": round(reference["wall_seconds"], 1),
        "cp_wall_seconds": round(cp["wall_seconds"], 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="JSON file to write")
    parser.add_argument("--tiny", action="store_true", help="a tiny model and short documents (smoke test)")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--worker", choices=sorted(SETTINGS), help=argparse.SUPPRESS)
    parser.add_argument("--cp", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.cp, args.tiny, args.device, args.result)
        return
    import torch

    report = {
        "device": torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu",
        "torch": torch.__version__,
        "command": " ".join(sys.argv),
        "settings": {},
    }
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as work:
        for setting in SETTINGS:
            reference = launch(setting, 1, args.tiny, args.device, work)
            with_cp = launch(setting, 2, args.tiny, args.device, work)
            report["settings"][setting] = compare(reference, with_cp)
            print(setting, json.dumps(report["settings"][setting]), flush=True)
    report["total_seconds"] = round(time.perf_counter() - start, 1)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
