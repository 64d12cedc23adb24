"""`jowa`: models, training, planning, evaluation, benchmarks and the end-to-end demo."""

from __future__ import annotations

import click

from jowa_data.cli_util import JowaGroup, debug_option


@click.group(cls=JowaGroup)
@debug_option
def main() -> None:
    """jowa: tokenizer, world-action model, training, planning, evaluation, scores, bench, demo."""


def _register() -> None:
    import importlib

    for mod in ("pipelines.cli_demo", "pipelines.cli_tokenizer", "pipelines.cli_model", "pipelines.cli_train",
                "pipelines.cli_eval", "pipelines.cli_scores", "pipelines.cli_bench", "pipelines.cli_finetune"):
        try:
            m = importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name == mod:  # that part is not built yet
                continue
            raise
        for cmd in m.COMMANDS:
            main.add_command(cmd)


_register()


if __name__ == "__main__":
    main()
