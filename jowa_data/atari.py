"""The Atari environment with Dopamine's preprocessing, directly on `ale_py.ALEInterface`.

Why not gymnasium wrappers: DQN-Replay was produced by Dopamine's `AtariPreprocessing`
(`dopamine/discrete_domains/atari_lib.py`, 2019) and we want the same frames bit for bit, with no
wrapper layers in the hot loop. Recipe (docs/dqn_replay_format.md §4, §6):

* ALE `frame_skip=1`; sticky actions via ALE `repeat_action_probability` (0.25 when recording,
  0.0 for evaluation), applied per emulator frame;
* one agent step = `frame_skip` (4) `act` calls, rewards summed; the grayscale screens of the last
  two frames are max-pooled, then resized to 84×84 with `cv2.INTER_AREA`;
* on game over inside a step the loop stops early (the pool then uses the older buffered frame);
* reset: the reset frame, pooled with a zero frame; no noop starts; a lost life is not terminal.

Screens are not assumed to be 210×160 (Carnival is 214×160): buffers follow `getScreenDims()`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import cv2
import numpy as np

from jowa_common.actions import ACTION_ID, FULL_ACTIONS
from jowa_common.errors import ConfigError


@dataclass
class AtariConfig:
    """Emulator and preprocessing settings (defaults: Dopamine 2019 data collection, DQN-Replay)."""

    sticky: float = 0.25  # ALE repeat_action_probability per frame (gym v0 / DQN-Replay); 0.0 for eval
    frame_skip: int = 4  # emulator frames per agent step (Dopamine AtariPreprocessing)
    pool_last: int = 2  # max-pool the grayscale screens of the last N frames of a step (Dopamine: 2)
    screen_size: int = 84  # output side, pixels (cv2.INTER_AREA resize)
    noop_max: int = 0  # random no-op steps after reset (Dopamine: none)
    max_frames: int = 108_000  # emulator frames per episode before truncation (27k agent steps × 4)
    terminal_on_life_loss: bool = False  # Dopamine default: only game over is terminal

    def validate(self) -> "AtariConfig":
        if not 0.0 <= self.sticky <= 1.0:
            raise ConfigError(f"atari.sticky must be in [0, 1], got {self.sticky}")
        if self.frame_skip < 1 or not 1 <= self.pool_last <= self.frame_skip:
            raise ConfigError(f"atari: need frame_skip >= 1 and 1 <= pool_last <= frame_skip, "
                              f"got {self.frame_skip}, {self.pool_last}")
        if self.screen_size < 1 or self.max_frames < 1 or self.noop_max < 0:
            raise ConfigError("atari: screen_size and max_frames must be >= 1, noop_max >= 0")
        return self


def rom_path(rom: str) -> str:
    """Path of an ale-py bundled ROM (`"pong"`, `"ms_pacman"`); ConfigError if ale-py has no such ROM."""
    import warnings

    from ale_py import roms

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = roms.get_rom_path(rom)
    if path is None:
        raise ConfigError(f"ALE ROM '{rom}' is not bundled with ale-py (see ale_py.roms.get_all_rom_ids())")
    return str(path)


def minimal_action_names(rom: str) -> tuple[str, ...]:
    """The ROM's minimal action set by ALE name, in ALE order (what DQN-Replay indices refer to)."""
    return AtariEnv(rom, AtariConfig(sticky=0.0), seed=0).actions


class AtariEnv:
    """One ALE emulator with Dopamine preprocessing.

    `step(a)` takes an index into `actions` (the minimal set unless `actions=` names another list)
    and returns `(obs (84,84) uint8, raw reward (unclipped sum over the skipped frames),
    terminal (game over [or life loss if configured]), truncated (max_frames reached))`.
    """

    def __init__(self, rom: str, config: AtariConfig | None = None, seed: int = 0,
                 actions: Sequence[str] | None = None):
        from ale_py import Action, ALEInterface, LoggerMode

        self.config = cfg = (config or AtariConfig()).validate()
        ALEInterface.setLoggerMode(LoggerMode.Error)
        ale = ALEInterface()
        ale.setInt("random_seed", int(seed) & 0x7FFFFFFF)
        ale.setFloat("repeat_action_probability", float(cfg.sticky))
        ale.setInt("frame_skip", 1)
        ale.setInt("max_num_frames_per_episode", 0)  # we truncate ourselves (max_frames)
        ale.loadROM(rom_path(rom))
        self.ale = ale
        self.rom = rom
        minimal = tuple(FULL_ACTIONS[a.value] for a in ale.getMinimalActionSet())
        self.minimal_actions: tuple[str, ...] = minimal
        self.actions: tuple[str, ...] = tuple(actions) if actions is not None else minimal
        unknown = [a for a in self.actions if a not in ACTION_ID]
        if unknown:
            raise ConfigError(f"unknown ALE action names {unknown}")
        self._ale_actions = [Action(ACTION_ID[a]) for a in self.actions]
        h, w = ale.getScreenDims()
        self.screen_shape = (h, w)  # raw grayscale screen (Carnival: 214×160)
        self._bufs = np.zeros((cfg.pool_last, h, w), dtype=np.uint8)
        self._rng = np.random.default_rng(seed)  # noop starts only
        self.episode_frames = 0  # emulator frames since reset
        self.total_frames = 0  # emulator frames since construction
        self._lives = 0

    @property
    def num_actions(self) -> int:
        return len(self.actions)

    def lives(self) -> int:
        return int(self.ale.lives())

    def render_rgb(self) -> np.ndarray:
        """The current raw RGB screen (H, W, 3) uint8, e.g. for game videos."""
        return self.ale.getScreenRGB()

    def _obs(self) -> np.ndarray:
        pooled = self._bufs[0]
        for b in self._bufs[1:]:
            np.maximum(pooled, b, out=pooled)  # in place, as Dopamine does
        s = self.config.screen_size
        return cv2.resize(pooled, (s, s), interpolation=cv2.INTER_AREA).astype(np.uint8, copy=False)

    def reset(self) -> np.ndarray:
        """Start a new game; returns the first observation (84,84) uint8."""
        self.ale.reset_game()
        self.episode_frames = 0
        if self.config.noop_max:
            from ale_py import Action

            for _ in range(int(self._rng.integers(1, self.config.noop_max + 1))):
                self.ale.act(Action.NOOP)
                self.episode_frames += 1
                self.total_frames += 1
                if self.ale.game_over():
                    self.ale.reset_game()
        self._lives = self.lives()
        self.ale.getScreenGrayscale(self._bufs[0])  # Dopamine: buffer 0 = reset frame, buffer 1 = zeros
        self._bufs[1:] = 0
        return self._obs()

    def step(self, action: int) -> tuple[np.ndarray, float, bool, bool]:
        """One agent step (frame_skip emulator frames). `action` indexes `self.actions`."""
        cfg = self.config
        a = self._ale_actions[action]
        reward = 0.0
        terminal = False
        first_pooled = cfg.frame_skip - cfg.pool_last
        for t in range(cfg.frame_skip):
            reward += self.ale.act(a)
            self.episode_frames += 1
            self.total_frames += 1
            terminal = self.ale.game_over()
            if cfg.terminal_on_life_loss:
                lives = self.lives()
                terminal = terminal or lives < self._lives
                self._lives = lives
            if terminal:
                break
            if t >= first_pooled:
                self.ale.getScreenGrayscale(self._bufs[t - first_pooled])
        truncated = not terminal and self.episode_frames >= cfg.max_frames
        return self._obs(), float(reward), bool(terminal), bool(truncated)

