"""The long-sequence memory savings (`config.MemorySavings`, a `ContextParallelConfig`'s `memory_savings`),
installed on a model in one call.

They work with and without context parallelism: chunked LM-head loss (`chunked_loss`), tiled MLP (`tiled_mlp`),
offload of the checkpointed layer inputs (`offload`) and partial recomputation, which spends memory the others leave
free on recomputing fewer layers (`recompute`). Two of them act again while the Trainer trains (`training_callbacks`).
"""

from __future__ import annotations

import torch
import transformers

from .auto_recompute import AutoRecompute
from .chunked_loss import apply_chunked_loss, chunked_loss_state, chunked_loss_supported, remove_chunked_loss
from .config import ContextParallelConfig, MemorySavings
from .liger import KeepTiledMLPUnderLiger
from .offload import activation_offloader, apply_activation_offload, remove_activation_offload
from .recompute import apply_partial_recompute, remove_partial_recompute
from .tiled_mlp import apply_tiled_mlp, decoder_mlps, remove_tiled_mlp


def apply_memory_savings(model: torch.nn.Module, config: MemorySavings | ContextParallelConfig) -> torch.nn.Module:
    """Install what `config` (or its `memory_savings`) asks for; the auto settings (None) install only where the
    model supports them."""
    if isinstance(config, ContextParallelConfig):
        config = config.memory_savings
    remove_memory_savings(model)
    if config.loss_chunk_size != 0 and (config.loss_chunk_size is not None or chunked_loss_supported(model) is None):
        apply_chunked_loss(model, config.loss_chunk_size)
    if config.mlp_tile_size != 0 and (config.mlp_tile_size is not None or decoder_mlps(model)):
        apply_tiled_mlp(model, config.mlp_tile_size)
    if config.offload_activations:
        apply_activation_offload(model, config.offload_attention_outputs)
    if config.recompute_layers is not None:
        apply_partial_recompute(model, config.recompute_layers)
    return model


def remove_memory_savings(model: torch.nn.Module) -> torch.nn.Module:
    remove_chunked_loss(model)
    remove_tiled_mlp(model)
    remove_activation_offload(model)
    remove_partial_recompute(model)
    return model


def memory_savings_on(model: torch.nn.Module, config: MemorySavings) -> list[str]:
    """What `apply_memory_savings(model, config)` turned on, in words (the Trainer logs it)."""
    chunked = chunked_loss_state(model)
    on = []
    if chunked is not None:
        size = chunked.chunk_size
        on.append(f"chunked LM-head loss ({f'{size}-token chunks' if size else 'auto: above 2^28 logits'})")
    if config.mlp_tile_size != 0 and (config.mlp_tile_size is not None or decoder_mlps(model)):
        size = config.mlp_tile_size
        on.append(f"tiled MLP ({f'{size}-token tiles' if size else 'auto: above 32768 tokens'})")
    if activation_offloader(model) is not None:
        on.append("activation offload" + (" with attention outputs" if config.offload_attention_outputs else ""))
    if config.recompute_layers is not None:
        on.append(f"recomputation of the first {config.recompute_layers} decoder layers only")
    return on or ["none"]


def training_callbacks(config: MemorySavings | None) -> list[transformers.TrainerCallback]:
    """The Trainer's callbacks for the savings: the automatic recompute after step 1 (`auto_recompute`) and the tiled
    MLP kept around the MLP forwards Liger binds when training starts (`liger`); both do nothing without `config`."""
    return [AutoRecompute(config), KeepTiledMLPUnderLiger(config)]
