"""Optimizers (SGD, AdamW with per-group decay rules) and iteration-based LR schedules."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

_NORMS = (
    nn.BatchNorm1d, nn.BatchNorm2d, nn.SyncBatchNorm, nn.GroupNorm, nn.LayerNorm,
    nn.InstanceNorm2d,
)  # fmt: skip


def param_groups(
    model: nn.Module,
    weight_decay: float,
    norm_weight_decay: float | None = None,
    bias_weight_decay: float | None = None,
    bias_lr_factor: float = 1.0,
    no_decay_names: Iterable[str] = (),
) -> list[dict[str, Any]]:
    """Split trainable parameters into groups with their own weight decay / LR factor.

    ``norm_weight_decay`` applies to normalisation layers' weights and biases (``None``: same as
    ``weight_decay``); ``bias_weight_decay`` to other biases; parameters whose name contains one of
    ``no_decay_names`` (e.g. ``relative_position_bias_table``) get no decay.
    """
    norm_ids = {
        id(p) for m in model.modules() if isinstance(m, _NORMS) for p in m.parameters(False)
    }
    skip = tuple(no_decay_names)
    groups: dict[tuple[float, float], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay, lr_factor = weight_decay, 1.0
        if id(p) in norm_ids:
            decay = weight_decay if norm_weight_decay is None else norm_weight_decay
        elif name.endswith(".bias") or p.ndim <= 1:
            if bias_weight_decay is not None:
                decay = bias_weight_decay
            lr_factor = bias_lr_factor
        if skip and any(s in name for s in skip):
            decay = 0.0
        groups.setdefault((decay, lr_factor), []).append(p)
    return [
        {"params": ps, "weight_decay": d, "lr_factor": f} for (d, f), ps in sorted(groups.items())
    ]


def build_optimizer(model: nn.Module, cfg: dict[str, Any]) -> torch.optim.Optimizer:
    """``cfg``: the ``train`` section (``optimizer``, ``lr``, ``momentum``, ``weight_decay``, …)."""
    name = str(cfg.get("optimizer", "sgd")).lower()
    lr = float(cfg.get("lr", 0.01))
    groups = param_groups(
        model,
        float(cfg.get("weight_decay", 1e-4)),
        cfg.get("norm_weight_decay"),
        cfg.get("bias_weight_decay"),
        float(cfg.get("bias_lr_factor", 1.0)),
        cfg.get("no_decay_names", ()),
    )
    for g in groups:
        g["lr"] = lr * g["lr_factor"]
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=float(cfg.get("momentum", 0.9)))
    if name == "adamw":
        betas = tuple(cfg.get("betas", (0.9, 0.999)))
        return torch.optim.AdamW(groups, lr=lr, betas=betas)  # type: ignore[arg-type]
    raise ValueError(f"train.optimizer must be 'sgd' or 'adamw', got {name!r}")


def lr_factor(
    iteration: int,
    max_iters: int,
    schedule: str = "multistep",
    steps: Sequence[int] = (),
    gamma: float = 0.1,
    warmup_iters: int = 0,
    warmup_factor: float = 0.001,
    warmup_method: str = "linear",
    min_factor: float = 0.0,
) -> float:
    """Multiplier of the base LR at ``iteration`` (0-based), warm-up included."""
    if schedule == "multistep":
        factor = gamma ** sum(iteration >= s for s in steps)
    elif schedule == "cosine":
        progress = min(iteration / max(1, max_iters), 1.0)
        factor = min_factor + (1 - min_factor) * 0.5 * (1 + math.cos(math.pi * progress))
    elif schedule == "constant":
        factor = 1.0
    else:
        raise ValueError(f"train.schedule must be multistep, cosine or constant: {schedule!r}")
    if iteration < warmup_iters:
        if warmup_method == "linear":
            alpha = iteration / warmup_iters
            factor *= warmup_factor * (1 - alpha) + alpha
        elif warmup_method == "constant":
            factor *= warmup_factor
        else:
            raise ValueError(f"train.warmup_method must be linear or constant: {warmup_method!r}")
    return factor


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: dict[str, Any], max_iters: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-iteration :class:`LambdaLR` from the ``train`` section."""
    kwargs = {
        "max_iters": max_iters,
        "schedule": str(cfg.get("schedule", "multistep")),
        "steps": [int(s) for s in cfg.get("steps", ())],
        "gamma": float(cfg.get("gamma", 0.1)),
        "warmup_iters": int(cfg.get("warmup_iters", 0)),
        "warmup_factor": float(cfg.get("warmup_factor", 0.001)),
        "warmup_method": str(cfg.get("warmup_method", "linear")),
        "min_factor": float(cfg.get("min_lr_factor", 0.0)),
    }
    lr_factor(0, **kwargs)  # validate names early
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: lr_factor(it, **kwargs))


class ModelEMA:
    """Exponential moving average of a model's floating-point state (weights and buffers).

    ``decay`` ramps up as ``decay · (1 − exp(−updates / 2000))`` so early averages are not stuck
    at the random initialisation.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9998, ramp: float = 2000.0) -> None:
        self.decay = decay
        self.ramp = ramp
        self.updates = 0
        self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = self.decay * (1 - math.exp(-self.updates / self.ramp))
        for k, v in model.state_dict().items():
            if v.dtype.is_floating_point:
                self.state[k].mul_(d).add_(v.detach(), alpha=1 - d)
            else:
                self.state[k].copy_(v)

    def state_dict(self) -> dict[str, Any]:
        return {"updates": self.updates, "state": self.state}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.updates = int(sd["updates"])
        self.state = {k: v.clone() for k, v in sd["state"].items()}
