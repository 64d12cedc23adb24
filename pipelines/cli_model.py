"""`jowa model info NAME`: parameter counts of a world-action model preset, per part."""

from __future__ import annotations

import click

from jowa_data.cli_util import echo_json, stdout_console

# trainable totals of the official code (docs/official_code.md §2), for the side-by-side column
OFFICIAL_TRAINABLE = {"40M": 17_416_091, "70M": 50.6e6, "150M": 109.1e6}


@click.group("model")
def model_group() -> None:
    """World-action model: presets and their sizes."""


@model_group.command("info")
@click.argument("name")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Override a config field (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object instead of a table.")
def info_cmd(name: str, sets: tuple[str, ...], as_json: bool) -> None:
    """Parameter count of each part of preset NAME (tiny | 40M | 70M | 150M) and the trainable total.

    The model is built on the meta device: no memory, no init time, whatever the size.
    """
    import torch

    from jowa_common.config import config_to_dict, resolve_config
    from jowa_model.presets import model_preset
    from jowa_model.world_action import WorldActionModel

    cfg = resolve_config(model_preset(name), None, sets)
    with torch.device("meta"):
        counts = WorldActionModel(cfg).parameter_counts()
    if as_json:
        echo_json({"preset": name, "config": config_to_dict(cfg), "parameters": counts})
        return
    from rich.table import Table

    table = Table(title=f"world-action model {name}: {cfg.num_layers} layers, {cfg.num_heads} heads, "
                        f"D={cfg.embed_dim}, Q MLP {cfg.q_hidden} x {cfg.num_q}")
    table.add_column("part")
    table.add_column("parameters", justify="right")
    for part, n in counts.items():
        table.add_row(part, f"{n:,}")
    if name in OFFICIAL_TRAINABLE and not sets:
        ref = OFFICIAL_TRAINABLE[name]
        table.add_row("official trainable", f"{ref:,.0f}" if ref == int(ref) and ref < 2e7 else f"{ref / 1e6:.1f}M")
    stdout_console().print(table)


COMMANDS = [model_group]
