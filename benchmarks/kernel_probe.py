"""Which of PyTorch's fused attention ops this machine has, whether they agree with exact attention, and how fast
they are: the facts the `torch` kernel backend is built on. One GPU; prints JSON.

    python benchmarks/kernel_probe.py --seq 32768
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import random
import time

import torch
import torch.nn.functional as F

from transformers_cp.kernels import Segments
from transformers_cp.kernels.math import MathKernel


def _time(fn, iters: int = 5) -> float:
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(iters):
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def probe_correctness(hq: int, hk: int, seq: int = 1024, d: int = 128) -> dict:
    """Each candidate op on one causal sequence and on a non-causal q/k length mismatch, against the math kernel."""
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(seq, hq, d, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(seq, hk, d, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn(seq, hk, d, device="cuda", dtype=torch.bfloat16, generator=g)
    dout = torch.randn_like(q)
    scale = d**-0.5
    res = {}
    for causal, lq in ((True, seq), (False, seq // 2), (True, seq // 2)):
        qq = q[-lq:]
        seg = Segments((0, lq), (0, seq), causal=causal)
        ref_out, ref_lse = MathKernel().forward(qq, k, v, seg, scale)
        ref_dq, ref_dk, ref_dv = MathKernel().backward(dout[-lq:], qq, k, v, ref_out, ref_lse, seg, scale)
        key = f"hq{hq}_hk{hk}_causal{causal}_lq{lq}"
        cu_q = torch.tensor([0, lq], dtype=torch.int32, device="cuda")
        cu_k = torch.tensor([0, seq], dtype=torch.int32, device="cuda")
        try:
            out, lse = torch.ops.aten._flash_attention_forward(
                qq,
                k,
                v,
                cu_q,
                cu_k,
                lq,
                seq,
                0.0,
                causal,
                False,
                scale=scale,
                window_size_left=-1,
                window_size_right=0 if causal else -1,
            )[:2]
            grads = torch.ops.aten._flash_attention_backward(
                dout[-lq:].contiguous(),
                qq,
                k,
                v,
                out,
                lse,
                cu_q,
                cu_k,
                lq,
                seq,
                0.0,
                causal,
                torch.zeros(2, dtype=torch.uint64, device="cuda"),
                torch.empty(0, device="cuda"),
                scale=scale,
                window_size_left=-1,
                window_size_right=0 if causal else -1,
            )
            res[f"flash_varlen {key}"] = dict(
                out=_rel(out, ref_out),
                lse=_rel(lse, ref_lse),
                lse_shape=list(lse.shape),
                dq=_rel(grads[0], ref_dq),
                dk=_rel(grads[1], ref_dk),
                dv=_rel(grads[2], ref_dv),
            )
        except Exception as e:  # noqa: BLE001 - a probe reports what fails
            res[f"flash_varlen {key}"] = repr(e)[:300]
        try:
            qb, kb, vb = (t.transpose(0, 1)[None] for t in (qq, k, v))
            r = torch.ops.aten._scaled_dot_product_cudnn_attention(
                qb, kb, vb, None, True, 0.0, causal, False, scale=scale
            )
            out, lse = r[0], r[1]
            grads = torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
                dout[-lq:].transpose(0, 1)[None],
                qb,
                kb,
                vb,
                out,
                lse,
                r[6],
                r[7],
                None,
                r[2],
                r[3],
                r[4],
                r[5],
                0.0,
                causal,
                scale=scale,
            )
            res[f"cudnn {key}"] = dict(
                out=_rel(out[0].transpose(0, 1), ref_out),
                lse=_rel(lse.reshape(hq, lq), ref_lse),
                lse_shape=list(lse.shape),
                out_strides=list(out.stride()),
                dq=_rel(grads[0][0].transpose(0, 1), ref_dq),
                dk=_rel(grads[1][0].transpose(0, 1), ref_dk),
                dv=_rel(grads[2][0].transpose(0, 1), ref_dv),
            )
        except Exception as e:  # noqa: BLE001
            res[f"cudnn {key}"] = repr(e)[:300]
    return res


class _CudnnVarlen:
    """cuDNN's varlen attention op (documents through cu_seqlens) behind the kernel interface, for this probe: on
    torch 2.11 its gradients were wrong and it was slower than the `torch` kernel, so the package does not use it."""

    def forward(self, q, k, v, seg: Segments, scale: float):
        cu_q, cu_k = seg.tensors(q.device)
        r = torch.ops.aten._cudnn_attention_forward(
            q, k, v, None, cu_q, cu_k, seg.max_q, seg.max_k, True, 0.0, True, False, scale=scale
        )
        return r[0], r[1].reshape(q.shape[0], q.shape[1]).T

    def backward(self, dout, q, k, v, out, lse, seg: Segments, scale: float):
        seed, off = torch.zeros(2, dtype=torch.uint64, device=q.device), torch.empty(0, device=q.device)
        cu_q, cu_k = seg.tensors(q.device)
        lse = lse.T.unsqueeze(-1).contiguous()
        return torch.ops.aten._cudnn_attention_backward(
            dout, q, k, v, out, lse, seed, off, None, cu_q, cu_k, seg.max_q, seg.max_k, 0.0, True, scale=scale
        )


def probe_cudnn_varlen(hq: int, hk: int, lengths=(3000, 7000, 1, 6000), d: int = 128) -> dict:
    """Packed causal documents through cuDNN's varlen op and through the `torch` kernel (the varlen flash op and
    per-document cuDNN calls): errors against the math kernel on `lengths`, and fwd+bwd time on a 64k row of
    lognormal documents (median 4k, at most 32k)."""
    from transformers_cp.kernels.torch_fused import TorchKernel

    res: dict = {}
    scale = d**-0.5
    g = torch.Generator(device="cuda").manual_seed(0)

    def inputs(lens):
        total = sum(lens)
        cu = tuple(itertools.accumulate(lens, initial=0))
        t = [torch.randn(total, h, d, device="cuda", dtype=torch.bfloat16, generator=g) for h in (hq, hk, hk, hq)]
        return Segments(cu, cu, causal=True), t

    seg, (q, k, v, dout) = inputs(lengths)
    ref_out, ref_lse = MathKernel().forward(q, k, v, seg, scale)
    ref = MathKernel().backward(dout, q, k, v, ref_out, ref_lse, seg, scale)
    rng = random.Random(0)
    big: list[int] = []
    while sum(big) < 65536:
        big.append(max(1, min(32768, int(rng.lognormvariate(math.log(4096), 1.0)))))
    big[-1] -= sum(big) - 65536
    big_seg, (bq, bk, bv, bdout) = inputs([n for n in big if n > 0])
    flops = sum(4 * n * n * hq * d / 2 * 3.5 for n in big)
    for name, kern in (("cudnn_varlen", _CudnnVarlen()), ("torch_kernel", TorchKernel())):
        try:
            out, lse = kern.forward(q, k, v, seg, scale)
            grads = kern.backward(dout, q, k, v, out, lse, seg, scale)
            row = dict(out=_rel(out, ref_out), lse=_rel(lse, ref_lse))
            row.update({n: _rel(a, b) for n, a, b in zip(("dq", "dk", "dv"), grads, ref)})

            def step(kern=kern):
                o, lse_ = kern.forward(bq, bk, bv, big_seg, scale)
                kern.backward(bdout, bq, bk, bv, o, lse_, big_seg, scale)

            ms = _time(step)
            row.update(packed_64k_ms=round(ms, 2), packed_64k_tflops=round(flops / ms / 1e9, 1), documents=len(big))
            res[name] = row
        except Exception as e:  # noqa: BLE001
            res[name] = {"error": repr(e)[:400]}
    return res


def probe_new_lengths(hq: int, hk: int, d: int = 128, docs: int = 6) -> dict:
    """What a document length never seen before costs: fwd+bwd of a lone causal document through the `torch`
    kernel at a new length (cuDNN builds its plans) and again at the same length (cached plans), without the
    rounding of `torch_fused._bucket`; and the rounded path's errors against the math kernel (3001 tokens, run at
    3008)."""
    from transformers_cp.kernels import torch_fused

    scale, res = d**-0.5, {}
    rng = random.Random(1)
    t = [torch.randn(16384, h, d, device="cuda", dtype=torch.bfloat16) for h in (hq, hk, hk, hq)]
    kern = torch_fused.TorchKernel()

    def run(n: int) -> float:
        seg = Segments((0, n), (0, n), causal=True)
        q, k, v, dout = (x[:n] for x in t)
        torch.cuda.synchronize()
        start = time.perf_counter()
        out, lse = kern.forward(q, k, v, seg, scale)
        kern.backward(dout, q, k, v, out, lse, seg, scale)
        torch.cuda.synchronize()
        return (time.perf_counter() - start) * 1e3

    torch_fused.CUDNN_BUCKETS = 1
    first, again = [], []
    for n in (rng.randrange(2100, 16000) for _ in range(docs)):
        first.append(run(n))
        again.append(run(n))
    res["unrounded"] = dict(ms_new_length=round(sum(first) / docs, 2), ms_same_length=round(sum(again) / docs, 2))
    torch_fused.CUDNN_BUCKETS = 32
    n = 3001
    seg = Segments((0, n), (0, n), causal=True)
    q, k, v, dout = (x[:n] for x in t)
    out, lse = kern.forward(q, k, v, seg, scale)
    grads = kern.backward(dout, q, k, v, out, lse, seg, scale)
    ref_out, ref_lse = MathKernel().forward(q, k, v, seg, scale)
    ref = MathKernel().backward(dout, q, k, v, ref_out, ref_lse, seg, scale)
    res["rounded_3001_to_3008"] = dict(out=_rel(out, ref_out), lse=_rel(lse, ref_lse))
    res["rounded_3001_to_3008"].update({f"d{m}": _rel(a, b) for m, a, b in zip("qkv", grads, ref)})
    return res


def probe_speed(seq: int, hq: int, hk: int, d: int = 128) -> dict:
    """Causal fwd+bwd of one sequence: SDPA's own choice, each SDPA backend, and the varlen flash op."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    flops = 4 * seq * seq * hq * d / 2 * 3.5
    q = torch.randn(1, hq, seq, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, hk, seq, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(1, hk, seq, d, device="cuda", dtype=torch.bfloat16)
    dout = torch.randn_like(q)
    res = {}

    def sdpa():
        qq, kk, vv = (t.detach().requires_grad_() for t in (q, k, v))
        F.scaled_dot_product_attention(qq, kk, vv, is_causal=True, enable_gqa=hq != hk).backward(dout)

    for name, backends in (
        ("sdpa_default", None),
        ("sdpa_cudnn", [SDPBackend.CUDNN_ATTENTION]),
        ("sdpa_flash", [SDPBackend.FLASH_ATTENTION]),
        ("sdpa_efficient", [SDPBackend.EFFICIENT_ATTENTION]),
    ):
        try:
            if backends is None:
                ms = _time(sdpa)
            else:
                with sdpa_kernel(backends):
                    ms = _time(sdpa)
            res[name] = dict(ms=round(ms, 2), tflops=round(flops / ms / 1e9, 1))
        except Exception as e:  # noqa: BLE001
            res[name] = repr(e)[:200]
    from transformers_cp.kernels.torch_fused import TorchKernel

    kern = TorchKernel()
    ql, kl, vl, dl = (t[0].transpose(0, 1).contiguous() for t in (q, k, v, dout))
    seg = Segments((0, seq), (0, seq), causal=True)

    def varlen():
        out, lse = kern.forward(ql, kl, vl, seg, d**-0.5)
        kern.backward(dl, ql, kl, vl, out, lse, seg, d**-0.5)

    try:
        ms = _time(varlen)
        res["flash_varlen_op"] = dict(ms=round(ms, 2), tflops=round(flops / ms / 1e9, 1))
    except Exception as e:  # noqa: BLE001
        res["flash_varlen_op"] = repr(e)[:200]
    return res


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seq", type=int, default=32768)
    a = p.parse_args()
    out = {
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(),
        "cudnn": torch.backends.cudnn.version(),
        "has_cudnn_varlen": hasattr(torch.ops.aten, "_cudnn_attention_forward"),
    }
    for hq, hk in ((16, 16), (32, 8)):
        out[f"correct_{hq}_{hk}"] = probe_correctness(hq, hk)
        out[f"speed_{hq}_{hk}_S{a.seq}"] = probe_speed(a.seq, hq, hk)
        out[f"cudnn_varlen_{hq}_{hk}"] = probe_cudnn_varlen(hq, hk)
        out[f"new_lengths_{hq}_{hk}"] = probe_new_lengths(hq, hk)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
