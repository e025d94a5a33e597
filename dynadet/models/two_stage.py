"""A two-stage detector (Faster R-CNN) as injected parts: backbone, neck, RPN and RoI head."""

from __future__ import annotations

from torch import Tensor, nn

from dynadet.models.detector import OneStageDetector
from dynadet.models.precision import full_precision, to_float
from dynadet.models.preprocess import ImageBatch, Preprocessor
from dynadet.models.roi_head import RoIHead
from dynadet.models.rpn import RPNHead


class TwoStageDetector(nn.Module):
    """Backbone → neck → RPN proposals → RoI head, with preprocessing and post-processing.

    Args:
        backbone: ``Tensor[N, 3, H, W]`` → list of feature maps (finest first).
        rpn: an :class:`~dynadet.models.rpn.RPNHead` over every neck level (P2–P6).
        roi_head: an :class:`~dynadet.models.roi_head.RoIHead` (pools from P2–P5).
        preprocess: a :class:`~dynadet.models.preprocess.Preprocessor`.
        neck: list of maps → list of maps (``None`` passes the backbone features through).

    Shapes: the contract of :class:`~dynadet.models.detector.OneStageDetector`.
    ``forward(images: list[Tensor[3, H_i, W_i]] (RGB, 0–255), targets=None)``: in training,
    ``targets[i] = {"boxes": Tensor[G_i, 4] xyxy, "labels": Tensor[G_i] int64 in 0..C-1}`` and
    the result is a dict of scalars (``loss_rpn_cls``, ``loss_rpn_box``, ``loss_cls``,
    ``loss_box``; plus ``iou_thresh`` and ``beta`` under Dynamic R-CNN training); in eval mode a
    list of ``{"boxes": Tensor[K, 4], "scores": Tensor[K], "labels": Tensor[K]}`` in the
    original image coordinates.
    """

    def __init__(
        self,
        backbone: nn.Module,
        rpn: RPNHead,
        roi_head: RoIHead,
        preprocess: Preprocessor,
        neck: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.neck = neck
        self.rpn = rpn
        self.roi_head = roi_head
        self.preprocess = preprocess

    @property
    def num_classes(self) -> int:
        return int(self.roi_head.num_classes)

    # Input checking, preprocessing and the backbone/neck pass are the one-stage detector's.
    forward = OneStageDetector.forward
    features = OneStageDetector.features

    def forward_batch(self, batch: ImageBatch) -> dict[str, Tensor] | list[dict[str, Tensor]]:
        """Run on an already preprocessed :class:`ImageBatch`."""
        feats = self.features(batch.tensor)
        objectness, deltas = to_float(self.rpn(feats))
        anchors = self.rpn.anchors(feats, batch.shape)
        with full_precision(batch.tensor.device.type):  # proposals and losses in fp32 under AMP
            proposals, _ = self.rpn.proposals(objectness, deltas, anchors, batch.image_sizes)
        if self.training:
            assert batch.targets is not None
            with full_precision(batch.tensor.device.type):
                losses = self.rpn.loss(
                    objectness, deltas, anchors, batch.targets, batch.image_sizes
                )
            losses.update(self.roi_head.loss(feats, proposals, batch.targets))
            return losses
        results = self.roi_head.predict(feats, proposals, batch.image_sizes)
        return self.preprocess.postprocess(results, batch)
