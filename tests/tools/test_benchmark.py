"""``dynadet benchmark`` (dynadet.tools.benchmark) on tiny models: every field, hand-checked
numbers where they are deterministic (parameters, static head cost, part sums)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from dynadet.api import build_model
from dynadet.config import load_config
from dynadet.engine.checkpoint import save_checkpoint
from dynadet.tools.benchmark import (
    add_benchmark_arguments,
    build_for_benchmark,
    data_images,
    run_benchmark,
)
from dynadet.tools.flops import PAPER_UNIT

TINY_FGDH = [
    "model.backbone.depth=18", "+model.backbone.base_width=8",
    "model.neck.in_channels=[16,32,64]", "model.neck.out_channels=16",
    "+model.head.in_channels=16", "model.head.num_groups=4", "model.head.num_layers=1",
    "model.head.init_gate=0.0",
]


def parse(argv: list[str], overrides: list[str] = (), keys: dict | None = None):
    parser = argparse.ArgumentParser()
    add_benchmark_arguments(parser)
    args = parser.parse_args(argv)
    args.set, args.keys = list(overrides), keys or {}
    return args


def run_json(capsys: pytest.CaptureFixture[str], argv: list[str], **kw) -> dict:
    assert run_benchmark(parse([*argv, "--json", "--no-progress"], **kw)) == 0
    return json.loads(capsys.readouterr().out)


def test_quickstart_json_has_every_field(capsys: pytest.CaptureFixture[str]) -> None:
    torch.manual_seed(0)
    result = run_json(capsys, ["quickstart_fcos", "--size", "64", "64", "--iters", "2", "--warmup",
                               "0", "--batch-sizes", "1", "2", "--num-images", "1", "--train"])
    model = build_model(load_config("quickstart_fcos"))
    n_params = sum(p.numel() for p in model.parameters())
    assert result["params"]["total"] == n_params == sum(result["params"]["parts"].values())
    assert result["input_size"] == [64, 64] and result["device"] == "cpu"
    flops = result["flops"]
    assert flops["input_shape"] == [1, 3, 64, 64] and flops["flops"] == 2 * flops["macs"] > 0
    parts = flops["parts_gmacs"]
    top = parts["backbone"] + parts["neck"] + parts["head"] + parts["other"]
    assert top == pytest.approx(flops["macs"] / 1e9, rel=1e-12)
    # quickstart towers: 2 × 2 convs of 96→96 3×3 on 8×8 + 4×4 + 2×2 (strides 8, 16, 32)
    tower = 2 * 2 * 96 * 96 * 9 * (64 + 16 + 4)
    cost = result["head_cost"]
    assert not cost["dynamic"] and cost["images"] == 1 and cost["source"] == "synthetic"
    assert cost["gmacs"] == {"avg": tower / 1e9, "min": tower / 1e9, "max": tower / 1e9}
    assert cost["paper_units"]["avg"] == tower / PAPER_UNIT and cost["executed_fraction"] == 1
    assert parts["head.cls_tower"] + parts["head.reg_tower"] == pytest.approx(tower / 1e9)
    for mode in ("inference", "train"):
        rows = result[mode]
        assert [r["batch_size"] for r in rows] == [1, 2]
        for r in rows:
            assert r["latency_ms_min"] <= r["latency_ms"]
            assert r["throughput_img_s"] == pytest.approx(r["batch_size"] * 1000 / r["latency_ms"])
            assert r["peak_memory_mb"] >= 0 and r["memory_method"]


def test_table_output_and_flops_only(capsys: pytest.CaptureFixture[str]) -> None:
    args = parse(["quickstart_fcos", "--size", "64", "64", "--flops", "--num-images", "1",
                  "--no-progress"])
    assert run_benchmark(args) == 0
    text = capsys.readouterr().out
    assert "| part | GMACs | GFLOPs | share |" in text and "| head.cls_tower |" in text
    assert "latency" not in text
    # key=value after --batch-sizes (nargs="+") still reaches the config
    result = run_json(capsys, ["quickstart_fcos", "--size", "64", "64", "--flops", "--num-images",
                               "0", "--batch-sizes", "1", "model.head.num_convs=1"])
    assert result["inference"] is None and result["train"] is None
    assert result["head_cost"] is None and result["overrides"] == ["model.head.num_convs=1"]
    assert result["flops"]["parts_gmacs"]["head.cls_tower"] == 96 * 96 * 9 * 84 / 1e9


def test_dynamic_head_cost_over_a_data_folder_and_coco_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    images = tmp_path / "images"
    images.mkdir()
    sizes = [(64, 64), (64, 96), (96, 64)]
    for i, (h, w) in enumerate(sizes):
        Image.new("RGB", (w, h), (40 * i, 90, 200)).save(images / f"{i}.png")
    ann = tmp_path / "annotations" / "val.json"
    ann.parent.mkdir()
    ann.write_text(json.dumps({"images": [{"file_name": f"{i}.png"} for i in (2, 0)]}))
    assert data_images(ann) == [images / "2.png", images / "0.png"]
    with pytest.raises(FileNotFoundError, match="no such folder"):
        data_images(tmp_path / "missing")

    preset = "fgdh_r50_fcos_dynamic_d4_mid_1x"
    argv = [preset, "--size", "64", "96", "--flops", "--data", str(images), "--num-images", "0"]
    torch.manual_seed(0)
    result = run_json(capsys, argv, overrides=TINY_FGDH)
    cost = result["head_cost"]
    assert cost["dynamic"] and cost["images"] == 3 and cost["source"] == str(images)
    paper = cost["paper_units"]
    assert paper["min"] <= paper["avg"] <= paper["max"]
    assert 0 < cost["executed_fraction"] < 1
    assert paper["max"] <= cost["full_paper_units"]["max"]
    result = run_json(capsys, [*argv[:6], str(ann)], overrides=TINY_FGDH)
    assert result["head_cost"]["images"] == 2


def test_weights_and_size_are_applied(tmp_path: Path) -> None:
    torch.manual_seed(0)
    source = build_model(load_config("quickstart_fcos"))
    ckpt = save_checkpoint(tmp_path / "ckpt", source.state_dict(), load_config("quickstart_fcos"),
                           ["a", "b", "c", "d", "e"])
    model, cfg = build_for_benchmark("quickstart_fcos", weights=ckpt, size=(48, 80))
    assert all(torch.equal(a, b) for a, b in zip(
        model.state_dict().values(), source.state_dict().values(), strict=True))
    assert (cfg["model"]["preprocess"]["min_size"], cfg["model"]["preprocess"]["max_size"]) == (
        48, 80)
    batch = model.eval().preprocess([torch.zeros(3, 48, 80)])
    assert batch.image_sizes == [(48, 80)]
