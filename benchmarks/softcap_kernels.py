"""The logit-softcap attention kernels on one GPU: causal forward+backward (bf16, 16 heads × 128 by default) of one
sequence as the CP algorithms run it (`LocalAttention` over the kernel), against the cuDNN path without a softcap;
and each candidate's exactness against the math kernel on a small packed case. The JSON's `choice` is the fastest
exact softcap candidate per length, which `kernels.SOFTCAP_KERNEL` / `triton_softcap.TANH` / `flex.SCORE_MOD` take.

Candidates (each one's failure, at compile time or in the check, is recorded and the others go on):
  cudnn (no softcap)       TorchKernel: the reference (1.0×)
  flex autograd [tanh|exp] FlexAttention's own forward+backward (no merged out/lse: not usable by a ring; the issue's
                           0.35×), with torch.tanh or the one-exp score_mod
  flex [tanh|exp]          FlexKernel: its backward recomputes the forward with autograd to take a merged out/lse
  triton [exp|libdevice|approx|rational] [atomic]  TritonSoftcapKernel with each tanh formula, dQ in its own kernel or by
                           atomic adds in the dK/dV kernel (see kernels/triton_softcap.py)
  triton (no softcap)      the same kernel without a softcap: its own speed against cuDNN

Exactness: on 4096 tokens in documents of 1000/1500/96/1500, causal with a 700-token window, GQA 32:8, the softcap
kernels' out/lse and dq/dk/dv (from the math kernel's out/lse) against MathKernel on the same bf16 inputs (float32
math), as max|got − ref| / max|ref|, with queries scaled so that the scores spread over ±~60 and the cap bends them; also two key blocks merged through their lse as a ring merges them. A candidate
counts as exact when every error is within 2× that of the cuDNN/flash path without a softcap against the math
kernel without one (the bf16 level of a fused kernel), or below 1e-5. The Triton candidates are checked in float32
too (`errors_float32`: their tanh formula's error in the whole kernel), and `tanh_error` gives each formula's own
error against float64 over [−100, 100] (and densely over [−1, 1]).

    python benchmarks/softcap_kernels.py --seqs 32768,131072 --out benchmarks/results/softcap_kernels_1xH200.json
    python benchmarks/softcap_kernels.py --smoke     # CPU: float32, tiny, the Triton kernel under its interpreter

`--tune wide` gives the Triton kernels' autotuners many more configs for the timed case (long rows, no window; the
check keeps the module's few), and the JSON records the winners: how the module's config lists are chosen.
Each timed case also gets the forward alone (`fwd_ms`), so that the backward's share shows.

Under a 10-minute limit per command, run it in parts (--only; each part times the reference again) and merge them:

    python benchmarks/softcap_kernels.py --only "triton exp,triton exp atomic" --out /tmp/a.json
    python benchmarks/softcap_kernels.py --merge /tmp/a.json,/tmp/b.json --out benchmarks/results/...json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import traceback
from collections.abc import Callable

import torch
from attention import timed

from transformers_cp.algorithms.local import LocalAttention
from transformers_cp.algorithms.merge import Accumulator
from transformers_cp.kernels import Segments, flex
from transformers_cp.kernels.math import MathKernel
from transformers_cp.kernels.torch_fused import TorchKernel

CUDA = torch.cuda.is_available()
DTYPE = torch.bfloat16 if CUDA else torch.float32
REFERENCE = "cudnn (no softcap)"


def triton_kernel(softcap: float | None, tanh: str | None = None, dq: str = "separate"):
    from transformers_cp.kernels.triton_softcap import TritonSoftcapKernel

    return TritonSoftcapKernel(softcap, tanh=tanh, dq=dq)


def candidates(softcap: float) -> dict[str, tuple[Callable, bool, bool]]:
    """name -> (make the kernel, through FlexAttention's own autograd, with a softcap)."""
    reference = (TorchKernel, False, False) if CUDA else (MathKernel, False, False)
    return {
        REFERENCE: reference,
        "flex autograd tanh": (lambda: flex.FlexKernel(softcap, tanh="tanh"), True, True),
        "flex autograd exp": (lambda: flex.FlexKernel(softcap, tanh="exp"), True, True),
        "flex tanh": (lambda: flex.FlexKernel(softcap, tanh="tanh"), False, True),
        "flex exp": (lambda: flex.FlexKernel(softcap, tanh="exp"), False, True),
        "triton exp": (lambda: triton_kernel(softcap, "exp"), False, True),
        "triton libdevice": (lambda: triton_kernel(softcap, "libdevice"), False, True),
        "triton approx": (lambda: triton_kernel(softcap, "approx"), False, True),
        "triton rational": (lambda: triton_kernel(softcap, "rational"), False, True),
        "triton rational atomic": (lambda: triton_kernel(softcap, "rational", "atomic"), False, True),
        "triton exp atomic": (lambda: triton_kernel(softcap, "exp", "atomic"), False, True),
        "triton approx atomic": (lambda: triton_kernel(softcap, "approx", "atomic"), False, True),
        "triton (no softcap)": (lambda: triton_kernel(None), False, False),
    }


CHOICES = {  # candidate -> the settings that make kernel_class pick it
    "flex tanh": {"SOFTCAP_KERNEL": "flex", "flex.SCORE_MOD": "tanh"},
    "flex exp": {"SOFTCAP_KERNEL": "flex", "flex.SCORE_MOD": "exp"},
    **{
        f"triton {tanh}{' atomic' * (dq == 'atomic')}": {
            "SOFTCAP_KERNEL": "triton", "triton_softcap.TANH": tanh, "triton_softcap.DQ": dq
        }
        for tanh in ("exp", "libdevice", "approx", "rational")
        for dq in ("separate", "atomic")
    },
}  # fmt: skip


def causal_tflop(seq: int, heads: int, head_dim: int) -> float:
    """Forward+backward matmul work of one causal sequence (2 GEMMs forward, 5 backward, half the square)."""
    return 4 * seq * seq / 2 * heads * head_dim * 3.5 / 1e12


def attention_fn(kernel, autograd: bool, seg: Segments, scale: float):
    if autograd:
        return lambda q, k, v: kernel._attend(q, k, v, seg, scale)[0]
    return lambda q, k, v: LocalAttention.apply(q, k, v, seg, kernel, scale)


def _error(got: torch.Tensor, want: torch.Tensor) -> float:
    finite = want.isfinite()
    if not torch.equal(got.isfinite(), finite):
        return float("inf")
    want, got = want[finite].float(), got[finite].float()
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()


def packed_inputs(a, device, seed: int = 0):
    g = torch.Generator(device=device).manual_seed(seed)
    docs, (hq, hk), d = a.check_docs, a.check_heads, a.head_dim
    n = sum(docs)
    q = torch.randn(n, hq, d, device=device, generator=g) * a.check_q_scale
    k, v = (torch.randn(n, hk, d, device=device, generator=g) for _ in range(2))
    dout = torch.randn(n, hq, d, device=device, generator=g)
    cu = (0, *torch.tensor(docs).cumsum(0).tolist())
    return (t.to(DTYPE) for t in (q, k, v, dout)), Segments(cu, cu, True, a.check_window)


def check(kernel, softcap: float | None, a, device, dtype: torch.dtype = DTYPE, merged: bool = True) -> dict:
    """max relative errors against MathKernel on the packed case, and over two merged key blocks."""
    (q, k, v, dout), seg = packed_inputs(a, device)
    q, k, v, dout = (t.to(dtype) for t in (q, k, v, dout))
    scale, exact = a.head_dim**-0.5, MathKernel(softcap)
    out, lse = kernel.forward(q, k, v, seg, scale)
    ref_out, ref_lse = exact.forward(q, k, v, seg, scale)
    grads = kernel.backward(dout, q, k, v, ref_out.to(q.dtype), ref_lse, seg, scale)
    ref_grads = exact.backward(dout, q, k, v, ref_out.to(q.dtype), ref_lse, seg, scale)
    errors = {"out": _error(out, ref_out), "lse": _error(lse, ref_lse)}
    errors.update({name: _error(g, r) for name, g, r in zip(("dq", "dk", "dv"), grads, ref_grads)})
    if merged:
        n = a.check_docs[0]
        got = merged_blocks(kernel, q[:n], k[:n], v[:n], dout[:n], scale)
        want = merged_blocks(exact, q[:n], k[:n], v[:n], dout[:n], scale)
        errors.update({f"merged {t}": _error(g, r) for t, g, r in zip(("out", "dq", "dk", "dv"), got, want)})
    return errors


def merged_blocks(kernel, q, k, v, dout, scale: float):
    """One document's last 60 % of rows over its keys split in two blocks, merged through the lse; each block's
    backward takes the merged (out, lse), as ring attention calls it."""
    n = q.shape[0]
    split = 2 * n // 5
    rows = n - split
    blocks = [
        (slice(0, split), Segments((0, rows), (0, split), causal=False)),
        (slice(split, n), Segments((0, rows), (0, rows), causal=True)),
    ]
    qs, acc = q[split:], Accumulator(q[split:])
    for keys, seg in blocks:
        acc.add((0, rows), *kernel.forward(qs, k[keys], v[keys], seg, scale))
    grads = [torch.zeros(t.shape, dtype=torch.float32, device=t.device) for t in (qs, k, v)]
    for keys, seg in blocks:
        g = kernel.backward(dout[split:], qs, k[keys], v[keys], acc.out.to(q.dtype), acc.lse, seg, scale)
        grads[0] += g[0].float()
        grads[1][keys] += g[1].float()
        grads[2][keys] += g[2].float()
    return (acc.out, *grads)


def tanh_error(device) -> dict:
    """Each Triton tanh formula against float64 tanh over [−100, 100] and [−1, 1]: max absolute and relative error."""
    from transformers_cp.kernels import triton_softcap

    x = torch.cat([torch.linspace(-100, 100, 1 << 20), torch.linspace(-1, 1, 1 << 20)]).to(device)
    want = torch.tanh(x.double())
    out = {}
    for name in triton_softcap.TANH_MODES:
        try:
            y = triton_softcap.tanh(x, name)
            err = (y.double() - want).abs()
            out[name] = {"max_abs": err.max().item(), "max_rel": (err / want.abs().clamp_min(1e-30)).max().item()}
        except Exception as e:  # noqa: BLE001 - a formula this device or the interpreter cannot run is an outcome
            out[name] = {"error": repr(e)[:300]}
    return out


WIDE = {  # --tune wide: (rows or keys, the other, warps, stages) per kernel, as the module's lists
    "fwd": [(128, 64, 8, 2), (128, 64, 8, 3), (128, 64, 8, 4), (128, 128, 8, 2), (128, 128, 8, 3), (128, 32, 8, 3),
            (128, 32, 4, 3), (128, 64, 4, 3), (64, 64, 4, 2), (64, 64, 4, 3), (64, 64, 4, 4), (64, 128, 4, 2),
            (64, 128, 4, 3), (64, 32, 4, 3), (64, 64, 8, 3)],
    "dq": [(128, 64, 8, 2), (128, 64, 8, 3), (128, 32, 8, 2), (128, 32, 8, 3), (128, 32, 4, 3), (64, 64, 4, 2),
           (64, 64, 4, 3), (64, 64, 8, 2), (64, 32, 4, 3), (64, 128, 8, 2), (128, 128, 8, 2)],
    "dkv": [(128, 32, 8, 2), (128, 32, 8, 3), (128, 64, 8, 2), (128, 64, 8, 3), (64, 64, 4, 2), (64, 64, 4, 3),
            (64, 64, 8, 3), (64, 32, 4, 3), (128, 32, 4, 2), (64, 128, 8, 2), (128, 128, 8, 2)],
}  # fmt: skip


def widen_tuning() -> None:
    """--tune wide: the WIDE configs for long rows without a window, the module's own for every other key."""
    from transformers_cp.kernels import triton_softcap as ts

    for name, fn, names in (("fwd", ts._fwd_kernel, ("BM", "BN")), ("dq", ts._dq_kernel, ("BM", "BN")),
                            ("dkv", ts._dkv_kernel, ("BN", "BM"))):  # fmt: skip
        wide = ts._configs(WIDE[name], names)[:-1]  # without the float32 config _configs appends
        fn.configs = wide + fn.configs
        fn.early_config_prune = _wide_prune(len(wide), fn.early_config_prune)


def _wide_prune(n_wide: int, own):
    """The first `n_wide` configs for the timed case's key, `own`'s choice among the rest otherwise."""

    def prune(configs, named_args, **kwargs):
        if named_args["Q"].dtype != torch.float32 and kwargs["LONG"] and not kwargs["WINDOW"]:
            return configs[:n_wide]
        return own(configs[n_wide:], named_args, **kwargs)

    return prune


def time_at(kernel, autograd: bool, a, device, seq: int) -> dict:
    """Forward+backward of one causal sequence of `seq` tokens (and the forward alone): ms and TFLOP/s, or the
    error."""
    g = torch.Generator(device=device).manual_seed(seq)
    q = torch.randn(seq, a.heads[0], a.head_dim, device=device, dtype=DTYPE, generator=g)
    k, v = (torch.randn(seq, a.heads[1], a.head_dim, device=device, dtype=DTYPE, generator=g) for _ in range(2))
    dout = torch.randn_like(q)
    attn = attention_fn(kernel, autograd, Segments((0, seq), (0, seq), True), a.head_dim**-0.5)

    def step() -> None:
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        attn(*leaves).backward(dout)

    def forward() -> None:
        with torch.no_grad():
            attn(q, k, v)

    iters = a.iters if seq >= 32768 else a.iters * 4
    try:
        ms = timed(step, iters, lockstep=False)
        return {"ms": ms, "tflops": causal_tflop(seq, a.heads[0], a.head_dim) / ms * 1e3,
                "fwd_ms": timed(forward, iters, lockstep=False)}  # fmt: skip
    except Exception:  # noqa: BLE001 - a compile error or out of memory is an outcome
        return {"error": traceback.format_exc()[-1500:]}


def run_candidate(name: str, spec, a, device, seqs: list[int]) -> dict:
    make, autograd, capped = spec
    row: dict = {"name": name, "softcap": capped, "times": {}}
    try:
        kernel = make()
    except Exception as e:  # noqa: BLE001
        return {**row, "error": f"make: {e!r}"[:500]}
    if not autograd:
        try:
            row["errors"] = check(kernel, a.softcap if capped else None, a, device)
        except Exception:  # noqa: BLE001 - a candidate that cannot run the check is reported, not fatal
            row["check_error"] = traceback.format_exc()[-1500:]
    if CUDA and capped and name.startswith("triton") and not name.endswith("atomic"):
        try:  # the tanh formula's error in the whole kernel, without bf16 rounding in the way
            row["errors_float32"] = check(kernel, a.softcap, a, device, torch.float32, merged=False)
        except Exception:  # noqa: BLE001
            row["check_error_float32"] = traceback.format_exc()[-1500:]
    for seq in seqs:
        row["times"][seq] = time_at(kernel, autograd, a, device, seq)
        if CUDA:
            torch.cuda.empty_cache()
        print(f"{name} seq={seq}: {row['times'][seq]}", flush=True)
    if name.startswith("triton"):
        from transformers_cp.kernels import triton_softcap as ts

        row["configs"] = {
            n: str(getattr(fn, "best_config", None)) for n, fn in (("fwd", ts._fwd_kernel), ("dq", ts._dq_kernel),
                                                                   ("dkv", ts._dkv_kernel))
        }  # fmt: skip
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seqs", default="32768,131072")
    p.add_argument("--heads", default="16:16", help="query:KV heads of the timed case")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--softcap", type=float, default=50.0, help="Gemma 2's attn_logit_softcapping")
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--only", default=None, help="comma-separated candidate names (default: all)")
    p.add_argument(
        "--tune", choices=("module", "wide"), default="module", help="the Triton kernels' autotuning configs"
    )
    p.add_argument("--smoke", action="store_true", help="CPU: float32, tiny shapes, Triton's interpreter")
    p.add_argument("--out", default=None, help="JSON file, rewritten after each candidate")
    p.add_argument(
        "--merge", default=None, help="comma-separated JSON files of runs (--only parts) to merge into --out"
    )
    a = p.parse_args()
    if a.merge:
        return merge(a.merge.split(","), a.out)
    a.heads = tuple(int(h) for h in a.heads.split(":"))
    seqs = [int(s) for s in a.seqs.split(",")]
    a.check_docs, a.check_heads, a.check_window, a.check_q_scale = [1000, 1500, 96, 1500], (32, 8), 700, 20.0
    if a.smoke:
        seqs, a.heads, a.head_dim, a.iters = [64], (2, 2), 16, 1
        a.check_docs, a.check_heads, a.check_window = [40, 23, 1], (4, 2), 17
    if not CUDA:
        if not a.smoke:
            sys.exit("needs a CUDA GPU (or --smoke on CPU)")
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before Triton's first import, which reads it
    device = torch.device("cuda" if CUDA else "cpu")
    if a.tune == "wide":
        widen_tuning()
    torch._dynamo.config.cache_size_limit = 64
    meta = dict(
        command=" ".join(["python", *sys.argv]),
        machine=torch.cuda.get_device_name() if CUDA else platform.processor() or "cpu",
        torch=torch.__version__,
        dtype=str(DTYPE),
        heads=f"{a.heads[0]}:{a.heads[1]}",
        head_dim=a.head_dim,
        softcap=a.softcap,
        check=dict(docs=a.check_docs, heads=a.check_heads, window=a.check_window, q_scale=a.check_q_scale),
        date=time.strftime("%Y-%m-%d %H:%M"),
        tune=a.tune,
    )
    try:
        import triton

        meta["triton"] = triton.__version__
    except ImportError:
        meta["triton"] = None
    result: dict = {"meta": meta, "candidates": []}

    def save() -> None:
        if a.out:
            os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
            with open(a.out, "w") as f:
                json.dump(result, f, indent=1)

    try:
        result["tanh_error"] = tanh_error(device)
    except Exception as e:  # noqa: BLE001
        result["tanh_error"] = {"error": repr(e)[:300]}
    print("tanh error:", result["tanh_error"], flush=True)
    specs = candidates(a.softcap)
    names = [REFERENCE, *[n for n in specs if n != REFERENCE]] if a.only is None else a.only.split(",")
    if REFERENCE not in names:
        names.insert(0, REFERENCE)
    for name in names:
        result["candidates"].append(run_candidate(name, specs[name], a, device, seqs))
        save()
    summarize(result, seqs)
    save()


def merge(paths: list[str], out: str | None) -> None:
    """One result of several runs (each with its own reference row, the first one kept): the choice over all."""
    parts = []
    for path in paths:
        with open(path) as f:
            parts.append(json.load(f))
    result = {
        "meta": {**parts[0]["meta"], "merged": paths},
        "tanh_error": parts[0].get("tanh_error"),
        "candidates": [],
    }
    for part in parts:
        names = {r["name"] for r in result["candidates"]}
        result["candidates"] += [r for r in part["candidates"] if r["name"] not in names]
    for r in result["candidates"]:
        r["times"] = {int(seq): t for seq, t in r["times"].items()}
    seqs = sorted({seq for r in result["candidates"] for seq in r["times"]})
    summarize(result, seqs)
    if out:
        with open(out, "w") as f:
            json.dump(result, f, indent=1)


def summarize(result: dict, seqs: list[int]) -> None:
    """Ratios to the reference, exactness, and the fastest exact softcap candidate per length."""
    rows = {r["name"]: r for r in result["candidates"]}
    ref = rows[REFERENCE]
    base = ref.get("errors") or {}
    for r in rows.values():
        for seq, t in r["times"].items():
            ref_ms = ref["times"].get(seq, {}).get("ms")
            if "ms" in t and ref_ms:
                t["ratio"] = ref_ms / t["ms"]
        errs = r.get("errors")
        if errs and base:
            r["exact"] = all(e <= max(2 * base.get(n, 0.0), 1e-5) for n, e in errs.items())
    result["choice"] = {}
    for seq in seqs:
        exact = [
            r for r in rows.values() if r["name"] in CHOICES and r.get("exact") and "ms" in r["times"].get(seq, {})
        ]
        if exact:
            best = min(exact, key=lambda r: r["times"][seq]["ms"])
            result["choice"][seq] = {"candidate": best["name"], "ratio": best["times"][seq].get("ratio"),
                                     "settings": CHOICES[best["name"]]}  # fmt: skip
    print("\nname                      " + "".join(f"{s:>16}" for s in seqs) + "  exact  max error")
    for r in rows.values():
        cells = "".join(
            f"{r['times'][s].get('tflops', float('nan')):8.0f} ({r['times'][s].get('ratio', float('nan')):4.2f}x)"
            if s in r["times"] else f"{'':>16}"
            for s in seqs
        )  # fmt: skip
        worst = max((r.get("errors") or {"-": float("nan")}).values())
        print(f"{r['name']:26}{cells}  {str(r.get('exact', '-')):5}  {worst:.2e}", flush=True)
    print("choice:", result["choice"], flush=True)


if __name__ == "__main__":
    main()
