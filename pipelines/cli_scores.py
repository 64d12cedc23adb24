"""`jowa scores RAW.json...`: per-game HNS/DNS and mean / median / IQM with bootstrap CIs."""

from __future__ import annotations

import click

from jowa_data.cli_util import echo_json, load_registry, manifests_option, stderr_console, stdout_console


@click.command("scores")
@click.argument("raw_files", nargs=-1, required=True, type=click.Path())
@click.option("--ref", type=click.Choice(["human", "dqn"]), default="human", show_default=True,
              help="Normalise by human (HNS, paper Table 2) or DQN (DNS, paper Table 3/18) scores.")
@click.option("--boot", "n_boot", type=click.IntRange(min=0), default=2000, show_default=True,
              help="Bootstrap resamples (episodes within each game) for CIs; 0 = none.")
@click.option("--ci", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.95, show_default=True,
              help="Confidence level of the percentile intervals.")
@click.option("--seed", type=int, default=0, show_default=True, help="Bootstrap seed.")
@click.option("--pool", is_flag=True, help="Pool the episodes of a game that appears in several files (default: "
                                         "show the files side by side).")
@click.option("--clipped", is_flag=True, help="Compare clipped returns (sum of clip(r, -1, 1)): what a built dataset "
                                            "holds; RAW_FILES may then name dataset folders (the data's returns).")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default=None,
              help="Also write a PNG bar chart of the per-game normalised scores.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON instead of a table.")
@manifests_option
def scores_cmd(raw_files: tuple[str, ...], ref: str, n_boot: int, ci: float, seed: int, pool: bool, clipped: bool,
               plot_path: str | None, as_json: bool, manifest_dirs: tuple[str, ...]) -> None:
    """Normalised scores of raw-score files (ours from `jowa eval`, or the official repo's layout).

    Reference scores come from the game manifests. IQM is the 25% trimmed mean over per-game means,
    as the paper computes it. Files that share a game (random / greedy / beam runs, a dataset with --clipped)
    are shown side by side, one column per file, unless --pool merges their episodes.
    """
    from pipelines.scores import (ScoresConfig, compare_runs, comparison_table, compute_scores, load_raw_scores,
                                  load_runs, scores_table)

    reg = load_registry(manifest_dirs)
    scfg = ScoresConfig(ref=ref, n_boot=n_boot, ci=ci, seed=seed)
    runs = load_runs(raw_files, reg, clipped=clipped)
    shared = len(runs) > 1 and any(sum(g in res for _, res in runs) > 1 for g in {g for _, r in runs for g in r})
    if clipped or (shared and not pool):
        cmp = compare_runs(runs, reg, scfg)
        if plot_path:
            from pipelines.charts import comparison_chart

            cmp["plot"] = str(comparison_chart(cmp, plot_path, clipped=clipped))
        if as_json:
            echo_json(cmp)
            return
        stdout_console().print(comparison_table(cmp, clipped=clipped))
        if plot_path:
            stderr_console().print(f"plot written to {plot_path}")
        return
    results = load_raw_scores(raw_files, reg, pool=pool)
    report = compute_scores(results, reg, scfg)
    if plot_path:
        from pipelines.charts import scores_chart

        scores_chart(report, plot_path)
        report["plot"] = str(plot_path)
    if as_json:
        echo_json(report)
        return
    stdout_console().print(scores_table(report))
    if plot_path:
        stderr_console().print(f"plot written to {plot_path}")


COMMANDS = [scores_cmd]
