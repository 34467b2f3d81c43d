"""Flash attention in Triton with the logit softcap in its inner loop (Gemma 2's `attn_logit_softcapping`), forward and
backward behind the one kernel interface (`base`): token-major varlen segments aligned bottom-right, causal, a left
window, GQA without repeating KV heads, head dim up to 256, half precision in and float32 accumulation.

Why a kernel of our own: FlexAttention's backward is its forward's autograd, so `FlexKernel` must recompute the forward
to take the merged (out, lse) of a ring. Here the backward is the standard flash backward, which needs nothing else:
with P = exp(S − lse) from the merged lse and delta = rowsum(dout ∘ out) from the merged out, a block's
dS = P ∘ (dP − delta) is exactly its share of the merged attention's gradient. With a softcap c the capped score is
c·tanh(s / c) and dS is multiplied by its derivative 1 − tanh²(s / c).

The tanh (`TANH`, see `_tanh`), which with the softmax's exp is what the exp unit (MUFU) computes per score:
  'approx'    `tanh.approx.f32` (sm_75+): one MUFU op; max abs error 7.6e-6 (measured over [−100, 100]), i.e. at most
              ~4e-4 on a capped score at softcap 50, relative ~1e-5: some 400× below the bf16 rounding of the q and k
              that make the score, so at half precision the kernel's errors against the float32 math kernel are those
              of the same kernel with an exact tanh (benchmarks/softcap_kernels.py checks both, each within 2× of the
              cuDNN path's own without a softcap). The default for half precision: fastest by a margin.
  'exp'       1 − 2 / (1 + 2^(2·log2(e)·x)): one ex2 and one reciprocal, both to a few float32 ulps, so the capped
              score is off by at most ~2e-7·softcap absolute (measured). The interpreter (CPU tests) runs it.
  'rational'  x·P(x²)/Q(x²) on x clamped to ±9 (P of degree 6 and Q of degree 3 in x², our own least-squares fit
              to tanh in float64; beyond 9 tanh is 1 in float32): eleven FMAs and one fast division, float32-accurate
              (max abs error ~3e-7) with one MUFU op, but measured slower than 'exp' (the FMA pipe is the limit then).
  'libdevice' CUDA's tanhf: float32-exact, many instructions. Float32 inputs on CUDA take it.

dQ (`DQ`): its own kernel over key blocks ('separate', deterministic), or atomic float32 adds from the dK/dV kernel
('atomic', FlashAttention-2's way: two fewer matrix products per tile pair).

Triton is imported with this module; `kernel_class` imports it lazily, so the package works without Triton.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from .base import Segments

TANH_MODES = {"exp": 0, "libdevice": 1, "approx": 2, "rational": 3}
TANH = "approx"
"""The tanh for half-precision inputs on CUDA: the fastest one whose errors are at the bf16 level (see above), as
benchmarks/softcap_kernels.py measured."""
DQ_MODES = ("separate", "atomic")
DQ = "separate"
"""How the backward computes dQ: 'separate', its own kernel over key blocks (recomputes S and dP: 7 matrix products
per tile pair instead of 5, deterministic), or 'atomic', in the dK/dV kernel with float32 atomic adds (FlashAttention-2's
way: 5 products, not bitwise reproducible). benchmarks/softcap_kernels.py times both."""
LOG2E = math.log2(math.e)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _interpreter_loop_bounds() -> None:
    """Triton 3.6's interpreter holds scalars as 1-element arrays and turns loop bounds into ints with int(array),
    which NumPy >= 2.4 refuses; read them with .item() instead (interpreter only: the compiled kernels are
    untouched)."""
    from triton.runtime import interpreter

    patch = interpreter._patch_lang_tensor
    if getattr(patch, "_item_index", False):
        return

    def patched(tensor, scope) -> None:
        patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    patched._item_index = True
    interpreter._patch_lang_tensor = patched


if _interpreting():
    _interpreter_loop_bounds()


def _configs(table: list[tuple[int, int, int, int]], names: tuple[str, str]) -> list[triton.Config]:
    """Autotuning candidates (block sizes, warps, stages) and last the one for float32 inputs (`_by_dtype`); one
    small config under the interpreter."""
    if _interpreting():
        table = [(16, 16, 1, 1)]
    else:
        table = [*table, FLOAT32_CONFIG]
    return [triton.Config({names[0]: a, names[1]: b}, num_warps=w, num_stages=s) for a, b, w, s in table]


def _by_dtype(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Float32 tiles take twice the shared memory: float32 inputs (never chosen by `kernel_class`, but measured by
    the benchmark) get the small last config alone, half precision the others."""
    return configs[-1:] if named_args["Q"].dtype == torch.float32 else configs[:-1]


BY_DTYPE = {"early_config_prune": _by_dtype}


# (rows, keys, warps, stages) candidates for H100/H200; the autotuner keeps the fastest per key. Candidates that do not
# fit in shared memory (head dim 256) fail to compile and are skipped by the autotuner.
# Three each, as every candidate compiles for each kernel variant (causal, window, softcap, tanh, dQ mode) on first use:
# the first of each list won `softcap_kernels.py --tune wide` (11-15 candidates per kernel) on one H200 at 32k and
# 128k tokens for each tanh formula (exp's forward took the second), the others are smaller ones for head dim 256.
FWD_CONFIGS = [(128, 64, 8, 4), (128, 32, 4, 3), (64, 64, 4, 3)]
DQ_CONFIGS = [(128, 64, 8, 3), (128, 32, 8, 2), (64, 64, 4, 3)]
DKV_CONFIGS = [(64, 32, 4, 3), (128, 32, 8, 2), (64, 64, 4, 3)]  # (keys, rows, warps, stages)
FLOAT32_CONFIG = (32, 32, 4, 2)
TUNE_KEY = ["HEAD_DIM", "CAUSAL", "WINDOW", "SOFTCAP", "TANH", "LONG", "ATOMIC_DQ"]
NOT_SPECIALIZED = ["window", "LONG"]  # Triton compiles integer arguments equal to 1 apart: not worth a compilation


@triton.jit
def _tanh(x, TANH: tl.constexpr):
    if TANH == 2:
        return tl.inline_asm_elementwise(
            "tanh.approx.f32 $0, $1;", "=f,f", [x], dtype=tl.float32, is_pure=True, pack=1
        )
    elif TANH == 1:
        return libdevice.tanh(x)
    elif TANH == 3:  # see the module docstring; Horner in x²
        x = tl.minimum(tl.maximum(x, -9.0), 9.0)
        s = x * x
        p = -8.893719742686386e-14 * s + 5.4353169960822535e-11
        p = p * s - 2.055167040865858e-08
        p = p * s + 1.123479640793213e-05
        p = p * s + 0.003111660982411036
        p = p * s + 0.1309091428981732
        p = p * s + 0.9999999981501021
        q = 0.00025573574467616594 * s + 0.02452587914221573
        q = q * s + 0.4642424349847991
        q = q * s + 1.0
        return tl.fdiv(x * p, q)
    else:
        # 2·log2(e); x capped at 15, where tanh is 1.0 in float32, so that the exp never overflows into inf / inf
        return 1.0 - tl.fdiv(2.0, 1.0 + tl.exp2(tl.minimum(x, 15.0) * 2.8853900817779268))


@triton.jit
def _scores(qk, QK_SCALE, CAP_SCALE, SOFTCAP: tl.constexpr, TANH: tl.constexpr):
    """Scores in log2 units, and tanh(s / softcap) for the backward (the raw products without a softcap)."""
    if SOFTCAP:
        t = _tanh(qk * QK_SCALE, TANH)
        return t * CAP_SCALE, t
    else:
        return qk * QK_SCALE, qk


@triton.jit
def _visible(rows, cols, lq, lk, off, window, CAUSAL: tl.constexpr, WINDOW: tl.constexpr):
    """Query rows (a) against keys (b) of one segment, broadcast: in range, b <= a + off, b >= a + off − window."""
    v = (rows < lq) & (cols < lk)
    if CAUSAL:
        v = v & (cols <= rows + off)
    if WINDOW:
        v = v & (cols >= rows + off - window)
    return v


@triton.jit
def _load(base, idx, bound, stride, dims, HEAD_DIM: tl.constexpr, D: tl.constexpr, CHECK: tl.constexpr):
    """Rows `idx` (< bound when CHECK) of a (rows, D) tile at `base`, zeros outside."""
    ptrs = base + idx[:, None] * stride + dims[None, :]
    if CHECK:
        return tl.load(ptrs, mask=(idx[:, None] < bound) & (dims[None, :] < HEAD_DIM), other=0.0)
    elif D != HEAD_DIM:
        return tl.load(ptrs, mask=dims[None, :] < HEAD_DIM, other=0.0)
    else:
        return tl.load(ptrs)


@triton.jit
def _load_kv(Kb, Vb, n, cols, lk, sk, sv, dims, HEAD_DIM: tl.constexpr, D: tl.constexpr, MASK: tl.constexpr,
             BIG: tl.constexpr, BN: tl.constexpr):  # fmt: skip
    """The K and V tiles of key rows `cols` (starting at n)."""
    if BIG:  # 64-bit offsets of the block, 32-bit ones within it
        k = _load(Kb + tl.cast(n, tl.int64) * sk, tl.arange(0, BN), lk - n, sk, dims, HEAD_DIM, D, MASK)
        v = _load(Vb + tl.cast(n, tl.int64) * sv, tl.arange(0, BN), lk - n, sv, dims, HEAD_DIM, D, MASK)
    else:  # fewer registers
        k = _load(Kb, cols, lk, sk, dims, HEAD_DIM, D, MASK)
        v = _load(Vb, cols, lk, sv, dims, HEAD_DIM, D, MASK)
    return k, v


@triton.jit
def _key_range(
    m0, lq, lk, off, window, CAUSAL: tl.constexpr, WINDOW: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr
):
    """Key-block starts for query rows [m0, m0 + BM): masked [lo, full_lo), unmasked [full_lo, full_hi), masked
    [full_hi, hi)."""
    m_end = tl.minimum(m0 + BM, lq)
    hi = lk
    if CAUSAL:
        hi = tl.maximum(tl.minimum(lk, m_end + off), 0)
    hi = tl.cdiv(hi, BN) * BN
    lo = 0
    full_lo = 0
    if WINDOW:
        lo = tl.maximum(m0 + off - window, 0) // BN * BN
        full_lo = tl.cdiv(tl.maximum(m0 + BM - 1 + off - window, 0), BN) * BN
    lo = tl.minimum(lo, hi)
    full_lo = tl.minimum(tl.maximum(full_lo, lo), hi)
    full_hi = lk // BN * BN
    if CAUSAL:
        full_hi = tl.minimum(full_hi, tl.maximum(m0 + off + 1, 0) // BN * BN)
    full_hi = tl.minimum(tl.maximum(full_hi, full_lo), hi)
    return lo, full_lo, full_hi, hi


@triton.jit
def _row_range(
    n0, lq, lk, off, window, CAUSAL: tl.constexpr, WINDOW: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr
):
    """Query-block starts for keys [n0, n0 + BN): masked [lo, full_lo), unmasked [full_lo, full_hi), masked
    [full_hi, hi)."""
    n_end = tl.minimum(n0 + BN, lk)
    lo = 0
    full_lo = 0
    if CAUSAL:
        lo = tl.maximum(n0 - off, 0) // BM * BM
        full_lo = tl.cdiv(tl.maximum(n0 + BN - 1 - off, 0), BM) * BM
    hi = lq
    full_hi = lq // BM * BM
    if WINDOW:
        hi = tl.minimum(lq, tl.maximum(n_end - off + window, 0))
        full_hi = tl.minimum(full_hi, tl.maximum(n0 - off + window + 1, 0) // BM * BM)
    hi = tl.cdiv(hi, BM) * BM
    lo = tl.minimum(lo, hi)
    full_lo = tl.minimum(tl.maximum(full_lo, lo), hi)
    if n0 + BN > lk:
        full_hi = full_lo
    full_hi = tl.minimum(tl.maximum(full_hi, full_lo), hi)
    return lo, full_lo, full_hi, hi


@triton.jit
def _fwd_blocks(acc, l_i, m_i, q, rows, Kb, Vb, sk, sv, start, end, lq, lk, off, window, QK_SCALE, CAP_SCALE,
                HEAD_DIM: tl.constexpr, D: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr,
                SOFTCAP: tl.constexpr, TANH: tl.constexpr, PRECISION: tl.constexpr, BIG: tl.constexpr,
                MASK: tl.constexpr, BN: tl.constexpr):  # fmt: skip
    dims = tl.arange(0, D)
    for n in range(start, end, BN):
        cols = n + tl.arange(0, BN)
        k, v = _load_kv(Kb, Vb, n, cols, lk, sk, sv, dims, HEAD_DIM, D, MASK, BIG, BN)
        s, t = _scores(tl.dot(q, tl.trans(k), input_precision=PRECISION), QK_SCALE, CAP_SCALE, SOFTCAP, TANH)
        if MASK:
            s = tl.where(_visible(rows[:, None], cols[None, :], lq, lk, off, window, CAUSAL, WINDOW), s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_new = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that see no key yet
        else:
            m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.autotune(configs=_configs(FWD_CONFIGS, ("BM", "BN")), key=TUNE_KEY, prune_configs_by=BY_DTYPE)
@triton.jit(do_not_specialize=NOT_SPECIALIZED)
def _fwd_kernel(Q, K, V, OUT, LSE, CU_Q, CU_K, sq_t, sq_h, sk_t, sk_h, sv_t, sv_h, so_t, so_h, slse_h,
                QK_SCALE, CAP_SCALE, window, LONG, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, D: tl.constexpr,
                CAUSAL: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, TANH: tl.constexpr,
                PRECISION: tl.constexpr, BIG: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):  # fmt: skip
    pid, h, seg = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    q0, k0 = tl.load(CU_Q + seg), tl.load(CU_K + seg)
    lq, lk = tl.load(CU_Q + seg + 1) - q0, tl.load(CU_K + seg + 1) - k0
    n_blocks = tl.cdiv(lq, BM)
    if pid >= n_blocks:
        return
    m0 = (n_blocks - 1 - pid) * BM  # the longest rows (causal) first
    off = lk - lq
    hk = h // GROUP
    rows = m0 + tl.arange(0, BM)
    dims = tl.arange(0, D)
    q = _load(Q + (q0 + m0).to(tl.int64) * sq_t + h * sq_h, tl.arange(0, BM), lq - m0, sq_t, dims, HEAD_DIM, D, True)
    Kb = K + k0.to(tl.int64) * sk_t + hk * sk_h
    Vb = V + k0.to(tl.int64) * sv_t + hk * sv_h
    acc = tl.zeros([BM, D], dtype=tl.float32)
    l_i = tl.zeros([BM], dtype=tl.float32)
    m_i = tl.full([BM], float("-inf"), dtype=tl.float32)
    lo, full_lo, full_hi, hi = _key_range(m0, lq, lk, off, window, CAUSAL, WINDOW, BM, BN)
    acc, l_i, m_i = _fwd_blocks(acc, l_i, m_i, q, rows, Kb, Vb, sk_t, sv_t, lo, full_lo, lq, lk, off, window,
        QK_SCALE, CAP_SCALE, HEAD_DIM, D, CAUSAL, WINDOW, SOFTCAP, TANH, PRECISION, BIG, True, BN)  # fmt: skip
    acc, l_i, m_i = _fwd_blocks(acc, l_i, m_i, q, rows, Kb, Vb, sk_t, sv_t, full_lo, full_hi, lq, lk, off, window,
        QK_SCALE, CAP_SCALE, HEAD_DIM, D, CAUSAL, WINDOW, SOFTCAP, TANH, PRECISION, BIG, False, BN)  # fmt: skip
    acc, l_i, m_i = _fwd_blocks(acc, l_i, m_i, q, rows, Kb, Vb, sk_t, sv_t, full_hi, hi, lq, lk, off, window,
        QK_SCALE, CAP_SCALE, HEAD_DIM, D, CAUSAL, WINDOW, SOFTCAP, TANH, PRECISION, BIG, True, BN)  # fmt: skip
    seen = l_i > 0.0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    lse = tl.where(seen, (m_i + tl.log2(tl.where(seen, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
    optrs = OUT + (q0 + m0).to(tl.int64) * so_t + h * so_h + tl.arange(0, BM)[:, None] * so_t + dims[None, :]
    tl.store(optrs, out.to(OUT.dtype.element_ty), mask=(rows[:, None] < lq) & (dims[None, :] < HEAD_DIM))
    tl.store(LSE + h * slse_h + q0 + rows, lse, mask=rows < lq)


@triton.jit
def _delta_kernel(OUT, DO, DELTA, T, so_t, so_h, sdo_t, sdo_h, sd_h, HEAD_DIM: tl.constexpr, D: tl.constexpr,
                  BM: tl.constexpr):  # fmt: skip
    """delta = rowsum(dout ∘ out) in float32, (H, T)."""
    pid, h = tl.program_id(0), tl.program_id(1)
    rows = pid * BM + tl.arange(0, BM)
    dims = tl.arange(0, D)
    mask = (rows[:, None] < T) & (dims[None, :] < HEAD_DIM)
    o = tl.load(OUT + h * so_h + rows.to(tl.int64)[:, None] * so_t + dims[None, :], mask=mask, other=0.0)
    do = tl.load(DO + h * sdo_h + rows.to(tl.int64)[:, None] * sdo_t + dims[None, :], mask=mask, other=0.0)
    tl.store(DELTA + h * sd_h + rows, tl.sum(o.to(tl.float32) * do.to(tl.float32), 1), mask=rows < T)


@triton.jit
def _row_stats(LSEb, DELTAb, rows, lq, MASK: tl.constexpr):
    """The rows' lse in log2 units (0 where there is none, so that masked scores give P = 0) and delta."""
    if MASK:
        lse = tl.load(LSEb + rows, mask=rows < lq, other=0.0) * 1.4426950408889634
        lse = tl.where(lse == float("-inf"), 0.0, lse)
        delta = tl.load(DELTAb + rows, mask=rows < lq, other=0.0)
    else:
        lse = tl.load(LSEb + rows) * 1.4426950408889634
        delta = tl.load(DELTAb + rows)
    return lse, delta


@triton.jit
def _dq_blocks(dq, q, do, lse, delta, rows, Kb, Vb, sk, sv, start, end, lq, lk, off, window, QK_SCALE, CAP_SCALE,
               HEAD_DIM: tl.constexpr, D: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr,
               SOFTCAP: tl.constexpr, TANH: tl.constexpr, PRECISION: tl.constexpr, BIG: tl.constexpr,
               MASK: tl.constexpr, BN: tl.constexpr):  # fmt: skip
    dims = tl.arange(0, D)
    for n in range(start, end, BN):
        cols = n + tl.arange(0, BN)
        k, v = _load_kv(Kb, Vb, n, cols, lk, sk, sv, dims, HEAD_DIM, D, MASK, BIG, BN)
        s, t = _scores(tl.dot(q, tl.trans(k), input_precision=PRECISION), QK_SCALE, CAP_SCALE, SOFTCAP, TANH)
        if MASK:
            s = tl.where(_visible(rows[:, None], cols[None, :], lq, lk, off, window, CAUSAL, WINDOW), s, float("-inf"))
        p = tl.exp2(s - lse[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        if SOFTCAP:
            ds = ds * (1.0 - t * t)
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    return dq


@triton.autotune(configs=_configs(DQ_CONFIGS, ("BM", "BN")), key=TUNE_KEY, prune_configs_by=BY_DTYPE)
@triton.jit(do_not_specialize=NOT_SPECIALIZED)
def _dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, CU_Q, CU_K, sq_t, sq_h, sk_t, sk_h, sv_t, sv_h, sdo_t, sdo_h, sdq_t,
               sdq_h, slse_h, sd_h, scale, QK_SCALE, CAP_SCALE, window, LONG, GROUP: tl.constexpr,
               HEAD_DIM: tl.constexpr, D: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr,
               SOFTCAP: tl.constexpr, TANH: tl.constexpr, PRECISION: tl.constexpr, BIG: tl.constexpr,
               BM: tl.constexpr, BN: tl.constexpr):  # fmt: skip
    pid, h, seg = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    q0, k0 = tl.load(CU_Q + seg), tl.load(CU_K + seg)
    lq, lk = tl.load(CU_Q + seg + 1) - q0, tl.load(CU_K + seg + 1) - k0
    n_blocks = tl.cdiv(lq, BM)
    if pid >= n_blocks:
        return
    m0 = (n_blocks - 1 - pid) * BM
    off = lk - lq
    hk = h // GROUP
    rows = m0 + tl.arange(0, BM)
    local = tl.arange(0, BM)
    dims = tl.arange(0, D)
    base = (q0 + m0).to(tl.int64)
    q = _load(Q + base * sq_t + h * sq_h, local, lq - m0, sq_t, dims, HEAD_DIM, D, True)
    do = _load(DO + base * sdo_t + h * sdo_h, local, lq - m0, sdo_t, dims, HEAD_DIM, D, True)
    lse, delta = _row_stats(LSE + h * slse_h + q0, DELTA + h * sd_h + q0, rows, lq, True)
    Kb = K + k0.to(tl.int64) * sk_t + hk * sk_h
    Vb = V + k0.to(tl.int64) * sv_t + hk * sv_h
    dq = tl.zeros([BM, D], dtype=tl.float32)
    lo, full_lo, full_hi, hi = _key_range(m0, lq, lk, off, window, CAUSAL, WINDOW, BM, BN)
    dq = _dq_blocks(dq, q, do, lse, delta, rows, Kb, Vb, sk_t, sv_t, lo, full_lo, lq, lk, off, window, QK_SCALE,
        CAP_SCALE, HEAD_DIM, D, CAUSAL, WINDOW, SOFTCAP, TANH, PRECISION, BIG, True, BN)  # fmt: skip
    dq = _dq_blocks(dq, q, do, lse, delta, rows, Kb, Vb, sk_t, sv_t, full_lo, full_hi, lq, lk, off, window, QK_SCALE,
        CAP_SCALE, HEAD_DIM, D, CAUSAL, WINDOW, SOFTCAP, TANH, PRECISION, BIG, False, BN)  # fmt: skip
    dq = _dq_blocks(dq, q, do, lse, delta, rows, Kb, Vb, sk_t, sv_t, full_hi, hi, lq, lk, off, window, QK_SCALE,
        CAP_SCALE, HEAD_DIM, D, CAUSAL, WINDOW, SOFTCAP, TANH, PRECISION, BIG, True, BN)  # fmt: skip
    ptrs = DQ + base * sdq_t + h * sdq_h + local[:, None] * sdq_t + dims[None, :]
    tl.store(ptrs, (dq * scale).to(DQ.dtype.element_ty), mask=(rows[:, None] < lq) & (dims[None, :] < HEAD_DIM))


@triton.jit
def _dkv_blocks(dk, dv, k, v, cols, Qb, DOb, LSEb, DELTAb, DQb, sq, sdo, sdq, start, end, lq, lk, off, window,
                QK_SCALE, CAP_SCALE, HEAD_DIM: tl.constexpr, D: tl.constexpr, CAUSAL: tl.constexpr,
                WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, TANH: tl.constexpr, PRECISION: tl.constexpr,
                BIG: tl.constexpr, ATOMIC_DQ: tl.constexpr, MASK: tl.constexpr, BM: tl.constexpr):  # fmt: skip
    """Transposed tiles (keys × rows): P^T = exp(S^T − lse), dV += P^T·dO, dK += dS^T·Q; with ATOMIC_DQ also
    dQ += dS·K, added atomically into a float32 buffer (unscaled)."""
    dims = tl.arange(0, D)
    for m in range(start, end, BM):
        rows = m + tl.arange(0, BM)
        if BIG:  # 64-bit offsets of the block, 32-bit ones within it
            m64 = tl.cast(m, tl.int64)
            Qm, DOm, DQm = Qb + m64 * sq, DOb + m64 * sdo, DQb + m64 * sdq
            q = _load(Qm, tl.arange(0, BM), lq - m, sq, dims, HEAD_DIM, D, MASK)
            do = _load(DOm, tl.arange(0, BM), lq - m, sdo, dims, HEAD_DIM, D, MASK)
            dq_rows = tl.arange(0, BM)
        else:  # fewer registers
            q = _load(Qb, rows, lq, sq, dims, HEAD_DIM, D, MASK)
            do = _load(DOb, rows, lq, sdo, dims, HEAD_DIM, D, MASK)
            DQm, dq_rows = DQb, rows
        lse, delta = _row_stats(LSEb, DELTAb, rows, lq, MASK)
        st, t = _scores(tl.dot(k, tl.trans(q), input_precision=PRECISION), QK_SCALE, CAP_SCALE, SOFTCAP, TANH)
        if MASK:
            st = tl.where(
                _visible(rows[None, :], cols[:, None], lq, lk, off, window, CAUSAL, WINDOW), st, float("-inf")
            )
        pt = tl.exp2(st - lse[None, :])
        dv += tl.dot(pt.to(do.dtype), do, input_precision=PRECISION)
        dpt = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        dst = pt * (dpt - delta[None, :])
        if SOFTCAP:
            dst = dst * (1.0 - t * t)
        dst = dst.to(q.dtype)
        dk += tl.dot(dst, q, input_precision=PRECISION)
        if ATOMIC_DQ:
            dq = tl.dot(tl.trans(dst), k, input_precision=PRECISION)
            ptrs = DQm + dq_rows[:, None] * sdq + dims[None, :]
            if MASK:
                tl.atomic_add(ptrs, dq, mask=(rows[:, None] < lq) & (dims[None, :] < HEAD_DIM), sem="relaxed")
            elif D != HEAD_DIM:
                tl.atomic_add(ptrs, dq, mask=dims[None, :] < HEAD_DIM, sem="relaxed")
            else:
                tl.atomic_add(ptrs, dq, sem="relaxed")
    return dk, dv


@triton.autotune(
    configs=_configs(DKV_CONFIGS, ("BN", "BM")), key=TUNE_KEY, prune_configs_by=BY_DTYPE, reset_to_zero=["DQ"]
)
@triton.jit(do_not_specialize=NOT_SPECIALIZED)
def _dkv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, DQ, CU_Q, CU_K, sq_t, sq_h, sk_t, sk_h, sv_t, sv_h, sdo_t, sdo_h,
                sdk_t, sdk_h, sdv_t, sdv_h, sdq_t, sdq_h, slse_h, sd_h, scale, QK_SCALE, CAP_SCALE, window, LONG,
                GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, D: tl.constexpr, CAUSAL: tl.constexpr,
                WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, TANH: tl.constexpr, PRECISION: tl.constexpr,
                BIG: tl.constexpr, ATOMIC_DQ: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):  # fmt: skip
    """One key block of one KV head: every query head of its group in turn (GQA without atomics)."""
    pid, hk, seg = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    q0, k0 = tl.load(CU_Q + seg), tl.load(CU_K + seg)
    lq, lk = tl.load(CU_Q + seg + 1) - q0, tl.load(CU_K + seg + 1) - k0
    n0 = pid * BN
    if n0 >= lk:
        return
    off = lk - lq
    cols = n0 + tl.arange(0, BN)
    local = tl.arange(0, BN)
    dims = tl.arange(0, D)
    base = (k0 + n0).to(tl.int64)
    k = _load(K + base * sk_t + hk * sk_h, local, lk - n0, sk_t, dims, HEAD_DIM, D, True)
    v = _load(V + base * sv_t + hk * sv_h, local, lk - n0, sv_t, dims, HEAD_DIM, D, True)
    dk = tl.zeros([BN, D], dtype=tl.float32)
    dv = tl.zeros([BN, D], dtype=tl.float32)
    lo, full_lo, full_hi, hi = _row_range(n0, lq, lk, off, window, CAUSAL, WINDOW, BM, BN)
    for g in range(GROUP):
        h = hk * GROUP + g
        Qb = Q + q0.to(tl.int64) * sq_t + h * sq_h
        DOb = DO + q0.to(tl.int64) * sdo_t + h * sdo_h
        LSEb, DELTAb = LSE + h * slse_h + q0, DELTA + h * sd_h + q0
        DQb = DQ + q0.to(tl.int64) * sdq_t + h * sdq_h
        dk, dv = _dkv_blocks(dk, dv, k, v, cols, Qb, DOb, LSEb, DELTAb, DQb, sq_t, sdo_t, sdq_t, lo, full_lo, lq, lk,
            off, window, QK_SCALE, CAP_SCALE, HEAD_DIM, D, CAUSAL, WINDOW, SOFTCAP, TANH, PRECISION, BIG, ATOMIC_DQ, True,
            BM)  # fmt: skip
        dk, dv = _dkv_blocks(dk, dv, k, v, cols, Qb, DOb, LSEb, DELTAb, DQb, sq_t, sdo_t, sdq_t, full_lo, full_hi, lq, lk,
            off, window, QK_SCALE, CAP_SCALE, HEAD_DIM, D, CAUSAL, WINDOW, SOFTCAP, TANH, PRECISION, BIG, ATOMIC_DQ, False,
            BM)  # fmt: skip
        dk, dv = _dkv_blocks(dk, dv, k, v, cols, Qb, DOb, LSEb, DELTAb, DQb, sq_t, sdo_t, sdq_t, full_hi, hi, lq, lk,
            off, window, QK_SCALE, CAP_SCALE, HEAD_DIM, D, CAUSAL, WINDOW, SOFTCAP, TANH, PRECISION, BIG, ATOMIC_DQ, True,
            BM)  # fmt: skip
    mask = (cols[:, None] < lk) & (dims[None, :] < HEAD_DIM)
    tl.store(DK + base * sdk_t + hk * sdk_h + local[:, None] * sdk_t + dims[None, :],
             (dk * scale).to(DK.dtype.element_ty), mask=mask)  # fmt: skip
    tl.store(DV + base * sdv_t + hk * sdv_h + local[:, None] * sdv_t + dims[None, :],
             dv.to(DV.dtype.element_ty), mask=mask)  # fmt: skip


@triton.jit
def _tanh_kernel(X, Y, N, TANH: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(Y + i, _tanh(tl.load(X + i, mask=i < N), TANH), mask=i < N)


def tanh(x: torch.Tensor, mode: str) -> torch.Tensor:
    """tanh of float32 `x` by the kernel's formula `mode`: what benchmarks/softcap_kernels.py measures the error of."""
    y = torch.empty_like(x)
    _tanh_kernel[(triton.cdiv(x.numel(), 1024),)](x, y, x.numel(), TANH_MODES[mode], 1024)
    return y


def _rowwise(x: torch.Tensor) -> torch.Tensor:
    """(T, H, D) with unit stride along D (any token and head strides)."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _covers(cu: tuple[int, ...], total: int) -> bool:
    return cu[0] == 0 and cu[-1] == total


class TritonSoftcapKernel:
    """Flash attention with the softcap in its inner loop (see the module docstring). `tanh` picks the formula; left
    out, half-precision inputs take `TANH` and float32 ones libdevice's exact tanhf. Under the interpreter 'libdevice' and 'approx' become 'exp'."""

    name = "triton"

    def __init__(self, softcap: float | None = None, tanh: str | None = None, dq: str | None = None) -> None:
        dq = dq or DQ
        if tanh is not None and tanh not in TANH_MODES:
            raise ValueError(f"tanh={tanh!r}: choose one of {sorted(TANH_MODES)}")
        if dq not in DQ_MODES:
            raise ValueError(f"dq={dq!r}: choose one of {DQ_MODES}")
        self.softcap, self.tanh, self.dq = softcap, tanh, dq

    def _common(self, q: torch.Tensor, k: torch.Tensor, seg: Segments, scale: float, *others: torch.Tensor) -> dict:
        """The kernels' shared arguments; BIG: an offset into q, k or `others` may pass 2^31."""
        head_dim = q.shape[-1]
        if head_dim > 256 or q.shape[1] % k.shape[1]:
            raise ValueError(
                f"the Triton attention kernel takes head dim <= 256 and Hq a multiple of Hk, got {q.shape}"
            )
        tanh = self.tanh or ("libdevice" if q.dtype == torch.float32 else TANH)
        if q.device.type != "cuda" and tanh in ("libdevice", "approx"):
            tanh = "exp"  # the interpreter runs neither libdevice nor inline PTX
        cap = float(self.softcap) if self.softcap else None
        return dict(
            QK_SCALE=scale / cap if cap else scale * LOG2E,
            CAP_SCALE=cap * LOG2E if cap else 1.0,
            window=seg.window_left or 0,
            LONG=int(seg.max_q >= 4096),
            GROUP=q.shape[1] // k.shape[1],
            HEAD_DIM=head_dim,
            D=max(16, triton.next_power_of_2(head_dim)),
            CAUSAL=seg.causal,
            WINDOW=seg.window_left is not None,
            SOFTCAP=cap is not None,
            TANH=TANH_MODES[tanh],
            PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
            BIG=max(t.shape[0] * t.stride(0) for t in (q, k, *others)) >= 2**31,
        )

    def forward(self, q, k, v, seg: Segments, scale: float):
        q, k, v = _rowwise(q), _rowwise(k), _rowwise(v)
        n_seg, hq = len(seg.cu_q) - 1, q.shape[1]
        covered = _covers(seg.cu_q, q.shape[0])
        out = torch.empty_like(q, memory_format=torch.contiguous_format) if covered else torch.zeros_like(q)
        lse = torch.empty if covered else lambda *a, **kw: torch.full(*a, float("-inf"), **kw)
        lse = lse((hq, q.shape[0]), dtype=torch.float32, device=q.device)
        cu_q, cu_k = seg.tensors(q.device)
        grid = lambda meta: (triton.cdiv(seg.max_q, meta["BM"]), hq, n_seg)  # noqa: E731
        _fwd_kernel[grid](
            q, k, v, out, lse, cu_q, cu_k, *q.stride()[:2], *k.stride()[:2], *v.stride()[:2], *out.stride()[:2],
            lse.stride(0), **self._common(q, k, seg, scale, v, out),
        )  # fmt: skip
        return out, lse

    def backward(self, dout, q, k, v, out, lse, seg: Segments, scale: float):
        q, k, v, dout, out = (_rowwise(t) for t in (q, k, v, dout, out))
        lse = lse.float().contiguous()
        n_seg, (tq, hq, head_dim), hk = len(seg.cu_q) - 1, q.shape, k.shape[1]
        common = self._common(q, k, seg, scale, v, dout, out)  # dq and its float32 buffer are laid out as q's rows
        delta = torch.empty((hq, tq), dtype=torch.float32, device=q.device)
        _delta_kernel[(triton.cdiv(tq, 64), hq)](
            out, dout, delta, tq, *out.stride()[:2], *dout.stride()[:2], delta.stride(0), head_dim, common["D"], 64
        )
        dk, dv = (torch.empty_like(k) if _covers(seg.cu_k, k.shape[0]) else torch.zeros_like(k) for _ in range(2))
        cu_q, cu_k = seg.tensors(q.device)
        strides = (*q.stride()[:2], *k.stride()[:2], *v.stride()[:2], *dout.stride()[:2])
        atomic = self.dq == "atomic"
        if atomic:  # dS·K added by the dK/dV kernel into float32 rows (unscaled)
            dq_acc = torch.zeros((tq, hq, head_dim), dtype=torch.float32, device=q.device)
        else:
            dq = torch.empty_like(q) if _covers(seg.cu_q, tq) else torch.zeros_like(q)
            dq_acc = torch.zeros((1, 1, 1), dtype=torch.float32, device=q.device)  # not read
            _dq_kernel[lambda meta: (triton.cdiv(seg.max_q, meta["BM"]), hq, n_seg)](
                q, k, v, dout, lse, delta, dq, cu_q, cu_k, *strides, *dq.stride()[:2], lse.stride(0),
                delta.stride(0), scale, **common,
            )  # fmt: skip
        _dkv_kernel[lambda meta: (triton.cdiv(seg.max_k, meta["BN"]), hk, n_seg)](
            q, k, v, dout, lse, delta, dk, dv, dq_acc, cu_q, cu_k, *strides, *dk.stride()[:2], *dv.stride()[:2],
            *dq_acc.stride()[:2], lse.stride(0), delta.stride(0), scale, ATOMIC_DQ=atomic, **common,
        )  # fmt: skip
        if atomic:
            dq = (dq_acc * scale).to(q.dtype)
        return dq, dk, dv
