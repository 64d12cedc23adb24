"""`jowa-data`: the dataset toolkit's command line. Thin: parse, call library functions, format."""

from __future__ import annotations

import click

from jowa_data.cli_util import (JowaGroup, debug_option, echo_json, load_registry, manifests_option,
                                register_commands, stdout_console)


@click.group(cls=JowaGroup)
@debug_option
def main() -> None:
    """jowa-data: DQN-Replay → subsampled index → token shards, with stats and validation."""


@main.command("manifests")
@manifests_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def manifests_cmd(manifest_dirs: tuple[str, ...], as_json: bool) -> None:
    """List the game manifests (validated) as a table."""
    from rich.table import Table

    from jowa_data.manifest import manifest_to_dict

    reg = load_registry(manifest_dirs)
    if as_json:
        echo_json([manifest_to_dict(m) for m in reg])
        return
    t = Table(title=f"{len(reg)} game manifests")
    for col in ("game", "ALE ROM", "split", "task", "#actions", "random", "human", "DQN", "H", "K", "ckpts", "runs"):
        t.add_column(col, justify="right" if col not in ("game", "ALE ROM", "split") else "left")
    for m in reg:
        d = m.data
        t.add_row(m.name, m.ale_rom, m.split, str(m.task_id), str(m.num_actions), f"{m.scores.random:g}",
                  f"{m.scores.human:g}", f"{m.scores.dqn:g}", str(m.planning.horizon), str(m.planning.beam_width),
                  f"{d.checkpoints[0]}-{d.checkpoints[1]}", f"{d.num_runs} of {len(d.runs)}")
    stdout_console().print(t)


# Sub-commands live in their own modules, each exposing COMMANDS.
register_commands(main, ("jowa_data.cli_build", "jowa_data.cli_record", "jowa_data.cli_replay", "jowa_data.cli_stats"))

if __name__ == "__main__":
    main()
