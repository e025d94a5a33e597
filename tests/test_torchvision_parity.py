"""torchvision weights through `dynadet convert` give torchvision's outputs.

The state dicts carry torchvision's exact keys and shapes (``tests/torchvision_spec.py``) filled
with seeded values; the expected outputs were produced by torchvision itself with
``tools/make_torchvision_fixtures.py`` in the peer environment and stored in ``tests/fixtures``.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from dynadet.api import Detector, build_model
from dynadet.cli import main as cli_main
from dynadet.config import load_config
from dynadet.data.categories import COCO_IDS
from dynadet.models.dense_head import flatten_level
from dynadet.models.resnet import ResNet
from dynadet.models.roi_head import RoIHead
from dynadet.ops.roi_align import MultiScaleRoIAlign
from dynadet.tools.convert import (
    ConversionError,
    check_against_model,
    convert_torchvision,
    remap_class_rows,
    take_class_rows,
)
from tests.torchvision_spec import FIXTURE_CASES, seeded_image, seeded_state_dict

FIXTURES = Path(__file__).parent / "fixtures"
DETECTORS = ["fcos_resnet50_fpn", "retinanet_resnet50_fpn", "retinanet_resnet50_fpn_v2"]
RCNN = "fasterrcnn_resnet50_fpn"


def _fixture(arch: str) -> dict:
    return torch.load(FIXTURES / FIXTURE_CASES[arch]["file"], weights_only=True)


def _images(case: dict) -> list[torch.Tensor]:
    # torchvision saw the [0, 1] image; dynadet takes 0-255 and divides by 255 itself
    return [seeded_image(s, h, w) * 255 for s, h, w in case["images"]]


def _overrides(case: dict) -> list[str]:
    kw = case["model_kwargs"]
    return [
        f"model.preprocess.min_size={kw['min_size']}",
        f"model.preprocess.max_size={kw['max_size']}",
    ]


def _compare(ours: dict, theirs: dict) -> None:
    order_a = ours["scores"].argsort(descending=True)
    order_b = theirs["scores"].argsort(descending=True)
    assert len(order_a) == len(order_b) > 0
    labels = torch.tensor(COCO_IDS)[ours["labels"][order_a]]
    assert torch.equal(labels, theirs["labels"][order_b])
    torch.testing.assert_close(
        ours["scores"][order_a], theirs["scores"][order_b], atol=1e-4, rtol=0
    )
    torch.testing.assert_close(ours["boxes"][order_a], theirs["boxes"][order_b], atol=1e-3, rtol=0)


@pytest.mark.parametrize("arch", DETECTORS)
def test_converted_detector_matches_torchvision(arch):
    case = FIXTURE_CASES[arch]
    fixture = _fixture(arch)
    state = seeded_state_dict(arch, case["seed"], frozen_bn=case["frozen_bn"])
    converted = convert_torchvision(state, arch)
    model = build_model(load_config(f"torchvision/{arch}", _overrides(case))).eval()
    check_against_model(converted, model, arch)
    model.load_state_dict(converted, strict=True)

    images = _images(case)
    batch = model.preprocess(images)
    assert list(batch.tensor.shape) == fixture["batch_shape"].tolist()
    assert batch.image_sizes == [tuple(s) for s in fixture["resized_sizes"].tolist()]
    with torch.no_grad():
        feats = model.features(batch.tensor)
        for f, name in zip(feats, ("P3", "P4", "P5", "P6", "P7"), strict=True):
            torch.testing.assert_close(
                f.mean((2, 3)), fixture["fpn"][name]["mean"], atol=1e-4, rtol=1e-4
            )
        results = model(images)
    for ours, theirs in zip(results, fixture["detections"], strict=True):
        _compare(ours, theirs)


def test_convert_cli_and_from_checkpoint(tmp_path):
    arch = "fcos_resnet50_fpn"
    case = FIXTURE_CASES[arch]
    src = tmp_path / "fcos.pth"
    torch.save(seeded_state_dict(arch, case["seed"], frozen_bn=case["frozen_bn"]), src)
    dst = tmp_path / "fcos_dynadet"
    assert cli_main(["convert", "torchvision", str(src), str(dst), "--arch", arch]) == 0
    assert (dst / "model.safetensors").exists() and (dst / "config.yaml").exists()
    det = Detector.from_checkpoint(dst, _overrides(case))
    assert det.class_names[0] == "person" and len(det.class_names) == 80
    preds = det.predict(_images(case), batch_size=2)
    for pred, theirs in zip(preds, _fixture(arch)["detections"], strict=True):
        _compare({"boxes": pred.boxes, "scores": pred.scores, "labels": pred.labels}, theirs)


@pytest.mark.parametrize("arch", ["retinanet_resnet50_fpn", RCNN])
def test_legacy_key_names_convert_identically(arch):
    # the hosted fasterrcnn_resnet50_fpn_coco-258fb6c6.pth carries these old names
    new = convert_torchvision(seeded_state_dict(arch, 0, frozen_bn=True), arch)
    old = convert_torchvision(seeded_state_dict(arch, 0, frozen_bn=True, legacy_names=True), arch)
    assert new.keys() == old.keys()
    assert all(torch.equal(new[k], old[k]) for k in new)


def test_resnet50_imagenet_weights_load_and_match():
    case = FIXTURE_CASES["resnet50"]
    fixture = _fixture("resnet50")
    converted = convert_torchvision(seeded_state_dict("resnet50", case["seed"]), "resnet50")
    backbone = ResNet(depth=50, style="pytorch", out_indices=(0, 1, 2, 3), norm="bn").eval()
    tail = {k.removeprefix("backbone."): v for k, v in converted.items()}
    missing, unexpected = backbone.load_state_dict(tail, strict=False)
    assert unexpected == [] and all(k.endswith("num_batches_tracked") for k in missing)
    with torch.no_grad():
        outs = backbone(fixture["input"])
    for out, name in zip(outs, ("layer1", "layer2", "layer3", "layer4"), strict=True):
        ref = fixture["layers"][name]
        assert list(out.shape) == ref["shape"].tolist()
        torch.testing.assert_close(out.mean((2, 3))[0], ref["mean"], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(
            out[0, :8, ::2, ::2].flatten(), ref["sample"], atol=1e-5, rtol=1e-4
        )


def test_mismatched_weights_list_every_problem():
    arch = "fcos_resnet50_fpn"
    state = seeded_state_dict(arch, 0, frozen_bn=True)
    state.pop("backbone.fpn.layer_blocks.0.0.weight")
    state["head.extra.weight"] = torch.zeros(1)
    model = build_model(load_config("torchvision/fcos_resnet50_fpn"))
    with pytest.raises(ConversionError) as err:
        check_against_model(convert_torchvision(state, arch), model, "x.pth")
    msg = str(err.value)
    assert "x.pth" in msg and "neck.output_convs.0.weight" in msg and "head.extra.weight" in msg
    # a retinanet state dict does not fit the FCOS model: shapes are reported
    retina = convert_torchvision(
        seeded_state_dict("retinanet_resnet50_fpn", 0, frozen_bn=True), "retinanet_resnet50_fpn"
    )
    with pytest.raises(ConversionError, match="shape"):
        check_against_model(retina, model, "r.pth")


def test_class_rows_keep_the_80_coco_ids():
    rows = torch.arange(2 * 91, dtype=torch.float32)[:, None]
    out = remap_class_rows(rows, 2)
    assert out.shape == (160, 1)
    assert out[0].item() == 1 and out[79].item() == 90 and out[80].item() == 91 + 1
    assert 12 not in out[:80].flatten().tolist()
    with pytest.raises(ConversionError):
        remap_class_rows(rows[:100], 2)


# ------------------------------------------------------------------------------------------------
# Faster R-CNN
# ------------------------------------------------------------------------------------------------


def _assert_same_boxes(ours: torch.Tensor, theirs: torch.Tensor, atol: float) -> None:
    """Equal box sets up to ``atol``, in any order (near-equal scores may swap ranks)."""
    assert ours.shape == theirs.shape
    dist = (ours[:, None].double() - theirs[None].double()).abs().amax(-1)
    match = dist.argmin(1)
    assert match.unique().numel() == len(match)
    assert dist.min(1).values.max() <= atol


def test_converted_faster_rcnn_matches_torchvision():
    case, fixture = FIXTURE_CASES[RCNN], _fixture(RCNN)
    converted = convert_torchvision(seeded_state_dict(RCNN, case["seed"]), RCNN)
    model = build_model(load_config(f"torchvision/{RCNN}", _overrides(case))).eval()
    check_against_model(converted, model, RCNN)
    model.load_state_dict(converted, strict=True)
    images = _images(case)
    batch = model.preprocess(images)
    assert list(batch.tensor.shape) == fixture["batch_shape"].tolist()
    assert batch.image_sizes == [tuple(s) for s in fixture["resized_sizes"].tolist()]
    rpn = fixture["rpn"]
    with torch.no_grad():
        feats = model.features(batch.tensor)
        for f, name in zip(feats, ("P2", "P3", "P4", "P5", "P6"), strict=True):
            torch.testing.assert_close(
                f.mean((2, 3)), fixture["fpn"][name]["mean"], atol=1e-4, rtol=1e-4
            )
        objectness, deltas = model.rpn(feats)
        anchors = model.rpn.anchors(feats, batch.shape)
        assert [len(a) for a in anchors] == rpn["num_anchors_per_level"].tolist()
        idx = rpn["anchor_index"]
        torch.testing.assert_close(torch.cat(anchors)[idx], rpn["anchors"][0], atol=0, rtol=0)
        logits = torch.cat([flatten_level(o, 1) for o in objectness], 1)[..., 0]
        torch.testing.assert_close(logits[:, idx], rpn["objectness"], atol=2e-4, rtol=1e-4)
        reg = torch.cat([flatten_level(d, 4) for d in deltas], 1)
        torch.testing.assert_close(reg[:, idx], rpn["deltas"], atol=1e-4, rtol=1e-4)
        proposals, scores = model.rpn.proposals(objectness, deltas, anchors, batch.image_sizes)
        for ours, ours_s, theirs, theirs_s in zip(
            proposals, scores, rpn["proposals"], rpn["proposal_scores"], strict=True
        ):
            assert len(ours) == len(theirs)
            torch.testing.assert_close(ours_s, theirs_s, atol=1e-5, rtol=0)
            _assert_same_boxes(ours, theirs, atol=1e-3)
        # The R-CNN head on torchvision's own proposals: class rows re-ordered, background last.
        roi = fixture["roi"]
        first = rpn["proposals"][0][roi["proposal_index"]]
        second = rpn["proposals"][1][roi["proposal_index"]]
        rois = torch.cat([
            torch.cat([torch.full((8, 1), float(i)), b], 1) for i, b in enumerate((first, second))
        ])
        cls, box = model.roi_head(feats, rois)
        theirs_cls = roi["class_logits"].flatten(0, 1)[:, [*COCO_IDS, 0]]
        theirs_box = take_class_rows(roi["box_regression"].flatten(0, 1).T, COCO_IDS, 4).T
        torch.testing.assert_close(cls, theirs_cls, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(box, theirs_box, atol=1e-4, rtol=1e-4)
        results = model.preprocess.postprocess(
            model.roi_head.predict(feats, proposals, batch.image_sizes), batch
        )
    for ours, theirs in zip(results, fixture["detections"], strict=True):
        _compare(ours, theirs)


def _torchvision_decode(deltas: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """torchvision ``BoxCoder((10, 10, 5, 5)).decode_single`` op for op, in float32."""
    widths, heights = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    ctr_x, ctr_y = boxes[:, 0] + 0.5 * widths, boxes[:, 1] + 0.5 * heights
    dx, dy = deltas[:, 0] / 10.0, deltas[:, 1] / 10.0
    dw = torch.clamp(deltas[:, 2] / 5.0, max=math.log(1000.0 / 16))
    dh = torch.clamp(deltas[:, 3] / 5.0, max=math.log(1000.0 / 16))
    cx, cy = dx * widths + ctr_x, dy * heights + ctr_y
    half = torch.tensor(0.5)
    w, h = half * (torch.exp(dw) * widths), half * (torch.exp(dh) * heights)
    return torch.stack([cx - w, cy - h, cx + w, cy + h], dim=1)


def test_roi_head_box_weights_decode_like_torchvision_bit_for_bit():
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(4000, 2, generator=g) * 300
    boxes = torch.cat([xy, xy + 1 + torch.rand(4000, 2, generator=g) * 200], 1)
    deltas = torch.randn(4000, 4, generator=g) * 3
    deltas[:5, 2:] = 40.0  # beyond the clamp
    expected = _torchvision_decode(deltas, boxes)
    extractor = MultiScaleRoIAlign(7, 2, False, (4, 8, 16, 32))
    tv = RoIHead(1, extractor, in_channels=4, fc_channels=8, box_weights=[10, 10, 5, 5],
                 clamp_mode="upper")
    assert torch.equal(tv.box_coder.decode(deltas, boxes), expected)
    # the stds form computes d · 0.1 instead of d / 10: equal to ~1 ulp, not bit for bit
    stds = RoIHead(1, extractor, in_channels=4, fc_channels=8, clamp_mode="upper")
    other = stds.box_coder.decode(deltas, boxes)
    torch.testing.assert_close(other, expected, atol=1e-3, rtol=1e-6)
    assert not torch.equal(other, expected)
    # encode is the inverse: targets scaled by the weights
    gt = expected[5:]
    target = tv.box_coder.encode(boxes[5:], gt)
    torch.testing.assert_close(target, deltas[5:], atol=2e-3, rtol=1e-3)


def test_take_class_rows():
    rows = torch.arange(91 * 4, dtype=torch.float32)[:, None]
    out = take_class_rows(rows, [1, 90, 0], 4, num_classes=91)
    assert out[:, 0].tolist() == [4, 5, 6, 7, 360, 361, 362, 363, 0, 1, 2, 3]
    assert take_class_rows(rows[:91], [*COCO_IDS, 0])[-1].item() == 0
    with pytest.raises(ConversionError, match="rows"):
        take_class_rows(rows, [1], 4, num_classes=81)
    with pytest.raises(ConversionError, match="no class 91"):
        take_class_rows(rows, [91], 4)
