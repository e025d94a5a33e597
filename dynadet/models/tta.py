"""Multi-scale and horizontal-flip test-time augmentation for any detector."""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from dynadet.ops.nms import batched_nms

# Dynamic R-CNN's R101-DCNv2 3x test-dev entry (46.9 → 49.2 AP): short sides 800–1600, long
# side ≤ 2000, each with a horizontal flip.
DEFAULT_SCALES = (800, 1000, 1200, 1400, 1600)


class TestTimeAugmentation(nn.Module):
    """Runs a detector at several input sizes, with and without a horizontal flip, and merges.

    The detector must follow the inference contract of
    :class:`~dynadet.models.detector.OneStageDetector` (two-stage detectors do too): in eval mode
    ``detector(images: list[Tensor[3, H, W]])`` returns, per image, ``{"boxes": Tensor[K, 4]
    xyxy, "scores": Tensor[K], "labels": Tensor[K]}`` in original image coordinates, and
    ``detector.preprocess`` is a :class:`~dynadet.models.preprocess.Preprocessor` whose
    ``test_min_size`` / ``max_size`` set the inference size. Those two are overridden for each
    run and restored afterwards, also when a run raises.

    Each image is run ``len(scales) * (2 if flip else 1)`` times (one batch per run, so peak
    memory is that of the largest scale). Boxes of the flipped runs are mirrored back
    (``x1 = W - x2``, ``x2 = W - x1``), all detections are concatenated and merged with
    class-aware NMS, and the ``max_per_img`` best are kept, highest score first. (The detector
    has already applied its score threshold and per-run NMS.)

    When the wrapped detector is in training mode, calls go straight to it.

    Args:
        detector: the model to wrap.
        scales: short sides to run at (default: Dynamic R-CNN's 800…1600).
        max_size: long-side cap for every scale (None: no cap).
        flip: also run on horizontally flipped images.
        nms_thresh: IoU above which a lower-scored box of the same class is dropped.
        max_per_img: detections kept per image.

    Shapes:
        ``forward(images: list[Tensor[3, H_i, W_i]])`` → list of ``{"boxes": Tensor[K_i, 4],
        "scores": Tensor[K_i], "labels": Tensor[K_i]}`` with ``K_i <= max_per_img``.
    """

    __test__ = False  # not a pytest test class despite the name

    def __init__(
        self,
        detector: nn.Module,
        scales: Sequence[int] = DEFAULT_SCALES,
        max_size: int | None = 2000,
        flip: bool = True,
        nms_thresh: float = 0.5,
        max_per_img: int = 100,
    ) -> None:
        super().__init__()
        pre = getattr(detector, "preprocess", None)
        if pre is None or not all(hasattr(pre, a) for a in ("test_min_size", "max_size")):
            raise TypeError(
                f"{type(detector).__name__} has no .preprocess with test_min_size/max_size; "
                "test-time augmentation needs a detector built on dynadet's Preprocessor"
            )
        if len(scales) == 0:
            raise ValueError("scales must list at least one short side")
        if max_per_img < 1:
            raise ValueError(f"max_per_img must be >= 1, got {max_per_img}")
        self.detector = detector
        self.scales = [int(s) for s in scales]
        self.max_size = None if max_size is None else int(max_size)
        self.flip = bool(flip)
        self.nms_thresh = float(nms_thresh)
        self.max_per_img = int(max_per_img)
        self.train(detector.training)  # wrapping an eval-mode model gives an eval-mode wrapper

    @property
    def num_classes(self) -> int:
        return int(self.detector.num_classes)

    def extra_repr(self) -> str:
        return (
            f"scales={self.scales}, max_size={self.max_size}, flip={self.flip}, "
            f"nms_thresh={self.nms_thresh}, max_per_img={self.max_per_img}"
        )

    def forward(
        self,
        images: Sequence[Tensor] | Tensor,
        targets: Sequence[dict[str, Tensor]] | None = None,
    ) -> Any:
        if self.detector.training:
            return self.detector(images, targets)
        if isinstance(images, Tensor):
            images = [images] if images.dim() == 3 else list(images)
        images = list(images)
        widths = [int(im.shape[-1]) for im in images]
        runs = []  # one list of per-image results per run
        pre = self.detector.preprocess
        has_test_max = hasattr(pre, "test_max_size")
        saved = (pre.test_min_size, pre.max_size, getattr(pre, "test_max_size", None))
        try:
            for scale in self.scales:
                pre.test_min_size, pre.max_size = scale, self.max_size
                if has_test_max:
                    pre.test_max_size = None  # the TTA's own cap applies
                runs.append(self.detector(images))
                if self.flip:
                    mirrored = self.detector([im.flip(-1) for im in images])
                    runs.append([_unflip(r, w) for r, w in zip(mirrored, widths, strict=True)])
        finally:
            pre.test_min_size, pre.max_size = saved[:2]
            if has_test_max:
                pre.test_max_size = saved[2]
        return [self._merge([run[i] for run in runs]) for i in range(len(images))]

    def _merge(self, results: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        boxes = torch.cat([r["boxes"] for r in results])
        scores = torch.cat([r["scores"] for r in results])
        labels = torch.cat([r["labels"] for r in results])
        keep = batched_nms(boxes, scores, labels, self.nms_thresh)[: self.max_per_img]
        return {"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]}


def _unflip(result: dict[str, Tensor], width: int) -> dict[str, Tensor]:
    """Mirror ``result["boxes"]`` of a horizontally flipped image of ``width`` back."""
    boxes = result["boxes"]
    x1, y1, x2, y2 = boxes.unbind(-1)
    return {**result, "boxes": torch.stack((width - x2, y1, width - x1, y2), dim=-1)}


def apply_tta(model: nn.Module, cfg: Mapping[str, Any] | None) -> nn.Module:
    """Wrap ``model`` for inference if the resolved config asks for it, else return it as is.

    Reads ``cfg["test"]["tta"]``: absent, null, false or ``{}`` means off; a mapping holds the
    keyword arguments of :class:`TestTimeAugmentation`, e.g.
    ``test: {tta: {scales: [800, 1000, 1200, 1400, 1600], max_size: 2000, flip: true}}``;
    ``true`` means the defaults. Wrap after the weights are loaded: the wrapper's own
    ``state_dict`` keys carry a ``detector.`` prefix.
    """
    spec = ((cfg or {}).get("test") or {}).get("tta")
    if spec is None or spec is False or spec == {}:
        return model
    if spec is True:
        spec = {}
    if not isinstance(spec, Mapping):
        raise ValueError(f"test.tta must be a mapping, true or null, got {spec!r}")
    for key in spec:
        if key not in _TTA_KEYS:
            near = difflib.get_close_matches(str(key), _TTA_KEYS, n=1)
            hint = f"; did you mean {near[0]!r}?" if near else f"; known keys: {list(_TTA_KEYS)}"
            raise ValueError(f"test.tta: unknown key {key!r}{hint}")
    return TestTimeAugmentation(model, **spec)


_TTA_KEYS = ("scales", "max_size", "flip", "nms_thresh", "max_per_img")
