"""Fault injection: SIGKILL mid-checkpoint, non-finite losses and gradients, pickled payloads in
checkpoints, a full disk and an unwritable run folder.

Already covered elsewhere (not repeated here): interrupt + resume gives bit-identical losses
(``test_train.py::test_interrupted_and_resumed_run_matches_uninterrupted``), a NaN loss names the
iteration and the last checkpoint (``test_train.py::test_nan_loss_stops_with_iteration_and_last_
checkpoint``), a file where the run folder should be (``test_train.py::test_unwritable_output_
folder_fails_before_training``), 2-process DDP with a rank whose images have no boxes
(``test_ddp_train.py::test_ddp_gradients_equal_single_process[rank1-no-boxes]``).
"""

from __future__ import annotations

import errno
import hashlib
import multiprocessing as mp
import os
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch
import yaml

import dynadet.engine.checkpoint as checkpoint_module
from dynadet.api import Detector
from dynadet.cli import main as cli_main
from dynadet.data.synthetic import write_synthetic_dataset
from dynadet.engine.checkpoint import CheckpointError, load_checkpoint, load_foreign_state_dict
from dynadet.engine.state import STATE_NAME, last_checkpoint, load_training_state
from dynadet.engine.train import Trainer, TrainingDiverged, train
from dynadet.models.fcos import FCOSHead
from tests.engine.test_train import tiny_cfg, train_losses

# ------------------------------------------------------------------------------------- helpers


def snapshot(folder: Path) -> dict[str, tuple[str, int]]:
    """``relative path → (sha256 of the bytes, mtime in ns)`` of every file under ``folder``
    except temporaries (names starting with a dot)."""
    files = (p for p in sorted(folder.rglob("*")) if p.is_file())
    return {
        str(p.relative_to(folder)): (
            hashlib.sha256(p.read_bytes()).hexdigest(),
            p.stat().st_mtime_ns,
        )
        for p in files
        if not any(part.startswith(".") for part in p.relative_to(folder).parts)
    }


def finite_weights(path: Path) -> bool:
    weights, *_ = load_checkpoint(path)
    return all(bool(torch.isfinite(v).all()) for v in weights.values() if v.is_floating_point())


def temp_leftovers(run: Path) -> list[str]:
    return [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> dict[str, Path]:
    """The synthetic data set of test_train.py (10 images of 64×80)."""
    root = tmp_path_factory.mktemp("synth")
    return write_synthetic_dataset(root, 10, seed=3, height=64, width=80, progress=False)


@pytest.fixture(scope="module")
def full_run(data_dir, tmp_path_factory) -> Path:
    """An uninterrupted 6-iteration run (checkpoints at 3 and 6) to compare against."""
    run = tmp_path_factory.mktemp("full") / "run"
    train(tiny_cfg(data_dir), run)
    return run


# ------------------------------------------------------------------------- SIGKILL mid-save


def _train_until_killed(cfg: dict, run: str, marker: str) -> None:
    """Child process: train, but stall half-way through writing the iteration-6 weights."""
    torch.set_num_threads(1)
    real_save_file = checkpoint_module.save_file

    def half_written(tensors, filename, metadata=None):
        real_save_file(tensors, filename, metadata=metadata)
        if "iter_0000006" in str(filename):
            with open(filename, "r+b") as f:
                f.truncate(os.path.getsize(filename) // 2)
            Path(marker).write_text(str(filename))
            time.sleep(120)  # the parent SIGKILLs us here

    checkpoint_module.save_file = half_written
    train(cfg, run)


@pytest.mark.skipif("fork" not in mp.get_all_start_methods(), reason="needs fork()")
def test_sigkill_while_writing_a_checkpoint_keeps_the_previous_one(data_dir, full_run, tmp_path):
    run, marker = tmp_path / "run", tmp_path / "writing"
    cfg = tiny_cfg(data_dir, ["train.keep_checkpoints=1"])  # the save would also prune iter 3
    child = mp.get_context("fork").Process(
        target=_train_until_killed, args=(cfg, str(run), str(marker))
    )
    child.start()
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert child.is_alive(), f"training exited early (code {child.exitcode})"
            assert time.monotonic() < deadline, "training never reached the iteration-6 save"
            time.sleep(0.02)
        os.kill(child.pid, signal.SIGKILL)
        child.join(30)
    finally:
        if child.is_alive():
            child.kill()
    assert child.exitcode == -signal.SIGKILL
    partial = Path(marker.read_text())
    assert partial.exists() and partial.parent.name.startswith(".iter_0000006.")

    ckpt = last_checkpoint(run)
    assert ckpt.name == "iter_0000003" and not (run / "checkpoints" / "iter_0000006").exists()
    weights, _, _, meta = load_checkpoint(ckpt)
    assert meta["iteration"] == 3 and load_training_state(ckpt)["iteration"] == 3

    # The killed child trained with one thread (safe after fork()); resume and the uninterrupted
    # reference run use one thread too, so the float sums (and the numbers) are the same.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(cfg, run, resume=True)  # continues from iteration 3: same numbers as never killed
        reference_run = tmp_path / "reference"
        train(cfg, reference_run)
    finally:
        torch.set_num_threads(threads)
    assert last_checkpoint(run).name == "iter_0000006"
    assert train_losses(run) == train_losses(reference_run)
    resumed, *_ = load_checkpoint(last_checkpoint(run))
    reference, *_ = load_checkpoint(last_checkpoint(reference_run))
    assert all(torch.equal(resumed[k], reference[k]) for k in reference)
    assert temp_leftovers(run) == []  # the killed save's partial folder is cleaned up


def test_resume_after_a_kill_that_tore_the_metrics_file(data_dir, full_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(full_run, run)
    (run / "checkpoints" / "last").write_text("iter_0000003\n")
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"type": "train", "iter": 7, "lo')  # killed mid-append
    train(tiny_cfg(data_dir), run, resume=True)
    assert train_losses(run) == train_losses(full_run)


# ------------------------------------------------------------------- non-finite loss / grads


def test_nan_loss_from_the_model_writes_and_steps_nothing(data_dir, tmp_path, monkeypatch):
    """NaN at iteration 6, where the final checkpoint would be saved: training stops, no
    optimizer step is taken, no checkpoint file is touched."""
    run = tmp_path / "run"
    trainer = Trainer(tiny_cfg(data_dir), run)
    real_loss = FCOSHead.loss
    before: dict = {}

    def loss(self, outputs, priors, targets):
        out = real_loss(self, outputs, priors, targets)
        if self.training and not before and trainer.scheduler.last_epoch == 5:  # 6th step
            before["files"] = snapshot(run / "checkpoints")
            before["weights"] = {k: v.clone() for k, v in trainer.model.state_dict().items()}
            out["loss_cls"] = out["loss_cls"] * float("nan")
        return out

    monkeypatch.setattr(FCOSHead, "loss", loss)
    with pytest.raises(TrainingDiverged) as err:
        trainer.run()
    msg = str(err.value)
    assert "iteration 6" in msg and "loss_cls=nan" in msg
    assert str(run / "checkpoints" / "iter_0000003") in msg
    assert snapshot(run / "checkpoints") == before["files"]
    assert last_checkpoint(run).name == "iter_0000003"
    after = trainer.model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before["weights"].items())


@pytest.mark.parametrize("clip", ["10.0", "null"], ids=["grad-clip", "no-clip"])
def test_nan_gradient_with_finite_loss_never_reaches_a_checkpoint(
    data_dir, tmp_path, monkeypatch, clip
):
    """A finite loss whose gradient is NaN (sqrt at 0) at iteration 3, a checkpoint iteration:
    the run stops at 3 and no checkpoint with non-finite weights is ever written."""
    run = tmp_path / "run"
    trainer = Trainer(tiny_cfg(data_dir, [f"train.grad_clip={clip}"]), run)
    real_loss = FCOSHead.loss

    def loss(self, outputs, priors, targets):
        out = real_loss(self, outputs, priors, targets)
        if self.training and trainer.scheduler.last_epoch == 2:  # the 3rd step
            out["loss_cls"] = out["loss_cls"] + torch.sqrt(outputs["reg"][0].sum() * 0.0)
        return out

    monkeypatch.setattr(FCOSHead, "loss", loss)
    with pytest.raises(TrainingDiverged) as err:
        trainer.run()
    msg = str(err.value)
    assert "iteration 3" in msg and "none saved yet" in msg
    assert last_checkpoint(run) is None
    assert not list(run.glob("checkpoints/iter_*"))
    assert all(bool(torch.isfinite(p).all()) for p in trainer.model.parameters()) == (
        clip != "null"
    )  # with clipping the bad step is skipped; without, the weights broke but were not saved


# ------------------------------------------------------------------------- pickled payloads


class _Payload:
    """Unpickling this calls ``open(marker, "w")``: harmless, but visible."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _write_payload(path: Path, marker: Path, zipfile: bool = True) -> Path:
    obj = {"model": {"weight": torch.zeros(2)}, "trap": _Payload(marker)}
    torch.save(obj, path, _use_new_zipfile_serialization=zipfile)
    return path


@pytest.mark.parametrize("name", ["w.pth", "w.pkl", "w.pt", "legacy.pth", "w.safetensors"])
def test_foreign_loader_refuses_pickled_code(tmp_path: Path, name: str) -> None:
    marker = tmp_path / "pwned"
    path = _write_payload(tmp_path / name, marker, zipfile=not name.startswith("legacy"))
    with pytest.raises(CheckpointError, match=name):
        load_foreign_state_dict(path)
    assert not marker.exists()


def test_checkpoint_loaders_refuse_pickled_code(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    single = _write_payload(tmp_path / "w.safetensors", marker)
    folder = tmp_path / "ckpt"
    folder.mkdir()
    _write_payload(folder / "model.safetensors", marker)
    for path in (single, folder):
        with pytest.raises(CheckpointError, match="not a readable safetensors file"):
            load_checkpoint(path)
        with pytest.raises(CheckpointError, match="not a readable safetensors file"):
            Detector.from_checkpoint(path)
    with pytest.raises(CheckpointError, match="no checkpoint here"):
        load_checkpoint(_write_payload(tmp_path / "w.pt", marker))
    assert not marker.exists()


def test_resume_refuses_a_pickled_training_state(data_dir, full_run, tmp_path, capsys):
    run, marker = tmp_path / "run", tmp_path / "pwned"
    shutil.copytree(full_run, run)
    ckpt = last_checkpoint(run)
    state = load_training_state(ckpt)
    torch.save({**state, "trap": _Payload(marker)}, ckpt / STATE_NAME)
    with pytest.raises(CheckpointError, match=STATE_NAME):
        Trainer(tiny_cfg(data_dir), run, resume=True).setup()
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(tiny_cfg(data_dir)))
    assert cli_main(["train", str(cfg_path), f"output_dir={run}", "resume=true"]) == 2
    assert "cannot be loaded safely" in capsys.readouterr().err
    assert not marker.exists()


# --------------------------------------------------------------- full disk, unwritable folder


def test_disk_full_during_a_checkpoint_names_the_path_and_keeps_the_previous(
    data_dir, tmp_path, monkeypatch
):
    run = tmp_path / "run"
    real_save_file = checkpoint_module.save_file
    before: dict = {}

    def disk_full(tensors, filename, metadata=None):
        if "iter_0000006" in str(filename):
            before["files"] = snapshot(run / "checkpoints")
            real_save_file(tensors, filename, metadata=metadata)  # a partial file is left
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save_file(tensors, filename, metadata=metadata)

    monkeypatch.setattr(checkpoint_module, "save_file", disk_full)
    with pytest.raises(OSError) as err:
        train(tiny_cfg(data_dir), run)
    msg = str(err.value)
    assert err.value.errno == errno.ENOSPC
    assert str(run / "checkpoints" / "iter_0000006") in msg and "No space left" in msg
    assert snapshot(run / "checkpoints") == before["files"]
    assert last_checkpoint(run).name == "iter_0000003" and finite_weights(last_checkpoint(run))
    assert temp_leftovers(run) == []


def test_disk_full_before_training_is_a_clear_error(data_dir, tmp_path, monkeypatch):
    real_write_text = Path.write_text

    def write_text(self, *args, **kwargs):
        if self.name == ".write_test":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
        return real_write_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", write_text)
    run = tmp_path / "run"
    trainer = Trainer(tiny_cfg(data_dir), run)
    with pytest.raises(OSError, match=f"cannot write to the run folder {run}.*No space left"):
        trainer.setup()
    assert not hasattr(trainer, "model")  # nothing was built or trained
    assert list(run.iterdir()) == []


def test_read_only_run_folder_fails_before_training(data_dir, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    run.chmod(0o500)
    try:
        try:
            (run / "probe").write_text("")
        except PermissionError:
            pass
        else:
            pytest.skip("permissions are not enforced here (root with CAP_DAC_OVERRIDE)")
        trainer = Trainer(tiny_cfg(data_dir), run)
        with pytest.raises(OSError, match=f"cannot write to the run folder {run}"):
            trainer.setup()
        assert not hasattr(trainer, "model")
    finally:
        run.chmod(0o700)
