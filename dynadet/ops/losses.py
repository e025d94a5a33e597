"""Detection losses: sigmoid focal loss, IoU / GIoU losses, smooth L1 and L1.

Every loss takes ``reduction`` in {"none" (default), "sum", "mean"} and an optional ``weight``
that is broadcast against the element-wise loss and multiplied in before the reduction ("mean"
averages over all elements, weighted or not; divide a "sum" by your own normaliser, e.g. the
number of positives, for the detectors' conventions).
"""

import torch
import torch.nn.functional as F
from torch import Tensor

from dynadet.ops.boxes import aligned_box_iou, aligned_giou

REDUCTIONS = ("none", "sum", "mean")


def reduce_loss(loss: Tensor, weight: Tensor | None = None, reduction: str = "none") -> Tensor:
    """Multiply ``loss`` by the broadcast ``weight`` (if any), then reduce it."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if weight is not None:
        loss = loss * weight
    if reduction == "sum":
        return loss.sum()
    if reduction == "mean":
        return loss.mean()
    return loss


def sigmoid_focal_loss(
    logits: Tensor,
    targets: Tensor,
    alpha: float = 0.25,
    gamma: float = 2.0,
    reduction: str = "none",
    weight: Tensor | None = None,
) -> Tensor:
    """Sigmoid focal loss (Lin et al.) of ``logits[..., C]`` against 0/1 ``targets[..., C]``.

    ``loss = alpha_t * BCE(logits, targets) * (1 - p_t) ** gamma`` with ``p = sigmoid(logits)``,
    ``p_t = p * t + (1 - p) * (1 - t)`` and ``alpha_t = alpha * t + (1 - alpha) * (1 - t)``;
    a negative ``alpha`` disables the alpha weighting. Shape ``[..., C]`` before reduction.
    """
    targets = targets.to(logits.dtype)
    prob = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    loss = ce * ((1 - p_t) ** gamma)
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return reduce_loss(loss, weight, reduction)


def giou_loss(
    pred: Tensor,
    target: Tensor,
    eps: float = 1e-7,
    reduction: str = "none",
    weight: Tensor | None = None,
) -> Tensor:
    """``1 - GIoU`` of paired xyxy boxes ``pred[..., 4]`` and ``target[..., 4]`` -> ``[...]``."""
    return reduce_loss(1 - aligned_giou(pred, target, eps=eps), weight, reduction)


def iou_loss(
    pred: Tensor,
    target: Tensor,
    mode: str = "log",
    eps: float = 1e-6,
    reduction: str = "none",
    weight: Tensor | None = None,
) -> Tensor:
    """IoU loss of paired xyxy boxes ``[..., 4]`` -> ``[...]`` (MMDetection ``IoULoss``).

    The IoU is clamped to at least ``eps``; ``mode`` "log": ``-log(iou)``, "linear":
    ``1 - iou``, "square": ``1 - iou ** 2``.
    """
    iou = aligned_box_iou(pred, target).clamp(min=eps)
    if mode == "log":
        loss = -torch.log(iou)
    elif mode == "linear":
        loss = 1 - iou
    elif mode == "square":
        loss = 1 - iou**2
    else:
        raise ValueError(f"mode must be 'log', 'linear' or 'square', got {mode!r}")
    return reduce_loss(loss, weight, reduction)


def smooth_l1_loss(
    input: Tensor,
    target: Tensor,
    beta: float | Tensor = 1.0,
    reduction: str = "none",
    weight: Tensor | None = None,
) -> Tensor:
    """Smooth L1 (Huber / beta) element-wise loss; ``beta == 0`` gives exactly the L1 loss.

    ``0.5 * d ** 2 / beta`` where ``|d| < beta``, else ``|d| - 0.5 * beta``; same shape as
    ``input`` before reduction. ``beta`` is a Python float, or a 0-dim tensor > 0 (Dynamic
    R-CNN's run-time β, used without reading it back to the host).
    """
    diff = torch.abs(input - target)
    if isinstance(beta, Tensor):
        loss = torch.where(diff < beta, 0.5 * diff * diff / beta, diff - 0.5 * beta)
        return reduce_loss(loss, weight, reduction)
    if beta < 0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    if beta == 0:
        loss = diff
    else:
        loss = torch.where(diff < beta, 0.5 * diff * diff / beta, diff - 0.5 * beta)
    return reduce_loss(loss, weight, reduction)


def l1_loss(
    input: Tensor,
    target: Tensor,
    reduction: str = "none",
    weight: Tensor | None = None,
) -> Tensor:
    """Element-wise ``|input - target|``, same shape as ``input`` before reduction."""
    return reduce_loss(torch.abs(input - target), weight, reduction)
