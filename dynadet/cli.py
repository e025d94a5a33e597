"""Command-line interface: ``dynadet {predict,convert,presets} ...``."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path


def _is_checkpoint(arg: str) -> bool:
    p = Path(arg)
    return p.suffix == ".safetensors" or (p.is_dir() and (p / "model.safetensors").exists())


def cmd_predict(args: argparse.Namespace) -> int:
    import torch

    from dynadet.api import Detector
    from dynadet.data.synthetic import render_scene

    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = list(args.set)
    if _is_checkpoint(args.model):
        det = Detector.from_checkpoint(args.model, overrides, device=args.device)
    else:
        det = Detector.from_config(args.model, overrides, device=args.device)
        print(f"note: {args.model} has random weights; pass a checkpoint for real detections")
    images: list = list(args.images)
    names = [Path(p).stem for p in images]
    if args.synthetic:
        for i in range(args.synthetic):
            images.append(torch.from_numpy(render_scene(seed=i).image).permute(2, 0, 1).float())
            names.append(f"synthetic_{i}")
    if not images:
        print("error: give image paths or --synthetic N", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    preds = det.predict(images, batch_size=args.batch_size)
    elapsed = time.perf_counter() - start
    summary = {}
    for name, pred in zip(names, preds, strict=True):
        keep = pred.scores >= args.score_thresh
        pred.boxes, pred.scores, pred.labels = (
            pred.boxes[keep],
            pred.scores[keep],
            pred.labels[keep],
        )
        pred.plot(out / f"{name}.png")
        summary[name] = pred.to_list()
        top = ", ".join(f"{d['label']} {d['score']:.2f}" for d in summary[name][:3])
        print(f"{name}: {len(pred)} detections{' (' + top + ')' if top else ''}")
    (out / "predictions.json").write_text(json.dumps(summary, indent=1))
    per = elapsed / len(preds)
    print(f"{len(preds)} image(s) in {elapsed:.2f} s ({per * 1000:.0f} ms/image); wrote {out}/")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from dynadet.tools.convert import CONVERTERS

    if args.source not in CONVERTERS:
        print(
            f"error: unknown source {args.source!r}; choose from {sorted(CONVERTERS)}",
            file=sys.stderr,
        )
        return 2
    out = CONVERTERS[args.source](args.src, args.dst, arch=args.arch)
    print(f"wrote {out}")
    return 0


def cmd_presets(args: argparse.Namespace) -> int:
    from dynadet.config import list_presets

    for name in list_presets():
        print(name)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dynadet", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("predict", help="detect objects in images")
    p.add_argument("model", help="config preset name, YAML path, or checkpoint")
    p.add_argument("images", nargs="*", help="image files")
    p.add_argument(
        "--synthetic", type=int, default=0, metavar="N", help="also run on N generated scenes"
    )
    p.add_argument("--out", default="outputs/predict", help="folder for PNGs and JSON")
    p.add_argument("--score-thresh", type=float, default=0.3)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    p.add_argument("set", nargs="*", default=[], metavar="key=value", help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_predict)

    c = sub.add_parser("convert", help="convert foreign weights to a dynadet checkpoint")
    c.add_argument("source", help="weight format, e.g. torchvision")
    c.add_argument("src", help="source weights (.pth)")
    c.add_argument("dst", help="output checkpoint (.safetensors file or folder)")
    c.add_argument("--arch", required=True, help="architecture of the source weights")
    c.set_defaults(func=cmd_convert)

    s = sub.add_parser("presets", help="list packaged config presets")
    s.set_defaults(func=cmd_presets)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from dynadet.config import ConfigError
    from dynadet.engine.checkpoint import CheckpointError
    from dynadet.tools.convert import ConversionError

    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args, extra = parser.parse_known_args(argv)
    # dotted overrides (key=value) may follow the positional arguments
    overrides = [a for a in extra if "=" in a and not a.startswith("-")]
    unknown = [a for a in extra if a not in overrides]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if hasattr(args, "images"):
        args.set = [a for a in args.images if "=" in a] + overrides
        args.images = [a for a in args.images if "=" not in a]
    try:
        return int(args.func(args))
    except (ConfigError, CheckpointError, ConversionError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
