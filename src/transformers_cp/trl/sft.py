"""TRL's `SFTTrainer` with context parallelism.

The CP collator wraps TRL's collator (padded or padding-free, with packing or not) and keeps this rank's shard of the
packed row with its global `shift_labels`, which TRL's fused LM head scores without shifting. TRL's loss is then
S_r / N for this shard, with N from `count_label_tokens`; its metrics are sums of per-shard sums, summed over the CP
group before TRL gathers them over the data-parallel ranks, as in a run without CP (the router aux loss metric of an
MoE model too: each rank's `aux_loss` is its share A_g / c of the row's, see `router_loss.py`).
"""

from __future__ import annotations

import trl

from ..trainer import ContextParallelTrainerMixin


class SFTTrainer(ContextParallelTrainerMixin, trl.SFTTrainer):
    """TRL's `SFTTrainer` with context parallelism from `transformers_cp.trl.SFTConfig`."""

    logits_needed_for_loss = True  # TRL scores the logits itself (loss, entropy and accuracy metrics)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.cp_mesh is None:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if num_items_in_batch is None:
            num_items_in_batch = self._get_num_items_in_batch([inputs], self.args.device)
        tokens_seen = getattr(self, "_total_train_tokens", 0)
        # An MoE model returns its router loss as this shard's share X_r (value A_g / c, `router_loss.py`), which TRL
        # adds as coef · X_r without the number of processes it multiplies the token sum by when tokens are averaged
        # across devices: the share then needs the CP group's c of loss.py's c·k (without averaging the c comes below).
        coef = getattr(self, "router_aux_loss_coef", 0.0)
        if self.args.average_tokens_across_devices and getattr(self, "aux_loss_enabled", False):
            self.router_aux_loss_coef = coef * self.cp_mesh.cp_size
        # TRL's own loss and metrics (the mixin's compute_loss would skip the metrics); a metric is a sum of shard sums.
        try:
            with self._metrics_over_dp(shard_sums=True):
                result = super(ContextParallelTrainerMixin, self).compute_loss(
                    model, inputs, return_outputs, num_items_in_batch
                )
        finally:
            self.router_aux_loss_coef = coef
        # TRL returns S_r / N times the number of processes (c·d) when tokens are averaged across devices, which is
        # loss.py's c·k; without averaging it returns S_r / N, and the CP group's c is still needed.
        if not self.args.average_tokens_across_devices:
            result = (
                (result[0] * self.cp_mesh.cp_size, *result[1:]) if return_outputs else result * self.cp_mesh.cp_size
            )
        if self.model.training:  # TRL counted every shard, CP padding included
            self._total_train_tokens = tokens_seen + self._count_row_tokens(inputs) // self._tp_size
            self._metrics["train"]["num_tokens"] = [self._total_train_tokens]
        return result
