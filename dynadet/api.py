"""The Python API: ``Detector.from_config``, ``Detector.from_checkpoint``, ``.predict``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import Tensor, nn

from dynadet.config import build, load_config
from dynadet.data.categories import resolve_class_names
from dynadet.engine.checkpoint import load_checkpoint, save_checkpoint
from dynadet.models.tta import apply_tta
from dynadet.registry import REGISTRY

ImageLike = str | Path | Tensor | np.ndarray | Image.Image


def build_model(cfg: Mapping[str, Any]) -> nn.Module:
    """Build the ``model`` section of a resolved config."""
    if "model" not in cfg:
        raise ValueError("config has no 'model' section")
    return build(cfg["model"], REGISTRY, path="model")


def load_image(image: ImageLike) -> Tensor:
    """Any supported image → ``Tensor[3, H, W]`` float32 RGB in 0–255."""
    if isinstance(image, str | Path):
        path = Path(image)
        if not path.exists():
            raise FileNotFoundError(f"{path}: image file not found")
        try:
            with Image.open(path) as im:
                image = im.convert("RGB")
                image.load()
        except OSError as e:
            raise ValueError(f"{path}: cannot be read as an image ({e})") from e
    if isinstance(image, Image.Image):
        image = np.array(image.convert("RGB"))
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected an H×W×3 array, got shape {image.shape}")
        return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float()
    if isinstance(image, Tensor):
        if image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"expected a Tensor[3, H, W], got shape {tuple(image.shape)}")
        return image.float()
    raise TypeError(f"unsupported image type {type(image).__name__}")


@dataclass
class Prediction:
    """Detections of one image: ``boxes [K, 4]`` xyxy (original pixels), ``scores [K]``,
    ``labels [K]`` (contiguous class indices) and the class names."""

    boxes: Tensor
    scores: Tensor
    labels: Tensor
    class_names: list[str]
    image: Tensor | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return int(self.scores.numel())

    def above(self, min_score: float) -> Prediction:
        """The detections scoring at least ``min_score``."""
        keep = self.scores >= min_score
        return Prediction(
            self.boxes[keep], self.scores[keep], self.labels[keep], self.class_names, self.image
        )

    @property
    def names(self) -> list[str]:
        """Class name of each detection."""
        return [
            self.class_names[i] if i < len(self.class_names) else str(i)
            for i in self.labels.tolist()
        ]

    def to_list(self) -> list[dict[str, Any]]:
        """JSON-ready detections."""
        return [
            {"box": [round(v, 2) for v in b], "score": round(s, 4), "label": n}
            for b, s, n in zip(self.boxes.tolist(), self.scores.tolist(), self.names, strict=True)
        ]

    def plot(self, path: str | Path | None = None, min_score: float = 0.0) -> Image.Image:
        """Draw the boxes on the image; optionally save it (PNG/JPEG by extension)."""
        if self.image is None:
            raise ValueError("this prediction holds no image to draw on")
        arr = self.image.clamp(0, 255).byte().permute(1, 2, 0).cpu().numpy()
        canvas = Image.fromarray(arr)
        draw = ImageDraw.Draw(canvas)
        for box, score, name in zip(
            self.boxes.tolist(), self.scores.tolist(), self.names, strict=True
        ):
            if score < min_score:
                continue
            color = _color(name)
            draw.rectangle(box, outline=color, width=2)
            draw.text((box[0] + 2, box[1] + 1), f"{name} {score:.2f}", fill=color)
        if path is not None:
            canvas.save(path)
        return canvas


def _color(name: str) -> tuple[int, int, int]:
    h = sum(ord(c) * 131 for c in name)
    return (80 + h % 176, 80 + (h // 7) % 176, 80 + (h // 49) % 176)


class Detector:
    """A built detector with its config and class names.

    >>> det = Detector.from_config("fcos_r50_fpn_1x", ["model.head.num_classes=3"])
    >>> result = det.predict("image.jpg")      # Prediction with .boxes/.scores/.labels
    >>> result.plot("out.png")
    """

    def __init__(
        self,
        model: nn.Module,
        config: dict[str, Any],
        class_names: Sequence[str],
        device: str | torch.device = "cpu",
    ) -> None:
        self.model = model.to(device).eval()
        self.config = config
        self.class_names = list(class_names)
        self.device = torch.device(device)
        # What inference runs: the model, or its wrapper when the config sets ``test.tta``.
        self.runner = apply_tta(self.model, config)

    @classmethod
    def from_config(
        cls,
        cfg_or_name: str | Path | Mapping[str, Any],
        overrides: Sequence[str] = (),
        device: str | torch.device = "cpu",
    ) -> Detector:
        """Build from a preset name, a YAML path or a config dict (randomly initialised)."""
        cfg = load_config(cfg_or_name, overrides)
        model = build_model(cfg)
        names = resolve_class_names(cfg.get("classes"), model.num_classes)
        return cls(model, cfg, names, device)

    @classmethod
    def from_checkpoint(
        cls, path: str | Path, overrides: Sequence[str] = (), device: str | torch.device = "cpu"
    ) -> Detector:
        """Load a dynadet checkpoint (file or directory); ``overrides`` adjust its config."""
        state, cfg, names, _ = load_checkpoint(path)
        cfg = load_config(cfg, overrides)
        model = build_model(cfg)
        model.load_state_dict(state, strict=True)
        return cls(model, cfg, names or resolve_class_names(None, model.num_classes), device)

    def train(
        self,
        train_data: tuple[str | Path, str | Path] | None = None,
        val_data: tuple[str | Path, str | Path] | None = None,
        run_dir: str | Path = "runs/detector",
        resume: bool = False,
        overrides: Sequence[str] = (),
    ) -> dict[str, Any]:
        """Train with the engine (``dynadet train``) and load the final weights.

        ``train_data``/``val_data`` are ``(ann_file, image_dir)`` pairs of COCO data sets
        (default: the config's ``data`` section); ``overrides`` are dotted ``key=value``.
        """
        from dynadet.engine.state import last_checkpoint
        from dynadet.engine.train import train as run_training

        cfg = load_config(self.config, overrides)
        for split, pair in (("train", train_data), ("val", val_data)):
            if pair is not None:
                cfg["data"][split] = {"ann_file": str(pair[0]), "image_dir": str(pair[1])}
        result = run_training(cfg, run_dir, resume=resume, device=str(self.device))
        state, _, _, _ = load_checkpoint(last_checkpoint(Path(run_dir)))
        self.model.load_state_dict(state)
        self.model.eval()
        self.config = cfg
        self.runner = apply_tta(self.model, cfg)
        return result

    def evaluate(
        self,
        ann_file: str | Path,
        image_dir: str | Path,
        batch_size: int = 2,
        output_dir: str | Path | None = None,
    ):
        """COCO-evaluate on a data set; returns an ``EvalResult`` (``.metrics``, ``.per_class``)."""
        from dynadet.data.coco import CocoDetection
        from dynadet.data.loader import build_eval_loader
        from dynadet.engine.evaluate import evaluate

        dataset = CocoDetection(ann_file, image_dir, filter_empty=False)
        loader = build_eval_loader(dataset, batch_size=batch_size)
        return evaluate(
            self.runner,
            loader,
            dataset.coco,
            dataset.category_ids,
            dataset.class_names,
            output_dir=output_dir,
            device=self.device,
        )

    def save(self, path: str | Path) -> Path:
        return save_checkpoint(path, self.model.state_dict(), self.config, self.class_names)

    @torch.inference_mode()
    def predict(
        self, images: ImageLike | Sequence[ImageLike], batch_size: int = 1
    ) -> Prediction | list[Prediction]:
        """Detect objects in one image (returns a Prediction) or a list (returns a list)."""
        single = not isinstance(images, list | tuple)
        items = [images] if single else list(images)
        tensors = [load_image(im) for im in items]
        self.model.eval()
        out: list[Prediction] = []
        for start in range(0, len(tensors), batch_size):
            chunk = [t.to(self.device) for t in tensors[start : start + batch_size]]
            for t, r in zip(chunk, self.runner(chunk), strict=True):
                out.append(
                    Prediction(
                        r["boxes"].cpu(),
                        r["scores"].cpu(),
                        r["labels"].cpu(),
                        self.class_names,
                        t.cpu(),
                    )
                )
        return out[0] if single else out
