"""Swin Transformer backbone (Liu et al., ICCV 2021) in its detection form.

Module and parameter names equal those of the Swin detection backbone that DyHead's
``extra/swint.py`` uses (``patch_embed.proj/norm``, ``layers.{i}.blocks.{j}.{norm1, attn.qkv,
attn.proj, attn.relative_position_bias_table, attn.relative_position_index, norm2, mlp.fc1,
mlp.fc2}``, ``layers.{i}.downsample.{norm, reduction}``, output norms ``norm{i}``), so its
weights load under the prefix ``backbone.``. ``relative_position_index`` is a persistent buffer
there and here, so it is part of the state dict.

Internally feature maps are channels-last ``[B, H, W, C]``; windows are cut and pasted back
with ``view``/``permute`` only.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Additive logit for token pairs from different regions of a shifted window. The reference uses
# -100, not -inf: masked pairs keep a weight of ~e^-100, and released weights were trained so.
SHIFT_MASK_VALUE = -100.0


def window_partition(x: Tensor, window: int) -> Tensor:
    """``[B, H, W, C]`` (H, W multiples of ``window``) → ``[B·nW, window², C]``, windows in
    row-major order per image."""
    b, h, w, c = x.shape
    x = x.view(b, h // window, window, w // window, window, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, window * window, c)


def window_reverse(windows: Tensor, window: int, h: int, w: int) -> Tensor:
    """Inverse of :func:`window_partition`: ``[B·nW, window², C]`` → ``[B, H, W, C]``."""
    c = windows.shape[-1]
    x = windows.view(-1, h // window, w // window, window, window, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, h, w, c)


def relative_position_index(window: int) -> Tensor:
    """``[window², window²]`` int64: row of the bias table for token pair (i, j), i.e.
    ``(dy + window − 1)·(2·window − 1) + dx + window − 1`` with ``(dy, dx) = pos_i − pos_j``."""
    ys, xs = torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    dy = ys[:, None] - ys[None, :] + window - 1
    dx = xs[:, None] - xs[None, :] + window - 1
    return dy * (2 * window - 1) + dx


def shifted_window_mask(
    h: int, w: int, window: int, shift: int, device: torch.device | None = None
) -> Tensor:
    """``[nW, window², window²]`` additive mask (0 or ``SHIFT_MASK_VALUE``) for the padded map
    of size ``h × w`` rolled by ``−shift``: each axis splits into ``[0, n−window)``,
    ``[n−window, n−shift)``, ``[n−shift, n)``, and tokens of different regions of the same
    window may not attend to each other."""

    def region(n: int) -> Tensor:
        r = torch.arange(n, device=device)
        return (r >= n - window).long() + (r >= n - shift).long()

    label = region(h)[:, None] * 3 + region(w)[None, :]
    label = window_partition(label[None, :, :, None], window).squeeze(-1)
    mask = torch.zeros(label.shape + label.shape[-1:], device=device)
    return mask.masked_fill_(label[:, :, None] != label[:, None, :], SHIFT_MASK_VALUE)


class DropPath(nn.Module):
    """Stochastic depth: in training, zeroes a whole sample's residual branch with probability
    ``p`` and scales the kept ones by ``1/(1−p)``; identity in eval mode. Any shape ``[B, ...]``."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"drop path probability must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p}"


class Mlp(nn.Module):
    """``fc1 → GELU → fc2`` on the last axis: ``[..., C] → [..., C]``."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class WindowAttention(nn.Module):
    """Multi-head self-attention inside windows with a learned relative position bias.

    ``forward(x[M, N, C], shift_mask[nW, N, N] | None) → [M, N, C]`` where ``N = window²`` and
    ``M = B·nW`` (windows of one image consecutive). Logits are
    ``q·kᵀ/√d + table[index] (+ shift_mask)``, computed by ``F.scaled_dot_product_attention``
    with the bias as an additive float mask.
    """

    def __init__(self, dim: int, num_heads: int, window: int, qkv_bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"channels {dim} are not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.window = window
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros((2 * window - 1) ** 2, num_heads)
        )
        self.register_buffer("relative_position_index", relative_position_index(window))
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def relative_position_bias(self) -> Tensor:
        """``[heads, N, N]`` bias gathered from the table."""
        n = self.window * self.window
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        return bias.view(n, n, self.num_heads).permute(2, 0, 1)

    def forward(self, x: Tensor, shift_mask: Tensor | None = None) -> Tensor:
        m, n, c = x.shape
        heads = self.num_heads
        q, k, v = self.qkv(x).view(m, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4).unbind(0)
        bias = self.relative_position_bias().to(q.dtype)[None]
        if shift_mask is not None:
            num_windows = shift_mask.shape[0]
            bias = bias + shift_mask.to(q.dtype)[:, None]
            bias = bias.expand(m // num_windows, -1, -1, -1, -1).reshape(m, heads, n, n)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.proj(out.transpose(1, 2).reshape(m, n, c))


class SwinBlock(nn.Module):
    """Pre-norm (shifted-)window attention and MLP, each residual with stochastic depth.

    ``forward(x[B, H, W, C], shift_mask) → [B, H, W, C]``. After ``norm1`` the map is zero
    padded at the bottom/right to multiples of the window (padded tokens take part in the
    attention, as in the reference), rolled by ``−shift`` when ``shift > 0``, attended per
    window, and cropped back.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window: int,
        shift: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        if not 0 <= shift < window:
            raise ValueError(f"shift must be in [0, window), got shift={shift}, window={window}")
        self.window = window
        self.shift = shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, num_heads, window, qkv_bias)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor, shift_mask: Tensor | None = None) -> Tensor:
        _, h, w, _ = x.shape
        win, s = self.window, self.shift
        hp, wp = -(-h // win) * win, -(-w // win) * win
        y = F.pad(self.norm1(x), (0, 0, 0, wp - w, 0, hp - h))
        if s:
            y = torch.roll(y, (-s, -s), (1, 2))
        y = self.attn(window_partition(y, win), shift_mask if s else None)
        y = window_reverse(y, win, hp, wp)
        if s:
            y = torch.roll(y, (s, s), (1, 2))
        x = x + self.drop_path(y[:, :h, :w])
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchMerging(nn.Module):
    """2×2 neighbourhood concat + LayerNorm + linear: ``[B, H, W, C] → [B, ⌈H/2⌉, ⌈W/2⌉, 2C]``
    (odd sizes zero padded at the bottom/right; concat order (0,0), (1,0), (0,1), (1,1) as
    (row, col) offsets, as in the reference weights)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        # registration order as in the reference, so state-dict key order matches too
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim)

    def forward(self, x: Tensor) -> Tensor:
        _, h, w, _ = x.shape
        x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2))
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
        return self.reduction(self.norm(x))


class PatchEmbed(nn.Module):
    """Non-overlapping ``patch × patch`` conv (input zero padded to a multiple of ``patch``),
    then LayerNorm: ``[B, 3, H, W] → [B, ⌈H/p⌉, ⌈W/p⌉, C]`` (channels last)."""

    def __init__(self, patch: int, in_channels: int, dim: int, norm: bool = True) -> None:
        super().__init__()
        self.patch = patch
        self.proj = nn.Conv2d(in_channels, dim, patch, stride=patch)
        self.norm = nn.LayerNorm(dim) if norm else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        x = F.pad(x, (0, -w % self.patch, 0, -h % self.patch))
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


class SwinStage(nn.Module):
    """Blocks of one stage (odd-indexed blocks shifted by ``window // 2``) and the
    :class:`PatchMerging` that feeds the next stage (``None`` on the last stage; the backbone
    applies it). ``forward(x[B, H, W, C]) → [B, H, W, C]``; the shifted-window mask is built
    once per call for the padded size."""

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        window: int,
        mlp_ratio: float,
        qkv_bias: bool,
        drop_path: Sequence[float],
        downsample: bool,
    ) -> None:
        super().__init__()
        self.window = window
        self.shift = window // 2
        self.blocks = nn.ModuleList(
            SwinBlock(dim, num_heads, window, 0 if j % 2 == 0 else self.shift, mlp_ratio,
                      qkv_bias, drop_path[j])
            for j in range(depth)
        )
        self.downsample = PatchMerging(dim) if downsample else None

    def forward(self, x: Tensor) -> Tensor:
        mask = None
        if self.shift and len(self.blocks) > 1:
            hp, wp = (-(-n // self.window) * self.window for n in x.shape[1:3])
            mask = shifted_window_mask(hp, wp, self.window, self.shift, x.device)
        for block in self.blocks:
            x = block(x, mask)
        return x


class SwinTransformer(nn.Module):
    """Swin Transformer backbone returning normalised stage outputs.

    ``forward(x[N, 3, H, W]) -> list[Tensor]``: for each stage ``i`` in ``out_indices`` the
    stage output after its LayerNorm ``norm{i}``, ``[N, embed_dim·2^i, h_i, w_i]`` with stride
    ``patch·2^i``; ``h_0 = ⌈H/patch⌉`` and ``h_{i+1} = ⌈h_i/2⌉`` (any input size works: the
    patch embedding, every window attention and every patch merging pad at the bottom/right).
    ``out_channels`` / ``out_strides`` describe the returned maps. Defaults are Swin-T
    (embed 96, depths 2-2-6-2, heads 3-6-12-24, window 7, stochastic depth 0.2 rising linearly
    from 0 over the blocks) with DyHead's outputs, stages 1–3 (C3–C5, strides 8/16/32,
    channels 192/384/768). No absolute position embedding (``APE=False`` in every config here).

    Args:
        frozen_stages: -1 nothing frozen; 0 ``patch_embed``; ``k ≥ 1`` also ``layers.0..k-1``
            and their output norms (ResNet's and mmdet's convention; Swin-Transformer-Object-
            Detection and DyHead's ``extra/swint.py`` freeze one stage fewer for the same
            ``k``). Frozen parts get ``requires_grad=False`` and stay in eval mode.
        drop_path_rate: stochastic depth of the last block; block ``b`` of ``sum(depths)``
            uses ``drop_path_rate·b/(sum(depths)−1)``.
    Initialisation (no pretrained weights): linear weights truncated normal (std 0.02,
    bias 0), relative position bias tables truncated normal (std 0.02), LayerNorms 1/0, the
    patch projection PyTorch's default.
    """

    def __init__(
        self,
        embed_dim: int = 96,
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        window_size: int = 7,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path_rate: float = 0.2,
        patch_size: int = 4,
        in_channels: int = 3,
        patch_norm: bool = True,
        out_indices: Sequence[int] = (1, 2, 3),
        frozen_stages: int = -1,
    ) -> None:
        super().__init__()
        depths, num_heads, out_indices = tuple(depths), tuple(num_heads), tuple(out_indices)
        num_stages = len(depths)
        if num_stages == 0 or len(num_heads) != num_stages or min(depths) < 1:
            raise ValueError(f"depths {depths} and num_heads {num_heads} need one positive "
                             "entry per stage")
        if not out_indices or list(out_indices) != sorted(set(out_indices)) or not all(
            0 <= i < num_stages for i in out_indices
        ):
            raise ValueError(f"out_indices must be a strictly increasing subset of "
                             f"0..{num_stages - 1}, got {out_indices}")
        if not -1 <= frozen_stages <= num_stages:
            raise ValueError(f"frozen_stages must be in -1..{num_stages}, got {frozen_stages}")
        if window_size < 1:
            raise ValueError(f"window_size must be positive, got {window_size}")
        self.out_indices = out_indices
        self.frozen_stages = frozen_stages

        self.patch_embed = PatchEmbed(patch_size, in_channels, embed_dim, patch_norm)
        rates = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        dims = [embed_dim * 2**i for i in range(num_stages)]
        self.layers = nn.ModuleList()
        for i, depth in enumerate(depths):
            start = sum(depths[:i])
            self.layers.append(SwinStage(
                dims[i], depth, num_heads[i], window_size, mlp_ratio, qkv_bias,
                rates[start : start + depth], downsample=i < num_stages - 1,
            ))  # fmt: skip
        for i in out_indices:
            self.add_module(f"norm{i}", nn.LayerNorm(dims[i]))
        self.out_channels: list[int] = [dims[i] for i in out_indices]
        self.out_strides: list[int] = [patch_size * 2**i for i in out_indices]

        self._init_weights()
        self._freeze_stages()
        self.train()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, WindowAttention):
                nn.init.trunc_normal_(m.relative_position_bias_table, std=0.02)

    def _frozen_modules(self) -> list[nn.Module]:
        if self.frozen_stages < 0:
            return []
        mods: list[nn.Module] = [self.patch_embed]
        for i in range(self.frozen_stages):
            mods.append(self.layers[i])
            if i in self.out_indices:
                mods.append(getattr(self, f"norm{i}"))
        return mods

    def _freeze_stages(self) -> None:
        for m in self._frozen_modules():
            m.eval()
            for p in m.parameters():
                p.requires_grad_(False)

    def train(self, mode: bool = True) -> SwinTransformer:
        """Set train/eval mode, keeping frozen stages in eval (no stochastic depth there)."""
        super().train(mode)
        for m in self._frozen_modules():
            m.eval()
        return self

    def forward(self, x: Tensor) -> list[Tensor]:
        x = self.patch_embed(x)
        outs = []
        # Stages past the last requested one are kept (so checkpoints load) but not run.
        for i in range(self.out_indices[-1] + 1):
            stage = self.layers[i]
            x = stage(x)
            if i in self.out_indices:
                out = getattr(self, f"norm{i}")(x)
                outs.append(out.permute(0, 3, 1, 2).contiguous())
            if i < self.out_indices[-1]:
                x = stage.downsample(x)
        return outs
