"""Data over data-parallel ranks only: the CP ranks of one group read the same examples (each keeps its own shard of
their packed row), so examples are split over the dp size and dp rank, never over all processes.

`ContextParallelSampler` does this for custom loops. The Trainer keeps transformers' samplers and tells accelerate's
dataloader sharding the dp size and rank instead (`shard_dataloader_over_dp`), so that its data order equals a run
without CP on the dp ranks.
"""

from __future__ import annotations

from torch.utils.data import Dataset, DistributedSampler

from .mesh import ContextParallelMesh


class ContextParallelSampler(DistributedSampler):
    """`DistributedSampler` with `num_replicas` = dp size and `rank` = dp rank of `mesh`."""

    def __init__(
        self, dataset: Dataset, mesh: ContextParallelMesh, shuffle: bool = True, seed: int = 0, drop_last: bool = False
    ) -> None:
        super().__init__(
            dataset, num_replicas=mesh.dp_size, rank=mesh.dp_rank, shuffle=shuffle, seed=seed, drop_last=drop_last
        )


def shard_dataloader_over_dp(dataloader, mesh: ContextParallelMesh):
    """Make a dataloader returned by `accelerator.prepare` shard over dp ranks instead of all processes.

    accelerate shards a map-style dataset with a `BatchSamplerShard` (batch i goes to process i mod num_processes,
    with `even_batches` padding) and an iterable one with an `IterableDatasetShard`; both read their `num_processes`
    and `process_index` on every iteration, so setting them to the dp size and rank (as transformers' Trainer does for
    its `BatchRebalanceSampler`) gives every CP rank of a group the batches of its dp rank.
    """
    from accelerate.data_loader import BatchSamplerShard, DataLoaderDispatcher, IterableDatasetShard

    if isinstance(dataloader, DataLoaderDispatcher):
        raise ValueError(
            "context parallelism cannot use accelerate's dispatched dataloader (dispatch_batches=True, the default "
            "for iterable datasets): pass accelerator_config={'dispatch_batches': False} to TrainingArguments."
        )
    shards = [
        obj
        for obj in (
            getattr(dataloader, "batch_sampler", None),
            getattr(dataloader, "sampler", None),
            dataloader.dataset,
        )
        if isinstance(obj, (BatchSamplerShard, IterableDatasetShard))
    ]
    if not shards and mesh.cp_size * mesh.dp_size > 1:
        raise TypeError(
            f"cannot shard {type(dataloader).__name__} over data-parallel ranks; build dataloaders with "
            "accelerator.prepare (as the Trainer does) or use transformers_cp.ContextParallelSampler."
        )
    for shard in shards:
        shard.num_processes = mesh.dp_size
        shard.process_index = mesh.dp_rank
        if mesh.dp_size == 1:
            # On one process accelerate uses no shard wrapper, so the last batch keeps its size: make the wrapper a
            # passthrough instead of letting it fill that batch with examples from the start.
            if isinstance(shard, BatchSamplerShard):
                shard.even_batches = False
            else:
                shard.batch_size = 1
    return dataloader
