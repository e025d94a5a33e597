"""``dynadet quickstart`` end to end at a toy size: data, training, evaluation, pictures."""

import json

from dynadet.cli import main as cli_main
from dynadet.config import load_config


def test_quickstart_preset_uses_a_dynamic_head():
    head = load_config("quickstart")["model"]["head"]
    assert head["type"] == "ATSSRoutingHead" and head["dynamic"] is True
    assert head["budget_loss_weight"] > 0 and head["train_gn_mode"] == "masked"


def test_quickstart_writes_model_metrics_pictures_and_plots(tmp_path):
    out = tmp_path / "qs"
    argv = ["quickstart", "--out", str(out), "--minutes", "0.05", "--images", "12",
            "--size", "64", "80", "train.batch_size=2", "train.warmup_iters=1"]
    assert cli_main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["iterations"] >= 1 and "AP" in summary["metrics"]
    text = (out / "summary.md").read_text()
    assert "ATSSRoutingHead" in text and "| AP |" in text and "Dynamic head: the gates" in text
    assert any((out / "predictions").glob("*.png"))
    plots = {p.name for p in (out / "plots").glob("*.png")}
    assert {"loss.png", "dynamics.png"} <= plots


def test_bad_model_argument_fails_before_any_data_is_written(tmp_path, capsys):
    out = tmp_path / "qs"
    argv = ["quickstart", "--out", str(out), "model.head.train_gn_mode=sparse"]
    assert cli_main(argv) == 2
    assert "train_gn_mode must be one of" in capsys.readouterr().err
    assert not out.exists()
