"""DynamicTrainingStats across 2 CPU processes (gloo): ``sync=True`` gives every rank the
statistics of the global batch, ``sync=False`` keeps each rank's own (the references)."""

from __future__ import annotations

import datetime
from pathlib import Path

import torch
import torch.multiprocessing as mp

from dynadet.engine.distributed import cleanup
from dynadet.models.dynamic_stats import DynamicTrainingStats
from tests.models.test_dynamic_stats import _feed, random_sequence

WORLD = 2
STEPS = 9
VARIANTS = [(mode, sync) for mode in ("mmdet", "official") for sync in (True, False)]


def _stats(mode: str, sync: bool) -> DynamicTrainingStats:
    return DynamicTrainingStats(iou_topk=4, beta_topk=2, interval=3, mode=mode, sync=sync)


def _rank_sequence(rank: int) -> list:
    # different images, image counts (1-3) and numbers of positives on each rank
    return random_sequence(seed=100 + rank, steps=STEPS)


def _run(stats: DynamicTrainingStats, sequence: list) -> list[tuple[float, float]]:
    trajectory = []
    for item in sequence:
        _feed(stats, item)
        trajectory.append((stats.iou_thresh.item(), stats.beta.item()))
    return trajectory


def _worker(rank: int, rendezvous: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=WORLD,
        timeout=datetime.timedelta(seconds=60),
    )  # fmt: skip
    try:
        report = {}
        for mode, sync in VARIANTS:
            stats = _stats(mode, sync)
            trajectory = _run(stats, _rank_sequence(rank))
            report[f"{mode}-{sync}"] = {"trajectory": trajectory, "state": stats.state_dict()}
        torch.save(report, Path(out_dir) / f"rank{rank}.pt")
        torch.distributed.barrier()
    finally:
        cleanup()


def _merged_sequence() -> list:
    """What one process holding both ranks' images would see at each step."""
    merged = []
    for (ious0, err0), (ious1, err1) in zip(*map(_rank_sequence, range(WORLD)), strict=True):
        merged.append((ious0 + ious1, err0 + err1))
    return merged


def test_sync_gives_identical_global_batch_statistics(tmp_path: Path) -> None:
    # fork, as DataLoader workers do (the workers use one thread): no fresh `import torch`
    methods = mp.get_all_start_methods()
    ctx = mp.start_processes(
        _worker, args=(str(tmp_path / "rendezvous"), str(tmp_path)), nprocs=WORLD, join=False,
        start_method="fork" if "fork" in methods else "spawn",
    )  # fmt: skip
    for p in ctx.processes:
        p.join(90)
    alive = [p for p in ctx.processes if p.is_alive()]
    for p in alive:  # only the workers this test started
        p.kill()
    assert not alive, "a worker hung"
    assert all(p.exitcode == 0 for p in ctx.processes)
    reports = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]

    for mode, sync in VARIANTS:
        key = f"{mode}-{sync}"
        r0, r1 = reports[0][key], reports[1][key]
        if sync:
            # bit-identical on both ranks ...
            assert r0["trajectory"] == r1["trajectory"], key
            for name, value in r0["state"].items():
                assert torch.equal(value, r1["state"][name]), (key, name)
            # ... and equal to one process on the global batch
            expected = _run(_stats(mode, False), _merged_sequence())
            torch.testing.assert_close(torch.tensor(r0["trajectory"]), torch.tensor(expected),
                                       rtol=1e-6, atol=1e-7, msg=key)  # fmt: skip
        else:
            for rank, report in enumerate((r0, r1)):
                assert report["trajectory"] == _run(_stats(mode, False), _rank_sequence(rank))
            assert r0["trajectory"] != r1["trajectory"], key
        # the values moved away from their initial ones during the run
        assert len(set(r0["trajectory"])) > 2, key
