"""Synthetic detection scenes and a COCO-format data set writer.

A scene holds textured shapes of ``SHAPE_CLASSES`` over a cluttered background. The classes
differ in form first: colour ranges overlap in pairs (square/cross warm, disc/ring cool,
triangle spanning both) and every class may carry every texture (solid, stripes, checker,
noise), only with different odds. Objects range from ~8 px to half the short side, later ones
occlude earlier ones, and the background has gradients, low-frequency and pixel noise, and
distractors (textured irregular blobs, strokes) that are not objects. Boxes are the tight box
of each object's full shape; an object whose visible fraction (from the painted masks) is below
``min_visible`` is left unlabelled. Everything is drawn from seeded NumPy generators, so a seed
gives the same scene on every machine.
"""

from __future__ import annotations

import argparse
import colorsys
import json
import multiprocessing as mp
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

SHAPE_CLASSES: tuple[str, ...] = ("square", "disc", "triangle", "ring", "cross")

_RENDER_VERSION = 2  # bump when the drawing changes, so cached data sets are rewritten
# per class: hue interval (fraction of a turn; overlapping in pairs so form must decide) and
# odds of the textures (solid, stripes, checker, noise)
_HUE_RANGES = ((-0.06, 0.12), (0.35, 0.60), (0.05, 0.75), (0.45, 0.70), (0.00, 0.16))
_TEXTURE_ODDS = (
    (0.4, 0.2, 0.3, 0.1),
    (0.4, 0.3, 0.1, 0.2),
    (0.3, 0.3, 0.2, 0.2),
    (0.5, 0.2, 0.1, 0.2),
    (0.3, 0.1, 0.4, 0.2),
)


@dataclass
class Scene:
    """An image ``[H, W, 3] uint8`` with ``boxes [G, 4]`` (xyxy float32), ``labels [G]`` int64
    and ``areas [G]`` (visible pixel count of each object, COCO's mask-area convention)."""

    image: np.ndarray
    boxes: np.ndarray
    labels: np.ndarray
    areas: np.ndarray | None = None


def _color(rng: np.random.Generator, label: int) -> np.ndarray:
    lo, hi = _HUE_RANGES[label]
    rgb = colorsys.hsv_to_rgb(rng.uniform(lo, hi) % 1.0, rng.uniform(0.35, 1.0),
                              rng.uniform(0.35, 1.0))
    return np.array(rgb) * 255.0


def _texture(rng: np.random.Generator, kind: int, h: int, w: int, color: np.ndarray) -> np.ndarray:
    """``[h, w, 3]`` float pattern around ``color``: 0 solid, 1 stripes, 2 checker, 3 noise."""
    base = np.broadcast_to(color, (h, w, 3))
    if kind == 0:
        return base + rng.normal(0, 4, size=(h, w, 1))
    other = np.clip(color * rng.uniform(0.3, 0.7) + rng.uniform(0, 80), 0, 255)
    yy, xx = np.mgrid[0:h, 0:w]
    if kind == 1:
        angle = rng.uniform(0, np.pi)
        period = rng.uniform(3, 9)
        phase = (xx * np.cos(angle) + yy * np.sin(angle)) / period
        on = (phase % 1.0) < 0.5
    elif kind == 2:
        cell = int(rng.integers(2, 7))
        on = ((xx // cell + yy // cell) % 2).astype(bool)
    else:
        t = rng.uniform(0, 1, size=(h, w, 1))
        return base * (1 - t) + other * t
    return np.where(on[..., None], other, base)


def _shape_mask(rng: np.random.Generator, label: int, bw: int, bh: int) -> np.ndarray:
    """``[bh, bw]`` bool mask of one shape filling (up to rotation) a ``bw × bh`` box."""
    mask = Image.new("L", (bw, bh), 0)
    draw = ImageDraw.Draw(mask)
    cx, cy, rx, ry = (bw - 1) / 2, (bh - 1) / 2, (bw - 1) / 2, (bh - 1) / 2

    def polygon(points: np.ndarray, angle: float) -> None:
        c, s = np.cos(angle), np.sin(angle)
        rot = points @ np.array([[c, s], [-s, c]])
        lo, hi = rot.min(0), rot.max(0)
        rot = (2 * rot - lo - hi) / (hi - lo).clip(1e-6)  # re-fill the box after rotating
        draw.polygon([(cx + x * rx, cy + y * ry) for x, y in rot], fill=255)

    if label == 0:
        square = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], dtype=float)
        polygon(square, rng.uniform(0, np.pi / 2) if rng.uniform() < 0.4 else 0.0)
    elif label == 1:
        draw.ellipse((0, 0, bw - 1, bh - 1), fill=255)
    elif label == 2:
        t = np.array([np.pi / 2, np.pi / 2 + 2 * np.pi / 3, np.pi / 2 + 4 * np.pi / 3])
        polygon(np.stack([np.cos(t), -np.sin(t)], 1), rng.uniform(0, 2 * np.pi))
    elif label == 3:
        width = max(2, int(min(bw, bh) * rng.uniform(0.12, 0.25)))
        draw.ellipse((0, 0, bw - 1, bh - 1), outline=255, width=width)
    else:
        a = rng.uniform(0.18, 0.3)
        arm = np.array(
            [[-a, -1], [a, -1], [a, -a], [1, -a], [1, a], [a, a], [a, 1], [-a, 1], [-a, a],
             [-1, a], [-1, -a], [-a, -a]]
        )  # fmt: skip
        polygon(arm, np.pi / 4 if rng.uniform() < 0.3 else 0.0)
    return np.asarray(mask) > 127


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """``[h, w, 3]`` float: gradient + low-frequency and pixel noise + distractors."""
    base = rng.uniform(30, 220, size=3)
    angle = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:h, 0:w]
    ramp = (xx * np.cos(angle) + yy * np.sin(angle)) / max(h, w)
    img = base + ramp[..., None] * rng.uniform(-70, 70, size=3)
    coarse = rng.normal(0, 25, size=(int(rng.integers(2, 6)), int(rng.integers(2, 6)), 3))
    low = np.stack(
        [np.asarray(Image.fromarray(coarse[..., c].astype(np.float32)).resize((w, h),
                                                                              Image.BILINEAR))
         for c in range(3)], axis=-1,
    )  # fmt: skip
    img = img + low + rng.normal(0, rng.uniform(2, 12), size=(h, w, 1))
    for _ in range(int(rng.integers(0, 4))):  # textured irregular blobs: texture is not enough
        r = rng.uniform(6, min(h, w) / 4)
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        n = int(rng.integers(7, 13))
        t = np.sort(rng.uniform(0, 2 * np.pi, n))
        rad = r * rng.uniform(0.4, 1.0, n)
        blob = Image.new("L", (w, h), 0)
        ImageDraw.Draw(blob).polygon(
            list(zip((cx + rad * np.cos(t)).tolist(), (cy + rad * np.sin(t)).tolist(),
                     strict=True)), fill=255)
        m = np.asarray(blob) > 127
        if m.any():
            tex = _texture(rng, int(rng.integers(1, 4)), h, w, rng.uniform(0, 255, size=3))
            img[m] = tex[m]
    pil = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(pil)
    for _ in range(int(rng.integers(3, 12))):  # strokes and arcs
        color = tuple(int(c) for c in rng.integers(0, 256, size=3))
        x0, x1 = sorted(rng.uniform(0, w, 2).tolist())
        y0, y1 = sorted(rng.uniform(0, h, 2).tolist())
        width = int(rng.integers(1, 4))
        if rng.uniform() < 0.6:
            draw.line([(x0, y0), (x1, y1)] if rng.uniform() < 0.5 else [(x0, y1), (x1, y0)],
                      fill=color, width=width)
        else:
            start = float(rng.uniform(0, 360))
            draw.arc((x0, y0, x1 + 1, y1 + 1), start, start + float(rng.uniform(40, 200)),
                     fill=color, width=width)
    return np.asarray(pil, dtype=np.float64)


def render_scene(
    seed: int,
    height: int = 256,
    width: int = 320,
    max_objects: int = 6,
    min_visible: float = 0.3,
    size_range: tuple[float, float] | None = None,
) -> Scene:
    """Draw one scene of 1..``max_objects`` shapes.

    Object sizes (geometric mean of the box sides before aspect jitter) are log-uniform in
    ``size_range``, by default ``(8, short side / 2)``.

    Objects whose visible fraction is below ``min_visible`` are not labelled (the topmost
    object is always visible, so a scene has at least one box). Boxes are the tight boxes of
    the full shapes, occluded parts included; ``areas`` counts visible pixels.
    """
    rng = np.random.default_rng(seed)
    img = _background(rng, height, width)
    owner = np.full((height, width), -1, dtype=np.int32)
    short = min(height, width)
    lo_size, hi_size = size_range if size_range is not None else (8.0, max(9.0, short / 2))
    if not 0 < lo_size <= hi_size:
        raise ValueError(f"size_range must be (low, high) with 0 < low <= high, got {size_range}")
    boxes, labels, full = [], [], []
    for k in range(int(rng.integers(1, max_objects + 1))):
        label = int(rng.integers(len(SHAPE_CLASSES)))
        size = float(np.exp(rng.uniform(np.log(lo_size), np.log(hi_size))))
        aspect = float(np.exp(rng.uniform(-0.35, 0.35)))
        bw = int(np.clip(round(size * aspect), 6, width))
        bh = int(np.clip(round(size / aspect), 6, height))
        x0 = int(rng.integers(0, width - bw + 1))
        y0 = int(rng.integers(0, height - bh + 1))
        mask = _shape_mask(rng, label, bw, bh)
        kind = int(rng.choice(4, p=_TEXTURE_ODDS[label]))
        tex = _texture(rng, kind, bh, bw, _color(rng, label))
        region = img[y0 : y0 + bh, x0 : x0 + bw]
        region[mask] = tex[mask]
        owner[y0 : y0 + bh, x0 : x0 + bw][mask] = k
        ys, xs = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
        boxes.append([x0 + xs[0], y0 + ys[0], x0 + xs[-1] + 1, y0 + ys[-1] + 1])
        labels.append(label)
        full.append(int(mask.sum()))
    img += rng.normal(0, 3, size=img.shape)  # sensor noise over everything
    visible = np.bincount(owner[owner >= 0], minlength=len(labels))
    keep = visible >= min_visible * np.asarray(full)
    return Scene(
        np.clip(img, 0, 255).round().astype(np.uint8),
        np.asarray(boxes, dtype=np.float32).reshape(-1, 4)[keep],
        np.asarray(labels, dtype=np.int64)[keep],
        visible[keep].astype(np.int64),
    )


def _render_file(job: tuple[int, int, int, int, str]) -> tuple[int, int, list, list, list]:
    """Render image ``i`` of a data set and write its PNG; returns its size and labels.

    Each image has its own seed (``[seed, i]``), so the result does not depend on which process
    renders it or in which order."""
    seed, i, height, width, path = job
    size_rng = np.random.default_rng([seed, i, 1])
    h = round(height * size_rng.uniform(0.8, 1.2))
    w = round(width * size_rng.uniform(0.8, 1.2))
    scene = render_scene(int(np.random.SeedSequence([seed, i]).generate_state(1)[0]), h, w)
    Image.fromarray(scene.image).save(path, compress_level=1)
    return h, w, scene.boxes.tolist(), scene.labels.tolist(), scene.areas.tolist()


def _num_workers(workers: int | None, num_images: int) -> int:
    if workers is None:
        workers = min(os.cpu_count() or 1, 8)
    if workers < 0:
        raise ValueError(f"workers must be >= 0, got {workers}")
    return 0 if num_images < 64 else workers  # a pool costs more than a few images


@contextmanager
def _pool(workers: int) -> Iterator[Any]:
    """A fork-started process pool of ``workers`` (``None`` for ``workers <= 1``, or where fork
    is unavailable). Rendering uses NumPy and PIL only, so forking a process that has started
    PyTorch's thread pools is safe."""
    if workers <= 1 or "fork" not in mp.get_all_start_methods():
        yield None
        return
    with mp.get_context("fork").Pool(workers) as pool:
        yield pool


def _params(num_images: int, seed: int, height: int, width: int, val_fraction: float
            ) -> dict[str, Any]:
    return {"num_images": num_images, "seed": seed, "height": height, "width": width,
            "val_fraction": val_fraction, "render_version": _RENDER_VERSION}


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)  # atomic: a reader never sees half a file


def write_synthetic_dataset(
    out_dir: str | Path,
    num_images: int,
    seed: int = 0,
    height: int = 256,
    width: int = 320,
    val_fraction: float = 0.2,
    progress: bool = True,
    workers: int | None = None,
) -> dict[str, Path]:
    """Write a COCO-format synthetic data set; returns its paths.

    Layout: ``out_dir/images/{id:06d}.png`` (ids 1..N; each image's height and width drawn
    within ±20 % of ``height``/``width``), ``out_dir/annotations/{train,val}.json`` (a seeded
    split, ``round(N * val_fraction)`` validation images, at least one image in train),
    categories ids ``1..K`` named by ``SHAPE_CLASSES``; ``area`` is the visible pixel count
    (COCO's mask-area convention), ``iscrowd`` 0. ``out_dir/synth.json`` records the
    parameters; when it matches and every file exists, nothing is rewritten. ``workers``
    processes render in parallel (default: one per CPU core, at most 8; ``0``: in this
    process); the data set is the same for any number.

    Returns ``{"root", "images", "train", "val"}``.
    """
    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    if min(height, width) < 32:
        raise ValueError(f"height and width must be >= 32, got {height}x{width}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    root = Path(out_dir)
    paths = {"root": root, "images": root / "images",
             "train": root / "annotations" / "train.json",
             "val": root / "annotations" / "val.json"}
    params = _params(num_images, seed, height, width, val_fraction)
    marker = root / "synth.json"
    files = [paths["images"] / f"{i:06d}.png" for i in range(1, num_images + 1)]
    if marker.is_file():
        try:
            same = json.loads(marker.read_text()) == params
        except json.JSONDecodeError:
            same = False
        if same and paths["train"].is_file() and paths["val"].is_file() and all(
            f.is_file() for f in files
        ):
            return paths
        marker.unlink()  # an interrupted rewrite must not look complete
        for stale in paths["images"].glob("[0-9][0-9][0-9][0-9][0-9][0-9].png"):
            if int(stale.stem) > num_images:
                stale.unlink()
    paths["images"].mkdir(parents=True, exist_ok=True)
    paths["train"].parent.mkdir(parents=True, exist_ok=True)

    jobs = [(seed, i, height, width, str(files[i])) for i in range(num_images)]
    workers = _num_workers(workers, num_images)
    bar = tqdm(total=num_images, desc="synthetic images", unit="img", disable=not progress)
    images, anns = [], []
    with _pool(workers) as pool:
        rendered = pool.imap(_render_file, jobs, chunksize=16) if pool else map(_render_file, jobs)
        for image_id, (h, w, boxes, labels, areas) in enumerate(rendered, start=1):
            images.append({"id": image_id, "file_name": files[image_id - 1].name, "height": h,
                           "width": w})
            for box, label, area in zip(boxes, labels, areas, strict=True):
                x0, y0, x1, y1 = box
                anns.append({"id": len(anns) + 1, "image_id": image_id,
                             "category_id": label + 1, "bbox": [x0, y0, x1 - x0, y1 - y0],
                             "area": area, "iscrowd": 0})
            bar.update(1)
    bar.close()

    order = np.random.default_rng([seed, 2]).permutation(num_images)
    n_val = min(int(round(num_images * val_fraction)), num_images - 1)
    val_ids = set((order[:n_val] + 1).tolist())
    categories = [{"id": k + 1, "name": n, "supercategory": "shape"}
                  for k, n in enumerate(SHAPE_CLASSES)]
    for split, in_split in (("train", lambda i: i not in val_ids), ("val", val_ids.__contains__)):
        _write_json(paths[split], {
            "info": {"description": f"dynadet synthetic shapes ({split})", **params},
            "licenses": [],
            "images": [im for im in images if in_split(im["id"])],
            "annotations": [a for a in anns if in_split(a["image_id"])],
            "categories": categories,
        })  # fmt: skip
    _write_json(marker, params)
    return paths


def add_synth_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``dynadet data synth OUT``."""
    parser.add_argument("out", metavar="OUT", help="output folder")
    parser.add_argument("--images", type=int, default=500, help="number of images (500)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (0)")
    parser.add_argument("--height", type=int, default=256, help="mean image height (256)")
    parser.add_argument("--width", type=int, default=320, help="mean image width (320)")
    parser.add_argument("--val-fraction", type=float, default=0.2,
                        help="fraction of images in the validation split (0.2)")
    parser.add_argument("--workers", type=int, default=None,
                        help="rendering processes (default: one per core, at most 8)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def run_synth(args: argparse.Namespace) -> int:
    """Run ``dynadet data synth``; returns the process exit code."""
    try:
        paths = write_synthetic_dataset(
            args.out, args.images, seed=args.seed, height=args.height, width=args.width,
            val_fraction=args.val_fraction, progress=not getattr(args, "no_progress", False),
            workers=getattr(args, "workers", None),
        )  # fmt: skip
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"images: {paths['images']}\ntrain:  {paths['train']}\nval:    {paths['val']}")
    return 0
