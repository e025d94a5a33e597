"""Visualisation of DyHead attentions and FGDH gates, on tiny randomly initialised detectors.

Extracted values are checked against independent float64 recomputations from the modules'
weights (sources, DCN sampling, gate convs, costs); image-space maps against hand-worked
coordinate arithmetic; figures for their PNG size; recording for leaving the model untouched.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from dynadet.api import Detector
from dynadet.models.detector import OneStageDetector
from dynadet.models.dyhead import DyHead, DyHeadBlock
from dynadet.models.fcos import FCOSHead
from dynadet.models.fcos_routing import FCOSRoutingHead
from dynadet.models.preprocess import Preprocessor
from dynadet.models.priors import AnchorGenerator
from dynadet.models.routing import RoutingLayer, RoutingTower, geretanh
from dynadet.tools.visualize import (
    GUTTER,
    LUT,
    MIN_COL,
    MIN_WIDTH,
    PAD,
    ROW_H,
    TITLE_H,
    attention_maps,
    attention_summary,
    colormap,
    gate_maps,
    gate_summary,
    level_to_image,
    record_dyhead,
    sampling_points,
    save_attention_figure,
    save_gate_figure,
    to_image_space,
)

BAR_H = 24
STRIDES = [8, 16, 32, 64, 128]
C = 16
ORIGINAL = (50, 70)  # -> resized 64 x 89 (scale 1.28), padded to 64 x 96


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class TinyBackbone(nn.Module):
    """1×1 projection, then average pooling to strides 8..128 (ceil sizes, a valid pyramid)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, C, 1)

    def forward(self, x: Tensor) -> list[Tensor]:
        y = self.proj(x)
        return [F.avg_pool2d(y, s, s, ceil_mode=True) for s in STRIDES]


def _anchors() -> AnchorGenerator:
    return AnchorGenerator(strides=STRIDES, ratios=[1.0], octave_base_scale=1)


def _preprocess() -> Preprocessor:
    return Preprocessor(min_size=64, max_size=96, size_divisor=32)


def dyhead_detector(num_blocks: int = 2) -> OneStageDetector:
    torch.manual_seed(0)
    neck = DyHead(C, C, num_blocks, norm_groups=4)
    for block in neck.blocks:  # spread the scale attention beyond its 0.5 floor
        nn.init.normal_(block.AttnConv[1].weight, std=0.5)
    head = FCOSHead(3, _anchors(), in_channels=C, feat_channels=C, num_convs=0)
    return OneStageDetector(TinyBackbone(), head, _preprocess(), neck).eval()


def fgdh_detector(num_layers: int = 2) -> OneStageDetector:
    torch.manual_seed(0)
    head = FCOSRoutingHead(3, _anchors(), in_channels=C, num_layers=num_layers, num_groups=4)
    with torch.no_grad():
        for tower in (head.cls_tower, head.reg_tower):
            for layer in tower.layers:  # close part of the gates, open the scale paths
                for gate in (layer.depth.gate, *(p.gate for p in layer.scale_paths)):
                    gate.conv.weight.normal_(0, 0.3)
                    gate.conv.bias.fill_(0.0)
                layer.scale_weight.fill_(0.5)
    return OneStageDetector(TinyBackbone(), head, _preprocess()).eval()


def _image(seed: int = 0) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(3, *ORIGINAL, generator=g) * 255


def _no_hooks(model: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


# ----------------------------------------------------------------------------- colours, geometry


def test_colormap_lightness_rises_and_ends_match() -> None:
    c = LUT / 255.0  # CIE L* of each entry (sRGB → linear → luminance → lightness)
    lin = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    lightness = 116 * np.cbrt(lin @ np.array([0.2126, 0.7152, 0.0722])) - 16
    assert (np.diff(lightness) >= 0).all() and (np.diff(lightness[::4]) > 0).all()
    steps = np.diff(lightness[::32])  # near-uniform lightness: a perceptual ramp
    assert lightness[0] < 16 and lightness[-1] > 90 and steps.min() > 8 and steps.max() < 11
    assert LUT[0].tolist() == [68, 1, 84] and LUT[-1].tolist() == [253, 231, 37]
    out = colormap(torch.tensor([[-1.0, 0.5], [2.0, float("nan")]]), 0.0, 1.0)
    assert out.shape == (2, 2, 3) and out.dtype == np.uint8
    assert out[0, 0].tolist() == LUT[0].tolist() and out[1, 0].tolist() == LUT[-1].tolist()
    assert out[1, 1].tolist() == LUT[0].tolist() and out[0, 1].tolist() == LUT[128].tolist()
    # a value range maps its ends to the ends of the table
    assert colormap(np.array([0.5, 1.0]), 0.5, 1.0).tolist() == [LUT[0].tolist(), LUT[-1].tolist()]


@pytest.mark.parametrize("out_size", [None, (13, 21)])
def test_to_image_space_undoes_padding_and_resize(out_size) -> None:
    # stride 4, resized 20 x 30 inside a padded 24 x 40 batch, original 40 x 60 (scale 0.5)
    stride, resized, original = 4, (20, 30), (40, 60)
    rows, cols = 24 // stride, 40 // stride
    col_ramp = torch.arange(cols, dtype=torch.float64).expand(rows, cols).clone()
    row_ramp = torch.arange(rows, dtype=torch.float64)[:, None].expand(rows, cols).clone()
    col_ramp[:, math.ceil(30 / stride):] = 1000.0  # cells wholly in the padding never leak in
    row_ramp[math.ceil(20 / stride):, :] = 1000.0
    both = torch.stack((col_ramp, row_ramp))
    out = to_image_space(both, stride, resized, original, out_size)
    ho, wo = out_size or original
    assert out.shape == (2, ho, wo)
    # bilinear interpolation of a linear ramp is the ramp: the feature coordinate, clamped
    x0 = (torch.arange(wo, dtype=torch.float64) + 0.5) * (60 / wo)
    y0 = (torch.arange(ho, dtype=torch.float64) + 0.5) * (40 / ho)
    fx = (x0 * (30 / 60) / stride - 0.5).clamp(0, math.ceil(30 / stride) - 1)
    fy = (y0 * (20 / 40) / stride - 0.5).clamp(0, math.ceil(20 / stride) - 1)
    torch.testing.assert_close(out[0], fx.expand(ho, wo), rtol=0, atol=1e-12)
    torch.testing.assert_close(out[1], fy[:, None].expand(ho, wo), rtol=0, atol=1e-12)


def test_level_to_image_by_hand() -> None:
    yx = torch.tensor([[0.0, 0.0], [2.0, 3.0], [-0.5, 1.25]], dtype=torch.float64)
    out = level_to_image(yx, 8, (64, 89), (50, 70))
    expect = [[(c + 0.5) * 8 * 70 / 89, (r + 0.5) * 8 * 50 / 64] for r, c in yx.tolist()]
    torch.testing.assert_close(out, torch.tensor(expect, dtype=torch.float64))


def _bilinear(x: Tensor, y: float, xx: float) -> Tensor:
    """DCN's bilinear sample of ``x [C, H, W]`` at ``(y, x)`` (zero outside), by hand."""
    h, w = x.shape[-2:]
    out = torch.zeros(x.shape[0], dtype=torch.float64)
    if y <= -1 or y >= h or xx <= -1 or xx >= w:
        return out
    y0, x0 = math.floor(y), math.floor(xx)
    for yy, wy in ((y0, 1 - (y - y0)), (y0 + 1, y - y0)):
        for xc, wx in ((x0, 1 - (xx - x0)), (x0 + 1, xx - x0)):
            if 0 <= yy < h and 0 <= xc < w:
                out += wy * wx * x[:, yy, xc].double()
    return out


def test_sampling_points_are_where_the_dcn_samples() -> None:
    torch.manual_seed(1)
    block = DyHeadBlock(C, C, norm_groups=4).eval()
    feats = [torch.randn(1, C, 7, 9), torch.randn(1, C, 4, 5)]
    rec = record_dyhead(block, feats)
    assert rec["offset"][0].shape == (1, 9, 2, 7, 9) and rec["mask"][0].shape == (1, 9, 7, 9)
    om = block.offset(feats[0]).detach()
    torch.testing.assert_close(rec["offset"][0].flatten(1, 2), om[:, :18])
    torch.testing.assert_close(rec["mask"][0], om[:, 18:].sigmoid())
    assert (rec["offset"][0].abs() > 0.05).any()  # real offsets, not the zero grid
    points = sampling_points(rec["offset"][0][0])  # [9, 2, 7, 9]
    conv = block.DyConv[1].conv
    dcn = conv(feats[0], om[:, :18], om[:, 18:].sigmoid()).detach()[0]
    weight = conv.weight.detach().double()
    for oy, ox in [(0, 0), (3, 4), (6, 8)]:
        acc = conv.bias.detach().double().clone()
        for k in range(9):
            py, px = points[k, :, oy, ox].tolist()
            sample = _bilinear(feats[0][0], py, px) * float(rec["mask"][0][0, k, oy, ox])
            acc += weight[:, :, k // 3, k % 3] @ sample
        torch.testing.assert_close(dcn[:, oy, ox].double(), acc, atol=1e-5, rtol=1e-5)
    grid = sampling_points(torch.zeros(9, 2, 3, 3))  # zero offsets: the plain 3x3 window
    assert grid[:, :, 1, 2].tolist() == [[y, x] for y in (0, 1, 2) for x in (1, 2, 3)]


# ----------------------------------------------------------------------------- DyHead


def test_scale_attention_equals_the_blocks_hard_sigmoid() -> None:
    model = dyhead_detector(num_blocks=2)
    block = model.neck.blocks[0]
    gen = torch.Generator().manual_seed(3)
    feats = [torch.randn(2, C, h, w, generator=gen) for h, w in [(8, 12), (4, 6), (2, 3)]]
    rec = record_dyhead(block, feats)
    scale = rec["scale"]
    assert scale.shape == (2, 1, 3, 3)
    assert torch.isnan(scale[:, 0, 0, 0]).all() and torch.isnan(scale[:, 0, 2, 2]).all()
    with torch.no_grad():
        for level, x in enumerate(feats):
            om = block.offset(x)
            off, mask = om[:, :18], om[:, 18:].sigmoid()
            sources = {1: block.DyConv[1](x, off, mask)}
            if level > 0:
                sources[0] = block.DyConv[2](feats[level - 1], off, mask)
            if level < 2:
                coarse = feats[level + 1]
                c_off, c_mask = block.coarse_offset(off, mask, tuple(coarse.shape[-2:]))
                y = block.DyConv[0](coarse, c_off, c_mask)
                sources[2] = F.interpolate(y, size=x.shape[-2:], mode="bilinear",
                                           align_corners=True)
            for src, f in sources.items():
                att = (f.double().mean((2, 3)) @ block.AttnConv[1].weight.double()[:, :, 0, 0].T
                       + block.AttnConv[1].bias.double()).relu()
                expect = (att + 3).clamp(0, 6) / 6
                torch.testing.assert_close(scale[:, 0, level, src].double(), expect[:, 0],
                                           atol=1e-6, rtol=1e-6)
    finite = scale[~torch.isnan(scale)]
    assert ((finite >= 0.5) & (finite <= 1)).all() and finite.std() > 0.01
    torch.testing.assert_close(rec["output"][0], block(feats)[0])
    assert _no_hooks(block)


def test_attention_maps_end_to_end() -> None:
    model = dyhead_detector(num_blocks=2)
    image = _image()
    with torch.no_grad():
        before = model([image])[0]
    maps = attention_maps(Detector(model, {}, ["a", "b", "c"]), image, top_k=3)
    assert _no_hooks(model)
    h0, w0 = ORIGINAL
    assert maps["image_size"] == (64, 89) and maps["original_size"] == (h0, w0)
    assert maps["strides"] == [8.0, 16.0, 32.0, 64.0, 128.0]
    assert maps["levels"] == ["P3", "P4", "P5", "P6", "P7"]
    sizes = [(8, 12), (4, 6), (2, 3), (1, 2), (1, 1)]
    assert maps["scale"].shape == (2, 5, 3)
    for lvl, (hl, wl) in enumerate(sizes):
        assert maps["offset"][lvl].shape == (9, 2, hl, wl)
        assert maps["mask"][lvl].shape == (9, hl, wl)
        assert maps["activation"][lvl].shape == (hl, wl)
    assert maps["mask_image"].shape == (5, h0, w0)
    assert ((maps["mask_image"] > 0) & (maps["mask_image"] < 1)).all()
    for key in ("boxes", "scores", "labels"):  # the visualised forward is the plain forward
        torch.testing.assert_close(maps["detections"][key], before[key])
    with torch.no_grad():  # activations of the last block, recomputed
        batch = model.preprocess([image])
        feats = model.features(batch.tensor)
    pts = maps["points"][0]
    cols = math.ceil(89 / 8)  # 12: the last P3 column is partly image, so it counts
    act = feats[0][0].norm(dim=0)[: math.ceil(64 / 8), :cols]
    best = act.flatten().topk(3).indices
    assert pts["cells"].tolist() == [[int(i) // cols, int(i) % cols] for i in best]
    torch.testing.assert_close(maps["activation"][0], feats[0][0].norm(dim=0))
    assert pts["centers"].shape == (3, 2) and pts["samples"].shape == (3, 9, 2)
    assert pts["weights"].shape == (3, 9)
    cy, cx = pts["cells"][0].tolist()
    torch.testing.assert_close(pts["weights"][0], maps["mask"][0][:, cy, cx])
    expect = level_to_image(sampling_points(maps["offset"][0])[:, :, cy, cx].double(), 8,
                            (64, 89), ORIGINAL)
    torch.testing.assert_close(pts["samples"][0].double(), expect)
    assert (pts["centers"][:, 0] <= w0).all() and (pts["centers"][:, 1] <= h0).all()
    summary = attention_summary(maps)
    json.dumps(summary)
    assert summary["scale_attention"][1]["P3"]["finer"] is None
    assert summary["scale_attention"][1]["P4"]["same"] == round(float(maps["scale"][1, 1, 1]), 4)


# ----------------------------------------------------------------------------- FGDH


def _hand_gates(layer: RoutingLayer, feats: list[Tensor]) -> dict[str, list[Tensor]]:
    """Gates of one routing layer recomputed in float64 from its weights and inputs."""

    def gate(module, x: Tensor) -> Tensor:
        v = F.conv2d(x.double(), module.conv.weight.double(), module.conv.bias.double(), padding=1)
        return geretanh(v, module.tau)[0, 0]

    def path(s: int, x: Tensor) -> Tensor:
        p = layer.scale_paths[s]
        f = F.conv2d(x.double(), p.conv.weight.double(), p.conv.bias.double(), padding=1,
                     groups=x.shape[1])
        f = F.group_norm(f, p.norm.num_groups, p.norm.weight.double(), p.norm.bias.double())
        return f * gate(p.gate, x)

    num = len(feats)
    out: dict[str, list[Tensor]] = {"down": [], "up": [], "depth": []}
    for level, x in enumerate(feats):
        out["down"].append(gate(layer.scale_paths[0].gate, x))
        out["up"].append(gate(layer.scale_paths[1].gate, x))
        y = x.double() * layer.output_weight.double()
        size = x.shape[-2:]
        agg = 0
        if level > 0:
            agg = agg + F.interpolate(path(0, feats[level - 1]), size=size, mode="bilinear",
                                      align_corners=True)
        if level < num - 1:
            agg = agg + F.interpolate(path(1, feats[level + 1]), size=size, mode="bilinear",
                                      align_corners=True)
        y = y + layer.scale_weight.double() * agg
        out["depth"].append(gate(layer.depth.gate, y))
    return out


def test_gate_maps_equal_independent_gates_and_cost() -> None:
    model = fgdh_detector(num_layers=2)
    image = _image(1)
    maps = gate_maps(model, image)
    assert set(maps["gates"]) == {"cls_tower", "reg_tower"}
    sizes = [(8, 12), (4, 6), (2, 3), (1, 2), (1, 1)]
    with torch.no_grad():
        feats0 = model.features(model.preprocess([image]).tensor)
        executed = full = 0.0
        for name, tower in (("cls_tower", model.head.cls_tower),
                            ("reg_tower", model.head.reg_tower)):
            feats = feats0
            for i, layer in enumerate(tower.layers):
                hand = _hand_gates(layer, feats)
                for path in ("depth", "down", "up"):
                    for lvl, (hl, wl) in enumerate(sizes):
                        got = maps["gates"][name][path][lvl]
                        assert got.shape == (2, hl, wl)
                        torch.testing.assert_close(got[i].double(), hand[path][lvl],
                                                   atol=1e-5, rtol=1e-5)
                for g in hand["down"] + hand["up"]:  # every scale gate is counted
                    executed += float((g > 0).sum()) * layer.scale_unit
                for g in hand["depth"]:
                    dilated = F.max_pool2d(g[None, None], 3, stride=1, padding=1)
                    executed += float((g > 0).sum() + (dilated > 0).sum()) * layer.depth_unit
                full += layer.full_cost(sizes)
                feats, _ = layer(feats)
    depth = torch.cat([g.flatten() for g in maps["gates"]["cls_tower"]["depth"]])
    assert (depth == 0).any() and (depth > 0).any()  # the test covers open and closed gates
    assert maps["executed_macs"] == executed and maps["full_macs"] == full
    assert 0 < maps["executed_ratio"] < 1
    cost = model.head.last_cost
    assert maps["executed_ratio"] == pytest.approx(float(cost.executed[0] / cost.full[0]))
    for name in ("cls_tower", "reg_tower"):  # image-space mean over layers, original size
        img = maps["depth_image"][name]
        assert img.shape == (5, *ORIGINAL)
        mean_p3 = maps["gates"][name]["depth"][0].mean(0)
        torch.testing.assert_close(img[0], to_image_space(mean_p3, 8, (64, 89), ORIGINAL))
    summary = gate_summary(maps)
    json.dumps(summary)
    p3 = maps["gates"]["reg_tower"]["depth"][0][1, :8, :12]
    assert summary["depth_gates"]["reg_tower"]["P3"]["open"][1] == round(
        float((p3 > 0).double().mean()), 4)


def test_recording_is_off_by_default_and_restored() -> None:
    model = fgdh_detector(num_layers=1)
    layers = [m for m in model.modules() if isinstance(m, RoutingLayer)]
    assert all(not m.keep_gates and m.last_gates is None for m in layers)
    image = _image(2)
    with torch.no_grad():
        before = model([image])[0]
    maps = gate_maps(model, image)
    with torch.no_grad():
        after = model([image])[0]
    assert all(not m.keep_gates and m.last_gates is None for m in layers)
    assert _no_hooks(model)
    for key in ("boxes", "scores", "labels"):
        assert torch.equal(before[key], after[key])
        assert torch.equal(before[key], maps["detections"][key])
    dy = dyhead_detector(num_blocks=1)
    with torch.no_grad():
        plain = dy.features(dy.preprocess([image]).tensor)
    attention_maps(dy, image)
    with torch.no_grad():
        again = dy.features(dy.preprocess([image]).tensor)
    assert all(torch.equal(a, b) for a, b in zip(plain, again, strict=True))
    assert _no_hooks(dy)


def test_wrong_model_kind_is_refused() -> None:
    image = _image()
    with pytest.raises(ValueError, match="DyHead"):
        attention_maps(fgdh_detector(1), image)
    with pytest.raises(ValueError, match="FCOSRoutingHead"):
        gate_maps(dyhead_detector(1), image)
    fix = RoutingTower(C, 1, dynamic=False, num_groups=4)
    model = fgdh_detector(1)
    model.head.cls_tower = model.head.reg_tower = fix
    with pytest.raises(ValueError, match="gated routing"):
        gate_maps(model, image)
    with pytest.raises(TypeError):
        gate_maps(object(), image)


# ----------------------------------------------------------------------------- figures


def _png(path) -> Image.Image:
    with Image.open(path) as im:
        assert im.format == "PNG"
        im.load()
        return im.copy()


def test_attention_figure_size(tmp_path) -> None:
    maps = attention_maps(dyhead_detector(num_blocks=2), _image())
    out = tmp_path / "a_attention.png"
    fig = save_attention_figure(maps, out, panel_size=96)
    ph, pw = 69, 96  # 50 x 70 fitted to 96 on the long side
    col = max(pw, MIN_COL)
    width = max(MIN_WIDTH, GUTTER + 5 * (col + PAD))
    height = PAD + TITLE_H + ph + PAD + BAR_H + (2 + 2) * ROW_H + PAD
    assert (width, height) == (640, 203)
    assert _png(out).size == fig.size == (width, height)
    # the first panel is the heat map over the image, not blank
    panel = np.asarray(fig)[PAD + TITLE_H : PAD + TITLE_H + ph, GUTTER + 8 : GUTTER + 8 + pw]
    assert panel.std() > 5


@pytest.mark.parametrize(("layers", "rows"), [("mean", 2), ("all", 4), (1, 2), (-1, 2)])
def test_gate_figure_size(tmp_path, layers, rows) -> None:
    maps = gate_maps(fgdh_detector(num_layers=2), _image())
    out = tmp_path / "a_gates.png"
    fig = save_gate_figure(maps, out, layers=layers, panel_size=70)
    ph, pw = 50, 70
    width = max(MIN_WIDTH, GUTTER + 5 * (max(pw, MIN_COL) + PAD))
    height = PAD + TITLE_H + rows * (ph + PAD) + BAR_H + PAD
    assert _png(out).size == fig.size == (width, height) == (640, 70 + rows * 58)


def test_gate_figure_bad_layer(tmp_path) -> None:
    maps = gate_maps(fgdh_detector(num_layers=2), _image())
    with pytest.raises(ValueError, match="layers"):
        save_gate_figure(maps, tmp_path / "x.png", layers=2)

