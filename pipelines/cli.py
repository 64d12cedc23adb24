"""`jowa`: models, training, planning, evaluation, benchmarks and the end-to-end demo."""

from __future__ import annotations

import click

from jowa_data.cli_util import JowaGroup, debug_option, register_commands


@click.group(cls=JowaGroup)
@debug_option
def main() -> None:
    """jowa: tokenizer, world-action model, training, planning, evaluation, scores, bench, demo."""


# Sub-commands live in their own modules, each exposing COMMANDS.
register_commands(main, ("pipelines.cli_bench", "pipelines.cli_demo", "pipelines.cli_eval", "pipelines.cli_finetune",
                         "pipelines.cli_model", "pipelines.cli_scores", "pipelines.cli_tokenizer", "pipelines.cli_train"))

if __name__ == "__main__":
    main()
