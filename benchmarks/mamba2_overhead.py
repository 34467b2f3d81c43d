"""What CP's Mamba2 state passing (`mixers_mamba2.StatePassingMixer`) adds to a Nemotron-H-shaped model, per rank,
against one process at the same tokens per process (one document per row, ulysses, CP = 2; rank 0 holds the
document's start, rank 1 its continuation):

- `bytes`: bytes that one Mamba2 mixer's forward and backward write (`step_ops.written_bytes`; the
  best CPU proxy for the GPU time of these memory-bound ops), per local token and per op, on meta tensors (any
  shape, no compute; `--shape gpu` is benchmarks/hybrid.py's 1.5B). `cp, no correction` runs the expanded shard
  without the correction at the gated norm.
- `mixer`: one mixer's forward and backward time on this machine (median of `--steps`), the gathers stood in by
  copies (benchmarks/mamba2_memory.py), so without communication.
- `model` (under torchrun, 2 processes): the whole decoder's forward and backward (every layer checkpointed), each
  process its own row of L tokens against a CP = 2 row of 2L; the ratio is CP's tokens/s per process over one's.
  Mamba2 and MLP blocks by default: on a CPU, CP's attention runs a PyTorch block loop where one process runs
  SDPA's CPU flash kernel, which would hide the mixers (`--layers "M-M-M-*-"` to see it).

    python benchmarks/mamba2_overhead.py --parts bytes --shape gpu --tokens 32768
    torchrun --nproc_per_node 2 benchmarks/mamba2_overhead.py --tokens 4096 --out benchmarks/results/mamba2_overhead_cpu.txt
"""

from __future__ import annotations

import argparse
import collections
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist
import transformers
from hybrid import nemotron_h
from mamba2_memory import _Gather
from step_ops import written_bytes
from torch.utils._python_dispatch import TorchDispatchMode

from transformers_cp import ContextParallelConfig, apply_context_parallel, build_mesh, mixers_mamba2
from transformers_cp.layout import Layout
from transformers_cp.mesh import ContextParallelMesh
from transformers_cp.mixers import MixerDocuments
from transformers_cp.plan import Documents

CPU_SHAPE = dict(
    vocab_size=1024, hidden_size=512, intermediate_size=1024, num_attention_heads=8, num_key_value_heads=4,
    head_dim=64, mamba_num_heads=16, mamba_head_dim=32, ssm_state_size=64, n_groups=2, chunk_size=64,
)  # fmt: skip
"""Nemotron-H 1.5B's ratios at a CPU's size: 16 Mamba heads of 32 (8 per group of B and C), state 64, scan chunk 64."""


def config(shape: str, layers: str = "M-M-M-") -> transformers.NemotronHConfig:
    if shape == "gpu":
        return nemotron_h(False)
    return transformers.NemotronHConfig(
        **CPU_SHAPE, hybrid_override_pattern=layers, conv_kernel=4, use_cache=False, max_position_embeddings=1 << 20
    )


class Written(TorchDispatchMode):
    """Bytes every op writes while open (`step_ops.written_bytes`), per op."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.bytes[func.__name__] += written_bytes(func, out)
        return out


def mixer_run(model, rank: int | None, tokens: int, correction: bool = True):
    """One mixer of `model`, as one process runs it (rank None) or as CP rank `rank` of 2 runs a row of one document
    of 2 × `tokens`; returns a forward-and-backward function and the undo."""
    mixer = next(m for m in model.modules() if type(m).__name__ in mixers_mamba2.CLASSES)
    stock, handles, gather = mixer.forward, [], mixers_mamba2.AllGather
    if rank is not None:
        mixers_mamba2.AllGather = _Gather  # the gathers' shapes on one process: copies of this rank's rows
        cp = ContextParallelConfig(size=2, mode="ulysses")
        mesh = ContextParallelMesh(cp, Layout.from_config(cp), None, None, None, None, None, rank, 0, 1)
        documents = MixerDocuments()
        documents.current = Documents([0, 2 * tokens], 2 * tokens)
        state = mixers_mamba2.StatePassingMixer(mixer, mesh, documents)
        mixer.forward = state
        handles = state.hooks()
        if not correction:  # the gated norm's hook is the last
            handles.pop().remove()
    p = next(model.parameters())
    x = torch.randn(1, tokens, model.config.hidden_size, dtype=p.dtype, device=p.device, requires_grad=True)

    def step() -> None:
        mixer(x).float().sum().backward()

    def undo() -> None:
        mixer.forward, mixers_mamba2.AllGather = stock, gather
        for h in handles:
            h.remove()

    return step, undo


def bytes_part(a, out, _device: str) -> None:
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config(a.shape)).to(getattr(torch, a.dtype))
    rows = {}
    for name, rank, correction in (("one", None, True), ("cp rank 0", 0, True), ("cp rank 1", 1, True),
                                   ("cp rank 1, no correction", 1, False)):  # fmt: skip
        step, undo = mixer_run(model, rank, a.tokens, correction)
        with Written() as written:
            step()
        undo()
        rows[name] = written.bytes
    one = sum(rows["one"].values())
    out(f"# bytes written by one Mamba2 mixer, forward + backward, KiB per local token ({a.shape} shape, {a.dtype}, "
        f"{a.tokens} tokens per process)")  # fmt: skip
    for name, ops in rows.items():
        total = sum(ops.values())
        out(f"{name:26s} {total / a.tokens / 1024:8.0f}  ({total / one:.3f}x one process)")
    ops = sorted(set().union(*rows.values()), key=lambda o: rows["one"][o] - max(r[o] for r in rows.values()))
    out("per op, CP rank 0 / rank 1 minus one process (KiB per token):")
    for op in ops[:16]:
        d = [(rows[n][op] - rows["one"][op]) / a.tokens / 1024 for n in ("cp rank 0", "cp rank 1")]
        if max(map(abs, d)) >= 0.5:
            out(f"  {op:30s} {d[0]:7.0f} {d[1]:7.0f}")


def timed(step, steps: int) -> float:
    """The median seconds of `step` after a warm-up (plans, caches): wall time on the GPU, this process's CPU time on
    a CPU (the work of this rank alone, apart from waits in the gathers and from other jobs on a shared machine)."""
    cuda = torch.cuda.is_available()
    clock = time.perf_counter if cuda else time.process_time
    step()
    times = []
    for _ in range(steps):
        start = clock()
        step()
        if cuda:
            torch.cuda.synchronize()
        times.append(clock() - start)
    return statistics.median(times)


def mixer_part(a, out, device: str) -> None:
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config(a.shape)).to(device, getattr(torch, a.dtype))
    out(f"# one Mamba2 mixer, forward + backward on {device} ({a.dtype}, {torch.get_num_threads()} threads; CPU time), "
        f"{a.tokens} tokens per process, median of {a.steps}; CP without communication")  # fmt: skip
    base = None
    for name, rank in (("one", None), ("cp rank 0", 0), ("cp rank 1", 1)):
        step, undo = mixer_run(model, rank, a.tokens)
        seconds = timed(step, a.steps)
        undo()
        base = base or seconds
        out(f"{name:26s} {seconds * 1e3:8.1f} ms  ({seconds / base:.3f}x one process)")


def model_part(a, out, device: str) -> None:
    """The whole decoder: each process its own row (no CP) against a CP = 2 row of twice the tokens."""
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config(a.shape, a.layers)).to(
        device, getattr(torch, a.dtype)
    )
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    vocab = model.config.vocab_size

    def run(ids, position_ids):
        def step() -> None:
            model(input_ids=ids, position_ids=position_ids).logits.float().sum().backward()

        return timed(step, a.steps)

    g = torch.Generator().manual_seed(rank)
    single = run(torch.randint(0, vocab, (1, a.tokens), generator=g).to(device),
                 torch.arange(a.tokens, device=device)[None])  # fmt: skip
    mesh = build_mesh(ContextParallelConfig(size=2, mode="ulysses"), device)
    apply_context_parallel(model, mesh.config, mesh=mesh)
    row = torch.randint(0, vocab, (1, 2 * a.tokens), generator=torch.Generator().manual_seed(9))
    shard = lambda t: mesh.layout.shard(t, mesh.cp_rank, dim=1).to(device)  # noqa: E731
    cp = run(shard(row), shard(torch.arange(2 * a.tokens)[None]))
    times = [torch.zeros(2) for _ in range(2)]
    dist.all_gather(times, torch.tensor([single, cp]))
    out(f"# the model ({a.layers}: M Mamba2, - MLP, * attention), forward + backward of its logits, every layer checkpointed, "
        f"{a.tokens} tokens per process, median of {a.steps} (CPU time); one process per row against CP = 2 (ulysses)")  # fmt: skip
    for r, (s, c) in enumerate(t.tolist() for t in times):
        out(f"rank {r}: one {s:.3f} s, CP {c:.3f} s per step: CP's rate {s / c:.3f}x one process's")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parts", default="bytes,mixer,model", help="bytes, mixer, model (model under torchrun)")
    p.add_argument("--shape", choices=("cpu", "gpu"), default="cpu")
    p.add_argument("--layers", default="M-M-M-", help="the decoder's pattern for `model` (cpu shape)")
    p.add_argument("--tokens", type=int, default=4096, help="tokens per process")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--out", default=None, help="also write the lines here (rank 0)")
    a = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    distributed = "WORLD_SIZE" in os.environ
    if distributed:
        dist.init_process_group("nccl" if device == "cuda" else "gloo")
        if device == "cuda":
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        else:
            torch.set_num_threads(1)  # two processes on a shared CPU
    lead = not distributed or dist.get_rank() == 0
    lines = [" ".join(["torchrun --nproc_per_node 2" if distributed else "python", *sys.argv])]

    def out(line: str) -> None:
        if lead:
            print(line, flush=True)
            lines.append(line)

    for part in a.parts.split(","):
        if part == "model":
            if distributed:
                model_part(a, out, device)
        elif lead:
            (bytes_part if part == "bytes" else mixer_part)(a, out, device)
        if distributed:
            dist.barrier()
    if a.out and lead:
        with open(a.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
