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

Submodules inside the MLP that transformers' output recorders watch (the router of an MoE block, whose logits the
model's load-balancing loss reads) would record once per tile, and without gradient inside the autograd Function. So
the tiles run under a private collector; what they record is joined over the tiles into one tensor per call, returned
by the Function as extra outputs (backward takes their gradients into each tile's recomputation), and recorded once
in the model's outputs, as without tiling: the aux loss sees the same values and trains the router the same way.
"""

from __future__ import annotations

import torch

from . import changes

# Auto tiling: tiles of this many tokens, used when a micro-batch holds more than AUTO_MIN_TOKENS tokens.
AUTO_TILE_TOKENS = 8192
AUTO_MIN_TOKENS = 32768
NAME = "tiled_mlp"


def _tiles(length: int, tile: int) -> list[tuple[int, int]]:
    return [(start, min(start + tile, length)) for start in range(0, length, tile)]


def _collector():
    """transformers' active output collector (the lists its output recorders append to in this forward), or None."""
    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError:  # a transformers without output recorders records nothing inside the MLP
        return None
    return _active_collector


def _join(parts: list[torch.Tensor], batch: int, lengths: list[int]) -> torch.Tensor:
    """One recorded output of the whole sequence from the tiles' (B, t, ...) or flattened (B·t, ...) ones."""
    first = parts[0]
    if first.dim() >= 2 and tuple(first.shape[:2]) == (batch, lengths[0]):
        return torch.cat(parts, dim=1)
    if first.shape[0] == batch * lengths[0]:
        joined = torch.cat([p.reshape(batch, n, *p.shape[1:]) for p, n in zip(parts, lengths)], dim=1)
        return joined.reshape(batch * sum(lengths), *first.shape[1:])
    raise ValueError(
        f"context_parallel_mlp_tile_size: the MLP records an output of shape {tuple(first.shape)} (an output recorder "
        "of the model, e.g. router logits) that does not follow its tokens, so its tiles cannot be joined; set "
        "context_parallel_mlp_tile_size=0."
    )


def _split(whole: torch.Tensor, like: torch.Tensor, batch: int, seq: int, start: int, end: int) -> torch.Tensor:
    """Inverse of `_join` for the tile [start, end): its part of a whole-sequence recorded output."""
    if like.dim() >= 2 and tuple(like.shape[:2]) == (batch, end - start):
        return whole[:, start:end]
    return whole.reshape(batch, seq, *whole.shape[1:])[:, start:end].reshape(like.shape)


class _Recording:
    """Runs a forward under a private collector with the keys of the active one: what the model's output recorders
    record inside the MLP (router logits of MoE blocks) is kept per call instead of going to the model's outputs.
    An MLP that returns a tuple (gpt-oss's MoE block: its output and its router scores) has its other outputs joined
    over the tiles the same way, ahead of the recorded ones; `extra` counts them (None: the MLP returns a tensor)."""

    def __init__(self, keys: tuple[str, ...]) -> None:
        self.keys = keys
        self.order: list[str] = []  # the key of each output recorded in a tile, in recording order
        self.extra: int | None = None

    def __call__(self, forward, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        collector = _collector() if self.keys else None
        private = {key: [] for key in self.keys}
        token = collector.set(private) if collector is not None else None
        try:
            out = forward(x)
        finally:
            if token is not None:
                collector.reset(token)
        extra = list(out[1:]) if isinstance(out, tuple) else None
        order = [key for key in self.keys for _ in private[key]]
        if (self.order and order != self.order) or (self.extra is not None and len(extra or ()) != self.extra):
            raise ValueError(
                "context_parallel_mlp_tile_size: the MLP records or returns different outputs in different tiles; set "
                "context_parallel_mlp_tile_size=0."
            )
        self.order, self.extra = order, None if extra is None else len(extra)
        return (out if extra is None else out[0]), (extra or []) + [t for key in self.keys for t in private[key]]


def _recording() -> _Recording:
    collector = _collector()
    active = collector.get() if collector is not None else None
    return _Recording(tuple(k for k, v in (active or {}).items() if isinstance(v, list)))


def _forward_tiles(forward, x: torch.Tensor, tile: int, record: _Recording) -> tuple[torch.Tensor, list]:
    """forward over x's sequence tiles, filled into one output (never the tiles and their concatenation at once), and
    each recorded output joined over the tiles."""
    out, recorded, flat = None, [], False
    batch, spans = x.shape[0], _tiles(x.shape[1], tile)
    for start, end in spans:
        part, parts = record(forward, x[:, start:end])
        if out is None:  # (B, t, ...), or flattened (B·t, ...) as Llama 4's MoE block returns it
            flat = not (part.dim() >= 2 and tuple(part.shape[:2]) == (batch, end - start))
            rest = part.shape[1:] if flat else part.shape[2:]
            out = part.new_empty(batch, x.shape[1], *rest)
            recorded = [[] for _ in parts]
        out[:, start:end] = part.reshape(batch, end - start, *out.shape[2:]) if flat else part
        for i, p in enumerate(parts):
            recorded[i].append(p)
    lengths = [end - start for start, end in spans]
    out = out.flatten(0, 1) if flat else out
    return out, [_join(parts, batch, lengths) for parts in recorded]


class TiledMLPFunction(torch.autograd.Function):
    """out = cat_t forward(x[:, t]), and the MLP's other outputs and those the model records inside it (router logits)
    joined over the tiles; backward recomputes each tile and returns the parameters' summed gradients."""

    @staticmethod
    def forward(ctx, forward, tile: int, record: _Recording, x: torch.Tensor, *params: torch.Tensor):
        ctx.forward, ctx.tile, ctx.record = forward, tile, record
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x, *params)
        out, recorded = _forward_tiles(forward, x, tile, record)
        ctx.mark_non_differentiable(*[t for t in recorded if not t.is_floating_point()])
        return (out, *recorded)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor | None, *grad_recorded: torch.Tensor | None):
        x, *params = ctx.saved_tensors
        grad_x = torch.empty_like(x) if ctx.needs_input_grad[3] else None
        sums: list[torch.Tensor | None] = [None] * len(params)
        batch, seq = x.shape[0], x.shape[1]
        for start, end in _tiles(seq, ctx.tile):
            with torch.enable_grad():
                x_tile = x[:, start:end].detach().requires_grad_(grad_x is not None)
                out, parts = ctx.record(ctx.forward, x_tile)
            outputs, grads_in = [], []
            if grad_out is not None:
                outputs.append(out)
                grads_in.append(_split(grad_out, out, batch, seq, start, end))
            for part, grad in zip(parts, grad_recorded):
                if grad is not None and part.requires_grad:
                    outputs.append(part)
                    grads_in.append(_split(grad, part, batch, seq, start, end))
            inputs = ([x_tile] if grad_x is not None else []) + params
            if outputs:
                grads = list(torch.autograd.grad(outputs, inputs, grads_in, allow_unused=True))
            else:
                grads = [None] * len(inputs)
            if grad_x is not None:
                grad = grads.pop(0)
                grad_x[:, start:end] = 0 if grad is None else grad
            for i, grad in enumerate(grads):
                if grad is not None:
                    sums[i] = grad.float() if sums[i] is None else sums[i].add_(grad)
        grad_params = [None if s is None else s.to(p.dtype) for s, p in zip(sums, params)]
        return (None, None, None, grad_x, *grad_params)


def _tiled_forward(mlp: torch.nn.Module, forward, tile_size: int | None):
    def tiled(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        tokens = x.shape[1] if x.dim() == 3 else 0
        tile = tile_size if tile_size is not None else (AUTO_TILE_TOKENS if tokens > AUTO_MIN_TOKENS else 0)
        if args or kwargs or not tile or tokens <= tile:
            return forward(x, *args, **kwargs)
        record = _recording()
        if not torch.is_grad_enabled():  # e.g. the first forward of reentrant checkpointing: tiles, no backward
            out, recorded = _forward_tiles(forward, x, tile, record)
        else:
            params = [p for p in mlp.parameters() if p.requires_grad]
            if any(hasattr(p, "ds_id") for p in params):
                raise ValueError(
                    "context_parallel_mlp_tile_size: the MLP's parameters are partitioned by DeepSpeed ZeRO-3, whose "
                    "gathering hooks do not run for a tile's recomputation; set context_parallel_mlp_tile_size=0."
                )
            out, *recorded = TiledMLPFunction.apply(forward, tile, record, x, *params)
        extra, recorded = recorded[: record.extra or 0], recorded[record.extra or 0 :]
        # Recorded once per MLP call, over the whole sequence, with the gradient path through the Function.
        if recorded:
            active = _collector().get()
            for key, tensor in zip(record.order, recorded):
                active[key].append(tensor)
        return out if record.extra is None else (out, *extra)

    tiled.tiles = forward  # what it tiles (`_untiled_forward`)
    return tiled


def _untiled_forward(mlp: torch.nn.Module):
    """The forward to tile: the one the tiled forward on `mlp` tiles, or whatever forward `mlp` has now when that is
    not a tiled one (none yet, or another library set its own since: Liger's SwiGLU when training starts)."""
    current = vars(mlp).get("forward")
    return getattr(current, "tiles", None) or mlp.forward


MLP_NAMES = ("mlp", "feed_forward")
"""transformers' names for a decoder layer's feed-forward block (`feed_forward`: Llama 4 and a few others)."""


def decoder_mlps(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The feed-forward blocks of the model's decoder layers."""
    return [
        block
        for module in model.modules()
        for block in (getattr(module, name, None) for name in MLP_NAMES)
        if isinstance(block, torch.nn.Module)
    ]


def apply_tiled_mlp(model: torch.nn.Module, tile_size: int | None = None) -> torch.nn.Module:
    """Run every decoder layer's MLP tile by tile (`tile_size` tokens; None: auto). Idempotent; called again after
    another library replaced some MLP forwards (`liger.KeepTiledMLPUnderLiger`), it tiles those, which then stay when
    the tiling comes off."""
    mlps = decoder_mlps(model)
    if not mlps:
        raise ValueError(
            f"context_parallel_mlp_tile_size: {type(model).__name__} has no decoder `mlp` / `feed_forward` modules to "
            "tile; set context_parallel_mlp_tile_size=0."
        )
    inner = [_untiled_forward(mlp) for mlp in mlps]
    change = changes.install(model, NAME)  # a second call replaces the first
    for mlp, forward in zip(mlps, inner):
        if vars(mlp).get("forward") is not forward and getattr(forward, "__func__", None) is not type(mlp).forward:
            mlp.forward = forward  # another library's forward, put back where removing the first call took it off
        change.replace_forward(mlp, _tiled_forward(mlp, forward, tile_size))
    return model


def remove_tiled_mlp(model: torch.nn.Module) -> torch.nn.Module:
    """Undo `apply_tiled_mlp` (a forward another library set on the MLPs before it was applied, such as Liger's,
    stays)."""
    changes.remove(model, NAME)
    return model
