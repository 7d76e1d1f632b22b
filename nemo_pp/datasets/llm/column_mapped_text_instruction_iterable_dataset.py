"""NeMo AutoModel's ``ColumnMappedTextInstructionIterableDataset``: the column-mapped
instruction data set, always streamed (same name and module path, so a NeMo YAML's
``_target_`` resolves here).

YAML::

    dataset:
      _target_: nemo_pp.datasets.llm.column_mapped_text_instruction_iterable_dataset.ColumnMappedTextInstructionIterableDataset
      path_or_dataset_id: /data/my_instructions.jsonl
      column_mapping: {question: inputs, answer: targets}
      seq_length: 256
"""

from __future__ import annotations

from typing import Any, Iterator

import torch

from nemo_pp.datasets.llm.column_mapped_text_instruction_dataset import ColumnMappedTextInstructionDataset


class ColumnMappedTextInstructionIterableDataset(ColumnMappedTextInstructionDataset, torch.utils.data.IterableDataset):
    """:class:`~nemo_pp.datasets.llm.column_mapped_text_instruction_dataset.ColumnMappedTextInstructionDataset`
    with ``streaming=True`` always (a ``streaming`` argument other than true is refused).

    Iterating yields ``{"input_ids": list[int], "labels": list[int]}``: one pass, or pass
    after pass with ``repeat_on_exhaustion`` (NeMo's default). The recipe does not iterate
    the object: it reads :attr:`stream` per data-parallel rank and starts a new pass at the
    end of each whatever ``repeat_on_exhaustion`` says (the run's length is
    ``step_scheduler.max_steps``).

    Args:
        repeat_on_exhaustion: iterating starts the stream again at its end.
        **kwargs: the map-style class's arguments.

    Raises:
        ValueError: ``streaming`` given and not true; any error of the map-style class.
    """

    always_streams = True

    def __init__(self, *args: Any, repeat_on_exhaustion: bool = True, streaming: bool = True, **kwargs: Any):
        if streaming is not True:
            raise ValueError("dataset.streaming: ColumnMappedTextInstructionIterableDataset always streams; use "
                             "ColumnMappedTextInstructionDataset for a map-style data set")
        super().__init__(*args, streaming=True, **kwargs)
        self.repeat_on_exhaustion = bool(repeat_on_exhaustion)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        while True:
            yield from self.stream.samples()
            if not self.repeat_on_exhaustion:
                return
