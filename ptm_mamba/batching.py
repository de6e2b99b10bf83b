"""Length-sorted batches under a token budget that never drop a sequence.

The original PTM-Mamba batches by count and then drops random sequences when a
batch exceeds its token budget. Here a batch is formed so that
``len(batch) * longest <= max_tokens`` (and ``len(batch) <= max_batch_size``)
from the start; a sequence longer than the budget on its own gets a batch of
its own. Every sequence is in exactly one batch.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .errors import PipelineError
from .masking import stable_seed


def plan_batches(lengths: Sequence[int], max_tokens: int, max_batch_size: int | None = None,
                 order: Sequence[int] | None = None) -> list[list[int]]:
    """Group indices, taken in ``order`` (default: longest first), into token-budget batches.

    ``order`` should be sorted by length, longest first, so that the first
    member of a batch is its longest and padding stays small.
    """
    if order is None:
        order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    for i in order:
        b = batches[-1] if batches else None
        if (b and (len(b) + 1) * max(lengths[b[0]], lengths[i]) <= max_tokens
                and (max_batch_size is None or len(b) < max_batch_size)):
            b.append(i)
        else:
            batches.append([i])
    return batches


def split_evenly(batches: list[list[int]], world_size: int) -> list[list[int]]:
    """Split the largest batches in two until every process gets the same number of batches.

    Processes of one training step must take the same number of optimiser
    steps (gradients are all-reduced), and no sequence may be dropped.
    """
    batches = [list(b) for b in batches]
    while len(batches) % world_size:
        largest = max(range(len(batches)), key=lambda j: len(batches[j]))
        if len(batches[largest]) < 2:
            raise PipelineError(f"{sum(map(len, batches))} training sequences cannot be shared by "
                                f"{world_size} processes without dropping some: use fewer processes")
        b = batches.pop(largest)
        half = len(b) // 2
        batches[largest:largest] = [b[:half], b[half:]]
    return batches


def epoch_batches(lengths: Sequence[int], max_tokens: int, max_batch_size: int, *, seed: int, epoch: int,
                  world_size: int = 1) -> list[list[int]]:
    """The training batches of one epoch, in the order they run (process r takes r, r+N, ...).

    Sequences are sorted by length with random tie-breaks, cut into budget
    batches, and the batch order is shuffled; both depend only on (seed, epoch).
    """
    rng = np.random.default_rng(stable_seed("batches", seed, epoch))
    noise = rng.random(len(lengths))
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], noise[i]))
    batches = plan_batches(lengths, max_tokens, max_batch_size, order)
    batches = [batches[j] for j in rng.permutation(len(batches))]
    return split_evenly(batches, world_size)
