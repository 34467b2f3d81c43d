"""Per-rank attention time of the CP modes on ONE GPU, each rank of a W-rank group played in turn, communication left
out: what every rank computes and copies, and how evenly.

With one GPU there is no CP run to time, but each rank's own work can be: this script runs one process per rank
(torch's `fake` process group of world W: collectives and P2P return at once and move nothing, received buffers hold
garbage of the right shape), times that rank's causal forward+backward on its shard for every mode, and the single-GPU
attention on the whole row in the same process as rank 0. "E (compute)" = single / (W · slowest rank): the efficiency
CP would reach if communication were free and hidden. It is an upper bound on the measured E of `attention.py`, and
the gap between the two on 2 GPUs is the communication that is not hidden. Same shapes, documents and modes as
`attention.py` (`ring/b`: the mode with `context_parallel_balance="documents"`).

    python benchmarks/attention_ranks.py --world 2 --seqs 131072 --docs packed,lognormal \
        --modes ring,zigzag,llama3,ulysses,zigzag/b,llama3/b --out benchmarks/results/attention_ranks_1xH200.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys

import torch
import torch.distributed as dist
from attention import (
    CUDA,
    DTYPE,
    HEAD_DIM,
    causal_flops,
    doc_lengths,
    fwd_bwd,
    mode_config,
    mode_stages,
    profile,
    run_meta,
    single_attention,
    timed,
    timed_iterations,
    work_imbalance,
)

from transformers_cp.attention import context_parallel_attention
from transformers_cp.mesh import build_mesh
from transformers_cp.plan import Documents


def shapes(a) -> list[tuple[int, int, int, str]]:
    return [
        (seq, *map(int, heads.split(":")), docs)
        for seq, heads, docs in itertools.product(map(int, a.seqs.split(",")), a.heads.split(","), a.docs.split(","))
    ]


def time_shape(a, meshes: dict, device: torch.device, seq: int, hq: int, hk: int, kind: str) -> dict:
    """This rank's time per mode on one shape (and the single-GPU time on rank 0)."""
    lengths = doc_lengths(kind, seq)
    docs = Documents(list(itertools.accumulate(lengths, initial=0)), seq)
    g = torch.Generator(device=device).manual_seed(seq + hq)
    q, dout = (torch.randn(seq, hq, HEAD_DIM, device=device, dtype=DTYPE, generator=g) for _ in range(2))
    k, v = (torch.randn(seq, hk, HEAD_DIM, device=device, dtype=DTYPE, generator=g) for _ in range(2))
    scale = HEAD_DIM**-0.5
    iters = timed_iterations(a.iters, seq) if CUDA else a.iters
    row = dict(seq=seq, hq=hq, hk=hk, docs=kind, n_docs=len(lengths), rank=a.rank, iters=iters)
    if a.rank == 0:
        single = single_attention(docs, scale, dense=kind == "single")
        row["single_ms"] = timed(lambda: fwd_bwd(single, q, k, v, dout), iters, lockstep=False)
        row["single_tflops"] = round(causal_flops(lengths, hq) / row["single_ms"] / 1e9, 1)
    for m, mesh in meshes.items():
        layout = docs.layout(mesh.layout)
        local = [layout.shard(t, mesh.cp_rank, dim=0) for t in (q, k, v, dout)]
        stages = mode_stages(m)

        def step(mesh=mesh, local=local, stages=stages):
            attn = lambda qq, kk, vv: context_parallel_attention(  # noqa: E731
                qq, kk, vv, mesh, docs, scale, ulysses_stages=stages
            )
            return fwd_bwd(attn, *local)

        row[m] = {
            "ms": timed(step, iters, lockstep=False),
            "work_max_over_mean": work_imbalance(docs, layout, a.world),
        }
        if m in a.profile.split(","):
            path = f"{a.profile_dir}/{m.replace('/', '-')}_S{seq}_{hq}_{hk}_{kind}_rank{a.rank}.txt"
            profile(step, path, write=True)  # every rank its own table
    return row


def run_rank(a) -> None:
    """One rank of the fake group: its time per mode and shape (and the single-GPU time on rank 0) to a JSON file."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", rank=a.rank, world_size=a.world, store=FakeStore())
    device = torch.device("cuda" if CUDA else "cpu")
    meshes = {}
    for m in a.modes.split(","):
        meshes[m] = build_mesh(mode_config(m, a.world), device.type)
    rows = []
    for shape in shapes(a):
        rows.append(time_shape(a, meshes, device, *shape))
        print(json.dumps(rows[-1]), flush=True)
        if CUDA:
            torch.cuda.empty_cache()
    with open(a.rank_out, "w") as f:
        json.dump(rows, f)
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--world", type=int, default=2, help="ranks of the group, played in turn")
    p.add_argument("--seqs", default="131072")
    p.add_argument("--heads", default="16:16,32:8")
    p.add_argument("--docs", default="packed,lognormal")
    p.add_argument("--modes", default="ring,zigzag,llama3,ulysses,zigzag/b,llama3/b")
    p.add_argument("--iters", type=int, default=5, help="timed runs at 32k tokens and above (more below)")
    p.add_argument("--out", default=None, help="JSON file for the results")
    p.add_argument("--profile", default="", help="modes to profile on every rank (kernel tables in --profile-dir)")
    p.add_argument("--profile-dir", default="profiles")
    p.add_argument("--rank", type=int, default=None, help=argparse.SUPPRESS)  # one rank's process (internal)
    p.add_argument("--rank-out", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.rank is not None:
        run_rank(a)
        return
    per_rank = []
    for r in range(a.world):
        path = f"/tmp/attention_ranks_{os.getpid()}_{r}.json"
        subprocess.run([sys.executable, *sys.argv, "--rank", str(r), "--rank-out", path], check=True)
        with open(path) as f:
            per_rank.append(json.load(f))
    modes = a.modes.split(",")
    results = []
    for rows in zip(*per_rank):
        out = {k: rows[0][k] for k in ("seq", "hq", "hk", "docs", "n_docs", "single_ms", "single_tflops")}
        for m in modes:
            ms = [r[m]["ms"] for r in rows]
            out[m] = {
                "ms_per_rank": [round(x, 3) for x in ms],
                "efficiency_compute": round(out["single_ms"] / (a.world * max(ms)), 3),
                "work_max_over_mean": rows[0][m]["work_max_over_mean"],
            }
        results.append(out)
        cells = [f"{m} E={out[m]['efficiency_compute']}" for m in modes]
        print(
            f"S={out['seq']} {out['hq']}/{out['hk']} {out['docs']} single {out['single_ms']:.2f} ms | "
            + " | ".join(cells)
        )
    machine = (
        f"1x {torch.cuda.get_device_name() if CUDA else 'cpu'}, playing {a.world} ranks in turn (no communication)"
    )
    meta = run_meta(f"python {' '.join(sys.argv)}", machine)
    if a.out:
        os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
        with open(a.out, "w") as f:
            json.dump({"meta": meta, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
