"""The gated delta rule's torch-path kernel (transformers' `torch_chunk_gated_delta_rule`, what Qwen3-Next, Qwen3.5
and OLMo hybrid run without flash-linear-attention) forward and backward in one call against over pieces
(`transformers_cp.delta_rule.in_pieces`, `PIECE_BYTES`): the one call's backward grows with its length squared.

    python benchmarks/delta_rule_pieces.py --out benchmarks/results/delta_rule_pieces_cpu.json   # CPU, small widths
    python benchmarks/delta_rule_pieces.py --lengths 8192,32768,65536 --heads 16 --dim 128 \\
        --piece-bytes 4194304,16777216,67108864 --out benchmarks/results/delta_rule_pieces_1xH200.json  # one H200

One layer's kernel at the given widths, bf16 inputs on the GPU (float32 on CPU), from a zero state: seconds of the
forward and of the backward, the best of `--repeats`, for the one call and for each piece size.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
import transformers
from transformers.models.qwen3_next import modeling_qwen3_next

from transformers_cp import delta_rule

CUDA = torch.cuda.is_available()


def _sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def timed(kernel, length: int, heads: int, dim: int, repeats: int) -> tuple[float, float]:
    """Best forward and backward seconds of `kernel` on random inputs of `length` tokens."""
    device, dtype = ("cuda", torch.bfloat16) if CUDA else ("cpu", torch.float32)
    g = torch.Generator(device).manual_seed(0)
    make = lambda *shape: torch.randn(*shape, generator=g, device=device, dtype=dtype)  # noqa: E731
    best = [float("inf"), float("inf")]
    for _ in range(repeats):
        q, k, v = (make(1, length, heads, dim).requires_grad_() for _ in range(3))
        decay = (-make(1, length, heads).float().abs() / 8).requires_grad_()
        beta = make(1, length, heads).sigmoid().requires_grad_()
        _sync()
        start = time.perf_counter()
        out, _ = kernel(q, k, v, g=decay, beta=beta, use_qk_l2norm_in_kernel=True)
        _sync()
        middle = time.perf_counter()
        out.float().square().sum().backward()
        _sync()
        best = [min(best[0], middle - start), min(best[1], time.perf_counter() - middle)]
    return best[0], best[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", default="4096,8192,16384")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument(
        "--piece-bytes", default="262144,1048576,4194304", help="PIECE_BYTES values to time (the module's: 16 MiB)"
    )
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", default=None)
    a = p.parse_args()
    stock = modeling_qwen3_next.torch_chunk_gated_delta_rule
    default = delta_rule.PIECE_BYTES
    rows = []
    for length in map(int, a.lengths.split(",")):
        sizes = [int(b) for b in a.piece_bytes.split(",")]
        forms = [("one call", None)] + [(f"pieces of {b / (1 << 20):g} MiB", b) for b in sizes]
        for name, size in forms:
            if size is not None:
                delta_rule.PIECE_BYTES = size
            delta_rule.in_pieces.cache_clear()
            kernel = stock if size is None else delta_rule.in_pieces(stock)
            fwd, bwd = timed(kernel, length, a.heads, a.dim, a.repeats)
            tokens = None if size is None else max(64, size // (a.heads * a.dim * 4) // 64 * 64)
            rows.append(dict(length=length, form=name, piece_bytes=size, piece_tokens=tokens,
                             forward_s=round(fwd, 4), backward_s=round(bwd, 4)))  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
    delta_rule.PIECE_BYTES = default
    device = torch.cuda.get_device_name() if CUDA else "cpu"
    meta = dict(command="python " + " ".join(sys.argv), machine=device, torch=torch.__version__,
                transformers=transformers.__version__, heads=a.heads, dim=a.dim, date=time.strftime("%Y-%m-%d"))  # fmt: skip
    if a.out:
        with open(a.out, "w") as f:
            json.dump(dict(meta=meta, results=rows), f, indent=1)


if __name__ == "__main__":
    main()
