"""ONNX export: onnxruntime reproduces the PyTorch head outputs (FCOS, ATSS + DyHead, Fix FGDH)."""

from __future__ import annotations

import argparse
import json
from importlib.util import find_spec
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from dynadet.api import Detector, build_model
from dynadet.config import load_config
from dynadet.models import routing
from dynadet.ops import narrow_conv
from dynadet.ops.deform_conv import deform_conv2d
from dynadet.tools.export import (
    _deform_conv2d_export,
    add_export_arguments,
    export_onnx,
    run_export,
)

needs_ort = pytest.mark.skipif(
    find_spec("onnxruntime") is None or find_spec("onnx") is None,
    reason="pip install 'dynadet[onnx]' (onnx, onnxruntime)",
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def small_atss_dyhead() -> dict:
    """ATSS + 2 DyHead blocks (official offset reuse) on a narrow ResNet-18: P3–P5, 32 channels."""
    cfg = load_config("dyhead_r50_atss_fpn_1x", ["model.head.num_classes=3"])
    cfg["model"]["backbone"].update(depth=18, base_width=16)
    fpn, dyhead = cfg["model"]["neck"]["modules"]
    fpn.update(in_channels=[32, 64, 128], out_channels=32, extra_blocks="none")
    dyhead.update(in_channels=32, channels=32, num_blocks=2)
    cfg["model"]["head"].update(in_channels=32, feat_channels=32)
    cfg["model"]["head"]["anchor_generator"]["strides"] = [8, 16, 32]
    cfg["model"]["preprocess"]["size_divisor"] = 32
    return cfg


def small_routing(dynamic: bool, gn_mode: str = "masked") -> dict:
    """The quickstart FCOS with FGDH routing towers (1 layer, 32 channels, GN 8 groups)."""
    cfg = load_config("quickstart_fcos", ["model.neck.out_channels=32"])
    head = cfg["model"]["head"]
    for key in ("feat_channels", "num_convs", "norm", "conv_bias"):
        del head[key]
    head.update(type="FCOSRoutingHead", in_channels=32, num_layers=1, dynamic=dynamic,
                num_groups=8, gn_mode=gn_mode)  # fmt: skip
    return cfg


def perturb(model: nn.Module, seed: int) -> nn.Module:
    """Random weights of unit gain everywhere (zero-init convs would hide export mistakes)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=g) * (1.0 / p[0].numel()) ** 0.5)
            elif "scale" in name or "output_weight" in name:
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
    return model.eval()


def batch_of(size: tuple[int, int]) -> torch.Tensor:
    """A normalised batch of two images; the second zero-padded below its top half."""
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(1)) * 1.5
    x[1, :, size[0] // 2 :] = 0.0
    return x


def compare(model: nn.Module, path: Path, images: torch.Tensor, atol: float = 1e-4) -> dict:
    """onnxruntime outputs == the head outputs of ``model``; returns the file's metadata."""
    import onnx
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    with torch.no_grad():
        expected = model.head(model.features(images))
    got = sess.run(None, {"images": images.numpy()})
    assert len(names) == len(got) == 3 * len(expected["cls"])  # cls, reg, ctr per level
    for name, value in zip(names, got, strict=True):
        key, level = name.rsplit("_", 1)
        ref = expected[key][int(level)]
        assert value.shape == tuple(ref.shape), name
        np.testing.assert_allclose(value, ref.numpy(), atol=atol, rtol=1e-4, err_msg=name)
    return {p.key: json.loads(p.value) for p in onnx.load(str(path)).metadata_props}


@pytest.mark.parametrize("stride", [1, 2])
def test_export_dcn_equals_deform_conv2d(stride: int) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, 9, 11, generator=g, dtype=torch.float64)
    ho, wo = (9 - 1) // stride + 1, (11 - 1) // stride + 1
    offset = torch.randn(2, 2 * 2 * 9, ho, wo, generator=g, dtype=torch.float64) * 3
    mask = torch.rand(2, 2 * 9, ho, wo, generator=g, dtype=torch.float64)
    weight = torch.randn(6, 4, 3, 3, generator=g, dtype=torch.float64)  # 2 conv groups
    bias = torch.randn(6, generator=g, dtype=torch.float64)
    for b, m in ((bias, mask), (None, None)):
        ref = deform_conv2d(x, offset, weight, b, stride, 1, 1, m, backend="torch")
        got = _deform_conv2d_export(x, offset, weight, b, stride, 1, 1, m)
        torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)


@needs_ort
def test_fcos_quickstart_matches_onnxruntime(tmp_path: Path) -> None:
    torch.manual_seed(0)
    det = Detector.from_config("quickstart_fcos")
    perturb(det.model, 0)
    path = export_onnx(det, tmp_path / "fcos.onnx", size=(96, 96))
    meta = compare(det.model, path, batch_of((96, 96)))
    assert meta["dynadet.head"] == "FCOSHead" and meta["dynadet.strides"] == [8, 16, 32]
    assert meta["dynadet.classes"] == ["square", "disc", "triangle", "ring", "cross"]
    assert meta["dynadet.input"]["shape"] == ["N", 3, 96, 96]
    assert meta["dynadet.outputs"][:3] == ["cls_0", "cls_1", "cls_2"]
    assert meta["dynadet.preprocess"]["size_divisor"] == 32
    assert det.model.training is False  # the caller's model is not modified


@needs_ort
def test_atss_dyhead_matches_onnxruntime(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = perturb(build_model(small_atss_dyhead()), 1)
    for m in model.modules():  # the export must ignore the (unusable here) compiled backend
        if hasattr(m, "backend"):
            m.backend = "torchvision"
    path = export_onnx(model, tmp_path / "atss.onnx", size=(96, 128))
    for m in model.modules():
        if hasattr(m, "backend"):
            m.backend = "torch"
    images = batch_of((96, 128))
    with torch.no_grad():
        om = model.neck[1].blocks[0].offset(model.neck[0](model.backbone(images))[0])
    assert 1.0 < om[:, :18].abs().mean() < 5.0  # DCN samples pixels off the grid
    meta = compare(model, path, images)
    assert meta["dynadet.head"] == "ATSSHead" and meta["dynadet.strides"] == [8, 16, 32]


@needs_ort
@pytest.mark.parametrize(("dynamic", "gn_mode"), [(False, "masked"), (True, "dense")])
def test_routing_head_matches_onnxruntime(tmp_path: Path, dynamic: bool, gn_mode: str) -> None:
    torch.manual_seed(0)
    model = perturb(build_model(small_routing(dynamic, gn_mode)), 2)
    if dynamic:  # close about half of the gates
        with torch.no_grad():
            for m in model.head.modules():
                if type(m).__name__ == "SpatialGate":
                    m.conv.bias.fill_(0.0)
    path = export_onnx(model, tmp_path / "fgdh.onnx", size=(96, 64))
    assert routing.narrow_conv2d is narrow_conv.narrow_conv2d  # export-time swap undone
    meta = compare(model, path, batch_of((96, 64)))
    assert meta["dynadet.head"] == "FCOSRoutingHead"
    assert all(not n.startswith("cost") for n in meta["dynadet.outputs"])


def test_masked_dynamic_routing_and_bad_sizes_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="gn_mode=dense"):
        export_onnx(build_model(small_routing(True)), tmp_path / "x.onnx", size=(64, 64))
    model = build_model(load_config("quickstart_fcos"))
    with pytest.raises(ValueError, match="multiples of size_divisor=32"):
        export_onnx(model, tmp_path / "x.onnx", size=(100, 96))
    with pytest.raises(ValueError, match="GridSample"):
        export_onnx(model, tmp_path / "x.onnx", size=(64, 64), opset=13)
    with pytest.raises(ValueError, match="one-stage detectors"):
        export_onnx(nn.Conv2d(3, 3, 1), tmp_path / "x.onnx", size=(64, 64))
    assert not (tmp_path / "x.onnx").exists()


@needs_ort
def test_run_export_from_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    det = Detector.from_config(
        "quickstart_fcos",
        ["model.neck.out_channels=32", "model.head.in_channels=32", "model.head.feat_channels=32"],
    )
    det.class_names = ["a", "b", "c", "d", "e"]
    ckpt = det.save(tmp_path / "ckpt")
    parser = argparse.ArgumentParser()
    add_export_arguments(parser)
    args = parser.parse_args(["quickstart_fcos", "--format", "onnx", "--size", "64", "96"])
    args.set, args.keys = [], {"weights": str(ckpt.parent)}
    assert run_export(args) == 0
    out = tmp_path / "ckpt" / "model.onnx"
    assert "wrote" in capsys.readouterr().out and out.exists()
    meta = compare(det.model, out, batch_of((64, 96)))
    assert meta["dynadet.classes"] == ["a", "b", "c", "d", "e"]
    assert meta["dynadet.input"]["shape"] == ["N", 3, 64, 96]
