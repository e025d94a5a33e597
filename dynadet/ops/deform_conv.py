"""Modulated deformable convolution (DCNv2) in pure PyTorch.

Semantics follow the compiled kernels of torchvision (``deform_conv2d``) and mmcv
(``ModulatedDeformConv2d``): for output pixel (oy, ox) and kernel tap k = i * kw + j of offset
group g, the input is sampled at

    y = oy * stride_h - pad_h + i * dil_h + offset[n, g * 2K + 2k]
    x = ox * stride_w - pad_w + j * dil_w + offset[n, g * 2K + 2k + 1]

with the kernels' bilinear rule (0 when y <= -1, y >= H, x <= -1 or x >= W; otherwise the four
neighbours are blended and neighbours outside the map count as 0), multiplied by
``mask[n, g * K + k]`` and contracted with the weight.

The sampling is ``F.grid_sample(mode="bilinear", padding_mode="zeros", align_corners=False)`` on the
normalised coordinate ``(2x + 1) / W - 1``, which reproduces that rule exactly.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["deform_conv2d", "ModulatedDeformConv2d", "ModulatedDeformConv2dPack"]

# Elements of the sampled (N, Cin*K, rows*Wo) tensor per chunk in the no-grad path. On CPU a band
# of ~16 MB stays in cache between grid_sample and the matmul and is recycled by malloc instead of
# being page-faulted in afresh (one pass over a 256x100x168 map: ~3x slower grid_sample); smaller
# bands mean more parallel regions, which costs on a busy machine. Elsewhere it bounds memory.
_CPU_CHUNK_ELEMS = 1 << 22
_OTHER_CHUNK_ELEMS = 1 << 28

_UNPROBED = object()
_torchvision_fn: object = _UNPROBED


def _pair(value: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    first, second = value
    return int(first), int(second)


def _torchvision_deform_conv2d() -> Callable[..., Tensor] | None:
    """torchvision.ops.deform_conv2d if it imports and runs (probed once), else None."""
    global _torchvision_fn
    if _torchvision_fn is _UNPROBED:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                from torchvision.ops import deform_conv2d as tv_deform_conv2d

                probe = torch.zeros(1, 1, 3, 3)
                tv_deform_conv2d(
                    probe, torch.zeros(1, 2, 3, 3), torch.zeros(1, 1, 1, 1), mask=probe
                )
            _torchvision_fn = tv_deform_conv2d
        except Exception:
            _torchvision_fn = None
    return _torchvision_fn  # type: ignore[return-value]


def _autocast_enabled(device_type: str) -> bool:
    try:
        return bool(torch.is_autocast_enabled(device_type))
    except RuntimeError:  # e.g. the meta device (FLOP counting without computing)
        return False
    except TypeError:  # torch < 2.4: no device argument
        if device_type == "cuda":
            return torch.is_autocast_enabled()
        if device_type == "cpu":
            return torch.is_autocast_cpu_enabled()
        return False


def deform_conv2d(
    input: Tensor,
    offset: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
    mask: Tensor | None = None,
    *,
    backend: str = "auto",
) -> Tensor:
    """Deformable convolution v1 (``mask=None``) / v2, same contract as torchvision's.

    Args:
        input: ``[N, Cin, H, W]``.
        offset: ``[N, 2*G*kh*kw, Ho, Wo]``; per offset group g and tap k = i*kw + j, channels
            ``g*2K + 2k`` (dy) and ``g*2K + 2k + 1`` (dx). G = ``offset.shape[1] // (2*kh*kw)``.
        weight: ``[Cout, Cin/groups, kh, kw]``; conv groups = ``Cin // weight.shape[1]``.
        bias: ``[Cout]`` or None.
        stride, padding, dilation: int or (h, w) pair.
        mask: ``[N, G*kh*kw, Ho, Wo]`` modulation, or None for all ones (DCNv1).
        backend: ``"torch"`` (this file), ``"torchvision"`` (compiled op, error if unavailable)
            or ``"auto"`` (torchvision for CUDA tensors when it works, else torch).

    Returns:
        ``[N, Cout, Ho, Wo]`` with ``Ho = (H + 2*pad_h - dil_h*(kh-1) - 1) // stride_h + 1``.

    The torch backend computes in ``input.dtype`` (autocast is switched off inside; weight, bias,
    offset and mask are cast). For float16/bfloat16 inputs the sampling itself runs in float32
    so that sample positions keep sub-pixel precision; the contraction runs in the input dtype.
    """
    if backend not in ("auto", "torch", "torchvision"):
        raise ValueError(f"backend must be 'auto', 'torch' or 'torchvision', got {backend!r}")
    stride, padding, dilation = _pair(stride), _pair(padding), _pair(dilation)
    if backend != "torch" and (backend == "torchvision" or input.is_cuda):
        tv_fn = _torchvision_deform_conv2d()
        if tv_fn is not None:
            return tv_fn(input, offset, weight, bias, stride, padding, dilation, mask)
        if backend == "torchvision":
            raise RuntimeError("backend='torchvision' requested but torchvision.ops is unusable")
    args = (input, offset, weight, bias, stride, padding, dilation, mask)
    if _autocast_enabled(input.device.type):
        with torch.autocast(device_type=input.device.type, enabled=False):
            return _deform_conv2d_torch(*args)
    return _deform_conv2d_torch(*args)


def _output_size(size: int, kernel: int, stride: int, pad: int, dil: int) -> int:
    return (size + 2 * pad - dil * (kernel - 1) - 1) // stride + 1


def _check_shapes(
    input: Tensor, offset: Tensor, weight: Tensor, bias: Tensor | None, mask: Tensor | None,
    out_hw: tuple[int, int],
) -> tuple[int, int]:
    """Validate shapes like torchvision does; return (conv groups, offset groups)."""
    if input.dim() != 4 or offset.dim() != 4 or weight.dim() != 4:
        raise ValueError("input, offset and weight must be 4-D")
    n, cin = input.shape[:2]
    cout, cin_per_group, kh, kw = weight.shape
    taps = kh * kw
    if out_hw[0] <= 0 or out_hw[1] <= 0:
        raise ValueError(f"computed output size {out_hw} is empty for input {tuple(input.shape)}")
    if cin_per_group == 0 or cin % cin_per_group or cout % (cin // cin_per_group):
        raise ValueError(f"weight {tuple(weight.shape)} does not fit {cin} input channels")
    groups = cin // cin_per_group
    if offset.shape[1] == 0 or offset.shape[1] % (2 * taps):
        raise ValueError(f"offset has {offset.shape[1]} channels, not a multiple of {2 * taps}")
    offset_groups = offset.shape[1] // (2 * taps)
    if cin % offset_groups:
        raise ValueError(f"{cin} input channels not divisible by {offset_groups} offset groups")
    if offset.shape[0] != n or tuple(offset.shape[2:]) != out_hw:
        raise ValueError(f"offset shape {tuple(offset.shape)} does not fit N={n}, Ho,Wo={out_hw}")
    if mask is not None and tuple(mask.shape) != (n, offset_groups * taps, *out_hw):
        raise ValueError(f"mask shape {tuple(mask.shape)} != {(n, offset_groups * taps, *out_hw)}")
    if bias is not None and tuple(bias.shape) != (cout,):
        raise ValueError(f"bias shape {tuple(bias.shape)} != ({cout},)")
    return groups, offset_groups


def _base_grid(
    size: int, out_size: int, kernel: int, stride: int, pad: int, dil: int, ref: Tensor
) -> Tensor:
    """Normalised kernel-tap sample positions without offset: ``[kernel, out_size]``."""
    out_pos = torch.arange(out_size, device=ref.device, dtype=ref.dtype) * stride - pad
    tap_pos = torch.arange(kernel, device=ref.device, dtype=ref.dtype) * dil
    pos = tap_pos[:, None] + out_pos[None, :]
    return (2 * pos + 1) / size - 1


def sampling_grid(
    offset: Tensor,
    size: tuple[int, int],
    out_size: tuple[int, int],
    kernel: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
) -> Tensor:
    """``grid_sample`` grid ``[N·G, K, Ho, Wo, 2]`` ((x, y) last, normalised) of every tap.

    ``offset``: ``[N, 2·G·K, Ho, Wo]`` as (Δy, Δx) pairs per tap; the batch is written as ``-1``
    so a traced graph keeps it dynamic.
    """
    (h, w), (ho, wo), (kh, kw) = size, out_size, kernel
    taps = kh * kw
    off = offset.reshape(-1, taps, 2, ho, wo).flip(2).permute(0, 1, 3, 4, 2)
    base_y = _base_grid(h, ho, kh, stride[0], padding[0], dilation[0], off)
    base_x = _base_grid(w, wo, kw, stride[1], padding[1], dilation[1], off)
    base = torch.stack(
        (
            base_x[None, :, None, :].expand(kh, kw, ho, wo),
            base_y[:, None, :, None].expand(kh, kw, ho, wo),
        ),
        dim=-1,
    ).reshape(taps, ho, wo, 2)
    scale = torch.tensor([2 / w, 2 / h], dtype=off.dtype, device=off.device)
    return torch.addcmul(base, off, scale)


def _deform_conv2d_torch(
    input: Tensor,
    offset: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    mask: Tensor | None,
) -> Tensor:
    n, cin, h, w = input.shape
    cout, _, kh, kw = weight.shape
    taps = kh * kw
    ho = _output_size(h, kh, stride[0], padding[0], dilation[0])
    wo = _output_size(w, kw, stride[1], padding[1], dilation[1])
    groups, offset_groups = _check_shapes(input, offset, weight, bias, mask, (ho, wo))
    dtype = input.dtype
    # Reduced-precision grids lose sub-pixel accuracy (bf16: ~0.3 px at W=168), so sample in fp32.
    sample_dtype = dtype if dtype in (torch.float32, torch.float64) else torch.float32
    cin_g = cin // offset_groups
    ng = n * offset_groups

    grid = sampling_grid(offset.to(sample_dtype), (h, w), (ho, wo), (kh, kw), stride, padding,
                         dilation)

    source = input.to(sample_dtype).reshape(ng, cin_g, h, w)
    depth = (cin // groups) * taps
    # One bmm over (batch, conv group); for N == 1 the expand is a view, not a copy.
    weight_mat = weight.to(dtype).reshape(1, groups, cout // groups, depth)
    weight_mat = weight_mat.expand(n, -1, -1, -1).reshape(n * groups, cout // groups, depth)
    mask_view = None
    if mask is not None:
        mask_view = mask.to(sample_dtype).reshape(n, offset_groups, 1, taps, ho, wo)
    # Bands accumulate in place into row slices of the (bias-filled) output: no concatenation.
    if bias is None:
        out = input.new_zeros(n, cout, ho, wo)
    else:
        out = bias.to(dtype)[None, :, None, None].repeat(n, 1, ho, wo)  # a fresh tensor
    out_mat = out.view(n * groups, cout // groups, ho * wo)

    tensors = (input, offset, weight, bias, mask)
    need_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    # With autograd each band's grid_sample backward would allocate a full-size input gradient,
    # so bands are used only when no graph is recorded.
    if need_grad:
        rows = ho
    else:
        budget = _CPU_CHUNK_ELEMS if input.device.type == "cpu" else _OTHER_CHUNK_ELEMS
        rows = max(1, budget // max(1, n * cin * taps * wo))

    for row0 in range(0, ho, rows):
        row1 = min(row0 + rows, ho)
        band = row1 - row0
        grid_band = grid[:, :, row0:row1].reshape(ng, taps * band, wo, 2)
        sampled = F.grid_sample(
            source, grid_band, mode="bilinear", padding_mode="zeros", align_corners=False
        )  # [N*G, Cin/G, K*band, Wo]: already in the (c, k) x (row, col) order of the matmul
        if mask_view is not None:
            sampled = sampled.view(n, offset_groups, cin_g, taps, band, wo)
            band_mask = mask_view[..., row0:row1, :]
            sampled = sampled.mul(band_mask) if need_grad else sampled.mul_(band_mask)
        columns = sampled.to(dtype).reshape(n * groups, depth, band * wo)
        out_mat[:, :, row0 * wo : row1 * wo].baddbmm_(weight_mat, columns)
    return out


class ModulatedDeformConv2d(nn.Module):
    """DCNv2 layer with mmcv's parameter layout (``weight``, ``bias``); the caller gives offsets.

    ``forward(x [N, Cin, H, W], offset [N, 2*G*kh*kw, Ho, Wo], mask [N, G*kh*kw, Ho, Wo] | None)``
    returns ``[N, Cout, Ho, Wo]``. Weight ``[Cout, Cin/groups, kh, kw]``, bias ``[Cout]``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        deform_groups: int = 1,
        bias: bool = True,
        *,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"channels {in_channels}->{out_channels} not divisible by {groups}")
        if in_channels % deform_groups:
            raise ValueError(f"{in_channels} channels not divisible by {deform_groups} groups")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = _pair(kernel_size)
        self.stride = _pair(stride)
        self.padding = _pair(padding)
        self.dilation = _pair(dilation)
        self.groups = groups
        self.deform_groups = deform_groups
        self.backend = backend
        self.weight = nn.Parameter(
            torch.empty(out_channels, in_channels // groups, *self.kernel_size)
        )
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """mmcv init: weight U(+-1/sqrt(Cin*kh*kw)), bias 0."""
        bound = 1.0 / math.sqrt(self.in_channels * self.kernel_size[0] * self.kernel_size[1])
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: Tensor, offset: Tensor, mask: Tensor | None = None) -> Tensor:
        return deform_conv2d(
            x, offset, self.weight, self.bias, self.stride, self.padding, self.dilation, mask,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, "
            f"groups={self.groups}, deform_groups={self.deform_groups}, "
            f"bias={self.bias is not None}"
        )


class ModulatedDeformConv2dPack(ModulatedDeformConv2d):
    """DCNv2 that predicts its own offsets and mask (mmcv ``ModulatedDeformConv2dPack``).

    ``conv_offset``: ``Conv2d(Cin, 3*G*kh*kw, kernel, stride, padding, dilation)``, zero-init,
    so a fresh layer is a plain convolution scaled by sigmoid(0) = 0.5.
    ``forward(x [N, Cin, H, W]) -> [N, Cout, Ho, Wo]``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        deform_groups: int = 1,
        bias: bool = True,
        *,
        backend: str = "auto",
    ) -> None:
        super().__init__(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
            deform_groups, bias, backend=backend,
        )
        self.conv_offset = nn.Conv2d(
            in_channels,
            deform_groups * 3 * self.kernel_size[0] * self.kernel_size[1],
            self.kernel_size,
            self.stride,
            self.padding,
            self.dilation,
            bias=True,
        )
        self._zero_offset()

    def _zero_offset(self) -> None:
        nn.init.zeros_(self.conv_offset.weight)
        nn.init.zeros_(self.conv_offset.bias)

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if hasattr(self, "conv_offset"):
            self._zero_offset()

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        # mmcv split: conv_offset's output is cut into thirds and the first two are concatenated,
        # and the kernel then reads that block as interleaved (dy, dx) pairs. So conv_offset
        # channel 2k is dy of tap k (not "o1 = all dy, o2 = all dx"); mmcv checkpoints rely on it.
        out = self.conv_offset(x)
        o1, o2, logits = torch.chunk(out, 3, dim=1)
        offset = torch.cat((o1, o2), dim=1)
        return deform_conv2d(
            x, offset, self.weight, self.bias, self.stride, self.padding, self.dilation,
            torch.sigmoid(logits), backend=self.backend,
        )
