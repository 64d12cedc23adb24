"""A <= 15-minute CPU pretraining run of the `tiny` world-action model on real shards.

    .venv/bin/python scripts/pretrain_cpu.py --out runs/pretrain_cpu [--minutes 15] [--tokenizer PATH]

Stages (each skipped when its output is complete, so a rerun resumes):
  record     real ALE play (random policy) of two pretraining games: run 1 trains, run 2 is held out
  index      episode index of run 1 (tokenizer training frames)
  tokenizer  a `tiny` VQ tokenizer trained on run 1 (or `--tokenizer` reuses one)
  build      token shards: `dataset/` from run 1, `heldout/` from run 2
  pretrain   `tiny` stage 1 + stage 2, sized to what is left of the time budget
  report     held-out next-token accuracy vs the unigram baseline, reward-sign accuracy vs the majority
             baseline and the class-balanced reward accuracy vs guessing, tokens/s, parameter counts

Why FishingDerby by default: the data is random play (no trained agent can be downloaded here), and under
random play the reward of the paper's games can hardly be told from the frames at this scale. A small CNN on
three full-resolution frames + the action, trained on 15k random-play steps (scripts/reward_predictability.py),
predicts the held-out reward sign no better than "always 0" in SpaceInvaders, MsPacman and Carnival and barely
better in Centipede (0.919 vs 0.905), while in FishingDerby (not a paper game; the opponent landing a fish, ~5%
of steps, is visible on screen) it reaches 0.986 vs 0.944. A world model can only show reward prediction where
the reward is predictable; `--games SpaceInvaders,Centipede` runs paper games.

The budget covers the whole script. Pretraining gets what the data stages leave (minus a reserve for the
final held-out evaluation); its length is measured, not guessed: a short calibration run gives the step time
under the current machine load, and stage 2 is shortened if the machine slows down during the run.
Outputs: OUT/summary.json (everything in the table) and OUT/pretrain/{metrics.jsonl, ckpt/, tb/}.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from jowa_common.config import apply_overrides
from jowa_common.errors import JowaError
from jowa_common.io import atomic_write_json

EVAL_RESERVE_S = 45.0  # seconds kept back for the final held-out evaluation, checkpoint and report
SAFETY = 0.85  # fraction of the measured step budget actually planned (machine load varies)
STAGE1_SHARE = 0.4  # stage 1's share of the planned steps: it cannot be shortened later, stage 2 can


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", required=True, help="work folder (created; rerun to resume)")
    p.add_argument("--minutes", type=float, default=15.0, help="wall-clock budget in minutes (default 15)")
    p.add_argument("--budget-scope", choices=("all", "pretrain"), default="all",
                   help="what --minutes covers: the whole script (default) or only the pretraining stage")
    p.add_argument("--games", default="FishingDerby",
                   help="comma-separated games (default FishingDerby: see the module docstring for why)")
    p.add_argument("--policy", default="random", help="behaviour policy of the recording (jowa-data record)")
    p.add_argument("--record-steps", type=int, default=12000, help="agent steps of run 1 per game (training)")
    p.add_argument("--heldout-steps", type=int, default=3000, help="agent steps of run 2 per game (held out)")
    p.add_argument("--max-episode-steps", type=int, default=2000, help="step cap per recorded episode")
    p.add_argument("--tokenizer", default="", help="reuse this tokenizer.pt instead of training one")
    p.add_argument("--tokenizer-steps", type=int, default=120, help="tiny tokenizer training steps")
    p.add_argument("--restart-every", type=int, default=10,
                   help="dead-code restart period of the tokenizer (0: off); without it a short run keeps ~4 codes")
    p.add_argument("--tokenizer-frames", type=int, default=4000, help="frames the tokenizer trains on (0: all)")
    p.add_argument("--batch-size", type=int, default=0, help="segments per step (0: the tiny preset's)")
    p.add_argument("--chunk", type=int, default=50, help="steps between budget checks (each one resumes)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON instead of a table")
    return p.parse_args(argv)


class Clock:
    """Wall time since the script started and what is left of the budget."""

    def __init__(self, minutes: float):
        self.t0, self.budget = time.perf_counter(), minutes * 60.0

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def left(self) -> float:
        return self.budget - self.elapsed()


# --------------------------------------------------------------------------------------------- data stages


def record_stage(a: argparse.Namespace, out: Path, games) -> dict[str, Any]:
    from jowa_data.record import record

    res = {}
    todo = [(m, "1", a.record_steps) for m in games] + [(m, "2", a.heldout_steps) for m in games]
    for i, (m, run, steps) in enumerate(todo):
        done = out / "replay" / m.name / run / ".complete"
        if not done.exists():
            shutil.rmtree(out / "replay" / m.name / run, ignore_errors=True)
            r = record(m, out / "replay", run, steps, policy=a.policy, seed=a.seed + i, capacity=2000,
                       max_episode_steps=a.max_episode_steps, keep_frames=False, progress=True, compresslevel=1)
            done.write_text(json.dumps({"steps": steps, "positive_rewards": int((r.rewards > 0).sum()),
                                        "negative_rewards": int((r.rewards < 0).sum())}))
        res[f"{m.name}/{run}"] = json.loads(done.read_text())
    return res


def selection(run: int, seed: int):
    from jowa_data.subsample import SubsampleOptions

    return SubsampleOptions(runs=(run,), checkpoints=(0, 10_000), fraction=1.0, include_incomplete=True, seed=seed)


def tokenizer_stage(a: argparse.Namespace, out: Path, games) -> dict[str, Any]:
    if a.tokenizer:
        if not Path(a.tokenizer).is_file():
            raise JowaError(f"{a.tokenizer}: --tokenizer file not found")
        return {"path": str(Path(a.tokenizer).resolve()), "trained": False}
    from jowa_data.subsample import build_index, write_index
    from pipelines.train_tokenizer import train_preset as tok_preset, train_tokenizer

    index = out / "index_run1.parquet"
    if not index.exists():
        write_index(build_index(games, out / "replay", options=selection(1, a.seed)), index)
    run = out / "tokenizer"
    if not (run / "tokenizer.pt").exists() or not (run / "done.json").exists():
        over = {"steps": a.tokenizer_steps, "seed": a.seed, "image_every": 0, "ckpt_every": 20,
                "max_frames": a.tokenizer_frames}
        if a.restart_every:
            over |= {"dead_code_restart": True, "dead_code_window": a.restart_every, "restart_every": a.restart_every}
        tcfg = apply_overrides(tok_preset("tiny"), over)
        res = train_tokenizer(tcfg, run, index=index, replay_root=out / "replay",
                              resume=(run / "checkpoint.pt").exists(), progress=True)
        first, last = res.get("first") or {}, res.get("last") or {}
        atomic_write_json(run / "done.json", {
            "steps": res.get("step"), "recon_l1_first": first.get("l1"), "recon_l1_last": last.get("l1"),
            "perplexity_last": last.get("perplexity"), "usage_last": last.get("usage")})
    return {"path": str(run / "tokenizer.pt"), "trained": True, **json.loads((run / "done.json").read_text())}


def build_stage(a: argparse.Namespace, out: Path, games, tokenizer: str) -> dict[str, Any]:
    from jowa_data.build import BuildConfig, build_dataset, dataset_stats

    res = {}
    for name, run in (("dataset", 1), ("heldout", 2)):
        build_dataset(games, out / "replay", tokenizer, out / name,
                      BuildConfig(formats=("zarr",), selection=selection(run, a.seed), workers=1, progress=True))
        st = dataset_stats(out / name)
        res[name] = {"transitions": st["total_transitions"], "episodes": st["total_episodes"],
                     "unique_tokens": {g: v["unique_tokens"] for g, v in st["games"].items()}}
    return res


# --------------------------------------------------------------------------------------------- pretraining


def pretrain_config(a: argparse.Namespace, out: Path, stage1: int, stage2: int, tokenizer: str):
    from pipelines.pretrain import train_preset

    over: dict[str, Any] = {"data": {"dataset": str(out / "dataset"), "eval_dataset": str(out / "heldout"),
                                     "eval_batches": 10_000},  # the whole held-out set
                            "stage1_steps": stage1, "stage2_steps": stage2, "seed": a.seed, "device": "cpu",
                            "eval_every": 0, "ckpt_every": a.chunk, "log_every": 10, "keep_ckpts": 2,
                            "tokenizer": tokenizer}
    if a.batch_size:
        over["data"]["batch_size"] = a.batch_size
    return apply_overrides(train_preset("tiny"), over)


def calibrate(a: argparse.Namespace, out: Path, steps: int = 16) -> float:
    """Seconds per optimizer step under the current load: the median step time over steps 5..`steps` of a
    throwaway run in stage 2 (the dearer stage: the Q head trains too), so setup costs do not count."""
    from pipelines.pretrain import pretrain

    scratch = out / "_calibrate"
    shutil.rmtree(scratch, ignore_errors=True)
    cfg = apply_overrides(pretrain_config(a, out, 1, steps - 1, ""), {"data": {"eval_dataset": ""},
                                                                      "ckpt_every": 10**9, "log_every": 1})
    times: dict[int, float] = {}
    pretrain(cfg, scratch, on_step=lambda s, row: times.__setitem__(s, time.perf_counter()))
    shutil.rmtree(scratch, ignore_errors=True)
    gaps = sorted(times[i + 1] - times[i] for i in range(4, steps))
    return gaps[len(gaps) // 2]  # the median: one load spike on the shared machine must not size the whole run


def fit_steps(seconds: float, sec_per_step: float, chunk: int) -> int:
    """Whole chunks of steps that fit in `seconds`."""
    return max(int(SAFETY * seconds / max(sec_per_step, 1e-6)) // chunk, 0) * chunk


def pretrain_stage(a: argparse.Namespace, out: Path, tokenizer: str, clock: Clock, console: Console) -> dict[str, Any]:
    """Train in chunks of `--chunk` steps, each a resume of the same run with a held-out evaluation at its end.

    Stage 1's length is fixed up front from a calibration (it is part of the run's identity), so it gets only
    STAGE1_SHARE of the planned steps; stage 2's is re-fitted after every chunk to the time that is left, using
    the measured wall time per step (chunk overheads included), so a machine that slows down or speeds up still
    ends the run on budget.
    """
    from pipelines.pretrain import pretrain
    from pipelines.train_core import RunFiles

    plan_path = out / "pretrain_plan.json"
    if plan_path.exists():  # resuming: keep the stage split
        plan = json.loads(plan_path.read_text())
    else:
        sec = calibrate(a, out)
        avail = max(clock.left() - EVAL_RESERVE_S, 0.0)
        total = fit_steps(avail, sec, a.chunk)
        stage1 = max(int(STAGE1_SHARE * total) // a.chunk * a.chunk, a.chunk)
        plan = {"sec_per_step_calibrated": round(sec, 4), "budget_s": round(avail), "stage1": stage1,
                "stage2_planned": max(total - stage1, 0)}
        atomic_write_json(plan_path, plan)
    console.print(f"pretraining plan: {plan['stage1']} + ~{plan['stage2_planned']} steps "
                  f"({plan['sec_per_step_calibrated']:.3f} s/step calibrated, {plan['budget_s']} s available)")
    run = RunFiles(out / "pretrain")
    stage1 = plan["stage1"]
    stage2 = plan.get("stage2_final", plan["stage2_planned"])
    step = _ckpt_step(run)
    t_start, start_step, res = time.perf_counter(), step, None
    while step < stage1 + stage2:
        target = min(step + a.chunk, stage1 + stage2)
        t_chunk = time.perf_counter()
        res = pretrain(pretrain_config(a, out, stage1, stage2, tokenizer), run.root, stop_after=target)
        last_pace = (time.perf_counter() - t_chunk) / max(target - step, 1)
        step = target
        if step >= stage1:  # re-fit stage 2 to the time left, at the measured pace (the slower of the whole
            # run's and the last chunk's: the load on a shared machine changes within minutes)
            sec = max((time.perf_counter() - t_start) / max(step - start_step, 1), last_pace)
            stage2 = step - stage1 + fit_steps(clock.left() - EVAL_RESERVE_S, sec, a.chunk)
            plan["stage2_final"] = stage2
            atomic_write_json(plan_path, plan)
        console.print(f"step {step}/{stage1 + stage2}  {clock.elapsed():.0f} s elapsed"
                      + (f"  held-out token acc {res['last'].get('eval/token_acc', float('nan')):.4f}"
                         f" reward balanced {res['last'].get('eval/reward_balanced_acc', float('nan')):.4f}"
                         if res and res.get("last") else ""))
    wall = time.perf_counter() - t_start
    rows = _metrics(run)
    tok_s = [r["perf/tokens_per_s"] for r in rows if "perf/tokens_per_s" in r]
    curve = [{k: r[k] for k in ("step", "eval/token_acc", "eval/reward_acc", "eval/reward_balanced_acc")}
             for r in rows if "eval/token_acc" in r]
    return {"steps": step, "stage1_steps": stage1, "stage2_steps": step - stage1, "wall_s": round(wall, 1),
            "sec_per_step": round(wall / (step - start_step), 4) if step > start_step else None,
            "tokens_per_s_median": round(sorted(tok_s)[len(tok_s) // 2], 1) if tok_s else None,
            "last": _last_metrics(run), "eval_curve": curve, "plan": plan}


def _ckpt_step(run) -> int:
    latest = run.latest()
    return int(latest.stem.split("_")[1]) if latest else 0


def _metrics(run) -> list[dict]:
    if not run.metrics.exists():
        return []
    return [json.loads(ln) for ln in run.metrics.read_text().splitlines() if ln.strip()]


def _last_metrics(run) -> dict:
    rows = [r for r in _metrics(run) if "eval/token_acc" in r]
    return rows[-1] if rows else {}


# --------------------------------------------------------------------------------------------- report


def parameter_counts() -> dict[str, dict[str, int]]:
    """Counts of every preset, built on the meta device (no memory, no init time)."""
    import torch

    from jowa_model.presets import PRESETS, model_preset
    from jowa_model.world_action import WorldActionModel

    res = {}
    for name in PRESETS:
        with torch.device("meta"):
            c = WorldActionModel(model_preset(name)).parameter_counts()
        res[name] = {"trainable": c["trainable"], "total": c["total"]}
    return res


def render(summary: dict[str, Any], console: Console) -> None:
    last = summary["pretrain"]["last"]
    t = Table(title=f"held-out accuracy after {summary['pretrain']['steps']} steps of `tiny` "
                    f"({', '.join(summary['games'])}; run 2 held out)")
    t.add_column("metric")
    t.add_column("model", justify="right")
    t.add_column("baseline", justify="right")
    t.add_column("baseline is")
    rows = [("next-token accuracy", "eval/token_acc", "eval/token_acc_unigram", "most frequent token (unigram)"),
            ("next-token acc, frames 2..L", "eval/token_acc_later", "eval/token_acc_copy",
             "copy the previous frame's token"),
            ("reward-sign accuracy", "eval/reward_acc", "eval/reward_acc_majority", "most frequent sign (majority)"),
            ("reward-sign balanced acc", "eval/reward_balanced_acc", "eval/reward_balanced_acc_baseline",
             "1 / classes present (any constant guess)"),
            ("termination accuracy", "eval/end_acc", None, "")]
    for label, k, b, what in rows:
        if k in last:
            t.add_row(label, f"{last[k]:.4f}", f"{last[b]:.4f}" if b and b in last else "", what)
    console.print(t)
    p = summary["pretrain"]
    console.print(f"pretraining: {p['steps']} steps ({p['stage1_steps']} + {p['stage2_steps']}), {p['wall_s']} s, "
                  f"{p['sec_per_step']} s/step, median {p['tokens_per_s_median']} tokens/s; held-out "
                  f"{summary['build']['heldout']['transitions']} steps, reward classes "
                  f"{last.get('eval/reward_class_counts')}")
    pt = Table(title="world-action model presets (parameters)")
    pt.add_column("preset")
    pt.add_column("trainable", justify="right")
    pt.add_column("total (with target Q head)", justify="right")
    for name, c in summary["parameters"].items():
        pt.add_row(name, f"{c['trainable']:,}", f"{c['total']:,}")
    console.print(pt)
    console.print(f"total wall time {summary['wall_s']} s (budget {summary['budget_s']:.0f} s for "
                  f"{summary['args']['budget_scope']}; stages {summary['stage_s']}), "
                  f"load average at start {summary['loadavg_start']}, at end {summary['loadavg_end']}")


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.threads:
        import torch

        torch.set_num_threads(a.threads)
    console = Console(stderr=True)
    clock = Clock(a.minutes)
    t_script = time.perf_counter()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {"args": vars(a), "budget_s": clock.budget, "loadavg_start": os.getloadavg()}
    try:
        from jowa_data.manifest import load_manifests

        reg = load_manifests()
        games = [reg.get(g.strip()) for g in a.games.split(",") if g.strip()]
        summary["games"] = [m.name for m in games]
        stages = [("record", lambda: record_stage(a, out, games)),
                  ("tokenizer", lambda: tokenizer_stage(a, out, games)),
                  ("build", lambda: build_stage(a, out, games, summary["tokenizer"]["path"])),
                  ("pretrain", lambda: pretrain_stage(a, out, summary["tokenizer"]["path"], clock, console))]
        summary["stage_s"] = {}
        for name, fn in stages:
            if name == "pretrain" and a.budget_scope == "pretrain":
                clock = Clock(a.minutes)  # the budget starts now (the lambda reads `clock` when called)
            console.rule(f"[bold]{name}[/]  ({clock.elapsed():.0f} s elapsed)")
            t = time.perf_counter()
            summary[name] = fn()
            summary["stage_s"][name] = round(time.perf_counter() - t, 1)
        summary["parameters"] = parameter_counts()
    except JowaError as e:
        console.print(f"[red]error:[/] {e}")
        return 1
    summary["wall_s"] = round(time.perf_counter() - t_script, 1)
    summary["loadavg_end"] = os.getloadavg()
    atomic_write_json(out / "summary.json", summary)
    if a.json:
        print(json.dumps(summary, indent=1, default=str))
    else:
        render(summary, Console())
    return 0


if __name__ == "__main__":
    sys.exit(main())
