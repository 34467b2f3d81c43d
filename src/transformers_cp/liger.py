"""`use_liger_kernel=True` with transformers_cp's Trainer (docs/liger.md).

The stock Trainer applies Liger Kernel when `train()` starts, after transformers_cp set the model up. Liger replaces
the causal LM's forward (its fused linear cross-entropy), the norms, RoPE and, per instance, each MLP's `forward`.
That last one would drop the tiled MLP, which is installed the same way: so at the start of training the tiled MLP is
put back around whatever forward the MLPs have then (Liger's SwiGLU), and both apply. The chunked loss needs nothing:
it holds the labels back in a forward pre-hook and computes the loss in the LM head, which Liger's forward then runs
as a plain head (`chunked_loss.py`), so where it is on it wins over Liger's fused cross-entropy.
"""

from __future__ import annotations

import transformers

from . import changes, tiled_mlp
from .config import MemorySavings


class KeepTiledMLPUnderLiger(transformers.TrainerCallback):
    """Re-wraps the tiled MLP around the MLP forwards Liger installed (only with `use_liger_kernel`)."""

    def __init__(self, config: MemorySavings | None) -> None:
        self.config = config

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if not getattr(args, "use_liger_kernel", False) or model is None or self.config is None:
            return
        if changes.installed(model, tiled_mlp.NAME):
            tiled_mlp.apply_tiled_mlp(model, self.config.mlp_tile_size)
