"""`jowa-data build` and `jowa-data validate`: thin wrappers over jowa_data.build / jowa_data.validate."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from jowa_data.cli_util import (echo_json, load_registry, manifests_option, parse_range, parse_runs, replay_root_options,
                                stderr_console,
                                stdout_console)
from jowa_common.errors import ConfigError, DatasetError


@click.command("build")
@click.argument("games", nargs=-1, required=True)
@replay_root_options
@click.option("--tokenizer", "tokenizer", required=True, type=click.Path(dir_okay=False),
              help="Frozen tokenizer checkpoint (jowa tokenizer train / save_tokenizer).")
@click.option("--out", "out", required=True, type=click.Path(file_okay=False), help="Dataset folder to write.")
@click.option("--format", "fmt", type=click.Choice(["zarr", "wds", "both"]), default="zarr", show_default=True)
@click.option("--scheduler", default="synchronous", show_default=True,
              help="dask scheduler: synchronous | processes | threads | tcp://HOST:PORT (a dask cluster).")
@click.option("--workers", type=int, default=0, help="Local workers for processes/threads (0 = all cores).")
@click.option("--task-transitions", type=int, default=100_000, show_default=True,
              help="Transitions per build task (the unit of parallelism and of resume).")
@click.option("--encode-batch", type=int, default=256, show_default=True, help="Frames per tokenizer forward.")
@click.option("--device", default="auto", show_default=True, help="Tokenizer device: auto | cpu | cuda[:i].")
@click.option("--precision", type=click.Choice(["fp32", "bf16"]), default="fp32", show_default=True,
              help="bf16 is faster on GPU but may flip near-tie codebook argmins.")
@click.option("--seed", type=int, help="Subsampling base seed (default: each manifest's).")
@click.option("--fraction", type=float, help="Target fraction of transitions per game (paper: 0.1).")
@click.option("--transitions", type=int, help="Target transitions per game (fine-tuning: 5000).")
@click.option("--runs", help="Candidate runs, e.g. 1,2. Default: the manifest's.")
@click.option("--num-runs", type=int, help="How many candidate runs to draw. Default: the manifest's.")
@click.option("--checkpoints", help="Inclusive checkpoint range A-B. Default: the manifest's.")
@click.option("--include-incomplete", is_flag=True, help="Also take episodes that end without a terminal.")
@click.option("--allow-fewer-runs", is_flag=True, help="Use the runs that exist if fewer than --num-runs do.")
@click.option("--verify", type=click.Choice(["off", "size", "full"]), default="size", show_default=True,
              help="On a finished dataset: check every data file (size; full = also sha256) and rebuild only "
                   "the damaged tasks.")
@manifests_option
@click.option("--json", "as_json", is_flag=True, help="Print the build summary as JSON.")
def build_cmd(games, replay_root, cache, tokenizer, out, fmt, scheduler, workers, task_transitions, encode_batch, device,
              precision, seed, fraction, transitions, runs, num_runs, checkpoints, include_incomplete,
              allow_fewer_runs, verify, manifest_dirs, as_json) -> None:
    """Subsample, tokenize and write token shards (resumable: rerun the same command after a kill; on a
    finished dataset it verifies the files and repairs damaged tasks)."""
    from jowa_data.build import BuildConfig, build_dataset
    from jowa_data.subsample import SubsampleOptions

    if fraction is not None and transitions is not None:
        raise ConfigError("give --fraction or --transitions, not both")
    run_list = parse_runs(runs)
    reg = load_registry(manifest_dirs)
    manifests = reg.resolve(list(games))
    sel = SubsampleOptions(runs=run_list, num_runs=num_runs, checkpoints=parse_range(checkpoints),
                           include_incomplete=include_incomplete, allow_fewer_runs=allow_fewer_runs)
    cfg = BuildConfig(formats=("zarr", "wds") if fmt == "both" else (fmt,), scheduler=scheduler, workers=workers,
                      task_transitions=task_transitions, encode_batch=encode_batch, device=device,
                      precision=precision, seed=seed, fraction=fraction, transitions=transitions, selection=sel,
                      progress=not as_json, verify=verify, replay_cache=cache)
    summary = build_dataset(manifests, replay_root, tokenizer, out, cfg)
    if as_json:
        echo_json(summary)
        return
    if summary["status"] == "already built":
        checked = {"off": "not verified", "size": "every file present with its size",
                   "full": "every file's sha256 checked"}[summary["verified"]]
        stdout_console().print(f"{out}: already built ({summary['tasks']} tasks; {checked}); nothing to do")
        return
    if summary["repaired"]:
        stdout_console().print(f"{out}: repaired {len(summary['repaired'])} damaged task(s): "
                               f"{', '.join(summary['repaired'])}")
    stdout_console().print(
        f"{out}: built {summary['built_tasks']} of {summary['tasks']} tasks, {summary['rows']} frames in "
        f"{summary['run_s']:.1f} s ({summary['frames_per_s']:.0f} frames/s; read {summary['read_s']:.1f} s, "
        f"tokenize {summary['tokenize_s']:.1f} s, write {summary['write_s']:.1f} s)")


@click.command("validate")
@click.argument("path", type=click.Path(file_okay=False))
@click.option("--no-checksums", is_flag=True, help="Skip sha256 of every file (decode checks still run).")
@click.option("--no-observations", is_flag=True,
              help="Replay root: skip decoding the large observation files (headers of the rest still checked).")
@manifests_option
@click.option("--json", "as_json", is_flag=True, help="Print {path, ok, problems} as JSON.")
def validate_cmd(path: str, no_checksums: bool, no_observations: bool, manifest_dirs, as_json: bool) -> None:
    """Check a built dataset or a DQN-Replay root; report every problem found, each with its file. Exit 1 if any."""
    from jowa_data.layout import INFO, PLAN
    from jowa_data.validate import validate_dataset
    from jowa_data.validate_replay import is_replay_root, validate_replay_root

    p = Path(path)
    if not (p / INFO).is_file() and not (p / PLAN).is_file() and is_replay_root(path):
        problems = validate_replay_root(path, load_registry(manifest_dirs), observations=not no_observations)
    else:
        problems = validate_dataset(path, checksums=not no_checksums)
    if as_json:
        echo_json({"path": path, "ok": not problems, "problems": problems})
    else:
        con = stdout_console()
        for p in problems:
            con.print(f"[red]✗[/] {p}", highlight=False, markup=True)
        if not problems:
            con.print(f"[green]✓[/] {path}: {'replay root' if is_replay_root(path) else 'dataset'} is valid")
    if problems:
        if not as_json:
            stderr_console().print(f"{len(problems)} problem(s) found in {path}")
        raise SystemExit(1)


def print_dataset_stats(report: dict[str, Any]) -> None:
    """Rich table of `build.dataset_stats` (for `jowa-data stats DIR` on a built dataset)."""
    from rich.table import Table

    t = Table(title=f"token dataset {report['path']} (formats {', '.join(report['formats'])}, "
                    f"{report['tokens_per_frame']} tokens/frame, vocab {report['vocab_size']})")
    for c in ("game", "task", "episodes", "transitions", "unique tokens", "perplexity"):
        t.add_column(c, justify="left" if c == "game" else "right")
    for fmt in report["formats"]:
        t.add_column(f"{fmt} B/frame", justify="right")
        t.add_column(f"{fmt} files", justify="right")
    for g, s in report["games"].items():
        cells = [g, str(s["task_id"]), str(s["episodes"]), str(s["transitions"]), str(s["unique_tokens"]),
                 f"{s['perplexity']:.1f}"]
        for fmt in report["formats"]:
            cells += [f"{s['storage'][fmt]['bytes_per_frame']:.1f}", str(s["storage"][fmt]["files"])]
        t.add_row(*cells)
    cells = ["overall", "", str(report["total_episodes"]), str(report["total_transitions"]), "", ""]
    for fmt in report["formats"]:
        cells += [f"{report['storage'][fmt]['bytes_per_frame']:.1f}", str(report["storage"][fmt]["files"])]
    t.add_row(*cells, style="bold")
    stdout_console().print(t)


COMMANDS = [build_cmd, validate_cmd]

__all__ = ["COMMANDS", "print_dataset_stats", "DatasetError"]
