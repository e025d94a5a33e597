"""RetinaNet with Dynamic R-CNN training: the dynamic threshold and β drive assignment and loss,
update() gets the right statistics (float64 references), state round-trips, the preset trains,
eval is untouched, and with ``dynamic=None`` the losses are those of plain RetinaNet."""

import math

import pytest
import torch

from dynadet.api import build_model
from dynadet.config import load_config
from dynadet.data.synthetic import render_scene
from dynadet.models.dynamic_stats import DynamicTrainingStats
from dynadet.models.priors import AnchorGenerator
from dynadet.models.retinanet import RetinaNetHead
from tests.models.test_rpn import _ref_encode, _ref_iou

LN2_16 = math.log(2) / 16  # focal loss of a zero logit: positive 1·this, negative 3·this


def _head(num_classes=3, dynamic=None, **kwargs) -> RetinaNetHead:
    gen = AnchorGenerator([8, 16], ratios=[0.5, 1.0, 2.0], octave_base_scale=4,
                          scales_per_octave=3)  # fmt: skip
    return RetinaNetHead(num_classes, gen, in_channels=8, feat_channels=8, num_convs=1,
                         dynamic=dynamic, **kwargs)  # fmt: skip


def _stats(**kwargs) -> DynamicTrainingStats:
    kwargs.setdefault("first_iou", 0.5)
    kwargs.setdefault("initial_beta", 0.11)
    return DynamicTrainingStats(**kwargs)


def _boxes(rows):
    return torch.tensor(rows, dtype=torch.float32).reshape(-1, 4)


def _case(head):
    """Random head outputs on a 64×64 batch of three images (3 boxes, 1 box, none)."""
    g = torch.Generator().manual_seed(0)
    a, c = head.num_anchors, head.num_classes
    sizes = [(8, 8), (4, 4)]
    outputs = {"cls": [torch.randn(3, a * c, h, w, generator=g) for h, w in sizes],
               "reg": [0.2 * torch.randn(3, a * 4, h, w, generator=g) for h, w in sizes]}
    priors = head.anchor_generator(sizes, (64, 64), torch.float32, torch.device("cpu"))
    targets = [
        {"boxes": _boxes([[4, 6, 30, 40], [20, 10, 60, 30], [35, 35, 62, 63]]),
         "labels": torch.tensor([0, 2, 1])},
        {"boxes": _boxes([[10, 12, 50, 44]]), "labels": torch.tensor([1])},
        {"boxes": _boxes([]), "labels": torch.zeros(0, dtype=torch.long)},
    ]  # fmt: skip
    return outputs, priors, targets


# Six anchors against one box [0, 0, 10, 10]: IoU 1, 0.7, 0.55, 0.45, 0.35, 0.2.
HEIGHTS = [10.0, 7.0, 5.5, 4.5, 3.5, 2.0]


def _ladder(head):
    """Zero predictions (one class) on the six anchors above."""
    anchors = _boxes([[0, 0, 10, h] for h in HEIGHTS])
    outputs = {"cls": [torch.zeros(1, 1, 1, 6)], "reg": [torch.zeros(1, 4, 1, 6)]}
    return outputs, [anchors], [{"boxes": _boxes([[0, 0, 10, 10]]), "labels": torch.tensor([0])}]


# ----------------------------------------------------------------------------- default off


# Losses of RetinaNetHead before the dynamic option existed (same code path, recorded with it).
BEFORE = {
    ("l1", "batch"): (36.38319396972656, 0.9749009013175964),
    ("l1", "image"): (196.96917724609375, 0.6424333453178406),
    ("smooth_l1", "batch"): (36.38319396972656, 0.7778030037879944),
    ("smooth_l1", "image"): (196.96917724609375, 0.5111210346221924),
    ("giou", "batch"): (36.38319396972656, 0.687284529209137),
    ("giou", "image"): (196.96917724609375, 0.45669642090797424),
}


@pytest.mark.parametrize("box_loss,normalizer", list(BEFORE))
def test_without_dynamic_losses_are_unchanged(box_loss, normalizer):
    head = _head(box_loss=box_loss, loss_normalizer=normalizer, smooth_l1_beta=0.11)
    out = head.loss(*_case(head))
    assert set(out) == {"loss_cls", "loss_box"}
    got = (out["loss_cls"].item(), out["loss_box"].item())
    assert got == pytest.approx(BEFORE[box_loss, normalizer], rel=1e-6, abs=0)
    assert not any("dynamic" in k for k in head.state_dict())


@pytest.mark.parametrize("normalizer", ["batch", "image"])
def test_dynamic_at_the_static_values_reproduces_plain_retinanet(normalizer):
    plain = _head(box_loss="smooth_l1", smooth_l1_beta=0.11, loss_normalizer=normalizer)
    dyn = _head(box_loss="smooth_l1", loss_normalizer=normalizer, dynamic=_stats())
    dyn.load_state_dict(plain.state_dict(), strict=False)
    want, got = plain.loss(*_case(plain)), dyn.loss(*_case(dyn))
    for k in ("loss_cls", "loss_box"):
        torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=0)
    assert got["iou_thresh"].item() == pytest.approx(0.5)
    assert got["beta"].item() == pytest.approx(0.11)
    assert not got["iou_thresh"].requires_grad and not got["beta"].requires_grad


# ----------------------------------------------------------------------------- threshold, β


@pytest.mark.parametrize(
    "thresh,gap,num_pos,num_neg",
    [
        (None, None, 3, 2),  # plain 0.5 / 0.4: pos {1, .7, .55}, ignore {.45}, neg {.35, .2}
        (0.6, None, 2, 3),  # 0.6 / 0.5: .55 is now ignored and .45 negative
        (0.6, 0.0, 2, 4),  # single threshold (Dynamic R-CNN): no ignore band
        (0.4, None, 4, 1),  # 0.4 / 0.3: .45 positive, .35 ignored
    ],
)
def test_dynamic_threshold_moves_the_positives(thresh, gap, num_pos, num_neg):
    stats = None if thresh is None else _stats(interval=1000)
    head = _head(1, stats, box_loss="smooth_l1", dynamic_neg_gap=gap)
    if stats is not None:
        stats.iou_thresh.fill_(thresh)
    out = head.loss(*_ladder(head))
    want = (num_pos + 3 * num_neg) * LN2_16 / num_pos
    assert out["loss_cls"].item() == pytest.approx(want, rel=1e-6)
    if stats is not None:
        assert out["iou_thresh"].item() == pytest.approx(thresh)


@pytest.mark.parametrize("beta", [0.05, 1.0])
def test_dynamic_beta_is_the_smooth_l1_beta(beta):
    stats = _stats(interval=1000)
    head = _head(1, stats, box_loss="smooth_l1", smooth_l1_beta=0.11)
    stats.beta.fill_(beta)
    out = head.loss(*_ladder(head))
    # the three positives (IoU >= 0.5) regress from 0 to their float64 targets
    gt = [0.0, 0.0, 10.0, 10.0]
    terms = [abs(t) for h in HEIGHTS[:3] for t in _ref_encode([0.0, 0.0, 10.0, h], gt)]
    want = sum(0.5 * d * d / beta if d < beta else d - 0.5 * beta for d in terms) / 3
    assert out["loss_box"].item() == pytest.approx(want, rel=1e-5)
    assert out["beta"].item() == pytest.approx(beta)
    # the same as the float-β SmoothL1 of a plain head
    plain = _head(1, box_loss="smooth_l1", smooth_l1_beta=beta)
    torch.testing.assert_close(out["loss_box"], plain.loss(*_ladder(plain))["loss_box"])


def test_dynamic_needs_smooth_l1_and_a_nonnegative_gap():
    for box_loss in ("l1", "giou"):
        with pytest.raises(ValueError, match="box_loss='smooth_l1'"):
            _head(dynamic=_stats(), box_loss=box_loss)
    with pytest.raises(ValueError, match="dynamic_neg_gap"):
        _head(dynamic=_stats(), box_loss="smooth_l1", dynamic_neg_gap=-0.1)
    assert _head(pos_iou=0.6, neg_iou=0.45).dynamic_neg_gap == pytest.approx(0.15)


def test_dynamic_training_step_reads_nothing_back_to_the_host(monkeypatch):
    head = _head(dynamic=_stats(interval=1), box_loss="smooth_l1")
    inputs = _case(head)

    def refuse(self, *args, **kwargs):
        raise AssertionError("host read of a tensor value in the training forward")

    for name in ("__bool__", "__float__", "__int__", "item", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, refuse)
    for _ in range(2):  # interval 1: the statistics change in every call
        out = head.loss(*inputs)
    monkeypatch.undo()
    assert int(head.dynamic_stats.num_updates) == 2 and set(out) >= {"iou_thresh", "beta"}


# ----------------------------------------------------------------------------- statistics


class _Spy(DynamicTrainingStats):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.calls = []

    def update(self, max_ious, pos_targets):
        self.calls.append(([m.clone() for m in max_ious], pos_targets.clone()))
        super().update(max_ious, pos_targets)


def _ref_statistics(priors, targets, pos_thr=0.5):
    """Float64 loops: every anchor's best IoU and the positives' targets (max-IoU with the
    MMDetection low-quality rule), in anchor order image by image."""
    anchors = torch.cat(priors).double().tolist()
    max_ious, pos_targets = [], []
    for t in targets:
        gts = t["boxes"].double().tolist()
        ious = [[_ref_iou(a, g) for g in gts] for a in anchors]
        best = [max(row, default=0.0) for row in ious]
        matched = [row.index(m) if m >= pos_thr else -1 for row, m in zip(ious, best, strict=True)]
        for j in range(len(gts)):  # later boxes win, as in MMDetection
            top = max(row[j] for row in ious)
            matched = [j if row[j] == top else m for row, m in zip(ious, matched, strict=True)]
        max_ious.append(torch.tensor(best, dtype=torch.float64))
        pos_targets += [_ref_encode(a, gts[m]) for a, m in zip(anchors, matched, strict=True)
                        if m >= 0]  # fmt: skip
    return max_ious, torch.tensor(pos_targets, dtype=torch.float64).reshape(-1, 4)


def test_update_gets_every_anchors_best_iou_and_the_positive_targets():
    spy = _Spy(iou_topk=20, beta_topk=2, interval=1, initial_iou=0.1, first_iou=0.5,
               initial_beta=0.11)  # fmt: skip
    head = _head(dynamic=spy, box_loss="smooth_l1")
    outputs, priors, targets = _case(head)
    # a box equal to an anchor (stride 8, size 32, centre (24, 24)): a best IoU of exactly 1
    targets[1] = {"boxes": _boxes([[10, 12, 50, 44], [8, 8, 40, 40]]),
                  "labels": torch.tensor([1, 0])}  # fmt: skip
    head.loss(outputs, priors, targets)
    (max_ious, pos_targets), = spy.calls
    ref_ious, ref_targets = _ref_statistics(priors, targets)
    assert len(max_ious) == 3 and all(m.shape == (720,) for m in max_ious)
    for got, want in zip(max_ious, ref_ious, strict=True):
        torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-6)
    assert max_ious[1].max() == 1 and (max_ious[2] == 0).all()  # image 2 has no boxes
    torch.testing.assert_close(pos_targets.double(), ref_targets, rtol=0, atol=1e-5)
    # interval 1: the new values are this step's statistics (mmdet mode)
    kth = [m.topk(20).values[-1].item() for m in ref_ious]
    errors = ref_targets[:, :2].abs().mean(1)
    beta = errors.kthvalue(min(2 * 3, errors.numel())).values.item()
    assert spy.iou_thresh.item() == pytest.approx(max(0.1, sum(kth) / 3), abs=1e-6)
    assert spy.beta.item() == pytest.approx(min(0.11, beta), abs=1e-6)
    assert 0 < spy.beta.item() < 0.11 and spy.iou_thresh.item() != 0.5


def test_state_round_trips_and_training_continues_identically():
    a = _head(dynamic=_stats(interval=2, iou_topk=20, initial_iou=0.1), box_loss="smooth_l1")
    for _ in range(3):
        a.loss(*_case(a))
    stats = a.dynamic_stats
    assert int(stats.num_updates) == 3 and int(stats.iou_count) == 1
    assert stats.iou_thresh.item() != 0.5 and stats.beta.item() != 0.11
    state = a.state_dict()
    assert {f"dynamic_stats.{k}" for k in ("iou_thresh", "beta", "iou_history")} <= set(state)
    b = _head(dynamic=_stats(interval=2, iou_topk=20, initial_iou=0.1), box_loss="smooth_l1")
    b.load_state_dict(state, strict=True)
    out_a, out_b = a.loss(*_case(a)), b.loss(*_case(b))
    for k in out_a:
        assert torch.equal(out_a[k], out_b[k]), k
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k


def test_eval_mode_never_touches_the_statistics():
    stats = _stats(interval=1)
    head = _head(dynamic=stats, box_loss="smooth_l1", smooth_l1_beta=0.11).eval()
    stats.iou_thresh.fill_(0.7)
    stats.beta.fill_(0.01)
    before = {k: v.clone() for k, v in stats.state_dict().items()}
    plain = _head(box_loss="smooth_l1", smooth_l1_beta=0.11).eval()
    plain.load_state_dict(head.state_dict(), strict=False)
    out, want = head.loss(*_case(head)), plain.loss(*_case(plain))  # a validation loss
    assert set(out) == {"loss_cls", "loss_box"}
    for k in out:
        assert torch.equal(out[k], want[k]), k
    outputs, priors, _ = _case(head)
    got = head.predict(outputs, priors, [(64, 64)] * 3)
    ref = plain.predict(outputs, priors, [(64, 64)] * 3)
    for g, r in zip(got, ref, strict=True):
        assert all(torch.equal(g[k], r[k]) for k in ("boxes", "scores", "labels"))
    assert all(torch.equal(v, before[k]) for k, v in stats.state_dict().items())


# ----------------------------------------------------------------------------- preset

TINY = [
    "model.backbone.depth=18", "+model.backbone.base_width=8",
    "model.neck.in_channels=[16,32,64]", "model.neck.out_channels=16",
    "+model.head.in_channels=16", "+model.head.feat_channels=16", "model.head.num_classes=5",
    "model.preprocess.min_size=128", "model.preprocess.max_size=192",
]  # fmt: skip


def test_preset_builds_trains_one_step_logging_the_statistics_and_evals_as_retinanet():
    torch.manual_seed(0)
    model = build_model(load_config("retinanet_r50_fpn_1x_dynamic", TINY))
    head = model.head
    stats = head.dynamic_stats
    assert isinstance(stats, DynamicTrainingStats) and head.box_loss == "smooth_l1"
    assert (stats.iou_topk, stats.beta_topk, stats.interval) == (75, 10, 100)
    assert head.dynamic_neg_gap == pytest.approx(0.1) and stats.initial_iou == 0.5
    images, targets = [], []
    for seed in (1, 2):
        scene = render_scene(seed, 120, 160, size_range=(20, 60))
        images.append(torch.from_numpy(scene.image).permute(2, 0, 1).float())
        targets.append({"boxes": torch.from_numpy(scene.boxes),
                        "labels": torch.from_numpy(scene.labels)})  # fmt: skip
    model.train()
    losses = model(images, targets)
    assert losses["iou_thresh"].item() == 0.5
    assert losses["beta"].item() == pytest.approx(0.11)
    assert int(stats.num_updates) == 1 and int(stats.beta_count) == 1
    total = sum(v for k, v in losses.items() if k.startswith("loss"))
    total.backward()
    assert torch.isfinite(total)

    plain = build_model(load_config("retinanet_r50_fpn_1x", TINY))
    plain.load_state_dict(model.state_dict(), strict=False)
    model.eval()
    plain.eval()
    before = {k: v.clone() for k, v in stats.state_dict().items()}
    with torch.no_grad():
        got, want = model(images), plain(images)
    for g, w in zip(got, want, strict=True):
        assert all(torch.equal(g[k], w[k]) for k in ("boxes", "scores", "labels"))
    assert all(torch.equal(v, before[k]) for k, v in stats.state_dict().items())
