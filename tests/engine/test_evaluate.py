"""COCO evaluation: hand-worked COCOeval cases, an independent loop reference, evaluate()."""

from __future__ import annotations

import contextlib
import io
import json
import math
import random
from pathlib import Path
from typing import Any

import pytest
import torch
from pycocotools.coco import COCO
from torch import Tensor, nn

from dynadet.engine.evaluate import (
    STAT_NAMES,
    EvalResult,
    coco_evaluate,
    detections_to_coco,
    evaluate,
    fast_backend_available,
)

BACKENDS = [
    False,
    pytest.param(
        True,
        marks=pytest.mark.skipif(
            not fast_backend_available(), reason="faster-coco-eval not installed"
        ),
    ),
]
ALL_METRICS = (*STAT_NAMES[:3], "AP90", *STAT_NAMES[3:])


# ---------------------------------------------------------------------------------------------
# Helpers shared with test_distributed.py
# ---------------------------------------------------------------------------------------------


def make_gt(
    annotations: list[dict[str, Any]],
    num_images: int = 1,
    categories: tuple[tuple[int, str], ...] = ((1, "cat"),),
    size: int = 640,
) -> COCO:
    """A pycocotools COCO built in memory; annotations need image_id, category_id, bbox (xywh)."""
    anns = []
    for i, a in enumerate(annotations, start=1):
        x, y, w, h = a["bbox"]
        anns.append({"id": i, "iscrowd": 0, "area": w * h, **a, "bbox": [x, y, w, h]})
    dataset = {
        "images": [{"id": i, "width": size, "height": size} for i in range(1, num_images + 1)],
        "categories": [{"id": c, "name": n} for c, n in categories],
        "annotations": anns,
    }
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = dataset
        coco.createIndex()
    return coco


def det(image_id: int, bbox: list[float], score: float = 0.9, category_id: int = 1) -> dict:
    return {"image_id": image_id, "category_id": category_id, "bbox": bbox, "score": score}


def xyxy(b: list[float]) -> list[float]:
    return [b[0], b[1], b[0] + b[2], b[1] + b[3]]


class FakeDetector(nn.Module):
    """Returns fixed predictions per image id; the id is encoded as the value of pixel (0, 0, 0)."""

    def __init__(self, predictions: dict[int, dict[str, Tensor]]) -> None:
        super().__init__()
        self.predictions = predictions
        self.body = nn.Sequential(nn.Conv2d(3, 1, 1), nn.BatchNorm2d(1))
        self.seen_inference_mode: list[bool] = []
        self.seen_training: list[bool] = []

    def forward(self, images: list[Tensor]) -> list[dict[str, Tensor]]:
        self.seen_inference_mode.append(torch.is_inference_mode_enabled())
        self.seen_training.append(self.training or any(m.training for m in self.modules()))
        return [self.predictions[int(img[0, 0, 0])] for img in images]


def image_for(image_id: int) -> Tensor:
    return torch.full((3, 8, 8), float(image_id))


def six_image_setup() -> tuple[COCO, dict[int, dict[str, Tensor]]]:
    """6 images, 2 categories (ids 3, 7), a mix of hits, misses, false positives and loose boxes."""
    rng = random.Random(0)
    anns, preds = [], {}
    for img in range(1, 7):
        boxes, scores, labels = [], [], []
        for k, cat in enumerate((3, 7)):
            for _ in range(2):
                x, y = rng.uniform(0, 400), rng.uniform(0, 400)
                size = rng.choice([20.0, 60.0, 150.0])  # small, medium, large
                w, h = size * rng.uniform(0.7, 1.3), size * rng.uniform(0.7, 1.3)
                anns.append({"image_id": img, "category_id": cat, "bbox": [x, y, w, h]})
                if rng.random() < 0.8:
                    jitter = rng.choice([0.02, 0.06, 0.2])
                    j = [rng.uniform(-jitter, jitter) * s for s in (w, h, w, h)]
                    boxes.append([x + j[0], y + j[1], x + w + j[2], y + h + j[3]])
                    scores.append(rng.random())
                    labels.append(k)
            boxes.append([rng.uniform(0, 300)] * 2 + [rng.uniform(310, 600)] * 2)
            scores.append(rng.random())
            labels.append(k)
        preds[img] = {
            "boxes": torch.tensor(boxes, dtype=torch.float32),
            "scores": torch.tensor(scores, dtype=torch.float32),
            "labels": torch.tensor(labels, dtype=torch.int64),
        }
    return make_gt(anns, num_images=6, categories=((3, "three"), (7, "seven"))), preds


# ---------------------------------------------------------------------------------------------
# Independent reference: COCOeval's rules for non-crowd GT, area "all", maxDets 100, by loops
# ---------------------------------------------------------------------------------------------


def ref_iou(a: list[float], b: list[float]) -> float:
    iw = min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0])
    ih = min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1])
    inter = max(iw, 0.0) * max(ih, 0.0)
    return inter / (a[2] * a[3] + b[2] * b[3] - inter)


def ref_ap(
    gts: dict[int, list[list[float]]], dts: dict[int, list[tuple[float, list[float]]]], thr: float
) -> float:
    """101-point interpolated AP of one category at one IoU threshold (-1 without GT)."""
    npos = sum(len(g) for g in gts.values())
    if npos == 0:
        return -1.0
    flags: list[tuple[float, int, bool]] = []  # (score, order, is_tp)
    order = 0
    for img in sorted(set(gts) | set(dts)):
        g = gts.get(img, [])
        d = sorted(dts.get(img, []), key=lambda sd: -sd[0])[:100]
        used = [False] * len(g)
        for score, box in d:
            best, best_iou = -1, min(thr, 1 - 1e-10)
            for j, gb in enumerate(g):
                iou = ref_iou(box, gb)
                if not used[j] and iou >= best_iou:
                    best, best_iou = j, iou
            if best >= 0:
                used[best] = True
            flags.append((score, order, best >= 0))
            order += 1
    flags.sort(key=lambda f: (-f[0], f[1]))
    tp = fp = 0
    recall, precision = [], []
    for _, _, is_tp in flags:
        tp += is_tp
        fp += not is_tp
        recall.append(tp / npos)
        precision.append(tp / (tp + fp))
    for i in range(len(precision) - 2, -1, -1):
        precision[i] = max(precision[i], precision[i + 1])
    total = 0.0
    for r in range(101):
        idx = next((i for i, rc in enumerate(recall) if rc >= r / 100 - 1e-12), None)
        total += precision[idx] if idx is not None else 0.0
    return total / 101


# ---------------------------------------------------------------------------------------------
# detections_to_coco
# ---------------------------------------------------------------------------------------------


def test_detections_to_coco_converts_boxes_labels_and_types() -> None:
    results = [
        {
            "boxes": torch.tensor([[10.5, 20.25, 30.5, 60.0], [0.0, 0.0, 1.0, 2.0]]),
            "scores": torch.tensor([0.75, 0.125]),
            "labels": torch.tensor([1, 0]),
        },
        {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0).long()},
    ]
    out = detections_to_coco(results, [torch.tensor(42), 43], category_ids=[5, 9])
    assert out == [
        {"image_id": 42, "category_id": 9, "bbox": [10.5, 20.25, 20.0, 39.75], "score": 0.75},
        {"image_id": 42, "category_id": 5, "bbox": [0.0, 0.0, 1.0, 2.0], "score": 0.125},
    ]
    for d in out:
        assert type(d["image_id"]) is int and type(d["category_id"]) is int
        assert type(d["score"]) is float and all(type(v) is float for v in d["bbox"])
    json.dumps(out)


def test_detections_to_coco_is_exact_for_float32() -> None:
    boxes = torch.tensor([[1.1, 2.2, 333.3, 444.4]], dtype=torch.float32)
    score = torch.tensor([0.123456789], dtype=torch.float32)
    (d,) = detections_to_coco(
        [{"boxes": boxes, "scores": score, "labels": torch.tensor([0])}], [1], [1]
    )
    assert d["score"] == float(score[0])
    assert d["bbox"][:2] == [float(boxes[0, 0]), float(boxes[0, 1])]
    assert d["bbox"][2] == float(boxes[0, 2].double() - boxes[0, 0].double())


def test_detections_to_coco_rejects_bad_labels() -> None:
    res = {"boxes": torch.zeros(1, 4), "scores": torch.ones(1), "labels": torch.tensor([2])}
    with pytest.raises(ValueError, match="labels must lie"):
        detections_to_coco([res], [1], [1, 2])
    with pytest.raises(ValueError, match="image ids"):
        detections_to_coco([res], [1, 2], [1, 2, 3])


# ---------------------------------------------------------------------------------------------
# coco_evaluate: hand-worked cases
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("use_fast", BACKENDS)
def test_perfect_detections_give_100(use_fast: bool) -> None:
    boxes = [[10, 10, 20, 20], [100, 100, 50, 60], [200, 200, 150, 150]]  # small, medium, large
    gt = make_gt(
        [{"image_id": i, "category_id": 1, "bbox": b} for i, b in enumerate(boxes, 1)], num_images=3
    )
    res = coco_evaluate(gt, [det(i, b) for i, b in enumerate(boxes, 1)], use_fast=use_fast)
    assert isinstance(res, EvalResult)
    assert list(res.metrics) == list(ALL_METRICS)
    for name in ALL_METRICS:
        assert res.metrics[name] == pytest.approx(100.0), name
    assert res.per_class == {"cat": pytest.approx(100.0)}
    assert res.num_images == 3 and res.num_detections == 3
    assert "Average Precision" in res.summary and res.summary.count("\n") >= 12


@pytest.mark.parametrize("use_fast", BACKENDS)
def test_half_recall_gives_51_over_101(use_fast: bool) -> None:
    gt = make_gt(
        [
            {"image_id": 1, "category_id": 1, "bbox": [0, 0, 50, 50]},
            {"image_id": 1, "category_id": 1, "bbox": [200, 200, 50, 50]},
        ]
    )
    res = coco_evaluate(gt, [det(1, [0, 0, 50, 50])], use_fast=use_fast)
    # Precision 1 for recall thresholds 0.00..0.50 (51 of 101 points), 0 beyond the max recall.
    for name in ("AP", "AP50", "AP75", "AP90", "APm"):
        assert res.metrics[name] == pytest.approx(51 / 101 * 100, abs=1e-9), name
    for name in ("AR1", "AR10", "AR100", "ARm"):
        assert res.metrics[name] == pytest.approx(50.0), name
    assert math.isnan(res.metrics["APs"]) and math.isnan(res.metrics["APl"])


@pytest.mark.parametrize("use_fast", BACKENDS)
def test_iou_088_counts_only_at_thresholds_up_to_085(use_fast: bool) -> None:
    gt = make_gt([{"image_id": 1, "category_id": 1, "bbox": [0, 0, 100, 100]}])
    d = det(1, [0, 0, 88, 100])  # IoU = 8800 / 10000 = 0.88
    res = coco_evaluate(gt, [d], use_fast=use_fast)
    assert res.metrics["AP50"] == pytest.approx(100.0)
    assert res.metrics["AP75"] == pytest.approx(100.0)
    assert res.metrics["AP90"] == pytest.approx(0.0)
    assert res.metrics["AP"] == pytest.approx(80.0)  # thresholds 0.50..0.85: 8 of 10
    assert res.metrics["AR100"] == pytest.approx(80.0)


@pytest.mark.parametrize("use_fast", BACKENDS)
def test_area_ranges_use_the_gt_area_field(use_fast: bool) -> None:
    # A 50×50 box whose annotation says area 500 counts as small (as a mask area would); the
    # 200×200 box is large and missed.
    gt = make_gt(
        [
            {"image_id": 1, "category_id": 1, "bbox": [0, 0, 50, 50], "area": 500.0},
            {"image_id": 1, "category_id": 1, "bbox": [300, 300, 200, 200]},
        ]
    )
    res = coco_evaluate(gt, [det(1, [0, 0, 50, 50])], use_fast=use_fast)
    assert res.metrics["APs"] == pytest.approx(100.0)
    assert res.metrics["ARs"] == pytest.approx(100.0)
    assert math.isnan(res.metrics["APm"]) and math.isnan(res.metrics["ARm"])
    assert res.metrics["APl"] == pytest.approx(0.0)
    assert res.metrics["AP"] == pytest.approx(51 / 101 * 100)


@pytest.mark.parametrize("use_fast", BACKENDS)
def test_crowd_gt_is_ignored(use_fast: bool) -> None:
    gt = make_gt(
        [
            {"image_id": 1, "category_id": 1, "bbox": [0, 0, 50, 50]},
            {"image_id": 1, "category_id": 1, "bbox": [200, 200, 100, 100], "iscrowd": 1},
        ]
    )
    # The crowd region is not detected (no recall penalty) and a higher-scored detection inside it
    # matches the crowd (IoU = intersection / detection area = 1) and is ignored, not a false
    # positive.
    dets = [det(1, [210, 210, 50, 50], score=0.95), det(1, [0, 0, 50, 50], score=0.9)]
    res = coco_evaluate(gt, dets, use_fast=use_fast)
    assert res.metrics["AP"] == pytest.approx(100.0)
    assert res.metrics["AR100"] == pytest.approx(100.0)
    # Control: the same detection outside any crowd is a false positive ranked first.
    gt2 = make_gt([{"image_id": 1, "category_id": 1, "bbox": [0, 0, 50, 50]}])
    res2 = coco_evaluate(gt2, dets, use_fast=use_fast)
    assert res2.metrics["AP"] == pytest.approx(50.0)


@pytest.mark.parametrize("use_fast", BACKENDS)
def test_zero_detections_give_zeros(use_fast: bool) -> None:
    boxes = [[10, 10, 20, 20], [100, 100, 50, 60], [200, 200, 150, 150]]
    gt = make_gt(
        [
            {"image_id": 1, "category_id": c, "bbox": b}
            for c, b in zip((1, 1, 2), boxes, strict=True)
        ],
        categories=((1, "a"), (2, "b"), (3, "no_gt")),
    )
    res = coco_evaluate(gt, [], use_fast=use_fast)
    assert res.metrics == {name: 0.0 for name in ALL_METRICS}
    assert res.per_class == {"a": 0.0, "b": 0.0}
    assert res.num_detections == 0 and "Average Precision" in res.summary
    json.dumps(res.to_dict())
    assert "| a | 0.0 |" in res.to_markdown()


def test_unknown_image_or_category_raises() -> None:
    gt = make_gt([{"image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10]}], num_images=2)
    with pytest.raises(ValueError, match="not in the ground truth"):
        coco_evaluate(gt, [det(99, [0, 0, 10, 10])])
    with pytest.raises(ValueError, match="category ids"):
        coco_evaluate(gt, [det(1, [0, 0, 10, 10], category_id=5)])
    with pytest.raises(ValueError, match="outside image_ids"):
        coco_evaluate(gt, [det(2, [0, 0, 10, 10])], image_ids=[1])
    with pytest.raises(ValueError, match="iou_type"):
        coco_evaluate(gt, [], iou_type="keypoints")


@pytest.mark.parametrize("use_fast", BACKENDS)
def test_per_class_table_and_categories_without_gt(use_fast: bool) -> None:
    gt = make_gt(
        [
            {"image_id": 1, "category_id": 4, "bbox": [0, 0, 40, 40]},
            {"image_id": 1, "category_id": 8, "bbox": [100, 100, 40, 40]},
            {"image_id": 2, "category_id": 8, "bbox": [100, 100, 40, 40]},
        ],
        num_images=2,
        categories=((4, "four"), (8, "eight"), (9, "nine")),
    )
    dets = [
        det(1, [0, 0, 40, 40], category_id=4),
        det(2, [100, 100, 40, 40], category_id=8),
        det(1, [300, 300, 40, 40], category_id=9),
    ]  # category 9 has no GT: excluded
    res = coco_evaluate(gt, dets, use_fast=use_fast, category_names={4: "FOUR"})
    assert res.per_class == {"FOUR": pytest.approx(100.0), "eight": pytest.approx(51 / 101 * 100)}
    assert res.metrics["AP"] == pytest.approx((100 + 51 / 101 * 100) / 2)
    md = res.to_markdown(digits=2)
    assert "| eight | 50.50 |" in md and "| AP | AP50 |" in md


def test_image_ids_restrict_the_evaluation() -> None:
    gt = make_gt(
        [
            {"image_id": 1, "category_id": 1, "bbox": [0, 0, 40, 40]},
            {"image_id": 2, "category_id": 1, "bbox": [0, 0, 40, 40]},
        ],
        num_images=2,
    )
    dets = [det(1, [0, 0, 40, 40])]
    assert coco_evaluate(gt, dets, image_ids=[1]).metrics["AP"] == pytest.approx(100.0)
    assert coco_evaluate(gt, dets).metrics["AP"] == pytest.approx(51 / 101 * 100)


def test_input_detections_are_not_modified() -> None:
    gt = make_gt([{"image_id": 1, "category_id": 1, "bbox": [0, 0, 40, 40]}])
    dets = [det(1, [0, 0, 40, 40])]
    snapshot = json.dumps(dets)
    coco_evaluate(gt, dets, use_fast=False)
    coco_evaluate(gt, dets)
    assert json.dumps(dets) == snapshot


@pytest.mark.parametrize("use_fast", BACKENDS)
def test_matches_independent_loop_reference(use_fast: bool) -> None:
    gt, preds = six_image_setup()
    cat_ids = [3, 7]
    dets = detections_to_coco([preds[i] for i in range(1, 7)], list(range(1, 7)), cat_ids)
    res = coco_evaluate(gt, dets, use_fast=use_fast)

    thresholds = [0.5 + 0.05 * i for i in range(10)]
    table = {}
    for cat in cat_ids:
        gts: dict[int, list] = {}
        for a in gt.dataset["annotations"]:
            if a["category_id"] == cat:
                gts.setdefault(a["image_id"], []).append(a["bbox"])
        dts: dict[int, list] = {}
        for d in dets:
            if d["category_id"] == cat:
                dts.setdefault(d["image_id"], []).append((d["score"], d["bbox"]))
        table[cat] = [ref_ap(gts, dts, t) for t in thresholds]
    per_class = {name: 100 * sum(table[c]) / 10 for c, name in ((3, "three"), (7, "seven"))}
    assert res.per_class == pytest.approx(per_class, abs=1e-9)
    assert res.metrics["AP"] == pytest.approx(sum(per_class.values()) / 2, abs=1e-9)
    for name, t in (("AP50", 0), ("AP75", 5), ("AP90", 8)):
        assert res.metrics[name] == pytest.approx(50 * (table[3][t] + table[7][t]), abs=1e-9)
    assert 0 < res.metrics["AP90"] < res.metrics["AP75"] < res.metrics["AP50"] < 100


def test_fast_backend_equals_pycocotools() -> None:
    pytest.importorskip("faster_coco_eval")
    gt, preds = six_image_setup()
    dets = detections_to_coco([preds[i] for i in range(1, 7)], list(range(1, 7)), [3, 7])
    slow = coco_evaluate(gt, dets, use_fast=False)
    fast = coco_evaluate(gt, dets, use_fast=True)
    assert (slow.backend, fast.backend) == ("pycocotools", "faster_coco_eval")
    assert fast.metrics == pytest.approx(slow.metrics, abs=1e-9, nan_ok=True)
    assert fast.per_class == pytest.approx(slow.per_class, abs=1e-9)
    first_line_value = [r.summary.splitlines()[0].split("=")[-1] for r in (slow, fast)]
    assert first_line_value[0] == first_line_value[1]


# ---------------------------------------------------------------------------------------------
# evaluate(): the loader loop
# ---------------------------------------------------------------------------------------------


def test_evaluate_writes_files_and_restores_modes(tmp_path: Path) -> None:
    gt, preds = six_image_setup()
    model = FakeDetector(preds)
    model.train()
    model.body[1].eval()  # e.g. frozen BN inside a training model: must stay in eval mode
    loader = [
        ([image_for(1), image_for(2)], [{"image_id": 1}, {"image_id": torch.tensor(2)}]),
        ([image_for(3)], [{"image_id": 3}]),
    ]
    res = evaluate(
        model, loader, gt, [3, 7], ["three", "seven"], output_dir=tmp_path / "ev", progress=False
    )
    assert res is not None
    assert model.training and model.body.training and not model.body[1].training
    assert model.seen_inference_mode == [True, True] and model.seen_training == [False, False]

    dets = detections_to_coco([preds[i] for i in (1, 2, 3)], [1, 2, 3], [3, 7])
    assert json.loads((tmp_path / "ev" / "results.json").read_text()) == dets
    expected = coco_evaluate(gt, dets, image_ids=[1, 2, 3])
    assert res.metrics == pytest.approx(expected.metrics, nan_ok=True)
    assert res.num_images == 3
    saved = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert saved["metrics"]["AP"] == pytest.approx(res.metrics["AP"])
    assert saved["per_class"] == pytest.approx(res.per_class)
    assert "| three |" in (tmp_path / "ev" / "metrics.md").read_text()
    # Images 4..6 were not evaluated, so their GT must not count as misses.
    assert res.metrics["AR100"] > coco_evaluate(gt, dets).metrics["AR100"]


def test_evaluate_deduplicates_repeated_images() -> None:
    gt, preds = six_image_setup()
    once = [([image_for(i)], [{"image_id": i}]) for i in range(1, 7)]
    twice = once + [([image_for(2)], [{"image_id": 2}])]
    ref = evaluate(FakeDetector(preds), once, gt, [3, 7], ["three", "seven"], progress=False)
    with pytest.warns(UserWarning, match="more than once"):
        res = evaluate(FakeDetector(preds), twice, gt, [3, 7], ["three", "seven"], progress=False)
    assert res is not None and ref is not None
    assert res.metrics == pytest.approx(ref.metrics, nan_ok=True)
    assert res.num_detections == ref.num_detections


def test_evaluate_restores_mode_on_error() -> None:
    gt, preds = six_image_setup()
    model = FakeDetector(preds).train()
    with pytest.raises(KeyError):
        evaluate(
            model, [([image_for(9)], [{"image_id": 9}])], gt, [3, 7], ["a", "b"], progress=False
        )
    assert all(m.training for m in model.modules())


def test_use_fast_without_the_package_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    import dynadet.engine.evaluate as ev

    monkeypatch.setattr(ev, "_import_fast", lambda: None)
    gt = make_gt([{"image_id": 1, "category_id": 1, "bbox": [0, 0, 40, 40]}])
    assert coco_evaluate(gt, [det(1, [0, 0, 40, 40])]).backend == "pycocotools"
    with pytest.warns(UserWarning, match="not installed"):
        res = coco_evaluate(gt, [], use_fast=True)
    assert res.backend == "pycocotools" and res.metrics["AP"] == 0.0


def test_evaluate_with_a_dataloader_and_progress_bar(capsys: pytest.CaptureFixture) -> None:
    gt, preds = six_image_setup()
    items = [(image_for(i), {"image_id": i}) for i in range(1, 7)]
    loader = torch.utils.data.DataLoader(
        items, batch_size=4, collate_fn=lambda batch: tuple(map(list, zip(*batch, strict=True)))
    )
    res = evaluate(FakeDetector(preds), loader, gt, [3, 7], ["three", "seven"], progress=True)
    assert res is not None and res.num_images == 6
    assert "6/6" in capsys.readouterr().err
