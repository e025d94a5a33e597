"""R-CNN head: RoI sampling, losses, class-specific decoding, inference and the Dynamic R-CNN
hooks, against hand-worked cases and slow float64 references."""

import math

import pytest
import torch

from dynadet.models.dynamic_stats import DynamicTrainingStats
from dynadet.models.roi_head import RoIHead
from dynadet.ops.roi_align import MultiScaleRoIAlign
from tests.models.test_rpn import _ref_decode, _ref_encode, _ref_iou

STDS = (0.1, 0.1, 0.2, 0.2)


def _head(num_classes=3, **kwargs) -> RoIHead:
    extractor = MultiScaleRoIAlign(7, 0, True, (4, 8), level_mapping="mmdet", finest_scale=16)
    return RoIHead(num_classes, extractor, in_channels=4, fc_channels=16, **kwargs)


def _feats(n=2, size=64):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(n, 4, size // 4, size // 4, generator=g),
            torch.randn(n, 4, size // 8, size // 8, generator=g)]


def _target(boxes, labels):
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor(labels, dtype=torch.long)}


def _random_boxes(n, size, g, min_wh=4.0, max_wh=60.0):
    xy = torch.rand(n, 2, generator=g) * (size - max_wh)
    wh = min_wh + torch.rand(n, 2, generator=g) * (max_wh - min_wh)
    return torch.cat([xy, xy + wh], 1)


def _far_boxes(n, g):
    """Boxes in [400, 500]² that overlap no ground truth near the origin."""
    return _random_boxes(n, 100, g, 4.0, 30.0) + 400


# ----------------------------------------------------------------------------- sampling


def test_sampling_512_at_25_percent_with_gt_added():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    head = _head()
    gt = _target([[10, 10, 50, 50], [60, 20, 120, 90], [5, 70, 40, 120]], [0, 2, 1])
    jitter = gt["boxes"].repeat(100, 1) + torch.randn(300, 4, generator=g)  # IoU > 0.5
    props = torch.cat([jitter, _far_boxes(1000, g)])
    s = head.sample([props], [gt])
    assert s["rois"].shape == (512, 5) and s["pos"].sum() == 128
    assert (s["labels"][~s["pos"]] == 3).all() and (s["labels"][s["pos"]] < 3).all()
    # with only far proposals, the positives are exactly the three GT boxes
    s = head.sample([_far_boxes(1000, g)], [gt])
    assert s["pos"].sum() == 3 and s["rois"].shape[0] == 512
    pos_boxes = s["rois"][s["pos"], 1:]
    order = torch.argsort(s["labels"][s["pos"]])
    torch.testing.assert_close(pos_boxes[order], gt["boxes"][[0, 2, 1]])
    assert s["max_ious"][0].shape == (1003,) and (s["max_ious"][0][:3] == 1).all()


def test_sampling_without_gt_gives_only_negatives():
    g = torch.Generator().manual_seed(2)
    head = _head()
    empty = _target([], [])
    s = head.sample([_random_boxes(1000, 200, g), _random_boxes(100, 200, g)], [empty, empty])
    assert s["rois"].shape[0] == 512 + 100 and not s["pos"].any()
    assert (s["labels"] == 3).all()
    assert s["rois"][:, 0].long().bincount().tolist() == [512, 100]
    assert (s["max_ious"][0] == 0).all()


def test_more_gt_than_positive_slots():
    g = torch.Generator().manual_seed(3)
    head = _head()
    corners = torch.stack(torch.meshgrid(torch.arange(15), torch.arange(14), indexing="ij"), -1)
    xy = corners.reshape(-1, 2).float() * 20
    gt = {"boxes": torch.cat([xy, xy + 16], 1), "labels": torch.arange(210) % 3}
    s = head.sample([_far_boxes(1000, g)], [gt])
    assert s["pos"].sum() == 128 and (~s["pos"]).sum() == 384
    # and a whole training step works with it
    losses = head.loss(_feats(1, 320), [_far_boxes(1000, g)], [gt])
    assert all(torch.isfinite(v) for v in losses.values())


def test_gt_as_proposal_matches_its_own_box():
    head = _head()
    # duplicate boxes with different labels and a degenerate box: each keeps its own label
    gt = _target([[0, 0, 20, 20], [0, 0, 20, 20], [30, 30, 30, 40]], [0, 1, 2])
    s = head.sample([torch.zeros(0, 4)], [gt])
    assert s["pos"].tolist() == [True] * 3
    assert sorted(s["labels"].tolist()) == [0, 1, 2]
    for box, label in zip(s["rois"][:, 1:], s["labels"], strict=True):
        torch.testing.assert_close(box, gt["boxes"][label])


# ----------------------------------------------------------------------------- losses


@pytest.mark.parametrize("box_loss", ["l1", "smooth_l1"])
def test_loss_matches_float64_reference(box_loss):
    torch.manual_seed(4)
    g = torch.Generator().manual_seed(4)
    # every candidate is sampled: no randomness left
    head = _head(num_samples=10_000, pos_fraction=0.5, box_loss=box_loss, smooth_l1_beta=0.3)
    feats = _feats()
    targets = [_target([[10, 10, 40, 44], [30, 5, 60, 30]], [2, 0]), _target([], [])]
    props = [torch.cat([targets[0]["boxes"].repeat(20, 1) + torch.randn(40, 4, generator=g) * 3,
                        _random_boxes(30, 64, g)]),
             _random_boxes(20, 64, g)]
    got = head.loss(feats, props, targets)

    cls_sum = box_sum = 0.0
    count = 0
    for i, (p, t) in enumerate(zip(props, targets, strict=True)):
        gts, labels = t["boxes"].tolist(), t["labels"].tolist()
        cands = gts + p.tolist()
        rois = torch.tensor([[float(i)] + c for c in cands])
        with torch.no_grad():
            logits, deltas = head(feats, rois)
        for k, c in enumerate(cands):
            ious = [_ref_iou(c, gb) for gb in gts]
            best = max(ious) if ious else 0.0
            j = k if k < len(gts) else (ious.index(best) if best >= 0.5 else -1)
            label = labels[j] if j >= 0 else 3
            row = logits[k].double()
            cls_sum += float(torch.logsumexp(row, 0) - row[label])
            count += 1
            if j >= 0:
                pred = deltas[k, 4 * label: 4 * label + 4].double().tolist()
                for a, b in zip(pred, _ref_encode(c, gts[j], STDS), strict=True):
                    d = abs(a - b)
                    if box_loss == "l1":
                        box_sum += d
                    else:
                        box_sum += 0.5 * d * d / 0.3 if d < 0.3 else d - 0.15
    assert got["loss_cls"].item() == pytest.approx(cls_sum / count, rel=1e-5)
    assert got["loss_box"].item() == pytest.approx(box_sum / count, rel=1e-4)
    assert set(got) == {"loss_cls", "loss_box"}


def test_empty_image_has_zero_box_loss_and_finite_gradients():
    head = _head()
    feats = [f.requires_grad_() for f in _feats(1)]
    losses = head.loss(feats, [torch.zeros(0, 4)], [_target([], [])])
    assert losses["loss_box"].item() == 0 and losses["loss_cls"].item() == 0  # no RoI at all
    g = torch.Generator().manual_seed(5)
    losses = head.loss(feats, [_random_boxes(50, 64, g)], [_target([], [])])
    assert losses["loss_box"].item() == 0 and losses["loss_cls"].item() > 0
    sum(losses.values()).backward()
    assert all(torch.isfinite(f.grad).all() for f in feats)


# ----------------------------------------------------------------------------- inference


def test_class_specific_decoding():
    head = _head(num_classes=3)
    torch.nn.init.zeros_(head.bbox_pred.weight)
    per_class = torch.tensor([[0.0, 0, 0, 0], [1.0, 0, 0, 0], [0, -1.0, math.log(2) / 0.2, 0]])
    head.bbox_pred.bias.data = per_class.reshape(-1)
    rois = torch.tensor([[0.0, 10, 10, 30, 50]])  # w 20, h 40
    _, deltas = head(_feats(1), rois)
    boxes = head.decode(deltas, rois, torch.tensor([[100.0, 100, 100, 100]]))
    expected = torch.tensor([[[10.0, 10, 30, 50],   # class 0: identity
                              [12.0, 10, 32, 50],   # class 1: dx = 0.1 * 20 = 2
                              [0.0, 6, 40, 46]]])   # class 2: dy = -4, w doubled
    torch.testing.assert_close(boxes, expected)
    clipped = head.decode(deltas, rois, torch.tensor([[35.0, 48, 35, 48]]))
    torch.testing.assert_close(clipped[0, 2], torch.tensor([0.0, 6, 35, 46]))


def test_predict_matches_float64_reference():
    torch.manual_seed(6)
    g = torch.Generator().manual_seed(6)
    head = _head(num_classes=3, score_thresh=0.2, nms_thresh=0.4, max_per_img=8).eval()
    with torch.no_grad():  # confident, varied class scores and sizeable deltas
        head.cls_score.weight.mul_(300)
        head.bbox_pred.weight.mul_(300)
    feats = _feats()
    props = [_random_boxes(80, 64, g), _random_boxes(25, 64, g)]
    sizes = [(64, 64), (50, 40)]
    got = head.predict(feats, props, sizes)

    for i, (p, (h, w)) in enumerate(zip(props, sizes, strict=True)):
        rois = torch.cat([torch.full((p.shape[0], 1), float(i)), p], 1)
        with torch.no_grad():
            logits, deltas = head(feats, rois)
        probs = torch.softmax(logits.double(), -1)
        cands = []
        for k, box in enumerate(p.tolist()):
            for c in range(3):
                score = float(probs[k, c])
                if score > 0.2:
                    d = deltas[k, 4 * c: 4 * c + 4].double().tolist()
                    cands.append((score, _ref_decode(box, d, (w, h), STDS), c))
        cands.sort(key=lambda x: -x[0])
        kept = []
        for c in cands:
            if all(k[2] != c[2] or _ref_iou(k[1], c[1]) <= 0.4 for k in kept):
                kept.append(c)
        kept = kept[:8]
        r = got[i]
        assert len(kept) > 3 and r["boxes"].shape == (len(kept), 4)
        ref_scores = torch.tensor([k[0] for k in kept], dtype=torch.float64)
        ref_boxes = torch.tensor([k[1] for k in kept], dtype=torch.float64)
        torch.testing.assert_close(r["scores"].double(), ref_scores, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(r["boxes"].double(), ref_boxes, rtol=1e-5, atol=1e-3)
        assert r["labels"].tolist() == [k[2] for k in kept]
    assert len(got[0]["scores"]) == 8  # the per-image cut is exercised


def test_predict_without_proposals():
    head = _head().eval()
    out = head.predict(_feats(), [torch.zeros(0, 4), torch.zeros(0, 4)], [(64, 64)] * 2)
    assert [r["boxes"].shape for r in out] == [(0, 4), (0, 4)]
    assert out[0]["labels"].dtype == torch.long


# ----------------------------------------------------------------------------- Dynamic R-CNN


def test_dynamic_threshold_and_beta_drive_training():
    torch.manual_seed(7)
    dynamic = DynamicTrainingStats(interval=2)
    head = _head(box_loss="smooth_l1", num_samples=10_000, pos_fraction=0.5, dynamic=dynamic)
    gt = _target([[0, 0, 20, 20]], [1])
    # IoUs with the GT: 0.8 and 0.45 (the second is positive only while the threshold is 0.4)
    props = [torch.tensor([[0.0, 0, 20, 16], [0, 0, 20, 9]])]
    feats = _feats(1)
    dynamic.iou_thresh.fill_(0.4)
    assert head.sample(props, [gt], dynamic.iou_thresh)["pos"].sum() == 3
    assert head.sample(props, [gt], torch.tensor(0.5))["pos"].sum() == 2

    head.train()
    dynamic.beta.fill_(0.05)
    losses = head.loss(feats, props, [gt])
    assert losses["iou_thresh"].item() == pytest.approx(0.4)
    assert losses["beta"].item() == pytest.approx(0.05)
    assert int(dynamic.num_updates) == 1
    reference = _head(box_loss="smooth_l1", smooth_l1_beta=0.05, pos_iou=0.4, neg_iou=0.4,
                      num_samples=10_000, pos_fraction=0.5)
    reference.load_state_dict(head.state_dict(), strict=False)
    expected = reference.loss(feats, props, [gt])
    torch.testing.assert_close(losses["loss_box"], expected["loss_box"])
    torch.testing.assert_close(losses["loss_cls"], expected["loss_cls"])

    head.loss(feats, props, [gt])  # second call: the interval is over, the values change
    assert int(dynamic.num_updates) == 2
    # mean of the per-image 75th-largest IoU (here the smallest of 3: 0.45) over the window
    assert dynamic.iou_thresh.item() == pytest.approx(0.45, abs=1e-6)
    # beta statistic: the 3rd smallest mean(|tx|, |ty|) of (GT 0, 0.625, 3.06) = 3.06, capped at 1
    assert dynamic.beta.item() == 1.0

    state = {k: v.clone() for k, v in dynamic.state_dict().items()}
    head.eval()
    head.predict(feats, props, [(64, 64)])
    for k, v in dynamic.state_dict().items():
        assert torch.equal(v, state[k]), k
