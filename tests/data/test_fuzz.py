"""Fuzzed COCO files and image bytes: every case loads (repairs counted) or raises DataError.

A seeded loop mutates a valid annotation file at every level — deletes keys or list entries,
replaces values by other types (null, strings, floats, NaN, ±inf, 2^70, lists, objects),
replaces records and whole sections — and replaces image files by random or truncated bytes
behind real image signatures. Building the data set, reading every item through the training
augmentations and building the evaluation index must either work or raise
:class:`~dynadet.data.coco.DataError` naming the annotation file or the image; a raw
``KeyError``/``TypeError``/``IndexError``/``OverflowError`` from NumPy, PIL or pycocotools fails
the test with the case that produced it.
"""

from __future__ import annotations

import copy
import io
import json
import math
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from dynadet.data.coco import CocoDetection, DataError
from dynadet.data.transforms import build_transforms
from dynadet.engine.evaluate import coco_evaluate

# decoders warn about the corrupt files this module feeds them on purpose
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

NUM_CASES = 200
WEIRD = [None, "", "7", "abc", -1, 0, 3, 1.5, -2.5, True, False, [], {}, [1, 2], [[1, 2, 3, 4]],
         {"id": 1}, math.nan, math.inf, -math.inf, 2**70, -(2**70), 10**400, 1e308, "NaN",
         [[1, 2], [3, 4], [5, 6], [7, 8]]]  # fmt: skip
SIGNATURES = [b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe0", b"GIF89a", b"BM", b"II*\x00", b""]


def _png_bytes(w: int, h: int, seed: int) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def base_dataset(image_dir: Path) -> dict[str, Any]:
    """3 images (one without boxes), 2 categories, 5 annotations (one crowd, one clipped)."""
    sizes = {1: (40, 30), 2: (32, 24), 3: (20, 28)}
    for i, (w, h) in sizes.items():
        (image_dir / f"{i}.png").write_bytes(_png_bytes(w, h, i))
    return {
        "images": [{"id": i, "file_name": f"{i}.png", "width": w, "height": h}
                   for i, (w, h) in sizes.items()],
        "annotations": [
            {"id": 1, "image_id": 1, "bbox": [2, 3, 10, 8], "category_id": 1, "area": 80},
            {"id": 2, "image_id": 1, "bbox": [30, 20, 20, 20], "category_id": 2},
            {"id": 3, "image_id": 2, "bbox": [0, 0, 5, 5], "category_id": 2, "iscrowd": 1},
            {"id": 4, "image_id": 2, "bbox": [4.5, 6.25, 7, 9], "category_id": 1, "iscrowd": 0},
            {"id": 5, "image_id": 1, "bbox": [1, 1, 3, 3], "category_id": 1},
        ],
        "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog", "supercategory": "x"}],
        "info": {"year": 2024},
    }  # fmt: skip


def _paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    """Every key/index path in a JSON tree (not the root)."""
    out = []
    items = (
        node.items()
        if isinstance(node, dict)
        else enumerate(node)
        if isinstance(node, list)
        else ()
    )
    for key, child in items:
        out.append((*prefix, key))
        out += _paths(child, (*prefix, key))
    return out


def _parent(data: Any, path: tuple) -> Any:
    for key in path[:-1]:
        data = data[key]
    return data


def mutate(data: dict, rng: random.Random, image_dir: Path, case: int) -> list[str]:
    """Apply 1–3 random mutations in place; returns their descriptions."""
    done = []
    for _ in range(rng.randint(1, 3)):
        kind = rng.choice(["delete", "retype", "retype", "retype", "image", "duplicate"])
        paths = _paths(data)
        if kind == "image" or not paths:
            images = data.get("images")
            records = [r for r in images if isinstance(r, dict)] if isinstance(images, list) else []
            if not records:
                continue
            name = f"bad_{case}_{len(done)}.png"
            sig = rng.choice(SIGNATURES)
            if rng.random() < 0.3:  # a real image cut short
                payload = _png_bytes(12, 10, case)[: rng.randint(0, 60)]
            else:
                payload = sig + rng.randbytes(rng.randint(0, 300))
            (image_dir / name).write_bytes(payload)
            rng.choice(records)["file_name"] = name
            done.append(f"image {name} = {payload[:12]!r}...")
            continue
        path = rng.choice(paths)
        parent = _parent(data, path)
        if kind == "delete":
            del parent[path[-1]]
        elif kind == "duplicate" and isinstance(parent, list):
            parent.append(copy.deepcopy(parent[path[-1]]))
        else:
            parent[path[-1]] = copy.deepcopy(rng.choice(WEIRD))
        done.append(f"{kind} {'.'.join(map(str, path))}")
    return done


def check_outcome(ds: CocoDetection, transforms_on: bool) -> None:
    """What a successful load must give: sane images and targets."""
    for i in range(len(ds)):
        image, target = ds[i]
        assert image.dim() == 3 and image.shape[0] == 3 and torch.isfinite(image).all()
        boxes, labels = target["boxes"], target["labels"]
        assert boxes.shape == (labels.numel(), 4) and torch.isfinite(boxes).all()
        assert ((labels >= 0) & (labels < ds.num_classes)).all()
        h, w = image.shape[1:]
        if not transforms_on:
            assert (
                (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= w).all() and (boxes[:, 3] <= h).all()
            )
            assert (boxes[:, 2:] > boxes[:, :2]).all()
    assert len(ds.coco.getImgIds()) >= len(ds)
    # the evaluation of a detection on every kept box must run too
    dets = []
    for i in range(len(ds)):
        _, target = ds[i]
        for (x0, y0, x1, y1), label in zip(target["boxes"].tolist(), target["labels"], strict=True):
            dets.append({"image_id": ds.image_ids[i], "category_id": ds.category_ids[int(label)],
                         "bbox": [x0, y0, x1 - x0, y1 - y0], "score": 0.9})  # fmt: skip
    coco_evaluate(ds.coco, dets, use_fast=False)


def test_fuzzed_coco_files_give_data_errors_or_counted_repairs(tmp_path: Path) -> None:
    image_dir = tmp_path / "images"
    image_dir.mkdir()
    base = base_dataset(image_dir)
    rng = random.Random(1234)
    outcomes = {"ok": 0, "DataError": 0, "skipped_images": 0}
    torch.manual_seed(0)
    for case in range(NUM_CASES):
        data = copy.deepcopy(base)
        what = mutate(data, rng, image_dir, case)
        ann = tmp_path / f"case_{case}.json"
        if rng.random() < 0.03:
            ann.write_bytes(rng.randbytes(40))  # not even JSON
            what.append("random bytes as the annotation file")
        else:
            ann.write_text(json.dumps(data))
        transforms_on = rng.random() < 0.5
        augment = build_transforms({"photometric": True}, train=True)
        kwargs = {
            "filter_empty": rng.random() < 0.5,
            "skip_bad_images": rng.random() < 0.5,
            "transforms": augment if transforms_on else None,
        }
        try:
            ds = CocoDetection(ann, image_dir, **kwargs)
            check_outcome(ds, transforms_on)
        except DataError as err:
            msg = str(err)
            assert str(ann) in msg or str(image_dir) in msg, f"case {case} {what}: {msg}"
            outcomes["DataError"] += 1
            continue
        except Exception as err:  # noqa: BLE001 - the point of the test
            pytest.fail(f"case {case} {what} {kwargs}: raw {type(err).__name__}: {err}")
        outcomes["ok"] += 1
        outcomes["skipped_images"] += int(ds.skipped_images > 0)
    # the fuzzer exercises both outcomes and the counted skip of unreadable images
    assert outcomes["ok"] > 30 and outcomes["DataError"] > 30 and outcomes["skipped_images"] > 3, (
        outcomes
    )


@pytest.mark.parametrize("signature", SIGNATURES, ids=["png", "jpeg", "gif", "bmp", "tiff", "none"])
def test_random_bytes_behind_image_signatures(tmp_path: Path, signature: bytes) -> None:
    image_dir = tmp_path / "images"
    image_dir.mkdir()
    data = base_dataset(image_dir)
    rng = random.Random(len(signature))
    for trial in range(20):
        (image_dir / "1.png").write_bytes(signature + rng.randbytes(rng.randint(0, 400)))
        ann = tmp_path / "ann.json"
        ann.write_text(json.dumps(data))
        ds = CocoDetection(ann, image_dir, filter_empty=False)
        with pytest.raises(DataError, match=r"1\.png.*image id 1"):
            ds[0]
        skipping = CocoDetection(ann, image_dir, filter_empty=False, skip_bad_images=True)
        _, target = skipping[0]
        assert target["image_id"] == 2 and skipping.skipped_images == 1, trial
