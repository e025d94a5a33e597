"""Region Proposal Network (Ren et al., NeurIPS 2015) head of the two-stage detectors.

Also holds the two batch utilities the R-CNN head shares with it: the random positive /
negative subsampler and the per-image top-k of an NMS result.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dynadet.models.assigners import BACKGROUND, IGNORE, max_iou_assign
from dynadet.models.dense_head import flatten_level
from dynadet.models.precision import prior_dtype
from dynadet.models.priors import AnchorGenerator
from dynadet.ops.boxes import BoxCoder, box_iou
from dynadet.ops.losses import l1_loss, smooth_l1_loss
from dynadet.ops.nms import batched_nms


def _random_subset(candidates: Tensor, k: int, limit: Tensor | None = None) -> Tensor:
    """Uniformly random ``min(k, limit, #candidates)`` of the True entries along the last dim.

    ``candidates``: ``bool[..., A]``; ``limit``: ``[..., 1]`` per-row caps (a tensor, so no host
    sync). Returns ``bool[..., A]``.
    """
    k = min(k, candidates.shape[-1])
    if k <= 0:
        return torch.zeros_like(candidates)
    key = torch.rand(candidates.shape, device=candidates.device).masked_fill_(~candidates, -1.0)
    values, index = key.topk(k, dim=-1)
    keep = values >= 0  # rand() is in [0, 1): every candidate has a key >= 0
    if limit is not None:
        keep &= torch.arange(k, device=keep.device) < limit
    return torch.zeros_like(candidates).scatter_(-1, index, keep)


def sample_pos_neg(matched: Tensor, num: int, pos_fraction: float) -> tuple[Tensor, Tensor]:
    """Random subsample of positives and negatives (MMDetection ``RandomSampler``, torchvision
    ``BalancedPositiveNegativeSampler``).

    Per row of ``matched`` (``LongTensor[..., A]``: ``>= 0`` positive, ``-1`` negative, ``-2``
    ignored), at most ``int(num * pos_fraction)`` positives are drawn, then negatives fill the
    row up to ``num``. Returns the masks ``(pos, neg)``, ``bool[..., A]``.
    """
    pos = _random_subset(matched >= 0, int(num * pos_fraction))
    num_neg = num - pos.sum(dim=-1, keepdim=True)
    neg = _random_subset(matched == BACKGROUND, num, limit=num_neg)
    return pos, neg


def top_per_image(keep: Tensor, image_ids: Tensor, num_images: int, k: int) -> list[Tensor]:
    """Split score-ordered indices ``keep[K]`` by image, keeping the first ``k`` of each.

    ``image_ids[K]`` is the image of each kept index. Returns ``num_images`` index tensors,
    each in the order of ``keep`` (descending score for an NMS result).
    """
    order = torch.argsort(image_ids, stable=True)
    ids = image_ids[order]
    counts = torch.bincount(ids, minlength=num_images)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(ids.numel(), device=ids.device) - starts[ids]
    first = rank < k
    kept = keep[order[first]]
    sizes = torch.clamp(counts, max=k).tolist()  # the one host sync: list sizes
    return list(kept.split(sizes))


@dataclass(frozen=True)
class ProposalSettings:
    """How RPN outputs become proposals (one set for training, one for testing).

    Attributes:
        nms_pre: top-scoring anchors kept per level before NMS (``<= 0``: all).
        max_per_img: proposals kept per image after NMS.
        nms_thresh: IoU threshold of the NMS, run per level (boxes of different levels do not
            suppress each other, as in MMDetection, Detectron2 and torchvision).
        min_size: boxes whose width or height is not ``> min_size`` are dropped before NMS
            (MMDetection ``min_bbox_size=0``; torchvision's ``>= 1e-3`` is ``min_size=1e-3``).
    """

    nms_pre: int = 1000
    max_per_img: int = 1000
    nms_thresh: float = 0.7
    min_size: float = 0.0

    @classmethod
    def parse(cls, value: ProposalSettings | Mapping[str, float] | None) -> ProposalSettings:
        if value is None:
            return cls()
        if isinstance(value, ProposalSettings):
            return value
        unknown = sorted(set(value) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(
                f"unknown proposal setting(s) {unknown}; expected some of "
                f"{sorted(cls.__dataclass_fields__)}"
            )
        return cls(**value)


class RPNHead(nn.Module):
    """RPN: a shared 3×3 conv + ReLU, then 1×1 objectness (sigmoid) and 1×1 box deltas.

    Args:
        anchor_generator: ``A`` anchors per location (Faster R-CNN FPN: one size per level,
            8·stride, ratios 0.5/1/2).
        in_channels / feat_channels: input and shared-conv widths.
        pos_iou / neg_iou / min_pos_iou: max-IoU assignment (0.7 / 0.3, in between ignored);
            ``low_quality`` keeps each box's best anchors positive (``"mmdet"``: only if their
            IoU ``>= min_pos_iou``; ``"torchvision"``; ``"none"``).
        num_samples / pos_fraction: anchors sampled per image (256) and the positive share (0.5).
        box_loss: ``"l1"`` (MMDetection) or ``"smooth_l1"`` (torchvision / official Dynamic
            R-CNN, ``smooth_l1_beta=1/9``). Both losses are summed and divided by the number of
            sampled anchors of the batch.
        clamp_mode: delta clamp of the decoder (``"symmetric"``: MMDetection, ``"upper"``:
            torchvision).
        valid_region_divisor: in training, anchors at feature locations outside the image
            padded to a multiple of this are ignored (MMDetection's valid flags with the
            per-image ``pad_shape``); ``None`` uses every anchor of the padded batch
            (torchvision, Detectron2).
        train_proposals / test_proposals: :class:`ProposalSettings` (or mappings of its
            fields); the module's ``training`` flag picks one.

    Shapes:
        ``forward(features: list[Tensor[N, C, H_l, W_l]])`` → ``(objectness, deltas)``, lists
        over levels of ``Tensor[N, A, H_l, W_l]`` and ``Tensor[N, 4·A, H_l, W_l]`` (channel
        ``a·4 + k``). Anchors are flattened location-major, anchors fastest (``H_l·W_l·A``).
    """

    def __init__(
        self,
        anchor_generator: AnchorGenerator,
        in_channels: int = 256,
        feat_channels: int = 256,
        pos_iou: float = 0.7,
        neg_iou: float = 0.3,
        min_pos_iou: float = 0.3,
        low_quality: str = "mmdet",
        num_samples: int = 256,
        pos_fraction: float = 0.5,
        box_loss: str = "l1",
        smooth_l1_beta: float = 1.0 / 9,
        clamp_mode: str = "symmetric",
        valid_region_divisor: int | None = 32,
        train_proposals: ProposalSettings | Mapping[str, float] | None = None,
        test_proposals: ProposalSettings | Mapping[str, float] | None = None,
    ) -> None:
        super().__init__()
        if box_loss not in ("l1", "smooth_l1"):
            raise ValueError(f"box_loss must be 'l1' or 'smooth_l1', got {box_loss!r}")
        self.anchor_generator = anchor_generator
        self.num_anchors = anchor_generator.num_anchors
        self.pos_iou = pos_iou
        self.neg_iou = neg_iou
        self.min_pos_iou = min_pos_iou
        self.low_quality = low_quality
        self.num_samples = num_samples
        self.pos_fraction = pos_fraction
        self.box_loss = box_loss
        self.smooth_l1_beta = smooth_l1_beta
        self.box_coder = BoxCoder(clamp_mode=clamp_mode)
        self.valid_region_divisor = valid_region_divisor
        self.train_proposals = ProposalSettings.parse(
            train_proposals if train_proposals is not None else {"nms_pre": 2000}
        )
        self.test_proposals = ProposalSettings.parse(test_proposals)

        a = self.num_anchors
        self.conv = nn.Conv2d(in_channels, feat_channels, 3, padding=1)
        self.cls_logits = nn.Conv2d(feat_channels, a, 1)
        self.bbox_pred = nn.Conv2d(feat_channels, 4 * a, 1)
        for m in (self.conv, self.cls_logits, self.bbox_pred):
            nn.init.normal_(m.weight, std=0.01)
            nn.init.zeros_(m.bias)

    def forward(self, features: Sequence[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        objectness, deltas = [], []
        for x in features:
            t = F.relu(self.conv(x))
            objectness.append(self.cls_logits(t))
            deltas.append(self.bbox_pred(t))
        return objectness, deltas

    def anchors(self, features: Sequence[Tensor], batch_shape: tuple[int, int]) -> list[Tensor]:
        """Per-level anchors ``Tensor[H_l·W_l·A, 4]`` of a padded batch of ``batch_shape``."""
        sizes = [tuple(f.shape[-2:]) for f in features]
        dtype = prior_dtype(features[0].dtype)
        return self.anchor_generator(sizes, batch_shape, dtype, features[0].device)

    # ------------------------------------------------------------------ training targets
    def valid_anchors(
        self, features: Sequence[Tensor], image_sizes: Sequence[tuple[int, int]]
    ) -> Tensor | None:
        """``bool[N, M]``: anchors inside each image's padded region (None: all valid)."""
        d = self.valid_region_divisor
        if d is None:
            return None
        device = features[0].device
        pads = torch.tensor(
            [[-(-h // d) * d, -(-w // d) * d] for h, w in image_sizes], device=device
        )
        masks = []
        for f, stride in zip(features, self.anchor_generator.strides, strict=True):
            fh, fw = f.shape[-2:]
            # location y is valid iff y < ceil(pad_h / stride), i.e. y * stride < pad_h
            ys = torch.arange(fh, device=device) * stride
            xs = torch.arange(fw, device=device) * stride
            inside = (ys[None, :, None] < pads[:, 0, None, None]) & (
                xs[None, None, :] < pads[:, 1, None, None]
            )
            masks.append(inside[..., None].expand(-1, -1, -1, self.num_anchors).flatten(1))
        return torch.cat(masks, dim=1)

    def assign(
        self, anchors: Tensor, targets: Sequence[dict[str, Tensor]], valid: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        """Max-IoU assignment of ``anchors[M, 4]`` per image.

        Returns ``matched [N, M]`` (box index, -1 background, -2 ignored) and the matched box of
        every anchor ``[N, M, 4]`` (zeros where none).
        """
        matched_all, boxes_all = [], []
        for i, t in enumerate(targets):
            gt = t["boxes"].to(anchors.dtype)
            ious = box_iou(gt, anchors)
            if valid is not None:
                # invalid anchors take no part, not even in each box's best-anchor match
                ious = ious.masked_fill(~valid[i], -1.0)
            matched = max_iou_assign(
                ious, self.pos_iou, self.neg_iou, self.low_quality, self.min_pos_iou
            )
            if valid is not None:
                matched = matched.masked_fill(~valid[i], IGNORE)
            matched_all.append(matched)
            if gt.shape[0]:
                boxes_all.append(gt[matched.clamp(min=0)])
            else:
                boxes_all.append(anchors.new_zeros(anchors.shape))
        return torch.stack(matched_all), torch.stack(boxes_all)

    def loss(
        self,
        objectness: Sequence[Tensor],
        deltas: Sequence[Tensor],
        anchors: Sequence[Tensor],
        targets: Sequence[dict[str, Tensor]],
        image_sizes: Sequence[tuple[int, int]],
    ) -> dict[str, Tensor]:
        """``loss_rpn_cls`` (BCE) and ``loss_rpn_box`` over the sampled anchors."""
        logits = torch.cat([flatten_level(o, 1) for o in objectness], dim=1).squeeze(-1)
        reg = torch.cat([flatten_level(d, 4) for d in deltas], dim=1)
        all_anchors = torch.cat(list(anchors))
        valid = self.valid_anchors(objectness, image_sizes)
        with torch.no_grad():
            matched, gt_boxes = self.assign(all_anchors, targets, valid)
            pos, neg = sample_pos_neg(matched, self.num_samples, self.pos_fraction)
        sampled = pos | neg
        # MMDetection 2.x counts at least one positive and one negative per image
        num_sampled = (pos.sum(dim=1).clamp(min=1) + neg.sum(dim=1).clamp(min=1)).sum()
        num_sampled = num_sampled.to(logits.dtype)
        loss_cls = F.binary_cross_entropy_with_logits(
            logits[sampled], pos[sampled].to(logits.dtype), reduction="sum"
        )
        pos_anchors = all_anchors.expand(pos.shape[0], -1, -1)[pos]
        box_target = self.box_coder.encode(pos_anchors, gt_boxes[pos])
        if self.box_loss == "l1":
            loss_box = l1_loss(reg[pos], box_target, reduction="sum")
        else:
            loss_box = smooth_l1_loss(reg[pos], box_target, self.smooth_l1_beta, reduction="sum")
        return {"loss_rpn_cls": loss_cls / num_sampled, "loss_rpn_box": loss_box / num_sampled}

    # ------------------------------------------------------------------ proposals
    @torch.no_grad()
    def proposals(
        self,
        objectness: Sequence[Tensor],
        deltas: Sequence[Tensor],
        anchors: Sequence[Tensor],
        image_sizes: Sequence[tuple[int, int]],
    ) -> tuple[list[Tensor], list[Tensor]]:
        """Proposals per image: boxes ``Tensor[P_i, 4]`` (clipped, detached) and objectness
        probabilities ``Tensor[P_i]``, in descending score order.

        Per level the ``nms_pre`` best anchors are decoded and clipped, small boxes dropped,
        NMS runs per (image, level) in one batched call, and each image keeps its
        ``max_per_img`` best.
        """
        cfg = self.train_proposals if self.training else self.test_proposals
        num_images = objectness[0].shape[0]
        scores, boxes, levels = [], [], []
        for level, (o, d, a) in enumerate(zip(objectness, deltas, anchors, strict=True)):
            logits = flatten_level(o, 1).squeeze(-1)  # [N, M_l]
            k = logits.shape[1] if cfg.nms_pre <= 0 else min(cfg.nms_pre, logits.shape[1])
            top, idx = logits.topk(k, dim=1)
            reg = flatten_level(d, 4).gather(1, idx[..., None].expand(-1, -1, 4))
            boxes.append(self.box_coder.decode(reg, a[idx]))
            scores.append(top.sigmoid())
            levels.append(torch.full((k,), level, dtype=torch.long, device=top.device))
        scores_cat = torch.cat(scores, dim=1)  # [N, K]
        boxes_cat = torch.cat(boxes, dim=1)  # [N, K, 4]
        limits = boxes_cat.new_tensor([[w, h, w, h] for h, w in image_sizes])
        boxes_cat = torch.minimum(boxes_cat.clamp(min=0), limits[:, None, :])
        num_levels = len(levels)
        image_ids = torch.arange(num_images, device=scores_cat.device)[:, None].expand_as(
            scores_cat
        )
        group = image_ids * num_levels + torch.cat(levels)[None, :]

        wh = boxes_cat[..., 2:] - boxes_cat[..., :2]
        ok = (wh > cfg.min_size).all(dim=-1)
        flat_boxes, flat_scores = boxes_cat[ok], scores_cat[ok]
        flat_images, flat_group = image_ids[ok], group[ok]
        keep = batched_nms(flat_boxes, flat_scores, flat_group, cfg.nms_thresh)
        per_image = top_per_image(keep, flat_images[keep], num_images, cfg.max_per_img)
        return [flat_boxes[i] for i in per_image], [flat_scores[i] for i in per_image]
