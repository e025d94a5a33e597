"""Faster / Dynamic R-CNN converters (official Dynamic R-CNN, MMDetection) against the documented
key lists.

Source state dicts are enumerated from the tables of ``dynamic_rcnn.md`` §3.1 / §3.4 and the
official ``network.py`` module tree (flat ``rpn_conv`` / ``fc6`` / ``cls_score`` names,
maskrcnn-benchmark ``backbone.body`` / ``backbone.fpn.fpn_inner{1..4}``, ``DFConv2d``
``conv2.{conv,offset}``), at tiny widths (stem 8, FPN 16, FCs 32) with the real block counts.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
from torch import Tensor

from dynadet.api import Detector, build_model
from dynadet.cli import main as cli_main
from dynadet.config import load_config, save_config
from dynadet.engine.checkpoint import load_checkpoint
from dynadet.tools.convert import CONVERTERS, ConversionError, check_against_model
from dynadet.tools.convert_dyhead import convert_mmdet_file
from dynadet.tools.convert_rcnn import (
    convert_dynamic_rcnn_official,
    convert_dynamic_rcnn_official_file,
    convert_mmdet_rcnn,
    detect_dynamic_rcnn_arch,
    is_mmdet_rcnn,
    mmdet_rcnn_overrides,
    to_dynamic_rcnn_official,
    to_mmdet_rcnn,
)
from tests.tools.test_convert_dyhead import assert_same, fast_init, seeded

BASE, C, FC = 8, 16, 32  # stem width, FPN channels, FC width (64, 256, 1024 released)
R50, R101 = (3, 4, 6, 3), (3, 4, 23, 3)
DCN = (False, True, True, True)
Shapes = dict[str, tuple[int, ...]]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- source key lists


def _resnet(prefix: str, stem: str, norm: str, blocks, dcn, base: int, counters: bool) -> Shapes:
    """Bottleneck ResNet keys: ``stem`` names the stem ("stem." official, "" torchvision);
    ``norm(i)`` the i-th norm of a block; DCN blocks per ``dcn`` stage in the official
    (``conv2.conv`` + ``conv2.offset``) or mmdet (``conv2`` + ``conv2.conv_offset``) form."""
    keys: Shapes = {}

    def bn(name: str, n: int) -> None:
        keys.update({f"{name}.{p}": (n,) for p in ("weight", "bias", "running_mean",
                                                    "running_var")})
        if counters:
            keys[f"{name}.num_batches_tracked"] = ()

    keys[f"{prefix}{stem}conv1.weight"] = (base, 3, 7, 7)
    bn(f"{prefix}{stem}bn1", base)
    in_ch = base
    for stage, n_blocks in enumerate(blocks, start=1):
        width = base * 2 ** (stage - 1)
        for b in range(n_blocks):
            p = f"{prefix}layer{stage}.{b}."
            keys[p + "conv1.weight"] = (width, in_ch, 1, 1)
            bn(p + "bn1", width)
            if dcn[stage - 1] and norm == "official":
                keys[p + "conv2.offset.weight"] = (27, width, 3, 3)
                keys[p + "conv2.offset.bias"] = (27,)
                keys[p + "conv2.conv.weight"] = (width, width, 3, 3)
            else:
                keys[p + "conv2.weight"] = (width, width, 3, 3)
                if dcn[stage - 1]:
                    keys[p + "conv2.conv_offset.weight"] = (27, width, 3, 3)
                    keys[p + "conv2.conv_offset.bias"] = (27,)
            bn(p + "bn2", width)
            keys[p + "conv3.weight"] = (4 * width, width, 1, 1)
            bn(p + "bn3", 4 * width)
            if b == 0:
                keys[p + "downsample.0.weight"] = (4 * width, in_ch, 1, 1)
                bn(p + "downsample.1", 4 * width)
            in_ch = 4 * width
    return keys


def official_keys(blocks=R50, dcn=(False,) * 4, base: int = BASE, c: int = C,
                  fc: int = FC) -> Shapes:
    """An official Dynamic R-CNN checkpoint (``dynamic_rcnn.md`` §3.4, ``network.py``)."""
    keys = _resnet("backbone.body.", "stem.", "official", blocks, dcn, base, counters=False)
    for i, c_in in enumerate((4 * base, 8 * base, 16 * base, 32 * base), start=1):
        keys |= {f"backbone.fpn.fpn_inner{i}.weight": (c, c_in, 1, 1),
                 f"backbone.fpn.fpn_inner{i}.bias": (c,),
                 f"backbone.fpn.fpn_layer{i}.weight": (c, c, 3, 3),
                 f"backbone.fpn.fpn_layer{i}.bias": (c,)}
    keys |= {f"anchor_generator.cell_anchors.{i}": (3, 4) for i in range(5)}  # buffers
    keys |= {"rpn_conv.weight": (c, c, 3, 3), "rpn_conv.bias": (c,),
             "rpn_cls_logits.weight": (3, c, 1, 1), "rpn_cls_logits.bias": (3,),
             "rpn_bbox_pred.weight": (12, c, 1, 1), "rpn_bbox_pred.bias": (12,),
             "fc6.weight": (fc, c * 49), "fc6.bias": (fc,), "fc7.weight": (fc, fc),
             "fc7.bias": (fc,), "cls_score.weight": (81, fc), "cls_score.bias": (81,),
             "bbox_pred.weight": (324, fc), "bbox_pred.bias": (324,)}
    return keys


def mmdet_keys(blocks=R50, dcn=(False,) * 4, v1: bool = False, base: int = BASE, c: int = C,
               fc: int = FC) -> Shapes:
    """MMDetection Faster R-CNN (``dynamic_rcnn.md`` §3.1); ``v1``: mmdet 1.x layout."""
    keys = _resnet("backbone.", "", "mmdet", blocks, dcn, base, counters=True)
    for i, c_in in enumerate((4 * base, 8 * base, 16 * base, 32 * base)):
        keys |= {f"neck.lateral_convs.{i}.conv.weight": (c, c_in, 1, 1),
                 f"neck.lateral_convs.{i}.conv.bias": (c,),
                 f"neck.fpn_convs.{i}.conv.weight": (c, c, 3, 3),
                 f"neck.fpn_convs.{i}.conv.bias": (c,)}
    keys |= {"rpn_head.rpn_conv.weight": (c, c, 3, 3), "rpn_head.rpn_conv.bias": (c,),
             "rpn_head.rpn_cls.weight": (3, c, 1, 1), "rpn_head.rpn_cls.bias": (3,),
             "rpn_head.rpn_reg.weight": (12, c, 1, 1), "rpn_head.rpn_reg.bias": (12,)}
    head = "bbox_head." if v1 else "roi_head.bbox_head."
    reg = 324 if v1 else 320
    keys |= {head + "shared_fcs.0.weight": (fc, c * 49), head + "shared_fcs.0.bias": (fc,),
             head + "shared_fcs.1.weight": (fc, fc), head + "shared_fcs.1.bias": (fc,),
             head + "fc_cls.weight": (81, fc), head + "fc_cls.bias": (81,),
             head + "fc_reg.weight": (reg, fc), head + "fc_reg.bias": (reg,)}
    return keys


def official_state(seed: int, **kwargs) -> dict[str, Tensor]:
    """Seeded official weights whose background regression rows are zero (never decoded, so
    the inverse map writes zeros there and the round trip is exact)."""
    state = seeded(official_keys(**kwargs), seed)
    state["bbox_pred.weight"][:4] = 0
    state["bbox_pred.bias"][:4] = 0
    return state


def tiny(preset: str, *extra: str) -> dict:
    """A two-stage preset at the tiny widths (same key layout)."""
    return load_config(preset, [
        f"+model.backbone.base_width={BASE}",
        f"model.neck.in_channels=[{4 * BASE},{8 * BASE},{16 * BASE},{32 * BASE}]",
        f"model.neck.out_channels={C}",
        f"model.rpn.in_channels={C}", f"model.rpn.feat_channels={C}",
        f"model.roi_head.in_channels={C}", f"model.roi_head.fc_channels={FC}",
        "model.preprocess.min_size=64", "model.preprocess.max_size=96",
        *extra,
    ])


def _meta(shapes: Shapes) -> dict[str, Tensor]:
    return {k: torch.empty(s, device="meta") for k, s in shapes.items()}


# ----------------------------------------------------------------------------- official


def test_official_keys_consumed_rows_reordered_and_strict_load() -> None:
    state = official_state(0)
    converted = convert_dynamic_rcnn_official(state)
    assert len(converted) == len(state) - 5  # the 5 anchor buffers
    model = build_model(tiny("dynamic_rcnn_r50_fpn_2x"))
    check_against_model(converted, model, "official")
    model.load_state_dict(converted, strict=True)
    pairs = {
        "backbone.conv1.weight": "backbone.body.stem.conv1.weight",
        "backbone.bn1.running_var": "backbone.body.stem.bn1.running_var",
        "backbone.layer3.5.bn2.bias": "backbone.body.layer3.5.bn2.bias",
        "backbone.layer4.0.downsample.0.weight": "backbone.body.layer4.0.downsample.0.weight",
        "backbone.layer2.0.downsample.1.running_mean":
            "backbone.body.layer2.0.downsample.1.running_mean",
        "neck.lateral_convs.0.weight": "backbone.fpn.fpn_inner1.weight",
        "neck.output_convs.3.bias": "backbone.fpn.fpn_layer4.bias",
        "rpn.conv.weight": "rpn_conv.weight",
        "rpn.cls_logits.bias": "rpn_cls_logits.bias",
        "rpn.bbox_pred.weight": "rpn_bbox_pred.weight",
        "roi_head.box_head.fc6.weight": "fc6.weight",
        "roi_head.box_head.fc7.bias": "fc7.bias",
    }
    for ours, theirs in pairs.items():
        assert torch.equal(converted[ours], state[theirs]), ours
    # background first (official) -> last (ours); its regression rows dropped
    w, b = converted["roi_head.cls_score.weight"], converted["roi_head.cls_score.bias"]
    assert torch.equal(w[:80], state["cls_score.weight"][1:]) and torch.equal(w[80],
                                                                           state["cls_score.weight"][0])
    assert torch.equal(b[80], state["cls_score.bias"][0])
    for k in (0, 37, 79):  # our class k = official class k + 1
        assert torch.equal(converted["roi_head.bbox_pred.weight"][4 * k: 4 * k + 4],
                           state["bbox_pred.weight"][4 * k + 4: 4 * k + 8])


def test_official_rows_give_the_same_scores_and_deltas() -> None:
    """The softmax over our 81 logits equals the official one per class, deltas likewise."""
    state = official_state(1)
    converted = convert_dynamic_rcnn_official(state)
    x = torch.randn(50, FC, generator=torch.Generator().manual_seed(0)).relu()

    def head(w: Tensor, b: Tensor) -> Tensor:
        return x.double() @ w.double().T + b.double()

    theirs = head(state["cls_score.weight"], state["cls_score.bias"]).softmax(-1)
    ours = head(converted["roi_head.cls_score.weight"],
                converted["roi_head.cls_score.bias"]).softmax(-1)
    torch.testing.assert_close(ours[:, :80], theirs[:, 1:], rtol=1e-12, atol=0)
    torch.testing.assert_close(ours[:, 80], theirs[:, 0], rtol=1e-12, atol=0)
    box_theirs = head(state["bbox_pred.weight"], state["bbox_pred.bias"]).view(50, 81, 4)
    box_ours = head(converted["roi_head.bbox_pred.weight"],
                    converted["roi_head.bbox_pred.bias"]).view(50, 80, 4)
    torch.testing.assert_close(box_ours, box_theirs[:, 1:], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("blocks", "dcn", "preset"), [
    (R50, (False,) * 4, "dynamic_rcnn_r50_fpn_2x"),
    (R101, DCN, "dynamic_rcnn_r101_dcnv2_fpn_3x_ms"),
])
def test_official_round_trips(blocks, dcn, preset: str) -> None:
    source = official_state(2, blocks=blocks, dcn=dcn)
    kept = {k: v for k, v in source.items() if not k.startswith("anchor_generator.")}
    assert_same(to_dynamic_rcnn_official(convert_dynamic_rcnn_official(source)), kept)
    torch.manual_seed(0)
    ours = build_model(tiny(preset)).state_dict()
    exported = to_dynamic_rcnn_official(ours)
    expected = official_keys(blocks=blocks, dcn=dcn)
    assert {k: tuple(v.shape) for k, v in exported.items()} == {
        k: s for k, s in expected.items() if not k.startswith("anchor_generator.")
    }
    weights = {k: v for k, v in ours.items() if not k.startswith("roi_head.dynamic.")}
    assert len(weights) == len(ours) - 7  # the statistics' buffers are not exported
    assert_same(convert_dynamic_rcnn_official(exported), weights)
    assert bool((exported["bbox_pred.weight"][:4] == 0).all())


def test_official_dcn_keys_map_onto_modulated_dcn() -> None:
    state = official_state(3, blocks=R101, dcn=DCN)
    converted = convert_dynamic_rcnn_official(state)
    model = build_model(tiny("dynamic_rcnn_r101_dcnv2_fpn_3x_ms"))
    check_against_model(converted, model, "official dcn")
    model.load_state_dict(converted, strict=True)
    assert torch.equal(converted["backbone.layer3.22.conv2.weight"],
                       state["backbone.body.layer3.22.conv2.conv.weight"])
    assert torch.equal(converted["backbone.layer2.1.conv2.conv_offset.bias"],
                       state["backbone.body.layer2.1.conv2.offset.bias"])
    assert "backbone.layer1.0.conv2.conv_offset.weight" not in converted  # c2 has no DCN


def test_stock_maskrcnn_benchmark_names_are_aliases() -> None:
    state = official_state(4)
    renames = {"rpn_conv": "rpn.head.conv", "rpn_cls_logits": "rpn.head.cls_logits",
               "rpn_bbox_pred": "rpn.head.bbox_pred", "fc6": "roi_heads.box.feature_extractor.fc6",
               "fc7": "roi_heads.box.feature_extractor.fc7",
               "cls_score": "roi_heads.box.predictor.cls_score",
               "bbox_pred": "roi_heads.box.predictor.bbox_pred",
               "anchor_generator": "rpn.anchor_generator"}
    stock = {}
    for key, value in state.items():
        head, _, rest = key.partition(".")
        stock[f"{renames[head]}.{rest}" if head in renames else key] = value
    assert_same(convert_dynamic_rcnn_official(stock), convert_dynamic_rcnn_official(state))


def test_detect_official_arch() -> None:
    assert detect_dynamic_rcnn_arch(official_keys()) == "dynamic_rcnn_r50_fpn_2x"
    assert detect_dynamic_rcnn_arch(official_keys(blocks=R101)) == "dynamic_rcnn_r101_fpn_1x"
    assert detect_dynamic_rcnn_arch(official_keys(blocks=R101, dcn=DCN)) == (
        "dynamic_rcnn_r101_dcnv2_fpn_3x_ms"
    )
    with pytest.raises(ConversionError, match="R-50 DCN"):
        detect_dynamic_rcnn_arch(official_keys(dcn=DCN))
    with pytest.raises(ConversionError, match="depth"):
        detect_dynamic_rcnn_arch(official_keys(blocks=(3, 4, 12, 3)))
    with pytest.raises(ConversionError, match="backbone.body"):
        detect_dynamic_rcnn_arch(mmdet_keys())


@pytest.mark.parametrize(("blocks", "dcn", "preset"), [
    (R50, (False,) * 4, "dynamic_rcnn_r50_fpn_2x"),
    (R101, (False,) * 4, "dynamic_rcnn_r101_fpn_3x_ms"),
    (R101, DCN, "dynamic_rcnn_r101_dcnv2_fpn_3x_ms"),
])
def test_full_size_official_keys_match_presets(blocks, dcn, preset: str) -> None:
    """R-50 / R-101 (DCN), 256 channels, 1024-wide FCs: shapes only (meta tensors)."""
    source = _meta(official_keys(blocks=blocks, dcn=dcn, base=64, c=256, fc=1024))
    with fast_init():
        model = build_model(load_config(preset))
    check_against_model(convert_dynamic_rcnn_official(source), model, preset)


def test_official_file_cli_and_predict(tmp_path: Path) -> None:
    state = official_state(5)
    src = tmp_path / "dynamic_rcnn_r50_fpn_1x.pth"
    # the official checkpointer: DDP prefix, optimizer / scheduler / iteration next to the model
    torch.save({"model": {"module." + k: v for k, v in state.items()}, "iteration": 90000}, src)
    cfg_file = tmp_path / "tiny.yaml"
    save_config(tiny("dynamic_rcnn_r50_fpn_2x"), cfg_file)
    dst = tmp_path / "converted"
    argv = ["convert", "dynamic-rcnn-official", str(src), str(dst), "--arch", str(cfg_file)]
    assert cli_main(argv) == 0
    weights, cfg, classes, meta = load_checkpoint(dst)
    assert len(classes) == 80 and meta["source"].startswith("dynamic-rcnn-official:")
    assert cfg["model"]["roi_head"]["dynamic"]["mode"] == "official"
    assert_same(weights, convert_dynamic_rcnn_official(state))
    detector = Detector.from_checkpoint(dst)  # strict load inside
    image = torch.rand(3, 72, 100, generator=torch.Generator().manual_seed(0)) * 255
    (pred,) = detector.predict([image])
    assert pred.boxes.shape[1:] == (4,) and torch.isfinite(pred.boxes).all()
    assert len(pred.scores) == len(pred.labels) <= 100


def test_official_mismatch_lists_every_problem(tmp_path: Path) -> None:
    state = official_state(6)
    del state["backbone.body.layer2.3.bn1.bias"]
    state["backbone.body.layer2.3.bn4.bias"] = torch.zeros(1)
    state["rcnn_extra.weight"] = torch.zeros(1)
    src = tmp_path / "bad.pth"
    torch.save(state, src)
    with pytest.raises(ConversionError) as err:
        convert_dynamic_rcnn_official_file(src, tmp_path / "out",
                                           arch=tiny("dynamic_rcnn_r50_fpn_2x"))
    text = str(err.value)
    assert "missing (1): backbone.layer2.3.bn1.bias" in text
    assert "backbone.body.layer2.3.bn4.bias" in text and "rcnn_extra.weight" in text
    assert not (tmp_path / "out").exists()
    # a 91-class head (torchvision-style) is refused by shape
    state = official_state(7)
    state["cls_score.weight"] = torch.zeros(91, FC)
    with pytest.raises(ConversionError, match="rows"):
        convert_dynamic_rcnn_official(state)


# ----------------------------------------------------------------------------- MMDetection


def test_mmdet_keys_consumed_strict_load_and_round_trip() -> None:
    state = seeded(mmdet_keys(), seed=8)
    assert is_mmdet_rcnn(state)
    converted = convert_mmdet_rcnn(state)
    assert len(converted) == len(state)  # BN counters kept for the BN preset
    model = build_model(tiny("faster_rcnn_r50_fpn_1x"))
    check_against_model(converted, model, "mmdet")
    model.load_state_dict(converted, strict=True)
    pairs = {
        "backbone.layer1.2.bn3.num_batches_tracked": "backbone.layer1.2.bn3.num_batches_tracked",
        "neck.lateral_convs.3.weight": "neck.lateral_convs.3.conv.weight",
        "neck.output_convs.0.bias": "neck.fpn_convs.0.conv.bias",
        "rpn.cls_logits.weight": "rpn_head.rpn_cls.weight",
        "rpn.bbox_pred.bias": "rpn_head.rpn_reg.bias",
        "roi_head.box_head.fc6.weight": "roi_head.bbox_head.shared_fcs.0.weight",
        "roi_head.box_head.fc7.bias": "roi_head.bbox_head.shared_fcs.1.bias",
        "roi_head.cls_score.weight": "roi_head.bbox_head.fc_cls.weight",  # background last both
        "roi_head.bbox_pred.bias": "roi_head.bbox_head.fc_reg.bias",
    }
    for ours, theirs in pairs.items():
        assert torch.equal(converted[ours], state[theirs]), ours
    assert_same(to_mmdet_rcnn(converted), state)
    torch.manual_seed(0)
    ours = model.state_dict()
    assert_same(convert_mmdet_rcnn(to_mmdet_rcnn(ours)), ours)


def test_mmdet_v1_background_first_is_reordered() -> None:
    state = seeded(mmdet_keys(v1=True), seed=9)
    converted = convert_mmdet_rcnn(state)
    check_against_model(converted, build_model(tiny("faster_rcnn_r50_fpn_1x")), "mmdet v1")
    cls = converted["roi_head.cls_score.bias"]
    assert torch.equal(cls[:80], state["bbox_head.fc_cls.bias"][1:])
    assert cls[80] == state["bbox_head.fc_cls.bias"][0]
    assert torch.equal(converted["roi_head.bbox_pred.weight"],
                       state["bbox_head.fc_reg.weight"][4:])


def test_mmdet_depth_and_dcn_are_read_from_the_keys() -> None:
    assert mmdet_rcnn_overrides(mmdet_keys()) == ["model.backbone.depth=50"]
    assert mmdet_rcnn_overrides(mmdet_keys(blocks=R101, dcn=DCN)) == [
        "model.backbone.depth=101", "+model.backbone.dcn_stages=[false,true,true,true]"
    ]
    shapes = mmdet_keys(blocks=R101, dcn=DCN, base=64, c=256, fc=1024)
    cfg = load_config("faster_rcnn_r50_fpn_1x", mmdet_rcnn_overrides(shapes))
    with fast_init():
        model = build_model(cfg)
    check_against_model(convert_mmdet_rcnn(_meta(shapes)), model, "mmdet r101 dcn")


def test_full_size_mmdet_keys_match_presets() -> None:
    source = _meta(mmdet_keys(base=64, c=256, fc=1024))
    for preset in ("faster_rcnn_r50_fpn_1x", "dynamic_rcnn_r50_fpn_1x"):
        with fast_init():
            model = build_model(load_config(preset))
        check_against_model(convert_mmdet_rcnn(source), model, preset)


def test_mmdet_file_dispatches_by_keys(tmp_path: Path) -> None:
    state = seeded(mmdet_keys(), seed=10)
    src = tmp_path / "faster_rcnn.pth"
    torch.save({"meta": {"epoch": 12}, "state_dict": state}, src)
    out = CONVERTERS["mmdet"](src, tmp_path / "frcnn", arch=tiny("dynamic_rcnn_r50_fpn_1x"))
    weights, cfg, _, meta = load_checkpoint(out)
    assert meta["source"] == "mmdet:config" and "dynamic" in cfg["model"]["roi_head"]
    assert_same(weights, convert_mmdet_rcnn(state))
    # a FrozenBN preset takes the same file: the BN counters are dropped
    frozen = tiny("faster_rcnn_r50_fpn_1x", "model.backbone.norm=frozen_bn")
    weights = load_checkpoint(convert_mmdet_file(src, tmp_path / "frozen", arch=frozen))[0]
    assert not any(k.endswith("num_batches_tracked") for k in weights)
    # errors name the unmatched source key
    state["roi_head.bbox_head.fc_extra.weight"] = torch.zeros(1)
    torch.save({"state_dict": state}, src)
    with pytest.raises(ConversionError, match=r"unmatched \(1\): roi_head\.bbox_head\.fc_extra"):
        convert_mmdet_file(src, tmp_path / "bad", arch=tiny("faster_rcnn_r50_fpn_1x"))


def test_key_tables_match_the_reference_shapes() -> None:
    """Spot checks of the enumerated key lists against the tables at full size."""
    off = official_keys(base=64, c=256, fc=1024)
    assert off["cls_score.weight"] == (81, 1024) and off["bbox_pred.weight"] == (324, 1024)
    assert off["rpn_cls_logits.weight"] == (3, 256, 1, 1)
    assert off["rpn_bbox_pred.weight"] == (12, 256, 1, 1)
    assert off["fc6.weight"] == (1024, 12544)
    assert off["backbone.fpn.fpn_inner4.weight"] == (256, 2048, 1, 1)
    assert "backbone.body.stem.bn1.running_var" in off
    assert not any(k.endswith("num_batches_tracked") for k in off)  # FrozenBN
    mm = mmdet_keys(base=64, c=256, fc=1024)
    assert mm["roi_head.bbox_head.fc_cls.weight"] == (81, 1024)
    assert mm["roi_head.bbox_head.fc_reg.weight"] == (320, 1024)
    assert mm["neck.lateral_convs.0.conv.weight"] == (256, 256, 1, 1)
    n_layer3 = len({m[1] for k in official_keys(blocks=R101)
                    if (m := re.match(r"backbone\.body\.layer3\.(\d+)\.", k))})
    assert n_layer3 == 23
    total = sum(math.prod(s) for k, s in mm.items() if not k.endswith(("running_mean",
                                                                     "running_var",
                                                                     "num_batches_tracked")))
    assert total == 41_753_056  # the faster_rcnn_r50_fpn_1x preset's parameters


# ----------------------------------------------------------------------------- official presets

OFFICIAL_PRESETS = {  # preset -> (depth, dcn, max_iters, steps)
    "dynamic_rcnn_r50_fpn_2x": (50, False, 180000, [120000, 160000]),
    "dynamic_rcnn_r101_fpn_1x": (101, False, 90000, [60000, 80000]),
    "dynamic_rcnn_r101_fpn_2x": (101, False, 180000, [120000, 160000]),
    "dynamic_rcnn_r101_fpn_3x_ms": (101, False, 270000, [180000, 240000]),
    "dynamic_rcnn_r101_dcnv2_fpn_3x_ms": (101, True, 270000, [180000, 240000]),
}


@pytest.mark.parametrize("preset", list(OFFICIAL_PRESETS))
def test_official_presets_follow_the_recipe(preset: str) -> None:
    depth, dcn, max_iters, steps = OFFICIAL_PRESETS[preset]
    cfg = tiny(preset)
    assert cfg["train"]["max_iters"] == max_iters and cfg["train"]["steps"] == steps
    assert cfg["train"]["bias_lr_factor"] == 2.0 and cfg["train"]["bias_weight_decay"] == 0.0
    assert cfg["train"]["warmup_iters"] == 500
    assert cfg["train"]["warmup_factor"] == pytest.approx(1 / 3)
    model = build_model(cfg)
    backbone = model.backbone
    assert backbone.depth == depth and backbone.style == "caffe"
    assert len(backbone.layer3) == {50: 6, 101: 23}[depth]
    assert all(m.eps == 0.0 for m in backbone.modules() if hasattr(m, "running_var"))
    offsets = [hasattr(blk.conv2, "conv_offset") for layer in
               (backbone.layer1, backbone.layer2, backbone.layer3, backbone.layer4)
               for blk in layer[:1]]
    assert offsets == ([False, True, True, True] if dcn else [False] * 4)
    assert model.rpn.train_proposals.nms_thresh == model.rpn.test_proposals.nms_thresh == 0.85
    assert model.rpn.box_loss == "smooth_l1" and model.rpn.smooth_l1_beta == pytest.approx(1 / 9)
    head = model.roi_head
    assert head.roi_extractor.sampling_ratio == 2 and not head.roi_extractor.aligned
    assert head.roi_extractor.level_mapping == "canonical"
    assert head.box_coder.weights == (10.0, 10.0, 5.0, 5.0) and head.box_loss == "smooth_l1"
    assert head.dynamic.mode == "official" and head.dynamic.iou_thresh.item() == pytest.approx(0.4)
    pre = model.preprocess
    assert pre.bgr and pre.std.tolist() == [1.0, 1.0, 1.0]
    assert pre.mean.tolist() == pytest.approx([102.9801, 115.9465, 122.7717])
    full = load_config(preset)["model"]["preprocess"]
    if "3x_ms" in preset:
        assert full["min_size"] == [400, 600, 800, 1000, 1200] and full["max_size"] == 1400
        assert full["test_min_size"] == 800
    else:
        assert (full["min_size"], full["max_size"]) == (800, 1333)


def test_dcn_preset_documents_test_time_augmentation() -> None:
    from dynadet.models.tta import TestTimeAugmentation, apply_tta

    preset = "dynamic_rcnn_r101_dcnv2_fpn_3x_ms"
    model = build_model(tiny(preset)).eval()
    assert apply_tta(model, load_config(preset)) is model  # off by default
    on = load_config(preset, ["test.tta={scales: [800, 1000, 1200, 1400, 1600], max_size: 2000, "
                              "flip: true}"])
    tta = apply_tta(model, on)
    assert isinstance(tta, TestTimeAugmentation)
    assert (tta.scales, tta.max_size, tta.flip) == ([800, 1000, 1200, 1400, 1600], 2000, True)
    text = (Path(__file__).parents[2] / "dynadet" / "configs" / f"{preset}.yaml").read_text()
    assert "test.tta={scales: [800, 1000, 1200, 1400, 1600], max_size: 2000, flip: true}" in text


def test_official_r50_converted_model_runs_training_step() -> None:
    """Converted official weights in the R50 preset: one Dynamic R-CNN step (official stats)."""
    torch.manual_seed(0)
    model = build_model(tiny("dynamic_rcnn_r50_fpn_2x"))
    model.load_state_dict(convert_dynamic_rcnn_official(official_state(16)), strict=True)
    model.train()
    images = [torch.rand(3, 64, 80, generator=torch.Generator().manual_seed(3)) * 255]
    targets = [{"boxes": torch.tensor([[4.0, 6.0, 40.0, 50.0]]), "labels": torch.tensor([2])}]
    losses = model(images, targets)
    assert losses["iou_thresh"].item() == pytest.approx(0.4)  # the official warm-up threshold
    total = sum(v for k, v in losses.items() if k.startswith("loss"))
    assert torch.isfinite(total)
    total.backward()
    assert model.backbone.layer1[0].conv1.weight.grad is None  # FREEZE_CONV_BODY_AT=2
    assert model.backbone.layer2[0].conv1.weight.grad is not None
