"""DyHead converters (official Detectron2 release, MMDetection) against the documented key lists.

The source state dicts are enumerated here from the structure in the reference notes
(``dyhead.md`` §4.1 / §4.2, ``one_stage.md`` §2): detectron2 ResNet-50 (FrozenBN) + FPN +
``dyhead_tower`` + ATSS/RetinaNet heads, and MMDetection's torchvision-named ResNet +
``neck=[FPN, DyHead]`` + ATSS head. Widths are tiny (stem 8, FPN/DyHead 32 channels, two
blocks); the depth layout (3/4/6/3 bottlenecks) is R-50's.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import Tensor

from dynadet.api import Detector, build_model
from dynadet.cli import main as cli_main
from dynadet.config import load_config, save_config
from dynadet.data.categories import COCO_CLASSES, COCO_IDS
from dynadet.engine.checkpoint import load_checkpoint
from dynadet.models.priors import AnchorGenerator
from dynadet.tools.convert import CONVERTERS, ConversionError, check_against_model
from dynadet.tools.convert_dyhead import (
    convert_dyhead_official,
    convert_dyhead_official_file,
    convert_mmdet_dyhead,
    convert_mmdet_file,
    detect_dyhead_arch,
    detectron2_anchor_order,
    permute_anchor_rows,
    to_dyhead_official,
    to_mmdet_dyhead,
)

BASE = 8  # ResNet stem width (64 in R-50)
C = 32  # FPN / DyHead channels (256 in the released models)
BLOCKS = 2  # DyHead blocks (6)
ATSS, SIMPLE = "dyhead_r50_atss_fpn_1x", "dyhead_r50_atss_simple_1x"
Shapes = dict[str, tuple[int, ...]]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- source key lists


def d2_resnet_keys(prefix: str, base: int = BASE) -> Shapes:
    """detectron2 ``ResNet`` (caffe R-50, FrozenBN): stem + res2..res5 with 3/4/6/3 blocks."""
    keys: Shapes = {}

    def conv_norm(name: str, out: int, inp: int, k: int) -> None:
        keys[f"{name}.weight"] = (out, inp, k, k)
        for p in ("weight", "bias", "running_mean", "running_var"):
            keys[f"{name}.norm.{p}"] = (out,)

    conv_norm(prefix + "stem.conv1", base, 3, 7)
    in_ch = base
    for stage, blocks in zip((2, 3, 4, 5), (3, 4, 6, 3), strict=True):
        width = base * 2 ** (stage - 2)
        for b in range(blocks):
            p = f"{prefix}res{stage}.{b}."
            if b == 0:
                conv_norm(p + "shortcut", 4 * width, in_ch, 1)
            conv_norm(p + "conv1", width, in_ch, 1)
            conv_norm(p + "conv2", width, width, 3)
            conv_norm(p + "conv3", 4 * width, width, 1)
            in_ch = 4 * width
    return keys


def d2_fpn_keys(prefix: str, p6_in: int, base: int = BASE, c: int = C) -> Shapes:
    """detectron2 ``FPN`` on res3–res5 + ``LastLevelP6P7``."""
    keys: Shapes = {}
    for level, c_in in zip((3, 4, 5), (8 * base, 16 * base, 32 * base), strict=True):
        keys |= {f"{prefix}fpn_lateral{level}.weight": (c, c_in, 1, 1),
                 f"{prefix}fpn_lateral{level}.bias": (c,),
                 f"{prefix}fpn_output{level}.weight": (c, c, 3, 3),
                 f"{prefix}fpn_output{level}.bias": (c,)}
    keys |= {f"{prefix}top_block.p6.weight": (c, p6_in, 3, 3), f"{prefix}top_block.p6.bias": (c,),
             f"{prefix}top_block.p7.weight": (c, c, 3, 3), f"{prefix}top_block.p7.bias": (c,)}
    return keys


def official_tower_keys(c: int = C, blocks: int = BLOCKS) -> Shapes:
    """``backbone.dyhead_tower.{i}.*`` (dyhead.md §4.1 table)."""
    keys: Shapes = {}
    for i in range(blocks):
        p = f"backbone.dyhead_tower.{i}."
        for j in range(3):
            keys |= {f"{p}DyConv.{j}.conv.weight": (c, c, 3, 3), f"{p}DyConv.{j}.conv.bias": (c,),
                     f"{p}DyConv.{j}.bn.weight": (c,), f"{p}DyConv.{j}.bn.bias": (c,)}
        keys |= {p + "AttnConv.1.weight": (1, c, 1, 1), p + "AttnConv.1.bias": (1,),
                 p + "relu.fc.0.weight": (c // 4, c), p + "relu.fc.0.bias": (c // 4,),
                 p + "relu.fc.2.weight": (4 * c, c // 4), p + "relu.fc.2.bias": (4 * c,),
                 p + "offset.weight": (27, c, 3, 3), p + "offset.bias": (27,)}
    return keys


def official_keys(
    head: str, nested: bool = True, c: int = C, base: int = BASE, blocks: int = BLOCKS
) -> Shapes:
    """A whole official checkpoint: ``head`` is ``"atss"`` or ``"retinanet"``."""
    fpn = "backbone.backbone." if nested else "backbone."
    keys = d2_resnet_keys(fpn + "bottom_up.", base) | d2_fpn_keys(fpn, c, base, c)
    keys |= official_tower_keys(c, blocks)
    if head == "atss":
        for name, rows in (("cls_logits", 80), ("bbox_pred", 4), ("centerness", 1)):
            keys |= {f"head.{name}.weight": (rows, c, 1, 1), f"head.{name}.bias": (rows,)}
        keys |= {f"head.scales.{lvl}.scale": (1,) for lvl in range(5)}
    else:
        for tower in ("cls_subnet", "bbox_subnet"):
            for i in (0, 2, 4, 6):
                keys |= {f"head.{tower}.{i}.weight": (c, c, 3, 3), f"head.{tower}.{i}.bias": (c,)}
        keys |= {"head.cls_score.weight": (9 * 80, c, 3, 3), "head.cls_score.bias": (9 * 80,),
                 "head.bbox_pred.weight": (9 * 4, c, 3, 3), "head.bbox_pred.bias": (9 * 4,)}
    return keys


def mmdet_keys(c: int = C, blocks: int = BLOCKS, base: int = BASE, pred_k: int = 3) -> Shapes:
    """MMDetection ATSS + DyHead (dyhead.md §4.2; ResNet = torchvision names, one_stage.md §2.1)."""
    keys: Shapes = {}

    def bn(name: str, n: int) -> None:
        params = ("weight", "bias", "running_mean", "running_var")
        keys.update({f"{name}.{p}": (n,) for p in params})
        keys[f"{name}.num_batches_tracked"] = ()

    keys["backbone.conv1.weight"] = (base, 3, 7, 7)
    bn("backbone.bn1", base)
    in_ch = base
    for stage, n_blocks in enumerate((3, 4, 6, 3), start=1):
        width = base * 2 ** (stage - 1)
        for b in range(n_blocks):
            p = f"backbone.layer{stage}.{b}."
            keys |= {p + "conv1.weight": (width, in_ch, 1, 1),
                     p + "conv2.weight": (width, width, 3, 3),
                     p + "conv3.weight": (4 * width, width, 1, 1)}
            bn(p + "bn1", width), bn(p + "bn2", width), bn(p + "bn3", 4 * width)
            if b == 0:
                keys[p + "downsample.0.weight"] = (4 * width, in_ch, 1, 1)
                bn(p + "downsample.1", 4 * width)
            in_ch = 4 * width
    for i, c_in in enumerate((8 * base, 16 * base, 32 * base)):
        keys |= {f"neck.0.lateral_convs.{i}.conv.weight": (c, c_in, 1, 1),
                 f"neck.0.lateral_convs.{i}.conv.bias": (c,)}
    for i in range(5):  # 3 outputs + on_output P6, P7
        keys |= {f"neck.0.fpn_convs.{i}.conv.weight": (c, c, 3, 3),
                 f"neck.0.fpn_convs.{i}.conv.bias": (c,)}
    for i in range(blocks):
        p = f"neck.1.dyhead_blocks.{i}."
        for part in ("high", "mid", "low"):
            keys |= {f"{p}spatial_conv_{part}.conv.weight": (c, c, 3, 3),
                     f"{p}spatial_conv_{part}.norm.weight": (c,),
                     f"{p}spatial_conv_{part}.norm.bias": (c,)}
        keys |= {p + "spatial_conv_offset.weight": (27, c, 3, 3),
                 p + "spatial_conv_offset.bias": (27,),
                 p + "scale_attn_module.1.weight": (1, c, 1, 1),
                 p + "scale_attn_module.1.bias": (1,),
                 p + "task_attn_module.conv1.conv.weight": (c // 4, c, 1, 1),
                 p + "task_attn_module.conv1.conv.bias": (c // 4,),
                 p + "task_attn_module.conv2.conv.weight": (4 * c, c // 4, 1, 1),
                 p + "task_attn_module.conv2.conv.bias": (4 * c,)}
    for name, rows in (("atss_cls", 80), ("atss_reg", 4), ("atss_centerness", 1)):
        keys |= {f"bbox_head.{name}.weight": (rows, c, pred_k, pred_k),
                 f"bbox_head.{name}.bias": (rows,)}
    keys |= {f"bbox_head.scales.{lvl}.scale": () for lvl in range(5)}
    return keys


def seeded(shapes: Shapes, seed: int = 0) -> dict[str, Tensor]:
    """Random values with fan-in scaling (so a forward stays finite) and positive variances."""
    g = torch.Generator().manual_seed(seed)
    out: dict[str, Tensor] = {}
    for key, shape in shapes.items():
        if key.endswith("num_batches_tracked"):
            out[key] = torch.tensor(7)
            continue
        t = torch.randn(shape, generator=g)
        if key.endswith("running_var"):
            t = t.abs() + 0.5
        elif len(shape) >= 2:
            t = t / math.sqrt(math.prod(shape[1:]))
        out[key] = t
    return out


def tiny_config(preset: str) -> dict:
    """A DyHead preset at tiny widths (same key layout, smaller tensors)."""
    return load_config(preset, [
        f"+model.backbone.base_width={BASE}",
        f"model.neck.modules.0.in_channels=[{8 * BASE},{16 * BASE},{32 * BASE}]",
        f"model.neck.modules.0.out_channels={C}",
        f"model.neck.modules.1.in_channels={C}",
        f"model.neck.modules.1.channels={C}",
        f"model.neck.modules.1.num_blocks={BLOCKS}",
        f"+model.head.in_channels={C}",
        f"+model.head.feat_channels={C}",
        "model.preprocess.min_size=64",
        "model.preprocess.max_size=128",
    ])


def assert_same(a: dict[str, Tensor], b: dict[str, Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].shape == b[k].shape, k
        assert torch.equal(a[k], b[k]), k


# ----------------------------------------------------------------------------- anchor order


def d2_cell_anchors(sizes: list[float], ratios: list[float]) -> Tensor:
    """Transcription of detectron2 ``DefaultAnchorGenerator.generate_cell_anchors``."""
    rows = []
    for size in sizes:
        area = size**2.0
        for ratio in ratios:
            w = math.sqrt(area / ratio)
            h = ratio * w
            rows.append([-w / 2.0, -h / 2.0, w / 2.0, h / 2.0])
    return torch.tensor(rows, dtype=torch.float64)


def test_anchor_permutation_hand_checked() -> None:
    # 3 sizes × 2 ratios, 2 classes. detectron2 row d·K + k holds 100·s + 10·r + k with
    # d = s·R + r (size-major); dynadet anchor a = r·S + s (ratio-major).
    sizes, ratios, k = 3, 2, 2
    d2_rows = [100 * s + 10 * r + c for s in range(sizes) for r in range(ratios) for c in range(k)]
    old = torch.tensor(d2_rows, dtype=torch.float32)[:, None].repeat(1, 3)
    order = detectron2_anchor_order(sizes, ratios)
    assert order.tolist() == [0, 2, 4, 1, 3, 5]
    new = permute_anchor_rows(old, order)
    assert new[:, 0].tolist() == [0, 1, 100, 101, 200, 201, 10, 11, 110, 111, 210, 211]
    assert torch.equal(permute_anchor_rows(new, torch.argsort(order)), old)
    with pytest.raises(ConversionError, match="anchors"):
        permute_anchor_rows(torch.zeros(7), order)


def test_anchor_permutation_matches_detectron2_cell_anchors() -> None:
    cfg = load_config("dyhead_r50_retina_fpn_1x")["model"]["head"]["anchor_generator"]
    gen = AnchorGenerator(**{k: v for k, v in cfg.items() if k != "type"})
    order = detectron2_anchor_order(len(gen.sizes[0]), len(gen.ratios))
    for level, stride in enumerate(gen.strides):
        ours = gen.base_anchors(level, torch.float64, torch.device("cpu"))
        d2 = d2_cell_anchors([4 * stride * 2 ** (i / 3) for i in range(3)], [0.5, 1.0, 2.0])
        torch.testing.assert_close(ours, d2[order], rtol=0, atol=1e-9)


# ----------------------------------------------------------------------------- official DyHead


@pytest.mark.parametrize("nested", [True, False])
def test_official_atss_all_keys_consumed_and_strict_load(nested: bool) -> None:
    state = seeded(official_keys("atss", nested=nested))
    converted = convert_dyhead_official(state)
    model = build_model(tiny_config(ATSS))
    assert len(converted) == len(state)
    check_against_model(converted, model, "official atss")
    model.load_state_dict(converted, strict=True)
    fpn = "backbone.backbone." if nested else "backbone."
    pairs = {
        "backbone.conv1.weight": fpn + "bottom_up.stem.conv1.weight",
        "backbone.bn1.running_var": fpn + "bottom_up.stem.conv1.norm.running_var",
        "backbone.layer3.5.bn2.bias": fpn + "bottom_up.res4.5.conv2.norm.bias",
        "backbone.layer4.0.downsample.0.weight": fpn + "bottom_up.res5.0.shortcut.weight",
        "backbone.layer2.0.downsample.1.bias": fpn + "bottom_up.res3.0.shortcut.norm.bias",
        "neck.0.lateral_convs.2.weight": fpn + "fpn_lateral5.weight",
        "neck.0.output_convs.0.bias": fpn + "fpn_output3.bias",
        "neck.0.p7.weight": fpn + "top_block.p7.weight",
        "neck.1.blocks.1.DyConv.2.conv.bias": "backbone.dyhead_tower.1.DyConv.2.conv.bias",
        "neck.1.blocks.0.relu.fc.2.weight": "backbone.dyhead_tower.0.relu.fc.2.weight",
        "head.cls_logits.weight": "head.cls_logits.weight",
    }
    for ours, theirs in pairs.items():
        assert torch.equal(converted[ours], state[theirs]), ours
    assert converted["head.scales.3.scale"].shape == ()
    assert converted["head.scales.3.scale"] == state["head.scales.3.scale"][0]


def test_official_retinanet_towers_and_predictor_permutation() -> None:
    state = seeded(official_keys("retinanet"), seed=1)
    model = build_model(tiny_config("dyhead_r50_retina_fpn_1x"))
    converted = convert_dyhead_official(state, num_sizes=3, num_ratios=3)
    check_against_model(converted, model, "official retinanet")
    model.load_state_dict(converted, strict=True)
    assert torch.equal(converted["head.reg_tower.3.conv.weight"],
                       state["head.bbox_subnet.6.weight"])
    for a in range(9):
        r, s = divmod(a, 3)  # dynadet: ratio-major
        d = 3 * s + r  # detectron2: size-major
        for name, src, k in (("cls_logits", "cls_score", 80), ("bbox_pred", "bbox_pred", 4)):
            for p in ("weight", "bias"):
                ours = converted[f"head.{name}.{p}"][a * k : (a + 1) * k]
                assert torch.equal(ours, state[f"head.{src}.{p}"][d * k : (d + 1) * k])


@pytest.mark.parametrize(("head", "preset", "anchors"), [
    ("atss", "dyhead_r50_atss_fpn_1x", (1, 1)),
    ("retinanet", "dyhead_r50_retina_fpn_1x", (3, 3)),
])
def test_official_round_trips(head: str, preset: str, anchors: tuple[int, int]) -> None:
    torch.manual_seed(0)
    ours = build_model(tiny_config(preset)).state_dict()
    exported = to_dyhead_official(ours, *anchors)
    assert {k: tuple(v.shape) for k, v in exported.items()} == official_keys(head)
    assert_same(convert_dyhead_official(exported, *anchors), ours)
    source = seeded(official_keys(head), seed=2)
    assert_same(to_dyhead_official(convert_dyhead_official(source, *anchors), *anchors), source)


def test_detect_arch_and_refusals(tmp_path: Path) -> None:
    assert detect_dyhead_arch(official_keys("atss")) == "dyhead_r50_atss_fpn_1x"
    assert detect_dyhead_arch(official_keys("retinanet")) == "dyhead_r50_retina_fpn_1x"
    rcnn = {"backbone.dyhead_tower.0.offset.bias": torch.zeros(27),
            "proposal_generator.rpn_head.conv.weight": torch.zeros(1),
            "roi_heads.box_predictor.cls_score.weight": torch.zeros(1)}
    with pytest.raises(ConversionError, match="Faster R-CNN"):
        detect_dyhead_arch(rcnn)
    with pytest.raises(ConversionError, match="Faster R-CNN"):
        convert_dyhead_official(rcnn)
    src = tmp_path / "atss.pth"
    torch.save({"head.centerness.bias": torch.zeros(1)}, src)
    with pytest.raises(ConversionError, match="two-stage"):
        convert_dyhead_official_file(src, tmp_path / "out", arch="dyhead_r50_rcnn_fpn_1x")
    pkl = tmp_path / "model_final.pkl"
    pkl.write_bytes(b"\x80\x04N.")
    with pytest.raises(ConversionError, match=r"\.pkl.*torch\.save"):
        convert_dyhead_official_file(pkl, tmp_path / "out")


def test_unmatched_and_missing_keys_are_listed(tmp_path: Path) -> None:
    state = seeded(official_keys("atss"))
    del state["backbone.backbone.bottom_up.res3.2.conv3.norm.bias"]
    state["backbone.backbone.bottom_up.res3.2.conv4.weight"] = torch.zeros(1)
    state["head.cls_subnet.1.weight"] = torch.zeros(1)  # a ReLU slot: never a parameter
    src = tmp_path / "bad.pth"
    torch.save({"model": state}, src)
    with pytest.raises(ConversionError) as err:
        convert_dyhead_official_file(src, tmp_path / "out", arch=tiny_config(ATSS))
    text = str(err.value)
    assert "missing (1): backbone.layer2.2.bn3.bias" in text
    assert "backbone.backbone.bottom_up.res3.2.conv4.weight" in text
    assert "head.cls_subnet.1.weight" in text
    assert not (tmp_path / "out").exists()


def test_converted_checkpoint_loads_and_predicts(tmp_path: Path) -> None:
    state = seeded(official_keys("atss"), seed=3)
    src = tmp_path / "dyhead_atss.pth"
    # DDP prefix and the detectron2 wrapper, as a checkpoint saved from a wrapped model
    torch.save({"model": {"module." + k: v for k, v in state.items()}, "iteration": 7}, src)
    cfg = tiny_config(ATSS)
    cfg_file = tmp_path / "tiny_atss.yaml"
    save_config(cfg, cfg_file)
    dst = tmp_path / "converted"
    argv = ["convert", "dyhead-official", str(src), str(dst), "--arch", str(cfg_file)]
    assert cli_main(argv) == 0
    weights, saved_cfg, classes, meta = load_checkpoint(dst)
    assert classes == list(COCO_CLASSES) and meta["category_ids"] == list(COCO_IDS)
    assert meta["source"].startswith("dyhead-official:")
    assert_same(weights, convert_dyhead_official(state))
    detector = Detector.from_checkpoint(dst)  # strict load inside
    image = torch.rand(3, 72, 100, generator=torch.Generator().manual_seed(0)) * 255
    (pred,) = detector.predict([image])
    assert pred.boxes.shape[1:] == (4,) and torch.isfinite(pred.boxes).all()
    assert len(pred.scores) == len(pred.labels) <= 100
    # the registered entry point is the same function
    out = CONVERTERS["dyhead-official"](src, tmp_path / "again.safetensors", arch=cfg)
    assert_same(load_checkpoint(out)[0], weights)


@pytest.mark.parametrize(("head", "preset", "anchors"), [
    ("atss", ATSS, (1, 1)),
    ("retinanet", "dyhead_r50_retina_fpn_1x", (3, 3)),
])
def test_full_size_official_keys_match_presets(head: str, preset: str, anchors) -> None:
    """R-50, 256 channels, 6 blocks: shapes only (meta tensors, nothing allocated)."""
    shapes = official_keys(head, c=256, base=64, blocks=6)
    source = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    with torch.device("meta"):
        model = build_model(load_config(preset))
    check_against_model(convert_dyhead_official(source, *anchors), model, preset)


# ----------------------------------------------------------------------------- MMDetection


def test_mmdet_all_keys_consumed_strict_load_and_round_trip() -> None:
    state = seeded(mmdet_keys(), seed=4)
    converted = convert_mmdet_dyhead(state)
    ignored = sum(k.endswith("num_batches_tracked") for k in state)
    assert len(converted) == len(state) - ignored
    model = build_model(tiny_config(SIMPLE))
    check_against_model(converted, model, "mmdet")
    model.load_state_dict(converted, strict=True)
    blk = "neck.1.dyhead_blocks.1."
    assert torch.equal(converted["neck.0.p6.bias"], state["neck.0.fpn_convs.3.conv.bias"])
    assert torch.equal(converted["neck.0.p7.weight"], state["neck.0.fpn_convs.4.conv.weight"])
    assert torch.equal(converted["neck.0.output_convs.2.weight"],
                       state["neck.0.fpn_convs.2.conv.weight"])
    assert torch.equal(converted["neck.1.blocks.1.DyConv.0.bn.weight"],
                       state[blk + "spatial_conv_high.norm.weight"])
    assert torch.equal(converted["neck.1.blocks.1.DyConv.2.conv.weight"],
                       state[blk + "spatial_conv_low.conv.weight"])
    assert torch.equal(converted["neck.1.blocks.1.relu.fc.2.weight"],
                       state[blk + "task_attn_module.conv2.conv.weight"][:, :, 0, 0])
    assert torch.equal(converted["head.bbox_pred.weight"], state["bbox_head.atss_reg.weight"])
    # round trips (num_batches_tracked is a counter, not a weight: dropped on the way in)
    kept = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    assert_same(to_mmdet_dyhead(converted), kept)
    torch.manual_seed(0)
    ours = model.state_dict()
    assert_same(convert_mmdet_dyhead(to_mmdet_dyhead(ours)), ours)


def test_full_size_mmdet_keys_match_simple_preset() -> None:
    shapes = mmdet_keys(c=256, blocks=6, base=64)
    source = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    with torch.device("meta"):
        model = build_model(load_config(SIMPLE))
    check_against_model(convert_mmdet_dyhead(source), model, SIMPLE)


def test_mmdet_file_errors_and_conversion(tmp_path: Path) -> None:
    src = tmp_path / "mmdet.pth"
    torch.save({"meta": {"epoch": 12}, "state_dict": seeded(mmdet_keys(pred_k=1))}, src)
    with pytest.raises(ConversionError, match="reproduction"):
        convert_mmdet_file(src, tmp_path / "out")
    torch.save({"state_dict": {"neck.lateral_convs.0.conv.weight": torch.zeros(1)}}, src)
    with pytest.raises(ConversionError, match="dyhead_blocks"):
        convert_mmdet_file(src, tmp_path / "out")
    state = seeded(mmdet_keys(), seed=5)
    torch.save({"state_dict": state}, src)
    out = CONVERTERS["mmdet"](src, tmp_path / "mm", arch=tiny_config(SIMPLE))
    weights, cfg, _, meta = load_checkpoint(out)
    assert cfg["model"]["neck"]["modules"][1]["dcn_bias"] is False
    assert meta["source"] == "mmdet:config"
    assert_same(weights, convert_mmdet_dyhead(state))
    # official weights (DCN bias) against the bias-free mmdet preset: an error naming the biases
    torch.save(seeded(official_keys("atss")), src)
    with pytest.raises(ConversionError, match=r"unmatched.*DyConv\.0\.conv\.bias"):
        convert_dyhead_official_file(src, tmp_path / "x", arch=tiny_config(SIMPLE))
