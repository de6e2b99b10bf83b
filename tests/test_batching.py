"""Token-budget batches: no sequence dropped, budgets kept, processes disjoint."""

from __future__ import annotations

import random

import pytest

from ptm_mamba.batching import epoch_batches, plan_batches, split_evenly
from ptm_mamba.errors import PipelineError


def lengths(n=203, seed=0):
    rng = random.Random(seed)
    return [rng.randint(5, 600) for _ in range(n)] + [1500]  # one longer than the budget


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_every_sequence_exactly_once_per_epoch(world_size):
    lens = lengths()
    for epoch in range(3):
        batches = epoch_batches(lens, 1200, 8, seed=1, epoch=epoch, world_size=world_size)
        assert len(batches) % world_size == 0
        per_rank = [batches[r::world_size] for r in range(world_size)]
        seen = [i for rank in per_rank for b in rank for i in b]
        assert sorted(seen) == list(range(len(lens)))  # none dropped, none twice, ranks disjoint
        for b in batches:
            assert len(b) <= 8
            assert len(b) == 1 or len(b) * max(lens[i] for i in b) <= 1200
        assert [len(r) for r in per_rank] == [len(per_rank[0])] * world_size


def test_epochs_differ_but_are_reproducible():
    lens = lengths()
    a = epoch_batches(lens, 1200, 8, seed=1, epoch=0)
    assert a == epoch_batches(lens, 1200, 8, seed=1, epoch=0)
    assert a != epoch_batches(lens, 1200, 8, seed=1, epoch=1)


def test_batches_are_length_sorted_so_padding_is_small():
    lens = lengths()
    batches = plan_batches(lens, 2000, 16)
    padded = sum(len(b) * max(lens[i] for i in b) for b in batches)
    assert padded < 1.15 * sum(lens)


def test_split_evenly_never_drops_and_refuses_impossible():
    assert split_evenly([[0, 1, 2], [3]], 4) == [[0], [1], [2], [3]]
    assert split_evenly([[0, 1, 2, 3], [4]], 2) == [[0, 1, 2, 3], [4]]
    with pytest.raises(PipelineError, match="3 training sequences"):
        split_evenly([[0], [1], [2]], 2)
