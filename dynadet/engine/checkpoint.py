"""Pickle-free checkpoints: safetensors weights + the resolved config + class names.

A checkpoint is either one ``.safetensors`` file whose metadata holds the config (YAML) and the
class names (JSON), or a directory holding ``model.safetensors`` (same content) and a readable
copy of the config as ``config.yaml``. Writes are atomic: a temporary file, then a rename.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

WEIGHTS_NAME = "model.safetensors"
FORMAT_VERSION = "1"


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, with the path and what to fix."""


def _atomic_write(path: Path, write: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def weights_path(path: str | Path) -> Path:
    """The ``.safetensors`` file of a checkpoint file or directory."""
    p = Path(path)
    return p / WEIGHTS_NAME if p.is_dir() or p.suffix != ".safetensors" else p


def save_checkpoint(
    path: str | Path,
    state_dict: dict[str, Tensor],
    config: dict[str, Any],
    class_names: list[str],
    meta: dict[str, Any] | None = None,
) -> Path:
    """Write weights, config and class names; returns the weights file path."""
    out = weights_path(path)
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    metadata = {
        "format": "dynadet",
        "format_version": FORMAT_VERSION,
        "config": yaml.safe_dump(config, sort_keys=False),
        "classes": json.dumps(list(class_names)),
        "meta": json.dumps(meta or {}),
    }
    _atomic_write(out, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    if out.name == WEIGHTS_NAME:
        text = yaml.safe_dump(config, sort_keys=False)
        _atomic_write(out.parent / "config.yaml", lambda tmp: Path(tmp).write_text(text))
    return out


def load_checkpoint(path: str | Path) -> tuple[dict[str, Tensor], dict[str, Any], list[str], dict]:
    """Read ``(state_dict, config, class_names, meta)``; never unpickles anything."""
    file = weights_path(path)
    if not file.exists():
        raise CheckpointError(f"{path}: no checkpoint here (expected {file})")
    try:
        state = load_file(str(file))

        with safe_open(str(file), framework="pt") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{file}: not a readable safetensors file ({e})") from e
    if metadata.get("format") != "dynadet" or "config" not in metadata:
        raise CheckpointError(
            f"{file}: safetensors file without dynadet metadata; convert foreign weights with "
            "`dynadet convert`"
        )
    config = yaml.safe_load(metadata["config"])
    classes = json.loads(metadata.get("classes", "[]"))
    meta = json.loads(metadata.get("meta", "{}"))
    return state, config, classes, meta


def load_foreign_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Load a third-party ``.pth``/``.pkl``/``.safetensors`` state dict without unpickling code.

    ``torch.load(weights_only=True)`` refuses pickled objects other than tensors and containers;
    a ``{"model": ...}`` or ``{"state_dict": ...}`` wrapper is unwrapped.
    """
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p}: file not found")
    if p.suffix == ".safetensors":
        try:
            return load_file(str(p))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{p}: not a readable safetensors file ({e})") from e
    try:
        obj = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types here
        raise CheckpointError(
            f"{p}: cannot be read as a weights-only PyTorch file ({type(e).__name__}: {e}). "
            "Pickled code is refused; re-save the state dict with torch.save(model.state_dict())."
        ) from e
    for key in ("model", "state_dict", "module"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise CheckpointError(f"{p}: expected a dict of tensors (a state dict)")
    return dict(obj)
