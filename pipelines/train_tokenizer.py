"""Train the VQ-VAE tokenizer on replay frames (or fit the `cells` k-means codebook), with exact resume after a kill.

Paper appendix E / official code: Adam (no weight decay), lr 1e-4, batch 2048 frames, grad-norm clip 1.0,
loss L1 + codebook + commitment + LPIPS (weights 1). Beyond the paper: codebook usage, perplexity and
dead-code count are logged every `log_every` steps, and an optional dead-code restart (off by default).

Run folder (`out`):
  config.json     the resolved TokenizerTrainConfig (+ where the frames came from)
  checkpoint.pt   full training state: tokenizer, Adam, step, sampler position, RNG states, code monitor
  tokenizer.pt    the tokenizer alone (`jowa_model.tokenizer.load_tokenizer`)
  frames.npy      frames materialised from an episode index (when trained from one)
  metrics.jsonl   one JSON line per logged step (append-only; lines after the last checkpoint are dropped on resume)
  tb/             TensorBoard scalars and reconstruction images
  recon/step_XXXXXXX.png   originals (top) vs reconstructions (bottom)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from jowa_common.config import config_from_dict, config_to_dict
from jowa_common.errors import CheckpointError, ConfigError
from jowa_common.io import atomic_path, atomic_torch_save, atomic_write_json, atomic_write_text, safe_torch_load
from jowa_model.tokenizer import (CodebookMonitor, Tokenizer, TokenizerConfig, save_tokenizer, tokenizer_from_dict,
                                  tokenizer_preset, tokenizer_to_dict)
from pipelines.frames import (FrameSampler, frame_backgrounds, game_of_rows, gather, materialize_frames,
                             open_frames)

log = logging.getLogger(__name__)


@dataclass
class TokenizerTrainConfig:
    """Tokenizer training. Defaults are the paper's (appendix E); `train_preset("tiny")` is the CPU demo."""

    model: TokenizerConfig = field(default_factory=TokenizerConfig)  # architecture + loss (paper preset)
    batch_size: int = 2048  # frames per step (paper: 2048 = 256/GPU x 8 GPUs)
    lr: float = 1e-4  # Adam learning rate (paper/official: 1e-4, no weight decay)
    grad_clip: float = 1.0  # max global grad norm (official: 1.0)
    steps: int = 250_000  # optimizer steps (official stage 1: 250k)
    seed: int = 0  # model init, frame order, dead-code restarts
    device: str = "auto"  # "auto" = cuda if available else cpu
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto = bf16 autocast on cuda (official), fp32 on cpu
    log_every: int = 50  # steps between metric lines (metrics.jsonl + TensorBoard)
    ckpt_every: int = 1000  # steps between checkpoints (also written at the last step)
    image_every: int = 1000  # steps between reconstruction grids (0 = only at the end)
    image_frames: int = 8  # frames in a reconstruction grid
    max_frames: int = 0  # cap on frames taken from an index (0 = all), split equally between games
    dead_code_restart: bool = False  # beyond the paper: move dead codes onto batch encoder outputs
    dead_code_window: int = 1000  # steps without use after which a code counts as dead (logged always)
    restart_every: int = 1000  # steps between dead-code restarts (when enabled)
    restart_sampling: Literal["uniform", "moving"] = "uniform"  # which of the batch's grid cells dead codes move
    # onto: uniformly, or in proportion to each cell's reconstruction error on moving pixels (sprites drawn worst)
    tensorboard: bool = True  # write TensorBoard event files under tb/


def train_preset(name: str) -> TokenizerTrainConfig:
    """`paper` (appendix E), `tiny` (CPU: patch MLPs, batch 64, lr 1e-3, perceptual off, 3000 steps) or `cells`
    (k-means codebook of cell images, up to 40 Lloyd iterations)."""
    if name == "paper":
        return TokenizerTrainConfig()
    if name == "tiny":
        # lr 1e-3: a few thousand CPU steps would barely move the codebook at the paper's 1e-4.
        # Dead-code restarts every 100 steps: without them the codebook collapses to a few dozen codes.
        return TokenizerTrainConfig(model=tokenizer_preset("tiny"), batch_size=64, lr=1e-3, steps=3000,
                                    log_every=10, ckpt_every=500, image_every=500, dead_code_restart=True,
                                    dead_code_window=100, restart_every=100)
    if name == "cells":
        # A step is one Lloyd iteration over all the frames' distinct cells; 40 is past convergence on the frames of
        # `jowa bench learn` (the codebook then changes by a few cells an iteration), and the fit stops when none does.
        return TokenizerTrainConfig(model=tokenizer_preset("cells"), steps=40, ckpt_every=5)
    raise ConfigError(f"unknown tokenizer training preset {name!r} (choose 'paper', 'tiny' or 'cells')")


# --- helpers -----------------------------------------------------------------------------------------

def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def batch_digest(idx: np.ndarray) -> str:
    """Short hash of a batch's frame positions: lets tests and users check that a resume sees the same data."""
    return hashlib.sha256(np.ascontiguousarray(idx, dtype=np.int64).tobytes()).hexdigest()[:16]


def recon_grid(originals: np.ndarray, recons: np.ndarray, scale: int = 2, gap: int = 2) -> np.ndarray:
    """Two rows (originals over reconstructions) of uint8 (K,84,84) frames -> one uint8 image."""
    k, h, w = originals.shape
    img = np.full((2 * h + 3 * gap, k * w + (k + 1) * gap), 255, dtype=np.uint8)
    for row, frames in enumerate((originals, recons)):
        y = gap + row * (h + gap)
        for i in range(k):
            x = gap + i * (w + gap)
            img[y:y + h, x:x + w] = frames[i]
    return np.kron(img, np.ones((scale, scale), dtype=np.uint8)) if scale > 1 else img


def recon_frames(data: np.ndarray, count: int) -> np.ndarray:
    """The frames of every reconstruction grid of a run: `count` spread evenly over the data, the same each time."""
    idx = np.linspace(0, data.shape[0] - 1, num=min(count, data.shape[0])).astype(np.int64)
    return gather(data, idx)


def write_recon_png(tok: Tokenizer, frames: np.ndarray, path: str | Path) -> tuple[Path, np.ndarray, float]:
    """Encode->decode `frames`, write the grid PNG atomically; returns (path, grid, mean L1 in [0,1] pixels)."""
    from PIL import Image

    was_training = tok.training
    tok.eval()
    recons = tok.decode(tok.encode(frames))
    tok.train(was_training)
    grid = recon_grid(frames, recons)
    with atomic_path(path, suffix=".png") as tmp:
        Image.fromarray(grid, mode="L").save(tmp, format="PNG")
    l1 = float(np.abs(frames.astype(np.float32) - recons.astype(np.float32)).mean() / 255.0)
    return Path(path), grid, l1


def _rng_state(gen: torch.Generator, device: torch.device) -> dict[str, Any]:
    st = {"torch": torch.get_rng_state(), "restart": gen.get_state()}
    if device.type == "cuda":
        st["cuda"] = torch.cuda.get_rng_state(device)
    return st


def _set_rng_state(st: dict[str, Any], gen: torch.Generator, device: torch.device) -> None:
    torch.set_rng_state(st["torch"])
    gen.set_state(st["restart"])
    if device.type == "cuda" and "cuda" in st:
        torch.cuda.set_rng_state(st["cuda"], device)


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines logged after the checkpoint we resume from (they will be logged again)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            break  # a torn last line from the kill
    atomic_write_text(path, "".join(k + "\n" for k in keep))


def _config_diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _config_diff(va, vb, f"{prefix}{k}.")
        elif va != vb:
            out.append(f"{prefix}{k}: {va!r} -> {vb!r}")
    return out


# --- training ----------------------------------------------------------------------------------------

def train_tokenizer(cfg: TokenizerTrainConfig, out: str | Path, *, frames: str | Path | None = None,
                    index: str | Path | None = None, replay_root: str | Path | None = None,
                    games: tuple[str, ...] = (), resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """Train (or resume) a tokenizer in run folder `out` on frames from a .npy file or an episode index.

    Returns a summary: steps, first/last logged metrics, frames/s, paths of tokenizer.pt and the last PNG.
    """
    from jowa_common.io import folder_lock, remove_stale_temps

    with folder_lock(out, "jowa tokenizer train"):
        remove_stale_temps(out)
        return _train_tokenizer(cfg, Path(out), frames, index, replay_root, games, resume, progress)


def _train_tokenizer(cfg: TokenizerTrainConfig, out: Path, frames: str | Path | None, index: str | Path | None,
                     replay_root: str | Path | None, games: tuple[str, ...], resume: bool,
                     progress: bool) -> dict[str, Any]:
    out = Path(out)
    ckpt_path, config_path = out / "checkpoint.pt", out / "config.json"
    metrics_path = out / "metrics.jsonl"
    state = None
    if ckpt_path.exists():
        if not resume:
            raise ConfigError(f"{ckpt_path}: this run folder already holds a checkpoint; pass --resume to continue "
                              "it, or choose another --out")
        state = safe_torch_load(ckpt_path)
        if not isinstance(state, dict) or state.get("format") != "jowa-tokenizer-train":
            raise CheckpointError(f"{ckpt_path}: not a jowa tokenizer training checkpoint")
        stored = state["config"]
        diff = [d for d in _config_diff(stored, config_to_dict(cfg)) if not d.startswith("steps:")]
        if diff:
            raise ConfigError(f"{ckpt_path}: resume with a different config ({'; '.join(diff)}); only 'steps' may "
                              "change on resume")
        cfg = dataclasses.replace(config_from_dict(TokenizerTrainConfig, stored), steps=cfg.steps)
        frames = state["data"]["frames"]
        log.info("resuming %s at step %d", out, state["step"])
    elif frames is None:
        if index is None or replay_root is None:
            raise ConfigError("tokenizer training needs --frames FILE.npy, or --index episodes.parquet with --replay ROOT")
        frames = out / "frames.npy"
        if not frames.exists():
            log.info("materialising frames from %s into %s", index, frames)
            materialize_frames(index, replay_root, frames, max_frames=cfg.max_frames, games=games)
    frames_path = Path(frames)
    data = open_frames(frames_path)
    data_info = {"frames": str(frames_path.resolve()), "n": int(data.shape[0]),
                 "index": str(index) if index else None, "games": list(games)}
    if state is not None and int(state["data"]["n"]) != data.shape[0]:
        raise CheckpointError(f"{frames_path}: holds {data.shape[0]} frames, the checkpoint was trained on "
                              f"{state['data']['n']}")
    if cfg.model.arch == "cells":
        return _fit_cells(cfg, out, data, frames_path, data_info, state, progress)

    device = pick_device(cfg.device)
    amp = autocast_dtype(cfg.precision, device)
    torch.manual_seed(cfg.seed)
    tok = Tokenizer(cfg.model).to(device)
    opt = torch.optim.Adam(tok.parameters(), lr=cfg.lr)
    sampler = FrameSampler(data.shape[0], cfg.batch_size, seed=cfg.seed)
    monitor = CodebookMonitor(cfg.model.vocab_size, cfg.dead_code_window)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    step = 0
    if state is not None:
        tok.load_state_dict(tokenizer_from_dict(state["tokenizer"], ckpt_path).state_dict())
        opt.load_state_dict(state["optimizer"])
        sampler.load_state_dict(state["sampler"])
        monitor.load_state_dict(state["monitor"])
        _set_rng_state(state["rng"], gen, device)
        step = int(state["step"])
        _truncate_metrics(metrics_path, step)
    else:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(config_path, {"config": config_to_dict(cfg), "data": data_info})
    tok.train()
    tok.perceptual_module()  # build (and log) the LPIPS backend before the first step: fail early
    grid_frames = recon_frames(data, cfg.image_frames)
    moving = cfg.model.moving_weight > 0 or cfg.restart_sampling == "moving"
    game_of = game_of_rows(data.shape[0], frames_path) if cfg.model.foreground_weight > 0 or moving else None
    backgrounds = frame_backgrounds(data, frames_path) if cfg.model.foreground_weight > 0 else None

    writer = None
    if cfg.tensorboard:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(out / "tb"), purge_step=step if step else None)

    def save(step: int) -> None:
        atomic_torch_save({"format": "jowa-tokenizer-train", "step": step, "config": config_to_dict(cfg),
                           "data": data_info, "tokenizer": tokenizer_to_dict(tok), "optimizer": opt.state_dict(),
                           "sampler": sampler.state_dict(), "monitor": monitor.state_dict(),
                           "rng": _rng_state(gen, device)}, ckpt_path)
        save_tokenizer(tok, out / "tokenizer.pt")

    def image(step: int) -> Path:
        path, grid, l1 = write_recon_png(tok, grid_frames, out / "recon" / f"step_{step:07d}.png")
        if writer is not None:
            writer.add_image("recon", grid, step, dataformats="HW")
            writer.add_scalar("recon/l1_pixels", l1, step)
        return path

    first: dict[str, Any] | None = None
    last: dict[str, Any] | None = None
    png: Path | None = None
    t0, frames_done = time.perf_counter(), 0
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, initial=step, desc="tokenizer", unit="step", dynamic_ncols=True)
    with metrics_path.open("a", encoding="utf-8") as mf:
        while step < cfg.steps:
            idx = sampler.next_indices()
            batch = torch.from_numpy(gather(data, idx)).to(device, non_blocking=True)
            bg = None if backgrounds is None else torch.from_numpy(backgrounds[game_of[idx]])
            prev = torch.from_numpy(gather(data, previous_rows(idx, game_of))).to(device) if moving else None
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                loss, metrics, outp = tok.compute_loss(batch, return_output=True, background=bg, previous=prev)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(tok.parameters(), cfg.grad_clip)
            opt.step()
            step += 1
            frames_done += len(idx)
            monitor.update(outp.tokens, step)
            restarted = 0
            if cfg.dead_code_restart and step % cfg.restart_every == 0:
                weights = (moving_cell_errors(tok, batch, prev, outp.recon) if cfg.restart_sampling == "moving"
                           else None)
                restarted = restart_dead_codes(tok, opt, monitor, outp.z.detach(), step, gen, weights)
            if step % cfg.log_every == 0 or step == cfg.steps:
                rec = {"step": step, **{k: float(v) for k, v in metrics.items()},
                       "grad_norm": float(grad_norm), "dead_codes": int(monitor.dead(step).numel()),
                       "restarted": restarted, "lr": opt.param_groups[0]["lr"],
                       "frames_per_s": frames_done / max(time.perf_counter() - t0, 1e-9),
                       "batch": batch_digest(idx)}
                mf.write(json.dumps(rec, sort_keys=True) + "\n")
                mf.flush()
                if writer is not None:
                    for k, v in rec.items():
                        if k not in ("step", "batch"):
                            writer.add_scalar(f"train/{k}", v, step)
                first = first or rec
                last = rec
                if bar is not None:
                    bar.set_postfix(l1=f"{rec['l1']:.4f}", ppl=f"{rec['perplexity']:.0f}", dead=rec["dead_codes"])
            if (cfg.image_every and step % cfg.image_every == 0) or step == cfg.steps:
                png = image(step)
            if step % cfg.ckpt_every == 0 or step == cfg.steps:
                if writer is not None:
                    writer.flush()
                save(step)
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    if writer is not None:
        writer.close()
    if not (out / "tokenizer.pt").exists():  # resumed a finished run
        save(step)
    return {"step": step, "first": first, "last": last, "out": str(out), "tokenizer": str(out / "tokenizer.pt"),
            "png": str(png) if png else None, "frames": str(frames_path), "num_frames": int(data.shape[0]),
            "frames_per_s": frames_done / max(time.perf_counter() - t0, 1e-9), "params": tok.num_params()}


def _fit_cells(cfg: TokenizerTrainConfig, out: Path, data: np.ndarray, frames_path: Path, data_info: dict[str, Any],
               state: dict[str, Any] | None, progress: bool) -> dict[str, Any]:
    """`arch="cells"`: a step is one Lloyd iteration over every distinct cell of the frames (jowa_model/cell_codebook);
    the fit stops early once no cell changes code. Same run folder, checkpoint and metrics.jsonl as training; one
    reconstruction grid at the end, no TensorBoard (a fit is about 30 lines of metrics)."""
    from jowa_model.cell_codebook import distinct_cells, init_codebook, lloyd_step

    ckpt_path, metrics_path = out / "checkpoint.pt", out / "metrics.jsonl"
    tok = Tokenizer(cfg.model).eval()  # its codebook is drawn by init_codebook below, or loaded
    gen = torch.Generator().manual_seed(cfg.seed)
    t0 = time.perf_counter()
    cells, counts = distinct_cells(np.asarray(data), cfg.model.resolution // cfg.model.grid_size)
    x = torch.from_numpy(cells).float().div_(127.5).sub_(1.0)  # the tokenizer's input scale
    weights = torch.from_numpy(counts).float()
    log.info("%d frames: %d cells, %d distinct", data.shape[0], int(counts.sum()), len(cells))
    step, converged = 0, False
    if state is not None:
        tok.load_state_dict(tokenizer_from_dict(state["tokenizer"], ckpt_path).state_dict())
        step, converged = int(state["step"]), bool(state.get("converged", False))
        _truncate_metrics(metrics_path, step)
    else:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / "config.json", {"config": config_to_dict(cfg), "data": data_info})
        with torch.no_grad():
            tok.embedding.weight.copy_(init_codebook(x, weights, cfg.model.vocab_size, gen))
    grid_frames = recon_frames(data, cfg.image_frames)

    def save(step: int) -> None:
        atomic_torch_save({"format": "jowa-tokenizer-train", "step": step, "config": config_to_dict(cfg),
                           "data": data_info, "tokenizer": tokenizer_to_dict(tok), "converged": converged}, ckpt_path)
        save_tokenizer(tok, out / "tokenizer.pt")

    first = last = None
    previous = None
    bar = None
    if progress and not converged:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, initial=step, desc="tokenizer k-means", unit="iter", dynamic_ncols=True)
    with metrics_path.open("a", encoding="utf-8") as mf:
        while step < cfg.steps and not converged:
            with torch.no_grad():
                new, previous, st = lloyd_step(x, weights, tok.embedding.weight, previous)
                tok.embedding.weight.copy_(new)
            step += 1
            converged = st.changed == 0 and st.reseeded == 0
            rec = {"step": step, "objective": st.objective, "l1": st.l1, "changed": st.changed,
                   "reseeded": st.reseeded, "usage": st.used / cfg.model.vocab_size, "perplexity": st.perplexity,
                   "distinct_cells": len(cells), "seconds": time.perf_counter() - t0}
            mf.write(json.dumps(rec, sort_keys=True) + "\n")
            mf.flush()
            first, last = first or rec, rec
            if step % cfg.ckpt_every == 0 or step == cfg.steps or converged:
                save(step)
            if bar is not None:
                bar.set_postfix(l1=f"{st.l1:.4f}", changed=st.changed, used=st.used)
                if converged:
                    bar.total = step  # the bar ends full at convergence
                bar.update(1)
    if bar is not None:
        bar.close()
    if not (out / "tokenizer.pt").exists():
        save(step)
    png = write_recon_png(tok, grid_frames, out / "recon" / f"step_{step:07d}.png")[0]
    if converged:
        log.info("k-means converged after %d iterations", step)
    return {"step": step, "first": first, "last": last, "out": str(out), "tokenizer": str(out / "tokenizer.pt"),
            "png": str(png), "frames": str(frames_path), "num_frames": int(data.shape[0]),
            "distinct_cells": len(cells), "converged": converged, "seconds": time.perf_counter() - t0,
            "params": tok.num_params()}


def previous_rows(idx: np.ndarray, game_of: np.ndarray) -> np.ndarray:
    """The row before each of `idx` in the frames file (recordings are stored in time order), or the row itself
    where that row starts a game's segment (no motion is then seen). An episode's first frame still gets the last
    frame of the episode before: one frame in ~1,000, a whole-screen "motion" the weights can afford."""
    before = np.maximum(idx - 1, 0)
    return np.where((idx > 0) & (game_of[before] == game_of[idx]), before, idx)


@torch.no_grad()
def moving_cell_errors(tok: Tokenizer, frames: torch.Tensor, previous: torch.Tensor,
                       recon: torch.Tensor) -> torch.Tensor:
    """(N*g*g,) mean |x - recon| over each grid cell's moving pixels (zero elsewhere), in the row order of the
    encoder output's cells: where dead codes restart with `restart_sampling="moving"`."""
    x = tok.preprocess(frames)
    err = (x - recon.float()).abs() * tok.moving_pixels(x, previous)
    return torch.nn.functional.adaptive_avg_pool2d(err, tok.cfg.grid_size).reshape(-1)


def restart_dead_codes(tok: Tokenizer, opt: torch.optim.Optimizer, monitor: CodebookMonitor, z: torch.Tensor,
                       step: int, gen: torch.Generator, weights: torch.Tensor | None = None) -> int:
    """Move codes unused for `monitor.window` steps onto this batch's encoder outputs (uniformly, or in proportion
    to `weights` per grid cell); reset their Adam moments."""
    dead = monitor.dead(step)
    if dead.numel() == 0:
        return 0
    flat = z.float().permute(0, 2, 3, 1).reshape(-1, z.shape[1])  # (N*g*g, E)
    tok.restart_codes(dead, flat, gen, weights)
    st = opt.state.get(tok.embedding.weight)
    if st:
        for key in ("exp_avg", "exp_avg_sq"):
            if key in st:
                st[key][dead.to(st[key].device)] = 0
    monitor.last_used[dead] = step
    return int(dead.numel())


def encode_throughput(tok: Tokenizer, frames: np.ndarray, chunk_size: int = 256, reps: int = 1) -> float:
    """Frames per second of `tok.encode` on `frames` (best of `reps`)."""
    best = math.inf
    for _ in range(reps):
        t = time.perf_counter()
        tok.encode(frames, chunk_size=chunk_size)
        best = min(best, time.perf_counter() - t)
    return len(frames) / best
