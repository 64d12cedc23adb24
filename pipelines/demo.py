"""The main job on a small built-in default: every stage of jowa, end to end, on this machine's CPU.

It is `jowa bench learn` (pipelines.learn) at a 20-minute size, plus fine-tuning on a game the pretraining never
saw: record mixed-quality Atari data with the heuristic controllers under a decaying epsilon → train the tokenizer
→ build token shards → pretrain one tiny multi-game world-action model → evaluate greedy and beam planning on the
real emulator beside random play and the data's own return → fine-tune on a held-out game → one summary (printed
+ summary.json) and the pictures (reconstructions, imagined rollout, training curves, returns chart, game GIF).

Each stage is skipped when its output is complete, so rerunning `jowa demo` after an interruption resumes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jowa_common.config import apply_overrides, config_to_dict
from jowa_common.io import atomic_write_json
from pipelines.learn import LearnConfig, LearnPaths, print_wrapped, render_report, run_learn


def demo_learn_config() -> LearnConfig:
    """`jowa bench learn` sized for the 20-minute main job (the bench's defaults take about 35 minutes). The held-out
    recording is 2,500 steps because a Freeway game lasts about 2,040 agent steps: each game needs one complete
    held-out episode (a selection without one is an error)."""
    return LearnConfig(record_steps=12_000, heldout_steps=2_500, tokenizer_steps=1_500, stage1_steps=600,
                       stage2_steps=1_400, batch_size=16, eval_episodes=4, n_boot=1_000)


@dataclass
class DemoConfig:
    learn: LearnConfig = field(default_factory=demo_learn_config)  # data, tokenizer, pretraining, evaluation
    finetune_game: str = "Pong"  # a held-out game (paper appendix D), never seen in pretraining
    finetune_transitions: int = 2_000  # fine-tuning set size (paper: 5,000), recorded with learn.policy
    finetune_steps: int = 80  # fine-tuning steps (paper: 50,000)
    finetune_episodes: int = 2  # evaluation episodes after fine-tuning


def run_demo(out: str | Path, cfg: DemoConfig | None = None, console=None) -> dict[str, Any]:
    """Run every stage into `out`; return (and write) the summary."""
    from rich.console import Console

    cfg = cfg or DemoConfig()
    console = console or Console(stderr=True)
    t0 = time.perf_counter()
    report = run_learn(out, cfg.learn, console=console)
    console.rule("[bold]demo: fine-tune on a held-out game")
    t = time.perf_counter()
    ft = finetune_stage(cfg, LearnPaths(out))
    ft["seconds"] = round(time.perf_counter() - t, 1)
    paths = LearnPaths(out)
    summary = {"config": config_to_dict(cfg), "learn": report, "finetune": ft,
               "total_seconds": round(time.perf_counter() - t0, 1),
               "pictures": sorted(str(p.relative_to(paths.root)) for p in paths.pictures.iterdir())}
    atomic_write_json(paths.root / "summary.json", summary)
    return summary


def finetune_stage(cfg: DemoConfig, paths: LearnPaths) -> dict[str, Any]:
    """Record the held-out game with the same behaviour policy, fine-tune the pretrained model on it (its own task
    id and action mask), evaluate it beside random play under the same protocol."""
    import numpy as np

    from jowa_data.manifest import load_manifests
    from pipelines.evaluate import EvalConfig, evaluate
    from pipelines.finetune import finetune, finetune_preset
    from pipelines.learn import record_run

    learn = cfg.learn
    m = load_manifests().get(cfg.finetune_game)
    record_run(learn, paths, m, "1", cfg.finetune_transitions + learn.max_frames // 4, learn.seed * 1000 + 77)
    fcfg = apply_overrides(finetune_preset("tiny"), {
        "game": m.name, "tokenizer": str(paths.tokenizer), "steps": cfg.finetune_steps, "seed": learn.seed,
        "data": {"replay_root": str(paths.replay), "checkpoints": [0, 10_000],
                 "transitions": cfg.finetune_transitions},
        "eval": {"every": 0, "episodes": cfg.finetune_episodes, "max_frames": learn.max_frames}})
    ckpt = sorted((paths.pretrain / "ckpt").glob("step_*.pt"))[-1]
    rep = finetune(fcfg, ckpt, paths.root / "finetune")
    rand = evaluate(None, None, [m.name], EvalConfig(episodes=cfg.finetune_episodes, planner="random",
                                                     max_frames=learn.max_frames, seed=learn.seed),
                    out=paths.eval / f"random_{m.name}.json")["games"][m.name]
    last = rep["evals"][-1]
    return {"game": m.name, "task_id": m.task_id, "steps": cfg.finetune_steps,
            "transitions": cfg.finetune_transitions, "agent_clipped_mean": float(np.mean(last["clipped_returns"])),
            "agent_raw_mean": last["mean"], "random_clipped_mean": float(np.mean(rand["clipped_returns"])),
            "random_raw_mean": rand["mean"], "max_frames": learn.max_frames}


def render_summary(summary: dict[str, Any], console) -> None:
    """The learn report's tables, then fine-tuning, the stage times and the pictures (below, not in a table)."""
    render_report(summary["learn"], console)
    f = summary["finetune"]
    console.print(f"fine-tuned on {f['game']} (task {f['task_id']}, never pretrained on; {f['transitions']} "
                  f"transitions, {f['steps']} steps):")  # two lines: the summary fits 100 columns
    console.print(f"  clipped return {f['agent_clipped_mean']:.1f} vs random play {f['random_clipped_mean']:.1f} "
                  f"(<= {f['max_frames']:,} frames)")
    console.print(f"total {summary['total_seconds']:.0f} s")
    print_wrapped(console, "pictures: " + ", ".join(summary["pictures"]))
