"""What a model's config says that context parallelism needs: its text config and the length its positions cover."""

from __future__ import annotations

import torch

from .rope import depends_on_sequence


def text_config(model: torch.nn.Module):
    """The config of the language model (the text part of a multimodal config, the config itself otherwise)."""
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def decoder_layers(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The language model's decoder, and the part of it that holds its layers (not a vision or audio tower, nor an
    embedding extension)."""
    decoder = (model.get_decoder() if hasattr(model, "get_decoder") else None) or model
    layers = getattr(decoder, "layers", None)
    return decoder, layers if isinstance(layers, torch.nn.ModuleList) else decoder


def max_positions(model: torch.nn.Module) -> int | None:
    """The longest document the model's positions cover: max_position_embeddings, times the RoPE scaling factor
    where the config scales RoPE beyond it; for longrope, whose max_position_embeddings is the extended length, the
    larger of it and original_max_position_embeddings times the factor. None where the config states no limit, and
    for dynamic NTK scaling, whose frequencies follow the sequence to any length."""
    config = text_config(model)
    limit = getattr(config, "max_position_embeddings", None)
    if not isinstance(limit, int):
        return None
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    scalings = [p for p in rope.values() if isinstance(p, dict)] or [rope]  # per layer type, or one
    covered = [limit]
    for p in scalings:
        kind = p.get("rope_type", p.get("type", "default"))
        if kind == "longrope":
            covered.append(int(p.get("original_max_position_embeddings", limit) * (p.get("factor") or 1)))
        elif depends_on_sequence(kind):
            return None
        elif kind != "default":
            covered.append(int(limit * (p.get("factor") or 1)))
    return max(covered)
