"""torchvision weights through `dynadet convert` give torchvision's outputs.

The state dicts carry torchvision's exact keys and shapes (``tests/torchvision_spec.py``) filled
with seeded values; the expected outputs were produced by torchvision itself with
``tools/make_torchvision_fixtures.py`` in the peer environment and stored in ``tests/fixtures``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dynadet.api import Detector, build_model
from dynadet.cli import main as cli_main
from dynadet.config import load_config
from dynadet.data.categories import COCO_IDS
from dynadet.models.resnet import ResNet
from dynadet.tools.convert import (
    ConversionError,
    check_against_model,
    convert_torchvision,
    remap_class_rows,
)
from tests.torchvision_spec import FIXTURE_CASES, seeded_image, seeded_state_dict

FIXTURES = Path(__file__).parent / "fixtures"
DETECTORS = ["fcos_resnet50_fpn", "retinanet_resnet50_fpn", "retinanet_resnet50_fpn_v2"]


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


def test_legacy_key_names_convert_identically():
    arch = "retinanet_resnet50_fpn"
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
