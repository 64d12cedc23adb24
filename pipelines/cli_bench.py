"""`jowa bench ...`: speed measurements (no timing asserts live in the tests; they live here).

`jowa bench` (or `jowa bench all`) runs every benchmark in one process and prints one table with the machine it ran
on; `jowa bench read|record|build|stream|train|tokenizer` run one section; `jowa bench plan` is the planner
benchmark with its own options (checkpoint, preset, dtype).
"""

from __future__ import annotations

import click

from jowa_data.cli_util import JowaGroup, echo_json, load_registry, manifests_option, stderr_console, stdout_console


def _size_options(f):
    """--size/--full/--set/--json, shared by `jowa bench`, `all` and the one-section commands."""
    f = click.option("--json", "as_json", is_flag=True, help="Print one JSON object (machine, config, figures).")(f)
    f = click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
                     help="Override a size knob, e.g. --set train.configs='[\"40M\"]' --set read.rows=50000 "
                          "(repeatable; see pipelines/bench.py BenchConfig).")(f)
    f = click.option("--full", is_flag=True, help="Same as --size full (paper-size inputs; much longer).")(f)
    f = click.option("--size", type=click.Choice(["tiny", "quick", "full"]), default="quick", show_default=True,
                     help="Input sizes: tiny (seconds, for tests), quick (a few minutes in all), full.")(f)
    return f


def _run_sections(sections: tuple[str, ...], size: str, full: bool, sets: tuple[str, ...], as_json: bool) -> None:
    from jowa_common.config import parse_set_args
    from pipelines.bench import bench_config, render_table, run_bench

    cfg = bench_config("full" if full else size, parse_set_args(sets) if sets else None)
    err = stderr_console()
    with err.status("jowa bench") as status:
        res = run_bench(cfg, sections, progress=lambda msg: status.update(f"jowa bench: {msg}"))
    if as_json:
        echo_json(res)
    else:
        render_table(res, stdout_console())
    if res["errors"]:
        raise click.exceptions.Exit(1)


@click.group(cls=JowaGroup, invoke_without_command=True)
@_size_options
@click.pass_context
def bench(ctx: click.Context, size, full, sets, as_json) -> None:
    """Speed benchmarks. Without a sub-command: every benchmark, one table (same as `jowa bench all`)."""
    if ctx.invoked_subcommand is None:
        from pipelines.bench import SECTIONS

        _run_sections(SECTIONS, size, full, sets, as_json)
    elif full or sets or as_json or ctx.get_parameter_source("size") != click.core.ParameterSource.DEFAULT:
        raise click.UsageError(f"put --size/--full/--set/--json after the sub-command: "
                               f"jowa bench {ctx.invoked_subcommand} [OPTIONS]")


@bench.command("all")
@click.option("--only", default="", help="Comma list of sections to run (default: all).")
@click.option("--skip", default="", help="Comma list of sections to leave out.")
@_size_options
def all_cmd(only, skip, size, full, sets, as_json) -> None:
    """Every benchmark in one process: read, record, build, stream, train, tokenizer, plan."""
    from jowa_common.errors import ConfigError
    from pipelines.bench import SECTIONS

    picked = [s for s in only.split(",") if s] or list(SECTIONS)
    dropped = [s for s in skip.split(",") if s]
    for s in picked + dropped:
        if s not in SECTIONS:
            raise ConfigError(f"--only/--skip: unknown section '{s}' (choose from {', '.join(SECTIONS)})")
    _run_sections(tuple(s for s in SECTIONS if s in picked and s not in dropped), size, full, sets, as_json)


def _section_command(name: str, doc: str):
    @_size_options
    def cmd(size, full, sets, as_json) -> None:
        _run_sections((name,), size, full, sets, as_json)

    cmd.__doc__ = doc
    bench.command(name)(cmd)


for _name, _doc in (
        ("read", "Frames/s reading a generated DQN-Replay observation file, per gzip decoder, and peak RSS."),
        ("record", "Agent steps/s and emulator frames/s recording with the real ALE."),
        ("build", "jowa-data build frames/s, its read/tokenize/write split, the paper tokenizer's encode frames/s."),
        ("stream", "Segments/s per process from zarr and webdataset, the on-the-fly source, MiB per 1M transitions."),
        ("train", "Tokens/s of a stage-2 train step per model preset, fp32 and bf16 autocast."),
        ("tokenizer", "Tokenizer encode/decode frames/s (paper and tiny, fp32 and bf16), training step, LPIPS.")):
    _section_command(_name, _doc)


@bench.command("plan")
@click.argument("ckpt", required=False, type=click.Path(exists=True, dir_okay=False))
@click.option("--config", "preset", default="40M", show_default=True,
              help="Model preset (random weights) when no checkpoint is given: tiny, 40M, 70M, 150M.")
@click.option("--game", default="Phoenix", show_default=True, help="Game: task id and valid actions.")
@click.option("--reps", default=5, show_default=True, help="Timed decisions per planner (median).")
@click.option("--warmup", default=2, show_default=True, help="Untimed decisions per planner.")
@click.option("--bf16", is_flag=True, help="bf16 autocast for the world model and the tokenizer (default fp32).")
@click.option("--no-encode", is_flag=True, help="Exclude tokenizer.encode of the new frame from each decision.")
@click.option("--threads", default=2, show_default=True, help="torch intra-op threads.")
@click.option("--plain", is_flag=True, help="The plain model of world_action.py, without jowa_model/cpu_kernels.py.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@manifests_option
def plan_cmd(ckpt, preset, game, reps, warmup, bf16, no_encode, threads, plain, as_json, manifest_dirs) -> None:
    """Decisions/s of greedy, beam (H=2, K=2/3/4) and MCTS (20 simulations) for one model, 8-step context."""
    from jowa_common.errors import ConfigError
    from jowa_model.presets import PRESETS
    from pipelines.bench_plan import BenchPlanConfig, bench_plan

    if ckpt is None and preset not in PRESETS:
        raise ConfigError(f"--config: unknown model preset '{preset}' (choose from {', '.join(PRESETS)})")
    if reps < 1:
        raise click.BadParameter("must be >= 1", param_hint="--reps")
    cfg = BenchPlanConfig(preset=preset, game=game, reps=reps, warmup=warmup, threads=threads,
                          dtype="bfloat16" if bf16 else "float32", encode=not no_encode, cpu_kernels=not plain)
    err = stderr_console()
    with err.status("benchmarking planners") as status:
        res = bench_plan(ckpt, cfg, progress=lambda name: status.update(f"benchmarking {name}"),
                         registry=load_registry(manifest_dirs))
    if as_json:
        echo_json(res)
        return
    from rich.table import Table

    t = Table(title=f"planning speed: {res['settings']['preset']} {res['settings']['dtype']}, {game}, "
                    f"encode {'on' if cfg.encode else 'off'}")
    for col in ("planner", "dec/s", "ms", "x greedy", "official dec/s", "speed-up", "speed-up (token path)"):
        t.add_column(col, justify="right")
    off = res.get("official") or {}
    for k in ("greedy", "beam_k2", "beam_k3", "beam_k4", "mcts"):
        su = (res.get("speedup_vs_official") or {}).get(k)
        sut = (res.get("speedup_vs_official_token_path") or {}).get(k)
        t.add_row(k, f"{res[k]:.2f}", f"{res['ms'][k]:.1f}", f"{res['ratio_to_greedy'][k]:.3f}",
                  f"{off[k]:.3f}" if k in off else "-", f"{su:.1f}x" if su else "-", f"{sut:.1f}x" if sut else "-")
    stdout_console().print(t)
    click.echo(f"tokenizer.encode of one frame: {res['encode_ms']:.1f} ms (included in every decision)"
               if cfg.encode else "tokenizer.encode excluded")


@bench.command("learn")
@click.option("--out", default="learn_out", show_default=True, type=click.Path(file_okay=False),
              help="Output folder (rerun to resume).")
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False),
              help="TOML/YAML overrides of LearnConfig.")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
              help="Override a LearnConfig field (repeatable), e.g. --set transfer_game=Pong.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON instead of tables.")
def learn_cmd(out: str, config_file: str | None, sets: tuple[str, ...], as_json: bool) -> None:
    """Does the agent beat the data it was trained on? Record mixed-quality data with heuristic controllers,
    train tokenizer + one multi-game model, evaluate on the real emulator beside random play and the data's own
    return (95% CIs), with world-model and tokenizer metrics against their baselines. Resumable; ~1 h on 2 cores."""
    from jowa_common.config import resolve_config
    from pipelines.learn import LearnConfig, render_report, run_learn

    cfg = resolve_config(LearnConfig(), config_file, sets)
    report = run_learn(out, cfg, console=stderr_console())
    if as_json:
        echo_json(report)
        return
    render_report(report, stdout_console())
    click.echo(f"\nreport.json and pictures/ (report.png, reconstructions.png, ...) are in {out}/")


COMMANDS = [bench]
