"""End-to-end checks of the one-stage presets: build, train a few steps, batched inference."""

import pytest
import torch

from dynadet.api import Detector, build_model
from dynadet.config import load_config
from dynadet.data.synthetic import render_scene

PRESETS = ["fcos_r50_fpn_1x", "atss_r50_fpn_1x", "retinanet_r50_fpn_1x"]
SMALL = [
    "model.preprocess.min_size=128",
    "model.preprocess.max_size=192",
    "model.head.num_classes=5",
]


def _scenes(seeds, h=120, w=160):
    images, targets = [], []
    for s in seeds:
        sc = render_scene(s, h, w, size_range=(20, 60))
        images.append(torch.from_numpy(sc.image).permute(2, 0, 1).float())
        targets.append({"boxes": torch.from_numpy(sc.boxes), "labels": torch.from_numpy(sc.labels)})
    return images, targets


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_trains_and_loss_goes_down(preset):
    torch.manual_seed(0)
    # a randomly initialised backbone is frozen so the test isolates the neck and head
    model = build_model(load_config(preset, SMALL + ["model.backbone.frozen_stages=4"]))
    model.train()
    images, targets = _scenes([1, 2])
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.01)
    totals = []
    for _ in range(10):
        losses = model(images, targets)
        assert set(losses) >= {"loss_cls", "loss_box"}
        total = sum(losses.values())
        assert torch.isfinite(total)
        opt.zero_grad()
        total.backward()
        torch.nn.utils.clip_grad_norm_(params, 10.0)
        opt.step()
        totals.append(total.item())
    # one fixed batch: the loss falls (single steps can bounce, so compare windows)
    assert min(totals[-3:]) < 0.8 * totals[0], totals
    assert sum(totals[-5:]) < sum(totals[:5]), totals


@pytest.mark.parametrize("preset", PRESETS)
def test_image_without_boxes_trains_with_zero_box_loss(preset):
    torch.manual_seed(0)
    model = build_model(load_config(preset, SMALL)).train()
    images, _ = _scenes([3])
    empty = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}]
    losses = model(images, empty)
    assert losses["loss_box"].item() == 0.0
    assert losses["loss_cls"].item() > 0
    sum(losses.values()).backward()
    grads = [p.grad for p in model.head.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("preset", PRESETS)
def test_batched_and_unbatched_inference_agree(preset):
    torch.manual_seed(0)
    det = Detector.from_config(preset, SMALL + ["+model.head.prior_prob=0.2"])
    images, _ = _scenes([4, 5])
    batched = det.predict(images, batch_size=2)
    single = [det.predict(im) for im in images]
    for b, s in zip(batched, single, strict=True):
        assert len(b) > 0 and len(b) == len(s)
        torch.testing.assert_close(b.scores, s.scores, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(b.boxes, s.boxes, atol=1e-3, rtol=1e-4)
        assert torch.equal(b.labels, s.labels)
        # boxes are in original image coordinates
        assert b.boxes[:, 2].max() <= 160 + 1e-3 and b.boxes[:, 3].max() <= 120 + 1e-3


def test_results_are_in_original_coordinates_for_odd_sizes():
    det = Detector.from_config("retinanet_r50_fpn_1x", SMALL + ["+model.head.prior_prob=0.2"])
    images, _ = _scenes([6], h=97, w=143)
    (pred,) = det.predict(images)
    assert len(pred) > 0
    assert pred.boxes.min() >= 0
    assert pred.boxes[:, 2].max() <= 143 + 1e-3 and pred.boxes[:, 3].max() <= 97 + 1e-3
    assert pred.scores.max() <= 1 and pred.labels.max() < 5
    assert len(pred) <= 100
