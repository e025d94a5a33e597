"""dynadet command line: train, evaluate, predict, convert and generate data.

Config values are overridden with dotted ``key=value`` arguments anywhere on the line
(``model.head.num_classes=3 train.lr=0.01``); the plain keys ``resume=true``,
``weights=PATH`` and ``output_dir=PATH`` are options of the command itself.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

COMMAND_KEYS = ("resume", "weights", "output_dir", "device")


def _is_checkpoint(arg: str | Path) -> bool:
    p = Path(arg)
    return p.suffix == ".safetensors" or (p.is_dir() and (p / "model.safetensors").exists())


def _bool(value: str) -> bool:
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {value!r}")


def _run_dir_for(config: str) -> Path:
    return Path("runs") / Path(config).stem.replace("/", "_")


def cmd_train(args: argparse.Namespace) -> int:
    from dynadet.config import load_config
    from dynadet.engine.train import train

    cfg = load_config(args.config, args.set)
    run_dir = Path(
        args.keys.get("output_dir") or cfg.get("output_dir") or _run_dir_for(args.config)
    )
    resume = _bool(args.keys.get("resume", "false"))
    result = train(cfg, run_dir, resume=resume, device=args.keys.get("device"))
    metrics = result.get("metrics")
    if metrics:
        print(
            "final: "
            + ", ".join(
                f"{k} {v:.1f}" for k, v in metrics.items() if k in ("AP", "AP50", "AP75", "AP90")
            )
        )
    print(f"run folder: {run_dir}")
    return 0


def _resolve_weights(args: argparse.Namespace) -> tuple[Path | None, str]:
    """Checkpoint to use: ``weights=``, a checkpoint given as CONFIG, or the run's latest."""
    from dynadet.engine.state import last_checkpoint

    if "weights" in args.keys:
        return Path(args.keys["weights"]), args.config
    if _is_checkpoint(args.config):
        return Path(args.config), args.config
    run_dir = Path(args.keys.get("output_dir") or _run_dir_for(args.config))
    if Path(args.config).is_dir():
        run_dir = Path(args.config)
    return last_checkpoint(run_dir) if run_dir.exists() else None, args.config


def cmd_eval(args: argparse.Namespace) -> int:
    from dynadet.api import Detector
    from dynadet.config import load_config
    from dynadet.data.loader import build_eval_loader
    from dynadet.engine import distributed as dist_utils
    from dynadet.engine.evaluate import evaluate
    from dynadet.engine.train import build_datasets

    weights, config = _resolve_weights(args)
    if weights is None:
        print(f"error: no checkpoint found for {config}; pass weights=PATH", file=sys.stderr)
        return 2
    dist_utils.init_distributed()
    det = Detector.from_checkpoint(weights, args.set, device=args.keys.get("device", "cpu"))
    cfg = det.config
    if not (_is_checkpoint(config) or Path(config).is_dir()):
        cfg = load_config(config, args.set)  # data paths from the named config
    dataset = build_datasets(cfg, train=False)
    loader = build_eval_loader(dataset, batch_size=args.batch_size)
    out = Path(weights).parent / "eval" / Path(weights).name
    res = evaluate(
        det.runner,
        loader,
        dataset.coco,
        dataset.category_ids,
        dataset.class_names,
        output_dir=out,
        device=det.device,
    )
    if res is not None:
        print(res.summary)
        print(res.to_markdown())
        print(f"wrote {out}/")
    dist_utils.cleanup()
    return 0


def _list_images(inputs: Sequence[str]) -> list[Path]:
    exts = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
    files: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            files += sorted(f for f in p.iterdir() if f.suffix.lower() in exts)
        elif p.exists():
            files.append(p)
        else:
            raise FileNotFoundError(f"{p}: no such image file or folder")
    return files


def cmd_predict(args: argparse.Namespace) -> int:
    import torch

    from dynadet.api import Detector
    from dynadet.data.synthetic import render_scene

    model = args.keys.get("weights") or args.model
    if model is None:
        print("error: give a config, a checkpoint or weights=PATH", file=sys.stderr)
        return 2
    device = args.keys.get("device", args.device)
    if _is_checkpoint(model):
        det = Detector.from_checkpoint(model, args.set, device=device)
    else:
        det = Detector.from_config(model, args.set, device=device)
        print(f"note: {model} has random weights; pass a checkpoint for real detections")
    files = _list_images(list(args.images) + list(args.input or []))
    images: list = list(files)
    names = [f.stem for f in files]
    for i in range(args.synthetic):
        images.append(torch.from_numpy(render_scene(seed=i).image).permute(2, 0, 1).float())
        names.append(f"synthetic_{i}")
    if not images:
        print("error: give image paths, --input FILE|DIR or --synthetic N", file=sys.stderr)
        return 2
    out = Path(args.output)
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
    if args.show_attention or args.show_gates:
        code = _write_visualisations(det, images, names, out, args)
        if code:
            return code
    per = elapsed / len(preds)
    print(f"{len(preds)} image(s) in {elapsed:.2f} s ({per * 1000:.0f} ms/image); wrote {out}/")
    return 0


def _write_visualisations(det, images, names, out: Path, args: argparse.Namespace) -> int:
    """``--show-attention`` / ``--show-gates``: one figure + JSON summary per image."""
    from dynadet.tools import visualize as vis

    layers = args.gate_layers if args.gate_layers in ("mean", "all") else int(args.gate_layers)
    try:
        for name, image in zip(names, images, strict=True):
            if args.show_attention:
                maps = vis.attention_maps(det, image)
                vis.save_attention_figure(maps, out / f"{name}_attention.png")
                (out / f"{name}_attention.json").write_text(
                    json.dumps(vis.attention_summary(maps), indent=1)
                )
            if args.show_gates:
                maps = vis.gate_maps(det, image)
                vis.save_gate_figure(maps, out / f"{name}_gates.png", layers=layers)
                (out / f"{name}_gates.json").write_text(
                    json.dumps(vis.gate_summary(maps), indent=1)
                )
                print(f"{name}: executed head cost {maps['executed_ratio']:.1%} of the full head")
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
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


def cmd_benchmark(args: argparse.Namespace) -> int:
    from dynadet.tools.benchmark import run_benchmark

    return run_benchmark(args)


def cmd_presets(args: argparse.Namespace) -> int:
    from dynadet.config import list_presets

    for name in list_presets():
        print(name)
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from dynadet.data.synthetic import run_synth

    return run_synth(args)


def cmd_quickstart(args: argparse.Namespace) -> int:
    from dynadet.tools.quickstart import run

    run(args, args.set)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from dynadet.data.synthetic import add_synth_arguments
    from dynadet.tools.quickstart import add_arguments as add_quickstart_arguments

    parser = argparse.ArgumentParser(
        prog="dynadet", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a config (resume=true continues the run)")
    t.add_argument("config", help="preset name or YAML path")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="COCO-evaluate a checkpoint on the config's val split")
    e.add_argument(
        "config",
        help="preset/YAML (weights=PATH or its run's latest checkpoint), "
        "a run folder, or a checkpoint",
    )
    e.add_argument("--batch-size", type=int, default=2)
    e.set_defaults(func=cmd_eval)

    p = sub.add_parser("predict", help="detect objects in images, draw them and write JSON")
    p.add_argument("model", nargs="?", help="checkpoint, preset or YAML (or weights=PATH)")
    p.add_argument("images", nargs="*", help="image files or folders")
    p.add_argument("--input", action="append", help="image file or folder (repeatable)")
    p.add_argument("--weights", dest="weights_opt", help="checkpoint (same as weights=PATH)")
    p.add_argument(
        "--synthetic", type=int, default=0, metavar="N", help="also run on N generated scenes"
    )
    p.add_argument("--output", "--out", default="outputs/predict", help="folder for PNGs and JSON")
    p.add_argument("--score-thresh", type=float, default=0.3)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--show-attention", action="store_true",
                   help="DyHead: write <image>_attention.png/.json (scale attention of every "
                   "block, DCN sampling points and modulation of the last block)")
    p.add_argument("--show-gates", action="store_true",
                   help="Fine-Grained Dynamic Head: write <image>_gates.png/.json (per-level "
                   "depth-path gate maps, executed cost)")
    p.add_argument("--gate-layers", default="mean", help="gate maps: mean, all or a layer index")
    p.set_defaults(func=cmd_predict)

    c = sub.add_parser("convert", help="convert foreign weights to a dynadet checkpoint")
    c.add_argument("source", help="weight format, e.g. torchvision")
    c.add_argument("src", help="source weights (.pth)")
    c.add_argument("dst", help="output checkpoint (.safetensors file or folder)")
    c.add_argument(
        "--arch",
        default=None,
        help="architecture of the source weights: a torchvision model name (required for "
        "torchvision) or a preset/config (optional for the other sources: found from the keys)",
    )
    c.set_defaults(func=cmd_convert)

    d = sub.add_parser("data", help="data set tools")
    dsub = d.add_subparsers(dest="data_command", required=True)
    synth = dsub.add_parser("synth", help="write the synthetic shapes data set (COCO format)")
    add_synth_arguments(synth)
    synth.set_defaults(func=cmd_data)

    q = sub.add_parser("quickstart", help="synthetic data → train → evaluate → pictures")
    add_quickstart_arguments(q)
    q.set_defaults(func=cmd_quickstart)

    b = sub.add_parser(
        "benchmark", help="parameters, FLOPs, executed head cost, latency, throughput, memory"
    )
    from dynadet.tools.benchmark import add_benchmark_arguments

    add_benchmark_arguments(b)
    b.set_defaults(func=cmd_benchmark)

    x = sub.add_parser(
        "export", help="export a one-stage detector to ONNX (raw head outputs; needs [onnx])"
    )
    from dynadet.tools.export import add_export_arguments, run_export

    add_export_arguments(x)
    x.set_defaults(func=run_export)

    s = sub.add_parser("presets", help="list packaged config presets")
    s.set_defaults(func=cmd_presets)
    return parser


def _split_overrides(tokens: Sequence[str]) -> tuple[list[str], dict[str, str], list[str]]:
    """``key=value`` tokens → (dotted config overrides, command keys, other tokens)."""
    overrides, keys, rest = [], {}, []
    for tok in tokens:
        if "=" in tok and not tok.startswith("-"):
            key, value = tok.split("=", 1)
            if key in COMMAND_KEYS:
                keys[key] = value
            else:
                overrides.append(tok)
        else:
            rest.append(tok)
    return overrides, keys, rest


def main(argv: Sequence[str] | None = None) -> int:
    from dynadet.config import ConfigError
    from dynadet.engine.checkpoint import CheckpointError
    from dynadet.engine.train import TrainingDiverged
    from dynadet.tools.convert import ConversionError

    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args, extra = parser.parse_known_args(argv)
    overrides, keys, unknown = _split_overrides(extra)
    if args.command == "predict":
        more, more_keys, args.images = _split_overrides(args.images)
        overrides, keys = more + overrides, {**more_keys, **keys}
        if args.model and "=" in args.model:
            first, first_keys, _ = _split_overrides([args.model])
            overrides, keys, args.model = first + overrides, {**first_keys, **keys}, None
        if args.weights_opt:
            keys["weights"] = args.weights_opt
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.set, args.keys = overrides, keys
    try:
        return int(args.func(args))
    except (
        ConfigError,
        CheckpointError,
        ConversionError,
        FileNotFoundError,
        ValueError,
        OSError,
    ) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingDiverged as e:
        print(f"error: training diverged: {e}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
