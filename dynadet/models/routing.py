"""Fine-grained dynamic routing towers (Song et al., "Fine-Grained Dynamic Head for Object
Detection", NeurIPS 2020) and their static "Fix" counterparts.

A tower is ``D`` routing layers shared by all pyramid levels. Layer ``i`` maps the level maps
``X_l`` (``l = 0`` is the finest) to ``Z_l``:

* two depthwise scale paths, computed at the *source* level:
  ``S^s_l = G_s(X_l) · GN(DWConv3×3_s(X_l))`` — path 0 carries level ``l−1`` down to ``l``
  (finer → coarser), path 1 carries level ``l+1`` up to ``l``;
* ``Y_l = output_weight · X_l + scale_weight · (R_l(S^0_{l−1}) + R_l(S^1_{l+1}))`` with ``R_l``
  bilinear resizing (``align_corners=True``) to the exact size of level ``l``; missing sources
  are dropped; ``scale_weight`` starts at 0 and ``output_weight`` at 1;
* a gated residual depth path:
  ``Z_l = ReLU(Y_l + G_d(Y_l) · GN(Conv3×3(ReLU(GN(Conv3×3(Y_l))))))`` (convs without bias).

Each gate ``G`` is a 3×3 conv ``C → 1`` followed by GeReTanH (τ = 1.5), initialised open (0.99).
The Fix layers have the same topology without gates and without ``scale_weight``.

Inference. Gate zeros are exact, so in eval mode the depth path runs through
:func:`~dynadet.ops.masked_conv.masked_conv_gn`: conv1 on the gate mask dilated by 3×3, conv2 on
the gate mask, with GroupNorm statistics over those active pixels (``gn_mode="masked"``, as the
reference evaluated its released weights); ``gn_mode="dense"`` computes the training formula
instead. The scale paths stay dense (as in the reference: their GroupNorm statistics cover the
whole map, so they cannot skip closed pixels without changing the numbers; the gates decide the
masks and run everywhere). Without autograd the towers run channels-last, the depth paths of
all levels of a layer are one fused batch
(:func:`~dynadet.ops.masked_conv.masked_gated_residual_levels`), the two scale-path gates of a
level come from one two-channel conv, and temporaries are updated in place.

Training. The reference trains the depth path densely (``train_gn_mode="dense"``, default);
``train_gn_mode="masked"`` trains the inference formula itself, through the sparse path with
autograd — not the reference's training, but train and test then compute the same function and
a step costs less as the gates close (the quickstart uses it).

Cost accounting (per image, MACs; README "FLOPs" = MACs / 2^30 on the 32-padded input), every
forward returns a fresh :class:`RoutingCost` — nothing accumulates in the modules, so there is
no leak when the budget loss is off (the reference keeps its accumulator, with autograd history,
until the budget loss reads it). Unit costs per pixel with ``C`` channels:

* depth conv2: ``C·C·9 + C`` on the gate, conv1: the same on ``maxpool3×3(gate)``;
* each scale path: ``C·2·9 + C`` on its gate (the reference counts the depthwise MACs twice —
  ``count_depthwise_twice``) at every level, including the two whose output is discarded (path 1
  on the finest, path 0 on the coarsest level — ``count_unused_paths``; their gate is computed,
  their depthwise conv is skipped);
* gate convs, resizes and additions are not counted.

``soft`` uses the gate values (live for the depth path, detached for the scale paths, so the
budget loss pushes the depth gates only — through their inputs it also reaches the layers
upstream, as in the reference), ``executed`` counts gates ``> 0``, ``full`` every pixel.
The budget loss is ``λ · mean_n(soft_n / full_n)`` (:func:`budget_loss`).

Checkpoint keys. Inside a tower, reference cvpods keys (``head.cls_subnet.`` / ``head.bbox_subnet.``
followed by a layer index, see :data:`REFERENCE_RENAMES`) map 1:1 to ours:

=================================================  =================================
reference (after ``head.{cls,bbox}_subnet.{i}.``)   dynadet (after ``layers.{i}.``)
=================================================  =================================
``scale_weight``, ``output_weight``                  same
``dynamic_convs.{s}.convs.0.{weight,bias}``          ``scale_paths.{s}.conv.*``
``dynamic_convs.{s}.convs.1.{weight,bias}``          ``scale_paths.{s}.norm.*``
``dynamic_convs.{s}.gate.gate_conv.{weight,bias}``   ``scale_paths.{s}.gate.conv.*``
``convs.{s}.0.*`` / ``convs.{s}.1.*`` (Fix)          ``scale_paths.{s}.conv.*`` / ``.norm.*``
``depth_module.bottleneck.conv{1,2}.weight``         ``depth.conv{1,2}.weight``
``depth_module.bottleneck.conv{1,2}.norm.*``         ``depth.conv{1,2}.norm.*``
``depth_module.gate.gate_conv.*``                    ``depth.gate.conv.*``
=================================================  =================================

``s = 0`` is the finer → coarser ("down") path and ``s = 1`` the coarser → finer ("up") path, in
both. Apply :func:`rename_reference_key` to the part after the tower prefix.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dynadet.ops.masked_conv import (
    DEFAULT_DENSE_THRESHOLD,
    GN_MODES,
    MaskedConvGN,
    masked_gated_residual,
    masked_gated_residual_levels,
)
from dynadet.ops.narrow_conv import narrow_conv2d

__all__ = [
    "REFERENCE_RENAMES",
    "GatedResidualBlock",
    "RoutingCost",
    "RoutingLayer",
    "RoutingTower",
    "ScalePath",
    "SpatialGate",
    "budget_loss",
    "gate_init_bias",
    "geretanh",
    "paired_gates",
    "rename_reference_key",
]

# Regex renames from a reference key (after the tower/layer prefix) to a dynadet key.
REFERENCE_RENAMES: tuple[tuple[str, str], ...] = (
    (r"^dynamic_convs\.(\d+)\.convs\.0\.", r"scale_paths.\1.conv."),
    (r"^dynamic_convs\.(\d+)\.convs\.1\.", r"scale_paths.\1.norm."),
    (r"^dynamic_convs\.(\d+)\.gate\.gate_conv\.", r"scale_paths.\1.gate.conv."),
    (r"^convs\.(\d+)\.0\.", r"scale_paths.\1.conv."),
    (r"^convs\.(\d+)\.1\.", r"scale_paths.\1.norm."),
    (r"^depth_module\.bottleneck\.", r"depth."),
    (r"^depth_module\.gate\.gate_conv\.", r"depth.gate.conv."),
)


def rename_reference_key(key: str) -> str:
    """A reference layer key (e.g. ``dynamic_convs.1.gate.gate_conv.bias``) → dynadet's."""
    for pattern, repl in REFERENCE_RENAMES:
        new, count = re.subn(pattern, repl, key)
        if count:
            return new
    return key


def geretanh(x: Tensor, tau: float = 1.5) -> Tensor:
    """GeReTanH ``max(0, (tanh(x − τ) + tanh τ) / (1 + tanh τ))`` ∈ [0, 1).

    Zero (with zero gradient) exactly for ``x < 0``; slope ``1 − tanh τ`` just above 0.
    """
    t = math.tanh(tau)
    return ((torch.tanh(x - tau) + t) / (1 + t)).clamp(min=0)


def gate_init_bias(tau: float = 1.5, init_gate: float = 0.99) -> float:
    """Gate-conv bias with ``geretanh(bias, tau) == init_gate`` (3.822 for τ = 1.5, 0.99)."""
    return 0.5 * math.log((1 + init_gate * math.exp(2 * tau)) / (1 - init_gate))


class SpatialGate(nn.Module):
    """One gate value per pixel: ``geretanh(Conv3×3_{C→1}(x))``.

    ``forward(x [N, C, H, W]) → [N, 1, H, W]`` in [0, 1). Keys: ``conv.{weight,bias}``.
    """

    def __init__(self, channels: int, tau: float = 1.5, init_gate: float = 0.99) -> None:
        super().__init__()
        self.tau = tau
        self.conv = nn.Conv2d(channels, 1, 3, padding=1)
        nn.init.normal_(self.conv.weight, std=0.01)
        nn.init.constant_(self.conv.bias, gate_init_bias(tau, init_gate))

    def forward(self, x: Tensor) -> Tensor:
        # same numbers as self.conv(x), 6–7× faster on CPU for one output channel
        return self.activate(narrow_conv2d(x, self.conv.weight, self.conv.bias))

    def activate(self, logits: Tensor) -> Tensor:
        """Gate values from the conv's output ``[N, 1, H, W]``."""
        return geretanh(logits, self.tau)


def paired_gates(x: Tensor, first: SpatialGate, second: SpatialGate) -> tuple[Tensor, Tensor]:
    """``(first(x), second(x))`` from one two-channel conv: ``x`` is read once, not twice
    (the two scale paths of a level gate the same input). ``[N, C, H, W] → 2 × [N, 1, H, W]``."""
    weight = torch.cat([first.conv.weight, second.conv.weight])
    bias = torch.cat([first.conv.bias, second.conv.bias])
    logits = narrow_conv2d(x, weight, bias)
    return first.activate(logits[:, :1]), second.activate(logits[:, 1:])


@dataclass
class RoutingCost:
    """Per-image head cost in MACs: ``soft`` (gate-weighted, differentiable, ``[N]``),
    ``executed`` (gates > 0, float64 ``[N]``) and ``full`` (all gates open, float64 ``[N]``)."""

    soft: Tensor
    executed: Tensor
    full: Tensor

    def __add__(self, other: RoutingCost) -> RoutingCost:
        return RoutingCost(
            self.soft + other.soft, self.executed + other.executed, self.full + other.full
        )

    @staticmethod
    def zeros(n: int, like: Tensor) -> RoutingCost:
        f64 = torch.zeros(n, dtype=torch.float64, device=like.device)
        return RoutingCost(like.new_zeros(n), f64, f64.clone())

    @staticmethod
    def of_gates(gates: Sequence[Tensor], unit: int, detach: bool) -> RoutingCost:
        """Cost of running ``unit`` MACs per pixel where each ``gate [N, 1, H_i, W_i]`` is open
        (a few ops for all the gates at once: inference calls this per layer)."""
        flat = torch.cat([g.flatten(1) for g in gates], 1)
        soft = (flat.detach() if detach else flat).sum(1) * unit
        executed = (flat > 0).sum(1).to(torch.float64) * unit
        full = torch.full_like(executed, float(flat.shape[1] * unit))
        return RoutingCost(soft, executed, full)

    @staticmethod
    def static(n: int, macs: float, like: Tensor) -> RoutingCost:
        """A gate-free cost: ``macs`` per image, executed and full alike (``soft`` too)."""
        f64 = torch.full((n,), float(macs), dtype=torch.float64, device=like.device)
        return RoutingCost(f64.to(like.dtype), f64, f64.clone())


def budget_loss(cost: RoutingCost, weight: float) -> Tensor:
    """``weight · mean_n(soft_n / full_n)`` — linear, no target, as in the reference."""
    return weight * (cost.soft / cost.full.to(cost.soft.dtype)).mean()


class ScalePath(nn.Module):
    """Depthwise 3×3 conv (with bias) → GroupNorm, times an optional spatial gate of the input.

    ``forward(x [N, C, H, W], compute=True, gate=None) → (feature [N, C, H, W] | None,
    gate [N, 1, H, W] | None)``; ``compute=False`` returns only the gate (for cost accounting of
    a discarded path); ``gate``: this path's gate of ``x`` when already computed
    (:func:`paired_gates`).
    Keys: ``conv.*``, ``norm.*`` and, when gated, ``gate.conv.*``.
    """

    def __init__(
        self, channels: int, num_groups: int = 32, gated: bool = True, **gate_kw: float
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1, groups=channels)
        self.norm = nn.GroupNorm(num_groups, channels)
        self.gate = SpatialGate(channels, **gate_kw) if gated else None
        nn.init.normal_(self.conv.weight, std=0.01)
        nn.init.zeros_(self.conv.bias)

    def forward(
        self, x: Tensor, compute: bool = True, gate: Tensor | None = None
    ) -> tuple[Tensor | None, Tensor | None]:
        if gate is None and self.gate is not None:
            gate = self.gate(x)
        if not compute:
            return None, gate
        feature = self.norm(self.conv(x))
        if gate is not None:  # in place without autograd: one full-map temporary less
            feature = feature * gate if torch.is_grad_enabled() else feature.mul_(gate)
        return feature, gate


class GatedResidualBlock(nn.Module):
    """``ReLU(y + gate(y) · GN(Conv(ReLU(GN(Conv(y))))))``; without a gate, a plain basic block.

    ``forward(y [N, C, H, W]) → (z [N, C, H, W], gate [N, 1, H, W] | None, dilated [N, 1, H, W]
    | None)``, ``dilated`` the gate's 3×3 max-pool (conv1's mask, and its cost). In eval mode
    with ``gn_mode="masked"`` the branch runs on the open pixels only (see module docstring).
    Keys: ``conv1.weight``, ``conv1.norm.*``, ``conv2.weight``, ``conv2.norm.*``, ``gate.conv.*``.
    """

    def __init__(
        self,
        channels: int,
        num_groups: int = 32,
        gated: bool = True,
        gn_mode: str = "masked",
        dense_threshold: float = DEFAULT_DENSE_THRESHOLD,
        train_gn_mode: str = "dense",
        **gate_kw: float,
    ) -> None:
        super().__init__()
        for name, mode in (("gn_mode", gn_mode), ("train_gn_mode", train_gn_mode)):
            if mode not in GN_MODES:
                raise ValueError(f"{name} must be one of {GN_MODES}, got {mode!r}")
        conv_kw = {"num_groups": num_groups, "dense_threshold": dense_threshold}
        self.conv1 = MaskedConvGN(channels, channels, relu=True, **conv_kw)
        self.conv2 = MaskedConvGN(channels, channels, relu=False, **conv_kw)
        self.gate = SpatialGate(channels, **gate_kw) if gated else None
        self.gn_mode = gn_mode
        self.train_gn_mode = train_gn_mode
        for conv in (self.conv1, self.conv2):
            nn.init.normal_(conv.weight, std=0.01)

    def forward(
        self,
        y: Tensor,
        owned: bool = False,
        gate: Tensor | None = None,
        dilated: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """``owned=True``: ``y`` is the caller's temporary, which inference may overwrite.
        ``gate``, ``dilated``: this block's gate of ``y`` and its max-pool, when computed."""
        inplace = not torch.is_grad_enabled()  # no autograd: temporaries updated in place
        if self.gate is None:
            branch = self.conv2(self.conv1(y))
            return (branch.add_(y).relu_() if inplace else F.relu(y + branch)), None, None
        if gate is None or dilated is None:
            gate, dilated = self._gate_and_dilated(y)
        if (self.train_gn_mode if self.training else self.gn_mode) == "dense":
            branch = self.conv2(self.conv1(y))
        else:
            fused = masked_gated_residual(
                y, gate, self.conv1, self.conv2, inplace=owned, dilated=dilated
            )
            if fused is not None:  # channels-last input at inference: no zero maps between
                return fused, gate, dilated
            hidden = self.conv1(y, dilated, "masked")
            branch = self.conv2(hidden, gate, "masked")
        if inplace:
            return branch.mul_(gate).add_(y).relu_(), gate, dilated
        return F.relu(y + branch * gate), gate, dilated

    def _gate_and_dilated(self, y: Tensor) -> tuple[Tensor, Tensor]:
        """The gate of ``y`` and its 3×3 max-pool: conv2 reads a 3×3 neighbourhood, so conv1
        must cover the dilated mask (the reference: ``max_pool2d(gate, 3, 1, 1)``, for
        execution and for cost)."""
        assert self.gate is not None
        gate = self.gate(y)
        return gate, F.max_pool2d(gate, 3, stride=1, padding=1)

    def forward_levels(
        self, ys: Sequence[Tensor], owned: bool = False
    ) -> list[tuple[Tensor, Tensor | None, Tensor | None]]:
        """:meth:`forward` of each level map (the block is shared across levels). In eval
        mode with ``gn_mode="masked"`` the sparse branches of all levels run as one batch
        (:func:`masked_gated_residual_levels`): same numbers, fewer and longer GEMMs."""
        if self.gate is None or self.training or self.gn_mode != "masked":
            return [self.forward(y, owned) for y in ys]
        gates, dilated = zip(*(self._gate_and_dilated(y) for y in ys), strict=True)
        fused = masked_gated_residual_levels(
            ys, gates, self.conv1, self.conv2, inplace=owned, dilated=dilated
        )
        if fused is None:
            fused = [None] * len(ys)
        return [
            (z, g, d) if z is not None else self.forward(y, owned, g, d)
            for y, z, g, d in zip(ys, fused, gates, dilated, strict=True)
        ]


class RoutingLayer(nn.Module):
    """One router per level: two scale paths, aggregation, and the gated residual depth path.

    ``forward(features: list[Tensor[N, C, H_l, W_l]]) → (list[Tensor[N, C, H_l, W_l]],
    RoutingCost)``. ``dynamic=False`` gives the static Fix layer (no gates, no
    ``scale_weight``; its cost is the full cost).
    """

    def __init__(
        self,
        channels: int = 256,
        dynamic: bool = True,
        num_groups: int = 32,
        tau: float = 1.5,
        init_gate: float = 0.99,
        gn_mode: str = "masked",
        dense_threshold: float = DEFAULT_DENSE_THRESHOLD,
        count_unused_paths: bool = True,
        count_depthwise_twice: bool = True,
        train_gn_mode: str = "dense",
    ) -> None:
        super().__init__()
        self.channels = channels
        self.dynamic = dynamic
        self.count_unused_paths = count_unused_paths
        gate_kw = {"tau": tau, "init_gate": init_gate}
        self.scale_paths = nn.ModuleList(
            ScalePath(channels, num_groups, gated=dynamic, **gate_kw) for _ in range(2)
        )
        self.depth = GatedResidualBlock(
            channels, num_groups, gated=dynamic, gn_mode=gn_mode,
            dense_threshold=dense_threshold, train_gn_mode=train_gn_mode, **gate_kw,
        )
        self.output_weight = nn.Parameter(torch.ones(1))
        self.scale_weight = nn.Parameter(torch.zeros(1)) if dynamic else None
        # For display (e.g. a gate overlay): keep the last forward's gates, detached.
        self.keep_gates = False
        self.last_gates: dict[str, list[Tensor | None]] | None = None
        c = channels
        self.depth_unit = c * c * 9 + c  # per conv; the norm counts one op per channel
        self.scale_unit = c * (2 if count_depthwise_twice else 1) * 9 + c

    def full_cost_per_pixel(self, num_levels: int) -> list[int]:
        """MACs per pixel of each level with every gate open (the Fix layer's static cost)."""
        per_level = []
        for level in range(num_levels):
            paths = 2
            if not self.count_unused_paths:
                paths = (level < num_levels - 1) + (level > 0)
            per_level.append(2 * self.depth_unit + paths * self.scale_unit)
        return per_level

    def full_cost(self, sizes: Sequence[tuple[int, int]]) -> int:
        """MACs per image with every gate open, for level sizes ``[(H_l, W_l), ...]``."""
        per_pixel = self.full_cost_per_pixel(len(sizes))
        return sum(p * h * w for p, (h, w) in zip(per_pixel, sizes, strict=True))

    def forward(self, features: Sequence[Tensor]) -> tuple[list[Tensor], RoutingCost]:
        num = len(features)
        n = features[0].shape[0]
        down: list[Tensor | None] = []
        up: list[Tensor | None] = []
        gates: dict[str, list[Tensor | None]] = {"down": [], "up": [], "depth": []}
        scale_gates: list[Tensor] = []
        first, second = (path.gate for path in self.scale_paths)
        for level, x in enumerate(features):
            wanted = [
                used or (self.dynamic and self.count_unused_paths)
                for used in (level < num - 1, level > 0)
            ]
            pair: tuple[Tensor | None, Tensor | None] = (None, None)
            if all(wanted) and first is not None and second is not None:
                pair = paired_gates(x, first, second)
            for s, (store, used) in enumerate(((down, level < num - 1), (up, level > 0))):
                if not wanted[s]:
                    store.append(None)
                    gates["down" if s == 0 else "up"].append(None)
                    continue
                feature, gate = self.scale_paths[s](x, compute=used, gate=pair[s])
                store.append(feature)
                gates["down" if s == 0 else "up"].append(gate)
                if gate is not None:
                    scale_gates.append(gate)

        ys = []
        for level, x in enumerate(features):
            size = x.shape[-2:]
            parts = []
            if level > 0:
                parts.append(_resize(down[level - 1], size))
            if level < num - 1:
                parts.append(_resize(up[level + 1], size))
            if not parts:
                y = x * self.output_weight
            elif torch.is_grad_enabled():
                agg = parts[0] if len(parts) == 1 else parts[0] + parts[1]
                y = x * self.output_weight + (
                    agg * self.scale_weight if self.scale_weight is not None else agg
                )
            else:
                # Inference: y = scale_weight · (R(down) + R(up)) + output_weight · x, built in
                # the resized (or, at equal size, scale-path) temporaries, each used only here.
                y = parts[0] if len(parts) == 1 else parts[0].add_(parts[1])
                if self.scale_weight is not None:
                    y.mul_(self.scale_weight)
                y.addcmul_(x, self.output_weight)
            ys.append(y)
        outputs = []
        depth_gates: list[Tensor] = []
        for z, gate, dilated in self.depth.forward_levels(ys, owned=True):
            outputs.append(z)
            gates["depth"].append(gate)
            if gate is not None:
                depth_gates += [gate, dilated]
        if self.dynamic:
            cost = RoutingCost.of_gates(depth_gates, self.depth_unit, detach=False)
            if scale_gates:  # none with a single level and unused paths not counted
                cost = cost + RoutingCost.of_gates(scale_gates, self.scale_unit, detach=True)
        else:
            macs = self.full_cost([tuple(f.shape[-2:]) for f in features])
            cost = RoutingCost.static(n, macs, features[0])
        if self.keep_gates:
            self.last_gates = {
                k: [g.detach() if g is not None else None for g in v] for k, v in gates.items()
            }
        return outputs, cost


def _resize(x: Tensor | None, size: torch.Size) -> Tensor:
    assert x is not None
    if x.shape[-2:] == size:
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=True)


class RoutingTower(nn.Module):
    """``num_layers`` :class:`RoutingLayer` s applied in sequence to all levels at once.

    ``forward(features: list[Tensor[N, C, H_l, W_l]]) → (list[Tensor[N, C, H_l, W_l]],
    RoutingCost)`` with the cost summed over layers and levels. Keys: ``layers.{i}.*``.
    A depth "D4" FGDH head has two towers of 4 layers (8 convs each); "D8" has 8 layers.

    Args:
        channels: width ``C`` of every level.
        num_layers: routing layers (the README's ``D``).
        dynamic: gated routing (True) or the static Fix tower (False).
        num_groups: GroupNorm groups.
        tau, init_gate: GeReTanH temperature and initial gate value.
        gn_mode: inference GroupNorm statistics of the depth path, ``"masked"`` (active pixels,
            the reference) or ``"dense"`` (whole map, = training).
        dense_threshold: active fraction above which the masked conv runs densely.
        count_unused_paths, count_depthwise_twice: reference cost-accounting conventions.
        train_gn_mode: the depth path in training. ``"dense"`` (the reference): both convs
            and GroupNorm over the whole map, times the gate. ``"masked"``: the inference
            formula of ``gn_mode="masked"`` — convs at open pixels only (sparse, with autograd)
            and GN over them — so training costs fall with the gates and train and test
            compute the same function. Not the reference's training; an option for low budgets.
    """

    def __init__(
        self,
        channels: int = 256,
        num_layers: int = 4,
        dynamic: bool = True,
        num_groups: int = 32,
        tau: float = 1.5,
        init_gate: float = 0.99,
        gn_mode: str = "masked",
        dense_threshold: float = DEFAULT_DENSE_THRESHOLD,
        count_unused_paths: bool = True,
        count_depthwise_twice: bool = True,
        train_gn_mode: str = "dense",
    ) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            RoutingLayer(
                channels, dynamic, num_groups, tau, init_gate, gn_mode, dense_threshold,
                count_unused_paths, count_depthwise_twice, train_gn_mode,
            )
            for _ in range(num_layers)
        )

    def full_cost(self, sizes: Sequence[tuple[int, int]]) -> float:
        """MACs per image with every gate open, for level sizes ``[(H_l, W_l), ...]``."""
        return float(sum(layer.full_cost(sizes) for layer in self.layers))

    def forward(self, features: Sequence[Tensor]) -> tuple[list[Tensor], RoutingCost]:
        feats = list(features)
        if not self.training:
            # Inference runs channels-last: the masked convs gather pixel rows, and the fused
            # depth path (masked_gated_residual) writes its rows straight into the output.
            feats = [f.contiguous(memory_format=torch.channels_last) for f in feats]
        cost = RoutingCost.zeros(feats[0].shape[0], feats[0])
        for layer in self.layers:
            feats, layer_cost = layer(feats)
            cost = cost + layer_cost
        return feats, cost
