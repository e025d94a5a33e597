"""Test-time augmentation: un-flipping, size overrides and their restoration, merging."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from dynadet.api import build_model
from dynadet.config import load_config
from dynadet.data.synthetic import render_scene
from dynadet.models.preprocess import Preprocessor
from dynadet.models.tta import DEFAULT_SCALES, TestTimeAugmentation, apply_tta


class StubDetector(nn.Module):
    """Follows the inference contract; ``predict(image, run_index)`` makes each run's output."""

    def __init__(self, predict, fail_on_run: int | None = None) -> None:
        super().__init__()
        self.preprocess = Preprocessor(min_size=64, max_size=100)
        self.predict = predict
        self.fail_on_run = fail_on_run
        self.seen: list[tuple[int, int | None]] = []
        self.num_classes = 3

    def forward(self, images: list[Tensor]) -> list[dict[str, Tensor]]:
        run = len(self.seen)
        self.seen.append((self.preprocess.test_min_size, self.preprocess.max_size))
        if run == self.fail_on_run:
            raise RuntimeError("out of memory (simulated)")
        return [self.predict(im, run) for im in images]


def _result(boxes, scores, labels) -> dict[str, Tensor]:
    return {
        "boxes": torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "scores": torch.as_tensor(scores, dtype=torch.float32),
        "labels": torch.as_tensor(labels, dtype=torch.int64),
    }


def test_flipped_run_boxes_are_mirrored_back() -> None:
    # the stub reports the same box in whatever image it gets: the flipped run's box must come
    # back mirrored about the original width
    stub = StubDetector(lambda im, run: _result([10, 20, 30, 40], [0.9 - 0.1 * run], [1]))
    tta = TestTimeAugmentation(stub, scales=[64], max_size=100, flip=True).eval()
    images = [torch.zeros(3, 50, 100), torch.zeros(3, 60, 70)]
    out = tta(images)
    assert torch.equal(out[0]["boxes"], torch.tensor([[10.0, 20, 30, 40], [70, 20, 90, 40]]))
    assert torch.equal(out[1]["boxes"], torch.tensor([[10.0, 20, 30, 40], [40, 20, 60, 40]]))
    assert torch.allclose(out[0]["scores"], torch.tensor([0.9, 0.8]))
    assert out[0]["labels"].tolist() == [1, 1]


def _bright_box(image: Tensor) -> Tensor:
    """Bounding box (pixel edges) of the non-zero pixels: a perfect 'detector'."""
    on = image.amax(dim=0) > 0
    cols = torch.nonzero(on.any(dim=0))[:, 0]
    rows = torch.nonzero(on.any(dim=1))[:, 0]
    return torch.stack([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1]).float()


def test_flip_and_unflip_agree_on_an_asymmetric_object() -> None:
    stub = StubDetector(lambda im, run: _result(_bright_box(im), [0.5 + 0.1 * run], [2]))
    image = torch.zeros(3, 40, 90)
    image[:, 5:17, 11:30] = 200.0  # far from the centre: a wrong mirror would move it
    out = TestTimeAugmentation(stub, scales=[64], flip=True).eval()([image])[0]
    # both runs found the same object: one box left after NMS, from the higher-scored run
    assert torch.equal(out["boxes"], torch.tensor([[11.0, 5, 30, 17]]))
    assert torch.allclose(out["scores"], torch.tensor([0.6]))


def test_sizes_overridden_per_run_and_restored() -> None:
    stub = StubDetector(lambda im, run: _result([], [], []))
    tta = TestTimeAugmentation(stub, scales=[32, 48, 96], max_size=120, flip=True).eval()
    out = tta([torch.zeros(3, 20, 20)])
    assert stub.seen == [(32, 120), (32, 120), (48, 120), (48, 120), (96, 120), (96, 120)]
    assert (stub.preprocess.test_min_size, stub.preprocess.max_size) == (64, 100)
    assert out[0]["boxes"].shape == (0, 4) and out[0]["labels"].dtype == torch.int64

    failing = StubDetector(lambda im, run: _result([], [], []), fail_on_run=2)
    with pytest.raises(RuntimeError, match="simulated"):
        TestTimeAugmentation(failing, scales=[32, 48], max_size=None).eval()([torch.zeros(3, 9, 9)])
    assert failing.seen[-1] == (48, None)
    assert (failing.preprocess.test_min_size, failing.preprocess.max_size) == (64, 100)


def test_merge_is_class_aware_and_keeps_at_most_max_per_img() -> None:
    def many(image: Tensor, run: int) -> dict[str, Tensor]:
        # 80 disjoint boxes per run, on a row of their own (mirroring keeps rows apart)
        gen = torch.Generator().manual_seed(run)
        x = torch.arange(80.0) * 10
        y = torch.full((80,), 10.0 * run)
        boxes = torch.stack([x, y, x + 5, y + 5], dim=1)
        return _result(boxes, torch.rand(80, generator=gen), torch.arange(80) % 3)

    stub = StubDetector(many)
    tta = TestTimeAugmentation(stub, scales=[32, 64], flip=True, max_per_img=100).eval()
    out = tta([torch.zeros(3, 50, 800)])[0]
    all_scores = torch.cat([many(None, r)["scores"] for r in range(4)])
    assert len(out["scores"]) == 100
    assert torch.equal(out["scores"], all_scores.sort(descending=True).values[:100])

    same_place = StubDetector(lambda im, run: _result([[0, 0, 10, 10]] * 3, [0.9, 0.8, 0.7],
                                                      [0, 1, 0]))  # fmt: skip
    out = TestTimeAugmentation(same_place, scales=[32], flip=False).eval()([torch.zeros(3, 9, 9)])
    assert out[0]["labels"].tolist() == [0, 1] and out[0]["scores"].tolist() == pytest.approx(
        [0.9, 0.8]
    )


TINY = [
    "model.preprocess.min_size=64", "model.preprocess.max_size=96",
    "model.neck.out_channels=32", "model.head.in_channels=32",
    "model.head.feat_channels=32", "model.head.num_convs=1", "+model.head.prior_prob=0.2",
]  # fmt: skip


@pytest.fixture(scope="module")
def tiny_detector() -> nn.Module:
    torch.manual_seed(0)
    return build_model(load_config("quickstart_fcos", TINY)).eval()


def _images() -> list[Tensor]:
    return [torch.from_numpy(render_scene(s, h, w).image).permute(2, 0, 1).float()
            for s, h, w in [(1, 60, 90), (2, 75, 50)]]  # fmt: skip


@torch.no_grad()
def test_real_detector_single_run_is_the_detector_itself(tiny_detector: nn.Module) -> None:
    images = _images()
    plain = tiny_detector(images)
    tta = TestTimeAugmentation(tiny_detector, scales=[64], max_size=96, flip=False,
                               nms_thresh=1.0, max_per_img=1000).eval()  # fmt: skip
    for p, t in zip(plain, tta(images), strict=True):
        assert len(p["scores"]) > 0
        order = p["scores"].argsort(descending=True, stable=True)
        torch.testing.assert_close(t["scores"], p["scores"][order])
        torch.testing.assert_close(t["boxes"], p["boxes"][order])
        assert torch.equal(t["labels"], p["labels"][order])


@torch.no_grad()
def test_real_detector_multiscale_flip(tiny_detector: nn.Module) -> None:
    images = _images()
    pre = tiny_detector.preprocess
    before = (pre.test_min_size, pre.max_size, list(pre.min_sizes))
    flipped = tiny_detector([im.flip(-1) for im in images])
    keep_all = TestTimeAugmentation(tiny_detector, scales=[64], max_size=96, flip=True,
                                    nms_thresh=1.0, max_per_img=1000).eval()  # fmt: skip
    for im, f, t in zip(images, flipped, keep_all(images), strict=True):
        w = im.shape[-1]
        mirrored = torch.stack([w - f["boxes"][:, 2], f["boxes"][:, 1], w - f["boxes"][:, 0],
                                f["boxes"][:, 3]], dim=1)  # fmt: skip
        # every mirrored detection of the flipped image is in the merged output
        match = (t["boxes"][None] - mirrored[:, None]).abs().amax(-1) < 1e-4
        same = match & (t["scores"][None] == f["scores"][:, None])
        assert same.any(1).all()

    tta = TestTimeAugmentation(tiny_detector, scales=[48, 64, 80], max_size=96, flip=True,
                               max_per_img=20).eval()  # fmt: skip
    for im, r in zip(images, tta(images), strict=True):
        h, w = im.shape[-2:]
        b = r["boxes"]
        assert 0 < len(b) <= 20
        assert (b[:, 0] >= 0).all() and (b[:, 1] >= 0).all()
        assert (b[:, 2] <= w).all() and (b[:, 3] <= h).all()
        assert (b[:, 2] >= b[:, 0]).all() and (b[:, 3] >= b[:, 1]).all()
        assert (r["scores"][:-1] >= r["scores"][1:]).all()
    assert (pre.test_min_size, pre.max_size, list(pre.min_sizes)) == before


def test_apply_tta_from_config() -> None:
    stub = StubDetector(lambda im, run: _result([], [], []))
    assert apply_tta(stub, {"model": {}}) is stub
    assert apply_tta(stub, {"test": {"tta": None}}) is stub
    assert apply_tta(stub, None) is stub
    wrapped = apply_tta(stub, {"test": {"tta": {"scales": [600, 800], "max_size": 1333,
                                                "flip": False}}})  # fmt: skip
    assert isinstance(wrapped, TestTimeAugmentation) and wrapped.detector is stub
    assert (wrapped.scales, wrapped.max_size, wrapped.flip) == ([600, 800], 1333, False)
    assert wrapped.num_classes == 3 and wrapped.training  # follows the wrapped model's mode
    assert not apply_tta(stub.eval(), {"test": {"tta": {"scales": [64]}}}).training
    default = apply_tta(stub, {"test": {"tta": True}})
    assert default.scales == list(DEFAULT_SCALES) == [800, 1000, 1200, 1400, 1600]
    settings = (default.max_size, default.flip, default.nms_thresh, default.max_per_img)
    assert settings == (2000, True, 0.5, 100)
    with pytest.raises(ValueError, match="did you mean 'scales'"):
        apply_tta(stub, {"test": {"tta": {"scale": [800]}}})
    with pytest.raises(TypeError, match="preprocess"):
        TestTimeAugmentation(nn.Linear(2, 2))


def test_training_mode_passes_through() -> None:
    calls = []

    class Trainable(StubDetector):
        def forward(self, images, targets=None):  # type: ignore[override]
            calls.append(targets)
            return {"loss": torch.tensor(1.0)}

    tta = TestTimeAugmentation(Trainable(lambda im, run: None)).train()
    assert tta([torch.zeros(3, 8, 8)], [{"boxes": torch.zeros(0, 4)}]) == {"loss": 1.0}
    assert len(calls) == 1


TINY_TWO_STAGE = [
    "model.backbone.depth=18", "+model.backbone.base_width=8", "model.backbone.frozen_stages=-1",
    "model.neck.in_channels=[8,16,32,64]", "model.neck.out_channels=16",
    "model.rpn.in_channels=16", "model.rpn.feat_channels=16",
    "model.rpn.test_proposals.nms_pre=200", "model.rpn.test_proposals.max_per_img=100",
    "model.roi_head.in_channels=16", "model.roi_head.fc_channels=32",
    "model.roi_head.num_classes=5",
    "model.preprocess.min_size=64", "model.preprocess.max_size=96",
]  # fmt: skip


@torch.no_grad()
def test_two_stage_preset() -> None:
    torch.manual_seed(0)
    model = build_model(load_config("dynamic_rcnn_r50_fpn_1x", TINY_TWO_STAGE)).eval()
    tta = apply_tta(model, {"test": {"tta": {"scales": [48, 80], "max_size": 120,
                                             "max_per_img": 30}}})  # fmt: skip
    images = _images()
    for im, r in zip(images, tta(images), strict=True):
        h, w = im.shape[-2:]
        b = r["boxes"]
        assert 0 < len(b) <= 30 and set(r["labels"].tolist()) <= set(range(5))
        assert (b[:, :2] >= 0).all() and (b[:, 2] <= w).all() and (b[:, 3] <= h).all()
    assert (model.preprocess.test_min_size, model.preprocess.max_size) == (64, 96)
