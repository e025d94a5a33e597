import torch

from dynadet.models.assigners import atss_assign, fcos_assign, max_iou_assign


def _fcos_inputs(points, stride=8.0, lo=-1.0, hi=64.0):
    pts = torch.tensor(points, dtype=torch.float32)
    n = pts.shape[0]
    return pts, torch.full((n,), stride), torch.tensor([[lo, hi]]).expand(n, 2)


def test_fcos_smallest_box_wins_and_outside_is_background():
    pts, sizes, ranges = _fcos_inputs([[10, 10], [30, 30], [100, 100]])
    gt = torch.tensor([[0, 0, 40, 40], [5, 5, 20, 20]], dtype=torch.float32)
    m = fcos_assign(pts, sizes, ranges, gt, center_radius=None)
    assert m.tolist() == [1, 0, -1]


def test_fcos_center_sampling_radius_is_strict():
    # box centre (20, 20); radius 1.5·8 = 12: |dx| < 12 is inside the centre region
    pts, sizes, ranges = _fcos_inputs([[31.9, 20], [32.0, 20], [8.5, 20]])
    gt = torch.tensor([[0, 0, 40, 40]], dtype=torch.float32)
    m = fcos_assign(pts, sizes, ranges, gt, center_radius=1.5)
    assert m.tolist() == [0, -1, 0]


def test_fcos_range_inclusive_vs_strict():
    # point at (64, 32) inside [0,0,128,64]: l=64, t=32, r=64, b=32 → max distance exactly 64
    pts, sizes, _ = _fcos_inputs([[64, 32]])
    ranges = torch.tensor([[0.0, 64.0]])
    gt = torch.tensor([[0, 0, 128, 64]], dtype=torch.float32)
    assert fcos_assign(pts, sizes, ranges, gt, None, range_inclusive=True).tolist() == [0]
    assert fcos_assign(pts, sizes, ranges, gt, None, range_inclusive=False).tolist() == [-1]


def test_fcos_no_boxes():
    pts, sizes, ranges = _fcos_inputs([[1, 1]])
    assert fcos_assign(pts, sizes, ranges, torch.zeros(0, 4)).tolist() == [-1]


def _grid_anchors(size=8.0, n=8, stride=8.0):
    ys, xs = torch.meshgrid(torch.arange(n) * stride, torch.arange(n) * stride, indexing="ij")
    c = torch.stack([xs.reshape(-1), ys.reshape(-1)], 1).float()
    return torch.cat([c - size / 2, c + size / 2], 1)


def test_atss_hand_worked_single_level():
    anchors = _grid_anchors(size=16.0, n=6)  # centres 0, 8, ..., 40
    gt = torch.tensor([[4.0, 4.0, 28.0, 28.0]])
    m = atss_assign(anchors, [anchors.shape[0]], gt, topk=9)
    # the 9 closest centres to (16, 16) are the 3×3 block at 8..24; IoUs: centre 16/24²... the
    # anchor at (16,16) has the highest IoU; mean+std keeps those at or above the threshold
    from dynadet.ops.boxes import box_iou

    iou = box_iou(anchors, gt)[:, 0]
    block = [
        i
        for i in range(36)
        if anchors[i, 0] + 8 in (8, 16, 24) and anchors[i, 1] + 8 in (8, 16, 24)
    ]
    cand = iou[block]
    thr = cand.mean() + cand.std()
    expected = sorted(i for i in block if iou[i] >= thr)
    assert sorted(torch.nonzero(m >= 0).flatten().tolist()) == expected
    assert 14 in expected  # centre anchor (16, 16) is row 2, column 2


def test_atss_center_must_be_inside_box_and_highest_iou_wins():
    anchors = torch.tensor(
        [
            [0.0, 0.0, 10.0, 10.0],
            [20.0, 20.0, 30.0, 30.0],
            [0.0, 0.0, 12.0, 12.0],
            [30.0, 0.0, 40.0, 10.0],
            [0.0, 30.0, 10.0, 40.0],
        ]
    )
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 12.0, 12.0]])
    # gt 0: IoUs [1, 0, .694, 0, 0] → threshold mean + std = .339 + .476 = .815 → anchor 0 only;
    # gt 1: IoUs [.694, 0, 1, 0, 0] → anchor 2 only. Far anchors have centres outside both.
    m = atss_assign(anchors, [5], gt, topk=5)
    assert m.tolist() == [0, -1, 1, -1, -1]
    # with the candidates cut to the 3 nearest, mean + std exceeds every IoU: no positive
    assert atss_assign(anchors, [5], gt[:1], topk=3).tolist() == [-1] * 5
    assert atss_assign(anchors, [5], torch.zeros(0, 4)).tolist() == [-1] * 5


def test_max_iou_thresholds_and_ignore_band():
    ious = torch.tensor([[0.6, 0.45, 0.1, 0.3]])
    m = max_iou_assign(ious, 0.5, 0.4, low_quality="none")
    assert m.tolist() == [0, -2, -1, -1]


def test_max_iou_low_quality_rules_differ():
    # gt 1's best anchor (2, IoU 0.3) is anchor 2; anchor 2's own best box is gt 0 (0.35)
    ious = torch.tensor([[0.9, 0.1, 0.35], [0.0, 0.2, 0.3]])
    mm = max_iou_assign(ious, 0.5, 0.4, low_quality="mmdet")
    tv = max_iou_assign(ious, 0.5, 0.4, low_quality="torchvision")
    assert mm.tolist() == [0, -1, 1]
    assert tv.tolist() == [0, -1, 0]
    # ties: every anchor sharing the best IoU is kept
    ties = max_iou_assign(torch.tensor([[0.3, 0.3, 0.1]]), 0.5, 0.4, "mmdet")
    assert ties.tolist() == [0, 0, -1]
