"""`jowa-data subsample` and `jowa-data stats`: thin wrappers over jowa_data.subsample / jowa_data.stats."""

from __future__ import annotations

from typing import Any

import click

from jowa_data.cli_util import (cache_option, echo_json, load_registry, manifests_option, parse_range, parse_runs,
                                replay_root_options,
                                stderr_console, stdout_console)
from jowa_common.errors import ConfigError
from jowa_data.stats import DEFAULT_STEP_CAP


@click.command("subsample")
@click.argument("games", nargs=-1, required=True)
@replay_root_options
@click.option("--out", "out", required=True, type=click.Path(dir_okay=False), help="Index file to write (.parquet).")
@click.option("--runs", help="Candidate runs, e.g. 1,2 (alone: use all of them). Default: the manifest's.")
@click.option("--num-runs", type=int, help="How many of the existing candidate runs to draw. Default: manifest.")
@click.option("--checkpoints", help="Inclusive checkpoint range A-B. Default: the manifest's.")
@click.option("--fraction", type=float, help="Target fraction of the pool's transitions, in (0, 1].")
@click.option("--transitions", type=int, help="Target number of transitions (instead of a fraction).")
@click.option("--seed", type=int, help="Base seed; per-game seeds are SeedSequence([seed, task_id]).")
@click.option("--include-incomplete", is_flag=True, help="Also draw episodes that end without a terminal.")
@click.option("--allow-fewer-runs", is_flag=True, help="Take the runs that exist if fewer than --num-runs do.")
@manifests_option
@click.option("--json", "as_json", is_flag=True, help="Print the selection as JSON.")
def subsample_cmd(games: tuple[str, ...], replay_root: str, cache: str | None, out: str, runs: str | None, num_runs: int | None,
                  checkpoints: str | None, fraction: float | None, transitions: int | None, seed: int | None,
                  include_incomplete: bool, allow_fewer_runs: bool, manifest_dirs: tuple[str, ...],
                  as_json: bool) -> None:
    """Draw a seeded episode index (Parquet) from a DQN-Replay root, per game manifest."""
    from jowa_data.roots import open_root
    from jowa_data.subsample import SubsampleOptions, build_index, index_metadata, write_index

    if fraction is not None and transitions is not None:
        raise ConfigError("give --fraction or --transitions, not both")
    reg = load_registry(manifest_dirs)
    manifests = reg.resolve(list(games))
    opts = SubsampleOptions(seed=seed, runs=parse_runs(runs), num_runs=num_runs,
                            checkpoints=parse_range(checkpoints), fraction=fraction, transitions=transitions,
                            include_incomplete=include_incomplete, allow_fewer_runs=allow_fewer_runs)
    table = build_index(manifests, open_root(replay_root, cache), options=opts, progress=not as_json)
    write_index(table, out)
    meta = index_metadata(table, out)
    err = stderr_console()
    for g, rec in meta["games"].items():
        if not rec["target_reached"]:
            err.print(f"[yellow]warning[/]: {g}: the pool holds {rec['pool_transitions']} transitions, "
                      f"fewer than the target {rec['target_transitions']}; all {rec['pool_episodes']} episodes taken")
    if as_json:
        echo_json({"out": out, **meta})
        return
    from rich.table import Table

    t = Table(title=f"episode index → {out}")
    for col in ("game", "runs", "ckpts", "pool eps", "pool steps", "target", "eps", "steps", "fraction"):
        t.add_column(col, justify="left" if col in ("game", "runs") else "right")
    for g, rec in meta["games"].items():
        frac = rec["selected_transitions"] / rec["pool_transitions"] if rec["pool_transitions"] else 0.0
        t.add_row(g, ",".join(map(str, rec["runs"])), "-".join(map(str, rec["checkpoints"])),
                  str(rec["pool_episodes"]), str(rec["pool_transitions"]), str(rec["target_transitions"]),
                  str(rec["selected_episodes"]), str(rec["selected_transitions"]), f"{frac:.3f}")
    stdout_console().print(t)


@click.command("stats")
@click.argument("path")
@cache_option
@click.option("--step-cap", type=int, default=DEFAULT_STEP_CAP, show_default=True,
              help="Episodes at least this long count as hitting the step cap (Dopamine: 27000 agent steps).")
@manifests_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables.")
def stats_cmd(path: str, cache: str | None, step_cap: int, manifest_dirs: tuple[str, ...], as_json: bool) -> None:
    """Statistics of a DQN-Replay root (a folder or a URL), an episode index or a built dataset: per game, per run
    and overall."""
    from jowa_data.stats import path_kind, replay_stats

    reg = load_registry(manifest_dirs) if path_kind(path) == "replay" else None
    report = replay_stats(path, registry=reg, step_cap=step_cap, progress=not as_json, cache=cache)
    if as_json:
        echo_json(report)
        return
    print_report(report)
    if report["kind"] == "replay":
        click.echo(f"note: stats read the small files only; observation files were not decoded "
                   f"(`jowa-data validate {path}` decodes and checks every file)", err=True)
    if "dataset" in report:
        from jowa_data import cli_build

        cli_build.print_dataset_stats(report["dataset"])


def _fmt(x: Any, digits: int = 2) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}f}" if not x.is_integer() else f"{x:.0f}"
    return str(x)


def _human_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def print_report(report: dict[str, Any]) -> None:
    """Rich tables for people: one row per game/run, then action and reward histograms per game."""
    from rich.table import Table

    con = stdout_console()
    t = Table(title=f"{report['kind']} stats: {report['path']} (step cap {report['step_cap']})")
    cols = ("game", "run", "episodes", "incompl.", "transitions", "capped", "ret mean", "ret std", "ret min",
            "ret q50", "ret max", "len mean", "len q01", "len q50", "len q99", "len max", "bytes")
    for c in cols:
        t.add_column(c, justify="left" if c in ("game", "run") else "right")

    def row(game: str, run: str, s: dict[str, Any], style: str | None = None) -> None:
        r, ln = s["return"], s["length"]
        t.add_row(game, run, str(s["episodes"]), str(s["incomplete_episodes"]), str(s["transitions"]),
                  str(s["capped_episodes"]), _fmt(r["mean"]), _fmt(r["std"]), _fmt(r["min"]), _fmt(r["q50"]),
                  _fmt(r["max"]), _fmt(ln["mean"], 1), _fmt(ln["q01"], 1), _fmt(ln["q50"], 1), _fmt(ln["q99"], 1),
                  _fmt(ln["max"]), " + ".join(f"{k} {_human_bytes(v)}" for k, v in s["bytes"].items()),
                  style=style)

    for g, gs in report["games"].items():
        for run, rs in gs["runs"].items():
            row(g, run, rs)
        if len(gs["runs"]) > 1:
            row(g, "all", gs, style="bold")
    row("overall", "", report["overall"], style="bold")
    con.print(t)

    h = Table(title="action and reward histograms (minimal set; 18-way full ids in --json)")
    h.add_column("game", justify="left")
    h.add_column("actions", justify="left")
    h.add_column("rewards -1 / 0 / +1", justify="right")
    for g, gs in report["games"].items():
        acts = gs["actions"].get("minimal", {})
        total = sum(acts.values()) or 1
        h.add_row(g, "  ".join(f"{n} {100 * c / total:.1f}%" for n, c in acts.items()),
                  " / ".join(str(gs["rewards"][b]) for b in ("-1", "0", "1")))
    con.print(h)


COMMANDS = [subsample_cmd, stats_cmd]
