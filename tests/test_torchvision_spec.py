"""CI checks of the torchvision layout spec, the seeded weights/images and the parity fixtures.

No torchvision here: the generator script (peer env) proved the spec against the real models; these
tests pin the documented counts and make sure CI regenerates the exact inputs the fixtures used.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import pytest
import torch

from tests import torchvision_spec as tvs

FIXTURES = Path(__file__).parent / "fixtures"
DETECTORS = ("fcos_resnet50_fpn", "retinanet_resnet50_fpn", "retinanet_resnet50_fpn_v2")
RCNN = "fasterrcnn_resnet50_fpn"
# (arch, frozen_bn) -> (keys, parameter elements); §2.1/§2.2 and the weight enums' num_params.
DOCUMENTED = {
    ("resnet50", False): (320, 25_557_032),
    ("fcos_resnet50_fpn", False): (372, 32_269_600 + 53_120),
    ("fcos_resnet50_fpn", True): (372 - 53, 32_269_600),
    ("retinanet_resnet50_fpn", False): (354, 34_014_999 + 53_120),
    ("retinanet_resnet50_fpn", True): (354 - 53, 34_014_999),
    ("retinanet_resnet50_fpn_v2", False): (362, 38_198_935),
    (RCNN, False): (348, 41_755_286 + 53_120),
    (RCNN, True): (348 - 53, 41_755_286),  # FasterRCNN_ResNet50_FPN_Weights.COCO_V1 num_params
}
BN_LAYERS_RESNET50 = 53  # norm layers in ResNet-50: 1 stem + 16 blocks x 3 + 4 downsample


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    # Many mid-sized elementwise ops: on a busy 2-core runner one thread is several times faster
    # than a contended OpenMP team.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@functools.cache
def seeded(arch: str) -> dict[str, torch.Tensor]:
    return tvs.seeded_state_dict(arch, tvs.FIXTURE_CASES[arch]["seed"])


@functools.cache
def fixture(arch: str) -> dict:
    return torch.load(FIXTURES / tvs.FIXTURE_CASES[arch]["file"], weights_only=True)


# ------------------------------------------------------------------------------------------------
# Spec
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("arch", "frozen"), list(DOCUMENTED))
def test_documented_key_and_parameter_counts(arch: str, frozen: bool) -> None:
    keys, params = DOCUMENTED[(arch, frozen)]
    spec = tvs.torchvision_state_dict_spec(arch, frozen)
    assert len(spec) == keys
    assert tvs.torchvision_num_params(arch, frozen) == params
    total = sum(math.prod(s) for s in spec.values())
    buffers = tvs.torchvision_buffer_keys(arch, frozen)
    assert total - sum(math.prod(spec[k]) for k in buffers) == params


def test_default_layout_is_the_released_checkpoint() -> None:
    assert len(tvs.torchvision_state_dict_spec("fcos_resnet50_fpn")) == 319
    assert len(tvs.torchvision_state_dict_spec("retinanet_resnet50_fpn")) == 301
    assert len(tvs.torchvision_state_dict_spec("retinanet_resnet50_fpn_v2")) == 362
    assert len(tvs.torchvision_state_dict_spec("resnet50")) == 320
    assert len(tvs.torchvision_state_dict_spec(RCNN)) == 295
    for arch in ("resnet50", "retinanet_resnet50_fpn_v2"):
        with pytest.raises(ValueError):
            tvs.torchvision_state_dict_spec(arch, frozen_bn=True)
    with pytest.raises(ValueError):
        tvs.torchvision_state_dict_spec("fcos")


def test_buffers() -> None:
    bn = tvs.torchvision_buffer_keys("fcos_resnet50_fpn", False)
    assert len(bn) == 3 * BN_LAYERS_RESNET50
    stats = ("running_mean", "running_var", "num_batches_tracked")
    assert all(k.split(".")[-1] in stats for k in bn)
    frozen_spec = tvs.torchvision_state_dict_spec("fcos_resnet50_fpn", True)
    frozen = tvs.torchvision_buffer_keys("fcos_resnet50_fpn", True)
    assert len(frozen) == 4 * BN_LAYERS_RESNET50
    assert not any(k.endswith("num_batches_tracked") for k in frozen_spec)
    assert all(k.startswith("backbone.body.") for k in frozen)
    # Head GroupNorm affine tensors are parameters, not buffers.
    assert "head.classification_head.conv.1.weight" not in frozen


def test_documented_shapes() -> None:
    fcos = tvs.torchvision_state_dict_spec("fcos_resnet50_fpn")
    v1 = tvs.torchvision_state_dict_spec("retinanet_resnet50_fpn")
    v2 = tvs.torchvision_state_dict_spec("retinanet_resnet50_fpn_v2")
    r50 = tvs.torchvision_state_dict_spec("resnet50")
    assert r50["conv1.weight"] == (64, 3, 7, 7)
    assert r50["layer2.0.conv2.weight"] == (128, 128, 3, 3)  # stride on the 3x3 conv
    assert r50["layer4.0.downsample.0.weight"] == (2048, 1024, 1, 1)
    assert r50["fc.weight"] == (1000, 2048) and r50["bn1.num_batches_tracked"] == ()
    assert list(r50)[-2:] == ["fc.weight", "fc.bias"]
    for spec in (fcos, v1, v2):
        assert spec["backbone.fpn.inner_blocks.2.0.weight"] == (256, 2048, 1, 1)
        assert spec["backbone.fpn.layer_blocks.0.0.weight"] == (256, 256, 3, 3)
        assert not any(k.startswith("backbone.body.fc") for k in spec)
    assert fcos["backbone.fpn.extra_blocks.p6.weight"] == (256, 256, 3, 3)
    assert v1["backbone.fpn.extra_blocks.p6.weight"] == (256, 256, 3, 3)
    assert v2["backbone.fpn.extra_blocks.p6.weight"] == (256, 2048, 3, 3)
    for i in range(4):
        assert fcos[f"head.regression_head.conv.{3 * i}.bias"] == (256,)
        assert fcos[f"head.regression_head.conv.{3 * i + 1}.weight"] == (256,)  # GN
        assert v1[f"head.classification_head.conv.{i}.0.bias"] == (256,)
        assert f"head.classification_head.conv.{i}.0.bias" not in v2  # conv without bias
        assert v2[f"head.classification_head.conv.{i}.1.bias"] == (256,)  # GN
    assert fcos["head.classification_head.cls_logits.weight"] == (91, 256, 3, 3)
    assert fcos["head.regression_head.bbox_ctrness.weight"] == (1, 256, 3, 3)
    for spec in (v1, v2):
        assert spec["head.classification_head.cls_logits.bias"] == (819,)
        assert spec["head.regression_head.bbox_reg.weight"] == (36, 256, 3, 3)
        assert not any("ctrness" in k for k in spec)
    assert not any("scale" in k for k in fcos)


def test_documented_faster_rcnn_shapes() -> None:
    spec = tvs.torchvision_state_dict_spec(RCNN)
    assert spec["backbone.fpn.inner_blocks.0.0.weight"] == (256, 256, 1, 1)  # C2 lateral
    assert spec["backbone.fpn.inner_blocks.3.0.weight"] == (256, 2048, 1, 1)
    assert spec["backbone.fpn.layer_blocks.3.0.bias"] == (256,)
    assert not any("extra_blocks" in k for k in spec)  # LastLevelMaxPool has no weights
    assert spec["rpn.head.conv.0.0.weight"] == (256, 256, 3, 3)
    assert spec["rpn.head.cls_logits.weight"] == (3, 256, 1, 1)
    assert spec["rpn.head.bbox_pred.weight"] == (12, 256, 1, 1)
    assert spec["roi_heads.box_head.fc6.weight"] == (1024, 12544)
    assert spec["roi_heads.box_head.fc7.weight"] == (1024, 1024)
    assert spec["roi_heads.box_predictor.cls_score.weight"] == (91, 1024)
    assert spec["roi_heads.box_predictor.bbox_pred.bias"] == (364,)
    assert list(spec)[-1] == "roi_heads.box_predictor.bbox_pred.bias"


def test_legacy_names() -> None:
    for arch in ("fcos_resnet50_fpn", "retinanet_resnet50_fpn", RCNN):
        new = tvs.torchvision_state_dict_spec(arch)
        old = tvs.torchvision_state_dict_spec(arch, legacy_names=True)
        assert list(new.values()) == list(old.values())
        renamed = {o: n for o, n in zip(old, new, strict=True) if o != n}
        assert "backbone.fpn.inner_blocks.1.weight" in old
        assert renamed["backbone.fpn.layer_blocks.2.bias"] == "backbone.fpn.layer_blocks.2.0.bias"
        if arch == "retinanet_resnet50_fpn":
            assert renamed["head.regression_head.conv.6.weight"] == (
                "head.regression_head.conv.3.0.weight"
            )
            assert len(renamed) == 12 + 16
        elif arch == RCNN:  # 4 FPN levels and the RPN conv (hosted checkpoint names)
            assert renamed["rpn.head.conv.bias"] == "rpn.head.conv.0.0.bias"
            assert renamed["backbone.fpn.inner_blocks.3.weight"] == (
                "backbone.fpn.inner_blocks.3.0.weight"
            )
            assert len(renamed) == 16 + 2
        else:
            assert len(renamed) == 12  # FCOS head names never changed
        if arch == "retinanet_resnet50_fpn":  # one regeneration is enough (keeps CI fast)
            legacy = tvs.seeded_state_dict(arch, legacy_names=True)
            modern = seeded(arch)
            assert all(torch.equal(legacy[o], modern[n]) for o, n in zip(old, new, strict=True))
    for arch in ("resnet50", "retinanet_resnet50_fpn_v2"):
        with pytest.raises(ValueError):
            tvs.torchvision_state_dict_spec(arch, legacy_names=True)


def test_coco_categories() -> None:
    ids = tvs.COCO_CATEGORY_IDS
    assert len(ids) == 80 and list(ids) == sorted(ids) and ids[0] == 1 and ids[-1] == 90
    assert tvs.UNUSED_91_IDS == (0, 12, 26, 29, 30, 45, 66, 68, 69, 71, 83)
    names = tvs.COCO_91_CLASS_NAMES
    assert len(names) == 91 and names[0] == "__background__"
    assert [i for i, n in enumerate(names) if n == "N/A"] == list(tvs.UNUSED_91_IDS[1:])
    assert names[1] == "person" and names[90] == "toothbrush" and names[72] == "tv"
    assert len(set(names)) == 80 + 2


# ------------------------------------------------------------------------------------------------
# Seeded values
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", tvs.ARCHS)
def test_seeded_state_dict_matches_spec(arch: str) -> None:
    spec = tvs.torchvision_state_dict_spec(arch)
    first = seeded(arch)
    assert list(first) == list(spec)
    for key, shape in spec.items():
        value = first[key]
        assert tuple(value.shape) == shape, key
        if key.endswith("num_batches_tracked"):
            assert value.dtype == torch.int64 and value.item() == 0
        else:
            assert value.dtype == torch.float32 and bool(value.isfinite().all()), key


def test_seeded_state_dict_is_deterministic() -> None:
    # (test_fixture_regenerates_in_ci also checks all archs against the peer env's values.)
    first = seeded("retinanet_resnet50_fpn_v2")
    again = tvs.seeded_state_dict("retinanet_resnet50_fpn_v2", 0)
    assert list(first) == list(again)
    assert all(torch.equal(first[k], again[k]) for k in first)


def test_seeding_is_per_key_and_per_seed() -> None:
    fcos, v1 = seeded("fcos_resnet50_fpn"), seeded("retinanet_resnet50_fpn")
    # Same key, same values whatever the model around it (order independent).
    for key in ("backbone.body.layer3.4.conv2.weight", "backbone.fpn.extra_blocks.p7.bias"):
        assert torch.equal(fcos[key], v1[key])
    # Regression guard: torch's generator keeps only 32 seed bits, the seed must still matter.
    other = tvs.seeded_state_dict("fcos_resnet50_fpn", seed=1)
    assert not torch.equal(other["backbone.body.conv1.weight"], fcos["backbone.body.conv1.weight"])
    assert not torch.equal(fcos["backbone.body.layer1.0.conv2.weight"],
                           fcos["backbone.body.layer1.1.conv2.weight"])  # fmt: skip


def test_seeded_value_ranges() -> None:
    sd = seeded("retinanet_resnet50_fpn_v2")
    n_low = n_all = 0
    for key, var in sd.items():
        if not key.endswith("running_var"):
            continue
        module = key.rsplit(".", 1)[0]
        weight = sd[f"{module}.weight"]
        low = var < 1e-3  # the channels where the norm's eps shows
        n_low, n_all = n_low + int(low.sum()), n_all + var.numel()
        assert bool(((var >= 0.5) & (var <= 2.0) | (var >= 1e-4) & (var <= 4e-4)).all()), key
        top = 0.3 if module.endswith("bn3") else 1.0
        bottom = 0.0 if module.endswith("bn3") else 0.5
        scale = weight / var.sqrt()  # unchanged by the low-variance rescaling
        assert bool(((weight[~low] >= bottom) & (weight[~low] <= top)).all()), key
        assert bool((scale[low] >= bottom / 2**0.5).all() and (scale[low] <= top * 2**0.5).all())
        assert sd[f"{module}.running_mean"].abs().max() <= 0.1 * 3**0.5 + 1e-6
    assert n_low / n_all == pytest.approx(tvs.LOW_VAR_FRACTION, rel=0.1)
    w = sd["backbone.body.layer3.2.conv2.weight"]
    assert w.std().item() == pytest.approx(math.sqrt(2 / (256 * 9)), rel=0.05)
    assert w.mean().abs() < 1e-3
    gn = sd["head.regression_head.conv.2.1.weight"]  # GroupNorm: no low-variance channels
    assert gn.min() >= 0.5 and gn.max() <= 1.0


@pytest.mark.parametrize("arch", DETECTORS)
def test_unused_class_rows_are_switched_off(arch: str) -> None:
    sd = seeded(arch)
    bias = sd["head.classification_head.cls_logits.bias"].view(-1, 91)
    used = list(tvs.COCO_CATEGORY_IDS)
    assert bool((bias[:, list(tvs.UNUSED_91_IDS)] == tvs.UNUSED_CLASS_BIAS).all())
    assert bias[:, used].min() > -15 and bias[:, used].std() > 0.05
    # Zero-sum 3x3 kernels: a spatially constant input leaves every class logit at its bias.
    weight = sd["head.classification_head.cls_logits.weight"].double()
    assert weight.sum((2, 3)).abs().max() < 1e-5


def test_seeded_image() -> None:
    img = tvs.seeded_image(7, 37, 53)
    assert img.shape == (3, 37, 53) and img.dtype == torch.float32
    assert img.min() >= 0 and img.max() <= 1 and img.std() > 0.1
    assert torch.equal(img, tvs.seeded_image(7, 37, 53))
    assert not torch.equal(img, tvs.seeded_image(8, 37, 53))
    # Structured, not white noise: neighbouring pixels are strongly correlated.
    a, b = img[:, :, :-1].flatten(), img[:, :, 1:].flatten()
    assert torch.corrcoef(torch.stack([a, b]))[0, 1] > 0.8


# ------------------------------------------------------------------------------------------------
# Fixtures
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", tvs.ARCHS)
def test_fixture_file_loads_small(arch: str) -> None:
    path = FIXTURES / tvs.FIXTURE_CASES[arch]["file"]
    assert path.stat().st_size < 300 * 1024
    data = fixture(arch)
    assert data["arch"] == arch and data["seed"] == tvs.FIXTURE_CASES[arch]["seed"]


def test_resnet50_fixture_input() -> None:
    case, data = tvs.FIXTURE_CASES["resnet50"], fixture("resnet50")
    assert torch.equal(data["input"][0], tvs.seeded_image(case["input_seed"], *case["input_size"]))
    assert data["logits"].shape == (1, 1000)
    assert [tuple(data["layers"][f"layer{k}"]["mean"].shape) for k in range(1, 5)] == [
        (256,), (512,), (1024,), (2048,)
    ]  # fmt: skip


@pytest.mark.parametrize("arch", [*DETECTORS, RCNN])
def test_fixture_regenerates_in_ci(arch: str) -> None:
    """The weights and images CI builds are those the peer env fed to torchvision."""
    case, data = tvs.FIXTURE_CASES[arch], fixture(arch)
    fp = data["state_dict_fingerprint"]
    sd = seeded(arch)
    assert fp["keys"] == list(sd)
    sums = torch.stack([v.double().sum() for v in sd.values()])
    sum_sq = torch.stack([v.double().square().sum() for v in sd.values()])
    torch.testing.assert_close(sums, fp["sum"], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(sum_sq, fp["sum_sq"], rtol=1e-9, atol=0)
    assert data["image_sizes"].tolist() == [[h, w] for _, h, w in case["images"]]
    for (s, h, w), sample, total in zip(
        case["images"], data["image_samples"], data["image_sums"], strict=True
    ):
        img = tvs.seeded_image(s, h, w)
        assert torch.equal(img[:, ::16, ::16], sample)
        assert img.double().sum().item() == pytest.approx(total.item(), rel=1e-12)
    assert data["model_kwargs"] == case["model_kwargs"]
    assert data["frozen_bn"] == case["frozen_bn"]
    assert data["frozen_bn_eps"] == case["frozen_bn_eps"]


@pytest.mark.parametrize("arch", DETECTORS)
def test_fixture_detections_are_sane(arch: str) -> None:
    data = fixture(arch)
    post = data["postprocess"]
    assert data["conditioning"]["well_conditioned"]
    assert data["batch_shape"].tolist() == [2, 3, 320, 512]  # padded to a multiple of 32
    assert data["resized_sizes"].tolist() == [[320, 422], [320, 498]]
    for det, (h, w) in zip(data["detections"], data["image_sizes"].tolist(), strict=True):
        boxes, scores, labels = det["boxes"], det["scores"], det["labels"]
        assert 30 < len(scores) < post["detections_per_img"]
        assert boxes.shape == (len(scores), 4) and labels.dtype == torch.int64
        assert bool((scores > post["score_thresh"]).all()) and scores.max() < 0.999
        assert bool((scores[:-1] >= scores[1:]).all())  # torchvision returns them sorted
        assert set(labels.tolist()) <= set(tvs.COCO_CATEGORY_IDS)
        assert bool((boxes[:, :2] >= 0).all() and (boxes[:, 2] <= w).all())
        assert bool((boxes[:, 3] <= h).all() and (boxes[:, 2:] >= boxes[:, :2]).all())
        assert det["level"].min() >= 0 and det["level"].max() <= 4
        assert int(det["anchor_index"].max()) < int(data["head"]["num_anchors_per_level"].sum())
    head = data["head"]
    assert head["cls_logits"].shape == (2, 40, 91)
    assert head["anchors"].shape == (2, 40, 4)


def test_faster_rcnn_predictor_rows() -> None:
    sd = seeded(RCNN)
    weight = sd["roi_heads.box_predictor.cls_score.weight"]
    bias = sd["roi_heads.box_predictor.cls_score.bias"]
    unused = list(tvs.UNUSED_91_IDS[1:])
    assert bool((bias[unused] == tvs.UNUSED_CLASS_BIAS).all()) and bool((weight[unused] == 0).all())
    # background (row 0) is a real softmax entry: a large bias, random weights
    assert bias[0] == tvs._HEAD_TUNING[RCNN]["bg_bias"] and weight[0].abs().sum() > 0
    # every row sums to exactly zero (halves are negatives of each other)
    assert torch.equal(weight[:, 512:], -weight[:, :512])
    used = list(tvs.COCO_CATEGORY_IDS)
    assert bias[used].std() > 0.1 and bias[used].abs().max() < 1.0


def test_faster_rcnn_fixture_is_sane() -> None:
    data = fixture(RCNN)
    post = data["postprocess"]
    assert data["conditioning"]["well_conditioned"]
    assert post["rpn_pre_nms_top_n"] == 1000 and post["rpn_post_nms_top_n"] == 1000
    assert post["rpn_nms_thresh"] == 0.7 and post["detections_per_img"] == 100
    assert data["batch_shape"].tolist() == [2, 3, 320, 512]
    assert [f["shape"].tolist()[2:] for f in data["fpn"].values()] == [
        [80, 128], [40, 64], [20, 32], [10, 16], [5, 8]
    ]  # fmt: skip
    # 3 anchors per location on P2-P6 (P6 from max-pooling P5)
    assert data["rpn"]["num_anchors_per_level"].tolist() == [30720, 7680, 1920, 480, 120]
    for det, props, scores, (h, w) in zip(
        data["detections"], data["rpn"]["proposals"], data["rpn"]["proposal_scores"],
        data["image_sizes"].tolist(), strict=True,
    ):
        assert 30 < len(det["scores"]) < post["detections_per_img"]
        assert 500 < len(props) <= 1000 and props.shape[1] == 4
        assert bool((scores[:-1] >= scores[1:]).all()) and bool((scores > 0).all())
        assert bool((det["scores"] > post["score_thresh"]).all())
        assert set(det["labels"].tolist()) <= set(tvs.COCO_CATEGORY_IDS)
        assert bool((det["boxes"][:, 2] <= w).all() and (det["boxes"][:, 3] <= h).all())
        assert int(det["proposal_index"].max()) < len(props)
    assert data["roi"]["class_logits"].shape == (2, 8, 91)
    assert data["roi"]["box_regression"].shape == (2, 8, 364)
