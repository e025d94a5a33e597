"""Masked conv + active-pixel GroupNorm against dense convs and slow float64 loop references."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dynadet.ops import masked_conv as masked_conv_mod
from dynadet.ops.masked_conv import (
    MaskedConvGN,
    clear_workspace,
    dilate_mask,
    masked_conv2d,
    masked_conv_gn,
    masked_group_norm,
)

SPARSE, DENSE = 2.0, 0.0  # dense_threshold values forcing each path


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors gain nothing from threads, and on a busy machine every OpenMP region waits
    for a descheduled worker (10× slower); restore the setting for the other test modules."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def loop_masked_conv(
    x: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor, bias, padding: int, dilation: int
) -> torch.Tensor:
    """Per active output pixel and tap, in float64: the masked im2col rule of the reference."""
    x, weight = x.double(), weight.double()
    n, c, h, w = x.shape
    c_out, _, kh, kw = weight.shape
    ho, wo = mask.shape[-2:]
    out = torch.zeros(n, c_out, ho, wo, dtype=torch.float64)
    for b, y, xx in (mask.reshape(n, ho, wo) > 0).nonzero().tolist():
        acc = torch.zeros(c_out, dtype=torch.float64)
        for i in range(kh):
            for j in range(kw):
                iy, ix = y - padding + i * dilation, xx - padding + j * dilation
                if 0 <= iy < h and 0 <= ix < w:
                    acc += weight[:, :, i, j] @ x[b, :, iy, ix]
        if bias is not None:
            acc += bias.double()
        out[b, :, y, xx] = acc
    return out


def loop_active_group_norm(
    x: torch.Tensor, mask: torch.Tensor, groups: int, weight, bias, eps: float
) -> torch.Tensor:
    """Per image and group: mean / biased variance over the active pixels only, float64."""
    x = x.double()
    n, c, h, w = x.shape
    cg = c // groups
    out = torch.zeros_like(x)
    active = mask.reshape(n, h, w) > 0
    for b in range(n):
        if not active[b].any():
            continue
        for g in range(groups):
            vals = x[b, g * cg : (g + 1) * cg][:, active[b]]  # [cg, K_b]
            mean = vals.mean()
            var = ((vals - mean) ** 2).mean()
            for k in range(cg):
                ch = g * cg + k
                normed = (x[b, ch] - mean) / torch.sqrt(var + eps)
                if weight is not None:
                    normed = normed * weight[ch].double() + bias[ch].double()
                out[b, ch] = torch.where(active[b], normed, torch.zeros_like(normed))
    return out


def random_mask(n: int, h: int, w: int, density: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, h, w, generator=g) < density


def make(n: int, c: int, h: int, w: int, c_out: int, seed: int = 0, k: int = 3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=g)
    weight = torch.randn(c_out, c, k, k, generator=g) * 0.2
    bias = torch.randn(c_out, generator=g)
    return x, weight, bias


def gn_module(c: int, groups: int, seed: int = 0) -> nn.GroupNorm:
    g = torch.Generator().manual_seed(seed)
    norm = nn.GroupNorm(groups, c)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.3 * torch.randn(c, generator=g))
        norm.bias.copy_(0.3 * torch.randn(c, generator=g))
    return norm


DENSITIES = [0.0, 0.01, 0.1, 0.3, 0.7, 1.0]


@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("threshold", [SPARSE, DENSE, 0.5])
def test_conv_equals_dense_conv_times_mask(n: int, density: float, threshold: float) -> None:
    x, weight, bias = make(n, 6, 9, 13, 5, seed=n)
    mask = random_mask(n, 9, 13, density, seed=int(density * 100))
    out = masked_conv2d(x, mask, weight, bias, dense_threshold=threshold)
    expected = F.conv2d(x, weight, bias, padding=1) * mask
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert (out[~mask.expand_as(out)] == 0).all()


@pytest.mark.parametrize(
    ("padding", "dilation", "k", "hw"),
    [
        (1, 1, 3, (7, 11)),
        (2, 2, 3, (8, 5)),
        (0, 1, 3, (9, 10)),
        (0, 1, 1, (5, 6)),
        (2, 1, 5, (7, 7)),
    ],
)
def test_conv_geometry_against_loop(
    padding: int, dilation: int, k: int, hw: tuple[int, int]
) -> None:
    x, weight, bias = make(2, 4, *hw, 3, seed=7, k=k)
    ho = hw[0] + 2 * padding - dilation * (k - 1)
    wo = hw[1] + 2 * padding - dilation * (k - 1)
    mask = random_mask(2, ho, wo, 0.4, seed=3)
    out = masked_conv2d(
        x.double(), mask, weight.double(), bias.double(), padding, dilation, dense_threshold=SPARSE
    )
    expected = loop_masked_conv(x, mask, weight, bias, padding, dilation)
    torch.testing.assert_close(out, expected, atol=1e-10, rtol=1e-10)
    dense = F.conv2d(x, weight, bias, padding=padding, dilation=dilation) * mask
    torch.testing.assert_close(masked_conv2d(x, mask, weight, None, padding, dilation, SPARSE),
                               dense - bias[:, None, None] * mask, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("n", [1, 2])
@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("threshold", [SPARSE, DENSE])
def test_dense_gn_mode_is_training_semantics(n: int, density: float, threshold: float) -> None:
    x, weight, _ = make(n, 8, 11, 7, 8, seed=2)
    norm = gn_module(8, 4)
    mask = random_mask(n, 11, 7, density, seed=5)
    out = masked_conv_gn(x, mask, weight, None, norm, relu=True, gn_mode="dense",
                         dense_threshold=threshold)
    expected = F.relu(norm(F.conv2d(x, weight, padding=1))) * mask
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("density", [0.02, 0.15, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("threshold", [SPARSE, DENSE])
@pytest.mark.parametrize("relu", [False, True])
def test_masked_gn_mode_against_loop(n: int, density: float, threshold: float, relu: bool) -> None:
    x, weight, bias = make(n, 8, 9, 11, 8, seed=n + 10)
    norm = gn_module(8, 2, seed=1)
    mask = random_mask(n, 9, 11, density, seed=n)
    mask[0, 0, 4, 5] = True  # at least one active pixel in image 0
    out = masked_conv_gn(x, mask, weight, bias, norm, relu, "masked", dilation=1,
                         dense_threshold=threshold)
    conv = loop_masked_conv(x, mask, weight, bias, 1, 1)
    expected = loop_active_group_norm(conv, mask, 2, norm.weight, norm.bias, norm.eps)
    if relu:
        expected = expected.relu()
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)


def test_masked_gn_differs_from_dense_gn_on_sparse_masks() -> None:
    x, weight, _ = make(1, 8, 12, 12, 8, seed=4)
    x[..., :4, :4] += 3.0  # an "object" whose statistics differ from the background
    mask = torch.zeros(1, 1, 12, 12, dtype=torch.bool)
    mask[..., :4, :4] = True
    norm = gn_module(8, 2)
    masked = masked_conv_gn(x, mask, weight, None, norm, gn_mode="masked")
    dense = masked_conv_gn(x, mask, weight, None, norm, gn_mode="dense")
    assert (masked - dense).norm() > 0.05 * dense.norm()


def test_empty_image_in_batch_and_all_empty() -> None:
    x, weight, bias = make(3, 4, 6, 5, 4, seed=9)
    norm = gn_module(4, 2)
    mask = random_mask(3, 6, 5, 0.5, seed=1)
    mask[1] = False
    out = masked_conv_gn(x, mask, weight, bias, norm, True, dense_threshold=SPARSE)
    assert (out[1] == 0).all()
    conv = loop_masked_conv(x, mask, weight, bias, 1, 1)
    expected = loop_active_group_norm(conv, mask, 2, norm.weight, norm.bias, norm.eps).relu()
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)
    empty = torch.zeros(3, 1, 6, 5, dtype=torch.bool)
    for threshold in (SPARSE, DENSE):
        out = masked_conv_gn(x, empty, weight, bias, norm, True, dense_threshold=threshold)
        assert out.shape == (3, 4, 6, 5) and (out == 0).all() and torch.isfinite(out).all()


def test_single_active_pixel_gn_is_finite() -> None:
    x, weight, _ = make(1, 4, 5, 5, 4, seed=3)
    mask = torch.zeros(1, 1, 5, 5, dtype=torch.bool)
    mask[0, 0, 2, 2] = True
    out = masked_conv_gn(x, mask, weight, None, gn_module(4, 4), dense_threshold=SPARSE)
    # One channel per group and one pixel: the value equals its mean, so GN gives the bias.
    torch.testing.assert_close(out[0, :, 2, 2], gn_module(4, 4).bias, atol=1e-6, rtol=0)


def test_all_ones_masked_gn_equals_group_norm() -> None:
    x, weight, bias = make(2, 8, 7, 9, 8, seed=6)
    norm = gn_module(8, 4)
    ones = torch.ones(2, 1, 7, 9, dtype=torch.bool)
    out = masked_conv_gn(x, ones, weight, bias, norm, True, dense_threshold=SPARSE)
    expected = F.relu(norm(F.conv2d(x, weight, bias, padding=1)))
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_masked_group_norm_dense_layout_against_loop() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 6, 5, 7, generator=g)
    mask = random_mask(3, 5, 7, 0.4, seed=2)
    weight, bias = torch.randn(6, generator=g), torch.randn(6, generator=g)
    out = masked_group_norm(x, mask, 3, weight, bias)
    expected = loop_active_group_norm(x, mask, 3, weight, bias, 1e-5)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)


def test_mask_accepts_gate_values_and_3d_shape() -> None:
    x, weight, bias = make(2, 4, 6, 6, 4, seed=1)
    gate = torch.rand(2, 1, 6, 6) * (torch.rand(2, 1, 6, 6) > 0.5)
    out = masked_conv2d(x, gate[:, 0], weight, bias, dense_threshold=SPARSE)
    torch.testing.assert_close(out, F.conv2d(x, weight, bias, padding=1) * (gate > 0))


def test_dilate_mask_against_loop() -> None:
    mask = random_mask(2, 9, 8, 0.1, seed=4)
    for dilation in (1, 2):
        out = dilate_mask(mask, 3, dilation)
        expected = torch.zeros_like(mask)
        for b, _, y, x in mask.nonzero().tolist():
            for dy in (-dilation, 0, dilation):
                for dx in (-dilation, 0, dilation):
                    if 0 <= y + dy < 9 and 0 <= x + dx < 8:
                        expected[b, 0, y + dy, x + dx] = True
        assert torch.equal(out, expected)


def test_module_dense_and_masked_paths() -> None:
    torch.manual_seed(0)
    conv = MaskedConvGN(8, 8, num_groups=4, relu=True)
    assert sorted(k for k, _ in conv.named_parameters()) == ["norm.bias", "norm.weight", "weight"]
    x = torch.randn(2, 8, 7, 6)
    dense = conv(x)
    torch.testing.assert_close(dense, F.relu(conv.norm(F.conv2d(x, conv.weight, padding=1))))
    ones = torch.ones(2, 1, 7, 6, dtype=torch.bool)
    with torch.no_grad():
        torch.testing.assert_close(conv(x, ones), dense, atol=1e-5, rtol=1e-5)
        mask = random_mask(2, 7, 6, 0.3, seed=0)
        torch.testing.assert_close(conv(x, mask, "dense"), dense * mask, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("threshold", [SPARSE, DENSE])
def test_gradients_through_sparse_and_dense_paths(threshold: float) -> None:
    x, weight, _ = make(2, 4, 4, 5, 4, seed=2)
    norm = gn_module(4, 2).double()
    mask = random_mask(2, 4, 5, 0.5, seed=8)
    params = (
        x.double().requires_grad_(),
        weight.double().requires_grad_(),
        norm.weight.detach().clone().requires_grad_(),
        norm.bias.detach().clone().requires_grad_(),
    )

    def fn(xx, ww, gw, gb):
        # Only num_groups / weight / bias / eps are read from the norm.
        gn = SimpleNamespace(num_groups=2, weight=gw, bias=gb, eps=1e-5)
        return masked_conv_gn(xx, mask, ww, None, gn, relu=True, dense_threshold=threshold)

    assert torch.autograd.gradcheck(fn, params, eps=1e-6, atol=1e-6, fast_mode=True)


def test_large_batch_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    import dynadet.ops.masked_conv as mc

    monkeypatch.setattr(mc, "_CHUNK_ROWS", 7)  # several chunks on a small input
    x, weight, bias = make(2, 4, 6, 7, 3, seed=5)
    mask = random_mask(2, 6, 7, 0.6, seed=6)
    out = masked_conv2d(x, mask, weight, bias, dense_threshold=SPARSE)
    torch.testing.assert_close(out, F.conv2d(x, weight, bias, padding=1) * mask)


def test_bad_inputs() -> None:
    x, weight, _ = make(2, 4, 6, 6, 4)
    with pytest.raises(ValueError, match="mask shape"):
        masked_conv2d(x, torch.ones(1, 1, 6, 6), weight)
    with pytest.raises(ValueError, match="mask shape"):
        masked_conv2d(x, torch.ones(2, 1, 5, 6), weight)
    with pytest.raises(ValueError, match="gn_mode"):
        masked_conv_gn(x, torch.ones(2, 1, 6, 6), weight, gn_mode="sparse")
    with pytest.raises(ValueError, match="input channels"):
        masked_conv2d(x, torch.ones(2, 1, 6, 6), weight[:, :2], dense_threshold=SPARSE)


def test_empty_batch_and_channels_last_input() -> None:
    x, weight, bias = make(2, 4, 5, 6, 4, seed=3)
    norm = gn_module(4, 2)
    empty = torch.zeros(0, 1, 5, 6, dtype=torch.bool)
    for threshold in (SPARSE, DENSE):
        out = masked_conv_gn(x[:0], empty, weight, bias, norm, True, dense_threshold=threshold)
        assert out.shape == (0, 4, 5, 6)
    mask = random_mask(2, 5, 6, 0.5, seed=2)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    out = masked_conv2d(x_cl, mask, weight, bias, dense_threshold=SPARSE)
    torch.testing.assert_close(out, F.conv2d(x, weight, bias, padding=1) * mask)


def test_inference_workspace_is_reused_and_results_stay_exact() -> None:
    """The padded scratch buffer kept between inference calls (bigger, smaller, in no_grad and
    inference mode, other threads) never changes a result."""
    import threading

    gen = torch.Generator().manual_seed(7)
    weight = torch.randn(8, 6, 3, 3, generator=gen)
    cases = []
    for n, h, w in ((1, 9, 11), (3, 13, 7), (1, 5, 6)):
        x = torch.randn(n, 6, h, w, generator=gen)
        mask = torch.rand(n, 1, h, w, generator=gen) < 0.3
        cases.append((x, mask, F.conv2d(x, weight, padding=1) * mask))
    clear_workspace()
    for ctx in (torch.no_grad, torch.inference_mode, torch.no_grad):
        with ctx():
            for x, mask, ref in cases:
                out = masked_conv2d(x, mask, weight, dense_threshold=SPARSE)
                torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    buffers = masked_conv_mod._WORKSPACE.__dict__.get("buffers", {})
    # per inference-mode state: the padded input, the output rows and the gathered rows, each
    # grown to the largest input
    assert len(buffers) == 6
    padded = [b for key, b in buffers.items() if key[-1] == masked_conv_mod._SLOT_PADDED]
    assert max(b.numel() for b in padded) == 3 * 15 * 9 * 6
    errors = []

    def other_thread() -> None:  # a thread starts with its own, empty workspace
        errors.append(bool(masked_conv_mod._WORKSPACE.__dict__.get("buffers")))

    t = threading.Thread(target=other_thread)
    t.start(), t.join()
    assert errors == [False]
    clear_workspace()
    assert not masked_conv_mod._WORKSPACE.__dict__.get("buffers")
    x, mask, ref = cases[0]
    out = masked_conv2d(x.requires_grad_(), mask, weight, dense_threshold=SPARSE)
    assert out.requires_grad and not masked_conv_mod._WORKSPACE.__dict__.get("buffers")


def test_tap_weight_cache_follows_in_place_weight_updates() -> None:
    conv = MaskedConvGN(4, 6, num_groups=None).eval()
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 7, 8, generator=gen)
    mask = torch.rand(2, 1, 7, 8, generator=gen) < 0.4
    with torch.no_grad():
        first = conv(x, mask)
        conv.weight.mul_(2)  # as an optimizer step or load_state_dict would (version moves)
        second = conv(x, mask)
        torch.testing.assert_close(second, 2 * first, rtol=1e-5, atol=1e-6)
        conv.load_state_dict({"weight": torch.ones_like(conv.weight)})
        ones = conv(x, mask)
    torch.testing.assert_close(ones, F.conv2d(x, torch.ones(6, 4, 3, 3), padding=1) * mask)


@pytest.mark.parametrize("threshold", [SPARSE, DENSE, 0.5])
@pytest.mark.parametrize("grad", [False, True])
def test_bf16_autocast_runs_in_bf16_and_normalises_in_fp32(threshold: float, grad: bool) -> None:
    x, weight, _ = make(2, 16, 9, 10, 16, seed=3)
    norm = gn_module(16, 4)
    mask = random_mask(2, 9, 10, 0.3, seed=1)
    with torch.no_grad():
        ref = masked_conv_gn(x, mask, weight, None, norm, relu=True, dense_threshold=threshold)
    xx = x.clone().requires_grad_(grad)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.set_grad_enabled(grad):
        out = masked_conv_gn(xx, mask, weight, None, norm, relu=True, dense_threshold=threshold)
        plain = masked_conv2d(xx, mask, weight, dense_threshold=threshold)
    assert out.dtype == torch.float32 and plain.dtype == torch.bfloat16
    torch.testing.assert_close(out, ref, atol=0.06, rtol=0.05)  # bf16 conv, fp32 statistics
    torch.testing.assert_close(plain.float(), F.conv2d(x, weight, padding=1) * mask,
                               atol=0.06, rtol=0.02)  # fmt: skip
    if grad:
        out.square().sum().backward()
        assert xx.grad is not None and torch.isfinite(xx.grad).all()


def test_bf16_input_without_autocast_keeps_bf16() -> None:
    x, weight, _ = make(1, 8, 6, 7, 8, seed=4)
    norm = gn_module(8, 2)
    mask = random_mask(1, 6, 7, 0.4, seed=2)
    for threshold in (SPARSE, 0.0):
        out = masked_conv_gn(x.bfloat16(), mask, weight.bfloat16(), None, norm.bfloat16(),
                             dense_threshold=threshold)  # fmt: skip
        assert out.dtype == torch.bfloat16
        ref = masked_conv_gn(x, mask, weight, None, norm.float(), dense_threshold=threshold)
        torch.testing.assert_close(out.float(), ref, atol=0.1, rtol=0.05)


def _depth_convs(c: int, groups: int, seed: int) -> tuple[MaskedConvGN, MaskedConvGN]:
    torch.manual_seed(seed)
    conv1 = MaskedConvGN(c, c, num_groups=groups, relu=True).double()
    conv2 = MaskedConvGN(c, c, num_groups=groups, relu=False).double()
    for conv in (conv1, conv2):
        with torch.no_grad():
            conv.weight.normal_(0, 0.2)
            conv.norm.weight.uniform_(0.5, 1.5)
            conv.norm.bias.normal_(0, 0.3)
    return conv1, conv2


@pytest.mark.parametrize("density", [0.0, 0.05, 0.3, 0.6])
@pytest.mark.parametrize("n", [1, 3])
def test_fused_gated_residual_equals_unfused(density: float, n: int) -> None:
    from dynadet.ops.masked_conv import masked_gated_residual

    conv1, conv2 = _depth_convs(8, 2, seed=1)
    for conv in (conv1, conv2):
        conv.dense_threshold = 2.0  # the fused path runs at every density
    x, _, _ = make(n, 8, 9, 11, 8, seed=4)
    y = x.double().contiguous(memory_format=torch.channels_last)
    gate = random_mask(n, 9, 11, density, seed=5).double() * torch.rand(n, 1, 9, 11).double()
    with torch.no_grad():
        hidden = conv1(y, dilate_mask(gate), "masked")
        expected = F.relu(y + conv2(hidden, gate, "masked") * gate)
        fused = masked_gated_residual(y, gate, conv1, conv2)
    assert fused is not None and fused.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(fused, expected, atol=1e-10, rtol=1e-10)


def test_fused_gated_residual_declines_what_it_does_not_cover() -> None:
    from dynadet.ops.masked_conv import masked_gated_residual

    conv1, conv2 = _depth_convs(8, 2, seed=2)
    y = torch.randn(1, 8, 6, 7).double()
    gate = random_mask(1, 6, 7, 0.2, seed=1).double()
    with torch.no_grad():
        assert masked_gated_residual(y, gate, conv1, conv2) is None  # NCHW input
        cl = y.contiguous(memory_format=torch.channels_last)
        assert masked_gated_residual(cl, gate, conv1, conv2) is not None
        conv1.dense_threshold = 0.0  # dense is cheaper: the caller's path decides
        assert masked_gated_residual(cl, gate, conv1, conv2) is None
    conv1.dense_threshold = 2.0
    assert masked_gated_residual(cl, gate, conv1, conv2) is None  # autograd: unfused path


needs_onednn = pytest.mark.skipif(
    masked_conv_mod._ONEDNN_LINEAR is None, reason="this torch build has no oneDNN matmul"
)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_levels_batch_equals_level_by_level(dtype: torch.dtype) -> None:
    """Several levels through one sparse stream = each level alone; a level above the dense
    threshold comes back as None (the caller runs it unfused), the others are still fused."""
    from dynadet.ops.masked_conv import masked_gated_residual, masked_gated_residual_levels

    conv1, conv2 = (conv.to(dtype) for conv in _depth_convs(8, 2, seed=3))
    sizes, densities = [(9, 11), (5, 6), (3, 3), (4, 7)], [0.08, 0.05, 0.0, 0.9]
    ys, gates = [], []
    for i, ((h, w), density) in enumerate(zip(sizes, densities, strict=True)):
        x, _, _ = make(2, 8, h, w, 8, seed=10 + i)
        ys.append(x.to(dtype).contiguous(memory_format=torch.channels_last))
        g = torch.Generator().manual_seed(i)
        gates.append(random_mask(2, h, w, density, seed=i).to(dtype)
                     * torch.rand(2, 1, h, w, generator=g).to(dtype))  # fmt: skip
    conv1.dense_threshold = 0.8  # the 90 % level's dilated mask is above it
    tol = {"atol": 1e-10, "rtol": 1e-10} if dtype == torch.float64 else {}
    with torch.no_grad():
        batched = masked_gated_residual_levels(ys, gates, conv1, conv2)
        alone = [masked_gated_residual(y, g, conv1, conv2) for y, g in zip(ys, gates, strict=True)]
    assert batched is not None and batched[3] is None and alone[3] is None
    for b, a in zip(batched[:3], alone[:3], strict=True):
        assert b is not None and a is not None
        torch.testing.assert_close(b, a, **tol)


@needs_onednn
def test_onednn_and_per_tap_gemm_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    """CPU float32 inference uses im2col rows + oneDNN; other devices and dtypes the per-tap
    GEMMs. Both against the dense conv, with several im2col chunks and a short last one."""
    monkeypatch.setattr(masked_conv_mod, "_IM2COL_ROWS", 64)
    x, weight, bias = make(2, 6, 13, 17, 5, seed=8)
    mask = random_mask(2, 13, 17, 0.55, seed=9)  # ~243 rows: 4 chunks, the last one short
    expected = F.conv2d(x, weight, bias, padding=1) * mask
    with torch.no_grad():
        onednn = masked_conv2d(x, mask, weight, bias, dense_threshold=SPARSE)
        monkeypatch.setattr(masked_conv_mod, "_ONEDNN_LINEAR", None)
        per_tap = masked_conv2d(x, mask, weight, bias, dense_threshold=SPARSE)
    torch.testing.assert_close(onednn, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(per_tap, expected, atol=1e-5, rtol=1e-5)


@needs_onednn
def test_onednn_row_counts_are_bucketed(monkeypatch: pytest.MonkeyPatch) -> None:
    """oneDNN compiles a kernel per new row count: masks of any density only ever give row
    counts that are multiples of 64 (and at most one chunk), and results stay exact."""
    seen: set[int] = set()
    real = masked_conv_mod._ONEDNN_LINEAR

    def spy(rows, *args):
        seen.add(rows.shape[0])
        return real(rows, *args)

    monkeypatch.setattr(masked_conv_mod, "_ONEDNN_LINEAR", spy)
    x, weight, _ = make(1, 4, 40, 41, 4, seed=2)
    with torch.no_grad():
        for seed, density in enumerate([0.01, 0.07, 0.2, 0.33, 0.5]):
            mask = random_mask(1, 40, 41, density, seed=seed)
            out = masked_conv2d(x, mask, weight, dense_threshold=SPARSE)
            torch.testing.assert_close(out, F.conv2d(x, weight, padding=1) * mask)
    assert seen and all(m % 64 == 0 and m <= masked_conv_mod._IM2COL_ROWS for m in seen)
