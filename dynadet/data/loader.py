"""Batching for iteration-based training and exactly-sharded evaluation.

Training draws an endless, deterministic stream of index batches: "epoch" ``e`` is a permutation
seeded with ``seed + e`` (through ``DistributedSampler.set_epoch(e)`` when distributed), indices
are grouped by aspect ratio (w/h ≥ 1 or < 1) into full batches, and a partial batch carries over
into the next epoch. Batch ``k`` is a pure function of ``(seed, rank, world_size, k)``, so a run
resumed at iteration ``k`` skips ``k`` index batches — no image is loaded for them — and then
yields what the uninterrupted run would. Each sample is loaded under RNG states seeded from
``(seed, rank, iteration, position)``, so augmentations are reproducible too, independent of
the number of workers.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import itertools
import random
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler
from torch.utils.data.distributed import DistributedSampler

Batch = tuple[list[Tensor], list[dict[str, Any]]]


def collate(batch: Sequence[tuple[Tensor, dict[str, Any]]]) -> Batch:
    """``[(image, target), ...]`` → ``(list[Tensor[3, H_i, W_i]], list[target])`` (no padding;
    the model pads)."""
    return [item[0] for item in batch], [item[1] for item in batch]


def aspect_groups(aspect_ratios: Sequence[float]) -> list[int]:
    """Group id per image: ``1`` for landscape/square (w/h ≥ 1), ``0`` for portrait."""
    return [int(a >= 1.0) for a in aspect_ratios]


class GroupedBatchSampler(Sampler[list[int]]):
    """Batches of ``batch_size`` indices from one aspect group, drawn from ``sampler``.

    A batch is emitted as soon as its group's buffer is full, keeping the sampler's order within
    each group. At the end, leftovers are emitted as partial batches (one per group, in group
    order) unless ``drop_last``; so with ``drop_last=False`` every sampled index appears once.
    ``len()`` is exact: it iterates a copy of ``sampler`` without advancing any RNG (a sampler
    whose order depends on other hidden state should not be asked for its length).
    """

    def __init__(
        self,
        sampler: Iterable[int],
        group_ids: Sequence[int],
        batch_size: int,
        drop_last: bool = False,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.sampler = sampler
        self.group_ids = list(group_ids)
        self.batch_size = batch_size
        self.drop_last = drop_last

    def __iter__(self) -> Iterator[list[int]]:
        buffers: dict[int, list[int]] = {}
        for idx in self.sampler:
            buf = buffers.setdefault(self.group_ids[idx], [])
            buf.append(idx)
            if len(buf) == self.batch_size:
                yield buf[:]
                buf.clear()
        if not self.drop_last:
            for g in sorted(buffers):
                if buffers[g]:
                    yield buffers[g]

    def __len__(self) -> int:
        # count on a shallow copy with a cloned generator, under a forked global RNG, so that
        # len() (which list() calls too) does not advance any random state the next epoch uses
        sampler = copy.copy(self.sampler)
        gen = getattr(sampler, "generator", None)
        if isinstance(gen, torch.Generator):
            clone = torch.Generator(device=gen.device)
            clone.set_state(gen.get_state())
            sampler.generator = clone  # type: ignore[attr-defined]
        counts: dict[int, int] = {}
        with torch.random.fork_rng(devices=[]):
            for idx in sampler:
                counts[self.group_ids[idx]] = counts.get(self.group_ids[idx], 0) + 1
        if self.drop_last:
            return sum(c // self.batch_size for c in counts.values())
        return sum(-(-c // self.batch_size) for c in counts.values())


class InfiniteGroupedBatchSampler(Sampler[list[int]]):
    """Endless stream of full index batches for iteration-based training.

    Epoch ``e`` visits a permutation of ``range(size)`` seeded with ``seed + e`` — on rank
    ``rank`` of ``world_size`` the share a ``DistributedSampler(seed=seed)`` gives after
    ``set_epoch(e)``. Indices are bucketed by ``group_ids`` (all 0 → no grouping); a bucket is
    yielded when it holds ``batch_size`` indices, and buckets carry over between epochs, so every
    batch is full even when the data set is smaller than a batch. Iteration starts at batch
    ``start_iter``; the skipped batches are computed (cheap index arithmetic) but not yielded.
    """

    def __init__(
        self,
        size: int,
        batch_size: int,
        seed: int = 0,
        group_ids: Sequence[int] | None = None,
        rank: int = 0,
        world_size: int = 1,
        start_iter: int = 0,
    ) -> None:
        if size < 1:
            raise ValueError("cannot train on an empty data set (after filtering)")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.size = size
        self.batch_size = batch_size
        self.seed = seed
        self.group_ids = list(group_ids) if group_ids is not None else [0] * size
        self.rank, self.world_size = rank, world_size
        self.start_iter = start_iter

    def _epoch_indices(self, epoch: int) -> Iterable[int]:
        if self.world_size > 1:
            # padding (drop_last=False) keeps every rank fed even when size < world_size
            sampler = DistributedSampler(
                range(self.size), num_replicas=self.world_size, rank=self.rank,
                shuffle=True, seed=self.seed, drop_last=False,
            )  # fmt: skip
            sampler.set_epoch(epoch)
            return sampler
        g = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(self.size, generator=g).tolist()

    def __iter__(self) -> Iterator[list[int]]:
        stream = itertools.chain.from_iterable(
            self._epoch_indices(e) for e in itertools.count()
        )
        batches = GroupedBatchSampler(stream, self.group_ids, self.batch_size, drop_last=True)
        return itertools.islice(iter(batches), self.start_iter, None)


class _SeededBatches(Sampler[list[tuple[int, int]]]):
    """Pairs each index of batch ``k`` with a seed derived from ``(seed, rank, k, position)``."""

    def __init__(self, batches: InfiniteGroupedBatchSampler) -> None:
        self.batches = batches

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        b = self.batches
        for k, batch in enumerate(b, start=b.start_iter):
            yield [(i, _sample_seed(b.seed, b.rank, k, p)) for p, i in enumerate(batch)]


def _sample_seed(seed: int, rank: int, iteration: int, position: int) -> int:
    state = np.random.SeedSequence([seed, rank, iteration, position]).generate_state(2)
    return int(state[0]) << 32 | int(state[1]) >> 1  # < 2**63, a valid torch seed


@contextlib.contextmanager
def _rng_seeded(seed: int) -> Iterator[None]:
    """Seeds torch (CPU), NumPy and ``random`` for the block, then restores their states, so
    loading in the main process (``num_workers=0``) leaves the training RNG untouched."""
    np_state, py_state = np.random.get_state(), random.getstate()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        np.random.seed(seed % 2**32)
        random.seed(seed)
        try:
            yield
        finally:
            np.random.set_state(np_state)
            random.setstate(py_state)


class _SeededDataset(Dataset):
    """``dataset[(index, seed)]`` → ``dataset[index]`` loaded under :func:`_rng_seeded`."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __getitem__(self, key: tuple[int, int]) -> Any:
        index, seed = key
        with _rng_seeded(seed):
            return self.dataset[index]


def seed_worker(worker_id: int, base_seed: int = 0) -> None:
    """DataLoader ``worker_init_fn``: seeds torch, NumPy and ``random`` from
    ``base_seed + worker_id`` for any randomness outside the per-sample seeding."""
    s = base_seed + worker_id
    torch.manual_seed(s)
    np.random.seed(s % 2**32)
    random.seed(s)


def _dist_info(
    distributed: bool | None, rank: int | None, world_size: int | None
) -> tuple[int, int]:
    if rank is not None or world_size is not None:
        if rank is None or world_size is None:
            raise ValueError("give both rank and world_size, or neither")
        return rank, world_size
    initialised = dist.is_available() and dist.is_initialized()
    if distributed and not initialised:
        raise RuntimeError("distributed=True but torch.distributed is not initialised; "
                           "launch with torchrun or call init_process_group first")
    if initialised and distributed is not False:
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def build_train_loader(
    dataset: Dataset,
    batch_size: int,
    num_workers: int = 0,
    seed: int = 0,
    aspect_grouping: bool = True,
    distributed: bool | None = None,
    start_iter: int = 0,
    rank: int | None = None,
    world_size: int | None = None,
) -> Iterator[Batch]:
    """Endless iterator of training batches ``(list[Tensor[3, H, W]], list[target])``.

    ``batch_size`` is PER RANK: with ``W`` processes a step sees ``W * batch_size`` images.
    ``distributed=None`` shards across ranks when ``torch.distributed`` is initialised
    (``rank``/``world_size`` override that, for tests). Deterministic for a given ``seed``;
    ``start_iter=k`` yields exactly the batches an uninterrupted run yields from iteration
    ``k`` on, without loading the skipped ones. Aspect grouping uses ``dataset.aspect_ratios``
    when the data set has it. Workers are seeded by :func:`seed_worker` from
    ``seed + 1000 * rank``; per-sample seeding makes augmentations independent of them.
    """
    rank, world_size = _dist_info(distributed, rank, world_size)
    ratios = getattr(dataset, "aspect_ratios", None) if aspect_grouping else None
    batches = InfiniteGroupedBatchSampler(
        len(dataset),  # type: ignore[arg-type]
        batch_size,
        seed=seed,
        group_ids=aspect_groups(ratios) if ratios is not None else None,
        rank=rank,
        world_size=world_size,
        start_iter=start_iter,
    )
    loader = DataLoader(
        _SeededDataset(dataset),
        batch_sampler=_SeededBatches(batches),
        num_workers=num_workers,
        collate_fn=collate,
        worker_init_fn=functools.partial(seed_worker, base_seed=seed + 1000 * rank),
        # an explicit generator keeps DataLoader from drawing its worker base seed from the
        # global RNG, which would shift the training RNG by a data-loading detail
        generator=torch.Generator().manual_seed(seed),
        persistent_workers=False,
    )
    return iter(loader)


class ShardSampler(Sampler[int]):
    """Indices ``rank, rank + W, rank + 2W, ...`` of ``range(size)``: exact sharding, no padding
    or duplicates, so the shards of all ranks cover each index once."""

    def __init__(self, size: int, rank: int = 0, world_size: int = 1) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.indices = range(rank, size, world_size)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def build_eval_loader(
    dataset: Dataset,
    batch_size: int = 1,
    num_workers: int = 0,
    distributed: bool | None = None,
    rank: int | None = None,
    world_size: int | None = None,
) -> DataLoader:
    """In-order evaluation loader of ``(list[Tensor[3, H, W]], list[target])`` batches.

    With ``torch.distributed`` initialised (or explicit ``rank``/``world_size``) rank ``r`` gets
    indices ``r, r + W, ...`` — unlike ``DistributedSampler`` nothing is padded, so predictions
    gathered from all ranks cover each image exactly once.
    """
    rank, world_size = _dist_info(distributed, rank, world_size)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=ShardSampler(len(dataset), rank, world_size),  # type: ignore[arg-type]
        num_workers=num_workers,
        collate_fn=collate,
        worker_init_fn=functools.partial(seed_worker, base_seed=1000 * rank),
        generator=torch.Generator().manual_seed(0),
    )
