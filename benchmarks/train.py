"""End-to-end SFT throughput with transformers_cp's Trainer: tokens/s per GPU, MFU, peak memory, and (with
--search) the longest sequence that trains one full optimizer step.

Random-init Qwen2.5 shapes, full-parameter training in bf16 with gradient checkpointing, one sequence per step,
the same settings as the peers' anchor script (../shared/anchors/anchor_e2e.py) so that the numbers compare.

    torchrun --nproc_per_node 2 benchmarks/train.py --shape 1.5b --seqs 65536 --modes zigzag,ulysses \
        --out benchmarks/results/train_1.5b_2xH200.json

Modes are any `context_parallel_mode` (ring, zigzag, llama3, ulysses, hybrid, odysseus); `--comm` adds the bytes
each rank sends per step for ulysses, zigzag and odysseus (`comm_volume.py`) and the profiled NCCL kernel time.

Long sequences (docs/long_sequences.md): the chunked loss and tiled MLP are on by default (auto); --offload keeps the
checkpointed layer inputs in host memory, --recompute-layers N checkpoints only the first N decoder layers (the others
keep their activations and are not recomputed), --fsdp shards parameters, gradients and optimizer state with FSDP2.
Rank 0 prints the progress of each phase with the elapsed time.

Packed documents: `--docs lognormal` fills each row with documents of lognormal lengths (median 4k, at most 32k,
scaled down for rows under 64k), packed offline (position_ids restart per document); `--balance documents` splits
them by causal work (`context_parallel_balance`). The default run chooses its recomputed layers after step 1 from the
free memory (`context_parallel_auto_recompute`); `--no-auto-recompute` recomputes every layer, as before. `--liger`
turns on `use_liger_kernel`.

    torchrun --nproc_per_node 2 benchmarks/train.py --shape 1.5b --seqs 65536 --docs lognormal \
        --modes zigzag,ulysses --balance documents --out benchmarks/results/train_packed_1.5b_2xH200.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import sys
import time
from collections.abc import Callable

import torch
import torch.distributed as dist
import transformers
from comm_volume import step_summary

from transformers_cp import Trainer, TrainingArguments
from transformers_cp.auto_recompute import AutoRecompute
from transformers_cp.modes import MODES
from transformers_cp.offload import activation_offloader

SHAPES = {
    "1.5b": dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                 num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=1 << 21,
                 rope_theta=1e6, tie_word_embeddings=True),
    "7b": dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
               num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=1 << 21,
               rope_theta=1e6, tie_word_embeddings=False),
    "tiny": dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1 << 16),
}  # fmt: skip
CUDA = torch.cuda.is_available()
START = time.perf_counter()


def progress(message: str) -> None:
    """One line per phase on rank 0, with the time since the script started."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(f"[{time.perf_counter() - START:7.1f}s] {message}", flush=True)


class StepTimer(transformers.TrainerCallback):
    """Wall time of each optimizer step, synchronised with the device."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._start = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        if CUDA:
            torch.cuda.synchronize()
        progress(f"step {state.global_step + 1} begins")
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if CUDA:
            torch.cuda.synchronize()
        self.times.append(time.perf_counter() - self._start)
        peak = torch.cuda.max_memory_allocated() / 2**30 if CUDA else 0.0
        progress(f"step {state.global_step} done in {self.times[-1]:.1f}s, peak {peak:.1f} GiB on rank 0")


class StepProfiler(transformers.TrainerCallback):
    """torch.profiler over one steady step (the third): the device time of its NCCL kernels, and with `path` rank 0
    writes the kernel table there."""

    def __init__(self, path: str | None = None) -> None:
        self.path, self.prof = path, None
        self.nccl: dict | None = None

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == 2:
            from torch.profiler import ProfilerActivity, profile

            self.prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
            self.prof.__enter__()

    def on_step_end(self, args, state, control, **kwargs):
        if self.prof is not None:
            torch.cuda.synchronize()
            self.prof.__exit__(None, None, None)
            from torch.autograd import DeviceType

            events = [  # the kernels themselves: the CPU-side nccl ops would count their kernels again
                e for e in self.prof.key_averages() if e.device_type == DeviceType.CUDA and "nccl" in e.key.lower()
            ]
            self.nccl = dict(
                nccl_ms=round(sum(e.device_time_total for e in events) / 1e3, 1),
                nccl_kernels=sum(e.count for e in events),
            )
            if self.path and (not dist.is_initialized() or dist.get_rank() == 0):
                with open(self.path, "w") as f:
                    f.write(self.prof.key_averages().table(sort_by="cuda_time_total", row_limit=40))
            self.prof = None


def matmul_peak_tflops() -> float | None:
    """bf16 matrix-product rate of this GPU, measured now (the MFU denominator)."""
    if not CUDA:
        return None
    a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(10):
        a @ b
    torch.cuda.synchronize()
    return 2 * 8192**3 * 10 / (time.perf_counter() - t0) / 1e12


def model_flops(config: transformers.PretrainedConfig, n_params: int, lengths: list[int]) -> float:
    """Training FLOPs of one step without recomputation: 6·P per token for the matrix products of the weights, and
    6·layers·hidden·n per token of each document of n tokens for causal attention (QK^T and PV, forward and backward,
    half the square)."""
    return sum(lengths) * 6 * n_params + sum(
        6 * config.num_hidden_layers * config.hidden_size * n * n for n in lengths
    )


def document_lengths(docs: str, seq: int, rng: random.Random) -> list[int]:
    """One sequence, or a row of lognormal documents (median 4k, at most 32k; both scaled by seq / 64k below 64k),
    the last one cut to fill the row."""
    if docs == "single":
        return [seq]
    scale = min(1.0, seq / 65536)
    median, top = max(1, int(4096 * scale)), max(2, int(32768 * scale))
    out: list[int] = []
    while sum(out) < seq:
        out.append(max(1, min(top, int(rng.lognormvariate(math.log(median), 1.0)))))
    out[-1] -= sum(out) - seq
    return [n for n in out if n > 0]


@contextlib.contextmanager
def failure_recorded(row: dict):
    """Run a training inside; running out of memory, or an NCCL or allocator failure at the edge of memory, is
    recorded in `row` as not training instead of ending the benchmark."""
    try:
        yield
    except torch.OutOfMemoryError:
        row["error"] = "OOM"
    except RuntimeError as e:
        row["error"] = repr(e)[:300]


class ResultsFile:
    """Rows printed as they come (rank 0) and the JSON rewritten after each: a run cut off by a time limit keeps
    what it measured."""

    def __init__(self, meta: dict, out: str | None, rank: int) -> None:
        self.meta, self.out, self.rank, self.rows = meta, out, rank, []

    def record(self, row: dict) -> None:
        self.rows.append(row)
        if self.rank != 0:
            return
        print(json.dumps({k: v for k, v in row.items() if k != "tried"}), flush=True)
        if self.out:
            os.makedirs(os.path.dirname(self.out) or ".", exist_ok=True)
            with open(self.out, "w") as f:
                json.dump({"meta": self.meta, "results": self.rows}, f, indent=1)


def model_job_parser(doc: str, shapes: dict, modes: str, cp_seqs: str) -> argparse.ArgumentParser:
    """The options of a job over model shapes (attention_models.py, hybrid.py): one-GPU runs against CP=2 runs."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--shapes", default=",".join(shapes))
    p.add_argument("--modes", default=modes, help="CP modes of the CP=2 runs")
    p.add_argument("--single-seqs", default="32768", help="sequences of the one-GPU runs")
    p.add_argument("--cp-seqs", default=cp_seqs, help="sequences of the CP=2 runs")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--smoke", action="store_true", help="tiny shapes and sequences, for a CPU check of the script")
    p.add_argument("--no-auto-recompute", action="store_true", help="recompute every layer (no choice after step 1)")
    p.add_argument("--out", default=None)
    return p


def model_job_results(out: str | None, **meta) -> tuple[int, ResultsFile]:
    """Joins the job's process group; the world size and the results file, its meta the command, machine and
    versions (and `meta`)."""
    from transformers_cp.mesh import init_distributed

    init_distributed()
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    meta = dict(command=" ".join(([f"torchrun --nproc_per_node {world}"] if world > 1 else ["python"]) + sys.argv),
                machine=f"{world}x {torch.cuda.get_device_name() if CUDA else 'cpu'}", torch=torch.__version__,
                transformers=transformers.__version__, **meta, date=time.strftime("%Y-%m-%d"))  # fmt: skip
    return world, ResultsFile(meta, out, rank)


def record_peak(row: dict) -> None:
    """Put the run's peak allocated memory (the largest over ranks) into `row`, and free the cache for the next run."""
    if not CUDA:
        return
    peak = torch.tensor(torch.cuda.max_memory_allocated() / 2**30, device="cuda")
    if dist.is_initialized():
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    row["peak_gib"] = round(peak.item(), 1)
    torch.cuda.empty_cache()


def run_one(
    shape: str,
    seq: int,
    mode: str,
    steps: int,
    world: int,
    profile_dir: str | None = None,
    savings: dict | None = None,
    comm: bool = False,
    config: transformers.PretrainedConfig | None = None,
    docs: str = "single",
    extra: dict | None = None,
    edit: Callable[[torch.nn.Module], None] | None = None,
) -> dict:
    """Train `steps` steps on sequences of `seq` tokens; returns timings or the failure.

    `savings`: the long-sequence switches (`context_parallel_loss_chunk_size`, `..._mlp_tile_size`,
    `..._offload_activations`, `..._recompute_layers`) and `fsdp` (True: FSDP2 full sharding of the decoder layers and
    the root). With `comm`, also the bytes sent per rank and step from the shapes (`comm_volume`) and the NCCL kernel
    time of one profiled step. `config`: another model than the Qwen2 `shape` (benchmarks/hybrid.py). `docs`:
    "single" or "lognormal" (`document_lengths`); `extra`: more TrainingArguments (the balance, auto recomputation,
    Liger); `edit`: a change to the built model before training (benchmarks/attention_models.py removes the sinks)."""
    savings = dict(savings or {})
    fsdp = savings.pop("fsdp", False)
    progress(f"{shape} S={seq} {mode}: building the model")
    config = config or transformers.Qwen2Config(**SHAPES[shape], use_cache=False)
    torch.manual_seed(0)
    with torch.device("cuda" if CUDA else "cpu"):  # random init on the GPU: seconds instead of a minute
        model = transformers.AutoModelForCausalLM.from_config(config)
    if CUDA:
        model = model.to(torch.bfloat16)
    if edit is not None:
        edit(model)
    n_params = sum(p.numel() for p in model.parameters())
    g = torch.Generator().manual_seed(1)
    rng = random.Random(1)
    rows = [document_lengths(docs, seq, rng) for _ in range(steps)]
    data = [{"input_ids": (ids := torch.randint(0, config.vocab_size, (seq,), generator=g).tolist()), "labels": ids,
             "position_ids": [i for n in lengths for i in range(n)]} for lengths in rows]  # fmt: skip
    cp = dict(context_parallel_size=world, context_parallel_mode=mode) if world > 1 else {}
    cp.update(savings)
    cp.update(extra or {})
    if world == 1 or not MODES[mode].balances_documents:  # the ring modes' balance (ulysses attends whole rows)
        cp.pop("context_parallel_balance", None)
    if fsdp:
        cp.update(fsdp=True, fsdp_config={"version": 2, "transformer_layer_cls_to_wrap": ["Qwen2DecoderLayer"]})
    args = TrainingArguments(
        output_dir="/tmp/transformers_cp_bench", per_device_train_batch_size=1, max_steps=steps, learning_rate=1e-5,
        bf16=CUDA, use_cpu=not CUDA, gradient_checkpointing=True, logging_steps=1, save_strategy="no", report_to=[],
        disable_tqdm=True, optim="adamw_torch_fused" if CUDA else "adamw_torch", dataloader_num_workers=0, **cp,
    )  # fmt: skip
    timer = StepTimer()
    if CUDA:
        torch.cuda.reset_peak_memory_stats()
    row: dict = dict(shape=shape, seq=seq, mode=mode if world > 1 else "single", world=world, params=n_params,
                     fsdp=fsdp, docs=docs, docs_per_row=[len(r) for r in rows],
                     **{k.removeprefix("context_parallel_"): v for k, v in {**savings, **(extra or {})}.items()})  # fmt: skip
    row["balance"] = cp.get("context_parallel_balance", "tokens")  # as run (only the ring family takes documents)
    if comm and world > 1 and shape in SHAPES:
        row.update(step_summary(mode, SHAPES[shape], n_params, seq, world))
    with failure_recorded(row):
        callbacks = [timer]
        profiler = None
        if (profile_dir or comm) and CUDA:
            if profile_dir:
                os.makedirs(profile_dir, exist_ok=True)
            profiler = StepProfiler(profile_dir and f"{profile_dir}/{shape}_{mode}_S{seq}.txt")
            callbacks.append(profiler)
        trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=callbacks)
        progress("trainer ready")
        trainer.train()
        row["engine"] = type(trainer.model_wrapped).__name__  # e.g. DistributedDataParallel, FSDPQwen2ForCausalLM
        chosen = [c.chosen for c in trainer.callback_handler.callbacks if isinstance(c, AutoRecompute)]
        row["auto_recompute_layers"] = chosen[0] if chosen else None  # None: not decided (CPU, or switched off)
        if (offloader := activation_offloader(model)) is not None:
            row["offloaded_gib_per_step"] = round(offloader.moved_bytes / steps / 2**30, 2)
        steady = sorted(timer.times[1:] or timer.times)[len(timer.times[1:] or timer.times) // 2]
        flops = sum(model_flops(config, n_params, r) for r in rows) / len(rows)  # rows differ only in their documents
        row.update(step_s=round(steady, 3), tokens_per_s_per_gpu=round(seq / steady / world, 1),
                   model_tflops_per_gpu=round(flops / steady / world / 1e12, 1),
                   losses=[round(h["loss"], 4) for h in trainer.state.log_history if "loss" in h])  # fmt: skip
        if profiler is not None and profiler.nccl is not None:
            row.update(profiler.nccl)
        del trainer
    del model
    record_peak(row)
    return row


def longest(
    shape: str,
    mode: str,
    start: int,
    world: int,
    limit: int,
    step: int = 8192,
    savings: dict | None = None,
    config: transformers.PretrainedConfig | None = None,
) -> dict:
    """Double the length until a step fails, then bisect to a multiple of `step`: the longest that trains."""
    ok, bad, tried = 0, None, []
    seq = start
    while bad is None and seq <= limit:
        r = run_one(shape, seq, mode, 1, world, savings=savings, config=config)
        tried.append(r)
        if "error" in r:
            bad = seq
        else:
            ok, seq = seq, seq * 2
    while bad is not None and bad - ok > step:
        mid = (ok + bad) // 2 // step * step
        r = run_one(shape, mid, mode, 1, world, savings=savings, config=config)
        tried.append(r)
        ok, bad = (mid, bad) if "error" not in r else (ok, mid)
    return dict(shape=shape, mode=mode, world=world, longest_ok=ok, first_failing=bad, tried=tried)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="1.5b", choices=list(SHAPES))
    p.add_argument("--seqs", default="65536")
    p.add_argument("--modes", default="zigzag,ulysses")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--search", action="store_true", help="also search the longest trainable sequence per mode")
    p.add_argument("--search-start", type=int, default=65536)
    p.add_argument("--search-limit", type=int, default=1 << 21)
    p.add_argument("--search-step", type=int, default=8192, help="resolution of the bisection")
    p.add_argument("--out", default=None)
    p.add_argument("--profile", default=None, help="folder for a profiler table of one steady step per run")
    p.add_argument("--comm", action="store_true", help="bytes sent per step (from shapes) and NCCL time (profiled)")
    p.add_argument("--loss-chunk", type=int, default=None, help="tokens per LM-head loss chunk (0 off; default auto)")
    p.add_argument("--mlp-tile", type=int, default=None, help="tokens per MLP tile (0 off; default auto)")
    p.add_argument("--offload", action="store_true", help="checkpointed layer inputs in pinned host memory")
    p.add_argument("--offload-attention", action="store_true", help="with --offload: CP's kept attention outputs too")
    p.add_argument("--recompute-layers", type=int, default=None, help="checkpoint only the first N decoder layers")
    p.add_argument("--fsdp", action="store_true", help="FSDP2: shard parameters, gradients and optimizer state")
    p.add_argument(
        "--docs", default="single", choices=["single", "lognormal"], help="one sequence or packed documents"
    )
    p.add_argument("--balance", default="tokens", choices=["tokens", "documents"], help="context_parallel_balance")
    p.add_argument("--no-auto-recompute", action="store_true", help="recompute every layer (no choice after step 1)")
    p.add_argument("--liger", action="store_true", help="use_liger_kernel=True")
    a = p.parse_args()
    extra = dict(context_parallel_auto_recompute=not a.no_auto_recompute, use_liger_kernel=a.liger)
    if a.balance != "tokens":
        extra["context_parallel_balance"] = a.balance
    savings = dict(context_parallel_loss_chunk_size=a.loss_chunk, context_parallel_mlp_tile_size=a.mlp_tile,
                   context_parallel_offload_activations=a.offload,
                   context_parallel_offload_attention_outputs=a.offload_attention,
                   context_parallel_recompute_layers=a.recompute_layers, fsdp=a.fsdp)  # fmt: skip
    from transformers_cp.mesh import init_distributed

    init_distributed()
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    peak = matmul_peak_tflops()
    meta = dict(command=f"torchrun --nproc_per_node {world} {' '.join(sys.argv)}",
                machine=f"{world}x {torch.cuda.get_device_name() if CUDA else 'cpu'}", torch=torch.__version__,
                transformers=transformers.__version__, matmul_peak_tflops=peak, date=time.strftime("%Y-%m-%d"),
                env=f"PYTORCH_CUDA_ALLOC_CONF={os.environ.get('PYTORCH_CUDA_ALLOC_CONF', '')}")  # fmt: skip

    record = ResultsFile(meta, a.out, rank).record

    for mode in a.modes.split(","):
        for seq in map(int, a.seqs.split(",")) if a.seqs else []:
            row = run_one(a.shape, seq, mode, a.steps, world, a.profile, savings, a.comm, docs=a.docs, extra=extra)
            if peak and "model_tflops_per_gpu" in row:
                row["mfu"] = round(row["model_tflops_per_gpu"] / peak, 3)
            record(row)
        if a.search:
            record(longest(a.shape, mode, a.search_start, world, a.search_limit, a.search_step, savings))


if __name__ == "__main__":
    main()
