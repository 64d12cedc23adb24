"""`jowa finetune CKPT --game GAME`: fine-tune a pretrained checkpoint on one game (paper sec. 5.5)."""

from __future__ import annotations

import click

from jowa_data.cli_util import echo_json, manifests_option


@click.command("finetune")
@click.argument("checkpoint", type=click.Path(exists=True, dir_okay=False))
@click.option("--game", required=True, help="Manifest name of the game (held-out, or new via --manifests).")
@click.option("--tokenizer", required=True, type=click.Path(exists=True, dir_okay=False),
              help="The frozen tokenizer the dataset was (or will be) built with.")
@click.option("--data", "dataset", type=click.Path(exists=True, file_okay=False),
              help="Built fine-tuning dataset (`jowa-data build GAME --transitions 5000 --checkpoints 41-50`).")
@click.option("--replay", "replay_root",
              help="DQN-Replay root, a folder or a URL (gs://atari-replay-datasets/dqn, s3://, https://): build the "
                   "5k-transition set into OUT/data (instead of --data).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run folder (rerun to resume).")
@click.option("--preset", type=click.Choice(["paper", "tiny"]), default="paper", show_default=True,
              help="paper: batch 32, lr 5e-5, 50k steps, imagination after 20k; tiny: CPU smoke run.")
@click.option("--steps", type=int, default=None, help="Optimizer steps (steps).")
@click.option("--world-weight", type=float, default=None, help="Weight of the world loss (loss.world_weight, 0.5).")
@click.option("--no-imagine", is_flag=True, help="Turn off planning-based synthetic data.")
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False), help="TOML/YAML override file.")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
              help="Override a config field (repeatable), e.g. --set eval.episodes=4.")
@click.option("--stop-after", type=int, default=None, help="Stop at this step (checkpointing first).")
@manifests_option
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def finetune_cmd(checkpoint, game, tokenizer, dataset, replay_root, out, preset, steps, world_weight, no_imagine,
                 config_file, sets, stop_after, manifest_dirs, as_json):
    """Fine-tune CHECKPOINT on GAME with its own task id and valid actions, planning-based synthetic data,
    and evaluations on the real emulator; keeps OUT/best.pt (best mean return) and OUT/report.json."""
    from jowa_common.config import apply_overrides, resolve_config
    from pipelines.finetune import finetune, finetune_preset

    if not dataset and not replay_root:
        raise click.UsageError("give --data DATASET or --replay ROOT")
    cfg = resolve_config(finetune_preset(preset), config_file, sets)
    over: dict = {"game": game, "tokenizer": tokenizer, "data": {}}
    if dataset:
        over["data"]["dataset"] = dataset
    if replay_root:
        over["data"]["replay_root"] = replay_root
    if steps is not None:
        over["steps"] = steps
    if world_weight is not None:
        over["loss"] = {"world_weight": world_weight}
    if no_imagine:
        over["imagine"] = {"enabled": False}
    if manifest_dirs:
        over["manifests"] = list(manifest_dirs)
    cfg = apply_overrides(cfg, over)
    rep = finetune(cfg, checkpoint, out, stop_after=stop_after)
    if as_json:
        echo_json(rep)
        return
    for e in rep["evals"]:
        click.echo(f"step {e['step']}: mean return {e['mean']:.1f} over {len(e['returns'])} episodes")
    best = rep["best"]
    if best:
        click.echo(f"best: step {best['step']}, mean return {best['mean']:.1f} -> {best['path']}")
    click.echo(f"{rep['steps']} steps, {rep['imagined_segments']} imagined segments; report {out}/report.json")


COMMANDS = [finetune_cmd]
