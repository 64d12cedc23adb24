"""`jowa tokenizer train | recon | info`: train the VQ-VAE, look at its reconstructions, count its parameters."""

from __future__ import annotations

import logging
import sys

import click

from jowa_data.cli_util import echo_json, stdout_console

# Official JOWA tokenizer, as instantiated (docs/official_code.md §1).
OFFICIAL_PARAMS = {"encoder": 1_272_064, "decoder": 1_201_537, "codebook": 1_573_888, "total": 4_047_489}


def _setup_logging() -> None:
    """Library modules log (perceptual backend, resume, ...) through `logging`; show it on stderr."""
    for name in ("jowa_model", "pipelines"):
        lg = logging.getLogger(name)
        if not lg.handlers:
            h = logging.StreamHandler(sys.stderr)
            h.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
            lg.addHandler(h)
            lg.setLevel(logging.INFO)


@click.group("tokenizer")
def tokenizer_group() -> None:
    """VQ-VAE frame tokenizer: 84x84 frame <-> 36 tokens of a 2048-code book."""


@tokenizer_group.command("train")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run folder (checkpoints, logs, PNGs).")
@click.option("--preset", type=click.Choice(["paper", "tiny", "cells"]), default="paper", show_default=True,
              help="Training preset: paper (appendix E), tiny (patch-MLP VQ-VAE for CPU tests) or cells "
                   "(k-means codebook of cell images, what the CPU benches use).")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="TOML/YAML override file.")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
              help="Config override, e.g. --set batch_size=64 --set model.perceptual=off (repeatable).")
@click.option("--frames", type=click.Path(dir_okay=False), help="uint8 (N,84,84) .npy of frames to train on.")
@click.option("--index", type=click.Path(dir_okay=False), help="episodes.parquet index (with --replay).")
@click.option("--replay", "replay_root",
              help="DQN-Replay root for --index: a folder or a URL (gs://..., s3://..., https://...).")
@click.option("--game", "games", multiple=True, help="Only these games of the index (repeatable).")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its checkpoint.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def train_cmd(out: str, preset: str, config_file: str | None, sets: tuple[str, ...], frames: str | None,
              index: str | None, replay_root: str | None, games: tuple[str, ...], resume: bool, no_progress: bool,
              as_json: bool) -> None:
    """Train (or --resume) a tokenizer on replay frames."""
    from jowa_common.config import resolve_config
    from pipelines.train_tokenizer import train_preset, train_tokenizer

    _setup_logging()
    cfg = resolve_config(train_preset(preset), config_file, sets)
    summary = train_tokenizer(cfg, out, frames=frames, index=index, replay_root=replay_root, games=games,
                              resume=resume, progress=not no_progress)
    if as_json:
        echo_json(summary)
        return
    f, la = summary["first"], summary["last"]
    if "distinct_cells" in summary:  # a k-means codebook (preset cells)
        state = "converged" if summary["converged"] else "not converged"
        click.echo(f"k-means: {summary['step']} Lloyd iterations ({state}) over the {summary['distinct_cells']} "
                   f"distinct cells of {summary['num_frames']} frames in {summary['seconds']:.0f} s: "
                   f"{summary['tokenizer']}")
        if la:
            click.echo(f"L1 {la['l1']:.4f}, codes used {la['usage']:.0%}, perplexity {la['perplexity']:.0f}")
        click.echo(f"reconstructions: {summary['png']}")
        return
    click.echo(f"trained to step {summary['step']} on {summary['num_frames']} frames "
               f"({summary['frames_per_s']:.1f} frames/s): {summary['tokenizer']}")
    if f and la:
        click.echo(f"L1 {f['l1']:.4f} -> {la['l1']:.4f}, perplexity {f['perplexity']:.1f} -> {la['perplexity']:.1f}, "
                   f"dead codes {la['dead_codes']}")
    if summary["png"]:
        click.echo(f"reconstructions: {summary['png']}")


@tokenizer_group.command("recon")
@click.argument("ckpt", type=click.Path(dir_okay=False))
@click.option("--frames", required=True, type=click.Path(dir_okay=False), help="uint8 (N,84,84) .npy of frames.")
@click.option("--count", default=8, show_default=True, help="Frames in the grid.")
@click.option("--start", default=0, show_default=True, help="First frame (frames start..start+count*stride).")
@click.option("--stride", default=1, show_default=True, help="Step between chosen frames.")
@click.option("--out", "png", required=True, type=click.Path(dir_okay=False), help="PNG to write.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def recon_cmd(ckpt: str, frames: str, count: int, start: int, stride: int, png: str, as_json: bool) -> None:
    """Write a PNG of originals (top) vs reconstructions (bottom) for CKPT (tokenizer.pt or checkpoint.pt)."""
    import numpy as np

    from jowa_common.errors import DatasetError
    from jowa_model.tokenizer import load_tokenizer
    from pipelines.frames import open_frames
    from pipelines.train_tokenizer import write_recon_png

    tok = load_tokenizer(ckpt)
    data = open_frames(frames)
    idx = np.arange(start, start + count * stride, stride)
    if count <= 0 or idx[-1] >= data.shape[0] or start < 0:
        raise DatasetError(f"{frames}: holds {data.shape[0]} frames; cannot take {count} from {start} by {stride}")
    path, _, l1 = write_recon_png(tok, np.asarray(data[idx]), png)
    if as_json:
        echo_json({"png": str(path), "frames": idx.tolist(), "l1_pixels": l1})
    else:
        click.echo(f"{path}: {count} frames, mean L1 {l1:.4f} (pixels in [0,1])")


@tokenizer_group.command("info")
@click.argument("ckpt", required=False, type=click.Path(dir_okay=False))
@click.option("--preset", type=click.Choice(["paper", "tiny", "cells"]), default="paper", show_default=True,
              help="Architecture to describe when no CKPT is given.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def info_cmd(ckpt: str | None, preset: str, as_json: bool) -> None:
    """Parameter counts (vs the official ~4.05M tokenizer), tokens per frame, vocabulary, checksum."""
    from jowa_common.config import config_to_dict
    from jowa_model.tokenizer import Tokenizer, load_tokenizer, tokenizer_checksum, tokenizer_preset

    tok = load_tokenizer(ckpt) if ckpt else Tokenizer(tokenizer_preset(preset))
    params = tok.num_params()
    info = {"source": ckpt or f"preset:{preset}", "params": params, "official_params": OFFICIAL_PARAMS,
            "tokens_per_frame": tok.cfg.tokens_per_frame, "vocab_size": tok.cfg.vocab_size,
            "embed_dim": tok.cfg.embed_dim, "config": config_to_dict(tok.cfg),
            "sha256": tokenizer_checksum(ckpt) if ckpt else None}
    if as_json:
        echo_json(info)
        return
    from rich.table import Table

    t = Table(title=f"tokenizer {info['source']}: {info['tokens_per_frame']} tokens/frame, "
                    f"vocab {info['vocab_size']}, embed {info['embed_dim']}")
    for col in ("part", "params", "official", "ratio"):
        t.add_column(col, justify="left" if col == "part" else "right")
    for part in ("encoder", "decoder", "codebook", "total"):
        t.add_row(part if part != "codebook" else "codebook + quant convs", f"{params[part]:,}",
                  f"{OFFICIAL_PARAMS[part]:,}", f"{params[part] / OFFICIAL_PARAMS[part]:.3f}")
    stdout_console().print(t)
    if ckpt:
        click.echo(f"sha256 {info['sha256']}")


COMMANDS = [tokenizer_group]
