"""``dynadet benchmark``: parameters, MACs/FLOPs, executed head cost, latency, throughput, memory.

    dynadet benchmark CONFIG [weights=PATH] [key=value ...] [--flops] [--train]
                     [--device cpu|cuda] [--batch-sizes 1 8] [--size H W] [--iters N]
                     [--warmup N] [--data DIR|JSON] [--num-images N] [--threads N] [--json]

e.g. ``dynadet benchmark fgdh_r50_fcos_dynamic_d8_mid_1x weights=ckpt/ --flops --size 800 1333
--data coco/annotations/instances_val2017.json --image-dir coco/val2017 --num-images 0
--device cuda`` for the README's executed head FLOPs over val2017.

``CONFIG`` is a preset, a YAML file or a checkpoint; ``weights=PATH`` loads a checkpoint into the
config's model (random weights otherwise: fine for cost and speed, except that a dynamic head's
gates are then those of its initialisation — open).

What is measured (in this order):

* parameters, total and trainable, per top-level part;
* MACs of one inference on one image, whole model and per part (FLOPs = 2 × MACs; see
  :mod:`dynadet.tools.flops` for what is counted how);
* the head towers' cost per image over ``--num-images`` images (synthetic scenes, or ``--data``:
  a folder of images or a COCO JSON), in the FGDH README's unit (MACs / 2^30 on the padded input)
  and GMACs, avg/min/max — executed cost for gated (dynamic) heads, the static cost otherwise;
* inference latency (median of ``--iters`` runs after ``--warmup``, whole ``model(images)``
  call: preprocessing, network, decoding, NMS) and throughput for each ``--batch-sizes``;
* with ``--train``, the same for one training step (forward with synthetic targets, backward,
  SGD step);
* peak memory during the timed runs: ``torch.cuda.max_memory_allocated`` growth on CUDA; on CPU
  the growth of the process's peak RSS (Linux ``VmHWM``, reset through ``/proc/self/clear_refs``;
  elsewhere the ``ru_maxrss`` high-water mark, a lower bound).

``--flops`` counts only (parameters, MACs, head cost; no timing).

Sizes. ``--size H W`` (default 320 × 320, so that a CPU run takes seconds) sets the detector's
resize (``model.preprocess.min_size = min(H, W)``, ``max_size = max(H, W)``) and the size of the
synthetic images, which therefore reach the network unresized (then padded to the config's
``size_divisor``). The papers' setting is ``--size 800 1333`` (padded to 800 × 1344).
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm import tqdm

from dynadet.tools.flops import count_model_macs, head_cost, parameter_counts

__all__ = ["DEFAULT_SIZE", "add_benchmark_arguments", "benchmark", "format_report", "run_benchmark"]

DEFAULT_SIZE = (320, 320)
_COMMAND_KEYS = ("weights", "device")
_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}


def add_benchmark_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``dynadet benchmark`` (``key=value`` overrides are collected by the CLI)."""
    parser.add_argument("config", help="preset name, YAML path or checkpoint")
    parser.add_argument("--flops", action="store_true", help="count only: no timing")
    parser.add_argument("--train", action="store_true", help="also time one training step")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (cpu)")
    # str, not int: nargs="+" also swallows key=value overrides written after it, which
    # run_benchmark hands back to the config.
    parser.add_argument("--batch-sizes", nargs="+", default=["1", "8"], metavar="N",
                        help="batch sizes to time (1 8)")
    parser.add_argument("--size", type=int, nargs=2, default=list(DEFAULT_SIZE),
                        metavar=("H", "W"), help="input size: detector resize and synthetic "
                        "images (320 320; the papers use 800 1333)")
    parser.add_argument("--iters", type=int, default=10, help="timed runs per setting (10)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs first (2)")
    parser.add_argument("--data", help="folder of images or COCO JSON for the head cost "
                        "(default: synthetic scenes)")
    parser.add_argument("--image-dir", help="image folder of a COCO JSON (default: images/ "
                        "beside its annotations/ folder, else the JSON's folder)")
    parser.add_argument("--num-images", type=int, default=8,
                        help="images for the head cost (8; 0: every image of --data)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: as is)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def run_benchmark(args: argparse.Namespace) -> int:
    """Run ``dynadet benchmark`` from parsed arguments; returns the exit code.

    Reads ``args.set`` (dotted overrides) and ``args.keys`` (``weights``, ``device``) when the
    CLI provides them.
    """
    keys = dict(getattr(args, "keys", None) or {})
    overrides = list(getattr(args, "set", None) or [])
    batch_sizes = []
    for token in map(str, args.batch_sizes):
        key, sep, value = token.partition("=")
        if not sep:
            if not token.isdigit():
                raise ValueError(f"--batch-sizes: {token!r} is not a positive integer")
            batch_sizes.append(int(token))
        elif key in _COMMAND_KEYS:
            keys[key] = value
        else:
            overrides.append(token)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    result = benchmark(
        args.config,
        overrides,
        weights=keys.get("weights"),
        device=keys.get("device") or args.device,
        batch_sizes=batch_sizes,
        size=tuple(args.size),
        iters=args.iters,
        warmup=args.warmup,
        timing=not args.flops,
        train=args.train,
        data=args.data,
        image_dir=args.image_dir,
        num_images=args.num_images,
        progress=not args.no_progress,
    )
    print(json.dumps(result, indent=1) if args.json else format_report(result))
    return 0


# ----------------------------------------------------------------------------- inputs


def _is_checkpoint(path: str | Path) -> bool:
    p = Path(path)
    return p.suffix == ".safetensors" or (p.is_dir() and (p / "model.safetensors").exists())


def build_for_benchmark(
    config: str | Path | Mapping[str, Any],
    overrides: Sequence[str] = (),
    weights: str | Path | None = None,
    size: tuple[int, int] | None = DEFAULT_SIZE,
) -> tuple[nn.Module, dict[str, Any]]:
    """The model of ``config`` (preset, YAML, mapping or checkpoint) with ``weights`` loaded and
    its resize set to ``size``; returns ``(model, resolved config)``."""
    from dynadet.api import build_model
    from dynadet.config import load_config
    from dynadet.engine.checkpoint import load_checkpoint

    state = None
    if not isinstance(config, Mapping) and _is_checkpoint(config):
        state, cfg, _, _ = load_checkpoint(config)
        cfg = load_config(cfg, overrides)
    else:
        cfg = load_config(config, overrides)
    if weights is not None:
        state = load_checkpoint(weights)[0]
    pre = cfg.get("model", {}).get("preprocess")
    if size is not None and isinstance(pre, dict) and pre.get("type") == "Preprocessor":
        pre.update(min_size=min(size), max_size=max(size), test_min_size=None)
    model = build_model(cfg)
    if state is not None:
        model.load_state_dict(state, strict=True)
    return model, cfg


def synthetic_batch(
    n: int, size: tuple[int, int], num_classes: int, seed: int = 0
) -> tuple[list[Tensor], list[dict[str, Tensor]]]:
    """``n`` synthetic scenes of ``size`` as ``Tensor[3, H, W]`` (0–255) with targets (labels
    folded into ``0..num_classes-1``)."""
    from dynadet.data.synthetic import render_scene

    images, targets = [], []
    for i in range(n):
        scene = render_scene(seed + i, height=size[0], width=size[1])
        images.append(torch.from_numpy(scene.image).permute(2, 0, 1).float())
        targets.append({
            "boxes": torch.from_numpy(scene.boxes),
            "labels": torch.from_numpy(scene.labels) % num_classes,
        })
    return images, targets


def data_images(path: str | Path, image_dir: str | Path | None = None) -> list[Path]:
    """Image files of a folder, or of a COCO annotation JSON (``file_name`` under
    ``image_dir``, default ``images/`` beside the JSON's folder or the JSON's own folder)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(f for f in path.iterdir() if f.suffix.lower() in _IMAGE_SUFFIXES)
        if not files:
            raise FileNotFoundError(f"{path}: no image files in this folder")
        return files
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such folder or COCO JSON file")
    try:
        names = [im["file_name"] for im in json.loads(path.read_text())["images"]]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{path}: not a COCO annotation file with an 'images' list") from err
    if image_dir is None:
        beside = path.parent.parent / "images"
        image_dir = beside if beside.is_dir() else path.parent
    return [Path(image_dir) / name for name in names]


# ----------------------------------------------------------------------------- measurement


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PeakMemory:
    """Peak memory growth (MB) over a ``with`` block; ``method`` says how it was measured."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak_mb: float | None = None
        self.method = ""

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            _sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            self.method = "torch.cuda.max_memory_allocated growth"
        elif _reset_peak_rss():
            self._base = _proc_status_kb("VmRSS")
            self.method = "peak RSS growth (Linux VmHWM, reset via /proc/self/clear_refs)"
        else:
            self._base = _maxrss_kb()
            self.method = "ru_maxrss high-water mark growth (lower bound)"
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            _sync(self.device)
            peak = torch.cuda.max_memory_allocated(self.device) - self._base
            self.peak_mb = peak / 2**20
        elif self.method.startswith("peak RSS"):
            self.peak_mb = max(0, _proc_status_kb("VmHWM") - self._base) / 1024
        else:
            self.peak_mb = max(0, _maxrss_kb() - self._base) / 1024


def _proc_status_kb(key: str) -> int:
    match = re.search(rf"^{key}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    if match is None:
        raise OSError(f"no {key} in /proc/self/status")
    return int(match[1])


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # "5": reset the peak RSS (VmHWM) to the current RSS
        _proc_status_kb("VmHWM")
        return True
    except OSError:
        return False


def _maxrss_kb() -> int:
    try:
        import resource
    except ImportError:  # Windows
        return 0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss // 1024 if sys.platform == "darwin" else rss  # bytes on macOS, kB elsewhere


def time_runs(
    fn: Callable[[], object], iters: int, warmup: int, device: torch.device,
    tick: Callable[[], object] = lambda: None,
) -> tuple[list[float], PeakMemory]:
    """Wall times (ms) of ``iters`` runs of ``fn`` after ``warmup`` runs, and the peak memory
    growth during the timed runs."""
    for _ in range(warmup):
        fn()
        tick()
    times = []
    with PeakMemory(device) as memory:
        for _ in range(iters):
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            times.append((time.perf_counter() - start) * 1000)
            tick()
    return times, memory


def interleaved_medians(
    fns: dict[str, Callable[[], object]], repeat: int, device: torch.device
) -> dict[str, float]:
    """Median wall time (ms) of each function; one warm-up each, then the runs interleaved so
    machine load hits them alike (the comparisons of ``benchmarks/*.py``)."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():
        fn()
    for _ in range(repeat):
        for name, fn in fns.items():
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            times[name].append((time.perf_counter() - start) * 1000)
    return {k: statistics.median(v) for k, v in times.items()}


def _timing_row(batch_size: int, times: list[float], memory: PeakMemory) -> dict[str, Any]:
    median = statistics.median(times)
    return {
        "batch_size": batch_size,
        "latency_ms": median,
        "latency_ms_min": min(times),
        "throughput_img_s": batch_size / (median / 1000),
        "peak_memory_mb": memory.peak_mb,
        "memory_method": memory.method,
    }


def _train_step(
    model: nn.Module, images: list[Tensor], targets: list[dict[str, Tensor]],
    optimizer: torch.optim.Optimizer,
) -> Callable[[], None]:
    def step() -> None:
        losses = model(images, targets)
        loss = sum(v for k, v in losses.items() if k.startswith("loss"))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


# ----------------------------------------------------------------------------- driver


def benchmark(
    config: str | Path | Mapping[str, Any],
    overrides: Sequence[str] = (),
    *,
    weights: str | Path | None = None,
    device: str = "cpu",
    batch_sizes: Sequence[int] = (1, 8),
    size: tuple[int, int] = DEFAULT_SIZE,
    iters: int = 10,
    warmup: int = 2,
    timing: bool = True,
    train: bool = False,
    data: str | Path | None = None,
    image_dir: str | Path | None = None,
    num_images: int = 8,
    progress: bool = True,
) -> dict[str, Any]:
    """Measure a detector (see the module docstring); returns the JSON-ready result."""
    from dynadet.api import load_image

    if iters < 1 or warmup < 0 or any(bs < 1 for bs in batch_sizes):
        raise ValueError(
            f"need iters >= 1, warmup >= 0 and batch sizes >= 1, got iters={iters}, "
            f"warmup={warmup}, batch sizes {list(batch_sizes)}"
        )
    dev = torch.device(device)
    model, _ = build_for_benchmark(config, overrides, weights, size)
    model.to(dev).eval()
    num_classes = int(getattr(model, "num_classes", 1))
    files = data_images(data, image_dir) if data is not None else []
    if files and num_images > 0:
        files = files[:num_images]
    n_cost = len(files) if files else num_images
    steps = n_cost + (len(batch_sizes) * (iters + warmup) * (1 + train) if timing else 0)
    bar = tqdm(total=steps, desc="benchmark", unit="run", disable=not progress, file=sys.stderr)

    result: dict[str, Any] = {
        "config": str(config) if not isinstance(config, Mapping) else "<mapping>",
        "overrides": list(overrides),
        "weights": str(weights) if weights is not None else None,
        "device": str(dev),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "input_size": list(size),
        "iters": iters,
        "warmup": warmup,
        "params": parameter_counts(model),
    }
    bar.set_description("counting MACs")
    image, _ = synthetic_batch(1, size, num_classes)
    result["flops"] = count_model_macs(model, [image[0].to(dev)]).to_dict()

    result["head_cost"] = None
    head = getattr(model, "head", None)
    if head is not None and hasattr(head, "cls_tower") and n_cost > 0:
        bar.set_description("head cost")

        def cost_batches() -> Any:
            for i in range(n_cost):
                if files:
                    yield [load_image(files[i]).to(dev)]
                else:
                    yield [synthetic_batch(1, size, num_classes, seed=1000 + i)[0][0].to(dev)]
                bar.update()

        cost = head_cost(model, cost_batches())
        if max(cost.full) > 0:
            result["head_cost"] = cost.summary() | {"source": str(data) if files else "synthetic"}

    result["inference"] = None
    result["train"] = None
    if timing:
        result["inference"] = []
        for bs in batch_sizes:
            bar.set_description(f"inference, batch {bs}")
            images = [im.to(dev) for im in synthetic_batch(bs, size, num_classes)[0]]

            def infer(images: list[Tensor] = images) -> object:
                return model(images)

            with torch.inference_mode():
                times, memory = time_runs(infer, iters, warmup, dev, bar.update)
            result["inference"].append(_timing_row(bs, times, memory))
        if train:
            result["train"] = []
            model.train()
            params = [p for p in model.parameters() if p.requires_grad]
            # A tiny step size: the step's cost is what matters, the weights should stay sane.
            optimizer = torch.optim.SGD(params, lr=1e-6, momentum=0.9)
            for bs in batch_sizes:
                bar.set_description(f"train step, batch {bs}")
                images, targets = synthetic_batch(bs, size, num_classes)
                images = [im.to(dev) for im in images]
                targets = [{k: v.to(dev) for k, v in t.items()} for t in targets]
                step = _train_step(model, images, targets, optimizer)
                times, memory = time_runs(step, iters, warmup, dev, bar.update)
                result["train"].append(_timing_row(bs, times, memory))
            model.eval()
    bar.close()
    return result


# ----------------------------------------------------------------------------- report


def _millions(n: int) -> str:
    return f"{n / 1e6:.2f} M"


def format_report(result: Mapping[str, Any]) -> str:
    """Human-readable tables of a :func:`benchmark` result."""
    h, w = result["input_size"]
    params = result["params"]
    lines = [
        f"dynadet benchmark: {result['config']} on {result['device']} "
        f"({result['threads']} threads, torch {result['torch']}), input {h}×{w}",
        f"parameters: {_millions(params['total'])} total, {_millions(params['trainable'])} "
        "trainable (" + ", ".join(f"{k} {_millions(v)}" for k, v in params["parts"].items()) + ")",
        "",
    ]
    flops = result["flops"]
    shape = "×".join(str(s) for s in flops["input_shape"])
    lines += [
        f"MACs of one inference, padded input {shape} (FLOPs = 2 × MACs):",
        "",
        "| part | GMACs | GFLOPs | share |",
        "|:---|---:|---:|---:|",
    ]
    total = max(flops["macs"], 1)
    rows = {"total": flops["macs"] / 1e9, **flops["parts_gmacs"]}
    for name, gmacs in rows.items():
        share = f"{100 * gmacs * 1e9 / total:.1f} %"
        lines.append(f"| {name} | {gmacs:.3f} | {2 * gmacs:.3f} | {share} |")
    cost = result.get("head_cost")
    if cost:
        paper, gmacs = cost["paper_units"], cost["gmacs"]
        kind = "executed (gated towers)" if cost["dynamic"] else "static"
        lines += [
            "",
            f"head towers, {kind}, over {cost['images']} {cost['source']} image(s): "
            f"avg {paper['avg']:.2f} / min {paper['min']:.2f} / max {paper['max']:.2f} "
            f"README units (MACs/2^30 per image); {gmacs['avg']:.2f} GMACs avg; "
            f"{100 * cost['executed_fraction']:.1f} % of the full cost",
        ]
    timed = [("inference", r) for r in result.get("inference") or []]
    timed += [("train step", r) for r in result.get("train") or []]
    if timed:
        lines += [
            "",
            f"| mode | batch | latency ms (median of {result['iters']}) | images/s "
            "| peak memory MB |",
            "|:---|---:|---:|---:|---:|",
        ]
        for mode, r in timed:
            mem = "–" if r["peak_memory_mb"] is None else f"{r['peak_memory_mb']:.0f}"
            lines.append(
                f"| {mode} | {r['batch_size']} | {r['latency_ms']:.1f} | "
                f"{r['throughput_img_s']:.2f} | {mem} |"
            )
        lines.append(f"\nmemory: {timed[0][1]['memory_method']}")
    return "\n".join(lines)
