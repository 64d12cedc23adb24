"""`jowa-data replay-scan`: check one DQN-Replay run and report its episodes (thin wrapper over jowa_data.replay)."""

from __future__ import annotations

import sys
import time

import click

from jowa_data.cli_util import cache_option, echo_json, parse_runs, parse_suffixes, stdout_console
from jowa_data.download import DEFAULT_SOURCE


@click.command("replay-scan")
@click.argument("root")
@click.argument("game")
@click.option("--run", "run", default="1", show_default=True, help="Run folder (1..5 in DQN-Replay).")
@click.option("--checkpoints", help="Suffixes to read, e.g. 1-50 or 3,4,6. Default: all listed.")
@click.option("--allow-gaps", is_flag=True, help="Read non-contiguous data in pieces (stitching restarts at gaps).")
@click.option("--frames", "read_frames", is_flag=True,
              help="Also decompress every observation file once (verifies the gzip CRCs; reports frames/s).")
@click.option("--decoder", type=click.Choice(["auto", "isal", "rapidgzip", "gzip"]), default="auto",
              show_default=True, help="Gzip decoder.")
@cache_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def replay_scan_cmd(root: str, game: str, run: str, checkpoints: str | None, allow_gaps: bool, read_frames: bool,
                    decoder: str, cache: str | None, as_json: bool) -> None:
    """Scan ROOT/GAME/RUN/replay_logs (local path or fsspec URL): checkpoints, episodes, padding, dropped rows."""
    from tqdm import tqdm

    from jowa_data.npy_stream import resolve_decoder
    from jowa_data.replay import inspect_run, iter_episodes
    from jowa_data.roots import open_root

    try:
        decoder = resolve_decoder(decoder)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--decoder")
    shown = root
    root = open_root(root, cache)
    t0 = time.perf_counter()
    scan = inspect_run(root, game, run, parse_suffixes(checkpoints), allow_gaps=allow_gaps, decoder=decoder)
    report = scan.to_dict()
    report["decoder"] = decoder
    report["scan_seconds"] = round(time.perf_counter() - t0, 3)
    if read_frames:
        t1 = time.perf_counter()
        n = 0
        with tqdm(total=report["transitions"], desc=f"frames {game}/{run}", unit="frame", file=sys.stderr,
                  disable=as_json, mininterval=0.5) as bar:
            for ep in iter_episodes(root, game, run, decoder=decoder, refs=scan.episodes):
                n += ep.frames.shape[0]
                bar.update(ep.frames.shape[0])
        dt = time.perf_counter() - t1
        report["frames_read"] = n
        report["frames_per_s"] = round(n / dt, 1) if dt > 0 else None
    if as_json:
        echo_json(report)
        return
    from rich.table import Table

    t = Table(title=f"DQN-Replay {game}/{run} ({shown})")
    t.add_column("field")
    t.add_column("value", justify="right")
    for k, v in report.items():
        if k in ("game", "run"):
            continue
        t.add_row(k, ", ".join(map(str, v)) if isinstance(v, list) else f"{v:.4g}" if isinstance(v, float) else str(v))
    stdout_console().print(t)


@click.command("download")
@click.argument("game")
@click.option("--runs", required=True, help="Runs to copy, e.g. 1,2 (DQN-Replay has 1..5).")
@click.option("--checkpoints", required=True, help="Checkpoint suffixes, e.g. 0-50, 1-50 or 3,4,6.")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Local replay root to copy into (<out>/<Game>/<run>/replay_logs).")
@click.option("--source", default=DEFAULT_SOURCE, show_default=True,
              help="Where to copy from: the public DQN-Replay bucket (needs jowa[gcs]) or any fsspec URL / folder.")
@click.option("--recheck", is_flag=True, help="Also re-hash files already copied against their recorded sha256.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def download_cmd(game: str, runs: str, checkpoints: str, out: str, source: str, recheck: bool, as_json: bool) -> None:
    """Copy GAME's --runs x --checkpoints of DQN-Replay to a local root: resumable (rerun after a kill: complete,
    verified files are skipped), atomic (temp file + rename), checked (size, and md5 where the store lists one;
    sha256 recorded in <run>/.jowa-download.json)."""
    from jowa_data.download import download

    s = download(game, parse_runs(runs) or (), parse_suffixes(checkpoints) or (), out, source=source,
                 recheck=recheck, progress=not as_json)
    if as_json:
        echo_json(s)
        return
    stdout_console().print(
        f"{s['out']}: {game} runs {','.join(map(str, s['runs']))}: {s['files']} files, {s['copied']} copied "
        f"({s['bytes_copied'] / 1e6:.1f} MB in {s['seconds']:.1f} s, {s['mb_per_s'] or 0:.1f} MB/s), "
        f"{s['skipped']} already complete")


COMMANDS = [replay_scan_cmd, download_cmd]
