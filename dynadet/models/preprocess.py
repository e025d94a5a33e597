"""Image preprocessing (normalise, resize, pad, batch) and mapping boxes back."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class ImageBatch:
    """A padded batch.

    Attributes:
        tensor: ``Tensor[N, 3, H_pad, W_pad]`` normalised images, zero padded bottom/right.
        image_sizes: ``(h, w)`` of each resized image inside the batch.
        original_sizes: ``(h, w)`` of each input image.
        targets: targets with boxes in resized coordinates (training), else ``None``.
    """

    tensor: Tensor
    image_sizes: list[tuple[int, int]]
    original_sizes: list[tuple[int, int]]
    targets: list[dict[str, Tensor]] | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.tensor.shape[-2]), int(self.tensor.shape[-1])


class Preprocessor(nn.Module):
    """Turns a list of images into a normalised, resized, padded batch.

    Images are ``Tensor[3, H, W]`` RGB in 0–255 (float or uint8). The steps, in torchvision's
    order: channel order (``bgr=True`` flips to BGR for caffe/MSRA backbones), optional division
    by 255 (``unit_range=True``, torchvision's convention, with mean/std in 0–1 units),
    ``(x - mean) / std``, bilinear resize so the short side is ``min_size`` and the long side at
    most ``max_size`` (``scale = min(min_size/short, max_size/long)``, output size
    ``floor(side·scale)``), zero padding to a multiple of ``size_divisor``.

    During training ``min_size`` may be a list (a random choice per image, multi-scale training);
    inference uses ``test_min_size`` (default: the last ``min_size``) and ``test_max_size``
    (default: ``max_size``).
    Augmentations that change content (flips, colour jitter) belong to the data pipeline
    (:mod:`dynadet.data.transforms`), so inference needs nothing but this module.

    Shapes:
        ``forward(images: list[Tensor[3, H_i, W_i]], targets=None)`` → :class:`ImageBatch`.
        ``postprocess(results, batch)`` rescales ``boxes [K, 4]`` to the original image sizes.
    """

    def __init__(
        self,
        mean: Sequence[float] = (123.675, 116.28, 103.53),
        std: Sequence[float] = (58.395, 57.12, 57.375),
        bgr: bool = False,
        unit_range: bool = False,
        min_size: int | Sequence[int] = 800,
        max_size: int | None = 1333,
        test_min_size: int | None = None,
        size_divisor: int = 32,
        test_max_size: int | None = None,
    ) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32), persistent=False)
        self.bgr = bgr
        self.unit_range = unit_range
        self.min_sizes = [min_size] if isinstance(min_size, int) else [int(s) for s in min_size]
        self.max_size = max_size
        self.test_min_size = test_min_size if test_min_size is not None else self.min_sizes[-1]
        # long-side cap at inference when it differs from training's (None: max_size)
        self.test_max_size = test_max_size
        self.size_divisor = size_divisor

    def normalize(self, image: Tensor) -> Tensor:
        if image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"expected an image Tensor[3, H, W], got shape {tuple(image.shape)}")
        x = image.to(self.mean.device, torch.float32)
        if self.bgr:
            x = x.flip(0)
        if self.unit_range:
            x = x / 255.0
        # mean/std are given in the network's channel order (BGR for caffe backbones)
        return (x - self.mean[:, None, None]) / self.std[:, None, None]

    def scale_for(self, h: int, w: int, min_size: int) -> float:
        scale = min_size / min(h, w)
        cap = self.max_size
        if not self.training and self.test_max_size is not None:
            cap = self.test_max_size
        if cap is not None:
            scale = min(scale, cap / max(h, w))
        return scale

    def resize(self, image: Tensor, min_size: int) -> Tensor:
        h, w = image.shape[-2:]
        scale = self.scale_for(h, w, min_size)
        return F.interpolate(
            image[None],
            scale_factor=scale,
            mode="bilinear",
            recompute_scale_factor=True,
            align_corners=False,
        )[0]

    def pad(self, images: Sequence[Tensor]) -> Tensor:
        d = self.size_divisor
        h = max(im.shape[-2] for im in images)
        w = max(im.shape[-1] for im in images)
        h, w = int(math.ceil(h / d) * d), int(math.ceil(w / d) * d)
        batch = images[0].new_zeros((len(images), 3, h, w))
        for i, im in enumerate(images):
            batch[i, :, : im.shape[-2], : im.shape[-1]].copy_(im)
        return batch

    def forward(
        self, images: Sequence[Tensor], targets: Sequence[dict[str, Tensor]] | None = None
    ) -> ImageBatch:
        if len(images) == 0:
            raise ValueError("got an empty list of images")
        resized, sizes, originals, new_targets = [], [], [], []
        for i, image in enumerate(images):
            h0, w0 = int(image.shape[-2]), int(image.shape[-1])
            x = self.normalize(image)
            if self.training and len(self.min_sizes) > 1:
                pick = torch.randint(len(self.min_sizes), (1,)).item()
                min_size = self.min_sizes[int(pick)]
            else:
                min_size = self.min_sizes[-1] if self.training else self.test_min_size
            x = self.resize(x, min_size)
            h, w = int(x.shape[-2]), int(x.shape[-1])
            if targets is not None:
                t = dict(targets[i])
                boxes = t["boxes"].to(x.device, torch.float32)
                ratio = boxes.new_tensor([w / w0, h / h0, w / w0, h / h0])
                t["boxes"] = boxes * ratio
                t["labels"] = t["labels"].to(x.device, torch.long)
                new_targets.append(t)
            resized.append(x)
            sizes.append((h, w))
            originals.append((h0, w0))
        return ImageBatch(self.pad(resized), sizes, originals, new_targets if targets else None)

    @staticmethod
    def postprocess(results: list[dict[str, Tensor]], batch: ImageBatch) -> list[dict[str, Tensor]]:
        """Map boxes from resized to original image coordinates (torchvision's arithmetic)."""
        out = []
        for r, (h, w), (h0, w0) in zip(
            results, batch.image_sizes, batch.original_sizes, strict=True
        ):
            boxes = r["boxes"]
            rh = torch.tensor(h0, dtype=torch.float32) / torch.tensor(h, dtype=torch.float32)
            rw = torch.tensor(w0, dtype=torch.float32) / torch.tensor(w, dtype=torch.float32)
            ratio = torch.stack([rw, rh, rw, rh]).to(boxes)
            out.append({**r, "boxes": boxes * ratio})
        return out
