"""ATSS (Zhang et al., CVPR 2020) head as MMDetection implements it."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from dynadet.models.assigners import atss_assign
from dynadet.models.dense_head import (
    TowerHead,
    centerness_losses,
    concat_levels,
    dense_targets,
    flatten_level,
)
from dynadet.models.fcos import centerness_target
from dynadet.models.priors import AnchorGenerator, anchor_centers
from dynadet.ops.boxes import BoxCoder, bbox2distance
from dynadet.ops.losses import giou_loss


class ATSSHead(TowerHead):
    """ATSS head: one anchor per location, adaptive positive selection, GIoU on decoded boxes.

    The priors are one square anchor of side ``octave_base_scale·s`` (8·s) per location.
    Regression outputs are ``DeltaXYWH`` deltas (stds 0.1/0.1/0.2/0.2) multiplied by a learnable
    per-level :class:`Scale`; the GIoU loss (weight 2) compares decoded boxes with the ground
    truth, weighted by the centerness target of the anchor centre and divided by its sum.

    Args (beyond :class:`TowerHead`):
        topk: candidates per level and box (9).
        box_stds: delta normalisation.
        box_loss_weight: GIoU weight (2.0).
        pred_kernel_size: 3 (MMDetection ATSS) or 1 (DyHead's ATSS, towers removed).
        scoring: ``"mmdet"`` — keep class probabilities above ``score_thresh``, rank the top
            ``nms_pre`` per level by them, then multiply by centerness (MMDetection);
            ``"official"`` — keep class probabilities above ``score_thresh``, rank by
            class × centerness (the official ATSS / DyHead code that produced the released
            weights).

    Shapes: as :class:`dynadet.models.fcos.FCOSHead`.
    """

    def __init__(
        self,
        num_classes: int,
        anchor_generator: AnchorGenerator,
        in_channels: int = 256,
        feat_channels: int = 256,
        num_convs: int = 4,
        norm: str = "gn",
        conv_bias: bool | None = None,
        pred_kernel_size: int = 3,
        use_scales: bool = True,
        topk: int = 9,
        box_stds: Sequence[float] = (0.1, 0.1, 0.2, 0.2),
        box_loss_weight: float = 2.0,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        score_thresh: float = 0.05,
        nms_pre: int = 1000,
        nms_thresh: float = 0.6,
        max_per_img: int = 100,
        min_box_size: float | None = None,
        prior_prob: float = 0.01,
        scoring: str = "mmdet",
    ) -> None:
        if scoring not in ("mmdet", "official"):
            raise ValueError(f"scoring must be 'mmdet' or 'official', got {scoring!r}")
        super().__init__(
            num_classes,
            anchor_generator,
            in_channels=in_channels,
            feat_channels=feat_channels,
            num_convs=num_convs,
            norm=norm,
            conv_bias=conv_bias,
            centerness=True,
            centerness_on_reg=True,
            use_scales=use_scales,
            pred_kernel_size=pred_kernel_size,
            prior_prob=prior_prob,
            score_thresh=score_thresh,
            nms_pre=nms_pre,
            nms_thresh=nms_thresh,
            max_per_img=max_per_img,
            min_box_size=min_box_size,
        )
        if anchor_generator.num_anchors != 1:
            raise ValueError("ATSSHead needs one anchor per location")
        self.topk = topk
        self.scoring = scoring
        self.box_coder = BoxCoder(stds=tuple(box_stds), clamp=abs(math.log(16 / 1000)))
        self.box_loss_weight = box_loss_weight
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma

    def loss(
        self,
        outputs: dict[str, list[Tensor]],
        priors: list[Tensor],
        targets: Sequence[dict[str, Tensor]],
    ) -> dict[str, Tensor]:
        cls = concat_levels(outputs["cls"], self.num_classes)
        reg = concat_levels(outputs["reg"], 4)
        ctr = concat_levels(outputs["ctr"], 1)[..., 0]
        anchors = torch.cat(priors)
        num_per_level = [p.shape[0] for p in priors]
        cls_target, fg_mask, gt_boxes = dense_targets(
            cls, targets, lambda boxes: atss_assign(anchors, num_per_level, boxes, self.topk)
        )
        gt_fg = gt_boxes[fg_mask]
        anchors_fg = anchors.expand(fg_mask.shape[0], -1, -1)[fg_mask]
        pred_boxes = self.box_coder.decode(reg[fg_mask], anchors_fg)
        ctr_target = centerness_target(bbox2distance(anchor_centers(anchors_fg), gt_fg))
        losses = centerness_losses(
            cls, cls_target, fg_mask, giou_loss(pred_boxes, gt_fg, reduction="none"),
            ctr[fg_mask], ctr_target, self.focal_alpha, self.focal_gamma,
            weight_by_centerness=True, min_centerness_sum=1.0,
        )  # fmt: skip
        losses["loss_box"] = losses["loss_box"] * self.box_loss_weight
        return losses

    def predict(
        self,
        outputs: dict[str, list[Tensor]],
        priors: list[Tensor],
        image_sizes: Sequence[tuple[int, int]],
    ) -> list[dict[str, Tensor]]:
        probs, boxes, factors = [], [], []
        for cls, reg, ctr, p in zip(
            outputs["cls"], outputs["reg"], outputs["ctr"], priors, strict=True
        ):
            probs.append(flatten_level(cls, self.num_classes).sigmoid())
            factors.append(flatten_level(ctr, 1).sigmoid()[..., 0])
            boxes.append(
                self.box_coder.decode(flatten_level(reg, 4), p.expand(reg.shape[0], -1, -1))
            )
        if self.scoring == "official":
            ranked = [s * f[..., None] for s, f in zip(probs, factors, strict=True)]
            return self.select(ranked, boxes, image_sizes, gates=probs)
        return self.select(probs, boxes, image_sizes, factors)
