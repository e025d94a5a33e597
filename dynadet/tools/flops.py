"""Multiply-accumulate counts of a detector: whole model, per part, and the dynamic head's cost.

Units. A MAC is one multiply-accumulate; **FLOPs = 2 × MACs** everywhere in dynadet (the
convention of PyTorch's counter). The FGDH README's "FLOPs" column is a different unit: head-tower
MACs (plus 1 op per channel for each norm) / 2^30 per image on the 32-padded input — called
"paper units" here (:data:`PAPER_UNIT`); GMACs are MACs / 1e9.

Counting. :class:`MacCounter` runs code under ``torch.utils.flop_counter.FlopCounterMode`` and
fixes what that counter gets wrong for dynadet's pure-PyTorch ops (checked on torch 2.13):

===============================  ==================================  ============================
op                               FlopCounterMode alone               here
===============================  ==================================  ============================
conv, linear, mm, bmm, addmm     2·MACs (bias not counted)           the same
oneDNN ``_linear_pointwise``     not counted                         as ``linear``
in-place ``addmm_``/``baddbmm_``  not counted                         as their out-of-place form
bilinear ``F.grid_sample``       not counted                         4 MACs per output value
                                                                     (bicubic 16, nearest 0)
bilinear ``F.interpolate``       not counted (decomposed to          4 MACs per output value
                                 elementwise ops under no-grad)
DCN :func:`deform_conv2d`        0 (GEMM is ``baddbmm_``,            conv MACs + 4 MACs per
(pure PyTorch or torchvision)    sampling is ``grid_sample``)        bilinear sample
masked conv                      its GEMMs (as above), or the whole  active output pixels ×
(:class:`MaskedConvGN` + mask)   dense conv on the dense fallback    C_out × C_in/groups × k²,
                                                                     whichever path runs
RoIAlign (module)                0 (``embedding_bag``)               4 MACs per bilinear sample
norms, activations, elementwise  not counted                         not counted
===============================  ==================================  ============================

The DCN count is op-level (the formulas above for ``baddbmm_`` + ``grid_sampler_2d``, and for
``torchvision::deform_conv2d`` when that op is loaded), so both backends give
:func:`deform_conv_macs`. The masked conv and RoIAlign counts are module-level: whatever the
counter saw inside a :class:`~dynadet.ops.masked_conv.MaskedConvGN` called with a mask, a
``RoIAlign`` or a ``MultiScaleRoIAlign`` is replaced by the analytic count
(:func:`masked_conv_macs`, :func:`roi_align_macs`). The module-level correction reads the mask
(one host sync per call): this is a measuring tool, not part of a forward pass.

Head cost in paper units. :func:`tower_cost` gives the MACs per image of a head's towers with
every gate open: for FGDH routing towers (:class:`~dynadet.models.fcos_routing.FCOSRoutingHead`)
the README convention (:meth:`RoutingLayer.full_cost`: MACs + norm channels, depthwise counted
twice, unused paths included); for plain conv towers (FCOS "D2") conv MACs only, as the README's
98.0. :func:`readme_head_cost` applies the README's input sizes: D2 at 800×1333 *unpadded*, the
routing heads at the 32-padded 800×1344. :func:`head_cost` collects the executed cost per image
(``FCOSRoutingHead.last_cost``) over a set of inputs for avg/min/max.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from dynadet.ops.masked_conv import _ONEDNN_LINEAR, MaskedConvGN
from dynadet.ops.roi_align import MultiScaleRoIAlign, RoIAlign

__all__ = [
    "PAPER_UNIT",
    "FlopReport",
    "HeadCost",
    "MacCounter",
    "conv_macs",
    "count_model_macs",
    "deform_conv_macs",
    "head_cost",
    "level_sizes",
    "masked_conv_macs",
    "padded_size",
    "parameter_counts",
    "readme_head_cost",
    "roi_align_macs",
    "tower_cost",
]

PAPER_UNIT = 2**30
"""The FGDH README's "FLOPs" unit: MACs / 2^30."""

BILINEAR_MACS = 4  # four weighted neighbours per sampled value
_SAMPLE_MACS = {0: BILINEAR_MACS, 1: 0, 2: 16}  # grid_sampler interpolation_mode → MACs
aten = torch.ops.aten


# ----------------------------------------------------------------------------- analytic counts


def conv_macs(
    in_channels: int, out_channels: int, kernel_size: int | Sequence[int], out_hw: Sequence[int],
    groups: int = 1, batch: int = 1,
) -> int:
    """MACs of a conv: ``N·H_out·W_out · C_out · C_in/groups · kh·kw`` (bias not counted)."""
    kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else kernel_size
    return batch * math.prod(out_hw) * out_channels * (in_channels // groups) * kh * kw


def deform_conv_macs(
    input_shape: Sequence[int], weight_shape: Sequence[int], out_hw: Sequence[int]
) -> tuple[int, int]:
    """``(conv MACs, sampling MACs)`` of a deformable conv.

    ``input [N, C_in, H, W]``, ``weight [C_out, C_in/groups, kh, kw]``: the contraction is a
    conv's MACs; every one of the ``N·C_in·kh·kw·H_out·W_out`` sampled values is a bilinear
    blend of 4 neighbours (4 MACs). The modulation multiply and offset arithmetic are
    elementwise and not counted.
    """
    n, c_in = input_shape[0], input_shape[1]
    c_out, c_in_g, kh, kw = weight_shape
    conv = n * math.prod(out_hw) * c_out * c_in_g * kh * kw
    return conv, n * c_in * kh * kw * math.prod(out_hw) * BILINEAR_MACS


def masked_conv_macs(mask: Tensor, weight: Tensor) -> int:
    """MACs of a masked conv: active output pixels of ``mask [N, 1, Ho, Wo]`` (> 0) times
    ``C_out · C_in/groups · kh·kw`` of ``weight``; the norm is not counted."""
    return int((mask > 0).sum()) * math.prod(weight.shape)


def _as_rois(boxes: Tensor | Sequence[Tensor]) -> Tensor:
    if isinstance(boxes, Tensor):
        return boxes
    rows = [torch.cat([b.new_full((len(b), 1), i), b], 1) for i, b in enumerate(boxes)]
    return torch.cat(rows) if rows else torch.zeros(0, 5)


def roi_align_macs(
    rois: Tensor | Sequence[Tensor], channels: int, output_size: Sequence[int],
    spatial_scale: float | Tensor, sampling_ratio: int, aligned: bool,
) -> int:
    """MACs of RoIAlign: 4 per bilinear sample, ``g_h·g_w`` samples per bin and channel.

    ``rois [K, 5]`` (batch index, x1, y1, x2, y2) or per-image ``[K_i, 4]`` boxes;
    ``spatial_scale`` a float or a per-RoI ``[K]`` tensor. ``g = sampling_ratio`` if > 0, else
    ``ceil(roi_size / output_size)`` per axis and RoI (the kernels' adaptive rule).
    """
    rois = _as_rois(rois).detach().double()
    oh, ow = output_size
    if sampling_ratio > 0:
        samples = rois.new_full((rois.shape[0],), float(sampling_ratio**2))
    else:
        size = (rois[:, 3:5] - rois[:, 1:3]) * torch.as_tensor(spatial_scale).double()[..., None]
        if not aligned:
            size = size.clamp(min=1)
        g = torch.ceil(size / size.new_tensor([ow, oh])).clamp(min=0)
        samples = g[:, 0] * g[:, 1]
    return int(samples.sum()) * channels * oh * ow * BILINEAR_MACS


def padded_size(height: int, width: int, divisor: int = 32) -> tuple[int, int]:
    """``(H, W)`` rounded up to a multiple of ``divisor`` (the detector's batch padding)."""
    return -(-height // divisor) * divisor, -(-width // divisor) * divisor


def level_sizes(
    height: int, width: int, strides: Sequence[int] = (8, 16, 32, 64, 128)
) -> list[tuple[int, int]]:
    """Feature-map sizes of a ResNet + FPN pyramid for an ``H × W`` input.

    Every stride-2 step (7×7 stem, max pool, 3×3 convs, P6/P7) maps ``x → ceil(x / 2)``, so
    level ``s`` is ``H`` halved ``log2(s)`` times with rounding up (800×1333 → P3 100×167).
    """
    sizes = []
    for stride in strides:
        h, w = height, width
        for _ in range(int(stride).bit_length() - 1):
            h, w = -(-h // 2), -(-w // 2)
        sizes.append((h, w))
    return sizes


def _plain_tower_macs_per_pixel(head: nn.Module) -> int:
    total = 0
    for name in ("cls_tower", "reg_tower"):
        for module in getattr(head, name).modules():
            if isinstance(module, nn.Conv2d):
                total += conv_macs(
                    module.in_channels, module.out_channels, module.kernel_size, (1, 1),
                    module.groups,
                )
    return total


def tower_cost(head: nn.Module, sizes: Sequence[tuple[int, int]]) -> float:
    """MACs per image of a dense head's towers, every gate open, for level ``sizes``.

    Routing heads (with ``full_cost``): the FGDH README convention (norm channels counted,
    depthwise twice, unused scale paths included). Plain conv towers (``cls_tower`` /
    ``reg_tower`` of :class:`~dynadet.models.dense_head.TowerHead`): conv MACs only, bias and
    norm excluded. Predictors are never included.
    """
    if hasattr(head, "full_cost"):
        return float(head.full_cost(sizes))
    return float(_plain_tower_macs_per_pixel(head) * sum(h * w for h, w in sizes))


def readme_head_cost(head: nn.Module, height: int = 800, width: int = 1333) -> float:
    """A head's cost in the FGDH README's units (MACs / 2^30) for an ``H × W`` image.

    Reproduces the README's static rows: plain towers (D2) at the *unpadded* size, conv MACs
    only (98.0 at 800×1333); routing towers (Fix/Dynamic, all gates open) on the 32-padded size
    (Fix D4 198.6, Fix D8 397.2 at 800×1344).
    """
    strides = head.anchor_generator.strides
    if hasattr(head, "full_cost"):
        height, width = padded_size(height, width, 32)
    return tower_cost(head, level_sizes(height, width, strides)) / PAPER_UNIT


# ----------------------------------------------------------------------------- op formulas


def _gemm_flops(_self: Any, a: Sequence[int], b: Sequence[int], *args: Any, **kwargs: Any) -> int:
    """``addmm_``/``baddbmm_``: 2·MACs of ``a @ b`` (2-d or batched 3-d)."""
    batch = a[0] if len(a) == 3 else 1
    return 2 * batch * a[-2] * a[-1] * b[-1]


def _linear_flops(x: Sequence[int], w: Sequence[int], *args: Any, **kwargs: Any) -> int:
    """oneDNN ``mkldnn::_linear_pointwise`` (the sparse conv's GEMM on CPU): 2·MACs of
    ``x [M, K] @ w[N, K]ᵀ``."""
    return 2 * math.prod(x[:-1]) * x[-1] * w[0]


def _grid_sample_flops(
    input: Sequence[int], grid: Sequence[int], mode: int, *args: Any, out_shape: Any = None,
    **kwargs: Any,
) -> int:
    return 2 * _SAMPLE_MACS.get(int(mode), BILINEAR_MACS) * math.prod(out_shape)


def _per_output(macs: int) -> Callable[..., int]:
    def formula(*args: Any, out_shape: Any = None, **kwargs: Any) -> int:
        return 2 * macs * math.prod(out_shape)

    return formula


def _torchvision_dcn_flops(
    input: Sequence[int], weight: Sequence[int], *args: Any, out_shape: Any = None, **kwargs: Any
) -> int:
    conv, sampling = deform_conv_macs(input, weight, out_shape[2:])
    return 2 * (conv + sampling)


def op_formulas() -> dict[Any, Callable[..., int]]:
    """``custom_mapping`` for ``FlopCounterMode``: FLOPs (2·MACs) of the ops it misses.

    Overloads that PyTorch decomposes before counting (``upsample_bilinear2d.vec`` under
    no-grad) are listed by overload as well, so they are counted instead of decomposed.
    """
    bilinear = _per_output(BILINEAR_MACS)
    bicubic = _per_output(16)
    table: dict[Any, Callable[..., int]] = {
        aten.addmm_: _gemm_flops,
        aten.baddbmm_: _gemm_flops,
        aten.grid_sampler_2d: _grid_sample_flops,
        aten.upsample_bilinear2d: bilinear,
        aten.upsample_bilinear2d.vec: bilinear,
        aten.upsample_bicubic2d: bicubic,
        aten.upsample_bicubic2d.vec: bicubic,
    }
    if _ONEDNN_LINEAR is not None:  # the sparse conv's GEMM on CPU builds with oneDNN
        table[_ONEDNN_LINEAR] = _linear_flops
    try:  # registered only when torchvision's ops are loaded (never imported here)
        table[torch.ops.torchvision.deform_conv2d] = _torchvision_dcn_flops
    except (AttributeError, RuntimeError):
        pass
    return table


# ----------------------------------------------------------------------------- counter


@dataclass
class FlopReport:
    """MACs of one counted run: ``macs`` in all, per module (``parts``: dotted names, depth
    ≤ 2, plus ``"other"`` for work outside the top-level parts) and per op (``by_op``)."""

    macs: int
    parts: dict[str, int] = field(default_factory=dict)
    by_op: dict[str, int] = field(default_factory=dict)
    batch_shape: tuple[int, ...] = ()

    @property
    def flops(self) -> int:
        return 2 * self.macs

    def to_dict(self) -> dict[str, Any]:
        n = self.batch_shape[0] if self.batch_shape else 1
        return {
            "input_shape": list(self.batch_shape),
            "macs": self.macs,
            "flops": self.flops,
            "gmacs_per_image": self.macs / n / 1e9,
            "gflops_per_image": self.flops / n / 1e9,
            "parts_gmacs": {k: v / 1e9 for k, v in self.parts.items()},
            "by_op_gmacs": {k: v / 1e9 for k, v in self.by_op.items()},
            "convention": "FLOPs = 2 x MACs; norms, activations and elementwise ops not counted",
        }


class MacCounter:
    """Context manager counting the MACs of everything run inside it (see module docstring).

    ``MacCounter(model, depth=2)``: ``parts`` are ``model``'s submodules down to ``depth``
    (``backbone``, ``neck.0``, ``head.cls_tower``, ...; the ``preprocess`` module is left out);
    masked convs and RoIAlign modules inside ``model`` get the analytic count.

    >>> with MacCounter(model) as counter:
    ...     model.forward_batch(batch)
    >>> counter.report().macs
    """

    def __init__(self, model: nn.Module | None = None, depth: int = 2) -> None:
        self.model = model
        self.depth = depth
        self._mode = FlopCounterMode(display=False, custom_mapping=op_formulas())
        self._extra_flops = 0  # corrections of the module-level counts
        self._extra_ops: dict[str, int] = {}
        self._part_flops: dict[str, int] = {}
        self._top: list[str] = []
        self._handles: list[Any] = []
        self._starts: dict[int, list[tuple[int, dict[str, int]]]] = {}

    # The counter's running totals (FLOPs), with the module-level corrections.
    def _total(self) -> int:
        return sum(self._mode.flop_counts["Global"].values()) + self._extra_flops

    def _ops(self) -> dict[str, int]:
        return {str(k): v for k, v in self._mode.flop_counts["Global"].items()}

    def __enter__(self) -> MacCounter:
        if self.model is not None:
            self._install(self.model)
        self._mode.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._mode.__exit__(*exc)
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _install(self, model: nn.Module) -> None:
        for name, module in model.named_modules():
            # The analytic hook goes first so that its correction is in place before an
            # enclosing part (possibly the same module) reads the total on exit.
            if isinstance(module, MaskedConvGN | RoIAlign | MultiScaleRoIAlign):
                self._hook(module, None, _analytic_macs)
            depth = name.count(".") + 1 if name else 0
            if name and depth <= self.depth and not name.startswith("preprocess"):
                self._part_flops[name] = 0
                if depth == 1:
                    self._top.append(name)
                self._hook(module, name, None)

    def _hook(self, module: nn.Module, part: str | None, analytic: Callable | None) -> None:
        def pre(mod: nn.Module, args: tuple, kwargs: dict) -> None:
            self._starts.setdefault(id(mod) * 2 + (part is None), []).append(
                (self._total(), self._ops() if analytic else {})
            )

        def post(mod: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
            start, ops = self._starts[id(mod) * 2 + (part is None)].pop()
            if analytic is not None:
                macs = analytic(mod, args, kwargs, out)
                if macs is not None:  # replace what the counter saw inside this module
                    counted = self._total() - start
                    self._extra_flops += 2 * macs - counted
                    for op, value in self._ops().items():
                        self._extra_ops[op] = self._extra_ops.get(op, 0) - (
                            value - ops.get(op, 0)
                        )
                    label = _ANALYTIC_LABELS[type(mod)]
                    self._extra_ops[label] = self._extra_ops.get(label, 0) + 2 * macs
            if part is not None:
                self._part_flops[part] += self._total() - start

        self._handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
        self._handles.append(module.register_forward_hook(post, with_kwargs=True))

    def report(self, batch_shape: Sequence[int] = ()) -> FlopReport:
        """MACs counted so far (FLOPs / 2)."""
        ops = self._ops()
        for op, value in self._extra_ops.items():
            ops[op] = ops.get(op, 0) + value
        total = self._total() // 2
        parts = {k: v // 2 for k, v in self._part_flops.items() if v}
        if self._top:
            parts["other"] = total - sum(parts.get(k, 0) for k in self._top)
        by_op = {k.removeprefix("aten."): v // 2 for k, v in ops.items() if v}
        return FlopReport(total, parts, by_op, tuple(batch_shape))


_ANALYTIC_LABELS = {
    MaskedConvGN: "masked_conv (active pixels)",
    RoIAlign: "roi_align",
    MultiScaleRoIAlign: "roi_align",
}


def _analytic_macs(module: nn.Module, args: tuple, kwargs: dict, out: Any) -> int | None:
    """Analytic MACs of a masked conv (when called with a mask) or a RoIAlign module call."""
    if isinstance(module, MaskedConvGN):
        mask = args[1] if len(args) > 1 else kwargs.get("mask")
        return None if mask is None else masked_conv_macs(mask, module.weight)
    features, boxes = args[0], args[1] if len(args) > 1 else kwargs["rois"]
    if isinstance(module, RoIAlign):
        return roi_align_macs(
            boxes, features.shape[1], module.output_size, module.spatial_scale,
            module.sampling_ratio, module.aligned,
        )
    assert isinstance(module, MultiScaleRoIAlign)
    rois = _as_rois(boxes)
    strides = torch.tensor(module.featmap_strides, dtype=torch.float64)
    scale = 1.0 / strides[module.map_levels(rois[:, 1:]).cpu()]
    return roi_align_macs(
        rois.cpu(), features[0].shape[1], module.output_size, scale, module.sampling_ratio,
        module.aligned,
    )


# ----------------------------------------------------------------------------- models


def parameter_counts(model: nn.Module) -> dict[str, Any]:
    """``{"total", "trainable", "parts": {child: total}}`` parameter counts."""
    parts = {
        name: sum(p.numel() for p in child.parameters())
        for name, child in model.named_children()
    }
    return {
        "total": sum(p.numel() for p in model.parameters()),
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "parts": {k: v for k, v in parts.items() if v},
    }


def _preprocess(model: nn.Module, images: Sequence[Tensor]) -> tuple[Any, tuple[int, ...]]:
    """The preprocessed batch (``None`` for a model without ``preprocess``) and its shape."""
    if hasattr(model, "preprocess") and hasattr(model, "forward_batch"):
        batch = model.preprocess(list(images))
        return batch, tuple(batch.tensor.shape)
    return None, (len(images), *images[0].shape)


@torch.no_grad()
def count_model_macs(model: nn.Module, images: Sequence[Tensor], depth: int = 2) -> FlopReport:
    """MACs of one inference of ``model`` on ``images`` (``list[Tensor[3, H, W]]``).

    Preprocessing (normalise, resize, pad) runs before counting; the count covers the network
    (backbone, neck, head) and the post-processing (``other``) on the padded batch.
    """
    model.eval()
    batch, shape = _preprocess(model, images)
    with MacCounter(model, depth) as counter:
        if batch is not None:
            model.forward_batch(batch)
        else:
            model(list(images))
    return counter.report(shape)


@dataclass
class HeadCost:
    """Per-image head-tower MACs over a set of inputs: ``executed`` (gates open) and ``full``
    (all gates open); ``dynamic`` when the towers are gated."""

    executed: list[float]
    full: list[float]
    dynamic: bool

    def summary(self) -> dict[str, Any]:
        """avg/min/max in paper units (MACs / 2^30) and GMACs, and the mean executed fraction."""

        def stats(values: list[float], unit: float) -> dict[str, float]:
            scaled = [v / unit for v in values]
            return {"avg": statistics.fmean(scaled), "min": min(scaled), "max": max(scaled)}

        return {
            "dynamic": self.dynamic,
            "images": len(self.executed),
            "paper_units": stats(self.executed, PAPER_UNIT),
            "gmacs": stats(self.executed, 1e9),
            "full_paper_units": stats(self.full, PAPER_UNIT),
            "executed_fraction": statistics.fmean(
                e / f for e, f in zip(self.executed, self.full, strict=True)
            ),
            "unit": "paper units = head-tower MACs / 2^30 per image on the padded input",
        }


@torch.no_grad()
def head_cost(model: nn.Module, batches: Iterable[Sequence[Tensor]]) -> HeadCost:
    """Executed head-tower cost per image of ``model`` over ``batches`` of images.

    Routing heads report ``last_cost`` (per image, after each forward); plain conv towers get
    :func:`tower_cost` on the level sizes the head received. Use batches of one image for the
    README's numbers: in a larger batch every image is padded to the largest one, and the
    padded pixels are executed (and counted) too.
    """
    model.eval()
    head = model.head
    sizes: list[list[tuple[int, int]]] = []
    handle = head.register_forward_pre_hook(
        lambda mod, args: sizes.append([tuple(f.shape[-2:]) for f in args[0]])
    )
    executed: list[float] = []
    full: list[float] = []
    try:
        for images in batches:
            model(list(images))
            cost = getattr(head, "last_cost", None)
            if cost is not None:
                executed += cost.executed.tolist()
                full += cost.full.tolist()
            else:
                static = tower_cost(head, sizes[-1])
                executed += [static] * len(images)
                full += [static] * len(images)
    finally:
        handle.remove()
    return HeadCost(executed, full, bool(getattr(head, "dynamic", False)))
