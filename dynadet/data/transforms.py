"""Box-aware training augmentations on ``(image, target)`` pairs (no torchvision).

Every transform maps ``(image Tensor[3, H, W] float 0–255 RGB, target dict)`` to the same pair;
``target["boxes"]`` is ``Tensor[N, 4]`` xyxy in absolute pixels, other keys pass through.
Randomness comes from the ``generator`` given to a transform, or from torch's global RNG when
it is ``None`` — so ``torch.manual_seed`` makes a pipeline deterministic. The training loader
(:func:`dynadet.data.loader.build_train_loader`) seeds the global RNG per sample, which makes
augmentations reproducible across worker counts and on resume.

Resizing to the network size, normalisation and padding happen inside the model
(:mod:`dynadet.models.preprocess`); :class:`RandomResize` only rescales the raw image.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

Target = dict[str, Any]
Transform = Callable[[Tensor, Target], tuple[Tensor, Target]]


def _uniform(low: float, high: float, generator: torch.Generator | None) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator, dtype=torch.float64))


class Compose:
    """Applies transforms in order: ``(image, target) → (image, target)``."""

    def __init__(self, transforms: Sequence[Transform]) -> None:
        self.transforms = list(transforms)

    def __call__(self, image: Tensor, target: Target) -> tuple[Tensor, Target]:
        for t in self.transforms:
            image, target = t(image, target)
        return image, target

    def __repr__(self) -> str:
        inner = ", ".join(repr(t) for t in self.transforms)
        return f"Compose([{inner}])"


class RandomHorizontalFlip:
    """Mirrors the image left-right with probability ``prob``; boxes ``x1' = W − x2``,
    ``x2' = W − x1`` (continuous pixel coordinates, so flipping twice is the identity)."""

    def __init__(self, prob: float = 0.5, generator: torch.Generator | None = None) -> None:
        if not 0.0 <= prob <= 1.0:
            raise ValueError(f"flip prob must be in [0, 1], got {prob}")
        self.prob = prob
        self.generator = generator

    def __call__(self, image: Tensor, target: Target) -> tuple[Tensor, Target]:
        if _uniform(0.0, 1.0, self.generator) >= self.prob:
            return image, target
        width = image.shape[-1]
        target = dict(target)
        boxes = target["boxes"]
        target["boxes"] = torch.stack(
            [width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], dim=1
        )
        return image.flip(-1), target

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(prob={self.prob})"


# RGB → YIQ; a hue shift is a rotation of the (I, Q) chroma plane
_RGB_TO_YIQ = torch.tensor(
    [[0.299, 0.587, 0.114], [0.595716, -0.274453, -0.321263], [0.211456, -0.522591, 0.311135]],
    dtype=torch.float64,
)
_GRAY = (0.299, 0.587, 0.114)


class PhotometricJitter:
    """With probability ``prob``, jitters brightness, contrast, saturation and (optionally) hue.

    Factors are drawn uniformly: brightness ``b ∈ [1−brightness, 1+brightness]`` scales the
    pixels; contrast ``c`` blends with the mean grey level, ``(x − m)·c + m``; saturation ``s``
    blends with the per-pixel grey image; hue ``h ∈ [−hue, hue]`` (fraction of a full turn, at
    most 0.5) rotates the YIQ chroma plane. Applied in that order, then clamped to 0–255.
    Geometry is untouched. Input ``Tensor[3, H, W]``, output float32.
    """

    def __init__(
        self,
        brightness: float = 0.2,
        contrast: float = 0.2,
        saturation: float = 0.2,
        hue: float = 0.0,
        prob: float = 0.5,
        generator: torch.Generator | None = None,
    ) -> None:
        for name, v in (("brightness", brightness), ("contrast", contrast),
                        ("saturation", saturation)):
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {v}")
        if not 0.0 <= hue <= 0.5:
            raise ValueError(f"hue must be in [0, 0.5], got {hue}")
        self.brightness, self.contrast, self.saturation, self.hue = (
            brightness, contrast, saturation, hue)
        self.prob = prob
        self.generator = generator

    def __call__(self, image: Tensor, target: Target) -> tuple[Tensor, Target]:
        g = self.generator
        if _uniform(0.0, 1.0, g) >= self.prob:
            return image, target
        b = _uniform(1 - self.brightness, 1 + self.brightness, g)
        c = _uniform(1 - self.contrast, 1 + self.contrast, g)
        s = _uniform(1 - self.saturation, 1 + self.saturation, g)
        h = _uniform(-self.hue, self.hue, g)
        x = image.float() * b
        gray_w = torch.tensor(_GRAY, dtype=x.dtype).view(3, 1, 1)
        mean = (x * gray_w).sum(0).mean()
        x = (x - mean) * c + mean
        gray = (x * gray_w).sum(0, keepdim=True)
        x = gray + (x - gray) * s
        if h != 0.0:
            x = torch.einsum("ij,jhw->ihw", _hue_matrix(h).to(x.dtype), x)
        return x.clamp_(0.0, 255.0), target

    def __repr__(self) -> str:
        return (f"PhotometricJitter(brightness={self.brightness}, contrast={self.contrast}, "
                f"saturation={self.saturation}, hue={self.hue}, prob={self.prob})")


def _hue_matrix(turns: float) -> Tensor:
    """``[3, 3]`` RGB→RGB matrix rotating chroma by ``turns`` of a full circle."""
    a = 2 * math.pi * turns
    rot = torch.tensor(
        [[1.0, 0.0, 0.0], [0.0, math.cos(a), -math.sin(a)], [0.0, math.sin(a), math.cos(a)]],
        dtype=torch.float64,
    )
    return torch.linalg.inv(_RGB_TO_YIQ) @ rot @ _RGB_TO_YIQ


class RandomResize:
    """Rescales the raw image so its short side is ``s``, a random choice from ``min_sizes`` or
    an integer uniform in ``size_range`` (inclusive); the long side is capped at ``max_size``.
    Bilinear interpolation (``align_corners=False``); boxes scale with the image. The model
    resizes again to its own input size, so this only matters for multi-scale schedules.
    """

    def __init__(
        self,
        min_sizes: Sequence[int] | None = None,
        size_range: tuple[int, int] | None = None,
        max_size: int | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        if (min_sizes is None) == (size_range is None):
            raise ValueError("RandomResize needs exactly one of min_sizes or size_range")
        if min_sizes is not None and (len(min_sizes) == 0 or min(min_sizes) <= 0):
            raise ValueError(f"min_sizes must be positive integers, got {min_sizes}")
        if size_range is not None and not 0 < size_range[0] <= size_range[1]:
            raise ValueError(f"size_range must be (low, high) with 0 < low <= high, "
                             f"got {size_range}")
        self.min_sizes = None if min_sizes is None else [int(s) for s in min_sizes]
        self.size_range = None if size_range is None else (int(size_range[0]),
                                                           int(size_range[1]))
        self.max_size = max_size
        self.generator = generator

    def _draw(self) -> int:
        g = self.generator
        if self.min_sizes is not None:
            return self.min_sizes[int(torch.randint(len(self.min_sizes), (), generator=g))]
        lo, hi = self.size_range  # type: ignore[misc]
        return int(torch.randint(lo, hi + 1, (), generator=g))

    def __call__(self, image: Tensor, target: Target) -> tuple[Tensor, Target]:
        h, w = image.shape[-2:]
        scale = self._draw() / min(h, w)
        if self.max_size is not None and max(h, w) * scale > self.max_size:
            scale = self.max_size / max(h, w)
        nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
        if (nh, nw) == (h, w):
            return image, target
        out = F.interpolate(image[None].float(), size=(nh, nw), mode="bilinear",
                            align_corners=False)[0]
        target = dict(target)
        factor = torch.tensor([nw / w, nh / h, nw / w, nh / h], dtype=target["boxes"].dtype)
        limit = torch.tensor([nw, nh, nw, nh], dtype=target["boxes"].dtype)
        target["boxes"] = torch.minimum(target["boxes"] * factor, limit)
        return out, target

    def __repr__(self) -> str:
        choice = (f"min_sizes={self.min_sizes}" if self.min_sizes
                  else f"size_range={self.size_range}")
        return f"RandomResize({choice}, max_size={self.max_size})"


_DEFAULTS: dict[str, Any] = {"flip_prob": 0.5, "photometric": False, "resize": None}


def build_transforms(cfg: dict[str, Any] | None, train: bool) -> Compose:
    """Augmentation pipeline from a config dict (training only; evaluation is the identity).

    Keys: ``flip_prob`` (float, default 0.5), ``photometric`` (``False``, ``True`` for the
    defaults, or a dict of :class:`PhotometricJitter` arguments), ``resize`` (``None`` or a dict
    of :class:`RandomResize` arguments). Unknown keys raise ``ValueError`` with a suggestion.
    """
    cfg = dict(cfg or {})
    for key in cfg:
        if key not in _DEFAULTS:
            close = difflib.get_close_matches(key, list(_DEFAULTS), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else f"; known: {list(_DEFAULTS)}"
            raise ValueError(f"unknown transform option '{key}'{hint}")
    if not train:
        return Compose([])
    cfg = {**_DEFAULTS, **cfg}
    steps: list[Transform] = []
    if cfg["resize"]:
        steps.append(RandomResize(**cfg["resize"]))
    if cfg["flip_prob"]:
        steps.append(RandomHorizontalFlip(float(cfg["flip_prob"])))
    if cfg["photometric"]:
        kwargs = cfg["photometric"] if isinstance(cfg["photometric"], dict) else {}
        steps.append(PhotometricJitter(**kwargs))
    return Compose(steps)
