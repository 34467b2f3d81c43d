"""Cost of the per-forward input check (the CP group's fingerprint all-gather, see `transformers_cp.agreement`)
against one training step (forward + backward) of a random-init Qwen2 model on the same packed row.

    torchrun --nproc_per_node 2 benchmarks/input_check.py                          # CPU smoke test (gloo)
    torchrun --nproc_per_node 2 benchmarks/input_check.py --seq 32768 --hidden 1536 --layers 28 --heads 12 \
        --kv_heads 2 --intermediate 8960 --out benchmarks/results/input_check_2xH200.json
"""

from __future__ import annotations

import argparse
import json
import platform

import torch
import torch.distributed as dist
import transformers
from attention import CUDA, timed  # benchmarks/attention.py: the same timing protocol

from transformers_cp import ContextParallelCollator, ContextParallelConfig, apply_context_parallel
from transformers_cp.batch_checks import check_batch
from transformers_cp.mesh import build_mesh, init_distributed
from transformers_cp.state import find_state


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--documents", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv_heads", type=int, default=2)
    parser.add_argument("--intermediate", type=int, default=384)
    parser.add_argument("--mode", default="zigzag")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--out", default=None)
    cli = parser.parse_args()
    init_distributed()
    device = torch.device("cuda", torch.cuda.current_device()) if CUDA else torch.device("cpu")
    mesh = build_mesh(ContextParallelConfig(mode=cli.mode), device.type)
    config = transformers.Qwen2Config(
        vocab_size=32000,
        hidden_size=cli.hidden,
        intermediate_size=cli.intermediate,
        num_hidden_layers=cli.layers,
        num_attention_heads=cli.heads,
        num_key_value_heads=cli.kv_heads,
        max_position_embeddings=cli.seq,
    )
    torch.manual_seed(0)
    dtype = torch.bfloat16 if CUDA else torch.float32
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype).to(device)
    model.gradient_checkpointing_enable()
    apply_context_parallel(model, mesh.config, mesh=mesh)
    per_doc = cli.seq // cli.documents
    g = torch.Generator().manual_seed(0)
    examples = [{"input_ids": torch.randint(0, 32000, (per_doc,), generator=g).tolist()} for _ in range(cli.documents)]
    batch = {k: v.to(device) for k, v in ContextParallelCollator(mesh)(examples).items()}
    state = find_state(model)

    def check() -> None:  # as the pre-forward hook runs it: the document bounds read from the device, then the check
        check_batch(model, state, batch["input_ids"], batch, batch["cu_seq_lens_q"].tolist(), batch["cp_row_checksum"])

    def step() -> None:
        model(**batch).loss.backward()

    check_ms = timed(check, cli.iters * 10)
    step_ms = timed(step, cli.iters)
    result = {
        "device": torch.cuda.get_device_name() if CUDA else platform.processor() or "cpu",
        "world": dist.get_world_size(),
        "mode": cli.mode,
        "seq": cli.seq,
        "shape": {k: getattr(cli, k) for k in ("hidden", "layers", "heads", "kv_heads", "intermediate")},
        "input_check_ms": round(check_ms, 4),
        "train_step_ms": round(step_ms, 2),
        "share_of_step": check_ms / step_ms,
    }
    if dist.get_rank() == 0:
        print(json.dumps(result))
        if cli.out:
            with open(cli.out, "w") as f:
                json.dump(result, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
