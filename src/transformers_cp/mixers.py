"""Sequence mixers other than attention (recurrences, short convolutions) under context parallelism, exact.

A packed row's documents are independent: every recurrence and convolution restarts at each document start, and the
meaning of a row is each document run alone through the stock model. `MIXERS` names transformers' own mixer classes
(no copy of their code); `install` replaces each one's forward by one of these exact forms (docs/hybrid.md):

- `GatheredMixer`, for every mixer, in every mode and layout: the mixer's input is all-gathered over the CP group into
  global order (`comm.AllGather`, whose backward sums the gradient over ranks and keeps this rank's slice), with
  the per-token arguments it takes; the stock mixer runs on each document that holds a position of this rank's shard,
  alone (no cache, no mask), from the document's start up to the last of those positions; the rank keeps its own
  positions: up to c× the layer's compute (docs/hybrid.md, cost per mode).
- `HaloMixer`, for mixers whose only look-back is a short convolution of k taps (LFM2's ShortConv): each chunk gets
  the k − 1 inputs before it from the rank that holds them, about 1× compute.
- State passing, each rank running the stock mixer on its own tokens (about 1× compute) with the convolution's halo
  and the recurrence's incoming state crossing ranks: `delta_rule` (gated delta rule, KDA), `mixers_mamba2` (Mamba2
  family), `mixers_mamba1` (Mamba1 family), `mixers_linear` (lightning attention, RG-LRU). Every mixer of `MIXERS`
  takes one of them but LFM2's short convolution (`HaloMixer`); `delta_rule.USE_STATE = False` turns off all but
  the Mamba2 family's.

Documents arrive as the `Documents` object the CP pre-forward hook builds for attention (`cp_documents`).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

from . import changes
from .comm import AllGather, all_gather
from .mesh import ContextParallelMesh
from .plan import Documents


@dataclass(frozen=True)
class Mixer:
    """A mixer class of transformers: the families that use it, what it computes, and whether the stock layer restarts
    at document starts in a packed row (`position_ids` restarting at 0, as `DataCollatorWithFlattening` gives them;
    measured by tests/test_hybrid.py on the torch path). Where it does not, the stock Trainer on packed rows is not a
    valid reference: the reference is each document run alone."""

    families: tuple[str, ...]
    computes: str
    stock_packed_exact: bool = False
    window: str | None = None  # the Conv1d submodule whose kernel is the only look-back of the mixer (HaloMixer)


_MAMBA2 = "Mamba2 SSM scan (scalar decay per head) after a short causal convolution"
_GDN = "gated delta rule after a short causal convolution"
MIXERS: dict[str, Mixer] = {
    "Qwen3NextGatedDeltaNet": Mixer(("qwen3_next",), _GDN),
    "Qwen3_5GatedDeltaNet": Mixer(("qwen3_5",), _GDN),
    "Qwen3_5MoeGatedDeltaNet": Mixer(("qwen3_5_moe",), _GDN),
    "OlmoHybridGatedDeltaNet": Mixer(("olmo_hybrid",), "gated delta rule after short causal convolutions"),
    "BailingHybridDeltaAttention": Mixer(("bailing_hybrid",), _GDN),
    "KimiLinearDeltaAttention": Mixer(("kimi_linear",), "Kimi delta attention (KDA) after short causal convolutions"),
    "NemotronHMamba2Mixer": Mixer(("nemotron_h",), _MAMBA2),
    "GraniteMoeHybridMambaLayer": Mixer(("granitemoehybrid",), _MAMBA2),
    "FalconH1Mixer": Mixer(("falcon_h1",), _MAMBA2),
    "BambaMixer": Mixer(("bamba",), _MAMBA2),
    "Zamba2MambaMixer": Mixer(("zamba2",), _MAMBA2),
    "Mamba2Mixer": Mixer(("mamba2",), _MAMBA2),
    "JambaMambaMixer": Mixer(("jamba",), "Mamba selective scan (diagonal decay) after a short causal convolution"),
    "ZambaMambaMixer": Mixer(("zamba",), "Mamba selective scan (diagonal decay) after a short causal convolution"),
    "MambaMixer": Mixer(("mamba",), "Mamba selective scan (diagonal decay) after a short causal convolution"),
    "FalconMambaMixer": Mixer(("falcon_mamba",), "Mamba selective scan (diagonal decay) after a short causal conv."),
    "Lfm2ShortConv": Mixer(("lfm2",), "gated short causal convolution", window="conv"),
    "Lfm2MoeShortConv": Mixer(("lfm2_moe",), "gated short causal convolution", window="conv"),
    "Lfm3ShortConv": Mixer(("lfm3",), "gated short causal convolution", window="conv"),
    "MiniMaxLightningAttention": Mixer(("minimax",), "lightning attention (linear attention, scalar decay per head)"),
    "RecurrentGemmaRecurrentBlock": Mixer(("recurrent_gemma",), "RG-LRU (diagonal decay) after a short causal conv."),
}
"""transformers' sequence mixers other than attention that `install` makes exact, by class name."""

NAME = "mixers"
_NOT_PER_CALL = ("cache", "cache_params", "past_key_values", "cache_position", "attention_mask")
"""Arguments a mixer gets from its layer that a document run alone does not take: caches, and the padding mask (a
packed row has none; the pre-forward hook refuses one)."""


def find_mixers(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """(name, module) of every module of `model` whose class is one of transformers' mixers in `MIXERS`."""
    return [
        (name, module)
        for name, module in model.named_modules()
        if type(module).__name__ in MIXERS and type(module).__module__.startswith("transformers.models.")
    ]


def check_mixers(model: torch.nn.Module) -> bool:
    """Whether `model` mixes tokens outside attention only through mixers of `MIXERS` (then its layer kinds and its
    attention, which these families route through transformers' AttentionInterface, need no other check). Raises,
    naming them, where it has other mixers: no exact context-parallel path exists for those. False for models
    without mixers, which the attention checks alone judge."""
    from .model_checks import sequence_mixers, unsupported

    found = [name for name, _ in find_mixers(model)]

    def covered(entry: str) -> bool:  # a found mixer, a module inside one, a layer holding one, or a per-token norm
        name, kind = entry[:-1].split(" (")
        return kind.endswith("Norm") or any(
            name == n or name.startswith(n + ".") or n.startswith(name + ".") for n in found
        )

    others = [entry for entry in sequence_mixers(model) if not covered(entry)]
    if others:
        more = f" and {len(others) - 3} more" if len(others) > 3 else ""
        raise unsupported(
            f"these sequence mixers ({', '.join(others[:3])}{more}): transformers_cp has no exact context-parallel "
            f"path for them (it has one for {', '.join(sorted({f for m in MIXERS.values() for f in m.families}))})",
            "use one of those families, or a model without other convolutions or recurrent / state-space / "
            "linear-attention layers.",
        )
    return bool(found)


class MixerDocuments:
    """The row's `Documents`, set by the model's pre-forward hook for the mixers of this forward."""

    current: Documents | None = None


def _per_token(value, local: int) -> bool:
    if isinstance(value, (tuple, list)):
        return bool(value) and all(_per_token(v, local) for v in value)
    return isinstance(value, torch.Tensor) and value.dim() >= 2 and value.shape[0] == 1 and value.shape[1] == local


class GatheredMixer:
    """The exact fallback forward of one mixer (see the module docstring)."""

    def __init__(self, module: torch.nn.Module, mesh: ContextParallelMesh, documents: MixerDocuments) -> None:
        self.original = module.forward
        self.signature = inspect.signature(self.original)
        named = [
            p.name
            for p in self.signature.parameters.values()
            if p.kind not in (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)
        ]
        self.hidden, self.rest = named[0], named[1:]
        self.mesh, self.documents = mesh, documents
        self.name = type(module).__name__

    def _order(self, docs: Documents, device: torch.device) -> torch.Tensor:
        """Rows of the rank-order gather, in global order."""
        layout, size = docs.layout(self.mesh.layout), self.mesh.cp_size  # the row's own (balanced) ranges

        def build():
            return torch.argsort(torch.cat([layout.index(docs.seq_len, r) for r in range(size)])).to(device)

        return docs.cached(("mixer_order", str(device)), build)

    def _global(self, value, docs: Documents):
        """A per-token (1, L, ...) argument of this rank's shard as the whole row in global order."""
        if isinstance(value, (tuple, list)):
            return type(value)(self._global(v, docs) for v in value)
        group = self.mesh.cp_group
        if value.requires_grad:
            rows = AllGather.apply(value[0], group)
        else:
            rows = all_gather(value[0], group).flatten(0, 1)
        return rows.index_select(0, self._order(docs, value.device))[None]

    def _split(self, args, kwargs) -> tuple[Documents, torch.Tensor, dict, dict]:
        """The row's documents, the mixer's input, its other per-token arguments and the fixed ones of a document
        run alone (no cache, no padding mask, no `use_cache`)."""
        arguments = self.signature.bind(*args, **kwargs).arguments
        x = arguments[self.hidden]
        docs = self.documents.current
        if docs is None:
            raise RuntimeError(
                f"{self.name} runs under context parallelism without the row's documents; call the model itself "
                "(its pre-forward hook reads them), not the mixer alone."
            )
        if x.shape[1] * self.mesh.cp_size != docs.seq_len:  # the documents are the last forward's (see `install`)
            raise RuntimeError(
                f"{self.name} got {x.shape[1]} tokens under context parallelism, but the last forward of the model "
                f"was a row of {docs.seq_len} tokens over {self.mesh.cp_size} ranks; call the model itself, not the "
                "mixer alone."
            )
        if x.shape[0] != 1:
            raise ValueError(
                f"context parallelism takes one packed row per step, got a batch of {x.shape[0]} in {self.name}; "
                "flatten the batch into one row (transformers_cp's collator does)."
            )
        per_token, fixed = {}, {}
        for name in self.rest:
            value = arguments.get(name)
            if name in _NOT_PER_CALL:
                fixed[name] = None
            elif name == "use_cache":
                fixed[name] = False
            elif _per_token(value, x.shape[1]):
                per_token[name] = value
            elif name in arguments:
                fixed[name] = value
        return docs, x, per_token, fixed

    def _run(self, call: dict, fixed: dict):
        """The stock mixer on one piece of one document: its output, and what else it returned (a tuple's rest)."""
        out = self.original(**call, **fixed)
        return (out[0], out[1:]) if isinstance(out, tuple) else (out, None)

    def __call__(self, *args, **kwargs):
        docs, x, per_token, fixed = self._split(args, kwargs)
        rows = {self.hidden: self._global(x, docs), **{k: self._global(v, docs) for k, v in per_token.items()}}
        mine = docs.layout(self.mesh.layout).ranges(docs.seq_len, self.mesh.cp_rank)
        outputs, extra = {}, None
        for start, end in zip(docs.bounds, docs.bounds[1:]):
            reach = max((min(b, end) for a, b in mine if a < end and b > start), default=None)
            if reach is not None:  # the document holds positions of this shard: run it up to the last of them
                outputs[start], extra = self._run({k: _rows(v, start, reach) for k, v in rows.items()}, fixed)
        pieces = []
        for a, b in mine:
            for start, end in zip(docs.bounds, docs.bounds[1:]):
                if start < b and end > a:
                    pieces.append(outputs[start][:, max(a, start) - start : min(b, end) - start])
        out = torch.cat(pieces, dim=1)
        return out if extra is None else (out, *extra)


class HaloMixer(GatheredMixer):
    """The forward of a mixer whose output at a position depends only on the `window` inputs ending there (a short
    causal convolution with per-token projections around it, LFM2's): each chunk of the layout receives the
    window − 1 inputs that precede it in global order from the rank holding them (one all-gather of every chunk's
    last window − 1 rows; the backward sums their gradients back to their owners), and the stock mixer runs on
    each document piece of the chunk with the preceding inputs of the same document in front. Compute about 1×,
    traffic (window − 1) × chunks × hidden per rank. Chunks shorter than window − 1 take the gathered fallback."""

    def __init__(self, module: torch.nn.Module, mesh: ContextParallelMesh, documents: MixerDocuments, window: int):
        super().__init__(module, mesh, documents)
        self.halo = window - 1

    def __call__(self, *args, **kwargs):
        docs, x, per_token, fixed = self._split(args, kwargs)
        layout, k = docs.layout(self.mesh.layout), self.halo
        every = [layout.ranges(docs.seq_len, r) for r in range(self.mesh.cp_size)]
        mine = every[self.mesh.cp_rank]
        # decided alike on every rank (balanced rows give ranks chunks of other lengths and counts)
        if per_token or k == 0 or any(b - a < k for c in every for a, b in c) or len({len(c) for c in every}) > 1:
            return super().__call__(*args, **kwargs)
        offsets = [0]
        for a, b in mine:
            offsets.append(offsets[-1] + b - a)
        tails = torch.cat([x[0, off - k : off] for off in offsets[1:]])  # each chunk's last k rows
        gathered = AllGather.apply(tails, self.mesh.cp_group)  # rank order, then chunk order
        ends = [b for r in range(self.mesh.cp_size) for _, b in layout.ranges(docs.seq_len, r)]
        pieces, extra = [], None
        for (a, b), off in zip(mine, offsets):
            rows, first = x[:, off : off + b - a], a
            if a > 0:  # the k inputs before the chunk, from the chunk that ends at a
                i = ends.index(a)
                rows, first = torch.cat([gathered[None, i * k : (i + 1) * k], rows], dim=1), a - k
            for start, end in zip(docs.bounds, docs.bounds[1:]):
                if start < b and end > a:
                    lo, hi = max(start, first), min(end, b)
                    out, extra = self._run({self.hidden: rows[:, lo - first : hi - first]}, fixed)
                    pieces.append(out[:, max(a, start) - lo :])
        # every rank's gather must reach the backward (its reduce-scatter is a collective), used or not
        out = torch.cat(pieces, dim=1) + 0 * gathered.sum()
        return out if extra is None else (out, *extra)


def _rows(value, start: int, end: int):
    if isinstance(value, (tuple, list)):
        return type(value)(_rows(v, start, end) for v in value)
    return value[:, start:end]


def install(model: torch.nn.Module, mesh: ContextParallelMesh) -> None:
    """Replace the forward of every mixer of `MIXERS` in `model` by its exact CP form (removed with CP). Its stage
    runs after CP's (`changes.STAGES`) and hands the mixers that forward's documents; they stay until the next forward,
    as a checkpointed layer's mixer runs again in backward, outside the model's forward."""
    from . import mixers_linear, mixers_mamba2  # they build on GatheredMixer

    if mesh.cp_group is None:
        return
    found = find_mixers(model)
    if not found:
        return
    documents = MixerDocuments()

    def begin(module, args, kwargs):
        documents.current = kwargs.get("cp_documents")

    change = changes.install(model, NAME, pre=begin, depends_on="context_parallel")
    from . import delta_rule, mixers_mamba1

    for _, module in found:
        window = MIXERS[type(module).__name__].window
        if type(module).__name__ in mixers_mamba2.CLASSES:
            mixers_mamba2.install(change, module, mesh, documents)
        elif mixers_linear.fits(module):
            mixers_linear.install(change, module, mesh, documents)
        elif delta_rule.fits(module):
            delta_rule.install(change, module, mesh, documents)
        elif mixers_mamba1.fits(module):
            mixers_mamba1.install(change, module, mesh, documents)
        elif window is None:
            change.replace_forward(module, GatheredMixer(module, mesh, documents))
        else:
            change.replace_forward(module, HaloMixer(module, mesh, documents, getattr(module, window).kernel_size[0]))
