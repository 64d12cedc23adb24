"""`jowa eval CKPT --tokenizer TOK --games G1 G2`: play a world-action model on the real Atari emulator.
`jowa eval --planner random --games G1` (or `heuristic`): the same protocol without a model, for baselines."""

from __future__ import annotations

import click

from jowa_data.cli_util import echo_json, manifests_option, stderr_console, stdout_console


@click.command("eval")
@click.argument("args", nargs=-1, metavar="[CHECKPOINT] [GAMES]...")
@click.option("--tokenizer", type=click.Path(dir_okay=False), default=None,
              help="The tokenizer the model was trained with (encodes the emulator's frames).")
@click.option("--games", "games", multiple=True, metavar="GAME",
              help="Games (names, manifest files or a split such as 'pretrain'): --games Pong Phoenix.")
@click.option("--episodes", type=click.IntRange(min=1), default=16, show_default=True,
              help="Episodes per game, played in lockstep with one batched plan per step.")
@click.option("--planner", type=click.Choice(["greedy", "beam", "mcts", "random", "heuristic"]), default="beam",
              show_default=True, help="random: uniform valid actions; heuristic: the game's recording controller "
                                      "(jowa_data.policies). Neither needs a checkpoint.")
@click.option("--horizon", type=click.IntRange(min=0), default=None, help="H (default: the game's manifest).")
@click.option("--beam-width", type=click.IntRange(min=1), default=None, help="K (default: the game's manifest).")
@click.option("--history", type=click.IntRange(min=1), default=None,
              help="Context steps given to the model (default: the game's manifest).")
@click.option("--simulations", "num_simulations", type=click.IntRange(min=0), default=20, show_default=True,
              help="MCTS simulations per decision.")
@click.option("--epsilon", type=click.FloatRange(0, 1), default=0.001, show_default=True,
              help="Random valid action with this probability (per env and step).")
@click.option("--max-frames", type=click.IntRange(min=1), default=108_000, show_default=True,
              help="Emulator frames per episode (108K = 27K agent steps).")
@click.option("--seed", type=int, default=0, show_default=True, help="Env i: emulator seed SEED+i, own ε stream.")
@click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda[:i]")
@click.option("--precision", type=click.Choice(["fp32", "bf16"]), default="fp32", show_default=True)
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="torch CPU threads (default: torch's). On a loaded machine 1 is often fastest.")
@click.option("--out", type=click.Path(dir_okay=False), default=None,
              help="Raw-score JSON to write (after every game; a rerun keeps the games already there).")
@click.option("--gif", "gif_dir", type=click.Path(file_okay=False), default=None,
              help="Record episode 0 of each game as DIR/<Game>.gif.")
@click.option("--mp4", "mp4_dir", type=click.Path(file_okay=False), default=None,
              help="Record episode 0 of each game as DIR/<Game>.mp4 (OpenCV encoder).")
@click.option("--video-frames", type=click.IntRange(min=1), default=2700, show_default=True,
              help="Agent steps recorded per video (2700 = 3 min of play).")
@click.option("--fresh", is_flag=True, help="Replay every game even if --out already holds it.")
@manifests_option
@click.option("--json", "as_json", is_flag=True, help="Print the raw-score document as JSON.")
def eval_cmd(args, tokenizer, games, episodes, planner, horizon, beam_width, history,
             num_simulations, epsilon, max_frames, seed, device, precision, threads, out, gif_dir, mp4_dir,
             video_frames, fresh, manifest_dirs, as_json):
    """Evaluate CHECKPOINT on Atari games with the paper's protocol (no sticky actions, ε=0.001, 108K frames):
    raw (unclipped) returns per episode, decisions/s, optional GIF/MP4 of one episode. Feed --out to `jowa scores`.
    """
    from pathlib import Path

    from jowa_common.errors import CheckpointError, ConfigError
    from pipelines.evaluate import EvalConfig, evaluate

    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    from pipelines.evaluate import POLICIES

    model_free = planner in POLICIES
    checkpoint, more_games = (None, args) if model_free else (args[0] if args else None, args[1:])
    names = [g for arg in (*games, *more_games) for g in arg.split(",") if g]
    if not names:
        raise click.UsageError("give the games to play: --games Pong Phoenix")
    if gif_dir and mp4_dir:
        raise click.UsageError("--gif and --mp4 are exclusive")
    if not model_free:
        if checkpoint is None or tokenizer is None:
            raise click.UsageError(f"--planner {planner} plays a model: give CHECKPOINT and --tokenizer "
                                   "(random and heuristic need neither)")
        if not Path(checkpoint).is_file():
            raise CheckpointError(f"{checkpoint}: checkpoint not found")
        if not Path(tokenizer).is_file():
            raise ConfigError(f"{tokenizer}: tokenizer checkpoint not found")
    cfg = EvalConfig(episodes=episodes, planner=planner, horizon=horizon, beam_width=beam_width, history=history,
                     num_simulations=num_simulations, epsilon=epsilon, max_frames=max_frames, seed=seed,
                     device=device, precision=precision, video_dir=gif_dir or mp4_dir or "",
                     video_format="mp4" if mp4_dir else "gif", video_max_frames=video_frames,
                     manifests=tuple(manifest_dirs))
    doc = evaluate(checkpoint, tokenizer, names, cfg, out=out, progress=True, resume=not fresh)
    if as_json:
        echo_json(doc)
        return
    stdout_console().print(results_table(doc))
    err = stderr_console()
    if doc["reused"]:
        err.print(f"kept from {out}: {', '.join(doc['reused'])} (same checkpoint, tokenizer and settings)")
    if out:
        err.print(f"raw scores written to {out} (jowa scores {out})")


def results_table(doc: dict):
    """A rich table: one row per game. H, K and the history show only for the planners that use them; std is the
    sample std over episodes; "top action" is the action sent most often and its share of all decisions (near 100%:
    a constant policy)."""
    from rich.table import Table

    from pipelines.scores import top_action

    t = Table(title=f"jowa eval {doc.get('checkpoint') or doc.get('model_free') or ''}")
    for col in ("game", "planner", "H", "K", "hist", "episodes", "mean", "std", "min", "max", "steps", "top action",
                "dec/s"):
        t.add_column(col, justify="left" if col in ("game", "planner") else "right")
    for g, d in doc["games"].items():
        s, r = d["settings"], d["returns"]
        dps, top = d.get("decisions_per_s"), top_action(d.get("action_counts"))
        t.add_row(g, s["planner"], str(s.get("horizon", "-")), str(s.get("beam_width", "-")),
                  str(s.get("history", "-")), str(len(r)), f"{d['mean']:.1f}", f"{d['std']:.1f}", f"{min(r):.0f}",
                  f"{max(r):.0f}", f"{sum(d['lengths']) / len(r):.0f}",
                  "-" if top is None else f"{top[0]} {top[1]:.0%}",
                  "-" if dps is None else f"{dps:.2f}")
    return t


COMMANDS = [eval_cmd]
