"""State passing for the Mamba1-family mixers (Mamba, FalconMamba, Jamba, Zamba) under context parallelism: each rank
runs the mixer on its own tokens only (about 1× compute), exact against each document run alone (docs/hybrid.md).

These mixers' forwards are transformers' own; they reach the sequence only through module-level kernel functions of
their model's module: `causal_conv1d_fn` (the short causal convolution, once) and `mamba_selective_scan` (the selective
scan, once; once per Mamba head in Zamba), after a fused `mamba_inner_fn` that returns nothing on the torch path. The
dispatchers of `delta_rule` give those calls their CP form while a CP mixer runs (its `Plan` of the shard's pieces):

- Convolution: `delta_rule`'s (the k − 1 inputs before each piece, from the rank holding them, zeros before a
  document start; the halo's gradient goes back to its owner).
- Fused path (`mamba_inner_fn`, mamba_ssm's when installed): returns None, so that the forward takes the unfused path
  (which takes no incoming state either, but can be split into pieces).
- Scan, h_t = exp(Δ_t A) ⊙ h_{t−1} + Δ_t B_t x_t, y_t = (C_t · h_t + D x_t) · silu(z_t), a diagonal decay per channel
  and state dimension: the stock scan runs once per piece (a document's part of one chunk) from a zero state, so no
  state crosses a document start inside the shard. Every chunk's last piece gives its final state h and its total
  log-decay A ΣΔ (one all-gather of (decay, state), channels × state size each); a piece that continues a document
  from an earlier chunk composes its incoming state over the chunks of its document in global order
  (h_in ← exp(A ΣΔ) ⊙ h_in + h) and adds y_t += (C_t · (exp(A Σ_{s≤t} Δ_s) ⊙ h_in)) · silu(z_t). The gather's
  backward sums the states' gradients back to their owners.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from . import changes, delta_rule
from .chunk_states import ChunkStates
from .mesh import ContextParallelMesh
from .mixers import MixerDocuments

CLASSES = ("MambaMixer", "FalconMambaMixer", "JambaMambaMixer", "ZambaMambaMixer")
"""transformers' Mamba1 mixers that take the state-passing form (`delta_rule.USE_STATE` switches it, as for the delta
rule: benchmarks compare)."""
SCAN, FUSED = "mamba_selective_scan", "mamba_inner_fn"
BLOCK = 1024
"""Rows per block of the correction, recomputed in backward: channels × BLOCK × state floats at a time, whatever the
piece's length (the scan kernels of mamba_ssm never hold a channels × rows × state tensor)."""


def fits(module: torch.nn.Module) -> bool:
    """Whether `module` takes the state-passing form: one of `CLASSES`, in a module that names both kernel functions."""
    namespace = sys.modules.get(type(module).__module__)
    return (
        delta_rule.USE_STATE
        and type(module).__name__ in CLASSES
        and all(callable(getattr(namespace, name, None)) for name in (delta_rule.CONV, SCAN))
    )


def _correction(a: torch.Tensor, cumulative: torch.Tensor, incoming: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """C_t · (exp(A Σ_{s≤t} Δ_s) ⊙ h_in) of some rows: (channels, rows), through a (channels, rows, state) tensor."""
    return torch.einsum("dtn,dn,nt->dt", torch.exp(a[:, None] * cumulative[..., None]), incoming, c)


def _unfused(original, plan, group, *args, **kwargs) -> None:
    """The fused kernel takes no document boundaries: None sends the forward down its unfused path."""
    return None


def _scan(original, plan: delta_rule.Plan, group, hidden_states, dt, A, B, C, D=None, z=None, delta_bias=None,
          delta_softplus=False, return_last_state=False, **kwargs):  # fmt: skip
    """The selective scan of (1, channels, rows of the shard) on each piece from a zero state; continuing pieces
    corrected by their incoming state (the module docstring)."""
    if return_last_state:  # only with a cache, which a CP forward has not
        raise RuntimeError("the selective scan under context parallelism returns no final state (no cache under CP)")
    exact = torch.promote_types(hidden_states.dtype, torch.float32)  # the states' and the correction's dtype
    delta = dt if delta_bias is None else dt + delta_bias.to(dt.dtype)[..., None]
    delta = (F.softplus(delta) if delta_softplus else delta)[0].to(exact)  # Δ: (channels, rows)
    a = A.to(exact)  # (channels, state)
    outputs, finals, continuing = [], [None] * plan.slots, []
    for piece in plan.pieces:
        rows = slice(*piece.rows)
        x, step, b, c, gate = (None if t is None else t[..., rows] for t in (hidden_states, dt, B, C, z))
        out = original(x, step, A, b, c, D=D, z=gate, delta_bias=delta_bias, delta_softplus=delta_softplus,
                       return_last_state=piece.last, **kwargs)  # fmt: skip
        if piece.last:
            out, final = out
            finals[piece.chunk] = (final[0].to(exact), torch.exp(a * delta[:, rows].sum(-1, keepdim=True)))
        if piece.continues:
            continuing.append((len(outputs), piece))
        outputs.append(out)
    states = ChunkStates(finals, a.shape, a.shape, a, group)
    for i, piece in continuing:
        incoming = states.incoming(piece.chain)
        rows = slice(*piece.rows)
        cumulative, c = delta[:, rows].cumsum(-1), C[0, :, rows].to(exact)
        blocks = [
            checkpoint(
                _correction, a, cumulative[:, s : s + BLOCK], incoming, c[:, s : s + BLOCK], use_reentrant=False
            )
            for s in range(0, c.shape[1], BLOCK)
        ]
        correction = torch.cat(blocks, dim=-1)
        if z is not None:
            correction = correction * F.silu(z[0, :, rows].to(exact))
        outputs[i] = (outputs[i].to(exact) + correction).to(outputs[i].dtype)
    # every rank's gather must reach the backward (its reduce-scatter is a collective), used or not
    out = torch.cat(outputs, dim=-1)
    return out + 0 * states.gathered.sum().to(out.dtype)


class ScanMixer(delta_rule.StateMixer):
    """The forward of a Mamba1-family mixer under CP: the stock forward on this rank's tokens, its kernel functions in
    their CP form."""

    def __init__(self, module: torch.nn.Module, mesh: ContextParallelMesh, documents: MixerDocuments) -> None:
        super().__init__(module, mesh, documents, (delta_rule.CONV, SCAN))

    def planned(self, ran: list[str]) -> bool:
        """The convolution once, the scan at least once (once per head in Zamba), the fused kernel at most once."""
        return ran.count(delta_rule.CONV) == 1 and ran.count(SCAN) >= 1 and set(ran) <= {*self.kernels, FUSED}


def install(
    change: changes.Change, module: torch.nn.Module, mesh: ContextParallelMesh, documents: MixerDocuments
) -> None:
    """Give `module` the state-passing forward (restored with `change`) and its model's module the dispatchers."""
    forms = {delta_rule.CONV: delta_rule.halo_conv, SCAN: _scan}
    if callable(getattr(sys.modules[type(module).__module__], FUSED, None)):
        forms[FUSED] = _unfused
    delta_rule.dispatch(change, module, forms)
    change.replace_forward(module, ScanMixer(module, mesh, documents))
