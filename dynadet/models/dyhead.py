"""DyHead (Dai et al., "Dynamic Head", CVPR 2021): attention blocks applied to a feature pyramid.

The blocks compute what the official code (``microsoft/DynamicHead``, ``dyhead/dyhead.py`` class
``DyConv`` and ``dyhead/dyrelu.py``) computes, which is not literally the paper's formula:

* The paper writes scale → spatial → task attention; the code runs spatial (DCNv2) first, then
  the scale attention on each DCN output, then the level mean and the task attention (DyReLU).
  We follow the code, since the released weights were trained that way.
* The paper resizes every level to the median level; the code keeps every level at its own size
  and fuses only the two neighbouring levels (stride-2 DCN on the finer one, DCN + bilinear
  upsampling on the coarser one).
* The hard sigmoid is ``ReLU6(x + 3) / 6`` (the paper writes ``max(0, min(1, (x + 1) / 2))``),
  and the scale attention has a ReLU before it, so its weights lie in [0.5, 1].

Reference: ``/work/shared/reference/dyhead.md`` §1 (block), §4 (keys).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dynadet.ops.deform_conv import ModulatedDeformConv2d

__all__ = ["DyHead", "DyHeadBlock", "DyReLU", "HardSigmoid", "SpatialConv", "hard_sigmoid"]

OFFSET_MODES = ("official", "resized")
OFFSET_INITS = ("default", "zero", "normal")
DYRELU_INITS = ("default", "normal")

_TAPS = 9  # 3x3 deformable kernels: 9 (dy, dx) offset pairs and 9 mask scalars


def hard_sigmoid(x: Tensor) -> Tensor:
    """``ReLU6(x + 3) / 6`` elementwise (the official ``h_sigmoid`` with ``h_max=1``)."""
    return F.relu6(x + 3.0) / 6.0


class HardSigmoid(nn.Module):
    """Module form of :func:`hard_sigmoid` (no parameters): ``[*] -> [*]``."""

    def forward(self, x: Tensor) -> Tensor:
        return hard_sigmoid(x)


class DyReLU(nn.Module):
    """Task-aware attention: dynamic ReLU with per-channel coefficients (official ``DYReLU``).

    From the global average of each map, ``fc`` = ``Linear(C, C // reduction)`` → ReLU →
    ``Linear(C // reduction, 4C)`` → hard sigmoid gives ``y ∈ [0, 1]^{4C}``, split in the order
    ``a1 | b1 | a2 | b2`` and shifted::

        a1 = (y_a1 - 0.5) * 2·lambda_a + init_a[0]    # ∈ [0, 2] with the defaults
        a2 = (y_a2 - 0.5) * 2·lambda_a + init_a[1]    # ∈ [-1, 1]
        b1 = y_b1 - 0.5 + init_b[0]                    # ∈ [-0.5, 0.5]
        b2 = y_b2 - 0.5 + init_b[1]
        out = max(x·a1 + b1, x·a2 + b2)

    The defaults are the ones DyHead uses (reduction 4: 256 → 64 → 1024). Keys ``fc.0.*`` and
    ``fc.2.*`` are the two Linear layers, as in the official checkpoints.

    Shapes: ``forward(x: Tensor[N, C, H, W]) -> Tensor[N, C, H, W]``;
    ``coefficients(x) -> (a1, b1, a2, b2)``, each ``Tensor[N, C, 1, 1]``.
    """

    def __init__(
        self,
        channels: int,
        reduction: int = 4,
        lambda_a: float = 1.0,
        init_a: Sequence[float] = (1.0, 0.0),
        init_b: Sequence[float] = (0.0, 0.0),
    ) -> None:
        super().__init__()
        squeeze = channels // reduction
        if squeeze < 1:
            raise ValueError(f"DyReLU: {channels} channels with reduction {reduction} is empty")
        self.channels = channels
        # the official class doubles the given lambda_a
        self.lambda_a = 2.0 * lambda_a
        self.init_a = (float(init_a[0]), float(init_a[1]))
        self.init_b = (float(init_b[0]), float(init_b[1]))
        self.fc = nn.Sequential(
            nn.Linear(channels, squeeze),
            nn.ReLU(inplace=True),
            nn.Linear(squeeze, 4 * channels),
            HardSigmoid(),
        )

    def coefficients(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        n, c = x.shape[:2]
        y = self.fc(x.mean(dim=(2, 3))).view(n, 4 * c, 1, 1)
        a1, b1, a2, b2 = torch.split(y, c, dim=1)
        a1 = (a1 - 0.5) * self.lambda_a + self.init_a[0]
        a2 = (a2 - 0.5) * self.lambda_a + self.init_a[1]
        b1 = b1 - 0.5 + self.init_b[0]
        b2 = b2 - 0.5 + self.init_b[1]
        return a1, b1, a2, b2

    def forward(self, x: Tensor) -> Tensor:
        a1, b1, a2, b2 = self.coefficients(x)
        return torch.maximum(x * a1 + b1, x * a2 + b2)


class SpatialConv(nn.Module):
    """3×3 modulated deformable conv followed by GroupNorm (official ``Conv3x3Norm``).

    Keys ``conv.weight``, ``conv.bias`` (if ``bias``) and ``bn.weight``, ``bn.bias`` — the norm
    is a GroupNorm despite the official name ``bn``.

    Shapes: ``forward(x[N, Cin, H, W], offset[N, 18, Ho, Wo], mask[N, 9, Ho, Wo])``
    ``-> [N, Cout, Ho, Wo]`` with ``Ho = ceil(H / stride)``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int = 1,
        bias: bool = True,
        norm_groups: int = 16,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self.conv = ModulatedDeformConv2d(
            in_channels, out_channels, 3, stride=stride, padding=1, bias=bias, backend=backend
        )
        self.bn = nn.GroupNorm(norm_groups, out_channels)

    def forward(self, x: Tensor, offset: Tensor, mask: Tensor) -> Tensor:
        return self.bn(self.conv(x, offset, mask))


class DyHeadBlock(nn.Module):
    """One DyHead block (official ``DyConv``): ``list[Tensor] -> list[Tensor]``, same shapes.

    For each level ``l`` (finest first), with ``om = offset(x[l])``, ``offset = om[:, :18]``
    (9 interleaved (dy, dx) pairs) and ``mask = sigmoid(om[:, 18:])``, the sources are

    * ``DyConv[1](x[l])`` — stride-1 DCN + GN on the level itself ("mid");
    * ``DyConv[2](x[l-1])`` — stride-2 DCN + GN on the finer level ("low"), if ``l > 0``;
    * ``upsample(DyConv[0](x[l+1]))`` — DCN + GN on the coarser level ("high"), bilinearly
      upsampled (``align_corners=True``) to ``H_l × W_l``, if ``l < L - 1``;

    all three DCNs using the offsets and mask computed from ``x[l]``. Each source ``f`` is
    weighted by its scale attention ``hard_sigmoid(AttnConv(f))`` (global average pool, 1×1
    conv to one channel, ReLU: one weight per image and source, in [0.5, 1]); the weighted
    sources are averaged and passed through the task attention :class:`DyReLU` (``relu``,
    shared across levels, coefficients from each level's own average).

    Args:
        in_channels: channels of the input levels.
        channels: output channels.
        offset_mode: how the coarser-level DCN gets an ``h' × w'`` offset field from the
            ``H_l × W_l`` one computed on ``x[l]``:

            * ``"official"`` — what the released weights were trained with. The official CUDA
              kernel does not check shapes and reads the per-image offset/mask buffers flat,
              so the coarse DCN uses the first ``18·h'·w'`` values of the image's
              ``(18, H_l, W_l)`` offset (and the first ``9·h'·w'`` of its ``(9, H_l, W_l)``
              mask) re-read as ``(18, h', w')``: mostly offsets of the top rows of level l,
              scrambled (microsoft/DynamicHead#25). Reproduced exactly for any sizes with
              ``h'·w' <= H_l·W_l``.
            * ``"resized"`` — corrected: the offsets and mask are resized to ``h' × w'`` by
              bilinear interpolation with ``align_corners=True``, the inverse of the position
              map of the upsampling that brings this branch back to level l, so each coarse
              output uses the offsets predicted at the level-l location it lands on. Values
              are not rescaled (the official code also reuses them unscaled on the finer level).

            With zero offset-conv weights (``offset_init="zero"``) both modes coincide.
        dcn_bias: bias in the three DCNs: True in the official code, False in MMDetection
            (``bias = not with_norm``). Keep True to load official weights losslessly.
        offset_init: init of the offset conv: ``"default"`` — PyTorch's Conv2d init
            (kaiming-uniform, a=√5), as the official code leaves it; ``"zero"`` — weight and
            bias 0 (MMDetection ``zero_init_offset=True``, its default); ``"normal"`` —
            N(0, 0.01), bias 0 (MMDetection ``zero_init_offset=False``).
        dyrelu_init: init of DyReLU's Linear layers: ``"default"`` — PyTorch's (official);
            ``"normal"`` — N(0, 0.01), bias 0 (MMDetection, whose DyReLU uses 1×1 convs).
        norm_groups: GroupNorm groups (16).
        backend: DCN backend, see :func:`dynadet.ops.deform_conv.deform_conv2d`.

    Other inits (both references): DCN weight U(±1/√(9·in_channels)), bias 0; GN weight 1,
    bias 0; ``AttnConv`` conv N(0, 0.01), bias 0.

    Keys (identical to an official ``dyhead_tower.{i}``): ``DyConv.{0,1,2}.conv.{weight,bias}``,
    ``DyConv.{0,1,2}.bn.{weight,bias}`` (0 = high/coarser, 1 = mid, 2 = low/finer stride 2),
    ``offset.{weight,bias}`` ``[27, Cin, 3, 3]``, ``AttnConv.1.{weight,bias}`` ``[1, C, 1, 1]``,
    ``relu.fc.0.*`` ``[C/4, C]``, ``relu.fc.2.*`` ``[4C, C/4]``.

    Shapes: ``forward(features: list[Tensor[N, in_channels, H_l, W_l]])`` →
    ``list[Tensor[N, channels, H_l, W_l]]``; every level must be the stride-2 (pad 1)
    reduction of the previous one, ``H_l = ceil(H_{l-1} / 2)``, as from a ResNet + FPN.
    """

    def __init__(
        self,
        in_channels: int = 256,
        channels: int = 256,
        *,
        offset_mode: str = "official",
        dcn_bias: bool = True,
        offset_init: str = "default",
        dyrelu_init: str = "default",
        norm_groups: int = 16,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        _check_choice("offset_mode", offset_mode, OFFSET_MODES)
        _check_choice("offset_init", offset_init, OFFSET_INITS)
        _check_choice("dyrelu_init", dyrelu_init, DYRELU_INITS)
        if channels % norm_groups:
            raise ValueError(f"{channels} channels not divisible by {norm_groups} GN groups")
        self.offset_mode = offset_mode

        def spatial(stride: int) -> SpatialConv:
            return SpatialConv(in_channels, channels, stride, dcn_bias, norm_groups, backend)

        # Official attribute names, so official keys load with a prefix rename only.
        self.DyConv = nn.ModuleList([spatial(1), spatial(1), spatial(2)])  # high, mid, low
        self.AttnConv = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Conv2d(channels, 1, 1), nn.ReLU(inplace=True)
        )
        self.relu = DyReLU(channels)
        self.offset = nn.Conv2d(in_channels, 3 * _TAPS, 3, padding=1)
        self._init_weights(offset_init, dyrelu_init)

    def _init_weights(self, offset_init: str, dyrelu_init: str) -> None:
        nn.init.normal_(self.AttnConv[1].weight, std=0.01)
        nn.init.zeros_(self.AttnConv[1].bias)
        if offset_init == "zero":
            nn.init.zeros_(self.offset.weight)
            nn.init.zeros_(self.offset.bias)
        elif offset_init == "normal":
            nn.init.normal_(self.offset.weight, std=0.01)
            nn.init.zeros_(self.offset.bias)
        if dyrelu_init == "normal":
            for m in self.relu.fc:
                if isinstance(m, nn.Linear):
                    nn.init.normal_(m.weight, std=0.01)
                    nn.init.zeros_(m.bias)

    def coarse_offset(
        self, offset: Tensor, mask: Tensor, size: tuple[int, int]
    ) -> tuple[Tensor, Tensor]:
        """Offsets ``[N, 18, h, w]`` and mask ``[N, 9, h, w]`` for the coarser-level DCN.

        ``offset [N, 18, H, W]`` and ``mask [N, 9, H, W]`` come from the current level;
        ``size = (h, w)`` is the coarser level's size. See ``offset_mode``.
        """
        n, _, height, width = offset.shape
        h, w = size
        if self.offset_mode == "resized":
            both = F.interpolate(
                torch.cat((offset, mask), dim=1), size=(h, w), mode="bilinear",
                align_corners=True,
            )
            return both[:, : 2 * _TAPS], both[:, 2 * _TAPS :]
        if h * w > height * width:
            raise ValueError(
                f"offset_mode='official' reads the {height}x{width} offset buffer flat, which "
                f"is too small for a {h}x{w} coarser level"
            )
        # The official kernel indexes offset[(2k·h + y)·w + x] from each image's base pointer.
        flat_offset = offset.flatten(1)[:, : 2 * _TAPS * h * w]
        flat_mask = mask.flatten(1)[:, : _TAPS * h * w]
        return flat_offset.reshape(n, 2 * _TAPS, h, w), flat_mask.reshape(n, _TAPS, h, w)

    def forward(self, features: Sequence[Tensor]) -> list[Tensor]:
        _check_pyramid(features)
        high, mid, low = self.DyConv
        outs = []
        for level, x in enumerate(features):
            om = self.offset(x)
            offset = om[:, : 2 * _TAPS]
            mask = om[:, 2 * _TAPS :].sigmoid()
            # Source order mid, low, high as in the official stack (same rounding of the mean).
            sources = [mid(x, offset, mask)]
            if level > 0:
                sources.append(low(features[level - 1], offset, mask))
            if level < len(features) - 1:
                coarse = features[level + 1]
                coarse_offset, coarse_mask = self.coarse_offset(
                    offset, mask, (coarse.shape[-2], coarse.shape[-1])
                )
                y = high(coarse, coarse_offset, coarse_mask)
                sources.append(
                    F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=True)
                )
            fused = sources[0] * hard_sigmoid(self.AttnConv(sources[0]))
            for f in sources[1:]:
                fused = fused + f * hard_sigmoid(self.AttnConv(f))
            outs.append(self.relu(fused / len(sources)))
        return outs


class DyHead(nn.Module):
    """A stack of :class:`DyHeadBlock` used as a neck after the FPN (DyHead's "head").

    ``DyHead(in_channels=256, channels=256, num_blocks=6)`` is the official configuration
    (11.50 M parameters). Block 0 maps ``in_channels`` → ``channels``, the others keep
    ``channels``. The keyword options are passed to every block; see :class:`DyHeadBlock`:

    ======================  ==================  ===============  ================  ===========
    setting                 ``offset_mode``     ``dcn_bias``     ``offset_init``   dyrelu_init
    ======================  ==================  ===============  ================  ===========
    official (Detectron2)   ``official``        True             ``default``       ``default``
    MMDetection "simple"    ``official`` (2.x)  False            ``zero``          ``normal``
    MMDetection "repro"     ``official`` (2.x)  False            ``normal``        ``normal``
    new training            ``resized``         any              any               any
    ======================  ==================  ===============  ================  ===========

    Checkpoint keys. In a detector whose neck is ``Chain([FPN, DyHead])`` this module's keys
    are ``neck.1.blocks.{i}.<rest>``, with ``<rest>`` exactly the official block keys, so an
    official Detectron2 checkpoint (``{"model": state_dict}``, strip any ``module.``) maps by
    one prefix rename, shapes unchanged::

        backbone.dyhead_tower.{i}.<rest>  ->  neck.1.blocks.{i}.<rest>

        <rest> in: DyConv.{0,1,2}.conv.weight [C, C, 3, 3]   DyConv.{0,1,2}.conv.bias [C]
                   DyConv.{0,1,2}.bn.weight [C]              DyConv.{0,1,2}.bn.bias [C]
                   offset.weight [27, C, 3, 3]               offset.bias [27]
                   AttnConv.1.weight [1, C, 1, 1]            AttnConv.1.bias [1]
                   relu.fc.0.weight [C/4, C]                 relu.fc.0.bias [C/4]
                   relu.fc.2.weight [4C, C/4]                relu.fc.2.bias [4C]

    MMDetection (``neck.1.dyhead_blocks.{i}.*``, build with ``dcn_bias=False``):
    ``spatial_conv_{high,mid,low}.conv.weight`` → ``DyConv.{0,1,2}.conv.weight``;
    ``spatial_conv_{high,mid,low}.norm.*`` → ``DyConv.{0,1,2}.bn.*``;
    ``spatial_conv_offset.*`` → ``offset.*``; ``scale_attn_module.1.*`` → ``AttnConv.1.*``;
    ``task_attn_module.conv{1,2}.conv.weight`` ``[out, in, 1, 1]`` → ``relu.fc.{0,2}.weight``
    ``[out, in]`` (drop the 1×1 dims); ``task_attn_module.conv{1,2}.conv.bias`` →
    ``relu.fc.{0,2}.bias``. The 4C order a1|b1|a2|b2 is the same in all three.

    Shapes: ``forward(features: list[Tensor[N, in_channels, H_l, W_l]])`` →
    ``list[Tensor[N, channels, H_l, W_l]]`` (finest level first, ``H_l = ceil(H_{l-1} / 2)``;
    pad the image to a multiple of the coarsest stride, 128 for P3–P7, as the official code).
    """

    def __init__(
        self,
        in_channels: int = 256,
        channels: int = 256,
        num_blocks: int = 6,
        *,
        offset_mode: str = "official",
        dcn_bias: bool = True,
        offset_init: str = "default",
        dyrelu_init: str = "default",
        norm_groups: int = 16,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if num_blocks < 1:
            raise ValueError(f"DyHead needs at least one block, got num_blocks={num_blocks}")
        self.in_channels = in_channels
        self.channels = channels
        self.blocks = nn.ModuleList(
            DyHeadBlock(
                in_channels if i == 0 else channels,
                channels,
                offset_mode=offset_mode,
                dcn_bias=dcn_bias,
                offset_init=offset_init,
                dyrelu_init=dyrelu_init,
                norm_groups=norm_groups,
                backend=backend,
            )
            for i in range(num_blocks)
        )

    def forward(self, features: Sequence[Tensor]) -> list[Tensor]:
        out = list(features)
        for block in self.blocks:
            out = block(out)
        return out


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def _check_pyramid(features: Sequence[Tensor]) -> None:
    """Each level must be what a stride-2, pad-1 3×3 conv makes of the previous one."""
    if len(features) == 0:
        raise ValueError("DyHead got no feature maps")
    for level in range(1, len(features)):
        fine, coarse = features[level - 1].shape[-2:], features[level].shape[-2:]
        expected = ((fine[0] + 1) // 2, (fine[1] + 1) // 2)
        if (coarse[0], coarse[1]) != expected:
            raise ValueError(
                f"DyHead level {level} is {coarse[0]}x{coarse[1]} but level {level - 1} is "
                f"{fine[0]}x{fine[1]}; each level must be the ceil-half of the previous one "
                f"({expected[0]}x{expected[1]}): pad the images to a multiple of the last stride"
            )
