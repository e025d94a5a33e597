"""Anchor (prior) generation for dense heads.

Every dense head in dynadet works on square or rectangular *prior boxes*: RetinaNet's nine anchors
per location, ATSS's single 8·s anchor, and FCOS's points, which are represented as s×s boxes
centred on the point (the box width is the normalising size of the distance coder, as in
torchvision and Detectron2).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn


class AnchorGenerator(nn.Module):
    """Generates prior boxes for each feature level.

    Args:
        strides: nominal stride of each level, e.g. ``[8, 16, 32, 64, 128]``.
        ratios: aspect ratios ``h / w`` (``[1.0]`` for FCOS/ATSS, ``[0.5, 1, 2]`` for RetinaNet).
        sizes: explicit anchor sizes per level (``[[32, 40, 50], ...]``), or ``None`` to derive
            them as ``octave_base_scale * stride * 2 ** (i / scales_per_octave)``.
        octave_base_scale: base scale in units of the stride (RetinaNet 4, ATSS 8, FCOS 1).
        scales_per_octave: number of scales per octave (RetinaNet 3).
        offset: centre offset in strides; 0 puts the centre of cell x at ``x·s`` (torchvision,
            Detectron2, MMDetection anchors), 0.5 at ``(x + 0.5)·s`` (MMDetection FCOS points).
        round_base: round the base anchors to integers (torchvision does).
        infer_strides: take each level's stride from ``padded_size // feature_size`` per axis, as
            torchvision does (its P6/P7 strides are then not 64/128 for most input sizes; the
            released torchvision weights were trained with that rule).

    Shapes:
        ``forward(feature_sizes: list[(H_l, W_l)], image_size: (H, W))`` → list over levels of
        ``Tensor[H_l·W_l·A, 4]`` (xyxy), location-major with anchors varying fastest, matching the
        head output layout ``[N, A·C, H, W] → [N, H·W·A, C]``.
    """

    def __init__(
        self,
        strides: Sequence[int],
        ratios: Sequence[float] = (1.0,),
        sizes: Sequence[Sequence[float]] | None = None,
        octave_base_scale: float = 1.0,
        scales_per_octave: int = 1,
        offset: float = 0.0,
        round_base: bool = False,
        infer_strides: bool = False,
    ) -> None:
        super().__init__()
        self.strides = [int(s) for s in strides]
        if sizes is None:
            sizes = [
                [
                    octave_base_scale * s * 2 ** (i / scales_per_octave)
                    for i in range(scales_per_octave)
                ]
                for s in self.strides
            ]
        if len(sizes) != len(self.strides):
            raise ValueError(f"got {len(sizes)} size lists for {len(self.strides)} strides")
        self.sizes = [[float(x) for x in level] for level in sizes]
        self.ratios = [float(r) for r in ratios]
        self.offset = float(offset)
        self.round_base = round_base
        self.infer_strides = infer_strides
        self._cache: dict[tuple, list[Tensor]] = {}

    @property
    def num_anchors(self) -> int:
        """Anchors per location (the same on every level)."""
        return len(self.ratios) * len(self.sizes[0])

    def base_anchors(self, level: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        """Anchors centred at the origin, ``Tensor[A, 4]``, ratio-major then scale."""
        scales = torch.as_tensor(self.sizes[level], dtype=dtype, device=device)
        ratios = torch.as_tensor(self.ratios, dtype=dtype, device=device)
        h_ratios = torch.sqrt(ratios)
        w_ratios = 1 / h_ratios
        ws = (w_ratios[:, None] * scales[None, :]).view(-1)
        hs = (h_ratios[:, None] * scales[None, :]).view(-1)
        base = torch.stack([-ws, -hs, ws, hs], dim=1) / 2
        return base.round() if self.round_base else base

    def level_strides(
        self, feature_sizes: Sequence[tuple[int, int]], image_size: tuple[int, int]
    ) -> list[tuple[int, int]]:
        """Per-level ``(stride_y, stride_x)``."""
        if self.infer_strides:
            return [(image_size[0] // h, image_size[1] // w) for h, w in feature_sizes]
        return [(s, s) for s in self.strides]

    def forward(
        self,
        feature_sizes: Sequence[tuple[int, int]],
        image_size: tuple[int, int],
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> list[Tensor]:
        feature_sizes = [(int(h), int(w)) for h, w in feature_sizes]
        key = (tuple(feature_sizes), tuple(image_size), dtype, str(device))
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        anchors = []
        for level, ((h, w), (sy, sx)) in enumerate(
            zip(feature_sizes, self.level_strides(feature_sizes, image_size), strict=True)
        ):
            base = self.base_anchors(level, dtype, device)
            # integer shifts first, then the cast, as torchvision does: exact for large maps
            xs = (torch.arange(w, dtype=torch.int32, device=device) * sx).to(dtype)
            ys = (torch.arange(h, dtype=torch.int32, device=device) * sy).to(dtype)
            if self.offset:
                xs = xs + self.offset * sx
                ys = ys + self.offset * sy
            yy, xx = torch.meshgrid(ys, xs, indexing="ij")
            xx, yy = xx.reshape(-1), yy.reshape(-1)
            shifts = torch.stack([xx, yy, xx, yy], dim=1)
            anchors.append((shifts[:, None, :] + base[None, :, :]).reshape(-1, 4))
        if len(self._cache) > 16:
            self._cache.clear()
        self._cache[key] = anchors
        return anchors


def anchor_centers(anchors: Tensor) -> Tensor:
    """Centres of xyxy boxes, ``Tensor[..., 2]``."""
    return (anchors[..., :2] + anchors[..., 2:]) / 2


def octave_sizes(base: float, stride: int, scales_per_octave: int) -> list[float]:
    """``base · stride · 2^(i/n)`` for i < n (MMDetection's float anchor sizes)."""
    return [base * stride * 2 ** (i / scales_per_octave) for i in range(scales_per_octave)]


def torchvision_retinanet_sizes(first: int = 32, num_levels: int = 5) -> list[list[float]]:
    """torchvision's truncated sizes ``(x, int(x·2^(1/3)), int(x·2^(2/3)))`` per level."""
    out = []
    for i in range(num_levels):
        x = first * 2**i
        out.append([float(x), float(int(x * 2 ** (1 / 3))), float(int(x * 2 ** (2 / 3)))])
    return out
