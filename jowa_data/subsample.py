"""Seeded subsampling of DQN-Replay into an episode index (`episodes.parquet`).

Paper sec. 5.1 trains on "2 of 5 runs, a uniform 10% of the transitions" per game. The official
`downsample.py` draws episode ids *with* replacement and silently uses each file's leading fragment
as an episode (docs/official_code.md §4). We instead, per game:

1. take the candidate runs of the manifest (or `--runs`) that exist on disk and draw `num_runs` of them;
2. list the episodes that *start* in the checkpoint range [first, last] (complete ones only, unless
   asked), scanning one neighbour checkpoint on each side so that episodes cut by a file boundary are
   stitched, not mistaken for fragments;
3. draw episodes without replacement, in a seeded random order, until the selected transitions reach
   the target (`ceil(fraction * pool transitions)`, or `transitions` when > 0).

Seed rule (documented, and tested): each game has its own generator,
`np.random.SeedSequence([seed, task_id]).spawn(2) -> (runs, episodes)`. A game's selection therefore
depends only on its own manifest, seed and files: adding a game never changes another's.

The index has one row per selected episode, sorted by (game, run, episode), with the source location
and small per-episode stats (action counts, reward signs) so `jowa-data stats` works from the index
alone. Selection, seeds, manifest checksums and the jowa version live in the Parquet schema metadata
under the key `jowa`. No timestamps: the same inputs give a byte-identical file.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from jowa_common.errors import ConfigError, DatasetError
from jowa_common.io import atomic_path, sha256_bytes, sha256_file
from jowa_data.manifest import DataSelection, GameManifest, manifest_to_dict
from jowa_data.roots import Root, open_root, root_url

INDEX_FORMAT = "jowa-episode-index"
INDEX_VERSION = 1
METADATA_KEY = b"jowa"
SEED_RULE = "per game: numpy SeedSequence([seed, task_id]).spawn(2) -> (runs, episodes)"

_CKPT_RE = re.compile(r"_ckpt\.(\d+)\.gz$")

INDEX_SCHEMA = pa.schema([
    ("game", pa.string()),
    ("task_id", pa.int32()),
    ("run", pa.int32()),
    ("episode", pa.int64()),  # index among the run's episodes starting in the range; (ckpt, row) is the stable id
    ("ckpt", pa.int32()),  # checkpoint suffix holding the episode's first real row
    ("row", pa.int64()),  # position of that row in the checkpoint's valid-ordered stream
    ("length", pa.int64()),  # transitions (agent steps)
    ("ret", pa.float64()),  # sum of clipped rewards
    ("complete", pa.bool_()),  # ends in a terminal
    ("action_counts", pa.list_(pa.int64())),  # (n_minimal,) histogram of minimal-set actions
    ("reward_neg", pa.int64()),  # rewards < 0 (clipped: -1)
    ("reward_zero", pa.int64()),
    ("reward_pos", pa.int64()),  # rewards > 0 (clipped: +1)
])


@dataclass(frozen=True)
class SubsampleOptions:
    """Command-line overrides of a manifest's `[data]` section; None keeps the manifest's value."""

    seed: int | None = None  # base seed (>= 0); per-game seeds follow SEED_RULE
    runs: tuple[int, ...] | None = None  # candidate runs; given alone, all of them are used
    num_runs: int | None = None  # how many existing candidate runs to draw (paper: 2 of 5)
    checkpoints: tuple[int, int] | None = None  # inclusive checkpoint-suffix range (paper E.2: 1-50)
    fraction: float | None = None  # target fraction of pool transitions, in (0, 1] (paper: 0.1)
    transitions: int | None = None  # target transitions (> 0) instead of a fraction (fine-tuning: 5k)
    include_incomplete: bool = False  # also draw episodes cut at the end of the data (no terminal)
    allow_fewer_runs: bool = False  # take the runs that exist when fewer than num_runs do
    allow_gaps: bool = False  # read past missing checkpoints / discontinuities (episodes cut there)


def game_seed_sequences(seed: int, task_id: int) -> tuple[np.random.SeedSequence, np.random.SeedSequence]:
    """(runs, episodes) seed sequences of one game (SEED_RULE)."""
    runs_ss, episodes_ss = np.random.SeedSequence([seed, task_id]).spawn(2)
    return runs_ss, episodes_ss


def resolve_selection(manifest: GameManifest, options: SubsampleOptions) -> DataSelection:
    """The manifest's `[data]` with the overrides applied and checked (ConfigError on a bad value)."""
    o, d = options, manifest.data
    if o.fraction is not None and o.transitions is not None:
        raise ConfigError("give either a fraction or a number of transitions, not both")
    sel = d
    if o.runs is not None:
        if not o.runs or any(r < 1 for r in o.runs):
            raise ConfigError(f"runs must be run numbers >= 1, got {list(o.runs)}")
        sel = dataclasses.replace(sel, runs=tuple(sorted(set(o.runs))),
                                  num_runs=len(set(o.runs)) if o.num_runs is None else o.num_runs)
    if o.num_runs is not None:
        sel = dataclasses.replace(sel, num_runs=o.num_runs)
    if not 1 <= sel.num_runs <= len(sel.runs):
        raise ConfigError(f"{manifest.name}: num_runs must be in [1, {len(sel.runs)}] "
                          f"(candidate runs {list(sel.runs)}), got {sel.num_runs}")
    if o.checkpoints is not None:
        a, b = o.checkpoints
        if not 0 <= a <= b:
            raise ConfigError(f"checkpoints must be A-B with 0 <= A <= B, got {a}-{b}")
        sel = dataclasses.replace(sel, checkpoints=(int(a), int(b)))
    if o.fraction is not None:
        if not 0.0 < o.fraction <= 1.0:
            raise ConfigError(f"fraction must be in (0, 1], got {o.fraction}")
        sel = dataclasses.replace(sel, fraction=float(o.fraction), transitions=0)
    if o.transitions is not None:
        if o.transitions < 1:
            raise ConfigError(f"transitions must be >= 1, got {o.transitions}")
        sel = dataclasses.replace(sel, transitions=int(o.transitions))
    if o.seed is not None:
        sel = dataclasses.replace(sel, seed=int(o.seed))
    if sel.seed < 0:
        raise ConfigError(f"seed must be >= 0, got {sel.seed}")
    return sel


def target_transitions(sel: DataSelection, pool_transitions: int) -> int:
    """Transitions to reach: `transitions` if > 0, else ceil(fraction * pool) with exact arithmetic."""
    if sel.transitions > 0:
        return sel.transitions
    return math.ceil(Fraction(repr(sel.fraction)) * pool_transitions)


def draw_episodes(lengths: np.ndarray, target: int, rng: np.random.Generator) -> np.ndarray:
    """Indices (sorted) of episodes drawn without replacement until their lengths sum to >= target.

    The draw order is one seeded permutation, so a larger target selects a superset.
    If the pool holds fewer than `target` transitions, every episode is selected.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    order = rng.permutation(len(lengths))
    cum = np.cumsum(lengths[order])
    k = int(np.searchsorted(cum, target, side="left")) + 1 if target > 0 else 0
    return np.sort(order[:min(k, len(order))])


def choose_runs(existing: Sequence[int], num_runs: int, rng: np.random.Generator) -> list[int]:
    """`num_runs` of the existing runs, drawn without replacement (sorted)."""
    existing = sorted(existing)
    if num_runs >= len(existing):
        return existing
    return sorted(int(r) for r in rng.choice(existing, size=num_runs, replace=False))


def existing_runs(root: Root, game: str, candidates: Iterable[int]) -> list[int]:
    """Candidate runs whose `replay_logs` folder holds at least one checkpoint."""
    from jowa_data.replay import list_checkpoints, list_runs

    present = set(list_runs(root, game))
    return [r for r in sorted(candidates) if str(r) in present and list_checkpoints(root, game, r)]


def source_bytes(root: Root, game: str, run: int, ckpts: Iterable[int]) -> int:
    """Bytes (on disk, or in the bucket) of every replay file of these checkpoints (observations included)."""
    from jowa_data.replay import folder_sizes, run_logs

    keep = set(ckpts)
    total = 0
    for name, size in folder_sizes(run_logs(root, game, run)).items():
        m = _CKPT_RE.search(name)
        if m and int(m.group(1)) in keep:
            total += size
    return total


def scan_range(root: Root, game: str, run: int, checkpoints: tuple[int, int],
               allow_gaps: bool = False) -> tuple[list, list[int]]:
    """(episodes starting in the range, the range's existing checkpoints) of one run.

    The reader decides from checkpoint A-1's terminals whether A starts mid-episode (that fragment is
    dropped). The checkpoint after B is scanned too when it exists, so an episode that starts in the
    range and ends just after it is complete.
    """
    from jowa_data.replay import list_checkpoints, run_logs, scan_run

    all_ckpts = list_checkpoints(root, game, run)
    a, b = checkpoints
    in_range = [c for c in all_ckpts if a <= c <= b]
    if not in_range:
        raise DatasetError(f"{run_logs(root, game, run)}: no checkpoint in the range {a}-{b} "
                           f"(found {len(all_ckpts)} checkpoints, {all_ckpts[0]}-{all_ckpts[-1]}; "
                           f"choose the range with --checkpoints A-B)")
    scan = in_range + ([in_range[-1] + 1] if in_range[-1] + 1 in all_ckpts else [])
    keep = set(in_range)
    refs = [e for e in scan_run(root, game, run, checkpoints=scan, allow_gaps=allow_gaps) if e.start[0] in keep]
    return refs, in_range


def episode_row_stats(ref: Any, num_actions: int, where: str) -> tuple[list[int], int, int, int]:
    """(minimal-action counts, #rewards<0, ==0, >0) of one episode."""
    actions = np.asarray(ref.actions)
    if actions.size and (actions.min() < 0 or actions.max() >= num_actions):
        bad = int(np.flatnonzero((actions < 0) | (actions >= num_actions))[0])
        ckpt, row = (int(x) for x in ref.start)
        raise DatasetError(f"{where}/{ref.run}/replay_logs/$store$_action_ckpt.{ckpt}.gz: episode {ref.episode} "
                           f"(starting at row {row} of that file) has action id {int(actions[bad])} at its step "
                           f"{bad}, outside the game's {num_actions} actions (`jowa-data validate ROOT` lists all)")
    counts = np.bincount(actions.astype(np.int64), minlength=num_actions)
    r = np.asarray(ref.rewards)
    return counts.tolist(), int((r < 0).sum()), int((r == 0).sum()), int((r > 0).sum())


def episodes_table(manifest: GameManifest, refs: Sequence[Any], where: str = "") -> pa.Table:
    """One row per episode reference (INDEX_SCHEMA), in the given order."""
    cols: dict[str, list] = {f.name: [] for f in INDEX_SCHEMA}
    for e in refs:
        counts, neg, zero, pos = episode_row_stats(e, manifest.num_actions, where or manifest.name)
        cols["game"].append(manifest.name)
        cols["task_id"].append(manifest.task_id)
        cols["run"].append(int(e.run))
        cols["episode"].append(int(e.episode))
        cols["ckpt"].append(int(e.start[0]))
        cols["row"].append(int(e.start[1]))
        cols["length"].append(int(e.length))
        cols["ret"].append(float(e.ret))
        cols["complete"].append(bool(e.complete))
        cols["action_counts"].append(counts)
        cols["reward_neg"].append(neg)
        cols["reward_zero"].append(zero)
        cols["reward_pos"].append(pos)
    return pa.table(cols, schema=INDEX_SCHEMA)


def _manifest_checksum(m: GameManifest) -> str:
    if m.path is not None and Path(m.path).is_file():
        return sha256_file(m.path)
    return sha256_bytes(json.dumps(manifest_to_dict(m), sort_keys=True).encode())


def _jowa_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("jowa")
    except PackageNotFoundError:
        return "0+unknown"


def select_game(manifest: GameManifest, replay_root: Root, options: SubsampleOptions | None = None,
                progress: bool = False) -> tuple[pa.Table, dict[str, Any]]:
    """Select one game's episodes: (rows sorted by run/episode, selection record for the metadata).

    `replay_root`: a local folder, an fsspec URL or a `roots.ReplayRoot` (e.g. with a local cache)."""
    from jowa_data.replay import game_folder

    options = options or SubsampleOptions()
    root = open_root(replay_root)
    sel = resolve_selection(manifest, options)
    game_dir = game_folder(root, manifest.name)
    if not game_dir.is_dir():
        raise DatasetError(f"{game_dir}: game folder not found under the replay root {root}")
    existing = existing_runs(root, manifest.name, sel.runs)
    if len(existing) < sel.num_runs and not (options.allow_fewer_runs and existing):
        raise DatasetError(
            f"{game_dir}: {sel.num_runs} runs needed but only {len(existing)} of the candidate runs "
            f"{list(sel.runs)} exist ({existing}); record/download more or pass --allow-fewer-runs")
    runs_ss, episodes_ss = game_seed_sequences(sel.seed, manifest.task_id)
    runs = choose_runs(existing, sel.num_runs, np.random.default_rng(runs_ss))

    pool: list[Any] = []
    used: dict[str, list[int]] = {}
    src: dict[str, int] = {}
    incomplete_skipped = 0
    for r in _maybe_progress(runs, progress, f"scan {manifest.name}"):
        refs, in_range = scan_range(root, manifest.name, r, sel.checkpoints, options.allow_gaps)
        used[str(r)] = in_range
        src[str(r)] = source_bytes(root, manifest.name, r, in_range)
        for e in refs:
            if e.complete or options.include_incomplete:
                pool.append(e)
            else:
                incomplete_skipped += 1
    if not pool:
        # e.g. a final log whose add_count holds only part of an episode: say so rather than select nothing.
        a, b = sel.checkpoints
        raise DatasetError(
            f"{game_dir}: checkpoints {a}-{b} of runs {runs} hold no complete episode that starts there "
            f"({incomplete_skipped} incomplete); widen --checkpoints or pass --include-incomplete")
    pool.sort(key=lambda e: (int(e.run), int(e.episode)))
    lengths = np.array([int(e.length) for e in pool], dtype=np.int64)
    pool_transitions = int(lengths.sum())
    target = target_transitions(sel, pool_transitions)
    picked = draw_episodes(lengths, target, np.random.default_rng(episodes_ss))
    chosen = [pool[i] for i in picked]
    table = episodes_table(manifest, chosen, where=str(game_dir))
    selected = int(lengths[picked].sum()) if len(picked) else 0
    record = {
        "task_id": manifest.task_id,
        "actions": list(manifest.actions),
        "manifest_sha256": _manifest_checksum(manifest),
        "seed": sel.seed,
        "candidate_runs": list(sel.runs),
        "existing_runs": existing,
        "num_runs": sel.num_runs,
        "runs": runs,
        "checkpoints": list(sel.checkpoints),
        "checkpoints_used": used,
        "fraction": sel.fraction,
        "transitions": sel.transitions,
        "include_incomplete": options.include_incomplete,
        "incomplete_skipped": incomplete_skipped,
        "pool_episodes": len(pool),
        "pool_transitions": pool_transitions,
        "target_transitions": target,
        "selected_episodes": len(chosen),
        "selected_transitions": selected,
        "target_reached": selected >= target,
        "source_bytes": src,
    }
    return table, record


def build_index(manifests: Sequence[GameManifest], replay_root: Root, seed: int | None = None,
                fraction: float | None = None, transitions: int | None = None, *,
                options: SubsampleOptions | None = None, progress: bool = False) -> pa.Table:
    """The episode index of several games (rows sorted by game, run, episode), metadata included.

    `seed`, `fraction` and `transitions` override every manifest (shorthand for `options`). `replay_root` may be
    a URL; the metadata records `roots.root_url` (the absolute path, or the URL without any cache layer).
    """
    replay_root = open_root(replay_root)
    options = options or SubsampleOptions()
    options = dataclasses.replace(
        options, **{k: v for k, v in (("seed", seed), ("fraction", fraction), ("transitions", transitions))
                    if v is not None})
    names = [m.name for m in manifests]
    if len(set(names)) != len(names):
        raise ConfigError(f"a game is named twice: {names}")
    tables, games = [], {}
    for m in sorted(manifests, key=lambda m: m.name):
        t, rec = select_game(m, replay_root, options, progress=progress)
        tables.append(t)
        games[m.name] = rec
    table = pa.concat_tables(tables) if tables else INDEX_SCHEMA.empty_table()
    meta = {
        "format": INDEX_FORMAT,
        "format_version": INDEX_VERSION,
        "jowa_version": _jowa_version(),
        "replay_root": root_url(replay_root),
        "seed_rule": SEED_RULE,
        "games": games,
    }
    return table.replace_schema_metadata({METADATA_KEY: json.dumps(meta, sort_keys=True).encode()})


def write_index(table: pa.Table, path: str | Path) -> Path:
    """Write the index atomically (zstd Parquet; deterministic bytes)."""
    path = Path(path)
    with atomic_path(path, suffix=".parquet") as tmp:
        pq.write_table(table, tmp, compression="zstd")
    return path


def index_metadata(table: pa.Table, where: str = "<index>") -> dict[str, Any]:
    """The `jowa` metadata of an index table (DatasetError if absent or of another format)."""
    raw = (table.schema.metadata or {}).get(METADATA_KEY)
    if raw is None:
        raise DatasetError(f"{where}: not a jowa episode index (no '{METADATA_KEY.decode()}' schema metadata)")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as e:
        raise DatasetError(f"{where}: corrupt jowa index metadata ({e})") from e
    if meta.get("format") != INDEX_FORMAT:
        raise DatasetError(f"{where}: metadata format is {meta.get('format')!r}, expected {INDEX_FORMAT!r}")
    v = meta.get("format_version")
    if not isinstance(v, int) or v > INDEX_VERSION:
        raise DatasetError(f"{where}: index format version {v!r} is newer than this jowa supports "
                           f"({INDEX_VERSION}); update jowa")
    return meta


def read_index(path: str | Path) -> pa.Table:
    """Read and check an episode index written by `write_index`."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: episode index not found")
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
        raise DatasetError(f"{path}: not a readable Parquet file ({e})") from e
    index_metadata(table, str(path))
    missing = [f.name for f in INDEX_SCHEMA if f.name not in table.column_names]
    if missing:
        raise DatasetError(f"{path}: episode index lacks columns {missing}")
    return table


def _maybe_progress(items: Sequence, enabled: bool, desc: str):
    if not enabled:
        return items
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit="run", leave=False)
