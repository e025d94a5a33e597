"""Dynamic R-CNN's training statistics: the R-CNN IoU threshold (DLA) and SmoothL1 β (DSL).

Zhang et al., "Dynamic R-CNN" (ECCV 2020). Every ``interval`` training iterations the fg/bg IoU
threshold becomes the mean of a per-iteration "K_I-th largest proposal IoU" statistic, and the
SmoothL1 β the median of a per-iteration "K_β-th smallest regression target" statistic.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

_MODES = ("mmdet", "official")
_BETA_EPS = 1e-15  # mmdet PR #4303: a median below this keeps the previous β (β = 0 crashes)
_STATE = ("iou_thresh", "beta", "num_updates", "iou_history", "iou_count", "beta_history",
          "beta_count")  # fmt: skip


@dataclass
class _Inputs:
    """One iteration's inputs, padded; the ints are known on the host (shapes), so no sync."""

    ious: Tensor  # [R, N] max IoU per proposal, -inf padded (R images, possibly from all ranks)
    lengths: Tensor  # [R] number of real proposals per row
    errors: Tensor  # [Q] mean(|tx|, |ty|) per positive, +inf padded
    num_imgs: int  # real images (padding rows excluded)
    num_pos: int  # real entries of `errors`
    num_props: int  # real entries of `ious`
    nonempty_imgs: int  # images with at least one proposal


class DynamicTrainingStats(nn.Module):
    """Running IoU threshold and SmoothL1 β of Dynamic R-CNN, with all state in buffers.

    Call :meth:`update` once per training forward; read :attr:`iou_thresh` (use it as the single
    fg/bg threshold of the R-CNN assigner: ``pos = neg = min_pos = iou_thresh``, no low-quality
    matching) and :attr:`beta` (the SmoothL1 β of the R-CNN box loss) before that.

    Per iteration (``B`` images):

    * IoU statistic, ``mode="mmdet"`` (``DynamicRoIHead``): per image the ``min(K_I, n_i)``-th
      largest max-IoU, averaged over the images (images without proposals are left out).
      ``mode="official"`` (hkzhang95/DynamicRCNN, per GPU): the ``min(K_I·B, Σn_i)``-th largest
      over all proposals of the batch concatenated.
    * β statistic (both modes): ``e = mean(|tx|, |ty|)`` of the positives' normalised targets,
      the ``min(K_β·B, P)``-th smallest; skipped when ``P == 0`` (mmdet #8851).

    Every ``interval`` calls: ``iou_thresh = max(initial_iou, mean(IoU history))`` (kept if the
    window recorded nothing); ``beta = min(initial_beta, median(β history))``, kept when the
    window recorded nothing or the median is below 1e-15 (mmdet #3950; the official code has no
    guard and would reach β = 0). Median: ``mode="mmdet"`` is ``np.median`` (the two middle values
    averaged); ``mode="official"`` is the upper-middle element ``sorted(h)[len(h) // 2]``.
    Both histories are then cleared. The new values apply from the next call, as in both
    references.

    Which weights used which: the official checkpoints (maskrcnn-benchmark) were trained with the
    ``"official"`` statistics, 2 images per GPU, the threshold at 0.4 for the first 100
    iterations and β computed from *all* pre-sampling proposals (negatives encoded against GT 0;
    pass those targets as ``pos_targets`` for exact parity; in practice the K_β smallest are GTs
    and the best positives either way). The MMDetection model-zoo weights (38.9 AP) used
    ``"mmdet"``, the sampled positives for β and the assigner's 0.5 for the first 100 iterations
    (``first_iou=0.5``). Per rank in both: no cross-GPU sync, nothing checkpointed.

    Distributed: with ``sync=False`` each process computes from its own images, as both
    references do. Note that ``DistributedDataParallel`` (``broadcast_buffers=True``, the default)
    copies rank 0's buffers to every rank before each forward, so under DDP all ranks then follow
    rank 0's statistics. With ``sync=True`` (and an initialised process group) every rank gathers
    all ranks' inputs for the iteration, so the statistics are exactly those of one process
    holding the global batch (K_I, K_β scale with the global image count): identical on every
    rank, and batch-wide as the author suggested in DynamicRCNN issue #2. This costs two small
    ``all_gather`` calls and one host read of the gathered sizes per iteration.

    One-stage heads: a max-IoU-assigner head (RetinaNet, RPN) can use ``iou_thresh`` as its
    positive threshold (e.g. ``max_iou_assign(ious, pos_thr=t, neg_thr=t - margin)``) and call
    ``update(max_ious=[ious.max(0).values per image], pos_targets=<normalised deltas of its
    positives>)``; only the meaning of "proposal" changes to "anchor", so ``iou_topk`` should
    then be chosen for the anchor count.

    Args:
        iou_topk: K_I, per image (75).
        beta_topk: K_β, per image (10).
        interval: C, number of :meth:`update` calls between changes (100). With gradient
            accumulation every forward counts.
        initial_iou: floor of the threshold (0.4).
        initial_beta: initial β and its cap (1.0).
        mode: ``"mmdet"`` or ``"official"`` (see above).
        sync: gather the statistics' inputs across ranks (see above).
        first_iou: threshold before the first change; None: ``initial_iou`` (official, 0.4);
            MMDetection used its assigner's 0.5.

    Buffers (all saved with the weights; resuming mid-window continues exactly):
        ``iou_thresh []``, ``beta []`` (float32), ``num_updates []`` (int64),
        ``iou_history [interval]``, ``beta_history [interval]`` (float32, the first
        ``iou_count`` / ``beta_count`` entries valid), ``iou_count []``, ``beta_count []``.

    Shapes:
        ``update(max_ious: list[Tensor[N_i]], pos_targets: Tensor[P, 4])`` → None.

    ``update`` writes the buffers in place (DDP broadcasts buffers in place, so they must stay the
    same tensors): take ``float(stats.beta)`` or ``stats.beta.clone()`` if β enters the autograd
    graph of the loss. It does nothing in eval mode.
    """

    iou_thresh: Tensor
    beta: Tensor
    num_updates: Tensor
    iou_history: Tensor
    iou_count: Tensor
    beta_history: Tensor
    beta_count: Tensor

    def __init__(
        self,
        iou_topk: int = 75,
        beta_topk: int = 10,
        interval: int = 100,
        initial_iou: float = 0.4,
        initial_beta: float = 1.0,
        mode: str = "mmdet",
        sync: bool = False,
        first_iou: float | None = None,
    ) -> None:
        super().__init__()
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
        if min(iou_topk, beta_topk, interval) < 1:
            raise ValueError(
                f"iou_topk, beta_topk and interval must be >= 1, got {iou_topk}, {beta_topk}, "
                f"{interval}"
            )
        if initial_beta <= 0:
            raise ValueError(f"initial_beta must be > 0, got {initial_beta}")
        self.iou_topk = int(iou_topk)
        self.beta_topk = int(beta_topk)
        self.interval = int(interval)
        self.initial_iou = float(initial_iou)
        self.initial_beta = float(initial_beta)
        self.mode = mode
        self.sync = bool(sync)
        first = self.initial_iou if first_iou is None else float(first_iou)
        self.register_buffer("iou_thresh", torch.tensor(first, dtype=torch.float32))
        self.register_buffer("beta", torch.tensor(self.initial_beta, dtype=torch.float32))
        self.register_buffer("num_updates", torch.tensor(0, dtype=torch.int64))
        self.register_buffer("iou_history", torch.zeros(self.interval, dtype=torch.float32))
        self.register_buffer("iou_count", torch.tensor(0, dtype=torch.int64))
        self.register_buffer("beta_history", torch.zeros(self.interval, dtype=torch.float32))
        self.register_buffer("beta_count", torch.tensor(0, dtype=torch.int64))

    def extra_repr(self) -> str:
        return (
            f"iou_topk={self.iou_topk}, beta_topk={self.beta_topk}, interval={self.interval}, "
            f"initial_iou={self.initial_iou}, initial_beta={self.initial_beta}, "
            f"mode={self.mode!r}, sync={self.sync}"
        )

    def as_dict(self) -> dict[str, float]:
        """Current values for logging (reads the device: call at log time, not every step)."""
        return {"iou_thresh": float(self.iou_thresh), "beta": float(self.beta)}

    @torch.no_grad()
    def update(self, max_ious: list[Tensor], pos_targets: Tensor) -> None:
        """Record one iteration's statistics; every ``interval`` calls, change the values.

        Args:
            max_ious: per image, ``Tensor[N_i]`` max IoU of every proposal with the GT boxes,
                GT-as-proposals included, before sampling.
            pos_targets: ``Tensor[P, 4]`` normalised regression targets (stds 0.1, 0.1, 0.2,
                0.2 applied) of the batch's sampled positives.
        """
        if not self.training:
            return
        if len(max_ious) == 0:
            raise ValueError("update() needs the max IoUs of at least one image")
        inputs = self._local_inputs(max_ious, pos_targets)
        if self.sync and dist.is_available() and dist.is_initialized():
            if dist.get_world_size() > 1:
                inputs = _gather_inputs(inputs)
        iou = self._iou_statistic(inputs)
        if iou is not None:
            _push(self.iou_history, self.iou_count, iou)
        if inputs.num_pos > 0:
            k = min(self.beta_topk * inputs.num_imgs, inputs.num_pos)
            _push(self.beta_history, self.beta_count, inputs.errors.kthvalue(k).values)
        self.num_updates += 1
        self._apply_if_due()

    def _local_inputs(self, max_ious: list[Tensor], pos_targets: Tensor) -> _Inputs:
        device = self.iou_history.device
        rows = [m.detach().reshape(-1).to(device, torch.float32) for m in max_ious]
        lengths = [int(r.numel()) for r in rows]
        ious = nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=float("-inf"))
        if pos_targets.dim() != 2 or pos_targets.shape[-1] != 4:
            raise ValueError(f"pos_targets must be [P, 4], got {tuple(pos_targets.shape)}")
        errors = pos_targets.detach()[:, :2].to(device, torch.float32).abs().mean(dim=1)
        return _Inputs(
            ious=ious,
            lengths=torch.tensor(lengths, dtype=torch.int64).to(device, non_blocking=True),
            errors=errors,
            num_imgs=len(rows),
            num_pos=int(errors.numel()),
            num_props=sum(lengths),
            nonempty_imgs=sum(n > 0 for n in lengths),
        )

    def _iou_statistic(self, x: _Inputs) -> Tensor | None:
        if x.num_props == 0:
            return None
        if self.mode == "official":
            # the (K_I·B)-th largest over the whole (per-GPU) batch; padding (-inf) sorts last
            k = min(self.iou_topk * x.num_imgs, x.num_props)
            return x.ious.reshape(-1).topk(k).values[-1]
        top = x.ious.topk(min(self.iou_topk, x.ious.shape[1]), dim=1).values  # [R, k]
        kth = (x.lengths.clamp(max=self.iou_topk) - 1).clamp(min=0)
        per_image = top.gather(1, kth[:, None])[:, 0]
        per_image = torch.where(x.lengths > 0, per_image, torch.zeros_like(per_image))
        return per_image.sum() / x.nonempty_imgs

    def _apply_if_due(self) -> None:
        due = self.num_updates % self.interval == 0
        slots = torch.arange(self.interval, device=self.iou_history.device)

        n_iou = self.iou_count
        valid = slots < n_iou
        mean = torch.where(valid, self.iou_history, 0.0).sum() / n_iou.clamp(min=1)
        new_thr = torch.where(n_iou > 0, mean.clamp(min=self.initial_iou), self.iou_thresh)
        self.iou_thresh.copy_(torch.where(due, new_thr, self.iou_thresh))

        n_beta = self.beta_count
        ordered = torch.where(slots < n_beta, self.beta_history, float("inf")).sort().values
        upper = ordered[(n_beta // 2).clamp(max=self.interval - 1)]
        if self.mode == "mmdet":  # np.median: mean of the two middle values (equal when odd)
            median = 0.5 * (ordered[((n_beta - 1) // 2).clamp(min=0)] + upper)
        else:  # official: sorted(S_E)[C // 2]
            median = upper
        keep = (n_beta == 0) | (median < _BETA_EPS)
        new_beta = torch.where(keep, self.beta, median.clamp(max=self.initial_beta))
        self.beta.copy_(torch.where(due, new_beta, self.beta))

        self.iou_count.masked_fill_(due, 0)
        self.beta_count.masked_fill_(due, 0)

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ) -> None:
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        # Weights converted from a reference checkpoint never held this state (neither reference
        # saves it): when all of it is absent, keep the initial state instead of failing.
        mine = [prefix + name for name in _STATE]
        if not any(key in state_dict for key in mine):
            missing_keys[:] = [key for key in missing_keys if key not in mine]


def _push(history: Tensor, count: Tensor, value: Tensor) -> None:
    """Write ``value`` at slot ``count`` and increment ``count``, without reading the device.

    ``count < len(history)`` always holds here: at most ``interval`` values are pushed per window
    and the window is cleared on its last call.
    """
    history.index_copy_(0, count.reshape(1), value.reshape(1).to(history.dtype))
    count += 1


def _gather_inputs(x: _Inputs) -> _Inputs:
    """All ranks' inputs padded and concatenated (same result on every rank)."""
    world = dist.get_world_size()
    device = x.ious.device
    width = x.ious.shape[1]
    header = torch.tensor(
        [x.num_imgs, width, x.num_pos, x.num_props, x.nonempty_imgs], dtype=torch.int64
    ).to(device)
    headers = [torch.empty_like(header) for _ in range(world)]
    dist.all_gather(headers, header)
    sizes = torch.stack(headers).tolist()  # the one host read: shapes for the padded exchange
    rows, max_width, max_pos = (max(s[i] for s in sizes) for i in range(3))

    ious = x.ious.new_full((rows, max_width), float("-inf"))
    ious[: x.num_imgs, :width] = x.ious
    lengths = x.ious.new_zeros(rows)
    lengths[: x.num_imgs] = x.lengths.to(lengths.dtype)  # exact in float32 below 2**24
    errors = x.errors.new_full((max_pos,), float("inf"))
    errors[: x.num_pos] = x.errors
    packed = torch.cat([lengths, ious.reshape(-1), errors])
    gathered = [torch.empty_like(packed) for _ in range(world)]
    dist.all_gather(gathered, packed)
    table = torch.stack(gathered)  # [world, rows + rows * max_width + max_pos]

    split = rows + rows * max_width
    return _Inputs(
        ious=table[:, rows:split].reshape(world * rows, max_width),
        lengths=table[:, :rows].reshape(-1).round().long(),
        errors=table[:, split:].reshape(-1),
        num_imgs=sum(s[0] for s in sizes),
        num_pos=sum(s[2] for s in sizes),
        num_props=sum(s[3] for s in sizes),
        nonempty_imgs=sum(s[4] for s in sizes),
    )
