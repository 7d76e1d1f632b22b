"""Dataloaders: each data-parallel rank reads its own shard; pp ranks of one group read the same."""

from __future__ import annotations

from torch.utils.data import DataLoader, DistributedSampler


def build_dataloader(dataset, batch_size: int, dp_size: int, dp_rank: int, shuffle: bool, seed: int, collate_fn, num_workers: int = 0) -> DataLoader:
    """A ``DataLoader`` over ``dataset`` sharded by data-parallel rank.

    Partial batches are dropped: a pipeline schedule splits every batch into a fixed
    number of microbatches.

    Raises:
        ValueError: the shard holds less than one batch.
    """
    sampler = DistributedSampler(dataset, num_replicas=dp_size, rank=dp_rank, shuffle=shuffle, seed=seed, drop_last=True)
    if len(sampler) < batch_size:
        raise ValueError(
            f"the data set has {len(dataset)} samples, {len(sampler)} per data-parallel rank: fewer than one batch "
            f"of dataloader.batch_size={batch_size}; use more samples or a smaller batch"
        )
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collate_fn, num_workers=num_workers, drop_last=True)
