"""State passing for the delta-rule mixers (the gated delta rule of Qwen3-Next, Qwen3.5, Qwen3.5-MoE and OLMo hybrid;
Kimi delta attention of Kimi-Linear and Bailing hybrid) under context parallelism: each rank runs the mixer on its own
tokens only (about 1× compute), exact (docs/hybrid.md).

The mixer's forward is transformers' own; it calls two module-level kernel functions of its model's module,
`causal_conv1d_fn` (the short causal convolution) and the recurrence's chunked kernel (`CLASSES`; fla's when
installed). While a CP model's mixer runs (`StateMixer`), dispatchers installed in that module's namespace give
those calls their CP form; at any other time they call the original function.

- Convolution (k taps): every chunk of the layout sends its last k − 1 inputs to every rank (one all-gather); the
  kernel runs once on the shard's document pieces, each with the k − 1 inputs before it in front: those of the same
  document in global order (from the gather), zeros before a document start. The gather's backward sends the
  halo's gradient to its owner.
- Delta rule, S_t = g_t (I − β_t k_t k_tᵀ) S_{t−1} + β_t k_t v_tᵀ, o_t = S_tᵀ q_t: affine in (S, v). A piece that
  continues a document from an earlier chunk runs once with values [v | 0] from the state [0 | I]: its first dv output
  columns are the output from a zero state, the last dk are w_t = A_tᵀ q_t (A_t the product of its transitions so
  far), and its final state is [B | A]. The other pieces (documents starting in the shard) run from zero. Every
  chunk's final [B | A] (A = 0 where its last piece starts a document) is all-gathered; each continuing piece
  composes its incoming state S_in = A S + B over the chunks of its document in global order and adds S_inᵀ w_t to
  its output. The gather's backward sums the states' gradients back to their owners. Kimi delta attention decays
  per key channel (S_t = (I − β_t k_t k_tᵀ) diag(α_t) S_{t−1} + β_t k_t v_tᵀ): affine alike, the same scheme.

On transformers' torch path (flash-linear-attention absent) the recurrence's kernel runs over pieces of whole chunks,
each from the state the one before left (`in_pieces`): that path's backward grows with its call's length squared.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from . import changes
from .chunk_states import call_in_pieces
from .comm import AllGather
from .mesh import ContextParallelMesh
from .mixers import GatheredMixer, MixerDocuments
from .plan import Documents

CONV = "causal_conv1d_fn"
_GATED_DELTA, _KDA = "torch_chunk_gated_delta_rule", "chunk_kimi_delta_attention"
CLASSES = {
    "Qwen3NextGatedDeltaNet": _GATED_DELTA,
    "Qwen3_5GatedDeltaNet": _GATED_DELTA,
    "Qwen3_5MoeGatedDeltaNet": _GATED_DELTA,
    "OlmoHybridGatedDeltaNet": _GATED_DELTA,
    "KimiLinearDeltaAttention": _KDA,
    "BailingHybridDeltaAttention": _KDA,
}
"""transformers' mixers whose forward reaches the sequence only through `CONV` and their recurrence's chunked kernel
function, once each (`StateMixer` checks that it did): the gated delta rule (a scalar decay per head) or Kimi delta
attention (a decay per key channel; affine in (S, v) alike)."""
USE_STATE = True
"""Whether `mixers.install` gives these mixers, and the Mamba1 family (`mixers_mamba1`), the state-passing form (else
the gathered one: benchmarks compare)."""
PIECE_BYTES = 16 << 20
"""transformers' torch path of the chunked delta rule takes one chunk of its whole-call tensors per step of its scan
(`x[:, :, i]`, `out[:, :, i] = ...`), and the backward of each such index writes a tensor of the whole call: about
five of them per chunk, so its backward grows with the call's length squared (one H200 step of a Qwen3-Next-shaped
1.6B: 28.5 s at 32k tokens per rank, 85 s at 64k). `in_pieces` calls it over pieces of whole chunks whose values
take at most these bytes in float32 (2,048 tokens at 16 heads of 128): each step then writes that much, about the
work of the step itself; smaller pieces cost more calls (benchmarks/delta_rule_pieces.py)."""


def fits(module: torch.nn.Module) -> bool:
    """Whether `module` takes the state-passing form: one of `CLASSES`, in a module that names both kernel functions."""
    namespace = sys.modules.get(type(module).__module__)
    return (
        USE_STATE
        and type(module).__name__ in CLASSES
        and all(callable(getattr(namespace, name, None)) for name in (CONV, CLASSES[type(module).__name__]))
    )


@dataclass(frozen=True)
class Piece:
    """One document's part of one chunk of this rank's shard."""

    rows: tuple[int, int]  # rows of the shard
    chunk: int  # index of its chunk among this rank's
    start: int  # global position of its first token
    continues: bool  # its document started before the chunk
    last: bool  # the chunk's last piece (its final state leaves the chunk)
    chain: tuple[int, ...] = ()  # continuing: the gathered slots of the earlier chunks of its document, in order


@dataclass(frozen=True)
class Plan:
    """Where this rank's pieces sit in the row, and where their look-back comes from (host side, once per row)."""

    pieces: tuple[Piece, ...]
    firsts: tuple[int, ...]  # the first row of each chunk of this rank in the shard
    slots: int  # chunks per rank in the gathers (the most any rank holds)
    where: dict  # global end of a chunk -> (its gathered slot, its global start)
    doc_start: dict  # row of a continuing piece -> its document's global start
    halos: dict = field(default_factory=dict, compare=False)  # (k, device) -> `halo`'s index tensors

    @classmethod
    def build(cls, docs: Documents, mesh: ContextParallelMesh) -> Plan:
        layout = docs.layout(mesh.layout)
        ranges = [layout.ranges(docs.seq_len, r) for r in range(mesh.cp_size)]
        slots = max(len(r) for r in ranges)
        where = {b: (rank * slots + s, a) for rank, rs in enumerate(ranges) for s, (a, b) in enumerate(rs)}
        pieces, firsts, doc_start, row = [], [], {}, 0
        for index, (a, b) in enumerate(ranges[mesh.cp_rank]):
            firsts.append(row)
            pos = a
            while pos < b:
                start, end = docs.span(pos)
                end = min(end, b)
                continues = start < pos
                chain: list[int] = []
                if continues:  # back over the earlier chunks to the one where the document starts
                    at = pos
                    while True:
                        slot, first = where[at]
                        chain.append(slot)
                        if first <= start:
                            break
                        at = first
                    doc_start[row] = start
                pieces.append(Piece((row, row + end - pos), index, pos, continues, end == b, tuple(reversed(chain))))
                row += end - pos
                pos = end
        return cls(tuple(pieces), tuple(firsts), slots, where, doc_start)

    def halo(self, k: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Index tensors of the convolution's look-back of k rows (`halo_conv`): the rows of [shard, zero row] that each
        chunk sends (its last k); the rows of [shard, zero row, gathered rows] that make the kernel's input (every
        piece after its k look-back rows); the kernel's output rows kept."""
        if (k, device) not in self.halos:
            self.halos[k, device] = self._halo(k, device)
        return self.halos[k, device]

    def _halo(self, k: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        local = self.pieces[-1].rows[1]
        zero = local
        send = []
        for first, last in zip(self.firsts, (*self.firsts[1:], local)):
            send += [r if r >= first else zero for r in range(last - k, last)]
        send += [zero] * (k * (self.slots - len(self.firsts)))
        order, keep = [], []
        for piece in self.pieces:
            for p in range(piece.start - k, piece.start):  # global positions of the look-back
                if piece.continues and p >= self.doc_start[piece.rows[0]]:
                    end = min(e for e in self.where if e > p)
                    slot, _ = self.where[end]
                    order.append(local + 1 + slot * k + k - (end - p))
                else:
                    order.append(zero)
            keep += range(len(order), len(order) + piece.rows[1] - piece.rows[0])
            order += range(*piece.rows)
        return tuple(torch.tensor(t, device=device) for t in (send, order, keep))


class _Active:
    """The plan of the CP mixer running now (None outside one): what the dispatchers act on, and what they ran."""

    plan: Plan | None = None
    group = None
    ran: list[str] = []


class _Dispatch:
    """A kernel function of a model's module: its CP form while a CP mixer runs, the original otherwise."""

    def __init__(self, name: str, original: Callable, cp_form: Callable) -> None:
        self.name, self.original, self.cp_form, self.users = name, original, cp_form, 0

    def __call__(self, *args, **kwargs):
        if _Active.plan is None:
            return self.original(*args, **kwargs)
        _Active.ran.append(self.name)
        return self.cp_form(self.original, _Active.plan, _Active.group, *args, **kwargs)


def halo_conv(original, plan: Plan, group, x, weight, bias=None, activation=None, **kwargs):
    """The causal convolution of x (1, channels, rows of the shard) with each piece's k − 1 look-back in front."""
    k = weight.shape[-1] - 1
    if k == 0:
        return original(x, weight, bias, activation=activation)
    send, order, keep = plan.halo(k, x.device)
    rows = torch.cat([x[0].T, x.new_zeros(1, x.shape[1])])  # the shard's rows and a zero row
    tails = AllGather.apply(rows.index_select(0, send), group)  # rank order, chunk order, k rows each
    source = torch.cat([rows, tails]).index_select(0, order)
    out = original(source.T[None].contiguous(), weight, bias, activation=activation)
    # every rank's gather must reach the backward (its reduce-scatter is a collective), used or not
    return out.index_select(2, keep) + 0 * tails.sum()


@functools.cache
def _fla() -> bool:
    """Whether flash-linear-attention is installed: transformers' kernel functions then take its kernels."""
    return importlib.util.find_spec("fla") is not None


@functools.cache
def in_pieces(kernel: Callable) -> Callable:
    """`kernel`, a chunked delta rule of transformers ((batch, L, heads, dim) tensors, `g`, `beta`, `initial_state`,
    `output_final_state`, `chunk_size`), called over pieces of whole chunks (`PIECE_BYTES`), each entering with the
    state the one before left: the same recurrence, with a backward linear in the length. flash-linear-attention's
    kernels and a kernel without `chunk_size` are called whole."""
    chunk = inspect.signature(kernel).parameters.get("chunk_size")
    if _fla() or chunk is None:
        return kernel
    return functools.partial(_pieces, kernel, chunk.default)


def _pieces(kernel, chunk: int, query, key, value, g=None, beta=None, initial_state=None, output_final_state=False,
            **kwargs):  # fmt: skip
    """`kernel` over pieces of whole chunks (`in_pieces`)."""
    length, heads, width = value.shape[1:]
    step = max(chunk, PIECE_BYTES // (heads * width * 4) // chunk * chunk)
    call = dict(query=query, key=key, value=value, g=g, beta=beta, initial_state=initial_state, **kwargs)
    if length <= step:
        return kernel(**call, output_final_state=output_final_state)
    per_token = ("query", "key", "value", "g", "beta")
    out, state = call_in_pieces(kernel, call, per_token, step, "initial_state", "output_final_state")
    return out, state if output_final_state else None


def _rule(original, plan: Plan, group, query, key, value, g=None, beta=None, **kwargs):
    """The chunked delta rule (gated, or KDA) on each piece; continuing pieces corrected by their incoming state."""
    original = in_pieces(original)
    kwargs.pop("cu_seqlens", None)
    kwargs.pop("initial_state", None)
    kwargs.pop("output_final_state", None)
    heads, dv, dk = value.shape[2], value.shape[3], key.shape[3]
    exact = torch.promote_types(value.dtype, torch.float32)  # the states' and the correction's dtype
    outputs, finals, continuing = [], [None] * plan.slots, []
    for piece in plan.pieces:
        part = [t[:, slice(*piece.rows)] for t in (query, key, value, g, beta)]
        if piece.continues:
            n = piece.rows[1] - piece.rows[0]
            part[2] = torch.cat([part[2], value.new_zeros(1, n, heads, dk)], dim=-1)
            eye = torch.eye(dk, dtype=exact, device=value.device).expand(1, heads, dk, dk)
            start = torch.cat([eye.new_zeros(1, heads, dk, dv), eye], dim=-1)
            out, final = original(*part[:3], g=part[3], beta=part[4], initial_state=start, output_final_state=True,
                                  **kwargs)  # fmt: skip
            continuing.append((len(outputs), piece, out[..., dv:]))
            out = out[..., :dv]
        else:
            out, final = original(*part[:3], g=part[3], beta=part[4], output_final_state=piece.last, **kwargs)
            if piece.last:
                final = torch.cat([final, final.new_zeros(1, heads, dk, dk)], dim=-1)
        if piece.last:
            finals[piece.chunk] = final[0].to(exact)
        outputs.append(out)
    empty = value.new_zeros(heads, dk, dv + dk, dtype=exact)
    states = AllGather.apply(torch.stack([f if f is not None else empty for f in finals]), group)
    for i, piece, w in continuing:
        incoming = states[piece.chain[0], :, :, :dv]
        for slot in piece.chain[1:]:
            incoming = states[slot, :, :, dv:] @ incoming + states[slot, :, :, :dv]
        correction = torch.einsum("bthk,hkv->bthv", w.to(exact), incoming)
        outputs[i] = (outputs[i].to(exact) + correction).to(outputs[i].dtype)
    # every rank's gather must reach the backward (its reduce-scatter is a collective), used or not
    out = torch.cat(outputs, dim=1) + 0 * states.sum().to(value.dtype)
    return out, None


class StateMixer(GatheredMixer):
    """The forward of a delta-rule mixer under CP: the stock forward on this rank's tokens, with its kernel
    functions in their CP form (the module docstring)."""

    def __init__(self, module: torch.nn.Module, mesh: ContextParallelMesh, documents: MixerDocuments,
                 kernels: tuple[str, ...] | None = None) -> None:  # fmt: skip
        super().__init__(module, mesh, documents)
        self.kernels = kernels or (CONV, CLASSES[self.name])  # the kernel functions its forward calls, in no order

    def planned(self, ran: list[str]) -> bool:
        """Whether the forward called the kernel functions as the state passing needs: each once."""
        return sorted(ran) == sorted(self.kernels)

    def __call__(self, *args, **kwargs):
        docs, x, _, _ = self._split(args, kwargs)  # these mixers take no per-token argument but their input
        plan = docs.cached(("delta_rule_plan", self.mesh.cp_rank), lambda: Plan.build(docs, self.mesh))
        if _Active.plan is not None:
            raise RuntimeError(f"{self.name} runs inside another context-parallel mixer; call them one at a time.")
        _Active.plan, _Active.group, _Active.ran = plan, self.mesh.cp_group, []
        try:
            out = self.original(x)  # no cache, no padding mask, no packing keywords: the shard's rows alone
        finally:
            _Active.plan, _Active.group = None, None
        if not self.planned(_Active.ran):  # alike on every rank: the same code ran
            raise RuntimeError(
                f"{self.name}'s forward called {_Active.ran} of the kernel functions {', '.join(self.kernels)} under "
                "context parallelism, not as transformers_cp's state passing needs (this transformers version "
                "spells the mixer otherwise); set transformers_cp.delta_rule.USE_STATE = False for the gathered form."
            )
        return out


def install(
    change: changes.Change, module: torch.nn.Module, mesh: ContextParallelMesh, documents: MixerDocuments
) -> None:
    """Give `module` the state-passing forward (restored with `change`) and its model's module the dispatchers."""
    dispatch(change, module, {CONV: halo_conv, CLASSES[type(module).__name__]: _rule})
    change.replace_forward(module, StateMixer(module, mesh, documents))


def dispatch(change: changes.Change, module: torch.nn.Module, forms: dict[str, Callable]) -> None:
    """Dispatchers for the kernel functions `forms` names (name -> its CP form) in `module`'s model module (the last
    model's removal, through `change`, restores the functions)."""
    namespace = sys.modules[type(module).__module__]
    dispatchers = []
    for name, cp_form in forms.items():
        current = getattr(namespace, name)
        if not isinstance(current, _Dispatch):
            current = _Dispatch(name, current, cp_form)
            setattr(namespace, name, current)
        current.users += 1
        dispatchers.append((name, current))

    def undo() -> None:
        for name, dispatcher in dispatchers:
            dispatcher.users -= 1
            if dispatcher.users == 0 and getattr(namespace, name) is dispatcher:
                setattr(namespace, name, dispatcher.original)

    change.undo = _chain(change.undo, undo)


def _chain(first: Callable | None, then: Callable) -> Callable:
    def both() -> None:
        if first is not None:
            first()
        then()

    return both
