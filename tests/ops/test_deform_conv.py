"""Tests for dynadet.ops.deform_conv against a slow loop transcription of the DCN kernel rule."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from dynadet.ops import deform_conv as dc
from dynadet.ops.deform_conv import (
    ModulatedDeformConv2d,
    ModulatedDeformConv2dPack,
    deform_conv2d,
)


def _bilinear(plane: list[list[float]], y: float, x: float) -> float:
    """The kernels' rule: 0 outside (-1, H) x (-1, W), out-of-map neighbours count as 0."""
    height, width = len(plane), len(plane[0])
    if y <= -1 or y >= height or x <= -1 or x >= width:
        return 0.0
    y0, x0 = math.floor(y), math.floor(x)
    ly, lx = y - y0, x - x0
    total = 0.0
    for yy, wy in ((y0, 1 - ly), (y0 + 1, ly)):
        for xx, wx in ((x0, 1 - lx), (x0 + 1, lx)):
            if 0 <= yy < height and 0 <= xx < width:
                total += wy * wx * plane[yy][xx]
    return total


def reference_deform_conv2d(
    x: Tensor,
    offset: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    mask: Tensor | None,
) -> Tensor:
    """Float64 transcription of the deformable im2col + GEMM, one output pixel at a time."""
    n_batch, cin, _, _ = x.shape
    cout, cin_per_group, kh, kw = weight.shape
    taps = kh * kw
    groups = cin // cin_per_group
    cout_per_group = cout // groups
    offset_groups = offset.shape[1] // (2 * taps)
    ho, wo = offset.shape[2:]
    xs, offs, ws = x.double().tolist(), offset.double().tolist(), weight.double().tolist()
    masks = None if mask is None else mask.double().tolist()
    out = torch.zeros(n_batch, cout, ho, wo, dtype=torch.float64)
    for n in range(n_batch):
        for oy in range(ho):
            for ox in range(wo):
                cols = [[0.0] * taps for _ in range(cin)]
                for c in range(cin):
                    g = c // (cin // offset_groups)
                    for i in range(kh):
                        for j in range(kw):
                            k = i * kw + j
                            dy = offs[n][g * 2 * taps + 2 * k][oy][ox]
                            dx = offs[n][g * 2 * taps + 2 * k + 1][oy][ox]
                            y = oy * stride[0] - padding[0] + i * dilation[0] + dy
                            xx = ox * stride[1] - padding[1] + j * dilation[1] + dx
                            m = 1.0 if masks is None else masks[n][g * taps + k][oy][ox]
                            cols[c][k] = m * _bilinear(xs[n][c], y, xx)
                for o in range(cout):
                    grp = o // cout_per_group
                    acc = 0.0 if bias is None else float(bias[o])
                    for cl in range(cin_per_group):
                        c = grp * cin_per_group + cl
                        for k in range(taps):
                            acc += ws[o][cl][k // kw][k % kw] * cols[c][k]
                    out[n, o, oy, ox] = acc
    return out


def _out_size(size: int, k: int, s: int, p: int, d: int) -> int:
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


def _make(
    n: int, cin: int, cout: int, hw: tuple[int, int], kernel: tuple[int, int],
    stride: tuple[int, int], padding: tuple[int, int], dilation: tuple[int, int],
    groups: int = 1, offset_groups: int = 1, offset_scale: float = 3.0, seed: int = 0,
) -> dict[str, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    kh, kw = kernel
    ho = _out_size(hw[0], kh, stride[0], padding[0], dilation[0])
    wo = _out_size(hw[1], kw, stride[1], padding[1], dilation[1])
    taps = kh * kw
    return {
        "input": torch.randn(n, cin, *hw, generator=gen, dtype=torch.float64),
        "offset": offset_scale
        * torch.randn(n, 2 * offset_groups * taps, ho, wo, generator=gen, dtype=torch.float64),
        "weight": torch.randn(cout, cin // groups, kh, kw, generator=gen, dtype=torch.float64),
        "bias": torch.randn(cout, generator=gen, dtype=torch.float64),
        "mask": torch.rand(n, offset_groups * taps, ho, wo, generator=gen, dtype=torch.float64),
    }


def _check(t: dict[str, Tensor], stride, padding, dilation, use_mask: bool = True) -> None:
    mask = t["mask"] if use_mask else None
    ref = reference_deform_conv2d(
        t["input"], t["offset"], t["weight"], t["bias"], stride, padding, dilation, mask
    )
    got = deform_conv2d(
        t["input"], t["offset"], t["weight"], t["bias"], stride, padding, dilation, mask
    )
    assert got.dtype == torch.float64 and got.shape == ref.shape
    torch.testing.assert_close(got, ref, atol=1e-10, rtol=0)
    f32 = {k: v.float() for k, v in t.items()}
    got32 = deform_conv2d(
        f32["input"], f32["offset"], f32["weight"], f32["bias"], stride, padding, dilation,
        f32["mask"] if use_mask else None,
    )
    assert got32.dtype == torch.float32
    torch.testing.assert_close(got32.double(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("spd", [(1, 1, 1), (2, 1, 1), (1, 2, 2)])
def test_matches_reference_large_offsets(spd: tuple[int, int, int]) -> None:
    s, p, d = spd
    t = _make(2, 3, 4, (7, 6), (3, 3), (s, s), (p, p), (d, d), offset_scale=4.0)
    ho, wo = t["offset"].shape[2:]
    k = torch.arange(3 * 3)
    base_y = (torch.arange(ho) * s - p)[None, :, None] + (k // 3 * d)[:, None, None]
    y = base_y + t["offset"][:, 0::2]
    outside = (y <= -1) | (y >= 7)
    assert outside.double().mean() > 0.2  # many samples really leave the map
    _check(t, (s, s), (p, p), (d, d))


@pytest.mark.parametrize(
    ("kernel", "stride", "padding", "dilation"),
    [
        ((3, 1), (1, 1), (1, 0), (1, 1)),
        ((2, 3), (2, 1), (0, 2), (1, 2)),
        ((1, 1), (1, 1), (0, 0), (1, 1)),
    ],
)
def test_non_square_kernels_odd_sizes(kernel, stride, padding, dilation) -> None:
    t = _make(2, 2, 3, (5, 7), kernel, stride, padding, dilation, seed=1)
    _check(t, stride, padding, dilation)


@pytest.mark.parametrize(("groups", "offset_groups"), [(2, 1), (1, 2), (2, 2)])
def test_conv_and_offset_groups(groups: int, offset_groups: int) -> None:
    t = _make(2, 4, 6, (6, 5), (3, 3), (1, 1), (1, 1), (1, 1), groups, offset_groups, seed=2)
    _check(t, (1, 1), (1, 1), (1, 1))


def test_mask_none_is_dcn_v1() -> None:
    t = _make(2, 2, 3, (5, 6), (3, 3), (1, 1), (1, 1), (1, 1), offset_groups=2, seed=3)
    _check(t, (1, 1), (1, 1), (1, 1), use_mask=False)


def test_samples_exactly_on_boundaries() -> None:
    # 1x1 kernel, no padding: sample position = pixel position + offset; place samples exactly on
    # -1 and H / W (must give 0), just inside them, and exactly on integers.
    h, w = 4, 5
    t = _make(2, 2, 3, (h, w), (1, 1), (1, 1), (0, 0), (1, 1), seed=4)
    oy = torch.arange(h, dtype=torch.float64)[:, None].expand(h, w)
    ox = torch.arange(w, dtype=torch.float64)[None, :].expand(h, w)
    target_y = torch.tensor([-1.0, h, -0.999, h - 0.001, 2.0])
    target_x = torch.tensor([-1.0, w, 3.0, -0.5, w - 1e-9])
    ty = target_y[torch.arange(h * w) % 5].view(h, w)
    tx = target_x[torch.arange(h * w) // 5 % 5].view(h, w)
    t["offset"] = torch.stack((ty - oy, tx - ox))[None].repeat(2, 1, 1, 1)
    _check(t, (1, 1), (0, 0), (1, 1))
    got = deform_conv2d(t["input"], t["offset"], t["weight"], None, mask=t["mask"])
    on_edge = ((ty == -1) | (ty == h) | (tx == -1) | (tx == w)).expand_as(got)
    assert got[on_edge].abs().max() < 1e-12


def test_zero_offset_unit_mask_equals_conv2d() -> None:
    t = _make(2, 4, 6, (9, 8), (3, 3), (2, 2), (2, 2), (2, 2), groups=2, seed=5)
    ref = F.conv2d(t["input"], t["weight"], t["bias"], 2, 2, 2, 2)
    zeros = torch.zeros_like(t["offset"])
    got = deform_conv2d(t["input"], zeros, t["weight"], t["bias"], 2, 2, 2)
    torch.testing.assert_close(got, ref, atol=1e-12, rtol=0)
    ones = torch.ones_like(t["mask"])
    got = deform_conv2d(t["input"], zeros, t["weight"], t["bias"], 2, 2, 2, ones)
    torch.testing.assert_close(got, ref, atol=1e-12, rtol=0)


def test_chunked_no_grad_path_matches(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dc, "_CPU_CHUNK_ELEMS", 1)  # one output row per chunk
    t = _make(2, 4, 4, (7, 6), (3, 3), (2, 1), (1, 1), (1, 1), 2, 2, seed=6)
    with torch.no_grad():
        _check(t, (2, 1), (1, 1), (1, 1))
        _check(t, (2, 1), (1, 1), (1, 1), use_mask=False)


def test_gradcheck() -> None:
    gen = torch.Generator().manual_seed(7)
    n, cin, cout, h, w = 1, 4, 2, 4, 3
    x = torch.randn(n, cin, h, w, generator=gen, dtype=torch.float64)
    weight = torch.randn(cout, cin // 2, 3, 3, generator=gen, dtype=torch.float64)
    bias = torch.randn(cout, generator=gen, dtype=torch.float64)
    # Integer part + fraction in [0.2, 0.8]: never exactly on a grid line (bilinear kinks).
    whole = torch.randint(-2, 3, (n, 2 * 2 * 9, h, w), generator=gen).double()
    frac = 0.2 + 0.6 * torch.rand(n, 2 * 2 * 9, h, w, generator=gen, dtype=torch.float64)
    offset = whole + frac
    mask = torch.rand(n, 2 * 9, h, w, generator=gen, dtype=torch.float64)
    args = [t.requires_grad_() for t in (x, offset, weight, bias, mask)]

    def fn(x, offset, weight, bias, mask):
        return deform_conv2d(x, offset, weight, bias, 1, 1, 1, mask)

    assert torch.autograd.gradcheck(fn, args)


def test_pack_at_init_is_half_conv() -> None:
    torch.manual_seed(8)
    layer = ModulatedDeformConv2dPack(4, 6, 3, stride=2, padding=1, groups=2, deform_groups=2)
    assert layer.conv_offset.out_channels == 2 * 3 * 9
    assert layer.conv_offset.weight.abs().sum() == 0 and layer.conv_offset.bias.abs().sum() == 0
    with torch.no_grad():
        layer.bias.normal_()
    x = torch.randn(2, 4, 7, 9)
    expected = 0.5 * F.conv2d(x, layer.weight, None, 2, 1, 1, 2) + layer.bias[:, None, None]
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


def test_pack_offset_split_follows_mmcv() -> None:
    # conv_offset output cut in thirds: cat(first, second) is read as interleaved (dy, dx).
    torch.manual_seed(9)
    layer = ModulatedDeformConv2dPack(2, 3, 3, padding=1).double()
    with torch.no_grad():
        layer.conv_offset.bias.normal_(std=2.0)
        layer.bias.normal_()
    x = torch.randn(1, 2, 4, 5, dtype=torch.float64)
    b = layer.conv_offset.bias.detach()
    offset = b[:18].view(1, 18, 1, 1).expand(1, 18, 4, 5)
    mask = torch.sigmoid(b[18:]).view(1, 9, 1, 1).expand(1, 9, 4, 5)
    ref = reference_deform_conv2d(
        x, offset, layer.weight.detach(), layer.bias.detach(), (1, 1), (1, 1), (1, 1), mask
    )
    torch.testing.assert_close(layer(x), ref, atol=1e-10, rtol=0)


def test_module_layout_and_init() -> None:
    layer = ModulatedDeformConv2d(8, 4, (3, 1), groups=2, deform_groups=2)
    assert dict(layer.named_parameters()).keys() == {"weight", "bias"}
    assert layer.weight.shape == (4, 4, 3, 1) and layer.bias.shape == (4,)
    assert layer.weight.abs().max() <= 1 / math.sqrt(8 * 3) and layer.bias.abs().sum() == 0
    assert ModulatedDeformConv2d(2, 2, 3, bias=False).bias is None
    pack = ModulatedDeformConv2dPack(4, 4, 3, padding=1, bias=False)
    keys = set(pack.state_dict())
    assert keys == {"weight", "conv_offset.weight", "conv_offset.bias"}
    x = torch.randn(1, 4, 5, 5)
    off, mask = torch.zeros(1, 18, 5, 5), torch.ones(1, 9, 5, 5)
    torch.testing.assert_close(
        ModulatedDeformConv2d.forward(pack, x, off, mask), F.conv2d(x, pack.weight, None, 1, 1)
    )


def test_empty_batch() -> None:
    layer = ModulatedDeformConv2dPack(4, 6, 3, stride=2, padding=1)
    x = torch.randn(0, 4, 7, 9, requires_grad=True)
    out = layer(x)
    assert out.shape == (0, 6, 4, 5)
    out.sum().backward()
    assert layer.weight.grad is not None and layer.weight.grad.abs().sum() == 0
    with torch.no_grad():
        assert layer(x).shape == (0, 6, 4, 5)


def test_reduced_precision_and_autocast() -> None:
    t = _make(1, 4, 4, (6, 7), (3, 3), (1, 1), (1, 1), (1, 1), seed=10, offset_scale=1.5)
    f32 = {k: v.float() for k, v in t.items()}
    ref = deform_conv2d(**f32, stride=1, padding=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = deform_conv2d(**f32, stride=1, padding=1)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref)
    # bf16 input with fp32 weight/offset/mask: computed and returned in bf16.
    inp = dict(f32, input=f32["input"].bfloat16())
    out = deform_conv2d(**inp, stride=1, padding=1)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, atol=0.15, rtol=0.05)


def test_shape_errors() -> None:
    t = _make(1, 2, 2, (5, 5), (3, 3), (1, 1), (1, 1), (1, 1))
    with pytest.raises(ValueError, match="offset"):
        deform_conv2d(t["input"], t["offset"][:, :, :4], t["weight"], padding=1)
    with pytest.raises(ValueError, match="mask"):
        deform_conv2d(t["input"], t["offset"], t["weight"], padding=1, mask=t["mask"][:, :4])
    with pytest.raises(ValueError, match="backend"):
        deform_conv2d(t["input"], t["offset"], t["weight"], padding=1, backend="cuda")


def test_torchvision_backend_agrees() -> None:
    if dc._torchvision_deform_conv2d() is None:
        t = _make(1, 2, 2, (5, 5), (3, 3), (1, 1), (1, 1), (1, 1))
        with pytest.raises(RuntimeError, match="torchvision"):
            deform_conv2d(t["input"], t["offset"], t["weight"], padding=1, backend="torchvision")
        pytest.skip("torchvision.ops.deform_conv2d is not usable here")
    t = _make(2, 4, 6, (7, 6), (3, 3), (2, 2), (1, 1), (1, 1), 2, 2, seed=11)
    kwargs = {"stride": 2, "padding": 1, "mask": t["mask"], "bias": t["bias"]}
    ours = deform_conv2d(t["input"], t["offset"], t["weight"], backend="torch", **kwargs)
    theirs = deform_conv2d(t["input"], t["offset"], t["weight"], backend="torchvision", **kwargs)
    torch.testing.assert_close(ours, theirs, atol=1e-10, rtol=0)


def test_backend_dispatch(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def fake(*args):
        calls.append(args)
        return torch.zeros(())

    monkeypatch.setattr(dc, "_torchvision_fn", fake)
    t = _make(1, 2, 2, (5, 5), (3, 3), (1, 1), (1, 1), (1, 1))
    deform_conv2d(t["input"], t["offset"], t["weight"], padding=1)  # "auto": CPU stays in torch
    assert not calls
    deform_conv2d(t["input"], t["offset"], t["weight"], t["bias"], 1, 1, 1, t["mask"],
                  backend="torchvision")
    assert len(calls) == 1 and calls[0][4:7] == ((1, 1), (1, 1), (1, 1))
    assert calls[0][7] is t["mask"]
