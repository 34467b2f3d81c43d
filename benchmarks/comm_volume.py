"""Bytes each rank sends per training step, from the shapes: the attention traffic of a CP mode per decoder layer, and
the parameter traffic of the engine (DDP's gradient all-reduce, ZeRO-3's parameter gathers and gradient
reduce-scatter). Collectives are counted as ring algorithms send: (N-1)/N of the gathered or reduced tensor.

    python benchmarks/comm_volume.py --shape 1.5b --seqs 32768,131072 --cp 2

`--measure` (under torchrun, on CPU at a small shape) checks the model against the bytes that transformers_cp's
collectives actually carry in one checkpointed training step of each mode:

    torchrun --nproc_per_node 2 benchmarks/comm_volume.py --measure --shape tiny --seqs 512
"""

from __future__ import annotations

import argparse

from transformers_cp.algorithms.ulysses import kv_heads_for_rank

MODES = ("ulysses", "zigzag", "odysseus")


def attention_bytes(
    mode: str, config: dict, seq: int, cp: int, dtype_bytes: int = 2, checkpointing: bool = True
) -> dict[str, float]:
    """Bytes one rank sends for one decoder layer's attention in one step (forward, backward, recomputation)."""
    hidden, hq = config["hidden_size"], config["num_attention_heads"]
    hkv = config.get("num_key_value_heads", hq)
    d = config.get("head_dim", hidden // hq)
    part = (cp - 1) / cp
    if mode == "odysseus":  # all-gather of the layer input, reduce-scatter of o_proj's partial sums; the same back
        forward = 2 * part * seq * hidden * dtype_bytes
        backward, repeated = forward, forward
    elif mode == "ulysses":  # all-to-all of q + the KV heads each rank needs, all-to-all of the output; reversed back
        kv_sent = sum(len(kv_heads_for_rank(hq, hkv, cp, r)) for r in range(cp))
        forward = part * seq / cp * (2 * hq + 2 * kv_sent) * d * dtype_bytes
        backward, repeated = forward, forward
    elif mode == "zigzag":  # the rows others attend to pass N-1 times; in backward again, with their dK/dV (float32)
        # One sequence: rank r sends both its chunks but rank 0 only its first (nobody after it sees its last): 2N-1
        # of the 2N chunks travel, each N-1 times, and their dK/dV N-1 times (N-2 hops along, one home); per rank,
        # the mean over the ranks.
        kv = 2 * (2 * cp - 1) / (2 * cp) * seq * part * hkv * d
        forward = kv * dtype_bytes
        backward = forward + kv * 4
        repeated = 0.0  # the recomputation reuses the first forward's attention (algorithms/reuse.py)
    else:
        raise ValueError(f"no communication model for mode {mode!r}; choose one of {MODES}")
    recompute = repeated if checkpointing else 0.0
    return dict(forward=forward, backward=backward, recompute=recompute, total=forward + backward + recompute)


def parameter_bytes(n_params: int, world: int, dtype_bytes: int = 2) -> dict[str, float]:
    """Bytes one rank sends per step to keep replicated weights in step: DDP all-reduces the gradients (2 (N-1)/N);
    ZeRO-3 gathers the parameters in forward and again in backward and reduce-scatters the gradients (3 (N-1)/N)."""
    part = (world - 1) / world
    return dict(ddp=2 * part * n_params * dtype_bytes, zero3=3 * part * n_params * dtype_bytes)


def step_summary(mode: str, config: dict, n_params: int, seq: int, cp: int, dtype_bytes: int = 2) -> dict[str, float]:
    """MB per rank and step: attention per layer and over all layers, and the parameter traffic of DDP and ZeRO-3."""
    layer = attention_bytes(mode, config, seq, cp, dtype_bytes)
    params = parameter_bytes(n_params, cp, dtype_bytes)
    return dict(
        attention_mb_per_layer=round(layer["total"] / 1e6, 2),
        attention_mb=round(layer["total"] * config["num_hidden_layers"] / 1e6, 1),
        ddp_mb=round(params["ddp"] / 1e6, 1),
        zero3_mb=round(params["zero3"] / 1e6, 1),
    )


class CollectiveCounter:
    """Adds up the bytes this rank sends through transformers_cp's collectives (counted as ring algorithms send them)
    while active. Every all-to-all (Ulysses' pipelined exchanges and the hybrid mode's autograd all-to-all alike) is
    a `comm.Exchange`, every ring step a `RingComm.start`. The per-forward gathers of position ids and position
    embeddings are not counted (not per layer)."""

    def __init__(self) -> None:
        self.bytes = 0

    def __enter__(self) -> CollectiveCounter:
        import torch.distributed as dist

        from transformers_cp import comm

        self._saved = comm.all_gather, comm.reduce_scatter, comm.Exchange.__init__, comm.RingComm.start
        all_gather, reduce_scatter, exchange_init, ring_start = self._saved

        def size(x, group=None) -> tuple[int, int]:
            return x.numel() * x.element_size(), dist.get_world_size(group)

        def counted_all_gather(x, group, async_op=False):
            n, world = size(x, group)
            self.bytes += (world - 1) * n
            return all_gather(x, group, async_op)

        def counted_reduce_scatter(x, group, async_op=False):
            n, world = size(x, group)
            self.bytes += (world - 1) * n // world
            return reduce_scatter(x, group, async_op)

        def counted_exchange(exchange, send, group):
            n, world = size(send, group)
            self.bytes += (world - 1) * n // world  # the slice for this rank itself stays
            return exchange_init(exchange, send, group)

        def counted_ring_start(ring, send, hops=1, shape=None):
            if hops % ring.size:  # a full turn sends nothing
                self.bytes += send.numel() * send.element_size()
            return ring_start(ring, send, hops, shape)

        comm.all_gather, comm.reduce_scatter = counted_all_gather, counted_reduce_scatter
        comm.Exchange.__init__, comm.RingComm.start = counted_exchange, counted_ring_start
        return self

    def __exit__(self, *exc) -> None:
        from transformers_cp import comm

        comm.all_gather, comm.reduce_scatter, comm.Exchange.__init__, comm.RingComm.start = self._saved


def measure(config: dict, seq: int) -> None:
    """One checkpointed fwd+bwd per mode on this job's ranks (float32): counted bytes per rank (the mean) and layer vs
    `attention_bytes`."""
    import torch
    import torch.distributed as dist
    import transformers

    from transformers_cp import ContextParallelConfig, apply_context_parallel, build_mesh, shard_batch
    from transformers_cp.mesh import init_distributed

    init_distributed("cpu")
    cp = dist.get_world_size()
    if dist.get_rank() == 0:
        print(f"{cp} ranks, S={seq}, float32, one checkpointed step: bytes sent per rank and layer")
        print(f"{'mode':>9} {'computed':>12} {'counted':>12}")
    for mode in MODES:
        torch.manual_seed(0)
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**config, use_cache=False))
        model.gradient_checkpointing_enable()
        model.train()
        mesh = build_mesh(ContextParallelConfig(size=cp, mode=mode), "cpu")
        apply_context_parallel(model, mesh.config, mesh=mesh)
        ids = torch.randint(0, config["vocab_size"], (1, seq), generator=torch.Generator().manual_seed(1))
        batch = shard_batch({"input_ids": ids}, mesh)
        with CollectiveCounter() as counter:
            logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
            logits.float().logsumexp(-1).sum().backward()
        computed = attention_bytes(mode, config, seq, cp, dtype_bytes=4)["total"]
        counted = torch.tensor([float(counter.bytes)], dtype=torch.float64)
        dist.all_reduce(counted)  # the mean over the ranks (zigzag's ranks send different amounts)
        if dist.get_rank() == 0:
            print(
                f"{mode:>9} {computed:>12.0f} {counted.item() / cp / config['num_hidden_layers']:>12.0f}", flush=True
            )


def main() -> None:
    import torch
    import transformers
    from train import SHAPES

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="1.5b", choices=list(SHAPES))
    p.add_argument("--seqs", default="32768,131072")
    p.add_argument("--cp", type=int, default=2)
    p.add_argument("--measure", action="store_true", help="count the bytes of one step per mode (under torchrun)")
    a = p.parse_args()
    config = SHAPES[a.shape]
    if a.measure:
        for seq in map(int, a.seqs.split(",")):
            measure(config, seq)
        return
    with torch.device("meta"):
        n_params = sum(
            p.numel() for p in transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**config)).parameters()
        )
    print(f"{a.shape}: {n_params / 1e9:.3f}B parameters, CP {a.cp}, bf16, MB sent per rank per step")
    print(f"{'seq':>8} {'mode':>9} {'attn/layer':>11} {'attention':>10} {'+DDP':>8} {'+ZeRO-3':>8}")
    for seq in map(int, a.seqs.split(",")):
        for mode in MODES:
            s = step_summary(mode, config, n_params, seq, a.cp)
            print(
                f"{seq:>8} {mode:>9} {s['attention_mb_per_layer']:>11.1f} {s['attention_mb']:>10.0f} "
                f"{s['attention_mb'] + s['ddp_mb']:>8.0f} {s['attention_mb'] + s['zero3_mb']:>8.0f}"
            )


if __name__ == "__main__":
    main()
