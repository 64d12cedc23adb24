"""`jowa-data record`: play the real emulator and write DQN-Replay files (thin shell over `record.record`)."""

from __future__ import annotations

import click

from jowa_data.cli_util import echo_json, load_registry, manifests_option, stdout_console
from jowa_common.errors import ConfigError


@click.command("record")
@click.argument("game")
@click.option("--out", "out_root", required=True, type=click.Path(file_okay=False),
              help="DQN-Replay root; files go to OUT/<Game>/<run>/replay_logs/.")
@click.option("--run", default="1", show_default=True, help="Run folder name (DQN-Replay: 1..5).")
@click.option("--steps", type=int, default=10_000, show_default=True, help="Agent steps to play (4 frames each).")
@click.option("--policy", default="random", show_default=True,
              help="random | noop | epsilon:<eps>[:<inner>] | module:function | file.py:function.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seeds the emulator and the policy.")
@click.option("--capacity", type=int, default=1_000_000, show_default=True,
              help="Rows per checkpoint file (DQN-Replay: 1,000,000).")
@click.option("--max-episode-steps", type=int, default=27_000, show_default=True,
              help="Agent-step cap per episode; ends it with terminal=1 (Dopamine: 27,000 = 108k frames).")
@click.option("--sticky", type=float, default=0.25, show_default=True,
              help="ALE repeat_action_probability (DQN-Replay: 0.25).")
@click.option("--compresslevel", type=click.IntRange(0, 9), default=9, show_default=True,
              help="gzip level of the files (9 = Dopamine's; 1 writes ~13x faster, ~2x larger).")
@click.option("--overwrite", is_flag=True, help="Replace existing checkpoint files of this run.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@manifests_option
def record_cmd(game: str, out_root: str, run: str, steps: int, policy: str, seed: int, capacity: int,
               max_episode_steps: int, sticky: float, compresslevel: int, overwrite: bool, quiet: bool, as_json: bool,
               manifest_dirs: tuple[str, ...]) -> None:
    """Record GAME (a manifest name or .toml file) with Dopamine's preprocessing into DQN-Replay files."""
    from jowa_data.atari import AtariConfig
    from jowa_data.record import record

    ms = load_registry(manifest_dirs).resolve([game])
    if len(ms) != 1:
        raise ConfigError(f"'{game}' names {len(ms)} games; record one game at a time")
    m = ms[0]
    res = record(m, out_root, run=run, steps=steps, policy=policy, seed=seed, capacity=capacity,
                 max_episode_steps=max_episode_steps, atari=AtariConfig(sticky=sticky), keep_frames=False,
                 overwrite=overwrite, progress=not quiet, compresslevel=compresslevel)
    complete = int(res.terminals.sum())
    summary = {
        "game": m.name, "task_id": m.task_id, "run": res.run, "replay_dir": str(res.replay_dir),
        "steps": res.steps, "episodes": res.num_episodes, "complete_episodes": complete,
        "checkpoints": [c.suffix for c in res.checkpoints], "skipped_logs": res.skipped_logs,
        "return_clipped_mean": float(res.rewards.sum() / max(res.num_episodes, 1)),
        "emulator_frames": res.emulator_frames, "seconds": round(res.seconds, 3),
        "agent_steps_per_s": round(res.steps / max(res.seconds, 1e-9), 1),
        "frames_per_s": round(res.emulator_frames / max(res.seconds, 1e-9), 1),
        "policy": res.policy, "seed": seed, "capacity": capacity, "compresslevel": compresslevel,
    }
    if as_json:
        echo_json(summary)
        return
    stdout_console().print(
        f"[bold]{m.name}[/] run {res.run}: {res.steps} steps, {res.num_episodes} episodes ({complete} complete), "
        f"checkpoints {summary['checkpoints'][0]}..{summary['checkpoints'][-1]} in {res.replay_dir} "
        f"({summary['agent_steps_per_s']:.0f} steps/s, {summary['frames_per_s']:.0f} frames/s)")


COMMANDS = [record_cmd]
