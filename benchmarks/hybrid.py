"""Hybrid models under CP on the GPU: tokens/s per GPU with CP=2 at 64k and 128k against one GPU at 32k, and the
longest sequence that trains on 2 GPUs (CP=2) against 1 GPU, for a Qwen3-Next-shaped (gated delta rule + attention,
3:1) and a Nemotron-H-shaped (Mamba2 + attention + MLP) model of about 1.5B parameters, random init, bf16, full
training with gradient checkpointing through transformers_cp's Trainer (`train.run_one`).

    torchrun --nproc_per_node 2 benchmarks/hybrid.py --out benchmarks/results/hybrid_2xH200.json
    python benchmarks/hybrid.py --smoke --out /tmp/hybrid_smoke.json        # CPU, tiny shapes, seconds
    # the longest sequence: one step at given lengths, one GPU (stock kernels and the CP kernels) and CP=2
    torchrun --nproc_per_node 2 benchmarks/hybrid.py --shapes nemotron_h_1.5b --single-seqs 196608 \
        --single-kernels pieces --cp-seqs 393216 --modes ulysses --steps 1

"One GPU" runs are context_parallel_size=1 in the same 2-process job (each GPU trains its own sequence, data
parallel), so tokens/s per GPU compares directly. The mixers run through `transformers_cp.mixers`: Nemotron-H's
Mamba2 layers and the gated delta rule pass their state across ranks (`mixers_mamba2`, `delta_rule`: each rank runs
its own tokens); `--mixer-path gathered` puts the gated delta rule on the gathered form instead (each mixer's input
gathered over the CP group, the stock mixer per document). The JSON says which path and which kernels the stock
mixers found (flash-linear-attention, mamba_ssm, causal-conv1d, else transformers' torch path).

On transformers' torch path the CP mixers call the stock kernels over pieces (`delta_rule.in_pieces`: the gated
delta rule's backward grows with its call's length squared; `mixers_mamba2.scan_pieces`: the Mamba2 scan's memory
does). `--single-kernels pieces` gives the one-GPU model the same kernels (the stock model otherwise), so that the
one-GPU and CP rows differ only by CP.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
from collections.abc import Iterator

import transformers
from train import CUDA, longest, model_job_parser, model_job_results, progress, run_one

from transformers_cp import delta_rule, mixers_mamba2

SMOKE = dict(vocab_size=256, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16)


def qwen3_next(smoke: bool) -> transformers.PretrainedConfig:
    """Qwen3-Next's layout (3 gated-delta-rule layers per attention layer, gated attention) with dense MLPs, ≈1.6B."""
    layers = 4 if smoke else 24
    size = dict(
        SMOKE, intermediate_size=128, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16,
        linear_value_head_dim=16,
    ) if smoke else dict(
        vocab_size=151936, hidden_size=2048, intermediate_size=5632, num_attention_heads=16, num_key_value_heads=2,
        head_dim=128, linear_num_key_heads=16, linear_num_value_heads=16, linear_key_head_dim=128,
        linear_value_head_dim=128,
    )  # fmt: skip
    return transformers.Qwen3NextConfig(
        **size, num_hidden_layers=layers, layer_types=(["linear_attention"] * 3 + ["full_attention"]) * (layers // 4),
        mlp_only_layers=list(range(layers)), linear_conv_kernel_dim=4, max_position_embeddings=1 << 21,
        tie_word_embeddings=True, use_cache=False,
    )  # fmt: skip


def nemotron_h(smoke: bool) -> transformers.PretrainedConfig:
    """Nemotron-H's layout (Mamba2 and ReLU² MLP blocks, one attention block in eight), ≈1.6B."""
    size = dict(
        SMOKE, intermediate_size=128, mamba_num_heads=4, mamba_head_dim=32, ssm_state_size=16, n_groups=2,
        chunk_size=16,
    ) if smoke else dict(
        vocab_size=131072, hidden_size=2048, intermediate_size=8192, num_attention_heads=16, num_key_value_heads=8,
        head_dim=128, mamba_num_heads=64, mamba_head_dim=64, ssm_state_size=128, n_groups=8, chunk_size=128,
    )  # fmt: skip
    return transformers.NemotronHConfig(
        **size, hybrid_override_pattern="M-M-M*-" if smoke else "M-M-M-*-" * 4, conv_kernel=4,
        max_position_embeddings=1 << 21, tie_word_embeddings=False, use_cache=False,
    )  # fmt: skip


SHAPES = {"qwen3_next_1.5b": qwen3_next, "nemotron_h_1.5b": nemotron_h}


def kernels() -> dict:
    """The fast kernel packages the stock mixers use when installed (transformers' torch path otherwise)."""
    found = {name: importlib.util.find_spec(module) is not None for name, module in (
        ("flash_linear_attention", "fla"), ("mamba_ssm", "mamba_ssm"), ("causal_conv1d", "causal_conv1d"),
        ("tilelang", "tilelang"))}  # fmt: skip
    if CUDA:
        import triton

        found["triton"] = triton.__version__
    return found


@contextlib.contextmanager
def kernels_in_pieces(config: transformers.PretrainedConfig) -> Iterator[None]:
    """While open, the model type's torch-path kernels run over pieces as its CP mixers run them, without CP."""
    modeling = importlib.import_module(f"transformers.models.{config.model_type}.modeling_{config.model_type}")
    stock = {name: getattr(modeling, name) for name in (*set(delta_rule.CLASSES.values()), "mamba2_chunk_scan")
             if hasattr(modeling, name)}  # fmt: skip
    for name, kernel in stock.items():
        scan = name == "mamba2_chunk_scan"
        setattr(
            modeling,
            name,
            mixers_mamba2.scan_pieces(kernel, config.chunk_size) if scan else delta_rule.in_pieces(kernel),
        )
    try:
        yield
    finally:
        for name, kernel in stock.items():
            setattr(modeling, name, kernel)


def main() -> None:
    p = model_job_parser(__doc__, SHAPES, modes="zigzag,ulysses", cp_seqs="65536,131072")
    p.add_argument("--search", action="store_true", help="also the longest sequence on 1 GPU and on 2 (first mode)")
    p.add_argument("--search-limit", type=int, default=1 << 20)
    p.add_argument(
        "--mixer-path",
        choices=("state", "gathered"),
        default="state",
        help="the gated-delta-rule mixers' CP form: state passing (about 1x compute) or gathered (up to cx)",
    )
    p.add_argument(
        "--single-kernels",
        default="stock",
        help="the one-GPU runs' kernels, comma-separated: stock, pieces (the torch-path kernels as the CP runs call them)",
    )
    p.add_argument("--piece-bytes", type=int, default=None, help="delta_rule.PIECE_BYTES (default: the module's)")
    a = p.parse_args()
    if a.piece_bytes is not None:
        delta_rule.PIECE_BYTES = a.piece_bytes
    if a.smoke:
        a.single_seqs, a.cp_seqs, a.steps, a.search_limit = "64", "128", 2, 256
    delta_rule.USE_STATE = a.mixer_path == "state"
    pieces = dict(delta_rule_piece_bytes=delta_rule.PIECE_BYTES, mamba2_scan_bytes=mixers_mamba2.SCAN_BYTES)
    extra = dict(context_parallel_auto_recompute=not a.no_auto_recompute)
    world, results = model_job_results(a.out, kernels=kernels(), mixer_path=a.mixer_path, **pieces)

    def record(row: dict) -> None:
        row.pop("model_tflops_per_gpu", None)  # train.py's count is for attention-only models
        results.record(row)

    for shape in a.shapes.split(","):
        config = SHAPES[shape](a.smoke)
        for form in a.single_kernels.split(","):
            for seq in map(int, a.single_seqs.split(",")) if a.single_seqs else []:
                progress(f"{shape}: one GPU per sequence at {seq}, {form} kernels")
                with kernels_in_pieces(config) if form == "pieces" else contextlib.nullcontext():
                    record({**run_one(shape, seq, "single", a.steps, 1, config=config, extra=extra), "kernels": form})
        if world < 2:
            continue
        for mode in a.modes.split(","):
            for seq in map(int, a.cp_seqs.split(",")) if a.cp_seqs else []:
                record(run_one(shape, seq, mode, a.steps, world, config=config, extra=extra))
        if a.search:
            start = int(a.single_seqs.split(",")[0])
            record(longest(shape, "single", start, 1, a.search_limit, step=max(start // 4, 64), config=config))
            mode = a.modes.split(",")[0]
            record(longest(shape, mode, start, world, a.search_limit, step=max(start // 4, 64), config=config))


if __name__ == "__main__":
    main()
