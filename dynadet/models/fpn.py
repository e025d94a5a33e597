"""Feature Pyramid Network with the extra-level variants used by the reference detectors."""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from dynadet.models.norm import build_norm

EXTRA_BLOCKS = ("none", "maxpool", "p6p7")


class ConvNorm(nn.Module):
    """Conv followed by a norm layer (no activation): ``[N, in, H, W] -> [N, out, H', W']``.

    Submodules ``conv`` and ``norm`` give the state-dict keys ``{conv,norm}.*``.
    """

    def __init__(self, conv: nn.Conv2d, norm: nn.Module) -> None:
        super().__init__()
        self.conv = conv
        self.norm = norm

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.conv(x))


class FPN(nn.Module):
    """Feature Pyramid Network (top-down pathway with lateral connections).

    ``forward(features: list[Tensor[N, in_channels[i], H_i, W_i]]) -> list[Tensor[N, C, ., .]]``
    with ``C = out_channels``, finest level first (e.g. C3–C5 in → P3–P7 out). Each input gets
    a 1×1 lateral conv (``lateral_convs.{i}``) and a 3×3 output conv (``output_convs.{i}``);
    the merged coarser map is upsampled with nearest interpolation to the lateral's exact size
    (so odd sizes work) and added to it. With ``norm="none"`` each conv is an ``nn.Conv2d``
    (keys ``lateral_convs.0.weight``); with ``"gn"`` (32 groups) / ``"bn"`` it is a
    :class:`ConvNorm` (keys ``lateral_convs.0.conv.weight``, ``lateral_convs.0.norm.*``); the
    P6/P7 convs get the same treatment.

    Extra levels (``extra_blocks``):

    * ``"none"`` — only the levels of the inputs.
    * ``"maxpool"`` — P6 = ``max_pool2d(last output, kernel 1, stride 2)`` (Faster R-CNN P2–P6,
      torchvision ``LastLevelMaxPool``, Detectron2, Dynamic R-CNN, DyHead R-CNN).
    * ``"p6p7"`` — P6 = 3×3 s2 conv ``p6`` on P5 (``extra_input="output"``) or C5
      (``"input"``; ``p6`` then takes ``in_channels[-1]`` channels); P7 = 3×3 s2 conv ``p7`` on
      ``relu(P6)`` if ``relu_before_extra`` else on P6.

    ========================================  ===============  ====================
    reference                                 ``extra_input``  ``relu_before_extra``
    ========================================  ===============  ====================
    torchvision RetinaNet v1 / FCOS           ``"output"``     True
    torchvision RetinaNet v2                  ``"input"``      True
    mmdet RetinaNet (``on_input``)            ``"input"``      False
    mmdet FCOS (``on_output``)                ``"output"``     True
    mmdet ATSS (``on_output``)                ``"output"``     False
    Detectron2 RetinaNet / FCOS               input / output   True
    Faster R-CNN (P2–P6)                      ``extra_blocks="maxpool"``
    ========================================  ===============  ====================

    torchvision's ``LastLevelP6P7`` always applies the ReLU before ``p7`` and chooses P5 vs C5
    by ``use_P5 = in_channels == out_channels``.

    Init: ``"kaiming_uniform"`` → ``kaiming_uniform_(a=1)`` weights, zero bias (torchvision,
    Detectron2); ``"xavier"`` → ``xavier_uniform_`` weights, zero bias (mmdet). Norm layers start
    at weight 1, bias 0. ``conv_bias=None`` → convs have a bias iff ``norm == "none"``.
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        out_channels: int = 256,
        extra_blocks: str = "p6p7",
        extra_input: str = "output",
        relu_before_extra: bool = False,
        norm: str = "none",
        init: str = "kaiming_uniform",
        conv_bias: bool | None = None,
    ) -> None:
        super().__init__()
        if len(in_channels) == 0:
            raise ValueError("FPN needs at least one input level")
        if extra_blocks not in EXTRA_BLOCKS:
            raise ValueError(f"extra_blocks must be one of {EXTRA_BLOCKS}, got {extra_blocks!r}")
        if extra_input not in ("output", "input"):
            raise ValueError(f"extra_input must be 'output' or 'input', got {extra_input!r}")
        if init not in ("kaiming_uniform", "xavier"):
            raise ValueError(f"init must be 'kaiming_uniform' or 'xavier', got {init!r}")
        self.in_channels = list(in_channels)
        self.out_channels = out_channels
        self.extra_blocks = extra_blocks
        self.extra_input = extra_input
        self.relu_before_extra = relu_before_extra
        self.norm = norm
        bias = norm == "none" if conv_bias is None else conv_bias

        def conv(in_ch: int, k: int, stride: int = 1) -> nn.Module:
            c = nn.Conv2d(in_ch, out_channels, k, stride=stride, padding=k // 2, bias=bias)
            return c if norm == "none" else ConvNorm(c, build_norm(norm, out_channels))

        self.lateral_convs = nn.ModuleList(conv(c, 1) for c in self.in_channels)
        self.output_convs = nn.ModuleList(conv(out_channels, 3) for _ in self.in_channels)
        if extra_blocks == "p6p7":
            p6_in = self.in_channels[-1] if extra_input == "input" else out_channels
            self.p6 = conv(p6_in, 3, stride=2)
            self.p7 = conv(out_channels, 3, stride=2)
        self._init_weights(init)

    def _init_weights(self, init: str) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                if init == "xavier":
                    nn.init.xavier_uniform_(m.weight)
                else:
                    nn.init.kaiming_uniform_(m.weight, a=1)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def out_strides(self, in_strides: Sequence[int]) -> list[int]:
        """Strides of the outputs given the strides of the inputs (e.g. [8, 16, 32] → P3–P7)."""
        strides = list(in_strides)
        if len(strides) != len(self.in_channels):
            raise ValueError(f"expected {len(self.in_channels)} input strides, got {strides}")
        if self.extra_blocks == "maxpool":
            strides.append(2 * strides[-1])
        elif self.extra_blocks == "p6p7":
            strides += [2 * strides[-1], 4 * strides[-1]]
        return strides

    def forward(self, features: Sequence[Tensor]) -> list[Tensor]:
        if len(features) != len(self.in_channels):
            raise ValueError(
                f"FPN built for {len(self.in_channels)} levels got {len(features)} feature maps"
            )
        last = self.lateral_convs[-1](features[-1])
        outs = [self.output_convs[-1](last)]
        for i in range(len(features) - 2, -1, -1):
            lateral = self.lateral_convs[i](features[i])
            top_down = F.interpolate(last, size=lateral.shape[-2:], mode="nearest")
            last = lateral + top_down
            outs.insert(0, self.output_convs[i](last))

        if self.extra_blocks == "maxpool":
            outs.append(F.max_pool2d(outs[-1], kernel_size=1, stride=2))
        elif self.extra_blocks == "p6p7":
            src = features[-1] if self.extra_input == "input" else outs[-1]
            p6 = self.p6(src)
            p7 = self.p7(F.relu(p6) if self.relu_before_extra else p6)
            outs += [p6, p7]
        return outs
