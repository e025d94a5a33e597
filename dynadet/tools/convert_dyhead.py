"""DyHead weight converters: official Detectron2 release and MMDetection → dynadet checkpoints.

Sources (key names: ``/work/shared/reference/dyhead.md`` §4, ``one_stage.md`` §2):

* ``dyhead-official`` — ``microsoft/DynamicHead`` checkpoints (``{"model": state_dict}``) of all
  four released models: ATSS + DyHead (preset ``dyhead_r50_atss_fpn_1x``), RetinaNet + DyHead
  (``dyhead_r50_retina_fpn_1x``), Faster R-CNN + DyHead (``dyhead_r50_rcnn_fpn_1x``) and Swin-T
  ATSS + DyHead (``dyhead_swint_atss_fpn_2x_ms``); :func:`detect_dyhead_arch` picks the preset
  from the keys. The DyHead wrapper is the detectron2 backbone and holds the FPN as
  ``backbone``, so the ResNet/Swin/FPN keys are ``backbone.backbone.bottom_up.*`` /
  ``backbone.backbone.fpn_*``; the flat ``backbone.bottom_up.*`` form (plain detectron2) is
  accepted too.
* ``mmdet`` — MMDetection ATSS + DyHead (``neck=[FPN, DyHead]``); default preset
  ``dyhead_r50_atss_simple_1x`` (DCNs without bias, 3×3 predictors). Two-stage MMDetection files
  (``rpn_head.*`` / ``roi_head.*``: Faster / Dynamic R-CNN) go to
  :func:`dynadet.tools.convert_rcnn.convert_mmdet_rcnn_state`.

Key maps, source → dynadet (``N`` = ``neck.0.``, the FPN inside the ``Chain`` neck; ``L`` = the
finest FPN input level, 3 for the one-stage models, 2 for Faster R-CNN):

* ``backbone.bottom_up.stem.conv1.weight`` → ``backbone.conv1.weight``;
  ``...stem.conv1.norm.{weight,bias,running_mean,running_var}`` → ``backbone.bn1.*``;
* ``...res{k}.{b}.conv{j}.weight`` / ``.conv{j}.norm.*`` →
  ``backbone.layer{k-1}.{b}.conv{j}.weight`` / ``.bn{j}.*``; ``...shortcut.weight`` /
  ``.shortcut.norm.*`` → ``.downsample.0.weight`` / ``.downsample.1.*``;
* Swin-T: ``backbone.bottom_up.{patch_embed,layers,norm1,norm2,norm3}.<rest>`` →
  ``backbone.{...}.<rest>`` (the official module names; ``relative_position_index`` is a
  persistent buffer on both sides and is kept; ``attn_mask`` buffers, which some Swin versions
  save, are dropped: dynadet builds the shift masks per input size);
* ``backbone.fpn_lateral{l}`` / ``fpn_output{l}`` → ``N lateral_convs.{l-L}`` /
  ``N output_convs.{l-L}``; ``backbone.top_block.p6`` / ``.p7`` → ``N p6`` / ``N p7`` (Faster
  R-CNN's ``LastLevelMaxPool`` has no weights);
* ``backbone.dyhead_tower.{i}.<rest>`` → ``neck.1.blocks.{i}.<rest>`` (same ``<rest>``);
* ATSS ``head.{cls_logits,bbox_pred,centerness}.*`` → same; ``head.scales.{l}.scale`` ``[1]`` →
  0-d;
* RetinaNet ``head.{cls,bbox}_subnet.{2i}.*`` → ``head.{cls,reg}_tower.{i}.conv.*``;
  ``head.cls_score.*`` → ``head.cls_logits.*`` and ``head.bbox_pred.*`` → same, rows permuted;
* Faster R-CNN ``proposal_generator.rpn_head.{conv,objectness_logits,anchor_deltas}.*`` →
  ``rpn.{conv,cls_logits,bbox_pred}.*``; ``roi_heads.box_head.fc{1,2}.*`` →
  ``roi_head.box_head.fc{6,7}.*``; ``roi_heads.box_predictor.{cls_score,bbox_pred}.*`` →
  ``roi_head.{cls_score,bbox_pred}.*`` (81 rows with background last and 320 class-specific
  rows in both: no reordering).

Anchor order: detectron2's ``DefaultAnchorGenerator`` lists a location's anchors size-major
(``for size: for ratio:``, index ``d = s·R + r``), dynadet's ``AnchorGenerator`` ratio-major
(``a = r·S + s``). The predictor rows of anchor ``a`` (``K`` class rows ``a·K .. a·K+K-1``, 4 box
rows) are therefore taken from detectron2 anchor ``d(a)`` (:func:`detectron2_anchor_order`); for
the RPN (one size, three ratios) the two orders coincide. Classes are the 80 contiguous COCO
labels in both.

MMDetection: ``backbone.*`` are torchvision names (copied, ``num_batches_tracked`` dropped);
``neck.0.lateral_convs.{i}.conv`` → ``neck.0.lateral_convs.{i}``; ``neck.0.fpn_convs.{i}.conv`` →
``output_convs.{i}`` for the input levels, then ``p6``, ``p7``; ``neck.1.dyhead_blocks.{i}.*`` per
:class:`~dynadet.models.dyhead.DyHead` (``task_attn_module.conv{1,2}.conv.weight`` ``[o, i, 1, 1]``
→ ``relu.fc.{0,2}.weight`` ``[o, i]``); ``bbox_head.atss_{cls,reg,centerness}`` →
``head.{cls_logits,bbox_pred,centerness}``; ``bbox_head.{cls,reg}_convs.{i}.{conv,gn}`` →
``head.{cls,reg}_tower.{i}.{conv,norm}``; ``bbox_head.scales.{l}.scale`` unchanged.

The ``to_*`` functions are the inverse maps (dynadet → source names), for export and tests.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from dynadet.config import load_config
from dynadet.data.categories import COCO_CLASSES, COCO_IDS
from dynadet.engine.checkpoint import load_foreign_state_dict, save_checkpoint
from dynadet.tools.convert import ConversionError, check_against_model

__all__ = [
    "DYHEAD_OFFICIAL_PRESETS",
    "MMDET_DEFAULT_PRESET",
    "convert_dyhead_official",
    "convert_dyhead_official_file",
    "convert_mmdet_dyhead",
    "convert_mmdet_file",
    "detect_dyhead_arch",
    "detectron2_anchor_order",
    "load_source_state",
    "permute_anchor_rows",
    "to_dyhead_official",
    "to_mmdet_dyhead",
]

DYHEAD_OFFICIAL_PRESETS = {
    "atss": "dyhead_r50_atss_fpn_1x",
    "retinanet": "dyhead_r50_retina_fpn_1x",
    "rcnn": "dyhead_r50_rcnn_fpn_1x",
    "swint_atss": "dyhead_swint_atss_fpn_2x_ms",
}
MMDET_DEFAULT_PRESET = "dyhead_r50_atss_simple_1x"

Arch = str | Path | Mapping[str, Any] | None
Replacement = str | Callable[[re.Match[str]], str | None]
Rules = Sequence[tuple[str, Replacement]]

# Constants that some reference versions save with the weights; nothing to convert.
_IGNORED = re.compile(
    r"(^|\.)num_batches_tracked$|^pixel_(mean|std)$|(^|\.)anchor_generator\.|\.attn_mask$"
)
_BN = r"(weight|bias|running_mean|running_var)"
_SWIN = r"(patch_embed|layers|norm[123])"
_PKL_MESSAGE = (
    "{path}: .pkl files (detectron2/cvpods pickles) are not read, because unpickling can run "
    "arbitrary code. In an environment you trust, re-save the weights as a state dict of "
    "tensors, e.g. python -c \"import pickle, torch; d = pickle.load(open('{path}', 'rb')); "
    "d = d.get('model', d); torch.save({{k: torch.as_tensor(v) for k, v in d.items()}}, "
    "'{stem}.pth')\", and convert the .pth"
)


# ----------------------------------------------------------------------------- shared helpers


def load_source_state(src: str | Path) -> dict[str, Tensor]:
    """Read foreign weights without unpickling code; ``module.`` prefixes are stripped.

    ``.pth``/``.pt``/``.safetensors`` files holding a state dict, or ``{"model": …}`` /
    ``{"state_dict": …}`` wrappers of one, are accepted; ``.pkl`` pickles are refused with a
    recipe for turning them into a ``.pth``.
    """
    path = Path(src)
    if path.suffix == ".pkl":
        raise ConversionError(_PKL_MESSAGE.format(path=path, stem=path.with_suffix("")))
    state = load_foreign_state_dict(path)
    return {key.removeprefix("module."): value for key, value in state.items()}


def apply_rules(key: str, rules: Rules) -> str | None:
    """The first matching ``(pattern, replacement)`` rule's result, or ``None``."""
    for pattern, repl in rules:
        match = re.match(pattern, key)
        if match:
            return repl(match) if callable(repl) else match.expand(repl)
    return None


def rename_state(
    state: Mapping[str, Tensor], rename: Callable[[str], str | None]
) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Rename every key; returns ``(renamed, origin)`` with ``origin[new] = old``.

    Ignorable constants are dropped; a key no rule matches keeps its own name, so the check
    against the model reports it as unmatched. Two keys landing on one name are an error.
    """
    out: dict[str, Tensor] = {}
    origin: dict[str, str] = {}
    for key, value in state.items():
        if _IGNORED.search(key):
            continue
        new = rename(key) or key
        if new in out:
            raise ConversionError(f"{origin[new]!r} and {key!r} both map to {new!r}")
        out[new] = value
        origin[new] = key
    return out, origin


def save_converted(
    converted: dict[str, Tensor],
    origin: Mapping[str, str],
    cfg: dict[str, Any],
    src: str | Path,
    dst: str | Path,
    source: str,
    model: torch.nn.Module | None = None,
) -> Path:
    """Check ``converted`` key-by-key and shape-by-shape against the config's model, then write
    a dynadet checkpoint (safetensors + config + COCO class names + ``category_ids`` meta)."""
    from dynadet.api import build_model  # local: dynadet.api imports the model stack

    model = build_model(cfg) if model is None else model
    try:
        check_against_model(converted, model, str(src))
    except ConversionError as e:
        expected = model.state_dict()
        renamed = [f"{origin[k]} -> {k}" for k in converted if k not in expected and origin[k] != k]
        hint = f"\n  renamed but not in the model: {', '.join(renamed[:20])}" if renamed else ""
        raise ConversionError(f"{e}{hint}") from None
    meta = {"source": source, "category_ids": list(COCO_IDS)}
    return save_checkpoint(dst, converted, cfg, list(COCO_CLASSES), meta)


def _scalar(value: Tensor) -> Tensor:
    # references store Scale as [1]; ours is 0-d (a wrong size is left for the shape check)
    return value.reshape(()) if value.numel() == 1 else value


# ----------------------------------------------------------------------------- detectron2 parts


def detectron2_backbone_rules(neck: str, first_level: int = 3) -> list[tuple[str, Replacement]]:
    """detectron2 ResNet (FrozenBN) or Swin + FPN on ``res{first_level}``–res5 (+ P6/P7) →
    dynadet; ``neck`` is the FPN's key prefix (``"neck.0."`` in a ``Chain``, ``"neck."``
    alone)."""
    res = r"^backbone\.bottom_up\.res([2-5])\.(\d+)\."

    def layer(m: re.Match[str]) -> str:
        return f"backbone.layer{int(m[1]) - 1}.{m[2]}."

    return [
        (r"^backbone\.bottom_up\.stem\.conv1\.weight$", "backbone.conv1.weight"),
        (rf"^backbone\.bottom_up\.stem\.conv1\.norm\.{_BN}$", r"backbone.bn1.\1"),
        (res + r"conv([123])\.weight$", lambda m: f"{layer(m)}conv{m[3]}.weight"),
        (res + rf"conv([123])\.norm\.{_BN}$", lambda m: f"{layer(m)}bn{m[3]}.{m[4]}"),
        (res + r"shortcut\.weight$", lambda m: f"{layer(m)}downsample.0.weight"),
        (res + rf"shortcut\.norm\.{_BN}$", lambda m: f"{layer(m)}downsample.1.{m[3]}"),
        (rf"^backbone\.bottom_up\.{_SWIN}\.(.+)$", r"backbone.\1.\2"),
        (
            r"^backbone\.fpn_(lateral|output)([2-5])\.(weight|bias)$",
            lambda m: f"{neck}{m[1]}_convs.{int(m[2]) - first_level}.{m[3]}",
        ),
        (r"^backbone\.top_block\.(p6|p7)\.(weight|bias)$", neck + r"\1.\2"),
    ]


def detectron2_backbone_inverse_rules(
    neck: str, first_level: int = 3
) -> list[tuple[str, Replacement]]:
    """The inverse of :func:`detectron2_backbone_rules`."""
    layer = r"^backbone\.layer([1-4])\.(\d+)\."
    n = re.escape(neck)

    def res(m: re.Match[str]) -> str:
        return f"backbone.bottom_up.res{int(m[1]) + 1}.{m[2]}."

    return [
        (r"^backbone\.conv1\.weight$", "backbone.bottom_up.stem.conv1.weight"),
        (rf"^backbone\.bn1\.{_BN}$", r"backbone.bottom_up.stem.conv1.norm.\1"),
        (layer + r"conv([123])\.weight$", lambda m: f"{res(m)}conv{m[3]}.weight"),
        (layer + rf"bn([123])\.{_BN}$", lambda m: f"{res(m)}conv{m[3]}.norm.{m[4]}"),
        (layer + r"downsample\.0\.weight$", lambda m: f"{res(m)}shortcut.weight"),
        (layer + rf"downsample\.1\.{_BN}$", lambda m: f"{res(m)}shortcut.norm.{m[3]}"),
        (rf"^backbone\.{_SWIN}\.(.+)$", r"backbone.bottom_up.\1.\2"),
        (
            rf"^{n}(lateral|output)_convs\.(\d+)\.(weight|bias)$",
            lambda m: f"backbone.fpn_{m[1]}{int(m[2]) + first_level}.{m[3]}",
        ),
        (rf"^{n}(p6|p7)\.(weight|bias)$", r"backbone.top_block.\1.\2"),
    ]


def detectron2_anchor_order(num_sizes: int, num_ratios: int) -> Tensor:
    """``order[a]`` = the detectron2 anchor index of dynadet anchor ``a``.

    dynadet: ``a = r·S + s`` (ratio-major); detectron2: ``d = s·R + r`` (size-major).
    """
    r = torch.arange(num_ratios)[:, None]
    s = torch.arange(num_sizes)[None, :]
    return (s * num_ratios + r).reshape(-1)


def permute_anchor_rows(t: Tensor, order: Tensor) -> Tensor:
    """Rows grouped per anchor (``[A·k, ...]``) reordered so that group ``a`` is old group
    ``order[a]``."""
    a = order.numel()
    if t.shape[0] % a:
        raise ConversionError(f"predictor with {t.shape[0]} rows is not split into {a} anchors")
    return t.reshape(a, t.shape[0] // a, *t.shape[1:])[order].reshape(t.shape).clone()


def _first_fpn_level(state: Mapping[str, Tensor]) -> int:
    """The finest FPN input level of an official state dict (2 for R-CNN, 3 otherwise)."""
    levels = {int(m[1]) for k in state if (m := re.search(r"\.fpn_lateral([2-5])\.", k))}
    return min(levels, default=3)


_RCNN_RULES: list[tuple[str, Replacement]] = [
    (r"^proposal_generator\.rpn_head\.conv\.(weight|bias)$", r"rpn.conv.\1"),
    (r"^proposal_generator\.rpn_head\.objectness_logits\.(weight|bias)$", r"rpn.cls_logits.\1"),
    (r"^proposal_generator\.rpn_head\.anchor_deltas\.(weight|bias)$", r"rpn.bbox_pred.\1"),
    (
        r"^roi_heads\.box_head\.fc([12])\.(weight|bias)$",
        lambda m: f"roi_head.box_head.fc{5 + int(m[1])}.{m[2]}",
    ),
    (r"^roi_heads\.box_predictor\.(cls_score|bbox_pred)\.(weight|bias)$", r"roi_head.\1.\2"),
]
_RCNN_INVERSE_RULES: list[tuple[str, Replacement]] = [
    (r"^rpn\.conv\.(weight|bias)$", r"proposal_generator.rpn_head.conv.\1"),
    (r"^rpn\.cls_logits\.(weight|bias)$", r"proposal_generator.rpn_head.objectness_logits.\1"),
    (r"^rpn\.bbox_pred\.(weight|bias)$", r"proposal_generator.rpn_head.anchor_deltas.\1"),
    (
        r"^roi_head\.box_head\.fc([67])\.(weight|bias)$",
        lambda m: f"roi_heads.box_head.fc{int(m[1]) - 5}.{m[2]}",
    ),
    (r"^roi_head\.(cls_score|bbox_pred)\.(weight|bias)$", r"roi_heads.box_predictor.\1.\2"),
]
# predictors laid out per anchor (their rows follow the anchor order)
_ANCHOR_ROWS = ("head.cls_logits.", "head.bbox_pred.", "rpn.cls_logits.", "rpn.bbox_pred.")


# ----------------------------------------------------------------------------- official DyHead


def _official_rules(first_level: int = 3) -> list[tuple[str, Replacement]]:
    def tower(m: re.Match[str]) -> str | None:
        index = int(m[2])  # Sequential(conv, ReLU) × 4: convs at even indices
        name = "cls_tower" if m[1] == "cls" else "reg_tower"
        return None if index % 2 else f"head.{name}.{index // 2}.conv.{m[3]}"

    return [
        *detectron2_backbone_rules("neck.0.", first_level),
        (r"^backbone\.dyhead_tower\.(\d+)\.(.+)$", r"neck.1.blocks.\1.\2"),
        *_RCNN_RULES,
        (r"^head\.(cls_logits|bbox_pred|centerness)\.(weight|bias)$", r"head.\1.\2"),
        (r"^head\.scales\.(\d+)\.scale$", r"head.scales.\1.scale"),
        (r"^head\.(cls|bbox)_subnet\.(\d+)\.(weight|bias)$", tower),
        (r"^head\.cls_score\.(weight|bias)$", r"head.cls_logits.\1"),
    ]


def _convert_official(
    state: Mapping[str, Tensor], num_sizes: int, num_ratios: int
) -> tuple[dict[str, Tensor], dict[str, str]]:
    order = detectron2_anchor_order(num_sizes, num_ratios)
    rules = _official_rules(_first_fpn_level(state))

    def rename(key: str) -> str | None:
        # the DyHead wrapper keeps the detectron2 FPN as its ``backbone`` attribute
        return apply_rules(re.sub(r"^backbone\.backbone\.", "backbone.", key), rules)

    out, origin = rename_state(state, rename)
    for key, value in out.items():
        if key.startswith("head.scales."):
            out[key] = _scalar(value)
        elif order.numel() > 1 and key.startswith(_ANCHOR_ROWS):
            out[key] = permute_anchor_rows(value, order)
    return out, origin


def convert_dyhead_official(
    state: Mapping[str, Tensor], num_sizes: int = 1, num_ratios: int = 1
) -> dict[str, Tensor]:
    """Official DyHead (detectron2) state dict → dynadet keys (no shape checks here).

    ``num_sizes``/``num_ratios``: anchors per location of the model (RetinaNet 3 × 3, ATSS 1 × 1,
    the R-CNN's RPN 1 × 3); they set the predictor row permutation. Unmatched keys keep their
    names.
    """
    return _convert_official(state, num_sizes, num_ratios)[0]


def to_dyhead_official(
    state: Mapping[str, Tensor], num_sizes: int = 1, num_ratios: int = 1
) -> dict[str, Tensor]:
    """dynadet DyHead ATSS / RetinaNet / Faster R-CNN (ResNet or Swin) state dict → official
    detectron2 keys (inverse map)."""
    order = detectron2_anchor_order(num_sizes, num_ratios)
    inverse = torch.argsort(order)
    num_inputs = _count(state, r"^neck\.0\.lateral_convs\.(\d+)\.")
    rules: list[tuple[str, Replacement]] = [
        *detectron2_backbone_inverse_rules("neck.0.", 6 - num_inputs),  # the last input is res5
        (r"^neck\.1\.blocks\.(\d+)\.(.+)$", r"backbone.dyhead_tower.\1.\2"),
        *_RCNN_INVERSE_RULES,
        (
            r"^head\.(cls|reg)_tower\.(\d+)\.conv\.(weight|bias)$",
            lambda m: f"head.{'cls' if m[1] == 'cls' else 'bbox'}_subnet.{2 * int(m[2])}.{m[3]}",
        ),
    ]
    if any(k.startswith("head.cls_tower.") for k in state):  # RetinaNet; ATSS keeps cls_logits
        rules.append((r"^head\.cls_logits\.(weight|bias)$", r"head.cls_score.\1"))
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        if key.startswith("roi_head.dynamic."):  # Dynamic R-CNN statistics: not weights
            continue
        new = apply_rules(key, rules) or key
        if new.startswith("backbone.") and not new.startswith("backbone.dyhead_tower."):
            new = "backbone.backbone." + new[len("backbone.") :]
        if key.startswith("head.scales."):
            value = value.reshape(1)
        elif order.numel() > 1 and key.startswith(_ANCHOR_ROWS):
            value = permute_anchor_rows(value, inverse)
        out[new] = value
    return out


def detect_dyhead_arch(state: Mapping[str, Tensor]) -> str:
    """The dynadet preset for an official DyHead state dict, from its head and backbone keys."""
    if any(k.startswith(("roi_heads.", "proposal_generator.")) for k in state):
        return DYHEAD_OFFICIAL_PRESETS["rcnn"]
    swin = any(".bottom_up.patch_embed." in k for k in state)
    if any(k.startswith(("head.cls_score.", "head.cls_subnet.")) for k in state):
        if swin:
            raise ConversionError(
                "Swin-T + RetinaNet + DyHead has no released model or preset; pass --arch with "
                "a config"
            )
        return DYHEAD_OFFICIAL_PRESETS["retinanet"]
    if any(k.startswith("head.centerness.") for k in state):
        return DYHEAD_OFFICIAL_PRESETS["swint_atss" if swin else "atss"]
    raise ConversionError(
        "cannot tell the detector from the keys (expected head.centerness.* for ATSS, "
        "head.cls_score.* for RetinaNet or roi_heads.* for Faster R-CNN); pass --arch with a "
        "preset name or config file"
    )


def convert_dyhead_official_file(src: str | Path, dst: str | Path, arch: Arch = None) -> Path:
    """Convert an official DyHead checkpoint into a dynadet checkpoint at ``dst``.

    ``arch``: a preset name (``dyhead_r50_atss_fpn_1x``, ``dyhead_r50_retina_fpn_1x``,
    ``dyhead_r50_rcnn_fpn_1x``, ``dyhead_swint_atss_fpn_2x_ms``), a YAML config path or a config
    mapping; ``None`` picks the preset from the keys (:func:`detect_dyhead_arch`).
    """
    from dynadet.api import build_model

    state = load_source_state(src)
    if arch is None:
        arch = detect_dyhead_arch(state)
    cfg = load_config(arch)
    model = build_model(cfg)
    anchors = (model.rpn if hasattr(model, "rpn") else model.head).anchor_generator
    converted, origin = _convert_official(state, len(anchors.sizes[0]), len(anchors.ratios))
    label = str(arch) if isinstance(arch, str | Path) else "config"
    return save_converted(converted, origin, cfg, src, dst, f"dyhead-official:{label}", model)


# ----------------------------------------------------------------------------- MMDetection


_SPATIAL = {"high": 0, "mid": 1, "low": 2}


def _mmdet_rules(num_inputs: int) -> list[tuple[str, Replacement]]:
    block = r"^neck\.1\.dyhead_blocks\.(\d+)\."

    def fpn_conv(m: re.Match[str]) -> str:
        i = int(m[1])
        name = f"output_convs.{i}" if i < num_inputs else f"p{6 + i - num_inputs}"
        return f"neck.0.{name}.{m[2]}"

    return [
        (r"^backbone\.((?:conv1|bn1|layer[1-4])\..+)$", r"backbone.\1"),
        (r"^neck\.0\.lateral_convs\.(\d+)\.conv\.(weight|bias)$", r"neck.0.lateral_convs.\1.\2"),
        (r"^neck\.0\.fpn_convs\.(\d+)\.conv\.(weight|bias)$", fpn_conv),
        (
            block + r"spatial_conv_(high|mid|low)\.(conv|norm)\.(weight|bias)$",
            lambda m: f"neck.1.blocks.{m[1]}.DyConv.{_SPATIAL[m[2]]}."
            f"{'conv' if m[3] == 'conv' else 'bn'}.{m[4]}",
        ),
        (block + r"spatial_conv_offset\.(weight|bias)$", r"neck.1.blocks.\1.offset.\2"),
        (block + r"scale_attn_module\.1\.(weight|bias)$", r"neck.1.blocks.\1.AttnConv.1.\2"),
        (
            block + r"task_attn_module\.conv([12])\.conv\.(weight|bias)$",
            lambda m: f"neck.1.blocks.{m[1]}.relu.fc.{2 * int(m[2]) - 2}.{m[3]}",
        ),
        (r"^bbox_head\.atss_cls\.(weight|bias)$", r"head.cls_logits.\1"),
        (r"^bbox_head\.atss_reg\.(weight|bias)$", r"head.bbox_pred.\1"),
        (r"^bbox_head\.atss_centerness\.(weight|bias)$", r"head.centerness.\1"),
        (r"^bbox_head\.scales\.(\d+)\.scale$", r"head.scales.\1.scale"),
        (
            r"^bbox_head\.(cls|reg)_convs\.(\d+)\.(conv|gn)\.(weight|bias)$",
            lambda m: f"head.{m[1]}_tower.{m[2]}.{'conv' if m[3] == 'conv' else 'norm'}.{m[4]}",
        ),
    ]


def _count(state: Mapping[str, Tensor], pattern: str) -> int:
    return len({m[1] for k in state if (m := re.match(pattern, k))})


def _convert_mmdet(state: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, str]]:
    num_inputs = _count(state, r"^neck\.0\.lateral_convs\.(\d+)\.")
    rules = _mmdet_rules(num_inputs)
    out, origin = rename_state(state, lambda key: apply_rules(key, rules))
    for key, value in out.items():
        if key.startswith("head.scales."):
            out[key] = _scalar(value)
        elif re.search(r"\.relu\.fc\.[02]\.weight$", key) and value.dim() == 4:
            out[key] = value.flatten(1)  # 1×1 conv [o, i, 1, 1] → Linear [o, i]
    return out, origin


def convert_mmdet_dyhead(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """MMDetection ATSS + DyHead state dict → dynadet keys (no shape checks here)."""
    return _convert_mmdet(state)[0]


def to_mmdet_dyhead(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """dynadet DyHead ATSS state dict → MMDetection keys (inverse map)."""
    num_inputs = _count(state, r"^neck\.0\.output_convs\.(\d+)\.")
    names = {v: k for k, v in _SPATIAL.items()}
    block = r"^neck\.1\.blocks\.(\d+)\."
    rules: list[tuple[str, Replacement]] = [
        (r"^backbone\.(.+)$", r"backbone.\1"),
        (r"^neck\.0\.lateral_convs\.(\d+)\.(weight|bias)$", r"neck.0.lateral_convs.\1.conv.\2"),
        (r"^neck\.0\.output_convs\.(\d+)\.(weight|bias)$", r"neck.0.fpn_convs.\1.conv.\2"),
        (
            r"^neck\.0\.p([67])\.(weight|bias)$",
            lambda m: f"neck.0.fpn_convs.{num_inputs + int(m[1]) - 6}.conv.{m[2]}",
        ),
        (
            block + r"DyConv\.([012])\.(conv|bn)\.(weight|bias)$",
            lambda m: f"neck.1.dyhead_blocks.{m[1]}.spatial_conv_{names[int(m[2])]}."
            f"{'conv' if m[3] == 'conv' else 'norm'}.{m[4]}",
        ),
        (block + r"offset\.(weight|bias)$", r"neck.1.dyhead_blocks.\1.spatial_conv_offset.\2"),
        (block + r"AttnConv\.1\.(weight|bias)$", r"neck.1.dyhead_blocks.\1.scale_attn_module.1.\2"),
        (
            block + r"relu\.fc\.([02])\.(weight|bias)$",
            lambda m: f"neck.1.dyhead_blocks.{m[1]}.task_attn_module."
            f"conv{int(m[2]) // 2 + 1}.conv.{m[3]}",
        ),
        (r"^head\.cls_logits\.(weight|bias)$", r"bbox_head.atss_cls.\1"),
        (r"^head\.bbox_pred\.(weight|bias)$", r"bbox_head.atss_reg.\1"),
        (r"^head\.centerness\.(weight|bias)$", r"bbox_head.atss_centerness.\1"),
        (r"^head\.scales\.(\d+)\.scale$", r"bbox_head.scales.\1.scale"),
        (
            r"^head\.(cls|reg)_tower\.(\d+)\.(conv|norm)\.(weight|bias)$",
            lambda m: f"bbox_head.{m[1]}_convs.{m[2]}.{'conv' if m[3] == 'conv' else 'gn'}.{m[4]}",
        ),
    ]
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        if re.search(r"\.relu\.fc\.[02]\.weight$", key):
            value = value[:, :, None, None]
        out[apply_rules(key, rules) or key] = value
    return out


def convert_mmdet_file(src: str | Path, dst: str | Path, arch: Arch = None) -> Path:
    """Convert an MMDetection checkpoint into a dynadet checkpoint at ``dst``.

    Two-stage files (``rpn_head.*`` and ``roi_head.*`` keys) are converted by
    :func:`dynadet.tools.convert_rcnn.convert_mmdet_rcnn_state`; the rest must be ATSS + DyHead.
    ``arch``: a preset name, YAML path or config mapping; ``None`` → ``dyhead_r50_atss_simple_1x``
    (the "simple" setting: 3×3 predictors). The "reproduction" setting (caffe R-50, 1×1
    predictors, anchor offset 0.5, padding 128) has no preset: pass a config for it.
    """
    state = load_source_state(src)
    from dynadet.tools import convert_rcnn  # local: it imports this module

    if convert_rcnn.is_mmdet_rcnn(state):
        return convert_rcnn.convert_mmdet_rcnn_state(state, src, dst, arch)
    if not any(k.startswith("neck.1.dyhead_blocks.") for k in state):
        raise ConversionError(
            f"{src}: neither neck.1.dyhead_blocks.* (ATSS + DyHead) nor rpn_head.* / roi_head.* "
            "(Faster / Dynamic R-CNN) keys; those are the MMDetection models supported"
        )
    if arch is None:
        cls_weight = state.get("bbox_head.atss_cls.weight")
        if cls_weight is not None and cls_weight.dim() == 4 and cls_weight.shape[-1] == 1:
            raise ConversionError(
                f"{src}: 1×1 ATSS predictors (MMDetection 'reproduction' setting) do not match "
                f"the default preset {MMDET_DEFAULT_PRESET}; write a config (from "
                "dyhead_r50_atss_fpn_1x with dcn_bias: false and FPN relu_before_extra: false) "
                "and pass it with --arch"
            )
        arch = MMDET_DEFAULT_PRESET
    cfg = load_config(arch)
    converted, origin = _convert_mmdet(state)
    label = str(arch) if isinstance(arch, str | Path) else "config"
    return save_converted(converted, origin, cfg, src, dst, f"mmdet:{label}")
