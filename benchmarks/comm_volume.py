"""Bytes each rank sends per training step, from the shapes: the attention traffic of a CP mode per decoder layer, and
the parameter traffic of the engine (DDP's gradient all-reduce, ZeRO-3's parameter gathers and gradient
reduce-scatter). Collectives are counted as ring algorithms send: (N-1)/N of the gathered or reduced tensor.

    python benchmarks/comm_volume.py --shape 1.5b --seqs 32768,131072 --cp 2
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
    elif mode == "zigzag":  # K and V pass N-1 times; in backward again, with dK/dV (float32) passed N times
        kv = 2 * seq / cp * hkv * d
        forward = (cp - 1) * kv * dtype_bytes
        backward = forward + cp * kv * 4
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


def main() -> None:
    import torch
    import transformers
    from train import SHAPES

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="1.5b", choices=list(SHAPES))
    p.add_argument("--seqs", default="32768,131072")
    p.add_argument("--cp", type=int, default=2)
    a = p.parse_args()
    config = SHAPES[a.shape]
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
