"""Training loop: exact resume, divergence, unwritable output, checkpoints, CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from dynadet.cli import main as cli_main
from dynadet.config import load_config
from dynadet.data.synthetic import write_synthetic_dataset
from dynadet.engine.checkpoint import load_checkpoint
from dynadet.engine.logger import read_metrics
from dynadet.engine.state import last_checkpoint, load_training_state
from dynadet.engine.train import Trainer, TrainingDiverged, train

TINY = [
    "model.preprocess.min_size=64",
    "model.preprocess.max_size=96",
    "model.neck.out_channels=32",
    "model.head.in_channels=32",
    "model.head.feat_channels=32",
    "model.head.num_convs=1",
    "train.batch_size=2",
    "train.max_iters=6",
    "train.warmup_iters=2",
    "train.checkpoint_period=3",
    "train.log_period=1",
    "train.tensorboard=false",
    "data.num_workers=0",
]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("synth")
    return write_synthetic_dataset(root, 10, seed=3, height=64, width=80, progress=False)


def tiny_cfg(paths: dict[str, Path], extra: list[str] = ()) -> dict:
    cfg = load_config("quickstart_fcos", TINY + list(extra))
    cfg["data"]["train"] = {"ann_file": str(paths["train"]), "image_dir": str(paths["images"])}
    cfg["data"]["val"] = {"ann_file": str(paths["val"]), "image_dir": str(paths["images"])}
    return cfg


def train_losses(run_dir: Path) -> list[tuple[int, float]]:
    return [
        (r["iter"], r["loss"])
        for r in read_metrics(run_dir / "metrics.jsonl")
        if r["type"] == "train"
    ]


def interrupt_at(monkeypatch, call: int) -> None:
    """Make the ``call``-th training step raise KeyboardInterrupt (a user's Ctrl-C)."""
    real_step = Trainer.step
    calls = {"n": 0}

    def step(self, batch_iter):
        calls["n"] += 1
        if calls["n"] == call:
            raise KeyboardInterrupt
        return real_step(self, batch_iter)

    monkeypatch.setattr(Trainer, "step", step)


def test_interrupted_and_resumed_run_matches_uninterrupted(data_dir, tmp_path, monkeypatch):
    full = tmp_path / "full"
    train(tiny_cfg(data_dir), full)
    part = tmp_path / "part"
    with monkeypatch.context() as m:  # stopped during iteration 5, after the save at 3
        interrupt_at(m, 5)
        with pytest.raises(KeyboardInterrupt):
            train(tiny_cfg(data_dir), part)
    assert last_checkpoint(part).name == "iter_0000003"
    train(tiny_cfg(data_dir), part, resume=True)
    a, b = train_losses(full), train_losses(part)
    assert [i for i, _ in a] == [1, 2, 3, 4, 5, 6] == [i for i, _ in b]
    assert a == b  # bit-identical losses on CPU
    wa, *_ = load_checkpoint(last_checkpoint(full))
    wb, *_ = load_checkpoint(last_checkpoint(part))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_checkpoint_contents_and_weights_only_state(data_dir, tmp_path):
    run = tmp_path / "run"
    train(tiny_cfg(data_dir, ["train.ema=0.99"]), run)
    ckpt = last_checkpoint(run)
    assert ckpt.name == "iter_0000006"
    state = load_training_state(ckpt)  # weights_only=True inside
    assert state["iteration"] == 6 and "optimizer" in state and "rng" in state
    assert "ema" in state
    weights, cfg, classes, meta = load_checkpoint(ckpt)
    assert classes == ["square", "disc", "triangle", "ring", "cross"]
    assert meta["iteration"] == 6 and cfg["model"]["head"]["type"] == "FCOSHead"
    assert (run / "config.yaml").exists() and (run / "plots" / "loss.png").exists()
    # no temporary folders left behind
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]


def test_nan_loss_stops_with_iteration_and_last_checkpoint(data_dir, tmp_path, monkeypatch):
    run = tmp_path / "nan"
    trainer = Trainer(tiny_cfg(data_dir), run)
    real_step = Trainer.step
    calls = {"n": 0}

    def step(self, batch_iter):
        out = real_step(self, batch_iter)
        calls["n"] += 1
        if calls["n"] == 5:
            out["loss"] = math.nan
        return out

    monkeypatch.setattr(Trainer, "step", step)
    with pytest.raises(TrainingDiverged) as err:
        trainer.run()
    msg = str(err.value)
    assert "iteration 5" in msg and "iter_0000003" in msg
    assert last_checkpoint(run).name == "iter_0000003"


def test_unwritable_output_folder_fails_before_training(data_dir, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(OSError, match="cannot write to the run folder"):
        Trainer(tiny_cfg(data_dir), blocker / "run").setup()


def test_lr_schedule_is_logged_with_warmup(data_dir, tmp_path):
    run = tmp_path / "lr"
    cfg = tiny_cfg(data_dir, ["train.schedule=multistep", "train.steps=[4]"])
    base = cfg["train"]["lr"]
    train(cfg, run)
    lrs = [r["lr"] for r in read_metrics(run / "metrics.jsonl") if r["type"] == "train"]
    # logged after each step: warm-up (2 its, factor 0.01 → 1), then ×0.1 from iteration 4
    assert lrs[0] == pytest.approx(base * (0.01 * 0.5 + 0.5))
    assert lrs[1] == pytest.approx(base)
    assert lrs[4] == pytest.approx(base * 0.1)


def test_cli_train_eval_predict(data_dir, tmp_path):
    cfg_path = tmp_path / "tiny.yaml"
    import yaml

    cfg_path.write_text(yaml.safe_dump(tiny_cfg(data_dir, ["train.max_iters=2"])))
    run = tmp_path / "cli_run"
    assert cli_main(["train", str(cfg_path), f"output_dir={run}"]) == 0
    ckpt = last_checkpoint(run)
    # the latest checkpoint of the run is found from the config + run folder, or the folder
    assert cli_main(["eval", str(cfg_path), f"output_dir={run}"]) == 0
    assert cli_main(["eval", str(run)]) == 0
    metrics = json.loads((ckpt.parent / "eval" / ckpt.name / "metrics.json").read_text())
    assert "AP" in json.dumps(metrics)
    out = tmp_path / "pred"
    assert (
        cli_main(
            [
                "predict",
                "--weights",
                str(last_checkpoint(run)),
                "--input",
                str(data_dir["images"]),
                "--output",
                str(out),
            ]
        )
        == 0
    )
    assert (out / "predictions.json").exists() and len(list(out.glob("*.png"))) == 10


def test_cli_reports_config_typos(capsys):
    assert cli_main(["predict", "quickstart", "--synthetic", "1", "model.head.nms_tresh=0.5"]) == 2
    assert "nms_thresh" in capsys.readouterr().err


def test_python_api_train_evaluate_predict(data_dir, tmp_path):
    from dynadet import Detector

    det = Detector.from_config("quickstart_fcos", TINY + ["train.max_iters=2"])
    result = det.train((data_dir["train"], data_dir["images"]), run_dir=tmp_path / "api")
    assert result["iterations"] == 2
    res = det.evaluate(data_dir["val"], data_dir["images"])
    assert set(res.metrics) >= {"AP", "AP50", "AP90"} and res.per_class.keys() <= set(
        det.class_names)
    image = next((data_dir["images"]).glob("*.png"))
    pred = det.predict(image)
    assert pred.boxes.shape[1] == 4 and len(pred.names) == len(pred)


def test_missing_data_paths_say_what_to_set(tmp_path, capsys):
    assert cli_main(["train", "quickstart", f"output_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err
    assert "data.train.ann_file" in err and "data.train.image_dir" in err


def test_time_budget_fit_sets_max_iters_and_rebuilds_the_schedule(data_dir, tmp_path):
    cfg = tiny_cfg(data_dir, ["train.max_iters=1000", "train.schedule=cosine", "train.num_evals=4"])
    trainer = Trainer(cfg, tmp_path / "run", device="cpu")
    trainer.setup()
    trainer.eval_points = [250, 500, 750, 1000]
    bar = type("Bar", (), {"refresh": lambda self: None, "total": 0})()
    # 20 iterations done, 30 s left at 0.5 s per iteration: 60 more
    trainer._fit_budget(20, 30.0, 0.5, bar)
    assert trainer.max_iters == 80 and bar.total == 80
    assert trainer.eval_points == [35, 50, 65, 80]  # 4 evaluations over the remaining 60
    lr_80 = trainer.optimizer.param_groups[0]["lr"]
    # a later fit (after the evaluation at 35) moves the end: the three still to come spread
    # over what is left, the last at the new end (no extra evaluation just before it)
    trainer._fit_budget(35, 12.5, 0.5, bar)
    assert trainer.max_iters == 60 and trainer.eval_points == [35, 44, 52, 60]
    assert trainer._evals_left(35) == 3 and trainer._eval_due(52) and not trainer._eval_due(50)
    assert trainer.optimizer.param_groups[0]["lr"] < lr_80  # further along a shorter cosine
    trainer._fit_budget(40, 1e6, 0.5, bar)  # never beyond the configured max_iters
    assert trainer.max_iters == 1000
    trainer._fit_budget(40, -5.0, 0.5, bar)  # over budget: stop after the next iteration
    assert trainer.max_iters == 41


def test_time_budget_counts_evaluations(data_dir, tmp_path, monkeypatch):
    import time as time_mod

    slow_eval = Trainer.evaluate

    def evaluate(self, iteration):
        time_mod.sleep(1.0)  # an evaluation far slower than a training step
        return slow_eval(self, iteration)

    monkeypatch.setattr(Trainer, "evaluate", evaluate)
    cfg = tiny_cfg(data_dir, ["train.max_iters=400", "train.num_evals=4",
                              "train.checkpoint_period=1000"])  # fmt: skip
    cfg["train"]["time_budget_s"] = 6.0
    start = time_mod.perf_counter()
    result = train(cfg, tmp_path / "run")
    spent = time_mod.perf_counter() - start
    assert 6 <= result["iterations"] < 400  # calibration (5) + at least one on a busy machine
    evals = [r["iter"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")
             if r["type"] == "eval"]  # fmt: skip
    # never more than the 4 asked for (a re-fit moving the end adds none), the last at the end
    assert 1 <= len(evals) <= 4 and evals == sorted(set(evals))
    assert evals[-1] == result["iterations"]
    # 4 evaluations take 4 s of the 6: without counting them training would end near 10 s
    assert spent < 6.0 + 2.0  # setup and the final plots are outside the budget
