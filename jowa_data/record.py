"""Play the real emulator and write DQN-Replay files: how tests and the demo get real data.

`record(manifest, out_root, run, steps, policy, seed, capacity, max_episode_steps)` reproduces
Dopamine's data collection loop (`Runner._run_one_episode`, 2019): the stored row t is
(o_t, a_t, clip(r_t), d_t), where o_t is the frame a_t was chosen on and d_t is 1 on the last step
of an episode (game over or the step cap; a lost life is not terminal). The final next-observation
is never stored. The last episode is cut when `steps` runs out (it has no terminal).

The behaviour policy is a spec string or a callable (`jowa_data.policies`: random, heuristic
controllers, epsilon schedules that decay over the recording).

All randomness comes from the seed: the ALE seed and the policy's Generator are derived from it.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from jowa_data.atari import AtariConfig, AtariEnv
from jowa_common.errors import ConfigError, ManifestError
from jowa_data.manifest import GameManifest
from jowa_data.policies import Policy, bind_policy, make_policy
from jowa_data.replay_writer import LoggedCheckpoint, ReplayLogger

# --- recording ----------------------------------------------------------------------------------

@dataclass
class RecordResult:
    """What was played and where it went; per-step arrays are in play order (padding excluded).

    `add_steps[i]` is the step stored by buffer add i (-1 for a padding row), and `checkpoints`
    say which adds each written suffix yields under the read rule, so `logged_steps()` is exactly
    the sequence of steps a correct reader returns. It equals all steps unless an episode start
    skipped a log (`skipped_logs > 0`: a whole wrap of adds is then missing from the files).
    """

    game: str
    run: str
    root: Path
    replay_dir: Path
    capacity: int
    seed: int
    policy: str
    actions: np.ndarray  # (S,) int32 minimal action index
    rewards: np.ndarray  # (S,) float32 clipped to [-1, 1]
    raw_rewards: np.ndarray  # (S,) float32 unclipped (not in DQN-Replay)
    terminals: np.ndarray  # (S,) uint8
    episode_starts: np.ndarray  # (E,) int64 first step of each episode
    episode_lengths: np.ndarray  # (E,) int64; the last episode may be cut (no terminal)
    add_steps: np.ndarray  # (A,) int64 step per buffer add, -1 = padding
    checkpoints: list[LoggedCheckpoint]
    skipped_logs: int  # wraps not logged (2019 quirk)
    frames: np.ndarray | None = None  # (S,84,84) uint8 o_t, if keep_frames
    emulator_frames: int = 0
    seconds: float = 0.0
    meta: dict = field(default_factory=dict)

    @property
    def steps(self) -> int:
        return len(self.actions)

    @property
    def num_episodes(self) -> int:
        return len(self.episode_starts)

    def episode_slices(self) -> list[slice]:
        return [slice(int(s), int(s + n)) for s, n in zip(self.episode_starts, self.episode_lengths)]

    def logged_steps(self) -> np.ndarray:
        """Step indices, in order, of the real rows the written suffixes hold (read rule, stitched)."""
        parts = [self.add_steps[c.first_add:c.stop_add] for c in self.checkpoints]
        s = np.concatenate(parts) if parts else np.zeros(0, np.int64)
        return s[s >= 0]

    def expected_episodes(self) -> list[np.ndarray]:
        """Step indices of each episode exactly as a correct reader returns it from the files.

        The stitched stream of `logged_steps()` split after each terminal; the last one may be cut
        (check `terminals[ep[-1]]`). Differs from `episode_slices()` only where a skipped log lost rows.
        """
        s = self.logged_steps()
        ends = np.flatnonzero(self.terminals[s] == 1) + 1
        return [e for e in np.split(s, ends) if len(e)]

    def fully_logged(self) -> bool:
        """True when every played step can be read back from the files, in order."""
        s = self.logged_steps()
        return len(s) == self.steps and bool(np.all(s == np.arange(self.steps)))


def derive_seeds(seed: int) -> tuple[int, np.random.Generator]:
    """(ALE seed, policy Generator), independent streams from one user seed."""
    ss = np.random.SeedSequence(seed)
    ale_ss, pol_ss = ss.spawn(2)
    return int(ale_ss.generate_state(1)[0] & 0x7FFFFFFF), np.random.default_rng(pol_ss)


def record(manifest: GameManifest, out_root: str | os.PathLike, run: str | int = 1, steps: int = 1000,
           policy: str | Policy = "random", seed: int = 0, capacity: int = 1_000_000,
           max_episode_steps: int = 27_000, atari: AtariConfig | None = None, keep_frames: bool = True,
           overwrite: bool = False, progress: bool = True, compresslevel: int = 9) -> RecordResult:
    """Play `steps` agent steps of `manifest`'s game and write `<out_root>/<Game>/<run>/replay_logs`.

    `max_episode_steps` (Dopamine: 27000 agent steps = 108k frames) ends an episode with terminal=1.
    `compresslevel` 9 is Dopamine's gzip default; 1 writes ~13x faster and files ~2x larger.
    """
    import time

    from tqdm import tqdm

    if steps < 1:
        raise ConfigError(f"steps must be >= 1, got {steps}")
    if max_episode_steps < 1:
        raise ConfigError(f"max_episode_steps must be >= 1, got {max_episode_steps}")
    ale_seed, rng = derive_seeds(seed)
    env = AtariEnv(manifest.ale_rom, atari or AtariConfig(), seed=ale_seed)
    if env.minimal_actions != tuple(manifest.actions):
        raise ManifestError(f"{manifest.path or manifest.name}: key 'actions': {list(manifest.actions)} differs "
                            f"from ALE's minimal action set for ROM '{manifest.ale_rom}': {list(env.minimal_actions)}")
    n_act = env.num_actions
    pol_name = policy if isinstance(policy, str) else getattr(policy, "__name__", repr(policy))
    act = make_policy(policy, n_act, rom=manifest.ale_rom, steps=steps) if isinstance(policy, str) else policy
    bind_policy(act, env)

    actions = np.zeros(steps, np.int32)
    rewards = np.zeros(steps, np.float32)
    raw = np.zeros(steps, np.float32)
    terms = np.zeros(steps, np.uint8)
    frames = np.zeros((steps, 84, 84), np.uint8) if keep_frames else None
    add_steps: list[int] = []
    starts, lengths = [0], []

    t0 = time.perf_counter()
    if not 0 <= compresslevel <= 9:
        raise ConfigError(f"compresslevel must be in [0, 9], got {compresslevel}")
    logger = ReplayLogger(out_root, manifest.name, run, capacity=capacity, overwrite=overwrite,
                          compresslevel=compresslevel)
    obs = env.reset()
    ep_len = 0
    bar = tqdm(total=steps, desc=f"record {manifest.name}/{run}", unit="step", file=sys.stderr,
               disable=not progress, mininterval=0.5)
    for t in range(steps):
        a = int(act(obs, rng, n_act))
        if not 0 <= a < n_act:
            raise ConfigError(f"policy '{pol_name}' returned action {a}, outside [0, {n_act})")
        next_obs, r, game_over, truncated = env.step(a)
        ep_len += 1
        terminal = game_over or truncated or ep_len >= max_episode_steps
        clipped = float(np.clip(r, -1.0, 1.0))
        before = logger.add_count
        logger.add(obs, a, clipped, terminal)
        add_steps.extend([-1] * (logger.add_count - before - 1) + [t])
        actions[t], rewards[t], raw[t], terms[t] = a, clipped, r, terminal
        if frames is not None:
            frames[t] = obs
        if terminal:
            lengths.append(ep_len)
            ep_len = 0
            obs = env.reset()
            if t + 1 < steps:
                starts.append(t + 1)
        else:
            obs = next_obs
        bar.update(1)
    bar.close()
    if ep_len:
        lengths.append(ep_len)
    logger.close()
    return RecordResult(
        game=manifest.name, run=str(run), root=Path(out_root), replay_dir=logger.dir, capacity=capacity,
        seed=seed, policy=pol_name, actions=actions, rewards=rewards, raw_rewards=raw, terminals=terms,
        episode_starts=np.array(starts, np.int64), episode_lengths=np.array(lengths, np.int64),
        add_steps=np.array(add_steps, np.int64), checkpoints=list(logger.logged), skipped_logs=logger.skipped_logs,
        frames=frames, emulator_frames=env.total_frames, seconds=time.perf_counter() - t0,
        meta={"ale_seed": ale_seed, "max_episode_steps": max_episode_steps, "task_id": manifest.task_id},
    )
