"""Dataset statistics for raw DQN-Replay roots and episode indices, built from mergeable partials.

Every source (a replay run, a subsampled run, later a built shard task) first becomes one
`PartialStats` per (game, run). Partials merge exactly: counts add, and the per-episode return and
length values are kept (one number per episode, ~25k per DQN-Replay run), so the quantiles of a merge
are exact, not LeRobot's conservative bounds. `summarize` turns partials into the report:
per game, per run and overall, with LeRobot `stats.json` keys (count, mean, std, min, max, q01..q99).

Conventions: return/length distributions cover *complete* episodes only (an episode cut by the end of
the data has a meaningless return); transitions and the action/reward histograms cover every stored
transition. `std` is the population std (ddof=0, as LeRobot); quantiles are numpy's default linear
interpolation. Rewards are binned by sign, which for clipped Atari rewards is exactly {-1, 0, 1}.
An episode "hits the step cap" when its length >= step_cap (Dopamine: 27000 agent steps = 108k frames).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from jowa_common.actions import FULL_ACTIONS, NUM_FULL_ACTIONS, action_ids
from jowa_common.errors import DatasetError

QUANTILES = (0.01, 0.10, 0.25, 0.50, 0.75, 0.90, 0.99)
DEFAULT_STEP_CAP = 27_000  # Dopamine max_steps_per_episode (agent steps), batch_rl dqn.gin
REWARD_BINS = ("-1", "0", "1")


@dataclass
class PartialStats:
    """Mergeable statistics of one (game, run); `game`/`run` become None once merged across them."""

    game: str | None = None
    run: int | None = None
    action_names: tuple[str, ...] | None = None  # minimal action set; None after merging games
    lengths: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # complete episodes' lengths
    returns: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float64))  # their clipped returns
    incomplete_episodes: int = 0  # episodes without a terminal (cut at the end of the data)
    transitions: int = 0  # every stored transition, incomplete episodes included
    action_counts: np.ndarray | None = None  # (n_minimal,) int64; None after merging games
    full_action_counts: np.ndarray = field(default_factory=lambda: np.zeros(NUM_FULL_ACTIONS, np.int64))  # (18,)
    reward_counts: np.ndarray = field(default_factory=lambda: np.zeros(3, np.int64))  # (#<0, #==0, #>0)
    bytes: dict[str, int] = field(default_factory=dict)  # e.g. {"replay": n} or {"source": n, "index": n}
    dropped_rows: int = 0  # real rows the reader dropped: fragments whose episode start is not in the data
    gaps: int = 0  # discontinuities (missing/unlogged checkpoints) where episodes were cut

    @property
    def episodes(self) -> int:
        return len(self.lengths)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form (e.g. a build task's done-record); inverse of `from_dict`."""
        d = dataclasses.asdict(self)
        for k in ("lengths", "returns", "action_counts", "full_action_counts", "reward_counts"):
            d[k] = None if d[k] is None else np.asarray(d[k]).tolist()
        d["action_names"] = None if self.action_names is None else list(self.action_names)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PartialStats":
        return cls(game=d["game"], run=d["run"],
                   action_names=None if d["action_names"] is None else tuple(d["action_names"]),
                   lengths=np.asarray(d["lengths"], np.int64), returns=np.asarray(d["returns"], np.float64),
                   incomplete_episodes=int(d["incomplete_episodes"]), transitions=int(d["transitions"]),
                   action_counts=None if d["action_counts"] is None else np.asarray(d["action_counts"], np.int64),
                   full_action_counts=np.asarray(d["full_action_counts"], np.int64),
                   reward_counts=np.asarray(d["reward_counts"], np.int64), bytes=dict(d["bytes"]),
                   dropped_rows=int(d.get("dropped_rows", 0)), gaps=int(d.get("gaps", 0)))


def partial_from_counts(game: str, run: int, action_names: Sequence[str], lengths: Iterable[int],
                        returns: Iterable[float], complete: Iterable[bool], action_counts: np.ndarray,
                        reward_counts: Sequence[int], nbytes: dict[str, int] | None = None) -> PartialStats:
    """A partial from per-episode lengths/returns/complete flags and summed histograms."""
    lengths = np.asarray(list(lengths), np.int64)
    returns = np.asarray(list(returns), np.float64)
    complete = np.asarray(list(complete), bool)
    action_counts = np.asarray(action_counts, np.int64)
    full = np.zeros(NUM_FULL_ACTIONS, np.int64)
    np.add.at(full, action_ids(action_names), action_counts)
    return PartialStats(game=game, run=run, action_names=tuple(action_names), lengths=lengths[complete],
                        returns=returns[complete], incomplete_episodes=int((~complete).sum()),
                        transitions=int(lengths.sum()), action_counts=action_counts, full_action_counts=full,
                        reward_counts=np.asarray(reward_counts, np.int64), bytes=dict(nbytes or {}))


def partial_from_episodes(game: str, run: int, action_names: Sequence[str], refs: Sequence[Any],
                          nbytes: dict[str, int] | None = None, logs: str | None = None) -> PartialStats:
    """A partial from episode references (anything with actions/rewards/length/ret/complete); `logs`: the run's
    replay_logs folder, named in errors (default GAME/RUN/replay_logs)."""
    n = len(action_names)
    counts = np.zeros(n, np.int64)
    rewards = np.zeros(3, np.int64)
    for e in refs:
        a = np.asarray(e.actions, np.int64)
        if a.size and (a.min() < 0 or a.max() >= n):
            bad = int(np.flatnonzero((a < 0) | (a >= n))[0])
            ckpt, row = (int(x) for x in getattr(e, "start", (0, 0)))
            raise DatasetError(f"{logs or f'{game}/{run}/replay_logs'}/$store$_action_ckpt.{ckpt}.gz: episode "
                               f"{e.episode} (starting at row {row} of that file) has action id {int(a[bad])} at "
                               f"its step {bad}, outside [0, {n}) (`jowa-data validate ROOT` lists all)")
        counts += np.bincount(a, minlength=n)
        r = np.asarray(e.rewards)
        rewards += ((r < 0).sum(), (r == 0).sum(), (r > 0).sum())
    return partial_from_counts(game, run, action_names, [e.length for e in refs], [e.ret for e in refs],
                               [e.complete for e in refs], counts, rewards, nbytes)


def merge(parts: Sequence[PartialStats]) -> PartialStats:
    """Exact merge: concatenates per-episode values, adds counts; keeps game/run/actions only if shared."""
    if not parts:
        return PartialStats()
    games = {p.game for p in parts}
    runs = {p.run for p in parts}
    names = {p.action_names for p in parts}
    same_game = len(games) == 1 and len(names) == 1 and None not in names
    nbytes: dict[str, int] = {}
    for p in parts:
        for k, v in p.bytes.items():
            nbytes[k] = nbytes.get(k, 0) + int(v)
    return PartialStats(
        game=parts[0].game if len(games) == 1 else None,
        run=parts[0].run if len(runs) == 1 and len(games) == 1 else None,
        action_names=parts[0].action_names if same_game else None,
        lengths=np.concatenate([p.lengths for p in parts]),
        returns=np.concatenate([p.returns for p in parts]),
        incomplete_episodes=sum(p.incomplete_episodes for p in parts),
        transitions=sum(p.transitions for p in parts),
        action_counts=np.sum([p.action_counts for p in parts], axis=0) if same_game else None,
        full_action_counts=np.sum([p.full_action_counts for p in parts], axis=0),
        reward_counts=np.sum([p.reward_counts for p in parts], axis=0),
        bytes=nbytes, dropped_rows=sum(p.dropped_rows for p in parts), gaps=sum(p.gaps for p in parts))


def distribution(values: np.ndarray) -> dict[str, float | int | None]:
    """LeRobot-style summary: count, mean, std (ddof=0), min, max, q01..q99 (linear interpolation)."""
    v = np.asarray(values, np.float64)
    out: dict[str, float | int | None] = {"count": int(v.size)}
    keys = ["mean", "std", "min", "max"] + [f"q{round(q * 100):02d}" for q in QUANTILES]
    if v.size == 0:
        out.update({k: None for k in keys})
        return out
    out.update(mean=float(v.mean()), std=float(v.std()), min=float(v.min()), max=float(v.max()))
    for q, x in zip(QUANTILES, np.quantile(v, QUANTILES)):
        out[f"q{round(q * 100):02d}"] = float(x)
    return out


def summary(p: PartialStats, step_cap: int = DEFAULT_STEP_CAP) -> dict[str, Any]:
    """The report of one partial (JSON-ready)."""
    actions: dict[str, Any] = {"full": {n: int(c) for n, c in zip(FULL_ACTIONS, p.full_action_counts)}}
    if p.action_names is not None and p.action_counts is not None:
        actions["minimal"] = {n: int(c) for n, c in zip(p.action_names, p.action_counts)}
    return {
        "episodes": p.episodes,
        "incomplete_episodes": p.incomplete_episodes,
        "transitions": p.transitions,
        "capped_episodes": int((p.lengths >= step_cap).sum()),
        "return": distribution(p.returns),
        "length": distribution(p.lengths),
        "actions": actions,
        "rewards": {b: int(c) for b, c in zip(REWARD_BINS, p.reward_counts)},
        "bytes": dict(sorted(p.bytes.items())),
        "dropped_rows": p.dropped_rows,
        "gaps": p.gaps,
    }


def summarize(parts: Sequence[PartialStats], step_cap: int = DEFAULT_STEP_CAP) -> dict[str, Any]:
    """Per game (with its runs) and overall reports of (game, run) partials."""
    games: dict[str, dict[str, Any]] = {}
    for g in sorted({p.game for p in parts}):
        gp = sorted((p for p in parts if p.game == g), key=lambda p: p.run)
        games[g] = summary(merge(gp), step_cap)
        games[g]["runs"] = {str(p.run): summary(p, step_cap) for p in gp}
    return {"step_cap": step_cap, "overall": summary(merge(list(parts)), step_cap), "games": games}


# --- sources ------------------------------------------------------------------------------------

def replay_partials(root: str | Path, registry: Any = None, progress: bool = False,
                    cache: str | None = None) -> list[PartialStats]:
    """One partial per (game, run) of a DQN-Replay root (`<root>/<Game>/<run>/replay_logs`; a local folder or an
    fsspec URL, `cache`: a local cache folder for remote files). Reads the small files only."""
    from jowa_data.manifest import load_manifests
    from jowa_data.replay import folder_sizes, inspect_run, list_checkpoints, run_logs
    from jowa_data.roots import open_root

    root = open_root(root, cache)
    registry = registry if registry is not None else load_manifests()
    runs = _replay_runs(root)
    if not runs:
        raise DatasetError(f"{root}: no DQN-Replay runs found (expected <root>/<Game>/<run>/replay_logs/)")
    parts = []
    it = runs
    if progress:
        from tqdm import tqdm

        it = tqdm(runs, desc="scan runs", unit="run", leave=False)
    for game, run in it:
        m = registry.get(game)
        logs = run_logs(root, game, run)
        nbytes = sum(folder_sizes(logs).values())
        if not list_checkpoints(root, game, run):
            parts.append(partial_from_episodes(m.name, run, m.actions, [], {"replay": nbytes}))
            continue
        scan = inspect_run(root, game, run, allow_gaps=True)
        p = partial_from_episodes(m.name, run, m.actions, scan.episodes, {"replay": nbytes}, logs=str(logs))
        p.dropped_rows, p.gaps = scan.dropped_rows, len(scan.gaps)
        parts.append(p)
    return parts


def _replay_runs(root: Any) -> list[tuple[str, int]]:
    from jowa_data.replay import list_games, list_runs, root_folder

    if not root_folder(root).is_dir():
        return []
    out = []
    for g in list_games(root):
        out.extend((g, int(r)) for r in list_runs(root, g) if r.isdigit())
    return sorted(out)


def index_partials(path: str | Path) -> tuple[list[PartialStats], dict[str, Any]]:
    """(one partial per (game, run), the index metadata) of an episode index, from the index alone."""
    from jowa_data.subsample import index_metadata, read_index

    path = Path(path)
    table = read_index(path)
    meta = index_metadata(table, str(path))
    cols = table.to_pydict()
    rows: dict[tuple[str, int], list[int]] = {}
    for i, (g, r) in enumerate(zip(cols["game"], cols["run"])):
        rows.setdefault((g, r), []).append(i)
    parts = []
    for g, rec in sorted(meta["games"].items()):
        names = rec["actions"]
        for r in sorted(set(rec.get("runs", [])) | {run for game, run in rows if game == g}):
            idx = rows.get((g, r), [])
            counts = np.zeros(len(names), np.int64)
            rewards = np.zeros(3, np.int64)
            for i in idx:
                if len(cols["action_counts"][i]) != len(names):
                    raise DatasetError(f"{path}: row {i} ({g}/{r}) has {len(cols['action_counts'][i])} action "
                                       f"counts for a game with {len(names)} actions")
                counts += np.asarray(cols["action_counts"][i], np.int64)
                rewards += (cols["reward_neg"][i], cols["reward_zero"][i], cols["reward_pos"][i])
            parts.append(partial_from_counts(
                g, r, names, [cols["length"][i] for i in idx], [cols["ret"][i] for i in idx],
                [cols["complete"][i] for i in idx], counts, rewards,
                {"source": int(rec.get("source_bytes", {}).get(str(r), 0))}))
    unknown = set(rows) - {(p.game, p.run) for p in parts}
    if unknown:
        raise DatasetError(f"{path}: rows for (game, run) {sorted(unknown)} not described in the metadata")
    return parts, meta


def path_kind(path: str | Path) -> str:
    """'dataset' for a built token dataset, 'index' for an episode index (a file, or a folder holding
    episodes.parquet), 'replay' for any other folder (a DQN-Replay root)."""
    from jowa_data.layout import is_built_dataset
    from jowa_data.roots import is_url

    if is_url(path):  # a URL is read as a replay root (indexes and datasets are local files)
        return "replay"
    path = Path(path)
    if is_built_dataset(path):
        return "dataset"
    if path.is_file():
        return "index"
    if (path / "episodes.parquet").is_file():
        return "index"
    if path.is_dir():
        return "replay"
    raise DatasetError(f"{path}: no such file or folder")


def replay_stats(path: str | Path, registry: Any = None, step_cap: int = DEFAULT_STEP_CAP,
                 progress: bool = False, cache: str | None = None) -> dict[str, Any]:
    """Stats of a DQN-Replay root (a local folder or an fsspec URL), an episode index or a built dataset: {kind,
    path, step_cap, overall, games{.., runs}}; a built dataset adds `dataset` (codebook usage, storage:
    `build.dataset_stats`). `cache`: local cache folder for a remote replay root."""
    kind = path_kind(path)
    if kind == "replay":
        from jowa_data.roots import open_root

        root = open_root(path, cache)
        return {"kind": kind, "path": str(root) if root.fs is not None else str(Path(path)),
                **summarize(replay_partials(root, registry, progress), step_cap)}
    path = Path(path)
    if kind in ("index", "dataset"):
        file = path if path.is_file() else path / "episodes.parquet"
        parts, meta = index_partials(file)
        report = summarize(parts, step_cap)
        report["overall"]["bytes"]["index"] = file.stat().st_size
        for g, rec in meta["games"].items():
            if g in report["games"]:
                report["games"][g]["selection"] = {k: v for k, v in rec.items() if k not in ("actions",)}
    if kind == "dataset":
        from jowa_data import build

        if hasattr(build, "dataset_stats"):  # the token-dataset part (codebook usage, storage)
            report["dataset"] = build.dataset_stats(path)
    return {"kind": kind, "path": str(path), **report}
