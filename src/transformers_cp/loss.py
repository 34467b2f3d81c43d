"""The loss under context parallelism: the one place where a rank's shard loss is normalised and scaled.

Reference: the stock `transformers.Trainer` on d data-parallel ranks with `DataCollatorWithFlattening`. Rank g's loss
is L_g = k · S_g / N, where S_g is the sum of the token cross-entropies of its micro-batch, N the number of label
tokens of the optimizer step (summed over the gradient-accumulation micro-batches and, with
`average_tokens_across_devices`, over the d ranks) and k = d with `average_tokens_across_devices` (the Trainer
multiplies by the world size because DDP averages gradients), else 1. DDP then gives grad = (1/d) Σ_g ∇L_g.

Under CP the c ranks of group g hold disjoint shards of its packed row, so S_g = Σ_{r∈g} S_r, and DDP (or FSDP,
DeepSpeed) averages over all c·d ranks. Rank r therefore uses

    ℓ_r = c · k · S_r / N,   N counted over its CP group always, and over the dp groups with average_tokens,

which gives grad = 1/(c·d) Σ_g Σ_{r∈g} c·k·∇S_r / N = (1/d) Σ_g ∇L_g: the stock gradient (and so the same gradient
norm and clipping). The value reported for logging is Σ_{r∈g} ℓ_r / c = L_g, the stock rank's loss, the same on every
CP rank of the group.

Losses of whole sequences (DPO, `transformers_cp.trl`): the per-token quantities of the row are gathered over the CP
group (`gather_sequence`, whose backward keeps this rank's slice) and every rank of group g computes the same L_g. The
graph of rank r reaches L_g only through its own tokens, so it back-propagates ℓ_r = c·L_g (`loss_scale(mesh,
across_dp=False)` when L_g carries no dp factor): grad = 1/(c·d) Σ_g Σ_{r∈g} c·∇_r L_g = (1/d) Σ_g ∇L_g. The value
reported for logging is ℓ_r / c = L_g.

An MoE model's router load-balancing loss, a function of sums over the whole row, enters both forms as
`router_loss.py` derives: a shard's share of it in the token sum, the whole row's in a replicated loss.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

from .mesh import ContextParallelMesh

IGNORE_INDEX = -100


def count_label_tokens(
    shift_labels: torch.Tensor | Sequence[torch.Tensor], mesh: ContextParallelMesh, across_dp: bool = True
) -> torch.Tensor:
    """N: label tokens of an optimizer step, from this rank's `shift_labels` shards of its micro-batches.

    Summed over the CP group, and over every rank when `across_dp` (the Trainer's `average_tokens_across_devices`).
    """
    if isinstance(shift_labels, torch.Tensor):
        shift_labels = [shift_labels]
    count = sum(labels.ne(IGNORE_INDEX).sum() for labels in shift_labels)
    count = torch.as_tensor(count, device=shift_labels[0].device)
    if across_dp and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(count)
    elif mesh.cp_group is not None:
        dist.all_reduce(count, group=mesh.cp_group)
    return count


def loss_scale(mesh: ContextParallelMesh, across_dp: bool = True) -> int:
    """c · k of the module docstring: what a shard's S_r / N is multiplied by."""
    return mesh.cp_size * (mesh.dp_size if across_dp else 1)


def causal_lm_loss(
    ce_sum: torch.Tensor, shift_labels: torch.Tensor, num_items_in_batch: torch.Tensor | int | None
) -> torch.Tensor:
    """A causal LM's loss from its cross-entropy sum, as transformers' `ForCausalLMLoss` reduces it: the sum over
    `num_items_in_batch` when given, else the mean over this micro-batch's label tokens."""
    if num_items_in_batch is None:
        return ce_sum / shift_labels.ne(IGNORE_INDEX).sum().to(ce_sum.device)
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(ce_sum.device)
    return ce_sum / num_items_in_batch


def context_parallel_loss(
    logits: torch.Tensor,
    shift_labels: torch.Tensor,
    num_items_in_batch: torch.Tensor | int,
    mesh: ContextParallelMesh,
    across_dp: bool = True,
) -> torch.Tensor:
    """ℓ_r for a custom loop: the shard's cross-entropy sum (in float32, as transformers' loss) over N, scaled.

    Back-propagate it through a model wrapped in DDP (or anything that averages gradients over all ranks).
    """
    ce = torch.nn.functional.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]),
        shift_labels.reshape(-1).to(logits.device),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return causal_lm_loss(ce, shift_labels, num_items_in_batch) * loss_scale(mesh, across_dp)


def reduce_loss_for_logging(loss: torch.Tensor, mesh: ContextParallelMesh) -> torch.Tensor:
    """L_g = Σ_{r∈g} ℓ_r / c: the stock rank's loss, identical on every CP rank (detached)."""
    loss = loss.detach().clone()
    if mesh.cp_group is not None:
        dist.all_reduce(loss, group=mesh.cp_group)
    return loss / mesh.cp_size
