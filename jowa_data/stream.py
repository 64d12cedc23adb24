"""Batches of L-step segments for the trainer, from a built dataset (zarr or webdataset).

How it is fast: the first use decodes the shards once into a flat token cache (`.npy` files, uint16
tokens (N,36) + u8 actions + i8/f32 rewards + u8 terminals, ~72 MiB per million transitions). Every
rank and DataLoader worker of a node memory-maps the same files, so the OS page cache holds one copy.
A batch is a vectorised numpy gather over a small in-memory index of segment starts.

Segments (paper sec. 4.3 / docs/official_code.md §4): within each episode a segment starts every
`stride` steps (tau=4 in official pretraining, 1 in fine-tuning) and covers `seq_len` steps (L=8). It
never starts before an episode start; when it runs past the episode end it is right-padded: token 0,
action 0, reward 0, end 0, `mask_padding` False.

Epoch and sampling: an epoch has as many segments as the dataset (sum over games). Game g gets a share
`w_g` of them (weights "uniform" by default: equal share per game; "proportional" = the official
behaviour, share = its segment count; or a {game: weight} dict), drawn within the game as successive
seeded permutations (without replacement until the game's segments run out, then again). The epoch's
segments are shuffled by one permutation seeded by (seed, epoch). With world size W and batch B every rank
yields exactly floor(N / (W*B)) batches (no DDP hang on uneven data); rank r takes batches r, r+W, ...
of the epoch (disjoint). DataLoader worker k of K takes every K-th of the rank's batches, which the
DataLoader's round-robin returns in order. State = (epoch, next batch), enough for an exact resume.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from jowa_common.errors import ConfigError, DatasetError
from jowa_common.io import atomic_path, atomic_write_json
from jowa_data.layout import EPISODES, PLAN, TOKENS_PER_FRAME, DatasetInfo, read_info

CACHE_VERSION = 2  # 2: made only from verified files and tied to their checksums (v1 caches are rebuilt)
CACHE_FIELDS = ("tokens", "actions", "rewards", "terminals")


def _torch_iterable_base():
    try:
        from torch.utils.data import IterableDataset

        return IterableDataset
    except ImportError:  # pragma: no cover - torch is a dependency
        return object


# --- flat token cache -----------------------------------------------------------------------------

@dataclass
class TokenCache:
    """Memory-mapped flat arrays of a whole dataset plus its episode table (global offsets)."""

    tokens: np.ndarray  # (N, 36) uint16
    actions: np.ndarray  # (N,) uint8 full ids
    rewards: np.ndarray  # (N,) int8 (exact clipped rewards) or float32
    terminals: np.ndarray  # (N,) uint8
    games: list[str]  # sorted game names
    task_ids: np.ndarray  # (G,) int64: game index -> task id
    ep_start: np.ndarray  # (E,) int64 global row of each episode's first step
    ep_length: np.ndarray  # (E,) int64
    ep_game: np.ndarray  # (E,) int64 game index
    directory: Path | None = None
    made: bool = False  # decoded by this call (False: an existing fresh cache was mapped)

    @property
    def num_transitions(self) -> int:
        return len(self.tokens)

    @property
    def nbytes(self) -> int:
        return sum(getattr(self, f).nbytes for f in CACHE_FIELDS)


def _episode_table(dataset_dir: Path, info: DatasetInfo) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    import pyarrow.parquet as pq

    p = dataset_dir / EPISODES
    try:
        t = pq.read_table(p, columns=["game", "offset", "length"]).to_pydict()
    except Exception as e:
        raise DatasetError(f"{p}: cannot read the episodes table ({type(e).__name__}: {e})") from e
    games = info.game_names
    base, acc = {}, 0
    for g in games:
        base[g] = acc
        acc += int(info.games[g]["transitions"])
    gidx = {g: i for i, g in enumerate(games)}
    try:
        ep_game = np.array([gidx[g] for g in t["game"]], dtype=np.int64)
    except KeyError as e:
        raise DatasetError(f"{p}: episode of game {e} which info.json does not list") from e
    ep_start = np.array([base[g] + o for g, o in zip(t["game"], t["offset"])], dtype=np.int64)
    return ep_start, np.array(t["length"], dtype=np.int64), ep_game


def default_cache_dir(dataset_dir: Path, backend: str) -> Path:
    return Path(dataset_dir) / "_cache" / f"{backend}-v{CACHE_VERSION}"


def cache_location(dataset_dir: str | Path, backend: str = "zarr", cache_root: str | Path | None = None) -> Path:
    """Where the token cache of `dataset_dir` lives: inside the dataset (`_cache/`) by default, or under
    `cache_root` (a node-local disk, or any writable folder when the dataset is read-only or shared) in a
    subfolder named after the dataset and a hash of its absolute path, so that one root serves many datasets."""
    if not cache_root:
        return default_cache_dir(Path(dataset_dir), backend)
    from jowa_common.io import sha256_bytes

    d = Path(dataset_dir).resolve()
    return Path(cache_root) / f"{d.name}-{sha256_bytes(str(d).encode())[:12]}" / f"{backend}-v{CACHE_VERSION}"


def build_cache(dataset_dir: str | Path, backend: str = "zarr", cache_dir: str | Path | None = None,
                progress: bool = False) -> Path:
    """Verify every data file of `backend` against files.json (sha256), then decode every task into flat .npy
    files. Each file is published atomically and meta.json last; the caller holds the cache lock."""
    from jowa_data.backends import get_backend
    from jowa_data.integrity import read_files, stat_digest

    d = Path(dataset_dir)
    info = read_info(d)
    if backend not in info.formats:
        raise DatasetError(f"{d / 'info.json'}: dataset has no '{backend}' data (formats: {info.formats})")
    cdir = Path(cache_dir) if cache_dir else default_cache_dir(d, backend)
    cdir.mkdir(parents=True, exist_ok=True)
    (cdir / "meta.json").unlink(missing_ok=True)  # from here on the cache is not fresh until it is complete
    files = read_files(d, info)
    digest = stat_digest(d, files, [backend])
    be = get_backend(backend)
    tasks = [(g, k) for g in info.game_names for k in info.games[g]["tasks"]]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=2 * len(tasks), desc=f"verify + decode {backend} -> cache", unit="task", leave=False)
    try:
        return _decode_into_cache(d, info, be, backend, cdir, tasks, files, digest, bar)
    finally:
        if bar:
            bar.close()  # before any error message, so that it starts its own line


def _decode_into_cache(d: Path, info: DatasetInfo, be, backend: str, cdir: Path, tasks: list, files: dict,
                       digest: str, bar) -> Path:
    from jowa_data.integrity import damage_error, stat_digest, verify_dataset

    damaged = verify_dataset(d, "full", [backend], info, progress=bar.update if bar else None)
    if damaged:
        raise damage_error(d, damaged)
    n = info.total_transitions
    # Tokens/actions/terminals go straight into memory-mapped temp files (bounded RAM at paper scale);
    # rewards (4 B/row) are kept in RAM to decide their dtype: exact small integers in DQN-Replay (clipped
    # to -1/0/1) are stored as int8.
    with contextlib.ExitStack() as stack:
        tmps = {f: stack.enter_context(atomic_path(cdir / f"{f}.npy", suffix=".npy")) for f in CACHE_FIELDS}
        shapes = {"tokens": (n, TOKENS_PER_FRAME), "actions": (n,), "terminals": (n,)}
        dtypes = {"tokens": np.uint16, "actions": np.uint8, "terminals": np.uint8}
        mm = {f: np.lib.format.open_memmap(tmps[f], mode="w+", dtype=dtypes[f], shape=shapes[f]) for f in shapes}
        rewards = np.empty(n, np.float32)
        i = 0
        for g, k in tasks:
            a = be.read_task(d, g, k)
            m = len(a)
            if i + m > n:
                raise DatasetError(f"{d}: task {k} makes the data longer than info.json's {n} transitions")
            for f in shapes:
                mm[f][i:i + m] = getattr(a, f)
            rewards[i:i + m] = a.rewards
            i += m
            if bar:
                bar.update(1)
        if i != n:
            raise DatasetError(f"{d}: the {backend} data holds {i} transitions, info.json says {n}")
        for f in shapes:
            mm[f].flush()
        del mm
        if np.array_equal(rewards, np.round(rewards)) and (n == 0 or (rewards.min() >= -128 and rewards.max() <= 127)):
            rewards = rewards.astype(np.int8)
        np.save(tmps["rewards"], rewards, allow_pickle=False)
    if stat_digest(d, files, [backend]) != digest:
        raise DatasetError(f"{d}: data files changed while the token cache was made; run again")
    atomic_write_json(cdir / "meta.json", _cache_meta(info, backend, digest))
    return cdir


def _cache_meta(info: DatasetInfo, backend: str, digest: str) -> dict[str, Any]:
    """What a cache was made from: the build (plan), the content (files.json's sha256, which holds every data
    file's sha256) and the files' sizes and mtimes at that moment (a cheap test that they are unchanged)."""
    return {"cache_version": CACHE_VERSION, "plan_checksum": info.plan_checksum, "backend": backend,
            "transitions": info.total_transitions, "files_checksum": info.files_checksum, "files_stat": digest}


def _cache_fresh(d: Path, info: DatasetInfo, backend: str, cdir: Path) -> bool:
    from jowa_data.integrity import read_files, stat_digest

    meta_p = cdir / "meta.json"
    if not meta_p.is_file():
        return False
    try:
        meta = json.loads(meta_p.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    digest = stat_digest(d, read_files(d, info), [backend])
    return meta == _cache_meta(info, backend, digest)


def load_cache(dataset_dir: str | Path, backend: str = "zarr", cache_dir: str | Path | None = None,
               progress: bool = False) -> TokenCache:
    """Memory-map the flat cache of `dataset_dir`. It is (re)made, under a lock that other ranks wait on, when
    missing, of another version, or when the dataset's files changed since it was made; making it verifies
    every data file's sha256, so a damaged dataset is refused with the file named, never decoded into zeros."""
    from jowa_common.io import folder_lock

    d = Path(dataset_dir)
    info = read_info(d)
    if backend not in info.formats:
        raise DatasetError(f"{d / 'info.json'}: dataset has no '{backend}' data (formats: {info.formats})")
    cdir = Path(cache_dir) if cache_dir else default_cache_dir(d, backend)
    made = False
    if not _cache_fresh(d, info, backend, cdir):
        with contextlib.ExitStack() as stack:
            try:
                stack.enter_context(folder_lock(cdir, "token cache", wait=True))
            except OSError as e:  # a read-only mount (EROFS), no permission, a file in the way
                raise DatasetError(f"{cdir}: cannot make the token cache there ({e.strerror}); a read-only or "
                                   "shared dataset needs data.cache_dir (a writable folder)") from None
            if not _cache_fresh(d, info, backend, cdir):  # another rank may have made it while we waited
                build_cache(d, backend, cdir, progress=progress)
                made = True
    arrs = {}
    for f in CACHE_FIELDS:
        p = cdir / f"{f}.npy"
        try:
            arrs[f] = np.load(p, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as e:
            raise DatasetError(f"{p}: unreadable token cache ({e}); delete {cdir} to rebuild it") from e
    ep_start, ep_length, ep_game = _episode_table(d, info)
    games = info.game_names
    return TokenCache(**arrs, games=games,
                      task_ids=np.array([info.games[g]["task_id"] for g in games], dtype=np.int64),
                      ep_start=ep_start, ep_length=ep_length, ep_game=ep_game, directory=cdir, made=made)


# --- segment index and epoch order ----------------------------------------------------------------

def segment_index(ep_start: np.ndarray, ep_length: np.ndarray, ep_game: np.ndarray, seq_len: int,
                  stride: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(start row, valid steps 1..L, game) of every segment: starts every `stride` steps in each episode."""
    per_ep = (ep_length + stride - 1) // stride  # starts 0, tau, 2tau, ... < T
    total = int(per_ep.sum())
    ep_of_seg = np.repeat(np.arange(len(ep_length)), per_ep)
    first = np.concatenate([[0], np.cumsum(per_ep)[:-1]]) if len(per_ep) else np.zeros(0, np.int64)
    k = np.arange(total, dtype=np.int64) - np.repeat(first, per_ep)
    starts = ep_start[ep_of_seg] + k * stride
    valid = np.minimum(seq_len, ep_length[ep_of_seg] - k * stride).astype(np.uint8)
    return starts.astype(np.int64), valid, ep_game[ep_of_seg].astype(np.int16)


def game_weights(spec: str | dict[str, float], games: list[str], counts: np.ndarray) -> np.ndarray:
    """Normalised per-game sampling weights from 'uniform', 'proportional' or a {game: weight} dict."""
    if spec == "uniform":
        w = (counts > 0).astype(np.float64)
    elif spec == "proportional":
        w = counts.astype(np.float64)
    elif isinstance(spec, dict):
        unknown = sorted(set(spec) - set(games))
        if unknown:
            raise ConfigError(f"stream weights name games not in the dataset: {unknown} (games: {games})")
        w = np.array([float(spec.get(g, 0.0)) for g in games])
        if (w < 0).any():
            raise ConfigError(f"stream weights must be >= 0, got {spec}")
        w[counts == 0] = 0.0
    else:
        raise ConfigError(f"stream weights must be 'uniform', 'proportional' or a dict, got {spec!r}")
    if w.sum() <= 0:
        raise ConfigError("stream weights give zero weight to every game that has segments")
    return w / w.sum()


def _allocate(total: int, w: np.ndarray) -> np.ndarray:
    """Integer counts summing to `total`, proportional to `w` (largest remainder, ties to lower index)."""
    raw = w * total
    c = np.floor(raw).astype(np.int64)
    rest = total - int(c.sum())
    if rest > 0:
        order = np.argsort(-(raw - c), kind="stable")
        c[order[:rest]] += 1
    return c


def epoch_order(seg_game: np.ndarray, weights: np.ndarray, seed: int, epoch: int) -> np.ndarray:
    """The global segment ids of one epoch, in order (pure function of seed and epoch)."""
    rng = np.random.default_rng([seed, epoch])
    total = len(seg_game)
    counts = _allocate(total, weights)
    idx_dtype = np.int32 if total < 2**31 else np.int64
    by_game = np.argsort(seg_game, kind="stable").astype(idx_dtype)
    bounds = np.searchsorted(seg_game[by_game], np.arange(len(weights) + 1))
    picks = []
    for g, c in enumerate(counts):
        ids = by_game[bounds[g]:bounds[g + 1]]
        if c == 0 or len(ids) == 0:
            continue
        reps = -(-int(c) // len(ids))
        perm = np.concatenate([rng.permutation(len(ids)) for _ in range(reps)])[:c]
        picks.append(ids[perm])
    order = np.concatenate(picks) if picks else np.zeros(0, idx_dtype)
    return order[rng.permutation(len(order))]


def _dist_rank_world() -> tuple[int, int]:
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
    except ImportError:  # pragma: no cover
        pass
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


# --- the stream ---------------------------------------------------------------------------------

class SegmentStream(_torch_iterable_base()):
    """Iterable of dict batches: tokens (B,L,36) long, actions (B,L) long (full ids), rewards (B,L) float,
    ends (B,L) long, mask_padding (B,L) bool, task_ids (B,) long, segment_ids (B,) long.

    One iteration = the rest of the current epoch for this rank (exactly `len(self)` batches from its
    start); in the main process it then moves to the next epoch. With DataLoader workers call
    `set_epoch(e)` each epoch (like DistributedSampler) and restore positions with `load_state_dict`.
    """

    def __init__(self, dataset_dir: str | Path, batch_size: int = 64, seq_len: int = 8, seed: int = 0,
                 rank: int | None = None, world_size: int | None = None, backend: str = "zarr",
                 stride: int = 4, weights: str | dict[str, float] = "uniform", cache_dir: str | Path | None = None,
                 as_torch: bool = True, progress: bool = False, cache: TokenCache | None = None):
        if batch_size < 1 or seq_len < 1 or stride < 1:
            raise ConfigError(f"batch_size, seq_len and stride must be >= 1 (got {batch_size}, {seq_len}, {stride})")
        r, w = _dist_rank_world()
        self.rank = r if rank is None else rank
        self.world_size = w if world_size is None else world_size
        if not 0 <= self.rank < self.world_size:
            raise ConfigError(f"rank {self.rank} is not in [0, {self.world_size})")
        self.dataset_dir = Path(dataset_dir)
        self.batch_size, self.seq_len, self.stride, self.seed = batch_size, seq_len, stride, seed
        self.backend, self.as_torch = backend, as_torch
        self.cache = cache if cache is not None else load_cache(dataset_dir, backend, cache_dir, progress=progress)
        c = self.cache
        self.seg_start, self.seg_valid, self.seg_game = segment_index(c.ep_start, c.ep_length, c.ep_game,
                                                                      seq_len, stride)
        counts = np.bincount(self.seg_game, minlength=len(c.games))
        self.weights = game_weights(weights, c.games, counts)
        self.epoch, self.batch = 0, 0
        self._order_epoch, self._order = -1, None
        self._steps = np.arange(seq_len, dtype=np.int64)

    # size and state
    @property
    def num_segments(self) -> int:
        return len(self.seg_start)

    def __len__(self) -> int:
        """Batches per rank per epoch (equal on every rank)."""
        return self.num_segments // (self.world_size * self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.batch = int(epoch), 0

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "batch": self.batch, "seed": self.seed, "world_size": self.world_size,
                "batch_size": self.batch_size, "seq_len": self.seq_len, "stride": self.stride}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k in ("seed", "world_size", "batch_size", "seq_len", "stride"):
            if k in state and state[k] != getattr(self, k):
                raise ConfigError(f"stream state was saved with {k}={state[k]}, this stream has {getattr(self, k)}; "
                                  "an exact resume needs the same settings")
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])

    # batches
    def _epoch_order(self, epoch: int) -> np.ndarray:
        if self._order_epoch != epoch:
            self._order = epoch_order(self.seg_game, self.weights, self.seed, epoch)
            self._order_epoch = epoch
        return self._order

    def batch_ids(self, epoch: int, i: int) -> np.ndarray:
        """Global segment ids of this rank's batch `i` of `epoch`."""
        j = (i * self.world_size + self.rank) * self.batch_size
        return self._epoch_order(epoch)[j:j + self.batch_size]

    def _tokens(self, rows: np.ndarray, mask: np.ndarray) -> np.ndarray:
        t = self.cache.tokens[rows]  # (B, L, 36) uint16
        t[~mask] = 0
        return t

    def gather(self, ids: np.ndarray) -> dict[str, Any]:
        """The batch of segments `ids` (numpy, or torch tensors if `as_torch`)."""
        c = self.cache
        s = self.seg_start[ids]
        mask = self._steps[None, :] < self.seg_valid[ids][:, None]  # (B, L)
        rows = np.where(mask, s[:, None] + self._steps[None, :], s[:, None])  # padding reads a valid row
        out = {"tokens": self._tokens(rows, mask),
               "actions": np.where(mask, c.actions[rows], 0),
               "rewards": np.where(mask, c.rewards[rows], 0).astype(np.float32),
               "ends": np.where(mask, c.terminals[rows], 0),
               "mask_padding": mask,
               "task_ids": c.task_ids[self.seg_game[ids]],
               "segment_ids": np.asarray(ids, dtype=np.int64)}
        if not self.as_torch:
            return out
        import torch

        return {"tokens": torch.from_numpy(out["tokens"].astype(np.int64)),
                "actions": torch.from_numpy(out["actions"].astype(np.int64)),
                "rewards": torch.from_numpy(out["rewards"]),
                "ends": torch.from_numpy(out["ends"].astype(np.int64)),
                "mask_padding": torch.from_numpy(out["mask_padding"]),
                "task_ids": torch.from_numpy(out["task_ids"]),
                "segment_ids": torch.from_numpy(out["segment_ids"])}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker, nworkers = 0, 1
        try:
            from torch.utils.data import get_worker_info

            wi = get_worker_info()
            if wi is not None:
                worker, nworkers = wi.id, wi.num_workers
        except ImportError:  # pragma: no cover
            pass
        epoch, n = self.epoch, len(self)
        for i in range(self.batch, n):
            if (i - self.batch) % nworkers != worker:
                continue
            batch = self.gather(self.batch_ids(epoch, i))
            if nworkers == 1:
                self.batch = i + 1
            yield batch
        if nworkers == 1:
            self.epoch, self.batch = epoch + 1, 0


class FrameSegmentStream(SegmentStream):
    """The same segments, read as raw frames and tokenized on the fly (the official stage-1 path).

    Frames come from the replay the dataset was built from (paths in `_plan.json`), decoded once into a
    uint8 frame cache (7 KiB per transition); each batch's valid frames go through `tokenizer.encode`.
    Batches equal `SegmentStream`'s when the tokenizer is the one the dataset was built with.
    """

    def __init__(self, dataset_dir: str | Path, tokenizer, *, device: str = "cpu", encode_batch: int = 256,
                 frames_cache_dir: str | Path | None = None, **kw):
        super().__init__(dataset_dir, **kw)
        self.tokenizer, self.device, self.encode_batch = tokenizer, device, encode_batch
        fdir = Path(frames_cache_dir) if frames_cache_dir else Path(dataset_dir) / "_cache" / "frames"
        self.frames = load_frames_cache(dataset_dir, fdir)

    def _tokens(self, rows: np.ndarray, mask: np.ndarray) -> np.ndarray:
        from jowa_data.tokenize import encode_frames

        out = np.zeros(rows.shape + (TOKENS_PER_FRAME,), dtype=np.uint16)
        frames = self.frames[rows[mask]]  # (n_valid, 84, 84)
        out[mask] = encode_frames(self.tokenizer, frames, batch=self.encode_batch, device=self.device)
        return out


def load_frames_cache(dataset_dir: str | Path, cache_dir: Path) -> np.ndarray:
    """(N, 84, 84) uint8 memmap of the dataset's frames, in the dataset's row order (built on first use)."""
    from jowa_data.build import read_task_frames

    d = Path(dataset_dir)
    info = read_info(d)
    p = cache_dir / "frames.npy"
    meta_p = cache_dir / "meta.json"
    if meta_p.is_file() and json.loads(meta_p.read_text()).get("plan_checksum") == info.plan_checksum:
        return np.load(p, mmap_mode="r", allow_pickle=False)
    plan = json.loads((d / PLAN).read_text())
    cache_dir.mkdir(parents=True, exist_ok=True)
    n = info.total_transitions
    with atomic_path(p, suffix=".npy") as tmp:
        mm = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(n, 84, 84))
        i = 0
        for t in sorted(plan["tasks"], key=lambda t: (t["game"], t["key"])):
            frames = read_task_frames({**t, "replay_root": plan["replay_root"]})[0]
            mm[i:i + len(frames)] = frames
            i += len(frames)
        mm.flush()
        del mm
        if i != n:
            raise DatasetError(f"{d / PLAN}: the replay gives {i} frames, info.json says {n} transitions")
    atomic_write_json(meta_p, {"plan_checksum": info.plan_checksum, "transitions": n})
    return np.load(p, mmap_mode="r", allow_pickle=False)
