"""Evaluation outputs and metrics gathered over the data-parallel ranks only: after CP, the ranks of one CP group hold
equal values (or parts of one sum), so gathering them as accelerate gathers over every process of a run without CP
means gathering over the dp ranks."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.distributed as dist

from .mesh import ContextParallelMesh


def gather_over_dp(data, mesh: ContextParallelMesh):
    """`accelerator.gather` over the dp ranks only: tensors (or nests of them) concatenated along dim 0."""
    from accelerate.utils import recursively_apply

    if mesh.dp_group is None:
        return data

    def gather(tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor[None] if tensor.dim() == 0 else tensor  # as accelerate gathers scalars
        parts = [torch.empty_like(tensor) for _ in range(mesh.dp_size)]
        dist.all_gather(parts, tensor.contiguous(), group=mesh.dp_group)
        return torch.cat(parts, dim=0)

    return recursively_apply(gather, data)


def gather_over_dp_for_metrics(data, mesh: ContextParallelMesh, accelerator, args, use_gather_object: bool = False):
    """`accelerator.gather_for_metrics` over the dp ranks only (`args`: the Trainer's, for `eval_use_gather_object`)."""
    from accelerate.utils import recursively_apply

    try:
        recursively_apply(lambda x: x, data, error_on_other_type=True)
    except TypeError:
        use_gather_object = True
    if use_gather_object or args.eval_use_gather_object:
        parts = [None] * mesh.dp_size
        if mesh.dp_group is not None:
            dist.all_gather_object(parts, data, group=mesh.dp_group)
        else:
            parts = [data]
        data = [item for part in parts for item in part]
    else:
        data = gather_over_dp(data, mesh)
    # As accelerate's gather_for_metrics: drop what `even_batches` repeated to fill the last batch.
    state = accelerator.gradient_state
    if state.end_of_dataloader and state.remainder > 0:
        if isinstance(data, list):
            return data[: state.remainder]
        try:
            return recursively_apply(lambda tensor: tensor[: state.remainder], data)
        except IndexError:  # a scalar (one process): returned as is, as accelerate does
            return data
    return data


@contextlib.contextmanager
def metrics_over_dp(accelerator, mesh: ContextParallelMesh, args, shard_sums: bool) -> Iterator[None]:
    """While open, `accelerator.gather` and `gather_for_metrics` give what they give on the dp ranks of a run without
    CP, for code (TRL's metrics) that gathers one value per process. With `shard_sums` each CP rank holds its shard's
    part of a sum, which is summed over the CP group first; otherwise the CP ranks hold equal values."""
    from accelerate.utils import recursively_apply

    def per_group(data):
        if not shard_sums or mesh.cp_group is None:
            return data

        def reduce(tensor: torch.Tensor) -> torch.Tensor:
            tensor = tensor.detach().clone()
            dist.all_reduce(tensor, group=mesh.cp_group)
            return tensor

        return recursively_apply(reduce, data)

    accelerator.gather = lambda data: gather_over_dp(per_group(data), mesh)
    accelerator.gather_for_metrics = lambda data, use_gather_object=False: gather_over_dp_for_metrics(
        per_group(data), mesh, accelerator, args, use_gather_object
    )
    try:
        yield
    finally:
        del accelerator.gather, accelerator.gather_for_metrics
