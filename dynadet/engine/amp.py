"""Which mixed precision ``train.amp`` asks for on a device.

``train.amp``:

- ``false`` — fp32 everywhere (default);
- ``true`` / ``fp16`` — fp16 autocast with a gradient scaler on CUDA; on CPU ``true`` means bf16;
- ``bf16`` — bf16 autocast, no scaler (CPU or CUDA);
- ``auto`` — fp16 on CUDA; on CPU bf16 only where it is measurably faster than fp32 (CPUs with
  native bf16 dot products, e.g. AVX512-BF16 or AMX; elsewhere bf16 is emulated and slower), by
  timing a small convolution both ways once per process.

Weights, optimizer state, losses, priors and box decoding stay fp32 in every mode
(:mod:`dynadet.models.precision`).
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

log = logging.getLogger("dynadet")

CHOICES = ("false", "true", "fp16", "bf16", "auto")


@dataclass(frozen=True)
class AmpSettings:
    """Resolved mixed precision: ``dtype`` is ``None`` for fp32 training."""

    dtype: torch.dtype | None = None
    scaler: bool = False

    @property
    def enabled(self) -> bool:
        return self.dtype is not None

    @property
    def name(self) -> str:
        return {None: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[self.dtype]


def _normalise(setting: object) -> str:
    if setting is None or setting is False:
        return "false"
    if setting is True:
        return "true"
    value = str(setting).strip().lower()
    if value not in CHOICES:
        raise ValueError(f"train.amp={setting!r}: expected one of {', '.join(CHOICES)}")
    return value


def resolve_amp(setting: object, device: torch.device | str) -> AmpSettings:
    """The :class:`AmpSettings` of ``train.amp = setting`` on ``device``."""
    value = _normalise(setting)
    kind = torch.device(device).type
    if value == "false":
        return AmpSettings()
    if value == "bf16":
        return AmpSettings(torch.bfloat16)
    if kind == "cuda":
        return AmpSettings(torch.float16, scaler=True)
    if value == "fp16":
        raise ValueError("train.amp=fp16 needs CUDA; on CPU use bf16 (or auto)")
    if value == "true" or cpu_bf16_is_faster():
        return AmpSettings(torch.bfloat16)
    return AmpSettings()


@functools.lru_cache(maxsize=1)
def cpu_bf16_is_faster(threshold: float = 0.8) -> bool:
    """Whether a 3×3 convolution (forward + backward) runs in ≤ ``threshold`` × its fp32 time
    under CPU bf16 autocast. Takes about a second; the answer is cached for the process."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 64, 48, 48, generator=gen, requires_grad=True)
    w = torch.randn(64, 64, 3, 3, generator=gen, requires_grad=True)

    def run(enabled: bool) -> float:
        best = float("inf")
        for _ in range(4):
            start = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
                y = F.conv2d(x, w, padding=1)
            y.float().sum().backward()
            best = min(best, time.perf_counter() - start)
        return best

    run(False), run(True)  # warm-up (oneDNN primitive creation)
    fp32, bf16 = run(False), run(True)
    faster = bf16 <= threshold * fp32
    log.info("amp=auto on CPU: bf16 conv %.1f ms vs fp32 %.1f ms → %s", bf16 * 1e3, fp32 * 1e3,
             "bf16" if faster else "fp32")
    return faster
