"""Generate the torchvision parity fixtures ``tests/fixtures/torchvision_<arch>.pt``.

Runs ONLY in the peer env (full PyPI torch 2.13 + torchvision 0.28 with compiled CPU ops), from the
repository root (about a minute on 2 CPU cores):

    $(bash ../shared/tools/peer-env.sh)/bin/python tools/make_torchvision_fixtures.py [ARCH ...]

For each arch it checks that ``tests/torchvision_spec.py`` describes torchvision's real state-dict
layout (keys, shapes, dtypes, parameters vs buffers, legacy names, published parameter counts and
category names), loads the seeded weights, runs the model in eval mode on the seeded images (one
batch) and saves torchvision's detections plus small intermediates, all plain tensors / ints /
floats / strs / None (``torch.load(weights_only=True)``). It also reports how well conditioned the
outputs are (counts, score range and gaps, caps, threshold margins, float64 agreement, eps
sensitivity) and stores that report under "conditioning".

Detector fixture (N = 2 images, batch padded to 320x512; levels P3..P7 = 0..4):
  arch, seed, versions, frozen_bn, frozen_bn_eps (None: plain BatchNorm2d), model_kwargs,
  postprocess {score_thresh, nms_thresh, detections_per_img, topk_candidates},
  image_seeds [N], image_sizes [N,2] (h, w), image_samples [3,h/16,w/16] x N, image_sums [N] f64,
  batch_shape [4], resized_sizes [N,2], batch_sample = normalised padded batch[:, :, ::16, ::16],
  body {C3,C4,C5: shape, mean [N,C] (spatial mean), sample = f[:, :8, ::5, ::5]},
  fpn {P3..P7: shape, mean [N,256], sample = f[:, :8, ::7, ::7]},
  head {num_anchors_per_level [5], anchor_index [40] (8 evenly spaced per level, index into the
        concatenated H*W*A axis), anchors [N,40,4], cls_logits [N,40,91], bbox_regression
        [N,40,4], bbox_ctrness [N,40,1] (FCOS)},
  detections [N] x {boxes [K,4] (original image coords), scores [K], labels [K] (COCO ids),
        level [K], anchor_index [K], cls_logit [K] (logit of its label), bbox_regression [K,4],
        bbox_ctrness [K] (FCOS)},
  state_dict_fingerprint {keys, sum [S] f64, sum_sq [S] f64}, conditioning {...}.
Near-equal scores (gaps down to ~1e-7) exist: compare detections order-independently.
resnet50 fixture: input [1,3,64,96], layers {layer1..4: shape, mean [C], sample}, logits [1,1000].

fasterrcnn_resnet50_fpn fixture (N = 2 images as above; body C2..C5, fpn P2..P6):
  the common keys above (postprocess adds rpn_{pre,post}_nms_top_n, rpn_nms_thresh), plus
  rpn {num_anchors_per_level [5], anchor_index [40], anchors [N,40,4], objectness [N,40],
       deltas [N,40,4], proposals [N] x [P_i,4], proposal_scores [N] x [P_i] (sigmoid, kept order)},
  roi {proposal_index [8], class_logits [N,8,91], box_regression [N,8,364]} (the first 8 RoIs),
  detections [N] x {boxes, scores, labels (COCO ids), proposal_index [K], cls_logit [K]}.
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from torchvision.models import resnet50
from torchvision.models._meta import _COCO_CATEGORIES
from torchvision.models.detection import (
    FCOS,
    FasterRCNN,
    FasterRCNN_ResNet50_FPN_Weights,
    FCOS_ResNet50_FPN_Weights,
    RetinaNet,
    RetinaNet_ResNet50_FPN_V2_Weights,
    RetinaNet_ResNet50_FPN_Weights,
    fasterrcnn_resnet50_fpn,
    fcos_resnet50_fpn,
    retinanet_resnet50_fpn,
    retinanet_resnet50_fpn_v2,
)
from torchvision.models.detection._utils import overwrite_eps
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.models.detection.rpn import concat_box_prediction_layers
from torchvision.ops import boxes as box_ops
from torchvision.ops.feature_pyramid_network import LastLevelP6P7
from torchvision.ops.misc import FrozenBatchNorm2d

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
import torchvision_spec as spec  # noqa: E402

FIXTURES = ROOT / "tests" / "fixtures"
BUILDERS = {
    "fcos_resnet50_fpn": (fcos_resnet50_fpn, FCOS_ResNet50_FPN_Weights.COCO_V1),
    "retinanet_resnet50_fpn": (retinanet_resnet50_fpn, RetinaNet_ResNet50_FPN_Weights.COCO_V1),
    "retinanet_resnet50_fpn_v2": (
        retinanet_resnet50_fpn_v2,
        RetinaNet_ResNet50_FPN_V2_Weights.COCO_V1,
    ),
    "fasterrcnn_resnet50_fpn": (fasterrcnn_resnet50_fpn, FasterRCNN_ResNet50_FPN_Weights.COCO_V1),
}
LEVELS = ("0", "1", "2", "p6", "p7")  # torchvision's FPN output names for P3..P7
ANCHORS_PER_LEVEL_SAMPLED = 8


# ------------------------------------------------------------------------------------------------
# Layout checks
# ------------------------------------------------------------------------------------------------


def build(arch: str, frozen_bn: bool, **kwargs) -> nn.Module:
    """torchvision model for arch with random init; frozen_bn mirrors the COCO-weights build."""
    if arch == "resnet50":
        return resnet50(weights=None)
    if not frozen_bn:
        return BUILDERS[arch][0](weights=None, weights_backbone=None, **kwargs)
    # What fcos_resnet50_fpn / retinanet_resnet50_fpn build when weights are given (is_trained):
    # FrozenBatchNorm2d backbone, 3 trainable layers, P6/P7 from P5.
    body = resnet50(weights=None, norm_layer=FrozenBatchNorm2d)
    if arch == "fasterrcnn_resnet50_fpn":  # C2-C5 + LastLevelMaxPool (the extractor's default)
        return FasterRCNN(_resnet_fpn_extractor(body, 3), spec.NUM_CLASSES_91, **kwargs)
    backbone = _resnet_fpn_extractor(
        body, 3, returned_layers=[2, 3, 4], extra_blocks=LastLevelP6P7(256, 256)
    )
    cls = FCOS if arch == "fcos_resnet50_fpn" else RetinaNet
    return cls(backbone, spec.NUM_CLASSES_91, **kwargs)


def check_layout(arch: str, frozen_bn: bool) -> int:
    model = build(arch, frozen_bn)
    expected = spec.torchvision_state_dict_spec(arch, frozen_bn)
    actual = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert list(actual.items()) == list(expected.items()), _diff(actual, expected)
    for key, value in model.state_dict().items():
        want = torch.int64 if key.endswith("num_batches_tracked") else torch.float32
        assert value.dtype == want, (key, value.dtype)
    buffers = spec.torchvision_buffer_keys(arch, frozen_bn)
    params = [k for k, _ in model.named_parameters()]
    assert params == [k for k in expected if k not in buffers], f"{arch}: parameter keys differ"
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == spec.torchvision_num_params(arch, frozen_bn), (n_params, arch)
    seeded = spec.seeded_state_dict(arch, frozen_bn=frozen_bn)
    model.load_state_dict(seeded, strict=True)
    if arch != "resnet50" and arch != "retinanet_resnet50_fpn_v2":
        # Pre-0.13 names load through torchvision's own upgrade path to the same values.
        legacy = spec.seeded_state_dict(arch, frozen_bn=frozen_bn, legacy_names=True)
        assert list(legacy) != list(seeded)
        fresh = build(arch, frozen_bn)
        fresh.load_state_dict(legacy, strict=True)
        for key, value in fresh.state_dict().items():
            assert torch.equal(value, seeded[key]), key
    return len(expected)


def _diff(actual: dict, expected: dict) -> str:
    missing = [k for k in expected if k not in actual][:5]
    extra = [k for k in actual if k not in expected][:5]
    bad = [(k, actual[k], expected[k]) for k in actual if expected.get(k, actual[k]) != actual[k]]
    return f"missing {missing} extra {extra} shape mismatches {bad[:5]}"


def check_published(arch: str) -> None:
    assert list(spec.COCO_91_CLASS_NAMES) == list(_COCO_CATEGORIES)
    if arch == "resnet50":
        from torchvision.models import ResNet50_Weights

        assert ResNet50_Weights.IMAGENET1K_V1.meta["num_params"] == spec.torchvision_num_params(
            arch
        )
        return
    meta = BUILDERS[arch][1].meta
    assert meta["num_params"] == spec.torchvision_num_params(arch), (arch, meta["num_params"])
    assert list(meta["categories"]) == list(spec.COCO_91_CLASS_NAMES)


# ------------------------------------------------------------------------------------------------
# Fixtures
# ------------------------------------------------------------------------------------------------


def fingerprint(state_dict: dict[str, Tensor]) -> dict:
    """Per-key float64 sums and sums of squares, to check CI regenerates identical weights."""
    keys = list(state_dict)
    values = [state_dict[k].double() for k in keys]
    return {
        "keys": keys,
        "sum": torch.stack([v.sum() for v in values]),
        "sum_sq": torch.stack([v.square().sum() for v in values]),
    }


def make_resnet50(case: dict) -> dict:
    model = build("resnet50", False)
    weights = spec.seeded_state_dict("resnet50", case["seed"])
    model.load_state_dict(weights, strict=True)
    model.eval()
    x = spec.seeded_image(case["input_seed"], *case["input_size"])[None]
    outs: dict[str, Tensor] = {}
    for name in ("layer1", "layer2", "layer3", "layer4"):
        getattr(model, name).register_forward_hook(
            lambda _m, _i, out, name=name: outs.__setitem__(name, out.detach())
        )
    with torch.no_grad():
        logits = model(x)
    fixture = {
        "arch": "resnet50",
        "seed": case["seed"],
        "input_seed": case["input_seed"],
        "input": x,
        "layers": {
            name: {
                "shape": torch.tensor(out.shape),
                "mean": out.mean((2, 3))[0],
                "sample": out[0, :8, ::2, ::2].flatten(),
            }
            for name, out in outs.items()
        },
        "logits": logits,
    }
    rms = {n: round(float(o.square().mean().sqrt()), 3) for n, o in outs.items()}
    print(
        f"resnet50: logits std {logits.std():.3f} range [{logits.min():.3f}, {logits.max():.3f}],"
        f" distinct {logits.unique().numel()}/1000; layer rms {rms}"
    )
    return fixture


def make_model(arch: str, case: dict, dtype: torch.dtype = torch.float32) -> nn.Module:
    model = build(arch, case["frozen_bn"], **case["model_kwargs"])
    model.load_state_dict(spec.seeded_state_dict(arch, case["seed"]), strict=True)
    if case["frozen_bn_eps"] is not None:
        overwrite_eps(model, case["frozen_bn_eps"])
    return model.eval().to(dtype)


def run_parts(model: nn.Module, images: list[Tensor]) -> dict:
    """The model's forward, step by step, keeping the intermediates."""
    image_list, _ = model.transform(images)
    body = model.backbone.body(image_list.tensors)
    fpn = model.backbone.fpn(body)
    features = list(fpn.values())
    head = model.head(features)
    anchors = model.anchor_generator(image_list, features)
    per_level = [f.shape[2] * f.shape[3] for f in features]
    if isinstance(model, RetinaNet):
        per_level = [n * model.anchor_generator.num_anchors_per_location()[0] for n in per_level]
    return {
        "image_list": image_list,
        "body": body,
        "fpn": fpn,
        "head": head,
        "anchors": anchors,
        "per_level": per_level,
    }


def postprocess(model: nn.Module, parts: dict, images: list[Tensor], **overrides) -> list[dict]:
    """torchvision's postprocess_detections, also recording each detection's level and anchor.

    Uses the model's own box coder and batched_nms, so (with no overrides) the result must equal
    the model's forward output exactly.
    """
    thr = overrides.get("score_thresh", model.score_thresh)
    nms = overrides.get("nms_thresh", model.nms_thresh)
    cap = overrides.get("detections_per_img", model.detections_per_img)
    head, per_level = parts["head"], parts["per_level"]
    image_sizes = parts["image_list"].image_sizes
    fcos = isinstance(model, FCOS)
    results = []
    for i, size in enumerate(image_sizes):
        cls = head["cls_logits"][i].split(per_level)
        reg = head["bbox_regression"][i].split(per_level)
        ctr = head["bbox_ctrness"][i].split(per_level) if fcos else [None] * len(per_level)
        anchors = parts["anchors"][i].split(per_level)
        boxes, scores, labels, levels, anchor_idx, counts = [], [], [], [], [], []
        offset = 0
        for lvl, (c, r, t, a) in enumerate(zip(cls, reg, ctr, anchors, strict=True)):
            num_classes = c.shape[-1]
            s = (torch.sigmoid(c) * torch.sigmoid(t)).sqrt() if fcos else torch.sigmoid(c)
            s = s.flatten()
            keep = s > thr
            counts.append(int(keep.sum()))
            s, idx = s[keep], torch.where(keep)[0]
            s, order = s.topk(min(model.topk_candidates, idx.numel()))
            idx = idx[order]
            a_idx = torch.div(idx, num_classes, rounding_mode="floor")
            if fcos:
                b = model.box_coder.decode(r[a_idx], a[a_idx])
            else:
                b = model.box_coder.decode_single(r[a_idx], a[a_idx])
            boxes.append(box_ops.clip_boxes_to_image(b, size))
            scores.append(s)
            labels.append(idx % num_classes)
            levels.append(torch.full_like(idx, lvl))
            anchor_idx.append(a_idx + offset)
            offset += a.shape[0]
        b, s, lab = torch.cat(boxes), torch.cat(scores), torch.cat(labels)
        keep = box_ops.batched_nms(b, s, lab, nms)[:cap]
        det = {"boxes": b[keep], "scores": s[keep], "labels": lab[keep]}
        det = model.transform.postprocess([det], [size], [tuple(images[i].shape[-2:])])[0]
        det["level"] = torch.cat(levels)[keep]
        det["anchor_index"] = torch.cat(anchor_idx)[keep]
        det["candidates_per_level"] = torch.tensor(counts)
        results.append(det)
    return results


def sampled_anchor_indices(per_level: list[int]) -> Tensor:
    idx, start = [], 0
    for n in per_level:
        idx.append(start + torch.linspace(0, n - 1, ANCHORS_PER_LEVEL_SAMPLED).round().long())
        start += n
    return torch.cat(idx)


def _absmax(a: Tensor, b: Tensor) -> float:
    return float((a.double() - b.double()).abs().max()) if a.numel() else 0.0


def same_detections(a: list[dict], b: list[dict], box_tol: float, score_tol: float) -> bool:
    """Equal detection sets up to tolerances, in any order (near-equal scores may swap)."""
    for x, y in zip(a, b, strict=True):
        if x["scores"].shape != y["scores"].shape:
            return False
        match = _match(x, y)
        if match is None:
            return False
        if _absmax(x["boxes"], y["boxes"][match]) > box_tol:
            return False
        if _absmax(x["scores"], y["scores"][match]) > score_tol:
            return False
    return True


def _match(x: dict, y: dict) -> Tensor | None:
    """For each detection of x, the index of the same-label detection of y with the closest box."""
    if len(x["scores"]) == 0:
        return torch.zeros(0, dtype=torch.long)
    dist = (x["boxes"].double()[:, None] - y["boxes"].double()[None]).abs().amax(-1)
    dist[x["labels"][:, None] != y["labels"][None]] = math.inf
    match = dist.argmin(1)
    if match.unique().numel() != match.numel() or not dist.min(1).values.isfinite().all():
        return None
    return match


def min_score_gap(det: dict) -> float:
    scores = det["scores"].double().sort().values
    return float(scores.diff().min()) if scores.numel() > 1 else math.inf


def _max_diff(a: dict, b: dict, key: str) -> float:
    match = _match(a, b) if a["scores"].shape == b["scores"].shape else None
    return math.inf if match is None else _absmax(a[key], b[key][match])


def conditioning(model: nn.Module, arch: str, case: dict, images, parts, dets) -> dict:
    report: dict = {}
    counts = [len(d["scores"]) for d in dets]
    report["num_detections"] = counts
    report["score_min"] = min(float(d["scores"].min()) for d in dets)
    report["score_max"] = max(float(d["scores"].max()) for d in dets)
    report["distinct_labels"] = [int(d["labels"].unique().numel()) for d in dets]
    report["detections_per_level"] = [
        torch.bincount(d["level"], minlength=5).tolist() for d in dets
    ]
    report["candidates_per_level"] = [d["candidates_per_level"].tolist() for d in dets]
    report["no_tied_scores"] = all(d["scores"].unique().numel() == len(d["scores"]) for d in dets)
    report["min_score_gap"] = min(min_score_gap(d) for d in dets)
    report["below_cap"] = all(n < model.detections_per_img for n in counts)
    report["topk_not_binding"] = all(
        max(d["candidates_per_level"].tolist()) < model.topk_candidates for d in dets
    )
    # Decisions that a ~1e-5 change in scores / IoU threshold would flip.
    stable = {}
    for name, delta in (("score_thresh", 1e-5), ("nms_thresh", 1e-4)):
        base = getattr(model, name)
        shifted = [
            postprocess(model, parts, images, **{name: base + sign * delta}) for sign in (-1, 1)
        ]
        stable[f"{name}+-{delta:g}"] = all(same_detections(d, dets, 0.0, 0.0) for d in shifted)
    report["stable_to_threshold_shifts"] = stable
    # The same network in float64: do float32 rounding errors change any detection?
    model64 = copy.deepcopy(model).double()
    with torch.no_grad():
        dets64 = model64([im.double() for im in images])
    report["float64_same_detections"] = same_detections(dets, dets64, 1e-3, 1e-4)
    pairs = list(zip(dets, dets64, strict=True))
    report["float64_max_box_diff"] = max(_max_diff(a, b, "boxes") for a, b in pairs)
    report["float64_max_score_diff"] = max(_max_diff(a, b, "scores") for a, b in pairs)
    # Would a model that gets the norm eps wrong (0 <-> 1e-5) fail the parity tolerances?
    wrong_eps = copy.deepcopy(model)
    for module in wrong_eps.modules():
        if isinstance(module, (FrozenBatchNorm2d, nn.BatchNorm2d)):
            module.eps = 1e-5 if module.eps == 0.0 else 0.0
    with torch.no_grad():
        dets_eps = wrong_eps(images)
    report["wrong_eps_detected"] = not same_detections(dets, dets_eps, 1e-3, 1e-4)
    report["well_conditioned"] = (
        min(counts) > 30
        and report["no_tied_scores"]
        and report["score_max"] < 0.999
        and report["below_cap"]
        and report["topk_not_binding"]
        and all(stable.values())
        and report["float64_same_detections"]
    )
    return report


def make_detector(arch: str, case: dict) -> dict:
    model = make_model(arch, case)
    images = [spec.seeded_image(s, h, w) for s, h, w in case["images"]]
    with torch.no_grad():
        reference = model(images)
        parts = run_parts(model, images)
        dets = postprocess(model, parts, images)
    for ref, det in zip(reference, dets, strict=True):
        for k in ("boxes", "scores", "labels"):
            assert torch.equal(ref[k], det[k]), f"{arch}: replicated postprocess differs in {k}"
    idx = sampled_anchor_indices(parts["per_level"])
    head = parts["head"]
    image_list = parts["image_list"]
    fixture = {
        "arch": arch,
        "seed": case["seed"],
        "versions": {"torch": str(torch.__version__), "torchvision": str(torchvision.__version__)},
        "frozen_bn": case["frozen_bn"],
        "frozen_bn_eps": case["frozen_bn_eps"],
        "model_kwargs": dict(case["model_kwargs"]),
        "postprocess": {
            "score_thresh": float(model.score_thresh),
            "nms_thresh": float(model.nms_thresh),
            "detections_per_img": int(model.detections_per_img),
            "topk_candidates": int(model.topk_candidates),
        },
        "image_seeds": torch.tensor([s for s, _, _ in case["images"]]),
        "image_sizes": torch.tensor([[h, w] for _, h, w in case["images"]]),
        "image_samples": [im[:, ::16, ::16].clone() for im in images],
        "image_sums": torch.stack([im.double().sum() for im in images]),
        "batch_shape": torch.tensor(image_list.tensors.shape),
        "resized_sizes": torch.tensor(image_list.image_sizes),
        "batch_sample": image_list.tensors[:, :, ::16, ::16].clone(),
        "body": {
            name: {
                "shape": torch.tensor(f.shape),
                "mean": f.mean((2, 3)),
                "sample": f[:, :8, ::5, ::5].clone(),
            }
            for name, f in zip(("C3", "C4", "C5"), parts["body"].values(), strict=True)
        },
        "fpn": {
            name: {
                "shape": torch.tensor(f.shape),
                "mean": f.mean((2, 3)),
                "sample": f[:, :8, ::7, ::7].clone(),
            }
            for name, f in zip(("P3", "P4", "P5", "P6", "P7"), parts["fpn"].values(), strict=True)
        },
        "head": {
            "num_anchors_per_level": torch.tensor(parts["per_level"]),
            "anchor_index": idx,
            "anchors": torch.stack([a[idx] for a in parts["anchors"]]),
            "cls_logits": head["cls_logits"][:, idx].clone(),
            "bbox_regression": head["bbox_regression"][:, idx].clone(),
        },
        "detections": [
            {k: d[k] for k in ("boxes", "scores", "labels", "level", "anchor_index")}
            for d in dets
        ],
        "state_dict_fingerprint": fingerprint(spec.seeded_state_dict(arch, case["seed"])),
    }
    if "bbox_ctrness" in head:
        fixture["head"]["bbox_ctrness"] = head["bbox_ctrness"][:, idx].clone()
    # Each detection's own head outputs (its class logit, its box deltas / distances, its
    # centerness), for debugging a mismatch in a single box.
    for i, d in enumerate(dets):
        own = fixture["detections"][i]
        own["cls_logit"] = head["cls_logits"][i, d["anchor_index"], d["labels"]].clone()
        own["bbox_regression"] = head["bbox_regression"][i, d["anchor_index"]].clone()
        if "bbox_ctrness" in head:
            own["bbox_ctrness"] = head["bbox_ctrness"][i, d["anchor_index"], 0].clone()
    with torch.no_grad():
        report = conditioning(model, arch, case, images, parts, dets)
    fixture["conditioning"] = report
    print(f"{arch}:")
    for key, value in report.items():
        print(f"  {key}: {value}")
    return fixture


# ------------------------------------------------------------------------------------------------
# Faster R-CNN
# ------------------------------------------------------------------------------------------------

RCNN_ROIS_SAMPLED = 8


def run_rcnn_parts(model: nn.Module, images: list[Tensor]) -> dict:
    """Faster R-CNN's forward step by step (transform, body, FPN, RPN, RoI head)."""
    image_list, _ = model.transform(images)
    body = model.backbone.body(image_list.tensors)
    fpn = model.backbone.fpn(body)
    features = list(fpn.values())
    objectness, deltas = model.rpn.head(features)
    anchors = model.rpn.anchor_generator(image_list, features)
    per_level = [o.shape[1] * o.shape[2] * o.shape[3] for o in objectness]
    objectness_flat, deltas_flat = concat_box_prediction_layers(objectness, deltas)
    proposals, proposal_scores = model.rpn.filter_proposals(
        model.rpn.box_coder.decode(deltas_flat, anchors).view(len(anchors), -1, 4),
        objectness_flat,
        image_list.image_sizes,
        per_level,
    )
    pooled = model.roi_heads.box_roi_pool(fpn, proposals, image_list.image_sizes)
    class_logits, box_regression = model.roi_heads.box_predictor(
        model.roi_heads.box_head(pooled)
    )
    return {
        "image_list": image_list,
        "body": body,
        "fpn": fpn,
        "anchors": anchors,
        "per_level": per_level,
        "objectness": objectness_flat.view(len(anchors), -1),
        "deltas": deltas_flat.view(len(anchors), -1, 4),
        "proposals": proposals,
        "proposal_scores": proposal_scores,
        "class_logits": class_logits,
        "box_regression": box_regression,
    }


def rcnn_postprocess(model: nn.Module, parts: dict, images: list[Tensor], **overrides) -> list:
    """torchvision's postprocess_detections, also recording each detection's proposal.

    Uses the model's own box coder, box ops and batched_nms, so (with no overrides) the result
    must equal the model's forward output exactly.
    """
    heads = model.roi_heads
    thr = overrides.get("score_thresh", heads.score_thresh)
    nms = overrides.get("nms_thresh", heads.nms_thresh)
    cap = overrides.get("detections_per_img", heads.detections_per_img)
    proposals = parts["proposals"]
    counts = [p.shape[0] for p in proposals]
    boxes_all = heads.box_coder.decode(parts["box_regression"], proposals).split(counts)
    scores_all = F.softmax(parts["class_logits"], -1).split(counts)
    logits_all = parts["class_logits"].split(counts)
    results = []
    for i, size in enumerate(parts["image_list"].image_sizes):
        num_classes = scores_all[i].shape[1]
        boxes = box_ops.clip_boxes_to_image(boxes_all[i], size)[:, 1:].reshape(-1, 4)
        scores = scores_all[i][:, 1:].reshape(-1)
        logits = logits_all[i][:, 1:].reshape(-1)
        labels = torch.arange(1, num_classes).repeat(counts[i])
        proposal = torch.arange(counts[i]).repeat_interleave(num_classes - 1)
        keep = torch.where(scores > thr)[0]
        keep = keep[box_ops.remove_small_boxes(boxes[keep], min_size=1e-2)]
        keep = keep[box_ops.batched_nms(boxes[keep], scores[keep], labels[keep], nms)][:cap]
        det = {"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]}
        det = model.transform.postprocess([det], [size], [tuple(images[i].shape[-2:])])[0]
        det["proposal_index"] = proposal[keep]
        det["cls_logit"] = logits[keep]
        det["candidates"] = int((scores > thr).sum())
        results.append(det)
    return results


def rpn_cut_gaps(model: nn.Module, parts: dict) -> dict:
    """Margins of the RPN's two top-k cuts (pre-NMS per level on logits, post-NMS per image on
    probabilities): a float32 difference smaller than the gap cannot change the proposals."""
    pre = model.rpn.pre_nms_top_n()
    post = model.rpn.post_nms_top_n()
    level_gaps = []
    for obj in parts["objectness"].split(parts["per_level"], dim=1):
        if obj.shape[1] > pre:
            top = obj.topk(pre + 1, dim=1).values
            level_gaps.append(float((top[:, -2] - top[:, -1]).min()))
    # Re-run the proposal filter without the post-NMS cut to see the first dropped score.
    rpn = copy.copy(model.rpn)
    rpn._post_nms_top_n = {"training": 10**9, "testing": 10**9}
    _, uncut = rpn.filter_proposals(
        model.rpn.box_coder.decode(parts["deltas"].reshape(-1, 4), parts["anchors"]).view(
            len(parts["anchors"]), -1, 4
        ),
        parts["objectness"].reshape(-1, 1),
        parts["image_list"].image_sizes,
        parts["per_level"],
    )
    post_gaps = [float(s[post - 1] - s[post]) for s in uncut if s.numel() > post]
    return {
        "pre_nms_min_gap": min(level_gaps) if level_gaps else math.inf,
        "post_nms_min_gap": min(post_gaps) if post_gaps else math.inf,
        "proposals_before_post_cut": [int(s.numel()) for s in uncut],
    }


def rcnn_conditioning(model: nn.Module, images: list[Tensor], parts: dict, dets: list) -> dict:
    report: dict = {}
    counts = [len(d["scores"]) for d in dets]
    cap = model.roi_heads.detections_per_img
    report["num_detections"] = counts
    report["candidates"] = [d["candidates"] for d in dets]
    report["num_proposals"] = [int(p.shape[0]) for p in parts["proposals"]]
    report["score_min"] = min(float(d["scores"].min()) for d in dets)
    report["score_max"] = max(float(d["scores"].max()) for d in dets)
    report["distinct_labels"] = [int(d["labels"].unique().numel()) for d in dets]
    report["distinct_proposals"] = [int(d["proposal_index"].unique().numel()) for d in dets]
    report["no_tied_scores"] = all(d["scores"].unique().numel() == len(d["scores"]) for d in dets)
    report["min_score_gap"] = min(min_score_gap(d) for d in dets)
    report["below_cap"] = all(n < cap for n in counts)
    report["rpn_cuts"] = rpn_cut_gaps(model, parts)
    stable = {}
    for name, delta in (("score_thresh", 1e-5), ("nms_thresh", 1e-4)):
        base = getattr(model.roi_heads, name)
        shifted = [
            rcnn_postprocess(model, parts, images, **{name: base + sign * delta})
            for sign in (-1, 1)
        ]
        stable[f"{name}+-{delta:g}"] = all(same_detections(d, dets, 0.0, 0.0) for d in shifted)
    for delta in (1e-6,):  # the RPN's NMS decisions (float32 IoU errors are ~1e-7)
        shifted = []
        for sign in (-1, 1):
            other = copy.deepcopy(model)
            other.rpn.nms_thresh += sign * delta
            with torch.no_grad():
                shifted.append(other(images))
        stable[f"rpn_nms_thresh+-{delta:g}"] = all(
            same_detections(d, dets, 0.0, 0.0) for d in shifted
        )
    report["stable_to_threshold_shifts"] = stable
    model64 = copy.deepcopy(model).double()
    with torch.no_grad():
        dets64 = model64([im.double() for im in images])
    report["float64_same_detections"] = same_detections(dets, dets64, 1e-3, 1e-4)
    pairs = list(zip(dets, dets64, strict=True))
    report["float64_max_box_diff"] = max(_max_diff(a, b, "boxes") for a, b in pairs)
    report["float64_max_score_diff"] = max(_max_diff(a, b, "scores") for a, b in pairs)
    wrong_eps = copy.deepcopy(model)
    for module in wrong_eps.modules():
        if isinstance(module, (FrozenBatchNorm2d, nn.BatchNorm2d)):
            module.eps = 1e-5 if module.eps == 0.0 else 0.0
    with torch.no_grad():
        dets_eps = wrong_eps(images)
    report["wrong_eps_detected"] = not same_detections(dets, dets_eps, 1e-3, 1e-4)
    cuts = report["rpn_cuts"]
    report["well_conditioned"] = (
        min(counts) > 30
        and report["no_tied_scores"]
        and report["score_max"] < 0.999
        and report["below_cap"]
        and all(stable.values())
        and report["float64_same_detections"]
        and report["wrong_eps_detected"]
        and min(cuts["pre_nms_min_gap"], cuts["post_nms_min_gap"]) > 1e-4
    )
    return report


def make_rcnn(arch: str, case: dict) -> dict:
    model = make_model(arch, case)
    images = [spec.seeded_image(s, h, w) for s, h, w in case["images"]]
    with torch.no_grad():
        reference = model(images)
        parts = run_rcnn_parts(model, images)
        dets = rcnn_postprocess(model, parts, images)
    for ref, det in zip(reference, dets, strict=True):
        for k in ("boxes", "scores", "labels"):
            assert torch.equal(ref[k], det[k]), f"{arch}: replicated postprocess differs in {k}"
    idx = sampled_anchor_indices(parts["per_level"])
    image_list = parts["image_list"]
    first = [sum(p.shape[0] for p in parts["proposals"][:i]) for i in range(len(images))]
    rois = torch.arange(RCNN_ROIS_SAMPLED)
    fixture = {
        "arch": arch,
        "seed": case["seed"],
        "versions": {"torch": str(torch.__version__), "torchvision": str(torchvision.__version__)},
        "frozen_bn": case["frozen_bn"],
        "frozen_bn_eps": case["frozen_bn_eps"],
        "model_kwargs": dict(case["model_kwargs"]),
        "postprocess": {
            "score_thresh": float(model.roi_heads.score_thresh),
            "nms_thresh": float(model.roi_heads.nms_thresh),
            "detections_per_img": int(model.roi_heads.detections_per_img),
            "rpn_pre_nms_top_n": int(model.rpn.pre_nms_top_n()),
            "rpn_post_nms_top_n": int(model.rpn.post_nms_top_n()),
            "rpn_nms_thresh": float(model.rpn.nms_thresh),
        },
        "image_seeds": torch.tensor([s for s, _, _ in case["images"]]),
        "image_sizes": torch.tensor([[h, w] for _, h, w in case["images"]]),
        "image_samples": [im[:, ::16, ::16].clone() for im in images],
        "image_sums": torch.stack([im.double().sum() for im in images]),
        "batch_shape": torch.tensor(image_list.tensors.shape),
        "resized_sizes": torch.tensor(image_list.image_sizes),
        "batch_sample": image_list.tensors[:, :, ::16, ::16].clone(),
        "body": {
            name: {
                "shape": torch.tensor(f.shape),
                "mean": f.mean((2, 3)),
                "sample": f[:, :8, ::5, ::5].clone(),
            }
            for name, f in zip(("C2", "C3", "C4", "C5"), parts["body"].values(), strict=True)
        },
        "fpn": {
            name: {
                "shape": torch.tensor(f.shape),
                "mean": f.mean((2, 3)),
                "sample": f[:, :8, ::7, ::7].clone(),
            }
            for name, f in zip(("P2", "P3", "P4", "P5", "P6"), parts["fpn"].values(), strict=True)
        },
        "rpn": {
            "num_anchors_per_level": torch.tensor(parts["per_level"]),
            "anchor_index": idx,
            "anchors": torch.stack([a[idx] for a in parts["anchors"]]),
            "objectness": parts["objectness"][:, idx].clone(),
            "deltas": parts["deltas"][:, idx].clone(),
            "proposals": [p.clone() for p in parts["proposals"]],
            "proposal_scores": [s.clone() for s in parts["proposal_scores"]],
        },
        "roi": {
            "proposal_index": rois,
            "class_logits": torch.stack([parts["class_logits"][f + rois] for f in first]),
            "box_regression": torch.stack([parts["box_regression"][f + rois] for f in first]),
        },
        "detections": [
            {k: d[k] for k in ("boxes", "scores", "labels", "proposal_index", "cls_logit")}
            for d in dets
        ],
        "state_dict_fingerprint": fingerprint(spec.seeded_state_dict(arch, case["seed"])),
    }
    with torch.no_grad():
        report = rcnn_conditioning(model, images, parts, dets)
    fixture["conditioning"] = report
    print(f"{arch}:")
    for key, value in report.items():
        print(f"  {key}: {value}")
    return fixture


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("archs", nargs="*", default=list(spec.ARCHS))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, torchvision {torchvision.__version__}")
    FIXTURES.mkdir(parents=True, exist_ok=True)
    for arch in args.archs:
        start = time.perf_counter()
        frozen_too = arch in spec.RELEASED_FROZEN_BN
        layouts = [False, True] if frozen_too else [False]
        counts = {f"frozen_bn={f}": check_layout(arch, f) for f in layouts}
        check_published(arch)
        print(f"{arch}: layout OK, keys {counts}, params {spec.torchvision_num_params(arch)}")
        case = spec.FIXTURE_CASES[arch]
        with torch.no_grad():
            if arch == "resnet50":
                fixture = make_resnet50(case)
            elif arch == "fasterrcnn_resnet50_fpn":
                fixture = make_rcnn(arch, case)
            else:
                fixture = make_detector(arch, case)
        path = FIXTURES / case["file"]
        torch.save(fixture, path)
        torch.load(path, weights_only=True)
        took = time.perf_counter() - start
        size_kb = path.stat().st_size / 1024
        print(f"{arch}: wrote {path.relative_to(ROOT)} ({size_kb:.0f} KB), {took:.1f} s")


if __name__ == "__main__":
    main()
