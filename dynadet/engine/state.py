"""Training checkpoints: a folder per save, written atomically, resumable exactly.

``run/checkpoints/iter_0001000/`` holds ``model.safetensors`` (weights + config + class names,
see :mod:`dynadet.engine.checkpoint`) and ``training_state.pt`` (optimizer, scheduler, iteration,
RNG states, EMA, AMP scaler), readable with ``torch.load(weights_only=True)``. The folder is
written under a temporary name and renamed, then ``run/checkpoints/last`` (a one-line text file)
is replaced atomically, so a process killed mid-save leaves the previous checkpoint intact.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dynadet.engine.checkpoint import CheckpointError, save_checkpoint

STATE_NAME = "training_state.pt"
LAST_NAME = "last"


def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch RNG states as weights-only-loadable values."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": list(random.getstate()[1]),
        "python_pos": random.getstate()[2],
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
        "numpy_gauss": [int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate((3, tuple(int(x) for x in state["python"]), state["python_pos"]))
    keys = state["numpy_keys"].numpy().astype(np.uint32)
    has_gauss, gauss = state["numpy_gauss"]
    np.random.set_state(("MT19937", keys, int(state["numpy_pos"]), int(has_gauss), float(gauss)))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def save_training_checkpoint(
    run_dir: Path,
    iteration: int,
    model_state: dict[str, torch.Tensor],
    config: dict[str, Any],
    class_names: list[str],
    training_state: dict[str, Any],
    keep: int = 3,
) -> Path:
    """Write ``checkpoints/iter_XXXXXXX`` atomically and point ``checkpoints/last`` at it.

    A write error (full disk, permissions) leaves the previous checkpoints as they were and is
    raised as ``OSError`` naming the checkpoint path.
    """
    root = checkpoint_dir(run_dir)
    name = f"iter_{iteration:07d}"
    final = root / name
    tmp: Path | None = None
    try:
        root.mkdir(parents=True, exist_ok=True)
        _remove_stale_temporaries(root)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=root))
        save_checkpoint(tmp, model_state, config, class_names, {"iteration": iteration})
        torch.save(training_state, tmp / STATE_NAME)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        pointer = root / f".{LAST_NAME}.tmp"
        pointer.write_text(name + "\n")
        os.replace(pointer, root / LAST_NAME)
    except BaseException as e:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise OSError(
                e.errno,
                f"cannot write checkpoint {final}: {e.strerror or e}; the previous checkpoints "
                "are unchanged (free disk space, then train again with resume=true)",
            ) from e
        raise
    _prune(root, keep, final)
    return final


def _remove_stale_temporaries(root: Path) -> None:
    """Delete half-written ``.iter_*`` folders of a process killed while saving (one writer)."""
    for stale in root.glob(".iter_*"):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)


def _prune(root: Path, keep: int, newest: Path) -> None:
    """Keep the ``keep`` most recent periodic checkpoints (and never the newest)."""
    if keep <= 0:
        return
    saved = sorted(p for p in root.glob("iter_*") if p.is_dir())
    for old in saved[:-keep]:
        if old != newest:
            shutil.rmtree(old, ignore_errors=True)


def last_checkpoint(run_dir: Path) -> Path | None:
    """The folder ``checkpoints/last`` points at, or ``None`` for a fresh run."""
    pointer = checkpoint_dir(run_dir) / LAST_NAME
    if not pointer.exists():
        return None
    path = checkpoint_dir(run_dir) / pointer.read_text().strip()
    if not (path / STATE_NAME).exists():
        raise CheckpointError(f"{pointer} points at {path}, which holds no {STATE_NAME}")
    return path


def load_training_state(path: Path) -> dict[str, Any]:
    try:
        return torch.load(Path(path) / STATE_NAME, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - unpickling errors come in many types
        raise CheckpointError(f"{path / STATE_NAME}: cannot be loaded safely ({e})") from e
