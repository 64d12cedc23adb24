"""`jowa demo`: the main job on a small built-in default (the README's first command)."""

from __future__ import annotations

import click


@click.command("demo")
@click.option("--out", default="demo_out", show_default=True, type=click.Path(file_okay=False),
              help="Output folder (rerun to resume).")
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False), help="TOML/YAML overrides of DemoConfig.")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Override a DemoConfig field (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON instead of a table.")
def demo_cmd(out: str, config_file: str | None, sets: tuple[str, ...], as_json: bool) -> None:
    """Record real Atari data → build token shards → train tokenizer and a tiny world-action model →
    evaluate greedy and with planning → fine-tune on a held-out game → print one summary."""
    from jowa_data.cli_util import echo_json, stdout_console
    from jowa_common.config import resolve_config
    from pipelines.demo import DemoConfig, render_summary, run_demo

    cfg = resolve_config(DemoConfig(), config_file, sets)
    summary = run_demo(out, cfg)
    if as_json:
        echo_json(summary)
    else:
        render_summary(summary, stdout_console())
        click.echo(f"\nEverything is in {out}/ (summary.json, pictures/).")


COMMANDS = [demo_cmd]
