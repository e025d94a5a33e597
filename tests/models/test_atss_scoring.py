"""ATSS test-time ranking: MMDetection vs the official (DyHead) rule."""

import pytest
import torch

from dynadet.models.atss import ATSSHead
from dynadet.models.priors import AnchorGenerator


def _head(scoring: str, nms_pre: int) -> ATSSHead:
    gen = AnchorGenerator(strides=[8], ratios=[1.0], octave_base_scale=8, offset=0.5)
    return ATSSHead(
        3, gen, in_channels=8, feat_channels=8, num_convs=0, pred_kernel_size=1,
        scoring=scoring, nms_pre=nms_pre, nms_thresh=1.0, score_thresh=0.05, max_per_img=1000,
    )  # fmt: skip


def _outputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    cls = torch.randn(1, 3, 4, 5, generator=g) * 3
    ctr = torch.randn(1, 1, 4, 5, generator=g) * 3
    reg = torch.zeros(1, 4, 4, 5)
    return {"cls": [cls], "reg": [reg], "ctr": [ctr]}


def _reference(outputs, scoring: str, nms_pre: int):
    """Explicit loop over (prior, class) pairs: the set each rule keeps and its scores."""
    cls = outputs["cls"][0][0].permute(1, 2, 0).reshape(-1, 3).sigmoid().double()
    ctr = outputs["ctr"][0][0].permute(1, 2, 0).reshape(-1).sigmoid().double()
    pairs = []
    for m in range(cls.shape[0]):
        for c in range(3):
            p = float(cls[m, c])
            if p <= 0.05:
                continue
            rank = p * float(ctr[m]) if scoring == "official" else p
            pairs.append((rank, p * float(ctr[m]), m, c))
    pairs.sort(key=lambda t: -t[0])
    return sorted(round(t[1], 6) for t in pairs[:nms_pre])


@pytest.mark.parametrize("scoring", ["mmdet", "official"])
@pytest.mark.parametrize("nms_pre", [5, 1000])
def test_ranking_rule_matches_loop(scoring, nms_pre):
    head = _head(scoring, nms_pre).eval()
    outputs = _outputs()
    priors = head.priors(outputs["cls"], (32, 40))
    res = head.predict(outputs, priors, [(32, 40)])[0]
    got = sorted(round(float(s), 6) for s in res["scores"])
    assert got == pytest.approx(_reference(outputs, scoring, nms_pre), abs=1e-5)


def test_rules_differ_when_topk_binds():
    outputs = _outputs(3)
    a = _head("mmdet", 5).eval()
    b = _head("official", 5).eval()
    priors = a.priors(outputs["cls"], (32, 40))
    sa = sorted(a.predict(outputs, priors, [(32, 40)])[0]["scores"].tolist())
    sb = sorted(b.predict(outputs, priors, [(32, 40)])[0]["scores"].tolist())
    assert sa != sb
    assert sum(sb) >= sum(sa)  # official keeps the best products


def test_bad_scoring_name():
    with pytest.raises(ValueError, match="scoring"):
        _head("sqrt", 5)
