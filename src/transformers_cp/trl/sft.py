"""TRL's `SFTTrainer` with context parallelism.

The CP collator wraps TRL's collator (padded or padding-free, with packing or not) and keeps this rank's shard of the
packed row with its global `shift_labels`, which TRL's fused LM head scores without shifting. TRL's loss is then
S_r / N for this shard, with N from `count_label_tokens`; its metrics are sums of per-shard sums, summed over the CP
group before TRL gathers them over the data-parallel ranks, as in a run without CP.
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
        # TRL's own loss and metrics (the mixin's compute_loss would skip the metrics); a metric is a sum of shard sums.
        with self._metrics_over_dp(shard_sums=True):
            result = super(ContextParallelTrainerMixin, self).compute_loss(
                model, inputs, return_outputs, num_items_in_batch
            )
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
