"""2-process DDP on CPU (gloo): gradients equal a single-process step on the same global batch,
also when one rank's images have no boxes (and nothing hangs)."""

from __future__ import annotations

import datetime
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from dynadet.api import build_model
from dynadet.config import load_config
from dynadet.data.synthetic import render_scene
from dynadet.engine.distributed import cleanup

WORLD = 2
TINY = [
    "model.preprocess.min_size=64", "model.preprocess.max_size=96",
    "model.neck.out_channels=32", "model.head.in_channels=32",
    "model.head.feat_channels=32", "model.head.num_convs=1",
    "model.backbone.norm=gn",  # batch statistics would differ per rank
]  # fmt: skip


def _batch(empty_second_half: bool) -> tuple[list[torch.Tensor], list[dict]]:
    images, targets = [], []
    for i in range(4):
        scene = render_scene(100 + i, 64, 80)  # equal sizes: identical padding on every rank
        images.append(torch.from_numpy(scene.image).permute(2, 0, 1).float())
        boxes, labels = torch.from_numpy(scene.boxes), torch.from_numpy(scene.labels)
        if empty_second_half and i >= 2:
            boxes, labels = boxes[:0], labels[:0]
        targets.append({"boxes": boxes, "labels": labels})
    return images, targets


def _model() -> nn.Module:
    torch.manual_seed(0)
    return build_model(load_config("quickstart_fcos", TINY)).train()


def _grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, rendezvous: str, empty: bool, out: str) -> None:
    torch.set_num_threads(1)
    # a file rendezvous: no TCP port that a neighbouring test could still hold
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=WORLD,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        model = _model()
        ddp = nn.parallel.DistributedDataParallel(model)
        images, targets = _batch(empty)
        mine = slice(2 * rank, 2 * rank + 2)
        losses = ddp(images[mine], targets[mine])
        sum(losses.values()).backward()
        if rank == 0:
            torch.save(_grads(model), out)
        # nobody tears the group down while the other rank still talks to it
        torch.distributed.barrier()
    finally:
        cleanup()


@pytest.mark.parametrize("empty", [False, True], ids=["boxes", "rank1-no-boxes"])
def test_ddp_gradients_equal_single_process(tmp_path: Path, empty: bool) -> None:
    model = _model()
    images, targets = _batch(empty)
    sum(model(images, targets).values()).backward()
    single = _grads(model)

    out = tmp_path / "grads.pt"
    rendezvous = str(tmp_path / "rendezvous")
    ctx = mp.spawn(_worker, args=(rendezvous, empty, str(out)), nprocs=WORLD, join=False)
    for p in ctx.processes:
        p.join(120)
    alive = [p for p in ctx.processes if p.is_alive()]
    for p in alive:
        p.kill()
    assert not alive, "a DDP worker hung"
    assert all(p.exitcode == 0 for p in ctx.processes)
    ddp = torch.load(out, weights_only=True)
    assert ddp.keys() == single.keys()
    for name in single:
        torch.testing.assert_close(ddp[name], single[name], atol=2e-5, rtol=1e-3, msg=name)


def test_torchrun_trains_with_side_effects_on_rank_zero_only(tmp_path: Path) -> None:
    import subprocess
    import sys

    import yaml

    from dynadet.data.synthetic import write_synthetic_dataset
    from dynadet.engine.logger import read_metrics
    from dynadet.engine.state import last_checkpoint

    paths = write_synthetic_dataset(tmp_path / "data", 8, seed=1, height=64, width=80,
                                    progress=False)
    cfg = load_config("quickstart_fcos", TINY + ["train.batch_size=4", "train.max_iters=3",
                                            "train.log_period=1", "train.tensorboard=false",
                                            "data.num_workers=0", "train.num_evals=1"])
    cfg["data"]["train"] = {"ann_file": str(paths["train"]), "image_dir": str(paths["images"])}
    cfg["data"]["val"] = {"ann_file": str(paths["val"]), "image_dir": str(paths["images"])}
    cfg_path = tmp_path / "tiny.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(_free_port()), "-m", "dynadet", "train", str(cfg_path),
           f"output_dir={run}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = read_metrics(run / "metrics.jsonl")
    assert [r["iter"] for r in records if r["type"] == "train"] == [1, 2, 3]  # rank 0 only
    assert [r["type"] for r in records].count("eval") == 1
    assert last_checkpoint(run).name == "iter_0000003"
