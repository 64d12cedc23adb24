"""`jowa bench ...`: speed measurements (no timing asserts live in the tests; they live here)."""

from __future__ import annotations

import click

from jowa_data.cli_util import JowaGroup, echo_json, load_registry, manifests_option, stderr_console, stdout_console


@click.group(cls=JowaGroup)
def bench() -> None:
    """Speed benchmarks: plan (more sub-commands come with the other parts)."""


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
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@manifests_option
def plan_cmd(ckpt, preset, game, reps, warmup, bf16, no_encode, threads, as_json, manifest_dirs) -> None:
    """Decisions/s of greedy, beam (H=2, K=2/3/4) and MCTS (20 simulations) for one model, 8-step context."""
    from jowa_data.errors import ConfigError
    from jowa_model.presets import PRESETS
    from pipelines.bench_plan import BenchPlanConfig, bench_plan

    if ckpt is None and preset not in PRESETS:
        raise ConfigError(f"--config: unknown model preset '{preset}' (choose from {', '.join(PRESETS)})")
    if reps < 1:
        raise click.BadParameter("must be >= 1", param_hint="--reps")
    cfg = BenchPlanConfig(preset=preset, game=game, reps=reps, warmup=warmup, threads=threads,
                          dtype="bfloat16" if bf16 else "float32", encode=not no_encode)
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


COMMANDS = [bench]
