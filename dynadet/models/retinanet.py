"""RetinaNet (Lin et al., ICCV 2017) head, optionally trained with Dynamic R-CNN's rules.

Dynamic training of a one-stage head is a dynadet extension: Dynamic R-CNN (Zhang et al., ECCV
2020) changes only the R-CNN head. With ``dynamic`` set, "proposal" becomes "anchor":

* IoU statistic (DLA): every anchor's IoU with its best-matching box (0 in an image without
  boxes), all anchors of each image (about 180k at 800×1216), so both statistic modes stay
  exact (``"official"`` needs the batch's top ``K_I·B``). The ``K_I``-th largest is the IoU that
  the image's ``K_I`` best anchors reach. Anchors do not move during training, so unlike
  proposals this does not rise as the model learns: the threshold settles at a data-dependent
  level after the first update, a data-adaptive rather than a progressive threshold. It grows
  with the boxes per image; in a rough simulation (COCO-like random boxes, 800×1216, the
  RetinaNet anchors) the 75th largest was about 0.33 / 0.47 / 0.55 / 0.60 / 0.66 with 1 / 3 /
  7 / 15 / 30 boxes, about 18 anchors per box reaching IoU 0.5. Choose ``K_I`` as roughly the
  positives per image wanted at the threshold.
* β statistic (DSL): the positives' regression targets in this head's delta space
  (``box_stds``), where β is applied; low-quality matches included. With stds 1 the centre
  targets are 10× smaller than R-CNN's (stds 0.1), so RetinaNet's β = 0.11 plays the role of
  R-CNN's initial 1.0.
* Low-quality matching stays as configured: it keeps each box's best anchors positive when the
  threshold rises above what small boxes' anchors reach.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from dynadet.models.assigners import max_iou_assign
from dynadet.models.dense_head import TowerHead, concat_levels, flatten_level, reduce_mean
from dynadet.models.dynamic_stats import DynamicTrainingStats
from dynadet.models.priors import AnchorGenerator
from dynadet.ops.boxes import BoxCoder, box_iou
from dynadet.ops.losses import giou_loss, l1_loss, sigmoid_focal_loss, smooth_l1_loss


class RetinaNetHead(TowerHead):
    """RetinaNet head: ``A`` anchors per location, max-IoU assignment, focal + box loss.

    Args (beyond :class:`TowerHead`):
        pos_iou / neg_iou: assignment thresholds (0.5 / 0.4; in between ignored).
        low_quality: ``"mmdet"`` or ``"torchvision"`` rule for keeping each box's best anchors.
        box_loss: ``"l1"`` on deltas (v1), ``"smooth_l1"`` on deltas (``beta``), or ``"giou"`` on
            decoded boxes (torchvision v2).
        clamp_mode: delta clamp, ``"symmetric"`` (MMDetection) or ``"upper"`` (torchvision).
        loss_normalizer: ``"batch"`` divides by the positives of the whole batch (MMDetection);
            ``"image"`` divides each image by its own positives and averages (torchvision).
        dynamic: Dynamic R-CNN statistics (a
            :class:`~dynadet.models.dynamic_stats.DynamicTrainingStats`; module docstring for
            what they mean on anchors), or ``None`` (default: plain RetinaNet). Needs
            ``box_loss="smooth_l1"``. In training the assigner uses ``pos = dynamic.iou_thresh``
            and ``neg = pos - dynamic_neg_gap``, the SmoothL1 uses ``beta = dynamic.beta``
            (``smooth_l1_beta`` is then unused), each forward then calls
            ``dynamic.update(max_ious, pos_targets)`` and the loss dict adds ``iou_thresh`` (the
            positive threshold) and ``beta``, the values used in that step. All on the device:
            no host read. Never touched in eval mode. Held as ``self.dynamic_stats`` (state keys
            ``dynamic_stats.*``): :class:`~dynadet.models.routing_heads.RoutingTowersMixin`
            uses ``self.dynamic`` for its routing flag.
        dynamic_neg_gap: width of the ignore band below the dynamic threshold; ``None``
            (default) keeps the configured ``pos_iou - neg_iou`` (0.1: RetinaNet's band moves
            up with the threshold); ``0`` gives Dynamic R-CNN's single threshold.

    Shapes: as :class:`dynadet.models.fcos.FCOSHead`; ``cls`` has ``A·C`` channels per level.
    ``dynamic.update`` gets ``max_ious: list[Tensor[M]]`` (``M`` anchors per image) and
    ``pos_targets: Tensor[P, 4]`` (normalised deltas of the batch's positive anchors).
    """

    def __init__(
        self,
        num_classes: int,
        anchor_generator: AnchorGenerator,
        in_channels: int = 256,
        feat_channels: int = 256,
        num_convs: int = 4,
        norm: str = "none",
        conv_bias: bool | None = None,
        pos_iou: float = 0.5,
        neg_iou: float = 0.4,
        low_quality: str = "mmdet",
        box_loss: str = "l1",
        smooth_l1_beta: float = 0.0,
        box_loss_weight: float = 1.0,
        box_stds: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
        clamp_mode: str = "symmetric",
        loss_normalizer: str = "batch",
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        score_thresh: float = 0.05,
        nms_pre: int = 1000,
        nms_thresh: float = 0.5,
        max_per_img: int = 100,
        min_box_size: float | None = None,
        prior_prob: float = 0.01,
        dynamic: DynamicTrainingStats | None = None,
        dynamic_neg_gap: float | None = None,
    ) -> None:
        super().__init__(
            num_classes,
            anchor_generator,
            in_channels=in_channels,
            feat_channels=feat_channels,
            num_convs=num_convs,
            norm=norm,
            conv_bias=conv_bias,
            centerness=False,
            use_scales=False,
            prior_prob=prior_prob,
            score_thresh=score_thresh,
            nms_pre=nms_pre,
            nms_thresh=nms_thresh,
            max_per_img=max_per_img,
            min_box_size=min_box_size,
        )
        if box_loss not in ("l1", "smooth_l1", "giou"):
            raise ValueError(f"box_loss must be 'l1', 'smooth_l1' or 'giou', got {box_loss!r}")
        if loss_normalizer not in ("batch", "image"):
            raise ValueError(f"loss_normalizer must be 'batch' or 'image', got {loss_normalizer!r}")
        if dynamic is not None and box_loss != "smooth_l1":
            raise ValueError(
                f"dynamic training sets the SmoothL1 beta, so it needs box_loss='smooth_l1', "
                f"got box_loss={box_loss!r}"
            )
        gap = pos_iou - neg_iou if dynamic_neg_gap is None else float(dynamic_neg_gap)
        if gap < 0:
            raise ValueError(f"dynamic_neg_gap must be >= 0, got {gap}")
        self.pos_iou = pos_iou
        self.neg_iou = neg_iou
        self.low_quality = low_quality
        self.box_loss = box_loss
        self.smooth_l1_beta = smooth_l1_beta
        self.box_loss_weight = box_loss_weight
        self.box_coder = BoxCoder(
            stds=tuple(box_stds), clamp=math.log(1000 / 16), clamp_mode=clamp_mode
        )
        self.loss_normalizer = loss_normalizer
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        self.dynamic_stats = dynamic
        self.dynamic_neg_gap = gap

    def _box_loss(self, pred: Tensor, anchors: Tensor, gt: Tensor) -> Tensor:
        """Summed box loss of the positive anchors (``[P, 4]`` each)."""
        if self.box_loss == "giou":
            return giou_loss(self.box_coder.decode(pred, anchors), gt, reduction="sum")
        target = self.box_coder.encode(anchors, gt)
        if self.box_loss == "l1":
            return l1_loss(pred, target, reduction="sum")
        return smooth_l1_loss(pred, target, beta=self.smooth_l1_beta, reduction="sum")

    def loss(
        self,
        outputs: dict[str, list[Tensor]],
        priors: list[Tensor],
        targets: Sequence[dict[str, Tensor]],
    ) -> dict[str, Tensor]:
        dynamic = self.dynamic_stats if self.training else None
        pos_thr: Tensor | float = self.pos_iou
        neg_thr: Tensor | float = self.neg_iou
        if dynamic is not None:  # clones: update() below writes the buffers in place
            pos_thr = dynamic.iou_thresh.detach().clone()
            neg_thr = pos_thr - self.dynamic_neg_gap
            beta = dynamic.beta.detach().clone()
        cls = concat_levels(outputs["cls"], self.num_classes)
        reg = concat_levels(outputs["reg"], 4)
        anchors = torch.cat(priors)
        cls_losses, box_losses, num_pos_list = [], [], []
        max_ious, pos_targets = [], []
        for i, t in enumerate(targets):
            ious = box_iou(t["boxes"], anchors)
            matched = max_iou_assign(ious, pos_thr, neg_thr, self.low_quality)
            fg = matched >= 0
            valid = matched != -2
            target = torch.zeros_like(cls[i])
            target[fg, t["labels"][matched[fg]]] = 1.0
            cls_losses.append(
                sigmoid_focal_loss(
                    cls[i][valid],
                    target[valid],
                    self.focal_alpha,
                    self.focal_gamma,
                    reduction="sum",
                )
            )
            pos_anchors, pos_gt = anchors[fg], t["boxes"][matched[fg]]
            if dynamic is None:
                box_losses.append(self._box_loss(reg[i][fg], pos_anchors, pos_gt))
            else:
                box_target = self.box_coder.encode(pos_anchors, pos_gt)
                box_losses.append(smooth_l1_loss(reg[i][fg], box_target, beta, reduction="sum"))
                pos_targets.append(box_target)
                best = ious.amax(dim=0) if ious.shape[0] else ious.new_zeros(ious.shape[1])
                max_ious.append(best)
            num_pos_list.append(fg.sum().to(cls.dtype))
        if self.loss_normalizer == "image":
            norms = [n.clamp(min=1.0) for n in num_pos_list]
            loss_cls = sum(c / n for c, n in zip(cls_losses, norms, strict=True)) / len(targets)
            loss_box = sum(b / n for b, n in zip(box_losses, norms, strict=True)) / len(targets)
        else:
            num_pos = reduce_mean(torch.stack(num_pos_list).sum()).clamp(min=1.0)
            loss_cls = torch.stack(cls_losses).sum() / num_pos
            loss_box = torch.stack(box_losses).sum() / num_pos
        out = {"loss_cls": loss_cls, "loss_box": loss_box * self.box_loss_weight}
        if dynamic is not None:
            dynamic.update(max_ious, torch.cat(pos_targets))
            out["iou_thresh"] = pos_thr.to(loss_cls.dtype)
            out["beta"] = beta.to(loss_cls.dtype)
        return out

    def predict(
        self,
        outputs: dict[str, list[Tensor]],
        priors: list[Tensor],
        image_sizes: Sequence[tuple[int, int]],
    ) -> list[dict[str, Tensor]]:
        scores, boxes = [], []
        for cls, reg, p in zip(outputs["cls"], outputs["reg"], priors, strict=True):
            scores.append(flatten_level(cls, self.num_classes).sigmoid())
            boxes.append(
                self.box_coder.decode(flatten_level(reg, 4), p.expand(reg.shape[0], -1, -1))
            )
        return self.select(scores, boxes, image_sizes)
