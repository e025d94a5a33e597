"""ONNX export of one-stage detectors: preprocessed batch → raw dense-head outputs.

What is exported is ``backbone → neck → head`` (:class:`DenseHeadExport`): the input is the
normalised, resized and zero-padded batch the detector's ``Preprocessor`` makes
(``Tensor[N, 3, H, W]`` float32, ``H`` and ``W`` multiples of ``size_divisor``), the outputs are
the head's raw maps per level — ``cls_{l}`` ``[N, A·C, H_l, W_l]`` logits, ``reg_{l}``
``[N, A·4, H_l, W_l]`` (after the per-level scale, before the head's activation/decoding) and,
for FCOS/ATSS-style heads, ``ctr_{l}`` ``[N, A, H_l, W_l]`` logits. Decoding, score threshold,
NMS and the mapping back to original pixels stay outside the graph (they are data-dependent and
head-specific); the ONNX file's metadata (``metadata_props``) lists what is needed for them:
strides, classes, output names, mean/std and the head type.

The height and width are fixed at export time (``size``); the batch dimension is dynamic.

DCN (DyHead) is exported through its pure-PyTorch form (``grid_sample`` + ``matmul``, opset
≥ 16): during export (:func:`exportable_ops`) every deformable convolution runs
:func:`_deform_conv2d_export`, which is the same computation as
:func:`dynadet.ops.deform_conv.deform_conv2d`'s torch backend written without in-place writes
into views (the legacy ONNX exporter drops those writes) and without the torchvision dispatch;
the FGDH gates' ``narrow_conv2d`` becomes the plain convolution it equals. Dynamic routing
heads (FGDH) in ``gn_mode="masked"`` skip work on closed gates with data-dependent shapes and
are refused; the Fix heads and ``gn_mode="dense"`` export.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dynadet.ops import deform_conv as dcn
from dynadet.ops.deform_conv import _check_shapes, _output_size, _pair, sampling_grid

__all__ = ["DenseHeadExport", "add_export_arguments", "export_onnx", "run_export"]

INPUT_NAME = "images"


class DenseHeadExport(nn.Module):
    """A one-stage detector's network without pre- and post-processing, for tracing.

    ``forward(images: Tensor[N, 3, H, W])`` (preprocessed, padded) → tuple of the head's
    per-level maps, ordered by key then level: for each key in ``keys`` (``cls``, ``reg``,
    ``ctr``, ... as the head returns them) and each level ``l``, ``Tensor[N, A·k, H_l, W_l]``.
    Per-image scalars a head may return (the routing heads' cost) are left out.
    """

    def __init__(self, detector: nn.Module, keys: Sequence[str]) -> None:
        super().__init__()
        self.detector = detector
        self.keys = list(keys)

    def forward(self, images: Tensor) -> tuple[Tensor, ...]:
        out = self.detector.head(self.detector.features(images))
        return tuple(t for k in self.keys for t in out[k])


def _map_keys(outputs: dict[str, Any], num_levels: int) -> list[str]:
    """Head output keys holding one 4-D map per level (drops per-image costs)."""
    return [
        k
        for k, v in outputs.items()
        if isinstance(v, list | tuple)
        and len(v) == num_levels
        and all(isinstance(t, Tensor) and t.dim() == 4 for t in v)
    ]


def _deform_conv2d_export(
    input: Tensor,
    offset: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
    mask: Tensor | None = None,
    *,
    backend: str = "torch",
) -> Tensor:
    """DCN as ``deform_conv2d``'s torch backend computes it, in out-of-place, traceable ops.

    Shapes as :func:`dynadet.ops.deform_conv.deform_conv2d`; ``backend`` is ignored. Batch
    dimensions are written as ``-1`` so the exported graph keeps the batch dynamic.
    """
    del backend
    stride, padding, dilation = _pair(stride), _pair(padding), _pair(dilation)
    # plain ints: the traced graph gets constants instead of shape arithmetic (H, W are fixed)
    _, cin, h, w = (int(s) for s in input.shape)
    cout, _, kh, kw = (int(s) for s in weight.shape)
    taps = kh * kw
    ho = _output_size(h, kh, stride[0], padding[0], dilation[0])
    wo = _output_size(w, kw, stride[1], padding[1], dilation[1])
    groups, offset_groups = (
        int(v) for v in _check_shapes(input, offset, weight, bias, mask, (ho, wo))
    )
    cin_g = cin // offset_groups
    grid = sampling_grid(offset, (h, w), (ho, wo), (kh, kw), stride, padding, dilation)
    sampled = F.grid_sample(
        input.reshape(-1, cin_g, h, w),
        grid.reshape(-1, taps * ho, wo, 2),
        mode="bilinear",
        padding_mode="zeros",
        align_corners=False,
    )  # [N·G, Cin/G, K·Ho, Wo]
    if mask is not None:
        sampled = sampled.reshape(-1, offset_groups, cin_g, taps, ho, wo) * mask.reshape(
            -1, offset_groups, 1, taps, ho, wo
        )
    depth = (cin // groups) * taps
    columns = sampled.reshape(-1, groups, depth, ho * wo)
    out = torch.matmul(weight.reshape(groups, cout // groups, depth), columns)
    out = out.reshape(-1, cout, ho, wo)
    return out if bias is None else out + bias[None, :, None, None]


def _conv2d_same(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``narrow_conv2d``'s definition, ``F.conv2d`` with "same" padding (one ONNX ``Conv``)."""
    return F.conv2d(x, weight, bias, padding=int(weight.shape[-1]) // 2)


@contextlib.contextmanager
def exportable_ops() -> Iterator[None]:
    """Within the block, dynadet's run-time-optimised ops run their exportable equivalents.

    ``deform_conv2d`` → :func:`_deform_conv2d_export` (pure PyTorch, no torchvision dispatch);
    ``narrow_conv2d`` (the FGDH gates' GEMM + shifted sums, whose shape arithmetic does not
    trace) → :func:`_conv2d_same`. Every ``dynadet`` module holding one of them is patched and
    restored afterwards, so do not run other dynadet code in parallel threads meanwhile.
    """
    from dynadet.ops import narrow_conv

    swaps = {
        id(dcn.deform_conv2d): _deform_conv2d_export,
        id(narrow_conv.narrow_conv2d): _conv2d_same,
    }
    patched = []
    modules = [m for n, m in list(sys.modules.items()) if n.startswith("dynadet") and m]
    for module in modules:
        for attr, value in list(vars(module).items()):
            if id(value) in swaps:
                patched.append((module, attr, value))
                setattr(module, attr, swaps[id(value)])
    try:
        yield
    finally:
        for module, attr, value in patched:
            setattr(module, attr, value)


def _check_exportable(model: nn.Module) -> None:
    from dynadet.models.routing import GatedResidualBlock

    for name, m in model.named_modules():
        if isinstance(m, GatedResidualBlock) and m.gate is not None and m.gn_mode == "masked":
            raise ValueError(
                f"{name}: a dynamic routing head with gn_mode='masked' skips closed-gate pixels "
                "with data-dependent shapes, which ONNX cannot express; export the Fix head "
                "(dynamic: false) or set model.head.gn_mode=dense (then the depth-path "
                "GroupNorm uses whole-map statistics, as in training)"
            )
    if not hasattr(model, "features") or not hasattr(model, "head"):
        raise ValueError(
            f"ONNX export supports one-stage detectors (backbone, neck, dense head); "
            f"{type(model).__name__} is not one"
        )


def default_size(model: nn.Module) -> tuple[int, int]:
    """A square input of the test short side, rounded up to the padding multiple."""
    pre = getattr(model, "preprocess", None)
    if pre is None:
        return 512, 512
    d = int(pre.size_divisor)
    s = int(math.ceil(int(pre.test_min_size) / d) * d)
    return s, s


def _metadata(model: nn.Module, names: list[str], size: tuple[int, int], classes: list[str]):
    head = model.head
    pre = getattr(model, "preprocess", None)
    meta: dict[str, Any] = {
        "dynadet.format": "raw_head_outputs",
        "dynadet.head": type(head).__name__,
        "dynadet.num_classes": int(head.num_classes),
        "dynadet.input": {"name": INPUT_NAME, "shape": ["N", 3, size[0], size[1]]},
        "dynadet.outputs": names,
        "dynadet.classes": classes,
    }
    gen = getattr(head, "anchor_generator", None)
    if gen is not None:
        meta["dynadet.strides"] = list(gen.strides)
        meta["dynadet.num_anchors"] = int(gen.num_anchors)
    if pre is not None:
        meta["dynadet.preprocess"] = {
            "mean": pre.mean.tolist(),
            "std": pre.std.tolist(),
            "bgr": bool(pre.bgr),
            "unit_range": bool(pre.unit_range),
            "test_min_size": int(pre.test_min_size),
            "max_size": pre.max_size,
            "size_divisor": int(pre.size_divisor),
        }
    return {k: json.dumps(v) for k, v in meta.items()}


def export_onnx(
    model_or_detector: Any,
    path: str | Path,
    size: tuple[int, int] | None = None,
    opset: int = 17,
) -> Path:
    """Write the detector's network (see the module docstring) as an ONNX file.

    Args:
        model_or_detector: a one-stage detector module or a :class:`dynadet.Detector`.
        path: the ``.onnx`` file to write.
        size: ``(H, W)`` of the padded input batch, multiples of the preprocessor's
            ``size_divisor``; default: the test short side, square.
        opset: ONNX opset (≥ 16 for DCN's GridSample).

    Returns the path. Uses the TorchScript-based exporter (``dynamo=False``), which needs only
    the ``onnx`` package; the model is copied to the CPU and left unchanged.
    """
    return _export(model_or_detector, Path(path), size, opset)[0]


def _export(
    model_or_detector: Any, out: Path, size: tuple[int, int] | None, opset: int
) -> tuple[Path, dict[str, str]]:
    """:func:`export_onnx`, also returning the metadata written into the file."""
    try:
        import onnx
    except ImportError as e:
        raise ImportError("ONNX export needs the onnx package: pip install 'dynadet[onnx]'") from e
    classes = list(getattr(model_or_detector, "class_names", []) or [])
    source = getattr(model_or_detector, "model", model_or_detector)
    _check_exportable(source)
    model = copy.deepcopy(source).cpu().eval()
    h, w = size if size is not None else default_size(model)
    d = int(getattr(getattr(model, "preprocess", None), "size_divisor", 1))
    if h % d or w % d or h <= 0 or w <= 0:
        raise ValueError(f"export size {h}x{w} must be positive multiples of size_divisor={d}")
    if opset < 16:
        raise ValueError(f"opset {opset} < 16 has no GridSample (needed by DCN); use 16 or later")
    dummy = torch.zeros(1, 3, h, w)
    out.parent.mkdir(parents=True, exist_ok=True)
    with exportable_ops(), torch.no_grad():
        feats = model.features(dummy)
        keys = _map_keys(model.head(feats), len(feats))
        wrapper = DenseHeadExport(model, keys).eval()
        names = [f"{k}_{level}" for k in keys for level in range(len(feats))]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer warnings on static shape checks
            torch.onnx.export(
                wrapper,
                (dummy,),
                str(out),
                dynamo=False,
                opset_version=opset,
                input_names=[INPUT_NAME],
                output_names=names,
                dynamic_axes={n: {0: "batch"} for n in [INPUT_NAME, *names]},
            )
    meta = _metadata(model, names, (h, w), classes)
    proto = onnx.load(str(out))
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, str(out))
    return out, meta


# ----------------------------------------------------------------------------- command line


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``dynadet export CONFIG [weights=W] --format onnx [--size H W]``."""
    parser.add_argument("config", help="checkpoint, preset or YAML (with weights=PATH)")
    parser.add_argument("--format", default="onnx", choices=["onnx"], help="export format")
    parser.add_argument(
        "--size", type=int, nargs=2, metavar=("H", "W"), default=None,
        help="padded input height and width (multiples of size_divisor; "
        "default: the test short side, square)",
    )  # fmt: skip
    parser.add_argument("--output", "--out", default=None, help="output file (default: *.onnx)")
    parser.add_argument("--opset", type=int, default=17)


def _default_output(model_ref: str) -> Path:
    p = Path(model_ref)
    if p.is_dir():
        return p / "model.onnx"
    if p.suffix == ".safetensors":
        return p.with_suffix(".onnx")
    return Path(p.stem + ".onnx")


def run_export(args: argparse.Namespace) -> int:
    """``dynadet export``: build the detector (checkpoint or config) and write the file.

    ``args``: ``config``, ``size``, ``output``, ``opset`` (from :func:`add_export_arguments`),
    ``set`` (dotted overrides) and ``keys`` (``weights=PATH``) as ``dynadet.cli`` fills them.
    """
    from dynadet.api import Detector
    from dynadet.engine.checkpoint import weights_path

    if find_spec("onnx") is None:
        print("error: ONNX export needs the onnx package: pip install 'dynadet[onnx]'",
              file=sys.stderr)  # fmt: skip
        return 2
    keys: dict[str, str] = getattr(args, "keys", {}) or {}
    overrides: list[str] = list(getattr(args, "set", []) or [])
    ref = keys.get("weights") or args.config
    if "weights" in keys or weights_path(ref).exists():
        det = Detector.from_checkpoint(ref, overrides)
    else:
        det = Detector.from_config(args.config, overrides)
        print(f"note: {args.config} has random weights; pass weights=PATH for a trained model")
    output = Path(args.output) if args.output else _default_output(ref)
    start = time.perf_counter()
    path, meta = _export(det, output, tuple(args.size) if args.size else None, args.opset)
    shape = "x".join(str(s) for s in json.loads(meta["dynadet.input"])["shape"])
    print(
        f"wrote {path} in {time.perf_counter() - start:.1f} s: input '{INPUT_NAME}' {shape} "
        f"(preprocessed, padded); outputs {', '.join(json.loads(meta['dynadet.outputs']))} "
        "(raw head maps; decoding and NMS stay outside)"
    )
    return 0
