"""RPN: sampling, anchor targets, losses and proposal generation against hand-worked cases and
slow float64 references."""

import math

import pytest
import torch

from dynadet.models.priors import AnchorGenerator
from dynadet.models.rpn import ProposalSettings, RPNHead, sample_pos_neg, top_per_image

LOG_CLIP = math.log(1000 / 16)


def _rpn(strides=(16,), base=2, ratios=(1.0,), **kwargs) -> RPNHead:
    gen = AnchorGenerator(strides, ratios=ratios, octave_base_scale=base)
    return RPNHead(gen, in_channels=4, feat_channels=4, **kwargs)


# ----------------------------------------------------------------------------- sampling


def test_sampler_caps_positives_and_fills_with_negatives():
    torch.manual_seed(0)
    matched = torch.full((3, 2000), -1)
    matched[0, :300] = 5  # many positives: capped at 128, negatives fill up to 256
    matched[1, :10] = 0  # few positives: all taken, 246 negatives
    matched[2, :] = -2  # all ignored but 100 negatives, no positive
    matched[2, 1000:1100] = -1
    matched[:, 1900:] = -2
    pos, neg = sample_pos_neg(matched, 256, 0.5)
    assert pos.sum(1).tolist() == [128, 10, 0]
    assert neg.sum(1).tolist() == [128, 246, 100]
    assert not (pos & neg).any()
    assert (matched[pos] >= 0).all() and (matched[neg] == -1).all()  # ignored never drawn
    assert pos[1, :10].all() and neg[2, 1000:1100].all()


def test_sampler_is_random_and_covers_all_candidates():
    matched = torch.full((1, 40), -1)
    matched[0, :20] = 1
    seen = torch.zeros(40)
    subsets = set()
    for seed in range(50):
        torch.manual_seed(seed)
        pos, neg = sample_pos_neg(matched, 8, 0.5)
        assert pos.sum() == 4 and neg.sum() == 4
        seen += (pos | neg)[0].float()
        subsets.add(tuple(pos[0].nonzero().flatten().tolist()))
    assert (seen > 0).all() and len(subsets) > 40


def test_top_per_image_keeps_score_order_and_cuts():
    keep = torch.tensor([7, 3, 9, 1, 4, 0, 2])  # descending score order
    images = torch.tensor([1, 0, 1, 1, 0, 1, 1])
    out = top_per_image(keep, images, 3, k=3)
    assert [o.tolist() for o in out] == [[3, 4], [7, 9, 1], []]


# ----------------------------------------------------------------------------- targets


def test_assignment_hand_worked():
    # 2x2 map, stride 16, one 32x32 anchor per location centred at (0|16, 0|16)
    rpn = _rpn(valid_region_divisor=None)
    anchors = torch.cat(rpn.anchor_generator([(2, 2)], (32, 32)))
    assert anchors.tolist() == [
        [-16, -16, 16, 16], [0, -16, 32, 16], [-16, 0, 16, 32], [0, 0, 32, 32]
    ]
    # IoUs with the GT equal to anchor 3: [1/7, 1/3, 1/3, 1] -> neg, ignored, ignored, pos
    gt = {"boxes": torch.tensor([[0.0, 0, 32, 32]]), "labels": torch.tensor([0])}
    matched, boxes = rpn.assign(anchors, [gt], None)
    assert matched.tolist() == [[-1, -2, -2, 0]]
    assert torch.equal(boxes[0, 3], gt["boxes"][0])
    # a box whose best IoU is 576 / 1472 = 0.391: positive only through the low-quality match
    gt2 = {"boxes": torch.tensor([[8.0, 8, 40, 40]]), "labels": torch.tensor([0])}
    assert rpn.assign(anchors, [gt2], None)[0].tolist() == [[-1, -1, -1, 0]]
    strict = _rpn(valid_region_divisor=None, low_quality="none")
    assert strict.assign(anchors, [gt2], None)[0].tolist() == [[-1, -1, -1, -2]]
    high_min = _rpn(valid_region_divisor=None, min_pos_iou=0.4)
    assert high_min.assign(anchors, [gt2], None)[0].tolist() == [[-1, -1, -1, -2]]
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}
    assert rpn.assign(anchors, [empty], None)[0].tolist() == [[-1, -1, -1, -1]]


def test_loss_hand_worked():
    rpn = _rpn(valid_region_divisor=None)
    feats = [torch.zeros(1, 4, 2, 2)]
    anchors = rpn.anchors(feats, (32, 32))
    gt = {"boxes": torch.tensor([[8.0, 8, 40, 40]]), "labels": torch.tensor([0])}
    objectness = [torch.zeros(1, 1, 2, 2)]
    deltas = [torch.zeros(1, 4, 2, 2)]
    losses = rpn.loss(objectness, deltas, anchors, [gt], [(32, 32)])
    # 1 positive (target dx = dy = 8 / 32, dw = dh = 0) and 3 negatives, all sampled
    assert losses["loss_rpn_cls"].item() == pytest.approx(math.log(2))
    assert losses["loss_rpn_box"].item() == pytest.approx(0.5 / 4)
    deltas[0][0, :, 1, 1] = torch.tensor([0.25, 0.25, 0.0, 0.0])
    assert rpn.loss(objectness, deltas, anchors, [gt], [(32, 32)])["loss_rpn_box"].item() == 0


def test_valid_region_ignores_anchors_outside_the_padded_image():
    rpn = _rpn(strides=(4, 8), base=4, valid_region_divisor=32)
    feats = [torch.zeros(2, 4, 16, 16), torch.zeros(2, 4, 8, 8)]
    valid = rpn.valid_anchors(feats, [(64, 64), (20, 40)])
    assert valid.shape == (2, 256 + 64)
    assert valid[0].all()
    # image 2 is padded to 32 x 64: stride 4 -> rows < 8, all 16 columns; stride 8 -> rows < 4
    lvl0 = valid[1, :256].view(16, 16)
    lvl1 = valid[1, 256:].view(8, 8)
    assert lvl0[:8].all() and not lvl0[8:].any()
    assert lvl1[:4].all() and not lvl1[4:].any()
    gt = {"boxes": torch.tensor([[0.0, 0, 8, 8]]), "labels": torch.tensor([0])}
    anchors = torch.cat(rpn.anchors(feats, (64, 64)))
    matched, _ = rpn.assign(anchors, [gt, gt], valid)
    assert (matched[1][~valid[1]] == -2).all() and (matched[1][valid[1]] != -2).any()


def _ref_iou(a, b):
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _ref_encode(a, g, stds=(1.0, 1.0, 1.0, 1.0)):
    aw, ah = a[2] - a[0], a[3] - a[1]
    gw, gh = g[2] - g[0], g[3] - g[1]
    raw = (
        ((g[0] + g[2]) / 2 - (a[0] + a[2]) / 2) / aw,
        ((g[1] + g[3]) / 2 - (a[1] + a[3]) / 2) / ah,
        math.log(gw / aw),
        math.log(gh / ah),
    )
    return [r / s for r, s in zip(raw, stds, strict=True)]


def _ref_decode(a, d, limit, stds=(1.0, 1.0, 1.0, 1.0)):
    dx, dy, dw, dh = (v * s for v, s in zip(d, stds, strict=True))
    dw, dh = max(-LOG_CLIP, min(LOG_CLIP, dw)), max(-LOG_CLIP, min(LOG_CLIP, dh))
    aw, ah = a[2] - a[0], a[3] - a[1]
    cx, cy = a[0] + 0.5 * aw + dx * aw, a[1] + 0.5 * ah + dy * ah
    w, h = aw * math.exp(dw), ah * math.exp(dh)
    box = [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]
    return [min(max(v, 0.0), limit[k % 2]) for k, v in enumerate(box)]


@pytest.mark.parametrize("box_loss", ["l1", "smooth_l1"])
def test_loss_matches_float64_reference(box_loss):
    torch.manual_seed(1)
    rpn = _rpn(strides=(8, 16), base=3, ratios=(0.5, 1.0, 2.0), valid_region_divisor=None,
               num_samples=10_000, box_loss=box_loss)  # every non-ignored anchor is sampled
    feats = [torch.zeros(2, 4, 6, 8), torch.zeros(2, 4, 3, 4)]
    anchors = rpn.anchors(feats, (48, 64))
    objectness = [torch.randn(2, 3, *f.shape[-2:]) for f in feats]
    deltas = [torch.randn(2, 12, *f.shape[-2:]) * 0.3 for f in feats]
    targets = [
        {"boxes": torch.tensor([[4.0, 6, 30, 40], [30, 2, 60, 20]]),
         "labels": torch.tensor([0, 1])},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)},
    ]
    got = rpn.loss(objectness, deltas, anchors, targets, [(48, 64), (48, 64)])

    anchor_list = torch.cat(anchors).double().tolist()
    logits = torch.cat([o.permute(0, 2, 3, 1).reshape(2, -1) for o in objectness], 1).double()
    reg = torch.cat([d.view(2, 3, 4, *d.shape[-2:]).permute(0, 3, 4, 1, 2).reshape(2, -1, 4)
                     for d in deltas], 1).double()
    cls_sum = box_sum = norm = 0.0
    for i, t in enumerate(targets):
        gts = t["boxes"].double().tolist()
        ious = [[_ref_iou(a, g) for g in gts] for a in anchor_list]
        assign = []
        for row in ious:
            best = max(row) if row else 0.0
            assign.append(row.index(best) if best >= 0.7 else (-1 if best < 0.3 else -2))
        for j, _ in enumerate(gts):  # low-quality: each box's best anchors (mmdet, min 0.3)
            col = [r[j] for r in ious]
            if max(col) >= 0.3:
                for k, v in enumerate(col):
                    if v == max(col):
                        assign[k] = j
        npos = sum(a >= 0 for a in assign)
        nneg = sum(a == -1 for a in assign)
        norm += max(npos, 1) + max(nneg, 1)
        for k, a in enumerate(assign):
            if a == -2:
                continue
            x, y = float(logits[i, k]), 1.0 if a >= 0 else 0.0
            cls_sum += max(x, 0) - x * y + math.log1p(math.exp(-abs(x)))
            if a >= 0:
                for p, q in zip(reg[i, k].tolist(), _ref_encode(anchor_list[k], gts[a]),
                                strict=True):
                    d = abs(p - q)
                    if box_loss == "l1":
                        box_sum += d
                    else:
                        box_sum += 0.5 * d * d * 9 if d < 1 / 9 else d - 0.5 / 9
    assert got["loss_rpn_cls"].item() == pytest.approx(cls_sum / norm, rel=1e-5)
    assert got["loss_rpn_box"].item() == pytest.approx(box_sum / norm, rel=1e-5)


def test_loss_gradients_are_finite_without_boxes():
    rpn = _rpn()
    feats = [torch.randn(1, 4, 4, 4, requires_grad=True)]
    objectness, deltas = rpn(feats)
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}
    losses = rpn.loss(objectness, deltas, rpn.anchors(feats, (64, 64)), [empty], [(64, 64)])
    assert losses["loss_rpn_box"].item() == 0 and losses["loss_rpn_cls"].item() > 0
    sum(losses.values()).backward()
    assert torch.isfinite(feats[0].grad).all() and feats[0].grad.abs().sum() > 0


# ----------------------------------------------------------------------------- proposals


def _ref_proposals(rpn, objectness, deltas, anchors, sizes, cfg):
    """Per image: per-level top-n, decode, clip, size filter, greedy per-level NMS, top-n."""
    out = []
    for i, (h, w) in enumerate(sizes):
        cands = []
        for level, (o, d, a) in enumerate(zip(objectness, deltas, anchors, strict=True)):
            logits = o[i].permute(1, 2, 0).reshape(-1).double().tolist()
            reg = d[i].view(-1, 4, *d.shape[-2:]).permute(2, 3, 0, 1).reshape(-1, 4).double()
            order = sorted(range(len(logits)), key=lambda k: -logits[k])[: cfg.nms_pre]
            for k in order:
                box = _ref_decode(a[k].double().tolist(), reg[k].tolist(), (w, h))
                if box[2] - box[0] > cfg.min_size and box[3] - box[1] > cfg.min_size:
                    cands.append((1 / (1 + math.exp(-logits[k])), box, level))
        cands.sort(key=lambda c: -c[0])
        kept = []
        for c in cands:
            if all(k[2] != c[2] or _ref_iou(k[1], c[1]) <= cfg.nms_thresh for k in kept):
                kept.append(c)
        out.append(kept[: cfg.max_per_img])
    return out


@pytest.mark.parametrize("training", [True, False])
def test_proposals_match_float64_reference(training):
    torch.manual_seed(2)
    train = {"nms_pre": 30, "max_per_img": 25, "nms_thresh": 0.6, "min_size": 2.0}
    test = {"nms_pre": 12, "max_per_img": 40, "nms_thresh": 0.5, "min_size": 0.0}
    rpn = _rpn(strides=(8, 16), base=3, ratios=(0.5, 1.0, 2.0), train_proposals=train,
               test_proposals=test)
    rpn.train(training)
    cfg = ProposalSettings(**(train if training else test))
    feats = [torch.zeros(2, 4, 6, 8), torch.zeros(2, 4, 3, 4)]
    anchors = rpn.anchors(feats, (48, 64))
    objectness = [torch.randn(2, 3, *f.shape[-2:]) * 3 for f in feats]
    deltas = [torch.randn(2, 12, *f.shape[-2:]) * 0.5 for f in feats]
    sizes = [(48, 64), (40, 50)]
    boxes, scores = rpn.proposals(objectness, deltas, anchors, sizes)
    ref = _ref_proposals(rpn, objectness, deltas, anchors, sizes, cfg)
    for b, s, r in zip(boxes, scores, ref, strict=True):
        assert b.shape == (len(r), 4) and not b.requires_grad
        torch.testing.assert_close(s.double(), torch.tensor([c[0] for c in r]).double())
        torch.testing.assert_close(b.double(), torch.tensor([c[1] for c in r]).double(),
                                   atol=1e-4, rtol=1e-5)
    assert len(ref[1]) > 0 and (boxes[1][:, 2] <= 50).all() and (boxes[1][:, 3] <= 40).all()
    if training:  # the per-image cut is exercised
        assert all(len(r) == cfg.max_per_img for r in ref)
    else:  # NMS removed boxes
        assert all(len(r) < 2 * cfg.nms_pre for r in ref)


def test_nms_is_per_level_and_cut_per_image():
    rpn = _rpn(strides=(16, 32), base=2, test_proposals={"nms_pre": 10, "max_per_img": 2})
    rpn.eval()
    feats = [torch.zeros(1, 4, 1, 1), torch.zeros(1, 4, 1, 1)]
    # one anchor per level, both [-16, -16, 16, 16] (level 0) and [-32, -32, 32, 32] (level 1);
    # deltas map both onto the same box [0, 0, 32, 32]
    anchors = rpn.anchors(feats, (64, 64))
    objectness = [torch.tensor([[[[2.0]]]]), torch.tensor([[[[1.0]]]])]
    d0 = torch.tensor([0.5, 0.5, 0.0, 0.0]).view(1, 4, 1, 1)
    d1 = torch.tensor([0.25, 0.25, -math.log(2), -math.log(2)]).view(1, 4, 1, 1)
    boxes, scores = rpn.proposals(objectness, [d0, d1], anchors, [(64, 64)])
    torch.testing.assert_close(boxes[0], torch.tensor([[0.0, 0, 32, 32]] * 2))
    assert scores[0].tolist() == pytest.approx([1 / (1 + math.exp(-2)), 1 / (1 + math.exp(-1))])
    rpn.test_proposals = ProposalSettings(nms_pre=10, max_per_img=1)
    boxes, scores = rpn.proposals(objectness, [d0, d1], anchors, [(64, 64)])
    assert boxes[0].shape == (1, 4) and scores[0].item() == pytest.approx(1 / (1 + math.exp(-2)))
    # on one level the same two boxes suppress each other
    same = _rpn(strides=(16,), base=2, ratios=(1.0, 1.0), test_proposals={"nms_pre": 10}).eval()
    boxes, _ = same.proposals([torch.tensor([2.0, 1.0]).view(1, 2, 1, 1)],
                              [torch.cat([d0, d0], 1)], same.anchors(feats[:1], (64, 64)),
                              [(64, 64)])
    assert boxes[0].shape == (1, 4)


def test_proposal_settings_validate_keys():
    assert ProposalSettings.parse({"nms_thresh": 0.85}).nms_thresh == 0.85
    assert _rpn().train_proposals == ProposalSettings(nms_pre=2000)
    with pytest.raises(ValueError, match="nms_tresh"):
        ProposalSettings.parse({"nms_tresh": 0.85})
