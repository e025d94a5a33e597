"""COCO-format detection data set with up-front validation and counted repairs.

Bad input policy (design doc, "Quality bar"): annotation problems that cannot be repaired raise
:class:`DataError` naming the file, the record and what to fix, before any training starts;
repairable box problems (partly outside the image, degenerate, non-finite) are fixed or dropped
and counted in one summary line; unreadable images fail at load time with their path and id,
or are skipped and counted when ``skip_bad_images=True``.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

_LOG = logging.getLogger("dynadet")

_TOP_KEYS = ("images", "annotations", "categories")
_IMAGE_KEYS = ("id", "file_name", "width", "height")
_ANN_KEYS = ("id", "image_id", "bbox", "category_id")
_REPAIR_KEYS = (
    "clipped",
    "dropped_degenerate",
    "dropped_small",
    "dropped_nan",
    "dropped_malformed",
    "size_mismatch",
)

_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1

Target = dict[str, Any]
Transform = Callable[[Tensor, Target], tuple[Tensor, Target]]


class DataError(ValueError):
    """A data set problem that cannot be repaired; the message names the file and the record."""


@dataclass
class _Parsed:
    """Validated annotation file, as flat NumPy arrays (A annotations, I images)."""

    image_ids: np.ndarray  # [I] int64, sorted
    file_names: list[str]  # [I]
    sizes: np.ndarray  # [I, 2] (h, w) float64 from the JSON
    category_ids: list[int]  # [K] sorted
    class_names: list[str]  # [K]
    ann_image_pos: np.ndarray  # [A] int64 position of each annotation's image in image_ids
    boxes: np.ndarray  # [A, 4] xyxy float64, clipped to the image
    labels: np.ndarray  # [A] int64 contiguous
    keep: np.ndarray  # [A] bool: usable as a training target
    unusable: np.ndarray  # [A] bool: bbox malformed or non-finite (dropped for evaluation too)
    num_crowd: int
    repairs: dict[str, int]


def _load_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"annotation file {path} does not exist")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DataError(
            f"{path}: not valid JSON ({err.msg} at line {err.lineno}, column {err.colno})"
        ) from err
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text ({err})") from err
    if not isinstance(data, dict):
        raise DataError(
            f"{path}: the top level must be a JSON object with keys {list(_TOP_KEYS)}, "
            f"got a {type(data).__name__}"
        )
    for key in _TOP_KEYS:
        if key not in data:
            raise DataError(f"{path}: missing top-level key '{key}' (a COCO file needs images, "
                            "annotations and categories; an empty list is allowed)")
        if not isinstance(data[key], list):
            raise DataError(f"{path}: top-level '{key}' must be a list, "
                            f"got a {type(data[key]).__name__}")
    return data


def _check_records(path: Path, records: list[Any], kind: str, keys: tuple[str, ...]) -> None:
    for idx, rec in enumerate(records):
        if not isinstance(rec, dict):
            raise DataError(f"{path}: {kind} record #{idx} must be an object, "
                            f"got {type(rec).__name__}")
        missing = [k for k in keys if k not in rec]
        if missing:
            ident = f" (id {rec['id']!r})" if "id" in rec else ""
            raise DataError(f"{path}: {kind} record #{idx}{ident} lacks required key "
                            f"'{missing[0]}'; add it or remove the record")


def _int_column(path: Path, records: list[dict[str, Any]], key: str, kind: str) -> np.ndarray:
    """``records[i][key]`` as ``[R]`` int64; DataError naming the first non-integer value."""
    for idx, rec in enumerate(records):
        value = rec[key]
        is_int = isinstance(value, int) and not isinstance(value, bool)
        if not is_int or not _INT64_MIN <= value <= _INT64_MAX:
            ident = f" (id {rec['id']!r})" if key != "id" else ""
            raise DataError(f"{path}: {kind} record #{idx}{ident} has a non-integer "
                            f"'{key}' {value!r} (ids are integers in the 64-bit range)")
    return np.array([r[key] for r in records], dtype=np.int64).reshape(-1)


def _unique_ids(path: Path, records: list[dict[str, Any]], kind: str) -> np.ndarray:
    ids = _int_column(path, records, "id", kind)
    uniq, counts = np.unique(ids, return_counts=True)
    if (counts > 1).any():
        raise DataError(f"{path}: {kind} id {int(uniq[counts > 1][0])} occurs "
                        f"{int(counts[counts > 1][0])} times; ids must be unique")
    return ids


def _lookup(path: Path, keys: np.ndarray, table: np.ndarray, ann_ids: np.ndarray, what: str,
            fix: str) -> np.ndarray:
    """Positions of ``keys`` in the sorted ``table``; DataError naming the first miss."""
    pos = np.searchsorted(table, keys).clip(0, max(len(table) - 1, 0))
    found = table[pos] == keys if len(table) else np.zeros(len(keys), dtype=bool)
    if not found.all():
        a = int(np.flatnonzero(~found)[0])
        raise DataError(f"{path}: annotation id {int(ann_ids[a])} refers to {what} "
                        f"{int(keys[a])}, which is not in '{fix}'")
    return pos


def _finite_number(value: Any) -> bool:
    """A JSON number (not a bool) that is finite as a float64."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an integer beyond float64
        return False


def _positive_number(value: Any) -> bool:
    return _finite_number(value) and value > 0


def _parse_bboxes(raw: list[Any]) -> tuple[np.ndarray, np.ndarray]:
    """``[A, 4]`` float64 xywh (NaN where malformed) and the ``[A]`` malformed mask."""
    ok = np.array([isinstance(b, (list, tuple)) and len(b) == 4 for b in raw], dtype=bool)
    nan4 = [np.nan] * 4
    rows = [b if good else nan4 for b, good in zip(raw, ok, strict=True)]
    try:
        arr = np.array(rows, dtype=np.float64)
        if arr.shape != (len(raw), 4):  # nested lists, or no annotations at all
            raise ValueError("not A x 4 numbers")
    except (TypeError, ValueError, OverflowError):  # a bad entry somewhere: row by row
        arr = np.full((len(raw), 4), np.nan)
        for i, b in enumerate(rows):
            try:
                arr[i] = np.array(b, dtype=np.float64)
            except (TypeError, ValueError, OverflowError):
                ok[i] = False
    return arr, ok


def _parse(path: Path, data: dict[str, Any], min_box_size: float) -> _Parsed:
    images, anns, cats = data["images"], data["annotations"], data["categories"]
    _check_records(path, images, "image", _IMAGE_KEYS)
    _check_records(path, anns, "annotation", _ANN_KEYS)
    _check_records(path, cats, "category", ("id",))
    img_ids = _unique_ids(path, images, "image")
    ann_ids = _unique_ids(path, anns, "annotation")
    cat_ids = _unique_ids(path, cats, "category")

    for i, rec in enumerate(images):
        if not (_positive_number(rec["height"]) and _positive_number(rec["width"])):
            raise DataError(f"{path}: image id {int(img_ids[i])} has invalid height/width "
                            f"{rec['height']!r}/{rec['width']!r}; both must be numbers > 0")
        if not isinstance(rec["file_name"], str) or not rec["file_name"]:
            raise DataError(f"{path}: image id {int(img_ids[i])} has file_name "
                            f"{rec['file_name']!r}; it must be a path relative to the image folder")
    sizes = np.array([[r["height"], r["width"]] for r in images], dtype=np.float64).reshape(-1, 2)

    order = np.argsort(img_ids, kind="stable")
    img_ids, sizes = img_ids[order], sizes[order]
    file_names = [str(images[i]["file_name"]) for i in order]
    cat_order = np.argsort(cat_ids, kind="stable")
    cat_sorted = cat_ids[cat_order]
    names = [str(cats[i].get("name", f"class_{cats[i]['id']}")) for i in cat_order]

    ann_img = _int_column(path, anns, "image_id", "annotation")
    ann_cat = _int_column(path, anns, "category_id", "annotation")
    pos = _lookup(path, ann_img, img_ids, ann_ids, "image id", "images")
    labels = _lookup(path, ann_cat, cat_sorted, ann_ids, "category id", "categories")

    xywh, well_formed = _parse_bboxes([a["bbox"] for a in anns])
    crowd = np.array([bool(a.get("iscrowd", 0)) for a in anns], dtype=bool)
    finite = np.isfinite(xywh).all(1)
    xyxy = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
    hw = sizes[pos] if len(pos) else np.zeros((0, 2))
    upper = np.stack([hw[:, 1], hw[:, 0], hw[:, 1], hw[:, 0]], axis=1)
    clipped_xyxy = np.clip(xyxy, 0.0, upper)
    w = clipped_xyxy[:, 2] - clipped_xyxy[:, 0]
    h = clipped_xyxy[:, 3] - clipped_xyxy[:, 1]
    with np.errstate(invalid="ignore"):
        degenerate = (w <= 0) | (h <= 0)
        small = ~degenerate & ((w < min_box_size) | (h < min_box_size))
        changed = (clipped_xyxy != xyxy).any(1)
    usable = well_formed & finite
    cand = usable & ~crowd  # repairs are counted on training candidates only
    keep = cand & ~degenerate & ~small
    repairs = dict.fromkeys(_REPAIR_KEYS, 0)
    repairs["clipped"] = int((keep & changed).sum())
    repairs["dropped_degenerate"] = int((cand & degenerate).sum())
    repairs["dropped_small"] = int((cand & small).sum())
    repairs["dropped_nan"] = int((well_formed & ~finite & ~crowd).sum())
    repairs["dropped_malformed"] = int((~well_formed & ~crowd).sum())
    return _Parsed(
        image_ids=img_ids, file_names=file_names, sizes=sizes,
        category_ids=[int(c) for c in cat_sorted], class_names=names,
        ann_image_pos=pos.astype(np.int64), boxes=np.nan_to_num(clipped_xyxy),
        labels=labels.astype(np.int64), keep=keep, unusable=~usable,
        num_crowd=int(crowd.sum()), repairs=repairs,
    )  # fmt: skip


def _read_image(path: Path, image_id: int) -> Tensor:
    """``Tensor[3, H, W]`` float32 RGB 0–255; DataError naming the file and id if unreadable."""
    try:
        with Image.open(path) as im:
            im.load()  # decode fully now so a truncated file fails here, not later
            rgb = im.convert("RGB")
    except FileNotFoundError as err:
        raise DataError(f"image file {path} (image id {image_id}) does not exist") from err
    except Exception as err:  # noqa: BLE001 - decoders raise many types (OSError, EOFError,
        # struct.error, DecompressionBombError, ...); any of them means the file is unusable
        raise DataError(f"cannot read image file {path} (image id {image_id}): "
                        f"{type(err).__name__}: {err}; replace the file or remove the image "
                        "from the annotations") from err
    arr = np.asarray(rgb, dtype=np.float32).transpose(2, 0, 1)
    return torch.from_numpy(np.ascontiguousarray(arr))


class CocoDetection(Dataset):
    """A COCO-format detection data set.

    Category ids map to contiguous labels in sorted-id order: label ``k`` is
    ``category_ids[k]`` named ``class_names[k]``. Crowd annotations (``iscrowd=1``) are not
    training targets. Boxes are validated once, here, with NumPy: partly outside → clipped;
    width or height ≤ 0 after clipping, below ``min_box_size``, non-finite or not 4 numbers →
    dropped; the counts are in ``repairs`` and logged as one warning line on logger
    ``"dynadet"``. Unrepairable records raise :class:`DataError`.

    ``filter_empty=True`` drops images without a usable box from the index (the training
    default of the reference implementations); use ``False`` for evaluation so every image is
    scored. ``skip_bad_images=True`` replaces an unreadable image by the next readable one and
    counts it in ``skipped_images``. Both this counter and ``repairs["size_mismatch"]`` are
    updated at load time: with DataLoader workers each worker process counts (and warns about)
    its own, so the main-process copies stay 0.

    ``cache_images=True`` keeps every decoded image in memory (uint8, ``3·H·W`` bytes each)
    after its first read, so later epochs skip file reads and PNG decoding — for small data
    sets such as the quickstart's (2400 images of ~200×240: ~350 MB). Each DataLoader worker
    holds its own cache (the training loader's workers live for the whole run).

    ``dataset[i]`` → ``(image, target)``: ``image`` ``Tensor[3, H, W]`` float32 RGB 0–255,
    ``target`` ``dict(boxes=Tensor[N, 4] xyxy absolute float32, labels=Tensor[N] int64,
    image_id=int, orig_size=Tensor[2] int64 (h, w))``, then ``transforms(image, target)``.

    Attributes:
        image_ids: ``list[int]`` COCO ids of the kept images, sorted.
        aspect_ratios: ``list[float]`` width / height of each kept image (from the JSON).
        category_ids, class_names: the label table.
        repairs: counts of repaired / dropped boxes and of image size mismatches.
        coco: the pycocotools ``COCO`` object for evaluation (built on first access, so data
            loader workers do not carry it). It holds every image and annotation of the file
            except boxes that are not 4 finite numbers; ``iscrowd`` is 0 or 1 (missing: 0),
            ``area`` is ``w * h`` where missing or not a number, and each category's ``name``
            is its entry of ``class_names``.
    """

    def __init__(
        self,
        ann_file: str | Path,
        image_dir: str | Path,
        transforms: Transform | None = None,
        filter_empty: bool = True,
        skip_bad_images: bool = False,
        min_box_size: float = 1.0,
        cache_images: bool = False,
    ) -> None:
        self.ann_file = Path(ann_file)
        self.image_dir = Path(image_dir)
        self.transforms = transforms
        self.filter_empty = filter_empty
        self.skip_bad_images = skip_bad_images
        self.min_box_size = float(min_box_size)
        self.skipped_images = 0
        self._coco = None
        self._bad: set[int] = set()
        self._mismatched: set[int] = set()
        # decoded images as uint8 (exact: the files hold 8-bit pixels), filled on first read
        self.cache_images = bool(cache_images)
        self._cache: dict[int, Tensor] = {}

        p = _parse(self.ann_file, _load_json(self.ann_file), self.min_box_size)
        self.category_ids: list[int] = p.category_ids
        self.class_names: list[str] = p.class_names
        self.repairs: dict[str, int] = p.repairs
        self.num_crowd = p.num_crowd

        counts = np.bincount(p.ann_image_pos[p.keep], minlength=len(p.image_ids))
        kept_images = np.flatnonzero(counts > 0) if filter_empty else np.arange(len(counts))
        self.num_filtered = len(p.image_ids) - len(kept_images)
        # flat arrays + offsets instead of per-image Python lists: forked workers share them
        # without the copy-on-access growth of refcounted objects
        ann_pos = p.ann_image_pos[p.keep]
        order = np.argsort(ann_pos, kind="stable")
        self._boxes = p.boxes[p.keep][order].astype(np.float32)
        self._labels = p.labels[p.keep][order]
        starts = np.concatenate([[0], np.cumsum(counts)])
        self._starts = starts[kept_images]
        self._ends = starts[kept_images + 1]
        self._sizes = p.sizes[kept_images]
        self._files = np.array([p.file_names[i] for i in kept_images], dtype=str)
        self.image_ids: list[int] = p.image_ids[kept_images].tolist()
        self.aspect_ratios: list[float] = (self._sizes[:, 1] / self._sizes[:, 0]).tolist()
        self._log_summary()

    def _log_summary(self) -> None:
        fixed = {k: v for k, v in self.repairs.items() if v}
        if fixed:
            _LOG.warning("%s: repaired boxes: %s (min_box_size=%g)", self.ann_file,
                         ", ".join(f"{k}={v}" for k, v in fixed.items()), self.min_box_size)
        if self.num_filtered:
            _LOG.info("%s: removed %d images with no usable boxes (filter_empty=True)",
                      self.ann_file, self.num_filtered)

    @property
    def num_classes(self) -> int:
        return len(self.category_ids)

    @property
    def coco(self) -> Any:
        if self._coco is None:
            from pycocotools.coco import COCO

            data = _load_json(self.ann_file)
            p = _parse(self.ann_file, data, self.min_box_size)
            anns = []
            for ann, unusable in zip(data["annotations"], p.unusable, strict=True):
                if unusable:
                    continue
                ann["iscrowd"] = int(bool(ann.get("iscrowd", 0)))  # as the training targets
                if not _finite_number(ann.get("area")):
                    ann["area"] = float(ann["bbox"][2]) * float(ann["bbox"][3])
                anns.append(ann)
            data["annotations"] = anns
            names = dict(zip(p.category_ids, p.class_names, strict=True))
            data["categories"] = [{**c, "name": names[c["id"]]} for c in data["categories"]]
            coco = COCO()
            coco.dataset = data
            with contextlib.redirect_stdout(io.StringIO()):
                coco.createIndex()
            self._coco = coco
        return self._coco

    def __len__(self) -> int:
        return len(self.image_ids)

    def _path(self, i: int) -> Path:
        return self.image_dir / str(self._files[i])

    def _target(self, i: int, image: Tensor) -> Target:
        boxes = torch.from_numpy(self._boxes[self._starts[i] : self._ends[i]].copy())
        labels = torch.from_numpy(self._labels[self._starts[i] : self._ends[i]].copy())
        h, w = int(image.shape[1]), int(image.shape[2])
        if (h, w) != (int(self._sizes[i, 0]), int(self._sizes[i, 1])):
            if i not in self._mismatched:
                self._mismatched.add(i)
                self.repairs["size_mismatch"] += 1
                _LOG.warning("%s (image id %d): actual size %dx%d (h x w) differs from the "
                             "annotation file's %dx%d; using the actual size", self._path(i),
                             self.image_ids[i], h, w, int(self._sizes[i, 0]),
                             int(self._sizes[i, 1]))
            boxes = torch.minimum(boxes, torch.tensor([w, h, w, h], dtype=torch.float32))
            size_ok = ((boxes[:, 2:] - boxes[:, :2]) >= max(self.min_box_size, 1e-6)).all(1)
            boxes, labels = boxes[size_ok], labels[size_ok]
        return {
            "boxes": boxes,
            "labels": labels,
            "image_id": self.image_ids[i],
            "orig_size": torch.tensor([h, w], dtype=torch.int64),
        }

    def _image(self, i: int) -> Tensor:
        """Image ``i`` as ``Tensor[3, H, W]`` float32 0–255, a fresh tensor on every call."""
        cached = self._cache.get(i)
        if cached is not None:
            return cached.float()
        image = _read_image(self._path(i), self.image_ids[i])
        if self.cache_images:
            self._cache[i] = image.to(torch.uint8)
        return image

    def __getitem__(self, index: int) -> tuple[Tensor, Target]:
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for a data set of {n} images")
        index %= n
        for step in range(n if self.skip_bad_images else 1):
            i = (index + step) % n
            if i in self._bad:
                continue
            try:
                image = self._image(i)
            except DataError as err:
                if not self.skip_bad_images:
                    raise
                self._bad.add(i)
                self.skipped_images += 1
                _LOG.warning("%s; skipping it (skip_bad_images=True)", err)
                continue
            target = self._target(i, image)
            if self.transforms is not None:
                image, target = self.transforms(image, target)
            return image, target
        raise DataError(f"{self.ann_file}: no readable image left in {self.image_dir}")
