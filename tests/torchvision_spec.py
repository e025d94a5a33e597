"""torchvision checkpoint layouts and seeded stand-in weights for the parity fixtures.

Pure torch (no torchvision import), so CI can rebuild exactly the state dicts and images that
``tools/make_torchvision_fixtures.py`` fed to the real torchvision models in the peer env.

Layouts (``frozen_bn``):
* ``False``: what ``<builder>(weights=None, weights_backbone=None).state_dict()`` returns; the
  backbone uses ``nn.BatchNorm2d`` (with ``num_batches_tracked``). Key counts: resnet50 320,
  fcos 372, retinanet v1 354, retinanet v2 362, fasterrcnn 348.
* ``True``: the layout of the released COCO checkpoints of FCOS, RetinaNet v1 and Faster R-CNN
  v1, whose backbone uses ``FrozenBatchNorm2d`` (weight/bias/running stats are all buffers, no
  ``num_batches_tracked``): fcos 319 keys, retinanet v1 301 keys, fasterrcnn 295 keys. RetinaNet
  v2 and resnet50 always use ``nn.BatchNorm2d``, so ``True`` is refused for them.
* ``None`` (default): the released-checkpoint layout of ``arch``.

``legacy_names=True`` gives the pre-0.13 key names that old ``.pth`` files may still carry and that
torchvision renames inside ``load_state_dict``: FPN ``inner_blocks.{i}.weight`` (for
``inner_blocks.{i}.0.weight``, same for ``layer_blocks``), RetinaNet v1 head ``conv.{2i}.*``
(for ``conv.{i}.0.*``) and Faster R-CNN ``rpn.head.conv.*`` (for ``rpn.head.conv.0.0.*``; the
hosted ``fasterrcnn_resnet50_fpn_coco-258fb6c6.pth`` uses these old names).
"""

from __future__ import annotations

import math
import zlib

import torch
from torch import Tensor

ARCHS = (
    "resnet50",
    "fcos_resnet50_fpn",
    "retinanet_resnet50_fpn",
    "retinanet_resnet50_fpn_v2",
    "fasterrcnn_resnet50_fpn",
)
RELEASED_FROZEN_BN = ("fcos_resnet50_fpn", "retinanet_resnet50_fpn", "fasterrcnn_resnet50_fpn")
NUM_CLASSES_91 = 91
NUM_ANCHORS = 9  # RetinaNet: 3 scales x 3 aspect ratios per location
RPN_ANCHORS = 3  # Faster R-CNN: one size per level x 3 aspect ratios
FPN_CHANNELS = 256
RCNN_FC = 1024  # TwoMLPHead width

_COCO_80 = (
    (1, "person"), (2, "bicycle"), (3, "car"), (4, "motorcycle"), (5, "airplane"), (6, "bus"),
    (7, "train"), (8, "truck"), (9, "boat"), (10, "traffic light"), (11, "fire hydrant"),
    (13, "stop sign"), (14, "parking meter"), (15, "bench"), (16, "bird"), (17, "cat"),
    (18, "dog"), (19, "horse"), (20, "sheep"), (21, "cow"), (22, "elephant"), (23, "bear"),
    (24, "zebra"), (25, "giraffe"), (27, "backpack"), (28, "umbrella"), (31, "handbag"),
    (32, "tie"), (33, "suitcase"), (34, "frisbee"), (35, "skis"), (36, "snowboard"),
    (37, "sports ball"), (38, "kite"), (39, "baseball bat"), (40, "baseball glove"),
    (41, "skateboard"), (42, "surfboard"), (43, "tennis racket"), (44, "bottle"),
    (46, "wine glass"), (47, "cup"), (48, "fork"), (49, "knife"), (50, "spoon"), (51, "bowl"),
    (52, "banana"), (53, "apple"), (54, "sandwich"), (55, "orange"), (56, "broccoli"),
    (57, "carrot"), (58, "hot dog"), (59, "pizza"), (60, "donut"), (61, "cake"), (62, "chair"),
    (63, "couch"), (64, "potted plant"), (65, "bed"), (67, "dining table"), (70, "toilet"),
    (72, "tv"), (73, "laptop"), (74, "mouse"), (75, "remote"), (76, "keyboard"),
    (77, "cell phone"), (78, "microwave"), (79, "oven"), (80, "toaster"), (81, "sink"),
    (82, "refrigerator"), (84, "book"), (85, "clock"), (86, "vase"), (87, "scissors"),
    (88, "teddy bear"), (89, "hair drier"), (90, "toothbrush"),
)  # fmt: skip

#: The 80 COCO category ids (sorted, 1..90); contiguous class k <-> COCO id COCO_CATEGORY_IDS[k].
COCO_CATEGORY_IDS: tuple[int, ...] = tuple(i for i, _ in _COCO_80)
#: COCO ids that torchvision's 91-way heads carry but that no COCO class uses (0 = background).
UNUSED_91_IDS: tuple[int, ...] = tuple(i for i in range(91) if i not in COCO_CATEGORY_IDS)
#: torchvision's 91-entry category list: index = COCO id, '__background__' at 0, 'N/A' gaps.
COCO_91_CLASS_NAMES: tuple[str, ...] = tuple(
    "__background__" if i == 0 else dict(_COCO_80).get(i, "N/A") for i in range(91)
)

# Each fixture: model seed, images (seed, height, width), CI-sized model kwargs and BN handling.
# Two odd, different image sizes so that resizing, batching and padding are all exercised.
_DET_IMAGES = ((1001, 301, 397), (1002, 263, 410))
_DET_KWARGS = {"min_size": 320, "max_size": 512}
# Faster R-CNN's random classifier favours a few classes per image (fixed offsets w_c · E[x]);
# these two images give both a few dozen detections (tuned in the peer env).
_RCNN_IMAGES = ((1005, 301, 397), (1006, 263, 410))
FIXTURE_CASES: dict[str, dict] = {
    "resnet50": {
        "arch": "resnet50", "seed": 0, "input_seed": 1000, "input_size": (64, 96),
        "frozen_bn": False, "frozen_bn_eps": None, "file": "torchvision_resnet50.pt",
    },
    "fcos_resnet50_fpn": {
        "arch": "fcos_resnet50_fpn", "seed": 0, "images": _DET_IMAGES,
        "model_kwargs": dict(_DET_KWARGS), "frozen_bn": True, "frozen_bn_eps": 1e-5,
        "file": "torchvision_fcos_resnet50_fpn.pt",
    },
    # torchvision's COCO_V1 RetinaNet weights run FrozenBN with eps 0.0 (overwrite_eps).
    "retinanet_resnet50_fpn": {
        "arch": "retinanet_resnet50_fpn", "seed": 0, "images": _DET_IMAGES,
        "model_kwargs": dict(_DET_KWARGS), "frozen_bn": True, "frozen_bn_eps": 0.0,
        "file": "torchvision_retinanet_resnet50_fpn.pt",
    },
    # v2 keeps plain BatchNorm2d (eps 1e-5) in the backbone; run in eval mode.
    "retinanet_resnet50_fpn_v2": {
        "arch": "retinanet_resnet50_fpn_v2", "seed": 0, "images": _DET_IMAGES,
        "model_kwargs": dict(_DET_KWARGS), "frozen_bn": False, "frozen_bn_eps": None,
        "file": "torchvision_retinanet_resnet50_fpn_v2.pt",
    },
    # Like RetinaNet v1, the COCO_V1 Faster R-CNN runs FrozenBN with eps 0.0 (overwrite_eps).
    "fasterrcnn_resnet50_fpn": {
        "arch": "fasterrcnn_resnet50_fpn", "seed": 0, "images": _RCNN_IMAGES,
        "model_kwargs": dict(_DET_KWARGS), "frozen_bn": True, "frozen_bn_eps": 0.0,
        "file": "torchvision_fasterrcnn_resnet50_fpn.pt",
    },
}  # fmt: skip

Spec = dict[str, tuple[int, ...]]


def _check_layout(arch: str, frozen_bn: bool | None) -> bool:
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; expected one of {ARCHS}")
    released_frozen = arch in RELEASED_FROZEN_BN
    if frozen_bn is None:
        return released_frozen
    if frozen_bn and not released_frozen:
        raise ValueError(f"{arch} always uses nn.BatchNorm2d; frozen_bn=True is not a layout")
    return frozen_bn


def _norm(spec: Spec, prefix: str, channels: int, kind: str) -> None:
    """Append a norm layer: 'bn' (BatchNorm2d), 'frozen_bn' (FrozenBatchNorm2d) or 'gn'."""
    spec[f"{prefix}.weight"] = (channels,)
    spec[f"{prefix}.bias"] = (channels,)
    if kind in ("bn", "frozen_bn"):
        spec[f"{prefix}.running_mean"] = (channels,)
        spec[f"{prefix}.running_var"] = (channels,)
    if kind == "bn":
        spec[f"{prefix}.num_batches_tracked"] = ()


def _resnet50(spec: Spec, prefix: str, bn: str, with_fc: bool) -> None:
    spec[f"{prefix}conv1.weight"] = (64, 3, 7, 7)
    _norm(spec, f"{prefix}bn1", 64, bn)
    in_ch = 64
    for stage, blocks in enumerate((3, 4, 6, 3), start=1):
        width = 64 * 2 ** (stage - 1)
        out_ch = 4 * width
        for b in range(blocks):
            p = f"{prefix}layer{stage}.{b}"
            spec[f"{p}.conv1.weight"] = (width, in_ch if b == 0 else out_ch, 1, 1)
            _norm(spec, f"{p}.bn1", width, bn)
            spec[f"{p}.conv2.weight"] = (width, width, 3, 3)
            _norm(spec, f"{p}.bn2", width, bn)
            spec[f"{p}.conv3.weight"] = (out_ch, width, 1, 1)
            _norm(spec, f"{p}.bn3", out_ch, bn)
            if b == 0:
                spec[f"{p}.downsample.0.weight"] = (out_ch, in_ch, 1, 1)
                _norm(spec, f"{p}.downsample.1", out_ch, bn)
        in_ch = out_ch
    if with_fc:
        spec[f"{prefix}fc.weight"] = (1000, 2048)
        spec[f"{prefix}fc.bias"] = (1000,)


def _fpn(spec: Spec, in_channels: tuple[int, ...], p6_in: int | None, legacy: bool) -> None:
    """FPN convs; ``p6_in`` is the P6 conv's input width (``None``: LastLevelMaxPool, no P6/P7)."""
    sub = "" if legacy else ".0"
    for block, shapes in (
        ("inner_blocks", [(256, c, 1, 1) for c in in_channels]),
        ("layer_blocks", [(256, 256, 3, 3)] * len(in_channels)),
    ):
        for i, shape in enumerate(shapes):
            spec[f"backbone.fpn.{block}.{i}{sub}.weight"] = shape
            spec[f"backbone.fpn.{block}.{i}{sub}.bias"] = (256,)
    if p6_in is None:
        return
    for name, c_in in (("p6", p6_in), ("p7", 256)):
        spec[f"backbone.fpn.extra_blocks.{name}.weight"] = (256, c_in, 3, 3)
        spec[f"backbone.fpn.extra_blocks.{name}.bias"] = (256,)


def _rcnn(spec: Spec, legacy: bool) -> None:
    """RPNHead (3x3 conv + ReLU, 1x1 objectness and deltas), TwoMLPHead, FastRCNNPredictor."""
    conv = "rpn.head.conv" if legacy else "rpn.head.conv.0.0"
    spec[f"{conv}.weight"] = (256, 256, 3, 3)
    spec[f"{conv}.bias"] = (256,)
    spec["rpn.head.cls_logits.weight"] = (RPN_ANCHORS, 256, 1, 1)
    spec["rpn.head.cls_logits.bias"] = (RPN_ANCHORS,)
    spec["rpn.head.bbox_pred.weight"] = (4 * RPN_ANCHORS, 256, 1, 1)
    spec["rpn.head.bbox_pred.bias"] = (4 * RPN_ANCHORS,)
    for name, fan_in in (("fc6", 256 * 7 * 7), ("fc7", RCNN_FC)):
        spec[f"roi_heads.box_head.{name}.weight"] = (RCNN_FC, fan_in)
        spec[f"roi_heads.box_head.{name}.bias"] = (RCNN_FC,)
    for name, rows in (("cls_score", NUM_CLASSES_91), ("bbox_pred", 4 * NUM_CLASSES_91)):
        spec[f"roi_heads.box_predictor.{name}.weight"] = (rows, RCNN_FC)
        spec[f"roi_heads.box_predictor.{name}.bias"] = (rows,)


def _tower(spec: Spec, prefix: str, arch: str, legacy: bool) -> None:
    """Four 3x3 256->256 convs; layout depends on the head variant."""
    for i in range(4):
        if arch == "fcos_resnet50_fpn":  # Sequential(conv, GN, ReLU) x 4, flat
            spec[f"{prefix}.conv.{3 * i}.weight"] = (256, 256, 3, 3)
            spec[f"{prefix}.conv.{3 * i}.bias"] = (256,)
            _norm(spec, f"{prefix}.conv.{3 * i + 1}", 256, "gn")
        elif arch == "retinanet_resnet50_fpn":  # Conv2dNormActivation(conv+bias, ReLU)
            name = f"conv.{2 * i}" if legacy else f"conv.{i}.0"
            spec[f"{prefix}.{name}.weight"] = (256, 256, 3, 3)
            spec[f"{prefix}.{name}.bias"] = (256,)
        else:  # v2: Conv2dNormActivation(conv no bias, GN(32), ReLU)
            spec[f"{prefix}.conv.{i}.0.weight"] = (256, 256, 3, 3)
            _norm(spec, f"{prefix}.conv.{i}.1", 256, "gn")


def _head(spec: Spec, arch: str, legacy: bool) -> None:
    anchors = 1 if arch == "fcos_resnet50_fpn" else NUM_ANCHORS
    cls, reg = "head.classification_head", "head.regression_head"
    _tower(spec, cls, arch, legacy)
    spec[f"{cls}.cls_logits.weight"] = (anchors * NUM_CLASSES_91, 256, 3, 3)
    spec[f"{cls}.cls_logits.bias"] = (anchors * NUM_CLASSES_91,)
    _tower(spec, reg, arch, legacy)
    spec[f"{reg}.bbox_reg.weight"] = (anchors * 4, 256, 3, 3)
    spec[f"{reg}.bbox_reg.bias"] = (anchors * 4,)
    if arch == "fcos_resnet50_fpn":
        spec[f"{reg}.bbox_ctrness.weight"] = (1, 256, 3, 3)
        spec[f"{reg}.bbox_ctrness.bias"] = (1,)


def torchvision_state_dict_spec(
    arch: str, frozen_bn: bool | None = None, legacy_names: bool = False
) -> dict[str, tuple[int, ...]]:
    """Ordered key -> shape of torchvision's ``state_dict()`` for ``arch`` (91 classes).

    ``frozen_bn``/``legacy_names``: see the module docstring. ``num_batches_tracked`` has shape
    ``()`` (int64); everything else is float32.
    """
    frozen = _check_layout(arch, frozen_bn)
    if legacy_names and arch == "retinanet_resnet50_fpn_v2":
        raise ValueError("retinanet_resnet50_fpn_v2 postdates the legacy key names")
    spec: Spec = {}
    bn = "frozen_bn" if frozen else "bn"
    if arch == "resnet50":
        if legacy_names:
            raise ValueError("resnet50 has no legacy key names")
        _resnet50(spec, "", bn, with_fc=True)
        return spec
    _resnet50(spec, "backbone.body.", bn, with_fc=False)
    if arch == "fasterrcnn_resnet50_fpn":
        _fpn(spec, (256, 512, 1024, 2048), None, legacy_names)
        _rcnn(spec, legacy_names)
        return spec
    _fpn(spec, (512, 1024, 2048), 2048 if arch == "retinanet_resnet50_fpn_v2" else 256,
         legacy_names)
    _head(spec, arch, legacy_names)
    return spec


def torchvision_buffer_keys(arch: str, frozen_bn: bool | None = None) -> set[str]:
    """Keys of the spec that are registered buffers, not ``nn.Parameter``s.

    BatchNorm2d: running_mean / running_var / num_batches_tracked. FrozenBatchNorm2d: all of
    weight, bias, running_mean, running_var (so torchvision's published ``num_params`` of the
    FrozenBN models excludes the 53,120 backbone affine values).
    """
    frozen = _check_layout(arch, frozen_bn)
    spec = torchvision_state_dict_spec(arch, frozen)
    # ResNet convs have no bias, so every 1-D backbone tensor belongs to a norm layer.
    return {
        key
        for key, shape in spec.items()
        if key.rsplit(".", 1)[-1] in ("running_mean", "running_var", "num_batches_tracked")
        or (frozen and key.startswith("backbone.body.") and len(shape) == 1)
    }


def torchvision_num_params(arch: str, frozen_bn: bool | None = None) -> int:
    """Number of parameter (non-buffer) elements: torchvision's ``num_params`` meta value."""
    spec = torchvision_state_dict_spec(arch, frozen_bn)
    buffers = torchvision_buffer_keys(arch, frozen_bn)
    return sum(math.prod(s) for k, s in spec.items() if k not in buffers)


# ------------------------------------------------------------------------------------------------
# Seeded values
# ------------------------------------------------------------------------------------------------

# Predictor scales, tuned in the peer env (tools/make_torchvision_fixtures.py reports the result)
# so the random network yields a few dozen to a few hundred detections per image, spread over
# classes and levels, with unsaturated scores. For part in cls/reg/ctr: weight std =
# {part}_gain / sqrt(fan_in); bias = {part}_bias + zero-mean uniform with std {part}_jitter.
_HEAD_TUNING: dict[str, dict[str, float]] = {
    "fcos_resnet50_fpn": {
        "cls_gain": 6.0, "cls_bias": -7.8, "cls_jitter": 0.1, "reg_gain": 1.0, "reg_bias": 2.0,
        "reg_jitter": 0.3, "ctr_gain": 3.0, "ctr_bias": 0.0, "ctr_jitter": 0.0,
    },
    "retinanet_resnet50_fpn": {
        "cls_gain": 6.0, "cls_bias": -8.1, "cls_jitter": 0.1, "reg_gain": 0.15, "reg_bias": 0.0,
        "reg_jitter": 0.02,
    },
    "retinanet_resnet50_fpn_v2": {
        "cls_gain": 6.0, "cls_bias": -9.1, "cls_jitter": 0.1, "reg_gain": 0.2, "reg_bias": 0.0,
        "reg_jitter": 0.02,
    },
    # rpn_*: RPN objectness / deltas; cls/reg: the R-CNN classifier and class-specific deltas
    # (the latter divided by the box coder weights 10, 10, 5, 5); bg_bias: background logit.
    "fasterrcnn_resnet50_fpn": {
        "rpn_cls_gain": 4.0, "rpn_cls_bias": 0.0, "rpn_cls_jitter": 0.5, "rpn_reg_gain": 0.3,
        "rpn_reg_bias": 0.0, "rpn_reg_jitter": 0.02, "cls_gain": 2.2, "cls_bias": 0.0,
        "cls_jitter": 0.3, "bg_bias": 9.6, "reg_gain": 2.0, "reg_bias": 0.0, "reg_jitter": 0.1,
    },
}  # fmt: skip
UNUSED_CLASS_BIAS = -30.0
# A few BatchNorm channels get running_var ~ LOW_VAR (as dead-ish channels of trained networks do)
# so that the norm's eps is visible in the outputs: eps 0 vs 1e-5 rescales them by ~2-5 %.
LOW_VAR = 1e-4
LOW_VAR_FRACTION = 1 / 16


def _generator(key: str, seed: int) -> torch.Generator:
    # torch's CPU generator (mt19937) keeps only the low 32 bits of a seed, so key and seed are
    # hashed together into 32 bits rather than packed side by side.
    g = torch.Generator()
    g.manual_seed(zlib.crc32(f"{key}#{seed}".encode()))
    return g


def _uniform(
    g: torch.Generator, shape: tuple[int, ...], lo: float, hi: float, dtype=torch.float32
) -> Tensor:
    # Uniform draws plus separate (never fused) IEEE mul/add are bit-reproducible across CPU
    # builds and SIMD levels, unlike normal_(), whose vectorised Box-Muller path is not.
    return torch.rand(shape, generator=g, dtype=dtype).mul_(hi - lo).add_(lo)


def _sym(g: torch.Generator, shape: tuple[int, ...], std: float) -> Tensor:
    """Zero-mean uniform with standard deviation ``std``."""
    a = std * math.sqrt(3.0)
    return _uniform(g, shape, -a, a)


def _low_var_channels(module: str, channels: int, seed: int) -> Tensor:
    """Boolean mask of the BatchNorm channels given a tiny running_var (and a matching weight)."""
    g = _generator(f"{module}#low_var", seed)
    return torch.rand(channels, generator=g) < LOW_VAR_FRACTION


def _value(arch: str, key: str, spec: Spec, seed: int) -> Tensor:
    shape = spec[key]
    module, leaf = key.rsplit(".", 1)
    g = _generator(key, seed)
    if leaf == "num_batches_tracked":
        return torch.zeros((), dtype=torch.int64)
    if leaf == "running_mean":
        return _sym(g, shape, 0.1)
    if leaf == "running_var":
        var = _uniform(g, shape, 0.5, 2.0)
        low = _low_var_channels(module, shape[0], seed)
        return torch.where(low, var * (LOW_VAR / 0.5), var)  # U(LOW_VAR, 4 LOW_VAR) there
    if module in _RCNN_PREDICTOR_PART:
        return _rcnn_predictor(arch, module, leaf, shape, g)
    if module.endswith(("cls_logits", "bbox_reg", "bbox_ctrness")):
        return _predictor(arch, module, leaf, shape, g)
    is_norm = len(spec[f"{module}.weight"]) == 1  # conv/fc weights are 4-D/2-D
    if is_norm and leaf == "weight":
        # Damp the last norm of each residual branch so the residual stream does not blow up.
        bn3 = module.endswith("bn3")
        weight = _uniform(g, shape, 0.0, 0.3) if bn3 else _uniform(g, shape, 0.5, 1.0)
        if f"{module}.running_var" not in spec:  # GroupNorm
            return weight
        # Keep weight / sqrt(running_var) O(1) on the low-variance channels.
        low = _low_var_channels(module, shape[0], seed)
        return torch.where(low, weight * math.sqrt(2 * LOW_VAR), weight)
    if leaf == "bias":
        return _sym(g, shape, 0.1 if is_norm else 0.05)
    fan_in = math.prod(shape[1:])
    # Convs feeding a ReLU get the He gain; the FPN lateral/output convs, P6 and fc are linear.
    linear = module == "fc" or ".inner_blocks." in key or ".layer_blocks." in key
    linear = linear or module.endswith("extra_blocks.p6")
    return _sym(g, shape, math.sqrt((1.0 if linear else 2.0) / fan_in))


_PREDICTOR_PART = {"cls_logits": "cls", "bbox_reg": "reg", "bbox_ctrness": "ctr"}


def _predictor(
    arch: str, module: str, leaf: str, shape: tuple[int, ...], g: torch.Generator
) -> Tensor:
    tune = _HEAD_TUNING[arch]
    part = _PREDICTOR_PART[module.rsplit(".", 1)[-1]]
    gain, mean = tune[f"{part}_gain"], tune[f"{part}_bias"]
    if leaf == "weight":
        std = gain / math.sqrt(math.prod(shape[1:]))
        if part != "cls":
            return _sym(g, shape, std)
        # Every 3x3 kernel sums to zero, so spatially constant input (each channel's mean, which
        # a random network makes as large as its spatial variation) adds nothing to the logits.
        # Otherwise each class row gets a fixed offset and a few classes take every detection.
        a = std * math.sqrt(3.0)
        w = _uniform(g, shape, -a, a, torch.float64)
        return (w - w.mean((2, 3), keepdim=True)).mul_(math.sqrt(9 / 8)).to(torch.float32)
    bias = mean + _sym(g, shape, tune[f"{part}_jitter"])
    if part == "cls":
        rows = bias.view(-1, NUM_CLASSES_91)  # row a*91 + id <-> anchor a, COCO id
        rows[:, list(UNUSED_91_IDS)] = UNUSED_CLASS_BIAS
    return bias


_RCNN_PREDICTOR_PART = {
    "rpn.head.cls_logits": "rpn_cls",
    "rpn.head.bbox_pred": "rpn_reg",
    "roi_heads.box_predictor.cls_score": "cls",
    "roi_heads.box_predictor.bbox_pred": "reg",
}


def _rcnn_predictor(
    arch: str, module: str, leaf: str, shape: tuple[int, ...], g: torch.Generator
) -> Tensor:
    tune = _HEAD_TUNING[arch]
    part = _RCNN_PREDICTOR_PART[module]
    if leaf == "weight":
        w = _sym(g, shape, tune[f"{part}_gain"] / math.sqrt(math.prod(shape[1:])))
        if part != "cls":
            return w
        # fc7 features are ReLU outputs, so their common positive part would give every class a
        # fixed offset; rows that sum to zero (second half = minus the first, no reduction, so
        # bit-reproducible) see only the variation. Background / 'N/A' rows see nothing.
        half = shape[1] // 2
        w[:, half:] = -w[:, :half]
        w[list(UNUSED_91_IDS[1:])] = 0.0
        return w
    bias = tune[f"{part}_bias"] + _sym(g, shape, tune[f"{part}_jitter"])
    if part == "cls":
        bias[0] = tune["bg_bias"]  # torchvision's background row
        bias[list(UNUSED_91_IDS[1:])] = UNUSED_CLASS_BIAS
    return bias


def seeded_state_dict(
    arch: str, seed: int = 0, frozen_bn: bool | None = None, legacy_names: bool = False
) -> dict[str, Tensor]:
    """Deterministic stand-in weights with the exact torchvision keys and shapes.

    Each tensor comes from its own ``torch.Generator`` seeded with ``crc32(f"{key}#{seed}")``
    (order independent: a key has the same value in every arch, except the predictors), drawn
    as float32 from uniform distributions (bit-reproducible across CPU builds); only
    ``num_batches_tracked`` is int64 (0). Scales keep a random network well conditioned:
    convs zero-mean with std sqrt(2/fan_in) (sqrt(1/fan_in) for the linear FPN convs and P6),
    norm weights U(0.5, 1) except bn3 U(0, 0.3) (tames the residual stream), biases std 0.1
    (conv biases 0.05), running_mean std 0.1, running_var U(0.5, 2). In each BatchNorm about
    1/16 of the channels get running_var U(1e-4, 4e-4) and a weight scaled by sqrt(2e-4): with
    eps 0 the layer is unchanged, but the norm's eps (0 for RetinaNet v1's COCO weights, 1e-5
    elsewhere) now moves the detections well past the parity tolerances.

    Predictors (``_HEAD_TUNING``, tuned in the peer env) give a few dozen to a few hundred
    detections per image over many classes, with spread, unsaturated scores. The class
    predictor's 3x3 kernels each sum to zero, so a channel's spatially constant part (as large
    as its spatial variation in a random network) gives no class a fixed head start. The bias
    of every row that belongs to COCO id 0 (background) or a 'N/A' id (12, 26, 29, 30, 45, 66,
    68, 69, 71, 83) is -30 for every anchor (row ``a*91 + id``): dynadet maps torchvision's
    91-way layout onto 80 contiguous classes and drops those rows, which real trained weights
    never score above the threshold either; here they can never reach it, so both models see
    the same detections.

    Faster R-CNN (``_rcnn_predictor``): the RPN objectness / deltas and the R-CNN regressor are
    zero-mean uniform with std ``gain / sqrt(fan_in)``; the classifier's rows sum to zero (the
    second half of each row is minus the first), its 'N/A' rows are zero with bias -30 (so they
    add nothing to the softmax dynadet computes over 81 instead of 91 classes), and the
    background row 0 keeps random weights with a large bias, so that a few dozen RoIs per image
    pass the 0.05 score threshold.

    Returns: key -> Tensor, in torchvision's ``state_dict()`` order.
    """
    spec = torchvision_state_dict_spec(arch, frozen_bn, legacy_names)
    canonical_spec = torchvision_state_dict_spec(arch, frozen_bn)
    out: dict[str, Tensor] = {}
    # Hundreds of small elementwise ops: one thread is several times faster than a contended
    # OpenMP team, and the values do not depend on it.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        # Legacy names carry the same values as their modern counterparts (same order, shapes).
        for key, seed_key in zip(spec, canonical_spec, strict=True):
            out[key] = _value(arch, seed_key, canonical_spec, seed)
    finally:
        torch.set_num_threads(threads)
    return out


def seeded_image(seed: int, height: int, width: int) -> Tensor:
    """Deterministic structured test image, shape [3, height, width], float32 in [0, 1].

    Smooth colour gradient + random rectangles + soft blobs + small noise, so the network sees
    edges and regions rather than white noise. Built in float64 from uniform draws.
    """
    g = _generator("image", seed)
    f64 = torch.float64
    ys = torch.arange(height, dtype=torch.float64).view(1, -1, 1) / height
    xs = torch.arange(width, dtype=torch.float64).view(1, 1, -1) / width
    base = _uniform(g, (3, 1, 1), 0.25, 0.75, f64)
    slope = _uniform(g, (3, 2, 1), -0.3, 0.3, f64)
    img = base + slope[:, :1] * (ys - 0.5) + slope[:, 1:] * (xs - 0.5)
    img = img.expand(3, height, width).clone()
    for _ in range(10):  # rectangles, painted in order (later ones on top)
        y0, x0 = _uniform(g, (2,), 0.0, 0.85, f64).tolist()
        h, w = _uniform(g, (2,), 0.08, 0.45, f64).tolist()
        colour = _uniform(g, (3, 1, 1), 0.0, 1.0, f64)
        inside = ((ys >= y0) & (ys < y0 + h) & (xs >= x0) & (xs < x0 + w)).to(torch.float64)
        img = img * (1 - 0.85 * inside) + 0.85 * inside * colour
    for _ in range(5):  # soft blobs
        cy, cx = _uniform(g, (2,), 0.0, 1.0, f64).tolist()
        r = _uniform(g, (1,), 0.04, 0.15, f64).item()
        amp = _uniform(g, (3, 1, 1), -0.4, 0.4, f64)
        img = img + amp * torch.exp(-((ys - cy) ** 2 + (xs - cx) ** 2) / (2 * r * r))
    img = img + _uniform(g, (3, height, width), -0.04, 0.04, f64)
    return img.clamp(0.0, 1.0).to(torch.float32)
