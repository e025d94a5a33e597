"""FCOS with FGDH / Fix routing towers: parameter counts, reference keys, losses, inference."""

from __future__ import annotations

import pytest
import torch

from dynadet.config import build
from dynadet.models.fcos_routing import FCOSRoutingHead, rename_reference_head_key
from dynadet.models.priors import AnchorGenerator
from dynadet.models.routing import RoutingCost
from dynadet.registry import REGISTRY

STRIDES = [8, 16, 32, 64, 128]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors gain nothing from threads; restore the setting for other test modules."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def anchors() -> AnchorGenerator:
    return AnchorGenerator(strides=STRIDES, ratios=[1.0], octave_base_scale=1)


def head(**kw) -> FCOSRoutingHead:
    return FCOSRoutingHead(kw.pop("num_classes", 80), anchors(), **kw)


@pytest.mark.parametrize(
    ("dynamic", "layers", "millions"),
    [(False, 4, 9.69), (True, 4, 9.75), (False, 8, 19.19), (True, 8, 19.30)],
)
def test_parameter_counts_match_reference(dynamic: bool, layers: int, millions: float) -> None:
    n = sum(p.numel() for p in head(num_layers=layers, dynamic=dynamic).parameters())
    assert round(n / 1e6, 2) == millions


def reference_head_keys(layers: int, dynamic: bool) -> dict[str, tuple[int, ...]]:
    """cvpods FCOSDynamicHead / FCOSFixHead state-dict keys (the note's §5 table), C = 256."""
    c = 256
    keys: dict[str, tuple[int, ...]] = {}
    for tower in ("cls_subnet", "bbox_subnet"):
        for i in range(layers):
            p = f"head.{tower}.{i}."
            keys[p + "output_weight"] = (1,)
            if dynamic:
                keys[p + "scale_weight"] = (1,)
            for s in range(2):
                if dynamic:
                    q = p + f"dynamic_convs.{s}."
                    keys |= {q + "convs.0.weight": (c, 1, 3, 3), q + "convs.0.bias": (c,),
                             q + "convs.1.weight": (c,), q + "convs.1.bias": (c,),
                             q + "gate.gate_conv.weight": (1, c, 3, 3),
                             q + "gate.gate_conv.bias": (1,)}
                else:
                    q = p + f"convs.{s}."
                    keys |= {q + "0.weight": (c, 1, 3, 3), q + "0.bias": (c,),
                             q + "1.weight": (c,), q + "1.bias": (c,)}
            for j in (1, 2):
                q = p + f"depth_module.bottleneck.conv{j}."
                keys |= {q + "weight": (c, c, 3, 3), q + "norm.weight": (c,),
                         q + "norm.bias": (c,)}
            if dynamic:
                keys |= {p + "depth_module.gate.gate_conv.weight": (1, c, 3, 3),
                         p + "depth_module.gate.gate_conv.bias": (1,)}
    keys |= {"head.cls_score.weight": (80, c, 3, 3), "head.cls_score.bias": (80,),
             "head.bbox_pred.weight": (4, c, 3, 3), "head.bbox_pred.bias": (4,),
             "head.centerness.weight": (1, c, 3, 3), "head.centerness.bias": (1,)}
    keys |= {f"head.scales.{lvl}.scale": (1,) for lvl in range(5)}
    return keys


@pytest.mark.parametrize(("dynamic", "layers", "count"), [(True, 4, 187), (True, 8, 363),
                                                            (False, 4, None)])
def test_reference_checkpoint_keys_map_one_to_one(dynamic: bool, layers: int, count) -> None:
    ref = reference_head_keys(layers, dynamic)
    if count is not None:
        assert len(ref) == count
    ours = {"head." + k: tuple(v.shape) for k, v in
            head(num_layers=layers, dynamic=dynamic).state_dict().items()}
    mapped = {rename_reference_head_key(k): shape for k, shape in ref.items()}
    assert len(mapped) == len(ref)
    # The reference Scale is a [1] tensor, ours 0-d: a converter reshapes it.
    assert mapped == {k: ((1,) if k.startswith("head.scales.") else s) for k, s in ours.items()}
    assert rename_reference_head_key("cls_score.bias") == "cls_logits.bias"


def test_fix_head_static_cost() -> None:
    sizes = [(100, 168), (50, 84), (25, 42), (13, 21), (7, 11)]
    assert round(head(num_layers=4, dynamic=False).full_cost(sizes) / 2**30, 1) == 198.6
    assert round(head(num_layers=8, dynamic=False).full_cost(sizes) / 2**30, 1) == 397.2


def tiny_features(n: int = 2, c: int = 16, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, c, h, w, generator=g) for h, w in [(8, 12), (4, 6), (2, 3), (1, 2),
                                                              (1, 1)]]


def tiny_targets() -> list[dict[str, torch.Tensor]]:
    return [
        {"boxes": torch.tensor([[4.0, 6.0, 40.0, 50.0], [30.0, 10.0, 90.0, 60.0]]),
         "labels": torch.tensor([0, 2])},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)},
    ]


@pytest.mark.parametrize("lam", [0.0, 0.1])
def test_losses_budget_and_complexity(lam: float) -> None:
    torch.manual_seed(0)
    h = head(num_classes=3, in_channels=16, num_layers=2, num_groups=4, budget_loss_weight=lam)
    feats = tiny_features()
    outputs = h(feats)
    priors = h.priors(feats, (64, 96))
    losses = h.loss(outputs, priors, tiny_targets())
    assert {"loss_cls", "loss_box", "loss_ctr", "complexity_ratio"} <= set(losses)
    assert ("loss_budget" in losses) == (lam != 0)
    cls_cost = h.cls_tower(feats)[1]
    reg_cost = h.reg_tower(feats)[1]
    soft = cls_cost.soft + reg_cost.soft
    full = (cls_cost.full + reg_cost.full).float()
    if lam:
        torch.testing.assert_close(losses["loss_budget"], lam * (soft / full).mean())
    executed = (cls_cost.executed + reg_cost.executed) / (cls_cost.full + reg_cost.full)
    torch.testing.assert_close(losses["complexity_ratio"], executed.mean().float())
    total = sum(v for k, v in losses.items() if k.startswith("loss"))
    total.backward()
    gate = h.cls_tower.layers[0].depth.gate.conv.weight
    assert gate.grad is not None and gate.grad.abs().max() > 0


def test_inference_costs_per_image_and_batch_consistency() -> None:
    torch.manual_seed(0)
    h = head(num_classes=3, in_channels=16, num_layers=2, num_groups=4).eval()
    with torch.no_grad():
        for tower in (h.cls_tower, h.reg_tower):  # close part of the depth gates
            for layer in tower.layers:
                layer.depth.gate.conv.weight.normal_(0, 0.3)
                layer.depth.gate.conv.bias.fill_(0.0)
    feats = tiny_features(n=2)
    with torch.no_grad():
        outputs = h(feats)
        batch_cost = h.last_cost
        results = h.predict(outputs, h.priors(feats, (64, 96)), [(64, 96), (60, 90)])
        assert len(results) == 2 and set(results[0]) == {"boxes", "scores", "labels"}
        assert isinstance(batch_cost, RoutingCost)
        assert (batch_cost.executed < batch_cost.full).all()
        for i in range(2):
            single = h([f[i : i + 1] for f in feats])
            assert h.last_cost.executed.item() == batch_cost.executed[i].item()
            for key in ("cls", "reg", "ctr"):
                for a, b in zip(outputs[key], single[key], strict=True):
                    torch.testing.assert_close(a[i : i + 1], b, atol=1e-5, rtol=1e-5)


def test_fix_head_complexity_is_one_and_no_budget() -> None:
    torch.manual_seed(0)
    h = head(num_classes=3, in_channels=16, num_layers=1, num_groups=4, dynamic=False,
             budget_loss_weight=0.1)
    feats = tiny_features()
    losses = h.loss(h(feats), h.priors(feats, (64, 96)), tiny_targets())
    assert losses["complexity_ratio"].item() == 1.0
    assert "loss_budget" not in losses  # no gates, nothing to push


def test_builds_from_config() -> None:
    node = {
        "type": "FCOSRoutingHead",
        "num_classes": 3,
        "in_channels": 32,
        "num_layers": 2,
        "dynamic": True,
        "budget_loss_weight": 0.1,
        "anchor_generator": {"type": "AnchorGenerator", "strides": STRIDES, "ratios": [1.0],
                             "octave_base_scale": 1},
    }
    built = build(node, REGISTRY)
    assert isinstance(built, FCOSRoutingHead)
    assert len(built.cls_tower.layers) == 2 and built.budget_loss_weight == 0.1
