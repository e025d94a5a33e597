"""Necks applied one after another (e.g. FPN then DyHead)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn


class Chain(nn.Sequential):
    """Applies feature-list modules in order: ``list[Tensor]`` → ``list[Tensor]``.

    Parameters are keyed by position (``neck.0.*`` is the first module, ``neck.1.*`` the second),
    as in ``nn.Sequential``.
    """

    def __init__(self, modules: Sequence[nn.Module]) -> None:
        super().__init__(*modules)

    def forward(self, features: Sequence[Tensor]) -> list[Tensor]:  # type: ignore[override]
        out = list(features)
        for module in self:
            out = list(module(out))
        return out
