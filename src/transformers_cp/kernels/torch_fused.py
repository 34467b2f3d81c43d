"""PyTorch's fused attention ops on CUDA: cuDNN attention where the call is dense, the varlen flash op otherwise.

cuDNN (about 1.7x faster than the flash op on H100/H200) takes batches of equal-length sequences, GQA, and causal
masks aligned top-left, which equals bottom-right alignment when q and k lengths match; so it serves every call
whose segments all have one shape with no sliding window: a diagonal block of one document or of equal chunks, and
the dense non-causal blocks of a ring. Everything else (documents of different lengths, sliding windows) goes to the
varlen flash op (the kernel behind `torch.nn.attention.varlen`), which aligns bottom-right and takes cu_seqlens.
"""

from __future__ import annotations

import functools

import torch

from .base import Segments, flash_windows

CUDNN_MAX_HEAD_DIM = 128
CUDNN_BUCKETS = 32  # lone causal documents run at lengths rounded up to n/32 (`_bucket`)
CUDNN_MIN_DOCUMENT = 2048  # documents at least this long go to cuDNN (`_pieces`); shorter runs share a varlen call


def _dense_shape(seg: Segments, q: torch.Tensor, k: torch.Tensor) -> tuple[int, int, int] | None:
    """(batch, lq, lk) if the segments are a batch of equal dense sequences cuDNN can take, else None."""
    n = len(seg.cu_q) - 1
    lq, lk = seg.cu_q[1], seg.cu_k[1]
    if not _dense_ok(seg, q.shape[-1]):
        return None
    if q.shape[0] != n * lq or k.shape[0] != n * lk:
        return None
    if seg.cu_q != tuple(range(0, n * lq + 1, lq)) or seg.cu_k != tuple(range(0, n * lk + 1, lk)):
        return None
    return n, lq, lk


def _cudnn_shape(seg: Segments, q: torch.Tensor, k: torch.Tensor) -> tuple[int, int, int] | None:
    """`_dense_shape`, except for one causal document shorter than `CUDNN_MIN_DOCUMENT` that cuDNN would run padded
    (`_padded_length`): the varlen op takes that as it is, where cuDNN would need padding copies of every input and
    output to reuse its plans; at such lengths the calls, not the kernel, set the time."""
    dense = _dense_shape(seg, q, k)
    if dense is not None and _padded_length(seg, dense) is not None and dense[1] < CUDNN_MIN_DOCUMENT:
        return None
    return dense


def _padded_length(seg: Segments, dense: tuple[int, int, int] | None) -> int | None:
    """The length cuDNN runs a lone causal document of shape `dense` at when that is not its own (`_bucket`)."""
    if dense is None or dense[0] != 1 or not seg.causal or _bucket(dense[1]) == dense[1]:
        return None
    return _bucket(dense[1])


def _bucket(n: int) -> int:
    """The length a lone causal document of n tokens runs at in cuDNN: n rounded up to a multiple of the largest
    power of two not above n/32, so at most about 3 % longer (193 lengths from 2k to 128k).

    cuDNN builds an execution plan per new shape (tens of milliseconds, forward and backward apart), and packed rows
    bring new document lengths every step; rounded lengths make the plans few and reused. Zero rows appended to a
    causal square are exact for the real rows: they see no padded key, and with zero output gradient the padded
    queries add nothing to dK, dV."""
    if CUDNN_BUCKETS <= 1 or n < CUDNN_BUCKETS:
        return n
    step = 1 << max(0, (n // CUDNN_BUCKETS).bit_length() - 1)
    return -(-n // step) * step


def _padded(x: torch.Tensor, rows: int, value: float = 0.0) -> torch.Tensor:
    """`x` with zero (or `value`) rows appended along dim 0 up to `rows`."""
    extra = rows - x.shape[0]
    return x if extra == 0 else torch.cat([x, x.new_full((extra, *x.shape[1:]), value)])


def _pieces(seg: Segments, head_dim: int) -> list[tuple[Segments, int, int]]:
    """Split mixed segments into kernel calls: (segments, q offset, k offset) per call, each either lone long
    documents cuDNN takes densely (consecutive ones of one shape batched into one call, as the two chunks of a zigzag
    diagonal, where no length rounding is due: see `_bucket`) or a run of the others for the varlen op. Cached on the
    segments object."""
    cache = seg.__dict__.setdefault("_pieces", {})
    if head_dim in cache:
        return cache[head_dim]
    pieces: list[tuple[Segments, int, int]] = []
    run: list[int] = []  # short documents, for one varlen call
    batch: list[int] = []  # long documents of one shape, for one cuDNN call

    def close(docs: list[int]) -> None:
        if docs:
            q0, k0 = seg.cu_q[docs[0]], seg.cu_k[docs[0]]
            cu_q = tuple(seg.cu_q[i] - q0 for i in [*docs, docs[-1] + 1])
            cu_k = tuple(seg.cu_k[i] - k0 for i in [*docs, docs[-1] + 1])
            pieces.append((Segments(cu_q, cu_k, seg.causal, seg.window_left), q0, k0))
            docs.clear()

    for i in range(len(seg.cu_q) - 1):
        lq, lk = seg.cu_q[i + 1] - seg.cu_q[i], seg.cu_k[i + 1] - seg.cu_k[i]
        if min(lq, lk) >= CUDNN_MIN_DOCUMENT and _dense_ok(
            Segments((0, lq), (0, lk), seg.causal, seg.window_left), head_dim
        ):
            close(run)
            first = batch[0] if batch else i
            same = (seg.cu_q[first + 1] - seg.cu_q[first], seg.cu_k[first + 1] - seg.cu_k[first]) == (lq, lk)
            if not same or (seg.causal and _bucket(lq) != lq):
                close(batch)
            batch.append(i)
        else:
            close(batch)
            run.append(i)
    close(run)
    close(batch)
    cache[head_dim] = pieces
    return pieces


def _reach(seg: Segments, q0: int, k0: int, q_shape: torch.Size, k_shape: torch.Size) -> int | None:
    """For a piece that is one causal document of n tokens that cuDNN takes padded to its bucket m (`_bucket`), at
    rows q0 (keys k0) of a call's q and k: m when the call's own next rows can stand in for the
    padding, which saves copying the document into a padded buffer (forward: q, k, v; backward: dout, q, k, v, out).

    Causal, the document's queries never see the borrowed keys after them, so the forward is exact for the real rows;
    in backward the borrowed rows get an lse of +inf, which zeroes their probabilities and with them everything they
    would add to the real keys' gradients."""
    if len(seg.cu_q) != 2 or not seg.causal or seg.cu_q != seg.cu_k or not _dense_ok(seg, q_shape[-1]):
        return None
    n = seg.cu_q[1]
    m = _bucket(n)
    if n < CUDNN_MIN_DOCUMENT or m == n or q0 + m > q_shape[0] or k0 + m > k_shape[0]:
        return None
    return m


def _dense_ok(seg: Segments, head_dim: int) -> bool:
    """cuDNN takes it: no window, causal only on squares, head dim <= 128, and not a lone token (cuDNN refuses
    q and k lengths of 1)."""
    lq, lk = seg.cu_q[1], seg.cu_k[1]
    return (
        seg.window_left is None
        and not (seg.causal and lq != lk)
        and head_dim <= CUDNN_MAX_HEAD_DIM
        and max(lq, lk) > 1
    )


def _batched(x: torch.Tensor, n: int) -> torch.Tensor:
    """(n·L, H, D) -> (n, H, L, D) view."""
    return x.unflatten(0, (n, -1)).transpose(1, 2)


def _token_major(x: torch.Tensor) -> torch.Tensor:
    """(n, H, L, D) -> (n·L, H, D), the kernels' token-major layout."""
    return x.transpose(1, 2).flatten(0, 1)


@functools.cache
def _no_dropout_state(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The (seed, offset) the backward ops take; without dropout they are never read, so one pair per device."""
    return torch.zeros(2, dtype=torch.uint64, device=device), torch.empty(0, device=device)


class TorchKernel:
    name = "torch"

    def __init__(self, softcap: float | None = None) -> None:
        if softcap:
            raise ValueError(
                "the cuDNN / flash SDPA ops take no logit softcap; `kernel_class` picks a softcap kernel for it"
            )
        self.softcap = None

    def forward(self, q, k, v, seg: Segments, scale: float):
        pieces = _pieces(seg, q.shape[-1])
        if len(pieces) == 1:
            return self._forward(q, k, v, seg, scale)
        out = torch.empty_like(q)
        lse = torch.empty((q.shape[1], q.shape[0]), dtype=torch.float32, device=q.device)
        for sub, q0, k0 in pieces:
            rows, keys = slice(q0, q0 + sub.cu_q[-1]), slice(k0, k0 + sub.cu_k[-1])
            if m := _reach(sub, q0, k0, q.shape, k.shape):  # the bucket's rows read on into the next document
                ext, ext_k = slice(q0, q0 + m), slice(k0, k0 + m)
                o, s = self._forward(q[ext], k[ext_k], v[ext_k], Segments((0, m), (0, m), True), scale)
                out[rows], lse[:, rows] = o[: rows.stop - q0], s[:, : rows.stop - q0]
                continue
            out[rows], lse[:, rows] = self._forward(q[rows], k[keys], v[keys], sub, scale)
        return out, lse

    def backward(self, dout, q, k, v, out, lse, seg: Segments, scale: float):
        pieces = _pieces(seg, q.shape[-1])
        if len(pieces) == 1:
            return self._backward(dout, q, k, v, out, lse, seg, scale)
        # the pieces tile the keys [0, cu_k[-1]) as the queries: zeros only for keys beyond (no plan makes them)
        alloc = torch.empty_like if seg.cu_k[-1] == k.shape[0] else torch.zeros_like
        dq, dk, dv = torch.empty_like(q), alloc(k), alloc(v)
        for sub, q0, k0 in pieces:
            rows, keys = slice(q0, q0 + sub.cu_q[-1]), slice(k0, k0 + sub.cu_k[-1])
            if m := _reach(sub, q0, k0, q.shape, k.shape):
                n = rows.stop - q0
                # +inf log-sum-exp: the borrowed rows' probabilities are exp(s - inf) = 0, so they add nothing to the
                # real keys' dK, dV (whatever their dout), and their own gradients are dropped
                lse_m = torch.cat([lse[:, rows], lse.new_full((lse.shape[0], m - n), float("inf"))], dim=1)
                ext, ext_k = slice(q0, q0 + m), slice(k0, k0 + m)
                grads = self._backward(
                    dout[ext], q[ext], k[ext_k], v[ext_k], out[ext], lse_m, Segments((0, m), (0, m), True), scale
                )
                dq[rows], dk[keys], dv[keys] = (g[:n] for g in grads)
                continue
            dq[rows], dk[keys], dv[keys] = self._backward(
                dout[rows], q[rows], k[keys], v[keys], out[rows], lse[:, rows], sub, scale
            )
        return dq, dk, dv

    def _forward(self, q, k, v, seg: Segments, scale: float):
        dense = _cudnn_shape(seg, q, k)
        if (m := _padded_length(seg, dense)) is not None:
            n = dense[1]
            out, lse = self._forward(*(_padded(t, m) for t in (q, k, v)), Segments((0, m), (0, m), True), scale)
            return out[:n], lse[:, :n]
        if dense is not None:
            n, lq, _ = dense
            r = torch.ops.aten._scaled_dot_product_cudnn_attention(
                _batched(q, n), _batched(k, n), _batched(v, n), None, True, 0.0, seg.causal, False, scale=scale
            )
            lse = r[1].reshape(n, q.shape[1], lq).transpose(0, 1).reshape(q.shape[1], n * lq)
            return _token_major(r[0]), lse
        cu_q, cu_k = seg.tensors(q.device)
        out, lse = torch.ops.aten._flash_attention_forward(
            q,
            k,
            v,
            cu_q,
            cu_k,
            seg.max_q,
            seg.max_k,
            0.0,
            seg.causal,
            False,
            scale=scale,
            **flash_windows(seg),
        )[:2]
        return out, lse

    def _backward(self, dout, q, k, v, out, lse, seg: Segments, scale: float):
        seed, offset = _no_dropout_state(q.device)
        dense = _cudnn_shape(seg, q, k)
        if (m := _padded_length(seg, dense)) is not None:
            n = dense[1]
            padded = (_padded(t, m) for t in (dout, q, k, v, out))
            lse_p = _padded(lse.T, m).T  # 0, not -inf: the padded rows' probabilities stay finite (times zero)
            grads = self._backward(*padded, lse_p, Segments((0, m), (0, m), True), scale)
            return tuple(g[:n] for g in grads)
        if dense is not None:
            n, lq, lk = dense
            lse_b = lse.reshape(q.shape[1], n, lq).transpose(0, 1).unsqueeze(-1).contiguous()
            grads = torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
                _batched(dout.contiguous(), n),
                _batched(q, n),
                _batched(k, n),
                _batched(v, n),
                _batched(out.contiguous(), n),
                lse_b,
                seed,
                offset,
                None,
                None,
                None,
                lq,
                lk,
                0.0,
                seg.causal,
                scale=scale,
            )
            return tuple(_token_major(g) for g in grads)
        cu_q, cu_k = seg.tensors(q.device)
        return torch.ops.aten._flash_attention_backward(
            dout.contiguous(),
            q,
            k,
            v,
            out,
            lse.contiguous(),
            cu_q,
            cu_k,
            seg.max_q,
            seg.max_k,
            0.0,
            seg.causal,
            seed,
            offset,
            scale=scale,
            **flash_windows(seg),
        )
