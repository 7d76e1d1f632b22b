"""Dataloaders: each data-parallel rank reads its own shard; pp ranks of one group read the same."""

from __future__ import annotations

import itertools
import re

from torch.utils.data import DataLoader, DistributedSampler


class ResumableDistributedSampler(DistributedSampler):
    """``DistributedSampler`` that can start an epoch part-way through, at a position
    given in samples of the whole data-parallel group.

    ``DistributedSampler`` permutes the data set with the seed and epoch, cuts it to a
    multiple of ``num_replicas`` and gives rank r the positions r, r + dp, r + 2 dp, ...
    So the first ``n * dp`` positions of the permutation are exactly what the dp ranks read
    in their first ``n`` samples each, whatever dp is: a position counted in global
    samples resumes the same order at another data-parallel size.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.start = 0

    def set_epoch(self, epoch: int, consumed_samples: int = 0) -> None:
        """Start epoch ``epoch`` after its first ``consumed_samples`` samples (global count).

        Raises:
            ValueError: ``consumed_samples`` is not a multiple of the data-parallel size,
                or exceeds the epoch.
        """
        if consumed_samples % self.num_replicas or consumed_samples > self.total_size:
            raise ValueError(
                f"cannot resume the data at sample {consumed_samples} of epoch {epoch} with {self.num_replicas} "
                f"data-parallel ranks: it must be a multiple of the dp size, at most {self.total_size}; resume "
                "with a data-parallel size that divides the checkpoint's global batch"
            )
        super().set_epoch(epoch)
        self.start = consumed_samples // self.num_replicas

    def __iter__(self):
        return itertools.islice(super().__iter__(), self.start, None)

    def __len__(self) -> int:
        return self.num_samples - self.start


def build_dataloader(dataset, batch_size: int, dp_size: int, dp_rank: int, shuffle: bool, seed: int, collate_fn, num_workers: int = 0) -> DataLoader:
    """A ``DataLoader`` over ``dataset`` sharded by data-parallel rank
    (a :class:`ResumableDistributedSampler`, so a run can resume mid-epoch).

    Partial batches are dropped: a pipeline schedule splits every batch into a fixed
    number of microbatches.

    Raises:
        ValueError: the shard holds less than one batch.
    """
    sampler = ResumableDistributedSampler(dataset, num_replicas=dp_size, rank=dp_rank, shuffle=shuffle, seed=seed, drop_last=True)
    if len(sampler) < batch_size:
        raise ValueError(
            f"the data set has {len(dataset)} samples, {len(sampler)} per data-parallel rank: fewer than one batch "
            f"of dataloader.batch_size={batch_size}; use more samples or a smaller batch"
        )
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collate_fn, num_workers=num_workers, drop_last=True)


def data_tools(model_path: str, model_config, pad_seq_len_divisible: int | None):
    """``(tokenizer, processor, collate_fn)`` for a model folder: the tokenizer and
    :class:`~nemo_pp.datasets.utils.SFTCollator` for a text model; for a vision-language model
    (a config with a ``vision_config``) its ``AutoProcessor``, the processor's tokenizer and
    :class:`~nemo_pp.datasets.vlm.VLMCollator` (images batch-major). ``processor`` is None for a
    text model.

    Raises:
        ValueError: a vision-language model folder without a processor.
    """
    from transformers import AutoProcessor, AutoTokenizer

    from nemo_pp.datasets.utils import SFTCollator
    from nemo_pp.datasets.vlm import VLMCollator
    from nemo_pp.models.vlm import is_vision_language

    processor = None
    if is_vision_language(model_config):
        try:
            processor = AutoProcessor.from_pretrained(model_path)
        except (OSError, ValueError) as exc:
            raise ValueError(f"model.pretrained_model_name_or_path: {model_path} is a vision-language model without a "
                             f"processor (its image processor and tokenizer): {exc}") from exc
        tokenizer = processor.tokenizer
    else:
        tokenizer = AutoTokenizer.from_pretrained(model_path)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if processor is not None:
        return tokenizer, processor, VLMCollator(model_config.model_type, pad_id, pad_seq_len_divisible)
    return tokenizer, None, SFTCollator(pad_token_id=pad_id, pad_seq_len_divisible=pad_seq_len_divisible)


def build_dataset_main_first(node, key: str, tokenizer, is_main: bool, processor=None):
    """Instantiate the data set of config ``node`` on the main rank first, then elsewhere.

    The main rank tokenizes and fills ``datasets``' cache; the others then read it. An
    error on any rank (an empty or missing split, a bad column, a cache the others cannot
    read) is gathered and raised on every rank as the same ``ValueError`` naming ``key``,
    so no rank is left waiting on a closed connection. An empty data set is such an error.

    Args:
        node: the config node (``cfg.dataset``), instantiated with ``tokenizer=tokenizer``
            (and ``processor=processor`` when one is given: a vision-language data set).
        key: its config key, for messages (``"dataset"``).
        is_main: True on global rank 0. Collective over the default process group.

    Raises:
        ValueError: some rank could not build the data set, or it is empty.
    """
    import torch.distributed as dist

    from nemo_pp.config import instantiate
    from nemo_pp.errors import first_error_of_all_ranks

    def attempt():
        try:
            dataset = instantiate(node, tokenizer=tokenizer, **({"processor": processor} if processor else {}))
            # a stream's emptiness is checked where it is opened (StreamSource reads its first row)
            if getattr(dataset, "stream", None) is None and len(dataset) == 0:
                raise ValueError(
                    f"{key} is empty: check {key}.split, {key}.path_or_dataset and {key}.limit_dataset_samples"
                )
            return dataset, None
        except Exception as exc:  # every failure must reach the other ranks, not only ours
            # the data set classes name their own keys "dataset.<arg>": say which section
            msg = re.sub(r"\bdataset\.", f"{key}.", str(exc)) if key != "dataset" else str(exc)
            return None, msg if msg.startswith(key) else f"{key}: {type(exc).__name__}: {msg}"

    distributed = dist.is_initialized() and dist.get_world_size() > 1
    dataset, error = attempt() if is_main else (None, None)
    if distributed:
        first = [error]
        dist.broadcast_object_list(first, src=0)
        error = first[0]
    if error is None and not is_main:
        dataset, error = attempt()
    error = first_error_of_all_ranks(error)
    if error is not None:
        raise ValueError(error)
    return dataset


def label_token_share(dataset, max_samples: int = 2000) -> float:
    """Label tokens (not ``-100``) over all tokens of up to ``max_samples`` items of
    ``dataset`` spread evenly over it (items hold ``labels`` lists or tensors; a streamed
    data set: its first ``max_samples``): what a loss that computes label tokens only costs
    relative to one over every position."""
    stream = getattr(dataset, "stream", None)
    if stream is not None:
        labels = [list(s["labels"]) for s in stream.first(max_samples)]
        return sum(1 for row in labels for t in row if t != -100) / max(sum(len(row) for row in labels), 1)
    n = len(dataset)
    if n == 0:
        return 1.0
    stride = max(1, n // max_samples)
    labelled = total = 0
    for i in range(0, n, stride):
        labels = list(dataset[i]["labels"])
        labelled += sum(1 for t in labels if t != -100)
        total += len(labels)
    return labelled / max(total, 1)


# ---------------------------------------------------------------------------------------------
# a streamed training set (dataset.streaming: true)


def build_stream_loader(source, batch_size: int, dp_size: int, dp_rank: int, collate_fn,
                        packed_sequence_size: int = 0) -> DataLoader:
    """A ``DataLoader`` over this data-parallel rank's endless share of a streamed data set
    (:class:`~nemo_pp.datasets.streaming.RankStream`; packed rows when
    ``packed_sequence_size`` > 0). No workers: the stream's position after each batch is
    what a checkpoint saves, and a worker would have read ahead of it.

    Args:
        source: the data set's :class:`~nemo_pp.datasets.streaming.StreamSource` (its ``stream``).
        batch_size: items per batch (samples, or packed rows).
    """
    from nemo_pp.datasets.streaming import RankStream

    return DataLoader(RankStream(source, dp_size, dp_rank, packed_sequence_size), batch_size=batch_size,
                      collate_fn=collate_fn, num_workers=0, drop_last=True)


def is_stream_loader(loader) -> bool:
    """True for a loader of :func:`build_stream_loader`."""
    from nemo_pp.datasets.streaming import RankStream

    return isinstance(getattr(loader, "dataset", None), RankStream)


def stream_step_groups(loader, grad_acc_steps: int, first_step: int, total_steps: int):
    """Yield ``(batches, (step, epoch, samples_in_epoch))`` per optimizer step of a stream
    loader, from step ``first_step + 1`` to ``total_steps``: ``grad_acc_steps`` batches and
    the stream's position after them (``epoch``: the pass over the source; the rows of it the
    data-parallel group consumed)."""
    stream, batches = loader.dataset, iter(loader)
    for step in range(first_step + 1, total_steps + 1):
        group = [next(batches) for _ in range(grad_acc_steps)]
        yield group, (step, stream.position.epoch, stream.global_samples())


def stream_checkpoint_state(loader) -> dict:
    """What a checkpoint's trainer state records of a stream loader (``{}`` for another
    loader): every data-parallel rank's position, gathered over the default process group
    (collective: every rank calls it at the same step).

    Returns:
        ``{STREAM_STATE_KEY: {"dp_size", "packed_sequence_size", "ranks": [{"epoch", "rows"}
        per dp rank]}}`` (JSON-able).
    """
    import dataclasses

    import torch.distributed as dist

    from nemo_pp.planning.checks import STREAM_STATE_KEY

    if not is_stream_loader(loader):
        return {}
    stream = loader.dataset
    mine = (stream.rank, dataclasses.asdict(stream.position))
    everyone = [mine]
    if dist.is_initialized() and dist.get_world_size() > 1:
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, mine)
    by_rank = dict(everyone)  # the pp, cp and tp ranks of one dp rank hold the same position
    return {STREAM_STATE_KEY: {"dp_size": stream.dp, "packed_sequence_size": stream.pack,
                               "ranks": [by_rank[r] for r in range(stream.dp)]}}


def agreed_stream_position(stream_state: dict) -> tuple[int, int] | None:
    """``(epoch, samples_in_epoch)`` every rank records for a checkpoint of a stream: data-parallel
    rank 0's (None for ``{}``, another loader's state). A packed stream's ranks may be passes
    apart, and the checkpoint's folder (``epoch_E_step_S``) must be one name on every rank;
    each rank's own position is in ``ranks``."""
    from nemo_pp.planning.checks import STREAM_STATE_KEY

    if not stream_state:
        return None
    saved = stream_state[STREAM_STATE_KEY]
    first = saved["ranks"][0]
    return int(first["epoch"]), int(first["rows"]) * int(saved["dp_size"])


def restore_stream(loader, trainer_state: dict) -> None:
    """Position a stream loader where ``trainer_state`` (a checkpoint's) left it; nothing for
    another loader. Unpacked, the global ``samples_in_epoch`` gives every rank's row at any dp
    size; packed, this dp rank's saved position (the plan refused another dp size or row
    length: :func:`~nemo_pp.planning.checks.check_stream_resume`)."""
    from nemo_pp.datasets.streaming import StreamPosition
    from nemo_pp.planning.checks import STREAM_STATE_KEY

    if not is_stream_loader(loader):
        return
    stream = loader.dataset
    if stream.pack:
        stream.restore(StreamPosition(**trainer_state[STREAM_STATE_KEY]["ranks"][stream.rank]))
    else:
        stream.restore(StreamPosition(int(trainer_state["epoch"]), int(trainer_state["samples_in_epoch"]) // stream.dp))
