"""The cost of attention variants: sinks under CP, and the logit softcap's fused kernel against cuDNN without it.

(a) Sinks: CP attention (zigzag and Ulysses over the ranks), causal forward+backward at 64k tokens in the gpt-oss
    shape (64 query heads over 8 KV heads of 64; full and 128-token sliding-window layers), with and without a sink
    per head. The sinks add one rescale of the merged output and a reduction for their gradient (`sinks.py`).
(b) Softcap: one GPU, one causal sequence, forward+backward as the CP algorithms run it (`LocalAttention` over the
    kernel), at 32k and 128k tokens: the cuDNN path without a softcap (`TorchKernel`) against `FlexKernel` with the
    tanh score_mod, under each FlexAttention `kernel_options` candidate; also FlexKernel without a softcap, and
    FlexAttention's own autograd (no recomputation of the forward in backward: what the kernel would cost if it could
    reuse its forward, which it cannot when the backward takes the merged (out, lse) of several blocks).

    torchrun --nproc_per_node 2 benchmarks/attention_variants.py \
        --out benchmarks/results/attention_variants_2xH200.json
    torchrun --nproc_per_node 2 benchmarks/attention_variants.py --smoke    # CPU (gloo, float32, tiny shapes)

On CPU the fused kernels do not exist: (b) then times the exact math kernel with and without the softcap only.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch
import torch.distributed as dist
from attention import timed

from transformers_cp.algorithms.local import LocalAttention
from transformers_cp.attention import context_parallel_attention
from transformers_cp.config import ContextParallelConfig
from transformers_cp.kernels import Segments, flex
from transformers_cp.kernels.math import MathKernel
from transformers_cp.kernels.torch_fused import TorchKernel
from transformers_cp.mesh import build_mesh, init_distributed
from transformers_cp.plan import Documents

CUDA = torch.cuda.is_available()
DTYPE = torch.bfloat16 if CUDA else torch.float32

FLEX_CANDIDATES: list[dict] = [
    {},  # FlexAttention's defaults
    {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 2},
    {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 2},
    {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3},
    {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3},
    {"fwd_BLOCK_M": 128, "fwd_BLOCK_N": 64, "fwd_num_warps": 8, "fwd_num_stages": 2, "bwd_BLOCK_M1": 64,
     "bwd_BLOCK_N1": 128, "bwd_BLOCK_M2": 128, "bwd_BLOCK_N2": 64, "bwd_num_warps": 8, "bwd_num_stages": 2},
]  # fmt: skip


def causal_tflop(seq: int, heads: int, head_dim: int) -> float:
    """Forward+backward matmul work of one causal sequence (2 GEMMs forward, 5 backward, half the square)."""
    return 4 * seq * seq / 2 * heads * head_dim * 3.5 / 1e12


def step(attn, q, k, v, dout, sinks=None):
    """One forward+backward on leaf copies."""
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    extra = [] if sinks is None else [sinks.detach().requires_grad_()]
    attn(*leaves, *extra).backward(dout)


def bench_sinks(a, device, rank: int, world: int) -> list[dict]:
    """(a): CP attention with and without sinks, per mode and window."""
    seq, hq, hk, d = a.sink_seq, a.sink_heads[0], a.sink_heads[1], a.sink_head_dim
    local = seq // world
    g = torch.Generator(device=device).manual_seed(rank)
    q = torch.randn(local, hq, d, device=device, dtype=DTYPE, generator=g)
    k, v = (torch.randn(local, hk, d, device=device, dtype=DTYPE, generator=g) for _ in range(2))
    dout = torch.randn_like(q)
    sinks = torch.randn(hq, device=device, dtype=DTYPE)
    rows = []
    for mode in ("zigzag", "ulysses"):
        mesh = build_mesh(ContextParallelConfig(size=world, mode=mode))
        docs = Documents([0, seq], seq)
        for window in (None, a.sink_window):
            times = {}
            for with_sinks in (False, True):

                def attn(qq, kk, vv, s=None, mesh=mesh, window=window, docs=docs):
                    return context_parallel_attention(qq, kk, vv, mesh, docs, d**-0.5, window, sinks=s)

                def run(with_sinks=with_sinks, attn=attn):
                    step(attn, q, k, v, dout, sinks if with_sinks else None)

                dist.barrier()
                times[with_sinks] = timed(run, a.iters, lockstep=False)
            rows.append(
                dict(part="sinks", mode=mode, seq=seq, heads=f"{hq}:{hk}", head_dim=d, window=window,
                     ms_without=times[False], ms_with=times[True], overhead=times[True] / times[False] - 1)
            )  # fmt: skip
            if rank == 0:
                print(f"sinks {mode} window={window}: {times[False]:.2f} ms -> {times[True]:.2f} ms "
                      f"({100 * (times[True] / times[False] - 1):+.1f} %)", flush=True)  # fmt: skip
    return rows


def _local(kernel, seg: Segments, scale: float):
    """Attention over `kernel` as the CP algorithms run it (the kernel's own forward and backward)."""
    return lambda q, k, v: LocalAttention.apply(q, k, v, seg, kernel, scale)


def _flex_autograd(kernel: flex.FlexKernel, seg: Segments, scale: float):
    """FlexAttention's own forward+backward through autograd: no recomputation of the forward."""
    return lambda q, k, v: kernel._attend(q, k, v, seg, scale)[0]


def bench_softcap(a, device) -> list[dict]:
    """(b): one causal sequence on one GPU; cuDNN without a softcap against the softcap kernels. Every candidate
    `kernel_options` at the first length, then FlexAttention's defaults and the best of them (each compiles anew)."""
    rows, tuned = [], None
    for seq in a.softcap_seqs:
        rows += softcap_at(a, device, seq, tuned)
        tuned = rows[-1].get("best_options") or {}
        if CUDA:
            torch.cuda.empty_cache()
    return rows


def softcap_at(a, device, seq: int, tuned: dict | None) -> list[dict]:
    hq, hk, d = a.softcap_heads[0], a.softcap_heads[1], a.softcap_head_dim
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(seq, hq, d, device=device, dtype=DTYPE, generator=g)
    k, v = (torch.randn(seq, hk, d, device=device, dtype=DTYPE, generator=g) for _ in range(2))
    dout = torch.randn_like(q)
    seg, scale, work = Segments((0, seq), (0, seq), True), d**-0.5, causal_tflop(seq, hq, d)
    iters = max(2, a.iters * (32768 // seq)) if seq < 32768 else a.iters
    rows = []

    def record(name: str, kernel, options: dict | None = None, autograd: bool = False) -> dict:
        attn = _flex_autograd(kernel, seg, scale) if autograd else _local(kernel, seg, scale)
        flex.KERNEL_OPTIONS.clear()
        flex.KERNEL_OPTIONS.update(options or {})
        try:
            ms = timed(lambda: step(attn, q, k, v, dout), iters, lockstep=False)
            row = dict(part="softcap", seq=seq, heads=f"{hq}:{hk}", head_dim=d, kernel=name, options=options, ms=ms,
                       tflops=work / ms * 1e3)  # fmt: skip
        except Exception as e:  # noqa: BLE001 - a candidate the GPU cannot run (shared memory) is an outcome
            row = dict(part="softcap", seq=seq, kernel=name, options=options, error=repr(e)[:300])
        finally:
            flex.KERNEL_OPTIONS.clear()
        rows.append(row)
        if dist.get_rank() == 0:
            print(f"softcap seq={seq} {name} {options or ''}: {row.get('ms', float('nan')):.2f} ms "
                  f"{row.get('tflops', float('nan')):.0f} TFLOP/s {row.get('error', '')}", flush=True)  # fmt: skip
        return row

    if not CUDA:
        base, capped = record("math", MathKernel()), record("math+softcap", MathKernel(a.softcap))
        return [*rows, dict(part="softcap_ratio", seq=seq, best_options=None, ratio=base["ms"] / capped["ms"])]
    base = record("cudnn (no softcap)", TorchKernel())
    record("flex (no softcap)", flex.FlexKernel(None))
    best = None
    for options in FLEX_CANDIDATES if tuned is None else [{}, *([tuned] if tuned else [])]:
        row = record("flex+softcap", flex.FlexKernel(a.softcap), options)
        if "ms" in row and (best is None or row["ms"] < best["ms"]):
            best = row
    options = best["options"] if best else None
    autograd = record("flex+softcap autograd (no recompute)", flex.FlexKernel(a.softcap), options, autograd=True)
    ratio = dict(part="softcap_ratio", seq=seq, best_options=options, ratio=best and base["ms"] / best["ms"])
    ratio["ratio_without_recompute"] = autograd.get("ms") and base["ms"] / autograd["ms"]
    if dist.get_rank() == 0 and best:
        print(f"softcap seq={seq}: best FlexKernel {ratio['ratio']:.2f}x cuDNN without softcap", flush=True)
    return [*rows, ratio]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny shapes (for CPU)")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--softcap", type=float, default=50.0, help="Gemma 2's attn_logit_softcapping")
    p.add_argument("--parts", default="sinks,softcap", help="which of (a) sinks and (b) softcap to run")
    p.add_argument("--seqs", default="32768,131072", help="softcap lengths (the first one tunes kernel_options)")
    p.add_argument("--out", default=None, help="JSON file for the results (rank 0), rewritten after each part")
    a = p.parse_args()
    a.sink_seq, a.sink_heads, a.sink_head_dim, a.sink_window = 65536, (64, 8), 64, 128
    a.softcap_seqs, a.softcap_heads, a.softcap_head_dim = [int(n) for n in a.seqs.split(",")], (16, 16), 128
    if a.smoke:
        a.sink_seq, a.sink_heads, a.sink_head_dim, a.sink_window = 256, (4, 2), 16, 32
        a.softcap_seqs, a.softcap_heads, a.softcap_head_dim, a.iters = [128], (4, 4), 16, 2

    init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device()) if CUDA else torch.device("cpu")
    meta = dict(
        command=f"torchrun --nproc_per_node {world} {' '.join(sys.argv)}",
        machine=f"{world}x {torch.cuda.get_device_name() if CUDA else platform.processor() or 'cpu'}",
        torch=torch.__version__,
        dtype=str(DTYPE),
        date=time.strftime("%Y-%m-%d"),
    )
    torch._dynamo.config.cache_size_limit = 64  # one compilation per FlexAttention candidate and length
    results: list[dict] = []
    parts = {"sinks": lambda: bench_sinks(a, device, rank, world), "softcap": lambda: bench_softcap(a, device)}
    for part in a.parts.split(","):
        results += parts[part]()  # softcap: every rank on its own GPU, alike (no rank waits in a collective)
        if rank == 0 and a.out:  # a run cut off by a time limit keeps the parts it finished
            os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
            with open(a.out, "w") as f:
                json.dump({"meta": meta, "results": results}, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
