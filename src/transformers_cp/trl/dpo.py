"""TRL's `DPOTrainer` with context parallelism, exact for every loss type.

The 2B sequences of a batch (prompt+chosen, prompt+rejected) are documents of one packed row sharded over the CP
group; the per-token log-probabilities (and the per-token metric inputs) are gathered back to full sequences before
TRL's loss, so sums, token counts, length-normalised and sorted losses, rewards, accuracies and margins are those of
a run without CP (`padded_rows.py`). The reference model, a separate one or the policy without its adapter, runs the
same way, also when its log-probabilities are precomputed.

Every CP rank of a group then computes the same loss L_g. Rank r's graph reaches L_g only through its own tokens, and
DDP averages gradients over all c·d ranks, so rank r back-propagates ℓ_r = c·L_g (`loss_scale(mesh, across_dp=False)`;
TRL's loss is a mean over this rank's pairs, with no factor for the dp ranks): the gradient is
1/(c·d) Σ_g Σ_{r∈g} c·∇_r L_g = (1/d) Σ_g ∇L_g, the one of the run without CP on d ranks. Metrics that TRL gathers
over processes are gathered over the dp ranks only, since the CP ranks of a group hold the same values.

An MoE policy's router load-balancing loss (TRL adds `router_aux_loss_coef · aux_loss`) is part of L_g: the model
returns the whole row's A_g on every CP rank, its gradient through this rank's tokens (`router_loss.py`), over the
real tokens of the 2B sequences, which is what the stock model computes from the padded batch and its attention mask.
"""

from __future__ import annotations

import trl

from ..loss import loss_scale
from ..modeling import apply_context_parallel
from ..router_loss import check_router_loss, replicate_router_loss
from ..sampler import shard_dataloader_over_dp
from ..trainer import ContextParallelTrainerMixin
from .padded_rows import shard_padded_rows


class DPOTrainer(ContextParallelTrainerMixin, trl.DPOTrainer):
    """TRL's `DPOTrainer` with context parallelism from `transformers_cp.trl.DPOConfig`."""

    # The mixin's token-level loss, logging and prediction are for packed language-modelling rows; DPO keeps TRL's
    # (called past the mixin with `super(ContextParallelTrainerMixin, self)`) on full-sequence quantities.
    logits_needed_for_loss = True  # per-token log-probs come from the logits

    def _check_context_parallel_trainer(self) -> None:
        # TRL turns the router logits on per call and takes its own coefficient: check the model's aux loss with them.
        enabled = getattr(self, "aux_loss_enabled", False)
        check_router_loss(self.model, coef=getattr(self, "router_aux_loss_coef", 0.0), enabled=enabled)

    def _setup_context_parallel_data(self) -> None:
        pad_token_id = self._tokenizer.pad_token_id or 0
        shard_padded_rows(self.model, self.cp_mesh, pad_token_id)
        replicate_router_loss(self.model)  # TRL adds coef · aux_loss to the replicated loss L_g
        if self.ref_model is not None:
            ref_model = self.accelerator.unwrap_model(self.ref_model)
            apply_context_parallel(ref_model, self.cp_mesh.config, mesh=self.cp_mesh)
            shard_padded_rows(ref_model, self.cp_mesh, pad_token_id)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.cp_mesh is None:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        with self._metrics_over_dp(shard_sums=False):
            result = super(ContextParallelTrainerMixin, self).compute_loss(model, inputs, return_outputs)
        if not self.model.training:
            return result
        scale = loss_scale(self.cp_mesh, across_dp=False)
        return (result[0] * scale, *result[1:]) if return_outputs else result * scale

    def training_step(self, *args, **kwargs):
        loss = super().training_step(*args, **kwargs)
        return loss if self.cp_mesh is None else loss / self.cp_mesh.cp_size  # ℓ_r / c = L_g, for logging

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        parent = super() if self.cp_mesh is None else super(ContextParallelTrainerMixin, self)
        return parent.prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)

    def _track_num_input_tokens(self, inputs) -> None:
        if self.cp_mesh is None:
            return super()._track_num_input_tokens(inputs)
        with self._metrics_over_dp(shard_sums=False):
            super(ContextParallelTrainerMixin, self)._track_num_input_tokens(inputs)

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
