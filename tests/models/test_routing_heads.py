"""FGDH routing towers on ATSS and RetinaNet heads (beyond the reference's FCOS)."""

from __future__ import annotations

import pytest
import torch

from dynadet.config import build
from dynadet.models.atss import ATSSHead
from dynadet.models.fcos_routing import FCOSRoutingHead
from dynadet.models.priors import AnchorGenerator
from dynadet.models.retinanet import RetinaNetHead
from dynadet.models.routing_heads import ATSSRoutingHead, RetinaNetRoutingHead
from dynadet.registry import REGISTRY

STRIDES = [8, 16, 32, 64, 128]
SIZES = [(8, 12), (4, 6), (2, 3), (1, 2), (1, 1)]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def atss_anchors() -> AnchorGenerator:
    return AnchorGenerator(strides=STRIDES, ratios=[1.0], octave_base_scale=8)


def retina_anchors() -> AnchorGenerator:
    return AnchorGenerator(strides=STRIDES, ratios=[0.5, 1.0, 2.0], octave_base_scale=4,
                           scales_per_octave=3)


def make(kind: str, **kw):
    kw.setdefault("in_channels", 16)
    kw.setdefault("num_layers", 2)
    kw.setdefault("num_groups", 4)
    if kind == "atss":
        return ATSSRoutingHead(3, atss_anchors(), **kw)
    return RetinaNetRoutingHead(3, retina_anchors(), **kw)


def features(n: int = 2, c: int = 16, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, c, h, w, generator=g) for h, w in SIZES]


def targets() -> list[dict[str, torch.Tensor]]:
    return [
        {"boxes": torch.tensor([[4.0, 6.0, 40.0, 50.0], [30.0, 10.0, 90.0, 60.0]]),
         "labels": torch.tensor([0, 2])},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)},
    ]


@pytest.mark.parametrize("kind", ["atss", "retina"])
def test_same_towers_and_cost_as_fcos_routing(kind: str) -> None:
    h = make(kind, in_channels=256, num_layers=4, num_groups=32, dynamic=False)
    fcos = FCOSRoutingHead(80, AnchorGenerator(strides=STRIDES, ratios=[1.0]), num_layers=4,
                           dynamic=False)
    big = [(100, 168), (50, 84), (25, 42), (13, 21), (7, 11)]
    assert h.full_cost(big) == fcos.full_cost(big)  # 198.6 GMACs of the paper's unit
    ours = {k for k in h.state_dict() if "_tower." in k}
    theirs = {k for k in fcos.state_dict() if "_tower." in k}
    assert ours == theirs


@pytest.mark.parametrize("kind", ["atss", "retina"])
def test_predictors_are_the_base_heads(kind: str) -> None:
    """With the towers replaced by identities, outputs equal the base head's with 0 convs."""
    torch.manual_seed(0)
    h = make(kind)
    base_cls = ATSSHead if kind == "atss" else RetinaNetHead
    anchors = atss_anchors() if kind == "atss" else retina_anchors()
    base = base_cls(3, anchors, in_channels=16, feat_channels=16, num_convs=0)
    base.load_state_dict({k: v for k, v in h.state_dict().items() if "_tower." not in k})
    feats = features()
    routed_cls, _ = h.cls_tower(feats)
    routed_reg, _ = h.reg_tower(feats)
    expected = h.predictors(routed_cls, routed_reg)
    got = h(feats)
    for key in expected:
        for a, b in zip(expected[key], got[key], strict=True):
            torch.testing.assert_close(a, b)
    same_input = base.predictors(routed_cls, routed_reg)
    for a, b in zip(same_input["cls"], got["cls"], strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("kind", ["atss", "retina"])
@pytest.mark.parametrize("lam", [0.0, 0.1])
def test_losses_budget_and_gate_gradients(kind: str, lam: float) -> None:
    torch.manual_seed(0)
    h = make(kind, budget_loss_weight=lam)
    feats = features()
    outputs = h(feats)
    losses = h.loss(outputs, h.priors(feats, (64, 96)), targets())
    assert ("loss_budget" in losses) == (lam != 0)
    assert 0 < losses["complexity_ratio"].item() <= 1
    total = sum(v for k, v in losses.items() if k.startswith("loss"))
    assert torch.isfinite(total)
    total.backward()
    gate = h.cls_tower.layers[0].depth.gate.conv.weight
    assert gate.grad is not None and gate.grad.abs().max() > 0
    if lam:  # the budget term alone moves depth gates, never the predictors
        h.zero_grad()
        outputs = h(feats)
        h.loss(outputs, h.priors(feats, (64, 96)), targets())["loss_budget"].backward()
        assert h.cls_logits.weight.grad is None or h.cls_logits.weight.grad.abs().max() == 0
        last = h.reg_tower.layers[-1].depth.gate.conv.weight
        assert last.grad is not None and last.grad.abs().max() > 0


@pytest.mark.parametrize("kind", ["atss", "retina"])
def test_inference_with_closed_gates(kind: str) -> None:
    torch.manual_seed(0)
    h = make(kind).eval()
    with torch.no_grad():
        for tower in (h.cls_tower, h.reg_tower):
            for layer in tower.layers:
                layer.depth.gate.conv.weight.normal_(0, 0.3)
                layer.depth.gate.conv.bias.fill_(0.0)
        feats = features()
        out = h(feats)
        res = h.predict(out, h.priors(feats, (64, 96)), [(64, 96), (60, 90)])
    assert len(res) == 2 and set(res[0]) == {"boxes", "scores", "labels"}
    assert (h.last_cost.executed < h.last_cost.full).all()


@pytest.mark.parametrize(("name", "cls"), [("ATSSRoutingHead", ATSSRoutingHead),
                                          ("RetinaNetRoutingHead", RetinaNetRoutingHead)])
def test_builds_from_config(name: str, cls) -> None:
    gen = {"type": "AnchorGenerator", "strides": STRIDES, "ratios": [1.0], "octave_base_scale": 8}
    built = build({"type": name, "num_classes": 3, "in_channels": 32, "num_layers": 2,
                   "budget_loss_weight": 0.1, "num_groups": 8, "anchor_generator": gen}, REGISTRY)
    assert isinstance(built, cls) and len(built.reg_tower.layers) == 2
    assert built.budget_loss_weight == 0.1


def test_retinanet_routing_with_dynamic_training_stats() -> None:
    from dynadet.models.dynamic_stats import DynamicTrainingStats

    torch.manual_seed(0)
    stats = DynamicTrainingStats(interval=1, initial_iou=0.5, initial_beta=0.11)
    h = make("retina", box_loss="smooth_l1", dynamic_stats=stats, budget_loss_weight=0.1)
    assert h.dynamic is True and h.dynamic_stats is stats
    feats = features()
    losses = h.loss(h(feats), h.priors(feats, (64, 96)), targets())
    assert {"iou_thresh", "beta", "loss_budget"} <= set(losses)
    assert int(stats.num_updates) == 1


@pytest.mark.parametrize("name", ["ATSSRoutingHead", "RetinaNetRoutingHead", "RPNRoutingHead"])
def test_config_typos_get_did_you_mean(name: str) -> None:
    from dynadet.config import ConfigError

    gen = {"type": "AnchorGenerator", "strides": STRIDES, "ratios": [1.0], "octave_base_scale": 8}
    node = {"type": name, "num_layer": 2, "anchor_generator": gen}
    if name != "RPNRoutingHead":
        node["num_classes"] = 3
    with pytest.raises(ConfigError, match="did you mean 'num_layers'"):
        build(node, REGISTRY)
