"""`jowa train PRESET|CONFIG.toml`: two-stage pretraining from token shards (torchrun-able)."""

from __future__ import annotations

from pathlib import Path

import click

from jowa_data.cli_util import echo_json

PRESETS = ("tiny", "40M", "70M", "150M")


def resolve_train_config(preset_or_file: str, config_file: str | None, sets: tuple[str, ...]):
    from jowa_common.config import load_override_file, resolve_config, apply_overrides
    from pipelines.pretrain import train_preset

    if preset_or_file in PRESETS:
        cfg = train_preset(preset_or_file)
    elif Path(preset_or_file).is_file():
        data = load_override_file(preset_or_file)
        base = train_preset(data.pop("preset", "40M"))
        cfg = apply_overrides(base, data)
    else:
        raise click.BadParameter(f"'{preset_or_file}' is neither a preset ({', '.join(PRESETS)}) nor a config file",
                                 param_hint="PRESET_OR_CONFIG")
    return resolve_config(cfg, config_file, sets)


@click.command("train")
@click.argument("preset_or_config")
@click.option("--data", "dataset", type=click.Path(exists=True, file_okay=False), help="Built dataset folder (data.dataset).")
@click.option("--eval-data", type=click.Path(exists=True, file_okay=False), help="Held-out dataset folder (data.eval_dataset).")
@click.option("--tokenizer", type=click.Path(exists=True, dir_okay=False), help="Tokenizer checkpoint, for imagined-rollout PNGs.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run folder (rerun the same command to resume).")
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False), help="TOML/YAML override file.")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Override a config field (repeatable), e.g. --set optim.lr_stage2=5e-5.")
@click.option("--stop-after", type=int, default=None, help="Stop at this global step (checkpointing first).")
@click.option("--json", "as_json", is_flag=True, help="Print the final summary as JSON.")
def train_cmd(preset_or_config, dataset, eval_data, tokenizer, out, config_file, sets, stop_after, as_json):
    """Pretrain the world-action model: stage 1 (world loss), then stage 2 (joint loss), in one run.

    data.batch_size is the GLOBAL batch: under `torchrun --nproc_per_node N` each rank gets batch_size / N
    segments and DDP averages the gradients (the same update as one process on the whole batch).
    """
    from jowa_common.config import apply_overrides
    from pipelines.pretrain import pretrain

    cfg = resolve_train_config(preset_or_config, config_file, sets)
    over: dict = {"data": {}}
    if dataset:
        over["data"]["dataset"] = dataset
    if eval_data:
        over["data"]["eval_dataset"] = eval_data
    if tokenizer:
        over["tokenizer"] = tokenizer
    cfg = apply_overrides(cfg, over)
    summary = pretrain(cfg, out, stop_after=stop_after)
    if summary.get("checkpoint") is None:  # not rank 0
        return
    if as_json:
        echo_json(summary)
    else:
        last = summary["last"]
        click.echo(f"step {summary['step']}: loss {last.get('train/loss', float('nan')):.4f}, "
                   f"token acc {last.get('train/token_acc', float('nan')):.3f}, "
                   f"{last.get('perf/tokens_per_s', 0):.0f} tokens/s; checkpoint {summary['checkpoint']}")


COMMANDS = [train_cmd]
