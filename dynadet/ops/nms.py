"""Exact greedy non-maximum suppression in pure PyTorch (torchvision.ops.nms semantics).

Semantics: boxes are visited in descending score order (stable: equal scores keep input
order); a visited box that no earlier *kept* box overlaps with IoU strictly greater than the
threshold is kept. Areas have no ``+1``. Kept indices are returned in descending score order.

Algorithm: boxes are grouped per class into a padded ``[G, L]`` layout (classes with the most
boxes first), and greedy suppression is resolved for all classes at once, one block of 64
score-ranked columns at a time. A block first drops candidates overlapping boxes already kept
in earlier blocks (IoU against the compact kept set only), then resolves the chains inside the
block by the fixed-point iteration ``keep[j] = alive[j] & ~any_{i<j}(keep[i] & IoU[i, j] > t)``,
which reaches exactly the greedy result (in as many rounds as the longest suppression chain).
Only same-class IoUs are ever computed, so coordinates need no offset trick, and one huge
class costs ``O(N * kept)`` time and ``O(64 * kept)`` memory instead of ``O(N^2)``.
"""

import bisect
import functools
import math
from collections.abc import Callable

import torch
from torch import Tensor

_BLOCK = 64  # columns resolved together; small blocks keep padding waste low across classes


@functools.cache
def _torchvision_nms() -> Callable[[Tensor, Tensor, float], Tensor] | None:
    """torchvision's compiled NMS if it imports and runs, else None (checked once)."""
    try:
        from torchvision.ops import nms as tv_nms

        boxes = torch.tensor([[0.0, 0.0, 2.0, 2.0], [0.0, 0.0, 2.0, 2.1]])
        if tv_nms(boxes, torch.tensor([1.0, 0.5]), 0.5).tolist() != [0]:
            return None
        return tv_nms
    except Exception:  # any failure (missing wheel, op not registered, ABI) -> pure torch
        return None


def torchvision_available() -> bool:
    """Whether the torchvision NMS backend can be used in this process."""
    return _torchvision_nms() is not None


def _use_torchvision(boxes: Tensor, backend: str) -> bool:
    if backend == "torch":
        return False
    if backend == "torchvision":
        if _torchvision_nms() is None:
            raise RuntimeError("backend='torchvision' requested but torchvision.ops.nms fails")
        return True
    if backend == "auto":
        return boxes.is_cuda and _torchvision_nms() is not None
    raise ValueError(f"backend must be 'auto', 'torch' or 'torchvision', got {backend!r}")


def _above(iou: Tensor, threshold: float) -> Tensor:
    """``iou > threshold`` with the threshold compared in double precision, as the kernels do.

    PyTorch would round the threshold to ``iou.dtype`` first; when that rounds up, an IoU equal
    to the rounded value is above the true threshold, so the comparison becomes ``>=``.
    """
    rounded = torch.tensor(threshold, dtype=iou.dtype).item()
    return iou >= rounded if rounded > threshold else iou > rounded


def _grouped_iou(a: Tensor, b: Tensor) -> Tensor:
    """IoU per group of ``a[5, G, n]`` with ``b[5, G, m]`` -> ``[G, n, m]``.

    Inputs are coordinate-major (x1, y1, x2, y2, area) so every operand is contiguous. The
    kernels' 0/0 (two empty boxes) is NaN, never above a threshold; it becomes -inf here so that
    row maxima keep that meaning.
    """
    a, b = a[:, :, :, None], b[:, :, None, :]
    w = (torch.minimum(a[2], b[2]) - torch.maximum(a[0], b[0])).clamp_(min=0)
    h = (torch.minimum(a[3], b[3]) - torch.maximum(a[1], b[1])).clamp_(min=0)
    inter = w.mul_(h)
    # Same operation order as the compiled kernels: inter / ((area_i + area_j) - inter).
    iou = inter / (a[4] + b[4] - inter)
    return iou.nan_to_num_(nan=-math.inf, posinf=math.inf, neginf=-math.inf)


def _penalty(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """0 where ``mask`` is True, -inf elsewhere: added to IoUs to exclude entries from a max."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, -math.inf)


def _resolve_block(alive: Tensor, iou: Tensor, threshold: float) -> Tensor:
    """Greedy keep mask ``[G, b]`` of one block of score-ranked candidates.

    ``alive[G, b]``: candidates not suppressed by earlier blocks; ``iou[G, b, b]``: IoU of
    candidate j (dim 1) with candidate i (dim 2), -inf unless i is ranked before j. Iteration t
    is exact for every box whose suppression chain is shorter than t: at most ``b + 1`` rounds.
    """
    keep = alive
    for _ in range(alive.shape[1] + 1):
        # Max over boxes (rather than any() over a bool tensor) is several times faster on CPU.
        worst = (iou + _penalty(keep, iou.dtype)[:, None, :]).amax(dim=2)
        new_keep = alive & ~_above(worst, threshold)
        if torch.equal(new_keep, keep):
            break
        keep = new_keep
    return keep


def _grouped_greedy(padded: Tensor, valid: Tensor, counts: list[int], threshold: float) -> Tensor:
    """Greedy NMS keep mask ``[G, L]`` for score-ranked boxes ``padded[5, G, L]`` (x1, y1, x2,
    y2, area; coordinate-major).

    ``valid[G, L]`` marks real boxes; ``counts`` (host ints, descending) are boxes per row.
    """
    num_groups, length = valid.shape
    keep = torch.zeros_like(valid)
    # [j, i] layout (candidate, earlier box): reductions run over the contiguous last dim.
    earlier = torch.ones(_BLOCK, _BLOCK, dtype=torch.bool, device=valid.device).tril_(-1)
    earlier = _penalty(earlier, padded.dtype)
    neg_counts = [-c for c in counts]
    kept_boxes = padded.new_zeros(5, num_groups, 0)
    kept_penalty = padded.new_zeros(num_groups, 0)
    for start in range(0, length, _BLOCK):
        stop = min(start + _BLOCK, length)
        rows = bisect.bisect_left(neg_counts, -start)  # groups with more than `start` boxes
        cand = padded[:, :rows, start:stop]
        alive = valid[:rows, start:stop]
        kept_boxes, kept_penalty = kept_boxes[:, :rows], kept_penalty[:rows]
        if kept_boxes.shape[2] > 0:
            iou = _grouped_iou(cand, kept_boxes).add_(kept_penalty[:, None, :])
            alive = alive & ~_above(iou.amax(dim=2), threshold)
        size = stop - start
        iou = _grouped_iou(cand, cand).add_(earlier[:size, :size])
        block_keep = _resolve_block(alive, iou, threshold)
        keep[:rows, start:stop] = block_keep
        if stop < length:
            # Append this block's kept boxes, compacted to the left, to the kept set.
            num_kept = block_keep.sum(dim=1)
            width = int(num_kept.max())
            order = torch.argsort((~block_keep).to(torch.uint8), dim=1, stable=True)[:, :width]
            new_boxes = torch.gather(cand, 2, order.expand(5, -1, -1))
            new_valid = torch.arange(width, device=valid.device) < num_kept[:, None]
            kept_boxes = torch.cat((kept_boxes, new_boxes), dim=2)
            kept_penalty = torch.cat((kept_penalty, _penalty(new_valid, padded.dtype)), dim=1)
    return keep


@torch.no_grad()  # indices only; no graph needed for the temporaries
def _batched_nms_torch(boxes: Tensor, scores: Tensor, idxs: Tensor, threshold: float) -> Tensor:
    num = boxes.shape[0]
    if not boxes.is_floating_point():
        boxes = boxes.float()
    by_score = torch.argsort(scores, descending=True, stable=True)
    # Stable sort by class of the score-ranked list: grouped per class, score order inside.
    perm = by_score[torch.argsort(idxs[by_score], stable=True)]
    _, group, counts = torch.unique_consecutive(idxs[perm], return_inverse=True, return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    column = torch.arange(num, device=boxes.device) - starts[group]
    # Largest classes first, so each block only touches a prefix of the rows.
    group_order = torch.argsort(counts, descending=True, stable=True)
    row_of_group = torch.empty_like(group_order)
    row_of_group[group_order] = torch.arange(group_order.numel(), device=boxes.device)
    row = row_of_group[group]
    sorted_counts = counts[group_order].tolist()

    shape = (len(sorted_counts), sorted_counts[0])
    ranked = boxes[perm]
    area = (ranked[:, 2] - ranked[:, 0]) * (ranked[:, 3] - ranked[:, 1])
    padded = boxes.new_zeros(5, *shape)
    padded[:, row, column] = torch.cat((ranked.T, area[None]), dim=0)
    valid = torch.zeros(shape, dtype=torch.bool, device=boxes.device)
    valid[row, column] = True
    keep_grouped = _grouped_greedy(padded, valid, sorted_counts, threshold)

    keep = torch.empty(num, dtype=torch.bool, device=boxes.device)
    keep[perm] = keep_grouped[row, column]
    return by_score[keep[by_score]]


def _batched_nms_torchvision(
    boxes: Tensor, scores: Tensor, idxs: Tensor, threshold: float
) -> Tensor:
    tv_nms = _torchvision_nms()
    assert tv_nms is not None
    _, classes = torch.unique(idxs, return_inverse=True)
    # Shift classes apart by the full coordinate span (max - min + 1), which stays correct for
    # negative coordinates, unlike the common `idx * (max + 1)` offset.
    low, high = boxes.min(), boxes.max()
    offsets = classes.to(boxes.dtype) * (high - low + 1) - low
    return tv_nms(boxes + offsets[:, None], scores, threshold)


def _check(boxes: Tensor, scores: Tensor) -> None:
    if boxes.dim() != 2 or boxes.shape[-1] != 4:
        raise ValueError(f"boxes must have shape [N, 4], got {tuple(boxes.shape)}")
    if scores.shape != boxes.shape[:1]:
        raise ValueError(f"scores must have shape [{boxes.shape[0]}], got {tuple(scores.shape)}")


def batched_nms(
    boxes: Tensor,
    scores: Tensor,
    idxs: Tensor,
    iou_threshold: float,
    backend: str = "auto",
) -> Tensor:
    """Class-aware NMS: boxes of different ``idxs`` never suppress each other.

    Args:
        boxes: ``[N, 4]`` xyxy.
        scores: ``[N]``.
        idxs: ``[N]`` integer class (or image) ids.
        iou_threshold: boxes overlapping a kept box with IoU strictly above it are dropped.
        backend: "torch" (pure PyTorch), "torchvision" (its compiled NMS on coordinates shifted
            apart per class; may differ from "torch" on IoUs within float rounding of the
            threshold) or "auto" (torchvision for CUDA tensors when it works, else torch).

    Returns:
        int64 ``[K]`` indices of kept boxes, in descending score order; identical to running
        :func:`nms` per class and merging by score.
    """
    _check(boxes, scores)
    if idxs.shape != scores.shape:
        raise ValueError(f"idxs must have shape {tuple(scores.shape)}, got {tuple(idxs.shape)}")
    use_torchvision = _use_torchvision(boxes, backend)
    if boxes.shape[0] == 0:
        return torch.empty(0, dtype=torch.int64, device=boxes.device)
    if use_torchvision:
        return _batched_nms_torchvision(boxes, scores, idxs, iou_threshold)
    return _batched_nms_torch(boxes, scores, idxs, iou_threshold)


def nms(boxes: Tensor, scores: Tensor, iou_threshold: float, backend: str = "auto") -> Tensor:
    """Greedy NMS of ``boxes[N, 4]`` (xyxy) with ``scores[N]`` -> int64 ``[K]`` kept indices.

    Indices are in descending score order; a box is dropped when a kept higher-scoring box
    overlaps it with IoU strictly greater than ``iou_threshold``. ``backend`` as in
    :func:`batched_nms`.
    """
    _check(boxes, scores)
    use_torchvision = _use_torchvision(boxes, backend)
    if boxes.shape[0] == 0:
        return torch.empty(0, dtype=torch.int64, device=boxes.device)
    if use_torchvision:
        tv_nms = _torchvision_nms()
        assert tv_nms is not None
        return tv_nms(boxes, scores, iou_threshold)
    classes = torch.zeros(boxes.shape[0], dtype=torch.int64, device=boxes.device)
    return _batched_nms_torch(boxes, scores, classes, iou_threshold)
