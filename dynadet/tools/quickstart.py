"""``dynadet quickstart``: data → training → evaluation → pictures, in one command.

Generates the synthetic shapes data set, trains the ``quickstart`` preset within a time budget,
evaluates it on the validation split, draws predictions on validation images, plots the loss and
AP curves and writes a one-page ``summary.md``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from dynadet.config import load_config

# Seconds kept for the trainer's set-up and what follows training (loading the checkpoint,
# predictions on 8 validation images, plots, summary): measured 1–2 s on 2 CPU cores; the rest
# covers the budget fit's overshoot (the last iterations and evaluation end ~4 s late).
_AFTER_S = 8.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/quickstart", help="run folder")
    parser.add_argument("--minutes", type=float, default=9.75,
                        help="wall-clock budget for everything: data, training, evaluation, "
                        "pictures (default 9.75)")
    parser.add_argument("--images", type=int, default=2400, help="synthetic training images")
    parser.add_argument("--val-images", type=int, default=200,
                        help="synthetic validation images (default 200)")
    parser.add_argument("--size", type=int, nargs=2, default=(192, 240), metavar=("H", "W"),
                        help="mean synthetic image size")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--config", default="quickstart", help="preset or YAML to train")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")


def run(args: argparse.Namespace, overrides: list[str] | None = None) -> dict[str, Any]:
    from torch.cuda import is_available as cuda_ok

    from dynadet.api import Detector, build_model
    from dynadet.data.coco import CocoDetection
    from dynadet.data.synthetic import write_synthetic_dataset
    from dynadet.engine.amp import resolve_amp
    from dynadet.engine.logger import plot_run
    from dynadet.engine.state import last_checkpoint
    from dynadet.engine.train import train

    out = Path(args.out)
    t0 = time.perf_counter()
    # Config mistakes (unknown keys, a bad train.amp, a bad model argument) fail now, not after
    # the data is written.
    cfg = load_config(args.config, list(overrides or []))
    resolve_amp(cfg["train"].get("amp"), args.device or ("cuda" if cuda_ok() else "cpu"))
    build_model(cfg)
    if args.images < 1 or args.val_images < 1:
        raise ValueError("--images and --val-images must be >= 1")
    total = args.images + args.val_images
    paths = write_synthetic_dataset(out / "data", total, seed=args.seed, height=args.size[0],
                                    width=args.size[1], val_fraction=args.val_images / total)
    data_s = time.perf_counter() - t0
    cfg["data"]["train"] = {"ann_file": str(paths["train"]), "image_dir": str(paths["images"])}
    cfg["data"]["val"] = {"ann_file": str(paths["val"]), "image_dir": str(paths["images"])}
    # Training (with its evaluations) gets what data generation left, less the final
    # pictures and summary.
    cfg["train"]["time_budget_s"] = max(1.0, float(args.minutes) * 60 - data_s - _AFTER_S)
    if not cfg["train"].get("num_evals"):
        cfg["train"]["num_evals"] = 4
    cfg["train"]["seed"] = args.seed
    print(f"data: {paths['train']} / {paths['val']} ({data_s:.1f} s)")
    result = train(cfg, out, resume=False, device=args.device)
    total_s = time.perf_counter() - t0

    ckpt = last_checkpoint(out)
    det = Detector.from_checkpoint(ckpt, device=args.device or "cpu")
    val = CocoDetection(paths["val"], paths["images"], filter_empty=False)
    pred_dir = out / "predictions"
    pred_dir.mkdir(exist_ok=True)
    for i in range(min(8, len(val))):
        image, target = val[i]
        pred = det.predict(image)
        keep = pred.scores >= 0.3
        pred.boxes, pred.scores, pred.labels = (
            pred.boxes[keep],
            pred.scores[keep],
            pred.labels[keep],
        )
        pred.plot(pred_dir / f"val_{int(target['image_id']):06d}.png")
    plots = plot_run(out)
    metrics = result.get("metrics", {})
    summary = _summary(out, cfg, result, metrics, total_s, ckpt, plots)
    (out / "summary.md").write_text(summary)
    (out / "summary.json").write_text(
        json.dumps(
            {
                "metrics": metrics,
                "train_seconds": result["seconds"],
                "total_seconds": total_s,
                "iterations": result["iterations"],
                "checkpoint": str(ckpt),
            },
            indent=1,
        )
    )
    print(
        f"\nAP {metrics.get('AP', float('nan')):.1f}  AP50 {metrics.get('AP50', float('nan')):.1f}"
        f"  ({result['iterations']} iterations, {total_s / 60:.1f} min in all)"
    )
    print(f"summary:     {out / 'summary.md'}")
    print(f"checkpoint:  {ckpt}")
    print(f"predictions: {pred_dir}/")
    for p in plots:
        print(f"plot:        {p}")
    return {"metrics": metrics, "run_dir": str(out), "seconds": total_s}


def _last_logged(out: Path, key: str) -> float | None:
    from dynadet.engine.logger import read_metrics

    values = [r[key] for r in read_metrics(out / "metrics.jsonl") if key in r]
    return float(values[-1]) if values else None


def _summary(
    out: Path, cfg: dict, result: dict, metrics: dict, total_s: float, ckpt: Path, plots: list[Path]
) -> str:
    head = cfg["model"]["head"]["type"]
    lines = [
        "# dynadet quickstart",
        "",
        f"Model: `{head}` on ResNet-{cfg['model']['backbone'].get('depth')} "
        f"(preset `quickstart`), trained from scratch for {result['iterations']} iterations "
        f"({result['seconds'] / 60:.1f} min; {total_s / 60:.1f} min with data and evaluation).",
        "",
        "| metric | value |",
        "|---|---|",
    ]
    lines += [f"| {k} | {v:.1f} |" for k, v in metrics.items()]
    ratio = _last_logged(out, "complexity_ratio")
    if ratio is not None:
        lines += ["", f"Dynamic head: the gates executed {ratio:.1%} of the head's full tower "
                  "cost at the last logged iteration (`plots/dynamics.png` shows the curve)."]
    lines += ["", f"Checkpoint: `{ckpt}`", ""]
    for p in plots:
        lines.append(f"![{p.stem}]({p.relative_to(out)})")
    lines += ["", "Predictions on validation images: `predictions/`.", ""]
    return "\n".join(lines)
