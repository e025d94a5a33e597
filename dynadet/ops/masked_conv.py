"""Masked (sparse) convolution with GroupNorm over active pixels — FGDH inference.

At inference the Fine-Grained Dynamic Head runs its gated residual branch only where the spatial
gate is open. The reference (cvpods ``masked_conv2d``, a CUDA extension, batch 1 only) gathers the
``k×k`` patches of the active pixels, does one GEMM, applies GroupNorm (+ ReLU) to the
``(1, C, K_active)`` result — so the GN statistics cover the *active pixels only* — and scatters
the rows into a zero map. The released checkpoints were evaluated that way (``gn_mode="masked"``);
training sees GN over the whole map (``gn_mode="dense"``).

This module does the same for batches of any size, on any device, in pure PyTorch:

1. ``nonzero`` of the flattened ``[N, Ho, Wo]`` mask gives the active output positions of the
   whole batch (one host sync per call, inherent to a data-dependent gather);
2. the input is copied once into a zero-padded channels-last buffer ``[N·Hp·Wp, C]``, so every
   tap of every active pixel is a contiguous row at ``base + ky·d·Wp + kx·d`` — no ``unfold``,
   no bounds checks;
3. on CPU in float32, per chunk of 512 windows, the im2col rows ``[rows, k²·C]`` (one
   ``index_select`` of ``k`` contiguous ``[k·C]`` blocks per window from an overlapping view)
   and one oneDNN matmul (~15 % faster than MKL's GEMM here; the row count of a short last
   chunk is rounded up to a multiple of 64 so that oneDNN's shape-specialised kernels are
   reused); elsewhere (CUDA, half precision) per tap an ``index_select`` of ``[K, C]`` rows and
   an accumulating GEMM, in cache-sized chunks;
4. GroupNorm over the active rows of each image (``index_add`` per image and group), ReLU;
5. ``index_copy`` into a zero ``[N·Ho·Wo, C_out]`` buffer, returned as an ``[N, C_out, Ho, Wo]``
   view with channels-last strides (no transpose copy; every PyTorch op accepts it).

Above ``dense_threshold`` (fraction of active output pixels in the batch) the gather does not pay
off and the same numbers are computed densely: ``conv2d`` → GN with masked statistics → ReLU →
``× mask``. ``gn_mode="dense"`` always takes that dense path, because whole-map GN statistics
need the conv output at every pixel.

Gradients: every step here is an ordinary differentiable op, so autograd works through the
sparse path (tested with ``gradcheck``; only the mask is non-differentiable). The FGDH reference
trains its depth path densely (a dense conv times the gate); ``train_gn_mode="masked"`` trains
it through this path instead, where each conv is one im2col gather of all taps and one GEMM, so
autograd keeps a single index per conv. Under autocast the gathers and GEMMs run in the autocast
dtype and GroupNorm statistics in float32.

Inference extras: :func:`masked_gated_residual` fuses FGDH's two-conv depth path for
channels-last inputs (:func:`masked_gated_residual_levels`: all pyramid levels in one batch,
since the convs are shared across levels), and the per-call buffers (padded input, gathered
rows, GEMM output) are per-thread scratch reused across calls.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "DEFAULT_DENSE_THRESHOLD",
    "GN_MODES",
    "MaskedConvGN",
    "clear_workspace",
    "dilate_mask",
    "masked_conv2d",
    "masked_conv_gn",
    "masked_gated_residual",
    "masked_gated_residual_levels",
    "masked_group_norm",
]

GN_MODES = ("masked", "dense")

# Fraction of active output pixels above which the dense conv is used. Measured with
# benchmarks/masked_conv.py (256→256 3×3 + GN on 100×168, 1 CPU thread, random masks): with
# the per-tap GEMMs the gather path took ~0.7× the dense time at 50 %, ~1.0× at 60–70 % and
# ~1.5× at 100 %; the CPU float32 path (im2col + oneDNN) is now faster than dense up to 90 %
# (1.13×) and 0.96× of it at 100 %. The default stays at 0.65 because it also decides masked
# training (autograd through the gathers, not re-measured above 65 %) and the GPU path; at
# CPU inference a threshold up to 0.9 pays (``dense_threshold`` of the heads and modules).
DEFAULT_DENSE_THRESHOLD = 0.65

# Inference scratch buffers alive at the same time (see _scratch).
_SLOT_PADDED, _SLOT_HIDDEN, _SLOT_ROWS, _SLOT_GATHER, _SLOT_RESIDUAL = range(5)

# Rows per gather/GEMM chunk: a [rows, C] slice of 256 channels is 1 MB in float32, so the
# gathered rows and the accumulator stay in a core's L2 across the k² taps (measured, 1 thread:
# 15 µs per row of 9 taps at 512–1024 rows, 20 µs at 4096).
_CHUNK_ROWS = 1024


def _pair(value: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    a, b = value
    return int(a), int(b)


def _compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype convolutions of ``x`` run in: the autocast dtype when autocast is on."""
    kind = x.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype


def _no_autocast(x: Tensor):
    """Autocast off on ``x``'s device (statistics and in-place GEMMs run in one known dtype)."""
    return torch.autocast(x.device.type, enabled=False)


def _full(x: Tensor) -> Tensor:
    """``x`` in float32 when it is in half precision (GroupNorm statistics, as autocast does)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _as_mask(mask: Tensor, x: Tensor, out_hw: tuple[int, int]) -> Tensor:
    """``mask [N, 1, Ho, Wo]`` or ``[N, Ho, Wo]`` (bool, 0/1 or gates) → bool ``[N, Ho, Wo]``."""
    if mask.dim() == 4:
        if mask.shape[1] != 1:
            raise ValueError(f"mask must have one channel, got shape {tuple(mask.shape)}")
        mask = mask[:, 0]
    if mask.dim() != 3 or mask.shape[0] != x.shape[0] or tuple(mask.shape[1:]) != out_hw:
        raise ValueError(
            f"mask shape {tuple(mask.shape)} does not match the output "
            f"[{x.shape[0]}, 1, {out_hw[0]}, {out_hw[1]}]"
        )
    return mask if mask.dtype == torch.bool else mask > 0


def _out_size(
    x: Tensor, weight: Tensor, padding: tuple[int, int], dilation: tuple[int, int]
) -> tuple[int, int]:
    kh, kw = weight.shape[-2:]
    ho = x.shape[2] + 2 * padding[0] - dilation[0] * (kh - 1)
    wo = x.shape[3] + 2 * padding[1] - dilation[1] * (kw - 1)
    if ho <= 0 or wo <= 0:
        raise ValueError(f"input {tuple(x.shape)} too small for kernel {kh}×{kw}")
    return ho, wo


def dilate_mask(mask: Tensor, kernel_size: int = 3, dilation: int = 1) -> Tensor:
    """Positions whose ``k×k`` (dilated) neighbourhood holds an active pixel.

    This is the mask of a conv whose output feeds a second ``k×k`` conv run on ``mask``: the
    reference computes it as ``max_pool2d(gate, 3, 1, 1) > 0``.
    ``mask [N, 1, H, W]`` (any dtype, active where > 0) → bool ``[N, 1, H, W]``.
    """
    m = (mask > 0).to(torch.float32 if not mask.is_floating_point() else mask.dtype)
    pad = dilation * (kernel_size - 1) // 2
    # Zero padding is exact for a 0/1 map (max_pool2d's own padding refuses pad > kernel / 2).
    m = F.pad(m, (pad, pad, pad, pad))
    return F.max_pool2d(m, kernel_size, stride=1, dilation=dilation) > 0


def _group_norm_rows(
    rows: Tensor,
    image: Tensor,
    counts: Tensor,
    num_groups: int,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
) -> Tensor:
    """GroupNorm of ``rows [K, C]`` with statistics per (image, group) over the active rows.

    ``image [K]`` is each row's image index and ``counts [N]`` the active rows per image.
    Two-pass (mean, then centred squares) for the same accuracy as ``F.group_norm``.
    """
    k, c = rows.shape
    n = counts.shape[0]
    cg = c // num_groups
    grouped = rows.view(k, num_groups, cg)
    denom = (counts.to(rows.dtype) * cg).clamp(min=1)[:, None]  # [N, 1]; empty images: no rows
    mean = rows.new_zeros(n, num_groups).index_add_(0, image, grouped.sum(-1)) / denom
    centred = grouped - mean[image][..., None]
    var = rows.new_zeros(n, num_groups).index_add_(0, image, centred.square().sum(-1)) / denom
    out = (centred * (var + eps).rsqrt()[image][..., None]).view(k, c)
    if weight is not None:
        out = out * weight
    if bias is not None:
        out = out + bias
    return out


def _norm_relu_rows_inplace(
    rows: Tensor, counts: Tensor, norm: nn.GroupNorm | None, relu: bool
) -> Tensor:
    """GroupNorm (active-pixel statistics) and ReLU of ``rows [K, C]``, in place (inference).

    The rows come image after image (``nonzero`` of an image-major mask), ``counts [N]`` per
    image, so each image is a contiguous slice: two-pass statistics (as accurate as
    ``F.group_norm``) and in-place centring, scaling and shift per image — fewer passes and
    temporaries than the index-based path used under autograd.
    """
    if norm is not None:
        c = rows.shape[1]
        g = norm.num_groups
        start = 0
        for count in counts.tolist():  # one host sync; nonzero() already had one
            if count:
                seg = rows[start : start + count]
                # Two-pass statistics from column reductions (torch.var_mean over rows is ~50×
                # slower on CPU): group means, centre in place, group mean of the squares.
                mean = seg.mean(0).view(g, c // g).mean(1).repeat_interleave(c // g)
                seg.sub_(mean)
                var = seg.square().sum(0).view(g, c // g).sum(1) / (count * (c // g))
                scale = (var + norm.eps).rsqrt().repeat_interleave(c // g)
                if norm.weight is not None:
                    scale = scale * norm.weight
                seg.mul_(scale)
                if norm.bias is not None:
                    seg.add_(norm.bias)
            start += count
    return rows.relu_() if relu else rows


def masked_group_norm(
    x: Tensor,
    mask: Tensor,
    num_groups: int,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
) -> Tensor:
    """GroupNorm whose statistics cover the active pixels only (dense layout).

    Per image and group, mean and biased variance over the ``C/G`` channels × active pixels;
    the affine is applied and inactive pixels are set to 0 (what the reference's scatter into a
    zero map produces). ``x [N, C, H, W]``, ``mask [N, 1, H, W]`` (active where > 0) →
    ``[N, C, H, W]``. Differentiable in ``x``, ``weight`` and ``bias``.
    """
    if x.shape[1] % num_groups:
        raise ValueError(f"channels ({x.shape[1]}) not divisible by num_groups ({num_groups})")
    # Statistics in float32 for half-precision input; the result keeps the input's dtype except
    # under autocast, where it stays float32 (the next conv casts it).
    keep = x.dtype if not torch.is_autocast_enabled(x.device.type) else None
    with _no_autocast(x):
        out = _masked_group_norm(_full(x), mask, num_groups, weight, bias, eps)
    return out.to(keep) if keep is not None else out


def _masked_group_norm(
    x: Tensor,
    mask: Tensor,
    num_groups: int,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
) -> Tensor:
    n, c, h, w = x.shape
    cg = c // num_groups
    m = _as_mask(mask, x, (h, w)).to(x.dtype).reshape(n, h * w, 1)
    flat = x.reshape(n, c, h * w)
    count = (m.sum(dim=(1, 2)) * cg).clamp(min=1)[:, None]  # [N, 1]
    # Masked sums as batched mat-vecs: one read of the map, no [N, C, H, W] temporaries.
    mean = torch.bmm(flat, m).view(n, num_groups, cg).sum(-1) / count  # [N, G]
    mean_c = mean.repeat_interleave(cg, dim=1)[..., None]  # [N, C, 1]
    # Two-pass variance (as F.group_norm's accuracy); the squares are the only temporary.
    squares = (flat - mean_c).square_()
    var = torch.bmm(squares, m).view(n, num_groups, cg).sum(-1) / count
    del squares
    scale = (var + eps).rsqrt().repeat_interleave(cg, dim=1)[..., None]  # [N, C, 1]
    if weight is not None:
        scale = scale * weight[:, None]
    shift = -mean_c * scale
    if bias is not None:
        shift = shift + bias[:, None]
    # Per-channel affine, then zero the inactive pixels: two passes over the map.
    out = torch.addcmul(shift, flat, scale).mul_(m.view(n, 1, h * w))
    return out.view(n, c, h, w)


_WORKSPACE = threading.local()  # per thread: concurrent inference calls never share a buffer


def _scratch(like: Tensor, shape: tuple[int, ...], dtype: torch.dtype, slot: int = 0) -> Tensor:
    """An uninitialised ``shape`` buffer of ``dtype`` (padded input, gathered rows, GEMM output).

    Without autograd (inference) one buffer per thread, device, dtype, inference-mode state and
    ``slot`` (buffers alive at the same time) is kept and reused, growing as needed: a fresh
    multi-megabyte allocation per call goes back to the OS when freed and is page-faulted in
    again on the next call, which measured about a quarter of the sparse path's time at 10 %
    density (256 channels on 100×168). :func:`clear_workspace` frees them. With autograd a new
    buffer is allocated, as it becomes part of the graph."""
    numel = math.prod(shape)
    inference = torch.is_inference_mode_enabled()
    if torch.is_grad_enabled() and not inference:
        return like.new_empty(shape, dtype=dtype)
    buffers = _WORKSPACE.__dict__.setdefault("buffers", {})
    key = (like.device, dtype, inference, slot)
    buf = buffers.get(key)
    if buf is None or buf.numel() < numel:
        buf = buffers[key] = like.new_empty(numel, dtype=dtype)
    return buf[:numel].view(shape)


def clear_workspace() -> None:
    """Free this thread's scratch buffers kept by the sparse path for reuse across calls."""
    _WORKSPACE.__dict__.pop("buffers", None)


def _cached_layout(weight: Tensor, name: str, reorder) -> Tensor:
    """``reorder(weight)`` (a contiguous GEMM operand), cached on the weight tensor under
    ``name`` and rebuilt when the weight changes in place (its version counter moves: optimizer
    steps, ``load_state_dict``, ``nn.init``), so inference reorders each layer's weight once
    instead of on every call. Writes through ``weight.data`` bypass the version counter and are
    not seen. Under autograd (a weight that requires grad) it is recomputed, in the graph."""
    if weight.requires_grad and torch.is_grad_enabled():
        return reorder(weight).contiguous()
    key = (weight._version, weight.dtype, weight.device)
    cached = getattr(weight, name, None)  # kept on the tensor: freed with it
    if cached is None or cached[0] != key:
        with torch.no_grad():
            cached = (key, reorder(weight).contiguous())
        setattr(weight, name, cached)
    return cached[1]


def _tap_weights(weight: Tensor) -> Tensor:
    """``weight [C_out, C_in, kh, kw]`` as contiguous ``[kh·kw, C_in, C_out]``: one GEMM operand
    per tap (a strided view would be copied by every GEMM); cached (:func:`_cached_layout`)."""
    kh, kw = weight.shape[-2:]
    return _cached_layout(
        weight, "_dynadet_tap_weights",
        lambda w: w.permute(2, 3, 1, 0).reshape(kh * kw, w.shape[1], w.shape[0]),
    )


# Windows per im2col chunk on CPU: [512, 9·256] float32 rows are 4.7 MB (measured on 2 threads:
# 512 rows 41 ms, 2048 rows 46 ms for 7123 windows of a 256→256 3×3 conv).
_IM2COL_ROWS = 512
_ROW_BUCKET = 64
# oneDNN's matmul (``torch.ops.mkldnn._linear_pointwise``, ``x @ wᵀ + b``), where the build has
# it (None elsewhere; the MAC counter counts it too)
try:
    _ONEDNN_LINEAR = torch.ops.mkldnn._linear_pointwise
except (AttributeError, RuntimeError):
    _ONEDNN_LINEAR = None


def _matmul_weights(weight: Tensor) -> Tensor:
    """``weight [C_out, C_in, kh, kw]`` as contiguous ``[C_out, kh·kw·C_in]`` (tap-major, the
    im2col column order); cached (:func:`_cached_layout`)."""
    return _cached_layout(
        weight, "_dynadet_matmul_weights",
        lambda w: w.permute(0, 2, 3, 1).reshape(w.shape[0], -1),
    )


def _round_up(rows: int) -> int:
    """``rows`` rounded up to a multiple of ``_ROW_BUCKET``."""
    return -(-rows // _ROW_BUCKET) * _ROW_BUCKET


def _padded_rows(x: Tensor, padding: tuple[int, int], dtype: torch.dtype, slot: int = 0) -> Tensor:
    """``x [N, C, H, W]`` zero-padded and channels-last, as rows ``[N·Hp·Wp, C]``."""
    n, c, h, w = x.shape
    hp, wp = h + 2 * padding[0], w + 2 * padding[1]
    rows = _scratch(x, (n * hp * wp, c), dtype, slot)
    _pad_into(x, padding, rows)
    return rows


def _pad_into(x: Tensor, padding: tuple[int, int], rows: Tensor) -> None:
    """Write ``x [N, C, H, W]`` zero-padded into ``rows [N·Hp·Wp, C]`` (channels-last order)."""
    n, c, h, w = x.shape
    ph, pw = padding
    padded = rows.view(n, h + 2 * ph, w + 2 * pw, c)
    # Only the border is zeroed: filling the whole buffer first would cost one more pass.
    padded[:, :ph].zero_()
    padded[:, ph + h :].zero_()
    padded[:, ph : ph + h, :pw].zero_()
    padded[:, ph : ph + h, pw + w :].zero_()
    padded[:, ph : ph + h, pw : pw + w] = x.permute(0, 2, 3, 1)


def _window_base(active: Tensor, out_hw: tuple[int, int], padded_hw: tuple[int, int]) -> Tensor:
    """Row of each output's window top-left in the padded buffer (stride 1: output (y, x)
    reads (y + i·d, x + j·d)), for flat output positions ``active`` of ``[N, Ho, Wo]``."""
    ho, wo = out_hw
    hp, wp = padded_hw
    img, rem = active // (ho * wo), active % (ho * wo)
    return img * (hp * wp) + (rem // wo) * wp + rem % wo


def _gather_gemm(
    source: Tensor,
    base: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    wp: int | Tensor,
    dilation: tuple[int, int],
    grad: bool,
) -> Tensor:
    """Conv outputs ``[K, C_out]`` of windows whose top-left rows of ``source [R, C]`` (padded
    channels-last rows, ``wp`` per padded image row: an int or ``[K]``) are ``base [K]``."""
    c = source.shape[1]
    c_out, c_in, kh, kw = weight.shape
    if c_in != c:
        raise ValueError(f"weight expects {c_in} input channels, input has {c}")
    if bias is not None:
        bias = bias.to(source.dtype)
    with _no_autocast(source):  # operands are already in the autocast dtype; one dtype
        if grad:
            # Training: one gather of all taps ([K, k²·C] im2col rows) and one GEMM, so
            # autograd keeps one index (its backward is a single index_add), not k² per chunk.
            index = _tap_rows(base, kh, kw, wp, dilation).reshape(-1)
            cols = source.index_select(0, index).view(-1, kh * kw * c)
            out = cols @ _tap_weights(weight).to(source.dtype).reshape(kh * kw * c, c_out)
            return out + bias if bias is not None else out
        # Inference: the result and the gathered rows live in reused scratch buffers (fresh
        # multi-megabyte tensors are page-faulted in on every call); the caller consumes the
        # result before the next call.
        out = _scratch(source, (base.shape[0], c_out), source.dtype, _SLOT_ROWS)
        if _ONEDNN_LINEAR is not None and source.device.type == "cpu" and (
            source.dtype == torch.float32 and torch.backends.mkldnn.is_available()
        ):
            return _im2col_matmul(source, base, weight, bias, wp, dilation, out)
        return _per_tap_gemm(source, base, weight, bias, wp, dilation, out)


def _tap_rows(
    base: Tensor,
    kh: int,
    kw: int,
    wp: int | Tensor,
    dilation: tuple[int, int],
    rows_only: bool = False,
) -> Tensor:
    """Source rows of every tap of the windows at ``base [K]``: ``[K, kh·kw]`` (tap-major), or
    with ``rows_only`` the first row of each kernel row, ``[K, kh]``. ``wp``: rows per padded
    image row, one for all windows or ``[K]`` (windows of several levels in one buffer)."""
    ky = torch.arange(kh, device=base.device) * dilation[0]
    kx = torch.arange(1 if rows_only else kw, device=base.device) * dilation[1]
    ky, kx = ky.repeat_interleave(kx.shape[0]), kx.repeat(kh)
    if isinstance(wp, Tensor):
        return base[:, None] + ky[None, :] * wp[:, None] + kx[None, :]
    return base[:, None] + (ky * wp + kx)[None, :]


def _im2col_matmul(
    source: Tensor,
    base: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    wp: int | Tensor,
    dilation: tuple[int, int],
    out: Tensor,
) -> Tensor:
    """Inference on CPU in float32: per chunk of ``_IM2COL_ROWS`` windows, im2col rows
    ``[rows, k²·C]`` and one oneDNN matmul (measured ~15 % faster than MKL's GEMM on these
    shapes, and faster than k² accumulating GEMMs), copied into ``out [K, C_out]``.

    The ``kw`` taps of one kernel row are ``kw`` consecutive source rows (stride ``d``), read as
    one ``[kw, C]`` block of an overlapping strided view: ``kh`` copies per window, not ``k²``.
    """
    c = source.shape[1]
    kh, kw = weight.shape[-2:]
    if base.shape[0] == 0:
        return out
    span = (kw - 1) * dilation[1] + 1
    windows = source.as_strided((source.shape[0] - span + 1, kw, c), (c, dilation[1] * c, 1))
    starts = _tap_rows(base, kh, kw, wp, dilation, rows_only=True).reshape(-1)
    w_mat = _matmul_weights(weight)
    chunk = min(_round_up(base.shape[0]), _IM2COL_ROWS)
    cols = _scratch(source, (chunk, kh * kw * c), source.dtype, _SLOT_GATHER)
    for start in range(0, base.shape[0], chunk):
        idx = starts[start * kh : (start + chunk) * kh]
        m = idx.shape[0] // kh
        torch.index_select(windows, 0, idx, out=cols[:m].view(-1, kw, c))
        # oneDNN builds (JIT-compiles) a kernel per new row count, ~1 ms each (measured): a
        # short last chunk is rounded up to a multiple of _ROW_BUCKET (its extra rows hold
        # stale data and are dropped), so mask-dependent counts reuse a few kernels
        rows = cols[: min(chunk, _round_up(m))]
        out[start : start + m] = _ONEDNN_LINEAR(rows, w_mat, bias, "none", [], "")[:m]
    return out


def _per_tap_gemm(
    source: Tensor,
    base: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    wp: int | Tensor,
    dilation: tuple[int, int],
    out: Tensor,
) -> Tensor:
    """Inference elsewhere (CUDA, half precision): per chunk of ``_CHUNK_ROWS`` windows and per
    tap, a gather of ``[rows, C]`` and an accumulating GEMM into ``out [K, C_out]`` — the
    scratch stays cache-sized and ``k²``× smaller than im2col rows."""
    c = source.shape[1]
    kh, kw = weight.shape[-2:]
    index = _tap_rows(base, kh, kw, wp, dilation).t()  # [k², K], each row contiguous
    w_taps = _tap_weights(weight).to(source.dtype)
    gathered = _scratch(source, (min(base.shape[0], _CHUNK_ROWS), c), source.dtype, _SLOT_GATHER)
    for start in range(0, base.shape[0], _CHUNK_ROWS):
        idx = index[:, start : start + _CHUNK_ROWS]
        acc, rows = out[start : start + idx.shape[1]], gathered[: idx.shape[1]]
        torch.mm(torch.index_select(source, 0, idx[0], out=rows), w_taps[0], out=acc)
        for t in range(1, kh * kw):
            acc.addmm_(torch.index_select(source, 0, idx[t], out=rows), w_taps[t])
        if bias is not None:
            acc.add_(bias)
    return out


def _sparse_conv_rows(
    x: Tensor,
    active: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    padding: tuple[int, int],
    dilation: tuple[int, int],
    out_hw: tuple[int, int],
) -> Tensor:
    """Conv outputs ``[K, C_out]`` at the flat positions ``active [K]`` of ``[N, Ho, Wo]``."""
    h, w = x.shape[-2:]
    padded_hw = (h + 2 * padding[0], w + 2 * padding[1])
    source = _padded_rows(x, padding, _compute_dtype(x))
    base = _window_base(active, out_hw, padded_hw)
    grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    return _gather_gemm(source, base, weight, bias, padded_hw[1], dilation, grad)


def _scatter(rows: Tensor, active: Tensor, n: int, out_hw: tuple[int, int]) -> Tensor:
    """Rows ``[K, C]`` at flat positions → ``[N, C, Ho, Wo]`` (channels-last strides), else 0."""
    ho, wo = out_hw
    out = rows.new_zeros(n * ho * wo, rows.shape[1]).index_copy_(0, active, rows)
    return out.view(n, ho, wo, rows.shape[1]).permute(0, 3, 1, 2)


def masked_conv_gn(
    x: Tensor,
    mask: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    norm: nn.GroupNorm | None = None,
    relu: bool = False,
    gn_mode: str = "masked",
    padding: int | tuple[int, int] = 1,
    dilation: int | tuple[int, int] = 1,
    dense_threshold: float = DEFAULT_DENSE_THRESHOLD,
) -> Tensor:
    """Conv (stride 1) → optional GroupNorm → optional ReLU, computed at active pixels only.

    Args:
        x: ``[N, C_in, H, W]``.
        mask: ``[N, 1, Ho, Wo]`` or ``[N, Ho, Wo]`` on the *output* grid; active where > 0
            (bool, 0/1 or gate values).
        weight: ``[C_out, C_in, kh, kw]``; bias: ``[C_out]`` or ``None``.
        norm: a ``GroupNorm`` (its groups, eps and affine are used) or ``None``.
        relu: apply ReLU after the norm.
        gn_mode: ``"masked"`` — GN statistics over the active pixels of each image (the
            reference's inference, which the released FGDH weights were evaluated with);
            ``"dense"`` — statistics over the whole map (training semantics; always dense).
        padding, dilation: as ``F.conv2d``.
        dense_threshold: use the dense conv when more than this fraction of the batch's output
            pixels is active (``0`` forces dense, ``> 1`` forces sparse).

    Returns:
        ``[N, C_out, Ho, Wo]`` with zeros at inactive pixels (sparse results have channels-last
        strides).
    """
    if gn_mode not in GN_MODES:
        raise ValueError(f"gn_mode must be one of {GN_MODES}, got {gn_mode!r}")
    if x.dim() != 4 or weight.dim() != 4:
        raise ValueError(
            f"expected 4-d input and weight, got {tuple(x.shape)}, {tuple(weight.shape)}"
        )
    padding, dilation = _pair(padding), _pair(dilation)
    out_hw = _out_size(x, weight, padding, dilation)
    m = _as_mask(mask, x, out_hw)
    n = x.shape[0]
    active = m.reshape(-1).nonzero().squeeze(1)
    total = m.numel()
    if gn_mode == "dense" or active.shape[0] > dense_threshold * total:
        # Every pixel active: masked statistics are the whole-map ones and nothing is zeroed.
        zeroed = active.shape[0] == total
        out = F.conv2d(x, weight, bias, padding=padding, dilation=dilation)
        if norm is not None and (gn_mode == "dense" or zeroed):
            out = F.group_norm(out, norm.num_groups, norm.weight, norm.bias, norm.eps)
        elif norm is not None:
            out = masked_group_norm(
                out, m[:, None], norm.num_groups, norm.weight, norm.bias, norm.eps
            )
            zeroed = True
        if relu:
            out = F.relu(out, inplace=zeroed)  # in place only on our own fresh tensor
        return out if zeroed else out * m[:, None].to(out.dtype)
    rows = _sparse_conv_rows(x, active, weight, bias, padding, dilation, out_hw)
    counts = m.flatten(1).sum(1)
    if norm is not None:
        rows = _full(rows)  # GroupNorm in float32 for half precision, as F.group_norm
    with _no_autocast(x):
        if not rows.requires_grad:
            rows = _norm_relu_rows_inplace(rows, counts, norm, relu)
        else:
            if norm is not None:
                image = active // (out_hw[0] * out_hw[1])
                rows = _group_norm_rows(
                    rows, image, counts, norm.num_groups, norm.weight, norm.bias, norm.eps
                )
            if relu:
                rows = F.relu(rows)
    if not torch.is_autocast_enabled(x.device.type):
        rows = rows.to(x.dtype)  # under autocast, normalised rows stay float32 (convs cast)
    return _scatter(rows, active, n, out_hw)


def masked_conv2d(
    x: Tensor,
    mask: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    padding: int | tuple[int, int] = 1,
    dilation: int | tuple[int, int] = 1,
    dense_threshold: float = DEFAULT_DENSE_THRESHOLD,
) -> Tensor:
    """``F.conv2d(x, weight, bias, padding, dilation) × mask``, computed at active pixels only.

    ``x [N, C_in, H, W]``, ``mask [N, 1, Ho, Wo]`` or ``[N, Ho, Wo]`` (active where > 0),
    ``weight [C_out, C_in, kh, kw]`` → ``[N, C_out, Ho, Wo]`` (stride 1), zeros where inactive.
    """
    return masked_conv_gn(
        x, mask, weight, bias, None, False, "masked", padding, dilation, dense_threshold
    )


def masked_gated_residual(
    y: Tensor,
    gate: Tensor,
    conv1: MaskedConvGN,
    conv2: MaskedConvGN,
    inplace: bool = False,
    dilated: Tensor | None = None,
) -> Tensor | None:
    """FGDH's depth path at inference, fused: ``ReLU(y + gate · B(y))`` with
    ``B = GN(conv2(ReLU(GN(conv1(·)))))``, conv1 on the 3×3-dilated gate mask and conv2 on the
    gate mask, GroupNorm statistics over each conv's active pixels (``gn_mode="masked"``).

    The same numbers as ``conv2(conv1(y, dilate_mask(gate)), gate)`` through
    :func:`masked_conv_gn`, without the two zero maps in between: conv1's rows are written
    straight into conv2's zero-padded input, and conv2's rows are added to ``y`` row by row
    (``ReLU(y)`` everywhere else) — three fewer passes over the map than the unfused form.

    ``y [N, C, H, W]`` channels-last contiguous, ``gate [N, 1, H, W]`` (0 = closed) →
    channels-last ``[N, C, H, W]`` (``y`` itself, overwritten, with ``inplace=True``).
    ``dilated``: conv1's mask when the caller has it (``> 0`` where :func:`dilate_mask` of the
    gate is, e.g. ``max_pool2d(gate, 3, 1, 1)``). ``None`` where the fused path does not apply
    (autograd or autocast on, ``y`` not channels-last, a non-3×3 conv, or conv1's mask above
    its dense threshold): the caller then runs the unfused form.
    """
    out = masked_gated_residual_levels([y], [gate], conv1, conv2, inplace, [dilated])
    return None if out is None else out[0]


def masked_gated_residual_levels(
    ys: Sequence[Tensor],
    gates: Sequence[Tensor],
    conv1: MaskedConvGN,
    conv2: MaskedConvGN,
    inplace: bool = False,
    dilated: Sequence[Tensor | None] | None = None,
) -> list[Tensor | None] | None:
    """:func:`masked_gated_residual` of several maps that share the convs (FGDH's pyramid
    levels), batched: the active windows of all levels go through one im2col stream and one
    GEMM per chunk, so small levels do not pay per-call overheads and short GEMMs.

    ``ys``: ``[N, C, H_l, W_l]`` channels-last; ``gates``, ``dilated``: ``[N, 1, H_l, W_l]``.
    Returns one output per level — ``None`` for a level whose conv1 mask is above the dense
    threshold (run it unfused) — or ``None`` when the fused path does not apply at all.
    GroupNorm statistics are per level and image, as level by level.
    """
    if not _fusable(ys, conv1, conv2):
        return None
    dilated = list(dilated) if dilated is not None else [None] * len(ys)
    results: list[Tensor | None] = [None] * len(ys)
    # Per level: (index, open1 [N, H, W], active1, open2, active2); layout of the shared
    # padded buffers: level blocks of N·(H+2)·(W+2) rows, one after another.
    levels, offset = [], 0
    for i, (y, gate) in enumerate(zip(ys, gates, strict=True)):
        mask1 = dilate_mask(gate) if dilated[i] is None else dilated[i] > 0
        open1 = mask1[:, 0]
        active1 = open1.reshape(-1).nonzero().squeeze(1)
        if active1.shape[0] > conv1.dense_threshold * open1.numel():
            continue
        open2 = gate[:, 0] > 0
        levels.append((i, offset, open1, active1, open2, open2.reshape(-1).nonzero().squeeze(1)))
        n, _, h, w = y.shape
        offset += n * (h + 2) * (w + 2)
    if not levels:
        return results
    c, like = ys[0].shape[1], ys[0]
    source1 = _scratch(like, (offset, c), like.dtype, _SLOT_PADDED)
    bases, wps, counts = {1: [], 2: []}, {1: [], 2: []}, {1: [], 2: []}
    for i, start, open1, active1, open2, active2 in levels:
        n, _, h, w = ys[i].shape
        _pad_into(ys[i], (1, 1), source1[start : start + n * (h + 2) * (w + 2)])
        for k, (mask, active) in {1: (open1, active1), 2: (open2, active2)}.items():
            bases[k].append(start + _window_base(active, (h, w), (h + 2, w + 2)))
            wps[k].append(torch.full_like(active, w + 2))
            counts[k].append(mask.flatten(1).sum(1))
    base1, wp1 = torch.cat(bases[1]), torch.cat(wps[1])
    rows1 = _gather_gemm(source1, base1, conv1.weight, None, wp1, (1, 1), grad=False)
    rows1 = _norm_relu_rows_inplace(rows1, torch.cat(counts[1]), conv1.norm, True)
    # conv2's input: conv1's rows at their (padded) positions — window top-left + (1, 1) —
    # zeros elsewhere
    source2 = _scratch(like, (offset, c), like.dtype, _SLOT_HIDDEN).zero_()
    source2.index_copy_(0, base1 + wp1 + 1, rows1)
    rows2 = _gather_gemm(source2, torch.cat(bases[2]), conv2.weight, None, torch.cat(wps[2]),
                         (1, 1), grad=False)  # fmt: skip
    rows2 = _norm_relu_rows_inplace(rows2, torch.cat(counts[2]), conv2.norm, False)
    start = 0
    for i, _, _, _, _, active2 in levels:
        y, k = ys[i], active2.shape[0]
        n, _, h, w = y.shape
        y_rows = torch.index_select(
            y.permute(0, 2, 3, 1).reshape(n * h * w, c), 0, active2,
            out=_scratch(y, (k, c), y.dtype, _SLOT_RESIDUAL),
        )
        out = y.relu_() if inplace else torch.relu(y)  # channels-last like y
        g = gates[i].reshape(-1).index_select(0, active2).to(rows2.dtype)[:, None]
        y_rows.addcmul_(rows2[start : start + k], g).relu_()
        out.permute(0, 2, 3, 1).view(n * h * w, c).index_copy_(0, active2, y_rows)
        results[i] = out
        start += k
    return results


def _fusable(ys: Sequence[Tensor], conv1: MaskedConvGN, conv2: MaskedConvGN) -> bool:
    """Whether :func:`masked_gated_residual_levels` applies (see :func:`masked_gated_residual`)."""
    if not ys:
        return False
    kind = ys[0].device.type
    if torch.is_autocast_enabled(kind) or (
        torch.is_grad_enabled() and (conv1.weight.requires_grad or conv2.weight.requires_grad)
    ):
        return False
    for y in ys:
        if (torch.is_grad_enabled() and y.requires_grad) or not y.is_contiguous(
            memory_format=torch.channels_last
        ) or y.dtype != ys[0].dtype or y.shape[1] != ys[0].shape[1]:
            return False
    for conv, relu in ((conv1, True), (conv2, False)):
        if (conv.kernel_size, conv.padding, conv.dilation, conv.stride) != (
            (3, 3), (1, 1), (1, 1), (1, 1)
        ) or conv.norm is None or conv.relu != relu or conv.bias is not None:
            return False
    return True


class MaskedConvGN(nn.Conv2d):
    """``nn.Conv2d`` (stride 1) with an optional GroupNorm ``norm`` and ReLU, and a masked path.

    ``forward(x [N, C_in, H, W], mask=None, gn_mode="masked") → [N, C_out, Ho, Wo]``: without a
    mask the ordinary dense conv → norm → ReLU (training); with a mask :func:`masked_conv_gn`
    (inference, zeros at inactive pixels). Keys: ``weight``, ``bias`` (if any), ``norm.weight``,
    ``norm.bias`` — the layout of cvpods' ``Conv2d(norm=...)`` wrapper.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        padding: int = 1,
        dilation: int = 1,
        bias: bool = False,
        num_groups: int | None = 32,
        relu: bool = False,
        eps: float = 1e-5,
        dense_threshold: float = DEFAULT_DENSE_THRESHOLD,
    ) -> None:
        super().__init__(
            in_channels, out_channels, kernel_size, padding=padding, dilation=dilation, bias=bias
        )
        self.norm = nn.GroupNorm(num_groups, out_channels, eps=eps) if num_groups else None
        self.relu = relu
        self.dense_threshold = dense_threshold

    def forward(self, x: Tensor, mask: Tensor | None = None, gn_mode: str = "masked") -> Tensor:
        if mask is None:
            out = self._conv_forward(x, self.weight, self.bias)
            if self.norm is not None:
                out = self.norm(out)
            return F.relu(out) if self.relu else out
        return masked_conv_gn(
            x,
            mask,
            self.weight,
            self.bias,
            self.norm,
            self.relu,
            gn_mode,
            self.padding,
            self.dilation,
            self.dense_threshold,
        )
