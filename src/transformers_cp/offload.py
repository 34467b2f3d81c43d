"""Activation offload: under activation checkpointing, each decoder layer's input lives in host memory between the
layer's forward and its recomputation in backward.

With checkpointing, a layer's input (tokens × hidden) is all that is kept of it until backward: 28 layers × 1.5 GB for
500k tokens of the 1.5B shape. Only these checkpoint boundaries move (unlike `torch.autograd.graph.save_on_cpu`,
which moves every saved tensor): after layer i's forward its input is copied to pinned host memory on a side CUDA
stream, and its device memory is released once layer i+1 has run (the copy overlaps that layer's compute). In
backward, when layer i recomputes, its input is back (it was prefetched while layer i+1 recomputed) and layer i-1's
input starts coming back. The last layer's input is never moved: it is needed first. Only checkpointed layers take
part: under partial recomputation (`recompute`) the layers that keep their activations keep their input on the device
too, and the chain runs over the checkpointed ones.

With context parallelism, the first forward also keeps each attention's output for the recomputation
(`algorithms.reuse`), as large as the layer input; `attention_outputs=True` moves those too, in the same chain: in
backward, layer i's input, then its attention output, then layer i-1's input come back one after the other, each
while the previous one is in use.

Tensors are moved storage to storage, so the tensor objects that checkpointing holds keep their identity and version
counters; the data are bit-identical, so training is exact. On CPU the same steps run as plain copies.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from . import changes
from .algorithms.reuse import in_backward
from .recompute import checkpointable_layers, is_checkpointed

NAME = "offload"


@dataclass
class _Record:
    tensor: torch.Tensor  # the layer input whose storage moves
    host: torch.Tensor  # uint8 buffer of the storage's size (pinned on CUDA)
    copied: torch.cuda.Event | None = None  # device → host done (None on CPU)
    fetched: torch.cuda.Event | None = None  # host → device issued, done when this fires
    on_device: bool = True


@dataclass
class ActivationOffloader:
    """Moves checkpointed layer inputs to host memory and back, overlapped with compute on CUDA."""

    records: dict = field(default_factory=dict)  # layer → _Record, this forward
    order: list = field(default_factory=list)  # layers in forward order
    pool: dict = field(default_factory=dict)  # nbytes → free host buffers, reused across steps
    active: bool = False
    moved_bytes: int = 0  # device → host, since the offloader was installed (a diagnostic)
    _stream: torch.cuda.Stream | None = None

    def stream(self, device: torch.device) -> torch.cuda.Stream:
        if self._stream is None:
            self._stream = torch.cuda.Stream(device)
        return self._stream

    def begin_forward(self, active: bool) -> None:
        """A new forward: whatever an earlier forward left on the host comes back first (its backward never ran)."""
        for layer in list(self.order):
            self.restore(layer, prefetch=False)
        self.records.clear()
        self.order.clear()
        self.active = active

    def _host_buffer(self, nbytes: int, pin: bool) -> torch.Tensor:
        free = self.pool.get(nbytes)
        if free:
            return free.pop()
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin)

    def offload(self, layer: torch.nn.Module, tensor: torch.Tensor) -> None:
        """After `layer`'s forward: start copying its input out; release the previous layer's input."""
        storage = tensor.untyped_storage()
        if (
            tensor.storage_offset() != 0
            or not tensor.is_contiguous()
            or storage.nbytes() != tensor.numel() * tensor.element_size()
        ):
            return  # a view into a larger storage: releasing it would release its neighbours too
        cuda = tensor.is_cuda
        record = _Record(tensor, self._host_buffer(storage.nbytes(), pin=cuda))
        if cuda:
            side = self.stream(tensor.device)
            side.wait_stream(torch.cuda.current_stream(tensor.device))
            with torch.cuda.stream(side):
                record.host.untyped_storage().copy_(storage, non_blocking=True)
                record.copied = torch.cuda.Event()
                record.copied.record(side)
        else:
            record.host.untyped_storage().copy_(storage)
        self.moved_bytes += storage.nbytes()
        if self.order:
            self._release(self.records[self.order[-1]])
        self.records[layer] = record
        self.order.append(layer)

    def _release(self, record: _Record) -> None:
        if record.copied is not None:  # the compute stream may reuse the memory only after the copy read it
            torch.cuda.current_stream(record.tensor.device).wait_event(record.copied)
        record.tensor.untyped_storage().resize_(0)
        record.on_device = False

    def _fetch(self, record: _Record) -> None:
        storage = record.tensor.untyped_storage()
        storage.resize_(record.host.numel())
        if record.tensor.is_cuda:
            side = self.stream(record.tensor.device)
            side.wait_stream(torch.cuda.current_stream(record.tensor.device))  # the allocation comes first
            with torch.cuda.stream(side):
                storage.copy_(record.host.untyped_storage(), non_blocking=True)
                record.fetched = torch.cuda.Event()
                record.fetched.record(side)
        else:
            storage.copy_(record.host.untyped_storage())
        record.on_device = True

    def restore(self, layer: torch.nn.Module, prefetch: bool = True) -> None:
        """Before `layer` recomputes: its input is on the device; the previous layer's input starts coming back."""
        record = self.records.pop(layer, None)
        if record is None:
            return
        index = self.order.index(layer)
        self.order.pop(index)
        if not record.on_device:
            self._fetch(record)
        if record.fetched is not None:
            torch.cuda.current_stream(record.tensor.device).wait_event(record.fetched)
        if record.copied is not None:  # the host buffer is free once its copy out finished
            record.copied.synchronize()
        self.pool.setdefault(record.host.numel(), []).append(record.host)
        if prefetch and index > 0:
            previous = self.records[self.order[index - 1]]
            if not previous.on_device:
                self._fetch(previous)


class KeptAttentionOutputs:
    """Watches the model's store of kept attention results (`changes.KeptOutputs`, CP's (out, lse) per attention
    module): `out` is in host memory from when it is kept until its recomputation takes it."""

    def __init__(self, offloader: ActivationOffloader) -> None:
        self.offloader = offloader

    def kept(self, key: object, value) -> None:
        # One (out, lse), or a list of them (Ulysses keeps one per pipeline stage); several stay on the device.
        pairs = value if isinstance(value, list) else [value]
        if self.offloader.active and len(pairs) == 1:
            self.offloader.offload(key, pairs[0][0])

    def taking(self, key: object) -> None:
        self.offloader.restore(key)


def _first_grad_fn(output) -> torch.autograd.graph.Node | None:
    tensors = output if isinstance(output, (tuple, list)) else (output,)
    return next((t.grad_fn for t in tensors if isinstance(t, torch.Tensor) and t.grad_fn is not None), None)


def _layer_forward(layer: torch.nn.Module, forward, offloader: ActivationOffloader):
    """`layer.forward` with its input offloaded. transformers checkpoints either around this forward (the input comes
    back when backward reaches the layer's output) or inside it (the recomputation calls it again, in backward)."""

    def offloaded(hidden_states: torch.Tensor, *args, **kwargs):
        if not offloader.active or not is_checkpointed(layer):  # a layer that keeps its activations keeps its input
            return forward(hidden_states, *args, **kwargs)
        if in_backward():  # checkpointed inside: this is the recomputation
            offloader.restore(layer)
            return forward(hidden_states, *args, **kwargs)
        out = forward(hidden_states, *args, **kwargs)
        grad_fn = _first_grad_fn(out)
        if grad_fn is not None:  # runs before any of the layer's backward, so before its recomputation
            grad_fn.register_prehook(lambda grad_outputs: offloader.restore(layer))
        offloader.offload(layer, hidden_states)
        return out

    return offloaded


def apply_activation_offload(model: torch.nn.Module, attention_outputs: bool = False) -> torch.nn.Module:
    """Offload the checkpointed decoder-layer inputs of `model` (and, with `attention_outputs`, the attention outputs
    that context parallelism keeps for the recomputation) to host memory while training with activation
    checkpointing (a no-op otherwise). Idempotent; undone by `remove_activation_offload`."""
    if changes.installed(model, NAME):
        return model
    layers = checkpointable_layers(model)
    if not layers:
        raise ValueError(
            f"context_parallel_offload_activations: {type(model).__name__} has no checkpointable decoder layers "
            "(transformers' GradientCheckpointingLayer); set context_parallel_offload_activations=False."
        )
    offloader = ActivationOffloader()

    def pre_forward(module, args, kwargs):
        checkpointing = any(is_checkpointed(layer) for layer in layers)
        wants_hidden = kwargs.get("output_hidden_states") or getattr(
            getattr(module, "config", None), "output_hidden_states", False
        )
        offloader.begin_forward(checkpointing and torch.is_grad_enabled() and not wants_hidden)

    watcher = KeptAttentionOutputs(offloader) if attention_outputs else None

    def undo() -> None:
        offloader.begin_forward(False)
        if watcher is not None:
            changes.kept_outputs(model).watchers.remove(watcher)

    change = changes.install(model, NAME, state=offloader, pre=pre_forward, undo=undo)
    for layer in layers:
        change.replace_forward(layer, _layer_forward(layer, layer.forward, offloader))
    if watcher is not None:  # CP's kept attention outputs, whenever CP is applied (before or after this)
        changes.kept_outputs(model).watchers.append(watcher)
    return model


def activation_offloader(model: torch.nn.Module) -> ActivationOffloader | None:
    """The offloader `apply_activation_offload` installed on `model`, or None."""
    return changes.state(model, NAME)


def remove_activation_offload(model: torch.nn.Module) -> torch.nn.Module:
    changes.remove(model, NAME)
    return model
