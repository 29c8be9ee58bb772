"""Length-grouped batching for ``examples/train.py`` (``--group_by_length``), as transformers'
``group_by_length``: a batch pads to its longest tweet, so batches of similar lengths waste less.

``LengthGroupedSampler`` shuffles the training rows with a generator seeded by ``(seed, epoch)`` (so an
epoch's order is a function of the epoch alone: a run resumed mid-epoch skips into the same order), cuts
the permutation into mega-batches of ``mega_batch_factor`` global batches, sorts each mega-batch by
length (longest first) and yields the rows in that order. Consecutive batches, and the micro-batches of
one optimiser step that Accelerate hands to the processes of a data-parallel run, therefore hold tweets
of similar lengths, while the mega-batches keep the epoch random.

``padding_fraction`` measures the waste: the share of the padded (batch x longest) token grid that is
padding, for the sub-word axis or the word axis.
"""

from __future__ import annotations

from typing import Iterator, List, Optional, Sequence

import torch
from torch.utils.data import Sampler

__all__ = ["LengthGroupedSampler", "batches_of", "padding_fraction", "random_batches", "train_sampler", "tweet_lengths"]


class LengthGroupedSampler(Sampler[int]):
    """Row indices in length-grouped random order (module docstring).

    Args:
        lengths: one length per row (words of the tweet).
        batch_size: the global batch (tweets per optimiser step over all processes).
        seed: the run's seed; the epoch's order is drawn from ``seed`` and the epoch (``set_epoch``).
        mega_batch_factor: global batches per sorted mega-batch (transformers uses 50).
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int = 0, mega_batch_factor: int = 50):
        if batch_size < 1 or mega_batch_factor < 1:
            raise ValueError(f"batch_size ({batch_size}) and mega_batch_factor ({mega_batch_factor}) must be >= 1")
        self.lengths = [int(length) for length in lengths]
        self.mega_batch = batch_size * mega_batch_factor
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def order(self) -> List[int]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        permutation = torch.randperm(len(self.lengths), generator=generator).tolist()
        rows: List[int] = []
        for start in range(0, len(permutation), self.mega_batch):
            chunk = permutation[start:start + self.mega_batch]
            rows.extend(sorted(chunk, key=lambda i: -self.lengths[i]))  # stable: ties keep the random order
        return rows

    def __iter__(self) -> Iterator[int]:
        return iter(self.order())


def padding_fraction(lengths: Sequence[int], batches: Sequence[Sequence[int]]) -> float:
    """Padding share of the grids ``len(batch) x max length in batch`` over ``batches`` (row indices)."""
    padded = real = 0
    for batch in batches:
        if not batch:
            continue
        longest = max(lengths[i] for i in batch)
        padded += longest * len(batch)
        real += sum(lengths[i] for i in batch)
    return 1.0 - real / padded if padded else 0.0


def batches_of(order: Sequence[int], batch_size: int) -> List[List[int]]:
    return [list(order[i:i + batch_size]) for i in range(0, len(order), batch_size)]


def random_batches(count: int, batch_size: int, seed: int = 0) -> List[List[int]]:
    """Shuffled batches (the default loader's order for one epoch, with its own generator)."""
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed)).tolist()
    return batches_of(order, batch_size)


def tweet_lengths(dataset, tokenizer=None) -> List[int]:
    """Each row's sub-word count under ``tokenizer`` ([CLS] and [SEP] included; what the text encoder
    pads), or its word count without one."""
    words = dataset["words"]
    if tokenizer is None:
        return [len(row) for row in words]
    lengths = []
    for start in range(0, len(words), 1024):
        chunk = [list(row) for row in words[start:start + 1024]]
        lengths.extend(len(ids) for ids in tokenizer(chunk, is_split_into_words=True)["input_ids"])
    return lengths


def train_sampler(dataset, batch_size: int, group_by_length: bool, seed: int, tokenizer=None) -> Optional[LengthGroupedSampler]:
    """The training loader's sampler: None (plain shuffling) or a ``LengthGroupedSampler`` over the
    rows' sub-word counts (``tweet_lengths``) with the global ``batch_size``."""
    if not group_by_length:
        return None
    return LengthGroupedSampler(tweet_lengths(dataset, tokenizer), batch_size, seed=seed)

