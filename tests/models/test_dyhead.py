"""DyHead blocks against an independent per-level transcription of the official computation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dynadet.api import build_model
from dynadet.config import load_config
from dynadet.models.chain import Chain
from dynadet.models.dyhead import DyHead, DyHeadBlock, DyReLU, hard_sigmoid
from dynadet.ops.deform_conv import deform_conv2d

ODD_SIZES = [(13, 17), (7, 9), (4, 5)]


# ----------------------------------------------------------------------------- slow reference


def _flat_reread(buf: Tensor, channels: int, h: int, w: int) -> Tensor:
    """The official CUDA kernel's read of an ``(C, H, W)`` buffer as ``(C, h, w)``.

    Element ``(c, y, x)`` is taken at flat position ``(c·h + y)·w + x`` from each image's own
    start (one im2col call per image), one element at a time.
    """
    out = torch.empty(buf.shape[0], channels, h, w, dtype=buf.dtype)
    for n in range(buf.shape[0]):
        flat = buf[n].reshape(-1)
        for c in range(channels):
            for y in range(h):
                for x in range(w):
                    out[n, c, y, x] = flat[(c * h + y) * w + x]
    return out


def _interp_matrix(dst: int, src: int, dtype: torch.dtype) -> Tensor:
    """``[dst, src]`` bilinear weights with align_corners=True (position ``i·(src-1)/(dst-1)``)."""
    m = torch.zeros(dst, src, dtype=dtype)
    for i in range(dst):
        pos = i * (src - 1) / (dst - 1) if dst > 1 else 0.0
        lo = min(int(math.floor(pos)), src - 1)
        frac = pos - lo
        m[i, lo] += 1 - frac
        if frac > 0:
            m[i, lo + 1] += frac
    return m


def _resize(x: Tensor, h: int, w: int) -> Tensor:
    ry = _interp_matrix(h, x.shape[-2], x.dtype)
    rx = _interp_matrix(w, x.shape[-1], x.dtype)
    return ry @ x @ rx.T


def _group_norm(x: Tensor, gn: nn.GroupNorm) -> Tensor:
    n, c, h, w = x.shape
    g = x.reshape(n, gn.num_groups, -1)
    mean = g.mean(-1, keepdim=True)
    var = ((g - mean) ** 2).mean(-1, keepdim=True)
    y = ((g - mean) / torch.sqrt(var + gn.eps)).reshape(n, c, h, w)
    return y * gn.weight[None, :, None, None] + gn.bias[None, :, None, None]


def _spatial(branch: nn.Module, x: Tensor, offset: Tensor, mask: Tensor, stride: int) -> Tensor:
    conv = branch.conv
    y = deform_conv2d(x, offset, conv.weight, conv.bias, stride, 1, 1, mask, backend="torch")
    return _group_norm(y, branch.bn)


def _dyrelu(x: Tensor, relu: DyReLU) -> Tensor:
    c = x.shape[1]
    lin1, lin2 = relu.fc[0], relu.fc[2]
    hidden = torch.clamp(x.mean((2, 3)) @ lin1.weight.T + lin1.bias, min=0)
    y = torch.clamp((hidden @ lin2.weight.T + lin2.bias + 3) / 6, 0, 1)[:, :, None, None]
    a1 = (y[:, :c] - 0.5) * 2 + 1
    b1 = y[:, c : 2 * c] - 0.5
    a2 = (y[:, 2 * c : 3 * c] - 0.5) * 2
    b2 = y[:, 3 * c :] - 0.5
    return torch.maximum(x * a1 + b1, x * a2 + b2)


def reference_block(block: DyHeadBlock, feats: list[Tensor], mode: str) -> list[Tensor]:
    """Explicit per-level loop of the official ``DyConv.forward``."""
    high, mid, low = block.DyConv
    attn = block.AttnConv[1]
    outs = []
    for level, x in enumerate(feats):
        om = F.conv2d(x, block.offset.weight, block.offset.bias, padding=1)
        offset, mask = om[:, :18], torch.sigmoid(om[:, 18:])
        sources = [_spatial(mid, x, offset, mask, 1)]
        if level > 0:
            sources.append(_spatial(low, feats[level - 1], offset, mask, 2))
        if level < len(feats) - 1:
            h, w = feats[level + 1].shape[-2:]
            if mode == "official":
                off_hi, mask_hi = _flat_reread(offset, 18, h, w), _flat_reread(mask, 9, h, w)
            else:
                off_hi, mask_hi = _resize(offset, h, w), _resize(mask, h, w)
            y = _spatial(high, feats[level + 1], off_hi, mask_hi, 1)
            sources.append(_resize(y, *x.shape[-2:]))
        total = 0
        for f in sources:
            logit = f.mean((2, 3)) @ attn.weight.flatten() + attn.bias
            weight = torch.clamp((torch.clamp(logit, min=0) + 3) / 6, 0, 1)
            total = total + f * weight[:, None, None, None]
        outs.append(_dyrelu(total / len(sources), block.relu))
    return outs


def _features(channels: int, sizes, batch: int = 2, dtype=torch.float64, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, channels, h, w, generator=gen, dtype=dtype) for h, w in sizes]


def _block(mode: str, seed: int = 0, channels: int = 32, **kwargs) -> DyHeadBlock:
    torch.manual_seed(seed)
    block = DyHeadBlock(channels, channels, offset_mode=mode, **kwargs)
    with torch.no_grad():
        # offsets of several pixels: samples fall between pixels and outside the maps
        block.offset.weight.mul_(4.0)
        for branch in block.DyConv:
            branch.conv.bias.normal_()
            branch.bn.weight.normal_(1.0, 0.2)
            branch.bn.bias.normal_()
        block.AttnConv[1].weight.normal_(0, 0.2)
        block.AttnConv[1].bias.fill_(0.1)
    return block


# ----------------------------------------------------------------------------- block


@pytest.mark.parametrize("mode", ["official", "resized"])
def test_block_matches_reference_on_odd_sizes(mode):
    block = _block(mode).double()
    feats = _features(32, ODD_SIZES)
    with torch.no_grad():
        got = block(feats)
        want = reference_block(block, feats, mode)
    for g, w, (h, wd) in zip(got, want, ODD_SIZES, strict=True):
        assert g.shape == (2, 32, h, wd)
        torch.testing.assert_close(g, w, atol=1e-10, rtol=0)
    # float32 against the float64 reference
    block32 = _block(mode)
    block32.load_state_dict({k: v.float() for k, v in block.state_dict().items()})
    with torch.no_grad():
        got32 = block32([f.float() for f in feats])
    for g, w in zip(got32, want, strict=True):
        torch.testing.assert_close(g.double(), w, atol=1e-5, rtol=0)


def test_official_mode_is_the_flat_reread_and_differs_from_resized():
    official = _block("official").double()
    resized = _block("resized").double()
    resized.load_state_dict(official.state_dict())
    feats = _features(32, ODD_SIZES, seed=1)
    with torch.no_grad():
        a, b = official(feats), resized(feats)
        ref = reference_block(official, feats, "official")
    for level in (0, 1):  # the levels with a coarser neighbour
        assert (a[level] - b[level]).abs().max() > 1e-2
        torch.testing.assert_close(a[level], ref[level], atol=1e-10, rtol=0)
    torch.testing.assert_close(a[2], b[2], atol=0, rtol=0)  # no coarser level: same path


def test_coarse_offset_reads_each_image_buffer_flat():
    block = DyHeadBlock(16, 16)
    n, (hh, ww), (h, w) = 2, (13, 17), (7, 9)
    offset = torch.arange(n * 18 * hh * ww, dtype=torch.float64).view(n, 18, hh, ww)
    mask = torch.arange(n * 9 * hh * ww, dtype=torch.float64).view(n, 9, hh, ww)
    off_hi, mask_hi = block.coarse_offset(offset, mask, (h, w))
    for i in range(n):  # from each image's own start, not from the batch start
        torch.testing.assert_close(off_hi[i].flatten(), i * 18 * hh * ww + torch.arange(
            18.0 * h * w, dtype=torch.float64))
        torch.testing.assert_close(mask_hi[i].flatten(), i * 9 * hh * ww + torch.arange(
            9.0 * h * w, dtype=torch.float64))
    # a non-contiguous slice (as om[:, :18] is) reads the same
    om = torch.cat((offset, torch.zeros(n, 9, hh, ww, dtype=torch.float64)), 1)
    torch.testing.assert_close(block.coarse_offset(om[:, :18], mask, (h, w))[0], off_hi)
    with pytest.raises(ValueError, match="too small"):
        block.coarse_offset(offset[..., :3, :3], mask[..., :3, :3], (4, 4))


def test_resized_coarse_offset_keeps_corners():
    block = DyHeadBlock(16, 16, offset_mode="resized")
    offset, mask = torch.randn(1, 18, 13, 17), torch.rand(1, 9, 13, 17)
    off_hi, mask_hi = block.coarse_offset(offset, mask, (7, 9))
    assert off_hi.shape == (1, 18, 7, 9) and mask_hi.shape == (1, 9, 7, 9)
    for y, x, yy, xx in ((0, 0, 0, 0), (-1, -1, -1, -1), (0, -1, 0, -1), (3, 4, 6, 8)):
        torch.testing.assert_close(off_hi[0, :, y, x], offset[0, :, yy, xx])
        torch.testing.assert_close(mask_hi[0, :, y, x], mask[0, :, yy, xx])


def test_block_gradcheck():
    block = _block("official", channels=16, seed=3).double()
    feats = [f.requires_grad_() for f in _features(16, [(4, 5), (2, 3), (1, 2)], batch=1, seed=3)]
    off_w = block.offset.weight.detach().clone().requires_grad_()
    dcn_w = block.DyConv[0].conv.weight.detach().clone().requires_grad_()

    def fn(x0, x1, x2, ow, dw):
        params = {"offset.weight": ow, "DyConv.0.conv.weight": dw}
        return tuple(torch.func.functional_call(block, params, ([x0, x1, x2],)))

    assert torch.autograd.gradcheck(fn, (*feats, off_w, dcn_w), fast_mode=True)


def test_single_level_and_batch_of_one():
    block = _block("official").double()
    feats = _features(32, [(5, 7)], batch=1)
    with torch.no_grad():
        torch.testing.assert_close(block(feats)[0], reference_block(block, feats, "official")[0])


def test_zero_offsets_make_modes_agree_and_dcn_a_half_conv():
    torch.manual_seed(0)
    a = DyHeadBlock(32, 32, offset_init="zero").double()
    b = DyHeadBlock(32, 32, offset_init="zero", offset_mode="resized").double()
    b.load_state_dict(a.state_dict())
    feats = _features(32, ODD_SIZES)
    with torch.no_grad():
        for x, y in zip(a(feats), b(feats), strict=True):
            torch.testing.assert_close(x, y, atol=1e-12, rtol=0)
        # zero offsets, mask sigmoid(0) = 1/2: the DCN is half a plain conv
        conv = a.DyConv[2].conv
        om = a.offset(feats[1])
        got = conv(feats[0], om[:, :18], om[:, 18:].sigmoid())
        want = 0.5 * F.conv2d(feats[0], conv.weight, stride=2, padding=1) + conv.bias[:, None, None]
        torch.testing.assert_close(got, want)


def test_bad_pyramid_and_options_are_refused():
    block = DyHeadBlock(16, 16)
    with pytest.raises(ValueError, match="ceil-half"):
        block([torch.randn(1, 16, 8, 8), torch.randn(1, 16, 3, 4)])
    with pytest.raises(ValueError, match="no feature maps"):
        block([])
    with pytest.raises(ValueError, match="offset_mode"):
        DyHeadBlock(16, 16, offset_mode="crop")
    with pytest.raises(ValueError, match="offset_init"):
        DyHeadBlock(16, 16, offset_init="xavier")
    with pytest.raises(ValueError, match="num_blocks"):
        DyHead(16, 16, 0)


# ----------------------------------------------------------------------------- attention parts


def test_hard_sigmoid_values():
    x = torch.tensor([-4.0, -3.0, -1.5, 0.0, 1.5, 3.0, 4.0])
    torch.testing.assert_close(hard_sigmoid(x), torch.tensor([0, 0, 0.25, 0.5, 0.75, 1, 1]))


def test_scale_attention_lies_in_half_to_one():
    block = _block("official")
    feats = _features(32, ODD_SIZES, dtype=torch.float32)
    with torch.no_grad():
        for f in feats:
            for sign in (1.0, -1.0):  # positive and negative logits before the ReLU
                weight = hard_sigmoid(block.AttnConv(sign * f))
                assert weight.shape == (2, 1, 1, 1)
                assert ((weight >= 0.5) & (weight <= 1.0)).all()


def test_dyrelu_coefficients_by_hand():
    relu = DyReLU(4)
    assert relu.fc[0].weight.shape == (1, 4) and relu.fc[2].weight.shape == (16, 1)
    with torch.no_grad():
        relu.fc[2].weight.zero_()
        # y = hard_sigmoid(bias): a1 block -> 1, b1 -> 0, a2 -> 0, b2 -> 0.5 (+ one 0.75 entry)
        relu.fc[2].bias.copy_(torch.tensor([3.0] * 4 + [-3.0] * 4 + [-3.0] * 4 + [0.0] * 3 + [1.5]))
    x = torch.tensor([-1.0, 0.0, 1.0, -0.5]).view(1, 4, 1, 1)
    a1, b1, a2, b2 = relu.coefficients(x)
    torch.testing.assert_close(a1.flatten(), torch.full((4,), 2.0))  # (1 - .5)·2 + 1
    torch.testing.assert_close(b1.flatten(), torch.full((4,), -0.5))  # 0 - .5
    torch.testing.assert_close(a2.flatten(), torch.full((4,), -1.0))  # (0 - .5)·2
    torch.testing.assert_close(b2.flatten(), torch.tensor([0.0, 0.0, 0.0, 0.25]))  # y - .5
    # max(2x - 0.5, -x + b2)
    torch.testing.assert_close(relu(x).flatten(), torch.tensor([1.0, 0.0, 1.5, 0.75]))
    with torch.no_grad():
        relu.fc[2].bias.zero_()  # y = 1/2 everywhere: a1 = 1, a2 = b1 = b2 = 0, a plain ReLU
    torch.testing.assert_close(relu(x).flatten(), torch.tensor([0.0, 0.0, 1.0, 0.0]))


# ----------------------------------------------------------------------------- init and size


def test_initialisation():
    torch.manual_seed(0)
    official = DyHeadBlock(256, 256)
    fan = 256 * 9
    for branch in official.DyConv:
        assert branch.conv.weight.abs().max() <= 1 / math.sqrt(fan)
        assert branch.conv.weight.abs().max() > 0.9 / math.sqrt(fan)
        assert (branch.conv.bias == 0).all()
        assert (branch.bn.weight == 1).all() and (branch.bn.bias == 0).all()
        assert branch.bn.num_groups == 16 and branch.bn.eps == 1e-5
    assert [b.conv.stride for b in official.DyConv] == [(1, 1), (1, 1), (2, 2)]
    attn = official.AttnConv[1]
    assert 0.008 < attn.weight.std() < 0.012 and (attn.bias == 0).all()
    # offset conv keeps PyTorch's default: U(+-1/sqrt(fan_in)) for weight and bias
    assert 0.9 / math.sqrt(fan) < official.offset.weight.abs().max() <= 1 / math.sqrt(fan)
    assert official.offset.bias.abs().max() <= 1 / math.sqrt(fan)
    assert official.offset.bias.abs().max() > 0
    lin1, lin2 = official.relu.fc[0], official.relu.fc[2]
    assert 0.9 / 16 < lin1.weight.abs().max() <= 1 / 16  # default Linear: 1/sqrt(256)
    assert 0.9 / 8 < lin2.weight.abs().max() <= 1 / 8  # 1/sqrt(64)

    zero = DyHeadBlock(256, 256, offset_init="zero", dcn_bias=False, dyrelu_init="normal")
    assert (zero.offset.weight == 0).all() and (zero.offset.bias == 0).all()
    assert all(b.conv.bias is None for b in zero.DyConv)
    for lin in (zero.relu.fc[0], zero.relu.fc[2]):
        assert 0.009 < lin.weight.std() < 0.011 and (lin.bias == 0).all()
    normal = DyHeadBlock(256, 256, offset_init="normal")
    assert 0.009 < normal.offset.weight.std() < 0.011 and (normal.offset.bias == 0).all()


def test_parameter_count_and_keys():
    def count(module: nn.Module) -> int:
        return sum(p.numel() for p in module.parameters())

    head = DyHead(256, 256, 6)
    # per block: 3 DCN 3 x (256·256·9 + 256) = 1,770,240; 3 GN 3 x 512 = 1,536;
    # offset 27·256·9 + 27 = 62,235; scale conv 257; DyReLU 16,448 + 66,560 = 83,008
    per_block = 1_770_240 + 1_536 + 62_235 + 257 + 83_008
    assert per_block == 1_917_276
    assert count(head) == 6 * per_block == 11_503_656  # 11.50 M
    assert count(DyHead(256, 256, 6, dcn_bias=False)) == 11_499_048  # minus 6 x 768 biases
    keys = {k for k in head.state_dict() if k.startswith("blocks.0.")}
    official = {f"DyConv.{i}.{m}.{p}" for i in range(3) for m in ("conv", "bn")
                for p in ("weight", "bias")}
    official |= {f"{m}.{p}" for m in ("AttnConv.1", "relu.fc.0", "relu.fc.2", "offset")
                 for p in ("weight", "bias")}
    assert keys == {f"blocks.0.{k}" for k in official}
    assert len(head.state_dict()) == 6 * 20


def test_dyhead_stacks_blocks():
    torch.manual_seed(0)
    head = DyHead(16, 32, num_blocks=2).double()
    assert head.blocks[0].offset.in_channels == 16 and head.blocks[1].offset.in_channels == 32
    feats = _features(16, ODD_SIZES, batch=1)
    with torch.no_grad():
        out = head(feats)
        want = reference_block(head.blocks[1], reference_block(head.blocks[0], feats, "official"),
                               "official")
    for o, w in zip(out, want, strict=True):
        torch.testing.assert_close(o, w, atol=1e-10, rtol=0)


# ----------------------------------------------------------------------------- presets

PRESETS = {
    "dyhead_r50_atss_fpn_1x": dict(bias=True, offset_zero=False, pred_k=1, towers=0, div=128),
    "dyhead_r50_retina_fpn_1x": dict(bias=True, offset_zero=False, pred_k=3, towers=4, div=128),
    "dyhead_r50_atss_simple_1x": dict(bias=False, offset_zero=True, pred_k=3, towers=0, div=32),
}
# both images become 128 x <=128, one padded 128 x 128 batch even with size_divisor 128
SMALL = ["model.preprocess.min_size=128", "model.preprocess.max_size=128",
         "model.head.num_classes=3"]
SIZES = ((96, 96), (112, 100))


def _images():
    gen = torch.Generator().manual_seed(0)
    return [torch.rand(3, h, w, generator=gen) * 255 for h, w in SIZES]


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_preset_builds_and_predicts(preset):
    expect = PRESETS[preset]
    torch.manual_seed(0)
    model = build_model(load_config(preset, SMALL)).eval()
    assert isinstance(model.neck, Chain) and isinstance(model.neck[1], DyHead)
    dyhead = model.neck[1]
    assert len(dyhead.blocks) == 6
    assert sum(p.numel() for p in dyhead.parameters()) == (
        11_503_656 if expect["bias"] else 11_499_048)
    assert ("neck.1.blocks.5.DyConv.0.conv.bias" in model.state_dict()) == expect["bias"]
    assert bool((dyhead.blocks[0].offset.weight == 0).all()) == expect["offset_zero"]
    assert model.head.cls_logits.kernel_size == (expect["pred_k"],) * 2
    assert len(model.head.cls_tower) == expect["towers"]
    assert model.preprocess.size_divisor == expect["div"]
    with torch.no_grad():
        results = model(_images())
    assert len(results) == 2
    for r, (h, w) in zip(results, SIZES, strict=True):
        assert r["boxes"].shape[1] == 4 and r["boxes"].shape[0] == r["scores"].shape[0]
        assert torch.isfinite(r["boxes"]).all()
        assert (r["labels"] < 3).all()
        if len(r["boxes"]):
            assert (r["boxes"][:, 2] <= w).all() and (r["boxes"][:, 3] <= h).all()


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_preset_training_step_reaches_dyhead(preset):
    torch.manual_seed(0)
    # frozen random backbone and two blocks keep this fast; the neck and head are the preset's
    overrides = SMALL + ["model.backbone.frozen_stages=4", "model.neck.modules.1.num_blocks=2"]
    model = build_model(load_config(preset, overrides)).train()
    targets = [
        {"boxes": torch.tensor([[10.0, 12.0, 70.0, 80.0]]), "labels": torch.tensor([1])},
        {"boxes": torch.tensor([[5.0, 30.0, 60.0, 110.0], [40.0, 8.0, 95.0, 50.0]]),
         "labels": torch.tensor([0, 2])},
    ]
    losses = model(_images(), targets)
    assert all(torch.isfinite(v) for v in losses.values()), losses
    sum(losses.values()).backward()
    dyhead = model.neck[1]
    for name, p in dyhead.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
    for block in dyhead.blocks:  # the first block too: gradients pass through the whole stack
        for p in (block.offset.weight, block.DyConv[1].conv.weight, block.relu.fc[2].weight):
            assert p.grad.abs().sum() > 0
