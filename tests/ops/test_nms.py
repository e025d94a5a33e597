import pytest
import torch

from dynadet.ops import nms as nms_module
from dynadet.ops.nms import batched_nms, nms, torchvision_available


def detector_like(n: int, num_classes: int, seed: int, size: float = 800.0):
    """Random boxes in a ``size x 1.67 size`` image with 10-300 px sides, scores and classes."""
    g = torch.Generator().manual_seed(seed)
    cx = torch.rand(n, generator=g, dtype=torch.float64) * size * 1.67
    cy = torch.rand(n, generator=g, dtype=torch.float64) * size
    w = 10 + torch.rand(n, generator=g, dtype=torch.float64) * 290
    h = 10 + torch.rand(n, generator=g, dtype=torch.float64) * 290
    boxes = torch.stack((cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2), dim=1)
    scores = torch.rand(n, generator=g, dtype=torch.float64)
    classes = torch.randint(0, num_classes, (n,), generator=g)
    return boxes, scores, classes


def ref_nms(boxes: torch.Tensor, scores: torch.Tensor, threshold: float) -> list[int]:
    """Greedy NMS by an explicit loop over score-sorted boxes (Python floats = float64)."""
    b, s = boxes.tolist(), scores.tolist()
    order = sorted(range(len(s)), key=lambda i: -s[i])  # stable: ties keep input order
    kept: list[int] = []
    for i in order:
        suppressed = False
        for j in kept:
            w = max(0.0, min(b[i][2], b[j][2]) - max(b[i][0], b[j][0]))
            h = max(0.0, min(b[i][3], b[j][3]) - max(b[i][1], b[j][1]))
            inter = w * h
            union = (
                (b[j][2] - b[j][0]) * (b[j][3] - b[j][1])
                + (b[i][2] - b[i][0]) * (b[i][3] - b[i][1])
                - inter
            )
            if union > 0 and inter / union > threshold:
                suppressed = True
                break
        if not suppressed:
            kept.append(i)
    return kept


def ref_batched_nms(boxes, scores, classes, threshold) -> list[int]:
    """Per-class loop NMS, merged by descending score (stable on the input index)."""
    kept: list[int] = []
    for c in sorted(set(classes.tolist())):
        members = [i for i, k in enumerate(classes.tolist()) if k == c]
        kept += [members[k] for k in ref_nms(boxes[members], scores[members], threshold)]
    s = scores.tolist()
    return sorted(sorted(kept), key=lambda i: -s[i])


def test_empty_and_single() -> None:
    empty = nms(torch.zeros(0, 4), torch.zeros(0), 0.5)
    assert empty.dtype == torch.int64 and empty.shape == (0,)
    empty = batched_nms(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.int64), 0.5)
    assert empty.dtype == torch.int64 and empty.shape == (0,)
    one = nms(torch.tensor([[1.0, 2.0, 3.0, 4.0]]), torch.tensor([0.3]), 0.5)
    assert one.dtype == torch.int64 and one.tolist() == [0]


def test_hand_worked_example() -> None:
    boxes = torch.tensor(
        [[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30], [0, 0, 10, 9], [21, 20, 31, 30]],
        dtype=torch.float32,
    )
    scores = torch.tensor([0.9, 0.8, 0.7, 0.95, 0.1])
    # 3 (0.95) kept; 0 has IoU 0.9 with 3 -> dropped; 1 vs 3: 72/(100+90-72)=0.61 -> dropped;
    # 2 kept; 4 vs 2: 90/110 -> dropped.
    assert nms(boxes, scores, 0.5).tolist() == [3, 2]
    assert nms(boxes, scores, 0.95).tolist() == [3, 0, 1, 2, 4]


def test_iou_equal_to_threshold_is_not_suppressed() -> None:
    boxes = torch.tensor([[0.0, 0.0, 4.0, 1.0], [0.0, 0.0, 2.0, 1.0]])  # IoU exactly 0.5
    scores = torch.tensor([0.9, 0.8])
    assert nms(boxes, scores, 0.5).tolist() == [0, 1]
    assert nms(boxes, scores, 0.4999).tolist() == [0]
    assert batched_nms(boxes, scores, torch.tensor([3, 3]), 0.5).tolist() == [0, 1]


def test_threshold_compared_in_double_like_the_kernels() -> None:
    # IoU 3/5: in float32 it rounds to 0.6000000238 > 0.6 (suppressed, as torchvision's kernel
    # compares float IoU against a double threshold); in float64 it is exactly 0.6 (kept).
    boxes = torch.tensor([[0.0, 0.0, 5.0, 1.0], [0.0, 0.0, 3.0, 1.0]])
    scores = torch.tensor([0.9, 0.8])
    assert nms(boxes, scores, 0.6).tolist() == [0]
    assert nms(boxes.double(), scores.double(), 0.6).tolist() == [0, 1]


def test_ties_in_score_keep_input_order() -> None:
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 10.5], [50, 50, 60, 60]])
    scores = torch.tensor([0.5, 0.5, 0.5])
    assert nms(boxes, scores, 0.5).tolist() == [0, 2]
    assert nms(boxes[[1, 0, 2]], scores, 0.5).tolist() == [0, 2]
    assert batched_nms(boxes, scores, torch.tensor([1, 0, 1]), 0.5).tolist() == [0, 1, 2]


def test_degenerate_boxes_are_never_suppressed() -> None:
    # Zero-area boxes: 0/0 IoU is not > threshold (same as the compiled kernels).
    boxes = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 2.0, 2.0]])
    assert nms(boxes, torch.tensor([0.9, 0.8, 0.7]), 0.5).tolist() == [0, 1, 2]


@pytest.mark.parametrize("threshold", [0.0, -0.1, 1.0])
def test_extreme_thresholds_with_degenerate_boxes(threshold: float) -> None:
    boxes, scores, classes = detector_like(150, 3, seed=4, size=300.0)
    boxes[::7, 2] = boxes[::7, 0]  # zero-width boxes: 0/0 IoUs among them
    boxes[::11] = boxes[::11, :1].repeat(1, 4)  # point boxes
    expected = ref_batched_nms(boxes, scores, classes, threshold)
    assert batched_nms(boxes, scores, classes, threshold).tolist() == expected


def test_integer_boxes() -> None:
    boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 10, 10], [20, 20, 30, 30]])
    assert nms(boxes, torch.tensor([0.9, 0.8, 0.7]), 0.5).tolist() == [0, 2]


def test_negative_coordinates_across_classes() -> None:
    boxes = torch.tensor([[-100.0, -100.0, 2.0, 2.0], [-100.0, -100.0, 2.0, 2.0]])
    scores = torch.tensor([0.9, 0.8])
    assert batched_nms(boxes, scores, torch.tensor([0, 1]), 0.5).tolist() == [0, 1]
    assert batched_nms(boxes, scores, torch.tensor([1, 1]), 0.5).tolist() == [0]
    boxes, scores, classes = detector_like(150, 4, seed=3)
    boxes = boxes - 700.0  # mostly negative coordinates
    expected = ref_batched_nms(boxes, scores, classes, 0.3)
    assert batched_nms(boxes, scores, classes, 0.3).tolist() == expected


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("seed", range(6))
def test_nms_random_against_loop(seed: int, dtype: torch.dtype) -> None:
    # A small image makes boxes overlap a lot: long suppression chains, several blocks.
    boxes, scores, _ = detector_like(300, 1, seed=seed, size=200.0)
    threshold = [0.3, 0.5, 0.7][seed % 3]
    expected = ref_nms(boxes, scores, threshold)
    got = nms(boxes.to(dtype), scores.to(dtype), threshold)
    assert got.dtype == torch.int64
    assert got.tolist() == expected


@pytest.mark.parametrize("seed", range(6))
def test_batched_nms_random_against_per_class_loop(seed: int) -> None:
    num_classes = [1, 3, 7, 80, 2, 5][seed]
    boxes, scores, classes = detector_like(400, num_classes, seed=seed + 10, size=250.0)
    classes = classes * 7 - 5  # arbitrary (negative, sparse) class ids
    expected = ref_batched_nms(boxes, scores, classes, 0.5)
    assert batched_nms(boxes.float(), scores.float(), classes, 0.5).tolist() == expected


def test_batched_nms_imbalanced_classes() -> None:
    # One class spans several blocks while the others are small (exercises block row pruning).
    big, big_scores, _ = detector_like(260, 1, seed=20, size=150.0)
    small, small_scores, small_cls = detector_like(90, 6, seed=21, size=150.0)
    boxes = torch.cat((small[:45], big, small[45:]))
    scores = torch.cat((small_scores[:45], big_scores, small_scores[45:]))
    classes = torch.cat((small_cls[:45] + 1, torch.zeros(260, dtype=torch.int64), small_cls[45:]))
    expected = ref_batched_nms(boxes, scores, classes, 0.4)
    assert batched_nms(boxes, scores, classes, 0.4).tolist() == expected


def test_one_class_degenerate_case() -> None:
    boxes, scores, _ = detector_like(700, 1, seed=30, size=300.0)
    classes = torch.full((700,), 5, dtype=torch.int64)
    expected = ref_nms(boxes, scores, 0.5)
    assert batched_nms(boxes, scores, classes, 0.5).tolist() == expected
    assert nms(boxes, scores, 0.5).tolist() == expected


def test_batched_nms_gives_same_result_as_nms_per_class() -> None:
    boxes, scores, classes = detector_like(500, 5, seed=40, size=300.0)
    boxes, scores = boxes.float(), scores.float()
    per_class = torch.cat(
        [torch.where(classes == c)[0][nms(boxes[classes == c], scores[classes == c], 0.6)]
         for c in range(5)]
    )
    per_class = per_class[torch.argsort(scores[per_class], descending=True, stable=True)]
    assert torch.equal(batched_nms(boxes, scores, classes, 0.6), per_class)


def test_shape_and_backend_errors() -> None:
    boxes, scores = torch.rand(3, 4), torch.rand(3)
    with pytest.raises(ValueError):
        nms(boxes[:, :3], scores, 0.5)
    with pytest.raises(ValueError):
        nms(boxes, scores[:2], 0.5)
    with pytest.raises(ValueError):
        batched_nms(boxes, scores, torch.zeros(2, dtype=torch.int64), 0.5)
    with pytest.raises(ValueError, match="backend"):
        nms(boxes, scores, 0.5, backend="cuda")
    if not torchvision_available():
        with pytest.raises(RuntimeError):
            nms(boxes, scores, 0.5, backend="torchvision")


def test_torchvision_probe_failure_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    nms_module._torchvision_nms.cache_clear()
    modules = __import__("sys").modules
    monkeypatch.setitem(modules, "torchvision", None)  # import raises
    monkeypatch.setitem(modules, "torchvision.ops", None)  # even if it was imported before
    try:
        assert not torchvision_available()
        boxes, scores, _ = detector_like(50, 1, seed=50, size=200.0)
        assert nms(boxes, scores, 0.5, backend="auto").tolist() == ref_nms(boxes, scores, 0.5)
    finally:
        nms_module._torchvision_nms.cache_clear()


@pytest.mark.skipif(not torchvision_available(), reason="torchvision.ops.nms not usable here")
@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_backends_agree(device: str) -> None:
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    for seed in range(5):
        boxes, scores, classes = detector_like(2000, 20, seed=60 + seed, size=300.0)
        boxes, scores, classes = boxes.to(device), scores.to(device), classes.to(device)
        for fn, args in ((nms, (boxes, scores, 0.5)), (batched_nms, (boxes, scores, classes, 0.5))):
            ours = fn(*args, backend="torch")
            theirs = fn(*args, backend="torchvision")
            assert torch.equal(ours.cpu(), theirs.cpu())
