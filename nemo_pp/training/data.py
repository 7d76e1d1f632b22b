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


def build_dataset_main_first(node, key: str, tokenizer, is_main: bool):
    """Instantiate the data set of config ``node`` on the main rank first, then elsewhere.

    The main rank tokenizes and fills ``datasets``' cache; the others then read it. An
    error on the main rank (an empty or missing split, a bad column) is sent to every
    rank and raised there as the same ``ValueError`` naming ``key``, so no rank is left
    waiting on a closed connection. An empty data set is such an error.

    Args:
        node: the config node (``cfg.dataset``), instantiated with ``tokenizer=tokenizer``.
        key: its config key, for messages (``"dataset"``).
        is_main: True on global rank 0. Collective over the default process group.

    Raises:
        ValueError: the main rank could not build the data set, or it is empty.
    """
    import torch.distributed as dist

    from nemo_pp.config import instantiate

    def build():
        dataset = instantiate(node, tokenizer=tokenizer)
        if len(dataset) == 0:
            raise ValueError(f"{key} is empty: check {key}.split, {key}.path_or_dataset and {key}.limit_dataset_samples")
        return dataset

    dataset, error = None, [None]
    if is_main:
        try:
            dataset = build()
        except Exception as exc:  # every failure must reach the other ranks, not only ours
            msg = str(exc)
            error[0] = msg if msg.startswith(key) else f"{key}: {type(exc).__name__}: {msg}"
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(error, src=0)
    if error[0] is not None:
        raise ValueError(error[0])
    return dataset if is_main else build()
