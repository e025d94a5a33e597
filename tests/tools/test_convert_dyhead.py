"""DyHead converters (official Detectron2 release, MMDetection) against the documented key lists.

The source state dicts are enumerated here from the structure in the reference notes
(``dyhead.md`` §2 / §4.1 / §4.2, ``one_stage.md`` §2): detectron2 ResNet-50 (FrozenBN) or Swin-T +
FPN + ``dyhead_tower`` + ATSS / RetinaNet / Faster R-CNN heads, and MMDetection's
torchvision-named ResNet + ``neck=[FPN, DyHead]`` + ATSS head. Widths are tiny (stem 8, FPN/DyHead
32 channels, two blocks, FCs 32, Swin embedding 16); the depth layout (3/4/6/3 bottlenecks) is
R-50's.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

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
FC = 32  # R-CNN box head width (1024)
SWIN = {"embed": 16, "depths": (2, 2, 2, 2), "heads": (1, 2, 2, 4), "window": 7}  # Swin-T: 96 …
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


def d2_fpn_keys(
    prefix: str, p6_in: int | None, base: int = BASE, c: int = C, first: int = 3
) -> Shapes:
    """detectron2 ``FPN`` on res{first}–res5 (input widths of R-50 at ``base``) +
    ``LastLevelP6P7`` (``p6_in``) or ``LastLevelMaxPool`` (``p6_in=None``: no weights)."""
    keys: Shapes = {}
    for level in range(first, 6):  # res{l} has 2^l · base channels
        keys |= {f"{prefix}fpn_lateral{level}.weight": (c, base * 2**level, 1, 1),
                 f"{prefix}fpn_lateral{level}.bias": (c,),
                 f"{prefix}fpn_output{level}.weight": (c, c, 3, 3),
                 f"{prefix}fpn_output{level}.bias": (c,)}
    if p6_in is None:
        return keys
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
        keys |= atss_head_keys(c)
    else:
        for tower in ("cls_subnet", "bbox_subnet"):
            for i in (0, 2, 4, 6):
                keys |= {f"head.{tower}.{i}.weight": (c, c, 3, 3), f"head.{tower}.{i}.bias": (c,)}
        keys |= {"head.cls_score.weight": (9 * 80, c, 3, 3), "head.cls_score.bias": (9 * 80,),
                 "head.bbox_pred.weight": (9 * 4, c, 3, 3), "head.bbox_pred.bias": (9 * 4,)}
    return keys


def atss_head_keys(c: int = C) -> Shapes:
    """Official ATSS head: 1×1 ``cls_logits`` / ``bbox_pred`` / ``centerness``, 5 ``Scale``s."""
    keys: Shapes = {}
    for name, rows in (("cls_logits", 80), ("bbox_pred", 4), ("centerness", 1)):
        keys |= {f"head.{name}.weight": (rows, c, 1, 1), f"head.{name}.bias": (rows,)}
    return keys | {f"head.scales.{lvl}.scale": (1,) for lvl in range(5)}


def official_rcnn_keys(
    nested: bool = True, c: int = C, base: int = BASE, blocks: int = BLOCKS, fc: int = FC
) -> Shapes:
    """Official Faster R-CNN + DyHead (``dyhead_r50_rcnn_fpn_1x``): FPN on res2–res5 with
    ``LastLevelMaxPool``, ``StandardRPNHead``, ``FastRCNNConvFCHead`` (2 FC), predictor with
    81 classes (background last) and 320 class-specific deltas."""
    fpn = "backbone.backbone." if nested else "backbone."
    keys = d2_resnet_keys(fpn + "bottom_up.", base) | d2_fpn_keys(fpn, None, base, c, first=2)
    keys |= official_tower_keys(c, blocks)
    rpn = "proposal_generator.rpn_head."
    keys |= {rpn + "conv.weight": (c, c, 3, 3), rpn + "conv.bias": (c,),
             rpn + "objectness_logits.weight": (3, c, 1, 1), rpn + "objectness_logits.bias": (3,),
             rpn + "anchor_deltas.weight": (12, c, 1, 1), rpn + "anchor_deltas.bias": (12,)}
    keys |= {"roi_heads.box_head.fc1.weight": (fc, c * 49), "roi_heads.box_head.fc1.bias": (fc,),
             "roi_heads.box_head.fc2.weight": (fc, fc), "roi_heads.box_head.fc2.bias": (fc,),
             "roi_heads.box_predictor.cls_score.weight": (81, fc),
             "roi_heads.box_predictor.cls_score.bias": (81,),
             "roi_heads.box_predictor.bbox_pred.weight": (320, fc),
             "roi_heads.box_predictor.bbox_pred.bias": (320,)}
    return keys


def swin_keys(
    prefix: str, embed: int, depths: tuple[int, ...], heads: tuple[int, ...], window: int,
    attn_mask: bool = False,
) -> Shapes:
    """Swin backbone of DyHead's ``extra/swint.py`` (out_indices 1–3 → ``norm1..3``);
    ``attn_mask``: also the per-block shift masks some Swin versions register as buffers."""
    keys: Shapes = {prefix + "patch_embed.proj.weight": (embed, 3, 4, 4),
                    prefix + "patch_embed.proj.bias": (embed,),
                    prefix + "patch_embed.norm.weight": (embed,),
                    prefix + "patch_embed.norm.bias": (embed,)}
    for i, (depth, n_heads) in enumerate(zip(depths, heads, strict=True)):
        dim = embed * 2**i
        for j in range(depth):
            p = f"{prefix}layers.{i}.blocks.{j}."
            keys |= {p + "norm1.weight": (dim,), p + "norm1.bias": (dim,),
                     p + "attn.relative_position_bias_table": ((2 * window - 1) ** 2, n_heads),
                     p + "attn.relative_position_index": (window**2, window**2),
                     p + "attn.qkv.weight": (3 * dim, dim), p + "attn.qkv.bias": (3 * dim,),
                     p + "attn.proj.weight": (dim, dim), p + "attn.proj.bias": (dim,),
                     p + "norm2.weight": (dim,), p + "norm2.bias": (dim,),
                     p + "mlp.fc1.weight": (4 * dim, dim), p + "mlp.fc1.bias": (4 * dim,),
                     p + "mlp.fc2.weight": (dim, 4 * dim), p + "mlp.fc2.bias": (dim,)}
            if attn_mask and j % 2:
                keys[p + "attn_mask"] = (4, window**2, window**2)
        if i < len(depths) - 1:
            keys |= {f"{prefix}layers.{i}.downsample.reduction.weight": (2 * dim, 4 * dim),
                     f"{prefix}layers.{i}.downsample.norm.weight": (4 * dim,),
                     f"{prefix}layers.{i}.downsample.norm.bias": (4 * dim,)}
    for k in (1, 2, 3):
        width = (embed * 2**k,)
        keys |= {f"{prefix}norm{k}.weight": width, f"{prefix}norm{k}.bias": width}
    return keys


def official_swin_keys(
    nested: bool = True, c: int = C, blocks: int = BLOCKS, attn_mask: bool = False, **swin
) -> Shapes:
    """Official Swin-T ATSS + DyHead (``dyhead_swint_atss_fpn_2x_ms``)."""
    fpn = "backbone.backbone." if nested else "backbone."
    swin = {**SWIN, **swin}
    embed = swin["embed"]
    keys = swin_keys(fpn + "bottom_up.", embed, swin["depths"], swin["heads"], swin["window"],
                     attn_mask)
    # FPN inputs 2e, 4e, 8e = R-50's res3–res5 widths at base = e / 4
    keys |= d2_fpn_keys(fpn, c, embed // 4, c)
    return keys | official_tower_keys(c, blocks) | atss_head_keys(c)


def official_relative_position_index(window: int) -> Tensor:
    """The official ``WindowAttention`` buffer, transcribed (coords, shift, row-major flatten)."""
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window),
                                        indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)
    rel[:, :, 0] += window - 1
    rel[:, :, 1] += window - 1
    rel[:, :, 0] *= 2 * window - 1
    return rel.sum(-1)


def with_real_indices(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Seeded Swin weights with the int64 relative position indices the checkpoints hold."""
    index = official_relative_position_index(SWIN["window"])
    return {k: index.clone() if k.endswith("relative_position_index") else v
            for k, v in state.items()}


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


def tiny_rcnn_config(*extra: str, preset: str = "dyhead_r50_rcnn_fpn_1x") -> dict:
    """A two-stage DyHead preset at tiny widths."""
    return load_config(preset, [
        f"+model.backbone.base_width={BASE}",
        f"model.neck.modules.0.in_channels=[{4 * BASE},{8 * BASE},{16 * BASE},{32 * BASE}]",
        f"model.neck.modules.0.out_channels={C}",
        f"model.neck.modules.1.in_channels={C}",
        f"model.neck.modules.1.channels={C}",
        f"model.neck.modules.1.num_blocks={BLOCKS}",
        f"model.rpn.in_channels={C}", f"model.rpn.feat_channels={C}",
        f"model.roi_head.in_channels={C}", f"model.roi_head.fc_channels={FC}",
        "model.preprocess.min_size=64", "model.preprocess.max_size=128",
        *extra,
    ])


def tiny_swin_config() -> dict:
    e = SWIN["embed"]
    return load_config("dyhead_swint_atss_fpn_2x_ms", [
        f"model.backbone.embed_dim={e}",
        f"model.backbone.depths=[{','.join(map(str, SWIN['depths']))}]",
        f"model.backbone.num_heads=[{','.join(map(str, SWIN['heads']))}]",
        "model.backbone.drop_path_rate=0.0",
        f"model.neck.modules.0.in_channels=[{2 * e},{4 * e},{8 * e}]",
        f"model.neck.modules.0.out_channels={C}",
        f"model.neck.modules.1.in_channels={C}",
        f"model.neck.modules.1.channels={C}",
        f"model.neck.modules.1.num_blocks={BLOCKS}",
        f"+model.head.in_channels={C}",
        f"+model.head.feat_channels={C}",
        "model.preprocess.min_size=64", "model.preprocess.test_min_size=64",
        "model.preprocess.max_size=128",
    ])


@contextmanager
def fast_init(device: str = "meta"):
    """Build models without their (slow on the meta device) random initialisers."""
    names = ("kaiming_normal_", "kaiming_uniform_", "normal_", "xavier_uniform_", "uniform_",
             "constant_", "zeros_", "ones_", "trunc_normal_")
    with torch.device(device), mock.patch.multiple(
        torch.nn.init, **{n: (lambda t, *a, **k: t) for n in names}
    ):
        yield


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


@pytest.mark.parametrize("nested", [True, False])
def test_detect_arch_of_the_four_released_models(nested: bool) -> None:
    assert detect_dyhead_arch(official_keys("atss", nested)) == "dyhead_r50_atss_fpn_1x"
    assert detect_dyhead_arch(official_keys("retinanet", nested)) == "dyhead_r50_retina_fpn_1x"
    assert detect_dyhead_arch(official_rcnn_keys(nested)) == "dyhead_r50_rcnn_fpn_1x"
    assert detect_dyhead_arch(official_swin_keys(nested)) == "dyhead_swint_atss_fpn_2x_ms"
    swin_retina = {k: v for k, v in official_swin_keys(nested).items() if "centerness" not in k}
    swin_retina["head.cls_score.weight"] = (720, C, 3, 3)
    with pytest.raises(ConversionError, match="Swin-T"):
        detect_dyhead_arch(swin_retina)
    with pytest.raises(ConversionError, match="cannot tell"):
        detect_dyhead_arch(official_tower_keys())


def test_errors(tmp_path: Path) -> None:
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


# ----------------------------------------------------------------------------- official R-CNN


@pytest.mark.parametrize("nested", [True, False])
def test_official_rcnn_all_keys_consumed_and_strict_load(nested: bool) -> None:
    state = seeded(official_rcnn_keys(nested), seed=11)
    converted = convert_dyhead_official(state, 1, 3)
    assert len(converted) == len(state)
    model = build_model(tiny_rcnn_config())
    check_against_model(converted, model, "official rcnn")
    model.load_state_dict(converted, strict=True)
    fpn = "backbone.backbone." if nested else "backbone."
    pairs = {
        "backbone.layer1.2.conv3.weight": fpn + "bottom_up.res2.2.conv3.weight",
        "neck.0.lateral_convs.0.weight": fpn + "fpn_lateral2.weight",  # P2 is index 0 here
        "neck.0.lateral_convs.3.bias": fpn + "fpn_lateral5.bias",
        "neck.0.output_convs.1.weight": fpn + "fpn_output3.weight",
        "neck.1.blocks.1.offset.weight": "backbone.dyhead_tower.1.offset.weight",
        "rpn.conv.weight": "proposal_generator.rpn_head.conv.weight",
        "rpn.cls_logits.weight": "proposal_generator.rpn_head.objectness_logits.weight",
        "rpn.bbox_pred.bias": "proposal_generator.rpn_head.anchor_deltas.bias",
        "roi_head.box_head.fc6.weight": "roi_heads.box_head.fc1.weight",
        "roi_head.box_head.fc7.bias": "roi_heads.box_head.fc2.bias",
        # background last and class-specific rows in both: copied as they are
        "roi_head.cls_score.weight": "roi_heads.box_predictor.cls_score.weight",
        "roi_head.bbox_pred.bias": "roi_heads.box_predictor.bbox_pred.bias",
    }
    for ours, theirs in pairs.items():
        assert torch.equal(converted[ours], state[theirs]), ours


def test_official_rcnn_round_trips_and_rpn_anchor_order() -> None:
    # one size x three ratios: detectron2's size-major order is our ratio-major order
    assert detectron2_anchor_order(1, 3).tolist() == [0, 1, 2]
    torch.manual_seed(0)
    ours = build_model(tiny_rcnn_config()).state_dict()
    exported = to_dyhead_official(ours, 1, 3)
    assert {k: tuple(v.shape) for k, v in exported.items()} == official_rcnn_keys()
    assert_same(convert_dyhead_official(exported, 1, 3), ours)
    source = seeded(official_rcnn_keys(), seed=12)
    assert_same(to_dyhead_official(convert_dyhead_official(source, 1, 3), 1, 3), source)


def test_official_rcnn_file_converts_and_predicts(tmp_path: Path) -> None:
    state = seeded(official_rcnn_keys(), seed=13)
    src = tmp_path / "dyhead_r50_rcnn_fpn_1x.pth"
    torch.save({"model": {"module." + k: v for k, v in state.items()}}, src)
    out = CONVERTERS["dyhead-official"](src, tmp_path / "rcnn", arch=tiny_rcnn_config())
    weights, cfg, _, meta = load_checkpoint(out)
    assert meta["source"] == "dyhead-official:config"
    assert_same(weights, convert_dyhead_official(state, 1, 3))
    detector = Detector.from_checkpoint(out)
    image = torch.rand(3, 70, 90, generator=torch.Generator().manual_seed(1)) * 255
    (pred,) = detector.predict([image])
    assert pred.boxes.shape[1:] == (4,) and torch.isfinite(pred.boxes).all()
    assert len(pred.scores) <= 100


def test_full_size_official_rcnn_keys_match_preset() -> None:
    shapes = official_rcnn_keys(c=256, base=64, blocks=6, fc=1024)
    source = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    with fast_init():
        model = build_model(load_config("dyhead_r50_rcnn_fpn_1x"))
    check_against_model(convert_dyhead_official(source, 1, 3), model, "dyhead_r50_rcnn_fpn_1x")


# ----------------------------------------------------------------------------- official Swin-T


def test_official_swin_keys_consumed_masks_dropped_and_strict_load() -> None:
    state = with_real_indices(seeded(official_swin_keys(attn_mask=True), seed=14))
    masks = [k for k in state if k.endswith("attn_mask")]
    assert len(masks) == 4
    converted = convert_dyhead_official(state)
    assert len(converted) == len(state) - len(masks)
    model = build_model(tiny_swin_config())
    check_against_model(converted, model, "official swin")
    model.load_state_dict(converted, strict=True)
    prefix = "backbone.backbone.bottom_up."
    pairs = {
        "backbone.patch_embed.proj.weight": prefix + "patch_embed.proj.weight",
        "backbone.layers.2.blocks.1.attn.relative_position_bias_table":
            prefix + "layers.2.blocks.1.attn.relative_position_bias_table",
        "backbone.layers.1.downsample.reduction.weight":
            prefix + "layers.1.downsample.reduction.weight",
        "backbone.norm3.bias": prefix + "norm3.bias",
        "neck.0.lateral_convs.0.weight": "backbone.backbone.fpn_lateral3.weight",
        "neck.0.p7.bias": "backbone.backbone.top_block.p7.bias",
        "head.centerness.weight": "head.centerness.weight",
    }
    for ours, theirs in pairs.items():
        assert torch.equal(converted[ours], state[theirs]), ours
    # the official index buffer (kept) equals the one dynadet builds itself
    block = model.backbone.layers[0].blocks[0].attn
    assert block.relative_position_index.dtype == torch.int64
    assert torch.equal(block.relative_position_index,
                       official_relative_position_index(SWIN["window"]))


def test_official_swin_round_trips() -> None:
    torch.manual_seed(0)
    ours = build_model(tiny_swin_config()).state_dict()
    exported = to_dyhead_official(ours)
    assert {k: tuple(v.shape) for k, v in exported.items()} == official_swin_keys()
    assert_same(convert_dyhead_official(exported), ours)
    source = with_real_indices(seeded(official_swin_keys(), seed=15))
    assert_same(to_dyhead_official(convert_dyhead_official(source)), source)


def test_full_size_official_swin_keys_match_preset() -> None:
    """Swin-T (96, depths 2/2/6/2, heads 3/6/12/24), FPN 256, 6 blocks: shapes only."""
    shapes = official_swin_keys(c=256, blocks=6, embed=96, depths=(2, 2, 6, 2),
                                heads=(3, 6, 12, 24))
    source = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    with fast_init("cpu"):  # Swin computes its drop-path rates on the host
        model = build_model(load_config("dyhead_swint_atss_fpn_2x_ms"))
    check_against_model(convert_dyhead_official(source), model, "dyhead_swint_atss_fpn_2x_ms")


# ----------------------------------------------------------------------------- presets


def test_dyhead_rcnn_preset_module_tree() -> None:
    cfg = load_config("dyhead_r50_rcnn_fpn_1x")
    with fast_init():
        model = build_model(cfg)
    fpn, dyhead = model.neck
    assert fpn.extra_blocks == "maxpool" and fpn.in_channels == [256, 512, 1024, 2048]
    assert len(dyhead.blocks) == 6 and model.backbone.style == "caffe"
    assert model.rpn.anchor_generator.strides == [4, 8, 16, 32, 64]  # RPN on P2-P6
    assert model.roi_head.roi_extractor.featmap_strides == (4, 8, 16, 32)  # RoIs from P2-P5
    assert model.roi_head.roi_extractor.aligned and model.roi_head.box_coder.weights == (
        10.0, 10.0, 5.0, 5.0)
    assert model.preprocess.size_divisor == 64 and model.preprocess.bgr
    n = sum(p.numel() for p in model.parameters())
    assert n == 53_203_592  # Faster R-CNN R50-FPN 41.75 M - FrozenBN affine + 6 x 1,917,276


def test_dynamic_rcnn_dyhead_preset_trains_one_step() -> None:
    torch.manual_seed(0)
    model = build_model(tiny_rcnn_config(preset="dynamic_rcnn_dyhead_r50_fpn_1x")).train()
    dynamic = model.roi_head.dynamic
    assert model.rpn.train_proposals.nms_thresh == 0.85
    assert model.rpn.test_proposals.nms_thresh == 0.85
    assert model.roi_head.box_loss == "smooth_l1" and dynamic.mode == "mmdet"
    gen = torch.Generator().manual_seed(2)
    images = [torch.rand(3, 60, 80, generator=gen) * 255,
              torch.rand(3, 72, 64, generator=gen) * 255]
    targets = [{"boxes": torch.tensor([[5.0, 8.0, 40.0, 50.0], [30.0, 10.0, 75.0, 40.0]]),
                "labels": torch.tensor([3, 17])},
               {"boxes": torch.tensor([[10.0, 12.0, 50.0, 60.0]]), "labels": torch.tensor([0])}]
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
    losses = model(images, targets)
    assert set(losses) == {"loss_rpn_cls", "loss_rpn_box", "loss_cls", "loss_box", "iou_thresh",
                           "beta"}
    assert losses["iou_thresh"].item() == 0.5 and losses["beta"].item() == 1.0
    total = sum(v for k, v in losses.items() if k.startswith("loss"))
    assert torch.isfinite(total)
    before = model.neck[1].blocks[0].offset.weight.detach().clone()
    opt.zero_grad()
    total.backward()
    grad = model.neck[1].blocks[0].offset.weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    opt.step()
    assert not torch.equal(model.neck[1].blocks[0].offset.weight, before)
    assert int(dynamic.num_updates) == 1
    # its weights export to the official DyHead R-CNN layout (the statistics are not weights)
    exported = to_dyhead_official(model.state_dict(), 1, 3)
    assert {k: tuple(v.shape) for k, v in exported.items()} == official_rcnn_keys()
    model.eval()
    with torch.no_grad():
        results = model(images)
    assert len(results) == 2 and all(r["boxes"].shape[1:] == (4,) for r in results)
