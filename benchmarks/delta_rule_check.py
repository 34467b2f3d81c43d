"""The delta-rule mixers under CP on the GPU, with the kernels the model itself uses there (flash-linear-attention's
chunked gated delta rule, causal-conv1d, when installed): one packed row through a Qwen3-Next-shaped model (its real
linear-attention head sizes, 16 key and 32 value heads of 128, so the state-passing run carries 256 value columns;
four layers, random init) under CP against each document run alone, logits and every parameter gradient, in float32
and bfloat16, for the state-passing form (`transformers_cp.delta_rule`) and the gathered one (the stock mixer per
document: the same kernel calls as the reference, so its errors are the yardstick of the rounding CP itself adds).

    torchrun --nproc_per_node 2 benchmarks/delta_rule_check.py --out benchmarks/results/delta_rule_check_2xH200.json
    torchrun --nproc_per_node 2 benchmarks/delta_rule_check.py --smoke --out /tmp/delta_rule_check.json   # CPU

The errors are those of benchmarks/model_sweep.py (worst relative error of the logits and of any gradient, a zero
gradient against 1e-3 of the largest one); the JSON records the kernels found.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.distributed as dist
import transformers
from hybrid import kernels
from model_sweep import _errors
from reference import per_document
from train import CUDA, ResultsFile, progress

# Shorter than a shard, one token, longer than a shard (spanning chunks of both ranks in zigzag), a tail
DOCS = [1000, 1, 5000, 195, 1996]
SMOKE_DOCS = [5, 1, 40, 11, 7]


def config(smoke: bool) -> transformers.PretrainedConfig:
    size = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16,
                ) if smoke else dict(
                hidden_size=1024, intermediate_size=2048, num_attention_heads=8, num_key_value_heads=2, head_dim=128,
                linear_num_key_heads=16, linear_num_value_heads=32, linear_key_head_dim=128,
                linear_value_head_dim=128)  # fmt: skip
    return transformers.Qwen3NextConfig(
        **size, vocab_size=4096, num_hidden_layers=4, layer_types=["linear_attention"] * 3 + ["full_attention"],
        mlp_only_layers=[0, 1, 2, 3], linear_conv_kernel_dim=4, max_position_embeddings=1 << 16, use_cache=False,
    )  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--modes", default="zigzag,ring,ulysses")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU, for a check of the script")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    from transformers_cp import ContextParallelConfig, apply_context_parallel, delta_rule, remove_context_parallel
    from transformers_cp.mesh import build_mesh, init_distributed

    init_distributed()
    world, rank = dist.get_world_size(), dist.get_rank()
    device = torch.device("cuda", torch.cuda.current_device()) if CUDA else torch.device("cpu")
    docs = SMOKE_DOCS if a.smoke else DOCS
    meta = dict(command=" ".join([f"torchrun --nproc_per_node {world}", *sys.argv]), docs=docs,
                machine=f"{world}x {torch.cuda.get_device_name() if CUDA else 'cpu'}", torch=torch.__version__,
                transformers=transformers.__version__, kernels=kernels(), date=time.strftime("%Y-%m-%d"))  # fmt: skip
    results = ResultsFile(meta, a.out, rank)
    ids = torch.randint(3, 4096, (1, sum(docs)), generator=torch.Generator().manual_seed(1)).to(device)
    targets = torch.full_like(ids, -100)
    targets[:, :-1] = ids[:, 1:]
    targets[0, torch.tensor(docs).cumsum(0) - 1] = -100
    position_ids = torch.cat([torch.arange(n) for n in docs])[None].to(device)
    meshes = {m: build_mesh(ContextParallelConfig(size=world, mode=m), device.type) for m in a.modes.split(",")}
    for dtype in a.dtypes.split(","):
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(config(a.smoke), attn_implementation="sdpa")
        model = model.to(device=device, dtype=getattr(torch, dtype))
        progress(f"{dtype}: each document alone")
        ref_logits, ref_grads = per_document(model, ids, docs)
        for mode, mesh in meshes.items():
            for path in ("state", "gathered"):
                delta_rule.USE_STATE = path == "state"
                progress(f"{dtype} {mode} {path}")
                apply_context_parallel(model, mesh.config, mesh=mesh)
                shard = lambda t, mesh=mesh: mesh.layout.shard(t, mesh.cp_rank, dim=1)  # noqa: E731
                logits = model(input_ids=shard(ids), position_ids=shard(position_ids)).logits
                loss = torch.nn.functional.cross_entropy(logits[0], shard(targets)[0], reduction="sum")
                loss.backward()
                grads = {}
                for name, param in model.named_parameters():
                    grad = param.grad if param.grad is not None else torch.zeros_like(param)
                    dist.all_reduce(grad, group=mesh.cp_group)
                    grads[name] = grad
                logit_err, grad_err, worst = _errors(
                    logits.detach().float(), {k: g.float() for k, g in grads.items()},
                    shard(ref_logits).float(), {k: g.float() for k, g in ref_grads.items()},
                    model.named_parameters(),
                )  # fmt: skip
                errors = torch.tensor([logit_err, grad_err], dtype=torch.float64, device=device)
                dist.all_reduce(errors, op=dist.ReduceOp.MAX, group=mesh.cp_group)
                results.record(dict(dtype=dtype, mode=mode, path=path, logit_err=errors[0].item(),
                                    grad_err=errors[1].item(), worst_grad=worst))  # fmt: skip
                model.zero_grad()
                remove_context_parallel(model)
    delta_rule.USE_STATE = True


if __name__ == "__main__":
    main()
