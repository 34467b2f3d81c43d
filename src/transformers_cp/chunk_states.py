"""Each chunk's final state and decay under context parallelism, and the state entering a piece that continues a
document from earlier chunks: the composition the diagonal-decay recurrences share (Mamba1's selective scan, lightning
attention, RG-LRU). A chunk's recurrence from a zero start ends in S_chunk; with decay the product of its per-step
decays, the state leaving it from an incoming S is decay ⊙ S + S_chunk, so the incoming state of a continuing piece is
that map composed over its document's earlier chunks in global order. `call_in_pieces` runs a stock recurrence kernel
over pieces of its length, each entering with the state the one before left (Mamba2's chunk scan, the delta rule).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .comm import AllGather


class ChunkStates:
    """Every chunk's final state from a zero start and total decay (of its last piece), all-gathered over the CP group
    in one row per chunk (`Plan`'s slots; zeros for the chunks a rank lacks); the backward returns each state's
    gradient to the rank that computed it."""

    def __init__(self, finals: list, shape: torch.Size, decay: torch.Size, like: torch.Tensor, group) -> None:
        self.shape, self.decay, self.size = shape, decay, shape.numel()
        empty = like.new_zeros(self.size + decay.numel())
        rows = [empty if f is None else torch.cat([f[0].flatten(), f[1].flatten()]) for f in finals]
        self.gathered = AllGather.apply(torch.stack(rows), group)

    def incoming(self, chain: tuple[int, ...]) -> torch.Tensor:
        """The state entering a continuing piece: its document's states composed over the chunks of `chain` (the
        gathered slots of the earlier chunks, in global order; the first one is where the document starts),
        S ← decay ⊙ S + S_chunk."""
        state = self.gathered[chain[0], : self.size].view(self.shape)
        for slot in chain[1:]:
            row = self.gathered[slot]
            state = row[self.size :].view(self.decay) * state + row[: self.size].view(self.shape)
        return state


def call_in_pieces(
    kernel: Callable, call: dict, per_token: tuple[str, ...], tokens: int, state: str, final: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """`kernel(**call)` over pieces of `tokens` positions of its (batch, L, ...) arguments `per_token`, each piece
    entering with the state the one before left (the kernel's keywords `state` for the incoming one and `final` to
    return it): the concatenated output and the last state."""
    length = next(call[k] for k in per_token if call.get(k) is not None).shape[1]
    current, outputs = call.get(state), []
    for start in range(0, length, tokens):
        piece = {k: call[k][:, start : start + tokens] for k in per_token if call.get(k) is not None}
        out, current = kernel(**{**call, **piece, state: current, final: True})
        outputs.append(out)
    return torch.cat(outputs, dim=1), current
