"""Mamba2-family mixers under context parallelism by state passing: each rank runs only its own tokens (about 1×
the mixer's compute), exact against each document run alone.

The stock mixer (transformers' own forward, no copy of it) runs once per call on an *expanded* shard: every piece of
the shard (a stretch of one document inside one chunk of the layout) is preceded by k − 1 spacer rows (k = the
convolution's kernel) holding the k − 1 mixer inputs that precede the piece in global order (from the rank holding
them, one all-gather of every chunk's last k − 1 input rows; the backward sums their gradients back to the owner),
zeros before a document start; `in_proj` turns them into the piece's convolution look-back, so the convolution of
each piece is its own (a hook on `in_proj`'s output zeroes those convolution inputs where it has a bias). A shard
that starts with a document takes no spacers before it: the convolution's zero padding and the scan's zero initial
state are the truth there. A hook on the mixer's gated norm, live only during that call, makes the scan exact:

- on the gated norm (input; for Falcon-H1 without `mamba_rms_norm`, on `out_proj`'s input with the gate applied):
  the scan output y gains the state correction. The SSM is h_t = exp(A·Δ_t) h_{t−1} + Δ_t B_t x_tᵀ,
  y_t = C_tᵀ h_t + D x_t, so a piece whose stock run entered with state h_s where the truth is h_in has
  y_t(true) = y_t(stock) + C_tᵀ exp(A·Σ_{piece start≤s≤t} Δ_s) (h_in − h_s). The stock run (one scan over the
  expanded shard, no document resets) carries h_s; h_in is zero at a document start, else the state leaving the
  chunk before in global order. Both come from each piece's final state from a zero start plus its total decay, an
  affine composition: h_s along the expanded shard, h_in over the CP group (one all-gather of every chunk's last
  piece (decay, state); its backward returns the states' gradients).

C and Δ for the correction are recomputed from `in_proj`'s output (the depthwise convolution again), x and B only
over the rows whose state is used (the spacers, and the pieces whose state a later piece or chunk takes); the
correction is added to its pieces' rows only (`_AddRows`); everything else is the stock path
(`benchmarks/mamba2_overhead.py` measures what this adds per rank). Where mamba_ssm is installed, the mixer's
training path is its fused kernel, which takes no incoming state: the mixer runs its unfused path (mamba_ssm's chunk
scan and causal-conv1d kernels) during the call (`training` off for that module; it has no dropout). Chunks shorter than k − 1 take their halo from
several chunks. A mixer given other per-token arguments (none of these classes today) takes `GatheredMixer`.

Where the scan runs transformers' torch path (mamba_ssm absent), the stock mixer's chunk scan is called over pieces
of whole scan chunks, each starting from the state the one before left (`scan_in_pieces`): the same recurrence, with
the memory of one piece. In transformers 5.17 that path broadcasts before it reduces: (chunk × chunk × heads ×
state) float32 per token, 4 MiB at Nemotron-H 1.5B's widths, and (chunks² × heads × head_dim × state) in the
recurrence between chunks, 129 GiB at 32k tokens; 5.24 contracts these, but its recurrence between chunks still
grows with chunks² (docs/hybrid.md).
"""

from __future__ import annotations

import bisect
import contextlib
import functools
import importlib.util
import inspect
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import transformers
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_leaves
from transformers.activations import ACT2FN

from .chunk_states import call_in_pieces
from .comm import AllGather
from .mesh import ContextParallelMesh
from .mixers import GatheredMixer, MixerDocuments
from .plan import Documents

CLASSES = (
    "NemotronHMamba2Mixer",
    "GraniteMoeHybridMambaLayer",
    "FalconH1Mixer",
    "BambaMixer",
    "Zamba2MambaMixer",
    "Mamba2Mixer",
)
"""transformers' Mamba2 mixers (near-copies of `Mamba2Mixer`) that take the state-passing form."""

logger = transformers.utils.logging.get_logger(f"transformers.{__name__}")
SCAN_BYTES = 2 << 30
"""The largest tensor one call of transformers' torch-path chunk scan may make (`scan_in_pieces`): its pieces hold as
many whole scan chunks as keep it under this, at least one, measured on meta tensors for the installed version (the
whole shard in one call on 5.24 at Nemotron-H 1.5B's widths up to 64k tokens per rank, 512 tokens on 5.17, whose
scan broadcasts 4 MiB per token). Smaller pieces cost more calls (host time, measured 2x a step on the GPU), not
memory."""


@dataclass(frozen=True)
class _Plan:
    """Where each piece of this rank's shard sits in the expanded row and where its incoming values come from."""

    pieces: list[tuple[int, int, int, bool]]  # (expanded start, end, chunk's position in `order`, continues)
    source: torch.Tensor  # per expanded row: its row of [shard | zero row | gathered tails]
    keep: torch.Tensor  # the expanded rows of the shard's own positions, in shard order
    blank: torch.Tensor  # the spacer rows before a document start (zero convolution inputs)
    tails: torch.Tensor  # per chunk slot of this rank (`slots` of them): its last k − 1 rows of the shard
    real: torch.Tensor  # per row of `tails`: whether it is one (else a zero row: a short chunk, a missing slot)
    slots: int  # chunk slots per rank in the gathers (the most chunks any rank holds)
    needed: list[bool]  # per piece: whether its own final state is used (a later piece, or the next chunk's)
    order: list[tuple[int, int, bool, bool]]  # every chunk in global order: (rank, slot, continues, one piece)
    mine: list[int]  # positions in `order` of this rank's chunks, in shard order


def _plan(docs: Documents, mesh: ContextParallelMesh, k: int) -> _Plan:
    """The row's plan for this rank."""
    layout = docs.layout(mesh.layout)
    ranges = [[(a, b) for a, b in layout.ranges(docs.seq_len, r) if b > a] for r in range(mesh.cp_size)]
    halo, starts = k - 1, set(docs.bounds)
    slots = max(len(chunks) for chunks in ranges)
    chunks = sorted((a, b, r, i) for r, cs in enumerate(ranges) for i, (a, b) in enumerate(cs))
    order = [(r, i, a not in starts, not any(a < s < b for s in starts)) for a, b, r, i in chunks]
    position = {(r, i): n for n, (r, i, _, _) in enumerate(order)}
    mine = [position[mesh.cp_rank, i] for i in range(len(ranges[mesh.cp_rank]))]
    shard = sum(b - a for a, b in ranges[mesh.cp_rank])
    zero = shard  # the zero row after the shard's rows, then the gathered tails

    def gathered_row(p: int) -> int:
        """The row of the table holding the input at global position p (among its chunk's last k − 1)."""
        a, b, r, i = chunks[bisect.bisect_right([c[0] for c in chunks], p) - 1]
        return zero + 1 + (r * slots + i) * halo + p - (b - halo)

    pieces, source, keep, blank, tails = [], [], [], [], []
    offset = 0
    for slot, (a, b) in enumerate(ranges[mesh.cp_rank]):
        cuts = [a, *sorted(s for s in starts if a < s < b), b]
        for s, e in zip(cuts, cuts[1:]):
            doc_start = docs.span(s)[0]
            # no spacers where the shard starts with a document: the convolution's own zero padding and the scan's
            # zero initial state are the truth there (the piece needs no correction)
            for p in range(s - halo, s) if source or s != doc_start else ():
                if s == a and p >= doc_start:
                    source.append(gathered_row(p))
                else:
                    blank.append(len(source))
                    source.append(zero)
            keep.extend(range(len(source), len(source) + e - s))
            source.extend(range(offset + s - a, offset + e - a))
            pieces.append((len(source) - (e - s), len(source), mine[slot], s == a and s != doc_start))
        tail = list(range(offset + max(0, b - a - halo), offset + b - a))
        tails.append([None] * (halo - len(tail)) + tail)  # a chunk shorter than k − 1: zeros in front
        offset += b - a
    tails += [[None] * halo] * (slots - len(ranges[mesh.cp_rank]))  # this rank has fewer chunks than another
    # a piece's own state is used by the next piece of the shard (the state the stock run carries into it) or, for
    # the shard's last piece (its chunk's last), by the chunk after it in global order if that continues it
    needed = [i + 1 < len(pieces) or (n + 1 < len(order) and order[n + 1][2]) for i, (_, _, n, _) in enumerate(pieces)]
    as_tensor = lambda v: torch.tensor(v, dtype=torch.long)  # noqa: E731
    flat = [i for t in tails for i in t]
    return _Plan(
        pieces, as_tensor(source), as_tensor(keep), as_tensor(blank), as_tensor([i or 0 for i in flat]),
        torch.tensor([i is not None for i in flat])[:, None], slots, needed, order, mine,
    )  # fmt: skip


class StatePassingMixer(GatheredMixer):
    """The state-passing forward of one Mamba2-family mixer (see the module docstring)."""

    def __init__(self, module: torch.nn.Module, mesh: ContextParallelMesh, documents: MixerDocuments) -> None:
        super().__init__(module, mesh, documents)
        self.module = module
        self.k = module.conv1d.kernel_size[0]
        self.call: dict | None = None  # the current call's plan and in_proj output, for the hooks
        gated_norm = getattr(module, "mamba_rms_norm", True)  # Falcon-H1 may gate without a norm
        self.gate_at_output = not gated_norm

    def hooks(self) -> list[torch.utils.hooks.RemovableHandle]:
        """The two hooks on the mixer's submodules (live only while this forward runs)."""
        module = self.module
        target = module.out_proj if self.gate_at_output else module.norm
        return [
            module.in_proj.register_forward_hook(self._after_in_proj),
            target.register_forward_pre_hook(self._before_norm),
        ]

    def __call__(self, *args, **kwargs):
        docs, x, per_token, fixed = self._split(args, kwargs)
        if per_token:  # none of these classes takes one today
            return super().__call__(*args, **kwargs)
        key = ("mamba2_plan", self.k, self.mesh.cp_rank, str(x.device))
        plan = docs.cached(key, lambda: _to(_plan(docs, self.mesh, self.k), x.device))
        # the spacer rows take the k − 1 mixer inputs before each piece (in_proj then gives their convolution
        # inputs), from the rank that holds them: every chunk's last k − 1 rows in one all-gather
        shard = x.squeeze(0)  # a view both ways (indexing [0] would make a zero-filled gradient)
        tails = torch.where(plan.real, shard.index_select(0, plan.tails), 0)
        gathered = AllGather.apply(tails, self.mesh.cp_group)  # rank order, then slot order, then row
        rows = torch.cat([shard, x.new_zeros(1, x.shape[-1]), gathered]).index_select(0, plan.source)[None]
        self.call = {"plan": plan}
        module = self.module
        training = module.training
        try:
            module.training = False  # the fused training kernel (mamba_ssm) takes no incoming state
            with scan_in_pieces(module):
                out, extra = self._run({self.hidden: rows}, fixed)
        finally:
            module.training = training
            self.call = None
        out = out.index_select(1, plan.keep)
        return out if extra is None else (out, *extra)

    def _after_in_proj(self, in_proj, _args, out: torch.Tensor):
        if self.call is None:
            return None
        plan = self.call["plan"]
        if in_proj.bias is not None and len(plan.blank):  # zero inputs gave the bias: zero convolution inputs
            hi = out.shape[-1] - self.module.num_heads  # the convolution's input (x, B, C) precedes the heads' Δ
            lo = hi - self.module.conv_dim
            rows = plan.blank.repeat_interleave(hi - lo)
            columns = torch.arange(lo, hi, device=out.device).repeat(len(plan.blank))
            out = out[0].index_put((rows, columns), out.new_zeros(()))[None]
        self.call["projected"] = out
        return out

    def _before_norm(self, _module, args):
        if self.call is None:
            return None
        y, *rest = args
        pieces, gate = self._correction()
        if self.gate_at_output:
            pieces = [(s, e, c * F.silu(gate[s:e]).view(c.shape)) for s, e, c in pieces]
        ranges = [(s, e) for s, e, _ in pieces]
        return (_AddRows.apply(y, ranges, *(c.to(y.dtype) for _, _, c in pieces)), *rest)

    def _ssm_inputs(self, projected: torch.Tensor, rows: int):
        """Δ (L', G, H/G), C (L', G, N), x (rows, G, H/G, P) and B (rows, G, N) of the expanded row's first `rows`
        rows, and the gate, as the stock path makes them (heads grouped by the B and C they share, G groups)."""
        module = self.module
        mup = getattr(module, "mup_vector", None)
        if mup is not None:
            projected = projected * mup
        heads, groups, state = module.num_heads, module.n_groups, module.ssm_state_size
        inner = module.intermediate_size
        sizes = [inner, inner + groups * state, groups * state, heads]  # gate, x and B, C, Δ
        _, gate, xb, c, dt = projected.squeeze(0).split([projected.shape[-1] - sum(sizes), *sizes], dim=-1)
        x, b = self._conv(xb if rows == len(xb) else xb[:rows], 0).split([inner, groups * state], dim=-1)
        c = self._conv(c, inner + groups * state)
        dt = F.softplus(dt + module.dt_bias.to(dt.dtype))
        low, high = module.time_step_limit
        dt = torch.clamp(dt, low, high).float().view(-1, groups, heads // groups)
        x = x.view(-1, groups, heads // groups, module.head_dim)
        return dt, x, b.view(-1, groups, state), c.view(-1, groups, state), gate

    def _conv(self, inputs: torch.Tensor, first: int) -> torch.Tensor:
        """The depthwise convolution and activation of the channels [first, first + width) of the convolution's
        input (L, width), in float32 as the stock scan takes them."""
        conv1d, width = self.module.conv1d, inputs.shape[-1]
        weight = conv1d.weight[first : first + width]
        bias = None if conv1d.bias is None else conv1d.bias[first : first + width]
        out = F.conv1d(inputs.T.unsqueeze(0).to(weight.dtype), weight, bias, padding=self.k - 1, groups=width)
        return ACT2FN[self.module.activation](out.squeeze(0)[:, : len(inputs)]).to(inputs.dtype).T.float()

    def _correction(self) -> tuple[list[tuple[int, int, torch.Tensor]], torch.Tensor]:
        """The additive correction of the scan output per piece (its expanded rows [s, e) and (e − s, G, H/G, P)), and
        the gate (L', H·P)."""
        plan, module = self.call["plan"], self.module
        # x and B are needed for the spacers' and the used pieces' own states only (C for every correction)
        rows = max([s for s, *_ in plan.pieces] + [e for (_, e, *_), n in zip(plan.pieces, plan.needed) if n] + [1])
        dt, x, b, c, gate = self._ssm_inputs(self.call["projected"], rows)
        a = -torch.exp(module.A_log.float()).view(dt.shape[1:])
        cum = torch.cumsum((dt * a).double(), dim=0)  # log-decay from the row's start, float64 against cancellation
        cum = torch.cat([cum.new_zeros(1, *cum.shape[1:]), cum])  # cum[t] = before expanded row t

        def final_state(lo: int, hi: int) -> torch.Tensor:
            """State after rows [lo, hi) from a zero state: (G, H/G, P, N)."""
            w = torch.exp((cum[hi] - cum[lo + 1 : hi + 1]).float()) * dt[lo:hi]
            return torch.einsum("tgjp,tgn->gjpn", w[..., None] * x[lo:hi], b[lo:hi])

        def decay(lo: int, hi: int) -> torch.Tensor:
            return torch.exp((cum[hi] - cum[lo]).float())[..., None, None]

        # the stock run's state entering each piece (it carries across pieces and spacers), and each chunk's last piece
        heads, shape = module.num_heads, (*x.shape[1:], b.shape[-1])  # a state: (G, H/G, P, N)
        carried, stock, last, halo = x.new_zeros(shape), [], {}, self.k - 1
        for (s, e, chunk, _), needed in zip(plan.pieces, plan.needed):
            if s > 0:  # its spacers (the first piece has none where it starts a document: it enters with zero)
                carried = decay(s - halo, s) * carried + final_state(s - halo, s)
            stock.append(carried)
            own = final_state(s, e) if needed else torch.zeros_like(carried)  # unused: zeros in the gather
            last[chunk] = (own, (cum[e] - cum[s]).float().flatten())
            carried = decay(s, e) * carried + own
        rows = [torch.cat([last[n][0].flatten(), last[n][1]]) for n in plan.mine]
        rows += [x.new_zeros(carried.numel() + heads)] * (plan.slots - len(rows))  # a rank with fewer chunks
        gathered = AllGather.apply(torch.stack(rows), self.mesh.cp_group)  # rank order, then slot order
        entering, state = {}, None
        for n, (rank, slot, continues, one_piece) in enumerate(plan.order):
            row = gathered[rank * plan.slots + slot]
            own = row[:-heads].view(shape)
            entering[n] = state if continues else None  # the first chunk starts a document
            if continues and one_piece:
                state = torch.exp(row[-heads:]).view(shape[:2])[..., None, None] * state + own
            else:
                state = own
        # every rank's gather must reach the backward (its reduce-scatter is a collective), used or not
        anchor = 0 * gathered.sum()
        pieces = [(0, 0, x.new_zeros(0, heads * x.shape[-1]) + anchor)]  # (rows [s, e), the correction)
        for (s, e, chunk, continues), before in zip(plan.pieces, stock):
            if s == 0:  # the shard starts with this document: the stock run was exact
                continue
            true = entering[chunk] if continues else torch.zeros_like(before)
            decays = torch.exp((cum[s + 1 : e + 1] - cum[s]).float())
            correction = torch.einsum("tgn,gjpn->tgjp", c[s:e], true - before) * decays[..., None]
            pieces.append((s, e, correction))  # (e − s, G, H/G, P), permuted: _AddRows takes it as it is
        return pieces, gate


class _AddRows(torch.autograd.Function):
    """y (1, L', W) with each of `pieces` ((e − s, ...), any strides: the einsum's permuted output) added to its rows
    [s, e) of `ranges`, in one copy of y; the backward passes y's gradient through whole and gives each piece a view
    of it (autograd's slicing would make a zero-filled y-sized gradient per piece)."""

    @staticmethod
    def forward(ctx, y: torch.Tensor, ranges: list[tuple[int, int]], *pieces: torch.Tensor) -> torch.Tensor:
        ctx.ranges = ranges
        out = y.clone()
        for (s, e), piece in zip(ranges, pieces):
            out[0, s:e].view(piece.shape).add_(piece)
        ctx.shapes = [piece.shape for piece in pieces]
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None, *(grad[0, s:e].reshape(shape) for (s, e), shape in zip(ctx.ranges, ctx.shapes))


@functools.cache
def _torch_scan() -> bool:
    """Whether transformers' Mamba2 chunk scan runs its torch path: it takes mamba_ssm's kernel where that imports."""
    return importlib.util.find_spec("mamba_ssm") is None


_PER_TOKEN = ("hidden_states", "dt", "B", "C", "z", "seq_idx")
_PER_ROW = ("A", "D", "dt_bias", "initial_states")


@contextlib.contextmanager
def scan_in_pieces(module: torch.nn.Module) -> Iterator[None]:
    """While open, the chunk scan `module`'s forward calls (its modeling module's `mamba2_chunk_scan`) runs over
    pieces of whole scan chunks whose largest tensor stays under `SCAN_BYTES`, on transformers' torch path (see the
    module docstring); nothing changes where mamba_ssm's kernel runs or a version calls no such function."""
    modeling = sys.modules[type(module).__module__]
    stock = getattr(modeling, "mamba2_chunk_scan", None)
    if stock is None or not _torch_scan():
        yield
        return
    modeling.mamba2_chunk_scan = scan_pieces(stock, module.chunk_size)
    try:
        yield
    finally:
        modeling.mamba2_chunk_scan = stock


def scan_pieces(stock: Callable, chunk: int) -> Callable:
    """`stock`, a modeling module's Mamba2 chunk scan with scan chunks of `chunk` tokens, called over pieces
    (`scan_in_pieces`); `stock` itself where mamba_ssm's kernel runs. benchmarks/hybrid.py gives it to the model
    without CP, for a one-GPU run with the kernels the CP run has."""
    return functools.partial(_scan_pieces, stock, chunk) if _torch_scan() else stock


class LargestTensor(TorchDispatchMode):
    """The bytes of the largest tensor any op makes while open; on meta tensors it measures a function without running
    it (`_piece_tokens`), and the tests measure the mixers with it."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.bytes = max(self.bytes, t.numel() * t.element_size())
        return out


@functools.lru_cache(maxsize=256)
def _largest_tensor(stock: Callable, shapes: tuple, flags: tuple) -> int:
    """The largest tensor `stock` makes on arguments of these (name, shape, dtype), with these other arguments; 0
    (one call, as the stock model makes it) where the scan cannot run on meta tensors, with a warning."""
    call = {name: torch.empty(shape, dtype=dtype, device="meta") for name, shape, dtype in shapes}
    try:
        with torch.no_grad(), _disable_current_modes(), LargestTensor() as largest:  # apart from any open mode
            stock(**call, **dict(flags))
    except (RuntimeError, NotImplementedError, TypeError) as e:
        logger.warning(
            f"the Mamba2 chunk scan could not be measured on meta tensors ({e!r:.200}); it runs in one call"
        )
        return 0
    return largest.bytes


def _piece_tokens(stock: Callable, call: dict, split: list[str], chunk: int) -> int:
    """The longest piece, whole scan chunks or the whole call, whose largest tensor stays under `SCAN_BYTES`:
    halved from the whole length until it does (each size measured once, on meta tensors)."""
    length = call["hidden_states"].shape[1]
    flags = tuple(sorted((k, v) for k, v in call.items() if not isinstance(v, torch.Tensor)))

    def largest(tokens: int) -> int:
        shapes = tuple(
            (k, (v.shape[0], tokens, *v.shape[2:]) if k in split else tuple(v.shape), v.dtype)
            for k, v in call.items()
            if isinstance(v, torch.Tensor)
        )
        return _largest_tensor(stock, shapes, (*flags, ("return_final_states", True)))

    tokens = length
    while tokens > chunk and largest(tokens) > SCAN_BYTES:
        tokens = max(chunk, tokens // 2 // chunk * chunk)
    return tokens


def _scan_pieces(stock: Callable, chunk: int, *args, **kwargs):
    """`stock(*args, **kwargs)` (a chunk scan, (batch, L, ...) per-token arguments) over pieces of whole scan chunks
    (`_piece_tokens`), each entering with the state the piece before left."""
    signature, call = inspect.signature(stock), {}
    for name, value in signature.bind(*args, **kwargs).arguments.items():
        call.update(value if signature.parameters[name].kind is inspect.Parameter.VAR_KEYWORD else {name: value})
    length = call["hidden_states"].shape[1]
    other = [k for k, v in call.items() if isinstance(v, torch.Tensor) and k not in _PER_TOKEN + _PER_ROW]
    split = [k for k in _PER_TOKEN if isinstance(call.get(k), torch.Tensor)]
    if other or length <= chunk:  # an argument of unknown extent: the whole call, as the stock model makes it
        return stock(**call)
    tokens = _piece_tokens(stock, call, split, chunk)
    if tokens >= length:
        return stock(**call)
    out, state = call_in_pieces(stock, call, tuple(split), tokens, "initial_states", "return_final_states")
    return (out, state) if call.get("return_final_states") else out


def _to(plan: _Plan, device: torch.device) -> _Plan:
    moved = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in vars(plan).items()}
    return _Plan(**moved)


def install(change, module: torch.nn.Module, mesh: ContextParallelMesh, documents: MixerDocuments) -> None:
    """Give a Mamba2-family mixer its state-passing forward and hooks, removed with `change`."""
    mixer = StatePassingMixer(module, mesh, documents)
    change.replace_forward(module, mixer)
    for handle in mixer.hooks():
        change.track(handle)
