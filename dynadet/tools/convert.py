"""Weight converters: foreign state dicts → dynadet checkpoints.

``torchvision``: ``resnet50`` (ImageNet backbone), ``fcos_resnet50_fpn``,
``retinanet_resnet50_fpn``, ``retinanet_resnet50_fpn_v2`` and ``fasterrcnn_resnet50_fpn``.
torchvision's detection heads have 91 class outputs indexed by COCO category id (with a background
slot and ten 'N/A' slots); the converter keeps the 80 real categories in sorted-id order (row
``a·91 + id`` → ``a·80 + k``) — trained weights never score the dropped slots above the detection
threshold.

Faster R-CNN (``fasterrcnn_resnet50_fpn``; hosted file ``fasterrcnn_resnet50_fpn_coco-258fb6c6.pth``
with the pre-0.13 names ``inner_blocks.{i}.weight`` / ``rpn.head.conv.weight``, or the
``.0`` / ``.0.0`` names of newer torchvision):

* ``backbone.body.*`` → ``backbone.*``; ``backbone.fpn.{inner,layer}_blocks.{i}[.0].*`` →
  ``neck.{lateral,output}_convs.{i}.*``;
* ``rpn.head.conv[.0.0].*`` → ``rpn.conv.*``; ``rpn.head.{cls_logits,bbox_pred}.*`` →
  ``rpn.{cls_logits,bbox_pred}.*`` (3 anchors per location, ratios 0.5/1/2, same order);
* ``roi_heads.box_head.fc{6,7}.*`` → ``roi_head.box_head.fc{6,7}.*``;
* ``roi_heads.box_predictor.cls_score`` ``[91, 1024]`` → ``roi_head.cls_score`` ``[81, 1024]``:
  rows of the 80 COCO ids, then the background row 0 last;
* ``roi_heads.box_predictor.bbox_pred`` ``[364, 1024]`` → ``roi_head.bbox_pred`` ``[320, 1024]``:
  rows ``4·id .. 4·id + 3`` of the 80 ids (background and 'N/A' rows dropped).

:func:`take_class_rows` does these row selections (also for other converters).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
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
    "fasterrcnn_resnet50_fpn",
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


def take_class_rows(
    t: Tensor, ids: Sequence[int], rows_per_class: int = 1, num_classes: int | None = None
) -> Tensor:
    """Rows ``[rows_per_class·c, rows_per_class·(c + 1))`` of ``t`` for each ``c`` in ``ids``, in
    that order (a classifier ``[C_old, ...]`` or class-specific regressor ``[4·C_old, ...]`` →
    ``[rows_per_class·len(ids), ...]``). ``num_classes``: the expected ``C_old``, checked."""
    if num_classes is not None and t.shape[0] != rows_per_class * num_classes:
        raise ConversionError(
            f"class predictor has {t.shape[0]} rows, expected {rows_per_class}·{num_classes}"
        )
    if t.shape[0] % rows_per_class or max(ids) >= t.shape[0] // rows_per_class:
        raise ConversionError(
            f"class predictor with {t.shape[0]} rows has no class {max(ids)} "
            f"({rows_per_class} rows per class)"
        )
    index = torch.tensor(ids)[:, None] * rows_per_class + torch.arange(rows_per_class)
    return t[index.reshape(-1)].clone()


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
        (r"^rpn\.head\.conv\.(?:0\.0\.)?(weight|bias)$", r"rpn.conv.\1"),
        (r"^rpn\.head\.(cls_logits|bbox_pred)\.(weight|bias)$", r"rpn.\1.\2"),
        (r"^roi_heads\.box_head\.(fc6|fc7)\.(weight|bias)$", r"roi_head.box_head.\1.\2"),
        (
            r"^roi_heads\.box_predictor\.(cls_score|bbox_pred)\.(weight|bias)$",
            r"roi_head.\1.\2",
        ),
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
        elif new.startswith("roi_head.cls_score."):  # background (id 0) last
            value = take_class_rows(value, [*COCO_IDS, 0], 1, num_classes=91)
        elif new.startswith("roi_head.bbox_pred."):
            value = take_class_rows(value, COCO_IDS, 4, num_classes=91)
        out[new] = value
    return out


def _absent_training_state(converted: dict[str, Tensor], model: torch.nn.Module) -> set[str]:
    """Keys of the model's Dynamic R-CNN statistics when the weights hold none of them: training
    state that no reference checkpoint saves (the module then keeps its initial values)."""
    from dynadet.models.dynamic_stats import DynamicTrainingStats

    absent: set[str] = set()
    for name, module in model.named_modules():
        if isinstance(module, DynamicTrainingStats):
            keys = {f"{name}.{k}" if name else k for k in module.state_dict()}
            if not keys & converted.keys():
                absent |= keys
    return absent


def check_against_model(converted: dict[str, Tensor], model: torch.nn.Module, source: str) -> None:
    """Every model key present with the right shape and no leftovers, or one error listing all.

    The buffers of a ``DynamicTrainingStats`` may be absent as a whole (reference checkpoints
    never hold them; loading keeps their initial values)."""
    expected = model.state_dict()
    optional = _absent_training_state(converted, model)
    missing = [k for k in expected if k not in converted and k not in optional]
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
    "fasterrcnn_resnet50_fpn": "torchvision/fasterrcnn_resnet50_fpn",
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
    # ATSS + DyHead, or Faster / Dynamic R-CNN (dispatched by the rpn_head.* / roi_head.* keys)
    "mmdet": _lazy("dynadet.tools.convert_dyhead", "convert_mmdet_file"),
    "fgdh-official": _lazy("dynadet.tools.convert_fgdh", "convert_fgdh_file"),
    "dynamic-rcnn-official": _lazy(
        "dynadet.tools.convert_rcnn", "convert_dynamic_rcnn_official_file"
    ),
}
