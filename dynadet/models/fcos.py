"""FCOS (Tian et al., ICCV 2019) head: per-point classification, ltrb regression, centerness."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from dynadet.models.assigners import fcos_assign
from dynadet.models.dense_head import (
    TowerHead,
    centerness_losses,
    concat_levels,
    dense_targets,
    flatten_level,
)
from dynadet.models.priors import AnchorGenerator, anchor_centers
from dynadet.ops.boxes import bbox2distance, distance2bbox
from dynadet.ops.losses import giou_loss, iou_loss

INF = float("inf")
DEFAULT_RANGES = ((-1, 64), (64, 128), (128, 256), (256, 512), (512, INF))


def centerness_target(ltrb: Tensor) -> Tensor:
    """``sqrt(min(l,r)/max(l,r) · min(t,b)/max(t,b))`` for ``Tensor[..., 4]``."""
    lr = ltrb[..., [0, 2]]
    tb = ltrb[..., [1, 3]]
    ratio = (lr.min(-1).values / lr.max(-1).values) * (tb.min(-1).values / tb.max(-1).values)
    return ratio.clamp(min=0).sqrt()


class FCOSHead(TowerHead):
    """FCOS head, configurable to reproduce MMDetection, torchvision and Detectron2/cvpods.

    The priors are one ``s×s`` box per location (``AnchorGenerator(ratios=[1])`` with sizes equal
    to the strides); the point is its centre and its width ``s`` normalises the distances.

    Args (beyond :class:`TowerHead`):
        regress_ranges: per level ``(lo, hi)`` on the largest side distance.
        range_inclusive: MMDetection ``lo <= m <= hi`` (True) or torchvision ``lo < m < hi``.
        center_sampling_radius: centre sampling radius in strides (``None`` = off).
        norm_on_bbox: regression is ``relu(x)`` in units of the stride (True) or ``exp(x)`` in
            pixels (False, the original FCOS).
        box_loss: ``"giou"`` or ``"iou"`` (−log IoU).
        box_loss_weight: weight of the box loss.
        centerness_weighted: weight the box loss by the centerness target and divide by its sum
            (MMDetection) instead of dividing by the number of positives (torchvision).
        scoring: ``"mmdet"`` — rank and threshold on the class probability, multiply by
            centerness afterwards; ``"sqrt"`` — rank and threshold on ``sqrt(cls·ctr)``
            (torchvision, Detectron2, cvpods); ``"product"`` — rank and threshold on ``cls·ctr``.

    Shapes:
        ``loss(outputs, priors, targets)`` with ``targets[i]["boxes"]: Tensor[G_i, 4]`` and
        ``targets[i]["labels"]: Tensor[G_i]`` → dict of scalar losses;
        ``predict(outputs, priors, image_sizes)`` → list of dicts of ``boxes [K, 4]``,
        ``scores [K]``, ``labels [K]``.
    """

    def __init__(
        self,
        num_classes: int,
        anchor_generator: AnchorGenerator,
        in_channels: int = 256,
        feat_channels: int = 256,
        num_convs: int = 4,
        norm: str = "gn",
        conv_bias: bool | None = True,
        centerness_on_reg: bool = True,
        use_scales: bool = True,
        regress_ranges: Sequence[Sequence[float]] = DEFAULT_RANGES,
        range_inclusive: bool = True,
        center_sampling_radius: float | None = 1.5,
        norm_on_bbox: bool = True,
        box_loss: str = "giou",
        box_loss_weight: float = 1.0,
        centerness_weighted: bool = True,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        scoring: str = "mmdet",
        score_thresh: float = 0.05,
        nms_pre: int = 1000,
        nms_thresh: float = 0.6,
        max_per_img: int = 100,
        min_box_size: float | None = None,
        prior_prob: float = 0.01,
    ) -> None:
        super().__init__(
            num_classes,
            anchor_generator,
            in_channels=in_channels,
            feat_channels=feat_channels,
            num_convs=num_convs,
            norm=norm,
            conv_bias=conv_bias,
            centerness=True,
            centerness_on_reg=centerness_on_reg,
            use_scales=use_scales,
            prior_prob=prior_prob,
            score_thresh=score_thresh,
            nms_pre=nms_pre,
            nms_thresh=nms_thresh,
            max_per_img=max_per_img,
            min_box_size=min_box_size,
        )
        if anchor_generator.num_anchors != 1:
            raise ValueError("FCOSHead needs one prior per location (ratios=[1], one size)")
        if len(regress_ranges) != len(anchor_generator.strides):
            raise ValueError(
                f"{len(regress_ranges)} regress ranges for {len(anchor_generator.strides)} levels"
            )
        if scoring not in ("mmdet", "sqrt", "product"):
            raise ValueError(f"scoring must be 'mmdet', 'sqrt' or 'product', got {scoring!r}")
        if box_loss not in ("giou", "iou"):
            raise ValueError(f"box_loss must be 'giou' or 'iou', got {box_loss!r}")
        self.regress_ranges = [(float(lo), float(hi)) for lo, hi in regress_ranges]
        self.range_inclusive = range_inclusive
        self.center_sampling_radius = center_sampling_radius
        self.norm_on_bbox = norm_on_bbox
        self.box_loss = box_loss
        self.box_loss_weight = box_loss_weight
        self.centerness_weighted = centerness_weighted
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        self.scoring = scoring

    def distances(self, reg: Tensor) -> Tensor:
        """Raw regression → non-negative distances (stride units or pixels)."""
        return F.relu(reg) if self.norm_on_bbox else reg.exp()

    def decode(self, reg: Tensor, priors: Tensor) -> Tensor:
        """``reg [N, M, 4]`` (already activated), ``priors [M, 4]`` → boxes ``[N, M, 4]``."""
        dist_px = reg * (priors[:, 2:3] - priors[:, 0:1]) if self.norm_on_bbox else reg
        return distance2bbox(anchor_centers(priors).expand_as(dist_px[..., :2]), dist_px)

    def loss(
        self,
        outputs: dict[str, list[Tensor]],
        priors: list[Tensor],
        targets: Sequence[dict[str, Tensor]],
    ) -> dict[str, Tensor]:
        cls = concat_levels(outputs["cls"], self.num_classes)
        reg = self.distances(concat_levels(outputs["reg"], 4))
        ctr = concat_levels(outputs["ctr"], 1)[..., 0]
        all_priors = torch.cat(priors)
        points = anchor_centers(all_priors)
        sizes = all_priors[:, 2] - all_priors[:, 0]
        ranges = torch.cat(
            [
                all_priors.new_tensor(r).expand(p.shape[0], 2)
                for r, p in zip(self.regress_ranges, priors, strict=True)
            ]
        )
        cls_target, fg_mask, gt_boxes = dense_targets(
            cls,
            targets,
            lambda boxes: fcos_assign(
                points, sizes, ranges, boxes, self.center_sampling_radius, self.range_inclusive
            ),
        )
        gt_fg = gt_boxes[fg_mask]
        pts_fg = points.expand(fg_mask.shape[0], -1, -1)[fg_mask]
        pred_boxes = self.decode(reg, all_priors)[fg_mask]
        ctr_target = centerness_target(bbox2distance(pts_fg, gt_fg))
        if self.box_loss == "giou":
            per_box = giou_loss(pred_boxes, gt_fg, reduction="none")
        else:
            per_box = iou_loss(pred_boxes, gt_fg, mode="log", reduction="none")
        losses = centerness_losses(
            cls, cls_target, fg_mask, per_box, ctr[fg_mask], ctr_target, self.focal_alpha,
            self.focal_gamma, self.centerness_weighted, min_centerness_sum=1e-6,
        )  # fmt: skip
        losses["loss_box"] = losses["loss_box"] * self.box_loss_weight
        return losses

    def predict(
        self,
        outputs: dict[str, list[Tensor]],
        priors: list[Tensor],
        image_sizes: Sequence[tuple[int, int]],
    ) -> list[dict[str, Tensor]]:
        scores, boxes, factors = [], [], []
        for cls, reg, ctr, p in zip(
            outputs["cls"], outputs["reg"], outputs["ctr"], priors, strict=True
        ):
            prob = flatten_level(cls, self.num_classes).sigmoid()
            ctr_prob = flatten_level(ctr, 1).sigmoid()
            if self.scoring == "sqrt":
                prob = (prob * ctr_prob).sqrt()
            elif self.scoring == "product":
                prob = prob * ctr_prob
            else:
                factors.append(ctr_prob[..., 0])
            scores.append(prob)
            boxes.append(self.decode(self.distances(flatten_level(reg, 4)), p))
        return self.select(scores, boxes, image_sizes, factors if factors else None)
