"""Normalised Atari scores (HNS / DNS) and their aggregates (mean, median, IQM) with bootstrap CIs.

Why a module of its own: the paper's headline numbers are aggregates over per-game means, and small
differences in how they are computed (game-level vs run-level IQM, which reference scores, what to do
when a reference is below random) change them. This module computes them exactly as the paper and the
official `results/results.py` do, so `jowa scores` on the paper's returns gives the paper's tables:

- normalised score = (s - lo) / (hi - lo) with lo, hi = min/max(random, reference): the official
  `normalize()` swaps the two when a reference is below random;
- median and IQM are taken over the per-game MEAN normalised scores (game-level IQM: a 25% trimmed
  mean over games, as `scipy.stats.trim_mean(x, 0.25)`, re-implemented here in numpy);
- confidence intervals: percentile bootstrap that resamples episodes within each game (seeded).

Inputs are raw-score JSON files in three layouts (see `read_raw_scores`): ours (`jowa-raw-scores-v1`,
written by `jowa eval`), the official repository's (`{"Game": {"raw_scores": [...], ...}}`), and a plain
`{"Game": [returns...] | mean}` mapping (the paper's tables only give per-game means).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from jowa_common.errors import JowaError, ManifestError
from jowa_data.manifest import GameManifest, ManifestRegistry

RAW_FORMAT = "jowa-raw-scores-v1"  # format tag of the raw-score JSON written by `jowa eval`
REFS = {"human": "HNS", "dqn": "DNS"}  # reference name -> metric name


class RawScoresError(JowaError):
    """A raw-score JSON file is missing, malformed, or names an unknown game."""


@dataclass(frozen=True)
class GameReturns:
    """Per-episode raw (unclipped) returns of one game, with where they came from."""

    game: str  # canonical game name (manifest name)
    returns: np.ndarray  # (E,) float64, one raw return per episode
    settings: dict[str, Any] = field(default_factory=dict)  # planning settings etc., as recorded
    source: str = ""  # file the returns were read from


@dataclass
class ScoresConfig:
    ref: str = "human"  # normalise by "human" (HNS, paper Table 2) or "dqn" (DNS, paper Table 3/18)
    trim: float = 0.25  # fraction cut from each end for the IQM (paper: scipy trim_mean 0.25)
    n_boot: int = 2000  # bootstrap resamples for confidence intervals (0 = no CIs)
    ci: float = 0.95  # confidence level of the percentile intervals
    seed: int = 0  # seed of the bootstrap generator (same inputs + seed -> same CIs)


# --- statistics -----------------------------------------------------------------------------------

def trim_mean(x: np.ndarray | Sequence[float], proportion: float = 0.25, axis: int = -1) -> np.ndarray | float:
    """Mean after cutting `int(proportion * n)` values from each end along `axis` (= scipy.stats.trim_mean).

    With 15 games and 0.25 this drops the 3 lowest and 3 highest and averages the middle 9.
    """
    a = np.asarray(x, dtype=np.float64)
    if a.ndim == 0:
        raise ValueError("trim_mean needs at least one dimension")
    n = a.shape[axis]
    if n == 0:
        raise ValueError("trim_mean of an empty array")
    if not 0.0 <= proportion < 0.5:
        raise ValueError(f"proportion must be in [0, 0.5), got {proportion}")
    lo = int(proportion * n)
    s = np.sort(a, axis=axis)
    mid = np.take(s, np.arange(lo, n - lo), axis=axis)
    out = mid.mean(axis=axis)
    return float(out) if out.ndim == 0 else out


def bootstrap_ci(x: np.ndarray | Sequence[float], n_boot: int = 2000, ci: float = 0.95,
                 seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean of `x` (episodes resampled with replacement, seeded). One episode, or
    n_boot 0: the mean itself at both ends."""
    a = np.asarray(x, dtype=np.float64)
    if len(a) == 0:
        return (math.nan, math.nan)
    if len(a) == 1 or n_boot < 1:
        return (float(a.mean()), float(a.mean()))
    means = a[np.random.default_rng(seed).integers(0, len(a), size=(n_boot, len(a)))].mean(axis=1)
    lo, hi = np.percentile(means, [(1 - ci) / 2 * 100, (1 + ci) / 2 * 100])
    return float(lo), float(hi)


def sample_std(x: np.ndarray | Sequence[float]) -> float:
    """Sample standard deviation (ddof 1) of per-episode returns; 0.0 for a single episode."""
    a = np.asarray(x, dtype=np.float64)
    return float(a.std(ddof=1)) if len(a) > 1 else 0.0


def top_action(counts: dict[str, int] | None) -> list | None:
    """[name, share] of the action sent most often, from a raw-score file's `action_counts` (None without counts:
    an older file, or no decision)."""
    total = sum(counts.values()) if counts else 0
    if not total:
        return None
    name = max(counts, key=counts.get)
    return [name, counts[name] / total]


def iqm(x: np.ndarray | Sequence[float], axis: int = -1) -> np.ndarray | float:
    """Inter-quartile mean: the 25% trimmed mean."""
    return trim_mean(x, 0.25, axis=axis)


def normalize(score: np.ndarray | float, random: float, reference: float) -> np.ndarray | float:
    """(score - lo) / (hi - lo) with lo/hi the smaller/larger of (random, reference), as the official code."""
    lo, hi = min(random, reference), max(random, reference)
    if hi == lo:
        raise ValueError(f"reference score {reference} equals the random score: cannot normalise")
    out = (np.asarray(score, dtype=np.float64) - lo) / (hi - lo)
    return float(out) if out.ndim == 0 else out


def reference_pair(m: GameManifest, ref: str) -> tuple[float, float]:
    """(random, reference) raw scores of a game from its manifest; `ref` is "human" or "dqn"."""
    if ref not in REFS:
        raise ValueError(f"ref must be one of {sorted(REFS)}, got {ref!r}")
    return m.scores.random, getattr(m.scores, ref)


# --- reading raw-score files ----------------------------------------------------------------------

def _returns_array(path: Path, game: str, key: str, v: Any) -> np.ndarray:
    if isinstance(v, bool) or not (isinstance(v, (int, float)) or isinstance(v, list)):
        raise RawScoresError(f"{path}: game '{game}': '{key}' must be a list of numbers or a number, "
                             f"got {type(v).__name__}")
    vals = v if isinstance(v, list) else [v]
    if not vals:
        raise RawScoresError(f"{path}: game '{game}': '{key}' is empty (no episodes)")
    for x in vals:
        if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
            raise RawScoresError(f"{path}: game '{game}': '{key}' holds a non-finite or non-numeric value {x!r}")
    return np.asarray(vals, dtype=np.float64)


def dataset_returns(path: Path) -> dict[str, GameReturns]:
    """Clipped returns of the complete episodes of a built dataset (its episodes.parquet), per game: the data's
    own return, in DQN-Replay's clipped reward units."""
    import pyarrow.parquet as pq

    try:
        t = pq.read_table(path / "episodes.parquet", columns=["game", "ret", "complete"]).to_pydict()
    except (OSError, ValueError, KeyError) as e:
        raise RawScoresError(f"{path / 'episodes.parquet'}: not a built dataset's episode table ({e})") from e
    per: dict[str, list[float]] = {}
    for g, r, c in zip(t["game"], t["ret"], t["complete"]):
        if c:
            per.setdefault(g, []).append(float(r))
    return {g: GameReturns(g, np.asarray(v), {"planner": "data"}, str(path)) for g, v in per.items() if v}


def read_raw_scores(path: str | Path, clipped: bool = False) -> dict[str, GameReturns]:
    """Read one raw-score JSON file (any of the accepted layouts) -> {game name as written: GameReturns}.

    Layouts:
      ours     {"format": "jowa-raw-scores-v1", "checkpoint": ..., "games": {G: {"settings": {...},
               "returns": [...], "clipped_returns": [...], "lengths": [...], "decisions_per_s": ...}}}
      official {G: {"buffer_size": [int], "beam_width": int, "planning_horizon": int, "raw_scores": [...]}}
      plain    {G: [returns...]} or {G: mean} (one pseudo-episode: the paper's tables give only means)
      dataset  a folder built by `jowa-data build`: its complete episodes' returns (clipped rewards only)
    With `clipped`, ours give `clipped_returns` (sums of clip(r, -1, 1)), comparable with a dataset's returns.
    """
    path = Path(path)
    if path.is_dir() and (path / "episodes.parquet").is_file():
        if not clipped:
            raise RawScoresError(f"{path}: a built dataset holds clipped rewards only; pass --clipped to compare "
                                 "clipped returns")
        return dataset_returns(path)
    if not path.is_file():
        raise RawScoresError(f"{path}: raw-score file not found")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RawScoresError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(raw, dict) or not raw:
        raise RawScoresError(f"{path}: expected a JSON object mapping games to scores")

    out: dict[str, GameReturns] = {}
    if "format" in raw:
        if raw["format"] != RAW_FORMAT:
            raise RawScoresError(f"{path}: key 'format': unsupported raw-score format {raw['format']!r} "
                                 f"(expected {RAW_FORMAT!r})")
        games = raw.get("games")
        if not isinstance(games, dict) or not games:
            raise RawScoresError(f"{path}: key 'games': missing or empty")
        top = {k: raw[k] for k in ("checkpoint", "agent") if k in raw}
        key = "clipped_returns" if clipped else "returns"
        for g, d in games.items():
            if not isinstance(d, dict) or key not in d:
                raise RawScoresError(f"{path}: game '{g}': missing key '{key}'")
            settings = dict(d.get("settings") or {})
            settings.update(top)
            out[g] = GameReturns(g, _returns_array(path, g, key, d[key]), settings, str(path))
        return out
    if clipped:
        raise RawScoresError(f"{path}: --clipped needs jowa raw-score files or built datasets (this layout has raw "
                             "returns only)")

    for g, d in raw.items():
        if isinstance(d, dict):
            if "raw_scores" not in d:
                raise RawScoresError(f"{path}: game '{g}': missing key 'raw_scores' (official layout) "
                                     f"and no 'format' key (jowa layout)")
            settings = {k: v for k, v in d.items() if k != "raw_scores"}
            out[g] = GameReturns(g, _returns_array(path, g, "raw_scores", d["raw_scores"]), settings, str(path))
        else:
            out[g] = GameReturns(g, _returns_array(path, g, g, d), {}, str(path))
    return out


def run_label(results: dict[str, GameReturns], path: str | Path) -> str:
    """A short name for one file's results: its player (random, heuristic, data, greedy, beam H=2 K=3, ...)."""
    s = next(iter(results.values())).settings if results else {}
    planner = s.get("planner")
    if planner in ("beam", "mcts"):
        return f"{planner} H={s.get('horizon')} K={s.get('beam_width')}" if planner == "beam" else "mcts"
    return str(planner) if planner else Path(path).stem


def load_runs(paths: Iterable[str | Path], registry: ManifestRegistry,
              clipped: bool = False) -> list[tuple[str, dict[str, GameReturns]]]:
    """One (label, {canonical game: returns}) per file, for side-by-side comparison; labels made unique."""
    runs: list[tuple[str, dict[str, GameReturns]]] = []
    for p in paths:
        res = {}
        for name, gr in read_raw_scores(p, clipped).items():
            try:
                canon = registry.get(name).name
            except ManifestError as e:
                raise RawScoresError(f"{p}: game '{name}': {e}") from e
            res[canon] = GameReturns(canon, gr.returns, gr.settings, gr.source)
        label = run_label(res, p)
        if label in {lab for lab, _ in runs}:
            label = f"{label} ({Path(p).stem})"
        runs.append((label, res))
    if not runs:
        raise RawScoresError("no raw-score files given")
    return runs


def compare_runs(runs: list[tuple[str, dict[str, GameReturns]]], registry: ManifestRegistry,
                 cfg: ScoresConfig | None = None) -> dict[str, Any]:
    """Several runs of the same games side by side: per game and run, episodes, mean, sample std, bootstrap CI of
    the mean and the normalised mean (when the reference allows it)."""
    cfg = cfg or ScoresConfig()
    games = sorted({g for _, res in runs for g in res})
    table: dict[str, dict[str, Any]] = {}
    for gi, g in enumerate(games):
        r, ref = reference_pair(registry.get(g), cfg.ref)
        row = {}
        for label, res in runs:
            if g not in res:
                continue
            x = res[g].returns
            row[label] = {"episodes": int(len(x)), "mean": float(x.mean()), "std": sample_std(x),
                          "ci": list(bootstrap_ci(x, cfg.n_boot, cfg.ci, cfg.seed + gi)),
                          "normalized": normalize(float(x.mean()), r, ref) if r != ref else None,
                          "source": res[g].source}
        table[g] = row
    return {"ref": cfg.ref, "metric": REFS[cfg.ref], "runs": [label for label, _ in runs], "games": table,
            "bootstrap": {"n_boot": cfg.n_boot, "ci": cfg.ci, "seed": cfg.seed}}


def comparison_table(cmp: dict[str, Any], clipped: bool = False):
    """A rich table: one row per game, one column per run (mean and CI of the episode returns)."""
    from rich.table import Table

    unit = "clipped" if clipped else "raw"
    t = Table(title=f"mean {unit} return per episode, {cmp['bootstrap']['ci']:.0%} CI, side by side")
    t.add_column("game")
    for label in cmp["runs"]:
        t.add_column(label, justify="right")
    for g, row in cmp["games"].items():
        cells = []
        for label in cmp["runs"]:
            d = row.get(label)
            cells.append("-" if d is None else f"{d['mean']:.1f} ({d['ci'][0]:.1f}-{d['ci'][1]:.1f}) n={d['episodes']}")
        t.add_row(g, *cells)
    return t


def load_raw_scores(paths: Iterable[str | Path], registry: ManifestRegistry,
                    pool: bool = False) -> dict[str, GameReturns]:
    """Read several files, map game names to manifests; a game in two files is an error unless `pool`
    (`jowa scores` shows such files side by side instead: `load_runs` / `compare_runs`)."""
    out: dict[str, GameReturns] = {}
    for p in paths:
        for name, gr in read_raw_scores(p).items():
            try:
                canon = registry.get(name).name
            except ManifestError as e:
                raise RawScoresError(f"{p}: game '{name}': {e}") from e
            if canon in out:
                if not pool:
                    raise RawScoresError(f"{p}: game '{canon}' is also in {out[canon].source}; "
                                         f"pass --pool to pool their episodes")
                prev = out[canon]
                gr = GameReturns(canon, np.concatenate([prev.returns, gr.returns]), prev.settings,
                                 f"{prev.source},{p}")
            out[canon] = GameReturns(canon, gr.returns, gr.settings, gr.source)
    if not out:
        raise RawScoresError("no raw-score files given")
    return out


# --- the report -----------------------------------------------------------------------------------

def _aggregates(ns: np.ndarray, trim: float) -> dict[str, np.ndarray]:
    """Aggregates over the last axis (games) of normalised per-game means."""
    return {"mean": ns.mean(axis=-1), "median": np.median(ns, axis=-1), "iqm": trim_mean(ns, trim, axis=-1)}


def compute_scores(results: dict[str, GameReturns], registry: ManifestRegistry,
                   cfg: ScoresConfig | None = None) -> dict[str, Any]:
    """Per-game mean and normalised score, aggregates, bootstrap CIs -> a JSON-friendly report."""
    cfg = cfg or ScoresConfig()
    if cfg.ref not in REFS:
        raise RawScoresError(f"--ref must be one of {sorted(REFS)}, got {cfg.ref!r}")
    if not 0.0 < cfg.ci < 1.0:
        raise RawScoresError(f"--ci must be in (0, 1), got {cfg.ci}")
    names = sorted(results)
    pairs = [reference_pair(registry.get(g), cfg.ref) for g in names]
    means = np.array([results[g].returns.mean() for g in names])
    ns = np.array([normalize(float(m), r, ref) for m, (r, ref) in zip(means, pairs)])
    agg = _aggregates(ns, cfg.trim)

    # Percentile bootstrap: resample episodes within each game, recompute every per-game mean and aggregate.
    boot_games = boot_agg = None
    if cfg.n_boot > 0:
        rng = np.random.default_rng(cfg.seed)
        cols = []
        for g, (r, ref) in zip(names, pairs):
            x = results[g].returns
            idx = rng.integers(0, len(x), size=(cfg.n_boot, len(x)))
            cols.append(normalize(x[idx].mean(axis=1), r, ref))
        boot_ns = np.stack(cols, axis=1)  # (n_boot, games)
        q = [(1 - cfg.ci) / 2 * 100, (1 + cfg.ci) / 2 * 100]
        boot_games = np.percentile(boot_ns, q, axis=0).T  # (games, 2)
        boot_agg = {k: np.percentile(v, q) for k, v in _aggregates(boot_ns, cfg.trim).items()}

    games = {}
    for i, g in enumerate(names):
        x = results[g].returns
        r, ref = pairs[i]
        games[g] = {
            "mean": float(means[i]), "std": sample_std(x), "median": float(np.median(x)),
            "episodes": int(len(x)), "random": r, "reference": ref, "normalized": float(ns[i]),
            "normalized_ci": None if boot_games is None else [float(v) for v in boot_games[i]],
            "above_reference": bool(means[i] > ref), "settings": results[g].settings, "source": results[g].source,
        }
    aggregate = {k: {"value": float(v), "ci": None if boot_agg is None else [float(c) for c in boot_agg[k]]}
                 for k, v in agg.items()}
    aggregate["above_reference"] = {"value": int(sum(d["above_reference"] for d in games.values())), "ci": None}
    return {"ref": cfg.ref, "metric": REFS[cfg.ref], "num_games": len(names), "games": games,
            "aggregate": aggregate,
            "bootstrap": {"n_boot": cfg.n_boot, "ci": cfg.ci, "seed": cfg.seed, "trim": cfg.trim,
                          "method": "percentile; episodes resampled within each game"}}


def scores_table(report: dict[str, Any]):
    """A rich table of the report (per game, then the aggregates)."""
    from rich.table import Table

    metric = report["metric"]
    t = Table(title=f"{metric} over {report['num_games']} games (reference: {report['ref']})")
    for col in ("game", "episodes", "mean return", "random", report["ref"], metric, f"{metric} CI"):
        t.add_column(col, justify="left" if col == "game" else "right")

    def ci(c):
        return "" if c is None else f"[{c[0]:.3f}, {c[1]:.3f}]"

    for g, d in report["games"].items():
        t.add_row(g, str(d["episodes"]), f"{d['mean']:.1f}", f"{d['random']:g}", f"{d['reference']:g}",
                  f"{d['normalized']:.3f}", ci(d["normalized_ci"]))
    t.add_section()
    for k in ("mean", "median", "iqm"):
        a = report["aggregate"][k]
        t.add_row(f"{k.upper() if k == 'iqm' else k.capitalize()} {metric}", "", "", "", "",
                  f"{a['value']:.3f}", ci(a["ci"]))
    t.add_row(f"# above {report['ref']}", "", "", "", "", str(report["aggregate"]["above_reference"]["value"]), "")
    return t
