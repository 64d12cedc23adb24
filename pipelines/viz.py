"""Pictures people look at: frame grids (real vs imagined, originals vs reconstructions) and training curves.

Pillow only (matplotlib is not a dependency): grids are stitched uint8 arrays, curves are drawn polylines.
Every writer is atomic, so a killed run never leaves a half-written PNG.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

import numpy as np

from jowa_data.io import atomic_path


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


def plot_curves(rows: Sequence[dict], keys: Sequence[str], path: str | Path, title: str = "",
                size: tuple[int, int] = (360, 200)) -> Path:
    """One small panel per key (value against step), stacked vertically, written as a PNG."""
    from PIL import Image, ImageDraw

    keys = [k for k in keys if any(k in r and r[k] is not None and math.isfinite(r[k]) for r in rows)]
    pw, ph = size
    top = 18 if title else 0
    canvas = Image.new("RGB", (pw, top + max(1, len(keys)) * ph), "white")
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((6, 3), title, fill="black")
    for i, key in enumerate(keys):
        pts = [(r["step"], r[key]) for r in rows if key in r and r[key] is not None and math.isfinite(r[key])]
        x0, y0, x1, y1 = 48, top + i * ph + 16, pw - 8, top + (i + 1) * ph - 18
        draw.rectangle((x0, y0, x1, y1), outline="gray")
        draw.text((x0, y0 - 14), key, fill="black")
        if not pts:
            continue
        xs, ys = np.array([p[0] for p in pts], float), np.array([p[1] for p in pts], float)
        lo, hi = float(ys.min()), float(ys.max())
        if hi - lo < 1e-12:
            lo, hi = lo - 0.5, hi + 0.5
        sx = (x1 - x0) / max(xs.max() - xs.min(), 1e-12)
        line = [(x0 + (x - xs.min()) * sx, y1 - (y - lo) / (hi - lo) * (y1 - y0)) for x, y in zip(xs, ys)]
        if len(line) == 1:
            draw.ellipse((line[0][0] - 2, line[0][1] - 2, line[0][0] + 2, line[0][1] + 2), fill="blue")
        else:
            draw.line(line, fill="blue", width=2)
        draw.text((2, y0), f"{hi:.3g}", fill="black")
        draw.text((2, y1 - 10), f"{lo:.3g}", fill="black")
        draw.text((x0, y1 + 3), f"step {int(xs.min())}", fill="black")
        draw.text((x1 - 60, y1 + 3), f"{int(xs.max())}", fill="black")
    return _save_png(canvas, path)
