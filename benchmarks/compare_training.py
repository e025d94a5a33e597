"""Train two detectors that differ in one dynamic component on the synthetic data set.

    python benchmarks/compare_training.py PAIR [--iters 1500] [--images 800] [--jobs 2]

Pairs (same backbone, data, schedule and iterations within a pair):

* ``dyhead``: ATSS vs ATSS + DyHead (``--dyhead-blocks``, default 2), DyHead's ATSS head;
* ``fgdh``: FCOS with the static Fix D4 towers vs the Dynamic D4 routing towers (λ = 0.1);
* ``rcnn``: Faster R-CNN vs Dynamic R-CNN (dynamic IoU threshold and SmoothL1 β).

Every model is scaled down the same way for a 2-core CPU: the quickstart's half-width
ResNet-18 (BatchNorm, from scratch), a 96-channel FPN, 192-px images, AdamW with a cosine
schedule, batch 8. The two-stage pair uses C2–C5 with anchors 16–256 (``octave_base_scale`` 4;
the COCO recipe's 32–512 misses the data set's 9–30 px objects) and a Dynamic R-CNN update
interval of ``--interval`` iterations (the recipe's 100 iterations of a 90k schedule would
fire only a few times here).

With ``--jobs 2`` the two runs train at the same time, one thread each, so machine load hits
them alike; the table gives AP/AP50/AP75/AP90 on the validation split at the end and the
training wall time.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

BACKBONE = {"type": "ResNet", "depth": 18, "style": "pytorch", "out_indices": [1, 2, 3],
            "frozen_stages": -1, "norm": "bn", "norm_eval": False, "base_width": 32}
FPN = {"type": "FPN", "in_channels": [64, 128, 256], "out_channels": 96,
       "extra_blocks": "none", "norm": "gn"}
POINTS = {"type": "AnchorGenerator", "strides": [8, 16, 32], "ratios": [1.0],
          "octave_base_scale": 1, "offset": 0.5}
RANGES = [[-1, 32], [32, 64], [64, 1e8]]


def _atss(dyhead_blocks: int, offset_init: str = "default", keep_towers: bool = False
          ) -> dict[str, Any]:
    head = {"type": "ATSSHead", "num_classes": 5, "in_channels": 96, "feat_channels": 96,
            "num_convs": 2, "norm": "gn",
            "anchor_generator": dict(POINTS, octave_base_scale=8)}
    if not dyhead_blocks:
        return {"neck": FPN, "head": head}
    dyhead = {"type": "DyHead", "in_channels": 96, "channels": 96, "num_blocks": dyhead_blocks,
              "offset_init": offset_init}
    neck = {"type": "Chain", "modules": [FPN, dyhead]}
    if keep_towers:  # DyHead in front of the unchanged ATSS head (as for RetinaNet)
        return {"neck": neck, "head": head}
    # DyHead's ATSS: the towers live in the neck, 1x1 predictors
    return {"neck": neck, "head": dict(head, num_convs=0, pred_kernel_size=1)}


def _fcos_routing(dynamic: bool) -> dict[str, Any]:
    head = {"type": "FCOSRoutingHead", "num_classes": 5, "in_channels": 96, "num_layers": 4,
            "dynamic": dynamic, "budget_loss_weight": 0.1 if dynamic else 0.0,
            "regress_ranges": RANGES, "anchor_generator": POINTS}
    return {"neck": FPN, "head": head}


def _rcnn(dynamic: bool, interval: int) -> dict[str, Any]:
    from dynadet.config import load_config

    model = load_config("dynamic_rcnn_r50_fpn_1x" if dynamic else "faster_rcnn_r50_fpn_1x")
    model = model["model"]
    model["backbone"] = dict(BACKBONE, out_indices=[0, 1, 2, 3])
    model["neck"] = dict(FPN, in_channels=[32, 64, 128, 256], extra_blocks="maxpool")
    model["rpn"].update(in_channels=96, feat_channels=96)
    model["rpn"]["anchor_generator"]["octave_base_scale"] = 4
    model["roi_head"].update(num_classes=5, in_channels=96, fc_channels=256)
    if dynamic:
        model["roi_head"]["dynamic"]["interval"] = interval
    return {k: model[k] for k in ("backbone", "neck", "rpn", "roi_head", "type")}


def pair_configs(pair: str, args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """``{run name: model overrides}`` for a pair."""
    if pair == "dyhead":
        name = f"atss_dyhead{args.dyhead_blocks}_offset_{args.offset_init}"
        name += "_towers" if args.keep_towers else ""
        return {"atss": _atss(0),
                name: _atss(args.dyhead_blocks, args.offset_init, args.keep_towers)}
    if pair == "fgdh":
        return {"fix_d4": _fcos_routing(False), "dynamic_d4_lambda0.1": _fcos_routing(True)}
    if pair == "rcnn":
        return {"faster_rcnn": _rcnn(False, args.interval),
                "dynamic_rcnn": _rcnn(True, args.interval)}
    raise SystemExit(f"unknown pair {pair!r}; choose dyhead, fgdh or rcnn")


def run_one(name: str, model: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from dynadet.config import load_config
    from dynadet.engine.train import train

    torch.set_num_threads(args.threads)
    cfg = load_config("quickstart")
    cfg["model"].pop("head", None)
    cfg["model"]["backbone"] = copy.deepcopy(BACKBONE)
    cfg["model"].update(copy.deepcopy(model))
    data = Path(args.data)
    for split in ("train", "val"):
        cfg["data"][split] = {"ann_file": str(data / "annotations" / f"{split}.json"),
                              "image_dir": str(data / "images")}
    cfg["train"].update(max_iters=args.iters, num_evals=1, checkpoint_period=args.iters,
                        seed=args.seed, log_period=50)
    if args.lr:
        cfg["train"]["lr"] = args.lr
    cfg["data"]["num_workers"] = 0
    start = time.perf_counter()
    result = train(cfg, Path(args.out) / name, device="cpu")
    seconds = time.perf_counter() - start
    metrics = result.get("metrics", {})
    return {"name": name, "seconds": seconds, "iters": args.iters, "metrics": metrics,
            "head_cost": _executed_head_cost(Path(args.out) / name, cfg, args.cost_images)}


def _executed_head_cost(run_dir: Path, cfg: dict[str, Any], n: int) -> dict[str, float] | None:
    """Routing heads: mean executed / full tower MACs (GMACs) over ``n`` validation images."""
    import torch

    from dynadet.api import Detector
    from dynadet.data.coco import CocoDetection
    from dynadet.engine.state import last_checkpoint

    det = Detector.from_checkpoint(last_checkpoint(run_dir))
    if not hasattr(getattr(det.model, "head", None), "last_cost"):
        return None
    val = CocoDetection(cfg["data"]["val"]["ann_file"], cfg["data"]["val"]["image_dir"],
                        filter_empty=False)
    executed, full = [], []
    with torch.inference_mode():
        for i in range(min(n, len(val))):
            det.predict(val[i][0])
            executed.append(float(det.model.head.last_cost.executed.sum()))
            full.append(float(det.model.head.last_cost.full.sum()))
    return {"executed_gmacs": sum(executed) / len(executed) / 1e9,
            "full_gmacs": sum(full) / len(full) / 1e9}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pair", choices=["dyhead", "fgdh", "rcnn"])
    parser.add_argument("--iters", type=int, default=1500)
    parser.add_argument("--images", type=int, default=800)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dyhead-blocks", type=int, default=2)
    parser.add_argument("--offset-init", default="default", choices=["default", "zero", "normal"],
                        help="DyHead offset-conv init (official: default; MMDetection: zero)")
    parser.add_argument("--lr", type=float, default=None, help="AdamW lr (quickstart's 0.004)")
    parser.add_argument("--keep-towers", action="store_true",
                        help="keep ATSS's conv towers after DyHead (default: 1x1 predictors)")
    parser.add_argument("--interval", type=int, default=20, help="Dynamic R-CNN update interval")
    parser.add_argument("--jobs", type=int, default=2, help="runs at the same time")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--cost-images", type=int, default=50,
                        help="validation images for the executed head cost")
    parser.add_argument("--out", default="runs/compare")
    parser.add_argument("--data", default=None, help="synthetic data folder (made if missing)")
    parser.add_argument("--run", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    out = Path(args.out) / args.pair
    args.out = str(out)
    configs = pair_configs(args.pair, args)
    if args.run:  # child process
        result = run_one(args.run, configs[args.run], args)
        (out / f"{args.run}.json").write_text(json.dumps(result, indent=1))
        return 0

    from dynadet.data.synthetic import write_synthetic_dataset

    data = Path(args.data or Path(args.out).parent / "data")
    # reuses the folder when it holds this exact data set (the writer keeps a marker)
    write_synthetic_dataset(data, args.images, seed=args.seed, height=192, width=240)
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    base = [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:])]
    pending = list(configs)
    running: list[subprocess.Popen] = []
    while pending or running:
        while pending and len(running) < args.jobs:
            name = pending.pop(0)
            cmd = [*base, "--run", name, "--data", str(data)]
            running.append(subprocess.Popen(cmd, env=env))
        running[0].wait()
        if running[0].returncode:
            raise SystemExit(f"run failed: {running[0].args}")
        running.pop(0)
    rows = [json.loads((out / f"{name}.json").read_text()) for name in configs]
    print(f"\n`python benchmarks/compare_training.py {' '.join(sys.argv[1:])}` "
          f"({os.cpu_count()} cores, {args.jobs} runs at a time × {args.threads} thread)\n")
    print("| run | iterations | AP | AP50 | AP75 | AP90 | train time (min) | head GMACs "
          "executed / full |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        m = r["metrics"]
        cost = r.get("head_cost")
        cost_s = f"{cost['executed_gmacs']:.3f} / {cost['full_gmacs']:.3f}" if cost else "—"
        print(f"| {r['name']} | {r['iters']} | {m.get('AP', float('nan')):.1f} | "
              f"{m.get('AP50', float('nan')):.1f} | {m.get('AP75', float('nan')):.1f} | "
              f"{m.get('AP90', float('nan')):.1f} | {r['seconds'] / 60:.1f} | {cost_s} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
