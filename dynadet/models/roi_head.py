"""Fast R-CNN box head of the two-stage detectors, with Dynamic R-CNN's training hooks."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import pad_sequence

from dynadet.models.assigners import IGNORE, max_iou_assign
from dynadet.models.rpn import sample_pos_neg, top_per_image
from dynadet.ops.boxes import BoxCoder, box_iou
from dynadet.ops.losses import l1_loss, smooth_l1_loss
from dynadet.ops.nms import batched_nms
from dynadet.ops.roi_align import MultiScaleRoIAlign


def _rois(boxes: Sequence[Tensor]) -> Tensor:
    """``[K, 5]`` rows (image index, x1, y1, x2, y2) from per-image ``[K_i, 4]`` boxes."""
    ids = [b.new_full((b.shape[0], 1), float(i)) for i, b in enumerate(boxes)]
    return torch.cat([torch.cat(ids), torch.cat(list(boxes))], dim=1)


class TwoFCBoxHead(nn.Module):
    """Flatten → ``fc6`` → ReLU → ``fc7`` → ReLU: ``[K, C, h, w] -> [K, fc_channels]``.

    Xavier-uniform weights, zero biases (MMDetection ``Shared2FCBBoxHead``).
    """

    def __init__(self, in_features: int, fc_channels: int = 1024) -> None:
        super().__init__()
        self.fc6 = nn.Linear(in_features, fc_channels)
        self.fc7 = nn.Linear(fc_channels, fc_channels)
        for fc in (self.fc6, self.fc7):
            nn.init.xavier_uniform_(fc.weight)
            nn.init.zeros_(fc.bias)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.fc7(F.relu(self.fc6(x.flatten(1)))))


class RoIHead(nn.Module):
    """R-CNN head: RoIAlign on the pyramid, two shared FCs, a classifier and class-specific
    box regression.

    Class convention: ``cls_score`` has ``C + 1`` outputs with **background last** (index
    ``C``), as MMDetection ≥ 2.0 and Detectron2; ``bbox_pred`` has ``4·C`` outputs, rows
    ``4c..4c+3`` for class ``c`` (no background rows). Deltas are normalised by ``box_stds``.

    Args:
        num_classes: foreground classes ``C``.
        roi_extractor: a :class:`~dynadet.ops.roi_align.MultiScaleRoIAlign` (7×7, aligned,
            adaptive sampling, MMDetection level mapping for the reference recipe). It reads the
            first ``len(featmap_strides)`` feature maps (P2–P5 of a P2–P6 pyramid).
        in_channels / fc_channels: pyramid width and the width of the two FCs.
        pos_iou / neg_iou: max-IoU assignment of proposals (0.5 / 0.5: no ignore band, no
            low-quality matches).
        num_samples / pos_fraction / add_gt_as_proposals: RoI sampling per image (512, 0.25,
            ground-truth boxes prepended to the proposals).
        box_loss: ``"l1"`` (MMDetection) or ``"smooth_l1"`` with ``smooth_l1_beta``. Box losses
            are summed over the positives and divided by the number of sampled RoIs; the
            cross-entropy is averaged over the sampled RoIs.
        box_stds / clamp_mode: box coder (deltas ``/ stds``; ``"symmetric"`` or ``"upper"``).
        box_weights: the torchvision / Detectron2 form of the same coder, e.g. ``(10, 10, 5, 5)``
            (deltas ``· weights`` on encode, ``/ weights`` on decode, their op order, so decoded
            boxes equal theirs bit for bit); replaces ``box_stds`` when given.
        score_thresh / nms_thresh / max_per_img / min_box_size: test-time selection (class
            scores ``> score_thresh``, per-class NMS, best ``max_per_img`` per image).
        dynamic: Dynamic R-CNN statistics (a ``DynamicTrainingStats``). In training the
            assigner uses ``pos = neg = dynamic.iou_thresh`` and the SmoothL1 loss uses
            ``beta = dynamic.beta`` (with ``box_loss="smooth_l1"``); each training forward then
            calls ``dynamic.update(max_ious, pos_targets)`` and reports ``iou_thresh`` and
            ``beta`` (the values used in that step) next to the losses. Never touched in eval.

    Shapes:
        ``loss(features, proposals: list[Tensor[P_i, 4]], targets)`` → dict of scalars;
        ``predict(features, proposals, image_sizes)`` → per image ``boxes [K, 4]``,
        ``scores [K]``, ``labels [K]`` (coordinates of the resized image).
    """

    def __init__(
        self,
        num_classes: int,
        roi_extractor: MultiScaleRoIAlign,
        in_channels: int = 256,
        fc_channels: int = 1024,
        pos_iou: float = 0.5,
        neg_iou: float = 0.5,
        num_samples: int = 512,
        pos_fraction: float = 0.25,
        add_gt_as_proposals: bool = True,
        box_loss: str = "l1",
        smooth_l1_beta: float = 1.0,
        box_stds: Sequence[float] = (0.1, 0.1, 0.2, 0.2),
        clamp_mode: str = "symmetric",
        box_weights: Sequence[float] | None = None,
        score_thresh: float = 0.05,
        nms_thresh: float = 0.5,
        max_per_img: int = 100,
        min_box_size: float | None = None,
        dynamic: nn.Module | None = None,
    ) -> None:
        super().__init__()
        if box_loss not in ("l1", "smooth_l1"):
            raise ValueError(f"box_loss must be 'l1' or 'smooth_l1', got {box_loss!r}")
        self.num_classes = num_classes
        self.roi_extractor = roi_extractor
        self.pos_iou = pos_iou
        self.neg_iou = neg_iou
        self.num_samples = num_samples
        self.pos_fraction = pos_fraction
        self.add_gt_as_proposals = add_gt_as_proposals
        self.box_loss = box_loss
        self.smooth_l1_beta = smooth_l1_beta
        clamp = math.log(1000.0 / 16)
        if box_weights is None:
            self.box_coder = BoxCoder(stds=tuple(box_stds), clamp=clamp, clamp_mode=clamp_mode)
        else:
            self.box_coder = BoxCoder.from_weights(tuple(box_weights), clamp, clamp_mode)
        self.score_thresh = score_thresh
        self.nms_thresh = nms_thresh
        self.max_per_img = max_per_img
        self.min_box_size = min_box_size
        self.dynamic = dynamic

        oh, ow = roi_extractor.output_size
        self.box_head = TwoFCBoxHead(in_channels * oh * ow, fc_channels)
        self.cls_score = nn.Linear(fc_channels, num_classes + 1)
        self.bbox_pred = nn.Linear(fc_channels, 4 * num_classes)
        nn.init.normal_(self.cls_score.weight, std=0.01)
        nn.init.normal_(self.bbox_pred.weight, std=0.001)
        nn.init.zeros_(self.cls_score.bias)
        nn.init.zeros_(self.bbox_pred.bias)

    def forward(self, features: Sequence[Tensor], rois: Tensor) -> tuple[Tensor, Tensor]:
        """Class logits ``[K, C + 1]`` and deltas ``[K, 4·C]`` of ``rois [K, 5]``."""
        levels = list(features[: len(self.roi_extractor.featmap_strides)])
        x = self.box_head(self.roi_extractor(levels, rois))
        return self.cls_score(x).float(), self.bbox_pred(x).float()  # fp32 under AMP

    # ------------------------------------------------------------------ training
    def sample(
        self,
        proposals: Sequence[Tensor],
        targets: Sequence[dict[str, Tensor]],
        iou_thresh: Tensor | float | None = None,
    ) -> dict:
        """Assign and subsample the RoIs of a batch.

        Returns ``rois [K, 5]``, ``labels [K]`` (``C`` = background), ``pos [K]`` (bool),
        ``gt_boxes [K, 4]`` (the matched box; meaningful where ``pos``) and ``max_ious``, the
        per-image max IoU of every candidate before sampling (GT-as-proposals included).
        ``iou_thresh`` replaces both ``pos_iou`` and ``neg_iou`` (Dynamic R-CNN).
        """
        pos_thr = self.pos_iou if iou_thresh is None else iou_thresh
        neg_thr = self.neg_iou if iou_thresh is None else iou_thresh
        cands, matched_all, labels_all, boxes_all, max_ious = [], [], [], [], []
        for props, t in zip(proposals, targets, strict=True):
            gt = t["boxes"].to(props.dtype)
            cand = torch.cat([gt, props]) if self.add_gt_as_proposals else props
            ious = box_iou(gt, cand)  # [G, P]
            matched = max_iou_assign(ious, pos_thr, neg_thr, low_quality="none")
            if gt.shape[0]:
                best = ious.max(dim=0).values
                if self.add_gt_as_proposals:
                    # each GT-as-proposal is matched to its own box with IoU 1 (MMDetection's
                    # add_gt_), also for duplicate or degenerate boxes
                    own = torch.arange(gt.shape[0], device=matched.device)
                    matched[: gt.shape[0]] = own
                    best[: gt.shape[0]] = 1.0
                max_ious.append(best)
                labels = torch.where(
                    matched >= 0, t["labels"][matched.clamp(min=0)], self.num_classes
                )
                boxes_all.append(gt[matched.clamp(min=0)])
            else:
                max_ious.append(ious.new_zeros(cand.shape[0]))
                labels = torch.full_like(matched, self.num_classes)
                boxes_all.append(torch.zeros_like(cand))
            cands.append(cand)
            matched_all.append(matched)
            labels_all.append(labels)
        # Pad to a [N, P_max] batch (padding is ignored, never sampled): one sampling call.
        matched = pad_sequence(matched_all, batch_first=True, padding_value=IGNORE)
        pos, neg = sample_pos_neg(matched, self.num_samples, self.pos_fraction)
        sampled = pos | neg
        boxes = pad_sequence(cands, batch_first=True)  # [N, P_max, 4]
        ids = torch.arange(len(cands), device=boxes.device, dtype=boxes.dtype)
        rois = torch.cat([ids[:, None, None].expand(-1, boxes.shape[1], 1), boxes], dim=2)
        return {
            "rois": rois[sampled],
            "labels": pad_sequence(labels_all, batch_first=True)[sampled],
            "pos": pos[sampled],
            "gt_boxes": pad_sequence(boxes_all, batch_first=True)[sampled],
            "max_ious": max_ious,
        }

    def loss(
        self,
        features: Sequence[Tensor],
        proposals: Sequence[Tensor],
        targets: Sequence[dict[str, Tensor]],
    ) -> dict[str, Tensor]:
        """``loss_cls``, ``loss_box`` (and with ``dynamic``: ``iou_thresh``, ``beta``)."""
        dynamic = self.dynamic if self.training else None
        iou_thresh = None if dynamic is None else dynamic.iou_thresh.detach().clone()
        beta = self.smooth_l1_beta if dynamic is None else dynamic.beta.detach().clone()
        with torch.no_grad():
            s = self.sample([p.detach() for p in proposals], targets, iou_thresh)
            pos = s["pos"]
            box_target = self.box_coder.encode(s["rois"][pos, 1:], s["gt_boxes"][pos])
        cls_logits, deltas = self(features, s["rois"])
        num_rois = max(cls_logits.shape[0], 1)
        loss_cls = F.cross_entropy(cls_logits, s["labels"], reduction="sum") / num_rois
        pos_labels = s["labels"][pos]
        pos_deltas = deltas.view(-1, self.num_classes, 4)[pos][
            torch.arange(pos_labels.numel(), device=pos_labels.device), pos_labels
        ]
        if self.box_loss == "l1":
            loss_box = l1_loss(pos_deltas, box_target, reduction="sum")
        else:
            loss_box = smooth_l1_loss(pos_deltas, box_target, beta, reduction="sum")
        out = {"loss_cls": loss_cls, "loss_box": loss_box / num_rois}
        if dynamic is not None:
            with torch.no_grad():
                dynamic.update(s["max_ious"], box_target)
            out["iou_thresh"] = iou_thresh.to(loss_cls.dtype)
            out["beta"] = beta.to(loss_cls.dtype)
        return out

    # ------------------------------------------------------------------ inference
    def decode(self, deltas: Tensor, rois: Tensor, limits: Tensor) -> Tensor:
        """Class-specific boxes ``[K, C, 4]`` from ``deltas [K, 4·C]`` and ``rois [K, 5]``,
        clipped to ``limits [K, 4]`` (``w, h, w, h`` of each RoI's image)."""
        boxes = self.box_coder.decode(deltas.view(-1, self.num_classes, 4), rois[:, None, 1:])
        return torch.minimum(boxes.clamp(min=0), limits[:, None, :])

    @torch.no_grad()
    def predict(
        self,
        features: Sequence[Tensor],
        proposals: Sequence[Tensor],
        image_sizes: Sequence[tuple[int, int]],
    ) -> list[dict[str, Tensor]]:
        """Detections per image from ``proposals[i]: Tensor[P_i, 4]``: softmax scores of the
        ``C`` classes, class-specific boxes clipped to ``image_sizes[i]``, scores
        ``> score_thresh``, per-class NMS and the best ``max_per_img`` (MMDetection
        ``multiclass_nms``). All images go through one RoIAlign, box head and NMS call."""
        num_images, c = len(proposals), self.num_classes
        rois = _rois(proposals)
        cls_logits, deltas = self(features, rois)
        scores = F.softmax(cls_logits, dim=-1)[:, :c]  # background (last) dropped
        image_ids = rois[:, 0].long()
        sizes = rois.new_tensor([[w, h, w, h] for h, w in image_sizes])
        boxes = self.decode(deltas, rois, sizes[image_ids])

        labels = torch.arange(c, device=rois.device).expand_as(scores)
        image_ids = image_ids[:, None].expand_as(scores)
        valid = scores > self.score_thresh
        if self.min_box_size is not None:
            wh = boxes[..., 2:] - boxes[..., :2]
            valid &= (wh > self.min_box_size).all(dim=-1)
        boxes, scores = boxes[valid], scores[valid]
        labels, image_ids = labels[valid], image_ids[valid]
        keep = batched_nms(boxes, scores, image_ids * c + labels, self.nms_thresh)
        per_image = top_per_image(keep, image_ids[keep], num_images, self.max_per_img)
        return [{"boxes": boxes[i], "scores": scores[i], "labels": labels[i]} for i in per_image]
