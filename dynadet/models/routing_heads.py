"""Fine-Grained Dynamic Head towers for any dense head (ATSS, RetinaNet, FCOS).

The reference code only routes FCOS; the routing towers do not depend on what the head
predicts, so :class:`RoutingTowersMixin` swaps the conv towers of any
:class:`~dynadet.models.dense_head.TowerHead` for two
:class:`~dynadet.models.routing.RoutingTower` s (classification, regression) and adds the budget
loss and cost accounting. The predictors, assignment, losses and decoding stay the base head's.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

from torch import Tensor

from dynadet.models.atss import ATSSHead
from dynadet.models.retinanet import RetinaNetHead
from dynadet.models.routing import RoutingCost, RoutingTower, budget_loss
from dynadet.ops.masked_conv import DEFAULT_DENSE_THRESHOLD

__all__ = ["ATSSRoutingHead", "RetinaNetRoutingHead", "RoutingTowersMixin"]

def split_routing_kwargs(kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Separate the routing arguments (those of :meth:`RoutingTowersMixin.setup_routing`)
    from the base head's."""
    keys = set(inspect.signature(RoutingTowersMixin.setup_routing).parameters)
    keys -= {"self", "channels"}
    routing = {k: kwargs.pop(k) for k in list(kwargs) if k in keys}
    return routing, kwargs


def routing_signature(
    base_init: Callable[..., Any],
    drop: Sequence[str] = (),
    extra: Sequence[str] = (),
    defaults: dict[str, Any] | None = None,
) -> inspect.Signature:
    """The constructor signature of a routing head: ``base_init``'s parameters without ``drop``,
    then the routing arguments of :meth:`RoutingTowersMixin.setup_routing` (and the keyword-only
    ``extra`` names), so a config with a mistyped key gets "did you mean" like any module."""
    base = [p for name, p in inspect.signature(base_init).parameters.items()
            if name != "self" and name not in drop and p.kind is not p.VAR_KEYWORD]
    names = {p.name for p in base}
    defaults = defaults or {}
    routing = [p.replace(kind=p.KEYWORD_ONLY, default=defaults.get(name, p.default))
               for name, p in inspect.signature(RoutingTowersMixin.setup_routing).parameters.items()
               if name not in ("self", "channels") and name not in names]
    routing += [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=None) for n in extra]
    return inspect.Signature([*base, *routing])


class RoutingTowersMixin:
    """Mixed in before a :class:`TowerHead` subclass built with ``num_convs=0``.

    Adds ``cost_soft`` / ``cost_executed`` / ``cost_full`` (one-element lists of per-image
    ``Tensor[N]`` MACs) to the forward dict, ``loss_budget`` (dynamic towers, λ ≠ 0) and the
    logged ``complexity_ratio`` to the losses, and keeps the last forward's cost in
    ``last_cost``.
    """

    def setup_routing(
        self,
        channels: int,
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
    ) -> None:
        kw = {
            "channels": channels, "num_layers": num_layers, "dynamic": dynamic,
            "num_groups": num_groups, "tau": tau, "init_gate": init_gate, "gn_mode": gn_mode,
            "dense_threshold": dense_threshold, "count_unused_paths": count_unused_paths,
            "count_depthwise_twice": count_depthwise_twice, "train_gn_mode": train_gn_mode,
        }  # fmt: skip
        # Built after the base head's init, so the routing towers keep their own initialisation.
        self.cls_tower = RoutingTower(**kw)
        self.reg_tower = RoutingTower(**kw)
        self.dynamic = dynamic
        self.budget_loss_weight = float(budget_loss_weight)
        self.last_cost: RoutingCost | None = None

    def full_cost(self, sizes: Sequence[tuple[int, int]]) -> float:
        """Tower MACs per image with every gate open, for level sizes ``[(H_l, W_l), ...]``."""
        return self.cls_tower.full_cost(sizes) + self.reg_tower.full_cost(sizes)

    def forward(self, features: Sequence[Tensor]) -> dict[str, list[Tensor]]:
        cls_feats, cls_cost = self.cls_tower(features)
        reg_feats, reg_cost = self.reg_tower(features)
        cost = cls_cost + reg_cost
        self.last_cost = RoutingCost(cost.soft.detach(), cost.executed, cost.full)
        out = self.predictors(cls_feats, reg_feats)
        out["cost_soft"] = [cost.soft]
        out["cost_executed"] = [cost.executed]
        out["cost_full"] = [cost.full]
        return out

    def loss(
        self,
        outputs: dict[str, list[Tensor]],
        priors: list[Tensor],
        targets: Sequence[dict[str, Tensor]],
    ) -> dict[str, Tensor]:
        losses = super().loss(outputs, priors, targets)
        cost = RoutingCost(
            outputs["cost_soft"][0], outputs["cost_executed"][0], outputs["cost_full"][0]
        )
        if self.dynamic and self.budget_loss_weight != 0:
            losses["loss_budget"] = budget_loss(cost, self.budget_loss_weight)
        losses["complexity_ratio"] = (cost.executed / cost.full).mean().float()
        return losses


class ATSSRoutingHead(RoutingTowersMixin, ATSSHead):
    """ATSS with FGDH routing towers (``dynamic=True``) or the static Fix towers.

    Args: :class:`~dynadet.models.atss.ATSSHead`'s (``num_convs``/``norm``/``feat_channels`` do
    not apply: the towers are ``num_layers`` routing layers of width ``in_channels``) plus
    ``num_layers``, ``dynamic``, ``budget_loss_weight``, ``tau``, ``init_gate``, ``num_groups``,
    ``gn_mode``, ``dense_threshold``, ``count_unused_paths``, ``count_depthwise_twice``,
    ``train_gn_mode`` (see :class:`~dynadet.models.routing.RoutingTower`).

    Shapes: as :class:`ATSSHead`, plus the cost entries of :class:`RoutingTowersMixin`.
    """

    def __init__(self, num_classes: int, anchor_generator, in_channels: int = 256, **kwargs):
        routing, rest = split_routing_kwargs(dict(kwargs))
        rest.update(num_convs=0, feat_channels=in_channels)
        ATSSHead.__init__(self, num_classes, anchor_generator, in_channels=in_channels, **rest)
        self.setup_routing(in_channels, **routing)


class RetinaNetRoutingHead(RoutingTowersMixin, RetinaNetHead):
    """RetinaNet with FGDH routing towers or Fix towers; arguments as :class:`ATSSRoutingHead`,
    plus ``dynamic_stats`` (a :class:`~dynadet.models.dynamic_stats.DynamicTrainingStats`:
    RetinaNet's ``dynamic`` argument, renamed because ``dynamic`` here selects routing).

    Shapes: as :class:`RetinaNetHead`, plus the cost entries of :class:`RoutingTowersMixin`.
    """

    def __init__(self, num_classes: int, anchor_generator, in_channels: int = 256, **kwargs):
        stats = kwargs.pop("dynamic_stats", None)
        routing, rest = split_routing_kwargs(dict(kwargs))
        rest.update(num_convs=0, feat_channels=in_channels, dynamic=stats)
        RetinaNetHead.__init__(self, num_classes, anchor_generator, in_channels=in_channels, **rest)
        self.setup_routing(in_channels, **routing)


# Tower arguments of the base heads do not apply: the towers are routing layers of the input width.
_TOWER_ARGS = ("feat_channels", "num_convs", "norm", "conv_bias")
ATSSRoutingHead.__signature__ = routing_signature(ATSSHead.__init__, _TOWER_ARGS)
RetinaNetRoutingHead.__signature__ = routing_signature(
    RetinaNetHead.__init__, (*_TOWER_ARGS, "dynamic"), extra=("dynamic_stats",)
)
