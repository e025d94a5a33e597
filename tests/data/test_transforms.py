"""Box-aware transforms against slow per-pixel references; determinism; config builder."""

from __future__ import annotations

import colorsys

import pytest
import torch

from dynadet.data.transforms import (
    Compose,
    PhotometricJitter,
    RandomHorizontalFlip,
    RandomResize,
    build_transforms,
)


def _sample(h: int = 7, w: int = 9, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(3, h, w, generator=g) * 255
    boxes = torch.tensor([[0.0, 0.0, 3.5, 2.0], [2.0, 1.0, 9.0, 7.0], [4.25, 3.0, 5.0, 6.5]])
    target = {"boxes": boxes, "labels": torch.tensor([0, 1, 2]), "image_id": 7}
    return image, target


def test_flip_matches_pixel_reference_and_twice_is_identity():
    image, target = _sample()
    flipped, t1 = RandomHorizontalFlip(prob=1.0)(image, target)
    h, w = image.shape[1:]
    for y in range(h):
        for x in range(w):
            assert torch.equal(flipped[:, y, x], image[:, y, w - 1 - x])
    for b, fb in zip(target["boxes"].tolist(), t1["boxes"].tolist(), strict=True):
        assert fb == [w - b[2], b[1], w - b[0], b[3]]
    assert t1["labels"] is target["labels"] and t1["image_id"] == 7
    assert torch.equal(target["boxes"], _sample()[1]["boxes"])  # input not modified
    back, t2 = RandomHorizontalFlip(prob=1.0)(flipped, t1)
    assert torch.equal(back, image) and torch.equal(t2["boxes"], target["boxes"])


def test_flip_moves_box_content_with_the_box():
    image, _ = _sample(h=6, w=11)
    box = torch.tensor([[2.0, 1.0, 6.0, 5.0]])
    flipped, t = RandomHorizontalFlip(prob=1.0)(image, {"boxes": box})
    x0, y0, x1, y1 = (int(v) for v in t["boxes"][0])
    assert torch.equal(flipped[:, y0:y1, x0:x1], image[:, 1:5, 2:6].flip(-1))


def test_flip_prob_zero_and_empty_boxes():
    image, target = _sample()
    out, t = RandomHorizontalFlip(prob=0.0)(image, target)
    assert out is image and t is target
    empty = {"boxes": torch.zeros(0, 4)}
    _, t = RandomHorizontalFlip(prob=1.0)(image, empty)
    assert t["boxes"].shape == (0, 4)
    with pytest.raises(ValueError):
        RandomHorizontalFlip(prob=1.5)


def test_flip_rate_and_determinism_under_seed():
    image, target = _sample()
    flip = RandomHorizontalFlip(prob=0.3)

    def run():
        return [flip(image, target)[1]["boxes"][0, 0].item() != 0.0 for _ in range(400)]

    torch.manual_seed(5)
    a = run()
    torch.manual_seed(5)
    assert run() == a
    assert 0.22 < sum(a) / len(a) < 0.38


def test_generator_is_used_instead_of_global_rng():
    image, target = _sample()
    t = Compose([RandomHorizontalFlip(0.5, generator=torch.Generator().manual_seed(1)),
                 PhotometricJitter(prob=1.0, hue=0.1, generator=torch.Generator().manual_seed(2))])
    state = torch.get_rng_state()
    out1 = [t(image, target)[0] for _ in range(5)]
    assert torch.equal(torch.get_rng_state(), state)
    t.transforms[0].generator.manual_seed(1)
    t.transforms[1].generator.manual_seed(2)
    out2 = [t(image, target)[0] for _ in range(5)]
    assert all(torch.equal(a, b) for a, b in zip(out1, out2, strict=True))


def _jitter_reference(image, b, c, s):
    """float64 per-pixel transcription of brightness, contrast and saturation."""
    _, h, w = image.shape
    x = [[[float(image[ch, i, j]) * b for j in range(w)] for i in range(h)] for ch in range(3)]
    wts = (0.299, 0.587, 0.114)
    mean = sum(wts[ch] * x[ch][i][j] for ch in range(3) for i in range(h) for j in range(w))
    mean /= h * w
    out = torch.zeros(3, h, w, dtype=torch.float64)
    for i in range(h):
        for j in range(w):
            px = [(x[ch][i][j] - mean) * c + mean for ch in range(3)]
            gray = sum(wts[ch] * px[ch] for ch in range(3))
            px = [gray + (v - gray) * s for v in px]
            for ch in range(3):
                out[ch, i, j] = px[ch]
    return out.clamp(0, 255)


def test_photometric_matches_reference():
    image, target = _sample(h=5, w=6)
    gen = torch.Generator().manual_seed(3)
    jit = PhotometricJitter(0.3, 0.4, 0.5, hue=0.0, prob=1.0, generator=gen)
    replay = torch.Generator().manual_seed(3)
    draws = torch.rand(5, generator=replay, dtype=torch.float64).tolist()
    b, c, s = (1 + a * (2 * d - 1) for a, d in zip((0.3, 0.4, 0.5), draws[1:4], strict=True))
    out, t = jit(image, target)
    assert t is target and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), _jitter_reference(image, b, c, s),
                               atol=1e-3, rtol=1e-5)


def test_hue_rotation_keeps_gray_and_luma_and_moves_hue():
    gray = torch.full((3, 2, 2), 120.0)
    out, _ = PhotometricJitter(0, 0, 0, hue=0.5, prob=1.0)(gray, {"boxes": torch.zeros(0, 4)})
    torch.testing.assert_close(out, gray, atol=1e-3, rtol=0)
    color = torch.tensor([200.0, 80.0, 60.0]).view(3, 1, 1).expand(3, 2, 2).clone()
    torch.manual_seed(0)
    out, _ = PhotometricJitter(0, 0, 0, hue=0.2, prob=1.0)(color, {"boxes": torch.zeros(0, 4)})
    luma = torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)
    torch.testing.assert_close((out * luma).sum(0), (color * luma).sum(0), atol=1e-2, rtol=0)
    h0 = colorsys.rgb_to_hsv(*(color[:, 0, 0] / 255).tolist())[0]
    h1 = colorsys.rgb_to_hsv(*(out[:, 0, 0] / 255).tolist())[0]
    assert 0.005 < min(abs(h1 - h0), 1 - abs(h1 - h0)) < 0.3


@pytest.mark.parametrize("fill", [0.0, 255.0, None])
def test_photometric_stays_in_range(fill):
    torch.manual_seed(0)
    image = torch.rand(3, 8, 8) * 255 if fill is None else torch.full((3, 8, 8), fill)
    jit = PhotometricJitter(1.0, 1.0, 1.0, hue=0.5, prob=1.0)
    for _ in range(20):
        out, _ = jit(image, {"boxes": torch.zeros(0, 4)})
        assert out.min() >= 0 and out.max() <= 255 and torch.isfinite(out).all()


def test_photometric_determinism_and_prob():
    image, target = _sample()
    jit = PhotometricJitter(prob=0.5, hue=0.05)
    torch.manual_seed(11)
    a = [jit(image, target)[0] for _ in range(10)]
    torch.manual_seed(11)
    b = [jit(image, target)[0] for _ in range(10)]
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert any(x is image for x in a) and any(x is not image for x in a)


def test_random_resize_scales_boxes_and_respects_limits():
    image, target = _sample(h=20, w=30)
    torch.manual_seed(0)
    for _ in range(10):
        out, t = RandomResize(min_sizes=[10, 40])(image, target)
        short = min(out.shape[1:])
        assert short in (10, 40)
        sy, sx = out.shape[1] / 20, out.shape[2] / 30
        want = target["boxes"] * torch.tensor([sx, sy, sx, sy])
        want = torch.minimum(want, torch.tensor([out.shape[2], out.shape[1]] * 2))
        torch.testing.assert_close(t["boxes"], want)
    for _ in range(10):
        out, _ = RandomResize(size_range=(12, 16))(image, target)
        assert 12 <= min(out.shape[1:]) <= 16
    out, t = RandomResize(min_sizes=[40], max_size=45)(image, target)
    assert out.shape[1:] == (30, 45)
    flat = torch.full((3, 20, 30), 77.0)
    out, _ = RandomResize(min_sizes=[13])(flat, {"boxes": torch.zeros(0, 4)})
    torch.testing.assert_close(out, torch.full_like(out, 77.0))
    with pytest.raises(ValueError):
        RandomResize()
    with pytest.raises(ValueError):
        RandomResize(min_sizes=[10], size_range=(1, 2))


def test_boxes_stay_inside_after_pipeline():
    torch.manual_seed(1)
    pipe = build_transforms({"flip_prob": 0.5, "photometric": True,
                             "resize": {"size_range": [9, 23], "max_size": 31}}, train=True)
    for k in range(30):
        h, w = 10 + k % 7, 12 + k % 5
        xy = torch.rand(6, 2) * torch.tensor([w, h])
        wh = torch.rand(6, 2) * torch.tensor([w, h])
        boxes = torch.cat([xy, torch.minimum(xy + wh, torch.tensor([w, h]))], 1)
        out, t = pipe(torch.rand(3, h, w) * 255, {"boxes": boxes})
        oh, ow = out.shape[1:]
        b = t["boxes"]
        assert (b >= 0).all() and (b[:, 0::2] <= ow).all() and (b[:, 1::2] <= oh).all()
        assert (b[:, 2:] >= b[:, :2]).all()
        assert out.min() >= 0 and out.max() <= 255


def test_build_transforms():
    assert build_transforms(None, train=False).transforms == []
    assert build_transforms({"flip_prob": 0.9, "photometric": True}, train=False).transforms == []
    default = build_transforms(None, train=True).transforms
    assert len(default) == 1 and isinstance(default[0], RandomHorizontalFlip)
    assert default[0].prob == 0.5
    full = build_transforms({"flip_prob": 0.0, "photometric": {"hue": 0.1},
                             "resize": {"min_sizes": [8, 16]}}, train=True).transforms
    assert [type(t) for t in full] == [RandomResize, PhotometricJitter]
    assert full[1].hue == 0.1
    with pytest.raises(ValueError, match="did you mean 'flip_prob'"):
        build_transforms({"flip_pro": 0.5}, train=True)
    assert "RandomHorizontalFlip" in repr(build_transforms(None, train=True))
