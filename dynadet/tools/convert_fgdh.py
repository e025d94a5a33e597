"""Fine-Grained Dynamic Head (cvpods, ``StevenGrove/DynamicHead``) weights → dynadet checkpoints.

cvpods checkpoints are ``{"model": state_dict, ...}`` with ``backbone.*`` (detectron2 names, see
:mod:`dynadet.tools.convert_dyhead`; FPN P6 from C5, so ``top_block.p6`` takes 2048 channels) and
``head.*`` (key table: ``/work/shared/reference/fgdynamic.md`` §5). Head keys map by
:func:`~dynadet.models.fcos_routing.rename_reference_head_key` (towers, ``cls_score`` →
``cls_logits``); ``bbox_pred``, ``centerness`` keep their names and ``head.scales.{l}.scale``
goes from ``[1]`` to 0-d. The D2 baseline (``FCOSHead``) has plain towers:
``head.{cls,bbox}_subnet.{3i}`` (conv) / ``{3i+1}`` (GN) → ``head.{cls,reg}_tower.{i}.conv`` /
``.norm``.

Target configs: the seven README rows are packaged presets (``fgdh_r50_fcos_d2_1x`` …
``fgdh_r50_fcos_dynamic_d8_high_1x``), which :func:`fgdh_config` loads (cvpods names such as
``fcos.res50.1x.fix.d4`` are aliases). ``fgdh_config(name, from_spec=True)`` builds the same
configs in code from ``fcos_r50_fpn_1x`` with cvpods' differences (P6 from C5 with ReLU before
P7, points at ``x·s`` (offset 0), warm-up 1000 iterations, no GN weight decay, no gradient
clipping) and the head swapped for ``FCOSRoutingHead``; a test keeps the two equal.

Scoring note: cvpods keeps the top 1000 class scores per level, drops those ≤ 0.05 and reports
``sqrt(cls·ctr)``; the preset's ``scoring: mmdet`` selects the same candidates and reports
``cls·ctr`` — a monotonic change, so NMS, the top-100 cut and COCO AP are the same.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

from dynadet.config import list_presets, load_config
from dynadet.models.fcos_routing import rename_reference_head_key
from dynadet.tools.convert import ConversionError
from dynadet.tools.convert_dyhead import (
    Arch,
    Replacement,
    apply_rules,
    detectron2_backbone_inverse_rules,
    detectron2_backbone_rules,
    load_source_state,
    rename_state,
    save_converted,
)

__all__ = [
    "FGDH_ALIASES",
    "FGDH_ARCHS",
    "FGDHArch",
    "convert_fgdh_file",
    "convert_fgdh_official",
    "detect_fgdh_arch",
    "fgdh_config",
    "to_fgdh_official",
]


@dataclass(frozen=True)
class FGDHArch:
    """One README row: routing layers per tower (``None``: the plain D2 FCOS head), gated
    (dynamic) or static (Fix) towers, and the budget-loss weight λ."""

    num_layers: int | None
    dynamic: bool = False
    budget_loss_weight: float = 0.0


FGDH_ARCHS: dict[str, FGDHArch] = {
    "fgdh_r50_fcos_d2_1x": FGDHArch(None),
    "fgdh_r50_fcos_fix_d4_1x": FGDHArch(4),
    "fgdh_r50_fcos_fix_d8_1x": FGDHArch(8),
    "fgdh_r50_fcos_dynamic_d4_mid_1x": FGDHArch(4, True, 0.1),
    "fgdh_r50_fcos_dynamic_d8_low_1x": FGDHArch(8, True, 0.8),
    "fgdh_r50_fcos_dynamic_d8_mid_1x": FGDHArch(8, True, 0.1),
    "fgdh_r50_fcos_dynamic_d8_high_1x": FGDHArch(8, True, 0.0),
}
"""dynadet names of the seven README rows (D = 2 × layers per tower)."""

FGDH_ALIASES: dict[str, str] = {
    "fcos.res50.1x": "fgdh_r50_fcos_d2_1x",
    "fcos.res50.1x.fix.d4": "fgdh_r50_fcos_fix_d4_1x",
    "fcos.res50.1x.fix.d8": "fgdh_r50_fcos_fix_d8_1x",
    "fcos.res50.1x.dynamic.d4.lambda-0_1": "fgdh_r50_fcos_dynamic_d4_mid_1x",
    "fcos.res50.1x.dynamic.d8.lambda-0_8": "fgdh_r50_fcos_dynamic_d8_low_1x",
    "fcos.res50.1x.dynamic.d8.lambda-0_1": "fgdh_r50_fcos_dynamic_d8_mid_1x",
    "fcos.res50.1x.dynamic.d8.lambda-0": "fgdh_r50_fcos_dynamic_d8_high_1x",
}
"""The official cvpods project names (``cvpods_playground/<name>``) of the same rows."""


def fgdh_config(
    arch: str | Path | Mapping[str, Any], from_spec: bool = False
) -> dict[str, Any]:
    """The resolved config of an FGDH row (name or cvpods alias), preset, file or mapping.

    A row name or alias loads the packaged preset of that name (``dynadet/configs/<name>.yaml``).
    ``from_spec=True`` builds the row in code instead, from ``fcos_r50_fpn_1x`` plus the cvpods
    differences and :data:`FGDH_ARCHS` — the definition the presets are tested against.
    """
    if isinstance(arch, Mapping | Path):
        return load_config(arch)
    name = FGDH_ALIASES.get(arch, arch)
    if not from_spec and (name in list_presets() or Path(arch).is_file()):
        return load_config(arch if Path(arch).is_file() else name)
    if name not in FGDH_ARCHS:
        raise ConversionError(
            f"unknown FGDH arch {arch!r}; choose from {sorted(FGDH_ARCHS)}, their cvpods names "
            f"{sorted(FGDH_ALIASES)}, a preset name or a config file"
        )
    spec = FGDH_ARCHS[name]
    cfg = load_config("fcos_r50_fpn_1x")
    model = cfg["model"]
    # cvpods FCOS: LastLevelP6P7 on C5 (ReLU before P7), shifts at (x·s, y·s)
    model["neck"].update(extra_input="input", relu_before_extra=True)
    head = model["head"]
    head["anchor_generator"]["offset"] = 0.0
    if spec.num_layers is not None:
        for key in ("num_convs", "norm", "conv_bias"):
            head.pop(key, None)
        head.update(
            type="FCOSRoutingHead",
            num_layers=spec.num_layers,
            dynamic=spec.dynamic,
            budget_loss_weight=spec.budget_loss_weight,
            tau=1.5,
            init_gate=0.99,
            num_groups=32,
            gn_mode="masked",  # GN statistics over executed pixels, as the released weights
        )
    cfg["train"].update(
        warmup_iters=1000,
        warmup_factor=0.001,
        grad_clip=None,
        norm_weight_decay=0.0,
        find_unused_parameters=True,
    )
    return cfg


def detect_fgdh_arch(state: Mapping[str, Tensor]) -> str:
    """The FGDH row of a cvpods state dict, from its head keys (λ is not in the weights, so
    the three dynamic D8 rows cannot be told apart)."""
    if "head.cls_subnet.0.weight" in state:
        return "fgdh_r50_fcos_d2_1x"
    layers = len({m[1] for k in state if (m := re.match(r"^head\.cls_subnet\.(\d+)\.", k))})
    if layers == 0:
        raise ConversionError(
            "no head.cls_subnet.* keys: not a cvpods FCOS / FGDH checkpoint (or pass --arch)"
        )
    dynamic = any(".gate.gate_conv." in k for k in state)
    kind = "dynamic" if dynamic else "fix"
    names = [
        n for n, a in FGDH_ARCHS.items() if a.num_layers == layers and a.dynamic == dynamic
    ]
    if not names:
        raise ConversionError(
            f"no FGDH row has {layers} {kind} layers per tower; pass --arch with a config file"
        )
    if len(names) > 1:
        raise ConversionError(
            f"{kind} D{2 * layers} weights fit several rows (the budget weight λ is not stored "
            f"in the weights); pass --arch with one of {names}"
        )
    return names[0]


def _rules(plain: bool) -> list[tuple[str, Replacement]]:
    def plain_tower(m: re.Match[str]) -> str | None:
        block, part = divmod(int(m[2]), 3)  # Sequential(conv, GN, ReLU) × 4
        tower = "cls_tower" if m[1] == "cls" else "reg_tower"
        return None if part == 2 else f"head.{tower}.{block}.{('conv', 'norm')[part]}.{m[3]}"

    head: list[tuple[str, Replacement]] = (
        [
            (r"^head\.(cls|bbox)_subnet\.(\d+)\.(weight|bias)$", plain_tower),
            (r"^head\.cls_score\.(weight|bias)$", r"head.cls_logits.\1"),
        ]
        if plain
        else [(r"^head\.(cls_subnet|bbox_subnet|cls_score)\..+$",
               lambda m: rename_reference_head_key(m[0]))]
    )
    return [
        *detectron2_backbone_rules("neck."),
        *head,
        (r"^head\.(bbox_pred|centerness)\.(weight|bias)$", r"head.\1.\2"),
        (r"^head\.scales\.(\d+)\.scale$", r"head.scales.\1.scale"),
    ]


def _convert(
    state: Mapping[str, Tensor], plain: bool
) -> tuple[dict[str, Tensor], dict[str, str]]:
    rules = _rules(plain)
    out, origin = rename_state(state, lambda key: apply_rules(key, rules))
    for key, value in out.items():
        if key.startswith("head.scales.") and value.numel() == 1:
            out[key] = value.reshape(())  # reference Scale is [1], ours 0-d
    return out, origin


def convert_fgdh_official(state: Mapping[str, Tensor], plain: bool = False) -> dict[str, Tensor]:
    """cvpods FCOS state dict → dynadet keys (no shape checks); ``plain`` for the D2 head."""
    return _convert(state, plain)[0]


_INNER_DYNAMIC = (
    (r"^scale_paths\.(\d+)\.conv\.", r"dynamic_convs.\1.convs.0."),
    (r"^scale_paths\.(\d+)\.norm\.", r"dynamic_convs.\1.convs.1."),
    (r"^scale_paths\.(\d+)\.gate\.conv\.", r"dynamic_convs.\1.gate.gate_conv."),
    (r"^depth\.gate\.conv\.", "depth_module.gate.gate_conv."),
    (r"^depth\.", "depth_module.bottleneck."),
)
_INNER_FIX = (
    (r"^scale_paths\.(\d+)\.conv\.", r"convs.\1.0."),
    (r"^scale_paths\.(\d+)\.norm\.", r"convs.\1.1."),
    (r"^depth\.", "depth_module.bottleneck."),
)


def to_fgdh_official(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """dynadet FCOS (plain, Fix or dynamic towers) state dict → cvpods keys (inverse map)."""
    inner_rules = _INNER_DYNAMIC if any(".gate.conv." in k for k in state) else _INNER_FIX

    def routing(m: re.Match[str]) -> str:
        inner = m[3]
        for pattern, repl in inner_rules:
            inner, count = re.subn(pattern, repl, inner)
            if count:
                break
        return f"head.{'cls' if m[1] == 'cls' else 'bbox'}_subnet.{m[2]}.{inner}"

    def plain(m: re.Match[str]) -> str:
        index = 3 * int(m[2]) + (m[3] == "norm")
        return f"head.{'cls' if m[1] == 'cls' else 'bbox'}_subnet.{index}.{m[4]}"

    rules: list[tuple[str, Replacement]] = [
        *detectron2_backbone_inverse_rules("neck."),
        (r"^head\.(cls|reg)_tower\.layers\.(\d+)\.(.+)$", routing),
        (r"^head\.(cls|reg)_tower\.(\d+)\.(conv|norm)\.(weight|bias)$", plain),
        (r"^head\.cls_logits\.(weight|bias)$", r"head.cls_score.\1"),
    ]
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        out[apply_rules(key, rules) or key] = (
            value.reshape(1) if key.startswith("head.scales.") else value
        )
    return out


def convert_fgdh_file(src: str | Path, dst: str | Path, arch: Arch = None) -> Path:
    """Convert a cvpods FGDH / Fix / FCOS checkpoint into a dynadet checkpoint at ``dst``.

    ``arch``: a name from :data:`FGDH_ARCHS` or :data:`FGDH_ALIASES`, a preset, a YAML path or a
    config mapping; ``None`` picks the row from the head keys (not possible for the dynamic D8
    rows, which differ only in λ).
    """
    state = load_source_state(src)
    if arch is None:
        arch = detect_fgdh_arch(state)
    cfg = fgdh_config(arch)
    plain = cfg["model"]["head"]["type"] != "FCOSRoutingHead"
    converted, origin = _convert(state, plain)
    label = str(arch) if isinstance(arch, str | Path) else "config"
    return save_converted(converted, origin, cfg, src, dst, f"fgdh-official:{label}")
