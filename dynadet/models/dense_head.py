"""Building blocks shared by the dense heads (FCOS, ATSS, RetinaNet).

The towers, predictors and the test-time selection live here; each head adds its own
assignment, losses and box decoding.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from dynadet.models.norm import build_norm
from dynadet.models.precision import prior_dtype
from dynadet.models.priors import AnchorGenerator
from dynadet.ops.boxes import clip_boxes
from dynadet.ops.losses import sigmoid_focal_loss
from dynadet.ops.nms import batched_nms


class Scale(nn.Module):
    """A learnable scalar multiplier (one per FPN level on the regression branch)."""

    def __init__(self, init: float = 1.0) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(float(init)))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale


class ConvNormAct(nn.Module):
    """3×3 conv → optional norm → ReLU. Keys: ``conv.*`` and, with a norm, ``norm.*``."""

    def __init__(
        self, in_channels: int, out_channels: int, norm: str = "none", bias: bool | None = None
    ) -> None:
        super().__init__()
        bias = norm == "none" if bias is None else bias
        self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=bias)
        self.norm = build_norm(norm, out_channels)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.norm(self.conv(x)))


def conv_tower(
    in_channels: int, channels: int, num_convs: int, norm: str, bias: bool | None
) -> nn.Sequential:
    """``num_convs`` × :class:`ConvNormAct` (an empty tower is the identity)."""
    layers = [
        ConvNormAct(in_channels if i == 0 else channels, channels, norm, bias)
        for i in range(num_convs)
    ]
    return nn.Sequential(*layers)


def flatten_level(x: Tensor, k: int) -> Tensor:
    """``[N, A·k, H, W]`` → ``[N, H·W·A, k]`` (location-major, anchors fastest)."""
    n, _, h, w = x.shape
    return x.view(n, -1, k, h, w).permute(0, 3, 4, 1, 2).reshape(n, -1, k)


def reduce_mean(x: Tensor) -> Tensor:
    """Mean over distributed ranks (identity in a single process)."""
    if dist.is_available() and dist.is_initialized():
        x = x.clone()
        dist.all_reduce(x)
        x = x / dist.get_world_size()
    return x


class TowerHead(nn.Module):
    """Two conv towers (classification, regression) shared across levels, with predictors.

    Args:
        num_classes: foreground classes ``C``.
        in_channels: channels of each input level.
        feat_channels: tower width.
        num_convs: convs per tower (0 for DyHead's ATSS, which has its towers in the neck).
        norm: tower norm, ``"none"`` or ``"gn"`` (GroupNorm 32).
        conv_bias: bias in tower convs (``None``: only without a norm).
        num_anchors: priors per location ``A``.
        box_dim: regression outputs per prior (4).
        centerness: add a centerness predictor (on the regression tower, or on the
            classification tower with ``centerness_on_reg=False``).
        num_levels / use_scales: per-level learnable :class:`Scale` on the regression output.
        pred_kernel_size: predictor kernel (3, or 1 for DyHead's ATSS).
        prior_prob: initial foreground probability; the class bias is ``-log((1-p)/p)``.

    Shapes:
        ``forward(features: list[Tensor[N, in_channels, H_l, W_l]])`` → dict with lists over levels
        of ``cls: Tensor[N, A·C, H_l, W_l]``, ``reg: Tensor[N, A·4, H_l, W_l]`` (scaled) and,
        with centerness, ``ctr: Tensor[N, A, H_l, W_l]``.
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
        centerness: bool = False,
        centerness_on_reg: bool = True,
        use_scales: bool = False,
        pred_kernel_size: int = 3,
        prior_prob: float = 0.01,
        score_thresh: float = 0.05,
        nms_pre: int = 1000,
        nms_thresh: float = 0.5,
        max_per_img: int = 100,
        min_box_size: float | None = None,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.anchor_generator = anchor_generator
        self.num_anchors = anchor_generator.num_anchors
        self.centerness_on_reg = centerness_on_reg
        self.score_thresh = score_thresh
        self.nms_pre = nms_pre
        self.nms_thresh = nms_thresh
        self.max_per_img = max_per_img
        self.min_box_size = min_box_size

        self.cls_tower = conv_tower(in_channels, feat_channels, num_convs, norm, conv_bias)
        self.reg_tower = conv_tower(in_channels, feat_channels, num_convs, norm, conv_bias)
        pred_in = feat_channels if num_convs > 0 else in_channels
        pad = pred_kernel_size // 2
        a = self.num_anchors
        self.cls_logits = nn.Conv2d(pred_in, a * num_classes, pred_kernel_size, padding=pad)
        self.bbox_pred = nn.Conv2d(pred_in, a * 4, pred_kernel_size, padding=pad)
        self.centerness = (
            nn.Conv2d(pred_in, a, pred_kernel_size, padding=pad) if centerness else None
        )
        num_levels = len(anchor_generator.strides)
        self.scales = nn.ModuleList(Scale() for _ in range(num_levels)) if use_scales else None
        self._init_weights(prior_prob)

    def _init_weights(self, prior_prob: float) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.constant_(self.cls_logits.bias, -math.log((1 - prior_prob) / prior_prob))

    def forward(self, features: Sequence[Tensor]) -> dict[str, list[Tensor]]:
        cls_feats = [self.cls_tower(x) for x in features]
        reg_feats = [self.reg_tower(x) for x in features]
        return self.predictors(cls_feats, reg_feats)

    def predictors(
        self, cls_feats: Sequence[Tensor], reg_feats: Sequence[Tensor]
    ) -> dict[str, list[Tensor]]:
        """The prediction convs on per-level tower outputs → the ``forward`` dict."""
        out: dict[str, list[Tensor]] = {"cls": [], "reg": []}
        if self.centerness is not None:
            out["ctr"] = []
        for level, (cls_feat, reg_feat) in enumerate(zip(cls_feats, reg_feats, strict=True)):
            out["cls"].append(self.cls_logits(cls_feat))
            reg = self.bbox_pred(reg_feat)
            if self.scales is not None:
                reg = self.scales[level](reg)
            out["reg"].append(reg)
            if self.centerness is not None:
                out["ctr"].append(self.centerness(reg_feat if self.centerness_on_reg else cls_feat))
        return out

    def priors(self, features: Sequence[Tensor], batch_shape: tuple[int, int]) -> list[Tensor]:
        """Per-level prior boxes ``Tensor[H_l·W_l·A, 4]`` for a padded batch of ``batch_shape``."""
        sizes = [tuple(f.shape[-2:]) for f in features]
        dtype = prior_dtype(features[0].dtype)
        return self.anchor_generator(sizes, batch_shape, dtype, features[0].device)

    def select(
        self,
        scores: Sequence[Tensor],
        boxes: Sequence[Tensor],
        image_sizes: Sequence[tuple[int, int]],
        factors: Sequence[Tensor] | None = None,
        gates: Sequence[Tensor] | None = None,
    ) -> list[dict[str, Tensor]]:
        """Test-time selection shared by the dense heads.

        Per level, the top ``nms_pre`` (prior, class) pairs whose score exceeds ``score_thresh``
        (the same set as "threshold, then top-k"); optional per-prior ``factors`` (centerness)
        multiply the selected scores afterwards (MMDetection 3.x); boxes are clipped to the
        image, then class-aware NMS and the ``max_per_img`` cut.

        Args:
            scores: per level ``Tensor[N, M_l, C]`` probabilities used for ranking.
            boxes: per level ``Tensor[N, M_l, 4]`` decoded boxes (padded-input coordinates).
            image_sizes: ``(h, w)`` of each resized image inside the padded batch.
            factors: per level ``Tensor[N, M_l]`` multipliers, or ``None``.
            gates: per level ``Tensor[N, M_l, C]`` scores that must exceed ``score_thresh``
                instead of ``scores`` (DyHead's official ATSS: threshold the class probability,
                rank by class × centerness), or ``None``.

        Returns:
            one dict per image with ``boxes [K, 4]``, ``scores [K]``, ``labels [K]``.
        """
        c = self.num_classes
        all_scores, all_boxes, all_labels, all_valid = [], [], [], []
        for level, (s, b) in enumerate(zip(scores, boxes, strict=True)):
            flat = s.flatten(1)
            k = min(self.nms_pre, flat.shape[1])
            if gates is None:
                top, idx = flat.topk(k, dim=1)
                valid = top > self.score_thresh
            else:
                passed = gates[level].flatten(1) > self.score_thresh
                top, idx = flat.masked_fill(~passed, -1.0).topk(k, dim=1)
                valid = passed.gather(1, idx)
            prior = idx // c
            all_labels.append(idx % c)
            all_valid.append(valid)
            if factors is not None:
                top = top * factors[level].gather(1, prior)
            all_scores.append(top)
            all_boxes.append(b.gather(1, prior[..., None].expand(-1, -1, 4)))
        scores_cat = torch.cat(all_scores, 1)
        boxes_cat = torch.cat(all_boxes, 1)
        labels_cat = torch.cat(all_labels, 1)
        valid_cat = torch.cat(all_valid, 1)
        results = []
        for i, size in enumerate(image_sizes):
            keep = valid_cat[i]
            bx = clip_boxes(boxes_cat[i][keep], size)
            sc, lb = scores_cat[i][keep], labels_cat[i][keep]
            if self.min_box_size is not None:
                wh = bx[:, 2:] - bx[:, :2]
                ok = (wh > self.min_box_size).all(dim=1)
                bx, sc, lb = bx[ok], sc[ok], lb[ok]
            kept = batched_nms(bx, sc, lb, self.nms_thresh)[: self.max_per_img]
            results.append({"boxes": bx[kept], "scores": sc[kept], "labels": lb[kept]})
        return results


def dense_targets(
    cls: Tensor,
    targets: Sequence[dict[str, Tensor]],
    assign: Callable[[Tensor], Tensor],
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-image assignment → one-hot class targets, foreground mask and matched boxes.

    Args:
        cls: ``Tensor[N, M, C]`` class logits (for shape and dtype).
        targets: per image ``boxes [G, 4]`` and ``labels [G]``.
        assign: ``boxes [G, 4] → LongTensor[M]`` box index per prior, negative for background.

    Returns:
        ``cls_target [N, M, C]``, ``fg_mask [N, M]`` and ``gt_boxes [N, M, 4]`` (the matched box of
        each prior; zeros where there is none).
    """
    cls_target = torch.zeros_like(cls)
    fg_masks, boxes = [], []
    for i, t in enumerate(targets):
        matched = assign(t["boxes"])
        fg = matched >= 0
        cls_target[i, fg, t["labels"][matched[fg]]] = 1.0
        fg_masks.append(fg)
        if t["boxes"].numel():
            boxes.append(t["boxes"][matched.clamp(min=0)])
        else:
            boxes.append(cls.new_zeros(matched.shape[0], 4))
    return cls_target, torch.stack(fg_masks), torch.stack(boxes)


def centerness_losses(
    cls: Tensor,
    cls_target: Tensor,
    fg_mask: Tensor,
    per_box: Tensor,
    ctr_logits: Tensor,
    ctr_target: Tensor,
    focal_alpha: float,
    focal_gamma: float,
    weight_by_centerness: bool,
    min_centerness_sum: float,
) -> dict[str, Tensor]:
    """Focal, box and centerness losses of FCOS/ATSS-style heads.

    Args:
        cls, cls_target: ``Tensor[N, M, C]`` logits and one-hot targets.
        fg_mask: ``Tensor[N, M]`` foreground priors (``P`` of them).
        per_box: ``Tensor[P]`` box loss of each positive (GIoU or IoU loss).
        ctr_logits, ctr_target: ``Tensor[P]`` centerness logits and targets of the positives.
        weight_by_centerness: weight the box loss by the centerness target and divide by its
            sum (MMDetection; clamped below at ``min_centerness_sum``) rather than by the number
            of positives (torchvision).

    Normalisers are averaged over distributed ranks, so DDP gradients equal a single process's.
    """
    num_pos = reduce_mean(fg_mask.sum().to(cls.dtype)).clamp(min=1.0)
    loss_cls = sigmoid_focal_loss(cls, cls_target, focal_alpha, focal_gamma, reduction="sum")
    if weight_by_centerness:
        denom = reduce_mean(ctr_target.sum().detach()).clamp(min=min_centerness_sum)
        loss_box = (per_box * ctr_target).sum() / denom
    else:
        loss_box = per_box.sum() / num_pos
    loss_ctr = F.binary_cross_entropy_with_logits(ctr_logits, ctr_target, reduction="sum")
    return {"loss_cls": loss_cls / num_pos, "loss_box": loss_box, "loss_ctr": loss_ctr / num_pos}


def concat_levels(outputs: Sequence[Tensor], k: int) -> Tensor:
    """Flatten each level to ``[N, M_l, k]`` and concatenate to ``[N, M, k]``."""
    return torch.cat([flatten_level(x, k) for x in outputs], dim=1)


