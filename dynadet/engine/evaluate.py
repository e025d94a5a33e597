"""COCO evaluation: detections → result json → COCOeval metrics (pycocotools or faster-coco-eval).

Metrics follow the papers' convention (AP × 100). A metric that COCOeval leaves undefined (−1, e.g.
APs on a set with no small ground truth) is reported as NaN, and as ``null`` in ``metrics.json``.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from dynadet.engine.distributed import all_gather_object, is_main_process

__all__ = [
    "STAT_NAMES",
    "EvalResult",
    "coco_evaluate",
    "detections_to_coco",
    "evaluate",
    "fast_backend_available",
]

# Order of COCOeval.stats[:12].
STAT_NAMES: tuple[str, ...] = (
    "AP", "AP50", "AP75", "APs", "APm", "APl",
    "AR1", "AR10", "AR100", "ARs", "ARm", "ARl",
)  # fmt: skip


@dataclass
class EvalResult:
    """Outcome of a COCO evaluation.

    Attributes:
        metrics: AP, AP50, AP75, AP90, APs, APm, APl, AR1, AR10, AR100, ARs, ARm, ARl in percent
            (NaN where COCOeval reports −1). AP90 is read from the accumulated precision array
            (IoU 0.90, area all, maxDets 100, mean over categories with ground truth).
        per_class: class name → AP@[.5:.95] in percent, only for categories with ground truth in
            the evaluated images (COCOeval excludes the others from the mean as well).
        summary: the text COCOeval's ``summarize()`` prints (12 lines; faster-coco-eval adds
            AR@0.5 and AR@0.75).
        num_images: number of images evaluated.
        num_detections: number of detections evaluated.
        backend: ``"pycocotools"`` or ``"faster_coco_eval"``.
    """

    metrics: dict[str, float]
    per_class: dict[str, float]
    summary: str = ""
    num_images: int = 0
    num_detections: int = 0
    backend: str = "pycocotools"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (NaN → None)."""
        return {
            "metrics": {k: _nan_to_none(v) for k, v in self.metrics.items()},
            "per_class": {k: _nan_to_none(v) for k, v in self.per_class.items()},
            "summary": self.summary,
            "num_images": self.num_images,
            "num_detections": self.num_detections,
            "backend": self.backend,
        }

    def to_markdown(self, digits: int = 1) -> str:
        """A one-row metrics table followed by a per-class AP table."""
        names = list(self.metrics)
        lines = [
            "| " + " | ".join(names) + " |",
            "|" + "---:|" * len(names),
            "| " + " | ".join(_fmt(self.metrics[k], digits) for k in names) + " |",
            "",
            "| class | AP |",
            "|:---|---:|",
        ]
        lines += [f"| {name} | {_fmt(ap, digits)} |" for name, ap in self.per_class.items()]
        return "\n".join(lines) + "\n"


def _nan_to_none(v: float) -> float | None:
    return None if math.isnan(v) else v


def _fmt(v: float, digits: int) -> str:
    return "n/a" if math.isnan(v) else f"{v:.{digits}f}"


def fast_backend_available() -> bool:
    """Whether ``faster_coco_eval`` imports (optional C++ COCOeval, identical numbers)."""
    return _import_fast() is not None


def _import_fast() -> Any | None:
    try:
        import faster_coco_eval
    except Exception:  # noqa: BLE001 - a broken optional wheel must fall back, not crash
        return None
    return faster_coco_eval


def detections_to_coco(
    results: Sequence[Mapping[str, Tensor]],
    image_ids: Sequence[int | Tensor],
    category_ids: Sequence[int],
) -> list[dict[str, Any]]:
    """Convert per-image model outputs to COCO result-json entries.

    Args:
        results: per image ``{"boxes": [K, 4] xyxy original-image pixels, "scores": [K],
            "labels": [K] int64 in 0..C-1}`` (any device).
        image_ids: the COCO image id of each result.
        category_ids: label k → COCO category id (length C).

    Returns:
        ``{"image_id": int, "category_id": int, "bbox": [x, y, w, h], "score": float}`` per
        detection, ``w = x2 − x1`` (no +1). Values are not rounded: float32 model outputs are
        converted exactly to Python floats, so evaluating the json equals evaluating the tensors.
    """
    if len(results) != len(image_ids):
        raise ValueError(f"{len(results)} results but {len(image_ids)} image ids")
    lut = torch.as_tensor(list(category_ids), dtype=torch.int64)
    out: list[dict[str, Any]] = []
    for res, image_id in zip(results, image_ids, strict=True):
        boxes = res["boxes"].detach().reshape(-1, 4).to("cpu", torch.float64)
        scores = res["scores"].detach().reshape(-1).to("cpu", torch.float64)
        labels = res["labels"].detach().reshape(-1).to("cpu", torch.int64)
        if not (len(boxes) == len(scores) == len(labels)):
            raise ValueError(
                f"image {int(image_id)}: {len(boxes)} boxes, {len(scores)} scores, "
                f"{len(labels)} labels"
            )
        if len(labels) == 0:
            continue
        if labels.min() < 0 or labels.max() >= len(lut):
            raise ValueError(
                f"image {int(image_id)}: labels must lie in [0, {len(lut)}), got "
                f"[{int(labels.min())}, {int(labels.max())}] (num_classes mismatch?)"
            )
        xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
        cats = lut[labels].tolist()
        img = int(image_id)
        out += [
            {"image_id": img, "category_id": c, "bbox": b, "score": s}
            for b, s, c in zip(xywh, scores.tolist(), cats, strict=True)
        ]
    return out


def _empty_results(coco_gt: Any, coco_cls: type) -> Any:
    """A result COCO object with no annotations (pycocotools' ``loadRes([])`` raises)."""
    res = coco_cls()
    res.dataset = {
        "images": list(coco_gt.dataset["images"]),
        "categories": copy.deepcopy(coco_gt.dataset.get("categories", [])),
        "annotations": [],
    }
    res.createIndex()
    return res


def _check_ids(
    coco_gt: Any, detections: Sequence[Mapping[str, Any]], image_ids: Iterable[int] | None
) -> list[int]:
    """Validate image/category ids; return the sorted image ids to evaluate."""
    gt_images = set(coco_gt.getImgIds())
    if image_ids is None:
        eval_ids = sorted(gt_images)
    else:
        eval_ids = sorted({int(i) for i in image_ids})
        missing = set(eval_ids) - gt_images
        if missing:
            raise ValueError(f"image ids not in the ground truth: {sorted(missing)[:10]}")
    det_images = {d["image_id"] for d in detections}
    unknown = det_images - gt_images
    if unknown:
        raise ValueError(
            f"{len(unknown)} detection image ids are not in the ground truth, e.g. "
            f"{sorted(unknown)[:10]} (image ids must be COCO image ids, not data set indices)"
        )
    outside = det_images - set(eval_ids)
    if outside:
        raise ValueError(f"detections on images outside image_ids: {sorted(outside)[:10]}")
    unknown_cats = {d["category_id"] for d in detections} - set(coco_gt.getCatIds())
    if unknown_cats:
        raise ValueError(
            f"detection category ids not in the ground truth: {sorted(unknown_cats)[:10]} "
            "(labels must be mapped to COCO category ids)"
        )
    return eval_ids


def _run_pycocotools(
    coco_gt: Any, dets: list[dict], iou_type: str, img_ids: list[int]
) -> tuple[Any, str]:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        if not isinstance(coco_gt, COCO):
            gt = COCO()
            gt.dataset = coco_gt.dataset
            gt.createIndex()
            coco_gt = gt
        coco_dt = coco_gt.loadRes(dets) if dets else _empty_results(coco_gt, COCO)
        ev = COCOeval(coco_gt, coco_dt, iou_type)
        ev.params.imgIds = img_ids
        ev.evaluate()
        ev.accumulate()
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        ev.summarize()
    return ev, buf.getvalue()


def _run_fast(
    fce: Any, coco_gt: Any, dets: list[dict], iou_type: str, img_ids: list[int]
) -> tuple[Any, str]:
    lines: list[str] = []

    def collect(*args: Any, **_: Any) -> None:
        lines.append(" ".join(str(a) for a in args))

    with contextlib.redirect_stdout(io.StringIO()):
        gt = fce.COCO(coco_gt.dataset, print_function=collect)
        coco_dt = gt.loadRes(dets)
        ev = fce.COCOeval_faster(gt, coco_dt, iou_type, print_function=collect)
        ev.params.imgIds = img_ids
        ev.evaluate()
        ev.accumulate()
        lines.clear()
        ev.summarize()
    return ev, "\n".join(lines) + "\n"


def coco_evaluate(
    coco_gt: Any,
    detections: Sequence[Mapping[str, Any]],
    iou_type: str = "bbox",
    use_fast: bool | None = None,
    image_ids: Iterable[int] | None = None,
    category_names: Mapping[int, str] | None = None,
) -> EvalResult:
    """Run COCOeval on result-json detections.

    Args:
        coco_gt: ground truth (a pycocotools ``COCO``; anything with ``.dataset`` is rebuilt).
        detections: result-json entries (see :func:`detections_to_coco`); not modified.
        iou_type: ``"bbox"`` or ``"segm"``.
        use_fast: use faster-coco-eval when installed (None or True); False forces pycocotools.
        image_ids: restrict evaluation to these images (default: every ground-truth image).
        category_names: category id → name for the per-class table (default: GT names).

    Returns:
        :class:`EvalResult`. Zero detections give 0 for every metric with ground truth, without
        calling pycocotools' crashing ``loadRes([])``.

    Raises:
        ValueError: detections on image ids not in the ground truth (or outside ``image_ids``),
            or with category ids the ground truth lacks.
    """
    if iou_type not in ("bbox", "segm"):
        raise ValueError(f"iou_type must be 'bbox' or 'segm', got {iou_type!r}")
    img_ids = _check_ids(coco_gt, detections, image_ids)
    # loadRes writes area/id/iscrowd/segmentation into the dicts: give it copies.
    dets = [{**d, "bbox": list(d["bbox"])} if "bbox" in d else dict(d) for d in detections]

    fce = _import_fast() if use_fast is not False else None
    if use_fast and fce is None:
        warnings.warn("faster_coco_eval is not installed; using pycocotools", stacklevel=2)
    if fce is not None:
        ev, summary = _run_fast(fce, coco_gt, dets, iou_type, img_ids)
        backend = "faster_coco_eval"
    else:
        ev, summary = _run_pycocotools(coco_gt, dets, iou_type, img_ids)
        backend = "pycocotools"

    stats = np.asarray(ev.stats, dtype=np.float64)[: len(STAT_NAMES)]
    coco_stats = {k: _percent(v) for k, v in zip(STAT_NAMES, stats, strict=True)}

    # precision: [T iou thresholds, R recall thresholds, K categories, A areas, M maxDets]
    precision = np.asarray(ev.eval["precision"], dtype=np.float64)
    params = ev.params
    iou_thrs = np.asarray(params.iouThrs, dtype=np.float64)
    t90 = int(np.argmin(np.abs(iou_thrs - 0.9)))
    if not math.isclose(iou_thrs[t90], 0.9, abs_tol=1e-9):
        raise RuntimeError(f"IoU threshold 0.9 missing from {iou_thrs}")
    area_all = list(params.areaRngLbl).index("all")
    max100 = list(params.maxDets).index(100)
    ap90 = _percent(_valid_mean(precision[t90, :, :, area_all, max100]))
    metrics = {**{k: coco_stats[k] for k in STAT_NAMES[:3]}, "AP90": ap90}
    metrics.update({k: coco_stats[k] for k in STAT_NAMES[3:]})

    gt_cats = {c["id"]: c["name"] for c in coco_gt.loadCats(coco_gt.getCatIds())}
    names = {**gt_cats, **(category_names or {})}
    per_class: dict[str, float] = {}
    for k, cat_id in enumerate(params.catIds):
        p = precision[:, :, k, area_all, max100]
        if (p > -1).any():
            per_class[names[cat_id]] = _percent(_valid_mean(p))

    return EvalResult(
        metrics=metrics,
        per_class=per_class,
        summary=summary,
        num_images=len(img_ids),
        num_detections=len(dets),
        backend=backend,
    )


def _valid_mean(a: np.ndarray) -> float:
    valid = a[a > -1]
    return float(valid.mean()) if valid.size else -1.0


def _percent(v: float) -> float:
    return float("nan") if v < 0 else float(v) * 100.0


def _num_images(loader: Iterable) -> int | None:
    sampler = getattr(loader, "sampler", None)
    if sampler is not None:
        try:
            return len(sampler)
        except TypeError:
            return None
    if isinstance(loader, (list, tuple)):
        return sum(len(images) for images, _ in loader)
    return None


def evaluate(
    model: nn.Module,
    loader: Iterable[tuple[list[Tensor], list[dict[str, Any]]]],
    coco_gt: Any,
    category_ids: Sequence[int],
    class_names: Sequence[str],
    output_dir: Path | str | None = None,
    progress: bool = True,
    device: torch.device | str = "cpu",
) -> EvalResult | None:
    """Run a detector over an eval loader and COCO-evaluate its predictions.

    Every rank must call this with its own shard of the data (each image on exactly one rank);
    predictions are gathered to rank 0, which evaluates and writes ``results.json``,
    ``metrics.json`` and ``metrics.md`` to ``output_dir``. The model must already be on ``device``;
    images are moved there. Only the evaluated image ids enter COCOeval, so a subset works.

    Args:
        model: returns per image ``{"boxes": [K, 4] xyxy, "scores": [K], "labels": [K]}`` in
            eval mode, given ``list[Tensor[3, H, W]]``.
        loader: yields ``(images: list[Tensor[3, H, W]], targets: list[dict])`` with
            ``target["image_id"]`` the COCO image id.
        coco_gt: pycocotools ``COCO`` of the ground truth.
        category_ids: label k → COCO category id.
        class_names: label k → class name (per-class table).

    Returns:
        :class:`EvalResult` on rank 0, None on other ranks.
    """
    if len(category_ids) != len(class_names):
        raise ValueError(f"{len(category_ids)} category ids but {len(class_names)} class names")
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    local: list[tuple[int, list[dict[str, Any]]]] = []
    bar = tqdm(
        total=_num_images(loader),
        unit="img",
        desc="eval",
        disable=not (progress and is_main_process()),
        dynamic_ncols=True,
    )
    try:
        with torch.inference_mode():
            for images, targets in loader:
                outputs = model([img.to(device, non_blocking=True) for img in images])
                if len(outputs) != len(targets):
                    raise ValueError(f"model returned {len(outputs)} results for {len(targets)}")
                for out, target in zip(outputs, targets, strict=True):
                    image_id = int(target["image_id"])
                    local.append((image_id, detections_to_coco([out], [image_id], category_ids)))
                bar.update(len(images))
    finally:
        bar.close()
        # Per-module restore keeps submodules that were deliberately in eval mode (frozen BN).
        for m, mode in modes:
            m.training = mode

    gathered = all_gather_object(local)
    if not is_main_process():
        return None

    merged: dict[int, list[dict[str, Any]]] = {}
    duplicates = 0
    for rank_items in gathered:
        for image_id, dets in rank_items:
            if image_id in merged:
                duplicates += 1  # e.g. a padding DistributedSampler; keep the first copy
                continue
            merged[image_id] = dets
    if duplicates:
        warnings.warn(
            f"{duplicates} images were evaluated more than once; kept one copy", stacklevel=2
        )
    image_ids = sorted(merged)
    detections = [d for i in image_ids for d in merged[i]]
    stray = {d["image_id"] for d in detections} - merged.keys()
    assert not stray, f"detections on images that were not evaluated: {sorted(stray)[:10]}"

    result = coco_evaluate(
        coco_gt,
        detections,
        image_ids=image_ids,
        category_names=dict(zip(category_ids, class_names, strict=True)),
    )
    if output_dir is not None:
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(detections, separators=(",", ":")))
        (out / "metrics.json").write_text(json.dumps(result.to_dict(), indent=2) + "\n")
        (out / "metrics.md").write_text(result.to_markdown())
    return result
