"""Pictures people look at: frame grids (real vs imagined, originals vs reconstructions), and metrics.jsonl rows.

Grids are stitched uint8 arrays saved with Pillow (pixel-exact frames, no resampling); charts with axes live in
`pipelines.charts` (matplotlib). Every writer is atomic, so a killed run never leaves a half-written PNG.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np

from jowa_common.io import atomic_path


def _save_png(img, path: str | Path) -> Path:
    path = Path(path)
    with atomic_path(path, suffix=".png") as tmp:
        img.save(tmp, format="PNG")
    return path


def save_frame_grid(rows: Sequence[np.ndarray], path: str | Path, labels: Sequence[str] = (), scale: int = 2,
                    pad: int = 2) -> Path:
    """rows: each (N, H, W) uint8 frames (same N, H, W); one grid row each, a text label on the left."""
    from PIL import Image, ImageDraw

    rows = [np.asarray(r, dtype=np.uint8) for r in rows]
    n, h, w = rows[0].shape
    label_w = 8 * max((len(s) for s in labels), default=0) + (6 if labels else 0)
    H = len(rows) * (h * scale + pad) + pad
    W = label_w + n * (w * scale + pad) + pad
    canvas = Image.new("L", (W, H), color=40)
    draw = ImageDraw.Draw(canvas)
    for r, frames in enumerate(rows):
        y = pad + r * (h * scale + pad)
        if r < len(labels):
            draw.text((3, y + h * scale // 2 - 5), labels[r], fill=255)
        for i, f in enumerate(frames):
            tile = Image.fromarray(f).resize((w * scale, h * scale), Image.NEAREST)
            canvas.paste(tile, (label_w + pad + i * (w * scale + pad), y))
    return _save_png(canvas, path)


def read_metrics(path: str | Path) -> list[dict]:
    """Rows of an append-only metrics.jsonl (the last row per step wins, for runs that were resumed)."""
    by_step: dict[int, dict] = {}
    p = Path(path)
    if not p.exists():
        return []
    for line in p.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            by_step.setdefault(row["step"], {}).update(row)
    return [by_step[s] for s in sorted(by_step)]
