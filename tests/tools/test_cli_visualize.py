"""``dynadet predict --show-attention / --show-gates`` write figures and JSON per image."""

import json

import yaml

from dynadet.cli import main as cli_main

BACKBONE = {"type": "ResNet", "depth": 18, "out_indices": [1, 2, 3], "norm": "bn",
            "base_width": 8, "frozen_stages": -1}
FPN = {"type": "FPN", "in_channels": [16, 32, 64], "out_channels": 32, "extra_blocks": "none"}
ANCHORS = {"type": "AnchorGenerator", "strides": [8, 16, 32], "ratios": [1.0],
           "octave_base_scale": 8}
PRE = {"type": "Preprocessor", "min_size": 96, "max_size": 128, "size_divisor": 32}


def _config(tmp_path, neck, head) -> str:
    cfg = {"_base_": "_base/runtime", "classes": ["a", "b"],
           "model": {"type": "OneStageDetector", "backbone": BACKBONE, "neck": neck,
                     "head": head, "preprocess": PRE}}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def test_show_attention(tmp_path):
    neck = {"type": "Chain", "modules": [FPN, {"type": "DyHead", "in_channels": 32,
                                               "channels": 32, "num_blocks": 2}]}
    head = {"type": "ATSSHead", "num_classes": 2, "in_channels": 32, "num_convs": 0,
            "pred_kernel_size": 1, "anchor_generator": ANCHORS}
    out = tmp_path / "out"
    args = ["predict", _config(tmp_path, neck, head), "--synthetic", "1", "--output", str(out)]
    assert cli_main(args + ["--show-attention"]) == 0
    assert (out / "synthetic_0_attention.png").stat().st_size > 0
    summary = json.loads((out / "synthetic_0_attention.json").read_text())
    assert summary
    # a model without DyHead gets a clear error, not a traceback
    assert cli_main(args + ["--show-gates"]) == 2


def test_show_gates(tmp_path):
    head = {"type": "FCOSRoutingHead", "num_classes": 2, "in_channels": 32, "num_layers": 1,
            "num_groups": 8, "regress_ranges": [[-1, 64], [64, 128], [128, 1e8]],
            "anchor_generator": dict(ANCHORS, octave_base_scale=1)}
    out = tmp_path / "out"
    args = ["predict", _config(tmp_path, FPN, head), "--synthetic", "1", "--output", str(out),
            "--show-gates", "--gate-layers", "all"]
    assert cli_main(args) == 0
    assert (out / "synthetic_0_gates.png").stat().st_size > 0
    gates = json.loads((out / "synthetic_0_gates.json").read_text())
    assert 0 < gates["executed_ratio"] <= 1
