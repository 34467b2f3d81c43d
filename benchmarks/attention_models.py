"""gpt-oss- and Gemma-2-shaped models under CP on the GPU: tokens/s per GPU with CP=2 at 64k against one GPU at 32k,
and what the attention variant costs at model level — the same model with its sinks removed (gpt-oss), or with its
logit softcap off (Gemma 2). Random init, bf16, full training with gradient checkpointing through transformers_cp's
Trainer (`train.run_one`).

    torchrun --nproc_per_node 2 benchmarks/attention_models.py --out benchmarks/results/attention_models_2xH200.json
    python benchmarks/attention_models.py --smoke --out /tmp/attention_models_smoke.json     # CPU, tiny, seconds

"One GPU" runs are context_parallel_size=1 in the same job (each GPU trains its own sequence, data parallel), so
tokens/s per GPU compares directly; their attention is the stock model's FlexAttention on CUDA (SDPA takes neither
sinks nor a softcap, and eager attention runs out of memory at 32k). "Without
sinks" deletes each attention's `sinks` parameter (the model then calls
attention with `s_aux=None`): the same weights and shapes otherwise.
"""

from __future__ import annotations

import torch
import transformers
from train import CUDA, model_job_parser, model_job_results, progress, run_one

SMOKE = dict(vocab_size=256, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
             intermediate_size=64, num_hidden_layers=2)  # fmt: skip


def gpt_oss(smoke: bool, variant: bool = True) -> transformers.PretrainedConfig:
    """gpt-oss's layout (sliding-window-128 and full layers alternating, sinks, MoE top-4) at about 2B parameters."""
    size = dict(SMOKE, num_local_experts=4, num_experts_per_tok=2, sliding_window=8) if smoke else dict(
        vocab_size=201088, hidden_size=2048, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=32,
        num_key_value_heads=8, head_dim=64, num_local_experts=8, num_experts_per_tok=2, sliding_window=128,
    )  # fmt: skip
    return transformers.GptOssConfig(**size, max_position_embeddings=1 << 21, use_cache=False)


def gemma2(smoke: bool, variant: bool = True) -> transformers.PretrainedConfig:
    """Gemma 2 2B's layout (sliding-window-4096 and full layers alternating, head dim 256, attention logits
    softcapped at 50, final logits at 30); `variant=False`: the attention softcap off."""
    size = dict(SMOKE, sliding_window=8, query_pre_attn_scalar=16) if smoke else dict(
        vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26, num_attention_heads=8,
        num_key_value_heads=4, head_dim=256, sliding_window=4096, query_pre_attn_scalar=256,
    )  # fmt: skip
    return transformers.Gemma2Config(
        **size, attn_logit_softcapping=50.0 if variant else None, final_logit_softcapping=30.0,
        max_position_embeddings=1 << 21, use_cache=False,
    )  # fmt: skip


def without_sinks(model: torch.nn.Module) -> None:
    """Delete every attention's sinks: the model passes `s_aux=None` and attends without them."""
    for module in model.modules():
        if isinstance(getattr(module, "sinks", None), torch.nn.Parameter):
            del module.sinks
            module.sinks = None


SHAPES = {"gpt_oss_2b": (gpt_oss, "sinks"), "gemma2_2b": (gemma2, "attn_softcap")}
SINGLE_ATTENTION = "flex_attention" if CUDA else "eager"
"""The stock attention of the one-GPU runs: FlexAttention on CUDA, which takes sinks and the softcap (SDPA takes
neither, and eager attention's full score matrices run out of memory at 32k)."""


def main() -> None:
    a = model_job_parser(__doc__, SHAPES, modes="ulysses", cp_seqs="65536").parse_args()
    if a.smoke:
        a.single_seqs, a.cp_seqs, a.steps = "64", "128", 2
    extra = dict(context_parallel_auto_recompute=not a.no_auto_recompute)
    world, results = model_job_results(a.out)

    def record(row: dict, variant: str, on: bool) -> None:
        row.pop("model_tflops_per_gpu", None)  # train.py's count is for dense attention-only models
        results.record({**row, variant: on})

    for shape in a.shapes.split(","):
        build, variant = SHAPES[shape]
        for seq in map(int, a.single_seqs.split(",")):
            progress(f"{shape}: one GPU per sequence at {seq}")
            config = build(a.smoke)
            config._attn_implementation = SINGLE_ATTENTION
            row = run_one(shape, seq, "single", a.steps, 1, config=config, extra=extra)
            record({**row, "attention": SINGLE_ATTENTION}, variant, True)
        if world < 2:
            continue
        for mode in a.modes.split(","):
            for seq in map(int, a.cp_seqs.split(",")) if a.cp_seqs else []:
                for on in (True, False):
                    config = build(a.smoke, variant=on or variant == "sinks")
                    edit = None if on or variant != "sinks" else without_sinks
                    record(
                        run_one(shape, seq, mode, a.steps, world, config=config, edit=edit, extra=extra), variant, on
                    )


if __name__ == "__main__":
    main()
