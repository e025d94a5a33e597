"""FCOS with Fine-Grained Dynamic Head towers (FGDH, NeurIPS 2020) or the static Fix towers.

The FCOS conv towers are replaced by two :class:`~dynadet.models.routing.RoutingTower` s
(classification and regression, each shared by all levels); the predictors, assignment, losses
and decoding are :class:`~dynadet.models.fcos.FCOSHead`'s. The head adds the budget loss
``λ · mean(soft / full)`` (dynamic towers with ``budget_loss_weight != 0``, as the reference)
and logs ``complexity_ratio`` = mean executed / full cost.

Reference checkpoint keys (cvpods ``FCOSDynamicHead`` / ``FCOSFixHead``) map by
:func:`rename_reference_head_key`: ``head.cls_subnet.{i}.*`` → ``head.cls_tower.layers.{i}.*``,
``head.bbox_subnet.{i}.*`` → ``head.reg_tower.layers.{i}.*`` (inner names per
:data:`~dynadet.models.routing.REFERENCE_RENAMES`), ``head.cls_score.*`` → ``head.cls_logits.*``;
``bbox_pred``, ``centerness`` and ``scales.{l}.scale`` are unchanged.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from dynadet.models.fcos import DEFAULT_RANGES, FCOSHead
from dynadet.models.priors import AnchorGenerator
from dynadet.models.routing import rename_reference_key
from dynadet.models.routing_heads import RoutingTowersMixin
from dynadet.ops.masked_conv import DEFAULT_DENSE_THRESHOLD

__all__ = ["FCOSRoutingHead", "rename_reference_head_key"]

_TOWERS = {"cls_subnet": "cls_tower", "bbox_subnet": "reg_tower"}


def rename_reference_head_key(key: str) -> str:
    """A cvpods FGDH/Fix head key (``head.…``, or without the prefix) → the dynadet key."""
    prefix = "head." if key.startswith("head.") else ""
    rest = key[len(prefix):]
    match = re.match(r"^(cls_subnet|bbox_subnet)\.(\d+)\.(.*)$", rest)
    if match:
        tower, layer, inner = match.groups()
        return f"{prefix}{_TOWERS[tower]}.layers.{layer}.{rename_reference_key(inner)}"
    if rest.startswith("cls_score."):
        return prefix + "cls_logits." + rest[len("cls_score."):]
    return key


class FCOSRoutingHead(RoutingTowersMixin, FCOSHead):
    """FCOS head whose towers are FGDH routing towers (``dynamic=True``) or Fix towers.

    Args (beyond :class:`~dynadet.models.fcos.FCOSHead`, whose conv-tower arguments do not apply):
        num_layers: routing layers per tower (the README's depth: D4 → 4, D8 → 8).
        dynamic: gated routing or the static Fix head.
        budget_loss_weight: λ of the budget loss (0 "High", 0.1 "Mid", 0.8 "Low").
        tau, init_gate, num_groups, gn_mode, dense_threshold, count_unused_paths,
            count_depthwise_twice, train_gn_mode: see :class:`~dynadet.models.routing.RoutingTower`.

    Shapes:
        ``forward(features: list[Tensor[N, C, H_l, W_l]])`` → FCOSHead's dict (``cls``, ``reg``,
        ``ctr`` lists over levels) plus ``cost_soft``, ``cost_executed``, ``cost_full`` (each a
        one-element list holding a per-image ``Tensor[N]`` of tower MACs). The last forward's cost
        (detached) is kept in ``last_cost`` for reporting (README "FLOPs" = MACs / 2^30).
    """

    def __init__(
        self,
        num_classes: int,
        anchor_generator: AnchorGenerator,
        in_channels: int = 256,
        num_layers: int = 4,
        dynamic: bool = True,
        budget_loss_weight: float = 0.0,
        tau: float = 1.5,
        init_gate: float = 0.99,
        num_groups: int = 32,
        gn_mode: str = "masked",
        dense_threshold: float = DEFAULT_DENSE_THRESHOLD,
        count_unused_paths: bool = True,
        count_depthwise_twice: bool = True,
        train_gn_mode: str = "dense",
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
        scoring: str = "sqrt",
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
            feat_channels=in_channels,
            num_convs=0,
            centerness_on_reg=centerness_on_reg,
            use_scales=use_scales,
            regress_ranges=regress_ranges,
            range_inclusive=range_inclusive,
            center_sampling_radius=center_sampling_radius,
            norm_on_bbox=norm_on_bbox,
            box_loss=box_loss,
            box_loss_weight=box_loss_weight,
            centerness_weighted=centerness_weighted,
            focal_alpha=focal_alpha,
            focal_gamma=focal_gamma,
            scoring=scoring,
            score_thresh=score_thresh,
            nms_pre=nms_pre,
            nms_thresh=nms_thresh,
            max_per_img=max_per_img,
            min_box_size=min_box_size,
            prior_prob=prior_prob,
        )
        self.setup_routing(
            in_channels, num_layers=num_layers, dynamic=dynamic,
            budget_loss_weight=budget_loss_weight, tau=tau, init_gate=init_gate,
            num_groups=num_groups, gn_mode=gn_mode, dense_threshold=dense_threshold,
            count_unused_paths=count_unused_paths, count_depthwise_twice=count_depthwise_twice,
            train_gn_mode=train_gn_mode,
        )  # fmt: skip
