"""The training data loader alone vs the quickstart model's training step, on the same batches.

    python benchmarks/loader.py [--config quickstart] [--images 64] [--size 192 240]
                                [--batches 10] [--warmup 2] [--workers N] [--threads 0]
                                [--device cpu] [--data DIR]

Writes the synthetic shapes data set (``--images`` images of about ``--size``, the quickstart's
default size) into a temporary folder (or ``--data``), builds the config's train data set
(its augmentations) and a :class:`dynadet.engine.train.Trainer` from the config, then measures
``--batches`` batches of the config's ``train.batch_size`` each, after ``--warmup`` untimed ones:

1. a 0-worker loop, interleaved: load a batch with
   :func:`dynadet.data.loader.build_train_loader` in the main process (what one worker spends
   per batch), then ``Trainer.step`` on that batch (forward, backward, gradient clipping,
   optimizer and scheduler step) — both timed, so machine load hits them alike;
2. the loader alone with the config's ``data.num_workers`` (or ``--workers``); the time to the
   first batch, worker start-up included, is shown apart;
3. ``Trainer.step`` fed by a live loader with those workers, and how long the loop waited for
   the next batch: the data pipeline is the bottleneck only if that wait is a sizeable share
   of the step.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from dynadet.config import load_config
from dynadet.data.loader import Batch, build_train_loader
from dynadet.data.synthetic import write_synthetic_dataset
from dynadet.engine.train import Trainer

BOTTLENECK_SHARE = 0.05  # waiting more than this share of a step counts as a bottleneck


class TimedIterator:
    """Wraps a batch iterator and adds up the seconds spent in ``next()`` (``wait_s``)."""

    def __init__(self, batches: Iterator[Batch]) -> None:
        self.batches = batches
        self.wait_s = 0.0

    def __iter__(self) -> TimedIterator:
        return self

    def __next__(self) -> Batch:
        start = time.perf_counter()
        batch = next(self.batches)
        self.wait_s += time.perf_counter() - start
        return batch


def new_loader(trainer: Trainer, workers: int) -> Iterator[Batch]:
    """A fresh training loader of the trainer's data set, batch size and seed."""
    return build_train_loader(
        trainer.dataset,
        trainer.batch_per_step,
        num_workers=workers,
        seed=int(trainer.tcfg.get("seed", 0)),
        aspect_grouping=bool(trainer.cfg["data"].get("aspect_grouping", True)),
    )


def _sync(trainer: Trainer) -> None:
    if trainer.device.type == "cuda":
        torch.cuda.synchronize(trainer.device)


def load_then_step(trainer: Trainer, warmup: int, n: int) -> tuple[float, float]:
    """``(load ms, step ms)`` per batch of a 0-worker loop, means over ``n`` after ``warmup``."""
    batches = new_loader(trainer, 0)
    load_s = step_s = 0.0
    for i in range(warmup + n):
        start = time.perf_counter()
        batch = next(batches)
        loaded = time.perf_counter()
        trainer.step(iter([batch]))  # returns Python floats: the step has finished
        _sync(trainer)
        if i >= warmup:
            load_s += loaded - start
            step_s += time.perf_counter() - loaded
    return load_s * 1000 / n, step_s * 1000 / n


def time_loader(trainer: Trainer, workers: int, warmup: int, n: int) -> tuple[float, float]:
    """``(first batch ms, mean ms per batch after warm-up)`` of a fresh loader, no training."""
    batches = new_loader(trainer, workers)
    start = time.perf_counter()
    next(batches)
    first_ms = (time.perf_counter() - start) * 1000
    for _ in range(warmup - 1):
        next(batches)
    start = time.perf_counter()
    for _ in range(n):
        next(batches)
    per_batch_ms = (time.perf_counter() - start) * 1000 / n
    del batches  # shuts its workers down
    return first_ms, per_batch_ms


def live_steps(trainer: Trainer, workers: int, warmup: int, n: int) -> tuple[float, float]:
    """``(step ms, ms waiting for data)`` per step fed by a live loader, after ``warmup``."""
    batches = TimedIterator(new_loader(trainer, workers))
    for _ in range(warmup):
        trainer.step(batches)
    _sync(trainer)
    batches.wait_s = 0.0
    start = time.perf_counter()
    for _ in range(n):
        trainer.step(batches)
    _sync(trainer)
    return (time.perf_counter() - start) * 1000 / n, batches.wait_s * 1000 / n


def make_trainer(args: argparse.Namespace, root: Path) -> Trainer:
    """A set-up Trainer of ``args.config`` on the synthetic data set under ``root``."""
    data_dir = Path(args.data) if args.data else root / "data"
    paths = write_synthetic_dataset(
        data_dir, args.images, seed=0, height=args.size[0], width=args.size[1], progress=False
    )
    cfg: dict[str, Any] = load_config(args.config)
    split = {"ann_file": str(paths["train"]), "image_dir": str(paths["images"])}
    cfg["data"]["train"] = split
    cfg["data"]["val"] = dict(split)
    if args.workers is not None:
        cfg["data"]["num_workers"] = args.workers
    cfg["train"]["tensorboard"] = False
    cfg["train"]["max_iters"] = 4 * (args.warmup + args.batches)  # schedule length only
    trainer = Trainer(cfg, root / "run", device=args.device)
    trainer.setup()
    return trainer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="quickstart", help="preset or YAML (quickstart)")
    parser.add_argument("--images", type=int, default=64, help="synthetic images (64)")
    parser.add_argument("--size", type=int, nargs=2, default=[192, 240], metavar=("H", "W"),
                        help="mean synthetic image size (192 240, the quickstart's)")
    parser.add_argument("--batches", type=int, default=10, help="timed batches / steps (10)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed batches / steps first (2)")
    parser.add_argument("--workers", type=int, default=None,
                        help="loader workers (default: the config's data.num_workers)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: as is)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--data", default=None, help="synthetic data folder (default: temporary)")
    args = parser.parse_args(argv)
    if args.batches < 1 or args.warmup < 1:
        parser.error("--batches and --warmup must be >= 1")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")

    with tempfile.TemporaryDirectory(prefix="dynadet-loader-") as tmp:
        trainer = make_trainer(args, Path(tmp))
        trainer.loader = None  # setup() started one; each measurement makes its own
        workers = int(trainer.cfg["data"].get("num_workers", 0))
        bs = trainer.batch_per_step
        main_ms, step_ms = load_then_step(trainer, args.warmup, args.batches)
        if workers:
            first_ms, worker_ms = time_loader(trainer, workers, args.warmup, args.batches)
        live_ms, wait_ms = live_steps(trainer, workers, args.warmup, args.batches)
        n_train = len(trainer.dataset)

    load_after = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"torch {torch.__version__} on {trainer.device} ({platform.machine()}), "
        f"{torch.get_num_threads()} thread(s), load {load_before:.2f} before / "
        f"{load_after:.2f} after; config {args.config}, {n_train} synthetic training images of "
        f"about {args.size[0]}×{args.size[1]}, batch {bs}; mean of {args.batches} batches "
        f"after {args.warmup} warm-up\n"
    )
    print(f"| measured | workers | ms per batch of {bs} | images/s | / train step |")
    print("|:---|---:|---:|---:|---:|")

    def row(what: str, w: object, ms: float, note: str = "") -> None:
        print(f"| {what} | {w} | {ms:.1f}{note} | {bs / ms * 1000:.1f} | {ms / step_ms:.2f}× |")

    row("1. load a batch (main process)", 0, main_ms)
    row("1. train step on that batch", "–", step_ms)
    if workers:
        row("2. loader alone, no training", workers, worker_ms, f" (first {first_ms:.0f})")
    row("3. train step fed by a live loader", workers, live_ms)
    print(f"| 3. … of which waiting for data | {workers} | {wait_ms:.1f} | – | "
          f"{wait_ms / step_ms:.2f}× |")
    share = wait_ms / live_ms
    verdict = "not the bottleneck" if share < BOTTLENECK_SHARE else "a BOTTLENECK"
    print(
        f"\nloading a batch costs {main_ms / step_ms:.2f}× a training step in one process; "
        f"with {workers} worker(s) the loop waited {wait_ms:.1f} ms per step ({100 * share:.1f} % "
        f"of the step): data loading is {verdict} (threshold {100 * BOTTLENECK_SHARE:.0f} %)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
