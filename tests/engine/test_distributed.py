"""Distributed helpers: single-process no-ops, and a 2-process gloo run on CPU.

The 2-process test spawns its own workers (the library never does): each rank evaluates its shard
of 6 images, and rank 0's metrics must equal a single-process evaluation of all 6.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from dynadet.engine.distributed import (
    all_gather_object,
    barrier,
    cleanup,
    get_local_rank,
    get_rank,
    get_world_size,
    init_distributed,
    is_main_process,
    main_process_only,
    on_main,
    reduce_dict,
)
from dynadet.engine.evaluate import detections_to_coco, evaluate
from tests.engine.test_evaluate import FakeDetector, image_for, six_image_setup

WORLD = 2
CLASS_NAMES = ["three", "seven"]


def test_single_process_helpers_are_no_ops(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert init_distributed() is False
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert init_distributed() is False
    assert (get_rank(), get_world_size(), get_local_rank(), is_main_process()) == (0, 1, 0, True)
    barrier()
    cleanup()
    assert all_gather_object({"x": 1}) == [{"x": 1}]
    loss = torch.tensor(2.5, requires_grad=True) * 2
    reduced = reduce_dict({"loss": loss})
    assert reduced["loss"].item() == 5.0 and not reduced["loss"].requires_grad
    assert main_process_only(lambda x: x * 3)(2) == 6
    assert on_main(lambda x, y: x - y, 5, y=1) == 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    # What torchrun would export for this process.
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    assert init_distributed(backend="gloo", timeout=datetime.timedelta(seconds=60))
    try:
        gt, preds = six_image_setup()
        shard = [([image_for(i)], [{"image_id": i}]) for i in range(1 + rank, 7, world)]
        result = evaluate(
            FakeDetector(preds),
            shard,
            gt,
            [3, 7],
            CLASS_NAMES,
            output_dir=Path(out_dir) / "eval",
            progress=False,
        )
        avg = reduce_dict({"b": torch.tensor(2.0 * rank), "a": torch.tensor(rank + 1.0)})
        total = reduce_dict({"a": torch.tensor(rank + 1.0)}, average=False)
        report = {
            "ids": [get_rank(), get_world_size(), get_local_rank(), is_main_process()],
            "result": None if result is None else result.to_dict(),
            "avg": {k: v.item() for k, v in avg.items()},
            "sum": {k: v.item() for k, v in total.items()},
            "gathered": all_gather_object({"rank": rank}),
            "main_only": main_process_only(lambda: rank)(),
            "on_main": on_main(lambda x: x + 10, rank),
        }
        barrier()
        (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(report))
    finally:
        cleanup()


def test_two_process_gloo_evaluation_matches_single_process(tmp_path: Path) -> None:
    ctx = mp.start_processes(
        _worker,
        args=(WORLD, _free_port(), str(tmp_path)),
        nprocs=WORLD,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + 90
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail("2-process evaluation did not finish in 90 s (hang?)")
    finally:
        for p in ctx.processes:  # only the workers this test started
            if p.is_alive():
                p.kill()
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())

    assert r0["ids"] == [0, 2, 0, True] and r1["ids"] == [1, 2, 1, False]
    assert r1["result"] is None
    for r in (r0, r1):
        assert r["avg"] == {"a": 1.5, "b": 1.0} and r["sum"] == {"a": 3.0}
        assert r["gathered"] == [{"rank": 0}, {"rank": 1}]
    assert (r0["main_only"], r0["on_main"], r1["main_only"], r1["on_main"]) == (0, 10, None, None)

    gt, preds = six_image_setup()
    loader = [([image_for(i)], [{"image_id": i}]) for i in range(1, 7)]
    single = evaluate(FakeDetector(preds), loader, gt, [3, 7], CLASS_NAMES, progress=False)
    assert single is not None
    expected = json.loads(json.dumps(single.to_dict()))
    assert r0["result"]["metrics"] == expected["metrics"]
    assert r0["result"]["per_class"] == expected["per_class"]
    assert r0["result"]["num_images"] == 6
    assert 0 < expected["metrics"]["AP"] < 100
    dets = detections_to_coco([preds[i] for i in range(1, 7)], list(range(1, 7)), [3, 7])
    assert json.loads((tmp_path / "eval" / "results.json").read_text()) == dets
