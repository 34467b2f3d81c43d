"""The one line the Trainer logs about what context parallelism set up."""

from __future__ import annotations

import torch

from .kernels import kernel_class
from .mesh import ContextParallelMesh
from .model_info import text_config


def describe(model: torch.nn.Module, mesh: ContextParallelMesh | None, args, savings_on: list[str]) -> str:
    """The mode and layout, the c×d ranks (and for hybrid the Ulysses×ring degrees), the attention kernel that will
    run (for `args`' device and precision) and which memory savings are on."""
    lines = ["off (context_parallel_size=1)"]
    if mesh is not None:
        config = mesh.config
        layout = f"{config.size} CP ranks × {mesh.dp_size} data-parallel"
        if config.combines_ulysses_and_ring:
            layout += f" (Ulysses {config.ulysses_degree} × ring {config.ring_size})"
        text = text_config(model)
        heads = getattr(text, "num_attention_heads", None) or 1
        head_dim = getattr(text, "head_dim", None) or getattr(text, "hidden_size", 0) // heads
        dtype = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else model.dtype
        try:
            softcap = getattr(text, "attn_logit_softcapping", None)  # softcapped layers take FlexAttention
            kernel = kernel_class(config.backend, args.device.type == "cuda", dtype, head_dim, softcap).name
        except ImportError as error:
            kernel = f"none ({error})"
        lines = [
            f"mode {config.mode} on the {config.layout} layout",
            f"{layout} over {args.world_size} processes",
            f"attention kernel '{kernel}' (context_parallel_backend={config.backend}, {dtype}, head size {head_dim})",
        ]
    lines.append(f"memory savings: {', '.join(savings_on)}")
    return "; ".join(lines)
