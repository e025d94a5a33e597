"""plot_run draws the dynamic-training statistics and tolerates torn metric lines."""

import json

from PIL import Image

from dynadet.engine.logger import plot_run, read_metrics


def test_dynamics_plot_and_torn_line(tmp_path):
    lines = [json.dumps({"type": "train", "iter": i, "loss_cls": 1.0 / i,
                         "iou_thresh": 0.4 + i / 100, "beta": 1.0 - i / 50}) for i in range(1, 6)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + '\n{"type": "train", "it')
    assert len(read_metrics(tmp_path / "metrics.jsonl")) == 5
    written = {p.name for p in plot_run(tmp_path)}
    assert written == {"loss.png", "dynamics.png"}
    assert Image.open(tmp_path / "plots" / "dynamics.png").size[0] > 100


def test_no_dynamics_plot_without_statistics(tmp_path):
    record = {"type": "train", "iter": 1, "loss_cls": 1.0}
    (tmp_path / "metrics.jsonl").write_text(json.dumps(record) + "\n")
    assert {p.name for p in plot_run(tmp_path)} == {"loss.png"}
