"""Mixed precision: ``train.amp`` resolution, bf16 autocast on CPU with fp32 losses and boxes."""

from __future__ import annotations

import pytest
import torch

from dynadet.api import build_model
from dynadet.config import load_config
from dynadet.engine import amp as amp_mod
from dynadet.engine.amp import AmpSettings, resolve_amp
from dynadet.engine.train import Trainer, train
from dynadet.models.precision import full_precision, prior_dtype, to_float

from .test_train import TINY, data_dir, tiny_cfg  # noqa: F401  (fixture)


def test_resolve_amp_settings(monkeypatch):
    assert resolve_amp(False, "cpu") == AmpSettings() and not AmpSettings().enabled
    assert resolve_amp(None, "cpu").name == "fp32"
    assert resolve_amp("bf16", "cpu") == AmpSettings(torch.bfloat16)
    assert resolve_amp(True, "cpu") == AmpSettings(torch.bfloat16)
    assert resolve_amp(True, "cuda") == AmpSettings(torch.float16, scaler=True)
    assert resolve_amp("auto", "cuda:1") == AmpSettings(torch.float16, scaler=True)
    assert resolve_amp("bf16", "cuda").dtype is torch.bfloat16
    with pytest.raises(ValueError, match="fp16 needs CUDA"):
        resolve_amp("fp16", "cpu")
    with pytest.raises(ValueError, match="expected one of"):
        resolve_amp("half", "cpu")
    monkeypatch.setattr(amp_mod, "cpu_bf16_is_faster", lambda: False)
    assert resolve_amp("auto", "cpu") == AmpSettings()
    monkeypatch.setattr(amp_mod, "cpu_bf16_is_faster", lambda: True)
    assert resolve_amp("AUTO", "cpu") == AmpSettings(torch.bfloat16)


def test_cpu_probe_returns_a_cached_bool():
    first = amp_mod.cpu_bf16_is_faster()
    assert isinstance(first, bool) and amp_mod.cpu_bf16_is_faster() is first


def test_precision_helpers():
    half = torch.ones(2, dtype=torch.bfloat16)
    tree = {"a": [half, torch.ones(1, dtype=torch.float64)], "b": (half,), "c": 3}
    out = to_float(tree)
    assert out["a"][0].dtype is torch.float32 and out["a"][1].dtype is torch.float64
    assert isinstance(out["b"], tuple) and out["b"][0].dtype is torch.float32 and out["c"] == 3
    assert prior_dtype(torch.bfloat16) is torch.float32
    assert prior_dtype(torch.float64) is torch.float64
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype is torch.bfloat16
        with full_precision("cpu"):
            assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype is torch.float32
    with full_precision("cpu"):  # no autocast active: a no-op
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype is torch.float32


@pytest.mark.parametrize("preset", ["quickstart", "quickstart_fcos"])
def test_bf16_autocast_keeps_losses_priors_and_boxes_fp32(preset):
    torch.manual_seed(0)
    model = build_model(load_config(preset)).train()
    g = torch.Generator().manual_seed(1)
    images = [torch.rand(3, 150, 190, generator=g) * 255 for _ in range(2)]
    targets = [
        {"boxes": torch.tensor([[10.0, 20.0, 70.0, 90.0], [100.0, 30.0, 130.0, 64.0]]),
         "labels": torch.tensor([0, 3])}
        for _ in images
    ]  # fmt: skip
    ref = model(images, targets)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        feats = model.features(model.preprocess(images).tensor)
        assert feats[0].dtype is torch.bfloat16  # the network really runs in bf16
        priors = model.head.priors(feats, (160, 192))
        assert all(p.dtype is torch.float32 for p in priors)
        out = model(images, targets)
    for key, value in ref.items():
        if key.startswith("loss"):
            assert out[key].dtype is torch.float32
            # bf16 features change the losses by well under a few per cent
            assert abs(out[key].item() - value.item()) <= 0.05 * abs(float(value)) + 1e-3, key
    sum(v for k, v in out.items() if k.startswith("loss")).backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(g.dtype is torch.float32 and g.isfinite().all() for g in grads)
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        res = model(images)
    assert res[0]["boxes"].dtype is torch.float32 and res[0]["scores"].dtype is torch.float32


def test_two_stage_losses_are_fp32_under_bf16():
    over = ["model.backbone.depth=18", "model.neck.in_channels=[64,128,256,512]",
            "model.preprocess.min_size=128", "model.preprocess.max_size=160",
            "model.backbone.frozen_stages=-1"]  # fmt: skip
    torch.manual_seed(0)
    model = build_model(load_config("faster_rcnn_r50_fpn_1x", over)).train()
    images = [torch.rand(3, 120, 150) * 255]
    targets = [{"boxes": torch.tensor([[10.0, 20.0, 70.0, 90.0]]), "labels": torch.tensor([2])}]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(images, targets)
    assert {"loss_rpn_cls", "loss_cls", "loss_box"} <= set(out)
    assert all(v.dtype is torch.float32 and v.isfinite() for k, v in out.items() if "loss" in k)
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        res = model(images)
    assert res[0]["boxes"].dtype is torch.float32


def test_training_with_bf16_amp_on_cpu(data_dir, tmp_path, caplog):  # noqa: F811
    cfg = tiny_cfg(data_dir, ["train.amp=bf16", "train.max_iters=3"])
    with caplog.at_level("INFO", logger="dynadet"):
        result = train(cfg, tmp_path / "run")
    assert result["iterations"] == 3
    assert "mixed precision: bf16" in caplog.text
    trainer = Trainer(tiny_cfg(data_dir, ["train.amp=fp16"]), tmp_path / "bad", device="cpu")
    with pytest.raises(ValueError, match="fp16 needs CUDA"):
        trainer.setup()
