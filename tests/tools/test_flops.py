"""MAC counting (dynadet.tools.flops) against hand counts, and the FGDH README's static head costs.

README "FLOPs" (fgdynamic.md §4.2, §7 item 9): FCOS D2 98.0 = tower conv MACs / 2^30 at 800×1333
unpadded; Fix D4 198.6 and Fix D8 397.2 = tower MACs + 1 op/channel per norm (depthwise paths
counted twice, unused paths included) / 2^30 at 800×1344.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dynadet.api import build_model
from dynadet.config import build, load_config
from dynadet.models.routing import RoutingTower
from dynadet.ops.deform_conv import ModulatedDeformConv2d
from dynadet.ops.masked_conv import MaskedConvGN, dilate_mask
from dynadet.ops.roi_align import MultiScaleRoIAlign, RoIAlign
from dynadet.registry import REGISTRY
from dynadet.tools.convert_fgdh import FGDH_ALIASES, FGDH_ARCHS, fgdh_config
from dynadet.tools.flops import (
    PAPER_UNIT,
    MacCounter,
    conv_macs,
    count_model_macs,
    deform_conv_macs,
    head_cost,
    level_sizes,
    masked_conv_macs,
    readme_head_cost,
    roi_align_macs,
    tower_cost,
)

D2, FIX4, FIX8 = "fgdh_r50_fcos_d2_1x", "fgdh_r50_fcos_fix_d4_1x", "fgdh_r50_fcos_fix_d8_1x"


def counted(fn, model: nn.Module | None = None):
    with torch.no_grad(), MacCounter(model) as counter:
        fn()
    return counter.report()


# ----------------------------------------------------------------------------- single ops


def test_conv_and_linear_match_hand_counts() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, stride=2, padding=1)  # 9×11 → 5×6
    assert counted(lambda: conv(torch.randn(2, 3, 9, 11))).macs == 2 * 5 * 6 * 4 * 3 * 9
    grouped = nn.Conv2d(4, 6, 3, groups=2)  # 7×8 → 5×6, 2 input channels per output
    assert counted(lambda: grouped(torch.randn(1, 4, 7, 8))).macs == 30 * 6 * 2 * 9
    assert conv_macs(4, 6, 3, (5, 6), groups=2) == 30 * 6 * 2 * 9
    linear = nn.Linear(10, 5)
    report = counted(lambda: linear(torch.randn(7, 10)))
    assert report.macs == 7 * 10 * 5 and report.flops == 2 * 7 * 10 * 5


def test_inplace_gemms_resizes_and_sampling() -> None:
    a, b = torch.randn(3, 4), torch.randn(4, 5)
    assert counted(lambda: torch.zeros(3, 5).addmm_(a, b)).macs == 3 * 4 * 5
    x, y = torch.randn(2, 3, 4), torch.randn(2, 4, 6)
    assert counted(lambda: torch.zeros(2, 3, 6).baddbmm_(x, y)).macs == 2 * 3 * 4 * 6
    image = torch.randn(1, 3, 5, 5)
    up = counted(lambda: F.interpolate(image, size=(10, 7), mode="bilinear", align_corners=True))
    assert up.macs == 4 * 3 * 10 * 7  # four weighted neighbours per output value
    near = counted(lambda: F.interpolate(image, size=(10, 7), mode="nearest"))
    assert near.macs == 0
    grid = torch.rand(2, 4, 6, 2) * 2 - 1
    feats = torch.randn(2, 3, 5, 5)
    sample = counted(lambda: F.grid_sample(feats, grid, align_corners=False))
    assert sample.macs == 4 * 2 * 3 * 4 * 6


def test_deform_conv_is_conv_plus_bilinear_sampling() -> None:
    torch.manual_seed(0)
    dcn = ModulatedDeformConv2d(4, 6, 3, stride=2, padding=1, backend="torch")
    x = torch.randn(2, 4, 9, 13)  # → 5×7
    offset, mask = torch.randn(2, 18, 5, 7), torch.rand(2, 9, 5, 7)
    report = counted(lambda: dcn(x, offset, mask))
    conv, sampling = 2 * 35 * 6 * 4 * 9, 2 * 4 * 9 * 35 * 4
    assert deform_conv_macs(x.shape, dcn.weight.shape, (5, 7)) == (conv, sampling)
    assert report.macs == conv + sampling
    assert report.by_op == {"baddbmm_": conv, "grid_sampler_2d": sampling}


@pytest.mark.parametrize("threshold", [0.0, 2.0])  # dense fallback, sparse gather
def test_masked_conv_counts_active_pixels_only(threshold: float) -> None:
    torch.manual_seed(0)
    conv = MaskedConvGN(8, 6, num_groups=2, relu=True, dense_threshold=threshold)
    model = nn.ModuleDict({"mconv": conv})
    x = torch.randn(2, 8, 7, 9)
    mask = torch.zeros(2, 1, 7, 9, dtype=torch.bool)
    mask.view(-1)[torch.randperm(2 * 63)[:13]] = True
    report = counted(lambda: model["mconv"](x, mask, "masked"), model)
    assert report.macs == 13 * 6 * 8 * 9 == masked_conv_macs(mask, conv.weight)
    assert report.parts == {"mconv": 13 * 6 * 8 * 9, "other": 0}
    assert report.by_op == {"masked_conv (active pixels)": 13 * 6 * 8 * 9}
    dense = counted(lambda: model["mconv"](x), model)  # no mask: the training conv
    assert dense.macs == 2 * 63 * 6 * 8 * 9


def test_roi_align_counts_bilinear_samples() -> None:
    feats = torch.randn(1, 4, 16, 16)
    rois = torch.tensor([[0, 0.0, 0.0, 8.0, 12.0], [0, 2.0, 2.0, 10.0, 6.0]])
    fixed = RoIAlign(2, spatial_scale=0.5, sampling_ratio=2)
    assert counted(lambda: fixed(feats, rois), fixed).macs == 2 * 4 * (2 * 2) * 4 * 4
    adaptive = RoIAlign(2, spatial_scale=0.5, sampling_ratio=0)
    # RoI 0: 4×6 on the map → 2×3 samples per bin; RoI 1: 4×2 → 2×1 per bin
    expected = 4 * 4 * (6 + 2) * 4
    assert counted(lambda: adaptive(feats, rois), adaptive).macs == expected
    assert roi_align_macs(rois, 4, (2, 2), 0.5, 0, False) == expected
    pyramid = MultiScaleRoIAlign(2, sampling_ratio=0, featmap_strides=(4, 8))
    maps = [torch.randn(1, 4, 16, 16), torch.randn(1, 4, 8, 8)]
    boxes = [torch.tensor([[0.0, 0.0, 16.0, 24.0]])]  # small: level 0, 4×6 on the map
    assert counted(lambda: pyramid(maps, boxes), pyramid).macs == 4 * 4 * 6 * 4


# ----------------------------------------------------------------------------- FGDH heads


def head_of(preset: str, **changes) -> nn.Module:
    cfg = load_config(preset)["model"]["head"]
    cfg.update(changes)
    return build(cfg, REGISTRY)


def test_level_sizes_match_a_real_backbone_and_fpn() -> None:
    cfg = load_config(D2, ["model.backbone.depth=18", "+model.backbone.base_width=8",
                           "model.neck.in_channels=[16,32,64]", "model.neck.out_channels=8"])
    model = build_model(cfg).eval()
    with torch.no_grad():
        feats = model.features(torch.randn(1, 3, 45, 77))
    assert [tuple(f.shape[-2:]) for f in feats] == level_sizes(45, 77)
    assert level_sizes(800, 1333) == [(100, 167), (50, 84), (25, 42), (13, 21), (7, 11)]


def test_plain_tower_analytic_count_equals_flop_counter() -> None:
    torch.manual_seed(0)
    head = head_of(D2, in_channels=32, feat_channels=32).eval()  # GN(32) needs 32 channels
    sizes = level_sizes(70, 130)  # P7 1×2: GN with one channel per group needs 2 pixels
    feats = [torch.randn(1, 32, h, w) for h, w in sizes]
    report = counted(lambda: head(feats), head)
    per_pixel = 2 * 4 * 32 * 32 * 9  # 2 towers × 4 convs, bias and GN not counted
    assert tower_cost(head, sizes) == per_pixel * sum(h * w for h, w in sizes)
    assert report.parts["cls_tower"] + report.parts["reg_tower"] == tower_cost(head, sizes)


def test_fix_tower_counter_and_readme_convention() -> None:
    """Same small input: the counter's conv + resize MACs of a Fix tower, hand-counted, and the
    README convention (norms, depthwise twice, unused paths) derived from the same sizes."""
    torch.manual_seed(0)
    c, layers = 16, 2
    tower = RoutingTower(c, layers, dynamic=False, num_groups=4).eval()
    sizes = level_sizes(45, 77)
    px = [h * w for h, w in sizes]
    report = counted(lambda: tower([torch.randn(1, c, h, w) for h, w in sizes]), tower)
    used_paths = sum(px[:-1]) + sum(px[1:])  # down path on all but the last level, up on all
    convs = layers * (sum(px) * 2 * c * c * 9 + used_paths * c * 9)
    assert report.by_op["convolution"] == convs
    assert report.by_op["upsample_bilinear2d"] == layers * 4 * c * used_paths
    readme = layers * sum(px) * (2 * (c * c * 9 + c) + 2 * (2 * c * 9 + c))
    assert tower.full_cost(sizes) == readme


def test_readme_static_head_costs_exactly() -> None:
    with torch.device("meta"):
        d2, fix4, fix8 = head_of(D2), head_of(FIX4), head_of(FIX8)
    unpadded = sum(h * w for h, w in level_sizes(800, 1333))
    padded = sum(h * w for h, w in level_sizes(800, 1344))
    assert (unpadded, padded) == (22300, 22400)
    assert tower_cost(d2, level_sizes(800, 1333)) == 8 * 256 * 256 * 9 * unpadded
    layer = 2 * (256 * 256 * 9 + 256) + 2 * (256 * 2 * 9 + 256)
    assert tower_cost(fix4, level_sizes(800, 1344)) == 2 * 4 * layer * padded
    assert tower_cost(fix8, level_sizes(800, 1344)) == 2 * 8 * layer * padded
    assert round(readme_head_cost(d2, 800, 1333), 1) == 98.0
    assert round(readme_head_cost(fix4, 800, 1333), 1) == 198.6
    assert round(readme_head_cost(fix8, 800, 1333), 1) == 397.2
    assert math.isclose(readme_head_cost(fix8, 800, 1333), 2 * 8 * layer * padded / PAPER_UNIT)
    with torch.device("meta"):  # dynamic heads with every gate open cost the Fix numbers
        dyn8 = head_of("fgdh_r50_fcos_dynamic_d8_low_1x")
    assert readme_head_cost(dyn8, 800, 1333) == readme_head_cost(fix8, 800, 1333)


def test_dynamic_head_masked_convs_match_the_gates() -> None:
    """Executed MACs of the depth paths from the counter equal those implied by the gates."""
    torch.manual_seed(0)
    c = 16
    head = head_of("fgdh_r50_fcos_dynamic_d4_mid_1x", in_channels=c, num_groups=4,
                   num_layers=2, init_gate=0.0).eval()  # gate logits around 0: about half open
    layers = [*head.cls_tower.layers, *head.reg_tower.layers]
    for layer in layers:
        layer.keep_gates = True
    feats = [torch.randn(1, c, h, w) for h, w in level_sizes(45, 77)]
    report = counted(lambda: head(feats), head)
    active = sum(
        int(dilate_mask(g).sum()) + int((g > 0).sum())
        for layer in layers for g in layer.last_gates["depth"]
    )
    full = 2 * len(layers) * sum(f[0, 0].numel() for f in feats)
    assert 0.2 * full < active < 0.9 * full
    assert report.by_op["masked_conv (active pixels)"] == active * c * c * 9
    depth_unit = c * c * 9 + c
    executed = float(head.last_cost.executed[0])
    assert executed >= active * depth_unit and executed < head.full_cost(level_sizes(45, 77))


def test_head_cost_over_inputs_and_model_count() -> None:
    torch.manual_seed(0)
    cfg = load_config("fgdh_r50_fcos_dynamic_d4_mid_1x", [
        "model.backbone.depth=18", "+model.backbone.base_width=8",
        "model.neck.in_channels=[16,32,64]", "model.neck.out_channels=16",
        "+model.head.in_channels=16", "model.head.num_groups=4", "model.head.num_layers=1",
        "model.head.init_gate=0.0", "model.preprocess.min_size=64",
        "model.preprocess.max_size=96",
    ])
    model = build_model(cfg).eval()
    images = [torch.rand(3, 64, 64) * 255, torch.rand(3, 64, 96) * 255]
    cost = head_cost(model, [[im] for im in images])
    assert cost.dynamic and len(cost.executed) == 2
    assert cost.full == [model.head.full_cost(level_sizes(64, 64)),
                         model.head.full_cost(level_sizes(64, 96))]
    assert all(0 < e < f for e, f in zip(cost.executed, cost.full, strict=True))
    summary = cost.summary()
    assert summary["paper_units"]["min"] == min(cost.executed) / PAPER_UNIT
    assert summary["gmacs"]["max"] == max(cost.executed) / 1e9
    report = count_model_macs(model, images[:1])
    parts = ("backbone", "neck", "head", "other")
    assert sum(report.parts[p] for p in parts) == report.macs > 0
    assert report.batch_shape == (1, 3, 64, 64)


# ----------------------------------------------------------------------------- presets


@pytest.mark.parametrize("name", sorted(FGDH_ARCHS))
def test_presets_equal_the_row_specification(name: str) -> None:
    preset = load_config(name)
    assert preset == fgdh_config(name, from_spec=True)
    alias = next(a for a, n in FGDH_ALIASES.items() if n == name)
    assert fgdh_config(alias) == preset


def test_onednn_linear_is_counted() -> None:
    """The sparse conv's CPU GEMM (oneDNN ``_linear_pointwise``) counts as a linear layer."""
    try:
        linear = torch.ops.mkldnn._linear_pointwise
    except (AttributeError, RuntimeError):
        pytest.skip("this torch build has no oneDNN matmul")
    x, w = torch.randn(70, 36), torch.randn(5, 36)
    with torch.no_grad(), MacCounter() as counter:
        out = linear(x, w, None, "none", [], "")
    torch.testing.assert_close(out, x @ w.t())
    assert counter.report().macs == 70 * 36 * 5
