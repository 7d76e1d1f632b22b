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
    error on any rank (an empty or missing split, a bad column, a cache the others cannot
    read) is gathered and raised on every rank as the same ``ValueError`` naming ``key``,
    so no rank is left waiting on a closed connection. An empty data set is such an error.

    Args:
        node: the config node (``cfg.dataset``), instantiated with ``tokenizer=tokenizer``.
        key: its config key, for messages (``"dataset"``).
        is_main: True on global rank 0. Collective over the default process group.

    Raises:
        ValueError: some rank could not build the data set, or it is empty.
    """
    import torch.distributed as dist

    from nemo_pp.config import instantiate

    def attempt():
        try:
            dataset = instantiate(node, tokenizer=tokenizer)
            if len(dataset) == 0:
                raise ValueError(
                    f"{key} is empty: check {key}.split, {key}.path_or_dataset and {key}.limit_dataset_samples"
                )
            return dataset, None
        except Exception as exc:  # every failure must reach the other ranks, not only ours
            msg = str(exc)
            return None, msg if msg.startswith(key) else f"{key}: {type(exc).__name__}: {msg}"

    distributed = dist.is_initialized() and dist.get_world_size() > 1
    dataset, error = attempt() if is_main else (None, None)
    if distributed:
        first = [error]
        dist.broadcast_object_list(first, src=0)
        error = first[0]
    if error is None and not is_main:
        dataset, error = attempt()
    if distributed:
        errors = [None] * dist.get_world_size()
        dist.all_gather_object(errors, error)
        error = next((e for e in errors if e is not None), None)
    if error is not None:
        raise ValueError(error)
    return dataset
