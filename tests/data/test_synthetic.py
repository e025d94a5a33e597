"""Synthetic scenes and the COCO-format writer."""

from __future__ import annotations

import argparse
import contextlib
import io
import json

import numpy as np
import pytest
from pycocotools.coco import COCO

from dynadet.data.coco import CocoDetection
from dynadet.data.synthetic import (
    SHAPE_CLASSES,
    add_synth_arguments,
    render_scene,
    run_synth,
    write_synthetic_dataset,
)


def test_render_scene_is_deterministic_and_valid():
    a, b = render_scene(4, 96, 128), render_scene(4, 96, 128)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.boxes, b.boxes)
    assert not np.array_equal(render_scene(5, 96, 128).image, a.image)
    for seed in range(30):
        sc = render_scene(seed, 96, 128)
        assert sc.image.shape == (96, 128, 3) and sc.image.dtype == np.uint8
        assert len(sc.boxes) >= 1 and sc.boxes.dtype == np.float32
        assert sc.labels.dtype == np.int64 and sc.labels.max() < len(SHAPE_CLASSES)
        x0, y0, x1, y1 = sc.boxes.T
        assert (x0 >= 0).all() and (y0 >= 0).all() and (x1 <= 128).all() and (y1 <= 96).all()
        assert (x1 - x0 >= 1).all() and (y1 - y0 >= 1).all()
        assert (sc.areas > 0).all() and (sc.areas <= (x1 - x0) * (y1 - y0)).all()


def test_scenes_are_varied_and_occluded():
    sides, per_class, dropped, overlapping = [], np.zeros(len(SHAPE_CLASSES)), 0, 0
    for seed in range(60):
        sc = render_scene(seed, 128, 160)
        b = sc.boxes
        sides += list(np.minimum(b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]))
        per_class += np.bincount(sc.labels, minlength=len(SHAPE_CLASSES))
        # same draws with no visibility threshold: occluded objects come back
        every = render_scene(seed, 128, 160, min_visible=0.0)
        assert np.array_equal(every.image, sc.image) and len(every.boxes) >= len(b)
        dropped += len(every.boxes) - len(b)
        iw = np.minimum(b[:, None, 2], b[None, :, 2]) - np.maximum(b[:, None, 0], b[None, :, 0])
        ih = np.minimum(b[:, None, 3], b[None, :, 3]) - np.maximum(b[:, None, 1], b[None, :, 1])
        overlapping += int(((iw > 0) & (ih > 0)).sum() - len(b))
    assert min(sides) <= 10 and max(sides) >= 50  # small to large
    assert (per_class > 0).all()
    assert dropped > 0  # some objects were hidden below 30 % visibility
    assert overlapping > 0  # partly occluded objects stay labelled


def test_size_range_option():
    for seed in range(10):
        b = render_scene(seed, 96, 128, size_range=(20, 30)).boxes
        assert (np.minimum(b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]) >= 12).all()
        assert (np.maximum(b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]) <= 43).all()
    with pytest.raises(ValueError):
        render_scene(0, size_range=(10, 5))


def _write(tmp_path, name="ds", **kw):
    args = {"num_images": 10, "seed": 1, "height": 48, "width": 64, "progress": False, **kw}
    return write_synthetic_dataset(tmp_path / name, **args)


def test_writer_produces_a_readable_coco_dataset(tmp_path):
    paths = _write(tmp_path)
    assert set(paths) == {"root", "images", "train", "val"}
    with contextlib.redirect_stdout(io.StringIO()):
        train, val = COCO(str(paths["train"])), COCO(str(paths["val"]))
    assert len(val.imgs) == 2 and len(train.imgs) == 8
    assert set(train.imgs) | set(val.imgs) == set(range(1, 11))
    assert [train.cats[k]["name"] for k in sorted(train.cats)] == list(SHAPE_CLASSES)
    for img in list(train.imgs.values()) + list(val.imgs.values()):
        assert (paths["images"] / img["file_name"]).is_file()
        assert img["file_name"] == f"{img['id']:06d}.png"
        assert 0.8 * 48 - 1 <= img["height"] <= 1.2 * 48 + 1
    sizes = {(im["height"], im["width"]) for im in train.imgs.values()}
    assert len(sizes) > 1  # sizes vary to exercise batching
    for ann in train.anns.values():
        assert ann["iscrowd"] == 0 and 1 <= ann["category_id"] <= len(SHAPE_CLASSES)
        assert 0 < ann["area"] <= ann["bbox"][2] * ann["bbox"][3]
    ds = CocoDetection(paths["train"], paths["images"])
    assert ds.class_names == list(SHAPE_CLASSES) and ds.repairs["clipped"] == 0
    image, target = ds[0]
    assert image.shape[0] == 3 and tuple(target["orig_size"].tolist()) == image.shape[1:]
    assert len(target["boxes"]) == len(train.imgToAnns[target["image_id"]])


def test_writer_is_deterministic(tmp_path):
    a, b, c = _write(tmp_path, "a"), _write(tmp_path, "b"), _write(tmp_path, "c", seed=2)
    assert a["train"].read_text() == b["train"].read_text()
    assert a["val"].read_text() == b["val"].read_text()
    assert (a["images"] / "000003.png").read_bytes() == (b["images"] / "000003.png").read_bytes()
    assert a["train"].read_text() != c["train"].read_text()


def test_parallel_rendering_writes_the_same_dataset(tmp_path):
    # 64+ images use a process pool; the split, labels and pixels must not depend on it
    kw = {"num_images": 70, "height": 40, "width": 48}
    serial = _write(tmp_path, "s", workers=0, **kw)
    parallel = _write(tmp_path, "p", workers=2, **kw)
    for split in ("train", "val"):
        assert serial[split].read_text() == parallel[split].read_text()
    for i in (1, 35, 70):
        name = f"{i:06d}.png"
        assert (serial["images"] / name).read_bytes() == (parallel["images"] / name).read_bytes()
    with pytest.raises(ValueError, match="workers"):
        _write(tmp_path, "bad", workers=-1, **kw)


def test_writer_is_idempotent_and_rewrites_on_change(tmp_path):
    paths = _write(tmp_path)
    stamps = {p: p.stat().st_mtime_ns for p in paths["images"].iterdir()}
    ann = paths["train"].stat().st_mtime_ns
    assert _write(tmp_path) == paths
    assert {p: p.stat().st_mtime_ns for p in paths["images"].iterdir()} == stamps
    assert paths["train"].stat().st_mtime_ns == ann
    (paths["images"] / "000004.png").unlink()  # incomplete → rewritten
    _write(tmp_path)
    assert (paths["images"] / "000004.png").is_file()
    _write(tmp_path, num_images=6)  # new parameters → rewritten, stale images removed
    assert sorted(p.name for p in paths["images"].iterdir()) == [f"{i:06d}.png"
                                                                 for i in range(1, 7)]
    assert json.loads((paths["root"] / "synth.json").read_text())["num_images"] == 6
    data = json.loads(paths["train"].read_text())
    assert len(data["images"]) + len(json.loads(paths["val"].read_text())["images"]) == 6


def test_writer_validation_and_no_val(tmp_path):
    paths = _write(tmp_path, num_images=3, val_fraction=0.0)
    assert json.loads(paths["val"].read_text())["images"] == []
    one = _write(tmp_path, "one", num_images=1, val_fraction=0.5)
    assert len(json.loads(one["train"].read_text())["images"]) == 1
    for bad in ({"num_images": 0}, {"height": 16}, {"val_fraction": 1.0}):
        with pytest.raises(ValueError):
            _write(tmp_path, "bad", **bad)


def test_cli_helpers(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_synth_arguments(parser)
    args = parser.parse_args([str(tmp_path / "cli"), "--images", "3", "--seed", "2",
                              "--height", "40", "--width", "40", "--val-fraction", "0.34",
                              "--no-progress"])
    assert run_synth(args) == 0
    out = capsys.readouterr().out
    assert "train.json" in out and (tmp_path / "cli" / "annotations" / "val.json").is_file()
    defaults = parser.parse_args(["x"])
    assert (defaults.images, defaults.seed, defaults.val_fraction) == (500, 0, 0.2)
    assert run_synth(parser.parse_args([str(tmp_path / "bad"), "--images", "0"])) == 2
    assert "num_images" in capsys.readouterr().err
