"""Fine-tuning a pretrained world-action model on a new game (paper sec. 5.5, appendix E.2).

The game is described only by its manifest (a held-out game, or a brand-new one from `--manifests DIR`):
its task id selects the task embedding and its valid-action mask is written into the model's
`action_masks` row for that id, so TD argmax, CQL and acting use the game's OWN actions. (The official
code remaps held-out games to proxy training games and borrows their masks, docs/official_code.md §9.2.)

Recipe (defaults = the paper / official finetune_150M.yaml): a small dataset (5k transitions drawn from the
last 20% of DQN-Replay, checkpoints 41-50), segments of L=8 steps every tau=1 step, batch 32, AdamW lr 5e-5,
50k steps, joint loss with world weight 0.5, and planning-based synthetic data:

  from a real segment whose first C = L - H steps are real and not terminal, the C real frames are the
  context; beam search (H=2, K=2, Eq. 11) picks the root action a_1 and the best path a_1..a_H; the path is
  imagined with greedy tokens (tokens stay tokens: no decode/re-encode round trip, unlike the official code).
  Sample = C real obs + H imagined obs; actions = C-1 real + [a_1..a_H, dummy]; rewards = C-1 real +
  [r̂_1..r̂_H, dummy]; ends = C-1 real + [d̂_1..d̂_H, 0].

Imagined samples feed the action loss only (TD + CQL; the world loss sees real data). The dummy last step is
masked out of CQL (the official code includes it); it stays visible to TD only as the bootstrap state of
step L-2. A predicted termination d̂_j makes the imagined path absorbing: steps after it are masked.
Unlike the official ring buffer (capacity 10x the dataset, filled by older models), samples are imagined by
the current model at the step that uses them.

The tokenizer stays frozen (the official fine-tuning also trains it): the dataset's tokens were made by it
and must stay valid, so we check its checksum against the dataset's and use it only to encode frames at
evaluation. Fine-tuning runs in one process (a batch of 32 fits any device).

Every `eval.every` steps the agent plays `eval.episodes` episodes on the real emulator (beam planning with
the manifest's settings); `best.pt` holds the snapshot with the best mean return and `report.json` every
evaluation. Resume is exact: rerun the same command and it continues from the newest checkpoint.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from jowa_common.config import config_to_dict
from jowa_common.errors import CheckpointError, ConfigError, DatasetError
from jowa_common.io import atomic_write_json, safe_torch_load
from jowa_data.manifest import GameManifest
from jowa_model.checkpoint import FORMAT, load_world_action, model_state, save_world_action
from jowa_model.losses import LossConfig, compute_loss, td_targets_mask
from jowa_model.planner import beam_search
from jowa_model.world_action import WorldActionModel
from pipelines.dist import pick_device
from pipelines.train_core import (MetricsLog, OptimConfig, Progress, RunFiles, autocast_ctx, endless, make_optimizer,
                                  optimizer_step, rng_state, set_rng_state, set_stage, to_device)

# --------------------------------------------------------------------------------------------- config


@dataclass
class FinetuneDataConfig:
    dataset: str = ""  # built fine-tuning dataset folder (or built into <out>/data from `replay_root`)
    replay_root: str = ""  # DQN-Replay root to build the dataset from when `dataset` is empty
    backend: str = "zarr"  # zarr | wds: which shards feed the token cache
    batch_size: int = 32  # real segments per step (paper E.2; official finetune_150M.yaml)
    seq_len: int = 8  # L, steps per segment (Table 10)
    stride: int = 1  # steps between segment starts (official fine-tuning: tau = 1)
    transitions: int = 5000  # building: transitions drawn per game (paper sec. 5.5: 5k)
    checkpoints: tuple[int, int] = (41, 50)  # building: DQN-Replay checkpoint range, last 20% (paper E.2)


@dataclass
class ImagineConfig:
    enabled: bool = True  # planning-based synthetic data (official README: use_imagination=True)
    horizon: int = 2  # H, imagined steps per sample (official planning_horizon 2)
    beam_width: int = 2  # K of the beam search that picks the actions (official beam 2)
    batch_size: int = 16  # imagined segments per step (official batch_size_in_imagination 16)
    after_steps: int = 20_000  # first step that uses imagined data (official imagine_after_n_steps)
    gamma: float = 0.99  # discount of the beam-search score (Eq. 11, Table 12)


@dataclass
class EvalConfig:
    every: int = 5000  # steps between evaluations on the real emulator (and one at the end); 0: end only
    episodes: int = 16  # episodes per evaluation (official: 16 envs)
    max_frames: int = 108_000  # emulator frames per episode (108k = 30 min, Table 16)
    planner: str = "beam"  # beam | greedy
    horizon: int = 0  # H at evaluation; 0: the manifest's [planning].horizon
    beam_width: int = 0  # K at evaluation; 0: the manifest's [planning].beam_width
    history: int = 0  # context steps; 0: the manifest's [planning].history
    epsilon: float = 0.001  # random valid action with this probability (official eval agent)
    sticky: float = 0.0  # ALE sticky-action probability (official eval: none)
    seed: int = 0  # emulator/epsilon seed of episode i is seed + i


@dataclass
class FinetuneConfig:
    game: str = ""  # manifest name of the game to fine-tune on (its own task id and action mask)
    data: FinetuneDataConfig = field(default_factory=FinetuneDataConfig)
    imagine: ImagineConfig = field(default_factory=ImagineConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    loss: LossConfig = field(default_factory=lambda: LossConfig(world_weight=0.5))  # official supervised_weight 0.5
    lr: float = 5e-5  # world LR (paper E.2)
    critic_lr: float = 5e-5  # Q-head LR (official finetune_150M.yaml)
    weight_decay: float = 0.01  # AdamW decay (official)
    grad_clip: float = 1.0  # global grad-norm clip (official)
    steps: int = 50_000  # optimizer steps (paper E.2)
    seed: int = 0  # dropout, stream order and imagination draws
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | fp32 | bf16
    log_every: int = 100  # steps between metric rows
    ckpt_every: int = 5000  # steps between resumable checkpoints (and one at the end)
    keep_ckpts: int = 2  # newest resumable checkpoints kept (best.pt is kept apart)
    tokenizer: str = ""  # the dataset's frozen tokenizer (checksum-checked): encodes frames at evaluation
    manifests: tuple[str, ...] = ()  # manifest folders (empty: the shipped manifests/)


SHAPE_FIELDS = ("game", "data", "imagine", "seed", "loss")  # must match to resume


def validate_config(cfg: FinetuneConfig, model_steps: int | None = None) -> None:
    """Clear errors for settings that cannot work (before any data is read or built)."""
    if not cfg.game:
        raise ConfigError("game is not set: give the manifest name of the game to fine-tune on")
    if not cfg.tokenizer:
        raise ConfigError("tokenizer is not set: give the frozen tokenizer the dataset was built with")
    if cfg.steps < 1 or cfg.data.batch_size < 1 or cfg.log_every < 1 or cfg.ckpt_every < 1:
        raise ConfigError("steps, data.batch_size, log_every and ckpt_every must be >= 1")
    if cfg.data.seq_len < 1 or (model_steps is not None and cfg.data.seq_len > model_steps):
        raise ConfigError(f"data.seq_len must be in [1, {model_steps}] (the model's window), got {cfg.data.seq_len}")
    if cfg.imagine.enabled and not (1 <= cfg.imagine.horizon < cfg.data.seq_len and cfg.imagine.beam_width >= 1
                                    and cfg.imagine.batch_size >= 1):
        raise ConfigError(f"imagine: need 1 <= horizon < data.seq_len ({cfg.data.seq_len}), beam_width >= 1 and "
                          f"batch_size >= 1, got {cfg.imagine.horizon}, {cfg.imagine.beam_width}, "
                          f"{cfg.imagine.batch_size}")
    if cfg.eval.episodes < 1 or cfg.eval.every < 0 or cfg.eval.planner not in ("beam", "greedy"):
        raise ConfigError(f"eval: need episodes >= 1, every >= 0 and planner beam|greedy, got {cfg.eval.episodes}, "
                          f"{cfg.eval.every}, {cfg.eval.planner!r}")


def finetune_preset(name: str = "paper") -> FinetuneConfig:
    """`paper` (defaults above) or `tiny` (CPU smoke runs: imagination from step 0, short evaluations)."""
    if name == "paper":
        return FinetuneConfig()
    if name == "tiny":
        # CQL alpha 1.0 and the data's next action as TD backup, as the tiny pretraining preset
        # (see pipelines.pretrain.train_preset): fine-tuning continues the critic pretraining trained
        return FinetuneConfig(data=FinetuneDataConfig(batch_size=8), steps=50, log_every=5, ckpt_every=25,
                              loss=LossConfig(world_weight=0.5, cql_alpha=1.0, td_backup="data"),
                              imagine=ImagineConfig(batch_size=4, after_steps=0),
                              eval=EvalConfig(every=25, episodes=2, max_frames=2000), lr=5e-4, critic_lr=5e-4)
    raise ConfigError(f"unknown fine-tuning preset {name!r} (choose 'paper' or 'tiny')")


# --------------------------------------------------------------------------------------------- data


def build_finetune_dataset(manifest: GameManifest, replay_root: str | Path, tokenizer: str | Path, out: str | Path,
                           cfg: FinetuneDataConfig | None = None, progress: bool = True) -> Path:
    """Build the small fine-tuning set of one game: `cfg.transitions` transitions drawn (whole episodes,
    seeded, without replacement) from checkpoints `cfg.checkpoints` of the manifest's runs, tokenized by the
    frozen `tokenizer`. Rerunning is a no-op (jowa_data.build is resumable)."""
    from jowa_data.build import BuildConfig, build_dataset
    from jowa_data.subsample import SubsampleOptions

    cfg = cfg or FinetuneDataConfig()
    a, b = cfg.checkpoints
    sel = SubsampleOptions(checkpoints=(int(a), int(b)), transitions=int(cfg.transitions), allow_fewer_runs=True)
    build_dataset([manifest], replay_root, tokenizer, out,
                  BuildConfig(formats=(cfg.backend,), selection=sel, progress=progress, workers=1))
    return Path(out)


def check_dataset(dataset: str | Path, manifest: GameManifest, tokenizer: str | Path | None) -> None:
    """The dataset must hold exactly this game, under the manifest's task id, tokenized by `tokenizer`."""
    from jowa_data.layout import INFO, read_info

    info = read_info(dataset)
    p = Path(dataset) / INFO
    if sorted(info.games) != [manifest.name]:
        raise DatasetError(f"{p}: holds games {sorted(info.games)}; fine-tuning needs a dataset of "
                           f"{manifest.name} alone")
    tid = int(info.games[manifest.name]["task_id"])
    if tid != manifest.task_id:
        raise DatasetError(f"{p}: {manifest.name} has task id {tid} but its manifest {manifest.path} says "
                           f"{manifest.task_id}: rebuild the dataset with this manifest")
    if tokenizer:
        from jowa_model.tokenizer import tokenizer_checksum

        if info.tokenizer_checksum and tokenizer_checksum(tokenizer) != info.tokenizer_checksum:
            raise ConfigError(f"{tokenizer}: not the tokenizer that made {p} (checksums differ); its tokens "
                              "would not match the frames seen at evaluation")


class ContextSampler:
    """Real segments whose first C steps are real and non-terminal: the contexts of imagined samples.

    Draws from a second SegmentStream of C-step segments (its own seed) and keeps the rows that qualify;
    state = that stream's position (exact resume)."""

    def __init__(self, dataset: str | Path, context: int, batch_size: int, seed: int, backend: str, stride: int):
        from jowa_data.stream import SegmentStream

        self.stream = SegmentStream(dataset, batch_size=batch_size, seq_len=context, seed=seed, rank=0,
                                    world_size=1, backend=backend, stride=stride)
        self.context, self.batch_size = context, batch_size
        if len(self.stream) == 0:
            raise ConfigError(f"{dataset}: fewer than imagine.batch_size={batch_size} segments of "
                              f"{context} steps: lower imagine.batch_size")
        self._it = iter(self.stream)

    def _next(self) -> dict[str, torch.Tensor]:
        try:
            return next(self._it)
        except StopIteration:
            self._it = iter(self.stream)
            return next(self._it)

    def sample(self) -> dict[str, torch.Tensor]:
        rows: list[dict[str, torch.Tensor]] = []
        n = 0
        for _ in range(100):  # a batch with no usable row is rare; give up after many
            b = self._next()
            ok = b["mask_padding"].all(1) & (b["ends"] == 0).all(1)
            if ok.any():
                rows.append({k: v[ok] for k, v in b.items()})
                n += int(ok.sum())
            if n >= self.batch_size:
                break
        if not rows:
            raise DatasetError(f"{self.stream.dataset_dir}: no episode has {self.context} non-terminal steps "
                               "for an imagination context")
        return {k: torch.cat([r[k] for r in rows])[: self.batch_size] for k in rows[0]}

    def state_dict(self) -> dict[str, Any]:
        return self.stream.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stream.load_state_dict(state)
        self._it = iter(self.stream)


# --------------------------------------------------------------------------------------------- imagination


@torch.no_grad()
def imagine_segments(model: WorldActionModel, context: dict[str, torch.Tensor], horizon: int, beam_width: int,
                     gamma: float = 0.99, autocast_dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Planning-based synthetic segments (see the module doc) from C-step real contexts.

    context: tokens (N, C, 36), actions/rewards/ends (N, C), task_ids (N,). Returns a batch of L = C + H
    steps with `mask_padding` (TD: steps with a state; the dummy last step is there only as a bootstrap
    state) and `cql_mask` (the same without the dummy step), plus `root_actions` (N,) the planner's a_1.
    The model is left in eval mode; the caller restores train mode.
    """
    from jowa_model.planner import WorldModelImagination

    if horizon < 1:
        raise ConfigError(f"imagine.horizon must be >= 1, got {horizon}")
    tok, act, task = context["tokens"], context["actions"], context["task_ids"]
    n, c = tok.shape[:2]
    if c + horizon > model.cfg.max_steps:
        raise ConfigError(f"{c} context steps + imagine.horizon {horizon} exceed the model's "
                          f"{model.cfg.max_steps}-step window")
    imag = WorldModelImagination(model, autocast_dtype)
    masks = model.action_mask_for(task)  # (N, 18): the game's own valid actions
    root, q = imag.start(tok, act[:, : c - 1], task)
    plan = beam_search(imag, imag.select(root, torch.arange(n, device=q.device)), q, masks, horizon,
                       beam_width, gamma)
    # Replay the best path from the root (greedy tokens are deterministic) to get its imagined frames.
    state, dead = root, torch.zeros(n, dtype=torch.bool, device=q.device)
    new_tok, new_act, new_rew, new_end, reached = [], [], [], [], []
    for d in range(horizon):
        a = plan.paths[:, d]
        if d > 0:  # after a predicted terminal the path holds -1: any valid id; the step is masked anyway
            a = torch.where(a >= 0, a, new_act[-1])
        state, out = imag.step(state, a)
        new_act.append(a)
        new_rew.append(torch.where(dead, 0.0, out.rewards.float()))
        new_end.append((out.dones & ~dead).long())
        new_tok.append(out.obs_tokens)
        dead = dead | out.dones
        reached.append(~dead)  # imagined state d+1 exists iff no step up to d+1 ended (absorbing terminal)
    dev = tok.device
    tokens = torch.cat([tok, torch.stack(new_tok, 1).to(dev)], 1)  # (N, C+H, 36)
    actions = torch.cat([act[:, : c - 1], torch.stack(new_act, 1).to(dev), new_act[-1].to(dev)[:, None]], 1)
    rewards = torch.cat([context["rewards"][:, : c - 1].float(), torch.stack(new_rew, 1).to(dev),
                         torch.zeros(n, 1, device=dev)], 1)
    ends = torch.cat([context["ends"][:, : c - 1], torch.stack(new_end, 1).to(dev),
                      torch.zeros(n, 1, dtype=torch.long, device=dev)], 1)
    real = torch.ones(n, c, dtype=torch.bool, device=dev)
    reached = torch.stack(reached, 1).to(dev)  # (N, H)
    mask = torch.cat([real, reached], 1)  # (N, L): TD mask (steps with a state)
    cql_mask = mask.clone()
    cql_mask[:, -1] = False  # the dummy step: no action was chosen there
    return {"tokens": tokens, "actions": actions, "rewards": rewards, "ends": ends, "mask_padding": mask,
            "cql_mask": cql_mask, "task_ids": task, "root_actions": plan.actions}


# --------------------------------------------------------------------------------------------- loss


def finetune_loss(model: WorldActionModel, real: dict[str, torch.Tensor], imagined: dict[str, torch.Tensor] | None,
                  cfg: LossConfig) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """beta * L_world(real) + L_action(real + imagined) in one forward of the concatenated batch, through the
    pretraining loss (`jowa_model.losses.compute_loss`, stage 2). TD uses `mask_padding` (imagined: up to the dummy
    bootstrap step); CQL uses the real mask and the imagined `cql_mask` (no dummy step)."""
    keys = ("tokens", "actions", "rewards", "ends", "mask_padding", "task_ids")
    b = real["tokens"].shape[0]
    if imagined is not None and imagined["tokens"].shape[0]:
        batch = {k: torch.cat([real[k], imagined[k].to(real[k].dtype)]) for k in keys}
        cql_mask = torch.cat([real["mask_padding"], imagined["cql_mask"]])
    else:
        batch, cql_mask, imagined = {k: real[k] for k in keys}, None, None
    t = compute_loss(model, batch, cfg, stage=2, world_rows=b, cql_mask=cql_mask)
    terms = {"train/loss_obs": t.obs, "train/loss_reward": t.reward, "train/loss_end": t.end, "train/loss_td": t.td,
             "train/loss_cql": t.cql, "train/q_data": t.q_data}
    if imagined is not None:
        dev = t.total.device
        terms["imagine/segments"] = torch.tensor(float(imagined["tokens"].shape[0]), device=dev)
        terms["imagine/td_targets"] = td_targets_mask(imagined["mask_padding"], imagined["ends"].bool()).sum().float()
        terms["imagine/cql_steps"] = imagined["cql_mask"].sum().float()
    return t.total, terms


# --------------------------------------------------------------------------------------------- evaluation


@dataclass
class EvalResult:
    returns: list[float]  # raw (unclipped) return of each episode
    clipped_returns: list[float]  # sum of clip(r, -1, 1) of each episode (DQN-Replay's reward units)
    steps: list[int]  # agent steps of each episode
    actions: list[int]  # every full action id the agent sent to the emulator (for checks)

    @property
    def mean(self) -> float:
        return float(np.mean(self.returns)) if self.returns else float("nan")


def play_episodes(model: WorldActionModel, tokenizer, manifest: GameManifest, cfg: EvalConfig,
                  autocast_dtype: torch.dtype | None = None, progress: bool = False) -> EvalResult:
    """Play `cfg.episodes` episodes of the real emulator at once, through `pipelines.evaluate.play_game`
    (the one evaluation code path: batched plans, per-env ε, the game's own task id and valid actions).
    Zero horizon/beam_width/history mean the manifest's values."""
    from pipelines.evaluate import EvalConfig as GameEvalConfig, play_game

    gcfg = GameEvalConfig(episodes=cfg.episodes, planner=cfg.planner, horizon=cfg.horizon or None,
                          beam_width=cfg.beam_width or None, history=cfg.history or None, epsilon=cfg.epsilon,
                          sticky=cfg.sticky, max_frames=cfg.max_frames, seed=cfg.seed,
                          precision="bf16" if autocast_dtype == torch.bfloat16 else "fp32")
    res = play_game(model, tokenizer, manifest, gcfg, progress=progress)
    return EvalResult(res.returns, res.clipped_returns, res.lengths, [a for ep in res.actions for a in ep])


# --------------------------------------------------------------------------------------------- run


def load_pretrained(path: str | Path, manifest: GameManifest, device: str) -> WorldActionModel:
    """The pretrained model with the game's action-mask row set from its manifest (no optimizer state:
    fine-tuning starts fresh, as the official code does)."""
    model, _ = load_world_action(path, device)
    if manifest.task_id >= model.cfg.num_tasks:
        raise ConfigError(f"{manifest.path}: task_id {manifest.task_id} >= the model's {model.cfg.num_tasks} tasks "
                          f"({path})")
    masks = model.action_masks.clone()
    masks[manifest.task_id] = torch.from_numpy(manifest.action_mask).to(masks.device)
    model.set_action_masks(masks)
    return model


def _check_resume(saved: dict, now: dict, path: Path) -> None:
    diff = [k for k in SHAPE_FIELDS if saved.get(k) != now.get(k)]
    if diff:
        raise ConfigError(f"{path}: cannot resume: these settings differ from the checkpoint's: {', '.join(diff)} "
                          "(use a new --out folder, or the same settings)")


def finetune(cfg: FinetuneConfig, checkpoint: str | Path, out: str | Path, stop_after: int | None = None,
             on_eval: Callable[[int, EvalResult], None] | None = None, progress: bool = True) -> dict[str, Any]:
    """Fine-tune `checkpoint` on `cfg.game` in run folder `out` (rerun to resume). Returns the report dict.

    `stop_after` ends the run at that step (after checkpointing), e.g. to test resume.
    """
    from jowa_common.io import folder_lock, remove_stale_temps

    with folder_lock(out, "jowa finetune"):
        remove_stale_temps(out)
        return _finetune(cfg, checkpoint, out, stop_after, on_eval, progress)


def _finetune(cfg: FinetuneConfig, checkpoint: str | Path, out: str | Path, stop_after: int | None,
              on_eval: Callable[[int, EvalResult], None] | None, progress: bool) -> dict[str, Any]:
    from jowa_data.manifest import load_manifests
    from jowa_data.stream import SegmentStream
    from jowa_model.tokenizer import load_tokenizer

    validate_config(cfg)  # the window is checked against the loaded model below
    manifest = load_manifests(list(cfg.manifests) or None).get(cfg.game)
    run = RunFiles(out)
    run.root.mkdir(parents=True, exist_ok=True)
    dataset = cfg.data.dataset
    if not dataset:
        if not cfg.data.replay_root:
            raise ConfigError("give data.dataset (a built fine-tuning set) or data.replay_root to build one")
        dataset = str(build_finetune_dataset(manifest, cfg.data.replay_root, cfg.tokenizer, run.root / "data",
                                             cfg.data, progress=progress))
    check_dataset(dataset, manifest, cfg.tokenizer)

    device = pick_device(cfg.device)
    use_bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.startswith("cuda"))
    imag_dtype = torch.bfloat16 if use_bf16 else None
    torch.manual_seed(cfg.seed)
    model = load_pretrained(checkpoint, manifest, device)
    validate_config(cfg, model.cfg.max_steps)
    tokenizer = load_tokenizer(cfg.tokenizer, map_location=device)
    tokenizer.requires_grad_(False)
    if tokenizer.cfg.vocab_size > model.cfg.obs_vocab:
        raise ConfigError(f"{cfg.tokenizer}: {tokenizer.cfg.vocab_size} codes > the model's obs vocabulary "
                          f"{model.cfg.obs_vocab} ({checkpoint})")

    stream = SegmentStream(dataset, batch_size=cfg.data.batch_size, seq_len=cfg.data.seq_len, seed=cfg.seed,
                           rank=0, world_size=1, backend=cfg.data.backend, stride=cfg.data.stride, progress=progress)
    if len(stream) == 0:
        raise ConfigError(f"{dataset}: {stream.num_segments} segments are fewer than one batch of "
                          f"{cfg.data.batch_size}: lower data.batch_size")
    sampler = None
    if cfg.imagine.enabled:
        sampler = ContextSampler(dataset, cfg.data.seq_len - cfg.imagine.horizon, cfg.imagine.batch_size,
                                 cfg.seed + 1, cfg.data.backend, cfg.data.stride)

    set_stage(model, 2)  # joint loss from the first step: the Q head trains
    opt = make_optimizer(model, 2, OptimConfig(lr_stage2=cfg.lr, critic_lr=cfg.critic_lr,
                                               weight_decay=cfg.weight_decay, grad_clip=cfg.grad_clip))
    cfg_dict = config_to_dict(cfg)
    step, evals, imagined_total = 0, [], 0
    latest = run.latest()
    if latest is not None:
        ckpt = safe_torch_load(latest, map_location=device)
        if ckpt.get("format") != FORMAT or "finetune" not in ckpt:
            raise CheckpointError(f"{latest}: not a jowa fine-tuning checkpoint")
        st = ckpt["finetune"]
        _check_resume(json.loads(st["config"]), cfg_dict, latest)
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        step, evals, imagined_total = int(st["step"]), list(st["evals"]), int(st["imagined_total"])
        stream.load_state_dict(st["stream"])
        if sampler is not None and st.get("sampler"):
            sampler.load_state_dict(st["sampler"])
        set_rng_state(st["rng"], device)
        run.truncate_metrics(step)
    else:
        atomic_write_json(run.root / "config.json", cfg_dict)
        run.truncate_metrics(-1)
    model.train()

    def report() -> dict[str, Any]:
        best = max(evals, key=lambda e: (e["mean"], -e["step"])) if evals else None
        return {"game": manifest.name, "task_id": manifest.task_id, "checkpoint": str(checkpoint),
                "dataset": str(dataset), "steps": step, "evals": evals, "imagined_segments": imagined_total,
                "best": None if best is None else {"step": best["step"], "mean": best["mean"],
                                                   "path": str(run.root / "best.pt")}}

    def evaluate(s: int) -> None:
        res = play_episodes(model, tokenizer, manifest, cfg.eval, imag_dtype, progress=progress)
        model.train()
        prev_best = max((e["mean"] for e in evals), default=-math.inf)
        evals.append({"step": s, "returns": res.returns, "clipped_returns": res.clipped_returns, "mean": res.mean,
                      "episode_steps": res.steps})
        if res.mean > prev_best:
            save_world_action(model, run.root / "best.pt",
                              finetune_best={"step": s, "mean": res.mean, "game": manifest.name,
                                             "task_id": manifest.task_id})
        atomic_write_json(run.root / "report.json", report())
        if on_eval is not None:
            on_eval(s, res)

    def save(s: int) -> None:
        st = {"step": s, "config": json.dumps(cfg_dict), "stream": stream.state_dict(),
              "sampler": sampler.state_dict() if sampler is not None else None, "rng": rng_state(device),
              "evals": evals, "imagined_total": imagined_total}
        from jowa_common.io import atomic_torch_save

        atomic_torch_save(model_state(model) | {"optimizer": opt.state_dict(), "finetune": st}, run.ckpt_path(s))
        run.prune(cfg.keep_ckpts)

    end = cfg.steps if stop_after is None else min(stop_after, cfg.steps)
    it = endless(stream)
    t_last, steps_since, tokens_since = time.perf_counter(), 0, 0
    bar = Progress(end, step, f"finetune {manifest.name}", enabled=progress)
    metrics = MetricsLog(run, purge_step=step)
    while step < end:
        real = to_device(next(it), device)
        imagined = None
        if sampler is not None and step >= cfg.imagine.after_steps:
            ctx = to_device(sampler.sample(), device)
            imagined = imagine_segments(model, ctx, cfg.imagine.horizon, cfg.imagine.beam_width, cfg.imagine.gamma,
                                        imag_dtype)
            model.train()
            imagined_total += int(imagined["tokens"].shape[0])
        with autocast_ctx(device, cfg.precision):
            total, terms = finetune_loss(model, real, imagined, cfg.loss)
        gnorm = optimizer_step(total, opt, cfg.grad_clip)
        step += 1
        steps_since += 1
        tokens_since += int(real["tokens"].shape[0] * real["tokens"].shape[1] * (model.cfg.obs_tokens + 1))
        model.step_target(step)
        bar.update(step)
        if step % cfg.log_every == 0 or step == end:
            vals = torch.stack([total.detach().float(), gnorm.float()] + [v.float() for v in terms.values()]).tolist()
            row = {"step": step, "train/loss": vals[0], "train/grad_norm": vals[1]}
            row |= dict(zip(terms, vals[2:]))
            row["imagine/total"] = imagined_total
            dt = time.perf_counter() - t_last
            row["perf/steps_per_s"] = steps_since / max(dt, 1e-9)
            row["perf/tokens_per_s"] = tokens_since / max(dt, 1e-9)  # real segments' tokens, as in pretraining
            t_last, steps_since, tokens_since = time.perf_counter(), 0, 0
            metrics.log(row)
            bar.update(step, 2, row, ("train/loss_obs", "train/loss_td", "train/loss_cql"))
        if (cfg.eval.every and step % cfg.eval.every == 0) or step == cfg.steps:
            evaluate(step)
        if step % cfg.ckpt_every == 0 or step == end:
            save(step)
    bar.close()
    metrics.close()
    rep = report()
    atomic_write_json(run.root / "report.json", rep)
    return rep
