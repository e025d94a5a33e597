"""Label assignment for the dense heads: FCOS points, ATSS and max-IoU (RetinaNet).

Every assigner returns ``matched: LongTensor[A]`` holding, for each prior, the index of its
ground-truth box, ``-1`` for background or ``-2`` for ignored priors.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from dynadet.ops.boxes import box_area, box_iou

BACKGROUND = -1
IGNORE = -2


def fcos_assign(
    points: Tensor,
    prior_sizes: Tensor,
    ranges: Tensor,
    gt_boxes: Tensor,
    center_radius: float | None = 1.5,
    range_inclusive: bool = True,
) -> Tensor:
    """FCOS assignment of points to boxes.

    Args:
        points: ``Tensor[A, 2]`` point coordinates (x, y).
        prior_sizes: ``Tensor[A]`` the stride (or prior width) of each point's level.
        ranges: ``Tensor[A, 2]`` regress range ``(lo, hi)`` of each point's level.
        gt_boxes: ``Tensor[G, 4]`` xyxy.
        center_radius: centre sampling radius in strides (``None`` disables it).
        range_inclusive: MMDetection tests ``lo <= m <= hi``; torchvision and Detectron2
            ``lo < m < hi``.

    A point is a candidate for a box if it lies strictly inside it (and inside the centre region
    ``|p - c|∞ < r·s`` with centre sampling) and its largest side distance is in the level's
    range; among candidate boxes the smallest one wins.

    Returns:
        ``LongTensor[A]`` box index per point, ``-1`` for background.
    """
    num_points = points.shape[0]
    if gt_boxes.numel() == 0:
        return points.new_full((num_points,), BACKGROUND, dtype=torch.long)
    x = points[:, 0, None]
    y = points[:, 1, None]
    ltrb = torch.stack(
        [x - gt_boxes[:, 0], y - gt_boxes[:, 1], gt_boxes[:, 2] - x, gt_boxes[:, 3] - y], dim=-1
    )  # [A, G, 4]
    candidate = ltrb.min(dim=-1).values > 0
    if center_radius is not None:
        centers = (gt_boxes[:, :2] + gt_boxes[:, 2:]) / 2
        radius = center_radius * prior_sizes[:, None]
        offset = (points[:, None, :] - centers[None, :, :]).abs().max(dim=-1).values
        candidate &= offset < radius
    max_dist = ltrb.max(dim=-1).values
    lo, hi = ranges[:, 0, None], ranges[:, 1, None]
    if range_inclusive:
        candidate &= (max_dist >= lo) & (max_dist <= hi)
    else:
        candidate &= (max_dist > lo) & (max_dist < hi)
    areas = box_area(gt_boxes)[None, :].expand(num_points, -1)
    areas = torch.where(candidate, areas, torch.full_like(areas, float("inf")))
    min_area, matched = areas.min(dim=1)
    return torch.where(torch.isinf(min_area), torch.full_like(matched, BACKGROUND), matched)


def atss_assign(
    anchors: Tensor,
    num_per_level: Sequence[int],
    gt_boxes: Tensor,
    topk: int = 9,
    inside_eps: float = 0.01,
) -> Tensor:
    """Adaptive Training Sample Selection (Zhang et al., CVPR 2020), as MMDetection computes it.

    For each box, the ``topk`` anchors per level whose centres are closest (L2) to the box centre
    are candidates; the IoU threshold is mean + std (unbiased) of the candidates' IoUs; a candidate
    is positive if its IoU reaches the threshold and its centre lies inside the box with every
    side distance ``> inside_eps``. An anchor positive for several boxes takes the highest IoU.

    Args:
        anchors: ``Tensor[A, 4]`` all levels concatenated (finest first).
        num_per_level: anchors per level, summing to ``A``.
        gt_boxes: ``Tensor[G, 4]``.

    Returns:
        ``LongTensor[A]`` box index per anchor, ``-1`` for background.
    """
    num_anchors = anchors.shape[0]
    num_gt = gt_boxes.shape[0]
    if num_gt == 0 or num_anchors == 0:
        return anchors.new_full((num_anchors,), BACKGROUND, dtype=torch.long)
    ious = box_iou(anchors, gt_boxes)  # [A, G]
    anchor_ctr = (anchors[:, :2] + anchors[:, 2:]) / 2
    gt_ctr = (gt_boxes[:, :2] + gt_boxes[:, 2:]) / 2
    dist = (anchor_ctr[:, None, :] - gt_ctr[None, :, :]).pow(2).sum(-1).sqrt()  # [A, G]

    candidates = []
    start = 0
    for n in num_per_level:
        k = min(topk, n)
        if k > 0:
            idx = dist[start : start + n].topk(k, dim=0, largest=False).indices  # [k, G]
            candidates.append(idx + start)
        start += n
    cand = torch.cat(candidates, dim=0)  # [K, G]
    gt_index = torch.arange(num_gt, device=anchors.device)
    cand_ious = ious[cand, gt_index[None, :]]  # [K, G]
    threshold = cand_ious.mean(0) + cand_ious.std(0)
    positive = cand_ious >= threshold[None, :]

    cx = anchor_ctr[cand, 0]  # [K, G]
    cy = anchor_ctr[cand, 1]
    inside = (
        torch.stack(
            [
                cx - gt_boxes[None, :, 0],
                cy - gt_boxes[None, :, 1],
                gt_boxes[None, :, 2] - cx,
                gt_boxes[None, :, 3] - cy,
            ],
            dim=-1,
        )
        .min(dim=-1)
        .values
        > inside_eps
    )
    positive &= inside

    masked = torch.full_like(ious, -float("inf"))
    pos_anchor = cand[positive]
    pos_gt = gt_index[None, :].expand_as(cand)[positive]
    masked[pos_anchor, pos_gt] = ious[pos_anchor, pos_gt]
    best, matched = masked.max(dim=1)
    return torch.where(best == -float("inf"), torch.full_like(matched, BACKGROUND), matched)


def max_iou_assign(
    ious: Tensor,
    pos_thr: float = 0.5,
    neg_thr: float = 0.4,
    low_quality: str = "mmdet",
    min_pos_iou: float = 0.0,
) -> Tensor:
    """Max-IoU assignment (RetinaNet, RPN, R-CNN).

    Args:
        ious: ``Tensor[G, A]`` IoU of every box with every prior.
        pos_thr: IoU ``>=`` this is positive.
        neg_thr: IoU ``<`` this is negative; in between is ignored (``-2``).
        low_quality: how each box's best priors are kept positive:
            ``"mmdet"`` — every prior whose IoU equals the box's maximum (and ``>= min_pos_iou``)
            is assigned to that box (later boxes win); ``"torchvision"`` — those priors take
            their own best box (torchvision's ``Matcher``); ``"none"`` — off.

    Returns:
        ``LongTensor[A]`` box index, ``-1`` background, ``-2`` ignored.
    """
    num_gt, num_priors = ious.shape
    if num_gt == 0:
        return ious.new_full((num_priors,), BACKGROUND, dtype=torch.long)
    best_iou, best_gt = ious.max(dim=0)
    matched = best_gt.clone()
    matched[best_iou < pos_thr] = IGNORE
    matched[best_iou < neg_thr] = BACKGROUND
    if low_quality == "none":
        return matched
    gt_best = ious.max(dim=1).values  # [G]
    is_best = ious == gt_best[:, None]  # [G, A]
    if low_quality == "torchvision":
        restore = is_best.any(dim=0)
        return torch.where(restore, best_gt, matched)
    if low_quality == "mmdet":
        is_best &= (gt_best >= min_pos_iou)[:, None]
        # later boxes overwrite earlier ones, as MMDetection's loop over boxes does
        gt_ids = torch.arange(num_gt, device=ious.device)[:, None].expand_as(is_best)
        last = torch.where(is_best, gt_ids, torch.full_like(gt_ids, -1)).max(dim=0).values
        return torch.where(last >= 0, last, matched)
    raise ValueError(f"low_quality must be 'mmdet', 'torchvision' or 'none', got {low_quality!r}")
