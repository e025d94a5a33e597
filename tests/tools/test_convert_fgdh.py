"""cvpods Fine-Grained Dynamic Head converter against the documented key list (fgdynamic.md §5).

Source state dicts: detectron2-named ResNet-50 (FrozenBN) + FPN with P6 from C5, and the cvpods
``FCOSDynamicHead`` / ``FCOSFixHead`` / ``FCOSHead`` keys, enumerated from the note's tables at
tiny widths (stem 8, 32 channels).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dynadet.api import Detector, build_model
from dynadet.data.categories import COCO_IDS
from dynadet.engine.checkpoint import load_checkpoint
from dynadet.tools.convert import CONVERTERS, ConversionError, check_against_model
from dynadet.tools.convert_fgdh import (
    FGDH_ALIASES,
    FGDH_ARCHS,
    convert_fgdh_file,
    convert_fgdh_official,
    detect_fgdh_arch,
    fgdh_config,
    to_fgdh_official,
)
from tests.tools.test_convert_dyhead import (
    BASE,
    C,
    Shapes,
    assert_same,
    d2_fpn_keys,
    d2_resnet_keys,
)
from tests.tools.test_convert_dyhead import seeded as seeded_state

D2, FIX4, DYN4, DYN8 = (
    "fgdh_r50_fcos_d2_1x",
    "fgdh_r50_fcos_fix_d4_1x",
    "fgdh_r50_fcos_dynamic_d4_mid_1x",
    "fgdh_r50_fcos_dynamic_d8_high_1x",
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def cvpods_head_keys(layers: int | None, dynamic: bool, c: int = C) -> Shapes:
    """``head.*`` of FCOSDynamicHead / FCOSFixHead (``layers`` per tower) or FCOSHead (None)."""
    keys: Shapes = {}
    for tower in ("cls_subnet", "bbox_subnet"):
        if layers is None:  # Sequential(conv, GN, ReLU) x 4
            for i in range(4):
                keys |= {f"head.{tower}.{3 * i}.weight": (c, c, 3, 3),
                         f"head.{tower}.{3 * i}.bias": (c,),
                         f"head.{tower}.{3 * i + 1}.weight": (c,),
                         f"head.{tower}.{3 * i + 1}.bias": (c,)}
            continue
        for i in range(layers):
            p = f"head.{tower}.{i}."
            keys[p + "output_weight"] = (1,)
            if dynamic:
                keys[p + "scale_weight"] = (1,)
            for s in range(2):
                q = p + (f"dynamic_convs.{s}.convs." if dynamic else f"convs.{s}.")
                keys |= {q + "0.weight": (c, 1, 3, 3), q + "0.bias": (c,),
                         q + "1.weight": (c,), q + "1.bias": (c,)}
                if dynamic:
                    keys |= {p + f"dynamic_convs.{s}.gate.gate_conv.weight": (1, c, 3, 3),
                             p + f"dynamic_convs.{s}.gate.gate_conv.bias": (1,)}
            for j in (1, 2):
                q = p + f"depth_module.bottleneck.conv{j}."
                keys |= {q + "weight": (c, c, 3, 3), q + "norm.weight": (c,), q + "norm.bias": (c,)}
            if dynamic:
                keys |= {p + "depth_module.gate.gate_conv.weight": (1, c, 3, 3),
                         p + "depth_module.gate.gate_conv.bias": (1,)}
    for name, rows in (("cls_score", 80), ("bbox_pred", 4), ("centerness", 1)):
        keys |= {f"head.{name}.weight": (rows, c, 3, 3), f"head.{name}.bias": (rows,)}
    keys |= {f"head.scales.{lvl}.scale": (1,) for lvl in range(5)}
    return keys


def cvpods_keys(name: str, c: int = C, base: int = BASE) -> Shapes:
    arch = FGDH_ARCHS[name]
    backbone = d2_resnet_keys("backbone.bottom_up.", base)
    fpn = d2_fpn_keys("backbone.", p6_in=32 * base, base=base, c=c)  # P6 from C5
    return backbone | fpn | cvpods_head_keys(arch.num_layers, arch.dynamic, c)


def tiny_config(name: str) -> dict:
    cfg = fgdh_config(name)
    model = cfg["model"]
    model["backbone"]["base_width"] = BASE
    model["neck"].update(in_channels=[8 * BASE, 16 * BASE, 32 * BASE], out_channels=C)
    model["head"]["in_channels"] = C
    if model["head"]["type"] == "FCOSHead":
        model["head"]["feat_channels"] = C
    else:  # 4 channels per GN group, so a 1×1 P7 still normalises over > 1 value
        model["head"]["num_groups"] = C // 4
    model["preprocess"].update(min_size=64, max_size=128)
    return cfg


def test_head_key_counts_match_the_note() -> None:
    assert len(cvpods_head_keys(4, True, c=256)) == 187
    assert len(cvpods_head_keys(8, True, c=256)) == 363


@pytest.mark.parametrize("name", [D2, FIX4, DYN4, DYN8])
def test_all_keys_consumed_strict_load_and_round_trips(name: str) -> None:
    plain = FGDH_ARCHS[name].num_layers is None
    state = seeded_state(cvpods_keys(name), seed=11)
    converted = convert_fgdh_official(state, plain=plain)
    assert len(converted) == len(state)
    model = build_model(tiny_config(name))
    check_against_model(converted, model, name)
    model.load_state_dict(converted, strict=True)
    assert torch.equal(converted["neck.p6.weight"], state["backbone.top_block.p6.weight"])
    assert torch.equal(converted["head.cls_logits.bias"], state["head.cls_score.bias"])
    assert converted["head.scales.4.scale"] == state["head.scales.4.scale"][0]
    if plain:
        assert torch.equal(converted["head.reg_tower.3.norm.weight"],
                           state["head.bbox_subnet.10.weight"])
    elif FGDH_ARCHS[name].dynamic:
        assert torch.equal(converted["head.cls_tower.layers.1.scale_paths.1.gate.conv.bias"],
                           state["head.cls_subnet.1.dynamic_convs.1.gate.gate_conv.bias"])
    else:
        assert torch.equal(converted["head.reg_tower.layers.3.scale_paths.0.norm.weight"],
                           state["head.bbox_subnet.3.convs.0.1.weight"])
    assert_same(to_fgdh_official(converted), state)
    torch.manual_seed(0)
    ours = model.state_dict()
    exported = to_fgdh_official(ours)
    assert {k: tuple(v.shape) for k, v in exported.items()} == cvpods_keys(name)
    assert_same(convert_fgdh_official(exported, plain=plain), ours)


@pytest.mark.parametrize("name", [D2, "fgdh_r50_fcos_dynamic_d8_low_1x"])
def test_full_size_keys_match_generated_configs(name: str) -> None:
    """R-50, 256 channels: shapes only (meta tensors, nothing allocated)."""
    shapes = cvpods_keys(name, c=256, base=64)
    source = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    with torch.device("meta"):
        model = build_model(fgdh_config(name))
    plain = FGDH_ARCHS[name].num_layers is None
    check_against_model(convert_fgdh_official(source, plain=plain), model, name)


def test_configs_and_aliases() -> None:
    assert set(FGDH_ALIASES.values()) == set(FGDH_ARCHS)
    for alias, name in FGDH_ALIASES.items():
        cfg, arch = fgdh_config(alias), FGDH_ARCHS[name]
        head, neck = cfg["model"]["head"], cfg["model"]["neck"]
        assert neck["extra_input"] == "input" and neck["relu_before_extra"] is True
        assert head["anchor_generator"]["offset"] == 0.0
        if arch.num_layers is None:
            assert head["type"] == "FCOSHead" and head["num_convs"] == 4
        else:
            assert head["type"] == "FCOSRoutingHead" and "num_convs" not in head
            assert (head["num_layers"], head["dynamic"]) == (arch.num_layers, arch.dynamic)
            assert head["budget_loss_weight"] == arch.budget_loss_weight
    assert fgdh_config("fcos.res50.1x.dynamic.d8.lambda-0_8")["model"]["head"][
        "budget_loss_weight"] == 0.8
    with pytest.raises(ConversionError, match="unknown FGDH arch"):
        fgdh_config("fgdh_r50_fcos_dynamic_d16_1x")


def test_detect_arch() -> None:
    assert detect_fgdh_arch(cvpods_keys(D2)) == D2
    assert detect_fgdh_arch(cvpods_keys(FIX4)) == FIX4
    assert detect_fgdh_arch(cvpods_keys("fgdh_r50_fcos_fix_d8_1x")) == "fgdh_r50_fcos_fix_d8_1x"
    assert detect_fgdh_arch(cvpods_keys(DYN4)) == DYN4
    with pytest.raises(ConversionError, match=r"λ.*d8_low_1x.*d8_mid_1x.*d8_high_1x"):
        detect_fgdh_arch(cvpods_keys(DYN8))
    with pytest.raises(ConversionError, match="no FGDH row has 3 dynamic"):
        detect_fgdh_arch(cvpods_head_keys(3, True))


def test_unmatched_and_missing_keys_are_listed(tmp_path: Path) -> None:
    state = seeded_state(cvpods_keys(DYN4))
    del state["head.bbox_subnet.2.depth_module.gate.gate_conv.weight"]
    state["head.cls_subnet.0.dynamic_convs.2.convs.0.weight"] = torch.zeros(1)
    src = tmp_path / "bad.pth"
    torch.save({"model": state}, src)
    with pytest.raises(ConversionError) as err:
        convert_fgdh_file(src, tmp_path / "out", arch=tiny_config(DYN4))
    text = str(err.value)
    assert "missing (1): head.reg_tower.layers.2.depth.gate.conv.weight" in text
    assert "head.cls_subnet.0.dynamic_convs.2.convs.0.weight -> " in text


def test_converted_checkpoint_loads_and_predicts(tmp_path: Path) -> None:
    state = seeded_state(cvpods_keys(DYN4), seed=12)
    src = tmp_path / "fcos_dynamic_d4.pth"
    torch.save({"model": state, "iteration": 90000}, src)
    cfg = tiny_config(DYN4)
    out = CONVERTERS["fgdh-official"](src, tmp_path / "converted", arch=cfg)
    weights, saved, classes, meta = load_checkpoint(out)
    assert meta["category_ids"] == list(COCO_IDS) and len(classes) == 80
    assert saved["model"]["head"]["type"] == "FCOSRoutingHead"
    assert_same(weights, convert_fgdh_official(state))
    detector = Detector.from_checkpoint(out)
    image = torch.rand(3, 80, 64, generator=torch.Generator().manual_seed(1)) * 255
    (pred,) = detector.predict([image])
    assert torch.isfinite(pred.boxes).all() and len(pred) <= 100
    cost = detector.model.head.last_cost
    assert cost is not None and bool((cost.executed <= cost.full).all())
