"""Line charts drawn with Pillow (no plotting library among the dependencies)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from PIL import Image, ImageDraw

PALETTE = (
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
)


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = min((m * mag for m in (1, 2, 5, 10) if m * mag >= raw), default=raw)
    start = math.ceil(lo / step) * step
    return [start + i * step for i in range(int((hi - start) / step) + 1)]


def _fmt(v: float) -> str:
    return f"{v:.0f}" if abs(v) >= 100 or v == int(v) else f"{v:.3g}"


def line_chart(
    series: Mapping[str, Sequence[tuple[float, float]]],
    path: str | Path,
    title: str = "",
    xlabel: str = "iteration",
    ylabel: str = "",
    log_y: bool = False,
    size: tuple[int, int] = (760, 420),
) -> Path:
    """Draw one line (with points when short) per series and save a PNG."""
    w, h = size
    left, right, top, bottom = 70, 150, 34, 46
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    pts = {
        k: [(x, y) for x, y in v if math.isfinite(y) and (not log_y or y > 0)]
        for k, v in series.items()
    }
    allx = [x for v in pts.values() for x, _ in v]
    ally = [y for v in pts.values() for _, y in v]
    draw.text((left, 10), title, fill="black")
    if not allx:
        img.save(path)
        return Path(path)

    def ty(y: float) -> float:
        return math.log10(y) if log_y else y

    x0, x1 = min(allx), max(allx)
    y0, y1 = min(ty(y) for y in ally), max(ty(y) for y in ally)
    if x1 == x0:
        x1 = x0 + 1
    if y1 == y0:
        y1 = y0 + 1
    pad = 0.05 * (y1 - y0)
    y0, y1 = y0 - pad, y1 + pad

    def px(x: float, y: float) -> tuple[float, float]:
        return (
            left + (x - x0) / (x1 - x0) * (w - left - right),
            h - bottom - (ty(y) - y0) / (y1 - y0) * (h - top - bottom),
        )

    draw.rectangle((left, top, w - right, h - bottom), outline=(90, 90, 90))
    for t in _ticks(x0, x1):
        x, _ = px(t, 10**y0 if log_y else y0)
        draw.line((x, h - bottom, x, h - bottom + 4), fill="black")
        draw.text((x - 10, h - bottom + 6), _fmt(t), fill="black")
    for t in _ticks(y0, y1):
        yv = 10**t if log_y else t
        _, y = px(x0, yv)
        draw.line((left - 4, y, w - right, y), fill=(230, 230, 230))
        draw.text((4, y - 6), _fmt(yv), fill="black")
    draw.text(((left + w - right) // 2 - 20, h - 16), xlabel, fill="black")
    draw.text((4, top - 22), ylabel, fill="black")
    for i, (name, v) in enumerate(pts.items()):
        color = PALETTE[i % len(PALETTE)]
        xy = [px(x, y) for x, y in v]
        if len(xy) > 1:
            draw.line(xy, fill=color, width=2)
        if len(xy) <= 30:
            for x, y in xy:
                draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill=color)
        ly = top + 8 + 16 * i
        draw.line((w - right + 10, ly + 6, w - right + 30, ly + 6), fill=color, width=3)
        draw.text((w - right + 36, ly), name, fill="black")
    img.save(path)
    return Path(path)
