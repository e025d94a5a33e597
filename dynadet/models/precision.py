"""Mixed precision helpers: half-precision network outputs, full-precision losses and boxes.

Under ``torch.autocast`` (bf16 on CPU, fp16/bf16 on CUDA) convolutions and linear layers run in
half precision; targets, priors, box decoding and the losses must not, or box coordinates lose
their low bits (bf16 keeps 8 significant bits: 1300 px becomes 1296) and focal/IoU losses lose
their small terms. Detectors therefore hand every head output through :func:`to_float` and
compute losses and post-processing inside :func:`full_precision`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

HALF = (torch.float16, torch.bfloat16)


def prior_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype to build priors/anchors in for features of ``dtype`` (never half)."""
    return torch.float32 if dtype in HALF else dtype


def to_float(tree: Any) -> Any:
    """``tree`` (tensors in lists, tuples, dicts) with half-precision tensors cast to fp32."""
    if isinstance(tree, torch.Tensor):
        return tree.float() if tree.dtype in HALF else tree
    if isinstance(tree, dict):
        return {k: to_float(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        out = [to_float(v) for v in tree]
        return type(tree)(out) if not hasattr(tree, "_fields") else type(tree)(*out)
    return tree


@contextmanager
def full_precision(device_type: str) -> Iterator[None]:
    """Suspend an active ``torch.autocast`` on ``device_type`` (a no-op when none is active)."""
    if torch.is_autocast_enabled(device_type):
        with torch.autocast(device_type, enabled=False):
            yield
    else:
        yield
