"""FPN: explicit hand computation, nearest upsampling to odd sizes, extra levels, keys, init."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dynadet.models.fpn import FPN, ConvNorm


def nearest_index(dst: int, in_size: int, out_size: int) -> int:
    """Source index of nearest upsampling: floor(dst * in / out), exact rational arithmetic."""
    return min(dst * in_size // out_size, in_size - 1)


def loop_conv3x3(x: list[list[float]], k: list[list[float]], b: float) -> list[list[float]]:
    """Single-channel 3×3 cross-correlation, stride 1, zero padding 1, by loops."""
    h, w = len(x), len(x[0])
    out = [[b] * w for _ in range(h)]
    for y in range(h):
        for xx in range(w):
            for dy in range(3):
                for dx in range(3):
                    sy, sx = y + dy - 1, xx + dx - 1
                    if 0 <= sy < h and 0 <= sx < w:
                        out[y][xx] += k[dy][dx] * x[sy][sx]
    return out


def test_single_channel_fpn_matches_loop_reference() -> None:
    torch.manual_seed(0)
    sizes = [(5, 7), (3, 4), (2, 2)]
    feats = [torch.randn(1, 1, h, w, dtype=torch.float64) for h, w in sizes]
    fpn = FPN([1, 1, 1], out_channels=1, extra_blocks="none").double()
    a, b = [2.0, -0.5, 1.5], [0.1, 0.2, -0.3]
    kernels = [torch.randn(3, 3, dtype=torch.float64) for _ in range(3)]
    kb = [0.05, -0.07, 0.3]
    with torch.no_grad():
        for i in range(3):
            fpn.lateral_convs[i].weight.fill_(a[i])
            fpn.lateral_convs[i].bias.fill_(b[i])
            fpn.output_convs[i].weight.copy_(kernels[i].view(1, 1, 3, 3))
            fpn.output_convs[i].bias.fill_(kb[i])
    outs = fpn(feats)

    xs = [f[0, 0].tolist() for f in feats]
    merged: list[list[list[float]]] = [[], [], []]
    merged[2] = [[a[2] * v + b[2] for v in row] for row in xs[2]]
    for i in (1, 0):
        (h, w), (hc, wc) = sizes[i], sizes[i + 1]
        merged[i] = [
            [a[i] * xs[i][y][x] + b[i]
             + merged[i + 1][nearest_index(y, hc, h)][nearest_index(x, wc, w)]
             for x in range(w)]
            for y in range(h)
        ]
    assert len(outs) == 3
    for i in range(3):
        expected = loop_conv3x3(merged[i], kernels[i].tolist(), kb[i])
        torch.testing.assert_close(outs[i][0, 0], torch.tensor(expected, dtype=torch.float64),
                                   rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("sizes", [[(13, 11), (7, 6), (4, 3)], [(25, 17), (13, 9), (7, 5)],
                                   [(8, 8), (4, 4), (2, 2)]])
def test_multichannel_fpn_matches_index_reference(sizes: list[tuple[int, int]]) -> None:
    torch.manual_seed(1)
    in_ch = [3, 5, 4]
    fpn = FPN(in_ch, out_channels=6, extra_blocks="none").double()
    feats = [
        torch.randn(2, c, h, w, dtype=torch.float64)
        for c, (h, w) in zip(in_ch, sizes, strict=True)
    ]
    outs = fpn(feats)

    def lateral(i: int) -> torch.Tensor:
        m = fpn.lateral_convs[i]
        return torch.einsum("oc,nchw->nohw", m.weight[:, :, 0, 0], feats[i]) + m.bias.view(
            1, -1, 1, 1
        )

    last = lateral(2)
    expected = [F.conv2d(last, fpn.output_convs[2].weight, fpn.output_convs[2].bias, padding=1)]
    for i in (1, 0):
        h, w = sizes[i]
        rows = torch.tensor([nearest_index(y, last.shape[2], h) for y in range(h)])
        cols = torch.tensor([nearest_index(x, last.shape[3], w) for x in range(w)])
        last = lateral(i) + last[:, :, rows][:, :, :, cols]
        m = fpn.output_convs[i]
        expected.insert(0, F.conv2d(last, m.weight, m.bias, padding=1))
    for o, e, (h, w) in zip(outs, expected, sizes, strict=True):
        assert o.shape == (2, 6, h, w)
        torch.testing.assert_close(o, e, rtol=1e-12, atol=1e-12)


def test_upsampling_to_larger_than_double_size() -> None:
    # Lateral sizes need not be about twice the coarser size; nearest still maps by floor.
    fpn = FPN([1, 1], out_channels=1, extra_blocks="none").double()
    with torch.no_grad():
        for m in (*fpn.lateral_convs, *fpn.output_convs):
            m.weight.zero_()
            m.bias.zero_()
        fpn.lateral_convs[1].weight.fill_(1.0)
        fpn.output_convs[0].weight[0, 0, 1, 1] = 1.0  # identity 3×3
    coarse = torch.arange(6, dtype=torch.float64).view(1, 1, 2, 3)
    out = fpn([torch.zeros(1, 1, 5, 7, dtype=torch.float64), coarse])[0][0, 0]
    expected = [[float(coarse[0, 0, nearest_index(y, 2, 5), nearest_index(x, 3, 7)])
                 for x in range(7)] for y in range(5)]
    assert out.tolist() == expected


# ----------------------------------------------------------------------------- extra levels


def make_inputs(in_ch: list[int], sizes: list[tuple[int, int]]) -> list[torch.Tensor]:
    torch.manual_seed(2)
    return [torch.randn(1, c, h, w) for c, (h, w) in zip(in_ch, sizes, strict=True)]


IN_CH = [4, 8, 16]
SIZES = [(13, 11), (7, 6), (4, 3)]


def test_extra_none() -> None:
    fpn = FPN(IN_CH, 8, extra_blocks="none")
    outs = fpn(make_inputs(IN_CH, SIZES))
    assert [tuple(o.shape) for o in outs] == [(1, 8, h, w) for h, w in SIZES]
    assert fpn.out_strides([8, 16, 32]) == [8, 16, 32]
    assert not hasattr(fpn, "p6")


def test_extra_maxpool() -> None:
    fpn = FPN([4, 4, 8, 16], 8, extra_blocks="maxpool")
    sizes = [(25, 21)] + SIZES
    outs = fpn(make_inputs([4, 4, 8, 16], sizes))
    assert len(outs) == 5
    assert tuple(outs[-1].shape) == (1, 8, 2, 2)  # ceil(4/2), ceil(3/2)
    torch.testing.assert_close(outs[-1], outs[-2][..., ::2, ::2], rtol=0, atol=0)
    assert fpn.out_strides([4, 8, 16, 32]) == [4, 8, 16, 32, 64]
    assert not any(k.startswith(("p6", "p7")) for k in fpn.state_dict())


@pytest.mark.parametrize("extra_input", ["output", "input"])
def test_extra_p6p7_source(extra_input: str) -> None:
    fpn = FPN(IN_CH, 8, extra_blocks="p6p7", extra_input=extra_input, relu_before_extra=True)
    feats = make_inputs(IN_CH, SIZES)
    outs = fpn(feats)
    assert [tuple(o.shape[-2:]) for o in outs] == SIZES + [(2, 2), (1, 1)]
    assert fpn.out_strides([8, 16, 32]) == [8, 16, 32, 64, 128]
    p6_in = 16 if extra_input == "input" else 8
    assert tuple(fpn.p6.weight.shape) == (8, p6_in, 3, 3)
    assert tuple(fpn.p7.weight.shape) == (8, 8, 3, 3)
    src = feats[-1] if extra_input == "input" else outs[2]
    p6 = F.conv2d(src, fpn.p6.weight, fpn.p6.bias, stride=2, padding=1)
    p7 = F.conv2d(F.relu(p6), fpn.p7.weight, fpn.p7.bias, stride=2, padding=1)
    torch.testing.assert_close(outs[3], p6)
    torch.testing.assert_close(outs[4], p7)


def test_relu_before_p7_matters() -> None:
    feats = make_inputs(IN_CH, SIZES)
    results = {}
    for relu in (False, True):
        fpn = FPN(IN_CH, 2, extra_blocks="p6p7", relu_before_extra=relu)
        with torch.no_grad():
            fpn.p6.weight.zero_()
            fpn.p6.bias.copy_(torch.tensor([-1.0, 2.0]))  # P6 = (-1, 2) everywhere
            fpn.p7.weight.fill_(1.0)
            fpn.p7.bias.zero_()
        outs = fpn(feats)
        assert torch.equal(outs[3], torch.tensor([-1.0, 2.0]).view(1, 2, 1, 1).expand(1, 2, 2, 2))
        results[relu] = outs[4]
    # P7 (1×1) sees the 2×2 P6 through the centre/right/bottom taps of its 3×3 window: 4 taps.
    assert torch.equal(results[False], torch.full((1, 2, 1, 1), 4.0 * (-1.0 + 2.0)))
    assert torch.equal(results[True], torch.full((1, 2, 1, 1), 4.0 * (0.0 + 2.0)))


# ----------------------------------------------------------------------------- keys and init


def test_keys_without_norm() -> None:
    sd = FPN([512, 1024, 2048], 256, extra_blocks="p6p7", extra_input="input").state_dict()
    expected = {f"{p}.{i}.{t}" for p in ("lateral_convs", "output_convs") for i in range(3)
                for t in ("weight", "bias")}
    expected |= {f"{p}.{t}" for p in ("p6", "p7") for t in ("weight", "bias")}
    assert set(sd) == expected
    assert tuple(sd["lateral_convs.2.weight"].shape) == (256, 2048, 1, 1)
    assert tuple(sd["output_convs.0.weight"].shape) == (256, 256, 3, 3)
    assert tuple(sd["p6.weight"].shape) == (256, 2048, 3, 3)  # torchvision RetinaNet v2 layout


def test_gn_variant_keys_and_bias_rule() -> None:
    fpn = FPN([64, 64], 32, extra_blocks="p6p7", norm="gn")
    assert isinstance(fpn.lateral_convs[0], ConvNorm)
    assert isinstance(fpn.lateral_convs[0].norm, nn.GroupNorm)
    assert fpn.lateral_convs[0].norm.num_groups == 32
    sd = fpn.state_dict()
    expected = {f"{p}.{t}" for p in ("lateral_convs.0", "lateral_convs.1", "output_convs.0",
                                      "output_convs.1", "p6", "p7")
                for t in ("conv.weight", "norm.weight", "norm.bias")}
    assert set(sd) == expected
    with_bias = FPN([64, 64], 32, extra_blocks="none", norm="gn", conv_bias=True).state_dict()
    assert "lateral_convs.1.conv.bias" in with_bias
    no_bias = FPN([64, 64], 32, extra_blocks="none", conv_bias=False).state_dict()
    assert set(no_bias) == {"lateral_convs.0.weight", "lateral_convs.1.weight",
                            "output_convs.0.weight", "output_convs.1.weight"}
    outs = FPN([64, 64], 32, extra_blocks="p6p7", norm="bn")(make_inputs([64, 64], SIZES[:2]))
    assert len(outs) == 4


@pytest.mark.parametrize("init", ["kaiming_uniform", "xavier"])
def test_init(init: str) -> None:
    torch.manual_seed(0)
    fpn = FPN([64, 128], 64, extra_blocks="p6p7", init=init)
    for m in fpn.modules():
        if isinstance(m, nn.Conv2d):
            fan_in = m.weight[0].numel()
            fan_out = m.weight.shape[0] * m.weight[0, 0].numel()
            bound = (math.sqrt(3.0 / fan_in) if init == "kaiming_uniform"
                     else math.sqrt(6.0 / (fan_in + fan_out)))
            w = m.weight.abs().max().item()
            assert 0.9 * bound < w <= bound
            assert torch.count_nonzero(m.bias) == 0


def test_gradcheck_and_errors() -> None:
    torch.manual_seed(0)
    fpn = FPN([1, 2], 2, extra_blocks="p6p7", relu_before_extra=True).double()
    feats = (torch.randn(1, 1, 5, 3, dtype=torch.float64, requires_grad=True),
             torch.randn(1, 2, 3, 2, dtype=torch.float64, requires_grad=True))
    assert torch.autograd.gradcheck(lambda a, b: tuple(fpn([a, b])), feats)
    with pytest.raises(ValueError, match="levels"):
        fpn(list(feats[:1]))
    with pytest.raises(ValueError, match="extra_blocks"):
        FPN([2], 2, extra_blocks="pool")
    with pytest.raises(ValueError, match="extra_input"):
        FPN([2], 2, extra_input="c5")
    with pytest.raises(ValueError, match="strides"):
        fpn.out_strides([8])
