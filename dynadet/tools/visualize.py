"""Pictures of what the dynamic heads decide: DyHead attentions and FGDH routing gates.

* :func:`attention_maps` — for a detector with a DyHead neck: the scale attention of every
  block (one weight per level and source: finer / same / coarser level; global pooled, so a
  number, not a map), and the last block's DCN sampling (offsets and modulation mask) with the
  ``top_k`` most activated locations of each level. :func:`save_attention_figure` draws them.
* :func:`gate_maps` — for a detector with FGDH routing towers: the per-pixel gates of every
  layer, level and path, and the executed share of the tower MACs. :func:`save_gate_figure`
  draws the depth-path gates over the image (the FGDH introduction figure).

Nothing is changed in the models: DyHead is observed through forward hooks, the routing layers
through their own ``keep_gates`` switch; both are removed/restored before returning, so a model
that is not being visualised runs exactly as before.

Coordinates. A cell ``(i, j)`` of a stride-``s`` level covers the resized-image pixels
``[i·s, (i+1)·s) × [j·s, (j+1)·s)`` (centre ``(i + ½)·s``); the resized image fills the top-left
``h × w`` of the padded batch and is the original ``h0 × w0`` image scaled by ``(h/h0, w/w0)``.
:func:`to_image_space` inverts this (padding removed, resize undone) for heat maps and
:func:`level_to_image` for points. Figures use Pillow only, with a hand-made viridis-like
perceptual colour map (:func:`colormap`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch import Tensor, nn

from dynadet.api import ImageLike, load_image
from dynadet.engine.plot import PALETTE
from dynadet.models.dyhead import DyHeadBlock, hard_sigmoid
from dynadet.models.routing import RoutingLayer, RoutingTower

__all__ = [
    "SOURCES",
    "attention_maps",
    "attention_summary",
    "colormap",
    "gate_maps",
    "gate_summary",
    "level_to_image",
    "record_dyhead",
    "sampling_points",
    "save_attention_figure",
    "save_gate_figure",
    "to_image_space",
]

SOURCES = ("finer", "same", "coarser")  # last axis of the scale-attention tensors
_FINER, _SAME, _COARSER = range(3)
_TAPS = 9

# Viridis-like anchors (value, RGB): lightness rises monotonically, readable in greyscale.
_ANCHORS = (
    (0.000, (68, 1, 84)),
    (0.125, (71, 44, 122)),
    (0.250, (59, 81, 139)),
    (0.375, (44, 113, 142)),
    (0.500, (33, 144, 141)),
    (0.625, (39, 173, 129)),
    (0.750, (92, 200, 99)),
    (0.875, (170, 220, 50)),
    (1.000, (253, 231, 37)),
)
_POS = np.array([a[0] for a in _ANCHORS])
LUT = np.stack(
    [np.interp(np.linspace(0, 1, 256), _POS, [a[1][c] for a in _ANCHORS]) for c in range(3)], 1
).round().astype(np.uint8)  # [256, 3]

# Figure layout (pixels).
PAD, GUTTER, TITLE_H, BAR_H, ROW_H, MIN_COL, MIN_WIDTH = 8, 40, 30, 24, 14, 112, 420
ALPHA = 0.6  # heat-map opacity over the greyscale image


# --------------------------------------------------------------------------- colours, geometry


def colormap(values: Tensor | np.ndarray, lo: float = 0.0, hi: float = 1.0) -> np.ndarray:
    """Values ``[*]`` → RGB ``uint8 [*, 3]`` through the 256-entry LUT, ``lo``/``hi`` clipped;
    NaN maps to the ``lo`` colour."""
    v = values.detach().cpu().double().numpy() if isinstance(values, Tensor) else values
    t = np.nan_to_num((np.asarray(v, np.float64) - lo) / max(hi - lo, 1e-12), nan=0.0)
    return LUT[np.clip(np.rint(t * 255), 0, 255).astype(np.int64)]


def to_image_space(
    fmap: Tensor,
    stride: float,
    image_size: tuple[int, int],
    original_size: tuple[int, int],
    out_size: tuple[int, int] | None = None,
) -> Tensor:
    """A feature-grid map ``[*, H_l, W_l]`` → ``[*, h0, w0]`` over the original image.

    The original pixel centre ``y0 + ½`` lies at the continuous feature coordinate
    ``c = (y0 + ½)·(h/h0)/s`` (cell ``i`` spans ``[i, i+1)``), where the map is bilinearly
    interpolated between cell centres; only the cells that overlap the image
    (``ceil(h/s) × ceil(w/s)``) are read, clamped at their border, so padding never leaks in.
    ``out_size = (ho, wo)`` samples the same original-image frame on a coarser grid (for
    display): pixel ``yd`` stands for ``(yd + ½)·h0/ho``.
    """
    h, w = image_size
    h0, w0 = original_size
    ho, wo = out_size or (h0, w0)
    rows, cols = math.ceil(h / stride), math.ceil(w / stride)
    valid = fmap[..., :rows, :cols]
    dtype = fmap.dtype if fmap.is_floating_point() else torch.float32

    def norm(n_out: int, n_orig: int, n_resized: int, cells: int) -> Tensor:
        c = (torch.arange(n_out, dtype=torch.float64) + 0.5) * (n_orig / n_out)
        c = c * (n_resized / n_orig) / stride
        return (2 * c / cells - 1).to(dtype)  # grid_sample, align_corners=False

    gy, gx = norm(ho, h0, h, rows), norm(wo, w0, w, cols)
    grid = torch.stack(torch.broadcast_tensors(gx[None, :], gy[:, None]), -1).to(fmap.device)
    lead = fmap.shape[:-2]
    flat = valid.reshape(1, -1, rows, cols).to(dtype)
    out = F.grid_sample(flat, grid[None], "bilinear", padding_mode="border", align_corners=False)
    return out.reshape(*lead, ho, wo)


def level_to_image(
    yx: Tensor, stride: float, image_size: tuple[int, int], original_size: tuple[int, int]
) -> Tensor:
    """Points ``[*, 2]`` as ``(y, x)`` level-pixel indices → ``[*, 2]`` as ``(x, y)`` continuous
    original-image coordinates (pixel ``i`` of a level is centred at ``(i + ½)·s`` resized)."""
    (h, w), (h0, w0) = image_size, original_size
    scale = yx.new_tensor([h0 / h, w0 / w]) * stride
    return ((yx + 0.5) * scale).flip(-1)


def sampling_points(offset: Tensor) -> Tensor:
    """Where a 3×3, stride-1, pad-1 DCN samples: ``offset [*, 9, 2, H, W]`` (``(dy, dx)`` per
    tap ``k = 3i + j``) → ``[*, 9, 2, H, W]`` absolute ``(y, x)`` in level pixels:
    ``y = oy − 1 + i + dy``, ``x = ox − 1 + j + dx`` (see :mod:`dynadet.ops.deform_conv`)."""
    h, w = offset.shape[-2:]
    k = torch.arange(_TAPS, device=offset.device)
    tap = torch.stack((k // 3 - 1, k % 3 - 1), 1).to(offset.dtype)  # [9, 2]
    oy = torch.arange(h, device=offset.device, dtype=offset.dtype)[:, None].expand(h, w)
    ox = torch.arange(w, device=offset.device, dtype=offset.dtype)[None, :].expand(h, w)
    return offset + tap[:, :, None, None] + torch.stack((oy, ox))[None]


# --------------------------------------------------------------------------- running a model


def _model(detector_or_model: Any) -> nn.Module:
    model = detector_or_model if isinstance(detector_or_model, nn.Module) else None
    model = model if model is not None else getattr(detector_or_model, "model", None)
    if not isinstance(model, nn.Module) or not hasattr(model, "preprocess"):
        raise TypeError("expected a dynadet Detector or a detector module with .preprocess")
    return model


def _run(model: nn.Module, image: ImageLike) -> dict[str, Any]:
    """One eval-mode forward on one image; the frame (sizes, detections) of the result."""
    img = load_image(image)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            batch = model.preprocess([img.to(device)])
            results = model.forward_batch(batch)
    finally:
        model.train(was_training)
    det = {k: v.cpu() for k, v in results[0].items()}
    return {
        "image": img.cpu(),
        "image_size": tuple(batch.image_sizes[0]),
        "original_size": tuple(batch.original_sizes[0]),
        "padded_size": batch.shape,
        "detections": det,
    }


def _strides(model: nn.Module, sizes: Sequence[tuple[int, int]], padded: tuple[int, int]):
    gen = getattr(getattr(model, "head", None), "anchor_generator", None)
    strides = list(getattr(gen, "strides", []))
    if len(strides) == len(sizes):
        return [float(s) for s in strides]
    first = padded[1] / sizes[0][1]  # exact when the padding is a multiple of the first stride
    return [first * 2**level for level in range(len(sizes))]


def _level_names(strides: Sequence[float]) -> list[str]:
    return [f"P{round(math.log2(s))}" if s >= 1 else f"s{s:g}" for s in strides]


# --------------------------------------------------------------------------- DyHead


@contextmanager
def _dyhead_hooks(model: nn.Module) -> Iterator[list[dict[str, Any]]]:
    """Record, per DyHead block call: the offset-conv outputs (one per level), the scale
    attention of each source, and the block output. Hooks are removed on exit."""
    blocks = [m for m in model.modules() if isinstance(m, DyHeadBlock)]
    if not blocks:
        raise ValueError(
            f"{type(model).__name__} has no DyHead blocks: attention maps need a DyHead neck "
            "(e.g. the dyhead_r50_atss_fpn_1x preset)"
        )
    records: list[dict[str, Any]] = []
    pending: dict[int, dict[str, list[Tensor]]] = {id(b): {"om": [], "att": []} for b in blocks}
    handles = []

    def grab(block: DyHeadBlock, key: str):
        def hook(_m: nn.Module, _args: Any, out: Tensor) -> None:
            pending[id(block)][key].append(out.detach().clone())

        return hook

    def done(block: DyHeadBlock, args: Any, out: list[Tensor]) -> None:
        calls = pending[id(block)]
        records.append(_parse_block(calls["om"], calls["att"], out))
        calls["om"], calls["att"] = [], []

    for block in blocks:
        handles.append(block.offset.register_forward_hook(grab(block, "om")))
        # AttnConv ends with its ReLU; the block applies hard_sigmoid to this output.
        handles.append(block.AttnConv.register_forward_hook(grab(block, "att")))
        handles.append(block.register_forward_hook(done))
    try:
        yield records
    finally:
        for handle in handles:
            handle.remove()


def _parse_block(om: list[Tensor], att: list[Tensor], out: list[Tensor]) -> dict[str, Any]:
    num = len(out)
    n = out[0].shape[0]
    scale = torch.full((n, num, 3), float("nan"), dtype=att[0].dtype)
    calls = iter(att)
    # DyHeadBlock.forward weighs the sources of a level in the order same, finer, coarser.
    for level in range(num):
        scale[:, level, _SAME] = hard_sigmoid(next(calls)).flatten().cpu()
        if level > 0:
            scale[:, level, _FINER] = hard_sigmoid(next(calls)).flatten().cpu()
        if level < num - 1:
            scale[:, level, _COARSER] = hard_sigmoid(next(calls)).flatten().cpu()
    return {
        "scale": scale,
        "offset": [o[:, : 2 * _TAPS].unflatten(1, (_TAPS, 2)).cpu() for o in om],
        "mask": [o[:, 2 * _TAPS :].sigmoid().cpu() for o in om],
        "activation": [o.detach().norm(dim=1).cpu() for o in out],
    }


def record_dyhead(module: nn.Module, features: Sequence[Tensor]) -> dict[str, Any]:
    """Run ``module(features)`` (a DyHead, a block or a neck containing them) and return
    ``scale [N, K, L, 3]`` (scale attention of each of the K blocks, level and source in
    :data:`SOURCES` order, in [0, 1]; NaN where a level has no such neighbour) and, for the last
    block: ``offset`` (``L × [N, 9, 2, H_l, W_l]``, ``(dy, dx)`` of each tap), ``mask``
    (``L × [N, 9, H_l, W_l]``, modulation after the sigmoid) and ``activation``
    (``L × [N, H_l, W_l]``, channel L2 norm of the block output), plus ``output``."""
    with _dyhead_hooks(module) as records, torch.no_grad():
        output = module(features)
    last = records[-1]
    scale = torch.stack([r["scale"] for r in records], 1)
    return {**{k: last[k] for k in ("offset", "mask", "activation")}, "scale": scale,
            "output": output}


def _top_points(rec: dict[str, Any], level: int, stride: float, frame: dict[str, Any],
                top_k: int) -> dict[str, Tensor]:
    """The ``top_k`` most activated cells of a level (inside the image) and their samples."""
    h, w = frame["image_size"]
    act = rec["activation"][level][0]
    rows, cols = math.ceil(h / stride), math.ceil(w / stride)
    act = act[:rows, :cols]
    idx = act.flatten().topk(min(top_k, act.numel())).indices
    cy, cx = idx // cols, idx % cols
    points = sampling_points(rec["offset"][level][0])[:, :, cy, cx]  # [9, 2, k]
    weights = rec["mask"][level][0][:, cy, cx]  # [9, k]
    args = (stride, frame["image_size"], frame["original_size"])
    centres = torch.stack((cy, cx), 1).to(points.dtype)
    return {
        "centers": level_to_image(centres, *args),
        "samples": level_to_image(points.permute(2, 0, 1), *args),
        "weights": weights.T.contiguous(),
        "cells": torch.stack((cy, cx), 1),
    }


def attention_maps(detector_or_model: Any, image: ImageLike, *, top_k: int = 4) -> dict[str, Any]:
    """DyHead attentions of one image (the model's preprocessing, eval mode).

    Returns a dict with ``image`` (``[3, h0, w0]``, 0–255), ``image_size`` (resized ``(h, w)``),
    ``original_size`` ``(h0, w0)``, ``strides``, ``levels`` (``"P3"``…), ``detections``
    (``boxes/scores/labels``), ``scale`` (``[K, L, 3]``, see :func:`record_dyhead`), the last
    block's ``offset`` / ``mask`` / ``activation`` (per level, batch axis dropped), ``mask_image``
    (``[L, h0, w0]``: mask averaged over the 9 taps, in original image coordinates) and
    ``points`` (per level: ``centers [k, 2]`` and ``samples [k, 9, 2]`` as ``(x, y)`` original
    pixels, ``weights [k, 9]`` modulation, ``cells [k, 2]`` level ``(y, x)``) — where the
    same-level DCN of the last block samples for its ``top_k`` most activated cells (the finer
    and coarser DCNs reuse these offsets on their own levels).
    """
    model = _model(detector_or_model)
    with _dyhead_hooks(model) as records:
        frame = _run(model, image)
    last = records[-1]
    sizes = [tuple(m.shape[-2:]) for m in last["mask"]]
    strides = _strides(model, sizes, frame["padded_size"])
    frame_args = (frame["image_size"], frame["original_size"])
    mask_image = torch.stack([
        to_image_space(m[0].mean(0), s, *frame_args)
        for m, s in zip(last["mask"], strides, strict=True)
    ])
    return {
        **frame,
        "kind": "dyhead",
        "strides": strides,
        "levels": _level_names(strides),
        "scale": torch.stack([r["scale"][0] for r in records]),
        "offset": [o[0] for o in last["offset"]],
        "mask": [m[0] for m in last["mask"]],
        "activation": [a[0] for a in last["activation"]],
        "mask_image": mask_image,
        "points": [_top_points(last, lvl, s, frame, top_k) for lvl, s in enumerate(strides)],
    }


def attention_summary(maps: dict[str, Any]) -> dict[str, Any]:
    """JSON-ready numbers of :func:`attention_maps`: scale attention per block/level/source
    (``null`` where absent) and the last block's mean modulation per level."""
    h, w = maps["image_size"]
    mean_mask = [
        round(float(m[:, : math.ceil(h / s), : math.ceil(w / s)].mean()), 4)
        for m, s in zip(maps["mask"], maps["strides"], strict=True)
    ]

    def entry(vals: list[float]) -> dict[str, float | None]:
        pairs = zip(SOURCES, vals, strict=True)
        return {s: None if math.isnan(v) else round(v, 4) for s, v in pairs}

    scale = [
        {lvl: entry(vals) for lvl, vals in zip(maps["levels"], block.tolist(), strict=True)}
        for block in maps["scale"]
    ]
    return {"levels": maps["levels"], "scale_attention": scale, "mean_modulation": mean_mask}


# --------------------------------------------------------------------------- FGDH gates


@contextmanager
def _gate_recording(model: nn.Module) -> Iterator[list[tuple[str, Any]]]:
    """Switch on ``keep_gates`` of every gated routing layer and catch each tower's
    ``(features, RoutingCost)`` output; flags, kept gates and hooks are restored on exit."""
    towers = [(name, m) for name, m in model.named_modules() if isinstance(m, RoutingTower)]
    layers = [m for _, m in towers for m in m.layers if isinstance(m, RoutingLayer) and m.dynamic]
    if not layers:
        raise ValueError(
            f"{type(model).__name__} has no gated routing layers: gate maps need an FGDH head "
            "(FCOSRoutingHead with dynamic=True)"
        )
    saved = [(m, m.keep_gates, m.last_gates) for m in layers]
    costs: list[tuple[str, Any]] = []
    handles = []
    for name, tower in towers:
        def hook(_m: nn.Module, _a: Any, out: Any, name: str = name) -> None:
            costs.append((name, out[1]))

        handles.append(tower.register_forward_hook(hook))
    for m in layers:
        m.keep_gates = True
    try:
        yield costs
    finally:
        for handle in handles:
            handle.remove()
        for m, keep, last in saved:
            m.keep_gates, m.last_gates = keep, last


def _tower_gates(tower: RoutingTower) -> dict[str, list[Tensor | None]]:
    """Per path, per level: ``[D, H_l, W_l]`` gates of image 0 over the gated layers."""
    kept = [m.last_gates for m in tower.layers if m.dynamic and m.last_gates is not None]
    out: dict[str, list[Tensor | None]] = {}
    for path in ("depth", "down", "up"):
        per_level = zip(*(k[path] for k in kept), strict=True)
        out[path] = [
            None if any(g is None for g in gs) else torch.stack([g[0, 0].cpu() for g in gs])
            for gs in per_level
        ]
    return out


def gate_maps(detector_or_model: Any, image: ImageLike) -> dict[str, Any]:
    """FGDH routing gates of one image (the model's preprocessing, eval mode).

    Returns a dict with ``image``, ``image_size``, ``original_size``, ``strides``, ``levels``,
    ``detections`` (as :func:`attention_maps`), ``gates`` — ``{tower: {"depth"|"down"|"up":
    L × [D, H_l, W_l]}}`` (``tower`` is the module name, e.g. ``"cls_tower"``; a path's entry
    is None where it was not computed; ``down``/``up`` gates sit at their *source* level),
    ``depth_image`` — ``{tower: [L, h0, w0]}`` depth gates averaged over the D layers in
    original image coordinates — and ``executed_ratio`` = executed / full tower MACs of the
    image (with ``executed_macs``, ``full_macs``; README "FLOPs" = MACs / 2^30).
    """
    model = _model(detector_or_model)
    with _gate_recording(model) as costs:
        frame = _run(model, image)
        towers = {n: m for n, m in model.named_modules() if isinstance(m, RoutingTower)}
        gates = {_short(n, towers): _tower_gates(m) for n, m in towers.items()}
    gates = {n: g for n, g in gates.items() if g["depth"]}
    first = next(iter(gates.values()))["depth"]
    sizes = [tuple(g.shape[-2:]) for g in first]
    strides = _strides(model, sizes, frame["padded_size"])
    frame_args = (frame["image_size"], frame["original_size"])
    depth_image = {
        n: torch.stack([to_image_space(d.mean(0), s, *frame_args)
                        for d, s in zip(g["depth"], strides, strict=True)])
        for n, g in gates.items()
    }
    executed = sum(float(c.executed[0]) for _, c in costs)
    full = sum(float(c.full[0]) for _, c in costs)
    return {
        **frame,
        "kind": "fgdh",
        "strides": strides,
        "levels": _level_names(strides),
        "gates": gates,
        "depth_image": depth_image,
        "executed_macs": executed,
        "full_macs": full,
        "executed_ratio": executed / full if full else float("nan"),
    }


def _short(name: str, all_names: dict[str, nn.Module]) -> str:
    tail = name.rsplit(".", 1)[-1]
    clash = sum(n.rsplit(".", 1)[-1] == tail for n in all_names) > 1
    return name if clash or not name else tail


def gate_summary(maps: dict[str, Any]) -> dict[str, Any]:
    """JSON-ready numbers of :func:`gate_maps`: executed ratio and, per tower, level and layer,
    the share of open depth gates (> 0) and their mean inside the image."""
    h, w = maps["image_size"]
    towers = {}
    for name, g in maps["gates"].items():
        per_level = {}
        for lvl, d, s in zip(maps["levels"], g["depth"], maps["strides"], strict=True):
            d = d[:, : math.ceil(h / s), : math.ceil(w / s)]
            per_level[lvl] = {
                "open": [round(v, 4) for v in (d > 0).flatten(1).double().mean(1).tolist()],
                "mean": [round(v, 4) for v in d.flatten(1).double().mean(1).tolist()],
            }
        towers[name] = per_level
    return {
        "executed_ratio": round(maps["executed_ratio"], 4),
        "executed_gmacs": round(maps["executed_macs"] / 2**30, 3),
        "full_gmacs": round(maps["full_macs"] / 2**30, 3),
        "depth_gates": towers,
    }


# --------------------------------------------------------------------------- drawing


def _panel_size(original_size: tuple[int, int], max_side: int) -> tuple[int, int]:
    h0, w0 = original_size
    scale = max_side / max(h0, w0)
    return max(1, round(h0 * scale)), max(1, round(w0 * scale))


def _overlay(image: Tensor, heat: Tensor, lo: float = 0.0, hi: float = 1.0) -> Image.Image:
    """Heat ``[ph, pw]`` (already in the display frame) blended over a greyscale image."""
    ph, pw = heat.shape
    arr = image.clamp(0, 255).byte().permute(1, 2, 0).numpy()
    grey = Image.fromarray(arr).convert("L").resize((pw, ph), Image.BILINEAR)
    base = np.asarray(grey, np.float64)[..., None]
    mixed = (1 - ALPHA) * base + ALPHA * colormap(heat, lo, hi).astype(np.float64)
    return Image.fromarray(mixed.round().astype(np.uint8), "RGB")


def _caption(draw: ImageDraw.ImageDraw, xy: tuple[float, float], text: str) -> None:
    box = draw.textbbox(xy, text)
    draw.rectangle((box[0] - 2, box[1] - 1, box[2] + 2, box[3] + 1), fill=(0, 0, 0))
    draw.text(xy, text, fill=(255, 255, 255))


def _colorbar(canvas: Image.Image, x: int, y: int, width: int, lo: float, hi: float,
              label: str) -> None:
    strip = colormap(np.linspace(lo, hi, width), lo, hi)[None].repeat(10, 0)
    canvas.paste(Image.fromarray(strip, "RGB"), (x, y))
    draw = ImageDraw.Draw(canvas)
    draw.text((x, y + 11), f"{lo:g}", fill="black")
    right = f"{hi:g}"
    draw.text((x + width - draw.textlength(right), y + 11), right, fill="black")
    draw.text((x + width + 8, y), label, fill="black")


def _layout(maps: dict[str, Any], panel_size: int) -> tuple[int, int, int, int]:
    ph, pw = _panel_size(maps["original_size"], panel_size)
    col = max(pw, MIN_COL)
    width = max(MIN_WIDTH, GUTTER + len(maps["levels"]) * (col + PAD))
    return ph, pw, col, width


def save_attention_figure(
    maps: dict[str, Any], out_png: str | Path, *, panel_size: int = 320
) -> Image.Image:
    """Draw :func:`attention_maps` and save a PNG; returns the image.

    One panel per level (``panel_size`` on the long side, columns at least ``MIN_COL`` wide):
    the last block's modulation mask averaged over its 9 taps, over the image, with the
    sampling points of the top-activated cells (white lines from the cell centre, dots coloured
    by their modulation); then a colour bar, and a table of the scale attention of every block
    (rows) and level (columns): three bars and values for the finer / same / coarser source.
    Size: ``width = max(MIN_WIDTH, GUTTER + L·(col + PAD))``,
    ``height = PAD + TITLE_H + ph + PAD + BAR_H + (K + 2)·ROW_H + PAD``.
    """
    ph, pw, col, width = _layout(maps, panel_size)
    num_blocks = maps["scale"].shape[0]
    height = PAD + TITLE_H + ph + PAD + BAR_H + (num_blocks + 2) * ROW_H + PAD
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((PAD, PAD), "DyHead: last block's DCN modulation and sampling points "
              f"(top {maps['points'][0]['centers'].shape[0]} activated cells per level)",
              fill="black")
    draw.text((PAD, PAD + 14), f"scale attention of the {num_blocks} blocks below "
              "(hard sigmoid, one weight per image, level and source)", fill="black")
    (h0, w0), top = maps["original_size"], PAD + TITLE_H
    frame_args = (maps["image_size"], maps["original_size"], (ph, pw))
    for lvl, (name, stride) in enumerate(zip(maps["levels"], maps["strides"], strict=True)):
        heat = to_image_space(maps["mask"][lvl].mean(0), stride, *frame_args)
        panel = _overlay(maps["image"], heat)
        _draw_points(ImageDraw.Draw(panel), maps["points"][lvl], pw / w0, ph / h0)
        _caption(ImageDraw.Draw(panel), (3, 2), f"{name} (stride {stride:g})")
        x = GUTTER + lvl * (col + PAD)
        canvas.paste(panel, (x + (col - pw) // 2, top))
    top += ph + PAD
    label = "modulation: panels = mean of the 9 taps, dots = each tap"
    _colorbar(canvas, GUTTER, top, 160, 0.0, 1.0, label)
    _scale_table(draw, maps, top + BAR_H, col)
    canvas.save(out_png)
    return canvas


def _draw_points(draw: ImageDraw.ImageDraw, pts: dict[str, Tensor], sx: float, sy: float):
    scale = torch.tensor([sx, sy], dtype=torch.float64)
    centres = (pts["centers"].double() * scale).tolist()
    samples = (pts["samples"].double() * scale).tolist()
    colours = colormap(pts["weights"]).tolist()
    for (cx, cy), sample, colour in zip(centres, samples, colours, strict=True):
        for x, y in sample:
            draw.line((cx, cy, x, y), fill=(255, 255, 255), width=1)
        for (x, y), c in zip(sample, colour, strict=True):
            draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill=tuple(c), outline=(0, 0, 0))
        draw.rectangle((cx - 2, cy - 2, cx + 2, cy + 2), fill=(255, 255, 255), outline=(0, 0, 0))


def _scale_table(draw: ImageDraw.ImageDraw, maps: dict[str, Any], top: int, col: int) -> None:
    colours = PALETTE[:3]
    for lvl, name in enumerate(maps["levels"]):
        draw.text((GUTTER + lvl * (col + PAD), top), name, fill="black")
    for b, block in enumerate(maps["scale"].tolist()):
        y = top + (b + 1) * ROW_H
        draw.text((PAD, y), f"blk {b + 1}", fill="black")
        for lvl, values in enumerate(block):
            x = GUTTER + lvl * (col + PAD)
            for s, v in enumerate(values):
                if math.isnan(v):
                    continue
                bar = round(v * (ROW_H - 3))
                draw.rectangle((x + 7 * s, y + ROW_H - 2 - bar, x + 7 * s + 5, y + ROW_H - 2),
                               fill=colours[s])
            for s, v in enumerate(values):
                text = "-" if math.isnan(v) else f"{v:.2f}".lstrip("0")
                draw.text((x + 24 + 28 * s, y), text, fill="black")
    y = top + (len(maps["scale"]) + 1) * ROW_H
    for s, name in enumerate(SOURCES):
        x = GUTTER + 80 * s
        draw.rectangle((x, y + 3, x + 8, y + 11), fill=colours[s])
        draw.text((x + 12, y), f"{name} level", fill="black")


def save_gate_figure(
    maps: dict[str, Any],
    out_png: str | Path,
    *,
    layers: str | int = "mean",
    panel_size: int = 320,
) -> Image.Image:
    """Draw the depth-path gates of :func:`gate_maps` over the image and save a PNG.

    Rows: one per tower with ``layers="mean"`` (gates averaged over the D layers), one per
    tower and layer with ``"all"``, or one per tower for layer index ``layers`` (0-based);
    columns: levels. Each caption gives the share of open gates (> 0) inside the image; the
    title gives the executed ratio of the tower MACs. Size:
    ``width = max(MIN_WIDTH, GUTTER + L·(col + PAD))``,
    ``height = PAD + TITLE_H + rows·(ph + PAD) + BAR_H + PAD``.
    """
    ph, pw, col, width = _layout(maps, panel_size)
    rows = _gate_rows(maps, layers)
    height = PAD + TITLE_H + len(rows) * (ph + PAD) + BAR_H + PAD
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    ratio = maps["executed_ratio"]
    draw.text((PAD, PAD), f"FGDH depth-path gates: executed ratio {ratio:.3f} "
              f"({maps['executed_macs'] / 2**30:.3g} of {maps['full_macs'] / 2**30:.3g} "
              "GMACs of the towers)", fill="black")
    what = {"mean": "mean over layers", "all": "every layer"}.get(str(layers), f"layer {layers}")
    draw.text((PAD, PAD + 14), f"rows: tower, {what}; panels: gate value over the image",
              fill="black")
    h, w = maps["image_size"]
    frame_args = (maps["image_size"], maps["original_size"], (ph, pw))
    for r, (tower, label, pick) in enumerate(rows):
        top = PAD + TITLE_H + r * (ph + PAD)
        draw.text((PAD, top + 2), tower.removesuffix("_tower")[:6], fill="black")
        draw.text((PAD, top + 16), label, fill="black")
        for lvl, (name, stride) in enumerate(zip(maps["levels"], maps["strides"], strict=True)):
            gates = maps["gates"][tower]["depth"][lvl][pick]  # [d, H_l, W_l]
            inside = gates[:, : math.ceil(h / stride), : math.ceil(w / stride)]
            heat = to_image_space(gates.mean(0), stride, *frame_args)
            panel = _overlay(maps["image"], heat)
            share = float((inside > 0).double().mean())
            _caption(ImageDraw.Draw(panel), (3, 2), f"{name} open {100 * share:.0f}%")
            x = GUTTER + lvl * (col + PAD)
            canvas.paste(panel, (x + (col - pw) // 2, top))
    _colorbar(canvas, GUTTER, height - PAD - BAR_H + 4, 160, 0.0, 1.0, "gate value")
    canvas.save(out_png)
    return canvas


def _gate_rows(maps: dict[str, Any], layers: str | int) -> list[tuple[str, str, slice]]:
    rows = []
    for tower, g in maps["gates"].items():
        depth = g["depth"][0].shape[0]
        if layers == "mean":
            rows.append((tower, "mean", slice(None)))
        elif layers == "all":
            rows += [(tower, f"L{i + 1}", slice(i, i + 1)) for i in range(depth)]
        elif isinstance(layers, int) and -depth <= layers < depth:
            i = layers % depth
            rows.append((tower, f"L{i + 1}", slice(i, i + 1)))
        else:
            raise ValueError(f"layers must be 'mean', 'all' or a layer index < {depth}, "
                             f"got {layers!r}")
    return rows
