"""The Triton softcap kernel against the exact math kernel in float32, run under the Triton interpreter on CPU tensors
(Triton reads TRITON_INTERPRET once, when it is first imported, so this runs in a fresh process):

    TRITON_INTERPRET=1 python tests/softcap_kernel_job.py

Prints one JSON object: each check's name and None, or the assertion's message. test_softcap_kernel.py runs it.
"""

from __future__ import annotations

import functools
import json
import os

import torch
from reference import assert_close  # the script's directory is on sys.path

from transformers_cp.algorithms.merge import Accumulator
from transformers_cp.kernels import Segments
from transformers_cp.kernels.math import MathKernel

RTOL = 1e-5  # float32 flash accumulation against float32 matrix products: ~1e-6 here

CASES = {
    "causal one": ((0, 40), (0, 40), True, None),
    "causal documents window": ((0, 5, 37, 38, 70), (0, 5, 37, 38, 70), True, 9),
    "prefix causal": ((0, 20, 50), (0, 45, 90), True, None),
    "rows without keys": ((0, 50), (0, 30), True, 4),
    "dense window": ((0, 33), (0, 70), False, 40),
    "dense rectangle": ((0, 50), (0, 30), False, None),
}
HEADS = ((2, 2, 16), (4, 2, 24))  # (Hq, Hk, head dim); 24: the tile is padded to 32
SOFTCAPS = (None, 1.5)


def _inputs(nq: int, nk: int, hq: int, hk: int, d: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    q = 2 * torch.randn(nq, hq, d, generator=g)  # large enough scores that a softcap of 1.5 bends them
    return (
        q,
        torch.randn(nk, hk, d, generator=g),
        torch.randn(nk, hk, d, generator=g),
        torch.randn(nq, hq, d, generator=g),
    )


def _check_lse(got: torch.Tensor, want: torch.Tensor, name: str) -> None:
    """Rows that see no key have lse −inf in both; the others agree."""
    seen = want.isfinite()
    assert torch.equal(got.isfinite(), seen), f"{name}: rows without keys differ"
    assert_close(got[seen], want[seen], RTOL, name)


def against_math(kernel_cls, case: str, heads: tuple[int, int, int], softcap: float | None) -> None:
    cu_q, cu_k, causal, window = CASES[case]
    seg = Segments(cu_q, cu_k, causal, window)
    q, k, v, dout = _inputs(cu_q[-1], cu_k[-1], *heads, seed=len(case))
    kernel, exact = kernel_cls(softcap), MathKernel(softcap)
    out, lse = kernel.forward(q, k, v, seg, 0.3)
    ref_out, ref_lse = exact.forward(q, k, v, seg, 0.3)
    assert_close(out, ref_out, RTOL, "out")
    _check_lse(lse, ref_lse, "lse")
    grads = kernel.backward(dout, q, k, v, ref_out, ref_lse, seg, 0.3)
    for got, want, name in zip(grads, exact.backward(dout, q, k, v, ref_out, ref_lse, seg, 0.3), ("dq", "dk", "dv")):
        assert_close(got, want, RTOL, name)


def _merged(kernel, q, k, v, dout, split: int, scale: float):
    """Keys [0, split) and [split, T) of one causal document as two blocks (a ring's earlier block and its diagonal),
    merged through the lse; each block's backward takes the merged (out, lse), as ring attention calls it."""
    rows = q.shape[0] - split
    blocks = [
        (slice(0, split), Segments((0, rows), (0, split), causal=False)),
        (slice(split, q.shape[0]), Segments((0, rows), (0, rows), causal=True)),
    ]
    qs, acc = q[split:], Accumulator(q[split:])
    for keys, seg in blocks:
        acc.add((0, rows), *kernel.forward(qs, k[keys], v[keys], seg, scale))
    dq, dk, dv = torch.zeros_like(qs), torch.zeros_like(k), torch.zeros_like(v)
    for keys, seg in blocks:
        g = kernel.backward(dout[split:], qs, k[keys], v[keys], acc.out, acc.lse, seg, scale)
        dq += g[0]
        dk[keys] += g[1]
        dv[keys] += g[2]
    return acc.out, acc.lse, dq, dk, dv


def merged_blocks(kernel_cls, softcap: float | None) -> None:
    """The backward from the merged (out, lse) of two blocks gives the whole attention's gradients."""
    q, k, v, dout = _inputs(60, 60, 4, 2, 16, seed=3)
    got = _merged(kernel_cls(softcap), q, k, v, dout, 22, 0.3)
    want = _merged(MathKernel(softcap), q, k, v, dout, 22, 0.3)
    for a, b, name in zip(got, want, ("out", "lse", "dq", "dk", "dv")):
        assert_close(a, b, RTOL, name)


def strided_inputs(kernel_cls) -> None:
    """Token-major views with other strides (q, k, v sliced out of one fused projection) give the same results."""
    qkv = torch.randn(48, 3, 4, 16, generator=torch.Generator().manual_seed(5))
    q, k, v = qkv.unbind(1)
    seg = Segments((0, 48), (0, 48), True, 11)
    kernel = kernel_cls(1.5)
    got = kernel.forward(q, k, v, seg, 0.25)
    want = kernel.forward(q.contiguous(), k.contiguous(), v.contiguous(), seg, 0.25)
    for a, b, name in zip(got, want, ("out", "lse")):
        assert torch.equal(a, b), name


def _big_offsets(kernel_cls):
    """The kernel class with the 64-bit offset path (taken when a tensor passes 2^31 elements) forced on."""

    class Big(kernel_cls):
        def _common(self, *args):
            return {**super()._common(*args), "BIG": True}

    return Big


def checks(kernel_cls) -> dict:
    """name -> callable, every check of the kernel class."""
    out = {}
    for case in CASES:
        for heads in HEADS:
            for softcap in SOFTCAPS:
                name = f"{case} heads={heads[0]}:{heads[1]} d={heads[2]} softcap={softcap}"
                out[name] = lambda c=case, h=heads, s=softcap: against_math(kernel_cls, c, h, s)
    for softcap in SOFTCAPS:
        out[f"merged blocks softcap={softcap}"] = lambda s=softcap: merged_blocks(kernel_cls, s)
    atomic = functools.partial(kernel_cls, dq="atomic")
    for case in ("causal documents window", "prefix causal"):
        out[f"atomic dq {case}"] = lambda c=case: against_math(atomic, c, HEADS[1], 1.5)
    out["atomic dq merged blocks"] = lambda: merged_blocks(atomic, 1.5)
    rational = functools.partial(kernel_cls, tanh="rational")
    for case in ("causal documents window", "prefix causal"):
        out[f"rational tanh {case}"] = lambda c=case: against_math(rational, c, HEADS[1], 1.5)
    out["rational tanh merged blocks"] = lambda: merged_blocks(rational, 1.5)
    for dq in ("separate", "atomic"):
        big = functools.partial(_big_offsets(kernel_cls), dq=dq)
        out[f"64-bit offsets dq={dq}"] = lambda k=big: against_math(k, "causal documents window", HEADS[1], 1.5)
    out["strided inputs"] = lambda: strided_inputs(kernel_cls)
    return out


def main() -> None:
    assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1 (the kernel runs on CPU tensors)"
    from transformers_cp.kernels.triton_softcap import TritonSoftcapKernel

    results = {}
    try:
        TritonSoftcapKernel(1.0, dq="both")
    except ValueError as e:
        results["bad setting refused"] = None if "dq=" in str(e) else str(e)
    else:
        results["bad setting refused"] = "dq='both' was taken"
    for name, check in checks(TritonSoftcapKernel).items():
        try:
            check()
            results[name] = None
        except AssertionError as e:
            results[name] = str(e)[:2000]
    print(json.dumps(results))


if __name__ == "__main__":
    main()
