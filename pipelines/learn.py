"""`jowa bench learn`: does the agent beat the behaviour that produced its data? One resumable command.

record mixed-quality data on the real emulator (each game's heuristic controller under an epsilon that decays
1.0 -> 0.05 over the recording, the shape of a DQN-Replay run) -> fit the tokenizer (a k-means codebook of
cell images, docs/tokenizer.md) -> build token shards ->
pretrain ONE multi-game world-action model -> evaluate it on the real emulator with the paper's protocol
(no sticky actions, epsilon 0.001, greedy and beam; `eval_sticky=0.25` evaluates under the recordings' sticky
actions instead) beside uniform random play under the same protocol and frame cap -> one report (printed,
report.json, report.png) per game:

* returns of random play, the data (the behaviour's episodes in the built dataset), greedy and beam, each with
  a 95% percentile-bootstrap CI over episodes. DQN-Replay stores clipped rewards, so the data's return is only
  known in clipped units: the table compares clipped returns (sum of clip(r, -1, 1)); raw game scores of the
  played episodes are in the JSON. Recorded episodes are cut at the same frame cap as the evaluation;
* the world model on held-out data (another recorded run): next-frame token accuracy against copying the last
  frame, overall and on the tokens that change; reward-sign accuracy against the majority sign;
* the tokenizer on held-out frames: L1 over all pixels and over moving pixels (those that change between
  consecutive frames: balls, bullets, paddles);
* flags for what shows that nothing was learned (a TD loss at ln(atoms): a uniform return distribution).

Every stage writes into its own sub-folder and is skipped when complete, so rerunning resumes.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from jowa_common.config import apply_overrides, config_to_dict
from jowa_common.io import atomic_write_json
from pipelines.scores import bootstrap_ci, normalize, sample_std, top_action

RETURN_KINDS = ("random", "data", "greedy", "beam")


@dataclass
class LearnConfig:
    games: tuple[str, ...] = ("Breakout", "Freeway", "SpaceInvaders")  # each needs a controller (policies.py)
    policy: str = "epsilon:1.0-0.05:heuristic"  # behaviour policy of every recording (jowa_data.policies)
    record_steps: int = 30_000  # agent steps of run 1 per game: the training data
    heldout_steps: int = 5_000  # agent steps of run 2 per game: held-out data for the world-model metrics
    capacity: int = 10_000  # rows per DQN-Replay checkpoint file (real data: 1,000,000)
    max_frames: int = 10_000  # emulator frames per episode, recorded and evaluated (Freeway's game: 8,192)
    tokenizer: str = "cells"  # tokenizer training preset: cells (k-means codebook of cell images, up to 40 Lloyd
    # iterations) or tiny (the patch-MLP VQ-VAE, tokenizer_steps steps); docs/tokenizer.md compares them
    tokenizer_steps: int = 3_000  # steps of gradient-trained tokenizers (tiny, the tiny_conv baseline): batch 64
    stage1_steps: int = 2_000  # world-loss steps (M1)
    stage2_steps: int = 3_000  # joint-loss steps (M2)
    batch_size: int = 32  # segments per step
    eval_episodes: int = 16  # episodes per game and player (paper E.3: 16)
    eval_sticky: float = 0.0  # ALE repeat_action_probability when evaluating every player. 0 = the paper's
    # protocol (Table 16), whose episodes are near-copies (CIs of width ~0); 0.25 = the protocol the data was
    # recorded under (DQN-Replay's sticky actions, `jowa-data record`): episodes differ, CIs have width
    planners: tuple[str, ...] = ("greedy", "beam")  # model players; random play is always evaluated
    n_boot: int = 2_000  # bootstrap resamples of each CI
    seed: int = 0
    threads: int = 0  # torch CPU threads; 0 = all cores on an idle machine, 1 on a busy one
    tokenizer_baseline: bool = False  # ablation: also train the conv tokenizer the tiny preset used to be
    transfer_game: str = ""  # transfer (paper Table 3): fine-tune on this unseen game vs train from scratch
    transfer_transitions: int = 5_000  # transitions of the transfer game (paper: 5k)
    transfer_steps: int = 1_000  # fine-tuning steps, the same for the pretrained and the scratch model
    pretrain: dict[str, Any] = field(default_factory=dict)  # overrides of the tiny pretraining preset, for ablations:
    # --set pretrain.loss.cql_alpha=0.1 --set pretrain.model.target_update_every=1000 (the paper's values)


def pick_threads(requested: int) -> int:
    """Threads for torch. On a busy machine OpenMP threads spin-wait for each other and a 2-thread run can be
    10x slower than a 1-thread one (measured here), so `auto` takes 1 thread when the load is high."""
    if requested > 0:
        return requested
    cores = os.cpu_count() or 1
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    return cores if load < 0.5 * cores else 1


# --------------------------------------------------------------------------------------------- statistics


def summarize_returns(x: Any, n_boot: int, seed: int) -> dict[str, Any]:
    """mean, 95% CI, sample std and count of per-episode returns."""
    x = np.asarray(x, dtype=np.float64)
    lo, hi = bootstrap_ci(x, n_boot, 0.95, seed)
    return {"mean": float(x.mean()) if len(x) else math.nan, "ci": [lo, hi], "episodes": int(len(x)),
            "std": sample_std(x)}


def normalized(v: float, random: float, data: float) -> float:
    """(v - random) / (data - random): 0 = random play, 1 = the data's mean (nan when they are equal)."""
    return (v - random) / (data - random) if data != random else math.nan


NEAR_CONSTANT = 0.95  # a player sending one action on at least this share of its decisions plays a constant policy


def learn_checks(games: dict[str, dict[str, Any]], world: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The questions the report answers, from its numbers: does the best planner beat random play / the data on
    each game, is beam >= greedy on average over the games (mean human-normalized score of the raw game scores,
    the paper's aggregate, sec. 4.1; the mean of (v - random) / (data - random) is reported too, but it is not
    the test: where the data is barely above random play, as SpaceInvaders' epsilon-heavy recordings, a fraction
    of a point weighs more than a whole game, and under sticky actions the denominator can turn negative and
    flip the comparison), does the world model beat copying,
    does its reward head ever predict a reward (a balanced accuracy no better than a constant guess's means its
    argmax is always the majority sign: beam's income-to-date, Eq. 11, is then 0 on that game), which players
    send one action on >= NEAR_CONSTANT of their decisions (a constant policy, not a reaction to the screen)."""
    beats_random, beats_data, norm, hns = {}, {}, {"greedy": [], "beam": []}, {"greedy": [], "beam": []}
    for g, d in games.items():
        agents = [d[k]["mean"] for k in ("greedy", "beam") if k in d]
        best = max(agents) if agents else math.nan
        beats_random[g] = bool(best > d["random"]["mean"])
        beats_data[g] = bool(best > d["data"]["mean"])
        for k in norm:
            if k in d:
                norm[k].append(normalized(d[k]["mean"], d["random"]["mean"], d["data"]["mean"]))
                hns[k].append(d[k]["hns"])
    mean_norm = {k: float(np.nanmean(v)) if v and not all(math.isnan(x) for x in v) else math.nan
                 for k, v in norm.items()}
    mean_hns = {k: float(np.mean(v)) if v else math.nan for k, v in hns.items()}
    return {"beats_random": beats_random, "beats_data": beats_data,
            "games_beating_data": int(sum(beats_data.values())),
            "normalized_mean": mean_norm, "hns_mean": mean_hns,
            "beam_ge_greedy": bool(mean_hns["beam"] >= mean_hns["greedy"]) if not any(
                math.isnan(v) for v in mean_hns.values()) else None,
            "world_model_ge_copy": {g: bool(w["token_acc"] >= w["token_acc_copy"]) for g, w in world.items()},
            "reward_head_silent": {g: bool(w["reward_balanced_acc"] <= w["reward_balanced_acc_baseline"] + 1e-9)
                                   for g, w in world.items() if "reward_balanced_acc" in w},
            "constant_players": {g: {k: d[k]["top_action"] for k in ("greedy", "beam") if k in d and
                                     d[k].get("top_action") and d[k]["top_action"][1] >= NEAR_CONSTANT}
                                 for g, d in games.items()}}


def td_flag(rows: list[dict[str, Any]], num_atoms: int, tol: float = 0.05) -> dict[str, Any]:
    """A TD loss within `tol` of ln(num_atoms) at the end of stage 2 is a head that predicts (and is taught) a
    uniform return distribution: it has learned no values."""
    td = [r["train/loss_td"] for r in rows if r.get("stage") == 2 and "train/loss_td" in r]
    if not td:
        return {"td_first": None, "td_last": None, "ln_atoms": math.log(num_atoms), "learned": None}
    last = float(np.mean(td[-3:]))
    return {"td_first": float(td[0]), "td_last": last, "ln_atoms": math.log(num_atoms),
            "learned": bool(abs(last - math.log(num_atoms)) > tol)}


# --------------------------------------------------------------------------------------------- stages


@dataclass
class LearnPaths:
    root: Path

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        self.replay = self.root / "replay"
        self.index = self.root / "index.parquet"
        self.tokenizer_run = self.root / "tokenizer"
        self.tokenizer = self.tokenizer_run / "tokenizer.pt"
        self.dataset = self.root / "dataset"
        self.heldout = self.root / "heldout"
        self.pretrain = self.root / "pretrain"
        self.eval = self.root / "eval"
        self.pictures = self.root / "pictures"


def record_run(cfg: LearnConfig, paths: LearnPaths, manifest, run: str, steps: int, seed: int) -> dict[str, Any]:
    """One recording with the behaviour policy, episodes cut at the frame cap; skipped when already complete (a
    `.complete` marker is written last, so a killed recording is redone)."""
    from jowa_data.record import record

    done = paths.replay / manifest.name / run / ".complete"
    if not done.exists():
        shutil.rmtree(paths.replay / manifest.name / run, ignore_errors=True)
        r = record(manifest, paths.replay, run, steps, policy=cfg.policy, seed=seed, capacity=cfg.capacity,
                   max_episode_steps=max(1, cfg.max_frames // 4), keep_frames=False, progress=True, compresslevel=1)
        atomic_write_json(done, {"steps": steps, "episodes": r.num_episodes, "policy": cfg.policy,
                                 "seconds": round(r.seconds, 1)})
    return json.loads(done.read_text())


def record_data(cfg: LearnConfig, paths: LearnPaths, games: list) -> dict[str, Any]:
    """Run 1 (training) and run 2 (held-out) of every game with the behaviour policy."""
    todo = [(m, "1", cfg.record_steps) for m in games] + [(m, "2", cfg.heldout_steps) for m in games]
    return {f"{m.name}/{run}": record_run(cfg, paths, m, run, steps, cfg.seed * 1000 + i)
            for i, (m, run, steps) in enumerate(todo)}


def build_data(cfg: LearnConfig, paths: LearnPaths, games: list) -> dict[str, Any]:
    """The training set (run 1, zarr + wds) and the held-out set (run 2), all complete episodes."""
    from jowa_data.build import BuildConfig, build_dataset
    from jowa_data.subsample import SubsampleOptions

    res = {}
    for name, run, out in (("dataset", 1, paths.dataset), ("heldout", 2, paths.heldout)):
        sel = SubsampleOptions(runs=(run,), checkpoints=(0, 10_000), fraction=1.0, seed=cfg.seed)
        r = build_dataset(games, paths.replay, paths.tokenizer, out,
                          BuildConfig(formats=("zarr",), selection=sel, workers=1, progress=True))
        res[name] = {k: r[k] for k in ("status", "tasks", "frames_per_s") if k in r}
    return res


def data_returns(dataset: Path) -> dict[str, np.ndarray]:
    """Per game, the clipped return of every complete episode of a built dataset (its episodes.parquet)."""
    import pyarrow.parquet as pq

    t = pq.read_table(dataset / "episodes.parquet", columns=["game", "ret", "complete"]).to_pydict()
    out: dict[str, list[float]] = {}
    for g, r, c in zip(t["game"], t["ret"], t["complete"]):
        if c:
            out.setdefault(g, []).append(float(r))
    return {g: np.asarray(v) for g, v in out.items()}


def heldout_frames(replay: Path, game: str, run: str = "2", pairs: int = 600, seed: int = 0):
    """`pairs` random (frame, previous frame) pairs from one recorded run's episodes: uint8 (P, 84, 84) x 2."""
    from jowa_data.replay import iter_episodes

    frames = [ep.frames for ep in iter_episodes(replay, game, run) if len(ep.frames) > 1]
    starts = np.cumsum([0] + [len(f) for f in frames])
    allf = np.concatenate(frames)
    ok = np.setdiff1d(np.arange(len(allf)), starts[:-1])  # rows with a previous frame in the same episode
    sel = np.sort(np.random.default_rng(seed).choice(ok, size=min(pairs, len(ok)), replace=False))
    return allf[sel], allf[sel - 1]


def reconstruction_report(tokenizer, frames: np.ndarray, prev: np.ndarray, threshold: int = 10) -> dict[str, Any]:
    """L1 (pixels in [0, 1]) of encode -> decode over all pixels and over moving pixels: those that differ from
    the previous frame by more than `threshold` levels (balls, bullets, paddles, ships). Two sprite checks tell
    where a sprite gets lost: `moving_cells_changed` (grid cells holding moving pixels whose token differs from
    the previous frame's: the encoder saw the change) and `moving_drawn` (moving pixels decoded closer to the
    new frame than to the previous one: the decoder drew it)."""
    tokens, prev_tokens = tokenizer.encode(frames), tokenizer.encode(prev)
    rec = tokenizer.decode(tokens)
    f, p, r = (a.astype(np.float32) for a in (frames, prev, rec))
    err = np.abs(r - f) / 255.0
    moving = np.abs(f - p) > threshold
    g = int(round(math.sqrt(tokens.shape[1])))  # grid side (6 for 36 tokens)
    n, h, w = moving.shape
    cells = moving.reshape(n, g, h // g, g, w // g).any(axis=(2, 4)).reshape(n, -1)  # (N, g*g)
    changed = tokens != prev_tokens
    nan = math.nan
    return {"l1": float(err.mean()), "moving_l1": float(err[moving].mean()) if moving.any() else nan,
            "moving_fraction": float(moving.mean()), "frames": int(len(frames)),
            "moving_cells_changed": float(changed[cells].mean()) if cells.any() else nan,
            "moving_drawn": float((np.abs(r - f) < np.abs(r - p))[moving].mean()) if moving.any() else nan}, rec


# --------------------------------------------------------------------------------------------- run


def run_learn(out: str | Path, cfg: LearnConfig | None = None, console=None,
              stages: tuple[str, ...] = ()) -> dict[str, Any]:
    """Run (or resume) every stage into `out`; return (and write) the report."""
    import torch
    from rich.console import Console

    from jowa_data.manifest import load_manifests

    cfg = cfg or LearnConfig()
    console = console or Console(stderr=True)
    threads = pick_threads(cfg.threads)
    torch.set_num_threads(threads)
    paths = LearnPaths(out)
    paths.root.mkdir(parents=True, exist_ok=True)
    paths.pictures.mkdir(exist_ok=True)
    registry = load_manifests()
    games = [registry.get(g) for g in cfg.games]
    report: dict[str, Any] = {"format": "jowa-learn-report-v1", "config": config_to_dict(cfg), "threads": threads,
                              "seconds": {}}
    t0 = time.perf_counter()

    def stage(name: str, fn: Callable[[], Any]) -> Any:
        console.rule(f"[bold]learn: {name}")
        t = time.perf_counter()
        res = fn()
        report["seconds"][name] = round(time.perf_counter() - t, 1)
        console.print(f"[green]{name}[/] done in {report['seconds'][name]} s")
        return res

    report["record"] = stage("record", lambda: record_data(cfg, paths, games))
    stage("tokenizer", lambda: train_tokenizer_stage(cfg, paths, games))
    report["build"] = stage("build", lambda: build_data(cfg, paths, games))
    report["pretrain"] = stage("pretrain", lambda: pretrain_stage(cfg, paths))
    report["tokenizer"] = stage("tokenizer metrics", lambda: tokenizer_metrics(cfg, paths, games))
    report["world_model"] = stage("world-model metrics", lambda: world_metrics(cfg, paths, games))
    returns = stage("evaluate", lambda: evaluate_stage(cfg, paths, games))
    report["games"] = returns
    report["checks"] = learn_checks(returns, report["world_model"])
    if cfg.tokenizer_baseline:
        report["tokenizer_baseline"] = stage("tokenizer baseline", lambda: tokenizer_baseline(cfg, paths, games))
    if cfg.transfer_game:
        report["transfer"] = stage("transfer", lambda: transfer_stage(cfg, paths, registry))
    report["total_seconds"] = round(time.perf_counter() - t0, 1)
    from pipelines.charts import learn_chart

    report["chart"] = str(learn_chart(report, paths.pictures / "report.png"))
    atomic_write_json(paths.root / "report.json", report)
    return report


def train_tokenizer_stage(cfg: LearnConfig, paths: LearnPaths, games: list) -> dict[str, Any]:
    from jowa_data.subsample import SubsampleOptions, build_index, write_index
    from pipelines.train_tokenizer import train_preset, train_tokenizer

    if not paths.index.exists():
        sel = SubsampleOptions(runs=(1,), checkpoints=(0, 10_000), fraction=1.0, seed=cfg.seed)
        write_index(build_index(games, paths.replay, options=sel), paths.index)
    over: dict[str, Any] = {"seed": cfg.seed}
    if cfg.tokenizer != "cells":  # a k-means fit runs until it converges (train_preset("cells"))
        over["steps"] = cfg.tokenizer_steps
    tcfg = apply_overrides(train_preset(cfg.tokenizer), over)
    res = train_tokenizer(tcfg, paths.tokenizer_run, index=paths.index, replay_root=paths.replay,
                          resume=(paths.tokenizer_run / "checkpoint.pt").exists(), progress=True)
    return {k: v for k, v in res.items() if isinstance(v, (int, float, str))}


def pretrain_config(cfg: LearnConfig, paths: LearnPaths):
    from pipelines.pretrain import train_preset

    pcfg = apply_overrides(train_preset("tiny"), {
        "data": {"dataset": str(paths.dataset), "eval_dataset": str(paths.heldout), "batch_size": cfg.batch_size},
        "stage1_steps": cfg.stage1_steps, "stage2_steps": cfg.stage2_steps, "seed": cfg.seed,
        "tokenizer": str(paths.tokenizer), "log_every": 25, "eval_every": 500, "ckpt_every": 500})
    return apply_overrides(pcfg, cfg.pretrain)


def pretrain_stage(cfg: LearnConfig, paths: LearnPaths) -> dict[str, Any]:
    from pipelines.pretrain import pretrain
    from pipelines.viz import read_metrics

    pcfg = pretrain_config(cfg, paths)
    res = pretrain(pcfg, paths.pretrain)
    rows = read_metrics(paths.pretrain / "metrics.jsonl")
    imgs = sorted((paths.pretrain / "images").glob("imagined_*.png"))
    if imgs:
        shutil.copy(imgs[-1], paths.pictures / "imagined_rollout.png")
    from pipelines.charts import training_curves

    training_curves(rows, paths.pictures / "training_curves.png", stage1_steps=cfg.stage1_steps)
    last = rows[-1] if rows else {}
    return {"checkpoint": res["checkpoint"], "steps": res["step"],
            "q_head": td_flag(rows, pcfg.model.num_atoms),
            "last": {k: round(v, 4) for k, v in last.items() if isinstance(v, float)}}


def tokenizer_metrics(cfg: LearnConfig, paths: LearnPaths, games: list) -> dict[str, Any]:
    from jowa_model.tokenizer import load_tokenizer
    from pipelines.viz import save_frame_grid

    tok = load_tokenizer(paths.tokenizer)
    out, originals, recons = {}, [], []
    for m in games:
        frames, prev = heldout_frames(paths.replay, m.name, seed=cfg.seed)
        out[m.name], rec = reconstruction_report(tok, frames, prev)
        pick = np.linspace(0, len(frames) - 1, 4).astype(int)
        originals.append(frames[pick])
        recons.append(rec[pick])
    out["all"] = {k: float(np.mean([out[m.name][k] for m in games]))
                  for k in ("l1", "moving_l1", "moving_cells_changed", "moving_drawn")}
    save_frame_grid([np.concatenate(originals), np.concatenate(recons)], paths.pictures / "reconstructions.png",
                    labels=["held-out", "decoded"])
    return out


def world_metrics(cfg: LearnConfig, paths: LearnPaths, games: list) -> dict[str, Any]:
    from jowa_model.checkpoint import load_world_action
    from pipelines.heldout import world_model_report

    ckpt = sorted((paths.pretrain / "ckpt").glob("step_*.pt"))[-1]
    model, _ = load_world_action(ckpt, "cpu")
    return world_model_report(model, str(paths.heldout), names={m.task_id: m.name for m in games})


def evaluate_stage(cfg: LearnConfig, paths: LearnPaths, games: list) -> dict[str, dict[str, Any]]:
    from pipelines.evaluate import EvalConfig, evaluate

    ckpt = sorted((paths.pretrain / "ckpt").glob("step_*.pt"))[-1]
    paths.eval.mkdir(exist_ok=True)
    docs = {}
    for player in ("random", *cfg.planners):
        ecfg = EvalConfig(episodes=cfg.eval_episodes, planner=player, max_frames=cfg.max_frames, seed=cfg.seed,
                          sticky=cfg.eval_sticky, video_dir=str(paths.pictures) if player == "beam" else "")
        docs[player] = evaluate(None if player == "random" else ckpt, None if player == "random" else paths.tokenizer,
                                [m.name for m in games], ecfg, out=paths.eval / f"{player}.json", progress=True)
    data = data_returns(paths.dataset)
    res: dict[str, dict[str, Any]] = {}
    for i, m in enumerate(games):
        g = m.name
        row = {"data": summarize_returns(data.get(g, []), cfg.n_boot, cfg.seed + i)}
        for player, doc in docs.items():
            d = doc["games"][g]
            row[player] = summarize_returns(d["clipped_returns"], cfg.n_boot, cfg.seed + i) | {
                "raw_mean": d["mean"], "raw_std": d["std"], "frames_mean": float(np.mean(d["frames"])),
                "cut_at_cap": int(sum(not t for t in d["terminal"])),
                "decisions_per_s": d.get("decisions_per_s"), "top_action": top_action(d.get("action_counts")),
                "hns": float(normalize(d["mean"], m.scores.random, m.scores.human))}
        res[g] = row
    return res


def tokenizer_baseline(cfg: LearnConfig, paths: LearnPaths, games: list) -> dict[str, Any]:
    """Ablation: the conv tokenizer the `tiny` preset used to be (plain L1, batch 32), `tokenizer_steps` steps on the
    same frames; its held-out errors beside those of the tokenizer the run uses."""
    from jowa_model.tokenizer import load_tokenizer, tokenizer_preset
    from pipelines.train_tokenizer import TokenizerTrainConfig, train_tokenizer

    old = TokenizerTrainConfig(model=tokenizer_preset("tiny_conv"), batch_size=32, lr=1e-3, steps=cfg.tokenizer_steps,
                               seed=cfg.seed, log_every=10, ckpt_every=500, image_every=0)
    run = paths.root / "tokenizer_baseline"
    train_tokenizer(old, run, frames=paths.tokenizer_run / "frames.npy", resume=(run / "checkpoint.pt").exists())
    tok = load_tokenizer(run / "tokenizer.pt")
    out = {}
    for m in games:
        frames, prev = heldout_frames(paths.replay, m.name, seed=cfg.seed)
        out[m.name] = reconstruction_report(tok, frames, prev)[0]
    out["all"] = {k: float(np.mean([out[m.name][k] for m in games])) for k in ("l1", "moving_l1")}
    return out


def transfer_stage(cfg: LearnConfig, paths: LearnPaths, registry) -> dict[str, Any]:
    """Paper Table 3 at small scale: fine-tune the pretrained model on an unseen game's few transitions, and train
    the same architecture from scratch on the same transitions for the same steps; evaluate both the same way."""
    from jowa_model.checkpoint import save_world_action
    from jowa_model.world_action import WorldActionModel
    from pipelines.finetune import FinetuneDataConfig, build_finetune_dataset, finetune, finetune_preset

    m = registry.get(cfg.transfer_game)
    record_run(cfg, paths, m, "1", cfg.transfer_transitions + cfg.max_frames // 4, cfg.seed * 1000 + 99)
    data = build_finetune_dataset(m, paths.replay, paths.tokenizer, paths.root / "transfer" / "data",
                                  FinetuneDataConfig(transitions=cfg.transfer_transitions, checkpoints=(0, 10_000)))
    pre = sorted((paths.pretrain / "ckpt").glob("step_*.pt"))[-1]
    scratch = paths.root / "transfer" / "scratch_init.pt"
    if not scratch.exists():
        import torch

        torch.manual_seed(cfg.seed)
        save_world_action(WorldActionModel(pretrain_config(cfg, paths).model), scratch)
    out = {}
    for name, ckpt in (("pretrained", pre), ("scratch", scratch)):
        fcfg = apply_overrides(finetune_preset("tiny"), {
            "game": m.name, "tokenizer": str(paths.tokenizer), "steps": cfg.transfer_steps, "seed": cfg.seed,
            "data": {"dataset": str(data)},
            "eval": {"every": 0, "episodes": cfg.eval_episodes, "max_frames": cfg.max_frames}})
        rep = finetune(fcfg, ckpt, paths.root / "transfer" / name)
        last = rep["evals"][-1]
        out[name] = summarize_returns(last["clipped_returns"], cfg.n_boot, cfg.seed) | {
            "raw_mean": float(np.mean(last["returns"]))}
    return {"game": m.name, "transitions": cfg.transfer_transitions, "steps": cfg.transfer_steps, **out}


# --------------------------------------------------------------------------------------------- report


def _ci(d: dict[str, Any]) -> str:
    lo, hi = d["ci"]
    return f"{d['mean']:.1f} ({lo:.1f}-{hi:.1f})"


def render_report(report: dict[str, Any], console) -> None:
    """The report as three tables that fit 100 columns, then the checks and flags."""
    from rich.table import Table

    cap, sticky = report["config"]["max_frames"], report["config"].get("eval_sticky", 0.0)
    actions = f"sticky {sticky:g}" if sticky else "no sticky actions"
    t = Table(title=f"mean episode return, clipped rewards, 95% CI (<= {cap:,} frames, {actions})")
    t.add_column("game")
    for k in RETURN_KINDS:
        t.add_column(k, justify="right")
    for g, row in report["games"].items():
        t.add_row(g, *[_ci(row[k]) if k in row else "-" for k in RETURN_KINDS])
    console.print(t)
    w = Table(title="world model on held-out data (frames 2..L of 8-step segments)")
    for col in ("game", "token acc", "copy", "on changed", "changed", "reward acc", "majority"):
        w.add_column(col, justify="left" if col == "game" else "right")
    for g, d in report["world_model"].items():
        w.add_row(g, f"{d['token_acc']:.3f}", f"{d['token_acc_copy']:.3f}", f"{d['token_acc_changed']:.3f}",
                  f"{d['changed_fraction']:.3f}", f"{d['reward_acc']:.3f}", f"{d['reward_acc_majority']:.3f}")
    console.print(w)
    k = Table(title="tokenizer on held-out frames: L1 of decoded pixels in [0, 1]")
    base = report.get("tokenizer_baseline")
    for col in ("game", "L1", "moving-pixel L1", "sprite cells re-coded", "sprite pixels drawn") + \
            (("conv baseline moving L1",) if base else ()):
        k.add_column(col, justify="left" if col == "game" else "right")
    for g, d in report["tokenizer"].items():
        k.add_row(g, f"{d['l1']:.4f}", f"{d['moving_l1']:.4f}", f"{d.get('moving_cells_changed', math.nan):.2f}",
                  f"{d.get('moving_drawn', math.nan):.2f}", *([f"{base[g]['moving_l1']:.4f}"] if base else []))
    console.print(k)
    c = report["checks"]
    q = report["pretrain"]["q_head"]
    yes = {True: "yes", False: "[red]no[/]", None: "-"}
    ch = Table(title="checks (agent = the better of greedy and beam; plays = its most sent action)")
    for col in ("game", "agent > random", "agent > data", "WM >= copy", "greedy plays", "beam plays"):
        ch.add_column(col, justify="left" if col == "game" else "center")
    for g, row in report["games"].items():
        plays = [f"{row[k]['top_action'][0]} {row[k]['top_action'][1]:.0%}" if row.get(k, {}).get("top_action")
                 else "-" for k in ("greedy", "beam")]
        ch.add_row(g, yes[c["beats_random"].get(g)], yes[c["beats_data"].get(g)], yes[c["world_model_ge_copy"].get(g)],
                   *plays)
    console.print(ch)
    def say(text: str) -> None:
        print_wrapped(console, text)

    h = c["hns_mean"]
    say(f"human-normalized score (raw game scores, paper sec. 4.1), mean over games: greedy {h['greedy']:.4f}, "
        f"beam {h['beam']:.4f} (beam >= greedy: {yes[c['beam_ge_greedy']]}); "
        f"normalized by this run's random play (0) and the data (1): greedy {c['normalized_mean']['greedy']:.2f}, "
        f"beam {c['normalized_mean']['beam']:.2f}")
    if q["learned"] is False:
        say(f"[red]FLAG[/]: stage-2 TD loss {q['td_last']:.3f} ~ ln(atoms) {q['ln_atoms']:.3f}: the Q head predicts a "
            "uniform return distribution (it learned no values)")
    elif q["td_last"] is not None:
        say(f"Q head: TD loss {q['td_first']:.3f} -> {q['td_last']:.3f} (ln atoms = {q['ln_atoms']:.3f})")
    silent = [g for g, v in c.get("reward_head_silent", {}).items() if v]
    if silent:
        say(f"[yellow]note[/]: the reward head's argmax is always the majority sign on {', '.join(silent)} (held-out "
            "balanced accuracy = a constant guess's): beam's predicted rewards are 0 there, it plans on Q alone")
    const = {k: [g for g, players in c.get("constant_players", {}).items() if k in players] for k in ("greedy", "beam")}
    if any(const.values()):
        say(f"[yellow]note[/]: constant policies (one action on >= {NEAR_CONSTANT:.0%} of the decisions: the critic "
            "ranks it first whatever the screen, so the return is that action's): "
            + "; ".join(f"{k} on {', '.join(gs)}" for k, gs in const.items() if gs))
    tr = report.get("transfer")
    if tr:
        say(f"transfer to {tr['game']} ({tr['transitions']} transitions, {tr['steps']} steps): pretrained "
            f"{_ci(tr['pretrained'])} vs scratch {_ci(tr['scratch'])}")
    say(f"total {report['total_seconds']:.0f} s: " + ", ".join(f"{n} {s:.0f}" for n, s in report["seconds"].items()))


def print_wrapped(console, text: str, width: int = 100) -> None:
    """Print text wrapped at `width` columns whatever the terminal's width (reports fit 100 columns)."""
    import textwrap

    for line in textwrap.wrap(text, width=width, subsequent_indent="  ", break_on_hyphens=False):
        console.print(line, soft_wrap=True)
