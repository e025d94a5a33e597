"""FGDH routing towers: gate, init, parameter counts, reference keys, costs, budget gradient,
no leak, and forward passes against a float64 transcription written with the reference's keys."""

from __future__ import annotations

import gc
import math
import weakref

import pytest
import torch
import torch.nn.functional as F

from dynadet.models.fcos import FCOSHead
from dynadet.models.priors import AnchorGenerator
from dynadet.models.routing import (
    RoutingCost,
    RoutingTower,
    SpatialGate,
    budget_loss,
    gate_init_bias,
    geretanh,
    rename_reference_key,
)

TAU = 1.5


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors gain nothing from threads, and on a busy machine every OpenMP region waits
    for a descheduled worker (10× slower); restore the setting for the other test modules."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
SIZES_800x1344 = [(100, 168), (50, 84), (25, 42), (13, 21), (7, 11)]


def ref_geretanh(v: torch.Tensor) -> torch.Tensor:
    """The paper's δ(v) = max(0, (tanh(v−τ)+tanh τ)/(1+tanh τ)), in float64."""
    v = v.double()
    out = (torch.tanh(v - TAU) + math.tanh(TAU)) / (1 + math.tanh(TAU))
    return torch.where(out > 0, out, torch.zeros_like(out))


# ----------------------------------------------------------------------------- gate


def test_geretanh_values_zero_region_and_slope() -> None:
    v = torch.tensor([-5.0, -1.0, -1e-3, 0.0, 1e-3, 0.5, 1.5, 3.0, 8.0, 30.0], dtype=torch.float64)
    torch.testing.assert_close(geretanh(v, TAU), ref_geretanh(v), atol=1e-12, rtol=0)
    assert (geretanh(v[:4], TAU) == 0).all()
    assert (geretanh(v[4:], TAU) > 0).all()
    assert geretanh(torch.tensor(30.0), TAU) == pytest.approx(1.0, abs=1e-6)
    slope = geretanh(torch.tensor(1e-6, dtype=torch.float64), TAU) / 1e-6
    assert slope.item() == pytest.approx(1 - math.tanh(TAU), rel=1e-4)  # ≈ 0.095

    x = torch.linspace(-4, 4, 81, dtype=torch.float64, requires_grad=True)
    geretanh(x, TAU).sum().backward()
    assert (x.grad[x.detach() < 0] == 0).all()
    assert (x.grad[x.detach() > 0] > 0).all()


def test_gate_init_opens_at_099() -> None:
    bias = gate_init_bias(TAU, 0.99)
    assert bias == pytest.approx(3.822, abs=5e-4)
    assert ref_geretanh(torch.tensor(bias, dtype=torch.float64)).item() == pytest.approx(0.99)
    torch.manual_seed(0)
    gate = SpatialGate(16, TAU)
    assert gate.conv.weight.shape == (1, 16, 3, 3) and gate.conv.bias.shape == (1,)
    assert gate.conv.weight.std().item() == pytest.approx(0.01, rel=0.3)
    out = gate(torch.zeros(2, 16, 5, 6))
    assert out.shape == (2, 1, 5, 6)
    torch.testing.assert_close(out, torch.full_like(out, 0.99), atol=1e-6, rtol=0)
    # Typical FPN activations barely move the gates at init (weights are N(0, 0.01)).
    out = gate(torch.randn(2, 16, 5, 6))
    assert ((out > 0.98) & (out < 0.995)).all()


# ----------------------------------------------------------------------------- structure


def test_init_values_dynamic_and_fix() -> None:
    torch.manual_seed(0)
    layer = RoutingTower(32, 1, num_groups=8).layers[0]
    assert layer.scale_weight.item() == 0 and layer.output_weight.item() == 1
    for path in layer.scale_paths:
        assert path.conv.groups == 32 and (path.conv.bias == 0).all()
        assert (path.norm.weight == 1).all() and (path.norm.bias == 0).all()
        assert path.gate.conv.bias.item() == pytest.approx(gate_init_bias())
    assert layer.depth.conv1.bias is None and layer.depth.conv2.bias is None
    assert layer.depth.conv1.weight.std().item() == pytest.approx(0.01, rel=0.1)
    fix = RoutingTower(32, 1, dynamic=False, num_groups=8).layers[0]
    assert fix.scale_weight is None and fix.depth.gate is None
    assert all(p.gate is None for p in fix.scale_paths)


def predictor_params(channels: int = 256, classes: int = 80) -> int:
    """FCOS predictors + 5 scales, counted by instantiating a tower-less FCOSHead."""
    head = FCOSHead(classes, AnchorGenerator(strides=[8, 16, 32, 64, 128], ratios=[1.0],
                                             octave_base_scale=1), channels, channels,
                    num_convs=0)
    n = sum(p.numel() for p in head.parameters())
    assert n == classes * channels * 9 + classes + 5 * channels * 9 + 5 + 5
    return n


@pytest.mark.parametrize(
    ("dynamic", "layers", "millions"),
    [(False, 4, 9.69), (True, 4, 9.75), (False, 8, 19.19), (True, 8, 19.30)],
)
def test_head_parameter_counts_match_reference(dynamic: bool, layers: int, millions: float) -> None:
    tower = RoutingTower(256, layers, dynamic=dynamic)
    total = 2 * sum(p.numel() for p in tower.parameters()) + predictor_params()
    assert round(total / 1e6, 2) == millions


def reference_layer_keys(dynamic: bool) -> dict[str, tuple[int, ...]]:
    """The reference keys of one (tower, layer), from the note's table, with shapes (C = 256)."""
    c = 256
    keys: dict[str, tuple[int, ...]] = {"output_weight": (1,)}
    if dynamic:
        keys["scale_weight"] = (1,)
    for s in range(2):
        pre = f"dynamic_convs.{s}." if dynamic else f"convs.{s}."
        conv, norm = ("convs.0.", "convs.1.") if dynamic else ("0.", "1.")
        keys |= {pre + conv + "weight": (c, 1, 3, 3), pre + conv + "bias": (c,)}
        keys |= {pre + norm + "weight": (c,), pre + norm + "bias": (c,)}
        if dynamic:
            keys |= {pre + "gate.gate_conv.weight": (1, c, 3, 3), pre + "gate.gate_conv.bias": (1,)}
    for i in (1, 2):
        pre = f"depth_module.bottleneck.conv{i}."
        keys |= {pre + "weight": (c, c, 3, 3), pre + "norm.weight": (c,), pre + "norm.bias": (c,)}
    if dynamic:
        keys |= {"depth_module.gate.gate_conv.weight": (1, c, 3, 3),
                 "depth_module.gate.gate_conv.bias": (1,)}
    return keys


@pytest.mark.parametrize("dynamic", [True, False])
def test_reference_keys_map_one_to_one(dynamic: bool) -> None:
    tower = RoutingTower(256, 4, dynamic=dynamic)
    ours = {k: tuple(v.shape) for k, v in tower.state_dict().items()}
    mapped = {}
    for layer in range(4):
        for key, shape in reference_layer_keys(dynamic).items():
            mapped[f"layers.{layer}." + rename_reference_key(key)] = shape
    assert mapped == ours
    if dynamic:
        assert len(reference_layer_keys(True)) == 22
        # head: 2 towers × 4 layers × 22 + cls/bbox/centerness (w, b) + 5 scales = 187 keys
        assert 2 * len(ours) + 6 + 5 == 187


# ----------------------------------------------------------------------------- cost


@pytest.mark.parametrize(("layers", "gflops"), [(4, 198.6), (8, 397.2)])
def test_fix_static_cost_reproduces_readme(layers: int, gflops: float) -> None:
    tower = RoutingTower(256, layers, dynamic=False)
    macs_per_pixel = 2 * layers * (2 * (256 * 256 * 9 + 256) + 2 * (256 * 2 * 9 + 256))
    assert macs_per_pixel == 9_519_104 * layers // 4
    total = 2 * tower.full_cost(SIZES_800x1344)
    assert total == macs_per_pixel * 22_400
    assert round(total / 2**30, 1) == gflops


def tiny_levels(n: int = 2, c: int = 8, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, c, h, w, generator=g) for h, w in [(9, 13), (5, 7), (3, 4)]]


def test_forward_full_cost_equals_static_formula() -> None:
    feats = tiny_levels()
    sizes = [tuple(f.shape[-2:]) for f in feats]
    for dynamic in (True, False):
        tower = RoutingTower(8, 2, dynamic=dynamic, num_groups=2)
        _, cost = tower(feats)
        assert cost.full.dtype == torch.float64 and cost.full.shape == (2,)
        assert (cost.full == tower.full_cost(sizes)).all()
        if not dynamic:
            assert (cost.executed == cost.full).all()


def test_cost_hand_checked_tiny() -> None:
    """C = 4, two levels 4×6 and 2×3, one layer. Channel 0 of the input is +1 on chosen pixels
    and −1 elsewhere; the depth gate reads only that channel (weight 20 at the centre tap), so
    it is δ(20) on those pixels and 0 elsewhere. Scale path 0 is open everywhere (δ(3.822)),
    path 1 is closed (bias −1)."""
    c = 4
    tower = RoutingTower(c, 1, num_groups=2)
    layer = tower.layers[0]
    with torch.no_grad():
        layer.depth.gate.conv.weight.zero_()
        layer.depth.gate.conv.weight[0, 0, 1, 1] = 20.0
        layer.depth.gate.conv.bias.zero_()
        for s, bias in ((0, gate_init_bias()), (1, -1.0)):
            layer.scale_paths[s].gate.conv.weight.zero_()
            layer.scale_paths[s].gate.conv.bias.fill_(bias)
    fine, coarse = torch.zeros(2, c, 4, 6), torch.zeros(2, c, 2, 3)
    fine[:, 0], coarse[:, 0] = -1.0, -1.0
    fine[0, 0, 1, 1] = 1.0  # interior pixel: dilated to 9 pixels
    fine[1, 0, 0, 0] = 1.0  # two corners: 4 + 4 pixels
    fine[1, 0, 3, 5] = 1.0
    _, cost = tower([fine, coarse])

    unit_depth = c * c * 9 + c  # 148
    unit_scale = c * 2 * 9 + c  # 76
    g_on, g_open = ref_geretanh(torch.tensor(20.0)).item(), 0.99
    pixels = 4 * 6 + 2 * 3
    full = 2 * unit_depth * pixels + 2 * unit_scale * pixels
    # image 0: 1 open pixel, 9 dilated; image 1: 2 open corners, 4 + 4 dilated
    executed = [unit_depth * (1 + 9) + unit_scale * pixels,
                unit_depth * (2 + 8) + unit_scale * pixels]
    soft = [unit_depth * g_on * (1 + 9) + unit_scale * g_open * pixels,
            unit_depth * g_on * (2 + 8) + unit_scale * g_open * pixels]
    assert cost.full.tolist() == [full, full]
    assert cost.executed.tolist() == executed
    torch.testing.assert_close(cost.soft.double(), torch.tensor(soft, dtype=torch.float64),
                               rtol=1e-5, atol=0)

    no_unused = RoutingTower(c, 1, num_groups=2, count_unused_paths=False,
                             count_depthwise_twice=False)
    no_unused.load_state_dict(tower.state_dict())
    _, cost2 = no_unused([fine, coarse])
    unit_dw = c * 9 + c  # depthwise MACs once
    # Path 0 (down) is used only on the fine level, path 1 (up) only on the coarse one.
    assert cost2.full.tolist() == [2 * unit_depth * pixels + unit_dw * pixels] * 2
    assert cost2.executed.tolist() == [unit_depth * 10 + unit_dw * 24] * 2


def test_budget_loss_gradient_enters_through_depth_gates_only() -> None:
    torch.manual_seed(0)
    tower = RoutingTower(8, 1, num_groups=2)
    captured: dict[str, list[torch.Tensor]] = {"depth": [], "scale": []}
    layer = tower.layers[0]
    layer.depth.gate.register_forward_hook(lambda m, i, o: captured["depth"].append(o))
    for path in layer.scale_paths:
        path.gate.register_forward_hook(lambda m, i, o: captured["scale"].append(o))
    feats = tiny_levels()
    _, cost = tower(feats)
    lam = 0.1
    loss = budget_loss(cost, lam)
    grads = torch.autograd.grad(loss, captured["depth"] + captured["scale"], allow_unused=True)
    depth_grads, scale_grads = grads[:3], grads[3:]
    # Scale-path soft costs are detached (and scale_weight = 0 at init): no gradient at all.
    assert all(g is None or (g == 0).all() for g in scale_grads)
    unit = 8 * 8 * 9 + 8
    full = cost.full.float()
    for g, f in zip(depth_grads, feats, strict=True):
        per_image = g.flatten(1).sum(1)
        # conv2 term: u/full per pixel; conv1 term: each 3×3 window routes u/full to its max.
        expected = lam / 2 * 2 * unit * f.shape[-2] * f.shape[-1] / full
        torch.testing.assert_close(per_image, expected, rtol=1e-5, atol=0)
        assert (g >= lam / 2 * unit / full[:, None, None, None] * (1 - 1e-6)).all()

    tower.zero_grad()
    budget_loss(tower(feats)[1], lam).backward()
    got = {k for k, p in tower.named_parameters() if p.grad is not None and (p.grad != 0).any()}
    # The depth gate's input is Y = output_weight·X + scale_weight·(...), so the gradient also
    # reaches those two scalars (as in the reference); nothing else is touched.
    assert got == {"layers.0.depth.gate.conv.weight", "layers.0.depth.gate.conv.bias",
                   "layers.0.output_weight", "layers.0.scale_weight"}


def test_budget_loss_value() -> None:
    soft = torch.tensor([2.0, 3.0], requires_grad=True)
    cost = RoutingCost(soft, torch.tensor([1.0, 1.0], dtype=torch.float64),
                       torch.tensor([4.0, 6.0], dtype=torch.float64))
    assert budget_loss(cost, 0.8).item() == pytest.approx(0.8 * (0.5 + 0.5) / 2)


class _SavedTensorCounter:
    """Counts tensors saved for backward that are still alive (i.e. retained autograd graphs)."""

    class _Box:
        def __init__(self, t: torch.Tensor) -> None:
            # Detached: holding an output tensor itself would make a graph → box → tensor cycle.
            self.t = t.detach()

    def __init__(self) -> None:
        self.live: weakref.WeakSet = weakref.WeakSet()

    def pack(self, t: torch.Tensor) -> _Box:
        box = self._Box(t)
        self.live.add(box)
        return box

    @staticmethod
    def unpack(box: _Box) -> torch.Tensor:
        return box.t


class _LeakyTower(RoutingTower):
    """The reference's pattern: a running cost kept in the module until a budget loss reads it."""

    running = None

    def forward(self, features):
        out, cost = super().forward(features)
        self.running = cost.soft if self.running is None else self.running + cost.soft
        return out, cost


def _retained_after_steps(tower: RoutingTower, steps: int) -> tuple[list[int], list[int]]:
    feats = [f.requires_grad_() for f in tiny_levels(c=8)]
    counter = _SavedTensorCounter()
    saved, tensors = [], []
    with torch.autograd.graph.saved_tensors_hooks(counter.pack, counter.unpack):
        for step in range(steps):
            outs, cost = tower(feats)
            loss = sum(o.mean() for o in outs)  # λ = 0: the cost is computed but unused
            loss.backward()
            del outs, cost, loss
            saved.append(len(counter.live))
            if step in (4, steps - 1):
                gc.collect()
                tensors.append(sum(type(o) is torch.Tensor for o in gc.get_objects()))
    return saved, tensors


def test_no_retained_graph_over_50_training_steps_with_lambda_zero() -> None:
    torch.manual_seed(0)
    saved, tensors = _retained_after_steps(RoutingTower(8, 2, num_groups=2), 50)
    assert saved[-1] == saved[4] == 0
    assert tensors[1] <= tensors[0]
    # The same probe catches the reference's leak: saved tensors grow every step.
    leaky, _ = _retained_after_steps(_LeakyTower(8, 2, num_groups=2), 6)
    assert leaky[5] > leaky[4] > leaky[3] > 0


# ----------------------------------------------------------------------------- forward


def ref_active_gn(x: torch.Tensor, mask: torch.Tensor, groups: int, w, b) -> torch.Tensor:
    """GN over the active pixels of each image and group, zeros elsewhere (float64 loops)."""
    out = torch.zeros_like(x)
    cg = x.shape[1] // groups
    for n in range(x.shape[0]):
        m = mask[n, 0]
        if not m.any():
            continue
        for g in range(groups):
            sl = slice(g * cg, (g + 1) * cg)
            vals = x[n, sl][:, m]
            mean, var = vals.mean(), vals.var(unbiased=False)
            normed = (x[n, sl] - mean) / torch.sqrt(var + 1e-5)
            out[n, sl] = (normed * w[sl, None, None] + b[sl, None, None]) * m
    return out


def ref_tower(sd: dict[str, torch.Tensor], feats: list[torch.Tensor], layers: int, groups: int,
              masked_eval: bool) -> list[torch.Tensor]:
    """cvpods DynamicScale + DynamicBottleneck, transcribed with the reference key names."""

    def gate(pre: str, x: torch.Tensor) -> torch.Tensor:
        return ref_geretanh(F.conv2d(x, sd[pre + "gate_conv.weight"], sd[pre + "gate_conv.bias"],
                                     padding=1))

    def conv_gn(pre: str, x, mask=None):
        y = F.conv2d(x, sd[pre + "weight"], padding=1)
        if mask is None:
            return F.group_norm(y, groups, sd[pre + "norm.weight"], sd[pre + "norm.bias"])
        return ref_active_gn(y, mask, groups, sd[pre + "norm.weight"], sd[pre + "norm.bias"])

    c = feats[0].shape[1]
    for i in range(layers):
        p = f"{i}."
        dyn = [[None, None] for _ in feats]
        for lvl, x in enumerate(feats):
            for s in range(2):
                q = p + f"dynamic_convs.{s}."
                f = F.conv2d(x, sd[q + "convs.0.weight"], sd[q + "convs.0.bias"], padding=1,
                             groups=c)
                f = F.group_norm(f, groups, sd[q + "convs.1.weight"], sd[q + "convs.1.bias"])
                dyn[lvl][s] = f * gate(q + "gate.", x)
        outs = []
        for lvl, x in enumerate(feats):
            parts = []
            for s, src in ((0, lvl - 1), (1, lvl + 1)):
                if 0 <= src < len(feats):
                    parts.append(F.interpolate(dyn[src][s], size=x.shape[-2:], mode="bilinear",
                                               align_corners=True))
            y = sum(parts) * sd[p + "scale_weight"] + x * sd[p + "output_weight"]
            g = gate(p + "depth_module.gate.", y)
            bp = p + "depth_module.bottleneck."
            if masked_eval:
                m1 = F.max_pool2d(g, 3, 1, 1) > 0
                h = F.relu(conv_gn(bp + "conv1.", y, m1))
                branch = conv_gn(bp + "conv2.", h, g > 0)
            else:
                branch = conv_gn(bp + "conv2.", F.relu(conv_gn(bp + "conv1.", y)))
            outs.append(F.relu(branch * g + y))
        feats = outs
    return feats


def randomised_tower(layers: int = 2, c: int = 8, groups: int = 2, seed: int = 0) -> RoutingTower:
    """Parameters moved away from init so gates are partly closed and every path matters."""
    torch.manual_seed(seed)
    tower = RoutingTower(c, layers, num_groups=groups).double()
    with torch.no_grad():
        for name, p in tower.named_parameters():
            if name.endswith("gate.conv.weight"):
                p.normal_(0, 0.3)
            elif name.endswith("gate.conv.bias"):
                p.fill_(0.2)
            elif name.endswith("scale_weight"):
                p.fill_(0.7)
            elif name.endswith("output_weight"):
                p.fill_(1.3)
            elif p.dim() == 4:
                p.normal_(0, 0.3)
            else:
                p.normal_(0.5 if name.endswith("norm.weight") else 0, 0.3)
    return tower


def reference_state_dict(tower: RoutingTower, layers: int) -> dict[str, torch.Tensor]:
    ours = tower.state_dict()
    out = {}
    for i in range(layers):
        for key in reference_layer_keys(True):
            out[f"{i}.{key}"] = ours[f"layers.{i}." + rename_reference_key(key)]
    return out


@pytest.mark.parametrize("mode", ["train", "eval_masked", "eval_dense"])
def test_tower_matches_reference_transcription(mode: str) -> None:
    tower = randomised_tower()
    feats = [f.double() for f in tiny_levels(n=2, c=8, seed=3)]
    tower.train(mode == "train")
    if mode == "eval_dense":
        for layer in tower.layers:
            layer.depth.gn_mode = "dense"
    with torch.no_grad():
        outs, cost = tower(feats)
        expected = ref_tower(reference_state_dict(tower, 2), feats, 2, 2, mode == "eval_masked")
    closed = (cost.executed < cost.full).all()
    assert closed, "test needs partly closed gates"
    for o, e in zip(outs, expected, strict=True):
        torch.testing.assert_close(o, e, atol=1e-10, rtol=1e-10)


def test_eval_masked_differs_from_train_when_gates_close() -> None:
    tower = randomised_tower()
    feats = [f.double() for f in tiny_levels(n=2, c=8, seed=3)]
    with torch.no_grad():
        train_out = tower.train()(feats)[0]
        eval_out = tower.eval()(feats)[0]
    assert (train_out[0] - eval_out[0]).abs().max() > 1e-3


@pytest.mark.parametrize("threshold", [0.0, 2.0])
def test_eval_batch_equals_per_image_and_sparse_equals_dense(threshold: float) -> None:
    tower = randomised_tower(seed=1).eval()
    for layer in tower.layers:
        layer.depth.conv1.dense_threshold = threshold
        layer.depth.conv2.dense_threshold = threshold
    feats = [f.double() for f in tiny_levels(n=3, c=8, seed=4)]
    with torch.no_grad():
        batch, cost = tower(feats)
        for i in range(3):
            single, single_cost = tower([f[i : i + 1] for f in feats])
            for b, s in zip(batch, single, strict=True):
                torch.testing.assert_close(b[i : i + 1], s, atol=1e-10, rtol=1e-10)
            assert single_cost.executed.item() == cost.executed[i].item()


def test_eval_all_gates_open_equals_train() -> None:
    torch.manual_seed(0)
    tower = RoutingTower(8, 2, num_groups=2).double()
    with torch.no_grad():
        for layer in tower.layers:
            layer.scale_weight.fill_(0.5)
    feats = [f.double() for f in tiny_levels(seed=5)]
    with torch.no_grad():
        train_out, cost = tower.train()(feats)
        eval_out, _ = tower.eval()(feats)
    assert (cost.executed == cost.full).all()
    for a, b in zip(train_out, eval_out, strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


def test_fix_tower_forward_formula() -> None:
    torch.manual_seed(0)
    tower = RoutingTower(8, 1, dynamic=False, num_groups=2)
    layer = tower.layers[0]
    feats = tiny_levels(n=1, seed=6)
    outs, _ = tower(feats)
    sp, d = layer.scale_paths, layer.depth
    for lvl, x in enumerate(feats):
        y = x * layer.output_weight
        if lvl > 0:
            y = y + F.interpolate(sp[0].norm(sp[0].conv(feats[lvl - 1])), size=x.shape[-2:],
                                  mode="bilinear", align_corners=True)
        if lvl < 2:
            y = y + F.interpolate(sp[1].norm(sp[1].conv(feats[lvl + 1])), size=x.shape[-2:],
                                  mode="bilinear", align_corners=True)
        h = F.relu(d.conv1.norm(F.conv2d(y, d.conv1.weight, padding=1)))
        z = F.relu(y + d.conv2.norm(F.conv2d(h, d.conv2.weight, padding=1)))
        torch.testing.assert_close(outs[lvl], z, atol=1e-5, rtol=1e-5)


def test_odd_sizes_single_level_and_training_gradients() -> None:
    torch.manual_seed(0)
    tower = RoutingTower(8, 2, num_groups=2)
    feats = [torch.randn(1, 8, 13, 21), torch.randn(1, 8, 7, 11)]
    outs, cost = tower(feats)
    assert [tuple(o.shape) for o in outs] == [(1, 8, 13, 21), (1, 8, 7, 11)]
    (sum(o.sum() for o in outs) + budget_loss(cost, 0.1)).backward()
    layer = tower.layers[0]
    # scale_weight starts at 0: the scale paths get no gradient yet, scale_weight does.
    assert layer.scale_paths[0].conv.weight.grad.abs().max() == 0
    assert layer.scale_weight.grad.abs() > 0 and layer.depth.conv1.weight.grad.abs().max() > 0
    one, _ = tower([torch.randn(2, 8, 5, 5)])
    assert one[0].shape == (2, 8, 5, 5)


def test_keep_gates_are_detached() -> None:
    tower = RoutingTower(8, 1, num_groups=2)
    tower.layers[0].keep_gates = True
    tower(tiny_levels())
    gates = tower.layers[0].last_gates
    assert [g is None for g in gates["up"]] == [False, False, False]  # unused P3-up is counted
    assert len(gates["depth"]) == 3 and all(g.grad_fn is None for g in gates["depth"])


def _masked_training(tower: RoutingTower, threshold: float) -> RoutingTower:
    for layer in tower.layers:
        layer.depth.train_gn_mode = "masked"
        layer.depth.conv1.dense_threshold = threshold
        layer.depth.conv2.dense_threshold = threshold
    return tower


@pytest.mark.parametrize("threshold", [0.0, 2.0])  # dense conv + masked GN, or the sparse path
def test_masked_training_is_the_eval_function(threshold: float) -> None:
    tower = _masked_training(randomised_tower(seed=2), threshold)
    feats = [f.double() for f in tiny_levels(n=2, c=8, seed=7)]
    with torch.no_grad():
        expected, _ = tower.eval()(feats)
    outs, cost = tower.train()(feats)
    assert (cost.executed < cost.full).all(), "test needs partly closed gates"
    for o, e in zip(outs, expected, strict=True):
        torch.testing.assert_close(o, e, atol=1e-10, rtol=1e-10)


def test_masked_training_gradients_sparse_equal_dense() -> None:
    """The sparse path's gradients (convs at open pixels, GN over them) equal autograd through
    the dense formula with the same masked statistics, for every parameter and the input."""
    grads = []
    for threshold in (0.0, 2.0):
        tower = _masked_training(randomised_tower(seed=3), threshold).train()
        feats = [f.double().requires_grad_() for f in tiny_levels(n=2, c=8, seed=8)]
        outs, cost = tower(feats)
        w = [torch.randn(o.shape, generator=torch.Generator().manual_seed(i), dtype=o.dtype)
             for i, o in enumerate(outs)]  # fmt: skip
        (sum((o * wi).sum() for o, wi in zip(outs, w, strict=True))
         + budget_loss(cost, 0.1)).backward()  # fmt: skip
        grads.append([p.grad for p in tower.parameters()] + [f.grad for f in feats])
    depth_conv = tower.layers[0].depth.conv1.weight.grad
    assert depth_conv is not None and depth_conv.abs().max() > 0
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-9)


def test_train_gn_mode_is_checked_and_reaches_the_heads() -> None:
    with pytest.raises(ValueError, match="train_gn_mode"):
        RoutingTower(8, 1, num_groups=2, train_gn_mode="sparse")
    from dynadet.api import build_model
    from dynadet.config import load_config

    cfg = load_config("quickstart", ["+model.head.train_gn_mode=masked"])
    head = build_model(cfg).head
    assert {b.depth.train_gn_mode for t in (head.cls_tower, head.reg_tower)
            for b in t.layers} == {"masked"}  # fmt: skip


def test_inference_leaves_inputs_untouched_and_matches_autograd_mode() -> None:
    """Without autograd the towers update their own temporaries in place; the caller's
    features (and a block's input unless it is ``owned``) must come back unchanged."""
    for dynamic in (True, False):
        tower = randomised_tower(seed=4) if dynamic else RoutingTower(8, 2, False, 2).double()
        tower.eval()
        feats = [f.double() for f in tiny_levels(n=2, c=8, seed=9)]
        copies = [f.clone() for f in feats]
        with torch.no_grad():
            fast, _ = tower(feats)
        with torch.enable_grad():
            slow, _ = tower(feats)  # eval mode with autograd: the out-of-place formulas
        for f, c in zip(feats, copies, strict=True):
            assert torch.equal(f, c)
        for a, b in zip(fast, slow, strict=True):
            torch.testing.assert_close(a, b.detach(), atol=1e-10, rtol=1e-10)
    for block in (randomised_tower(seed=5).eval().layers[0].depth, tower.layers[0].depth):
        y = torch.randn(1, 8, 5, 6).double().contiguous(memory_format=torch.channels_last)
        y0 = y.clone()
        with torch.no_grad():
            block(y)
        assert torch.equal(y, y0)


def test_masked_training_with_every_gate_closed_still_reaches_every_parameter() -> None:
    """DDP without find_unused_parameters needs every parameter in the graph on every rank,
    also when one rank's gates are all closed: the empty sparse path keeps the convs in it."""
    tower = _masked_training(randomised_tower(seed=6), 2.0).train()
    with torch.no_grad():
        for layer in tower.layers:
            layer.depth.gate.conv.bias.fill_(-50.0)  # depth gates shut everywhere
    outs, cost = tower([f.double() for f in tiny_levels(n=2, c=8, seed=10)])
    (sum(o.sum() for o in outs) + budget_loss(cost, 0.1)).backward()
    depth = tower.layers[0].depth
    for p in (depth.conv1.weight, depth.conv2.weight, depth.conv1.norm.weight):
        assert p.grad is not None and p.grad.abs().max() == 0


def test_tower_float32_inference_matches_reference_transcription() -> None:
    """The float32 CPU inference path (oneDNN GEMMs, levels batched) against the float64
    transcription of the reference."""
    tower = randomised_tower(seed=2).eval()
    feats = [f.double() for f in tiny_levels(n=2, c=8, seed=5)]
    with torch.no_grad():
        expected = ref_tower(reference_state_dict(tower, 2), feats, 2, 2, True)
        outs, cost = tower.float()([f.float() for f in feats])
    assert (cost.executed < cost.full).all()
    for o, e in zip(outs, expected, strict=True):
        torch.testing.assert_close(o.double(), e, atol=2e-4, rtol=2e-4)


def test_paired_gates_equal_single_gates() -> None:
    from dynadet.models.routing import paired_gates

    torch.manual_seed(0)
    first, second = SpatialGate(8), SpatialGate(8)
    with torch.no_grad():
        second.conv.weight.normal_(0, 0.5)
        second.conv.bias.fill_(-0.1)
    x = torch.randn(2, 8, 7, 9).contiguous(memory_format=torch.channels_last)
    a, b = paired_gates(x, first, second)
    torch.testing.assert_close(a, first(x))
    torch.testing.assert_close(b, second(x))
    assert (b == 0).any() and (b > 0).any()


def test_cost_of_gates_equals_the_sum_over_gates() -> None:
    gen = torch.Generator().manual_seed(1)
    gates = [
        torch.rand(2, 1, h, w, generator=gen).sub(0.4).clamp(min=0).requires_grad_()
        for h, w in [(5, 6), (3, 3)]
    ]
    cost = RoutingCost.of_gates(gates, 10, detach=False)
    for i in range(2):
        soft = sum(float(g[i].sum()) for g in gates) * 10
        executed = sum(int((g[i] > 0).sum()) for g in gates) * 10
        assert math.isclose(float(cost.soft[i]), soft, rel_tol=1e-6)
        assert cost.executed[i].item() == executed and cost.full[i].item() == (30 + 9) * 10
    cost.soft.sum().backward()
    assert all(torch.equal(g.grad, torch.full_like(g, 10.0)) for g in gates)
    assert not RoutingCost.of_gates(gates, 10, detach=True).soft.requires_grad
