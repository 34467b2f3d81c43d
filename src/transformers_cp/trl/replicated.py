"""The part TRL's preference and RL trainers share under CP: a loss computed alike on every CP rank.

DPO, GRPO and RLOO call the model on padded batches of whole sequences through TRL's fused LM head; under CP each
call becomes one packed row of documents sharded over the CP group, and the per-token outputs are gathered back into
TRL's padded layout (`padded_rows.py`). Every CP rank of a group then computes the same loss L_g from full sequences.
Rank r's graph reaches L_g only through its own tokens (the gather's backward keeps its slice), and DDP averages
gradients over all c·d ranks, so rank r back-propagates ℓ_r = c·L_g (`loss_scale(mesh, across_dp=False)`; TRL's loss
is a mean over this rank's sequences, with no factor for the dp ranks): the gradient is
1/(c·d) Σ_g Σ_{r∈g} c·∇_r L_g = (1/d) Σ_g ∇L_g, the one of the run without CP on d ranks. The logged loss is L_g.
"""

from __future__ import annotations

import torch

from ..loss import loss_scale
from ..modeling import apply_context_parallel
from ..router_loss import check_router_loss, replicate_router_loss
from ..trainer import ContextParallelTrainerMixin
from .padded_rows import shard_padded_rows


class ReplicatedLossTrainerMixin(ContextParallelTrainerMixin):
    """CP for a TRL trainer whose loss every CP rank computes from gathered full sequences (DPO, GRPO, RLOO).

    The mixin's token-level loss, logging and prediction are for packed language-modelling rows; these trainers keep
    TRL's (called past the mixin with `super(ContextParallelTrainerMixin, self)`) on full-sequence quantities.
    """

    logits_needed_for_loss = True  # per-token log-probs come from the LM head (TRL's fused head)

    def _check_context_parallel_trainer(self) -> None:
        # TRL turns the router logits on per call and takes its own coefficient: check the model's aux loss with them.
        enabled = getattr(self, "aux_loss_enabled", False)
        check_router_loss(self.model, coef=getattr(self, "router_aux_loss_coef", 0.0), enabled=enabled)

    def _setup_context_parallel_data(self) -> None:
        pad_token_id = self._tokenizer.pad_token_id or 0
        shard_padded_rows(self.model, self.cp_mesh, pad_token_id)
        replicate_router_loss(self.model)  # TRL adds coef · aux_loss to the replicated loss L_g
        if getattr(self, "ref_model", None) is not None:
            ref_model = self.accelerator.unwrap_model(self.ref_model)
            apply_context_parallel(ref_model, self.cp_mesh.config, mesh=self.cp_mesh)
            shard_padded_rows(ref_model, self.cp_mesh, pad_token_id)

    def _replicated_loss(self, result, return_outputs: bool):
        """TRL's loss L_g (or (L_g, outputs)) as this rank back-propagates it: c·L_g in training."""
        if not self.model.training:
            return result
        scale = loss_scale(self.cp_mesh, across_dp=False)
        return (result[0] * scale, *result[1:]) if return_outputs else result * scale

    def training_step(self, *args, **kwargs) -> torch.Tensor:
        loss = super().training_step(*args, **kwargs)
        return loss if self.cp_mesh is None else loss / self.cp_mesh.cp_size  # ℓ_r / c = L_g, for logging

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        parent = super() if self.cp_mesh is None else super(ContextParallelTrainerMixin, self)
        return parent.prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)

    def _track_num_input_tokens(self, inputs) -> None:
        if self.cp_mesh is None:
            return super()._track_num_input_tokens(inputs)
        with self._metrics_over_dp(shard_sums=False):  # TRL's count of the padded batch, over the dp ranks
            super(ContextParallelTrainerMixin, self)._track_num_input_tokens(inputs)
