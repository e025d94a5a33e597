"""RoIAlign in pure PyTorch, exact w.r.t. the compiled torchvision / mmcv CPU kernel.

Kernel rule (``roi_align_kernel.cpp`` / ``roi_align_common.h``): box coordinates are multiplied
by ``spatial_scale`` and shifted by -0.5 when ``aligned``; without ``aligned`` the RoI width and
height are clamped to >= 1. Each of the ``oh x ow`` bins holds ``g_h x g_w`` samples
(``g = sampling_ratio`` if > 0, else ``ceil(roi_size / output_size)`` per axis and per RoI) at
``start + p * bin + (i + 0.5) * bin / g``. A sample with ``y < -1``, ``y > H``, ``x < -1`` or
``x > W`` is 0; otherwise ``y, x`` are clamped to ``[0, H - 1] x [0, W - 1]`` and interpolated
bilinearly. A bin is the sum of its samples divided by ``max(g_h * g_w, 1)``, so a RoI with no
samples (``aligned`` and a zero or negative size in adaptive mode) pools to 0.

Algorithm. Validity, clamping and the bilinear weights all factor into a y part and an x part,
so bin (p, q) of RoI k is ``sum_{r, c} Ay[k, p, r] * Ax[k, q, c] * F[n_k, :, r, c]`` with
``Ay[k, p, r] = sum_i valid(y_i) * hat_r(y_i) / g_h`` (the same for x). Merging the samples that
hit the same row / column leaves about ``bin + 2`` taps per bin and axis instead of ``2 * g``.
The sum is done in two ``F.embedding_bag`` calls (fused weighted gather-sums) on a channels-last
copy of the map: step A sums every map row a RoI uses over the x taps of each x-bin, step B sums
those row results over the y taps of each bin. On CPU the map is processed one channel block at a
time, small enough to stay in cache while all RoIs read it. The result equals the kernel's up to
floating-point summation order. The gradient w.r.t. the input runs the transposed sums (also
``embedding_bag``, on taps sorted by the map pixel they read).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["roi_align", "RoIAlign", "MultiScaleRoIAlign", "torchvision_available"]

# Bytes of one channels-last channel block of the map on CPU: small enough for the shared L3 cache,
# so the many overlapping RoIs re-read it from cache instead of memory (16 channels of a
# 2x200x336 map; measured best among 8-64 channels).
_CPU_BLOCK_BYTES = 8 << 20
# Padded step-A taps per group of RoIs; bounds the temporary index / weight tensors.
_GROUP_TAPS = 1 << 22
# Bytes of step A's output per group and channel block: kept in cache for step B (L3 size).
_GROUP_G_BYTES = 1 << 23
# Taps kept alive for one sweep over the channel blocks (int32 index + weight: 8 bytes each);
# beyond it the map is swept again for the next RoIs.
_SWEEP_TAPS = 1 << 24

_UNPROBED = object()
_torchvision_fn: object = _UNPROBED


def _torchvision_roi_align() -> Callable[..., Tensor] | None:
    """torchvision's compiled ``roi_align`` op if it imports and runs, else None (probed once).

    The registered op is called directly: ``torchvision.ops.roi_align`` silently falls back to a
    Python transcription when the compiled ops are missing, and that one does not zero samples
    outside the map.
    """
    global _torchvision_fn
    if _torchvision_fn is _UNPROBED:
        try:
            import torchvision  # noqa: F401  (registers torch.ops.torchvision)

            op = torch.ops.torchvision.roi_align
            rois = torch.tensor([[0.0, 0.0, 0.0, 1.0, 1.0]])
            probe = op(torch.ones(1, 1, 2, 2), rois, 1.0, 1, 1, 1, False)
            _torchvision_fn = op if tuple(probe.shape) == (1, 1, 1, 1) else None
        except Exception:  # missing wheel, ABI mismatch, op not registered -> pure torch
            _torchvision_fn = None
    return _torchvision_fn  # type: ignore[return-value]


def torchvision_available() -> bool:
    """Whether the compiled torchvision RoIAlign can be used in this process."""
    return _torchvision_roi_align() is not None


def _use_torchvision(input: Tensor, backend: str) -> bool:
    if backend == "torch":
        return False
    if backend == "torchvision":
        if _torchvision_roi_align() is None:
            raise RuntimeError("backend='torchvision' requested but torchvision roi_align fails")
        return True
    if backend == "auto":
        return input.is_cuda and _torchvision_roi_align() is not None
    raise ValueError(f"backend must be 'auto', 'torch' or 'torchvision', got {backend!r}")


def _pair(value: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    if len(value) != 2:
        raise ValueError(f"output_size must be an int or a pair, got {value!r}")
    return int(value[0]), int(value[1])


def _to_rois(boxes: Tensor | Sequence[Tensor], like: Tensor) -> Tensor:
    """``[K, 5]`` rois (batch index, x1, y1, x2, y2) from ``[K, 5]`` or per-image ``[Ki, 4]``."""
    if isinstance(boxes, Tensor):
        if boxes.dim() != 2 or boxes.shape[1] != 5:
            raise ValueError(f"boxes tensor must be [K, 5], got {tuple(boxes.shape)}")
        return boxes.to(device=like.device, dtype=like.dtype)
    parts = [like.new_zeros(0, 5)]
    for i, b in enumerate(boxes):
        if b.dim() != 2 or b.shape[1] != 4:
            raise ValueError(f"per-image boxes must be [Ki, 4], got {tuple(b.shape)}")
        b = b.to(device=like.device, dtype=like.dtype)
        parts.append(torch.cat([b.new_full((b.shape[0], 1), float(i)), b], dim=1))
    return torch.cat(parts, dim=0)


def _axis_taps(
    start: Tensor, bin_size: Tensor, grid: Tensor, size: int, bins: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Merged bilinear taps of one axis.

    Args:
        start, bin_size: ``[K]`` RoI start and bin size in map coordinates.
        grid: ``[K]`` int64 samples per bin (0: no samples).
        size: map size along this axis; bins: output size along it.

    Returns:
        ``index [K, bins, M]`` (int64 row or column), ``weight [K, bins, M]`` and
        ``count [K, bins]``: the first ``count`` taps of a bin are its nonzero weights (already
        divided by ``grid``); the rest are padding with weight 0 and an index inside the map.
    """
    dtype = start.dtype
    k = start.shape[0]
    p = torch.arange(bins, device=start.device, dtype=dtype)
    gridf = grid.clamp(min=1).to(dtype)[:, None]
    first_pos = start[:, None] + p * bin_size[:, None]  # [K, bins]

    # Only samples near the map can be valid: enumerate a conservative index range per bin, so
    # that a huge RoI costs memory in proportion to the map, not to its own sample count. The
    # slack covers the rounding of positions computed in ``dtype``.
    step = (bin_size[:, None] / gridf).double()
    origin = first_pos.double()
    a = (-1.0 - origin) / step - 0.5
    b = (size - origin) / step - 0.5
    slack = 2 + 4 * torch.finfo(dtype).eps * (origin.abs() + size + 2) / step.abs()
    lo = (torch.minimum(a, b) - slack).floor()
    hi = (torch.maximum(a, b) + slack).ceil()
    flat = ~torch.isfinite(lo) | ~torch.isfinite(hi)  # e.g. zero step: every sample at one spot
    last = (grid[:, None] - 1).double()
    lo = torch.where(flat, 0.0, lo.clamp(0, None)).clamp(max=last.clamp(min=0))
    hi = torch.where(flat, last, hi.clamp(None, last))
    lo_i = lo.long()
    count = (hi - lo + 1).clamp(min=0).long()
    span = max(int(count.max()), 1) if count.numel() else 1
    j = torch.arange(span, device=start.device)
    i = lo_i[:, :, None] + j
    bin3 = bin_size[:, None, None]
    # the kernel's operation order: start + p * bin + ((i + .5) * bin) / g
    pos = first_pos[:, :, None] + (i.to(dtype) + 0.5) * bin3 / gridf[:, :, None]
    valid = (pos >= -1) & (pos <= size) & (j < count[:, :, None])
    clamped = pos.clamp(0, size - 1)
    low = clamped.floor()
    frac = clamped - low
    low_i = low.long()
    high_i = (low_i + 1).clamp(max=size - 1)
    scale = valid.to(dtype) / gridf[:, :, None]
    rows = torch.cat([low_i, high_i], dim=2)
    weight = torch.cat([(1 - frac) * scale, frac * scale], dim=2)

    # Merge taps on the same row: offsets from the bin's first used row, summed by scatter_add.
    nonzero = weight != 0
    unused = torch.iinfo(torch.int64).max
    first = torch.where(nonzero, rows, unused).amin(dim=2, keepdim=True)
    first = torch.where(first == unused, 0, first)
    rel = torch.where(nonzero, rows - first, 0)
    width = int(rel.max()) + 1 if rel.numel() else 1
    window = weight.new_zeros(k, bins, width).scatter_add_(2, rel, weight)
    keep = window != 0
    taps = keep.sum(dim=2)
    most = max(int(taps.max()), 1) if taps.numel() else 1
    # nonzero taps first (stable sort keeps them in row order), then cut to the fullest bin
    order = torch.sort((~keep).to(torch.uint8), dim=2, stable=True).indices[:, :, :most]
    index = (first + order).clamp(max=size - 1)
    return index, window.gather(2, order), taps


def _plan(
    rois: Tensor,
    size_hw: tuple[int, int],
    out_hw: tuple[int, int],
    spatial_scale: float,
    sampling_ratio: int,
    aligned: bool,
) -> tuple[tuple[Tensor, Tensor, Tensor], tuple[Tensor, Tensor, Tensor]]:
    """Per-axis taps of all RoIs: ((y index, y weight, y count), (x index, x weight, x count))."""
    height, width = size_hw
    oh, ow = out_hw
    offset = 0.5 if aligned else 0.0
    coords = rois[:, 1:] * spatial_scale - offset
    finite = torch.isfinite(coords).all(dim=1)
    coords = torch.where(finite[:, None], coords, 0.0)
    x1, y1, x2, y2 = coords.unbind(dim=1)
    roi_w = x2 - x1
    roi_h = y2 - y1
    if not aligned:
        roi_w = roi_w.clamp(min=1.0)
        roi_h = roi_h.clamp(min=1.0)
    bin_h = roi_h / oh
    bin_w = roi_w / ow
    if sampling_ratio > 0:
        grid_h = torch.full_like(bin_h, sampling_ratio, dtype=torch.int64)
        grid_w = grid_h
    else:
        grid_h = torch.ceil(bin_h).long()
        grid_w = torch.ceil(bin_w).long()
    # A grid <= 0 on either axis means no samples at all (the kernel's loops do not run).
    empty = (grid_h <= 0) | (grid_w <= 0) | ~finite
    grid_h = torch.where(empty, 0, grid_h)
    grid_w = torch.where(empty, 0, grid_w)
    taps_y = _axis_taps(y1, bin_h, grid_h, height, oh)
    taps_x = _axis_taps(x1, bin_w, grid_w, width, ow)
    return taps_y, taps_x


def _groups(
    rows: Tensor, mx: Tensor, ow: int, budget: int, max_rows: int
) -> list[Tensor] | None:
    """Group RoIs for step A (None: all RoIs in one group, in input order).

    Step A of a group has ``sum(rows) * ow`` bags (``rows``: y taps of a RoI, an upper bound on its
    distinct rows), each padded to the group's largest x tap count ``mx``. Groups therefore hold
    RoIs of similar ``mx`` (at most 1/8 padding), at most ``budget`` padded taps and at most
    ``max_rows`` rows, which keeps step A's output in cache for step B.
    """
    k = rows.shape[0]
    ideal = int((rows * mx).sum()) * ow
    total = int(rows.sum())
    if total <= max_rows and total * ow * int(mx.max()) <= min(budget, ideal + ideal // 8):
        return None
    order = torch.argsort(mx, stable=True)
    rows, mx = rows[order], mx[order]
    widths = mx.tolist()  # one host copy of the sorted widths drives the loop
    groups = []
    start = 0
    while start < k:
        cap = widths[start] + max(1, widths[start] // 8)
        held = torch.cumsum(rows[start:], 0)
        fits = (held * (ow * cap) <= budget) & (held <= max_rows) & (mx[start:] <= cap)
        n = max(int(fits.sum()), 1)
        groups.append(order[start : start + n])
        start += n
    return groups


def _two_step_taps(
    row: Tensor, wy: Tensor, ny: Tensor, col: Tensor, wx: Tensor, nx: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """embedding_bag inputs for the two contractions of a group of RoIs.

    Step A sums, for every distinct map row ``r`` used by RoI ``k`` (adjacent bins share their
    border rows) and every x-bin ``q``, the x taps: ``G[(k, r), q] = sum_j wx[k, q, j] *
    F[r + col[k, q, j]]``. Step B sums the y taps of a bin:
    ``out[k, p, q] = sum_m wy[k, p, m] * G[(k, row[k, p, m]), q]``.

    Args:
        row: ``[K, oh, My]`` flat row offsets (``batch * H * W + y * W``), ``wy`` their weights,
            ``ny [K, oh]`` used taps per bin (first ones); ``col``, ``wx``, ``nx`` likewise for x.

    Returns:
        step-A indices / weights ``[R * ow, Lx]`` (R distinct rows) and step-B indices /
        weights ``[K * oh * ow, My]`` (indices of step-A bags); padding entries have weight 0.
    """
    k, oh, _ = row.shape
    ow = col.shape[1]
    my = max(int(ny.max()), 1)
    lx = max(int(nx.max()), 1)
    col, wx = col[:, :, :lx], wx[:, :, :lx]
    taps = torch.arange(my, device=ny.device)
    used = taps < ny[:, :, None]

    # distinct rows of each RoI: sort its taps and number the first occurrence of every row
    unused = torch.iinfo(row.dtype).max
    flat = torch.where(used, row[:, :, :my], unused).reshape(k, oh * my)
    ordered, position = flat.sort(dim=1)
    first = torch.ones_like(ordered, dtype=torch.bool)
    first[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    first &= ordered != unused
    rank = torch.empty_like(position).scatter_(1, position, torch.cumsum(first, 1) - 1)
    distinct = first.sum(dim=1)
    owner = torch.arange(k, device=row.device)[:, None].expand(k, oh * my)[first]
    index_a = ordered[first][:, None, None] + col.index_select(0, owner)
    weight_a = wx.index_select(0, owner)

    start = torch.cumsum(distinct, 0) - distinct
    # padded y taps point at some valid step-A bag; their weight is 0
    tap = start[:, None] + torch.where(used.reshape(k, -1), rank, 0)
    tap = tap.clamp(max=max(owner.shape[0] - 1, 0)).view(k, oh, 1, my)
    q = torch.arange(ow, device=row.device)
    index_b = (tap * ow + q[:, None]).to(index_a.dtype)
    weight_b = wy[:, :, None, :my].expand(k, oh, ow, my)
    return (
        index_a.view(-1, lx),
        weight_a.reshape(-1, lx),
        index_b.reshape(-1, my),
        weight_b.reshape(-1, my),
    )


class _Plan(NamedTuple):
    """embedding_bag inputs of one group of RoIs (see :func:`_two_step_taps`)."""

    rois: Tensor | None  # [Kg] output rows of the group (None: all RoIs, in order)
    index_a: Tensor
    weight_a: Tensor
    index_b: Tensor
    weight_b: Tensor


def _block_size(input: Tensor) -> int:
    n, c, height, width = input.shape
    if input.device.type != "cpu":
        return c
    per_channel = n * height * width * input.element_size()
    return min(c, max(16, _CPU_BLOCK_BYTES // per_channel // 16 * 16))


def _sweep(input: Tensor, plans: list[_Plan], out: Tensor) -> None:
    """Pool the RoIs of ``plans`` into their rows of ``out [K, C, bins]`` (no autograd)."""
    n, c, height, width = input.shape
    bins = out.shape[2]
    block = _block_size(input)
    for c0 in range(0, c, block):
        c1 = min(c0 + block, c)
        table = input[:, c0:c1].permute(0, 2, 3, 1).reshape(n * height * width, c1 - c0)
        for plan in plans:
            rows = slice(None) if plan.rois is None else plan.rois
            if plan.index_a.shape[0] == 0:  # no RoI of the plan has a sample inside the map
                out[rows, c0:c1] = 0
                continue
            g = F.embedding_bag(plan.index_a, table, mode="sum", per_sample_weights=plan.weight_a)
            pooled = F.embedding_bag(plan.index_b, g, mode="sum", per_sample_weights=plan.weight_b)
            out[rows, c0:c1] = pooled.view(-1, bins, c1 - c0).transpose(1, 2)


def _bag_ids(index: Tensor, first: int = 0) -> Tensor:
    """Bag id of every entry of a ``[B, L]`` embedding_bag input, flattened."""
    bags, length = index.shape
    ids = torch.arange(first, first + bags, device=index.device, dtype=index.dtype)
    return ids[:, None].expand(bags, length).reshape(-1)


def _transpose(
    dest: Tensor, source: Tensor, weight: Tensor, rows: int
) -> tuple[Tensor, Tensor, Tensor]:
    """embedding_bag inputs of the transposed gather-sum.

    The forward sums ``weight[e] * table[dest[e]]`` into bag ``source[e]``; its transpose sums
    ``weight[e] * grad[source[e]]`` into row ``dest[e]`` of ``rows``. Returns the sources sorted
    by destination, their weights and per-row offsets.
    """
    order = torch.argsort(dest)
    counts = torch.bincount(dest, minlength=rows)
    offsets = (torch.cumsum(counts, 0) - counts).to(source.dtype)
    return source[order], weight[order], offsets


def _sweep_backward(grad: Tensor, plans: list[_Plan], grad_input: Tensor) -> None:
    """Add the input gradient of :func:`_sweep` for ``grad [K, C, bins]`` to ``grad_input``."""
    n, c, height, width = grad_input.shape
    plans = [plan for plan in plans if plan.index_a.shape[0] > 0]
    if not plans:
        return
    # One transposed step B and one transposed step A for the whole sweep: the plans' output
    # rows and G rows are stacked in plan order.
    dest_b, source_b, weight_b, rois = [], [], [], []
    dest_a, source_a, weight_a = [], [], []
    g_rows = out_rows = 0
    for plan in plans:
        dest_b.append(plan.index_b.reshape(-1) + g_rows)
        source_b.append(_bag_ids(plan.index_b, out_rows))
        weight_b.append(plan.weight_b.reshape(-1))
        dest_a.append(plan.index_a.reshape(-1))
        source_a.append(_bag_ids(plan.index_a, g_rows))
        weight_a.append(plan.weight_a.reshape(-1))
        if plan.rois is not None:
            rois.append(plan.rois)
        g_rows += plan.index_a.shape[0]
        out_rows += plan.index_b.shape[0]
    step_b = _transpose(torch.cat(dest_b), torch.cat(source_b), torch.cat(weight_b), g_rows)
    step_a = _transpose(
        torch.cat(dest_a), torch.cat(source_a), torch.cat(weight_a), n * height * width
    )
    if rois:
        grad = grad.index_select(0, torch.cat(rois))
    block = _block_size(grad_input)
    for c0 in range(0, c, block):
        c1 = min(c0 + block, c)
        g_out = grad[:, c0:c1].transpose(1, 2).reshape(-1, c1 - c0)
        g = F.embedding_bag(step_b[0], g_out, step_b[2], mode="sum", per_sample_weights=step_b[1])
        table = F.embedding_bag(step_a[0], g, step_a[2], mode="sum", per_sample_weights=step_a[1])
        grad_input[:, c0:c1] += table.view(n, height, width, c1 - c0).permute(0, 3, 1, 2)


class _PoolFunction(torch.autograd.Function):
    """``[K, C, bins]`` pooled by ``sweeps`` (lists of plans); backward = the transposed sums.

    ``sweeps`` is an iterable that builds the plans lazily: without autograd each sweep's plans
    are dropped once pooled, so memory holds one sweep at a time.
    """

    @staticmethod
    def forward(ctx, input: Tensor, sweeps: Iterable[list[_Plan]], k: int, bins: int) -> Tensor:  # type: ignore[override]
        out = input.new_empty(k, input.shape[1], bins)
        kept = []
        for plans in sweeps:
            _sweep(input, plans, out)
            if ctx.needs_input_grad[0]:
                kept.append(plans)
        ctx.sweeps = kept
        ctx.input_shape = input.shape
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None, None]:  # type: ignore[override]
        grad_input = grad.new_zeros(ctx.input_shape)
        for plans in ctx.sweeps:
            _sweep_backward(grad, plans, grad_input)
        return grad_input, None, None, None


def _sweeps(
    groups: list[Tensor], taps: tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]
) -> Iterator[list[_Plan]]:
    """Plans of consecutive groups, one list per sweep of at most ``_SWEEP_TAPS`` taps."""
    row, wy, ny, col, wx, nx = taps
    plans, held = [], 0
    for s in groups:
        plan = _Plan(s, *_two_step_taps(row[s], wy[s], ny[s], col[s], wx[s], nx[s]))
        plans.append(plan)
        held += plan.index_a.numel() + plan.index_b.numel()
        if held >= _SWEEP_TAPS:
            yield plans
            plans, held = [], 0
    if plans:
        yield plans


def _roi_align_torch(
    input: Tensor,
    rois: Tensor,
    out_hw: tuple[int, int],
    spatial_scale: float,
    sampling_ratio: int,
    aligned: bool,
) -> Tensor:
    n, c, height, width = input.shape
    oh, ow = out_hw
    k = rois.shape[0]
    (iy, wy, ny), (ix, wx, nx) = _plan(
        rois, (height, width), out_hw, spatial_scale, sampling_ratio, aligned
    )
    index_dtype = torch.int32 if n * height * width < 2**31 else torch.int64
    base = rois[:, 0].long().clamp(0, n - 1) * (height * width)
    row = (iy * width + base[:, None, None]).to(index_dtype)
    col = ix.to(index_dtype)

    g_rows = max(1, _GROUP_G_BYTES // (ow * _block_size(input) * input.element_size()))
    groups = _groups(ny.sum(dim=1), nx.amax(dim=1), ow, _GROUP_TAPS, g_rows)
    if groups is None:
        sweeps: Iterable[list[_Plan]] = [[_Plan(None, *_two_step_taps(row, wy, ny, col, wx, nx))]]
    else:
        sweeps = _sweeps(groups, (row, wy, ny, col, wx, nx))
    return _PoolFunction.apply(input, sweeps, k, oh * ow).view(k, c, oh, ow)


def roi_align(
    input: Tensor,
    boxes: Tensor | Sequence[Tensor],
    output_size: int | Sequence[int],
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
    aligned: bool = False,
    backend: str = "auto",
) -> Tensor:
    """RoIAlign with ``torchvision.ops.roi_align`` semantics (exact w.r.t. its compiled kernel).

    Args:
        input: ``[N, C, H, W]`` floating-point feature map.
        boxes: ``[K, 5]`` rows (batch index, x1, y1, x2, y2) or a list of ``[Ki, 4]`` per image,
            in input-image coordinates.
        output_size: ``oh`` or ``(oh, ow)``.
        spatial_scale: map / image scale (``1 / stride``).
        sampling_ratio: samples per bin and axis; <= 0 means ``ceil(roi_size / output_size)``.
        aligned: shift coordinates by -0.5 pixel (Detectron2 ``ROIAlignV2`` / mmcv default).
        backend: ``"torch"``, ``"torchvision"`` (compiled op, must work) or ``"auto"``
            (torchvision for CUDA tensors when it works, pure torch otherwise).

    Returns:
        ``[K, C, oh, ow]`` pooled features, differentiable w.r.t. ``input`` (not w.r.t. boxes).
        RoIs with non-finite coordinates pool to 0; batch indices are clamped to ``[0, N - 1]``.
    """
    if input.dim() != 4:
        raise ValueError(f"input must be [N, C, H, W], got {tuple(input.shape)}")
    if not input.is_floating_point():
        raise TypeError(f"input must be floating point, got {input.dtype}")
    oh, ow = _pair(output_size)
    rois = _to_rois(boxes, input).detach()
    if _use_torchvision(input, backend):
        op = _torchvision_roi_align()
        return op(input, rois, spatial_scale, oh, ow, sampling_ratio, aligned)  # type: ignore[misc]
    n, c, height, width = input.shape
    if rois.shape[0] == 0 or c == 0 or n * height * width == 0:
        return input.new_zeros(rois.shape[0], c, oh, ow)
    if input.dtype not in (torch.float32, torch.float64):
        pooled = _roi_align_torch(
            input.float(), rois.float(), (oh, ow), spatial_scale, sampling_ratio, aligned
        )
        return pooled.to(input.dtype)
    return _roi_align_torch(input, rois, (oh, ow), spatial_scale, sampling_ratio, aligned)


class RoIAlign(nn.Module):
    """Module form of :func:`roi_align` (torchvision ``RoIAlign`` signature).

    ``forward(input [N, C, H, W], rois [K, 5] | list[[Ki, 4]]) -> [K, C, oh, ow]``.
    """

    def __init__(
        self,
        output_size: int | Sequence[int],
        spatial_scale: float,
        sampling_ratio: int,
        aligned: bool = False,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self.output_size = _pair(output_size)
        self.spatial_scale = float(spatial_scale)
        self.sampling_ratio = int(sampling_ratio)
        self.aligned = bool(aligned)
        self.backend = backend

    def forward(self, input: Tensor, rois: Tensor | Sequence[Tensor]) -> Tensor:
        return roi_align(
            input,
            rois,
            self.output_size,
            self.spatial_scale,
            self.sampling_ratio,
            self.aligned,
            self.backend,
        )

    def extra_repr(self) -> str:
        return (
            f"output_size={self.output_size}, spatial_scale={self.spatial_scale}, "
            f"sampling_ratio={self.sampling_ratio}, aligned={self.aligned}"
        )


class MultiScaleRoIAlign(nn.Module):
    """RoIAlign over a feature pyramid: each RoI is pooled from the one level its size selects.

    Level mappings (``w = x2 - x1``, ``h = y2 - y1``, no ``+1``; degenerate boxes go to level 0):

    * ``"canonical"`` (FPN paper, torchvision ``MultiScaleRoIAlign``, Detectron2): level
      ``floor(canonical_level + log2(sqrt(w * h) / canonical_scale) + 1e-6)`` clamped to
      ``[log2(strides[0]), log2(strides[-1])]``; the index is that level minus
      ``log2(strides[0])``.
    * ``"mmdet"`` (mmdet ``SingleRoIExtractor.map_roi_levels``): index
      ``floor(log2(sqrt(w * h) / finest_scale + 1e-6))`` clamped to ``[0, L - 1]``.

    Defaults follow mmdet / Detectron2 (``sampling_ratio=0``, ``aligned=True``); torchvision's
    module uses ``sampling_ratio=2, aligned=False``. ``forward(features, boxes)`` takes the maps
    ``[N, C, Hl, Wl]`` finest first (strides ``featmap_strides``) and ``[K, 5]`` rois or per-image
    ``[Ki, 4]`` boxes, and returns ``[K, C, oh, ow]`` in the input RoI order.
    """

    def __init__(
        self,
        output_size: int | Sequence[int] = 7,
        sampling_ratio: int = 0,
        aligned: bool = True,
        featmap_strides: Sequence[int] = (4, 8, 16, 32),
        level_mapping: str = "canonical",
        canonical_scale: int = 224,
        canonical_level: int = 4,
        finest_scale: int = 56,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if level_mapping not in ("canonical", "mmdet"):
            raise ValueError(f"level_mapping must be 'canonical' or 'mmdet', got {level_mapping!r}")
        strides = [int(s) for s in featmap_strides]
        if not strides:
            raise ValueError("featmap_strides must not be empty")
        self.k_min = strides[0].bit_length() - 1
        if level_mapping == "canonical" and strides != [
            2 ** (self.k_min + i) for i in range(len(strides))
        ]:
            raise ValueError(f"canonical mapping needs strides 2^k, 2^(k+1), ..., got {strides}")
        self.output_size = _pair(output_size)
        self.sampling_ratio = int(sampling_ratio)
        self.aligned = bool(aligned)
        self.featmap_strides = tuple(strides)
        self.level_mapping = level_mapping
        self.canonical_scale = canonical_scale
        self.canonical_level = canonical_level
        self.finest_scale = finest_scale
        self.backend = backend

    def map_levels(self, boxes: Tensor) -> Tensor:
        """Level index (into ``features``) of each ``[K, 4]`` box: int64 ``[K]``."""
        num_levels = len(self.featmap_strides)
        area = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).clamp(min=0)
        scale = torch.sqrt(area)
        if self.level_mapping == "mmdet":
            level = torch.floor(torch.log2(scale / self.finest_scale + 1e-6))
            return level.clamp(0, num_levels - 1).long()
        eps = torch.tensor(1e-6, dtype=scale.dtype, device=scale.device)
        level = torch.floor(self.canonical_level + torch.log2(scale / self.canonical_scale) + eps)
        level = level.clamp(self.k_min, self.k_min + num_levels - 1)
        return level.long() - self.k_min

    def forward(self, features: Sequence[Tensor], boxes: Tensor | Sequence[Tensor]) -> Tensor:
        if len(features) != len(self.featmap_strides):
            raise ValueError(
                f"expected {len(self.featmap_strides)} feature maps, got {len(features)}"
            )
        rois = _to_rois(boxes, features[0])
        n, c = features[0].shape[:2]
        out = features[0].new_zeros(rois.shape[0], c, *self.output_size)
        if rois.shape[0] == 0:
            return out
        levels = self.map_levels(rois[:, 1:])
        for i, (feature, stride) in enumerate(zip(features, self.featmap_strides, strict=True)):
            index = torch.nonzero(levels == i).squeeze(1)
            if index.numel() == 0:
                continue
            pooled = roi_align(
                feature,
                rois[index],
                self.output_size,
                1.0 / stride,
                self.sampling_ratio,
                self.aligned,
                self.backend,
            )
            out.index_put_((index,), pooled)
        return out

    def extra_repr(self) -> str:
        return (
            f"output_size={self.output_size}, sampling_ratio={self.sampling_ratio}, "
            f"aligned={self.aligned}, featmap_strides={self.featmap_strides}, "
            f"level_mapping={self.level_mapping!r}"
        )
