"""Box utilities: format conversion, IoU / GIoU, clipping and box coders.

All boxes are absolute pixel coordinates; "xyxy" means (x1, y1, x2, y2) with widths ``x2 - x1``
(no legacy ``+1``). Functions accept any leading shape ``[..., 4]`` unless a docstring says
otherwise, any floating dtype, and are differentiable.
"""

import math

import torch
from torch import Tensor

BOX_FORMATS = ("xyxy", "xywh", "cxcywh")


def box_convert(boxes: Tensor, in_fmt: str, out_fmt: str) -> Tensor:
    """Convert ``boxes[..., 4]`` between "xyxy", "xywh" (corner + size) and "cxcywh"."""
    for fmt in (in_fmt, out_fmt):
        if fmt not in BOX_FORMATS:
            raise ValueError(f"unknown box format {fmt!r}; expected one of {BOX_FORMATS}")
    if in_fmt == out_fmt:
        return boxes.clone()
    a, b, c, d = boxes.unbind(-1)
    if in_fmt == "xywh":
        x1, y1, x2, y2 = a, b, a + c, b + d
    elif in_fmt == "cxcywh":
        x1, y1, x2, y2 = a - 0.5 * c, b - 0.5 * d, a + 0.5 * c, b + 0.5 * d
    else:
        x1, y1, x2, y2 = a, b, c, d
    if out_fmt == "xywh":
        return torch.stack((x1, y1, x2 - x1, y2 - y1), dim=-1)
    if out_fmt == "cxcywh":
        return torch.stack(((x1 + x2) * 0.5, (y1 + y2) * 0.5, x2 - x1, y2 - y1), dim=-1)
    return torch.stack((x1, y1, x2, y2), dim=-1)


def box_area(boxes: Tensor) -> Tensor:
    """Area of ``boxes[..., 4]`` (xyxy) -> ``[...]``."""
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def _safe_div(num: Tensor, den: Tensor) -> Tensor:
    """``num / den`` where ``den > 0``, else 0; the gradient stays finite (no 0/0 anywhere)."""
    positive = den > 0
    return torch.where(positive, num / torch.where(positive, den, torch.ones_like(den)), 0.0)


def _inter_union(boxes1: Tensor, boxes2: Tensor) -> tuple[Tensor, Tensor]:
    """Intersection and union areas of broadcastable ``[..., 4]`` box tensors -> ``[...]``."""
    w = (torch.minimum(boxes1[..., 2], boxes2[..., 2])
         - torch.maximum(boxes1[..., 0], boxes2[..., 0])).clamp(min=0)
    h = (torch.minimum(boxes1[..., 3], boxes2[..., 3])
         - torch.maximum(boxes1[..., 1], boxes2[..., 1])).clamp(min=0)
    inter = w * h
    union = box_area(boxes1) + box_area(boxes2) - inter
    return inter, union


def _enclosing_area(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Area of the smallest box enclosing both (broadcastable ``[..., 4]``) -> ``[...]``."""
    w = (torch.maximum(boxes1[..., 2], boxes2[..., 2])
         - torch.minimum(boxes1[..., 0], boxes2[..., 0])).clamp(min=0)
    h = (torch.maximum(boxes1[..., 3], boxes2[..., 3])
         - torch.minimum(boxes1[..., 1], boxes2[..., 1])).clamp(min=0)
    return w * h


def box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Pairwise IoU of ``boxes1[N, 4]`` and ``boxes2[M, 4]`` (xyxy) -> ``[N, M]``.

    A pair whose union is 0 (two degenerate boxes) has IoU 0.
    """
    inter, union = _inter_union(boxes1[:, None, :], boxes2[None, :, :])
    return _safe_div(inter, union)


def generalized_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Pairwise generalized IoU of ``boxes1[N, 4]`` and ``boxes2[M, 4]`` -> ``[N, M]``.

    ``GIoU = IoU - (C - U) / C`` with C the enclosing-box area; terms with a zero
    denominator are taken as 0.
    """
    a, b = boxes1[:, None, :], boxes2[None, :, :]
    inter, union = _inter_union(a, b)
    enclose = _enclosing_area(a, b)
    return _safe_div(inter, union) - _safe_div(enclose - union, enclose)


def aligned_box_iou(boxes1: Tensor, boxes2: Tensor, eps: float = 1e-6) -> Tensor:
    """Element-wise IoU of paired ``boxes1[..., 4]`` and ``boxes2[..., 4]`` -> ``[...]``.

    The union is clamped to at least ``eps`` (MMDetection ``bbox_overlaps(is_aligned=True)``).
    """
    inter, union = _inter_union(boxes1, boxes2)
    return inter / union.clamp(min=eps)


def aligned_giou(boxes1: Tensor, boxes2: Tensor, eps: float = 1e-7) -> Tensor:
    """Element-wise generalized IoU of paired ``[..., 4]`` boxes -> ``[...]``.

    ``eps`` is added to the union and the enclosing area, as in torchvision's
    ``generalized_box_iou_loss``.
    """
    inter, union = _inter_union(boxes1, boxes2)
    iou = inter / (union + eps)
    enclose = _enclosing_area(boxes1, boxes2)
    return iou - (enclose - union) / (enclose + eps)


def clip_boxes(boxes: Tensor, image_size: tuple[int, int]) -> Tensor:
    """Clamp ``boxes[..., 4]`` (xyxy) to an image of ``image_size = (height, width)``."""
    height, width = image_size
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack(
        (x1.clamp(0, width), y1.clamp(0, height), x2.clamp(0, width), y2.clamp(0, height)), dim=-1
    )


def remove_small_boxes(boxes: Tensor, min_size: float) -> Tensor:
    """Indices (int64 ``[K]``) of ``boxes[N, 4]`` whose width and height are both >= min_size."""
    w = boxes[:, 2] - boxes[:, 0]
    h = boxes[:, 3] - boxes[:, 1]
    return torch.where((w >= min_size) & (h >= min_size))[0]


class BoxCoder:
    """Delta-xywh box coder (R-CNN parameterisation), MMDetection and torchvision flavours.

    ``encode(proposals[..., 4], gt[..., 4]) -> deltas[..., 4]`` and
    ``decode(deltas[..., 4], boxes[..., 4]) -> boxes[..., 4]``; leading shapes broadcast.

    Deltas are normalised as ``(d - means) / stds`` (MMDetection ``DeltaXYWHBBoxCoder``) or,
    for a coder built with :meth:`from_weights`, as ``d * weights`` (torchvision ``BoxCoder``);
    the arithmetic follows torchvision's op order so float32 results match it bit for bit.
    ``clamp_mode="symmetric"`` clamps decoded log-scales dw, dh to ``[-clamp, clamp]``
    (MMDetection); ``"upper"`` only from above (torchvision).
    """

    def __init__(
        self,
        means: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0),
        stds: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0),
        clamp: float = math.log(1000.0 / 16),
        clamp_mode: str = "symmetric",
    ) -> None:
        if clamp_mode not in ("symmetric", "upper"):
            raise ValueError(f"clamp_mode must be 'symmetric' or 'upper', got {clamp_mode!r}")
        self.means = tuple(float(m) for m in means)
        self.stds = tuple(float(s) for s in stds)
        self.clamp = float(clamp)
        self.clamp_mode = clamp_mode
        self.weights: tuple[float, ...] | None = None

    @classmethod
    def from_weights(
        cls,
        weights: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0),
        clamp: float = math.log(1000.0 / 16),
        clamp_mode: str = "upper",
    ) -> "BoxCoder":
        """torchvision-style coder: deltas are scaled by ``weights`` (``stds = 1 / weights``)."""
        coder = cls(stds=tuple(1.0 / w for w in weights), clamp=clamp, clamp_mode=clamp_mode)
        # Keep the weights themselves: torchvision divides by them, and d / w can differ from
        # d * (1 / w) in the last bit.
        coder.weights = tuple(float(w) for w in weights)
        return coder

    def encode(self, proposals: Tensor, gt: Tensor) -> Tensor:
        """Deltas ``[..., 4]`` that map ``proposals[..., 4]`` onto ``gt[..., 4]`` (both xyxy)."""
        gt = gt.to(proposals.dtype)
        pw = proposals[..., 2] - proposals[..., 0]
        ph = proposals[..., 3] - proposals[..., 1]
        px = proposals[..., 0] + 0.5 * pw
        py = proposals[..., 1] + 0.5 * ph
        gw = gt[..., 2] - gt[..., 0]
        gh = gt[..., 3] - gt[..., 1]
        gx = gt[..., 0] + 0.5 * gw
        gy = gt[..., 1] + 0.5 * gh
        if self.weights is not None:
            wx, wy, ww, wh = self.weights
            deltas = (
                wx * (gx - px) / pw,
                wy * (gy - py) / ph,
                ww * torch.log(gw / pw),
                wh * torch.log(gh / ph),
            )
        else:
            raw = ((gx - px) / pw, (gy - py) / ph, torch.log(gw / pw), torch.log(gh / ph))
            deltas = tuple(
                (d - m) / s for d, m, s in zip(raw, self.means, self.stds, strict=True)
            )
        return torch.stack(deltas, dim=-1)

    def decode(
        self, deltas: Tensor, boxes: Tensor, max_shape: tuple[int, int] | None = None
    ) -> Tensor:
        """Apply ``deltas[..., 4]`` to ``boxes[..., 4]`` (xyxy) -> decoded boxes ``[..., 4]``.

        ``max_shape = (height, width)`` clips the result to the image.
        """
        boxes = boxes.to(deltas.dtype)
        if self.weights is not None:
            dx, dy, dw, dh = (d / w for d, w in zip(deltas.unbind(-1), self.weights, strict=True))
        else:
            dx, dy, dw, dh = (
                d * s + m for d, s, m in zip(deltas.unbind(-1), self.stds, self.means, strict=True)
            )
        if self.clamp_mode == "symmetric":
            dw = dw.clamp(min=-self.clamp, max=self.clamp)
            dh = dh.clamp(min=-self.clamp, max=self.clamp)
        else:
            dw = dw.clamp(max=self.clamp)
            dh = dh.clamp(max=self.clamp)
        widths = boxes[..., 2] - boxes[..., 0]
        heights = boxes[..., 3] - boxes[..., 1]
        ctr_x = dx * widths + (boxes[..., 0] + 0.5 * widths)
        ctr_y = dy * heights + (boxes[..., 1] + 0.5 * heights)
        # torchvision multiplies by a 0.5 tensor (not a Python scalar); keep that for parity.
        half = torch.tensor(0.5, dtype=deltas.dtype, device=deltas.device)
        half_w = half * (torch.exp(dw) * widths)
        half_h = half * (torch.exp(dh) * heights)
        out = torch.stack(
            (ctr_x - half_w, ctr_y - half_h, ctr_x + half_w, ctr_y + half_h), dim=-1
        )
        return out if max_shape is None else clip_boxes(out, max_shape)


def bbox2distance(points: Tensor, boxes: Tensor) -> Tensor:
    """Distances ``[..., 4]`` (left, top, right, bottom) from ``points[..., 2]`` to box sides."""
    px, py = points[..., 0], points[..., 1]
    return torch.stack(
        (px - boxes[..., 0], py - boxes[..., 1], boxes[..., 2] - px, boxes[..., 3] - py), dim=-1
    )


def distance2bbox(
    points: Tensor, distance: Tensor, max_shape: tuple[int, int] | None = None
) -> Tensor:
    """Boxes ``[..., 4]`` (xyxy) from ``points[..., 2]`` and ltrb ``distance[..., 4]``.

    ``max_shape = (height, width)`` clips the result to the image.
    """
    px, py = points[..., 0], points[..., 1]
    out = torch.stack(
        (
            px - distance[..., 0],
            py - distance[..., 1],
            px + distance[..., 2],
            py + distance[..., 3],
        ),
        dim=-1,
    )
    return out if max_shape is None else clip_boxes(out, max_shape)


class DistanceCoder:
    """Point-to-side (ltrb) coder of FCOS-style heads, optionally normalised by the stride.

    ``encode(points[..., 2], boxes[..., 4], scale) -> ltrb[..., 4]`` and
    ``decode(points[..., 2], ltrb[..., 4], scale) -> boxes[..., 4]``; ``scale`` is a float or a
    per-point tensor ``[...]`` (the stride). With points at anchor centres and scale equal to
    the anchor width this matches torchvision ``BoxLinearCoder(normalize_by_size=True)``.
    """

    @staticmethod
    def _per_side(scale: Tensor | float) -> Tensor | float:
        return scale.unsqueeze(-1) if isinstance(scale, Tensor) else scale

    def encode(self, points: Tensor, boxes: Tensor, scale: Tensor | float = 1.0) -> Tensor:
        """Normalised distances ``[..., 4]`` from ``points[..., 2]`` to ``boxes[..., 4]``."""
        return bbox2distance(points, boxes) / self._per_side(scale)

    def decode(
        self,
        points: Tensor,
        ltrb: Tensor,
        scale: Tensor | float = 1.0,
        max_shape: tuple[int, int] | None = None,
    ) -> Tensor:
        """Boxes ``[..., 4]`` (xyxy) from ``points[..., 2]`` and normalised ``ltrb[..., 4]``."""
        return distance2bbox(points, ltrb * self._per_side(scale), max_shape)
