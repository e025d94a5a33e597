"""RoIAlign against a slow float64 transcription of the compiled kernel's rule."""

from __future__ import annotations

import math

import pytest
import torch

import dynadet.ops.roi_align as roi_align_module
from dynadet.ops.roi_align import (
    MultiScaleRoIAlign,
    RoIAlign,
    roi_align,
    torchvision_available,
)


def reference_roi_align(
    input: torch.Tensor,
    rois: torch.Tensor,
    output_size: tuple[int, int],
    spatial_scale: float,
    sampling_ratio: int,
    aligned: bool,
) -> torch.Tensor:
    """Loops over RoIs, bins and samples, as ``roi_align_kernel.cpp`` (double precision)."""
    data = input.double().tolist()
    _, channels, height, width = input.shape
    oh, ow = output_size
    out = torch.zeros(rois.shape[0], channels, oh, ow, dtype=torch.float64)
    offset = 0.5 if aligned else 0.0
    for k, (b, *box) in enumerate(rois.double().tolist()):
        x1, y1, x2, y2 = (v * spatial_scale - offset for v in box)
        roi_w, roi_h = x2 - x1, y2 - y1
        if not aligned:
            roi_w, roi_h = max(roi_w, 1.0), max(roi_h, 1.0)
        bin_h, bin_w = roi_h / oh, roi_w / ow
        grid_h = sampling_ratio if sampling_ratio > 0 else math.ceil(roi_h / oh)
        grid_w = sampling_ratio if sampling_ratio > 0 else math.ceil(roi_w / ow)
        count = max(grid_h * grid_w, 1)
        plane = data[int(b)]
        for p in range(oh):
            for q in range(ow):
                acc = [0.0] * channels
                for iy in range(grid_h):
                    y = y1 + p * bin_h + (iy + 0.5) * bin_h / grid_h
                    if y < -1.0 or y > height:  # the whole row of samples is empty
                        continue
                    for ix in range(grid_w):
                        x = x1 + q * bin_w + (ix + 0.5) * bin_w / grid_w
                        if x < -1.0 or x > width:
                            continue
                        yy, xx = max(y, 0.0), max(x, 0.0)
                        y_low, x_low = int(yy), int(xx)
                        if y_low >= height - 1:
                            y_low = y_high = height - 1
                            yy = float(y_low)
                        else:
                            y_high = y_low + 1
                        if x_low >= width - 1:
                            x_low = x_high = width - 1
                            xx = float(x_low)
                        else:
                            x_high = x_low + 1
                        ly, lx = yy - y_low, xx - x_low
                        hy, hx = 1.0 - ly, 1.0 - lx
                        for c in range(channels):
                            f = plane[c]
                            acc[c] += (
                                hy * hx * f[y_low][x_low]
                                + hy * lx * f[y_low][x_high]
                                + ly * hx * f[y_high][x_low]
                                + ly * lx * f[y_high][x_high]
                            )
                for c in range(channels):
                    out[k, c, p, q] = acc[c] / count
    return out


# (batch, x1, y1, x2, y2) on a 2 x C x 9 x 11 map (image coordinates: scale 0.5 halves them)
CASES = [
    [0, 1.0, 1.0, 8.0, 7.0],  # inside
    [1, 2.3, 1.7, 9.9, 8.2],  # inside, fractional
    [1, -3.0, -2.0, 5.0, 4.0],  # partly outside (top-left)
    [0, 7.5, 5.5, 14.0, 12.0],  # partly outside (bottom-right)
    [0, -9.0, 3.0, 30.0, 6.0],  # wider than the map
    [1, 0.0, 0.0, 22.0, 18.0],  # covers the map, ends exactly at 2x its size
    [0, -20.0, -20.0, -10.0, -10.0],  # fully outside
    [1, 14.0, 11.0, 25.0, 20.0],  # fully outside, past the far edges
    [1, 2.3, 4.1, 2.6, 4.2],  # sub-pixel
    [0, 5.0, 5.0, 5.0, 5.0],  # zero size
    [1, 6.0, 6.0, 4.0, 3.0],  # negative size
    [0, 3.0, 2.0, 3.0, 8.0],  # zero width only
    [1, 10.2, 8.3, 10.9, 8.8],  # sub-pixel at the far corner
]


@pytest.fixture(scope="module")
def feature() -> torch.Tensor:
    return torch.randn(2, 3, 9, 11, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [0, 1, 2])
@pytest.mark.parametrize("spatial_scale", [1.0, 0.5])
def test_matches_reference_float64(
    feature: torch.Tensor, aligned: bool, sampling_ratio: int, spatial_scale: float
) -> None:
    rois = torch.tensor(CASES, dtype=torch.float64)
    for size in [(3, 3), (2, 4)]:
        got = roi_align(feature, rois, size, spatial_scale, sampling_ratio, aligned)
        want = reference_roi_align(feature, rois, size, spatial_scale, sampling_ratio, aligned)
        assert got.shape == (len(CASES), 3, *size)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10)


def test_edge_cases_pool_as_the_kernel(feature: torch.Tensor) -> None:
    rois = torch.tensor(CASES, dtype=torch.float64)
    outside = rois[6:8]
    for aligned in (False, True):
        assert roi_align(feature, outside, 3, 1.0, 0, aligned).abs().max() == 0
    # aligned + adaptive + zero / negative size: no samples at all -> 0
    degenerate = rois[[9, 10, 11]]
    assert roi_align(feature, degenerate, 3, 1.0, 0, True).abs().max() == 0
    # not aligned: the RoI is widened to 1 pixel and sampled
    assert roi_align(feature, degenerate, 3, 1.0, 0, False).abs().max() > 0
    # aligned with a fixed ratio: samples exist (at one spot or walking backwards)
    assert roi_align(feature, degenerate[:2], 3, 1.0, 2, True).abs().max() > 0


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [0, 2])
def test_matches_reference_float32_random(aligned: bool, sampling_ratio: int) -> None:
    gen = torch.Generator().manual_seed(1)
    feature = torch.randn(3, 4, 13, 7, generator=gen)
    corners = torch.rand(40, 4, generator=gen) * torch.tensor([20.0, 34.0, 20.0, 34.0]) - 3
    boxes = torch.cat([corners[:, :2], corners[:, :2] + corners[:, 2:] / 2], dim=1)
    rois = torch.cat([torch.randint(0, 3, (40, 1), generator=gen).float(), boxes], dim=1)
    got = roi_align(feature, rois, (3, 4), 0.5, sampling_ratio, aligned)
    want = reference_roi_align(feature, rois, (3, 4), 0.5, sampling_ratio, aligned)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-5)


def test_big_roi_only_enumerates_samples_near_the_map(feature: torch.Tensor) -> None:
    # 600 samples per bin and axis; only a few land on the 9 x 11 map
    rois = torch.tensor([[0, -600.0, -550.0, 600.0, 650.0], [1, -40.0, 3.0, 41.0, 5.0]])
    rois = rois.double()
    got = roi_align(feature, rois, (2, 2), 1.0, 0, True)
    want = reference_roi_align(feature, rois, (2, 2), 1.0, 0, True)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
    # absurd coordinates: millions of samples per bin, still cheap, finite; non-finite -> 0
    huge = torch.tensor([[0, -1e7, -1e7, 1e7, 1e7], [1, float("nan"), 0, 5, 5]]).double()
    out = roi_align(feature, huge, 7, 1.0, 0, True)
    assert torch.isfinite(out).all() and out[1].abs().max() == 0


def test_list_of_boxes_and_module(feature: torch.Tensor) -> None:
    per_image = [
        torch.tensor([[1.0, 1.0, 8.0, 7.0], [2.3, 4.1, 2.6, 4.2]], dtype=torch.float64),
        torch.tensor([[-3.0, -2.0, 5.0, 4.0]], dtype=torch.float64),
    ]
    rois = torch.tensor(
        [[0, 1.0, 1.0, 8.0, 7.0], [0, 2.3, 4.1, 2.6, 4.2], [1, -3.0, -2.0, 5.0, 4.0]],
        dtype=torch.float64,
    )
    want = roi_align(feature, rois, 5, 0.5, 2, True)
    torch.testing.assert_close(roi_align(feature, per_image, 5, 0.5, 2, True), want)
    module = RoIAlign(5, spatial_scale=0.5, sampling_ratio=2, aligned=True)
    torch.testing.assert_close(module(feature, rois), want)
    assert "sampling_ratio=2" in repr(module)


def test_empty_rois(feature: torch.Tensor) -> None:
    empty = feature.new_zeros(0, 5)
    assert roi_align(feature, empty, (3, 4), 1.0, 0, True).shape == (0, 3, 3, 4)
    assert roi_align(feature, [], 7).shape == (0, 3, 7, 7)
    per_image = [feature.new_zeros(0, 4), feature.new_zeros(0, 4)]
    assert roi_align(feature, per_image, 2).shape == (0, 3, 2, 2)


def test_groups_sweeps_and_channel_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    gen = torch.Generator().manual_seed(2)
    feature = torch.randn(2, 40, 9, 11, generator=gen, dtype=torch.float64)
    corners = torch.rand(30, 4, generator=gen, dtype=torch.float64) * 20 - 4
    boxes = torch.cat([corners[:, :2], corners[:, :2] + corners[:, 2:]], dim=1)
    rois = torch.cat([torch.randint(0, 2, (30, 1), generator=gen).double(), boxes], dim=1)
    want = reference_roi_align(feature, rois, (3, 3), 1.0, 0, True)
    torch.testing.assert_close(roi_align(feature, rois, 3, 1.0, 0, True), want, rtol=0, atol=1e-10)
    probe = torch.randn(30, 40, 3, 3, generator=gen, dtype=torch.float64)
    x = feature.clone().requires_grad_(True)
    (roi_align(x, rois, 3, 1.0, 0, True) * probe).sum().backward()
    # tiny budgets: RoIs split into size-sorted groups, several sweeps over the map, and the
    # 40 channels into blocks of 16, 16 and 8; the output must come back in input order
    monkeypatch.setattr(roi_align_module, "_GROUP_TAPS", 60)
    monkeypatch.setattr(roi_align_module, "_SWEEP_TAPS", 200)
    monkeypatch.setattr(roi_align_module, "_CPU_BLOCK_BYTES", 1)
    assert roi_align_module._block_size(feature) == 16
    torch.testing.assert_close(roi_align(feature, rois, 3, 1.0, 0, True), want, rtol=0, atol=1e-10)
    y = feature.clone().requires_grad_(True)
    (roi_align(y, rois, 3, 1.0, 0, True) * probe).sum().backward()
    torch.testing.assert_close(y.grad, x.grad, rtol=0, atol=1e-10)
    x = feature[:, :18].clone().requires_grad_(True)
    pooled = lambda t: roi_align(t, rois[:12], 2, 1.0, 0, True)  # noqa: E731
    assert torch.autograd.gradcheck(pooled, (x,), fast_mode=True)


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [0, 2])
def test_gradcheck(aligned: bool, sampling_ratio: int) -> None:
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 2, 6, 7, generator=gen, dtype=torch.float64, requires_grad=True)
    # generic coordinates: no sample on an integer position; some RoIs cross the border
    rois = torch.tensor(
        [
            [0, 1.13, 0.71, 5.37, 4.29],
            [1, -1.31, -0.77, 4.21, 3.33],
            [1, 3.12, 2.23, 9.31, 7.72],
            [0, 2.17, 2.21, 2.33, 2.46],
        ],
        dtype=torch.float64,
    )
    assert torch.autograd.gradcheck(
        lambda t: roi_align(t, rois, (3, 2), 1.0, sampling_ratio, aligned), (x,)
    )


def test_low_precision_input_and_errors(feature: torch.Tensor) -> None:
    rois = torch.tensor(CASES[:4], dtype=torch.float64)
    want = roi_align(feature.float(), rois.float(), 3, 1.0, 0, True)
    got = roi_align(feature.bfloat16(), rois, 3, 1.0, 0, True)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, rtol=0.02, atol=0.05)
    with pytest.raises(ValueError):
        roi_align(feature, rois, 3, backend="cuda")
    with pytest.raises(ValueError):
        roi_align(feature, rois[:, :4], 3)
    with pytest.raises(TypeError):
        roi_align(feature.long(), rois, 3)
    if not torchvision_available():
        with pytest.raises(RuntimeError):
            roi_align(feature, rois, 3, backend="torchvision")


@pytest.mark.skipif(not torchvision_available(), reason="compiled torchvision roi_align missing")
@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [0, 2])
def test_matches_torchvision(feature: torch.Tensor, aligned: bool, sampling_ratio: int) -> None:
    rois = torch.tensor(CASES, dtype=torch.float64)
    for scale in (1.0, 0.5):
        want = roi_align(feature, rois, (3, 4), scale, sampling_ratio, aligned, "torchvision")
        got = roi_align(feature, rois, (3, 4), scale, sampling_ratio, aligned, "torch")
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10)


def _square(side: float) -> list[float]:
    return [10.0, 20.0, 10.0 + side, 20.0 + side]


@pytest.mark.parametrize("mapping", ["canonical", "mmdet"])
def test_level_mapping_hand_cases(mapping: str) -> None:
    pooler = MultiScaleRoIAlign(level_mapping=mapping)
    boxes = torch.tensor(
        [
            _square(224),  # canonical scale -> level 4 = index 2
            _square(112),  # level 3 -> 1
            _square(448),  # level 5 -> 3
            _square(56),  # level 2 -> 0
            _square(223.9),  # just below 224 -> level 3 -> 1
            _square(5000),  # huge -> clamped to the coarsest
            _square(4),  # tiny -> clamped to the finest
            [0.0, 0.0, 448.0, 112.0],  # sqrt(area) = 224 -> 2
            [5.0, 5.0, 5.0, 90.0],  # zero area -> finest
            [9.0, 9.0, 5.0, 90.0],  # negative area -> finest
        ]
    )
    assert pooler.map_levels(boxes).tolist() == [2, 1, 3, 0, 1, 3, 0, 2, 0, 0]
    assert pooler.map_levels(boxes).dtype == torch.int64


def test_level_mapping_formulas() -> None:
    # canonical: floor(4 + log2(s / 224) + 1e-6) - 2; mmdet: floor(log2(s / 56 + 1e-6))
    strides = (4, 8, 16, 32, 64)
    canonical = MultiScaleRoIAlign(level_mapping="canonical", featmap_strides=strides)
    mmdet = MultiScaleRoIAlign(level_mapping="mmdet", featmap_strides=strides)
    sides = [1.0, 27.9, 55.99, 56.0, 100.0, 111.9, 112.0, 300.0, 896.0, 2000.0, 224 * (1 - 5e-7)]
    side = torch.tensor(sides, dtype=torch.float64)
    boxes = torch.stack([torch.zeros_like(side), torch.zeros_like(side), side, side], 1)
    # the eps sits outside the log for canonical and inside it for mmdet: only the last differs
    assert canonical.map_levels(boxes).tolist() == [0, 0, 0, 0, 0, 0, 1, 2, 4, 4, 2]
    assert mmdet.map_levels(boxes).tolist() == [0, 0, 0, 0, 0, 0, 1, 2, 4, 4, 1]
    # strides (8, 16, 32): canonical levels 3..5, so a 112 box is index 0 and a 300 box index 1
    coarse = MultiScaleRoIAlign(featmap_strides=(8, 16, 32))
    assert coarse.map_levels(boxes[[6, 7]]).tolist() == [0, 1]


@pytest.mark.parametrize("mapping", ["canonical", "mmdet"])
def test_multiscale_pools_each_roi_from_its_level(mapping: str) -> None:
    gen = torch.Generator().manual_seed(4)
    strides = (4, 8, 16, 32)
    features = [
        torch.randn(2, 3, 64 // s, 96 // s, generator=gen, dtype=torch.float64) for s in strides
    ]
    boxes = [
        torch.tensor([[3.0, 5.0, 40.0, 30.0], [0.0, 0.0, 96.0, 64.0], [10.0, 10.0, 12.0, 13.0]]),
        torch.tensor([[20.0, 2.0, 70.0, 60.0], [50.5, 30.5, 61.0, 44.0]]),
    ]
    boxes = [b.double() * 3 for b in boxes]  # boxes up to 288 px so that all levels are used
    pooler = MultiScaleRoIAlign(
        output_size=(3, 2), sampling_ratio=2, aligned=False, level_mapping=mapping
    )
    got = pooler(features, boxes)
    rois = torch.cat([torch.cat([b.new_full((len(b), 1), i), b], 1) for i, b in enumerate(boxes)])
    levels = pooler.map_levels(rois[:, 1:])
    assert len(set(levels.tolist())) >= 3
    for k in range(rois.shape[0]):
        level = int(levels[k])
        scale = 1 / strides[level]
        want = reference_roi_align(features[level], rois[k : k + 1], (3, 2), scale, 2, False)
        torch.testing.assert_close(got[k : k + 1], want, rtol=0, atol=1e-10)
    torch.testing.assert_close(pooler(features, rois), got)
    assert pooler(features, rois[:0]).shape == (0, 3, 3, 2)
    grads = [f.clone().requires_grad_(True) for f in features]
    pooled = lambda *fs: pooler(list(fs), rois)  # noqa: E731
    assert torch.autograd.gradcheck(pooled, tuple(grads), fast_mode=True)


def test_multiscale_argument_checks() -> None:
    with pytest.raises(ValueError):
        MultiScaleRoIAlign(level_mapping="fpn")
    with pytest.raises(ValueError):
        MultiScaleRoIAlign(featmap_strides=(4, 8, 24))
    MultiScaleRoIAlign(featmap_strides=(4, 8, 24), level_mapping="mmdet")
    pooler = MultiScaleRoIAlign()
    with pytest.raises(ValueError):
        pooler([torch.zeros(1, 2, 8, 8)], torch.zeros(0, 5))
