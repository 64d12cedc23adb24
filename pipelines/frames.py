"""Frames for tokenizer training: read once from an episode index, cached as one .npy, sampled by position.

Why a cache: DQN-Replay observations sit in gzip'd .npy files, which can only be streamed, not indexed. The
tokenizer samples single frames uniformly, so we materialise the selected episodes' frames once into a
uint8 (N, 84, 84) .npy (atomic write) that training memory-maps. 1M frames = 7 GB on disk.
The sampler walks seeded permutations epoch by epoch; its state (epoch, position) is two integers, which is
what makes resume-after-kill give exactly the same next batch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from jowa_common.errors import DatasetError, ReplayFormatError
from jowa_common.io import atomic_path, atomic_write_json

FRAME_SHAPE = (84, 84)


def open_frames(path: str | Path) -> np.ndarray:
    """Memory-map a uint8 (N, 84, 84) frames .npy (no pickle), checking dtype and shape."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: frames file not found")
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as e:
        raise DatasetError(f"{path}: not a readable .npy frames file ({e})") from e
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[1:] != FRAME_SHAPE:
        raise DatasetError(f"{path}: frames must be uint8 (N, 84, 84), got {arr.dtype} {arr.shape}")
    if arr.shape[0] == 0:
        raise DatasetError(f"{path}: frames file holds no frames")
    return arr


def index_episodes(index_path: str | Path, games: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Episodes of an `episodes.parquet` index (optionally only `games`), in index order."""
    from jowa_data.subsample import index_metadata, read_index

    table = read_index(index_path)
    meta = index_metadata(table, str(index_path))
    cols = table.select(["game", "run", "episode", "ckpt", "row", "length"]).to_pylist()
    if games:
        unknown = sorted(set(games) - {r["game"] for r in cols})
        if unknown:
            raise DatasetError(f"{index_path}: no episodes of {unknown} in this index")
        cols = [r for r in cols if r["game"] in set(games)]
    for r in cols:
        r["checkpoints"] = tuple(meta["games"][r["game"]]["checkpoints"])
    return cols


def materialize_frames(index_path: str | Path, replay_root: str | Path, out: str | Path, max_frames: int = 0,
                       games: Sequence[str] = (), progress: Callable[[int], None] | None = None,
                       cache: str | None = None) -> Path:
    """Write the frames of the indexed episodes (index order, capped at `max_frames` if > 0) to `out` (.npy).

    With a cap, each game contributes at most an equal share, so a two-game run sees both games.
    """
    from jowa_data.replay import read_episode
    from jowa_data.roots import open_root
    from jowa_data.subsample import scan_range

    root = open_root(replay_root, cache)  # a local folder or an fsspec URL (gs://, s3://, https://, ...)
    eps = index_episodes(index_path, games)
    if not eps:
        raise DatasetError(f"{index_path}: the index selects no episodes")
    by_game: dict[str, list[dict]] = {}
    for e in eps:
        by_game.setdefault(e["game"], []).append(e)
    share = max_frames // len(by_game) if max_frames > 0 else 0
    plan: list[tuple[dict, int]] = []  # (episode, frames to take)
    for game_eps in by_game.values():
        left = share if share else None
        for e in game_eps:
            take = e["length"] if left is None else min(e["length"], left)
            if take <= 0:
                break
            plan.append((e, take))
            if left is not None:
                left -= take
    total = sum(t for _, t in plan)
    segments, start = [], 0  # which rows hold which game: the tokenizer's per-game backgrounds need it
    for game in by_game:
        n = sum(t for e, t in plan if e["game"] == game)
        segments.append({"game": game, "start": start, "stop": start + n})
        start += n
    atomic_write_json(segments_path(out), {"segments": segments})  # before the .npy, whose presence means done
    refs_cache: dict[tuple[str, int], dict[int, Any]] = {}
    with atomic_path(out, suffix=".npy") as tmp:
        arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(total, *FRAME_SHAPE))
        i = 0
        for e, take in plan:
            key = (e["game"], e["run"])
            if key not in refs_cache:
                refs, _ = scan_range(root, e["game"], e["run"], e["checkpoints"])
                refs_cache = {key: {int(r.episode): r for r in refs}}  # keep one run's refs in memory
            ref = refs_cache[key].get(e["episode"])
            where = f"{root}/{e['game']}/{e['run']}"
            if ref is None or tuple(ref.start) != (e["ckpt"], e["row"]) or int(ref.length) != e["length"]:
                raise DatasetError(f"{where}: episode {e['episode']} (ckpt {e['ckpt']}, row {e['row']}) is not in "
                                   f"the replay as indexed by {index_path}; rebuild the index")
            frames = read_episode(root, ref).frames
            if frames.shape != (e["length"], *FRAME_SHAPE):
                raise ReplayFormatError(f"{where}: episode {e['episode']}: frames {frames.shape}, "
                                        f"expected ({e['length']}, 84, 84)")
            arr[i:i + take] = frames[:take]
            i += take
            if progress is not None:
                progress(take)
        arr.flush()
        del arr
    return Path(out)


def segments_path(frames_path: str | Path) -> Path:
    """Where `materialize_frames` records which rows of FRAMES.npy hold which game: FRAMES.games.json."""
    p = Path(frames_path)
    return p.with_name(p.stem + ".games.json")


def frame_games(n: int, frames_path: str | Path) -> list[tuple[int, int]]:
    """The (start, stop) rows of each game in a frames file of `n` rows, from its games record (`segments_path`);
    a frames file without one counts as one game."""
    import json

    p = segments_path(frames_path)
    segs = json.loads(p.read_text(encoding="utf-8"))["segments"] if p.is_file() else [{"start": 0, "stop": n}]
    if segs and (segs[0]["start"] != 0 or segs[-1]["stop"] != n):
        raise DatasetError(f"{p}: its segments cover rows {segs[0]['start']}..{segs[-1]['stop']}, the frames file "
                           f"{frames_path} holds {n}")
    return [(int(s["start"]), int(s["stop"])) for s in segs]


def game_of_rows(n: int, frames_path: str | Path) -> np.ndarray:
    """(N,) int: the game (index into `frame_games`) of each row."""
    game_of = np.zeros(n, dtype=np.int64)
    for g, (a, b) in enumerate(frame_games(n, frames_path)):
        game_of[a:b] = g
    return game_of


def frame_backgrounds(frames: np.ndarray, frames_path: str | Path, sample: int = 512) -> np.ndarray:
    """Each game's background (per-pixel median of up to `sample` evenly spaced frames): (G, 84, 84) uint8, in
    the order of `frame_games`. Atari backgrounds are static, so the median frame is the screen without its
    sprites."""
    bgs = []
    for a, b in frame_games(frames.shape[0], frames_path):
        idx = np.unique(np.linspace(a, b - 1, num=min(sample, b - a)).astype(np.int64))
        bgs.append(np.median(np.asarray(frames[idx]), axis=0).astype(np.uint8))
    return np.stack(bgs)


class FrameSampler:
    """Batches of frame positions: epoch e is `default_rng([seed, e]).permutation(n)`, cut into batches.

    A batch never straddles two epochs' permutations in an order-dependent way: when fewer than
    `batch_size` positions are left, the batch takes them and continues with the next epoch.
    """

    def __init__(self, n: int, batch_size: int, seed: int = 0) -> None:
        if n <= 0 or batch_size <= 0:
            raise ValueError(f"need n > 0 and batch_size > 0, got n={n}, batch_size={batch_size}")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.epoch, self.pos = 0, 0
        self._perm: np.ndarray | None = None

    def _permutation(self) -> np.ndarray:
        if self._perm is None:
            self._perm = np.random.default_rng([self.seed, self.epoch]).permutation(self.n)
        return self._perm

    def next_indices(self) -> np.ndarray:
        out: list[np.ndarray] = []
        need = self.batch_size
        while need:
            perm = self._permutation()
            take = perm[self.pos:self.pos + need]
            out.append(take)
            need -= len(take)
            self.pos += len(take)
            if self.pos >= self.n:
                self.epoch, self.pos, self._perm = self.epoch + 1, 0, None
        return np.concatenate(out)

    def state_dict(self) -> dict[str, int]:
        return {"n": self.n, "batch_size": self.batch_size, "seed": self.seed, "epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, d: dict[str, int]) -> None:
        if (int(d["n"]), int(d["batch_size"]), int(d["seed"])) != (self.n, self.batch_size, self.seed):
            raise DatasetError(f"sampler state is for n={d['n']}, batch_size={d['batch_size']}, seed={d['seed']}; "
                               f"this run has n={self.n}, batch_size={self.batch_size}, seed={self.seed}")
        self.epoch, self.pos, self._perm = int(d["epoch"]), int(d["pos"]), None


def gather(frames: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """frames[idx] read in sorted order (memmap locality), returned in `idx` order."""
    order = np.argsort(idx, kind="stable")
    out = np.empty((len(idx), *frames.shape[1:]), dtype=frames.dtype)
    out[order] = frames[idx[order]]
    return out
