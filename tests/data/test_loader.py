"""Batch samplers and loaders: grouping, determinism, exact resume, exact eval sharding."""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch.utils.data import Dataset, RandomSampler, SequentialSampler

from dynadet.data.loader import (
    GroupedBatchSampler,
    InfiniteGroupedBatchSampler,
    ShardSampler,
    aspect_groups,
    build_eval_loader,
    build_train_loader,
    collate,
)


class IndexDataset(Dataset):
    """Item ``i``: a tiny image, and a target recording ``i`` and one draw of each RNG the
    transforms might use (so augmentation reproducibility is visible)."""

    def __init__(self, n: int, portrait: set[int] = frozenset()) -> None:
        self.n = n
        self.aspect_ratios = [0.5 if i in portrait else 1.5 for i in range(n)]
        self.loads = 0

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        self.loads += 1
        draw = (torch.rand(()).item(), float(np.random.rand()), random.random())
        return torch.full((3, 2, 3), float(i)), {"index": i, "draw": draw}


def _ids(batch) -> list[int]:
    return [t["index"] for t in batch[1]]


def test_collate_keeps_lists():
    items = [(torch.zeros(3, 2, 2), {"a": 1}), (torch.ones(3, 4, 5), {"a": 2})]
    images, targets = collate(items)
    assert [im.shape for im in images] == [(3, 2, 2), (3, 4, 5)] and targets == [{"a": 1},
                                                                                {"a": 2}]


def test_aspect_groups():
    assert aspect_groups([0.5, 1.0, 1.7, 0.99]) == [0, 1, 1, 0]


@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize("batch_size", [1, 3, 4])
def test_grouped_batch_sampler(drop_last, batch_size):
    groups = [int(i % 3 == 0) for i in range(23)]
    sampler = RandomSampler(range(23), generator=torch.Generator().manual_seed(0))
    gbs = GroupedBatchSampler(sampler, groups, batch_size, drop_last=drop_last)
    batches = list(gbs)
    assert len(batches) == len(gbs)
    for b in batches:
        assert len({groups[i] for i in b}) == 1
        assert len(b) == batch_size or not drop_last
    flat = [i for b in batches for i in b]
    assert len(flat) == len(set(flat))
    if drop_last:
        assert all(len(b) == batch_size for b in batches)
        per_group = [groups.count(0), groups.count(1)]
        assert len(flat) == sum(c - c % batch_size for c in per_group)
    else:
        assert sorted(flat) == list(range(23))
    # within a group, the sampler's order is kept
    order = list(RandomSampler(range(23), generator=torch.Generator().manual_seed(0)))
    for g in (0, 1):
        assert [i for i in flat if groups[i] == g] == [i for i in order if groups[i] == g][
            : len([i for i in flat if groups[i] == g])
        ]


def test_grouped_batch_sampler_sequential_reference():
    groups = [0, 1, 1, 0, 1, 0, 0, 1, 1]
    batches = list(GroupedBatchSampler(SequentialSampler(range(9)), groups, 2))
    assert batches == [[1, 2], [0, 3], [5, 6], [4, 7], [8]]


def test_infinite_sampler_epochs_and_groups():
    n, bs = 10, 4
    groups = [int(i < 3) for i in range(n)]
    s = InfiniteGroupedBatchSampler(n, bs, seed=3, group_ids=groups)
    batches = list(itertools.islice(s, 50))
    assert all(len(b) == bs and len({groups[i] for i in b}) == 1 for b in batches)
    counts = torch.bincount(torch.tensor([i for b in batches for i in b]), minlength=n)
    assert counts.max() - counts.min() <= 2  # every image is visited about equally often
    # without grouping the stream is the concatenation of per-epoch permutations seed + e
    s = InfiniteGroupedBatchSampler(n, 5, seed=3)
    flat = [i for b in itertools.islice(s, 6) for i in b]
    for e in range(3):
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(3 + e)).tolist()
        assert flat[e * n : (e + 1) * n] == perm


def test_infinite_sampler_smaller_than_batch_and_errors():
    s = InfiniteGroupedBatchSampler(3, 8, seed=0)
    first = next(iter(s))
    assert len(first) == 8 and set(first) == {0, 1, 2}
    with pytest.raises(ValueError, match="empty"):
        InfiniteGroupedBatchSampler(0, 2)
    with pytest.raises(ValueError):
        InfiniteGroupedBatchSampler(4, 2, rank=2, world_size=2)


def test_infinite_sampler_resume_is_exact():
    groups = [int(i % 4 == 0) for i in range(17)]
    full = list(itertools.islice(InfiniteGroupedBatchSampler(17, 3, 7, groups), 40))
    for k in (0, 1, 5, 17, 33):
        resumed = InfiniteGroupedBatchSampler(17, 3, 7, groups, start_iter=k)
        assert list(itertools.islice(resumed, 40 - k)) == full[k:]


def test_infinite_sampler_distributed_shards_each_epoch():
    n, world = 11, 3
    per_rank = -(-n // world)
    epochs = []
    for r in range(world):
        s = InfiniteGroupedBatchSampler(n, per_rank, seed=1, rank=r, world_size=world)
        epochs.append(list(itertools.islice(s, 2)))
    first = [i for r in range(world) for i in epochs[r][0]]
    assert set(first) == set(range(n)) and len(first) == world * per_rank  # padded, all seen
    assert [epochs[r][1] for r in range(world)] != [epochs[r][0] for r in range(world)]


def test_train_loader_deterministic_and_resumes_exactly():
    ds = IndexDataset(13, portrait={0, 4, 5, 9})
    run = list(itertools.islice(build_train_loader(ds, 3, seed=5), 12))
    again = list(itertools.islice(build_train_loader(ds, 3, seed=5), 12))
    other = list(itertools.islice(build_train_loader(ds, 3, seed=6), 12))
    assert [b[1] for b in run] == [b[1] for b in again]
    assert [_ids(b) for b in run] != [_ids(b) for b in other]
    for b in run:
        assert len({ds.aspect_ratios[i] >= 1 for i in _ids(b)}) == 1
        assert all(torch.equal(im, torch.full((3, 2, 3), float(i)))
                   for im, i in zip(b[0], _ids(b), strict=True))
    for k in (1, 4, 9):
        ds.loads = 0
        resumed = build_train_loader(ds, 3, seed=5, start_iter=k)
        first = next(resumed)
        assert ds.loads == 3  # skipped batches were never loaded
        rest = list(itertools.islice(resumed, 11 - k))
        assert [first[1]] + [b[1] for b in rest] == [b[1] for b in run[k:]]  # incl. RNG draws


def test_train_loader_leaves_global_rng_alone_and_ignores_grouping_flag():
    ds = IndexDataset(6, portrait={1})
    state = torch.get_rng_state()
    batches = list(itertools.islice(build_train_loader(ds, 4, aspect_grouping=False), 5))
    assert torch.equal(torch.get_rng_state(), state)
    assert any(1 in _ids(b) and len(set(_ids(b))) > 1 for b in batches)  # mixed groups allowed


def test_train_loader_same_batches_with_workers():
    ds = IndexDataset(9, portrait={2, 3})
    plain = list(itertools.islice(build_train_loader(ds, 2, seed=1), 6))
    workers = list(itertools.islice(build_train_loader(ds, 2, seed=1, num_workers=2), 6))
    assert [b[1] for b in workers] == [b[1] for b in plain]


def test_train_loader_distributed_arguments():
    ds = IndexDataset(8)
    b0 = next(build_train_loader(ds, 4, seed=0, rank=0, world_size=2))
    b1 = next(build_train_loader(ds, 4, seed=0, rank=1, world_size=2))
    assert sorted(_ids(b0) + _ids(b1)) == list(range(8))
    with pytest.raises(RuntimeError, match="not initialised"):
        build_train_loader(ds, 2, distributed=True)
    with pytest.raises(ValueError, match="both"):
        build_train_loader(ds, 2, rank=0)


@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("n", [0, 1, 7])
def test_eval_sharding_covers_each_index_once(world_size, n):
    ds = IndexDataset(n)
    seen = []
    for rank in range(world_size):
        loader = build_eval_loader(ds, batch_size=2, rank=rank, world_size=world_size)
        ids = [i for b in loader for i in _ids(b)]
        assert ids == list(range(rank, n, world_size))  # in order, no padding
        assert len(loader) == -(-len(ids) // 2)
        seen += ids
    assert sorted(seen) == list(range(n))
    assert list(ShardSampler(n, 0, 1)) == list(range(n))


def test_loaders_pick_up_an_initialised_process_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0,
                            world_size=1)
    try:
        ds = IndexDataset(5)
        assert [i for b in build_eval_loader(ds) for i in _ids(b)] == list(range(5))
        assert len(_ids(next(build_train_loader(ds, 2, distributed=True)))) == 2
    finally:
        dist.destroy_process_group()
