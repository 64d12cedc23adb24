"""Charts people read, drawn with matplotlib (Agg, no display): training curves and the learn report.

Every chart has labelled axes with units, a legend, and is written atomically (a killed run never leaves a
half-written PNG). Frame grids (reconstructions, imagined rollouts) stay in `pipelines.viz`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

from jowa_common.io import atomic_path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    _pyplot().close(fig)
    return path


CURVES = (  # (metric keys, panel title, y label)
    (("train/loss_obs", "train/loss_reward", "train/loss_end"), "world losses", "cross-entropy (nats)"),
    (("train/loss_td", "train/loss_cql"), "action losses (stage 2)", "loss"),
    (("train/token_acc", "eval/token_acc", "eval/token_acc_copy"), "next-token accuracy", "accuracy"),
    (("train/q_data",), "mean Q at the data's actions", "expected return"),
)


def training_curves(rows: Sequence[dict[str, Any]], path: str | Path, stage1_steps: int | None = None,
                    title: str = "pretraining") -> Path:
    """Four panels of metrics.jsonl rows against the step, with the stage-1 / stage-2 boundary marked."""
    plt = _pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    for ax, (keys, name, ylabel) in zip(axes.flat, CURVES):
        drawn = False
        for k in keys:
            pts = [(r["step"], r[k]) for r in rows if isinstance(r.get(k), (int, float)) and math.isfinite(r[k])]
            if pts:
                ax.plot(*zip(*pts), label=k.split("/", 1)[-1], marker="." if len(pts) < 30 else None)
                drawn = True
        if stage1_steps:
            ax.axvline(stage1_steps, color="grey", linestyle="--", linewidth=1, label="stage 1 | stage 2")
        ax.set_title(name)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if drawn or stage1_steps:
            ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


PLAYERS = (("random", "random\nplay", "#9e9e9e"), ("data", "data\n(behaviour)", "#f0a030"),
           ("greedy", "agent\ngreedy", "#4c72b0"), ("beam", "agent\nbeam", "#2a9d5c"))


def learn_chart(report: dict[str, Any], path: str | Path) -> Path:
    """One panel per game: mean clipped return of random play, the data, greedy and beam, with 95% CI whiskers."""
    plt = _pyplot()
    games = report["games"]
    fig, axes = plt.subplots(1, len(games), figsize=(3.6 * len(games) + 0.5, 4.2), squeeze=False)
    cap = report["config"]["max_frames"]
    for ax, (g, row) in zip(axes[0], games.items()):
        kinds = [p for p in PLAYERS if p[0] in row]
        means = [row[k]["mean"] for k, _, _ in kinds]
        err = [[max(m - row[k]["ci"][0], 0) for (k, _, _), m in zip(kinds, means)],
               [max(row[k]["ci"][1] - m, 0) for (k, _, _), m in zip(kinds, means)]]
        bars = ax.bar(range(len(kinds)), means, yerr=err, capsize=4, color=[c for _, _, c in kinds])
        ax.bar_label(bars, labels=[f"{m:.1f}" for m in means], fontsize=8, padding=2)
        ax.set_xticks(range(len(kinds)), [label for _, label, _ in kinds], fontsize=8)
        ax.set_title(g)
        ax.set_ylabel("episode return (clipped rewards)")
        ax.grid(axis="y", alpha=0.3)
    sticky = report["config"].get("eval_sticky", 0.0)
    actions = f"sticky actions {sticky:g}" if sticky else "without sticky actions"
    fig.suptitle(f"jowa bench learn: mean return per episode, 95% bootstrap CI; evaluation {actions}, "
                 f"epsilon 0.001, <= {cap:,} frames", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def comparison_chart(cmp: dict[str, Any], path: str | Path, clipped: bool = False) -> Path:
    """`jowa scores` with several runs: one panel per game, one bar per run (mean return, CI whiskers)."""
    plt = _pyplot()
    games = cmp["games"]
    fig, axes = plt.subplots(1, len(games), figsize=(3.2 * len(games) + 0.5, 4.0), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (g, row) in zip(axes[0], games.items()):
        labels = [lab for lab in cmp["runs"] if lab in row]
        means = [row[lab]["mean"] for lab in labels]
        err = [[max(m - row[lab]["ci"][0], 0) for lab, m in zip(labels, means)],
               [max(row[lab]["ci"][1] - m, 0) for lab, m in zip(labels, means)]]
        bars = ax.bar(range(len(labels)), means, yerr=err, capsize=4,
                      color=[colors[cmp["runs"].index(lab) % len(colors)] for lab in labels])
        ax.bar_label(bars, labels=[f"{m:.1f}" for m in means], fontsize=8, padding=2)
        ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=8)
        ax.set_title(g)
        ax.set_ylabel(f"episode return ({'clipped rewards' if clipped else 'game score'})")
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"mean return per episode, {cmp['bootstrap']['ci']:.0%} bootstrap CI", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def scores_chart(report: dict[str, Any], path: str | Path) -> Path:
    """`jowa scores`: per-game normalised score (HNS or DNS) as horizontal bars with CI whiskers, the random (0)
    and reference (1) lines, and the IQM / median in the title. The axis is clipped at [-1, 5] so one huge score
    (Atlantis HNS ~175) does not flatten the rest; clipped bars keep their value as a label."""
    plt = _pyplot()
    games = sorted(report["games"], key=lambda g: report["games"][g]["normalized"])
    vals = [report["games"][g]["normalized"] for g in games]
    cis = [report["games"][g]["normalized_ci"] or [v, v] for g, v in zip(games, vals)]
    lo = max(-1.0, min(0.0, *(c[0] for c in cis)))
    hi = min(5.0, max(1.0, *(c[1] for c in cis)))
    clip = [min(max(v, lo), hi) for v in vals]
    fig, ax = plt.subplots(figsize=(7.5, 0.32 * len(games) + 1.4))
    err = [[max(c - min(max(ci[0], lo), hi), 0) for c, ci in zip(clip, cis)],
           [max(min(max(ci[1], lo), hi) - c, 0) for c, ci in zip(clip, cis)]]
    bars = ax.barh(games, clip, xerr=err, capsize=3, color="#4c72b0")
    ax.bar_label(bars, labels=[f"{v:.2f}" + (" >" if v > hi else " <" if v < lo else "") for v in vals],
                 fontsize=8, padding=3)
    ax.axvline(0.0, color="grey", linewidth=1, label="random (0)")
    ax.axvline(1.0, color="#c0392b", linewidth=1, label=f"{report['ref']} (1)")
    ax.set_xlim(lo - 0.05 * (hi - lo), hi + 0.15 * (hi - lo))
    m = report["metric"]
    ax.set_xlabel(f"{m} (normalised score)")
    ax.set_title(f"{m} per game: IQM {report['aggregate']['iqm']['value']:.3f}, "
                 f"median {report['aggregate']['median']['value']:.3f}", fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)
