"""ResNet backbones (18/34/50/101/152) with torchvision-compatible module names.

Module names follow torchvision's ``resnet*`` (``conv1, bn1, layer1..layer4``; blocks
``conv1..3, bn1..3, downsample.{0,1}``) and mmdet's ``ResNet`` (same names), so an ImageNet
state dict loads with only ``fc.*`` unexpected.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from dynadet.models.norm import FrozenBatchNorm2d, build_norm

_STAGE_BLOCKS: dict[int, tuple[int, int, int, int]] = {
    18: (2, 2, 2, 2),
    34: (3, 4, 6, 3),
    50: (3, 4, 6, 3),
    101: (3, 4, 23, 3),
    152: (3, 8, 36, 3),
}


def _conv3x3(
    in_ch: int, out_ch: int, stride: int, dcn: bool, deform_groups: int
) -> nn.Module:
    if dcn:
        # Imported here so this module loads even where the DCN op is unavailable.
        from dynadet.ops.deform_conv import ModulatedDeformConv2dPack

        return ModulatedDeformConv2dPack(
            in_ch, out_ch, 3, stride=stride, padding=1, deform_groups=deform_groups, bias=False
        )
    return nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)


def _downsample(in_ch: int, out_ch: int, stride: int, norm: str, eps: float) -> nn.Sequential:
    # The projection shortcut keeps its stride on the 1x1 conv in both styles.
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False), build_norm(norm, out_ch, eps)
    )


class BasicBlock(nn.Module):
    """Two 3×3 convs with identity/projection shortcut: ``[N, in, H, W] -> [N, planes, H/s, W/s]``.

    The stride sits on ``conv1`` (a 3×3 conv), so ``style`` makes no difference here; with
    ``dcn=True`` the stride-1 ``conv2`` becomes a modulated deformable conv.
    """

    expansion = 1

    def __init__(
        self,
        in_channels: int,
        planes: int,
        stride: int = 1,
        style: str = "pytorch",
        norm: str = "frozen_bn",
        norm_eps: float = 1e-5,
        dcn: bool = False,
        deform_groups: int = 1,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = build_norm(norm, planes, norm_eps)
        self.conv2 = _conv3x3(planes, planes, 1, dcn, deform_groups)
        self.bn2 = build_norm(norm, planes, norm_eps)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_channels != planes:
            self.downsample = _downsample(in_channels, planes, stride, norm, norm_eps)

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1×1 → 3×3 → 1×1 bottleneck: ``[N, in, H, W] -> [N, 4·planes, H/s, W/s]``.

    ``style="pytorch"`` (torchvision, mmdet default): stride on the 3×3 ``conv2``.
    ``style="caffe"`` (MSRA / Detectron ``STRIDE_IN_1X1``): stride on the 1×1 ``conv1``.
    """

    expansion = 4

    def __init__(
        self,
        in_channels: int,
        planes: int,
        stride: int = 1,
        style: str = "pytorch",
        norm: str = "frozen_bn",
        norm_eps: float = 1e-5,
        dcn: bool = False,
        deform_groups: int = 1,
    ) -> None:
        super().__init__()
        out_channels = planes * self.expansion
        stride_1x1, stride_3x3 = (stride, 1) if style == "caffe" else (1, stride)
        self.conv1 = nn.Conv2d(in_channels, planes, 1, stride=stride_1x1, bias=False)
        self.bn1 = build_norm(norm, planes, norm_eps)
        self.conv2 = _conv3x3(planes, planes, stride_3x3, dcn, deform_groups)
        self.bn2 = build_norm(norm, planes, norm_eps)
        self.conv3 = nn.Conv2d(planes, out_channels, 1, bias=False)
        self.bn3 = build_norm(norm, out_channels, norm_eps)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = _downsample(in_channels, out_channels, stride, norm, norm_eps)

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """ResNet backbone returning a pyramid of stage outputs.

    ``forward(x[N, 3, H, W]) -> list[Tensor]``: the outputs of the stages in ``out_indices``
    (0 → ``layer1`` = C2, stride 4; 1 → C3, 8; 2 → C4, 16; 3 → ``layer4`` = C5, 32), in
    increasing stride order. A stage of size ``h`` halves to ``ceil(h / 2)`` at every
    stride-2 step (stem conv, max-pool, first block of layer2..4), for odd sizes too.
    ``out_channels`` / ``out_strides`` describe the returned stages. Input normalisation
    (RGB/BGR, mean, std) is the detector's job.

    Args:
        depth: 18, 34 (BasicBlock) or 50, 101, 152 (Bottleneck).
        style: ``"pytorch"`` — stride on the 3×3 conv (torchvision ImageNet weights, mmdet
            ``torchvision://resnet50``); ``"caffe"`` — stride on the first 1×1 conv (MSRA /
            Detectron weights, Detectron2 ``STRIDE_IN_1X1=True``).
        frozen_stages: -1 nothing frozen; 0 the stem (``conv1`` + ``bn1``); k ≥ 1 the stem and
            ``layer1..layerk``. Frozen parts get ``requires_grad=False`` and stay in eval mode.
            mmdet ``frozen_stages=1`` ≡ torchvision ``trainable_backbone_layers=3`` ≡
            Detectron2 ``FREEZE_AT=2``.
        norm: ``"frozen_bn"`` (torchvision/Detectron2 detection backbones), ``"bn"`` (mmdet:
            statistics frozen through ``norm_eval``, affine trainable), ``"gn"`` or ``"none"``.
        norm_eps: eps of every norm layer (torchvision COCO RetinaNet/Faster R-CNN v1: 0.0).
        norm_eval: keep every BatchNorm in eval mode (running statistics frozen) in ``train()``.
        dcn_stages: per stage, replace the 3×3 ``conv2`` of every block by a modulated
            deformable conv (DCNv2, ``dynadet.ops.deform_conv.ModulatedDeformConv2dPack``,
            no bias; its ``conv_offset`` predicts 3·9·deform_groups channels, zero-initialised).
            mmdet: ``dcn=dict(type='DCNv2', deform_groups=1),
            stage_with_dcn=(False, True, True, True)`` (FCOS/ATSS "DCN" configs);
            Dynamic R-CNN R101-DCN uses DCNv2 in c3–c5, i.e. the same ``(False, True, True,
            True)``.
        dcn_deform_groups: offset groups of the DCN convs.
        zero_init_residual: zero the last norm weight of each block (torchvision option).
        base_width: channels of the stem and of the first stage's blocks (64 in every released
            ResNet; smaller values make narrow backbones for training from scratch on a CPU).
    """

    def __init__(
        self,
        depth: int = 50,
        style: str = "pytorch",
        out_indices: Sequence[int] = (1, 2, 3),
        frozen_stages: int = 1,
        norm: str = "frozen_bn",
        norm_eps: float = 1e-5,
        norm_eval: bool = True,
        dcn_stages: Sequence[bool] = (False, False, False, False),
        dcn_deform_groups: int = 1,
        zero_init_residual: bool = False,
        base_width: int = 64,
    ) -> None:
        super().__init__()
        if depth not in _STAGE_BLOCKS:
            raise ValueError(f"ResNet depth must be one of {sorted(_STAGE_BLOCKS)}, got {depth}")
        if style not in ("pytorch", "caffe"):
            raise ValueError(f"ResNet style must be 'pytorch' or 'caffe', got {style!r}")
        out_indices = tuple(out_indices)
        if not out_indices or any(i not in (0, 1, 2, 3) for i in out_indices):
            raise ValueError(f"out_indices must be a non-empty subset of 0..3, got {out_indices}")
        if list(out_indices) != sorted(set(out_indices)):
            raise ValueError(f"out_indices must be strictly increasing, got {out_indices}")
        if not -1 <= frozen_stages <= 4:
            raise ValueError(f"frozen_stages must be in -1..4, got {frozen_stages}")
        if len(dcn_stages) != 4:
            raise ValueError(f"dcn_stages needs 4 entries, got {len(dcn_stages)}")

        self.depth = depth
        self.style = style
        self.out_indices = out_indices
        self.frozen_stages = frozen_stages
        self.norm_eval = norm_eval
        block = BasicBlock if depth < 50 else Bottleneck

        self.conv1 = nn.Conv2d(3, base_width, 7, stride=2, padding=3, bias=False)
        self.bn1 = build_norm(norm, base_width, norm_eps)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)

        in_ch = base_width
        stage_channels = []
        for i, num_blocks in enumerate(_STAGE_BLOCKS[depth]):
            planes = base_width * 2**i
            blocks = []
            for j in range(num_blocks):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(
                    block(
                        in_ch,
                        planes,
                        stride=stride,
                        style=style,
                        norm=norm,
                        norm_eps=norm_eps,
                        dcn=bool(dcn_stages[i]),
                        deform_groups=dcn_deform_groups,
                    )
                )
                in_ch = planes * block.expansion
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
            stage_channels.append(in_ch)

        self.out_channels: list[int] = [stage_channels[i] for i in out_indices]
        self.out_strides: list[int] = [4 * 2**i for i in out_indices]

        self._init_weights(zero_init_residual)
        self._freeze_stages()
        self.train()

    def _init_weights(self, zero_init_residual: bool) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (_BatchNorm, nn.GroupNorm, FrozenBatchNorm2d)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for m in self.modules():
            conv_offset = getattr(m, "conv_offset", None)
            if conv_offset is not None:
                # DCN main weight as a conv; the offset/mask branch starts at zero so that the
                # deformable conv initially samples the regular grid (mmdet does the same).
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(conv_offset.weight)
                if conv_offset.bias is not None:
                    nn.init.zeros_(conv_offset.bias)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    nn.init.zeros_(m.bn3.weight)
                elif isinstance(m, BasicBlock):
                    nn.init.zeros_(m.bn2.weight)

    def _frozen_modules(self) -> list[nn.Module]:
        if self.frozen_stages < 0:
            return []
        mods: list[nn.Module] = [self.conv1, self.bn1]
        mods += [getattr(self, f"layer{k}") for k in range(1, self.frozen_stages + 1)]
        return mods

    def _freeze_stages(self) -> None:
        for m in self._frozen_modules():
            m.eval()
            for p in m.parameters():
                p.requires_grad_(False)

    def train(self, mode: bool = True) -> ResNet:
        """Set train/eval mode, keeping frozen stages (and BatchNorm if ``norm_eval``) in eval."""
        super().train(mode)
        for m in self._frozen_modules():
            m.eval()
        if mode and self.norm_eval:
            for m in self.modules():
                if isinstance(m, _BatchNorm):
                    m.eval()
        return self

    def forward(self, x: Tensor) -> list[Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        outs = []
        # Stages past the last requested one are kept (so ImageNet weights load) but not run.
        for i in range(self.out_indices[-1] + 1):
            x = getattr(self, f"layer{i + 1}")(x)
            if i in self.out_indices:
                outs.append(x)
        return outs


def resnet18(**kwargs: Any) -> ResNet:
    """ResNet-18 (BasicBlock, 2-2-2-2); keyword arguments as :class:`ResNet`."""
    return ResNet(depth=18, **kwargs)


def resnet34(**kwargs: Any) -> ResNet:
    """ResNet-34 (BasicBlock, 3-4-6-3); keyword arguments as :class:`ResNet`."""
    return ResNet(depth=34, **kwargs)


def resnet50(**kwargs: Any) -> ResNet:
    """ResNet-50 (Bottleneck, 3-4-6-3); keyword arguments as :class:`ResNet`."""
    return ResNet(depth=50, **kwargs)


def resnet101(**kwargs: Any) -> ResNet:
    """ResNet-101 (Bottleneck, 3-4-23-3); keyword arguments as :class:`ResNet`."""
    return ResNet(depth=101, **kwargs)


def resnet152(**kwargs: Any) -> ResNet:
    """ResNet-152 (Bottleneck, 3-8-36-3); keyword arguments as :class:`ResNet`."""
    return ResNet(depth=152, **kwargs)
