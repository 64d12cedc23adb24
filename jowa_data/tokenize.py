"""Frames -> tokens with the frozen tokenizer, batched, on GPU when there is one.

The build and the on-the-fly segment source both call `encode_frames`, so the two paths produce the
same tokens by construction. bf16 is opt-in: VQ is an argmin over codebook distances and bf16 can flip
near-ties (the official save_obs_in_token.py encodes in bf16; docs/official_code.md §4), so fp32 is the
default and the precision used is recorded in info.json.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Callable

import numpy as np

from jowa_common.errors import CheckpointError
from jowa_data.layout import TOKENS_PER_FRAME, VOCAB_SIZE

PRECISIONS = ("fp32", "bf16")


def pick_device(device: str = "auto") -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


@functools.lru_cache(maxsize=2)
def load_frozen_tokenizer(path: str, device: str = "cpu"):
    """Load once per process (dask workers run many tasks): eval mode, no grads, on `device`."""
    from jowa_model.tokenizer import load_tokenizer

    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"{p}: tokenizer checkpoint not found")
    tok = load_tokenizer(p)
    tok.eval().requires_grad_(False)
    return tok.to(device)


def tokenizer_checksum(path: str | Path) -> str:
    from jowa_model.tokenizer import tokenizer_checksum as _cs

    return _cs(path)


def encode_frames(tokenizer, frames: np.ndarray, batch: int = 256, device: str = "cpu",
                  precision: str = "fp32", progress: Callable[[int], None] | None = None) -> np.ndarray:
    """(N, 84, 84) uint8 -> (N, 36) uint16, `batch` frames per forward (on `device`); `progress(n)` after each."""
    import torch

    assert precision in PRECISIONS, precision
    dtype = torch.bfloat16 if precision == "bf16" else None
    n = len(frames)
    out = np.empty((n, TOKENS_PER_FRAME), dtype=np.uint16)
    for i in range(0, n, batch):
        x = np.ascontiguousarray(frames[i:i + batch])
        if not str(device).startswith("cpu"):
            t = tokenizer.encode(torch.from_numpy(x).to(device, non_blocking=True), chunk_size=batch, dtype=dtype)
            t = t.cpu().numpy()
        else:
            t = tokenizer.encode(x, chunk_size=batch, dtype=dtype)
        assert t.shape == (len(x), TOKENS_PER_FRAME), t.shape
        assert t.size == 0 or int(t.max()) < VOCAB_SIZE
        out[i:i + len(x)] = t
        if progress is not None:
            progress(len(x))
    return out
