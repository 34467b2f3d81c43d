"""What a CP training step does beyond the stock step: ATen ops per type, calls and bytes written.

One training step (forward + backward, no optimizer) of a scaled-down Qwen2-1.5B shape (12 query / 2 KV heads of
`--head-dim`, MLP ratio 8960/1536, `--layers` layers, `--vocab`), run twice:

- stock: the model alone, one process, L = `--tokens` tokens, sdpa attention, its own loss (`--stock-chunked`: with
  the chunked loss of the CP side, to see CP's own ops alone);
- CP: one rank of CP=2 at 2L tokens (this rank holds L), per mode, as the Trainer runs it: its default memory
  savings (the chunked LM-head loss, in `--loss-chunk` token chunks: at 64k tokens over 2 ranks of the 1.5B shape the
  auto setting makes chunks of 1766 of a rank's 32768 tokens, about 19, so the default keeps that count), the loss
  scaled and normalised by the label tokens of the row (`loss.py`), no activation checkpointing
  (`context_parallel_recompute_layers=0`). DDP's gradient reduction is left out: any data-parallel run has it.

A `TorchDispatchMode` records every ATen op: calls and bytes written (the output tensors' bytes; in-place ops write
their `self`; views write nothing and are left out; allocations and collectives are counted, 0 bytes), forward and
backward apart (the chunked loss computes its gradients in the forward, so they count there). The attention kernel's
own ops (sdpa's, cuDNN's, or everything inside the exact CPU kernel) are counted apart, since the two sides' kernels
differ on CPU. Printed: the ops whose calls or bytes differ between the CP rank and the stock step, per layer and in
total, and the lines of transformers_cp that dispatch ops, with their calls and bytes.

`--kernel fused` (default on CPU) runs the CUDA path `TorchKernel` with its cuDNN / flash ops replaced by ones that
only allocate their outputs (`host_time.stub_fused_ops`), so the ops around the kernel are the GPU's, in bf16;
`--kernel math` runs the exact float32 CPU kernel instead. On CUDA (`--device cuda`, NCCL) the real kernels run.

    torchrun --nproc-per-node 2 benchmarks/step_ops.py [--modes ulysses,zigzag] [--device cuda]
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from transformers_cp import attention
from transformers_cp.config import ContextParallelConfig, MemorySavings
from transformers_cp.kernels import torch_fused
from transformers_cp.kernels.math import MathKernel
from transformers_cp.kernels.torch_fused import TorchKernel
from transformers_cp.loss import count_label_tokens, loss_scale
from transformers_cp.memory import apply_memory_savings
from transformers_cp.modeling import apply_context_parallel, context_parallel_mesh
from transformers_cp.sharding import shard_batch

ALLOCATIONS = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided"}
KERNEL_OPS = ("scaled_dot_product", "flash_attention", "cudnn_attention", "efficient_attention")
KERNEL_STUBS = (
    "_scaled_dot_product_cudnn_attention",
    "_scaled_dot_product_cudnn_attention_backward",
    "_flash_attention_forward",
    "_flash_attention_backward",
)
OURS = f"{os.sep}transformers_cp{os.sep}"
MODEL = f"{os.sep}transformers{os.sep}"


@dataclass
class Tally:
    calls: int = 0
    bytes: int = 0


@dataclass
class StepOps:
    """ATen ops of one step: (phase, op) -> Tally outside the attention kernel, the kernel's apart, and per op the
    transformers_cp line that dispatched it."""

    ops: dict = field(default_factory=lambda: collections.defaultdict(Tally))
    kernel: dict = field(default_factory=lambda: collections.defaultdict(Tally))
    sites: dict = field(default_factory=lambda: collections.defaultdict(Tally))


def _site() -> str:
    """Where the current op comes from: the innermost transformers_cp frames (up to two, so that a shared helper names
    its caller), else the autograd node running it in backward, else the innermost transformers frame."""
    frame, found, model = sys._getframe(2), [], None
    while frame is not None and len(found) < 2:
        name = frame.f_code.co_filename
        if OURS in name:
            found.append(f"{name.split(OURS)[-1]}:{frame.f_lineno} {frame.f_code.co_name}")
        elif model is None and MODEL in name:
            model = f"transformers/{name.split(MODEL)[-1]}:{frame.f_lineno}"
        frame = frame.f_back
    if found:
        return " < ".join(found)
    node = torch._C._current_autograd_node()
    return f"autograd {node.name()}" if node is not None else model or "-"


def written_bytes(func, out) -> int:
    """Bytes an ATen op writes: its output tensors' (an in-place op's `self`); views and allocations write none."""
    if func.is_view or func.overloadpacket.__name__ in ALLOCATIONS:
        return 0
    return sum(t.numel() * t.element_size() for t in tree_leaves(out) if isinstance(t, torch.Tensor))


class OpRecorder(TorchDispatchMode):
    """Records calls and bytes written per ATen op into `record` (see the module docstring)."""

    open: OpRecorder | None = None  # the recorder of the step in flight

    def __init__(self, record: StepOps) -> None:
        super().__init__()
        self.record, self.phase, self.in_kernel = record, "forward", 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.is_view:
            return out
        name = func.overloadpacket.__name__
        written = written_bytes(func, out)
        key, rec = (self.phase, name), self.record
        if self.in_kernel or any(k in name for k in KERNEL_OPS):
            tallies = [rec.kernel[key]]
        else:
            tallies = [rec.ops[key], rec.sites[(*key, _site())]]
        for tally in tallies:
            tally.calls += 1
            tally.bytes += written
        return out


def _apart(fn):
    """`fn` with every op inside it counted as the attention kernel's (by the recorder open then)."""

    def wrapped(*args, **kwargs):
        OpRecorder.open.in_kernel += 1
        try:
            return fn(*args, **kwargs)
        finally:
            OpRecorder.open.in_kernel -= 1

    return wrapped


def count_kernel_apart(fused: bool) -> None:
    """The exact CPU kernel's ops, or the allocations of the stubbed fused ops, count as the attention kernel's."""
    if not fused:
        MathKernel.forward, MathKernel.backward = _apart(MathKernel.forward), _apart(MathKernel.backward)
        return
    aten = torch_fused.torch.ops.aten
    for name in KERNEL_STUBS:
        setattr(aten, name, _apart(getattr(aten, name)))


def qwen2_like(a: argparse.Namespace, device: str, dtype: torch.dtype) -> torch.nn.Module:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    hidden = 12 * a.head_dim
    config = Qwen2Config(
        hidden_size=hidden,
        intermediate_size=hidden * 8960 // 1536 // 8 * 8,
        num_hidden_layers=a.layers,
        num_attention_heads=12,
        num_key_value_heads=2,
        vocab_size=a.vocab,
        max_position_embeddings=4 * a.tokens,
        tie_word_embeddings=False,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    return Qwen2ForCausalLM(config).to(device, dtype).train()


def step(model, batch: dict, recorder: OpRecorder, scale: int = 1) -> None:
    """One forward and backward under `recorder`, the two phases apart."""
    recorder.phase, OpRecorder.open = "forward", recorder
    with recorder:
        loss = model(**batch)["loss"] * scale
        recorder.phase = "backward"
        loss.backward()


def savings(a: argparse.Namespace) -> MemorySavings:
    return MemorySavings(loss_chunk_size=a.loss_chunk, mlp_tile_size=0, recompute_layers=0)


def run_stock(a, device, dtype) -> StepOps:
    model = qwen2_like(a, device, dtype)
    if a.stock_chunked:
        apply_memory_savings(model, savings(a))
    ids = torch.randint(0, a.vocab, (1, a.tokens), generator=torch.Generator().manual_seed(1)).to(device)
    record = StepOps()
    recorder = OpRecorder(record)
    batch = {"input_ids": ids, "labels": ids, "num_items_in_batch": torch.tensor(a.tokens - 1, device=device)}
    step(model, batch, recorder)
    return record


def run_cp(a, mode: str, device, dtype) -> StepOps:
    model = qwen2_like(a, device, dtype)
    config = ContextParallelConfig(size=2, mode=mode, **vars(savings(a)))
    apply_memory_savings(model, config)
    apply_context_parallel(model, config, device_type=device)
    mesh = context_parallel_mesh(model)
    ids = torch.randint(0, a.vocab, (1, 2 * a.tokens), generator=torch.Generator().manual_seed(1))
    batch = {k: v.to(device) for k, v in shard_batch({"input_ids": ids}, mesh).items()}
    batch["num_items_in_batch"] = count_label_tokens(batch["shift_labels"], mesh)
    record = StepOps()
    recorder = OpRecorder(record)
    step(model, batch, recorder, loss_scale(mesh))
    return record


def _mb(n: int) -> str:
    return f"{n / 2**20:9.2f}"


def report(stock: StepOps, cp: StepOps, mode: str, layers: int, every: bool = False) -> None:
    print(f"\n== {mode}: one rank of CP=2 at 2L tokens against the stock step at L (attention kernel apart) ==")
    head = "phase     op                          stock calls   stock MB   cp calls      cp MB   Δcalls      ΔMB"
    print(head + "  Δcalls/layer  ΔMB/layer")
    totals = collections.defaultdict(int)
    for key in sorted(set(stock.ops) | set(cp.ops)):
        s, c = stock.ops.get(key, Tally()), cp.ops.get(key, Tally())
        for phase in (key[0], "total"):
            totals[(phase, "s", "calls")] += s.calls
            totals[(phase, "s", "bytes")] += s.bytes
            totals[(phase, "c", "calls")] += c.calls
            totals[(phase, "c", "bytes")] += c.bytes
        if (s.calls, s.bytes) == (c.calls, c.bytes) and not every:
            continue
        dc, db = c.calls - s.calls, c.bytes - s.bytes
        print(
            f"{key[0]:9s} {key[1]:26s} {s.calls:11d} {_mb(s.bytes)}  {c.calls:9d}  {_mb(c.bytes)} {dc:+8d} "
            f"{db / 2**20:+8.2f}  {dc / layers:+12.2f}  {db / 2**20 / layers:+9.2f}"
        )
    for phase in ("forward", "backward", "total"):
        sc, sb = totals[(phase, "s", "calls")], totals[(phase, "s", "bytes")]
        cc, cb = totals[(phase, "c", "calls")], totals[(phase, "c", "bytes")]
        print(
            f"{phase:9s} {'ALL OPS (outside the kernel)':26s} {sc:11d} {_mb(sb)}  {cc:9d}  {_mb(cb)} {cc - sc:+8d} "
            f"{(cb - sb) / 2**20:+8.2f}  {(cc - sc) / layers:+12.2f}  {(cb - sb) / 2**20 / layers:+9.2f}"
        )
    for name, rec in (("stock", stock), ("cp", cp)):
        calls = sum(t.calls for t in rec.kernel.values())
        print(f"attention kernel ({name}): {calls} calls, {_mb(sum(t.bytes for t in rec.kernel.values())).strip()} MB")
    print(f"\n-- {mode}: the transformers_cp lines that dispatch ops (calls, MB written) --")
    for (phase, op, site), t in sorted(cp.sites.items(), key=lambda kv: (kv[0][0], -kv[1].bytes, kv[0][1])):
        if every or not site.startswith(("autograd", "transformers/", "-")):
            print(f"{phase:9s} {op:22s} {t.calls:6d} {_mb(t.bytes)}  {site}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--modes", default="ulysses,zigzag")
    p.add_argument("--tokens", type=int, default=4096, help="L: tokens per rank (the stock step's whole row)")
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--loss-chunk", type=int, default=None, help="LM-head loss chunk (default: L // 19 + 1)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--kernel", default="fused", choices=("fused", "math"), help="CPU only (see the docstring)")
    p.add_argument("--stock-chunked", action="store_true", help="the stock step with the chunked loss too")
    p.add_argument("--all", action="store_true", help="list every op, not only those that differ")
    a = p.parse_args()
    a.loss_chunk = a.loss_chunk or a.tokens // 19 + 1
    cuda = a.device == "cuda"
    dist.init_process_group("nccl" if cuda else "gloo")
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    fused = cuda or a.kernel == "fused"
    dtype = torch.bfloat16 if fused else torch.float32
    kernel_cls = TorchKernel if fused else MathKernel
    if fused and not cuda:
        from host_time import stub_fused_ops

        stub_fused_ops()
    attention.select_kernel = lambda backend, q, softcap=None: kernel_cls()
    if not cuda:
        count_kernel_apart(fused)
    rank = dist.get_rank()
    if rank == 0:
        print(f"# torchrun --nproc-per-node 2 benchmarks/step_ops.py {' '.join(sys.argv[1:])}".rstrip())
        print(
            f"# torch {torch.__version__}, {a.device}, {dtype}, kernel {kernel_cls.__name__}"
            f"{' (ops stubbed)' if fused and not cuda else ''}; Qwen2-like: 12/2 heads of {a.head_dim}, "
            f"{a.layers} layers, vocab {a.vocab}; L = {a.tokens} tokens per rank, loss chunk {a.loss_chunk}; stock loss "
            f"{'chunked' if a.stock_chunked else 'the model own'}"
        )
    stock = run_stock(a, a.device, dtype) if rank == 0 else None
    for mode in a.modes.split(","):
        cp = run_cp(a, mode, a.device, dtype)
        if rank == 0:
            report(stock, cp, mode, a.layers, a.all)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
