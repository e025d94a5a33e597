"""Normalisation layers: frozen BatchNorm, a small factory, and BN → frozen-BN conversion."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

NORM_KINDS = ("bn", "frozen_bn", "gn", "none")


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm2d with fixed statistics and affine parameters (all stored as buffers).

    ``forward(x[N, C, H, W]) -> [N, C, H, W]``: ``x * scale + shift`` with
    ``scale = weight / sqrt(running_var + eps)`` and ``shift = bias - running_mean * scale``.

    The operation order is the one torchvision uses, so outputs match torchvision backbones
    bit for bit. ``eps`` is a plain attribute: torchvision's COCO weights for RetinaNet v1 and
    Faster R-CNN v1 were trained with ``eps = 0.0`` and need it set after construction.
    The state dict has ``weight, bias, running_mean, running_var`` (no ``num_batches_tracked``;
    such a key coming from an ordinary BatchNorm checkpoint is dropped on load).
    """

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        # BatchNorm2d checkpoints carry a step counter that has no meaning for frozen statistics.
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight.reshape(1, -1, 1, 1)
        b = self.bias.reshape(1, -1, 1, 1)
        rv = self.running_var.reshape(1, -1, 1, 1)
        rm = self.running_mean.reshape(1, -1, 1, 1)
        scale = w * (rv + self.eps).rsqrt()
        shift = b - rm * scale
        return x * scale + shift

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"


def build_norm(kind: str, num_channels: int, eps: float = 1e-5, num_groups: int = 32) -> nn.Module:
    """Build a 2-d normalisation layer acting on ``[N, num_channels, H, W]``.

    ``kind``: ``"bn"`` (BatchNorm2d), ``"frozen_bn"`` (FrozenBatchNorm2d), ``"gn"``
    (GroupNorm with ``num_groups`` groups) or ``"none"`` (Identity).
    """
    if kind == "bn":
        return nn.BatchNorm2d(num_channels, eps=eps)
    if kind == "frozen_bn":
        return FrozenBatchNorm2d(num_channels, eps=eps)
    if kind == "gn":
        if num_channels % num_groups != 0:
            raise ValueError(
                f"GroupNorm needs num_channels ({num_channels}) divisible by "
                f"num_groups ({num_groups})"
            )
        return nn.GroupNorm(num_groups, num_channels, eps=eps)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown norm kind {kind!r}; expected one of {NORM_KINDS}")


def convert_frozen_bn(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm2d / SyncBatchNorm inside ``module`` by FrozenBatchNorm2d.

    Statistics and affine parameters are copied, so eval-mode outputs are unchanged.
    Returns the converted module (a new object when ``module`` itself is a BatchNorm).
    """
    # BatchNorm1d/3d are left alone: FrozenBatchNorm2d broadcasts over [N, C, H, W] only.
    if isinstance(module, (nn.BatchNorm2d, nn.SyncBatchNorm)):
        frozen = FrozenBatchNorm2d(module.num_features, eps=module.eps)
        ref = _first_tensor(module)
        if ref is not None:
            frozen = frozen.to(device=ref.device, dtype=ref.dtype)
        with torch.no_grad():
            if module.affine:
                frozen.weight.copy_(module.weight)
                frozen.bias.copy_(module.bias)
            if module.track_running_stats:
                frozen.running_mean.copy_(module.running_mean)
                frozen.running_var.copy_(module.running_var)
        return frozen
    for name, child in module.named_children():
        new_child = convert_frozen_bn(child)
        if new_child is not child:
            setattr(module, name, new_child)
    return module


def _first_tensor(module: nn.Module) -> Tensor | None:
    for t in module.parameters():
        return t
    for t in module.buffers():
        if t.is_floating_point():
            return t
    return None
