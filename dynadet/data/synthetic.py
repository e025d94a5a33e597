"""Synthetic detection scenes: textured shapes on cluttered backgrounds.

Each scene holds a few objects of ``SHAPE_CLASSES`` (shapes differing in form, colour range and
texture) at sizes from small to large, possibly overlapping, over a noisy background with
distractor strokes. Everything is drawn from a seeded NumPy generator, so a seed gives the same
scene on every machine.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SHAPE_CLASSES: tuple[str, ...] = ("square", "disc", "triangle", "ring", "cross")


@dataclass
class Scene:
    """An image ``[H, W, 3] uint8`` with ``boxes [G, 4]`` (xyxy float32) and ``labels [G]``."""

    image: np.ndarray
    boxes: np.ndarray
    labels: np.ndarray


def _background(rng: np.random.Generator, h: int, w: int) -> Image.Image:
    base = rng.integers(40, 200, size=3)
    grad = np.linspace(0, 1, w)[None, :, None] * rng.integers(-40, 40, size=3)[None, None, :]
    noise = rng.normal(0, 12, size=(h, w, 3))
    arr = np.clip(base[None, None, :] + grad + noise, 0, 255).astype(np.uint8)
    img = Image.fromarray(arr)
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(3, 10))):  # distractor strokes
        x0, x1 = rng.integers(0, w, size=2)
        y0, y1 = rng.integers(0, h, size=2)
        color = tuple(int(c) for c in rng.integers(0, 255, size=3))
        draw.line(
            [(int(x0), int(y0)), (int(x1), int(y1))], fill=color, width=int(rng.integers(1, 4))
        )
    return img


def _draw_shape(
    draw: ImageDraw.ImageDraw,
    label: int,
    box: tuple[int, int, int, int],
    color: tuple[int, int, int],
) -> None:
    x0, y0, x1, y1 = box
    if label == 0:
        draw.rectangle(box, fill=color)
    elif label == 1:
        draw.ellipse(box, fill=color)
    elif label == 2:
        draw.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], fill=color)
    elif label == 3:
        width = max(2, (x1 - x0) // 5)
        draw.ellipse(box, outline=color, width=width)
    else:
        tw, th = max(2, (x1 - x0) // 3), max(2, (y1 - y0) // 3)
        cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
        draw.rectangle((x0, cy - th // 2, x1, cy + th // 2), fill=color)
        draw.rectangle((cx - tw // 2, y0, cx + tw // 2, y1), fill=color)


_HUES = ((200, 60, 60), (60, 170, 70), (60, 90, 210), (220, 190, 50), (170, 70, 190))


def render_scene(seed: int, height: int = 256, width: int = 320, max_objects: int = 6) -> Scene:
    """Draw one scene. Object sizes span ~8 px to half the short side."""
    rng = np.random.default_rng(seed)
    img = _background(rng, height, width)
    draw = ImageDraw.Draw(img)
    boxes, labels = [], []
    short = min(height, width)
    for _ in range(int(rng.integers(1, max_objects + 1))):
        label = int(rng.integers(len(SHAPE_CLASSES)))
        size = float(np.exp(rng.uniform(np.log(8), np.log(short / 2))))
        aspect = float(np.exp(rng.uniform(-0.4, 0.4)))
        bw = max(6, int(size * aspect))
        bh = max(6, int(size / aspect))
        x0 = int(rng.integers(0, max(1, width - bw)))
        y0 = int(rng.integers(0, max(1, height - bh)))
        box = (x0, y0, min(width - 1, x0 + bw), min(height - 1, y0 + bh))
        jitter = rng.integers(-35, 35, size=3)
        color = tuple(
            int(np.clip(c + j, 0, 255)) for c, j in zip(_HUES[label], jitter, strict=True)
        )
        _draw_shape(draw, label, box, color)
        boxes.append([box[0], box[1], box[2] + 1, box[3] + 1])
        labels.append(label)
    return Scene(
        np.asarray(img, dtype=np.uint8).copy(),
        np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
        np.asarray(labels, dtype=np.int64),
    )
