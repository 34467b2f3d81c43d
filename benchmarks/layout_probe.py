"""Costs behind the Ulysses data layout, on one GPU: the local attention kernel on contiguous q/k/v against the
strided views of one received buffer, and the strided copies that pack and unpack the all-to-all buffers with
element types of 2, 8 and 16 bytes (the same bytes moved). Prints JSON.

    python benchmarks/layout_probe.py --seqs 8192,32768,131072 --out benchmarks/results/layout_probe_H200.json
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from transformers_cp.kernels import Segments
from transformers_cp.kernels.torch_fused import TorchKernel


def _time(fn, iters: int) -> float:
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def attention_ms(q, k, v, seg, iters: int) -> float:
    kernel, scale = TorchKernel(), q.shape[-1] ** -0.5
    dout = torch.randn_like(q)

    def step():
        out, lse = kernel.forward(q, k, v, seg, scale)
        kernel.backward(dout, q, k, v, out.to(q.dtype), lse, seg, scale)

    return _time(step, iters)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seqs", default="8192,32768,131072")
    p.add_argument("--heads", type=int, default=8, help="heads per rank after the exchange")
    p.add_argument("--degree", type=int, default=2)
    p.add_argument("--out", default=None, help="JSON file for the results")
    a = p.parse_args()
    dev, dt, d, h, u = "cuda", torch.bfloat16, 128, a.heads, a.degree
    rows = []
    for s in map(int, a.seqs.split(",")):
        iters = max(3, int(100 * (8192 / s) ** 2))  # about 0.1-1 s of attention per measurement
        seg = Segments((0, s), (0, s), True, None)
        row: dict = dict(seq=s, heads=h, iters=iters)
        buf = torch.randn(s, 3 * h, d, device=dev, dtype=dt)
        q, k, v = buf[:, :h], buf[:, h : 2 * h], buf[:, 2 * h :]
        row["attn_strided_ms"] = attention_ms(q, k, v, seg, iters)
        row["attn_contiguous_ms"] = attention_ms(q.contiguous(), k.contiguous(), v.contiguous(), seg, iters)
        double = torch.randn(s, 2 * h, d, device=dev, dtype=dt)
        row["attn_2x_heads_contiguous_ms"] = attention_ms(double, double.clone(), double.clone(), seg, iters)
        length = s // u
        src = torch.randn(length, u * h, d, device=dev, dtype=dt)  # a sequence shard, all heads
        dst = torch.empty(u, length, h, d, device=dev, dtype=dt)  # the send buffer: destination rank first
        view = src.unflatten(1, (u, h)).transpose(0, 1)
        for name, wide in (("bf16", None), ("int64", torch.int64), ("complex128", torch.complex128)):
            s_, d_ = (view, dst) if wide is None else (view.view(wide), dst.view(wide))
            row[f"pack_copy_{name}_ms"] = _time(lambda s_=s_, d_=d_: d_.copy_(s_), 50)
        row["pack_bytes"] = dst.numel() * dst.element_size()
        rows.append(row)
        print(json.dumps(row), flush=True)
    if a.out:
        meta = dict(
            command="python " + " ".join(sys.argv), machine=torch.cuda.get_device_name(), torch=torch.__version__
        )
        with open(a.out, "w") as f:
            json.dump({"meta": meta, "results": rows}, f, indent=1)


if __name__ == "__main__":
    main()
