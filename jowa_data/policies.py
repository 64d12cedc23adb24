"""Behaviour policies for `jowa-data record`: random play, heuristic controllers, and an epsilon schedule.

A DQN-Replay run goes from random play to good play over its checkpoints (its agent's epsilon decays while
it learns). `epsilon:1.0-0.05:heuristic` records data of the same shape: a heuristic controller for the
game, replaced by a uniform random action with a probability that decays linearly from 1.0 to 0.05 over the
recording. Offline RL on such data can beat the data's mean return by acting like its best part.

A policy is `(obs (84,84) uint8, rng: np.random.Generator, num_actions) -> minimal action index`. A policy
that needs the emulator (a controller reading the game's RAM) also has `bind(env)`, which the recorder and
`pipelines.evaluate.play_policy` call once, before the first step, with the `jowa_data.atari.AtariEnv`.

Specs (`make_policy`):
* `random`: uniform over the minimal action set; `noop`: always action 0;
* `heuristic`: the game's controller (`CONTROLLERS`, by ALE ROM name);
* `epsilon:<eps>[:<inner>]`: with probability eps a uniform action, else `<inner>` (default `noop`);
  `<eps>` may be `A-B`: decays linearly from A to B over the recording's steps (`A-B@N`: over N steps);
* `module:function` or `path/to/file.py:function`: any callable with the policy signature, or a
  factory `f()` / `f(num_actions)` that returns one.

The controllers read RAM addresses published by the AtariARI benchmark (Anand et al. 2019,
`atariari/benchmark/ram_annotations.py`); their returns are in `docs/behaviour_policies.md`.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
from pathlib import Path
from typing import TYPE_CHECKING, Callable, ClassVar, Protocol

import numpy as np

from jowa_common.errors import ConfigError

if TYPE_CHECKING:
    from jowa_data.atari import AtariEnv


class Policy(Protocol):
    def __call__(self, obs: np.ndarray, rng: np.random.Generator, num_actions: int) -> int: ...


def random_policy(obs: np.ndarray, rng: np.random.Generator, num_actions: int) -> int:
    return int(rng.integers(num_actions))


def noop_policy(obs: np.ndarray, rng: np.random.Generator, num_actions: int) -> int:
    return 0


def bind_policy(policy: Callable, env: "AtariEnv") -> None:
    """Give `policy` the emulator it plays, if it asks for one (`bind`)."""
    bind = getattr(policy, "bind", None)
    if callable(bind):
        bind(env)


# ---------------------------------------------------------------------------------------------- epsilon


class EpsilonSchedule:
    """Epsilon-greedy around `inner` with epsilon decaying linearly from `start` to `end` over `steps` calls
    (then `end`). One uniform draw per call decides; a second one picks the random action."""

    def __init__(self, start: float, end: float, steps: int, inner: Callable) -> None:
        for v in (start, end):
            if not 0.0 <= v <= 1.0:
                raise ConfigError(f"epsilon must be in [0, 1], got {v}")
        self.start, self.end, self.steps, self.inner = float(start), float(end), max(int(steps), 1), inner
        self.t = 0  # calls so far

    def epsilon(self, t: int) -> float:
        return self.start + (self.end - self.start) * min(1.0, t / self.steps)

    def bind(self, env: "AtariEnv") -> None:
        bind_policy(self.inner, env)

    def __call__(self, obs: np.ndarray, rng: np.random.Generator, num_actions: int) -> int:
        eps = self.epsilon(self.t)
        self.t += 1
        if rng.random() < eps:
            return int(rng.integers(num_actions))
        return int(self.inner(obs, rng, num_actions))


# ---------------------------------------------------------------------------------------------- controllers


class Controller:
    """A heuristic controller: reads the bound emulator's RAM, answers with an action by ALE name."""

    rom: ClassVar[str] = ""

    def __init__(self) -> None:
        self.env: AtariEnv | None = None
        self._index: dict[str, int] = {}

    def bind(self, env: "AtariEnv") -> None:
        if env.rom != self.rom:
            raise ConfigError(f"the {type(self).__name__} controller plays ROM '{self.rom}', not '{env.rom}'")
        self.env = env
        self._index = {name: i for i, name in enumerate(env.actions)}

    def __call__(self, obs: np.ndarray, rng: np.random.Generator, num_actions: int) -> int:
        if self.env is None:
            raise ConfigError(f"the {type(self).__name__} controller reads the emulator's RAM: bind it to an "
                              "AtariEnv first (the recorder does)")
        return self._index[self.choose(self.env.ale.getRAM(), self.env.episode_frames)]

    def choose(self, ram: np.ndarray, frame: int) -> str:
        raise NotImplementedError


class BreakoutTracker(Controller):
    """Keeps the paddle under the falling ball. FIRE launches a new ball, and is also what it presses whenever no
    move is needed (the paddle is under the ball, or the ball is rising within 30 pixels of it; FIRE does nothing
    then), so that launching is the data's most common action. RAM: ball x 99, ball y 101, paddle x 72."""

    rom = "breakout"

    def __init__(self) -> None:
        super().__init__()
        self._ball_y = 0  # the ball's height one step ago: rising or falling

    def choose(self, ram: np.ndarray, frame: int) -> str:
        ball_x, ball_y, paddle_x = int(ram[99]), int(ram[101]), int(ram[72])
        rising, self._ball_y = ball_y < self._ball_y, ball_y
        if ball_x == 0 or ball_y == 0:  # no ball in play
            return "FIRE"
        d = ball_x - paddle_x - 8  # 8: ball x minus paddle x when the ball is over the paddle's middle
        if rising and abs(d) < 30:
            return "FIRE"
        return "RIGHT" if d > 4 else "LEFT" if d < -4 else "FIRE"


class FreewayRunner(Controller):
    """Always UP: a hit only pushes the chicken back a lane, so running on scores ~21 per 2:16 episode."""

    rom = "freeway"

    def choose(self, ram: np.ndarray, frame: int) -> str:
        return "UP"


class SpaceInvadersGunner(Controller):
    """Fires all the time; steps (firing) towards a point 20 pixels right of the invaders' formation when it is
    more than 35 pixels away. RAM: player x 28, formation x 26."""

    rom = "space_invaders"

    def choose(self, ram: np.ndarray, frame: int) -> str:
        d = int(ram[26]) + 20 - int(ram[28])
        return "RIGHTFIRE" if d > 35 else "LEFTFIRE" if d < -35 else "FIRE"


class PongTracker(Controller):
    """Moves the paddle towards the ball's height (RIGHT = up, LEFT = down). RAM: paddle y 51, ball y 54."""

    rom = "pong"

    def choose(self, ram: np.ndarray, frame: int) -> str:
        paddle_y, ball_y = int(ram[51]), int(ram[54])
        if ball_y == 0:  # no ball in play
            return "NOOP"
        d = ball_y - paddle_y - 10
        return "LEFT" if d > 6 else "RIGHT" if d < -6 else "NOOP"


CONTROLLERS: dict[str, type[Controller]] = {c.rom: c for c in (BreakoutTracker, FreewayRunner,
                                                              SpaceInvadersGunner, PongTracker)}


def controller_for(rom: str | None) -> Controller:
    if rom not in CONTROLLERS:
        raise ConfigError(f"no heuristic controller for ROM '{rom}' (controllers: {', '.join(sorted(CONTROLLERS))})")
    return CONTROLLERS[rom]()


# ---------------------------------------------------------------------------------------------- specs


def _load_callable(spec: str) -> Callable:
    mod_name, _, attr = spec.rpartition(":")
    try:
        if mod_name.endswith(".py"):
            path = Path(mod_name)
            if not path.is_file():
                raise ConfigError(f"policy '{spec}': file {path} not found")
            s = importlib.util.spec_from_file_location(f"_jowa_policy_{path.stem}", path)
            module = importlib.util.module_from_spec(s)
            s.loader.exec_module(module)
        else:
            module = importlib.import_module(mod_name)
    except ImportError as e:
        raise ConfigError(f"policy '{spec}': cannot import module '{mod_name}' ({e})") from e
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ConfigError(f"policy '{spec}': '{mod_name}' has no callable '{attr}'")
    return fn


def _required_params(fn: Callable) -> int:
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return 3
    return sum(1 for p in sig.parameters.values()
               if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD))


def _epsilon(spec: str, text: str, steps: int | None) -> tuple[float, float, int]:
    """'0.1' -> (0.1, 0.1, 1); '1.0-0.05' -> decay over `steps`; '1.0-0.05@5000' -> over 5000 steps."""
    span, _, over = text.partition("@")
    a, sep, b = span.partition("-")
    try:
        start = float(a)
        end = float(b) if sep else start
        n = int(over) if over else (steps or 1)
    except ValueError:
        raise ConfigError(f"policy '{spec}': epsilon must be a number in [0, 1] or START-END[@STEPS], "
                          f"got '{text}'") from None
    for v in (start, end):
        if not 0.0 <= v <= 1.0:
            raise ConfigError(f"policy '{spec}': epsilon must be in [0, 1], got {v}")
    if sep and not over and steps is None:
        raise ConfigError(f"policy '{spec}': a decaying epsilon needs the number of steps (START-END@STEPS)")
    if n < 1:
        raise ConfigError(f"policy '{spec}': the decay needs >= 1 step, got {n}")
    return start, end, n


def make_policy(spec: str, num_actions: int, rom: str | None = None, steps: int | None = None) -> Policy:
    """Build a policy from its spec string (see the module docstring). `rom` selects the `heuristic`
    controller; `steps` is the recording's length, over which `epsilon:A-B` decays. Errors are `ConfigError`."""
    spec = spec.strip()
    if spec == "random":
        return random_policy
    if spec == "noop":
        return noop_policy
    if spec == "heuristic":
        return controller_for(rom)
    if spec.startswith("epsilon:"):
        _, eps_s, inner = (spec.split(":", 2) + ["noop"])[:3]
        start, end, n = _epsilon(spec, eps_s, steps)
        return EpsilonSchedule(start, end, n, make_policy(inner or "noop", num_actions, rom, steps))
    if ":" in spec:
        fn = _load_callable(spec)
        n = _required_params(fn)
        if n >= 3:
            return fn
        obj = fn(num_actions) if n == 1 else fn()  # a factory
        if not callable(obj):
            raise ConfigError(f"policy '{spec}': factory returned {type(obj).__name__}, not a callable policy")
        return obj
    raise ConfigError(f"unknown policy '{spec}': use random, noop, heuristic, epsilon:<eps>[:<inner>], "
                      f"module:function or file.py:function")
