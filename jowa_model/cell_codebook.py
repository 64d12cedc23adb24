"""The `cells` tokenizer's codebook: Lloyd's k-means over the grid cells of training frames.

Why: a 1-2 pixel ball moves by a pixel a frame. To draw it, a token must name the ball's position within its 14x14
cell, so the codebook needs a code for each position the data shows. A VQ-VAE trained by gradient descent for a few
CPU minutes allots codes to what dominates its loss (backgrounds) and its decoder draws, for each code, the average
of the cells it stands for: the ball at many positions averages to no ball (docs/tokenizer.md). k-means places the
2,048 codes where they cut the squared error most, over every distinct cell of the data at once, and a code decodes
to the mean of its cells, which is the cell itself when the code stands for one.

What is clustered: each distinct cell (pixels scaled like the tokenizer's input, x/127.5 - 1) once, weighted by how
often it occurs, which is k-means over all cells (the objective is the mean squared error per cell of the training
frames) at a fraction of the cost: 3.2M cells of 90k Atari frames hold ~85k distinct ones.

Lloyd's algorithm (S. Lloyd, "Least squares quantization in PCM", IEEE Trans. Inf. Theory 28(2), 1982) from a
k-means++ start (Arthur & Vassilvitskii, SODA 2007) drawn in rounds of `round_size` centres (the k-means|| idea of
Bahmani et al., VLDB 2012: one distance pass per round instead of one per centre). A code left without cells moves
onto the cell with the largest weighted error. Every step is deterministic given the generator, so a fit resumed
from a saved codebook continues exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class LloydStats:
    objective: float  # weighted mean squared distance of a cell to its code (tokenizer units, per cell)
    l1: float  # weighted mean |pixel - decoded pixel| (tokenizer units, [-1, 1] pixels)
    changed: int  # distinct cells whose code changed since the previous step (-1: no previous step)
    reseeded: int  # codes that had no cell and moved onto the worst-fit cells
    used: int  # codes with at least one cell
    perplexity: float  # exp(entropy) of the codes' weights


def distinct_cells(frames: np.ndarray, patch: int) -> tuple[np.ndarray, np.ndarray]:
    """uint8 frames (N, H, W) -> (distinct cells uint8 (M, patch*patch) in row-major order within a cell, how often
    each occurs (M,) int64). Cells are cut on the grid the tokenizer uses (row-major over the frame)."""
    n, h, w = frames.shape
    if h % patch or w % patch:
        raise ValueError(f"frames of {h}x{w} do not split into {patch}x{patch} cells")
    cells = np.ascontiguousarray(
        frames.reshape(n, h // patch, patch, w // patch, patch).transpose(0, 1, 3, 2, 4).reshape(-1, patch * patch))
    rows = cells.view(np.dtype((np.void, cells.shape[1]))).ravel()  # one opaque value per cell: a fast exact unique
    uniq, counts = np.unique(rows, return_counts=True)
    return uniq.view(np.uint8).reshape(-1, cells.shape[1]), counts.astype(np.int64)


def _nearest(x: torch.Tensor, codes: torch.Tensor, chunk: int = 16_384) -> tuple[torch.Tensor, torch.Tensor]:
    """(squared distance, index) of each row of x to its nearest row of codes, in chunks of rows (bounded memory).
    Same formula and argmin as `Tokenizer.quantize`, so the fit's assignment is the tokenizer's."""
    cc = codes.pow(2).sum(1)
    dist, idx = [], []
    for i in range(0, x.shape[0], chunk):
        xi = x[i:i + chunk]
        d = xi.pow(2).sum(1, keepdim=True) + cc - 2.0 * xi @ codes.t()
        m = d.min(1)
        dist.append(m.values.clamp_min(0))
        idx.append(m.indices)
    return torch.cat(dist), torch.cat(idx)


def init_codebook(x: torch.Tensor, weights: torch.Tensor, k: int, generator: torch.Generator,
                  round_size: int = 64) -> torch.Tensor:
    """k-means++ start: the first centre drawn by weight, then rounds of `round_size` centres drawn (without
    replacement) in proportion to weight x squared distance to the nearest centre so far. Fewer than k distinct
    cells: every cell becomes a code, the rest repeat the most frequent cell (they stay unused)."""
    if x.shape[0] <= k:
        extra = x[weights.argmax()].expand(k - x.shape[0], -1)
        return torch.cat([x, extra]).clone()
    codes = x[torch.multinomial(weights, 1, generator=generator)]
    d2 = _nearest(x, codes)[0]
    while codes.shape[0] < k:
        p = weights * d2
        m = min(round_size, k - codes.shape[0], int((p > 0).sum()))
        if m == 0:  # every cell already is a code
            break
        new = x[torch.multinomial(p, m, replacement=False, generator=generator)]
        codes = torch.cat([codes, new])
        d2 = torch.minimum(d2, _nearest(x, new)[0])
    if codes.shape[0] < k:
        codes = torch.cat([codes, codes[:1].expand(k - codes.shape[0], -1)])
    return codes.clone()


def lloyd_step(x: torch.Tensor, weights: torch.Tensor, codes: torch.Tensor,
               previous: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, LloydStats]:
    """One Lloyd iteration: assign each cell to its nearest code, move each code to the weighted mean of its cells.
    Returns (new codes, this step's assignment, stats of the assignment to the *old* codes)."""
    k = codes.shape[0]
    d2, assign = _nearest(x, codes)
    mass = torch.zeros(k, dtype=x.dtype).index_add_(0, assign, weights)
    sums = torch.zeros_like(codes).index_add_(0, assign, x * weights[:, None])
    new = torch.where(mass[:, None] > 0, sums / mass.clamp_min(1e-12)[:, None], codes)
    empty = torch.nonzero(mass == 0).flatten()
    if empty.numel():  # move unused codes onto the cells fitted worst (largest weighted error)
        worst = torch.topk(weights * d2, min(empty.numel(), x.shape[0])).indices
        new[empty[:worst.numel()]] = x[worst]
    total = weights.sum()
    l1 = float((weights * (x - codes[assign]).abs().mean(1)).sum() / total)
    p = mass / total
    perplexity = float(torch.exp(-(p * p.clamp_min(1e-12).log()).sum()))
    changed = -1 if previous is None else int((previous != assign).sum())
    stats = LloydStats(objective=float((weights * d2).sum() / total), l1=l1, changed=changed,
                       reseeded=int(empty.numel()), used=int((mass > 0).sum()), perplexity=perplexity)
    return new, assign, stats
