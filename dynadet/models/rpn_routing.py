"""An RPN whose shared conv is a Fine-Grained Dynamic Head routing tower.

The reference routes only FCOS's towers; the RPN of Faster R-CNN has one shared 3×3 conv over
P2–P6 instead of two towers, so :class:`RPNRoutingHead` replaces that conv with one
:class:`~dynadet.models.routing.RoutingTower` (gated routing, or the static Fix tower) and
keeps the 1×1 objectness and box predictors, the assignment, the losses and the proposal
generation of :class:`~dynadet.models.rpn.RPNHead`. The tower's output goes through the RPN's
ReLU as the conv's did.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch.nn.functional as F
from torch import Tensor

from dynadet.models.routing import RoutingCost, RoutingTower, budget_loss
from dynadet.models.routing_heads import routing_signature, split_routing_kwargs
from dynadet.models.rpn import RPNHead

__all__ = ["RPNRoutingHead"]


class RPNRoutingHead(RPNHead):
    """:class:`RPNHead` with a routing tower instead of the shared conv.

    Args: :class:`RPNHead`'s (``feat_channels`` must equal ``in_channels``: the tower keeps the
    width) plus the routing arguments ``num_layers`` (1), ``dynamic`` (True),
    ``budget_loss_weight`` (λ), ``tau``, ``init_gate``, ``num_groups``, ``gn_mode``,
    ``dense_threshold``, ``count_unused_paths``, ``count_depthwise_twice``, ``train_gn_mode`` (see
    :class:`~dynadet.models.routing.RoutingTower`).

    Shapes: as :class:`RPNHead`. The last forward's per-image cost (``soft``/``executed``/
    ``full`` MACs, ``Tensor[N]``) is kept in ``last_cost``; in training, ``loss`` adds
    ``loss_rpn_budget`` (dynamic, λ ≠ 0) and the logged ``rpn_complexity_ratio``.
    """

    def __init__(self, anchor_generator, in_channels: int = 256, **kwargs: Any) -> None:
        routing, rest = split_routing_kwargs(dict(kwargs))
        if rest.setdefault("feat_channels", in_channels) != in_channels:
            raise ValueError("RPNRoutingHead keeps the width: feat_channels must be in_channels")
        super().__init__(anchor_generator, in_channels=in_channels, **rest)
        del self.conv
        routing.setdefault("num_layers", 1)
        self.dynamic = bool(routing.pop("dynamic", True))
        self.budget_loss_weight = float(routing.pop("budget_loss_weight", 0.0))
        self.tower = RoutingTower(in_channels, dynamic=self.dynamic, **routing)
        self.last_cost: RoutingCost | None = None
        self._cost: RoutingCost | None = None

    def full_cost(self, sizes: Sequence[tuple[int, int]]) -> float:
        """Tower MACs per image with every gate open, for level sizes ``[(H_l, W_l), ...]``."""
        return self.tower.full_cost(sizes)

    def forward(self, features: Sequence[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        feats, cost = self.tower(features)
        self.last_cost = RoutingCost(cost.soft.detach(), cost.executed, cost.full)
        # the live cost is kept only until this step's loss (a new forward replaces it)
        self._cost = cost if self.training else None
        objectness, deltas = [], []
        for x in feats:
            t = F.relu(x)
            objectness.append(self.cls_logits(t))
            deltas.append(self.bbox_pred(t))
        return objectness, deltas

    def loss(self, *args: Any, **kwargs: Any) -> dict[str, Tensor]:
        losses = super().loss(*args, **kwargs)
        cost, self._cost = self._cost, None
        if cost is None:
            raise RuntimeError("RPNRoutingHead.loss needs a training-mode forward first")
        if self.dynamic and self.budget_loss_weight != 0:
            losses["loss_rpn_budget"] = budget_loss(cost, self.budget_loss_weight)
        losses["rpn_complexity_ratio"] = (cost.executed / cost.full).mean().float()
        return losses


RPNRoutingHead.__signature__ = routing_signature(RPNHead.__init__, defaults={"num_layers": 1})
