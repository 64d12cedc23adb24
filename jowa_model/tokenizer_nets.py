"""Encoder / decoder convnets of the VQ-VAE (paper Tables 8-9; taming-transformers layout as used by IRIS/JOWA).

Module and parameter names follow the official JOWA tokenizer (`conv_in`, `down[i].block[j]`, `mid.attn_1`,
`up[i].upsample.conv`, `norm_out`, ...), so with the `paper` preset an official state dict loads as is.
Atari frames are small (1x84x84), hence GroupNorm with 2 groups and the /7 then /2 downsampling (84 -> 12 -> 6).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from jowa_model.tokenizer_config import TokenizerConfig


def swish(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


class ResnetBlock(nn.Module):
    """GN, swish, conv3, GN, swish, dropout, conv3, plus the (1x1-projected when widths differ) input."""

    def __init__(self, c_in: int, c_out: int, groups: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, c_in, eps=1e-6)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, c_out, eps=1e-6)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(self.dropout(swish(self.norm2(h))))
        if self.nin_shortcut is not None:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the h*w positions (1x1 q/k/v/proj convs), with a residual."""

    def __init__(self, c: int, groups: int) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(groups, c, eps=1e-6)
        self.q, self.k, self.v = nn.Conv2d(c, c, 1), nn.Conv2d(c, c, 1), nn.Conv2d(c, c, 1)
        self.proj_out = nn.Conv2d(c, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        hn = self.norm(x)
        q = self.q(hn).flatten(2).transpose(1, 2)  # (b, hw, c)
        k = self.k(hn).flatten(2).transpose(1, 2)
        v = self.v(hn).flatten(2).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(c)) v
        return x + self.proj_out(out.transpose(1, 2).reshape(b, c, h, w))


class Downsample(nn.Module):
    """Zero-pad right/bottom by 1, then conv with kernel f+1, stride f (84 -> 12 for f=7, 12 -> 6 for f=2)."""

    def __init__(self, c: int, factor: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, factor + 1, stride=factor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour x f, then conv3."""

    def __init__(self, c: int, factor: int) -> None:
        super().__init__()
        self.factor = factor
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=self.factor, mode="nearest"))


def _level(blocks: list[nn.Module], attns: list[nn.Module]) -> nn.Module:
    m = nn.Module()
    m.block = nn.ModuleList(blocks)
    m.attn = nn.ModuleList(attns)
    return m


def _run_level(level: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """The residual blocks of one resolution level, each followed by its attention block when the level has them."""
    for j, block in enumerate(level.block):
        h = block(h)
        if len(level.attn):
            h = level.attn[j](h)
    return h


def _mid(c: int, groups: int, dropout: float) -> nn.Module:
    m = nn.Module()
    m.block_1 = ResnetBlock(c, c, groups, dropout)
    m.attn_1 = AttnBlock(c, groups)
    m.block_2 = ResnetBlock(c, c, groups, dropout)
    return m


class Encoder(nn.Module):
    """(N, 1, 84, 84) in [-1, 1] -> (N, z_channels, 6, 6)."""

    def __init__(self, cfg: "TokenizerConfig") -> None:
        super().__init__()
        g, n_levels = cfg.gn_groups, len(cfg.ch_mult)
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        res, c_in = cfg.resolution, cfg.ch
        self.down = nn.ModuleList()
        for i in range(n_levels):
            c_out = cfg.ch * cfg.ch_mult[i]
            blocks, attns = [], []
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResnetBlock(c_in, c_out, g, cfg.dropout))
                c_in = c_out
                if res in cfg.attn_resolutions:
                    attns.append(AttnBlock(c_in, g))
            level = _level(blocks, attns)
            if i < n_levels - 1:
                level.downsample = Downsample(c_in, cfg.down_factors[i])
                res //= cfg.down_factors[i]
            self.down.append(level)
        self.mid = _mid(c_in, g, cfg.dropout)
        self.norm_out = nn.GroupNorm(g, c_in, eps=1e-6)
        self.conv_out = nn.Conv2d(c_in, cfg.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = _run_level(level, h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(swish(self.norm_out(h)))


class Decoder(nn.Module):
    """(N, z_channels, 6, 6) -> (N, 1, 84, 84) in about [-1, 1].

    `up[i]` is stored in encoder order (up[0] = full resolution) and run from the last to the first.
    The upsampling factors are applied from the lowest resolution: official x7 (6 -> 42) then x2 (42 -> 84).
    With `decoder_attn=False` (official) there is attention only in the mid block: the official code starts its
    resolution counter at 84 // 21 = 4 ("bug in decoder"), so no level ever matches `attn_resolutions`.
    """

    def __init__(self, cfg: "TokenizerConfig") -> None:
        super().__init__()
        g, n_levels = cfg.gn_groups, len(cfg.ch_mult)
        c_in = cfg.ch * cfg.ch_mult[-1]
        res = cfg.grid_size
        self.conv_in = nn.Conv2d(cfg.z_channels, c_in, 3, padding=1)
        self.mid = _mid(c_in, g, cfg.dropout)
        levels: list[nn.Module] = []
        for k, i in enumerate(reversed(range(n_levels))):
            c_out = cfg.ch * cfg.ch_mult[i]
            blocks, attns = [], []
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResnetBlock(c_in, c_out, g, cfg.dropout))
                c_in = c_out
                if cfg.decoder_attn and res in cfg.attn_resolutions:
                    attns.append(AttnBlock(c_in, g))
            level = _level(blocks, attns)
            if i > 0:
                level.upsample = Upsample(c_in, cfg.up_factors[k])
                res *= cfg.up_factors[k]
            levels.insert(0, level)
        self.up = nn.ModuleList(levels)
        self.norm_out = nn.GroupNorm(g, c_in, eps=1e-6)
        self.conv_out = nn.Conv2d(c_in, cfg.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for level in reversed(self.up):
            h = _run_level(level, h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(swish(self.norm_out(h)))


def official_init_(module: nn.Module) -> None:
    """Official JOWA init for encoder/decoder: orthogonal weights (conv gain sqrt(2), linear gain 1), zero bias."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            gain = 2 ** 0.5 if isinstance(m, nn.Conv2d) else 1.0
            nn.init.orthogonal_(m.weight, gain=gain)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class PatchEncoder(nn.Module):
    """`arch="patch"` (the `tiny` preset): each grid cell's pixels (14x14 for 84 -> 6x6) through one shared MLP,
    (N, 1, 84, 84) -> (N, z_channels, 6, 6). A cell's code depends on its own pixels only, so equal patches get
    equal tokens. Not in the paper: on a CPU it trains ~6x more frames/s than the narrow convnet and, with the
    foreground-weighted L1, keeps sprites that the convnet blurs away at the same wall time (docs/tokenizer.md)."""

    def __init__(self, cfg: "TokenizerConfig") -> None:
        super().__init__()
        self.patch = cfg.resolution // cfg.grid_size
        d, h = cfg.in_channels * self.patch ** 2, cfg.patch_hidden
        # arch="cells": the cell's pixels are its code vector (the codebook holds cell images)
        self.net = nn.Identity() if cfg.arch == "cells" else nn.Sequential(
            nn.Linear(d, h), nn.GELU(), nn.Linear(h, h), nn.GELU(), nn.Linear(h, cfg.z_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, r, _ = x.shape
        g = r // self.patch
        cells = F.unfold(x, self.patch, stride=self.patch).transpose(1, 2)  # (N, g*g, C*p*p), row-major grid
        return self.net(cells).transpose(1, 2).reshape(n, -1, g, g)


class PatchDecoder(nn.Module):
    """`arch="patch"`: each cell's code vector back to its pixels through one shared MLP (the inverse layout).
    `arch="cells"` uses both classes with no MLP: cells are cut out and put back, the codebook does the rest."""

    def __init__(self, cfg: "TokenizerConfig") -> None:
        super().__init__()
        self.patch, self.resolution = cfg.resolution // cfg.grid_size, cfg.resolution
        d, h = cfg.out_channels * self.patch ** 2, cfg.patch_hidden
        self.net = nn.Identity() if cfg.arch == "cells" else nn.Sequential(
            nn.Linear(cfg.z_channels, h), nn.GELU(), nn.Linear(h, h), nn.GELU(), nn.Linear(h, d))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        cells = self.net(z.flatten(2).transpose(1, 2))  # (N, g*g, C*p*p)
        r = self.resolution
        return F.fold(cells.transpose(1, 2), (r, r), self.patch, stride=self.patch)
