"""A one-stage detector as three injected parts: backbone, neck and dense head."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from dynadet.models.precision import full_precision, to_float
from dynadet.models.preprocess import ImageBatch, Preprocessor


class OneStageDetector(nn.Module):
    """Backbone → neck → dense head, with preprocessing and post-processing.

    Args:
        backbone: ``Tensor[N, 3, H, W]`` → list of feature maps (finest first).
        neck: list of maps → list of maps (``None`` passes the backbone features through).
        head: a dense head with ``forward``, ``priors``, ``loss`` and ``predict``
            (:class:`~dynadet.models.fcos.FCOSHead`, ATSS, RetinaNet).
        preprocess: a :class:`~dynadet.models.preprocess.Preprocessor`.

    Shapes:
        ``forward(images: list[Tensor[3, H_i, W_i]] (RGB, 0–255), targets=None)``:
        in training, ``targets[i] = {"boxes": Tensor[G_i, 4] xyxy absolute, "labels":
        Tensor[G_i] int64 in 0..C-1}`` and the result is a dict of scalar losses; in eval mode,
        a list of ``{"boxes": Tensor[K, 4], "scores": Tensor[K], "labels": Tensor[K]}`` in the
        original image coordinates.
    """

    def __init__(
        self,
        backbone: nn.Module,
        head: nn.Module,
        preprocess: Preprocessor,
        neck: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.neck = neck
        self.head = head
        self.preprocess = preprocess

    @property
    def num_classes(self) -> int:
        return int(self.head.num_classes)

    def features(self, batch: Tensor) -> list[Tensor]:
        """Backbone and neck on a preprocessed batch ``Tensor[N, 3, H, W]``."""
        feats = self.backbone(batch)
        return list(self.neck(feats)) if self.neck is not None else list(feats)

    def forward(
        self,
        images: Sequence[Tensor] | Tensor,
        targets: Sequence[dict[str, Tensor]] | None = None,
    ) -> dict[str, Tensor] | list[dict[str, Tensor]]:
        if isinstance(images, Tensor):
            images = [images] if images.dim() == 3 else list(images)
        if self.training and targets is None:
            raise ValueError("training mode needs targets; call model.eval() for inference")
        if targets is not None and len(targets) != len(images):
            raise ValueError(f"got {len(images)} images but {len(targets)} targets")
        batch = self.preprocess(images, targets if self.training else None)
        return self.forward_batch(batch)

    def forward_batch(self, batch: ImageBatch) -> dict[str, Tensor] | list[dict[str, Tensor]]:
        """Run on an already preprocessed :class:`ImageBatch`."""
        feats = self.features(batch.tensor)
        outputs = to_float(self.head(feats))
        priors = self.head.priors(feats, batch.shape)
        with full_precision(batch.tensor.device.type):  # losses and boxes in fp32 under AMP
            if self.training:
                assert batch.targets is not None
                return self.head.loss(outputs, priors, batch.targets)
            results = self.head.predict(outputs, priors, batch.image_sizes)
            return self.preprocess.postprocess(results, batch)
