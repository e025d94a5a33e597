import math

import pytest
import torch

from dynadet.ops.losses import (
    giou_loss,
    iou_loss,
    l1_loss,
    reduce_loss,
    sigmoid_focal_loss,
    smooth_l1_loss,
)


def random_boxes(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g, dtype=torch.float64) * 20
    wh = torch.rand(n, 2, generator=g, dtype=torch.float64) * 15 + 1
    return torch.cat((xy, xy + wh), dim=1)


def elementwise(fn, *tensors: torch.Tensor) -> torch.Tensor:
    """Apply a Python-float function element by element (the slow reference)."""
    flat = [t.reshape(-1).tolist() for t in tensors]
    values = [fn(*args) for args in zip(*flat, strict=True)]
    return torch.tensor(values, dtype=torch.float64).reshape(tensors[0].shape)


def ref_focal(x: float, t: float, alpha: float, gamma: float) -> float:
    p = 1 / (1 + math.exp(-x))
    ce = -(t * math.log(p) + (1 - t) * math.log(1 - p))
    p_t = p * t + (1 - p) * (1 - t)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss *= alpha * t + (1 - alpha) * (1 - t)
    return loss


def ref_paired_iou(a: list[float], b: list[float]) -> tuple[float, float, float]:
    """(intersection, union, enclosing area) of two xyxy boxes."""
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - w * h
    enclose = (max(a[2], b[2]) - min(a[0], b[0])) * (max(a[3], b[3]) - min(a[1], b[1]))
    return w * h, union, enclose


@pytest.mark.parametrize(("alpha", "gamma"), [(0.25, 2.0), (-1.0, 2.0), (0.5, 0.0), (0.25, 1.5)])
def test_focal_loss_matches_loop(alpha: float, gamma: float) -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 5, generator=g, dtype=torch.float64) * 3
    targets = (torch.rand(6, 5, generator=g) < 0.3).double()
    expected = torch.tensor(
        [[ref_focal(x, t, alpha, gamma) for x, t in zip(r1, r2, strict=True)]
         for r1, r2 in zip(logits.tolist(), targets.tolist(), strict=True)],
        dtype=torch.float64,
    )
    out = sigmoid_focal_loss(logits, targets, alpha=alpha, gamma=gamma)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(
        sigmoid_focal_loss(logits, targets, alpha, gamma, reduction="sum"), expected.sum()
    )
    torch.testing.assert_close(
        sigmoid_focal_loss(logits, targets, alpha, gamma, reduction="mean"), expected.mean()
    )


def test_focal_loss_extreme_logits_finite_and_gradcheck() -> None:
    logits = torch.tensor([[-200.0, 200.0, 0.0]])
    targets = torch.tensor([[1.0, 0.0, 1.0]])
    out = sigmoid_focal_loss(logits, targets)
    # p_t = 0 there, so the loss is alpha_t * |logit|: 0.25 * 200 and 0.75 * 200.
    torch.testing.assert_close(out[0, :2], torch.tensor([50.0, 150.0]))
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    t = (torch.rand(3, 4) < 0.5).double()
    assert torch.autograd.gradcheck(lambda z: sigmoid_focal_loss(z, t, reduction="sum"), (x,))
    # Integer/bool targets are accepted.
    torch.testing.assert_close(
        sigmoid_focal_loss(x, t.long()), sigmoid_focal_loss(x, t)
    )


def test_giou_loss_matches_loop_and_gradcheck() -> None:
    pred, target = random_boxes(10, seed=1), random_boxes(10, seed=2)
    target[0] = pred[0]
    target[1] = pred[1] + 50  # disjoint pair: GIoU < 0, loss > 1

    def ref(p, t):
        inter, union, enclose = ref_paired_iou(p, t)
        return 1 - (inter / (union + 1e-7) - (enclose - union) / (enclose + 1e-7))

    expected = torch.tensor(
        [ref(p, t) for p, t in zip(pred.tolist(), target.tolist(), strict=True)],
        dtype=torch.float64,
    )
    torch.testing.assert_close(giou_loss(pred, target, reduction="none"), expected)
    assert abs(expected[0]) < 1e-6 and expected[1] > 1
    torch.testing.assert_close(giou_loss(pred, target, reduction="mean"), expected.mean())
    torch.testing.assert_close(giou_loss(pred, target), expected)
    weight = torch.rand(10, dtype=torch.float64)
    torch.testing.assert_close(
        giou_loss(pred, target, reduction="sum", weight=weight), (expected * weight).sum()
    )
    p = pred.clone().requires_grad_(True)
    t = random_boxes(10, seed=3).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: giou_loss(a, b, reduction="sum"), (p, t))


@pytest.mark.parametrize("mode", ["log", "linear", "square"])
def test_iou_loss_modes_match_loop(mode: str) -> None:
    pred, target = random_boxes(8, seed=4), random_boxes(8, seed=5)
    target[2] = pred[2] + 100  # IoU 0 -> clamped to eps

    def ref(p, t):
        inter, union, _ = ref_paired_iou(p, t)
        iou = max(inter / max(union, 1e-6), 1e-6)
        return {"log": -math.log(iou), "linear": 1 - iou, "square": 1 - iou**2}[mode]

    expected = torch.tensor(
        [ref(p, t) for p, t in zip(pred.tolist(), target.tolist(), strict=True)],
        dtype=torch.float64,
    )
    torch.testing.assert_close(iou_loss(pred, target, mode=mode, reduction="none"), expected)
    if mode == "log":
        assert math.isclose(expected[2].item(), -math.log(1e-6))
    p = pred[[0, 1, 3]].clone().requires_grad_(True)
    t = target[[0, 1, 3]].clone()
    assert torch.autograd.gradcheck(lambda a: iou_loss(a, t, mode=mode, reduction="sum"), (p,))


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0 / 9])
def test_smooth_l1_matches_loop(beta: float) -> None:
    g = torch.Generator().manual_seed(6)
    x = torch.randn(5, 4, generator=g, dtype=torch.float64)
    y = torch.randn(5, 4, generator=g, dtype=torch.float64)

    def ref(a, b):
        d = abs(a - b)
        if beta == 0:
            return d
        return 0.5 * d * d / beta if d < beta else d - 0.5 * beta

    expected = elementwise(ref, x, y)
    torch.testing.assert_close(smooth_l1_loss(x, y, beta, reduction="none"), expected)
    torch.testing.assert_close(smooth_l1_loss(x, y, beta, reduction="mean"), expected.mean())
    weight = torch.rand(5, 1, dtype=torch.float64)  # broadcast over the 4 coordinates
    torch.testing.assert_close(
        smooth_l1_loss(x, y, beta, reduction="sum", weight=weight), (expected * weight).sum()
    )


def test_smooth_l1_beta_zero_is_l1_with_finite_grad() -> None:
    x = torch.tensor([0.0, 1.0, -2.0], requires_grad=True)
    y = torch.tensor([0.0, 0.5, 1.0])
    loss = smooth_l1_loss(x, y, beta=0.0, reduction="sum")
    assert loss.item() == pytest.approx(0.5 + 3.0)
    loss.backward()
    assert torch.isfinite(x.grad).all()
    assert torch.equal(smooth_l1_loss(x, y, 0.0, "none"), l1_loss(x, y, "none"))
    with pytest.raises(ValueError):
        smooth_l1_loss(x, y, beta=-1.0)


def test_smooth_l1_and_l1_gradcheck() -> None:
    x = torch.randn(4, 4, dtype=torch.float64, requires_grad=True)
    y = torch.randn(4, 4, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a: smooth_l1_loss(a, y, 0.3, "sum"), (x,))
    assert torch.autograd.gradcheck(lambda a: l1_loss(a, y, "mean"), (x,))


def test_l1_loss_and_reduction_errors() -> None:
    x, y = torch.tensor([[1.0, -2.0]]), torch.tensor([[0.0, 0.0]])
    assert l1_loss(x, y, "none").tolist() == [[1.0, 2.0]]
    assert l1_loss(x, y, "sum", weight=torch.tensor([2.0, 0.5])).item() == 3.0
    assert l1_loss(x, y, "mean").item() == 1.5
    assert l1_loss(x, y).shape == (1, 2)
    assert reduce_loss(torch.zeros(0), reduction="sum").item() == 0.0
    with pytest.raises(ValueError, match="reduction"):
        l1_loss(x, y, "average")
    with pytest.raises(ValueError, match="mode"):
        iou_loss(random_boxes(2, 0), random_boxes(2, 1), mode="cubic")
