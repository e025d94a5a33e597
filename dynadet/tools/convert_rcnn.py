"""Faster / Dynamic R-CNN weight converters: official Dynamic R-CNN and MMDetection → dynadet.

Sources (key tables: ``/work/shared/reference/dynamic_rcnn.md`` §3):

* ``dynamic-rcnn-official`` — ``hkzhang95/DynamicRCNN`` checkpoints (maskrcnn-benchmark style,
  ``{"model": state_dict, "optimizer", ...}`` saved from DDP, so every key starts with
  ``module.``; stripped). Caffe-style (MSRA) R-50 / R-101 with FrozenBN, optionally modulated
  DCN in c3–c5. The preset is picked from the keys: R-50 → ``dynamic_rcnn_r50_fpn_2x`` (the same
  network as the official 1x), R-101 → ``dynamic_rcnn_r101_fpn_1x``, R-101 with DCN →
  ``dynamic_rcnn_r101_dcnv2_fpn_3x_ms``; pass ``arch`` for another (e.g. ``..._3x_ms``).
* ``mmdet`` — MMDetection Faster R-CNN / Dynamic R-CNN (``rpn_head.*`` + ``roi_head.*``; the
  ``mmdet`` converter of :mod:`dynadet.tools.convert_dyhead` dispatches here by those keys). The
  default preset is ``faster_rcnn_r50_fpn_1x`` with the depth and DCN stages read from the keys;
  Dynamic R-CNN weights have the same keys, so pass ``arch=dynamic_rcnn_r50_fpn_1x`` for them
  (its RPN NMS at test is 0.85). MMDetection 1.x files (``bbox_head.*`` at the top level,
  background row first) are accepted too.

Key maps, source → dynadet:

Official (maskrcnn-benchmark names of the stock ``rpn.head`` / ``roi_heads.box`` modules are
accepted as aliases of the flat names of the official ``network.py``):

* ``backbone.body.stem.conv1.weight`` / ``.stem.bn1.*`` → ``backbone.conv1.weight`` /
  ``backbone.bn1.*``; ``backbone.body.layer{k}.{b}.<rest>`` → ``backbone.layer{k}.{b}.<rest>``
  (``conv{1,2,3}``, ``bn{1,2,3}``, ``downsample.{0,1}``); DCN blocks:
  ``...conv2.conv.weight`` → ``...conv2.weight``, ``...conv2.offset.*`` → ``...conv2.conv_offset.*``
  (both: first 18 channels = 9 interleaved (dy, dx), last 9 = mask logits);
* ``backbone.fpn.fpn_inner{i}`` / ``fpn_layer{i}`` (i = 1..4 for C2..C5) →
  ``neck.lateral_convs.{i-1}`` / ``neck.output_convs.{i-1}``;
* ``rpn_conv`` | ``rpn.head.conv`` → ``rpn.conv``; ``rpn_cls_logits`` | ``rpn.head.cls_logits``
  → ``rpn.cls_logits``; ``rpn_bbox_pred`` | ``rpn.head.bbox_pred`` → ``rpn.bbox_pred``;
* ``fc6`` / ``fc7`` | ``roi_heads.box.feature_extractor.fc{6,7}`` → ``roi_head.box_head.fc{6,7}``;
* ``cls_score`` | ``roi_heads.box.predictor.cls_score`` ``[C+1, 1024]`` (background **first**)
  → ``roi_head.cls_score`` ``[C+1, 1024]`` with rows ``1..C, 0`` (background last);
* ``bbox_pred`` | ``roi_heads.box.predictor.bbox_pred`` ``[4(C+1), 1024]`` →
  ``roi_head.bbox_pred`` ``[4C, 1024]``: the background's 4 rows dropped (never decoded);
* ``anchor_generator.cell_anchors.*`` (buffers) dropped.

MMDetection (≥ 2.0; 1.x differs only by the missing ``roi_head.`` and background first):

* ``backbone.*`` unchanged (torchvision names; DCN ``conv2.conv_offset`` too; BN counters kept for
  the BN presets); ``neck.lateral_convs.{i}.conv.*`` / ``neck.fpn_convs.{i}.conv.*`` →
  ``neck.lateral_convs.{i}.*`` / ``neck.output_convs.{i}.*``;
* ``rpn_head.rpn_conv`` / ``rpn_cls`` / ``rpn_reg`` → ``rpn.conv`` / ``rpn.cls_logits`` /
  ``rpn.bbox_pred`` (anchors ratio-major, as ours);
* ``roi_head.bbox_head.shared_fcs.{0,1}`` → ``roi_head.box_head.fc{6,7}``;
  ``roi_head.bbox_head.fc_cls`` ``[81]`` (background last) / ``fc_reg`` ``[320]`` →
  ``roi_head.cls_score`` / ``roi_head.bbox_pred`` unchanged.

The ``to_*`` functions are the inverse maps (dynadet → source names); the official inverse writes
zeros for the background's regression rows.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from dynadet.config import load_config
from dynadet.tools.convert import ConversionError, take_class_rows
from dynadet.tools.convert_dyhead import (
    Arch,
    Replacement,
    apply_rules,
    load_source_state,
    rename_state,
    save_converted,
)

__all__ = [
    "DYNAMIC_RCNN_OFFICIAL_PRESETS",
    "MMDET_RCNN_PRESET",
    "convert_dynamic_rcnn_official",
    "convert_dynamic_rcnn_official_file",
    "convert_mmdet_rcnn",
    "convert_mmdet_rcnn_state",
    "detect_dynamic_rcnn_arch",
    "is_mmdet_rcnn",
    "mmdet_rcnn_overrides",
    "to_dynamic_rcnn_official",
    "to_mmdet_rcnn",
]

DYNAMIC_RCNN_OFFICIAL_PRESETS = {
    "r50": "dynamic_rcnn_r50_fpn_2x",
    "r101": "dynamic_rcnn_r101_fpn_1x",
    "r101_dcn": "dynamic_rcnn_r101_dcnv2_fpn_3x_ms",
}
MMDET_RCNN_PRESET = "faster_rcnn_r50_fpn_1x"

_BN = r"(weight|bias|running_mean|running_var)"
_DEPTHS = {6: 50, 23: 101, 36: 152}  # blocks in layer3 → ResNet depth
_ANCHOR_BUFFERS = re.compile(r"(^|\.)anchor_generator\.")
_CLS_KEYS = ("roi_head.cls_score.weight", "roi_head.cls_score.bias")
_BOX_KEYS = ("roi_head.bbox_pred.weight", "roi_head.bbox_pred.bias")
_TRAINING_STATE = "roi_head.dynamic."  # Dynamic R-CNN statistics: no reference saves them


# ----------------------------------------------------------------------------- shared helpers


def _background_first_to_last(
    out: dict[str, Tensor], origin: Mapping[str, str]
) -> None:
    """Reorder converted predictor rows in place: ``[bg, 1..C]`` → ``[1..C, bg]`` for the
    classifier; the regressor's background rows dropped (``[4(C+1)]`` → ``[4C]``)."""
    if "roi_head.cls_score.weight" not in out:
        return
    num = out["roi_head.cls_score.weight"].shape[0]  # C + 1
    for key in _CLS_KEYS:
        if key in out:
            out[key] = take_class_rows(out[key], [*range(1, num), 0], 1, num_classes=num)
    for key in _BOX_KEYS:
        if key not in out:
            continue
        if out[key].shape[0] != 4 * num:
            raise ConversionError(
                f"{origin[key]}: {out[key].shape[0]} rows, expected 4·{num} (class-specific "
                "regression with a background class; class-agnostic heads are not supported)"
            )
        out[key] = take_class_rows(out[key], range(1, num), 4, num_classes=num)


def _background_last_to_first(state: dict[str, Tensor]) -> None:
    """Inverse of :func:`_background_first_to_last`; the background regressor rows are zeros."""
    for key in _CLS_KEYS:
        if key in state:
            t = state[key]
            state[key] = torch.cat([t[-1:], t[:-1]])
    for key in _BOX_KEYS:
        if key in state:
            t = state[key]
            state[key] = torch.cat([t.new_zeros((4, *t.shape[1:])), t])


def _count_blocks(state: Mapping[str, Tensor], pattern: str) -> int:
    return len({m[1] for k in state if (m := re.match(pattern, k))})


def _dcn_stages(state: Mapping[str, Tensor], pattern: str) -> list[bool]:
    """Per ResNet stage, whether its blocks carry deformable-conv offsets (``pattern`` has one
    group: the stage number 1..4)."""
    stages = {int(m[1]) for k in state if (m := re.match(pattern, k))}
    return [s in stages for s in (1, 2, 3, 4)]


def _depth(state: Mapping[str, Tensor], layer3: str) -> int:
    blocks = _count_blocks(state, layer3)
    if blocks not in _DEPTHS:
        raise ConversionError(
            f"cannot tell the ResNet depth: {blocks} blocks in layer3 (expected 6 for R-50, "
            "23 for R-101); pass --arch with a preset name or config file"
        )
    return _DEPTHS[blocks]


def _without_anchor_buffers(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {k: v for k, v in state.items() if not _ANCHOR_BUFFERS.search(k)}


def _label(arch: Arch) -> str:
    return str(arch) if isinstance(arch, str | Path) else "config"


# ----------------------------------------------------------------------------- official


def _official_rules() -> list[tuple[str, Replacement]]:
    body = r"^backbone\.body\.(layer[1-4]\.\d+)\."
    return [
        (r"^backbone\.body\.stem\.conv1\.weight$", "backbone.conv1.weight"),
        (rf"^backbone\.body\.stem\.bn1\.{_BN}$", r"backbone.bn1.\1"),
        (body + r"conv2\.conv\.weight$", r"backbone.\1.conv2.weight"),
        (body + r"conv2\.offset\.(weight|bias)$", r"backbone.\1.conv2.conv_offset.\2"),
        (body + r"(conv[123]\.weight)$", r"backbone.\1.\2"),
        (body + rf"(bn[123]|downsample\.1)\.{_BN}$", r"backbone.\1.\2.\3"),
        (body + r"downsample\.0\.weight$", r"backbone.\1.downsample.0.weight"),
        (
            r"^backbone\.fpn\.fpn_(inner|layer)([1-4])\.(weight|bias)$",
            lambda m: f"neck.{'lateral' if m[1] == 'inner' else 'output'}_convs."
            f"{int(m[2]) - 1}.{m[3]}",
        ),
        (r"^(?:rpn_conv|rpn\.head\.conv)\.(weight|bias)$", r"rpn.conv.\1"),
        (r"^(?:rpn_|rpn\.head\.)(cls_logits|bbox_pred)\.(weight|bias)$", r"rpn.\1.\2"),
        (
            r"^(?:roi_heads\.box\.feature_extractor\.)?(fc6|fc7)\.(weight|bias)$",
            r"roi_head.box_head.\1.\2",
        ),
        (r"^(?:roi_heads\.box\.predictor\.)?(cls_score|bbox_pred)\.(weight|bias)$",
         r"roi_head.\1.\2"),
    ]


def _convert_official(
    state: Mapping[str, Tensor],
) -> tuple[dict[str, Tensor], dict[str, str]]:
    rules = _official_rules()
    out, origin = rename_state(
        _without_anchor_buffers(state), lambda key: apply_rules(key, rules)
    )
    _background_first_to_last(out, origin)
    return out, origin


def convert_dynamic_rcnn_official(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Official Dynamic R-CNN state dict (``module.`` stripped) → dynadet keys (no shape checks
    against a model here; unmatched keys keep their names)."""
    return _convert_official(state)[0]


def to_dynamic_rcnn_official(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """dynadet Faster / Dynamic R-CNN state dict → official Dynamic R-CNN keys (inverse map,
    without the ``module.`` prefix; the Dynamic R-CNN statistics are left out)."""
    layer = r"^backbone\.(layer[1-4]\.\d+)\."
    rules: list[tuple[str, Replacement]] = [
        (r"^backbone\.conv1\.weight$", "backbone.body.stem.conv1.weight"),
        (rf"^backbone\.bn1\.{_BN}$", r"backbone.body.stem.bn1.\1"),
        (layer + r"conv2\.conv_offset\.(weight|bias)$", r"backbone.body.\1.conv2.offset.\2"),
        (layer + r"(.+)$", r"backbone.body.\1.\2"),
        (
            r"^neck\.(lateral|output)_convs\.(\d)\.(weight|bias)$",
            lambda m: f"backbone.fpn.fpn_{'inner' if m[1] == 'lateral' else 'layer'}"
            f"{int(m[2]) + 1}.{m[3]}",
        ),
        (r"^rpn\.conv\.(weight|bias)$", r"rpn_conv.\1"),
        (r"^rpn\.(cls_logits|bbox_pred)\.(weight|bias)$", r"rpn_\1.\2"),
        (r"^roi_head\.box_head\.(fc6|fc7)\.(weight|bias)$", r"\1.\2"),
        (r"^roi_head\.(cls_score|bbox_pred)\.(weight|bias)$", r"\1.\2"),
    ]
    state = dict(state)
    _background_last_to_first(state)
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        if key.endswith("num_batches_tracked") or key.startswith(_TRAINING_STATE):
            continue
        new = apply_rules(key, rules) or key
        dcn = re.match(r"^(backbone\.body\.layer[1-4]\.\d+\.conv2)\.weight$", new)
        if dcn and key.replace("conv2.weight", "conv2.conv_offset.weight") in state:
            new = f"{dcn[1]}.conv.weight"
        out[new] = value
    return out


def detect_dynamic_rcnn_arch(state: Mapping[str, Tensor]) -> str:
    """The dynadet preset for an official Dynamic R-CNN state dict, from its backbone keys."""
    if not any(k.startswith("backbone.body.") for k in state):
        raise ConversionError(
            "no backbone.body.* keys: not an official Dynamic R-CNN (maskrcnn-benchmark) "
            "checkpoint"
        )
    depth = _depth(state, r"^backbone\.body\.layer3\.(\d+)\.")
    dcn = any(re.match(r"^backbone\.body\.layer\d\.\d+\.conv2\.offset\.", k) for k in state)
    name = f"r{depth}" + ("_dcn" if dcn else "")
    if name not in DYNAMIC_RCNN_OFFICIAL_PRESETS:
        raise ConversionError(
            f"no preset for an official R-{depth}{' DCN' if dcn else ''} model; pass --arch with "
            f"a config (presets: {', '.join(DYNAMIC_RCNN_OFFICIAL_PRESETS.values())})"
        )
    return DYNAMIC_RCNN_OFFICIAL_PRESETS[name]


def convert_dynamic_rcnn_official_file(
    src: str | Path, dst: str | Path, arch: Arch = None
) -> Path:
    """Convert an official Dynamic R-CNN checkpoint into a dynadet checkpoint at ``dst``.

    ``arch``: a preset name, YAML config path or config mapping; ``None`` picks the preset from
    the backbone keys (:func:`detect_dynamic_rcnn_arch`).
    """
    state = load_source_state(src)
    if arch is None:
        arch = detect_dynamic_rcnn_arch(state)
    cfg = load_config(arch)
    converted, origin = _convert_official(state)
    return save_converted(
        converted, origin, cfg, src, dst, f"dynamic-rcnn-official:{_label(arch)}"
    )


# ----------------------------------------------------------------------------- MMDetection


def is_mmdet_rcnn(state: Mapping[str, Tensor]) -> bool:
    """Whether an MMDetection state dict is a two-stage (RPN + RoI head) detector."""
    return any(k.startswith("rpn_head.") for k in state) and any(
        k.startswith(("roi_head.", "bbox_head.shared_fcs.")) for k in state
    )


def _mmdet_v1(state: Mapping[str, Tensor]) -> bool:
    return any(k.startswith("bbox_head.fc_cls.") for k in state)


def _mmdet_rules() -> list[tuple[str, Replacement]]:
    bbox = r"^(?:roi_head\.)?bbox_head\."
    return [
        (r"^backbone\.((?:conv1|bn1|layer[1-4])\..+)$", r"backbone.\1"),
        (r"^neck\.lateral_convs\.(\d+)\.conv\.(weight|bias)$", r"neck.lateral_convs.\1.\2"),
        (r"^neck\.fpn_convs\.(\d+)\.conv\.(weight|bias)$", r"neck.output_convs.\1.\2"),
        (r"^rpn_head\.rpn_conv\.(weight|bias)$", r"rpn.conv.\1"),
        (r"^rpn_head\.rpn_cls\.(weight|bias)$", r"rpn.cls_logits.\1"),
        (r"^rpn_head\.rpn_reg\.(weight|bias)$", r"rpn.bbox_pred.\1"),
        (
            bbox + r"shared_fcs\.([01])\.(weight|bias)$",
            lambda m: f"roi_head.box_head.fc{6 + int(m[1])}.{m[2]}",
        ),
        (bbox + r"fc_cls\.(weight|bias)$", r"roi_head.cls_score.\1"),
        (bbox + r"fc_reg\.(weight|bias)$", r"roi_head.bbox_pred.\1"),
    ]


def _convert_mmdet(state: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, str]]:
    rules = _mmdet_rules()
    counters = {k: v for k, v in state.items() if k.endswith("num_batches_tracked")}
    out, origin = rename_state(state, lambda key: apply_rules(key, rules))
    for key, value in counters.items():  # BN presets (norm: bn) keep their counters
        new = apply_rules(key, rules) or key
        out[new], origin[new] = value, key
    if _mmdet_v1(state):
        _background_first_to_last(out, origin)
    return out, origin


def convert_mmdet_rcnn(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """MMDetection Faster / Dynamic R-CNN state dict → dynadet keys (no shape checks here)."""
    return _convert_mmdet(state)[0]


def to_mmdet_rcnn(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """dynadet Faster / Dynamic R-CNN state dict → MMDetection (≥ 2.0) keys (inverse map; the
    Dynamic R-CNN statistics are left out)."""
    rules: list[tuple[str, Replacement]] = [
        (r"^backbone\.(.+)$", r"backbone.\1"),
        (r"^neck\.lateral_convs\.(\d+)\.(weight|bias)$", r"neck.lateral_convs.\1.conv.\2"),
        (r"^neck\.output_convs\.(\d+)\.(weight|bias)$", r"neck.fpn_convs.\1.conv.\2"),
        (r"^rpn\.conv\.(weight|bias)$", r"rpn_head.rpn_conv.\1"),
        (r"^rpn\.cls_logits\.(weight|bias)$", r"rpn_head.rpn_cls.\1"),
        (r"^rpn\.bbox_pred\.(weight|bias)$", r"rpn_head.rpn_reg.\1"),
        (
            r"^roi_head\.box_head\.fc([67])\.(weight|bias)$",
            lambda m: f"roi_head.bbox_head.shared_fcs.{int(m[1]) - 6}.{m[2]}",
        ),
        (r"^roi_head\.cls_score\.(weight|bias)$", r"roi_head.bbox_head.fc_cls.\1"),
        (r"^roi_head\.bbox_pred\.(weight|bias)$", r"roi_head.bbox_head.fc_reg.\1"),
    ]
    return {
        apply_rules(key, rules) or key: value
        for key, value in state.items()
        if not key.startswith(_TRAINING_STATE)
    }


def mmdet_rcnn_overrides(state: Mapping[str, Tensor]) -> list[str]:
    """Config overrides of the default preset read from an MMDetection state dict: the ResNet
    depth and the stages with deformable convs (``conv2.conv_offset``)."""
    depth = _depth(state, r"^backbone\.layer3\.(\d+)\.")
    out = [f"model.backbone.depth={depth}"]
    dcn = _dcn_stages(state, r"^backbone\.layer([1-4])\.\d+\.conv2\.conv_offset\.")
    if any(dcn):
        out.append(f"+model.backbone.dcn_stages=[{','.join(str(d).lower() for d in dcn)}]")
    return out


def convert_mmdet_rcnn_state(
    state: Mapping[str, Tensor], src: str | Path, dst: str | Path, arch: Arch = None
) -> Path:
    """Convert an already loaded MMDetection two-stage state dict (``src`` names it in messages)
    and write a dynadet checkpoint at ``dst``.

    ``arch``: a preset name, YAML path or config mapping; ``None`` → ``faster_rcnn_r50_fpn_1x``
    with the depth and DCN stages of the weights (:func:`mmdet_rcnn_overrides`).
    """
    from dynadet.api import build_model  # local: dynadet.api imports the model stack

    if arch is None:
        cfg: dict[str, Any] = load_config(MMDET_RCNN_PRESET, mmdet_rcnn_overrides(state))
        label = MMDET_RCNN_PRESET
    else:
        cfg, label = load_config(arch), _label(arch)
    model = build_model(cfg)
    converted, origin = _convert_mmdet(state)
    expected = model.state_dict()
    for key in list(converted):  # FrozenBN presets have no counters
        if key.endswith("num_batches_tracked") and key not in expected:
            del converted[key]
    for key, value in expected.items():  # counters absent from the file start at 0
        if key.endswith("num_batches_tracked") and key not in converted:
            converted[key], origin[key] = torch.zeros_like(value), key
    return save_converted(converted, origin, cfg, src, dst, f"mmdet:{label}", model)
