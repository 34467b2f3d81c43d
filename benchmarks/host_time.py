"""Host time of one CP attention forward+backward, with kernels and communication that cost nothing.

At short rows the GPU waits on the host (issue 21: 8k tokens, E about 0.4), so what counts is the Python and the
operator dispatch per call. This script measures exactly that, on CPU, in one process: a fake process group of
world 2 (torch's `fake` backend: collectives return at once, moving nothing; this process plays one rank of the
group) and tiny tensors, with the attention kernel replaced by one that allocates its outputs and computes nothing:

- `--kernel fused` (default): `TorchKernel`, the CUDA path, with its four ATen attention ops stubbed to return
  empty tensors of the right shapes, so its own host code (segment checks, cuDNN batching, lse layout) is measured;
- `--kernel null`: a kernel that only allocates its outputs (the algorithms' own overhead alone);
- `--kernel math`: the exact CPU kernel (host time of the CPU path, tiny shapes).

Per mode it prints microseconds per fwd+bwd call (median of `--repeats` windows of `--iters` calls) and the ATen
operators dispatched per call: "ops", each at least one kernel launch or collective on CUDA, allocations and views
(host time only); the attention kernel calls (forward and backward) are counted apart. Mode
`local` is the floor: the same call without CP (one rank attends the whole row).

    PYTHONPATH=src python benchmarks/host_time.py --modes ulysses,zigzag,ring,llama3,hybrid --docs single,packed

`--profile N` prints cProfile's top N functions for each mode (cumulative time).
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import itertools
import pstats
import statistics
import time
import types

import torch
import torch.distributed as dist
from attention import doc_lengths
from torch.utils._python_dispatch import TorchDispatchMode

from transformers_cp import attention
from transformers_cp.attention import context_parallel_attention
from transformers_cp.config import ContextParallelConfig
from transformers_cp.kernels import Segments, torch_fused
from transformers_cp.kernels.math import MathKernel
from transformers_cp.kernels.torch_fused import TorchKernel
from transformers_cp.mesh import build_mesh
from transformers_cp.plan import Documents

WORLD = 2
KERNEL_CALLS = collections.Counter()  # attention kernel calls (forward and backward) of the stubs


class NullKernel:
    """Allocates what a kernel returns, computes nothing."""

    name = "null"
    softcap = None

    def forward(self, q, k, v, seg: Segments, scale: float):
        KERNEL_CALLS["attention"] += 1
        return torch.empty_like(q), torch.empty((q.shape[1], q.shape[0]), dtype=torch.float32, device=q.device)

    def backward(self, dout, q, k, v, out, lse, seg: Segments, scale: float):
        KERNEL_CALLS["attention"] += 1
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


class _StubAten:
    """`torch.ops.aten` with the four attention ops `TorchKernel` calls replaced by ones that only allocate."""

    @staticmethod
    def _scaled_dot_product_cudnn_attention(q, k, v, bias, lse, dropout, causal, debug, scale=None):
        KERNEL_CALLS["attention"] += 1
        n, h, lq, _ = q.shape  # the output in q's stride order, as cuDNN allocates it (`alloc_with_matching_layout`)
        return torch.empty_like(q), torch.empty((n, h, lq, 1))

    @staticmethod
    def _scaled_dot_product_cudnn_attention_backward(dout, q, k, v, *rest, scale=None):
        KERNEL_CALLS["attention"] += 1
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)

    @staticmethod
    def _flash_attention_forward(q, k, v, cu_q, cu_k, max_q, max_k, dropout, causal, debug, scale=None, **windows):
        KERNEL_CALLS["attention"] += 1
        return torch.empty_like(q), torch.empty((q.shape[1], q.shape[0]))

    @staticmethod
    def _flash_attention_backward(dout, q, k, v, *rest, scale=None, **windows):
        KERNEL_CALLS["attention"] += 1
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)

    def __getattr__(self, name: str):
        return getattr(torch.ops.aten, name)


class _StubTorch:
    """The `torch` module as `torch_fused` sees it: the same, but for `_StubAten`."""

    ops = types.SimpleNamespace(aten=_StubAten())

    def __getattr__(self, name: str):
        return getattr(torch, name)


def stub_fused_ops() -> None:
    torch_fused.torch = _StubTorch()


KERNELS = {"fused": TorchKernel, "null": NullKernel, "math": MathKernel}


ALLOCATIONS = {"aten.empty", "aten.empty_like", "aten.empty_strided", "aten.new_empty"}


class OpCounter(TorchDispatchMode):
    """Counts the ATen operators dispatched: views, allocations (no kernel on CUDA) and the rest ("ops"), each of
    which launches at least one kernel or collective on CUDA."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        kind = "view" if func.is_view else "alloc" if name in ALLOCATIONS else "op"
        self.ops[(kind, name)] += 1
        return func(*args, **(kwargs or {}))


def fwd_bwd(mesh, docs, q, k, v, dout, scale):
    qq, kk, vv = (t.detach().requires_grad_() for t in (q, k, v))
    context_parallel_attention(qq, kk, vv, mesh, docs, scale).backward(dout)


def doc_bounds(kind: str, seq: int) -> list[int]:
    """One sequence; four documents of unequal lengths (as the 8k `packed` row of benchmarks/attention.py, whose
    plan the tiny row repeats: `CUDNN_MIN_DOCUMENT` is scaled down with the row); or `bench`: benchmarks/attention.py's
    own `packed` row of `seq` tokens (at --seq 8192, the calls and copies of that row, cuDNN's length rounding too)."""
    if kind == "single":
        return [0, seq]
    if kind == "bench":
        return list(itertools.accumulate(doc_lengths("packed", seq), initial=0))
    return [0, seq * 3 // 16, seq * 9 // 16, seq * 11 // 16, seq]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--modes", default="ulysses,zigzag,ring,llama3,hybrid")
    p.add_argument("--docs", default="single,packed", help="single, packed, bench (see doc_bounds)")
    p.add_argument("--kernel", default="fused", choices=sorted(KERNELS))
    p.add_argument("--seq", type=int, default=256, help="row length (tiny: the kernels and copies cost ~nothing)")
    p.add_argument("--heads", default="16:16")
    p.add_argument("--head-dim", type=int, default=8)
    p.add_argument("--rank", type=int, default=0, help="the rank of the group this process plays")
    p.add_argument("--iters", type=int, default=200)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--profile", type=int, default=0, help="print cProfile's top N functions per mode")
    p.add_argument("--ops", action="store_true", help="list the ATen operators of one call")
    a = p.parse_args()

    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", rank=a.rank, world_size=WORLD, store=FakeStore())
    torch.set_num_threads(1)
    if a.kernel == "fused":
        stub_fused_ops()
        # the documents that get a cuDNN call of their own at 8k get one here too: the same calls, tiny
        torch_fused.CUDNN_MIN_DOCUMENT = max(2, torch_fused.CUDNN_MIN_DOCUMENT * a.seq // 8192)
    kernel_cls = KERNELS[a.kernel]
    attention.select_kernel = lambda backend, q, softcap=None: kernel_cls()
    dtype = torch.float32 if a.kernel == "math" else torch.bfloat16
    hq, hk = map(int, a.heads.split(":"))
    scale = a.head_dim**-0.5
    print(f"torch {torch.__version__}, kernel {a.kernel}, seq {a.seq}, heads {hq}:{hk}, world {WORLD}, rank {a.rank}")
    for mode, kind in itertools.product(a.modes.split(","), a.docs.split(",")):
        name, *opts = mode.split("/")
        config = ContextParallelConfig(
            size=1 if name == "local" else WORLD,
            mode="ulysses" if name == "local" else name,
            ulysses_size=WORLD if name == "hybrid" else None,
            heads_k_stride=next((int(o[1:]) for o in opts if o.startswith("k")), None),
            balance="documents" if "b" in opts else "tokens",
        )
        mesh = build_mesh(config, "cpu")
        docs = Documents(doc_bounds(kind, a.seq), a.seq)
        local = a.seq // config.size
        g = torch.Generator().manual_seed(0)
        q, dout = (torch.randn(local, hq, a.head_dim, generator=g, dtype=dtype) for _ in range(2))
        k, v = (torch.randn(local, hk, a.head_dim, generator=g, dtype=dtype) for _ in range(2))

        def call(mesh=mesh, docs=docs, q=q, k=k, v=v, dout=dout):
            fwd_bwd(mesh, docs, q, k, v, dout, scale)

        for _ in range(20):
            call()
        windows = []
        for _ in range(a.repeats):
            t0 = time.perf_counter()
            for _ in range(a.iters):
                call()
            windows.append((time.perf_counter() - t0) / a.iters * 1e6)
        KERNEL_CALLS.clear()
        with OpCounter() as counter:
            call()
        count = collections.Counter()
        for (kind_, _), n in counter.ops.items():
            count[kind_] += n
        print(
            f"{mode:10s} {kind:7s} {statistics.median(windows):8.1f} us/call  attention kernels "
            f"{KERNEL_CALLS['attention']:2d}  ops {count['op']:4d}  allocations {count['alloc']:3d}  views {count['view']:4d}"
        )
        if a.ops:
            for (kind_, op), n in counter.ops.most_common():
                print(f"    {n:4d} {kind_:4s} {op}")
        if a.profile:
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(a.iters):
                call()
            prof.disable()
            pstats.Stats(prof).sort_stats("cumulative").print_stats(a.profile)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
