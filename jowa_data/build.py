"""`jowa-data build`: DQN-Replay -> episode index -> frozen-tokenizer tokens -> shards, with dask.

Pipeline: `subsample.build_index` selects episodes; the plan cuts each (game, run) into tasks of about
`task_transitions` consecutive selected episodes; each task (a top-level function, so dask's spawn-based
process pool and distributed workers can import it) reads its frames, tokenizes them in batches and
writes its *own* zarr group / tars under temporary names, renames them into place, and finally writes
its completion record `_tasks/<task>.json`. Only small metadata travels back to the driver. The
finaliser assembles episodes.parquet, files.json, stats.json and, last, info.json.

Resume: a task with a completion record is never redone; a task without one is wiped and redone.
Every output is a pure function of the inputs (sorted order, fixed zstd level, mtime=0, no timestamps),
so a build killed at any point and rerun gives the same bytes as an uninterrupted one. Rerunning a
finished build is a no-op; rerunning with different inputs into the same folder is an error.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from jowa_data.backends import TaskArrays, get_backend
from jowa_common.errors import ConfigError, DatasetError, ReplayFormatError
from jowa_common.io import (LOCK_NAME, atomic_path, atomic_write_json, folder_lock, remove_stale_temps, sha256_bytes,
                          sha256_file)
from jowa_data.layout import (EPISODES, FILES, FORMAT_VERSION, FORMATS, INFO, PLAN, STATS, TASKS_DIR,
                              TMP_DIR, TOKENS_PER_FRAME, VOCAB_SIZE, DatasetInfo, read_info, task_key)
from jowa_data.manifest import GameManifest

SCHEDULERS = ("synchronous", "processes", "threads")  # or a distributed address tcp://HOST:PORT


@dataclass
class BuildConfig:
    """Options of one build. Everything that changes the output bytes goes into the plan."""

    formats: tuple[str, ...] = ("zarr",)  # zarr and/or wds
    scheduler: str = "synchronous"  # synchronous | processes | threads | tcp://HOST:PORT (dask distributed)
    workers: int = 0  # local process/thread count; 0 = all cores
    task_transitions: int = 100_000  # transitions per build task (~7 MB of tokens, ~0.7 GB of frames read)
    encode_batch: int = 256  # frames per tokenizer forward
    device: str = "auto"  # tokenizer device: auto (cuda if present) | cpu | cuda[:i]
    precision: str = "fp32"  # fp32 | bf16 (bf16 may flip near-tie argmins; opt-in)
    seed: int | None = None  # subsampling seed override (None: each manifest's [data].seed)
    fraction: float | None = None  # subsampling fraction override (paper: 0.1)
    transitions: int | None = None  # target transitions per game override (fine-tuning: 5000)
    selection: Any = None  # subsample.SubsampleOptions (runs, num_runs, checkpoints, ...); None = manifests'
    progress: bool = True  # tqdm bar on stderr (frames/s, ETA)
    verify: str = "size"  # on a finished dataset: off | size (every file there, its size) | full (+ sha256)
    replay_cache: str | None = None  # local cache folder for a remote replay root (changes no output byte)
    extra: dict[str, Any] = field(default_factory=dict)  # recorded in info.json["source"] as given


# --- plan ----------------------------------------------------------------------------------------

def make_plan(index, index_meta: dict, manifests: Sequence[GameManifest], replay_root: str,
              tokenizer_sum: str, cfg: BuildConfig) -> dict[str, Any]:
    """The full, deterministic description of the build (tasks and their episodes)."""
    by_name = {m.name: m for m in manifests}
    cols = index.select(["game", "run", "episode", "ckpt", "row", "length"]).to_pydict()
    tasks: list[dict[str, Any]] = []
    cur: dict[str, Any] | None = None
    parts: dict[tuple[str, int], int] = {}
    for game, run, ep, ckpt, row, length in zip(cols["game"], cols["run"], cols["episode"], cols["ckpt"],
                                                 cols["row"], cols["length"]):
        if cur is None or cur["game"] != game or cur["run"] != run or cur["rows"] + length > cfg.task_transitions:
            part = parts.get((game, run), 0)
            parts[(game, run)] = part + 1
            m = by_name[game]
            cur = {"key": task_key(game, run, part), "game": game, "task_id": m.task_id, "run": int(run),
                   "checkpoints": list(index_meta["games"][game]["checkpoints"]),
                   "allow_gaps": bool(getattr(cfg.selection, "allow_gaps", False)),
                   "full_action_ids": m.full_action_ids.tolist(), "rows": 0, "episodes": []}
            tasks.append(cur)
        cur["episodes"].append([int(ep), int(ckpt), int(row), int(length)])
        cur["rows"] += int(length)
    return {
        "format_version": FORMAT_VERSION,
        "formats": sorted(cfg.formats),
        "replay_root": replay_root,
        "tokenizer_checksum": tokenizer_sum,
        "precision": cfg.precision,
        "games": sorted(by_name),
        "tasks": tasks,
    }


# --- one task (runs on a dask worker) --------------------------------------------------------------

def task_episode_refs(root: Any, spec: dict[str, Any]) -> list:
    """The EpisodeRefs of a task's episodes (plan order), scanning only the checkpoints they live in.

    A task reads the small files of the checkpoints from its first episode's start to its last episode's end
    (plus the terminal/add_count of the checkpoint before, which tells whether the first one starts mid-episode),
    never the whole run: with a remote root every task then touches only its own files. Episodes are matched by
    their stable id (checkpoint, row) and length; the stitching rules are those of the index's scan
    (`subsample.scan_range`), so the same (checkpoint, row) gives the same episode.
    """
    from jowa_data.replay import checkpoint_files, run_logs, scan_run

    game, run = spec["game"], spec["run"]
    logs = run_logs(root, game, run)
    a, b = spec["checkpoints"]
    listed = sorted(checkpoint_files(logs))
    in_range = [c for c in listed if a <= c <= b]
    # scan_range reads the range plus the checkpoint after it: an episode never extends past that.
    bound = in_range + ([in_range[-1] + 1] if in_range and in_range[-1] + 1 in listed else [])
    want = {(int(ckpt), int(row)): int(length) for _, ckpt, row, length in spec["episodes"]}
    first = min(c for c, _ in want)
    starts = [i for i, c in enumerate(bound) if c == max(c for c, _ in want)]
    if first not in bound or not starts:
        raise DatasetError(f"{logs}: checkpoints {sorted({c for c, _ in want})} of the planned episodes are not "
                           f"in the replay (present: {listed}); the replay changed since this build was planned")
    hi = min(starts[0] + 1, len(bound) - 1)
    while True:
        sel = [c for c in bound[:hi + 1] if c >= first]
        found = {tuple(int(x) for x in r.start): r
                 for r in scan_run(root, game, run, checkpoints=sel, allow_gaps=spec.get("allow_gaps", False))}
        cut = any(k in found and not found[k].complete and int(found[k].length) < n for k, n in want.items())
        if not cut or hi == len(bound) - 1:
            break
        hi += 1  # an episode runs on past the scanned checkpoints (only with small buffers): read one more
    refs = []
    for ep, ckpt, row, length in spec["episodes"]:
        ref = found.get((int(ckpt), int(row)))
        if ref is None or int(ref.length) != length:
            raise DatasetError(f"{logs}: episode {ep} (ckpt {ckpt}, row {row}, {length} steps) is no longer in "
                               "the replay as indexed; the replay changed since this build was planned (use a new --out)")
        refs.append(ref)
    return refs


def read_task_frames(spec: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(frames (N,84,84) u8, minimal actions (N,), rewards (N,) f32, terminals (N,) u8) of the task's episodes.

    `spec["replay_root"]`: a local folder or an fsspec URL; `spec["replay_cache"]` (optional): a local cache
    folder. Only the task's own checkpoint files are opened, and the observation files are streamed.
    """
    from jowa_data.replay import iter_episodes
    from jowa_data.roots import open_root

    root = open_root(spec["replay_root"], spec.get("replay_cache"))
    where = f"{root}/{spec['game']}/{spec['run']}" if root.fs is not None else \
        str(Path(root.path) / spec["game"] / str(spec["run"]))
    refs = task_episode_refs(root, spec)
    offsets: dict[tuple[int, int], int] = {}
    i = 0
    for ref in refs:
        offsets[tuple(int(x) for x in ref.start)] = i
        i += int(ref.length)
    n = i
    frames = np.empty((n, 84, 84), dtype=np.uint8)
    actions = np.empty(n, dtype=np.int64)
    rewards = np.empty(n, dtype=np.float32)
    terminals = np.empty(n, dtype=np.uint8)
    seen = 0
    # iter_episodes reads each observation file once, sequentially, for all of the task's episodes.
    for e in iter_episodes(root, spec["game"], spec["run"], refs=refs):
        o, length = offsets[tuple(int(x) for x in e.ref.start)], int(e.ref.length)
        if e.frames.shape != (length, 84, 84):
            raise ReplayFormatError(f"{where}: episode {e.ref.episode}: frames have shape {e.frames.shape}, "
                                    f"expected ({length}, 84, 84)")
        frames[o:o + length] = e.frames
        actions[o:o + length] = e.ref.actions
        rewards[o:o + length] = e.ref.rewards
        terminals[o:o + length] = e.ref.terminals
        seen += 1
    if seen != len(refs):
        raise ReplayFormatError(f"{where}: read {seen} of the task's {len(refs)} episodes")
    return frames, actions, rewards, terminals


def task_record_path(out_dir: Path, key: str) -> Path:
    return Path(out_dir) / TASKS_DIR / f"{key}.json"


def to_task_arrays(spec: dict[str, Any], tokens: np.ndarray, actions_min: np.ndarray, rewards: np.ndarray,
                   terminals: np.ndarray) -> TaskArrays:
    """Map minimal-set actions to full ids and fix dtypes (what every task stores)."""
    full = np.asarray(spec["full_action_ids"], dtype=np.int64)
    actions_min = np.asarray(actions_min, dtype=np.int64)
    if actions_min.size and (actions_min.min() < 0 or actions_min.max() >= len(full)):
        raise ReplayFormatError(f"{spec.get('replay_root', '<arrays>')}/{spec['game']}/{spec['run']}: action ids "
                                f"outside the game's {len(full)} minimal actions")
    return TaskArrays(tokens=np.asarray(tokens, dtype=np.uint16), actions=full[actions_min].astype(np.uint8),
                      rewards=np.asarray(rewards, dtype=np.float32), terminals=np.asarray(terminals, dtype=np.uint8))


def write_task(out: Path, spec: dict[str, Any], arrays: TaskArrays) -> dict[str, Any]:
    """Write one task in every format, then (last, atomically) its completion record."""
    files: dict[str, dict[str, Any]] = {}
    for fmt in spec["formats"]:
        be = get_backend(fmt)
        be.remove_task(out, spec["game"], spec["key"])
        for rel in be.write_task(out, spec["game"], spec["key"], arrays):
            files[rel] = {"bytes": (out / rel).stat().st_size, "sha256": sha256_file(out / rel)}
    lengths = [e[3] for e in spec["episodes"]]
    flat = arrays.tokens.ravel()  # ids >= vocab are not counted here; `jowa-data validate` reports them
    assert sum(lengths) == len(arrays), (sum(lengths), len(arrays))
    record = {
        "key": spec["key"], "game": spec["game"], "rows": len(arrays),
        "episode_offsets": np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(int).tolist(),
        "token_counts": np.bincount(flat[flat < VOCAB_SIZE], minlength=VOCAB_SIZE).tolist(),
        "files": files,
    }
    atomic_write_json(task_record_path(out, spec["key"]), record, indent=None)
    return record


def run_task(spec: dict[str, Any], progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Build one task end to end; returns small metadata (rows, seconds per stage). `progress(n)` is called as
    frames are tokenized (in-process runs: the bar then moves within a task, not only when one ends)."""
    from jowa_data.tokenize import encode_frames, load_frozen_tokenizer, pick_device

    out = Path(spec["out_dir"])
    t0 = time.perf_counter()
    frames, actions_min, rewards, terminals = read_task_frames(spec)
    t1 = time.perf_counter()
    device = pick_device(spec["device"])
    tok = load_frozen_tokenizer(spec["tokenizer"], device)
    tokens = encode_frames(tok, frames, batch=spec["encode_batch"], device=device, precision=spec["precision"],
                           progress=progress)
    del frames
    t2 = time.perf_counter()
    write_task(out, spec, to_task_arrays(spec, tokens, actions_min, rewards, terminals))
    t3 = time.perf_counter()
    return {"key": spec["key"], "rows": len(tokens), "read_s": t1 - t0, "tokenize_s": t2 - t1, "write_s": t3 - t2}


# --- running the tasks ------------------------------------------------------------------------------

def task_resources(device: str) -> dict[str, float] | None:
    """The dask worker resources a build task asks for: one `GPU` when it tokenizes on CUDA (so a cluster of
    GPU and CPU nodes sends it only to workers started with `--resources GPU=1`), none otherwise."""
    return {"GPU": 1} if device.startswith("cuda") else None


def is_distributed_scheduler(scheduler: str) -> bool:
    return scheduler.startswith(("tcp://", "tls://", "inproc://", "ucx://"))


def _iter_distributed(specs: list[dict], scheduler: str, bar) -> Iterator[dict]:
    """Run `specs` on a dask cluster. A worker lost mid-task (killed, node gone) costs only a rerun of its tasks on
    the others: the scheduler reschedules them (up to distributed.scheduler.allowed-failures times each) and a
    task rewrites its outputs from scratch. A task that keeps killing workers ends the build with one line; the
    rerun of the same command resumes from the finished tasks."""
    from distributed import Client, KilledWorker, as_completed

    resources = task_resources(specs[0]["device"])
    with Client(scheduler) as client:
        if resources:
            offered = [w for w in client.scheduler_info(n_workers=-1)["workers"].values()
                       if w.get("resources", {}).get("GPU", 0) >= 1]
            if not offered:
                print(f"warning: no worker of {scheduler} offers the GPU resource; the build waits for one "
                      "(start GPU workers with `dask worker ... --resources GPU=1`)", file=sys.stderr, flush=True)
        futs = client.map(run_task, specs, key=[f"jowa-build-{s['key']}" for s in specs], pure=False,
                          retries=1, resources=resources)
        for f in as_completed(futs):
            try:
                r = f.result()
            except KilledWorker as e:
                last = getattr(e.last_worker, "address", e.last_worker)
                raise DatasetError(f"{specs[0]['out_dir']}: build task {e.task} killed every dask worker that ran "
                                   f"it (last {last}); rerun the same command to resume") from None
            bar.update(r["rows"])
            yield r


def _iter_results(specs: list[dict], scheduler: str, workers: int, bar) -> Iterator[dict]:
    """Run `specs` on the chosen dask scheduler; yield each result (order not guaranteed)."""
    if not specs:
        return
    if is_distributed_scheduler(scheduler):
        yield from _iter_distributed(specs, scheduler, bar)
        return
    if scheduler not in SCHEDULERS:
        raise ConfigError(f"--scheduler must be one of {SCHEDULERS} or tcp://HOST:PORT, got {scheduler!r}")
    if scheduler == "synchronous":  # in this process, one task after another: the bar moves with every chunk
        for s in specs:
            yield run_task(s, progress=bar.update)
        return
    import dask
    from dask.callbacks import Callback

    class _Bar(Callback):
        def _posttask(self, key, result, dsk, state, worker_id):
            if isinstance(result, dict) and "rows" in result:
                bar.update(result["rows"])

    tasks = [dask.delayed(run_task, pure=False)(s, dask_key_name=f"jowa-build-{s['key']}") for s in specs]
    kw = {"num_workers": workers or os.cpu_count() or 1} if scheduler != "synchronous" else {}
    with _Bar():
        results = dask.compute(*tasks, scheduler=scheduler, **kw)
    yield from results


# --- finalise ---------------------------------------------------------------------------------------

def _quantiles(x: np.ndarray) -> dict[str, float]:
    if x.size == 0:
        return {"count": 0}
    q = np.quantile(x, [0.01, 0.1, 0.5, 0.9, 0.99])
    return {"count": int(x.size), "mean": float(x.mean()), "std": float(x.std()), "min": float(x.min()),
            "max": float(x.max()), "q01": float(q[0]), "q10": float(q[1]), "q50": float(q[2]),
            "q90": float(q[3]), "q99": float(q[4])}


def codebook_usage(counts: np.ndarray) -> dict[str, float]:
    """Unique tokens used and perplexity exp(H) of the token histogram (2048 = all codes equally used)."""
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum()
    if total == 0:
        return {"unique_tokens": 0, "perplexity": 0.0}
    p = counts[counts > 0] / total
    return {"unique_tokens": int((counts > 0).sum()), "perplexity": float(np.exp(-(p * np.log(p)).sum()))}


def _finalise(out: Path, plan: dict, index, index_meta: dict, manifests: Sequence[GameManifest],
              cfg: BuildConfig) -> dict[str, Any]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = []
    for t in plan["tasks"]:
        p = task_record_path(out, t["key"])
        records.append(json.loads(p.read_text(encoding="utf-8")))
    # episodes.parquet: the index rows (same order as the plan) + where each episode lives.
    task_col, task_off, game_off = [], [], []
    game_rows: dict[str, int] = {}
    for t, rec in zip(plan["tasks"], records):
        base = game_rows.get(t["game"], 0)
        for off in rec["episode_offsets"]:
            task_col.append(t["key"])
            task_off.append(off)
            game_off.append(base + off)
        game_rows[t["game"]] = base + rec["rows"]
    assert len(task_col) == index.num_rows
    episodes = (index.append_column("task", pa.array(task_col, pa.string()))
                .append_column("task_offset", pa.array(task_off, pa.int64()))
                .append_column("offset", pa.array(game_off, pa.int64())))
    with atomic_path(out / EPISODES, suffix=".parquet") as tmp:
        pq.write_table(episodes, tmp, compression="zstd")

    files = {rel: v for rec in records for rel, v in rec["files"].items()}
    files = dict(sorted(files.items()))
    files_bytes = (json.dumps(files, indent=1, sort_keys=True) + "\n").encode()
    with atomic_path(out / FILES) as tmp:
        tmp.write_bytes(files_bytes)

    stats = {"games": {}}
    games_info = {}
    cols = index.select(["game", "length", "ret", "complete"]).to_pydict()
    g_arr = np.array(cols["game"], dtype=object)
    for m in sorted(manifests, key=lambda m: m.name):
        sel = g_arr == m.name
        lengths = np.array(cols["length"], dtype=np.int64)[sel]
        rets = np.array(cols["ret"], dtype=np.float64)[sel]
        complete = np.array(cols["complete"], dtype=bool)[sel]
        recs = [r for r in records if r["game"] == m.name]
        counts = np.sum([r["token_counts"] for r in recs], axis=0) if recs else np.zeros(VOCAB_SIZE)
        by_fmt = {}
        for fmt in plan["formats"]:
            fs = [v for r in recs for rel, v in r["files"].items() if rel.startswith(f"{fmt}/")]
            nbytes = int(sum(v["bytes"] for v in fs))
            by_fmt[fmt] = {"files": len(fs), "bytes": nbytes,
                           "bytes_per_frame": nbytes / max(int(lengths.sum()), 1)}
        stats["games"][m.name] = {
            "task_id": m.task_id, "episodes": int(sel.sum()), "transitions": int(lengths.sum()),
            "incomplete_episodes": int((~complete).sum()), "tasks": len(recs),
            "return_clipped": _quantiles(rets), "length": _quantiles(lengths),
            "codebook": codebook_usage(counts), "storage": by_fmt,
        }
        games_info[m.name] = {"task_id": m.task_id, "episodes": int(sel.sum()), "transitions": int(lengths.sum()),
                              "tasks": [r["key"] for r in recs]}
    with atomic_path(out / STATS) as tmp:
        tmp.write_text(json.dumps(stats, indent=2, sort_keys=True) + "\n")

    from jowa_data.backends import wds_backend, zarr_backend

    info = DatasetInfo(
        formats=plan["formats"], games=games_info,
        total_episodes=index.num_rows, total_transitions=int(sum(r["rows"] for r in records)),
        tokenizer_checksum=plan["tokenizer_checksum"],
        manifest_checksums={g: index_meta["games"][g]["manifest_sha256"] for g in sorted(index_meta["games"])},
        source={"replay_root": plan["replay_root"], "precision": plan["precision"],
                "selection": index_meta["games"], "seed_rule": index_meta.get("seed_rule"), **cfg.extra},
        seed=cfg.seed, plan_checksum=sha256_file(out / PLAN), files_checksum=sha256_bytes(files_bytes),
        zarr={"codec": f"zstd(level={zarr_backend.ZSTD_LEVEL})", "chunk_rows": zarr_backend.CHUNK_ROWS,
              "shard_rows": zarr_backend.SHARD_ROWS} if "zarr" in plan["formats"] else {},
        wds={"sample_rows": wds_backend.SAMPLE_ROWS, "tar_samples": wds_backend.TAR_SAMPLES}
        if "wds" in plan["formats"] else {},
    )
    atomic_write_json(out / INFO, info.to_dict())
    shutil.rmtree(out / TMP_DIR, ignore_errors=True)
    return info.to_dict()


# --- entry point ------------------------------------------------------------------------------------

def build_dataset(manifests: Sequence[GameManifest], replay_root: Any, tokenizer_path: str | Path,
                  out_dir: str | Path, cfg: BuildConfig | None = None) -> dict[str, Any]:
    """Build (or resume, or confirm) a token dataset. Returns a summary with per-stage timings.

    `replay_root`: a local folder or an fsspec URL (gs://atari-replay-datasets/dqn, s3://, https://, ...). The
    data files are the same bytes either way; plan.json and info.json record where the replay was read from.
    """
    from jowa_data.roots import open_root, root_url
    from jowa_data.subsample import METADATA_KEY, build_index, index_metadata
    from jowa_data.tokenize import tokenizer_checksum

    cfg = cfg or BuildConfig()
    bad = [f for f in cfg.formats if f not in FORMATS]
    if bad or not cfg.formats:
        raise ConfigError(f"--format must be zarr, wds or both, got {list(cfg.formats)}")
    if cfg.precision not in ("fp32", "bf16"):
        raise ConfigError(f"precision must be fp32 or bf16, got {cfg.precision!r}")
    if cfg.task_transitions < 1:
        raise ConfigError(f"task_transitions must be >= 1, got {cfg.task_transitions}")
    from jowa_data.integrity import check_mode

    check_mode(cfg.verify)
    out = Path(out_dir)
    tok_path = Path(tokenizer_path)
    if not tok_path.is_file():
        from jowa_common.errors import CheckpointError

        raise CheckpointError(f"{tok_path}: tokenizer checkpoint not found")
    t_start = time.perf_counter()
    root = open_root(replay_root, cfg.replay_cache)
    index = build_index(list(manifests), root, seed=cfg.seed, fraction=cfg.fraction,
                        transitions=cfg.transitions, options=cfg.selection)
    index_meta = index_metadata(index)
    # episodes.parquet describes the data, not where it was read from (plan.json and info.json say that): the
    # same replay files give the same bytes from a local folder or a bucket.
    index_meta.pop("replay_root", None)
    index = index.replace_schema_metadata({METADATA_KEY: json.dumps(index_meta, sort_keys=True).encode()})
    plan = make_plan(index, index_meta, manifests, root_url(root), tokenizer_checksum(tok_path), cfg)
    plan_bytes = (json.dumps(plan, indent=1, sort_keys=True) + "\n").encode()
    t_index = time.perf_counter() - t_start

    if (out / PLAN).is_file():
        if (out / PLAN).read_bytes() != plan_bytes:
            raise DatasetError(f"{out / PLAN}: this folder holds a different build (other games, selection, "
                               "tokenizer, formats or replay); use a new --out folder or delete this one")
    elif out.exists() and any(p.name != LOCK_NAME for p in out.iterdir()):
        raise DatasetError(f"{out}: folder exists and is not a jowa build (no {PLAN}); choose an empty --out")
    with folder_lock(out, "jowa-data build"):
        return _build_locked(out, plan, plan_bytes, index, index_meta, manifests, tok_path, cfg, t_index)


def remove_build_leftovers(out: Path) -> list[Path]:
    """Delete what a killed build left behind: atomic-write temp files (`.NAME.XXXX.tmp*`: a tar, a task record,
    files.json, episodes.parquet, ...) and the scratch folder of running tasks. Only under the build lock."""
    gone = remove_stale_temps(out)
    if (out / TMP_DIR).exists():
        shutil.rmtree(out / TMP_DIR, ignore_errors=True)
        gone.append(out / TMP_DIR)
    return gone


def _damaged_tasks(out: Path, cfg: BuildConfig) -> dict[str, list[str]]:
    """Tasks of a finished dataset whose files are not as its files.json says (`cfg.verify` decides how deep)."""
    from jowa_data.integrity import verify_dataset

    try:
        return verify_dataset(out, cfg.verify)
    except DatasetError as e:  # files.json itself unusable: every task is rebuilt
        info = read_info(out)
        return {k: [str(e)] for g in info.game_names for k in info.games[g]["tasks"]}


def _build_locked(out: Path, plan: dict, plan_bytes: bytes, index, index_meta: dict,
                  manifests: Sequence[GameManifest], tok_path: Path, cfg: BuildConfig, t_index: float) -> dict:
    remove_build_leftovers(out)
    repaired: list[str] = []
    if (out / INFO).is_file():
        damaged = _damaged_tasks(out, cfg)
        if not damaged:
            return {"out": str(out), "status": "already built", "tasks": len(plan["tasks"]), "built_tasks": 0,
                    "rows": 0, "read_s": 0.0, "tokenize_s": 0.0, "write_s": 0.0, "index_s": t_index,
                    "verified": cfg.verify}
        # Repair: the dataset stops looking finished, then only the damaged tasks are built again.
        (out / INFO).unlink()
        by_key = {t["key"]: t for t in plan["tasks"]}
        for key, problems in sorted(damaged.items()):
            if cfg.progress:
                print(f"repairing task {key}: {problems[0]}" + (f" (+{len(problems) - 1} more)" if len(problems) > 1
                                                                else ""), file=sys.stderr)
            task_record_path(out, key).unlink(missing_ok=True)
            for fmt in plan["formats"]:
                get_backend(fmt).remove_task(out, by_key[key]["game"], key)
            repaired.append(key)
    with atomic_path(out / PLAN) as tmp:
        tmp.write_bytes(plan_bytes)
    (out / TASKS_DIR).mkdir(exist_ok=True)
    if "zarr" in plan["formats"]:
        from jowa_data.backends.zarr_backend import ensure_groups

        ensure_groups(out, plan["games"])

    common = {"out_dir": str(out.resolve()), "replay_root": plan["replay_root"], "tokenizer": str(tok_path.resolve()),
              "formats": plan["formats"], "device": cfg.device, "precision": cfg.precision,
              "encode_batch": cfg.encode_batch, "replay_cache": cfg.replay_cache}
    pending = [{**t, **common} for t in plan["tasks"] if not task_record_path(out, t["key"]).is_file()]
    total_rows = sum(t["rows"] for t in pending)
    from tqdm import tqdm

    timings = {"read_s": 0.0, "tokenize_s": 0.0, "write_s": 0.0, "rows": 0}
    t_run = time.perf_counter()
    with tqdm(total=total_rows, unit="frame", unit_scale=True, desc=f"build {out.name}", disable=not cfg.progress,
              dynamic_ncols=True) as bar:
        for r in _iter_results(pending, cfg.scheduler, cfg.workers, bar):
            for k in ("read_s", "tokenize_s", "write_s", "rows"):
                timings[k] += r[k]
    wall = time.perf_counter() - t_run
    t_fin = time.perf_counter()
    remove_build_leftovers(out)  # temp files of tasks whose dask worker was killed (the tasks ran again elsewhere)
    _finalise(out, plan, index, index_meta, manifests, cfg)
    return {"out": str(out), "status": "repaired" if repaired else "built", "repaired": repaired,
            "tasks": len(plan["tasks"]), "built_tasks": len(pending), "index_s": t_index, "run_s": wall, "finalise_s": time.perf_counter() - t_fin,
            "frames_per_s": timings["rows"] / wall if wall > 0 else 0.0, **timings}


# --- datasets from arrays (tests, imported or recorded-and-tokenized data) ----------------------------

@dataclass
class EpisodeArrays:
    """One episode given directly as arrays (no DQN-Replay behind it)."""

    tokens: np.ndarray  # (T, 36) uint16
    actions: np.ndarray  # (T,) minimal-set action ids (as DQN-Replay stores them)
    rewards: np.ndarray  # (T,) clipped rewards
    terminals: np.ndarray  # (T,) 0/1; a complete episode ends with 1
    run: int = 1  # provenance run number


def write_dataset(out_dir: str | Path, manifests: Sequence[GameManifest], episodes: dict[str, list[EpisodeArrays]],
                  formats: Sequence[str] = ("zarr",), task_transitions: int = 100_000,
                  tokenizer_sum: str = "") -> dict[str, Any]:
    """Write a dataset in the built layout from token arrays, through the same task writer and finaliser."""
    import pyarrow as pa

    from jowa_data.subsample import INDEX_FORMAT, INDEX_SCHEMA, INDEX_VERSION

    cfg = BuildConfig(formats=tuple(formats), task_transitions=task_transitions, progress=False)
    out = Path(out_dir)
    by_name = {m.name: m for m in manifests}
    rows: dict[str, list] = {f.name: [] for f in INDEX_SCHEMA}
    games_meta: dict[str, Any] = {}
    for g in sorted(episodes):
        m = by_name[g]
        eps = sorted(enumerate(episodes[g]), key=lambda t: (t[1].run, t[0]))
        for i, e in eps:
            a = np.asarray(e.actions, dtype=np.int64)
            r = np.asarray(e.rewards, dtype=np.float32)
            for k, v in (("game", g), ("task_id", m.task_id), ("run", e.run), ("episode", i), ("ckpt", 0),
                         ("row", 0), ("length", len(a)), ("ret", float(r.sum())),
                         ("complete", bool(len(a) and e.terminals[-1])),
                         ("action_counts", np.bincount(a, minlength=m.num_actions).tolist()),
                         ("reward_neg", int((r < 0).sum())), ("reward_zero", int((r == 0).sum())),
                         ("reward_pos", int((r > 0).sum()))):
                rows[k].append(v)
        games_meta[g] = {"task_id": m.task_id, "actions": list(m.actions), "checkpoints": [0, 0],
                         "manifest_sha256": sha256_bytes(json.dumps(list(m.actions)).encode()), "source": "arrays"}
    meta = {"format": INDEX_FORMAT, "format_version": INDEX_VERSION, "games": games_meta, "seed_rule": None}
    index = pa.table(rows, schema=INDEX_SCHEMA).replace_schema_metadata(
        {b"jowa": json.dumps(meta, sort_keys=True).encode()})
    plan = make_plan(index, meta, [by_name[g] for g in sorted(episodes)], "<arrays>", tokenizer_sum, cfg)
    if out.exists() and any(out.iterdir()):
        raise DatasetError(f"{out}: folder is not empty")
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / PLAN) as tmp:
        tmp.write_bytes((json.dumps(plan, indent=1, sort_keys=True) + "\n").encode())
    if "zarr" in plan["formats"]:
        from jowa_data.backends.zarr_backend import ensure_groups

        ensure_groups(out, plan["games"])
    ep_iter = {g: iter([e for _, e in sorted(enumerate(episodes[g]), key=lambda t: (t[1].run, t[0]))])
               for g in episodes}
    for t in plan["tasks"]:
        eps = [next(ep_iter[t["game"]]) for _ in t["episodes"]]
        cat = lambda f: np.concatenate([np.asarray(getattr(e, f)) for e in eps])  # noqa: E731
        spec = {**t, "formats": plan["formats"]}
        write_task(out, spec, to_task_arrays(spec, cat("tokens").reshape(-1, TOKENS_PER_FRAME), cat("actions"),
                                             cat("rewards"), cat("terminals")))
    return _finalise(out, plan, index, meta, [by_name[g] for g in sorted(episodes)], cfg)


# --- stats of a built dataset (used by `jowa-data stats DIR`) -------------------------------------

def dataset_stats(dataset_dir: str | Path) -> dict[str, Any]:
    """What a built dataset adds to the index stats: per game codebook usage (unique tokens, perplexity),
    bytes on disk per frame and shard/file counts per format, plus provenance from info.json."""
    from jowa_data.layout import read_info

    from jowa_data.integrity import require_intact

    d = Path(dataset_dir)
    info = read_info(d)
    require_intact(d, "full", info=info)  # numbers about files that are not the build's would mislead
    p = d / STATS
    try:
        stats = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise DatasetError(f"{p}: unreadable ({e})") from e
    games = {}
    for g, s in sorted(stats["games"].items()):
        games[g] = {"task_id": s["task_id"], "episodes": s["episodes"], "transitions": s["transitions"],
                    "unique_tokens": s["codebook"]["unique_tokens"], "perplexity": s["codebook"]["perplexity"],
                    "storage": s["storage"]}
    total_rows = max(info.total_transitions, 1)
    storage = {}
    for fmt in info.formats:
        nbytes = sum(s["storage"][fmt]["bytes"] for s in stats["games"].values())
        storage[fmt] = {"bytes": nbytes, "files": sum(s["storage"][fmt]["files"] for s in stats["games"].values()),
                        "bytes_per_frame": nbytes / total_rows}
    return {"kind": "dataset", "path": str(d), "format_version": info.format_version, "formats": info.formats,
            "tokens_per_frame": info.tokens_per_frame, "vocab_size": info.vocab_size,
            "tokenizer_checksum": info.tokenizer_checksum, "total_episodes": info.total_episodes,
            "total_transitions": info.total_transitions, "storage": storage, "games": games}
