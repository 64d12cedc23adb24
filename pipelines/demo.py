"""The main job on a small built-in default: every stage of jowa, end to end, on this machine's CPU.

record real Atari data (ale-py) → subsample → stats → train the tokenizer → build token shards →
pretrain a tiny world-action model (stage 1 + stage 2) → evaluate greedy and with planning on the real
emulator → fine-tune on a game the pretraining never saw → one summary (printed + summary.json) and the
pictures (reconstructions, imagined rollout, training curves, game GIF) in one folder.

Each stage calls the same library function as its CLI command, writes into its own sub-folder, and is
skipped when its output is already complete, so rerunning `jowa demo` after an interruption resumes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from jowa_data.config import config_to_dict
from jowa_data.io import atomic_write_json


@dataclass
class DemoConfig:
    games: tuple[str, ...] = ("Phoenix", "SpaceInvaders")  # pretraining games (paper's pretraining split)
    finetune_game: str = "Pong"  # a held-out game (paper appendix D), never seen in pretraining
    record_steps: int = 4000  # agent steps recorded per pretraining game (run 1)
    heldout_steps: int = 1200  # agent steps of run 2 per game: held-out segments for the accuracy check
    finetune_steps_recorded: int = 3000  # agent steps recorded for the fine-tuning game
    capacity: int = 2000  # rows per DQN-Replay checkpoint file (real data: 1,000,000)
    max_episode_steps: int = 1500  # step cap per recorded episode (Dopamine: 27,000)
    policy: str = "random"  # behaviour policy of the recording (random | epsilon:E[:inner] | module:function)
    tokenizer_steps: int = 400  # tiny tokenizer training steps (batch 32)
    pretrain_stage1: int = 400  # world-loss steps (M1)
    pretrain_stage2: int = 300  # joint-loss steps (M2)
    batch_size: int = 16  # segments per step
    eval_episodes: int = 2  # episodes per game and planner setting
    eval_max_frames: int = 2000  # frame cap per evaluation episode (paper: 108,000)
    finetune_steps: int = 80  # fine-tuning steps (paper: 50,000)
    finetune_transitions: int = 2000  # fine-tuning set size (paper: 5,000)
    seed: int = 0
    threads: int = 0  # torch CPU threads; 0 = auto: all cores on an idle machine, 1 when it is busy


def pick_threads(requested: int) -> int:
    """Threads for torch. On a busy machine OpenMP threads spin-wait for each other and a 2-thread run can be
    10x slower than a 1-thread one (measured here), so `auto` takes 1 thread when the load is high."""
    if requested > 0:
        return requested
    cores = os.cpu_count() or 1
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    return cores if load < 0.5 * cores else 1


@dataclass
class Stage:
    name: str
    fn: Callable[[], dict[str, Any]]


def _timed(name: str, fn: Callable[[], dict[str, Any]], console) -> dict[str, Any]:
    console.rule(f"[bold]{name}")
    t = time.perf_counter()
    out = fn() or {}
    out["seconds"] = round(time.perf_counter() - t, 1)
    console.print(f"[green]{name}[/] done in {out['seconds']} s")
    return out


def run_demo(out: str | Path, cfg: DemoConfig | None = None, console=None) -> dict[str, Any]:
    """Run every stage into `out`; return (and write) the summary."""
    from rich.console import Console

    import torch

    cfg = cfg or DemoConfig()
    console = console or Console(stderr=True)
    threads = pick_threads(cfg.threads)
    torch.set_num_threads(threads)
    console.print(f"torch threads: {threads} (load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    pics = out / "pictures"
    pics.mkdir(exist_ok=True)
    summary: dict[str, Any] = {"config": config_to_dict(cfg), "threads": threads}
    t0 = time.perf_counter()

    from jowa_data.manifest import load_manifests

    reg = load_manifests()
    games = [reg.get(g) for g in cfg.games]
    replay = out / "replay"
    ft_game = reg.get(cfg.finetune_game)

    def record_stage() -> dict[str, Any]:
        from jowa_data.record import record

        res = {}
        todo = [(m, "1", cfg.record_steps) for m in games] + [(m, "2", cfg.heldout_steps) for m in games]
        todo.append((ft_game, "1", cfg.finetune_steps_recorded))
        for i, (m, run, steps) in enumerate(todo):
            done = replay / m.name / run / ".complete"
            if not done.exists():
                shutil.rmtree(replay / m.name / run, ignore_errors=True)
                r = record(m, replay, run, steps, policy=cfg.policy, seed=cfg.seed + i, capacity=cfg.capacity,
                           max_episode_steps=cfg.max_episode_steps, keep_frames=False, progress=False)
                done.write_text(json.dumps({"steps": steps}))
            res[f"{m.name}/{run}"] = steps
        return {"recorded_steps": res}

    def stats_stage() -> dict[str, Any]:
        from jowa_data.stats import replay_stats

        st = replay_stats(replay, reg)
        atomic_write_json(out / "replay_stats.json", st)
        per_game = {g: {"episodes": v.get("episodes"), "transitions": v.get("transitions"),
                        "return_mean": (v.get("return") or {}).get("mean")}
                    for g, v in (st.get("games") or {}).items()}
        return {"replay": per_game}

    def index_stage() -> dict[str, Any]:
        from jowa_data.subsample import SubsampleOptions, build_index, write_index

        sel = SubsampleOptions(runs=(1,), checkpoints=(0, 50), fraction=1.0, seed=cfg.seed)
        idx = build_index(games, replay, options=sel)
        write_index(idx, out / "index.parquet")
        return {"index_episodes": idx.num_rows}

    def tokenizer_stage() -> dict[str, Any]:
        from jowa_data.config import apply_overrides
        from pipelines.train_tokenizer import train_preset as tok_preset, train_tokenizer

        # Dead-code restart on: a few hundred CPU steps otherwise collapse the codebook (perplexity falls).
        tcfg = apply_overrides(tok_preset("tiny"), {"steps": cfg.tokenizer_steps, "seed": cfg.seed,
                                                    "image_every": 0, "ckpt_every": cfg.tokenizer_steps,
                                                    "dead_code_restart": True, "dead_code_window": 25,
                                                    "restart_every": 25})
        res = train_tokenizer(tcfg, out / "tokenizer", index=out / "index.parquet", replay_root=replay,
                              resume=(out / "tokenizer" / "checkpoint.pt").exists(), progress=True)
        png = res.get("png") or res.get("last_png")
        if png:
            shutil.copy(png, pics / "reconstructions.png")
        keep = {k: v for k, v in res.items() if isinstance(v, (int, float, str))}
        first, last = res.get("first") or {}, res.get("last") or {}
        keep["recon_l1_first"], keep["recon_l1_last"] = first.get("l1"), last.get("l1")
        keep["perplexity_first"], keep["perplexity_last"] = first.get("perplexity"), last.get("perplexity")
        return keep

    def tokenizer_path() -> Path:
        return out / "tokenizer" / "tokenizer.pt"

    def build_stage() -> dict[str, Any]:
        from jowa_data.build import BuildConfig, build_dataset
        from jowa_data.subsample import SubsampleOptions

        res = {}
        for name, run in (("dataset", 1), ("heldout", 2)):
            sel = SubsampleOptions(runs=(run,), checkpoints=(0, 50), fraction=1.0, seed=cfg.seed)
            r = build_dataset(games, replay, tokenizer_path(), out / name,
                              BuildConfig(formats=("zarr", "wds") if name == "dataset" else ("zarr",),
                                          selection=sel, workers=1, progress=True))
            res[name] = {k: r[k] for k in ("status", "tasks", "frames_per_s") if k in r}
        from jowa_data.build import dataset_stats

        st = dataset_stats(out / "dataset")
        res["transitions"], res["episodes"] = st["total_transitions"], st["total_episodes"]
        res["bytes_per_frame"] = {f: round(v["bytes_per_frame"], 1) for f, v in st["storage"].items()}
        res["codebook"] = {g: {"unique_tokens": v["unique_tokens"], "perplexity": round(v["perplexity"], 1)}
                           for g, v in st["games"].items()}
        return res

    def pretrain_stage() -> dict[str, Any]:
        from jowa_data.config import apply_overrides
        from pipelines.pretrain import pretrain, train_preset
        from pipelines.viz import plot_curves, read_metrics

        pcfg = apply_overrides(train_preset("tiny"), {
            "data": {"dataset": str(out / "dataset"), "eval_dataset": str(out / "heldout"),
                     "batch_size": cfg.batch_size},
            "stage1_steps": cfg.pretrain_stage1, "stage2_steps": cfg.pretrain_stage2, "seed": cfg.seed,
            "tokenizer": str(tokenizer_path()), "ckpt_every": 100, "eval_every": 100, "log_every": 10})
        res = pretrain(pcfg, out / "pretrain")
        rows = read_metrics(out / "pretrain" / "metrics.jsonl")
        plot_curves(rows, ["train/loss_obs", "train/loss_reward", "train/loss_td", "train/loss_cql",
                           "train/token_acc", "eval/token_acc"], pics / "training_curves.png",
                    title="pretraining (stage 1 | stage 2)")
        imgs = sorted((out / "pretrain" / "images").glob("imagined_*.png"))
        if imgs:
            shutil.copy(imgs[-1], pics / "imagined_rollout.png")
        last = rows[-1] if rows else {}  # also right when the run was already complete (resume = no-op)
        return {"checkpoint": res["checkpoint"], "steps": res["step"],
                **{k: round(v, 4) for k, v in last.items() if isinstance(v, float)}}

    def eval_stage() -> dict[str, Any]:
        from jowa_data.config import apply_overrides
        from pipelines.evaluate import EvalConfig, evaluate
        from pipelines.scores import ScoresConfig, compute_scores, load_raw_scores, plot_scores

        ckpt = summary["pretrain"]["checkpoint"]
        res: dict[str, Any] = {}
        for planner in ("greedy", "beam"):
            ecfg = apply_overrides(EvalConfig(), {
                "episodes": cfg.eval_episodes, "planner": planner, "max_frames": cfg.eval_max_frames,
                "seed": cfg.seed, "video_dir": str(pics) if planner == "beam" else ""})
            raw = out / f"eval_{planner}.json"
            doc = evaluate(ckpt, tokenizer_path(), [m.name for m in games], ecfg, out=raw, progress=True)
            rep = compute_scores(load_raw_scores([raw], reg), reg, ScoresConfig(ref="human", n_boot=200,
                                                                                 seed=cfg.seed))
            if planner == "beam":
                plot_scores(rep, pics / "scores_hns.png")
            res[planner] = {
                "returns": {g: v["mean"] for g, v in doc["games"].items()},
                "decisions_per_s": {g: round(v["decisions_per_s"] or 0.0, 2) for g, v in doc["games"].items()},
                "iqm_hns": round(rep["aggregate"]["iqm"]["value"], 4),
                "settings": {g: {k: v["settings"].get(k) for k in ("planner", "horizon", "beam_width")}
                             for g, v in doc["games"].items()}}
        return res

    def finetune_stage() -> dict[str, Any]:
        from jowa_data.config import apply_overrides
        from pipelines.finetune import finetune, finetune_preset

        fcfg = apply_overrides(finetune_preset("tiny"), {
            "game": ft_game.name, "tokenizer": str(tokenizer_path()), "steps": cfg.finetune_steps, "seed": cfg.seed,
            "data": {"replay_root": str(replay), "checkpoints": [0, 50], "transitions": cfg.finetune_transitions},
            "eval": {"every": cfg.finetune_steps, "episodes": cfg.eval_episodes, "max_frames": cfg.eval_max_frames}})
        ckpt = summary["pretrain"]["checkpoint"]
        rep = finetune(fcfg, ckpt, out / "finetune")
        best = rep.get("best") or {}
        evals = rep.get("evals") or []
        return {"game": ft_game.name, "task_id": ft_game.task_id, "steps": cfg.finetune_steps,
                "best_mean_return": best.get("mean"), "best_step": best.get("step"),
                "eval_means": [e.get("mean") for e in evals], "best": best.get("path")}

    stages = [Stage("record", record_stage), Stage("stats", stats_stage), Stage("subsample", index_stage),
              Stage("tokenizer", tokenizer_stage), Stage("build", build_stage), Stage("pretrain", pretrain_stage),
              Stage("evaluate", eval_stage), Stage("finetune", finetune_stage)]
    for st in stages:
        summary[st.name] = _timed(st.name, st.fn, console)
    summary["total_seconds"] = round(time.perf_counter() - t0, 1)
    summary["pictures"] = sorted(str(p.relative_to(out)) for p in pics.iterdir())
    atomic_write_json(out / "summary.json", summary)
    return summary


def _fmt(v: Any, nd: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{nd}f}" if abs(v) < 1e4 else f"{v:,.0f}"
    return str(v)


def summary_rows(summary: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(stage, figure, value) rows of the figures people read first; summary.json has everything."""
    rows: list[tuple[str, str, str]] = []
    add = lambda st, k, v: rows.append((st, k, v))  # noqa: E731
    rec = summary.get("record", {})
    add("record", "agent steps recorded (real ALE)", ", ".join(f"{k} {v}" for k, v in
                                                             rec.get("recorded_steps", {}).items()))
    for g, v in summary.get("stats", {}).get("replay", {}).items():
        add("stats", f"{g}: episodes / transitions / mean clipped return",
            f"{v['episodes']} / {v['transitions']} / {_fmt(v['return_mean'], 2)}")
    tok = summary.get("tokenizer", {})
    add("tokenizer", "recon L1 first -> last", f"{_fmt(tok.get('recon_l1_first'))} -> {_fmt(tok.get('recon_l1_last'))}")
    add("tokenizer", "codebook perplexity first -> last",
        f"{_fmt(tok.get('perplexity_first'), 1)} -> {_fmt(tok.get('perplexity_last'), 1)}")
    b = summary.get("build", {})
    add("build", "transitions / episodes", f"{b.get('transitions')} / {b.get('episodes')}")
    add("build", "bytes per frame on disk", ", ".join(f"{k} {v}" for k, v in b.get("bytes_per_frame", {}).items()))
    add("build", "codebook perplexity per game", ", ".join(f"{g} {v['perplexity']}" for g, v in
                                                           b.get("codebook", {}).items()))
    p = summary.get("pretrain", {})
    add("pretrain", "steps (stage 1 + stage 2)", str(p.get("steps")))
    add("pretrain", "train loss obs / reward / TD / CQL", " / ".join(_fmt(p.get(f"train/loss_{k}")) for k in
                                                                    ("obs", "reward", "td", "cql")))
    add("pretrain", "held-out next-token acc (unigram / copy-last-frame)",
        f"{_fmt(p.get('eval/token_acc'))} ({_fmt(p.get('eval/token_acc_unigram'))} / "
        f"{_fmt(p.get('eval/token_acc_copy'))})")
    add("pretrain", "held-out reward-sign balanced acc (baseline)",
        f"{_fmt(p.get('eval/reward_balanced_acc'))} ({_fmt(p.get('eval/reward_balanced_acc_baseline'))})")
    add("pretrain", "tokens/s", _fmt(p.get("perf/tokens_per_s"), 0))
    for planner, e in summary.get("evaluate", {}).items():
        if not isinstance(e, dict):
            continue
        add("evaluate", f"{planner}: mean return per game",
            ", ".join(f"{g} {_fmt(v, 1)}" for g, v in e.get("returns", {}).items()))
        add("evaluate", f"{planner}: decisions/s per game",
            ", ".join(f"{g} {v}" for g, v in e.get("decisions_per_s", {}).items()))
        add("evaluate", f"{planner}: IQM HNS", _fmt(e.get("iqm_hns")))
    f = summary.get("finetune", {})
    add("finetune", f"{f.get('game')} (task {f.get('task_id')}), {f.get('steps')} steps: eval mean returns",
        ", ".join(_fmt(x, 1) for x in f.get("eval_means", [])) + f"  (best {_fmt(f.get('best_mean_return'), 1)})")
    for name, val in summary.items():
        if isinstance(val, dict) and "seconds" in val:
            add("time", name, f"{val['seconds']} s")
    add("time", "total", f"{summary.get('total_seconds')} s")
    add("pictures", "", ", ".join(summary.get("pictures", [])))
    return rows


def render_summary(summary: dict[str, Any], console) -> None:
    """The summary people read: the key figures of every stage in one table."""
    from rich.table import Table

    t = Table(title="jowa demo summary")
    for col in ("stage", "figure", "value"):
        t.add_column(col)
    for row in summary_rows(summary):
        t.add_row(*row)
    console.print(t)
