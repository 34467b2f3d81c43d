"""Context-parallel attention: agreement with single-GPU attention and efficiency E = T_single / (N · T_cp).

Causal forward+backward, head dim 128, one sequence or packed documents, every mode, and PyTorch's native
`context_parallel` (what the upstream Trainer uses) in the same run. bf16 on CUDA; on CPU (gloo, float32) the
script runs small shapes as a smoke test.

    torchrun --nproc_per_node 2 benchmarks/attention.py --seqs 8192,32768,131072 --check \
        --out benchmarks/results/attention_2xH200.json

A mode may carry options: `hybrid/u4` (Ulysses degree 4 inside the ring), `ulysses/s2` (two pipeline stages),
`llama3/k8` (KV heads all-gathered 8 at a time), `zigzag/b` (ring, zigzag or llama3 with
`context_parallel_balance="documents"`). Documents: `single`, `packed` (lengths 1k–32k) or `lognormal` (median 4k, at
most 32k); each mode's row records the most loaded rank's causal work over the mean (`work_max_over_mean`).

Packed documents with and without the balance (issue 21):

    torchrun --nproc_per_node 2 benchmarks/attention.py --seqs 131072 --heads 16:16,32:8 \
        --docs single,packed,lognormal --modes ring,zigzag,llama3,ulysses,ring/b,zigzag/b,llama3/b --check \
        --no-native --out benchmarks/results/attention_packed_2xH200.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import random
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

from transformers_cp.attention import context_parallel_attention
from transformers_cp.balance import range_work
from transformers_cp.config import ContextParallelConfig
from transformers_cp.kernels import Segments, select_kernel
from transformers_cp.kernels.math import MathKernel
from transformers_cp.mesh import build_mesh, init_distributed
from transformers_cp.modes import ulysses
from transformers_cp.plan import Documents, local_segments

CUDA = torch.cuda.is_available()
DTYPE = torch.bfloat16 if CUDA else torch.float32
HEAD_DIM = 128
GRADS = ("out", "dq", "dk", "dv")


def timed(fn, iters: int, warmup: int = 2, lockstep: bool = True) -> float:
    """Mean milliseconds of `fn` over `iters` back-to-back runs after a warm-up, one synchronisation at the end (the
    protocol of the peers' anchor script); with `lockstep` every rank runs it and they start together."""
    for _ in range(warmup):
        fn()
    if CUDA:
        torch.cuda.synchronize()
    if lockstep:
        dist.barrier()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    if CUDA:
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e3 / iters


def timed_iterations(base: int, seq: int) -> int:
    """`base` runs at 32k tokens and above; more below, as the square of the length falls (at most 200), so that
    every timed window spans tens of milliseconds rather than a few kernel launches."""
    return max(base, min(200, base * (32768 // seq) ** 2))


def doc_lengths(kind: str, seq: int, seed: int = 0) -> list[int]:
    """One sequence, documents with lengths drawn from 1k–32k, or lognormal ones (median 4k, at most 32k), scaled
    down for short rows."""
    if kind == "single":
        return [seq]
    rng = random.Random(seed)
    if kind == "lognormal":
        median, top = max(1, min(4096, seq // 32)), max(2, min(32768, seq // 4))
        out = []
        while sum(out) < seq:
            out.append(min(max(1, min(top, int(rng.lognormvariate(math.log(median), 1.0)))), seq - sum(out)))
        return out
    lo, hi = min(1024, seq // 8), min(32768, seq // 2)
    out = []
    while sum(out) < seq:
        out.append(min(rng.randint(lo, hi), seq - sum(out)))
    return out


def causal_flops(lengths: list[int], heads: int) -> float:
    return sum(4 * n * n * heads * HEAD_DIM / 2 * 3.5 for n in lengths)


def work_imbalance(docs: Documents, layout, world: int) -> float:
    """The most loaded CP rank's causal pairs over the mean (1.0: balanced); after Ulysses' all-to-all every rank
    attends whole chunks with its share of the heads, which is balanced."""
    if layout.ring == 1:
        return 1.0
    work = [range_work(docs.bounds, layout.ring_ranges(docs.seq_len, r)) for r in range(layout.ring)]
    return round(max(work) * len(work) / sum(work), 3)


def mode_config(name: str, world: int) -> ContextParallelConfig:
    """The config of a mode as the benchmarks name it: the mode, then options after slashes ("hybrid/u4": Ulysses
    degree 4; "llama3/k8": heads_k_stride 8; "zigzag/b": the documents balance; "ulysses/s4": see `mode_stages`)."""
    mode, *opts = name.split("/")
    degree = next((int(o[1:]) for o in opts if o.startswith("u")), 2 if world % 2 == 0 else 1)
    return ContextParallelConfig(
        size=world,
        mode=mode,
        ulysses_size=degree if mode == "hybrid" else None,
        heads_k_stride=next((int(o[1:]) for o in opts if o.startswith("k")), None),
        balance="documents" if "b" in opts else "tokens",
    )


def mode_stages(name: str) -> int:
    """At most how many Ulysses pipeline stages the mode named so runs ("ulysses/s4": 4; the default otherwise)."""
    return next((int(o[1:]) for o in name.split("/")[1:] if o.startswith("s")), ulysses.STAGES)


def run_meta(command: str, machine: str) -> dict:
    """What a results file says of its run: the command, the machine, torch, dtype, head dim and date."""
    return dict(command=command, machine=machine, torch=torch.__version__, dtype=str(DTYPE), head_dim=HEAD_DIM,
                date=time.strftime("%Y-%m-%d"))  # fmt: skip


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def fwd_bwd(attn, q, k, v, dout):
    """Run attention forward and backward on leaf copies; returns (out, dq, dk, dv)."""
    qq, kk, vv = (t.detach().requires_grad_() for t in (q, k, v))
    out = attn(qq, kk, vv)
    out.backward(dout)
    return out.detach(), qq.grad, kk.grad, vv.grad


def single_attention(docs: Documents, scale: float, dense: bool):
    """Single-GPU attention on the whole row: SDPA's own choice for one sequence, the varlen kernel for documents."""
    if dense:

        def attn(q, k, v):
            o = F.scaled_dot_product_attention(
                q.transpose(0, 1)[None],
                k.transpose(0, 1)[None],
                v.transpose(0, 1)[None],
                is_causal=True,
                scale=scale,
                enable_gqa=q.shape[1] != k.shape[1],
            )
            return o[0].transpose(0, 1)

        return attn
    from transformers_cp.algorithms.local import LocalAttention

    seg = local_segments(docs, None)
    return lambda q, k, v: LocalAttention.apply(q, k, v, seg, select_kernel("torch", q), scale)


def fp32_truth(q, k, v, dout, docs: Documents, scale: float):
    seg = Segments(tuple(docs.bounds), tuple(docs.bounds), causal=True)
    kern = MathKernel()
    out, lse = kern.forward(q, k, v, seg, scale)
    return (out, *kern.backward(dout, q, k, v, out, lse, seg, scale))


def native_cp(q, k, v, dout, scale, mesh, method: str, iters: int) -> float:
    """PyTorch's experimental context_parallel over SDPA (one sequence, heads-first buffers)."""
    from torch.distributed.tensor.experimental import context_parallel
    from torch.distributed.tensor.experimental._attention import set_rotate_method

    set_rotate_method(method)
    bufs = [t.transpose(0, 1)[None].contiguous() for t in (q, k, v, dout)]

    def step():
        qq, kk, vv = (t.detach().requires_grad_() for t in bufs[:3])
        F.scaled_dot_product_attention(qq, kk, vv, is_causal=True, scale=scale).backward(bufs[3])

    with context_parallel(mesh, buffers=bufs, buffer_seq_dims=[2, 2, 2, 2]):
        return timed(step, iters)


def profile(fn, path: str, write: bool | None = None) -> None:
    """Where the time of three fwd+bwd runs goes: the kernels by total time, then (on CUDA) the host ops by their own
    CPU time, where the host's time goes when it sets the pace. Written to `path` by rank 0, or as `write` says."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if CUDA else [])]) as prof:
        for _ in range(3):
            fn()
        if CUDA:
            torch.cuda.synchronize()
    if write if write is not None else dist.get_rank() == 0:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(prof.key_averages().table(sort_by="cuda_time_total" if CUDA else "cpu_time_total", row_limit=30))
            if CUDA:
                f.write("\n\nHost side (3 runs):\n")
                f.write(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40))


def print_table(results: list[dict], modes: list[str]) -> None:
    """One line per shape: single-GPU time, then per mode its time, efficiency and worst relative error."""
    for r in results:
        cells = [f"S={r['seq']} {r['hq']}/{r['hk']} {r['docs']:6s} single {r['single_ms']:8.2f}ms"]
        for m in [*modes, "torch_native_allgather", "torch_native_alltoall"]:
            e = r.get(m)
            if isinstance(e, dict):
                err = max(e.get("err_vs_single", {"-": 0.0}).values())
                cells.append(f"{m} {e['ms']:.2f}ms E={e.get('efficiency')} err={err:.1e}")
            elif e is not None:
                cells.append(f"{m} failed")
        print(" | ".join(cells), flush=True)


def bench_shape(a, device, meshes: dict, native_mesh, seq: int, hq: int, hk: int, doc_kind: str) -> dict:
    """Time (and with --check, compare) single-GPU attention, every mode and the native peer on one shape."""
    rank, world = dist.get_rank(), dist.get_world_size()
    lengths = doc_lengths(doc_kind, seq)
    docs = Documents(list(itertools.accumulate(lengths, initial=0)), seq)
    g = torch.Generator(device=device).manual_seed(seq + hq)
    q = torch.randn(seq, hq, HEAD_DIM, device=device, dtype=DTYPE, generator=g)
    k = torch.randn(seq, hk, HEAD_DIM, device=device, dtype=DTYPE, generator=g)
    v = torch.randn(seq, hk, HEAD_DIM, device=device, dtype=DTYPE, generator=g)
    dout = torch.randn(seq, hq, HEAD_DIM, device=device, dtype=DTYPE, generator=g)
    scale = HEAD_DIM**-0.5
    iters = timed_iterations(a.iters, seq) if CUDA else a.iters  # on CPU a smoke test: as asked
    row = dict(seq=seq, hq=hq, hk=hk, docs=doc_kind, n_docs=len(lengths), world=world, iters=iters)
    single = single_attention(docs, scale, dense=doc_kind == "single")
    if rank == 0:
        row["single_ms"] = timed(lambda: fwd_bwd(single, q, k, v, dout), iters, lockstep=False)
        row["single_tflops"] = round(causal_flops(lengths, hq) / row["single_ms"] / 1e9, 1)
    dist.barrier()
    ref = truth = None
    if a.check and rank == 0:
        ref = fwd_bwd(single, q, k, v, dout)
        if seq <= 32768:
            truth = fp32_truth(q, k, v, dout, docs, scale)
            row["single_err_vs_fp32"] = {n: rel(x, t) for n, x, t in zip(GRADS, ref, truth)}
    for m, mesh in meshes.items():
        layout = docs.layout(mesh.layout)  # the mode's own, or under /b the one that follows the documents
        local = [layout.shard(t, mesh.cp_rank, dim=0) for t in (q, k, v, dout)]
        stages = mode_stages(m)

        def attn(qq, kk, vv, mesh=mesh, stages=stages):
            return context_parallel_attention(qq, kk, vv, mesh, docs, scale, ulysses_stages=stages)

        try:
            entry = {"ms": timed(lambda attn=attn, local=local: fwd_bwd(attn, *local), iters)}
        except ValueError as e:  # a setting this shape cannot take (e.g. llama3/k16 with 8 KV heads): raised alike
            row[m] = f"skipped: {e}"  # on every rank before any collective, so the run goes on with the next mode
            continue
        if a.profile:
            name = f"{m.replace('/', '-')}_S{seq}_{hq}_{hk}_{doc_kind}"
            profile(lambda attn=attn, local=local: fwd_bwd(attn, *local), f"{a.profile}/{name}.txt")
        if a.check:
            gathered = []
            for t in fwd_bwd(attn, *local):
                parts = [torch.empty_like(t) for _ in range(world)]
                dist.all_gather(parts, t.contiguous())
                gathered.append(layout.unshard(parts, dim=0))
            if rank == 0:
                entry["err_vs_single"] = {n: rel(x, r) for n, x, r in zip(GRADS, gathered, ref)}
                if truth is not None:
                    entry["err_vs_fp32"] = {n: rel(x, t) for n, x, t in zip(GRADS, gathered, truth)}
        if rank == 0:
            entry["efficiency"] = round(row["single_ms"] / (world * entry["ms"]), 3)
            entry["work_max_over_mean"] = work_imbalance(docs, layout, world)
        row[m] = entry
    if native_mesh is not None and doc_kind == "single" and hq == hk:
        for method in ("allgather", "alltoall"):
            try:
                ms = native_cp(q, k, v, dout, scale, native_mesh, method, iters)
                row[f"torch_native_{method}"] = {"ms": ms}
                if rank == 0:
                    row[f"torch_native_{method}"]["efficiency"] = round(row["single_ms"] / (world * ms), 3)
            except Exception as e:  # noqa: BLE001 - report the peer's failure, keep measuring ours
                row[f"torch_native_{method}"] = repr(e)[:200]
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seqs", default="8192,32768,131072")
    p.add_argument("--heads", default="16:16,32:8", help="query:kv head pairs")
    p.add_argument("--docs", default="single,packed")
    p.add_argument("--modes", default="ring,zigzag,llama3,ulysses,hybrid")
    p.add_argument("--iters", type=int, default=5, help="timed runs at 32k tokens and above (more below)")
    p.add_argument("--check", action="store_true", help="compare outputs and gradients with single-GPU attention")
    p.add_argument("--no-native", action="store_true", help="skip PyTorch's native context_parallel")
    p.add_argument("--out", default=None, help="JSON file for the results (rank 0)")
    p.add_argument("--profile", default=None, help="write a torch-profiler summary per mode to this folder")
    a = p.parse_args()

    init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device()) if CUDA else torch.device("cpu")
    modes = a.modes.split(",")
    meshes = {}
    for m in modes:
        meshes[m] = build_mesh(mode_config(m, world))
    native_mesh = None
    if CUDA and not a.no_native:
        from torch.distributed.device_mesh import init_device_mesh

        native_mesh = init_device_mesh("cuda", (world,), mesh_dim_names=("cp",))
    meta = run_meta(
        f"torchrun --nproc_per_node {world} {' '.join(sys.argv)}",
        f"{world}x {torch.cuda.get_device_name() if CUDA else platform.processor() or 'cpu'}",
    )
    results = []
    for seq, heads, doc_kind in itertools.product(map(int, a.seqs.split(",")), a.heads.split(","), a.docs.split(",")):
        hq, hk = map(int, heads.split(":"))
        row = bench_shape(a, device, meshes, native_mesh, seq, hq, hk, doc_kind)
        if rank == 0:
            results.append(row)
            print_table([row], modes)
            if a.out:  # rewritten after every shape: a run cut off by a time limit keeps what it measured
                os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
                with open(a.out, "w") as f:
                    json.dump({"meta": meta, "results": results}, f, indent=1)
        if CUDA:
            torch.cuda.empty_cache()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
