"""Communication pieces the algorithms share: ring P2P, all-gather, reduce-scatter, and their autograd forms."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist


class RingComm:
    """Send to a rank further along the ring of a group and receive from as far back, asynchronously."""

    def __init__(self, group: dist.ProcessGroup) -> None:
        self.group = group
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)
        self._reqs: list = []

    def start(self, send: torch.Tensor, hops: int = 1, shape: Sequence[int] | None = None) -> torch.Tensor:
        """Begin passing `send` `hops` steps along the ring; returns the buffer that `wait` fills, of `shape` (that of
        `send` if not given), or `send` itself when the hops make a full turn."""
        hops %= self.size
        if hops == 0:
            return send
        recv = torch.empty(send.shape if shape is None else shape, dtype=send.dtype, device=send.device)
        to = dist.get_global_rank(self.group, (self.rank + hops) % self.size)
        source = dist.get_global_rank(self.group, (self.rank - hops) % self.size)
        ops = [dist.P2POp(dist.isend, send, to, self.group), dist.P2POp(dist.irecv, recv, source, self.group)]
        self._reqs = dist.batch_isend_irecv(ops)
        return recv

    def wait(self) -> None:
        for req in self._reqs:
            req.wait()
        self._reqs = []


# torch >= 2.13 names the flat collectives `*_single` and deprecates the older names; torch 2.11 has only those.
_ALL_GATHER = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_REDUCE_SCATTER = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def all_gather(x: torch.Tensor, group: dist.ProcessGroup, async_op: bool = False):
    """Concatenate `x` from every rank of `group` along a new leading dimension (rank order)."""
    world = dist.get_world_size(group)
    out = torch.empty((world * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
    work = _ALL_GATHER(out, x.contiguous(), group=group, async_op=async_op)
    out = out.unflatten(0, (world, x.shape[0]))
    return (out, work) if async_op else out


def reduce_scatter(x: torch.Tensor, group: dist.ProcessGroup, async_op: bool = False):
    """Sum `x` (leading dimension = group size) over ranks and keep this rank's slice."""
    rank = dist.get_rank(group)
    if dist.get_backend(group) == "gloo":  # gloo has no reduce-scatter: all-reduce a copy and take the slice
        x = x.clone(memory_format=torch.contiguous_format)
        work = dist.all_reduce(x, group=group, async_op=async_op)
        out = x[rank]
    else:
        out = torch.empty(x.shape[1:], dtype=x.dtype, device=x.device)
        # flat, as the collective documents its input (the `fake` test backend checks the shape)
        work = _REDUCE_SCATTER(out, x.contiguous().flatten(0, 1), group=group, async_op=async_op)
    return (out, work) if async_op else out


_WIDE_TYPES = (torch.complex128, torch.int64, torch.int32)  # 16, 8 and 4 bytes


def copy_rows(dst: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """`dst.copy_(src)` for same-dtype tensors whose last dimension is contiguous (the head rows that pack and unpack
    exchange buffers), moved as the widest element type both layouts allow: the strided copy kernel moves 16-byte
    elements 2.6 to 3.1 times faster than 2-byte ones on H200 (benchmarks/results/layout_probe_H200.json). Bit-identical."""
    if src.dtype == dst.dtype and src.shape == dst.shape and src.dim() and src.device.type in ("cuda", "cpu"):
        row_bytes = src.shape[-1] * src.element_size()
        for dtype in _WIDE_TYPES:
            if dtype.itemsize > src.element_size() and row_bytes % dtype.itemsize == 0:
                try:  # `view` refuses strides and offsets the wider type cannot express
                    return dst.view(dtype).copy_(src.view(dtype)).view(dst.dtype)
                except RuntimeError:
                    continue
    return dst.copy_(src)


def contiguous(x: torch.Tensor) -> torch.Tensor:
    """`x` as a contiguous tensor, copied by `copy_rows` when it is a strided view."""
    if x.is_contiguous():
        return x
    return copy_rows(torch.empty(x.shape, dtype=x.dtype, device=x.device), x)


class Exchange:
    """An all-to-all over the leading (one slice per rank) dimension, in flight until `wait`: on NCCL it runs on the
    communication stream, so the caller can launch compute meanwhile."""

    def __init__(self, send: torch.Tensor, group: dist.ProcessGroup) -> None:
        send = contiguous(send)
        self.recv = torch.empty_like(send)
        self.work = dist.all_to_all_single(self.recv, send, group=group, async_op=True)

    def wait(self) -> torch.Tensor:
        self.work.wait()
        return self.recv


class AllGather(torch.autograd.Function):
    """(L, ...) shard -> (N·L, ...) concatenated in rank order; backward reduce-scatters: each rank uses the whole in its
    own way, so the shard's gradient is the sum of the ranks' (contrast `sharding.gather_sequence`, for a value every
    rank computes alike)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return all_gather(x, group).flatten(0, 1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        world = dist.get_world_size(ctx.group)
        return reduce_scatter(grad.unflatten(0, (world, -1)), ctx.group), None


class ReduceScatter(torch.autograd.Function):
    """(N·L, ...) partial sums -> this rank's (L, ...) slice of their sum over ranks; backward all-gathers."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return reduce_scatter(x.unflatten(0, (dist.get_world_size(group), -1)), group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return all_gather(grad, ctx.group).flatten(0, 1), None
