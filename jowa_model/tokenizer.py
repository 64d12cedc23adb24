"""VQ-VAE frame tokenizer: 84x84 grayscale frame <-> 36 tokens (6x6 grid) from a 2048-entry codebook.

Paper: Tables 8-9 (architecture) and appendix E (loss: L1 + codebook + commitment + LPIPS, all weight 1).
Public API: `Tokenizer.encode(frames u8 (N,84,84)) -> tokens (N,36)`, `.decode(tokens) -> frames u8`,
`.compute_loss(frames) -> (loss, metrics)`, `save_tokenizer` / `load_tokenizer` / `tokenizer_checksum`.

Presets: `paper` reproduces the official JOWA layout exactly (parameter names, GroupNorm(2), /7 then /2
downsampling, x7 then x2 upsampling, and the decoder's "no attention outside the mid block" quirk), so an
official state dict loads with `load_official_tokenizer`. `tiny` keeps the 6x6 grid and the 2048 vocabulary
(token shards keep their uint16 meaning) but is narrow enough to train on a CPU in minutes.

Determinism: tokens are an argmin over codebook distances. On CPU in fp32, the same frames give the same
tokens (also across chunk sizes). With `dtype=torch.bfloat16` the encoder runs under autocast; the distances
are still computed in fp32 but from bf16-rounded encoder outputs (~3 significant digits), so the few tokens
whose two nearest codes are nearly tied can differ from the fp32 tokens. Build datasets in one precision.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from jowa_common.config import config_from_dict, config_to_dict
from jowa_common.errors import CheckpointError, ConfigError, JowaError
from jowa_common.io import atomic_torch_save, safe_torch_load, sha256_file
from jowa_model.tokenizer_config import TokenizerConfig
from jowa_model.tokenizer_nets import Decoder, Encoder, PatchDecoder, PatchEncoder, official_init_

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "jowa-tokenizer"
CHECKPOINT_VERSION = 1


def tokenizer_preset(name: str) -> TokenizerConfig:
    """`paper`: Tables 8-9 / official layout (4.05M params). `tiny`: patch MLPs, a VQ-VAE small enough to train in CPU
    tests (same 6x6 x 2048 tokens). `cells`: a k-means codebook of cell images, what `jowa bench learn` and the main
    job use. `tiny_conv`: the convnet `tiny` used to be (an ablation baseline)."""
    if name == "paper":
        return TokenizerConfig()
    if name == "tiny":
        # Per-cell MLPs instead of the convnet and a foreground-weighted L1: the narrow convnet this preset used to be
        # (ch 16, one block per level) reconstructed no sprite in 800 steps (moving-pixel L1 0.116, no better than
        # the game's median frame, 0.112); the patch MLPs reach 0.055 in 3000 steps of 64 frames, in the same wall
        # time as 800 convnet steps of 32 (docs/tokenizer.md). Perceptual loss off: LPIPS-VGG fwd+bwd costs
        # ~80 ms/frame on this CPU, far more than the model.
        return TokenizerConfig(arch="patch", ch=16, num_res_blocks=1, attn_resolutions=(6,), z_channels=64,
                               embed_dim=64, patch_hidden=512, foreground_weight=30.0, perceptual="off")
    if name == "cells":
        # No networks: a code is a 14x14 cell image, a frame's tokens are its cells' nearest codes, and the codebook is
        # fitted by k-means over the training frames' cells (jowa_model/cell_codebook.py). On the frames of
        # `jowa bench learn` it reaches a 12x lower L1 than the patch MLPs' 3,000 steps and 2x lower on moving
        # pixels in under a minute, and draws Breakout's ball, which no gradient-trained CPU tokenizer here did
        # (docs/tokenizer.md).
        return TokenizerConfig(arch="cells", z_channels=196, embed_dim=196, perceptual="off")
    if name == "tiny_conv":
        # What `tiny` was before the patch MLPs: narrow convs at 84x84, one block per level, attention only at 6x6,
        # plain L1. Kept for the ablation in `jowa bench learn --set tokenizer_baseline=true`.
        return TokenizerConfig(ch=16, num_res_blocks=1, attn_resolutions=(6,), z_channels=64, embed_dim=64,
                               perceptual="off")
    raise ConfigError(f"unknown tokenizer preset {name!r} (choose 'paper', 'tiny', 'cells' or 'tiny_conv')")


@dataclass
class TokenizerOutput:
    z: torch.Tensor  # (N, E, g, g) encoder output after the pre-quant conv
    z_q: torch.Tensor  # (N, E, g, g) nearest codebook vectors (gradient flows to the codebook)
    tokens: torch.Tensor  # (N, g*g) long, row-major over the grid
    recon: torch.Tensor  # (N, 1, 84, 84) decoder output in about [-1, 1]


def _to_tensor(frames: Any) -> tuple[torch.Tensor, bool]:
    """numpy/torch -> torch tensor; also says whether the input was numpy (output matches input kind)."""
    if isinstance(frames, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(frames)), True
    if isinstance(frames, torch.Tensor):
        return frames, False
    raise TypeError(f"expected a numpy array or torch tensor, got {type(frames).__name__}")


class Tokenizer(nn.Module):
    """VQ-VAE with nearest-code quantisation and the straight-through estimator."""

    def __init__(self, cfg: TokenizerConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg = cfg or TokenizerConfig()
        per_cell = cfg.arch in ("patch", "cells")
        convs = cfg.arch != "cells"  # cells: codes are cell images, nothing to project
        self.encoder = PatchEncoder(cfg) if per_cell else Encoder(cfg)
        self.pre_quant_conv = nn.Conv2d(cfg.z_channels, cfg.embed_dim, 1) if convs else nn.Identity()
        self.embedding = nn.Embedding(cfg.vocab_size, cfg.embed_dim)  # the codebook
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1) if convs else nn.Identity()
        self.decoder = PatchDecoder(cfg) if per_cell else Decoder(cfg)
        if cfg.init == "official" and cfg.arch == "conv":
            official_init_(self.encoder)
            official_init_(self.decoder)
        nn.init.uniform_(self.embedding.weight, -1.0 / cfg.vocab_size, 1.0 / cfg.vocab_size)
        # The frozen LPIPS net is not a submodule: it is loaded only when a loss is computed, never saved
        # in the tokenizer checkpoint (14.7M params), and never in `parameters()` (the optimizer's view).
        self._perceptual: list[nn.Module | None] = []

    # --- core ---------------------------------------------------------------------------------------

    def preprocess(self, frames: torch.Tensor) -> torch.Tensor:
        """uint8 (N,84,84) or (N,1,84,84) -> float (N,1,84,84) in [-1,1] (official: x/255*2-1)."""
        if frames.dim() == 3:
            frames = frames.unsqueeze(1)
        r = self.cfg.resolution
        if frames.dim() != 4 or tuple(frames.shape[1:]) != (self.cfg.in_channels, r, r):
            raise ValueError(f"expected frames (N,{r},{r}) or (N,{self.cfg.in_channels},{r},{r}), "
                             f"got {tuple(frames.shape)}")
        if frames.dtype != torch.uint8:
            raise TypeError(f"expected uint8 frames, got {frames.dtype}")
        dev = self.embedding.weight.device
        return frames.to(dev).float().div(127.5).sub(1.0)

    def quantize(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Nearest codebook entry by squared L2 distance, computed in fp32 even under autocast."""
        n, e, h, w = z.shape
        with torch.autocast(device_type=z.device.type, enabled=False):
            flat = z.float().permute(0, 2, 3, 1).reshape(-1, e)  # (N*h*w, E), row-major grid
            codes = self.embedding.weight.float()
            dist = flat.pow(2).sum(1, keepdim=True) + codes.pow(2).sum(1) - 2.0 * flat @ codes.t()
            tokens = dist.argmin(dim=1)
        z_q = self.embedding(tokens).view(n, h, w, e).permute(0, 3, 1, 2)
        return z_q, tokens.view(n, h * w)

    def forward(self, x: torch.Tensor) -> TokenizerOutput:
        """x: (N,1,84,84) float in [-1,1]. Decoder input is z + sg(z_q - z) (straight-through)."""
        z = self.pre_quant_conv(self.encoder(x))
        z_q, tokens = self.quantize(z)
        recon = self.decoder(self.post_quant_conv(z + (z_q - z).detach()))
        return TokenizerOutput(z, z_q, tokens, recon)

    def decode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """(N, g*g) long -> (N,1,84,84) float in about [-1, 1]."""
        g = self.cfg.grid_size
        z_q = self.embedding(tokens.long()).view(-1, g, g, self.cfg.embed_dim).permute(0, 3, 1, 2)
        return self.decoder(self.post_quant_conv(z_q))

    # --- loss ---------------------------------------------------------------------------------------

    def set_perceptual(self, module: nn.Module | None) -> None:
        """Use `module` (e.g. from `jowa_model.perceptual.build_perceptual`) for the LPIPS term."""
        self._perceptual = [module]

    def perceptual_module(self) -> nn.Module | None:
        if not self._perceptual:
            from jowa_model.perceptual import build_perceptual

            self._perceptual = [build_perceptual(self.cfg.perceptual, self.cfg.perceptual_weights or None)]
        m = self._perceptual[0]
        if m is not None:
            dev = self.embedding.weight.device
            if next(m.parameters()).device != dev:
                m.to(dev)
        return m

    def compute_loss(self, frames: Any, return_output: bool = False, background: Any = None, previous: Any = None):
        """frames uint8 (N,84,84) -> (loss, metrics) [+ TokenizerOutput]. Metrics are detached 0-d tensors
        (no device sync per term): loss, l1, codebook, commitment, perceptual, usage (fraction of the codebook
        used by this batch), perplexity (exp entropy of this batch's code histogram).

        With `cfg.foreground_weight` w > 0 and `background` (uint8 (N,84,84): each frame's game background, e.g.
        its median frame), the L1 is a weighted mean with weight 1 + w on pixels that differ from the background
        by more than `cfg.foreground_threshold`: sprites are ~1% of an Atari frame, and a plain L1 is won by
        painting the background (the `l1` metric stays the plain mean). With `cfg.moving_weight` m > 0 and
        `previous` (uint8 (N,84,84): each frame's previous frame), pixels that differ from it by more than the
        threshold get + m: a 1-2 pixel ball is a small part even of the foreground."""
        frames, _ = _to_tensor(frames)
        x = self.preprocess(frames)
        out = self(x)
        c = self.cfg
        err = (x - out.recon).abs()
        l1_plain = err.mean()
        l1 = l1_plain
        w = None  # (N, 1, 84, 84) L1 weights, when any apply
        if c.foreground_weight > 0 and background is not None:
            fg = (x - self.preprocess(_to_tensor(background)[0])).abs() > c.foreground_threshold / 127.5
            w = 1.0 + c.foreground_weight * fg.to(err.dtype)
        if c.moving_weight > 0 and previous is not None:
            w = (1.0 if w is None else w) + c.moving_weight * self.moving_pixels(x, previous).to(err.dtype)
        if w is not None:
            l1 = (err * w).sum() / w.sum()
        codebook = (out.z.detach() - out.z_q).pow(2).mean()
        commitment = (out.z - out.z_q.detach()).pow(2).mean()
        perc_net = self.perceptual_module() if c.perceptual_weight > 0 else None
        perceptual = perc_net(x, out.recon).mean() if perc_net is not None else x.new_zeros(())
        loss = (c.l1_weight * l1 + c.codebook_weight * codebook + c.commitment_weight * commitment
                + c.perceptual_weight * perceptual)
        usage, perplexity = codebook_stats(out.tokens, c.vocab_size)
        metrics = {"loss": loss.detach(), "l1": l1_plain.detach(), "codebook": codebook.detach(),
                   "commitment": commitment.detach(), "perceptual": perceptual.detach(),
                   "usage": usage, "perplexity": perplexity}
        return (loss, metrics, out) if return_output else (loss, metrics)

    # --- public encode / decode ------------------------------------------------------------------------

    def _autocast(self, dtype: torch.dtype | None):
        dev = self.embedding.weight.device.type
        if dtype is None or dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=dev, dtype=dtype)

    def _inference_layout(self, *nets: nn.Module) -> torch.memory_format:
        """Channels-last weights (and inputs) for CPU inference: oneDNN's convolutions then skip a layout
        conversion per layer (paper encoder, 2 threads: 23 -> 17 ms for 1 frame, 298 -> 270 ms for 16,
        measured; same tokens; no gain for the decoder). Applied once, in place; `tokenizer_to_dict` saves
        standard strides, so what is saved does not depend on it. GPUs keep the default layout."""
        if self.embedding.weight.device.type != "cpu":
            return torch.contiguous_format
        for net in nets:
            convs = [m.weight for m in net.modules() if isinstance(m, nn.Conv2d)]
            if not all(w.is_contiguous(memory_format=torch.channels_last) for w in convs):
                with torch.inference_mode(False), torch.no_grad():  # params must stay trainable tensors
                    net.to(memory_format=torch.channels_last)
        return torch.channels_last

    @torch.inference_mode()
    def encode(self, frames: Any, chunk_size: int = 256, dtype: torch.dtype | None = None):
        """uint8 frames (N,84,84) -> tokens (N,36): uint16 numpy for numpy input, long tensor for torch input
        (on the input's device). Batched in chunks of `chunk_size`; `dtype=torch.bfloat16` runs the convnet
        under autocast (see the module docstring for what that changes)."""
        t, was_np = _to_tensor(frames)
        fmt = self._inference_layout(self.encoder, self.pre_quant_conv)
        out = []
        with self._autocast(dtype):
            for i in range(0, t.shape[0], chunk_size):
                x = self.preprocess(t[i:i + chunk_size]).contiguous(memory_format=fmt)
                z = self.pre_quant_conv(self.encoder(x))
                out.append(self.quantize(z)[1])
        tokens = torch.cat(out) if out else torch.zeros(0, self.cfg.tokens_per_frame, dtype=torch.long)
        if was_np:
            return tokens.cpu().numpy().astype(np.uint16)
        return tokens.to(t.device)

    @torch.inference_mode()
    def decode(self, tokens: Any, chunk_size: int = 256, dtype: torch.dtype | None = None):
        """tokens (N,36) (any integer dtype) -> uint8 frames (N,84,84), numpy in -> numpy out."""
        t, was_np = _to_tensor(tokens)
        if t.dim() != 2 or t.shape[1] != self.cfg.tokens_per_frame:
            raise ValueError(f"expected tokens (N,{self.cfg.tokens_per_frame}), got {tuple(t.shape)}")
        t = t.to(self.embedding.weight.device).long()
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= self.cfg.vocab_size):
            raise ValueError(f"tokens must be in [0, {self.cfg.vocab_size}), got [{int(t.min())}, {int(t.max())}]")
        out = []
        with self._autocast(dtype):
            for i in range(0, t.shape[0], chunk_size):
                out.append(to_uint8(self.decode_tokens(t[i:i + chunk_size]).float()))
        r = self.cfg.resolution
        frames = torch.cat(out) if out else torch.zeros(0, r, r, dtype=torch.uint8)
        return frames.cpu().numpy() if was_np else frames

    # --- bookkeeping ---------------------------------------------------------------------------------

    def num_params(self) -> dict[str, int]:
        """Parameter counts (official: encoder 1.27M, decoder 1.20M, codebook + quant convs 1.57M)."""
        count = lambda *ms: sum(p.numel() for m in ms for p in m.parameters())  # noqa: E731
        d = {"encoder": count(self.encoder), "decoder": count(self.decoder),
             "codebook": count(self.embedding, self.pre_quant_conv, self.post_quant_conv)}
        d["total"] = sum(d.values())
        return d

    def moving_pixels(self, x: torch.Tensor, previous: Any) -> torch.Tensor:
        """(N, 1, H, W) bool: pixels of the preprocessed frames x that differ from `previous` (uint8 frames) by more
        than `cfg.foreground_threshold` levels."""
        return (x - self.preprocess(_to_tensor(previous)[0]).to(x.device)).abs() > self.cfg.foreground_threshold / 127.5

    @torch.no_grad()
    def restart_codes(self, dead: torch.Tensor, z: torch.Tensor, generator: torch.Generator,
                      weights: torch.Tensor | None = None) -> None:
        """Dead-code restart (not in the paper): move codes `dead` onto encoder outputs drawn from `z` (M, E),
        uniformly or in proportion to `weights` (M,) >= 0 (uniformly when they are all 0)."""
        if dead.numel() == 0:
            return
        w = None if weights is None else weights.detach().float().cpu()
        if w is None or float(w.sum()) <= 0:
            idx = torch.randint(0, z.shape[0], (dead.numel(),), generator=generator).to(z.device)
        else:
            idx = torch.multinomial(w, dead.numel(), replacement=True, generator=generator).to(z.device)
        self.embedding.weight[dead.to(z.device)] = z[idx].to(self.embedding.weight.dtype)


def to_uint8(y: torch.Tensor) -> torch.Tensor:
    """Decoder output (N,1,H,W) in about [-1,1] -> uint8 (N,H,W) (official: (y+1)/2, clamp to [0,1])."""
    return y.squeeze(1).add(1.0).mul(127.5).clamp(0, 255).round().to(torch.uint8)


def codebook_stats(tokens: torch.Tensor, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(fraction of codes used, perplexity = exp(entropy) of the code histogram) for one batch of tokens."""
    counts = torch.bincount(tokens.flatten(), minlength=vocab_size).float()
    p = counts / counts.sum().clamp_min(1.0)
    entropy = -(p * torch.log(p.clamp_min(1e-12))).sum()
    return (counts > 0).float().mean(), entropy.exp()


class CodebookMonitor:
    """Tracks, per code, the last step it was used; a code unused for `window` steps counts as dead."""

    def __init__(self, vocab_size: int, window: int = 100) -> None:
        self.window = window
        self.last_used = torch.zeros(vocab_size, dtype=torch.long)  # step 0 counts as a use: nothing dead early

    def update(self, tokens: torch.Tensor, step: int) -> None:
        used = torch.unique(tokens.flatten()).cpu()
        self.last_used[used] = step

    def dead(self, step: int) -> torch.Tensor:
        return torch.nonzero(step - self.last_used >= self.window).flatten()

    def state_dict(self) -> dict[str, Any]:
        return {"window": self.window, "last_used": self.last_used.clone()}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        self.window = int(d["window"])
        self.last_used = d["last_used"].clone().long()


# --- checkpoints ---------------------------------------------------------------------------------------


def tokenizer_to_dict(tok: Tokenizer) -> dict[str, Any]:
    """What `save_tokenizer` writes: format tag, config as a plain dict, state dict (no LPIPS weights)."""
    return {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "config": config_to_dict(tok.cfg),
            "state_dict": {k: v.detach().cpu().clone(memory_format=torch.contiguous_format)
                           for k, v in tok.state_dict().items()}}


def save_tokenizer(tok: Tokenizer, path: str | Path) -> Path:
    """Atomic save; load with `load_tokenizer` (weights_only)."""
    atomic_torch_save(tokenizer_to_dict(tok), path)
    return Path(path)


def tokenizer_from_dict(obj: Any, path: str | Path) -> Tokenizer:
    if isinstance(obj, dict) and "tokenizer" in obj and isinstance(obj["tokenizer"], dict):
        obj = obj["tokenizer"]  # a training checkpoint: the tokenizer is one entry of it
    if not isinstance(obj, dict) or obj.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not a jowa tokenizer checkpoint (no format='{CHECKPOINT_FORMAT}')")
    if obj.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(f"{path}: tokenizer checkpoint version {obj.get('version')} is not supported "
                              f"(this jowa reads version {CHECKPOINT_VERSION})")
    try:
        cfg = config_from_dict(TokenizerConfig, obj["config"])
    except (JowaError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: bad tokenizer config in checkpoint ({e})") from e
    tok = Tokenizer(cfg)
    try:
        tok.load_state_dict(obj["state_dict"], strict=True)
    except (RuntimeError, KeyError) as e:
        raise CheckpointError(f"{path}: weights do not match the stored config ({str(e).splitlines()[0]})") from e
    return tok


def load_tokenizer(path: str | Path, map_location: Any = "cpu") -> Tokenizer:
    """Load a tokenizer saved by `save_tokenizer` (or a `jowa tokenizer train` checkpoint), in eval mode."""
    tok = tokenizer_from_dict(safe_torch_load(path, map_location=map_location), path)
    return tok.eval()


def tokenizer_checksum(path: str | Path) -> str:
    """sha256 of the checkpoint file: datasets record it so tokens are never mixed across tokenizers."""
    return sha256_file(path)


def load_official_tokenizer(path: str | Path) -> Tokenizer:
    """The official JOWA `tokenizer.pt` (a plain state dict) into a `paper` Tokenizer; its LPIPS keys are dropped."""
    sd = safe_torch_load(path)
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise CheckpointError(f"{path}: expected a state dict")
    sd = {k.removeprefix("tokenizer."): v for k, v in sd.items()}
    sd = {k: v for k, v in sd.items() if not k.startswith("lpips.")}
    tok = Tokenizer(dataclasses.replace(tokenizer_preset("paper")))
    try:
        tok.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: not an official JOWA tokenizer ({str(e).splitlines()[0]})") from e
    return tok.eval()
