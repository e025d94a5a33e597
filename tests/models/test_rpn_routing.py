"""FGDH routing tower in the RPN of Faster R-CNN: keys, cost, budget loss, inference."""

import pytest
import torch

from dynadet.config import build
from dynadet.models.fpn import FPN
from dynadet.models.preprocess import Preprocessor
from dynadet.models.priors import AnchorGenerator
from dynadet.models.resnet import ResNet
from dynadet.models.roi_head import RoIHead
from dynadet.models.routing import RoutingTower
from dynadet.models.rpn_routing import RPNRoutingHead
from dynadet.models.two_stage import TwoStageDetector
from dynadet.ops.roi_align import MultiScaleRoIAlign
from dynadet.registry import REGISTRY
from tests.models.test_two_stage import _scenes

STRIDES = [4, 8, 16, 32, 64]


def _anchors() -> AnchorGenerator:
    return AnchorGenerator(STRIDES, ratios=[0.5, 1.0, 2.0], octave_base_scale=8)


def _rpn(**kw) -> RPNRoutingHead:
    few = {"nms_pre": 300, "max_per_img": 150}
    kw.setdefault("num_groups", 4)
    return RPNRoutingHead(_anchors(), in_channels=16, train_proposals=few, test_proposals=few,
                          **kw)


def _detector(rpn: RPNRoutingHead) -> TwoStageDetector:
    backbone = ResNet(depth=18, out_indices=(0, 1, 2, 3), frozen_stages=-1, norm="bn",
                      norm_eval=False, base_width=8)
    neck = FPN(backbone.out_channels, 16, extra_blocks="maxpool", init="xavier")
    extractor = MultiScaleRoIAlign(7, 0, True, (4, 8, 16, 32), level_mapping="mmdet")
    roi = RoIHead(5, extractor, in_channels=16, fc_channels=32, num_samples=64)
    return TwoStageDetector(backbone, rpn, roi, Preprocessor(min_size=128, max_size=192),
                            neck=neck)


def test_keys_and_full_cost_are_the_towers():
    rpn = _rpn(num_layers=2, dynamic=False)
    keys = set(rpn.state_dict())
    assert not any(k.startswith("conv.") for k in keys)
    assert {k for k in keys if k.startswith("tower.")} == {
        "tower." + k for k in RoutingTower(16, 2, dynamic=False, num_groups=4).state_dict()
    }
    sizes = [(32, 48), (16, 24), (8, 12), (4, 6), (2, 3)]
    assert rpn.full_cost(sizes) == RoutingTower(16, 2, dynamic=False, num_groups=4).full_cost(
        sizes
    )


@pytest.mark.parametrize("lam", [0.0, 0.1])
def test_detector_trains_with_budget_loss(lam):
    torch.manual_seed(0)
    model = _detector(_rpn(budget_loss_weight=lam)).train()
    images, targets = _scenes([1, 2])
    losses = model(images, targets)
    assert ("loss_rpn_budget" in losses) == (lam != 0)
    assert 0 < float(losses["rpn_complexity_ratio"]) <= 1
    total = sum(v for k, v in losses.items() if k.startswith("loss"))
    total.backward()
    gate = model.rpn.tower.layers[0].depth.gate.conv.weight
    assert gate.grad is not None and gate.grad.abs().max() > 0
    if lam:
        torch.testing.assert_close(
            losses["loss_rpn_budget"],
            lam * (model.rpn.last_cost.soft / model.rpn.last_cost.full).mean().float(),
        )


def test_inference_with_closed_gates_and_errors():
    torch.manual_seed(0)
    model = _detector(_rpn()).eval()
    with torch.no_grad():
        for layer in model.rpn.tower.layers:
            layer.depth.gate.conv.weight.normal_(0, 0.3)
            layer.depth.gate.conv.bias.fill_(0.0)
        images, _ = _scenes([3])
        out = model(images)
    assert set(out[0]) == {"boxes", "scores", "labels"}
    assert (model.rpn.last_cost.executed < model.rpn.last_cost.full).all()
    with pytest.raises(ValueError, match="feat_channels"):
        RPNRoutingHead(_anchors(), in_channels=16, feat_channels=32)


def test_builds_from_config():
    gen = {"type": "AnchorGenerator", "strides": STRIDES, "ratios": [1.0],
           "octave_base_scale": 8}
    rpn = build({"type": "RPNRoutingHead", "in_channels": 32, "num_layers": 2, "num_groups": 8,
                 "budget_loss_weight": 0.1, "anchor_generator": gen}, REGISTRY)
    assert isinstance(rpn, RPNRoutingHead) and len(rpn.tower.layers) == 2
