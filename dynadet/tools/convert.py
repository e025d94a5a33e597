"""Weight converters: foreign state dicts → dynadet checkpoints.

``torchvision``: ``resnet50`` (ImageNet backbone), ``fcos_resnet50_fpn``, ``retinanet_resnet50_fpn``
and ``retinanet_resnet50_fpn_v2``. torchvision's detection heads have 91 class outputs indexed by
COCO category id (with a background slot and ten 'N/A' slots); the converter keeps the 80 real
categories in sorted-id order (row ``a·91 + id`` → ``a·80 + k``) — trained weights never score the
dropped slots above the detection threshold.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from importlib import import_module
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from dynadet.config import load_config
from dynadet.data.categories import COCO_CLASSES, COCO_IDS
from dynadet.engine.checkpoint import load_foreign_state_dict, save_checkpoint

TORCHVISION_ARCHS = (
    "resnet50",
    "fcos_resnet50_fpn",
    "retinanet_resnet50_fpn",
    "retinanet_resnet50_fpn_v2",
)


class ConversionError(ValueError):
    """A state dict that does not match the expected layout (lists what to fix)."""


def remap_class_rows(t: Tensor, num_anchors: int, old: int = 91) -> Tensor:
    """Keep the 80 COCO rows of a ``[A·91, ...]`` predictor tensor, as ``[A·80, ...]``."""
    if t.shape[0] != num_anchors * old:
        raise ConversionError(
            f"class predictor has {t.shape[0]} rows, expected {num_anchors}·{old}"
        )
    idx = torch.tensor(COCO_IDS)
    rows = (torch.arange(num_anchors)[:, None] * old + idx[None, :]).reshape(-1)
    return t[rows].clone()


def _rename_torchvision(key: str, arch: str) -> str | None:
    """torchvision key → dynadet key (``None`` drops it)."""
    if key.endswith("num_batches_tracked"):
        return None
    if arch == "resnet50":
        return None if key.startswith("fc.") else f"backbone.{key}"
    rules: list[tuple[str, str]] = [
        (r"^backbone\.body\.(.*)$", r"backbone.\1"),
        (
            r"^backbone\.fpn\.inner_blocks\.(\d+)\.(?:0\.)?(weight|bias)$",
            r"neck.lateral_convs.\1.\2",
        ),
        (
            r"^backbone\.fpn\.layer_blocks\.(\d+)\.(?:0\.)?(weight|bias)$",
            r"neck.output_convs.\1.\2",
        ),
        (r"^backbone\.fpn\.extra_blocks\.(p6|p7)\.(weight|bias)$", r"neck.\1.\2"),
        (r"^head\.classification_head\.cls_logits\.(.*)$", r"head.cls_logits.\1"),
        (r"^head\.regression_head\.bbox_reg\.(.*)$", r"head.bbox_pred.\1"),
        (r"^head\.regression_head\.bbox_ctrness\.(.*)$", r"head.centerness.\1"),
    ]
    for pattern, repl in rules:
        if re.match(pattern, key):
            return re.sub(pattern, repl, key)
    m = re.match(r"^head\.(classification|regression)_head\.conv\.(\d+)\.(?:(\d+)\.)?(.*)$", key)
    if m:
        tower = "cls_tower" if m.group(1) == "classification" else "reg_tower"
        i, sub, rest = int(m.group(2)), m.group(3), m.group(4)
        if arch == "fcos_resnet50_fpn":
            # Sequential(conv, GN, ReLU) × 4: conv at 3i, GN at 3i + 1
            if sub is not None:
                return key  # unexpected nesting: reported as unmatched
            block, part = divmod(i, 3)
            return f"head.{tower}.{block}.{'conv' if part == 0 else 'norm'}.{rest}"
        if sub is None:  # legacy RetinaNet layout: conv.{2i} (conv), conv.{2i+1} (ReLU)
            return f"head.{tower}.{i // 2}.conv.{rest}"
        return f"head.{tower}.{i}.{'conv' if sub == '0' else 'norm'}.{rest}"
    return key


def convert_torchvision(state: dict[str, Tensor], arch: str) -> dict[str, Tensor]:
    """Rename and remap a torchvision state dict to dynadet keys (no shape checks here)."""
    if arch not in TORCHVISION_ARCHS:
        raise ConversionError(f"unknown torchvision arch {arch!r}; choose from {TORCHVISION_ARCHS}")
    anchors = 9 if arch.startswith("retinanet") else 1
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        new = _rename_torchvision(key, arch)
        if new is None:
            continue
        if new.startswith("head.cls_logits."):
            value = remap_class_rows(value, anchors)
        out[new] = value
    return out


def check_against_model(converted: dict[str, Tensor], model: torch.nn.Module, source: str) -> None:
    """Every model key present with the right shape and no leftovers, or one error listing all."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in converted]
    unexpected = [k for k in converted if k not in expected]
    wrong = [
        f"{k}: got {tuple(converted[k].shape)}, expected {tuple(v.shape)}"
        for k, v in expected.items()
        if k in converted and converted[k].shape != v.shape
    ]
    if missing or unexpected or wrong:
        lines = [f"{source}: the weights do not match the model"]
        for title, items in (("missing", missing), ("unmatched", unexpected), ("shape", wrong)):
            if items:
                lines.append(f"  {title} ({len(items)}): " + ", ".join(items[:20]))
                if len(items) > 20:
                    lines.append(f"    ... and {len(items) - 20} more")
        raise ConversionError("\n".join(lines))


TORCHVISION_PRESETS = {
    "fcos_resnet50_fpn": "torchvision/fcos_resnet50_fpn",
    "retinanet_resnet50_fpn": "torchvision/retinanet_resnet50_fpn",
    "retinanet_resnet50_fpn_v2": "torchvision/retinanet_resnet50_fpn_v2",
}


def convert_torchvision_file(src: str | Path, dst: str | Path, arch: str) -> Path:
    """Convert a torchvision ``.pth`` into a dynadet checkpoint at ``dst``.

    Detection archs are checked key-by-key against the matching preset model; ``resnet50``
    writes backbone weights checked against a ResNet-50.
    """
    from dynadet.api import build_model  # local: api imports this module's users

    state = load_foreign_state_dict(src)
    converted = convert_torchvision(state, arch)
    if arch == "resnet50":
        from dynadet.models.resnet import ResNet

        backbone = ResNet(depth=50, style="pytorch", norm="bn")
        tail = {k[len("backbone.") :]: v for k, v in converted.items()}
        check_against_model(tail, _without_bn_counters(backbone), str(src))
        cfg = {"backbone": {"type": "ResNet", "depth": 50, "style": "pytorch"}}
        return save_checkpoint(dst, converted, cfg, [], {"source": f"torchvision:{arch}"})
    cfg = load_config(TORCHVISION_PRESETS[arch])
    model = build_model(cfg)
    check_against_model(converted, model, str(src))
    return save_checkpoint(
        dst,
        converted,
        cfg,
        list(COCO_CLASSES),
        {"source": f"torchvision:{arch}", "category_ids": list(COCO_IDS)},
    )


def _without_bn_counters(module: torch.nn.Module) -> torch.nn.Module:
    """A view whose ``state_dict`` omits ``num_batches_tracked`` (converted weights drop it)."""

    class _View(torch.nn.Module):
        def state_dict(self, *args, **kwargs):  # type: ignore[override]
            sd = module.state_dict()
            return {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}

    return _View()


def _lazy(module: str, name: str) -> Callable[..., Path]:
    """A converter imported on first use (those modules import this one)."""

    def run(src: str | Path, dst: str | Path, arch: Any = None) -> Path:
        return getattr(import_module(module), name)(src, dst, arch=arch)

    run.__doc__ = f"See ``{module}.{name}``."
    return run


CONVERTERS: dict[str, Callable[..., Path]] = {
    "torchvision": convert_torchvision_file,
    # arch optional below: a preset name, YAML path or config mapping; None = from the keys
    "dyhead-official": _lazy("dynadet.tools.convert_dyhead", "convert_dyhead_official_file"),
    "mmdet": _lazy("dynadet.tools.convert_dyhead", "convert_mmdet_file"),  # ATSS + DyHead
    "fgdh-official": _lazy("dynadet.tools.convert_fgdh", "convert_fgdh_file"),
}
