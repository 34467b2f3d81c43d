"""TRL's `DPOTrainer` with context parallelism, exact for every loss type.

The 2B sequences of a batch (prompt+chosen, prompt+rejected) are documents of one packed row sharded over the CP
group; the per-token log-probabilities (and the per-token metric inputs) are gathered back to full sequences before
TRL's loss, so sums, token counts, length-normalised and sorted losses, rewards, accuracies and margins are those of
a run without CP (`padded_rows.py`). The reference model, a separate one or the policy without its adapter, runs the
same way, also when its log-probabilities are precomputed.

Every CP rank of a group then computes the same loss L_g; `replicated.py` says how its gradient is scaled. Metrics
that TRL gathers over processes are gathered over the dp ranks only, since the CP ranks of a group hold the same values.

An MoE policy's router load-balancing loss (TRL adds `router_aux_loss_coef · aux_loss`) is part of L_g: the model
returns the whole row's A_g on every CP rank, its gradient through this rank's tokens (`router_loss.py`), over the
real tokens of the 2B sequences, which is what the stock model computes from the padded batch and its attention mask.
"""

from __future__ import annotations

import trl

from ..sampler import shard_dataloader_over_dp
from ..trainer import ContextParallelTrainerMixin
from .replicated import ReplicatedLossTrainerMixin


class DPOTrainer(ReplicatedLossTrainerMixin, trl.DPOTrainer):
    """TRL's `DPOTrainer` with context parallelism from `transformers_cp.trl.DPOConfig`."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.cp_mesh is None:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        with self._metrics_over_dp(shard_sums=False):
            result = super(ContextParallelTrainerMixin, self).compute_loss(model, inputs, return_outputs)
        return self._replicated_loss(result, return_outputs)

    def _precompute_ref_logps(self, dataset, name: str, batch_size: int):
        # Runs inside TRL's __init__, before the mixin's setup: set CP up now so the reference runs under it too.
        self._setup_context_parallel()
        if self.cp_mesh is None:
            return super()._precompute_ref_logps(dataset, name, batch_size)
        accelerator = self.accelerator
        accelerator.prepare = lambda dataloader: shard_dataloader_over_dp(
            type(accelerator).prepare(accelerator, dataloader), self.cp_mesh
        )
        try:
            with self._metrics_over_dp(shard_sums=False):
                return super()._precompute_ref_logps(dataset, name, batch_size)
        finally:
            del accelerator.prepare
