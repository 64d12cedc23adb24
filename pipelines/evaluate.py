"""Evaluation on the real Atari emulator: N episodes of a game in lockstep, one batched plan per agent step.

Protocol (paper Table 16, with the official code's bugs fixed, docs/official_code.md §6):
- `jowa_data.atari.AtariEnv` with sticky actions OFF: grayscale, max-pool of the last 2 of 4 skipped frames,
  84×84 INTER_AREA, terminal on game over only, no noop starts;
- an episode is cut at `max_frames` EMULATOR frames (108K = 27K agent steps; the official code capped 108K
  agent steps, i.e. 432K frames);
- ε = 0.001: each environment draws from ITS OWN seeded generator every step (the official code made one
  draw shared by all envs), and a random action is uniform over the game's valid actions;
- returns are raw (unclipped) sums of the emulator rewards.

Per agent step: ONE `tokenizer.encode` of the frames of the envs still playing and ONE `Planner.plan` over
them (greedy, beam or MCTS). The planner sees each env's newest `history` steps of tokens and actions,
left-padded at the episode start via `lengths`, the game's task id and its valid-action mask from the
manifest (also written into the model's `action_masks` row, so a brand-new game defined by a manifest works),
and returns full action ids, which are mapped to the game's minimal set for the emulator. Finished envs are
no longer stepped. Decisions/s = agent decisions / planning wall time (encode and emulator excluded, as the
official "dec/s" figures).

`evaluate()` plays several games and returns (and writes atomically, after every game) the raw-score JSON
`pipelines.scores.read_raw_scores` reads. Rerunning with the same checkpoint, tokenizer and settings keeps
the games already in the file: a killed multi-game run resumes at the game it was playing.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from jowa_common.actions import NUM_FULL_ACTIONS, action_ids, full_to_minimal_table
from jowa_common.config import config_to_dict
from jowa_common.errors import ConfigError
from jowa_common.io import atomic_write_json, sha256_file
from jowa_data.manifest import GameManifest
from jowa_model.planner import Planner, PlannerConfig, WorldModelImagination
from pipelines.scores import sample_std

RAW_FORMAT = "jowa-raw-scores-v1"  # = pipelines.scores.RAW_FORMAT
PLANNERS = ("greedy", "beam", "mcts")  # play a world-action model
POLICIES = ("random", "heuristic")  # play without a model: baselines and the recording controllers


@dataclass
class EvalConfig:
    episodes: int = 16  # episodes per game, played in lockstep (paper / official: 16)
    planner: str = "beam"  # greedy | beam (paper Eq. 11) | mcts (appendix F) | random | heuristic (no model)
    horizon: int | None = None  # H, imagined steps; None: the manifest's [planning].horizon (Table 17: 2)
    beam_width: int | None = None  # K; None: the manifest's [planning].beam_width (2 if < 10 actions, else 3-4)
    history: int | None = None  # context steps given to the model; None: the manifest's [planning].history
    gamma: float = 0.99  # discount of the planning score (Table 12)
    num_simulations: int = 20  # MCTS simulations per decision (official eval_MCTS.sh)
    temperature: float = 0.9  # MCTS prior softmax(Q/t) (appendix F)
    epsilon: float = 0.001  # probability of a uniform random valid action, per env and step (Table 16)
    sticky: float = 0.0  # ALE repeat_action_probability (evaluation protocol: none)
    max_frames: int = 108_000  # EMULATOR frames per episode (Table 16: 108K = 30 min of play)
    seed: int = 0  # env i uses emulator seed `seed + i` and ε generator SeedSequence([seed, task_id, i])
    device: str = "auto"  # auto (cuda if available) | cpu | cuda
    precision: str = "fp32"  # fp32 | bf16 (autocast of the world model and the tokenizer)
    video_dir: str = ""  # folder for a video of episode 0 of each game (<Game>.gif/.mp4); "" = none
    video_format: str = "gif"  # gif (Pillow, frames held in memory) | mp4 (OpenCV, streamed to disk)
    video_max_frames: int = 2700  # agent steps recorded per video: 3 min of play (a GIF holds ~34 KB per frame)
    manifests: tuple[str, ...] = ()  # manifest folders (empty: the shipped manifests/)

    def validate(self) -> "EvalConfig":
        if self.episodes < 1:
            raise ConfigError(f"eval.episodes must be >= 1, got {self.episodes}")
        if self.planner not in PLANNERS + POLICIES:
            raise ConfigError(f"eval.planner must be one of {PLANNERS + POLICIES}, got {self.planner!r}")
        for name, lo in (("horizon", 0), ("beam_width", 1), ("history", 1)):
            v = getattr(self, name)
            if v is not None and v < lo:
                raise ConfigError(f"eval.{name} must be >= {lo} (or unset: the manifest's), got {v}")
        if not 0.0 <= self.epsilon <= 1.0 or not 0.0 <= self.sticky <= 1.0:
            raise ConfigError(f"eval.epsilon and eval.sticky must be in [0, 1], got {self.epsilon}, {self.sticky}")
        if self.max_frames < 1:
            raise ConfigError(f"eval.max_frames must be >= 1 emulator frame, got {self.max_frames}")
        if self.precision not in ("fp32", "bf16"):
            raise ConfigError(f"eval.precision must be fp32 or bf16, got {self.precision!r}")
        if self.video_format not in ("gif", "mp4") or self.video_max_frames < 1:
            raise ConfigError(f"eval.video_format must be gif or mp4 and video_max_frames >= 1, got "
                              f"{self.video_format!r}, {self.video_max_frames}")
        return self


@dataclass
class GameResult:
    """One game's episodes. `actions` holds every full action id sent to the emulator (for checks)."""

    game: str
    settings: dict[str, Any]
    returns: list[float]  # raw (unclipped) return of each episode
    lengths: list[int]  # agent steps of each episode
    frames: list[int]  # emulator frames of each episode
    terminal: list[bool]  # True: game over; False: cut at max_frames
    random_actions: list[int]  # ε draws that replaced the planner's action, per episode
    actions: list[list[int]] = field(default_factory=list)  # full action ids sent, per episode
    clipped_returns: list[float] = field(default_factory=list)  # sum of clip(r, -1, 1): DQN-Replay's reward units
    decisions: int = 0  # agent decisions (one per live env per step)
    plan_s: float = 0.0  # wall time choosing actions (Planner.plan, or the policy)
    encode_s: float = 0.0  # wall time inside tokenizer.encode
    env_s: float = 0.0  # wall time stepping the emulators
    wall_s: float = 0.0  # whole game
    video: str | None = None

    @property
    def mean(self) -> float:
        return float(np.mean(self.returns)) if self.returns else float("nan")

    @property
    def decisions_per_s(self) -> float:
        return self.decisions / self.plan_s if self.plan_s > 0 else float("nan")

    def action_counts(self) -> dict[str, int]:
        """How often each of the game's actions was sent, over all episodes (epsilon draws included), by ALE
        name in the manifest's order. A player that sends one action almost always is a constant policy,
        whatever its planner: its return is that action's, not a reaction to the screen."""
        names = self.settings.get("actions", [])
        flat = np.asarray([a for episode in self.actions for a in episode], dtype=np.int64)
        counts = np.bincount(flat, minlength=NUM_FULL_ACTIONS)[action_ids(names)]
        return {name: int(c) for name, c in zip(names, counts)}

    def to_json(self) -> dict[str, Any]:
        """The per-game entry of the raw-score JSON (per-step actions as counts). `std` is the sample std (ddof 1)."""
        r = np.asarray(self.returns, dtype=np.float64)
        return {"settings": self.settings, "returns": self.returns, "clipped_returns": self.clipped_returns,
                "lengths": self.lengths, "frames": self.frames, "terminal": self.terminal,
                "random_actions": self.random_actions, "action_counts": self.action_counts(),
                "mean": float(r.mean()), "std": sample_std(r),
                "decisions": self.decisions, "decisions_per_s": _finite(self.decisions_per_s), "plan_s": self.plan_s,
                "encode_s": self.encode_s, "env_s": self.env_s, "wall_s": self.wall_s, "video": self.video}


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


# --------------------------------------------------------------------------------------------- pieces


def planner_config(manifest: GameManifest, cfg: EvalConfig) -> PlannerConfig:
    """The game's planner: the manifest's [planning] values unless `cfg` overrides them."""
    p = manifest.planning
    return PlannerConfig(kind=cfg.planner, horizon=p.horizon if cfg.horizon is None else cfg.horizon,
                         beam_width=p.beam_width if cfg.beam_width is None else cfg.beam_width, gamma=cfg.gamma,
                         num_simulations=cfg.num_simulations, temperature=cfg.temperature).validate()


def epsilon_generators(seed: int, task_id: int, n: int) -> list[np.random.Generator]:
    """One independent generator per env: env i's draws never depend on how many other envs are alive."""
    return [np.random.default_rng(s) for s in np.random.SeedSequence([seed, task_id]).spawn(n)]


def apply_epsilon(actions: np.ndarray, envs: Sequence[int], rngs: Sequence[np.random.Generator], epsilon: float,
                  valid_ids: np.ndarray) -> np.ndarray:
    """ε-greedy per env: env `envs[j]` replaces `actions[j]` by a uniform valid full id with probability ε,
    drawing from its own generator (one draw per step, two when it acts randomly). Returns a bool (len,) of
    the replaced rows."""
    replaced = np.zeros(len(envs), dtype=bool)
    if epsilon <= 0:
        return replaced
    for j, i in enumerate(envs):
        if rngs[i].random() < epsilon:
            actions[j] = valid_ids[rngs[i].integers(len(valid_ids))]
            replaced[j] = True
    return replaced


def game_settings(manifest: GameManifest, cfg: EvalConfig, context_steps: int, frame_skip: int = 4) -> dict[str, Any]:
    """What a game's entry records as its settings (also how a previous result is matched on resume).
    `history` is the effective one: at most the planner's `context_steps`. Only the planners that use H, K and
    the history record them (greedy: history; random / heuristic: none)."""
    s: dict[str, Any] = {"planner": cfg.planner}
    if cfg.planner in PLANNERS:
        pcfg = planner_config(manifest, cfg)
        want = manifest.planning.history if cfg.history is None else cfg.history
        if pcfg.kind != "greedy":
            s |= {"horizon": pcfg.horizon, "beam_width": pcfg.beam_width, "gamma": pcfg.gamma}
        s["history"] = max(1, min(want, context_steps))
        if pcfg.kind == "mcts":
            s |= {"num_simulations": pcfg.num_simulations, "temperature": pcfg.temperature}
        s["precision"] = cfg.precision
    return s | {"epsilon": cfg.epsilon, "sticky": cfg.sticky, "max_frames": cfg.max_frames, "frame_skip": frame_skip,
                "episodes": cfg.episodes, "seed": cfg.seed, "task_id": manifest.task_id,
                "actions": list(manifest.actions)}


def set_action_mask_rows(model, manifests: Sequence[GameManifest]) -> None:
    """Write each game's valid-action mask into the model's row for its task id (a new game included)."""
    masks = model.action_masks.clone()
    for m in manifests:
        if not 0 <= m.task_id < masks.shape[0]:
            raise ConfigError(f"{m.path}: task_id {m.task_id} is outside the model's {masks.shape[0]} tasks")
        masks[m.task_id] = torch.from_numpy(m.action_mask).to(masks.device)
    model.set_action_masks(masks)


# --------------------------------------------------------------------------------------------- agents


class ModelAgent:
    """Plays with a world-action model: one batched `tokenizer.encode` of the new frames and one `Planner.plan`
    over the envs still playing, each seeing its newest `history` steps (left-padded via `lengths`)."""

    def __init__(self, model, tokenizer, manifest: GameManifest, cfg: EvalConfig, res: GameResult) -> None:
        self.dtype = torch.bfloat16 if cfg.precision == "bf16" else None
        imag = WorldModelImagination(model, self.dtype)
        self.planner = Planner(imag, planner_config(manifest, cfg))
        self.tokenizer, self.res = tokenizer, res
        self.dev, self.tok_dev = imag.device, next(tokenizer.parameters()).device
        self.hist = res.settings["history"]
        n = cfg.episodes
        self.tokens = torch.zeros(n, self.hist, model.cfg.obs_tokens, dtype=torch.long, device=self.dev)  # newest last
        self.acts = torch.zeros(n, self.hist - 1, dtype=torch.long, device=self.dev)
        self.lengths = torch.ones(n, dtype=torch.long)  # real steps in each env's history
        self.task = torch.full((n,), manifest.task_id, dtype=torch.long)
        self.masks = torch.from_numpy(manifest.action_mask).expand(n, -1)

    def _encode(self, frames: list[np.ndarray]) -> torch.Tensor:
        t = time.perf_counter()
        x = torch.from_numpy(np.stack(frames)).to(self.tok_dev)
        out = self.tokenizer.encode(x, dtype=self.dtype).to(self.dev)  # (len, 36) long
        self.res.encode_s += time.perf_counter() - t
        return out

    def start(self, frames: list[np.ndarray]) -> None:
        self.tokens[:, -1] = self._encode(frames)

    def act(self, alive: list[int]) -> np.ndarray:
        idx = torch.tensor(alive)
        return self.planner.plan(self.tokens[idx], self.acts[idx], self.task[idx], self.masks[idx],
                                 self.lengths[idx]).cpu().numpy()

    def observe(self, still: list[int], frames: list[np.ndarray], actions: list[int]) -> None:
        s = torch.tensor(still, device=self.dev)
        self.tokens[s] = torch.cat([self.tokens[s, 1:], self._encode(frames)[:, None]], 1)
        if self.hist > 1:
            new_a = torch.tensor(actions, dtype=torch.long, device=self.dev)
            self.acts[s] = torch.cat([self.acts[s, 1:], new_a[:, None]], 1)
        self.lengths[s.cpu()] = (self.lengths[s.cpu()] + 1).clamp(max=self.hist)


class PolicyAgent:
    """Plays without a model: uniform random valid actions, or the game's heuristic controller
    (`jowa_data.policies`), one policy per env bound to its emulator, each with its own seeded generator."""

    def __init__(self, kind: str, envs: list, manifest: GameManifest, seed: int) -> None:
        from jowa_data.policies import bind_policy, make_policy

        self.policies = [make_policy(kind, len(manifest.actions), rom=manifest.ale_rom) for _ in envs]
        for pol, env in zip(self.policies, envs):
            bind_policy(pol, env)
        ss = np.random.SeedSequence([seed, manifest.task_id, 1])  # apart from the ε generators' [seed, task_id]
        self.rngs = [np.random.default_rng(x) for x in ss.spawn(len(envs))]
        self.valid_ids = manifest.full_action_ids
        self.obs: list[np.ndarray | None] = [None] * len(envs)
        self.n = len(manifest.actions)

    def start(self, frames: list[np.ndarray]) -> None:
        self.obs = list(frames)

    def act(self, alive: list[int]) -> np.ndarray:
        return np.array([self.valid_ids[self.policies[i](self.obs[i], self.rngs[i], self.n)] for i in alive],
                        dtype=np.int64)

    def observe(self, still: list[int], frames: list[np.ndarray], actions: list[int]) -> None:
        for i, f in zip(still, frames):
            self.obs[i] = f


# --------------------------------------------------------------------------------------------- one game


@torch.no_grad()
def play_game(model, tokenizer, manifest: GameManifest, cfg: EvalConfig, progress: bool = False,
              video_path: str | Path | None = None) -> GameResult:
    """Play `cfg.episodes` episodes of `manifest`'s game in lockstep (see the module docstring). With
    `cfg.planner` random or heuristic, `model` and `tokenizer` are not used (pass None)."""
    from jowa_data.atari import AtariConfig, AtariEnv

    cfg.validate()
    t_start = time.perf_counter()
    acfg = AtariConfig(sticky=cfg.sticky, max_frames=cfg.max_frames)
    n = cfg.episodes
    envs = [AtariEnv(manifest.ale_rom, acfg, seed=cfg.seed + i, actions=manifest.actions) for i in range(n)]
    if cfg.planner in POLICIES:
        settings = game_settings(manifest, cfg, 1, acfg.frame_skip)
    else:
        context = model.cfg.max_steps - planner_config(manifest, cfg).imagined_steps
        settings = game_settings(manifest, cfg, context, acfg.frame_skip)
    res = GameResult(manifest.name, settings, [0.0] * n, [0] * n, [0] * n, [False] * n, [0] * n,
                     [[] for _ in range(n)], [0.0] * n)
    agent = (PolicyAgent(cfg.planner, envs, manifest, cfg.seed) if cfg.planner in POLICIES
             else ModelAgent(model, tokenizer, manifest, cfg, res))
    valid_ids = manifest.full_action_ids  # (n_min,) minimal index -> full id
    to_min = full_to_minimal_table(manifest.actions)  # (18,) full id -> minimal index, -1 if invalid
    rngs = epsilon_generators(cfg.seed, manifest.task_id, n)

    recorder = None
    if video_path is not None:
        from pipelines.video import VideoRecorder

        recorder = VideoRecorder(video_path, cfg.video_format, max_frames=cfg.video_max_frames, scale=1)
    t = time.perf_counter()
    first = [e.reset() for e in envs]
    res.env_s += time.perf_counter() - t
    agent.start(first)
    if recorder is not None:
        recorder.add(envs[0].render_rgb())
    alive = list(range(n))
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=math.ceil(cfg.max_frames / acfg.frame_skip), desc=f"eval {manifest.name} {cfg.planner}",
                   unit="step", leave=False, dynamic_ncols=True)
    try:
        while alive:
            t = time.perf_counter()
            full = agent.act(alive)
            res.plan_s += time.perf_counter() - t
            res.decisions += len(alive)
            replaced = apply_epsilon(full, alive, rngs, cfg.epsilon, valid_ids)
            minimal = to_min[full]
            if (minimal < 0).any():  # the planner is given the mask: this is a bug, never a user error
                raise RuntimeError(f"{manifest.name}: planner chose invalid full actions {full[minimal < 0]}")
            frames, still, still_act = [], [], []
            t = time.perf_counter()
            for j, i in enumerate(alive):
                obs, r, term, trunc = envs[i].step(int(minimal[j]))
                res.returns[i] += r
                res.clipped_returns[i] += float(np.clip(r, -1.0, 1.0))
                res.lengths[i] += 1
                res.actions[i].append(int(full[j]))
                res.random_actions[i] += int(replaced[j])
                if i == 0 and recorder is not None:
                    recorder.add(envs[0].render_rgb())
                if term or trunc:
                    res.frames[i], res.terminal[i] = envs[i].episode_frames, bool(term)
                else:
                    still.append(i)
                    still_act.append(int(full[j]))
                    frames.append(obs)
            res.env_s += time.perf_counter() - t
            if still:
                agent.observe(still, frames, still_act)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(alive=len(still), mean=f"{np.mean(res.returns):.1f}")
            alive = still
    except BaseException:
        if recorder is not None:
            recorder.abort()
        raise
    finally:
        if bar is not None:
            bar.close()
    if recorder is not None:
        path = recorder.close()
        res.video = None if path is None else str(path)
    res.wall_s = time.perf_counter() - t_start
    return res


# --------------------------------------------------------------------------------------------- several games


def _load_model(checkpoint_or_model, device: str):
    if isinstance(checkpoint_or_model, (str, Path)):
        from jowa_model.checkpoint import load_world_action

        model, _ = load_world_action(checkpoint_or_model, device)
        return model, {"checkpoint": str(checkpoint_or_model), "checkpoint_sha256": sha256_file(checkpoint_or_model)}
    return checkpoint_or_model.eval(), {"checkpoint": None, "checkpoint_sha256": None}


def _load_tokenizer(tokenizer, device: str):
    if isinstance(tokenizer, (str, Path)):
        from jowa_model.tokenizer import load_tokenizer, tokenizer_checksum

        return load_tokenizer(tokenizer, map_location=device), {"tokenizer": str(tokenizer),
                                                                "tokenizer_checksum": tokenizer_checksum(tokenizer)}
    return tokenizer.eval(), {"tokenizer": None, "tokenizer_checksum": None}


def _previous(out: Path | None, ident: dict[str, Any]) -> dict[str, Any]:
    """Games of an earlier run of the same checkpoint + tokenizer in `out` (empty if none or different).
    A file there that is not a jowa raw-score file is never overwritten."""
    if out is None or not out.exists():
        return {}
    try:
        prev = json.loads(out.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as e:
        raise ConfigError(f"{out}: exists and is not a jowa raw-score file ({e}); choose another --out") from e
    if not isinstance(prev, dict) or prev.get("format") != RAW_FORMAT:
        raise ConfigError(f"{out}: exists and is not a jowa raw-score file (no format {RAW_FORMAT!r}); "
                          "choose another --out")
    if (ident.get("checkpoint_sha256") is None and not ident.get("model_free")) or any(
            prev.get(k) != ident[k] for k in ("checkpoint_sha256", "tokenizer_checksum")):
        return {}  # another model's results: replaced by this run's
    games = prev.get("games")
    return games if isinstance(games, dict) else {}


def check_tokenizer_fits(tok, model, ident: dict[str, Any]) -> None:
    """The tokenizer must make the tokens the model reads: same tokens per frame, codes within its vocabulary."""
    if tok.cfg.tokens_per_frame != model.cfg.obs_tokens:
        raise ConfigError(f"{ident['tokenizer'] or 'tokenizer'}: {tok.cfg.tokens_per_frame} tokens per frame, but the "
                          f"model ({ident['checkpoint'] or 'model'}) expects {model.cfg.obs_tokens}")
    if tok.cfg.vocab_size > model.cfg.obs_vocab:
        raise ConfigError(f"{ident['tokenizer'] or 'tokenizer'}: {tok.cfg.vocab_size} codes > the model's obs "
                          f"vocabulary {model.cfg.obs_vocab} ({ident['checkpoint'] or 'model'})")


def evaluate(checkpoint_or_model, tokenizer, games: Sequence[str | GameManifest], cfg: EvalConfig | None = None,
             out: str | Path | None = None, progress: bool = False, resume: bool = True) -> dict[str, Any]:
    """Evaluate a world-action model (checkpoint path or model) on `games` (names, manifest paths, split names
    or manifests); with `cfg.planner` random or heuristic, a baseline without a model (pass None for both).
    Returns the raw-score document; with `out`, also writes it atomically after every game.
    With `resume`, games already in `out` for the same checkpoint, tokenizer and settings are kept."""
    if out is None:
        return _evaluate(checkpoint_or_model, tokenizer, games, cfg, None, progress, resume)
    from jowa_common.io import lock_file

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with lock_file(out.parent / f".{out.name}.lock", out, "jowa eval"):  # one writer per score file
        for p in out.parent.glob(f".{out.name}.*.tmp*"):  # the score file half-written by a killed run
            p.unlink(missing_ok=True)
        return _evaluate(checkpoint_or_model, tokenizer, games, cfg, out, progress, resume)


def _evaluate(checkpoint_or_model, tokenizer, games: Sequence[str | GameManifest], cfg: EvalConfig | None,
              out: Path | None, progress: bool, resume: bool) -> dict[str, Any]:
    from jowa_data.manifest import load_manifests
    from pipelines.dist import pick_device

    cfg = (cfg or EvalConfig()).validate()
    registry = load_manifests(list(cfg.manifests) or None)
    manifests: list[GameManifest] = []
    for g in games:
        for m in ([g] if isinstance(g, GameManifest) else registry.resolve([g])):
            if m.name not in {x.name for x in manifests}:
                manifests.append(m)
    if not manifests:
        raise ConfigError("no games to evaluate")
    device = pick_device(cfg.device)
    model = tok = None
    if cfg.planner in POLICIES:  # baselines: no model, no tokenizer
        ident = {"checkpoint": None, "checkpoint_sha256": None, "tokenizer": None, "tokenizer_checksum": None,
                 "model_free": cfg.planner}
    else:
        if checkpoint_or_model is None or tokenizer is None:
            raise ConfigError(f"planner {cfg.planner!r} needs a checkpoint and its tokenizer")
        model, ident = _load_model(checkpoint_or_model, device)
        tok, tok_ident = _load_tokenizer(tokenizer, device)
        ident |= tok_ident
        check_tokenizer_fits(tok, model, ident)
        set_action_mask_rows(model, manifests)
    out = Path(out) if out is not None else None
    prev = _previous(out, ident)
    if not resume:
        prev = {}
    doc: dict[str, Any] = {"format": RAW_FORMAT, **ident, "device": device, "config": config_to_dict(cfg),
                           "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "games": {}, "reused": []}
    t0 = time.perf_counter()
    for m in manifests:
        old = prev.get(m.name)
        context = 1 if model is None else model.cfg.max_steps - planner_config(m, cfg).imagined_steps
        if isinstance(old, dict) and old.get("settings") == game_settings(m, cfg, context):
            doc["games"][m.name] = old
            doc["reused"].append(m.name)
            continue
        video = Path(cfg.video_dir) / f"{m.name}.{cfg.video_format}" if cfg.video_dir else None
        res = play_game(model, tok, m, cfg, progress=progress, video_path=video)
        doc["games"][m.name] = res.to_json()
        doc["wall_s"] = time.perf_counter() - t0
        if out is not None:
            atomic_write_json(out, doc)
    doc["wall_s"] = time.perf_counter() - t0
    if out is not None:
        atomic_write_json(out, doc)
    return doc
