"""State passing for MiniMax's lightning attention and RecurrentGemma's recurrent block (RG-LRU) under context
parallelism: each rank runs the stock mixer (transformers' own forward) on its own tokens only (about 1× compute), exact
against each document run alone (docs/hybrid.md).

Both recurrences are affine with a diagonal decay, S_t = a_t ⊙ S_{t−1} + u_t. The shard is cut into pieces (a
document's part of one chunk of the layout: `delta_rule.Plan`). Every chunk's last piece gives its final state from a
zero start and its total decay (one all-gather; its backward returns the states' gradients to their owners); a piece
that continues a document from an earlier chunk composes its incoming state over the chunks of its document in global
order (S_in ← decay ⊙ S_in + S, `chunk_states.ChunkStates`), and its outputs gain that state's part.

- `LightningMixer` (MiniMaxLightningAttention): per head S_t = λ S_{t−1} + k_t v_tᵀ, o_t = S_tᵀ q_t, λ = exp(−slope)
  constant. The stock forward computes it block-wise over the whole shard, carrying its state across the document
  starts and chunk edges inside the shard. Two hooks, live only during the call: `qkv_proj`'s output is kept, and at
  the output norm's input a piece starting at row s gets o_t += λ^(t−s+1) (S_in − S_carried)ᵀ q_t, where S_carried is
  the state the stock run carried into it (the pieces' final states from zero, composed along the shard) and S_in the
  true one (zero at a document start). The norm, the output gate and the projection after it are per token.
- `RecurrentBlockMixer` (RecurrentGemmaRecurrentBlock): a depthwise causal convolution, then the RG-LRU
  h_t = a_t ⊙ h_{t−1} + x̃_t, x̃_t = sqrt(1 − a_t²) ⊙ i_t ⊙ x_t, where the stock layer resets (a_t = 0, x̃_t = i_t ⊙ x_t)
  at the positions whose position id is 0. During the call the convolution takes `delta_rule`'s halo (the k − 1
  inputs before each piece, from the rank holding them, zeros before a document start; the gradient goes back to the
  owner); the layer gets position ids that restart at the row's document starts (from `Documents`, whatever ids the
  layer was given); and the RG-LRU's scan (its `_rnn_scan`) runs once per chunk from a zero state (its fp32 final
  state is the chunk's), and adds (Π_{s≤t} a_s) ⊙ h_in to continuing pieces.
"""

from __future__ import annotations

import torch

from . import changes, delta_rule
from .chunk_states import ChunkStates
from .delta_rule import Plan, halo_conv
from .mesh import ContextParallelMesh
from .mixers import GatheredMixer, MixerDocuments
from .plan import Documents


def _plan(docs: Documents, mesh: ContextParallelMesh) -> Plan:
    return docs.cached(("delta_rule_plan", mesh.cp_rank), lambda: Plan.build(docs, mesh))


class LightningMixer(GatheredMixer):
    """The state-passing forward of MiniMax's lightning attention (the module docstring)."""

    def __init__(self, module: torch.nn.Module, mesh: ContextParallelMesh, documents: MixerDocuments) -> None:
        super().__init__(module, mesh, documents)
        self.module = module
        self.call: dict | None = None  # the current call's plan and qkv_proj output, for the hooks

    def __call__(self, *args, **kwargs):
        docs, x, per_token, fixed = self._split(args, kwargs)  # per token: the rotary tables, unused by the mixer
        self.call = {"plan": _plan(docs, self.mesh)}
        module = self.module
        handles = [
            module.qkv_proj.register_forward_hook(self._keep),
            module.norm.register_forward_pre_hook(self._correct),
        ]
        try:
            out, extra = self._run({self.hidden: x, **per_token}, fixed)
            _ran(self.name, self.call.get("corrected", 0), "the output norm after `qkv_proj`")
        finally:
            for handle in handles:
                handle.remove()
            self.call = None
        return out if extra is None else (out, *extra)

    def _keep(self, _module, _args, out: torch.Tensor) -> None:
        self.call["projected"] = out

    def _correct(self, _module, args):
        if "projected" not in self.call:
            _ran(self.name, 0, "the output norm after `qkv_proj`")
        self.call["corrected"] = self.call.get("corrected", 0) + 1
        y, *rest = args
        return (y + self._correction(y.dtype).to(y.dtype)[None], *rest)

    def _correction(self, dtype: torch.dtype) -> torch.Tensor:
        """The additive correction of the attention output before the norm: (rows of the shard, heads · head_dim)."""
        plan, module = self.call["plan"], self.module
        heads, d = module.num_attention_heads, module.head_dim
        exact = torch.promote_types(dtype, torch.float32)
        qkv = module.act_fn(self.call["projected"])[0].reshape(-1, heads, 3 * d).to(exact)
        q, k, v = qkv.split(d, dim=-1)  # (rows, heads, d) each, as the stock forward splits them
        slope = module.slope_rate.reshape(heads).to(exact)

        def powers(exponents: torch.Tensor) -> torch.Tensor:  # λ^e per row and head: (rows, heads)
            return torch.exp(-exponents.to(exact)[:, None] * slope)

        carried, entering, finals = q.new_zeros(heads, d, d), [], [None] * plan.slots
        for piece in plan.pieces:  # the stock run's state entering each piece, and each chunk's last piece
            a, b = piece.rows
            steps = torch.arange(b - a, device=q.device)
            own = torch.einsum("thk,th,thv->hkv", k[a:b], powers(b - a - 1 - steps), v[a:b])  # from a zero state
            decay = torch.exp(-(b - a) * slope)[:, None, None]
            entering.append(carried)
            carried = decay * carried + own
            if piece.last:
                finals[piece.chunk] = (own, decay)
        states = ChunkStates(finals, torch.Size((heads, d, d)), torch.Size((heads, 1, 1)), q, self.mesh.cp_group)
        pieces = []
        for piece, before in zip(plan.pieces, entering):
            a, b = piece.rows
            state = states.incoming(piece.chain) - before if piece.continues else -before
            steps = torch.arange(1, b - a + 1, device=q.device)
            pieces.append(torch.einsum("thk,hkv->thv", q[a:b] * powers(steps)[..., None], state))
        # every rank's gather must reach the backward (its reduce-scatter is a collective), used or not
        return torch.cat(pieces).flatten(1) + 0 * states.gathered.sum()


class RecurrentBlockMixer(GatheredMixer):
    """The state-passing forward of RecurrentGemma's recurrent block (the module docstring)."""

    def __init__(self, module: torch.nn.Module, mesh: ContextParallelMesh, documents: MixerDocuments) -> None:
        super().__init__(module, mesh, documents)
        self.module = module

    def __call__(self, *args, **kwargs):
        docs, x, _, fixed = self._split(args, kwargs)  # per token: the layer's position ids, replaced here
        plan = _plan(docs, self.mesh)
        key = ("document_positions", self.mesh.cp_rank, str(x.device))
        positions = docs.cached(key, lambda: _positions(plan, x.device))
        conv, lru = self.module.conv_1d, self.module.rg_lru
        had = vars(conv).get("forward")
        stock_conv, stock_scan = conv.forward, lru._rnn_scan

        def causal(source: torch.Tensor, *_, **__) -> torch.Tensor:  # the module's convolution, causal rows only
            return stock_conv(source)[..., : source.shape[-1]]

        def convolution(inputs: torch.Tensor) -> torch.Tensor:
            ran.append("conv_1d")
            return halo_conv(causal, plan, self.mesh.cp_group, inputs, conv.weight, conv.bias)

        def scan(hidden_states, recurrent_gate, reset, recurrent_states=None, acc_dtype=torch.float32):
            ran.append("_rnn_scan")
            return self._scan(stock_scan, plan, hidden_states, recurrent_gate, reset, acc_dtype)

        ran: list[str] = []
        conv.forward, lru._rnn_scan = convolution, scan
        try:
            out, extra = self._run({self.hidden: x, "position_ids": positions}, fixed)
            _ran(self.name, int(ran == ["conv_1d", "_rnn_scan"]), "`conv_1d`, then `rg_lru._rnn_scan`")
        finally:
            del lru._rnn_scan
            if had is None:
                del conv.forward
            else:
                conv.forward = had
        return out if extra is None else (out, *extra)

    def _scan(self, stock, plan: Plan, hidden_states, recurrent_gate, reset, acc_dtype):
        """The RG-LRU's scan of the shard: each piece from a zero state (the stock scan once per chunk, from zero,
        resetting at the document starts), continuing pieces corrected by their incoming state. Returns the outputs
        and no final state (a CP forward keeps no cache)."""
        ends = (*plan.firsts[1:], plan.pieces[-1].rows[1])
        outputs, chunk_states = [], []
        for a, b in zip(plan.firsts, ends):
            out, final = stock(hidden_states[:, a:b], recurrent_gate[:, a:b], reset[:, a:b], None, acc_dtype)
            outputs.append(out)
            chunk_states.append(final[0])
        out = torch.cat(outputs, dim=1)[0].to(acc_dtype)
        decays = {  # the running product of a over each continuing piece
            i: torch.cumprod(recurrent_gate[0, slice(*piece.rows)].to(acc_dtype), dim=0)
            for i, piece in enumerate(plan.pieces)
            if piece.continues
        }
        finals = [None] * plan.slots
        for i, piece in enumerate(plan.pieces):
            if piece.last:
                state = chunk_states[piece.chunk]
                finals[piece.chunk] = (state, decays[i][-1] if i in decays else torch.zeros_like(state))
        states = ChunkStates(finals, out.shape[-1:], out.shape[-1:], out, self.mesh.cp_group)
        pieces = []
        for i, piece in enumerate(plan.pieces):
            part = out[slice(*piece.rows)]
            pieces.append(part + decays[i] * states.incoming(piece.chain) if i in decays else part)
        # every rank's gather must reach the backward (its reduce-scatter is a collective), used or not
        return (torch.cat(pieces) + 0 * states.gathered.sum())[None].to(hidden_states.dtype), None


def _ran(name: str, times: int, what: str) -> None:
    """Refuse a mixer forward that did not reach `what` once (another transformers version's spelling), alike on every
    rank (the same code ran), instead of running it without its state passing."""
    if times != 1:
        raise RuntimeError(
            f"{name}'s forward did not call {what} once under context parallelism, as transformers_cp's state "
            "passing for it needs (this transformers version spells the mixer otherwise); set "
            "transformers_cp.delta_rule.USE_STATE = False for the gathered form."
        )


def _positions(plan: Plan, device: torch.device) -> torch.Tensor:
    """The shard's positions inside their documents (1, rows): 0 exactly at the document starts."""
    positions = []
    for piece in plan.pieces:
        a, b = piece.rows
        offset = piece.start - plan.doc_start.get(a, piece.start)
        positions += range(offset, offset + b - a)
    return torch.tensor(positions, device=device)[None]


CLASSES = {"MiniMaxLightningAttention": LightningMixer, "RecurrentGemmaRecurrentBlock": RecurrentBlockMixer}
"""transformers' mixers that take a state-passing form of this module, and that form."""


def fits(module: torch.nn.Module) -> bool:
    """Whether `module` takes its state-passing form: one of `CLASSES`, with `delta_rule.USE_STATE` (the one switch of
    the state-passing forms; benchmarks compare)."""
    return delta_rule.USE_STATE and type(module).__name__ in CLASSES


def install(
    change: changes.Change, module: torch.nn.Module, mesh: ContextParallelMesh, documents: MixerDocuments
) -> None:
    """Give `module` (one of `CLASSES`) its state-passing forward, restored with `change`."""
    change.replace_forward(module, CLASSES[type(module).__name__](module, mesh, documents))
