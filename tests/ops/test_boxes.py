import math

import pytest
import torch

from dynadet.ops.boxes import (
    BoxCoder,
    DistanceCoder,
    aligned_box_iou,
    aligned_giou,
    bbox2distance,
    box_area,
    box_convert,
    box_iou,
    clip_boxes,
    distance2bbox,
    generalized_box_iou,
    remove_small_boxes,
)


def random_boxes(n: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g, dtype=dtype) * 40 - 10
    wh = torch.rand(n, 2, generator=g, dtype=dtype) * 20 + 0.5
    return torch.cat((xy, xy + wh), dim=1)


# --- slow references: plain Python floats, one pair at a time --------------------------------


def ref_inter_union(a: list[float], b: list[float]) -> tuple[float, float]:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter, union


def ref_enclose(a: list[float], b: list[float]) -> float:
    return (max(a[2], b[2]) - min(a[0], b[0])) * (max(a[3], b[3]) - min(a[1], b[1]))


def ref_iou(a: list[float], b: list[float]) -> float:
    inter, union = ref_inter_union(a, b)
    return inter / union if union > 0 else 0.0


def ref_giou(a: list[float], b: list[float]) -> float:
    _, union = ref_inter_union(a, b)
    c = ref_enclose(a, b)
    return ref_iou(a, b) - ((c - union) / c if c > 0 else 0.0)


def pairwise(fn, boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    rows = [[fn(a, b) for b in boxes2.tolist()] for a in boxes1.tolist()]
    return torch.tensor(rows, dtype=torch.float64).reshape(len(boxes1), len(boxes2))


# --- conversion, area, clipping --------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["xyxy", "xywh", "cxcywh"])
def test_box_convert_against_hand_formulas(fmt: str) -> None:
    boxes = random_boxes(7).reshape(7, 1, 4)  # extra leading dim
    expected = []
    for x1, y1, x2, y2 in boxes.reshape(-1, 4).tolist():
        if fmt == "xyxy":
            expected.append([x1, y1, x2, y2])
        elif fmt == "xywh":
            expected.append([x1, y1, x2 - x1, y2 - y1])
        else:
            expected.append([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1])
    out = box_convert(boxes, "xyxy", fmt)
    assert out.shape == boxes.shape
    torch.testing.assert_close(out.reshape(-1, 4), torch.tensor(expected, dtype=torch.float64))
    torch.testing.assert_close(box_convert(out, fmt, "xyxy"), boxes)
    for other in ("xyxy", "xywh", "cxcywh"):
        torch.testing.assert_close(
            box_convert(box_convert(out, fmt, other), other, fmt), out
        )


def test_box_convert_rejects_unknown_format() -> None:
    with pytest.raises(ValueError, match="unknown box format"):
        box_convert(random_boxes(2), "xyxy", "yxyx")


def test_box_area_no_plus_one() -> None:
    boxes = torch.tensor([[0.0, 0.0, 2.0, 3.0], [1.0, 1.0, 1.0, 5.0]])
    assert box_area(boxes).tolist() == [6.0, 0.0]
    assert box_area(boxes.reshape(1, 2, 4)).shape == (1, 2)


def test_clip_boxes_and_remove_small() -> None:
    boxes = torch.tensor([[-5.0, -1.0, 30.0, 8.0], [2.0, 3.0, 4.0, 3.5], [5.0, 5.0, 25.0, 25.0]])
    clipped = clip_boxes(boxes, (10, 20))  # (height, width)
    assert clipped.tolist() == [[0, 0, 20, 8], [2, 3, 4, 3.5], [5, 5, 20, 10]]
    assert clip_boxes(boxes.reshape(3, 1, 4), (10, 20)).shape == (3, 1, 4)
    keep = remove_small_boxes(clipped, 0.5)
    assert keep.dtype == torch.int64 and keep.tolist() == [0, 1, 2]
    assert remove_small_boxes(clipped, 1.0).tolist() == [0, 2]
    assert remove_small_boxes(torch.zeros(0, 4), 1.0).numel() == 0


# --- IoU / GIoU ------------------------------------------------------------------------------


def test_box_iou_and_giou_match_loops() -> None:
    a, b = random_boxes(9, seed=1), random_boxes(6, seed=2)
    torch.testing.assert_close(box_iou(a, b), pairwise(ref_iou, a, b))
    torch.testing.assert_close(generalized_box_iou(a, b), pairwise(ref_giou, a, b))
    assert box_iou(a, b[:0]).shape == (9, 0)
    assert generalized_box_iou(a[:0], b).shape == (0, 6)


def test_iou_degenerate_boxes_give_zero_not_nan() -> None:
    boxes = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 2.0, 2.0]])
    iou = box_iou(boxes, boxes)
    assert torch.isfinite(iou).all()
    assert iou[0, 1] == 0 and iou[2, 2] == 1 and iou[0, 2] == 0
    assert torch.isfinite(generalized_box_iou(boxes, boxes)).all()
    # Gradients through degenerate pairs stay finite too.
    x = boxes.clone().requires_grad_(True)
    (box_iou(x, x).sum() + generalized_box_iou(x, x).sum()).backward()
    assert torch.isfinite(x.grad).all()


def test_aligned_iou_and_giou_match_loops() -> None:
    a, b = random_boxes(12, seed=3), random_boxes(12, seed=4)
    b[0] = a[0]  # identical pair
    expected_iou, expected_giou = [], []
    for p, q in zip(a.tolist(), b.tolist(), strict=True):
        inter, union = ref_inter_union(p, q)
        c = ref_enclose(p, q)
        expected_iou.append(inter / max(union, 1e-6))
        expected_giou.append(inter / (union + 1e-7) - (c - union) / (c + 1e-7))
    f64 = torch.float64
    torch.testing.assert_close(aligned_box_iou(a, b), torch.tensor(expected_iou, dtype=f64))
    torch.testing.assert_close(aligned_giou(a, b), torch.tensor(expected_giou, dtype=f64))
    # Leading shapes are kept; the diagonal of the pairwise version agrees.
    assert aligned_giou(a.reshape(3, 4, 4), b.reshape(3, 4, 4)).shape == (3, 4)
    torch.testing.assert_close(aligned_box_iou(a, b), box_iou(a, b).diagonal())
    torch.testing.assert_close(
        aligned_giou(a, b, eps=0.0), generalized_box_iou(a, b).diagonal()
    )


def test_iou_gradcheck() -> None:
    a = random_boxes(4, seed=5).requires_grad_(True)
    b = random_boxes(3, seed=6).requires_grad_(True)
    assert torch.autograd.gradcheck(box_iou, (a, b))
    assert torch.autograd.gradcheck(generalized_box_iou, (a, b))
    c = random_boxes(4, seed=7).requires_grad_(True)
    assert torch.autograd.gradcheck(aligned_giou, (a, c))
    assert torch.autograd.gradcheck(aligned_box_iou, (a, c))


def test_iou_float32_matches_float64() -> None:
    a, b = random_boxes(20, seed=8), random_boxes(30, seed=9)
    torch.testing.assert_close(
        box_iou(a.float(), b.float()).double(), box_iou(a, b), atol=1e-6, rtol=1e-5
    )


# --- delta-xywh coder ------------------------------------------------------------------------


def ref_encode(p: list[float], g: list[float], means, stds) -> list[float]:
    pw, ph = p[2] - p[0], p[3] - p[1]
    gw, gh = g[2] - g[0], g[3] - g[1]
    px, py, gx, gy = p[0] + pw / 2, p[1] + ph / 2, g[0] + gw / 2, g[1] + gh / 2
    raw = [(gx - px) / pw, (gy - py) / ph, math.log(gw / pw), math.log(gh / ph)]
    return [(d - m) / s for d, m, s in zip(raw, means, stds, strict=True)]


def ref_decode(d: list[float], p: list[float], means, stds, clamp, symmetric) -> list[float]:
    dx, dy, dw, dh = (v * s + m for v, s, m in zip(d, stds, means, strict=True))
    dw, dh = min(dw, clamp), min(dh, clamp)
    if symmetric:
        dw, dh = max(dw, -clamp), max(dh, -clamp)
    pw, ph = p[2] - p[0], p[3] - p[1]
    cx, cy = p[0] + pw / 2 + dx * pw, p[1] + ph / 2 + dy * ph
    w, h = pw * math.exp(dw), ph * math.exp(dh)
    return [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]


MEANS, STDS = (0.1, -0.2, 0.05, 0.0), (0.1, 0.1, 0.2, 0.2)


def test_encode_decode_match_loops_and_round_trip() -> None:
    coder = BoxCoder(MEANS, STDS)
    props, gts = random_boxes(10, seed=10), random_boxes(10, seed=11)
    deltas = coder.encode(props, gts)
    expected = [
        ref_encode(p, g, MEANS, STDS) for p, g in zip(props.tolist(), gts.tolist(), strict=True)
    ]
    torch.testing.assert_close(deltas, torch.tensor(expected, dtype=torch.float64))
    decoded = coder.decode(deltas, props)
    expected = [
        ref_decode(d, p, MEANS, STDS, coder.clamp, True)
        for d, p in zip(deltas.tolist(), props.tolist(), strict=True)
    ]
    torch.testing.assert_close(decoded, torch.tensor(expected, dtype=torch.float64))
    torch.testing.assert_close(decoded, gts)
    # Leading dims broadcast: one set of proposals against two sets of deltas.
    batched = coder.decode(deltas.expand(2, 10, 4), props)
    torch.testing.assert_close(batched[1], decoded)


def test_decode_clamp_modes_and_max_shape() -> None:
    props = torch.tensor([[10.0, 10.0, 20.0, 30.0]], dtype=torch.float64)
    deltas = torch.tensor([[0.0, 0.0, 9.0, -9.0]], dtype=torch.float64)
    clamp = math.log(1000.0 / 16)
    for mode, symmetric in (("symmetric", True), ("upper", False)):
        coder = BoxCoder(clamp_mode=mode)
        expected = ref_decode(
            deltas[0].tolist(), props[0].tolist(), [0] * 4, [1] * 4, clamp, symmetric
        )
        torch.testing.assert_close(
            coder.decode(deltas, props)[0], torch.tensor(expected, dtype=torch.float64)
        )
    sym = BoxCoder().decode(deltas, props)[0]
    upper = BoxCoder(clamp_mode="upper").decode(deltas, props)[0]
    assert (sym[3] - sym[1]) > (upper[3] - upper[1])  # dh=-9 clamped to -4.1 vs not clamped
    assert torch.allclose(sym[2] - sym[0], torch.tensor(10.0 * 1000 / 16).double())
    clipped = BoxCoder().decode(deltas, props, max_shape=(25, 40))
    assert clipped.min() >= 0 and clipped[0, 2] == 40 and clipped[0, 3] <= 25
    with pytest.raises(ValueError):
        BoxCoder(clamp_mode="lower")


def test_from_weights_equals_stds_and_is_exact_for_unit_weights() -> None:
    props, gts = random_boxes(50, seed=12).float(), random_boxes(50, seed=13).float()
    tv_style, mm_style = BoxCoder.from_weights((1.0, 1.0, 1.0, 1.0)), BoxCoder()
    assert tv_style.clamp_mode == "upper"
    assert torch.equal(tv_style.encode(props, gts), mm_style.encode(props, gts))
    deltas = torch.randn(50, 4, generator=torch.Generator().manual_seed(0))
    assert torch.equal(tv_style.decode(deltas, props), mm_style.decode(deltas, props))
    weighted = BoxCoder.from_weights((10.0, 10.0, 5.0, 5.0))
    same = BoxCoder(stds=(0.1, 0.1, 0.2, 0.2), clamp_mode="upper")
    torch.testing.assert_close(weighted.encode(props, gts), same.encode(props, gts))
    torch.testing.assert_close(weighted.decode(deltas, props), same.decode(deltas, props))


def test_decode_follows_torchvision_op_order_bitwise() -> None:
    # Float32 transcription of torchvision BoxCoder.decode_single's arithmetic, weights (10,10,5,5).
    weights = (10.0, 10.0, 5.0, 5.0)
    clip = math.log(1000.0 / 16)
    boxes, codes = random_boxes(64, seed=14).float(), torch.randn(64, 4) * 2
    widths, heights = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    ctr_x, ctr_y = boxes[:, 0] + 0.5 * widths, boxes[:, 1] + 0.5 * heights
    dx, dy = codes[:, 0] / weights[0], codes[:, 1] / weights[1]
    dw = torch.clamp(codes[:, 2] / weights[2], max=clip)
    dh = torch.clamp(codes[:, 3] / weights[3], max=clip)
    pcx, pcy = dx * widths + ctr_x, dy * heights + ctr_y
    pw, ph = torch.exp(dw) * widths, torch.exp(dh) * heights
    half = torch.tensor(0.5)
    expected = torch.stack((pcx - half * pw, pcy - half * ph, pcx + half * pw, pcy + half * ph), 1)
    assert torch.equal(BoxCoder.from_weights(weights).decode(codes, boxes), expected)
    gts = random_boxes(64, seed=15).float()
    gw, gh = gts[:, 2] - gts[:, 0], gts[:, 3] - gts[:, 1]
    gx, gy = gts[:, 0] + 0.5 * gw, gts[:, 1] + 0.5 * gh
    targets = torch.stack(
        (
            weights[0] * (gx - ctr_x) / widths,
            weights[1] * (gy - ctr_y) / heights,
            weights[2] * torch.log(gw / widths),
            weights[3] * torch.log(gh / heights),
        ),
        1,
    )
    assert torch.equal(BoxCoder.from_weights(weights).encode(boxes, gts), targets)


def test_decode_gradcheck() -> None:
    coder = BoxCoder(MEANS, STDS)
    deltas = (torch.randn(5, 4, dtype=torch.float64) * 0.5).requires_grad_(True)
    props = random_boxes(5, seed=16).requires_grad_(True)
    assert torch.autograd.gradcheck(coder.decode, (deltas, props))
    assert torch.autograd.gradcheck(BoxCoder.from_weights((10, 10, 5, 5)).decode, (deltas, props))


# --- distance (ltrb) coder -------------------------------------------------------------------


def test_distance_round_trip_and_loops() -> None:
    points = torch.tensor([[5.0, 6.0], [0.0, 0.0], [12.5, -3.0]], dtype=torch.float64)
    boxes = torch.tensor(
        [[1.0, 2.0, 9.0, 10.0], [-4.0, -1.0, 3.0, 2.0], [10.0, -5.0, 20.0, 0.0]],
        dtype=torch.float64,
    )
    ltrb = bbox2distance(points, boxes)
    expected = [[p[0] - b[0], p[1] - b[1], b[2] - p[0], b[3] - p[1]]
                for p, b in zip(points.tolist(), boxes.tolist(), strict=True)]
    assert ltrb.tolist() == expected
    torch.testing.assert_close(distance2bbox(points, ltrb), boxes)
    clipped = distance2bbox(points, ltrb, max_shape=(8, 15))
    assert clipped.tolist() == [[1, 2, 9, 8], [0, 0, 3, 2], [10, 0, 15, 0]]
    coder = DistanceCoder()
    stride = torch.tensor([8.0, 16.0, 32.0], dtype=torch.float64)
    encoded = coder.encode(points, boxes, stride)
    torch.testing.assert_close(encoded * stride[:, None], ltrb)
    torch.testing.assert_close(coder.decode(points, encoded, stride), boxes)
    torch.testing.assert_close(coder.decode(points, ltrb / 4.0, 4.0), boxes)


def test_distance_decode_matches_box_linear_coder_order() -> None:
    # Transcription of torchvision BoxLinearCoder(normalize_by_size=True).decode_single in float32.
    # FCOS anchors: grid position * stride -/+ stride / 2 (exact, so width == height == stride).
    shifts = torch.randint(0, 100, (40, 2), generator=torch.Generator().manual_seed(17)) * 8.0
    anchors = torch.cat((shifts - 4.0, shifts + 4.0), dim=1)
    codes = torch.rand(40, 4) * 5
    ctr_x = 0.5 * (anchors[:, 0] + anchors[:, 2])
    ctr_y = 0.5 * (anchors[:, 1] + anchors[:, 3])
    w, h = anchors[:, 2] - anchors[:, 0], anchors[:, 3] - anchors[:, 1]
    scaled = codes * torch.stack((w, h, w, h), dim=1)
    expected = torch.stack(
        (ctr_x - scaled[:, 0], ctr_y - scaled[:, 1], ctr_x + scaled[:, 2], ctr_y + scaled[:, 3]), 1
    )
    points = torch.stack((ctr_x, ctr_y), dim=1)
    assert torch.equal(DistanceCoder().decode(points, codes, w), expected)


def test_distance_decode_gradcheck() -> None:
    points = torch.rand(4, 2, dtype=torch.float64, requires_grad=True)
    ltrb = torch.rand(4, 4, dtype=torch.float64, requires_grad=True)
    scale = torch.rand(4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(DistanceCoder().decode, (points, ltrb, scale))
