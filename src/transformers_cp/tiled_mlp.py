"""Tiled MLP: a decoder layer's MLP runs over tiles of the sequence and recomputes each tile in backward.

The MLP's intermediate activations (tokens × intermediate size, several tensors) are the largest working set of a
layer at long lengths: 9 GB per tensor for 500k tokens of the 1.5B shape. Tiling keeps one tile's worth.

The weights are shared by all tiles, and data-parallel engines reduce a parameter's gradient when it is accumulated
(DDP's and ZeRO's gradient hooks, FSDP2's post-backward). So the tiles' weight gradients are summed inside one
autograd Function that takes the MLP's trainable parameters as inputs: backward computes every tile's gradients with
`torch.autograd.grad` (which accumulates nothing) and returns their float32 sum once, and autograd then accumulates
each parameter's gradient exactly once, as for the plain MLP.

The tiles call the MLP's own `forward`, not the module (`__call__`), so module hooks do not fire once per tile: the
caller's single `mlp(x)` fires them once in forward. Engines that gather parameters around a module's forward
(FSDP2 on the decoder layer, the usual unit) have them gathered for the whole layer in forward and again for its
backward, which is when the tiles recompute. Parameters partitioned per submodule by DeepSpeed ZeRO-3 are rejected
with a clear error: their gathering hooks would not run for the recomputation.
"""

from __future__ import annotations

import torch

# Auto tiling: tiles of this many tokens, used when a micro-batch holds more than AUTO_MIN_TOKENS tokens.
AUTO_TILE_TOKENS = 8192
AUTO_MIN_TOKENS = 32768
_FORWARD_ATTR = "_tiled_mlp_forward"


def _tiles(length: int, tile: int) -> list[tuple[int, int]]:
    return [(start, min(start + tile, length)) for start in range(0, length, tile)]


def _forward_tiles(forward, x: torch.Tensor, tile: int) -> torch.Tensor:
    """forward over x's sequence tiles, filled into one output: never the tiles and their concatenation at once."""
    out = None
    for start, end in _tiles(x.shape[1], tile):
        part = forward(x[:, start:end])
        if out is None:
            out = part.new_empty(part.shape[0], x.shape[1], *part.shape[2:])
        out[:, start:end] = part
    return out


class TiledMLPFunction(torch.autograd.Function):
    """out = cat_t forward(x[:, t]); backward recomputes each tile and returns the parameters' summed gradients."""

    @staticmethod
    def forward(ctx, forward, tile: int, x: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        ctx.forward, ctx.tile = forward, tile
        ctx.save_for_backward(x, *params)
        return _forward_tiles(forward, x, tile)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, *params = ctx.saved_tensors
        grad_x = torch.empty_like(x) if ctx.needs_input_grad[2] else None
        sums: list[torch.Tensor | None] = [None] * len(params)
        for start, end in _tiles(x.shape[1], ctx.tile):
            with torch.enable_grad():
                x_tile = x[:, start:end].detach().requires_grad_(grad_x is not None)
                out = ctx.forward(x_tile)
            inputs = ([x_tile] if grad_x is not None else []) + params
            grads = list(torch.autograd.grad(out, inputs, grad_out[:, start:end], allow_unused=True))
            if grad_x is not None:
                grad_x[:, start:end] = grads.pop(0)
            for i, grad in enumerate(grads):
                if grad is not None:
                    sums[i] = grad.float() if sums[i] is None else sums[i].add_(grad)
        grad_params = [None if s is None else s.to(p.dtype) for s, p in zip(sums, params)]
        return (None, None, grad_x, *grad_params)


def _tiled_forward(mlp: torch.nn.Module, forward, tile_size: int | None):
    def tiled(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        tokens = x.shape[1] if x.dim() == 3 else 0
        tile = tile_size if tile_size is not None else (AUTO_TILE_TOKENS if tokens > AUTO_MIN_TOKENS else 0)
        if args or kwargs or not tile or tokens <= tile:
            return forward(x, *args, **kwargs)
        if not torch.is_grad_enabled():  # e.g. the first forward of reentrant checkpointing: tiles, no backward
            return _forward_tiles(forward, x, tile)
        params = [p for p in mlp.parameters() if p.requires_grad]
        if any(hasattr(p, "ds_id") for p in params):
            raise ValueError(
                "context_parallel_mlp_tile_size: the MLP's parameters are partitioned by DeepSpeed ZeRO-3, whose "
                "gathering hooks do not run for a tile's recomputation; set context_parallel_mlp_tile_size=0."
            )
        return TiledMLPFunction.apply(forward, tile, x, *params)

    return tiled


def decoder_mlps(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The `mlp` modules of the model's decoder layers (transformers' naming for the feed-forward block)."""
    return [module.mlp for module in model.modules() if isinstance(getattr(module, "mlp", None), torch.nn.Module)]


def apply_tiled_mlp(model: torch.nn.Module, tile_size: int | None = None) -> torch.nn.Module:
    """Run every decoder layer's MLP tile by tile (`tile_size` tokens; None: auto). Idempotent."""
    mlps = decoder_mlps(model)
    if not mlps:
        raise ValueError(
            f"context_parallel_mlp_tile_size: {type(model).__name__} has no decoder `mlp` modules to tile; set "
            "context_parallel_mlp_tile_size=0."
        )
    for mlp in mlps:
        original = getattr(mlp, _FORWARD_ATTR, None) or mlp.forward
        setattr(mlp, _FORWARD_ATTR, original)
        mlp.forward = _tiled_forward(mlp, original, tile_size)
    return model


def remove_tiled_mlp(model: torch.nn.Module) -> torch.nn.Module:
    """Undo `apply_tiled_mlp`."""
    for mlp in decoder_mlps(model):
        if hasattr(mlp, _FORWARD_ATTR):
            del mlp.forward
            delattr(mlp, _FORWARD_ATTR)
    return model
