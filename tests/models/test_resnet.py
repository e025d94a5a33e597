"""ResNet backbone and norm layers: torchvision key list, parameter counts, shapes, freezing."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dynadet.models.norm import FrozenBatchNorm2d, build_norm, convert_frozen_bn
from dynadet.models.resnet import BasicBlock, Bottleneck, ResNet, resnet18

BN_SUFFIXES = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def torchvision_resnet50_keys() -> dict[str, tuple[int, ...]]:
    """The documented torchvision ``resnet50`` state dict (320 keys incl. fc), key → shape."""
    keys: dict[str, tuple[int, ...]] = {}

    def bn(prefix: str, c: int) -> None:
        for s in BN_SUFFIXES:
            keys[f"{prefix}.{s}"] = () if s == "num_batches_tracked" else (c,)

    keys["conv1.weight"] = (64, 3, 7, 7)
    bn("bn1", 64)
    in_ch = 64
    for k, n in enumerate((3, 4, 6, 3), start=1):
        width, out = 64 * 2 ** (k - 1), 256 * 2 ** (k - 1)
        for b in range(n):
            p = f"layer{k}.{b}"
            keys[f"{p}.conv1.weight"] = (width, in_ch if b == 0 else out, 1, 1)
            bn(f"{p}.bn1", width)
            keys[f"{p}.conv2.weight"] = (width, width, 3, 3)
            bn(f"{p}.bn2", width)
            keys[f"{p}.conv3.weight"] = (out, width, 1, 1)
            bn(f"{p}.bn3", out)
            if b == 0:
                keys[f"{p}.downsample.0.weight"] = (out, in_ch, 1, 1)
                bn(f"{p}.downsample.1", out)
        in_ch = out
    keys["fc.weight"] = (1000, 2048)
    keys["fc.bias"] = (1000,)
    return keys


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------- state-dict keys


def test_reference_key_list_matches_documented_counts() -> None:
    keys = torchvision_resnet50_keys()
    assert len(keys) == 320
    buffers = ("running_mean", "running_var", "num_batches_tracked")
    assert sum(math.prod(s) for k, s in keys.items() if not k.endswith(buffers)) == 25_557_032
    assert len([k for k in keys if not k.endswith("num_batches_tracked")]) == 267


def test_resnet50_keys_and_shapes_match_torchvision() -> None:
    ref = torchvision_resnet50_keys()
    no_fc = {k: v for k, v in ref.items() if not k.startswith("fc.")}
    with torch.device("meta"):
        bn_model = ResNet(50, norm="bn")
        frozen_model = ResNet(50, norm="frozen_bn")
    sd = bn_model.state_dict()
    assert list(sd) == list(no_fc)  # same order as torchvision too
    assert {k: tuple(v.shape) for k, v in sd.items()} == no_fc
    frozen_sd = frozen_model.state_dict()
    expected = [k for k in no_fc if not k.endswith("num_batches_tracked")]
    assert list(frozen_sd) == expected and len(expected) == 265
    assert tuple(frozen_sd["conv1.weight"].shape) == (64, 3, 7, 7)
    assert tuple(frozen_sd["layer3.0.conv2.weight"].shape) == (256, 256, 3, 3)
    assert tuple(frozen_sd["layer4.0.downsample.0.weight"].shape) == (2048, 1024, 1, 1)
    assert tuple(frozen_sd["layer4.2.bn3.running_var"].shape) == (2048,)


def test_torchvision_state_dict_loads_with_only_fc_unexpected() -> None:
    ref = torchvision_resnet50_keys()
    g = torch.Generator().manual_seed(0)
    tv_sd = {
        k: (torch.tensor(7) if k.endswith("num_batches_tracked") else torch.rand(s, generator=g))
        for k, s in ref.items()
    }
    # The same holds for a plain-BatchNorm model, where num_batches_tracked is loaded too.
    with torch.device("meta"):
        bn_model = ResNet(50, norm="bn")
    result = bn_model.load_state_dict(tv_sd, strict=False, assign=True)
    assert result.missing_keys == [] and sorted(result.unexpected_keys) == ["fc.bias", "fc.weight"]
    model = ResNet(50, norm="frozen_bn")
    result = model.load_state_dict(tv_sd, strict=False)
    assert result.missing_keys == []
    assert sorted(result.unexpected_keys) == ["fc.bias", "fc.weight"]
    assert torch.equal(model.layer2[1].bn2.running_var, tv_sd["layer2.1.bn2.running_var"])


@pytest.mark.parametrize(
    ("depth", "with_fc", "fc_params"),
    [(18, 11_689_512, 513_000), (34, 21_797_672, 513_000), (50, 25_557_032, 2_049_000),
     (101, 44_549_160, 2_049_000)],
)
def test_parameter_counts_match_torchvision(depth: int, with_fc: int, fc_params: int) -> None:
    with torch.device("meta"):
        model = ResNet(depth, norm="bn")
        frozen = ResNet(depth, norm="frozen_bn")
    assert n_params(model) == with_fc - fc_params
    # Frozen BN keeps its affine parameters as buffers.
    bn_affine = sum(m.weight.numel() * 2 for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    assert n_params(frozen) == with_fc - fc_params - bn_affine


def test_resnet18_keys_have_no_downsample_in_layer1() -> None:
    with torch.device("meta"):
        sd = resnet18(norm="frozen_bn").state_dict()
    assert "layer1.0.downsample.0.weight" not in sd
    assert tuple(sd["layer2.0.downsample.0.weight"].shape) == (128, 64, 1, 1)
    assert tuple(sd["layer4.1.conv2.weight"].shape) == (512, 512, 3, 3)
    assert not any(k.startswith("layer1.0.conv3") for k in sd)


# ----------------------------------------------------------------------------- shapes


def halve(n: int, times: int) -> int:
    for _ in range(times):
        n = (n + 1) // 2
    return n


@pytest.mark.parametrize("style", ["pytorch", "caffe"])
@pytest.mark.parametrize(("depth", "expansion"), [(18, 1), (50, 4)])
def test_output_shapes_and_strides_odd_input(style: str, depth: int, expansion: int) -> None:
    torch.manual_seed(0)
    model = ResNet(depth, style=style, out_indices=(0, 1, 2, 3)).eval()
    h, w = 65, 97
    with torch.no_grad():
        outs = model(torch.randn(1, 3, h, w))
    assert model.out_strides == [4, 8, 16, 32]
    assert model.out_channels == [64 * expansion * 2**i for i in range(4)]
    assert len(outs) == 4
    for i, o in enumerate(outs):
        assert tuple(o.shape) == (1, model.out_channels[i], halve(h, i + 2), halve(w, i + 2))
    assert tuple(outs[-1].shape[-2:]) == (3, 4)


def test_out_indices_subset_and_early_stop() -> None:
    model = ResNet(50, out_indices=(1, 2)).eval()
    assert model.out_channels == [512, 1024] and model.out_strides == [8, 16]
    calls = []
    model.layer4.register_forward_hook(lambda *a: calls.append(1))
    outs = model(torch.randn(1, 3, 32, 32))
    assert [tuple(o.shape) for o in outs] == [(1, 512, 4, 4), (1, 1024, 2, 2)]
    assert calls == []  # layer4 is not executed when C5 is not requested
    with pytest.raises(ValueError, match="out_indices"):
        ResNet(50, out_indices=(2, 1))
    with pytest.raises(ValueError, match="depth"):
        ResNet(42)
    with pytest.raises(ValueError, match="style"):
        ResNet(50, style="tf")


# ----------------------------------------------------------------------------- style


def test_stride_placement_pytorch_vs_caffe() -> None:
    with torch.device("meta"):
        py, caffe = ResNet(50, style="pytorch"), ResNet(50, style="caffe")
    for k in (2, 3, 4):
        b_py, b_cf = getattr(py, f"layer{k}")[0], getattr(caffe, f"layer{k}")[0]
        assert b_py.conv1.stride == (1, 1) and b_py.conv2.stride == (2, 2)
        assert b_cf.conv1.stride == (2, 2) and b_cf.conv2.stride == (1, 1)
        assert b_py.downsample[0].stride == b_cf.downsample[0].stride == (2, 2)
    assert py.layer1[0].conv2.stride == caffe.layer1[0].conv1.stride == (1, 1)


def reference_bottleneck(block: Bottleneck, x: torch.Tensor, s1: int, s3: int) -> torch.Tensor:
    """Independent functional transcription of a bottleneck with eval-mode BatchNorm."""

    def bn(m: nn.BatchNorm2d, t: torch.Tensor) -> torch.Tensor:
        shape = (1, -1, 1, 1)
        return (t - m.running_mean.view(shape)) / torch.sqrt(
            m.running_var.view(shape) + m.eps
        ) * m.weight.view(shape) + m.bias.view(shape)

    out = F.relu(bn(block.bn1, F.conv2d(x, block.conv1.weight, stride=s1)))
    out = F.relu(bn(block.bn2, F.conv2d(out, block.conv2.weight, stride=s3, padding=1)))
    out = bn(block.bn3, F.conv2d(out, block.conv3.weight))
    sc = bn(block.downsample[1], F.conv2d(x, block.downsample[0].weight, stride=s1 * s3))
    return F.relu(out + sc)


@pytest.mark.parametrize(("style", "s1", "s3"), [("pytorch", 1, 2), ("caffe", 2, 1)])
def test_bottleneck_matches_functional_reference(style: str, s1: int, s3: int) -> None:
    torch.manual_seed(0)
    block = Bottleneck(16, 8, stride=2, style=style, norm="bn").double()
    for m in block.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.5, 0.5)
    block.eval()
    x = torch.randn(2, 16, 9, 7, dtype=torch.float64)
    y = block(x)
    assert y.shape == (2, 32, 5, 4)
    torch.testing.assert_close(y, reference_bottleneck(block, x, s1, s3), rtol=1e-12, atol=1e-12)
    # The two styles really compute different functions with the same weights.
    other = Bottleneck(16, 8, stride=2, style="caffe" if style == "pytorch" else "pytorch",
                       norm="bn").double().eval()
    other.load_state_dict(block.state_dict())
    assert not torch.allclose(other(x), y)


def test_basic_block_gradcheck() -> None:
    torch.manual_seed(0)
    block = BasicBlock(2, 3, stride=2, norm="frozen_bn").double().eval()
    x = torch.randn(1, 2, 5, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(block, (x,), eps=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- freezing


@pytest.mark.parametrize("frozen_stages", [-1, 0, 1, 3])
def test_frozen_stages(frozen_stages: int) -> None:
    model = ResNet(18, norm="bn", frozen_stages=frozen_stages, norm_eval=False)
    model.train()
    frozen = [] if frozen_stages < 0 else ["conv1", "bn1"]
    frozen += [f"layer{k}" for k in range(1, frozen_stages + 1)]
    for name, p in model.named_parameters():
        assert p.requires_grad == (name.split(".")[0] not in frozen), name
    for name, m in model.named_modules():
        if name:
            assert m.training == (name.split(".")[0] not in frozen), name
    model.eval()
    assert not any(m.training for m in model.modules())
    model.train()
    assert model.layer4.training


def test_frozen_stage_gets_no_gradient() -> None:
    model = ResNet(18, norm="bn", frozen_stages=1)
    model(torch.randn(1, 3, 32, 32))[-1].sum().backward()
    assert model.conv1.weight.grad is None and model.layer1[0].conv1.weight.grad is None
    assert model.layer2[0].conv1.weight.grad is not None


@pytest.mark.parametrize("norm_eval", [True, False])
def test_norm_eval(norm_eval: bool) -> None:
    model = ResNet(18, norm="bn", frozen_stages=-1, norm_eval=norm_eval)
    model.train()
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(m.training != norm_eval for m in bns)
    assert model.training and model.layer3.training  # only the norms are switched
    before = bns[-1].running_mean.clone()
    model(torch.randn(2, 3, 32, 32))
    assert torch.equal(bns[-1].running_mean, before) == norm_eval
    # The affine parameters stay trainable (mmdet pytorch-style recipe).
    assert all(m.weight.requires_grad for m in bns)


# ----------------------------------------------------------------------------- norm layers


def randomised_bn(c: int) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(c, eps=1e-3).double()
    with torch.no_grad():
        bn.running_mean.uniform_(-2, 2)
        bn.running_var.uniform_(0.1, 3)
        bn.weight.uniform_(-1, 1)
        bn.bias.uniform_(-1, 1)
    bn.num_batches_tracked.fill_(11)
    return bn.eval()


def test_frozen_bn_equals_eval_batchnorm_and_drops_counter() -> None:
    torch.manual_seed(0)
    bn = randomised_bn(5)
    frozen = FrozenBatchNorm2d(5, eps=1e-3).double()
    result = frozen.load_state_dict(bn.state_dict(), strict=True)  # num_batches_tracked dropped
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert set(frozen.state_dict()) == {"weight", "bias", "running_mean", "running_var"}
    assert list(frozen.parameters()) == []
    x = torch.randn(3, 5, 4, 6, dtype=torch.float64)
    torch.testing.assert_close(frozen(x), bn(x), rtol=1e-13, atol=1e-13)
    # The exact torchvision op order: scale = w * rsqrt(var + eps); x * scale + (b - mean * scale).
    scale = bn.weight * (bn.running_var + 1e-3).rsqrt()
    expected = x * scale.view(1, -1, 1, 1) + (bn.bias - bn.running_mean * scale).view(1, -1, 1, 1)
    assert torch.equal(frozen(x), expected)
    frozen.eps = 0.0
    assert torch.equal(frozen(x), x * (bn.weight * bn.running_var.rsqrt()).view(1, -1, 1, 1)
                       + (bn.bias - bn.running_mean * bn.weight * bn.running_var.rsqrt()
                          ).view(1, -1, 1, 1))


def test_frozen_bn_gradcheck_wrt_input() -> None:
    frozen = FrozenBatchNorm2d(3).double()
    frozen.running_var.fill_(0.5)
    x = torch.randn(2, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(frozen, (x,))


def test_convert_frozen_bn_keeps_eval_outputs() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), randomised_bn(4).float(), nn.ReLU(),
                          nn.Sequential(nn.Conv2d(4, 4, 1), randomised_bn(4).float()))
    model.eval()
    x = torch.randn(2, 3, 8, 8)
    y = model(x)
    converted = convert_frozen_bn(model)
    assert isinstance(converted[1], FrozenBatchNorm2d)
    assert isinstance(converted[3][1], FrozenBatchNorm2d)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in converted.modules())
    torch.testing.assert_close(converted(x), y, rtol=1e-6, atol=1e-6)
    bn = randomised_bn(2)
    single = convert_frozen_bn(bn)
    assert isinstance(single, FrozenBatchNorm2d) and single.running_mean.dtype == torch.float64


def test_build_norm_kinds() -> None:
    assert isinstance(build_norm("bn", 8), nn.BatchNorm2d)
    assert isinstance(build_norm("frozen_bn", 8), FrozenBatchNorm2d)
    gn = build_norm("gn", 64)
    assert isinstance(gn, nn.GroupNorm) and gn.num_groups == 32
    assert isinstance(build_norm("none", 8), nn.Identity)
    assert build_norm("bn", 8, eps=0.0).eps == 0.0
    with pytest.raises(ValueError, match="divisible"):
        build_norm("gn", 48)
    with pytest.raises(ValueError, match="unknown norm"):
        build_norm("syncbn", 8)


def test_norm_eps_reaches_every_layer() -> None:
    with torch.device("meta"):
        model = ResNet(18, norm_eps=0.0)
    eps = {m.eps for m in model.modules() if isinstance(m, FrozenBatchNorm2d)}
    assert eps == {0.0}


def test_gn_backbone_and_zero_init_residual() -> None:
    model = ResNet(18, norm="gn", zero_init_residual=True).eval()
    assert isinstance(model.layer1[0].bn1, nn.GroupNorm)
    assert torch.count_nonzero(model.layer2[1].bn2.weight) == 0
    outs = model(torch.randn(1, 3, 33, 33))
    assert [tuple(o.shape[-2:]) for o in outs] == [(5, 5), (3, 3), (2, 2)]


# ----------------------------------------------------------------------------- DCN


def test_dcn_stages_build_and_run() -> None:
    if importlib.util.find_spec("dynadet.ops.deform_conv") is None:
        pytest.skip("dynadet.ops.deform_conv not available yet")
    with torch.device("meta"):
        r50 = ResNet(50, dcn_stages=(False, True, True, True))
    sd = r50.state_dict()
    assert "layer1.0.conv2.conv_offset.weight" not in sd
    for k, n in ((2, 4), (3, 6), (4, 3)):
        for b in range(n):
            assert f"layer{k}.{b}.conv2.conv_offset.weight" in sd
            assert f"layer{k}.{b}.conv2.weight" in sd
            assert f"layer{k}.{b}.conv2.bias" not in sd
    assert tuple(sd["layer2.0.conv2.weight"].shape) == (128, 128, 3, 3)
    assert tuple(sd["layer2.0.conv2.conv_offset.weight"].shape) == (27, 128, 3, 3)
    # Apart from the offset branch, the keys are those of the plain ResNet-50.
    with torch.device("meta"):
        plain = set(ResNet(50).state_dict())
    assert {k for k in sd if ".conv_offset." not in k} == plain

    torch.manual_seed(0)
    model = ResNet(50, dcn_stages=(False, True, False, False), out_indices=(0, 1)).eval()
    dcn = model.layer2[0].conv2
    assert torch.count_nonzero(dcn.conv_offset.weight) == 0
    with torch.no_grad():
        outs = model(torch.randn(1, 3, 33, 47))
    assert [tuple(o.shape[-2:]) for o in outs] == [(9, 12), (5, 6)]
    # Zero offsets and mask = sigmoid(0) = 0.5: the DCN is half the regular strided conv.
    feat = torch.randn(1, 128, 11, 9)
    with torch.no_grad():
        torch.testing.assert_close(
            dcn(feat), 0.5 * F.conv2d(feat, dcn.weight, stride=2, padding=1), rtol=1e-4, atol=1e-4
        )


def test_base_width_scales_every_stage() -> None:
    narrow = ResNet(depth=18, base_width=16, out_indices=(0, 1, 2, 3), norm="bn")
    assert narrow.out_channels == [16, 32, 64, 128]
    outs = narrow(torch.zeros(1, 3, 64, 64))
    assert [o.shape[1] for o in outs] == [16, 32, 64, 128]
    wide = ResNet(depth=50, base_width=32, out_indices=(3,), norm="bn")
    assert wide.out_channels == [1024]
