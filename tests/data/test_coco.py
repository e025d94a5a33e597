"""CocoDetection: validation errors, counted repairs, label mapping, image loading policy."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dynadet.data.coco import CocoDetection, DataError

CATS = [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]


def _png(path: Path, w: int, h: int, seed: int = 0, mode: str = "RGB") -> np.ndarray:
    rng = np.random.default_rng(seed)
    shape = (h, w, 3) if mode == "RGB" else (h, w)
    arr = rng.integers(0, 256, size=shape, dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr, mode=mode).save(path)
    return arr


def _write(tmp: Path, data: dict | str, name: str = "ann.json") -> Path:
    path = tmp / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def _image(i: int, w: int = 40, h: int = 30) -> dict:
    return {"id": i, "file_name": f"{i}.png", "width": w, "height": h}


def _ann(i: int, image_id: int, bbox, cat: int = 1, **extra) -> dict:
    return {"id": i, "image_id": image_id, "bbox": bbox, "category_id": cat, **extra}


def _dataset(tmp: Path, images, anns, cats=CATS, make_files=True, **kw) -> CocoDetection:
    if make_files:
        for im in images:
            _png(tmp / "img" / im["file_name"], im["width"], im["height"], seed=im["id"])
    path = _write(tmp, {"images": images, "annotations": anns, "categories": cats})
    return CocoDetection(path, tmp / "img", **kw)


# --- errors found up front -------------------------------------------------------------------


def test_malformed_json_names_file_and_position(tmp_path):
    path = _write(tmp_path, '{"images": [}')
    with pytest.raises(DataError, match=r"ann\.json: not valid JSON .*line 1"):
        CocoDetection(path, tmp_path)


def test_missing_annotation_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        CocoDetection(tmp_path / "nope.json", tmp_path)


@pytest.mark.parametrize("key", ["images", "annotations", "categories"])
def test_missing_top_level_key(tmp_path, key):
    data = {"images": [], "annotations": [], "categories": []}
    del data[key]
    path = _write(tmp_path, data)
    with pytest.raises(DataError, match=rf"ann\.json: missing top-level key '{key}'"):
        CocoDetection(path, tmp_path)


def test_top_level_not_an_object(tmp_path):
    with pytest.raises(DataError, match="top level must be a JSON object"):
        CocoDetection(_write(tmp_path, "[1, 2]"), tmp_path)


@pytest.mark.parametrize("key", ["id", "file_name", "width", "height"])
def test_missing_image_key(tmp_path, key):
    images = [_image(1), _image(2)]
    del images[1][key]
    with pytest.raises(DataError) as err:
        _dataset(tmp_path, images, [], make_files=False)
    msg = str(err.value)
    assert "ann.json" in msg and "image record #1" in msg and f"'{key}'" in msg
    if key != "id":
        assert "(id 2)" in msg


@pytest.mark.parametrize("key", ["id", "image_id", "bbox", "category_id"])
def test_missing_annotation_key(tmp_path, key):
    anns = [_ann(10, 1, [0, 0, 5, 5]), _ann(11, 1, [0, 0, 5, 5])]
    del anns[1][key]
    with pytest.raises(DataError) as err:
        _dataset(tmp_path, [_image(1)], anns, make_files=False)
    msg = str(err.value)
    assert "ann.json" in msg and "annotation record #1" in msg and f"'{key}'" in msg
    if key != "id":
        assert "(id 11)" in msg


def test_unknown_category_names_annotation_and_category(tmp_path):
    anns = [_ann(10, 1, [0, 0, 5, 5]), _ann(11, 1, [0, 0, 5, 5], cat=42)]
    with pytest.raises(DataError, match=r"annotation id 11 refers to category id 42"):
        _dataset(tmp_path, [_image(1)], anns, make_files=False)


def test_unknown_image_id(tmp_path):
    anns = [_ann(10, 7, [0, 0, 5, 5])]
    with pytest.raises(DataError, match=r"annotation id 10 refers to image id 7"):
        _dataset(tmp_path, [_image(1)], anns, make_files=False)


def test_duplicate_ids_and_bad_sizes(tmp_path):
    anns = [_ann(10, 1, [0, 0, 5, 5]), _ann(10, 1, [0, 0, 5, 5])]
    with pytest.raises(DataError, match="annotation id 10 occurs 2 times"):
        _dataset(tmp_path, [_image(1)], anns, make_files=False)
    with pytest.raises(DataError, match="image id 1 occurs 2 times"):
        _dataset(tmp_path, [_image(1), _image(1)], [], make_files=False)
    with pytest.raises(DataError, match="image id 3 has invalid height/width"):
        _dataset(tmp_path, [_image(3, w=0)], [], make_files=False)
    with pytest.raises(DataError, match="non-integer 'category_id' 'x'"):
        _dataset(tmp_path, [_image(1)], [_ann(1, 1, [0, 0, 5, 5], cat="x")], make_files=False)


def test_empty_file_is_fine(tmp_path):
    ds = _dataset(tmp_path, [], [], cats=[], make_files=False)
    assert len(ds) == 0 and ds.category_ids == [] and ds.num_classes == 0


# --- repairs ---------------------------------------------------------------------------------


def test_repairs_are_exact_and_logged_once(tmp_path, caplog):
    nan, inf = float("nan"), float("inf")
    anns = [
        _ann(1, 1, [10, 10, 20, 10]),  # fine
        _ann(2, 1, [30, 25, 20, 20]),  # partly outside (40x30 image) → clipped
        _ann(3, 1, [-5, -5, 10, 10]),  # partly outside → clipped
        _ann(4, 1, [50, 5, 5, 5]),  # fully outside → degenerate after clipping
        _ann(5, 1, [5, 5, 0, 10]),  # zero width
        _ann(6, 1, [20, 5, -4, 10]),  # negative width
        _ann(7, 1, [1, 1, 0.5, 5]),  # below min_box_size
        _ann(8, 1, [nan, 1, 5, 5]),  # non-finite
        _ann(9, 1, [1, 1, inf, 5]),  # non-finite
        _ann(10, 1, [1, 2, 3]),  # too few numbers
        _ann(11, 1, None),  # not a list
        _ann(12, 1, [30, 25, 20, 20], iscrowd=1),  # crowd: ignored, not counted
        _ann(13, 1, [nan, 0, 0, 0], iscrowd=1),  # crowd: ignored, not counted
        _ann(14, 1, [2, 3, 4, 5], cat=2),  # fine
    ]
    with caplog.at_level(logging.WARNING, logger="dynadet"):
        ds = _dataset(tmp_path, [_image(1)], anns)
    assert ds.repairs == {
        "clipped": 2,
        "dropped_degenerate": 3,
        "dropped_small": 1,
        "dropped_nan": 2,
        "dropped_malformed": 2,
        "size_mismatch": 0,
    }
    assert ds.num_crowd == 2
    warnings = [r for r in caplog.records if r.name == "dynadet" and r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "clipped=2" in warnings[0].getMessage() and "ann.json" in warnings[0].getMessage()
    _, target = ds[0]
    expected = [[10, 10, 30, 20], [30, 25, 40, 30], [0, 0, 5, 5], [2, 3, 6, 8]]
    assert torch.equal(target["boxes"], torch.tensor(expected, dtype=torch.float32))
    assert target["labels"].tolist() == [0, 0, 0, 1]
    assert target["labels"].dtype == torch.int64 and target["boxes"].dtype == torch.float32


def _reference_repair(anns, sizes, min_size):
    """Slow per-annotation transcription of the repair rule."""
    counts = dict.fromkeys(["clipped", "dropped_degenerate", "dropped_small", "dropped_nan",
                            "dropped_malformed"], 0)
    kept = {}
    for a in anns:
        if a.get("iscrowd", 0):
            continue
        b = a["bbox"]
        if not isinstance(b, list) or len(b) != 4:
            counts["dropped_malformed"] += 1
            continue
        if not all(math.isfinite(v) for v in b):
            counts["dropped_nan"] += 1
            continue
        h, w = sizes[a["image_id"]]
        x0, y0, x1, y1 = b[0], b[1], b[0] + b[2], b[1] + b[3]
        c = [min(max(x0, 0), w), min(max(y0, 0), h), min(max(x1, 0), w), min(max(y1, 0), h)]
        cw, ch = c[2] - c[0], c[3] - c[1]
        if cw <= 0 or ch <= 0:
            counts["dropped_degenerate"] += 1
        elif cw < min_size or ch < min_size:
            counts["dropped_small"] += 1
        else:
            counts["clipped"] += c != [x0, y0, x1, y1]
            kept.setdefault(a["image_id"], []).append(c)
    return counts, kept


@pytest.mark.parametrize("min_size", [0.0, 1.0, 3.0])
def test_repairs_match_slow_reference_on_random_boxes(tmp_path, min_size):
    rng = np.random.default_rng(int(min_size * 10))
    images = [_image(i, w=int(rng.integers(8, 24)), h=int(rng.integers(8, 24)))
              for i in range(1, 6)]
    anns = []
    for k in range(200):
        bbox = rng.uniform(-10, 30, size=4).round(1).tolist()
        r = rng.uniform()
        if r < 0.05:
            bbox[int(rng.integers(4))] = float("nan")
        elif r < 0.08:
            bbox = bbox[:3]
        anns.append(_ann(k + 1, int(rng.integers(1, 6)), bbox, cat=int(rng.integers(1, 3)),
                         iscrowd=int(rng.uniform() < 0.1)))
    ds = _dataset(tmp_path, images, anns, filter_empty=False, min_box_size=min_size)
    counts, kept = _reference_repair(anns, {im["id"]: (im["height"], im["width"])
                                            for im in images}, min_size)
    assert {k: v for k, v in ds.repairs.items() if k != "size_mismatch"} == counts
    for i, image_id in enumerate(ds.image_ids):
        _, target = ds[i]
        want = torch.tensor(kept.get(image_id, []), dtype=torch.float32).reshape(-1, 4)
        torch.testing.assert_close(target["boxes"], want)


# --- crowd, filtering, labels ----------------------------------------------------------------


def test_crowd_ignored_and_filter_empty(tmp_path):
    images = [_image(1), _image(2), _image(3)]
    anns = [
        _ann(1, 1, [1, 1, 5, 5]),
        _ann(2, 1, [2, 2, 6, 6], iscrowd=1),
        _ann(3, 2, [2, 2, 6, 6], iscrowd=1),  # image 2: crowd only
        _ann(4, 3, [100, 100, 5, 5]),  # image 3: only an unusable box
    ]
    ds = _dataset(tmp_path, images, anns)
    assert ds.image_ids == [1] and len(ds) == 1 and ds.num_filtered == 2
    assert ds[0][1]["boxes"].shape == (1, 4)
    ds_all = _dataset(tmp_path, images, anns, filter_empty=False)
    assert ds_all.image_ids == [1, 2, 3]
    _, t2 = ds_all[1]
    assert t2["boxes"].shape == (0, 4) and t2["labels"].shape == (0,)
    # evaluation sees crowd boxes (COCOeval ignores them) and gets defaults filled in
    coco = ds_all.coco
    assert sorted(coco.anns) == [1, 2, 3, 4]
    assert coco.anns[2]["iscrowd"] == 1 and coco.anns[1]["area"] == 25.0


def test_gapped_category_ids_map_to_contiguous_labels(tmp_path):
    cats = [{"id": 9, "name": "nine"}, {"id": 3, "name": "three"}, {"id": 7, "name": "seven"}]
    anns = [_ann(1, 1, [0, 0, 4, 4], cat=9), _ann(2, 1, [0, 0, 4, 4], cat=3),
            _ann(3, 1, [0, 0, 4, 4], cat=7)]
    ds = _dataset(tmp_path, [_image(1)], anns, cats=cats)
    assert ds.category_ids == [3, 7, 9]
    assert ds.class_names == ["three", "seven", "nine"]
    assert ds[0][1]["labels"].tolist() == [2, 0, 1]


def test_item_contents_and_metadata(tmp_path, capsys):
    images = [_image(5, w=40, h=30), _image(2, w=20, h=30)]
    anns = [_ann(1, 5, [1, 2, 3, 4]), _ann(2, 2, [0, 0, 5, 5], cat=2)]
    ds = _dataset(tmp_path, images, anns)
    assert ds.image_ids == [2, 5]  # sorted by id
    assert ds.aspect_ratios == pytest.approx([20 / 30, 40 / 30])
    image, target = ds[1]
    pixels = np.asarray(Image.open(tmp_path / "img" / "5.png"))
    assert image.dtype == torch.float32 and image.shape == (3, 30, 40)
    assert torch.equal(image, torch.from_numpy(pixels.copy()).permute(2, 0, 1).float())
    assert target["image_id"] == 5 and target["orig_size"].tolist() == [30, 40]
    assert ds[-1][1]["image_id"] == 5
    with pytest.raises(IndexError):
        ds[2]
    assert ds.coco.imgs[5]["file_name"] == "5.png"
    assert capsys.readouterr().out == ""  # pycocotools' prints are silenced


def test_grayscale_image_becomes_rgb_and_transforms_apply(tmp_path):
    _png(tmp_path / "img" / "1.png", 40, 30, mode="L")
    path = _write(tmp_path, {"images": [_image(1)], "annotations": [_ann(1, 1, [0, 0, 4, 4])],
                             "categories": CATS})
    calls = []

    def transform(image, target):
        calls.append(image.shape)
        return image * 0, {**target, "seen": True}

    image, target = CocoDetection(path, tmp_path / "img", transforms=transform)[0]
    assert calls == [(3, 30, 40)] and target["seen"] and image.sum() == 0


def test_cache_images_reads_each_file_once_and_hands_out_fresh_tensors(tmp_path):
    images = [_image(1), _image(2, w=20)]
    anns = [_ann(1, 1, [1, 2, 3, 4]), _ann(2, 2, [0, 0, 5, 5])]
    ds = _dataset(tmp_path, images, anns, cache_images=True)
    first = [ds[i][0].clone() for i in range(2)]
    for f in (tmp_path / "img").iterdir():
        f.unlink()  # a second read would fail: the images must come from the cache
    image = ds[0][0]
    assert image.dtype == torch.float32 and torch.equal(image, first[0])
    image.mul_(0)  # in-place transforms must not reach the cached copy
    assert torch.equal(ds[0][0], first[0]) and torch.equal(ds[1][0], first[1])
    assert ds._cache[0].dtype == torch.uint8
    plain = _dataset(tmp_path / "b", images, anns)
    plain[0]
    assert not plain._cache  # off by default


# --- bad images ------------------------------------------------------------------------------


def _four_images(tmp_path, **kw):
    images = [_image(i) for i in range(1, 5)]
    anns = [_ann(i, i, [1, 1, 5, 5]) for i in range(1, 5)]
    return images, anns


def test_missing_image_file(tmp_path):
    images, anns = _four_images(tmp_path)
    ds = _dataset(tmp_path, images, anns)
    (tmp_path / "img" / "2.png").unlink()
    with pytest.raises(DataError, match=r"2\.png \(image id 2\) does not exist"):
        ds[1]


def test_corrupt_image_file(tmp_path):
    images, anns = _four_images(tmp_path)
    ds = _dataset(tmp_path, images, anns)
    (tmp_path / "img" / "3.png").write_bytes(b"this is not an image at all")
    with pytest.raises(DataError, match=r"cannot read image file .*3\.png \(image id 3\)"):
        ds[2]


def test_truncated_png(tmp_path):
    images, anns = _four_images(tmp_path)
    ds = _dataset(tmp_path, images, anns)
    path = tmp_path / "img" / "4.png"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"4\.png \(image id 4\)"):
        ds[3]


def test_skip_bad_images_counts_and_returns_next(tmp_path, caplog):
    images, anns = _four_images(tmp_path)
    ds = _dataset(tmp_path, images, anns, skip_bad_images=True)
    (tmp_path / "img" / "2.png").unlink()
    (tmp_path / "img" / "3.png").write_bytes(b"garbage")
    with caplog.at_level(logging.WARNING, logger="dynadet"):
        ids = [ds[i][1]["image_id"] for i in range(4)]
        ids_again = [ds[i][1]["image_id"] for i in range(4)]
    assert ids == ids_again == [1, 4, 4, 4]
    assert ds.skipped_images == 2
    messages = [r.getMessage() for r in caplog.records if r.name == "dynadet"]
    assert len(messages) == 2  # one warning per bad file, not per access
    assert any("2.png" in m for m in messages) and any("3.png" in m for m in messages)
    for name in ("1.png", "4.png"):
        (tmp_path / "img" / name).unlink()
    with pytest.raises(DataError, match="no readable image"):
        ds[0]


def test_size_mismatch_uses_actual_size(tmp_path, caplog):
    images = [_image(1, w=40, h=30), _image(2, w=40, h=30)]
    anns = [_ann(1, 1, [10, 5, 25, 20]), _ann(2, 1, [22, 1, 10, 4]), _ann(3, 2, [1, 1, 4, 4])]
    ds = _dataset(tmp_path, images, anns)
    _png(tmp_path / "img" / "1.png", 24, 16)  # smaller than the JSON says
    with caplog.at_level(logging.WARNING, logger="dynadet"):
        image, target = ds[0]
        ds[0]
    assert image.shape == (3, 16, 24) and target["orig_size"].tolist() == [16, 24]
    # boxes clipped to the actual image; the second box collapses to width 2 - kept (>= 1)
    assert target["boxes"].tolist() == [[10, 5, 24, 16], [22, 1, 24, 5]]
    assert ds.repairs["size_mismatch"] == 1
    assert sum("differs" in r.getMessage() for r in caplog.records) == 1
    assert ds[1][1]["orig_size"].tolist() == [30, 40] and ds.repairs["size_mismatch"] == 1
