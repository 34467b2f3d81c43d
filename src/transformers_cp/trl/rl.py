"""TRL's `GRPOTrainer` and `RLOOTrainer` with context parallelism, exact for every loss type.

Generation runs without CP: every rank of a CP group generates the group's completions with the policy's own
attention (`own_attention` takes CP off the model for the call) from the same prompts and the same random state (the
group's ranks are seeded alike, with the dp rank where TRL adds the process index), and CP rank 0's completions are
broadcast to the group, so the group holds one set whatever the kernels do. vLLM generation is refused in the config.

Scoring runs under CP: each of TRL's fused-head calls (policy, reference model or the policy without its adapter, old
policy) on the padded prompt+completion batch becomes one packed row of documents sharded over the CP group, and the
per-token log-probabilities and entropies are gathered back into TRL's padded layout (`padded_rows.py`). TRL's own
code then computes rewards, advantages, importance ratios, clipping, KL, entropy masks and every loss type's loss
from full sequences, identically on the c ranks of a group (`replicated.py` scales its gradient).

While TRL prepares inputs and computes the loss it sees the d = world / c data-parallel replicas as its processes:
`self.accelerator` is a view whose process count and index are the dp ones and whose gather / reduce / pad run over
the dp group, and the trainer module's `gather` / `gather_object` do the same. Rewards are thus gathered, grouped
and normalised over the same d batches as in a run without CP on d processes, and every logged metric is that run's.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
import trl
from accelerate.utils import set_seed

from .. import changes
from ..gathering import gather_over_dp
from ..modeling import apply_context_parallel, remove_context_parallel
from ..router_loss import replicate_router_loss
from ..state import find_state
from ..trainer import ContextParallelTrainerMixin
from . import padded_rows
from .replicated import ReplicatedLossTrainerMixin


@contextlib.contextmanager
def own_attention(model: torch.nn.Module) -> Iterator[None]:
    """Run `model` (CP applied, padded rows installed) with its own attention and no CP hooks while open: for
    `generate`, which runs whole sequences on one rank with a KV cache. CP is put back as it was on exit."""
    state = find_state(model)
    if state is None:
        yield
        return
    pad_token_id = changes.state(model, padded_rows.NAME).pad_token_id
    remove_context_parallel(model)  # with what depends on it: the padded rows and the router-loss row
    try:
        yield
    finally:
        apply_context_parallel(model, mesh=state.mesh)
        padded_rows.shard_padded_rows(model, state.mesh, pad_token_id)
        replicate_router_loss(model)


class _DataParallelAccelerator:
    """The trainer's accelerator as TRL's GRPO / RLOO code must see it under CP: d = world / c processes."""

    def __init__(self, trainer: ContextParallelTrainerMixin) -> None:
        self._trainer = trainer
        self._accelerator = trainer.accelerator
        self._mesh = trainer.cp_mesh

    def __getattr__(self, name: str) -> Any:
        return getattr(self._accelerator, name)

    @property
    def num_processes(self) -> int:
        return self._mesh.dp_size

    @property
    def process_index(self) -> int:
        return self._mesh.dp_rank

    def gather(self, data):
        return gather_over_dp(data, self._mesh)

    def gather_for_metrics(self, data, use_gather_object: bool = False):
        return self._trainer._gather_over_dp_for_metrics(data, use_gather_object)

    def reduce(self, tensor: torch.Tensor, reduction: str = "mean", scale: float = 1.0) -> torch.Tensor:
        if reduction not in ("sum", "mean"):
            raise ValueError(f"reduction={reduction!r} over data-parallel ranks: only 'sum' and 'mean' are supported")
        tensor = tensor.clone()
        if self._mesh.dp_group is not None:
            dist.all_reduce(tensor, group=self._mesh.dp_group)
        return tensor / self._mesh.dp_size if reduction == "mean" else tensor

    def pad_across_processes(self, tensor: torch.Tensor, dim: int = 0, pad_index: int = 0, pad_first: bool = False):
        if self._mesh.dp_group is None:
            return tensor
        size = torch.tensor(tensor.shape[dim], device=tensor.device)
        dist.all_reduce(size, op=dist.ReduceOp.MAX, group=self._mesh.dp_group)
        missing = int(size) - tensor.shape[dim]
        if missing == 0:
            return tensor
        shape = list(tensor.shape)
        shape[dim] = missing
        pad = tensor.new_full(shape, pad_index)
        return torch.cat([pad, tensor] if pad_first else [tensor, pad], dim=dim)


class _OnPolicyMixin(ReplicatedLossTrainerMixin):
    """What GRPO and RLOO share under CP (see the module docstring)."""

    _trl_trainer: type  # TRL's trainer class, whose module's `gather` / `gather_object` see the dp ranks

    def _setup_context_parallel_data(self) -> None:
        super()._setup_context_parallel_data()
        # TRL seeds each process with seed + process index; the ranks of a CP group are one process of that run.
        set_seed(self.args.seed + self.cp_mesh.dp_rank)

    @contextlib.contextmanager
    def _over_dp(self) -> Iterator[None]:
        """While open, TRL's code sees the dp replicas as its processes (see the module docstring)."""
        module = sys.modules[self._trl_trainer.__module__]
        saved = self.accelerator, module.gather, module.gather_object
        self.accelerator = _DataParallelAccelerator(self)
        module.gather, module.gather_object = partial(gather_over_dp, mesh=self.cp_mesh), self._gather_objects_over_dp
        try:
            yield
        finally:
            self.accelerator, module.gather, module.gather_object = saved

    def _gather_objects_over_dp(self, data: list) -> list:
        """`accelerate.utils.gather_object` over the dp ranks: their lists, concatenated."""
        mesh = self.cp_mesh
        if mesh.dp_group is None:
            return data
        parts = [None] * mesh.dp_size
        dist.all_gather_object(parts, data, group=mesh.dp_group)
        return [item for part in parts for item in part]

    def _prepare_inputs(self, inputs):
        if self.cp_mesh is None:
            return super()._prepare_inputs(inputs)
        with self._over_dp():
            return super(ContextParallelTrainerMixin, self)._prepare_inputs(inputs)

    def _generate_single_turn(self, *args, **kwargs):
        if self.cp_mesh is None:
            return super()._generate_single_turn(*args, **kwargs)
        with own_attention(self.accelerator.unwrap_model(self.model)):
            result = list(super()._generate_single_turn(*args, **kwargs))
        mesh = self.cp_mesh
        if mesh.cp_group is not None:  # one set of completions per group: CP rank 0's
            dist.broadcast_object_list(result, src=dist.get_global_rank(mesh.cp_group, 0), group=mesh.cp_group)
        return tuple(result)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.cp_mesh is None:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        with self._over_dp():
            result = super(ContextParallelTrainerMixin, self).compute_loss(model, inputs, return_outputs)
        return self._replicated_loss(result, return_outputs)


class GRPOTrainer(_OnPolicyMixin, trl.GRPOTrainer):
    """TRL's `GRPOTrainer` with context parallelism from `transformers_cp.trl.GRPOConfig`."""

    _trl_trainer = trl.GRPOTrainer


class RLOOTrainer(_OnPolicyMixin, trl.RLOOTrainer):
    """TRL's `RLOOTrainer` with context parallelism from `transformers_cp.trl.RLOOConfig`."""

    _trl_trainer = trl.RLOOTrainer
