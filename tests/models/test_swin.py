"""Swin Transformer backbone: official key list, parameter count, shapes for odd sizes, shifted
windows against a slow float64 reference, stochastic depth, freezing, decay groups, preset."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from dynadet.api import build_model
from dynadet.config import load_config
from dynadet.engine.optim import build_optimizer
from dynadet.models.swin import (
    DropPath,
    SwinTransformer,
    WindowAttention,
    relative_position_index,
    shifted_window_mask,
    window_partition,
    window_reverse,
)

TINY = dict(embed_dim=8, depths=(1, 2), num_heads=(1, 2), window_size=3, drop_path_rate=0.0,
            out_indices=(0, 1))
TINY2 = dict(embed_dim=12, depths=(2, 2), num_heads=(2, 3), window_size=3, drop_path_rate=0.0,
             out_indices=(0, 1))


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Large random values everywhere (norm affines and bias tables too), so every term of the
    forward pass matters; the default init (std 0.02) would make attention nearly uniform."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return model


# ----------------------------------------------------------------------------- keys and size


def official_swin_keys(
    embed: int = 96, depths=(2, 2, 6, 2), heads=(3, 6, 12, 24), window: int = 7,
    out_indices=(1, 2, 3),
) -> dict[str, tuple[int, ...]]:
    """State dict of the Swin detection backbone (Swin-Transformer-Object-Detection, DyHead's
    extra/swint.py; the DyHead checkpoint holds it under ``backbone.backbone.bottom_up.``):
    key → shape, in module registration order; ``relative_position_index`` is a persistent
    buffer (``register_buffer`` without ``persistent=False``)."""
    keys: dict[str, tuple[int, ...]] = {
        "patch_embed.proj.weight": (embed, 3, 4, 4),
        "patch_embed.proj.bias": (embed,),
        "patch_embed.norm.weight": (embed,),
        "patch_embed.norm.bias": (embed,),
    }
    n = window * window
    for i, (depth, h) in enumerate(zip(depths, heads, strict=True)):
        c = embed * 2**i
        for j in range(depth):
            p = f"layers.{i}.blocks.{j}."
            keys.update({
                p + "norm1.weight": (c,), p + "norm1.bias": (c,),
                p + "attn.relative_position_bias_table": ((2 * window - 1) ** 2, h),
                p + "attn.relative_position_index": (n, n),
                p + "attn.qkv.weight": (3 * c, c), p + "attn.qkv.bias": (3 * c,),
                p + "attn.proj.weight": (c, c), p + "attn.proj.bias": (c,),
                p + "norm2.weight": (c,), p + "norm2.bias": (c,),
                p + "mlp.fc1.weight": (4 * c, c), p + "mlp.fc1.bias": (4 * c,),
                p + "mlp.fc2.weight": (c, 4 * c), p + "mlp.fc2.bias": (c,),
            })  # fmt: skip
        if i < len(depths) - 1:
            keys[f"layers.{i}.downsample.reduction.weight"] = (2 * c, 4 * c)
            keys[f"layers.{i}.downsample.norm.weight"] = (4 * c,)
            keys[f"layers.{i}.downsample.norm.bias"] = (4 * c,)
    for i in out_indices:
        keys[f"norm{i}.weight"] = (embed * 2**i,)
        keys[f"norm{i}.bias"] = (embed * 2**i,)
    return keys


def test_swin_t_state_dict_equals_official_key_list() -> None:
    sd = SwinTransformer().state_dict()
    want = official_swin_keys()
    assert list(sd) == list(want)
    assert {k: tuple(v.shape) for k, v in sd.items()} == want
    # the prefixes listed in the DyHead reference note (§4.1)
    assert {k.split(".")[0] for k in sd} == {"patch_embed", "layers", "norm1", "norm2", "norm3"}
    assert {int(k.split(".")[1]) for k in sd if ".downsample." in k} == {0, 1, 2}
    assert sd["layers.0.blocks.0.attn.relative_position_index"].dtype == torch.int64


def test_swin_t_parameter_count() -> None:
    # Closed form per block: norms 4C, qkv 3C²+3C, proj C²+C, MLP 8C²+5C, table 169·heads.
    dims, heads = (96, 192, 384, 768), (3, 6, 12, 24)
    block = [12 * c * c + 13 * c + 169 * h for c, h in zip(dims, heads, strict=True)]
    merge = [8 * c * c + 8 * c for c in (96, 192, 384)]
    body = 4704 + 192 + sum(d * b for d, b in zip((2, 2, 6, 2), block, strict=True)) + sum(merge)
    assert body == 27_517_818
    # Source: torchvision's swin_t ImageNet classifier has 28,288,354 parameters (its weights'
    # meta "num_params"), i.e. this body + final LayerNorm(768) + Linear(768, 1000).
    assert body + 2 * 768 + 768 * 1000 + 1000 == 28_288_354
    model = SwinTransformer()
    assert n_params(model) == body + 2 * (192 + 384 + 768) == 27_520_506  # + norm1..norm3
    assert n_params(SwinTransformer(out_indices=(0, 1, 2, 3))) == body + 2 * 1440


# ----------------------------------------------------------------------------- shapes


@pytest.fixture(scope="module")
def swin_t_all() -> SwinTransformer:
    return SwinTransformer(out_indices=(0, 1, 2, 3)).eval()


@pytest.mark.parametrize("size", [(97, 131), (64, 64), (5, 3), (1, 1)])
def test_swin_t_shapes_and_strides_for_any_size(
    swin_t_all: SwinTransformer, size: tuple[int, int]
) -> None:
    h, w = size
    assert swin_t_all.out_channels == [96, 192, 384, 768]
    assert swin_t_all.out_strides == [4, 8, 16, 32]
    with torch.no_grad():
        outs = swin_t_all(torch.randn(2, 3, h, w))
    hs, ws = [math.ceil(h / 4)], [math.ceil(w / 4)]
    for _ in range(3):
        hs.append(math.ceil(hs[-1] / 2))
        ws.append(math.ceil(ws[-1] / 2))
    assert [tuple(o.shape) for o in outs] == [
        (2, c, a, b) for c, a, b in zip(swin_t_all.out_channels, hs, ws, strict=True)
    ]
    assert all(o.is_contiguous() and torch.isfinite(o).all() for o in outs)


def test_default_outputs_are_c3_to_c5() -> None:
    model = SwinTransformer().eval()
    assert model.out_channels == [192, 384, 768] and model.out_strides == [8, 16, 32]
    with torch.no_grad():
        outs = model(torch.randn(1, 3, 97, 131))
    assert [tuple(o.shape[-2:]) for o in outs] == [(13, 17), (7, 9), (4, 5)]


# ----------------------------------------------------------------------------- window helpers


def test_window_partition_and_reverse() -> None:
    x = torch.randn(2, 6, 9, 5)
    win = window_partition(x, 3)
    assert win.shape == (2 * 6, 9, 5)
    # window k of image b holds rows 3·(k // 3).., cols 3·(k % 3).. in row-major order
    for b in range(2):
        for k in range(6):
            r, c = 3 * (k // 3), 3 * (k % 3)
            torch.testing.assert_close(win[b * 6 + k], x[b, r:r + 3, c:c + 3].reshape(9, 5))
    torch.testing.assert_close(window_reverse(win, 3, 6, 9), x)


def test_relative_position_index_hand_worked() -> None:
    # window 2: tokens (0,0),(0,1),(1,0),(1,1); index = (dy + 1)·3 + dx + 1
    want = torch.tensor([[4, 3, 1, 0], [5, 4, 2, 1], [7, 6, 4, 3], [8, 7, 5, 4]])
    assert torch.equal(relative_position_index(2), want)
    assert relative_position_index(7).max() == 168 and relative_position_index(7).min() == 0


def test_shifted_window_mask_hand_worked() -> None:
    # 4 x 2 map, window 2, shift 1: row regions 0,0,1,2 and column regions 1,2.
    mask = shifted_window_mask(4, 2, 2, 1)
    m = -100.0
    top = torch.tensor([[0, m, 0, m], [m, 0, m, 0], [0, m, 0, m], [m, 0, m, 0]])
    bottom = torch.tensor([[0, m, m, m], [m, 0, m, m], [m, m, 0, m], [m, m, m, 0]])
    torch.testing.assert_close(mask, torch.stack([top, bottom]))


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_sdpa_equals_explicit_softmax(dtype: torch.dtype, tol: float) -> None:
    torch.manual_seed(0)
    attn = randomize_(WindowAttention(12, 3, 3)).to(dtype)
    x = torch.randn(2 * 4, 9, 12, dtype=dtype)
    mask = shifted_window_mask(6, 6, 3, 1).to(dtype)
    for m in (None, mask):
        q, k, v = attn.qkv(x).view(8, 9, 3, 3, 4).permute(2, 0, 3, 1, 4)
        logits = (q * 4**-0.5) @ k.transpose(-2, -1) + attn.relative_position_bias()
        if m is not None:
            logits = (logits.view(2, 4, 3, 9, 9) + m[None, :, None]).view(8, 3, 9, 9)
        want = attn.proj((logits.softmax(-1) @ v).transpose(1, 2).reshape(8, 9, 12))
        torch.testing.assert_close(attn(x, m), want, atol=tol, rtol=tol)


# ----------------------------------------------------------------------------- slow reference


def _gelu(x: Tensor) -> Tensor:
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def slow_window_attention(y: Tensor, attn: WindowAttention, window: int, shift: int) -> Tensor:
    """Swin's definition on one padded, normalised map ``y [Hp, Wp, C]``: a token attends to
    the tokens of its window in the grid offset by ``shift`` (window of row r is
    ``floor((r − shift)/window)``; windows cut at the map border, no wrap-around), with the
    bias ``table[(dy + w − 1)(2w − 1) + dx + w − 1]`` of the coordinate difference. The
    reference's −100 logits for cross-region pairs weigh e^-100 ≈ 4e-44, i.e. nothing here."""
    hp, wp, c = y.shape
    heads = attn.num_heads
    d = c // heads
    q, k, v = (y @ attn.qkv.weight.T + attn.qkv.bias).split(c, dim=-1)
    table = attn.relative_position_bias_table
    tile_r = [(r - shift) // window for r in range(hp)]
    tile_c = [(col - shift) // window for col in range(wp)]
    out = torch.zeros_like(y)
    for r1 in range(hp):
        for c1 in range(wp):
            toks = [(r2, c2) for r2 in range(hp) for c2 in range(wp)
                    if tile_r[r2] == tile_r[r1] and tile_c[c2] == tile_c[c1]]
            rows = torch.tensor([t[0] for t in toks])
            cols = torch.tensor([t[1] for t in toks])
            idx = (r1 - rows + window - 1) * (2 * window - 1) + (c1 - cols + window - 1)
            for h in range(heads):
                sl = slice(h * d, (h + 1) * d)
                logits = k[rows, cols, sl] @ q[r1, c1, sl] / math.sqrt(d) + table[idx, h]
                out[r1, c1, sl] = logits.softmax(0) @ v[rows, cols, sl]
    return out @ attn.proj.weight.T + attn.proj.bias


def slow_swin(model: SwinTransformer, x: Tensor) -> list[Tensor]:
    """Loop/definition-based forward of :class:`SwinTransformer` (float64, per image)."""

    def ln(t: Tensor, norm: nn.LayerNorm) -> Tensor:
        mu = t.mean(-1, keepdim=True)
        var = ((t - mu) ** 2).mean(-1, keepdim=True)
        return (t - mu) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias

    results: list[list[Tensor]] = []
    for img in x:
        p = model.patch_embed.patch
        h, w = math.ceil(img.shape[1] / p), math.ceil(img.shape[2] / p)
        padded = torch.zeros(3, h * p, w * p, dtype=img.dtype)
        padded[:, : img.shape[1], : img.shape[2]] = img
        patches = padded.view(3, h, p, w, p)
        proj = model.patch_embed.proj
        t = torch.einsum("chpwq,ocpq->hwo", patches, proj.weight) + proj.bias
        t = ln(t, model.patch_embed.norm)
        outs = []
        for i, stage in enumerate(model.layers):
            win = stage.window
            for blk in stage.blocks:
                hh, ww, c = t.shape
                hp, wp = math.ceil(hh / win) * win, math.ceil(ww / win) * win
                y = torch.zeros(hp, wp, c, dtype=t.dtype)
                y[:hh, :ww] = ln(t, blk.norm1)
                t = t + slow_window_attention(y, blk.attn, win, blk.shift)[:hh, :ww]
                z = ln(t, blk.norm2)
                z = _gelu(z @ blk.mlp.fc1.weight.T + blk.mlp.fc1.bias)
                t = t + z @ blk.mlp.fc2.weight.T + blk.mlp.fc2.bias
            if i in model.out_indices:
                outs.append(ln(t, getattr(model, f"norm{i}")).permute(2, 0, 1))
            if i == model.out_indices[-1]:
                break
            hh, ww, c = t.shape
            merged = torch.zeros(math.ceil(hh / 2), math.ceil(ww / 2), 4 * c, dtype=t.dtype)
            for a in range(merged.shape[0]):
                for b in range(merged.shape[1]):
                    for slot, (dr, dc) in enumerate(((0, 0), (1, 0), (0, 1), (1, 1))):
                        if 2 * a + dr < hh and 2 * b + dc < ww:
                            merged[a, b, slot * c:(slot + 1) * c] = t[2 * a + dr, 2 * b + dc]
            ds = stage.downsample
            t = ln(merged, ds.norm) @ ds.reduction.weight.T
        results.append(outs)
    return [torch.stack(level) for level in zip(*results, strict=True)]


@pytest.mark.parametrize("cfg,size", [(TINY, (37, 53)), (TINY, (9, 9)), (TINY2, (24, 29))])
def test_forward_equals_slow_reference(cfg: dict, size: tuple[int, int]) -> None:
    # window 3 on 10x14 (padded 12x15) and 5x7 (6x9); 3x3 and 2x2 (padded 3x3, smaller than a
    # window but still shifted, as in the reference); TINY2 shifts in both stages.
    model = randomize_(SwinTransformer(**cfg)).double().eval()
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    fast = model(x)
    slow = slow_swin(model, x)
    assert len(fast) == len(slow) == 2
    for f, s in zip(fast, slow, strict=True):
        assert f.shape == s.shape
        torch.testing.assert_close(f, s, atol=1e-9, rtol=0)


def test_gradients_equal_slow_reference() -> None:
    model = randomize_(SwinTransformer(**TINY)).double().eval()
    x = torch.randn(1, 3, 21, 26, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    weights = [torch.randn_like(o) for o in model(x)]

    def grads(fn) -> dict[str, Tensor]:
        model.zero_grad()
        sum((o * wt).sum() for o, wt in zip(fn(model, x), weights, strict=True)).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    fast = grads(lambda m, t: m(t))
    slow = grads(slow_swin)
    assert fast["layers.1.blocks.1.attn.relative_position_bias_table"].abs().sum() > 0
    for name in fast:
        torch.testing.assert_close(fast[name], slow[name], atol=1e-8, rtol=1e-8, msg=name)


# ----------------------------------------------------------------------------- training modes


def test_drop_path_module() -> None:
    dp = DropPath(0.25)
    x = torch.ones(4000, 3)
    y = dp(x)
    kept = y[:, 0] != 0
    assert torch.equal(y[kept], torch.full_like(y[kept], 1 / 0.75))  # whole samples, rescaled
    assert torch.equal(y[~kept], torch.zeros_like(y[~kept]))
    assert 0.7 < kept.float().mean() < 0.8
    assert torch.equal(dp.eval()(x), x)


def test_drop_path_rates_and_eval_mode() -> None:
    cfg = dict(TINY2, drop_path_rate=0.6)
    model = SwinTransformer(**cfg)
    rates = [b.drop_path.p for s in model.layers for b in s.blocks]
    assert rates == pytest.approx([0.0, 0.2, 0.4, 0.6])
    plain = SwinTransformer(**TINY2)
    plain.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 30, 22)
    model.eval()
    plain.eval()
    for a, b in zip(model(x), plain(x), strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)  # no stochastic depth in eval
    torch.manual_seed(0)
    train_out = model.train()(x)
    assert any(not torch.allclose(a, b) for a, b in zip(train_out, plain(x), strict=True))


@pytest.mark.parametrize("frozen", [-1, 0, 1, 2])
def test_frozen_stages(frozen: int) -> None:
    model = SwinTransformer(**dict(TINY2, drop_path_rate=0.3), frozen_stages=frozen).train()
    frozen_prefixes = (["patch_embed."] if frozen >= 0 else []) + [
        p for i in range(max(frozen, 0)) for p in (f"layers.{i}.", f"norm{i}.")
    ]
    for name, p in model.named_parameters():
        assert p.requires_grad != name.startswith(tuple(frozen_prefixes)), name
    for name, m in model.named_modules():
        if name and (name + ".").startswith(tuple(frozen_prefixes)):
            assert not m.training, name
    assert model.layers[-1].training == (frozen < 2)
    if frozen < 2:
        sum(o.sum() for o in model(torch.randn(1, 3, 20, 20))).backward()
        for name, p in model.named_parameters():
            assert (p.grad is None) == (not p.requires_grad), name
    with pytest.raises(ValueError, match="frozen_stages"):
        SwinTransformer(**TINY2, frozen_stages=3)


def test_param_groups_no_decay_on_norms_and_bias_tables() -> None:
    train = load_config("dyhead_swint_atss_fpn_2x_ms")["train"]
    assert train["optimizer"] == "adamw" and train["lr"] == 1e-4 and train["batch_size"] == 32
    model = SwinTransformer(**TINY2)
    optimizer = build_optimizer(model, train)  # what the trainer does with the train section
    assert isinstance(optimizer, torch.optim.AdamW)
    decay_of = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    assert all(g["lr"] == 1e-4 for g in optimizer.param_groups)
    norm_ids = {id(p) for m in model.modules() if isinstance(m, nn.LayerNorm)
                for p in m.parameters()}
    n_zero = 0
    for name, p in model.named_parameters():
        zero = id(p) in norm_ids or name.endswith("relative_position_bias_table")
        assert decay_of[id(p)] == (0.0 if zero else 0.05), name
        n_zero += zero
    # 2 per LayerNorm: patch_embed, 2 per block (4 blocks), 1 merging, 2 outputs; 1 table/block
    assert n_zero == 2 * (1 + 8 + 1 + 2) + 4


# ----------------------------------------------------------------------------- preset


def test_preset_builds_swin_t_dyhead_and_runs() -> None:
    small = ["model.preprocess.min_size=64", "model.preprocess.max_size=64",
             "model.preprocess.test_min_size=64", "model.head.num_classes=3"]
    cfg = load_config("dyhead_swint_atss_fpn_2x_ms", small)
    pre = load_config("dyhead_swint_atss_fpn_2x_ms")["model"]["preprocess"]
    assert pre["min_size"] == [640, 672, 704, 736, 768, 800] and pre["test_min_size"] == 800
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    backbone = model.backbone
    assert isinstance(backbone, SwinTransformer) and backbone.out_channels == [192, 384, 768]
    assert model.neck[0].in_channels == backbone.out_channels
    assert n_params(backbone) == 27_520_506
    assert n_params(model.neck[1]) == 11_503_656  # 6 DyHead blocks with DCN bias (reference §1)
    assert [b.drop_path.p for s in backbone.layers for b in s.blocks][-1] == pytest.approx(0.2)
    with torch.no_grad():
        results = model([torch.rand(3, 64, 64) * 255])
    assert len(results) == 1 and results[0]["boxes"].shape[1] == 4
    assert torch.isfinite(results[0]["boxes"]).all()
