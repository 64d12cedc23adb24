"""DQN-Replay reader: Dopamine checkpoint logs → episodes of (frame, action, reward, terminal).

On disk (docs/dqn_replay_format.md §1): `<root>/<Game>/<run>/replay_logs/` holds, per suffix N,
`$store$_{observation,action,reward,terminal}_ckpt.N.gz`, `add_count_ckpt.N.gz`, `invalid_range_ckpt.N.gz`:
gzip'd `.npy` dumps of a circular buffer of capacity `cap` (1M rows in DQN-Replay).

Why it is not just `np.load`:
- Validity (Dopamine's `is_full()` rule): with `n = add_count`, a buffer that has not wrapped holds `arr[:n]`;
  one that has wrapped holds `concat(arr[c:], arr[:c])` with `c = n % cap`, oldest first. Valid streams of
  consecutive suffixes concatenate into one gapless stream, so episodes straddle files.
  The final log of a run (`log_final_buffer`) stores `add_count = cursor < cap`: its new rows are slot
  `cap-1` (the add right after the previous log, the same slot full logs put first) then `arr[:cursor]`.
- Padding: Dopamine writes 3 zero rows before every episode (frame stacking). They are dropped *by position*
  (the 3 rows after each terminal, and at the start of suffix 0), never by pixel value: real frames can be black.
- A stream that starts after suffix 0 (JOWA reads 1..50) starts mid-episode unless the previous suffix, when it
  is on disk, shows a terminal within its last rows. Rows before the first known episode start are a
  fragment with no beginning: they are dropped and counted (`RunScan.dropped_rows`).
- Memory: an observation file is 7 GB decompressed. Frames are streamed from the gzip stream after parsing the
  `.npy` header (`jowa_data.npy_stream`), in chunks, straight into per-episode buffers.

Cost model: `scan_run` reads only the small files (~9 MB decompressed per suffix). `iter_episodes` decompresses
each observation file once, sequentially (the fast path for whole runs). `read_episode` / `read_frames`
decompress each needed file from its start up to the last needed row (gzip cannot seek): random access to
single episodes costs up to one full file decode each; batch them with `read_frames` or `iter_episodes(refs=)`.
Roots may be local paths or fsspec URLs (`memory://`, `file://`, `gs://` with gcsfs, ...).
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import re
from dataclasses import dataclass, field
from typing import IO, Iterable, Iterator, Sequence

import numpy as np

from jowa_common.errors import JowaError, ReplayFormatError
from jowa_data.npy_stream import (
    DECODERS,
    NpyHeader,
    check_end,
    check_header,
    iter_chunks,
    read_header,
    read_small,
    resolve_decoder,
    wrap_gz,
)
from jowa_data.roots import STREAM_BLOCK, ReplayRoot, Root, open_root

STORE_KINDS = ("observation", "action", "reward", "terminal")
REQUIRED_KINDS = (*STORE_KINDS, "add_count")  # invalid_range is optional: checked when present
FRAME_SHAPE = (84, 84)  # Dopamine preprocessing: 84x84 grayscale (docs/dqn_replay_format.md §4)
STACK_PADDING = 3  # zero rows Dopamine adds before each episode: stack_size 4 - 1
UPDATE_HORIZON = 1  # invalid_range = stack_size + update_horizon slots
_DTYPES = {"observation": np.uint8, "action": np.int32, "reward": np.float32, "terminal": np.uint8}
_NAME_RE = re.compile(r"^(?:\$store\$_)?(observation|action|reward|terminal|add_count|invalid_range)_ckpt\.(\d+)\.gz$")

__all__ = [
    "Episode", "EpisodeRef", "RunScan", "DECODERS", "file_name", "list_checkpoints", "list_games", "list_runs",
    "open_gz", "scan_run", "inspect_run", "read_episode", "iter_episodes", "read_frames", "run_logs",
    "root_folder", "game_folder", "checkpoint_files", "folder_sizes", "load_checkpoint", "ReplayRoot", "open_root",
]


def file_name(kind: str, ckpt: int) -> str:
    """Dopamine's file name for `kind` (one of STORE_KINDS, add_count, invalid_range) at suffix `ckpt`."""
    prefix = "$store$_" if kind in STORE_KINDS else ""
    return f"{prefix}{kind}_ckpt.{ckpt}.gz"


# ---------------------------------------------------------------------------------------------- locations

class _Loc:
    """A folder on the local disk or behind fsspec: listing, opening, names for messages.

    Local folders use `os` directly (unchanged fast path). Remote calls that fail for another reason than a
    missing file (no network, access denied, a server error) become one-line ReplayFormatErrors naming the URL.
    """

    def __init__(self, root: "str | os.PathLike | ReplayRoot", *parts: str):
        self.root = open_root(root)
        self.fs = self.root.fs
        self.path = posixpath.join(self.root.path, *parts) if self.fs else os.path.join(self.root.path, *parts)
        self.rel = tuple(parts)

    def child(self, *parts: str) -> "_Loc":
        c = object.__new__(_Loc)
        c.root, c.fs, c.rel = self.root, self.fs, self.rel + tuple(parts)
        c.path = posixpath.join(self.path, *parts) if self.fs else os.path.join(self.path, *parts)
        return c

    def __str__(self) -> str:
        return posixpath.join(self.root.url, *self.rel) if self.fs else self.path

    def _remote(self, what: str, fn):
        """Run a filesystem call; failures other than FileNotFoundError become a ReplayFormatError."""
        try:
            return fn()
        except (FileNotFoundError, JowaError):
            raise
        except Exception as e:  # noqa: BLE001 - network/auth/server errors of any fsspec backend
            msg = " ".join(str(e).split()) or type(e).__name__
            raise ReplayFormatError(f"{self}: cannot {what} ({type(e).__name__}: {msg[:300]})") from e

    def is_dir(self) -> bool:
        if not self.fs:
            return os.path.isdir(self.path)
        try:
            return bool(self._remote("read this folder", lambda: self.root.meta.isdir(self.path)))
        except FileNotFoundError:
            return False

    def listdir(self) -> list[str]:
        if not self.fs:
            return sorted(os.listdir(self.path))
        names = self._remote("list this folder", lambda: self.root.meta.ls(self.path, detail=False))
        out = {posixpath.basename(str(p).rstrip("/")) for p in names}
        if self.root.quoted_listing:
            from urllib.parse import unquote

            out = {unquote(n) for n in out}
        return sorted(n for n in out if n)

    def sizes(self) -> dict[str, int]:
        """name -> size in bytes of the files in this folder (sub-folders left out)."""
        return {n: int(e["size"]) for n, e in self.file_infos().items()}

    def file_infos(self) -> dict[str, dict]:
        """name -> what the listing says of each file (`size` always; remote stores add their checksums, e.g.
        GCS `md5Hash`, S3 `ETag`). One listing request (http: plus one HEAD per file, for the size)."""
        if not self.fs:
            return {n: {"size": os.path.getsize(os.path.join(self.path, n))} for n in sorted(os.listdir(self.path))
                    if os.path.isfile(os.path.join(self.path, n))}
        out = {}
        for e in self._remote("list this folder", lambda: self.root.meta.ls(self.path, detail=True)):
            if e.get("type") != "file":
                continue
            n = posixpath.basename(str(e["name"]).rstrip("/"))
            if self.root.quoted_listing:
                from urllib.parse import unquote

                n = unquote(n)
            if e.get("size") is None:  # http listings carry no sizes: ask the server (HEAD)
                c = self.child(n)
                e = {**e, "size": c._remote("read the size", lambda: c.root.meta.size(c.path))}
            out[n] = {**e, "size": int(e["size"] or 0)}
        return dict(sorted(out.items()))

    def open_raw(self, name: str) -> IO[bytes]:
        """`<this folder>/<name>` as stored (no decompression), streamed; FileNotFoundError when absent."""
        loc = self.child(name)
        if not loc.fs:
            return open(loc.path, "rb")
        return loc._remote("open this file", lambda: loc.fs.open(loc.path, "rb", block_size=STREAM_BLOCK))

    def open_gz(self, name: str, decoder: str) -> contextlib.AbstractContextManager[IO[bytes]]:
        """Open `<this folder>/<name>` decompressed; a missing file is a ReplayFormatError.

        Remote files are streamed: fsspec reads `STREAM_BLOCK` bytes ahead, nothing else is kept."""
        loc = self.child(name)

        @contextlib.contextmanager
        def cm() -> Iterator[IO[bytes]]:
            with contextlib.ExitStack() as stack:
                try:
                    if loc.fs:
                        raw = stack.enter_context(loc._remote(
                            "open this file", lambda: loc.fs.open(loc.path, "rb", block_size=STREAM_BLOCK)))
                        f = wrap_gz(raw, decoder)
                    else:
                        f = wrap_gz(loc.path, decoder)
                except FileNotFoundError as e:
                    raise ReplayFormatError(f"{loc}: file not found") from e
                stack.callback(f.close)
                yield f

        return cm()


def _run_dir(root: Root, game: str, run: int | str) -> _Loc:
    """`<root>/<game>/<run>/replay_logs`, with errors that say which level is missing and what exists."""
    top = _Loc(root)
    if not top.is_dir():
        raise ReplayFormatError(f"{top}: replay root folder not found")
    g = top.child(game)
    if not g.is_dir():
        games = ", ".join(list_games(root)) or "none"
        raise ReplayFormatError(f"{g}: unknown game {game!r} in this replay root (games found: {games})")
    r = g.child(str(run))
    if not r.is_dir():
        runs = ", ".join(n for n in g.listdir() if g.child(n).is_dir()) or "none"
        raise ReplayFormatError(f"{r}: no run {run!r} for game {game} (runs found: {runs})")
    logs = r.child("replay_logs")
    if not logs.is_dir():
        raise ReplayFormatError(f"{logs}: folder not found (expected Dopamine logs under <run>/replay_logs)")
    return logs


def list_games(root: Root) -> list[str]:
    """Game folders under a replay root (sorted)."""
    top = _Loc(root)
    return [n for n in top.listdir() if not n.startswith(".") and top.child(n).is_dir()]


def root_folder(root: Root) -> "_Loc":
    """The replay root itself as the reader opens it (`.is_dir()`, `.listdir()`, `str()` for messages)."""
    return _Loc(root)


def game_folder(root: Root, game: str) -> "_Loc":
    """`<root>/<game>` as the reader opens it: `.is_dir()`, `.listdir()`; `str()` names it in messages."""
    return _Loc(root, game)


def list_runs(root: Root, game: str) -> list[str]:
    """Run folders of a game that hold `replay_logs` (sorted as strings)."""
    g = _Loc(root, game)
    if not g.is_dir():
        raise ReplayFormatError(f"{g}: unknown game {game!r} in this replay root")
    return [n for n in g.listdir() if g.child(n, "replay_logs").is_dir()]


def _listing(logs: _Loc) -> dict[int, set[str]]:
    """suffix → kinds present. Files we do not need (episode_end_indices pickles, temp files) are ignored."""
    out: dict[int, set[str]] = {}
    for name in logs.listdir():
        m = _NAME_RE.match(name)
        if m:
            out.setdefault(int(m.group(2)), set()).add(m.group(1))
    return out


def run_logs(root: Root, game: str, run: int | str) -> "_Loc":
    """A run's `replay_logs` folder as the reader opens it (local path or fsspec URL): `.child(name)`, `.listdir()`,
    `.open_gz(name, decoder)`; `str()` names it in messages."""
    return _run_dir(root, game, run)


def folder_sizes(logs: "_Loc") -> dict[str, int]:
    """File name -> bytes of every file in a run's `replay_logs` (local stat, or the remote listing's sizes)."""
    return logs.sizes()


def checkpoint_files(logs: "_Loc") -> dict[int, set[str]]:
    """Checkpoint suffix -> the kinds of file present (observation, action, ..., add_count, invalid_range)."""
    return _listing(logs)


def load_checkpoint(logs: "_Loc", ckpt: int, kinds: set[str], decoder: str = "auto"):
    """Read and check one checkpoint's small files: (validity: `.capacity`, `.add_count`, `.segments`; the valid
    rows of action/reward/terminal, oldest first). Raises ReplayFormatError naming the file."""
    return _load_small(logs, ckpt, kinds, resolve_decoder(decoder))


def list_checkpoints(root: Root, game: str, run: int | str) -> list[int]:
    """Checkpoint suffixes present in the run's `replay_logs` (by listing; some runs lack 50, some start late)."""
    return sorted(_listing(_run_dir(root, game, run)))


def open_gz(path: str | os.PathLike, decoder: str = "auto") -> contextlib.AbstractContextManager[IO[bytes]]:
    """Open one gzip file (local path or fsspec URL) for streaming reads with the chosen decoder.

    "auto" = isal when installed (fastest measured), else the stdlib. Use as a context manager.
    """
    path = os.fspath(path)
    if "://" in path:
        proto, rest = path.split("://", 1)
        parent, name = posixpath.split(rest)
        return _Loc(f"{proto}://{parent}").open_gz(name, decoder)
    parent, name = os.path.split(path)
    return _Loc(parent or ".").open_gz(name, decoder)


# ---------------------------------------------------------------------------------------------- checkpoints

@dataclass(frozen=True)
class _Ckpt:
    """One suffix's validity: `segments` are file-row ranges [lo, hi) in valid (oldest-first) order."""

    ckpt: int
    add_count: int
    capacity: int
    segments: tuple[tuple[int, int], ...]

    @property
    def n_valid(self) -> int:
        return sum(hi - lo for lo, hi in self.segments)

    @property
    def is_final(self) -> bool:
        """A `log_final_buffer` dump: add_count was replaced by the cursor (only suffix 0 may be < cap otherwise)."""
        return self.add_count < self.capacity and self.ckpt > 0

    def file_ranges(self, vlo: int, vhi: int) -> list[tuple[int, int, int]]:
        """Map valid rows [vlo, vhi) to file-row pieces `(file_lo, file_hi, offset_within_request)`."""
        out, base = [], 0
        for lo, hi in self.segments:
            a, b = max(vlo, base), min(vhi, base + hi - lo)
            if a < b:
                out.append((lo + a - base, lo + b - base, a - vlo))
            base += hi - lo
        return out


def _segments(n: int, cap: int, ckpt: int) -> tuple[tuple[int, int], ...]:
    """Dopamine's validity rule (docs/dqn_replay_format.md §3), including the final log of a run."""
    if n >= cap:
        c = n % cap
        return tuple(s for s in ((c, cap), (0, c)) if s[0] < s[1])
    if ckpt == 0:
        return ((0, n),) if n > 0 else ()
    # Final log (add_count := cursor). The previous log left the cursor at cap-1, so slot cap-1 holds the first
    # add after it, then slots [0, cursor). cursor == cap-1: nothing was added since the previous log.
    return () if n == cap - 1 else ((cap - 1, cap), (0, n))


def _read_add_count(logs: _Loc, ckpt: int, decoder: str) -> int:
    name = file_name("add_count", ckpt)
    with logs.open_gz(name, decoder) as f:
        h, a = read_small(f, f"{logs.child(name)}")
    check_header(h, str(logs.child(name)), np.int64, (), ndim=0)
    n = int(a)
    if n < 0:
        raise ReplayFormatError(f"{logs.child(name)}: negative add_count {n}")
    return n


def _check_invalid_range(logs: _Loc, ckpt: int, n: int, cap: int, decoder: str) -> None:
    """Dopamine's invalid_range = [(cursor - 1 + i) % cap for i in range(5)]; disagreement means mixed files."""
    name = file_name("invalid_range", ckpt)
    with logs.open_gz(name, decoder) as f:
        h, a = read_small(f, str(logs.child(name)))
    size = STACK_PADDING + 1 + UPDATE_HORIZON
    check_header(h, str(logs.child(name)), np.int64, ())
    if h.shape != (size,):
        raise ReplayFormatError(f"{logs.child(name)}: shape {h.shape} (expected ({size},))")
    if n == 0:
        return
    cursor = n % cap
    want = [(cursor - UPDATE_HORIZON + i) % cap for i in range(size)]
    if a.tolist() != want:
        raise ReplayFormatError(
            f"{logs.child(name)}: invalid_range {a.tolist()} disagrees with add_count {n} (cursor {cursor}, "
            f"expected {want}): files of different checkpoints mixed?")


def _load_small(logs: _Loc, ckpt: int, kinds: set[str], decoder: str,
                fields: Sequence[str] = ("action", "reward", "terminal")) -> tuple[_Ckpt, dict[str, np.ndarray]]:
    """Read the small files of one suffix, check them, return its validity and the valid-ordered arrays."""
    missing = [file_name(k, ckpt) for k in REQUIRED_KINDS if k not in kinds]
    if missing:
        raise ReplayFormatError(f"{logs}: checkpoint {ckpt} is missing companion file(s): {', '.join(missing)}")
    arrays: dict[str, np.ndarray] = {}
    cap = None
    for kind in fields:
        name = file_name(kind, ckpt)
        where = str(logs.child(name))
        with logs.open_gz(name, decoder) as f:
            h, a = read_small(f, where)
        check_header(h, where, _DTYPES[kind], ())
        if cap is None:
            cap = h.rows
        elif h.rows != cap:
            raise ReplayFormatError(f"{where}: {h.rows} rows, but {file_name(fields[0], ckpt)} has {cap}")
        arrays[kind] = a
    n = _read_add_count(logs, ckpt, decoder)
    if cap == 0:
        raise ReplayFormatError(f"{logs.child(file_name(fields[0], ckpt))}: empty buffer (0 rows)")
    if "invalid_range" in kinds:
        _check_invalid_range(logs, ckpt, n, cap, decoder)
    info = _Ckpt(ckpt, n, cap, _segments(n, cap, ckpt))
    if "terminal" in arrays and arrays["terminal"].size and arrays["terminal"].max() > 1:
        raise ReplayFormatError(f"{logs.child(file_name('terminal', ckpt))}: values other than 0/1")
    if "reward" in arrays and not np.isfinite(arrays["reward"]).all():
        raise ReplayFormatError(f"{logs.child(file_name('reward', ckpt))}: non-finite rewards")
    valid = {k: np.concatenate([a[lo:hi] for lo, hi in info.segments]) if info.segments else a[:0]
             for k, a in arrays.items()}
    return info, valid


def _continuity(prev: _Ckpt, cur: _Ckpt, logs: _Loc) -> str | None:
    """None if `cur`'s valid stream continues `prev`'s exactly; else a description of the gap."""
    if cur.ckpt != prev.ckpt + 1:
        missing = list(range(prev.ckpt + 1, cur.ckpt))
        what = f"suffix {missing[0]}" if len(missing) == 1 else f"suffixes {missing[0]}..{missing[-1]}"
        return f"checkpoints {prev.ckpt} and {cur.ckpt} are not contiguous ({what} missing)"
    if prev.is_final or (prev.ckpt == 0 and prev.add_count < prev.capacity - 1):
        raise ReplayFormatError(
            f"{logs.child(file_name('add_count', prev.ckpt))}: add_count {prev.add_count} marks the run's final log, "
            f"but checkpoint {cur.ckpt} follows it")
    if cur.capacity != prev.capacity:
        raise ReplayFormatError(f"{logs}: capacity changes from {prev.capacity} (ckpt {prev.ckpt}) to "
                                f"{cur.capacity} (ckpt {cur.ckpt})")
    if cur.is_final:
        return None  # its first row is the add right after prev's log, by construction
    start = cur.add_count - cur.n_valid  # the add index of cur's oldest valid row
    if start < prev.add_count:
        raise ReplayFormatError(
            f"{logs.child(file_name('add_count', cur.ckpt))}: add_count {cur.add_count} overlaps checkpoint "
            f"{prev.ckpt} (add_count {prev.add_count}); checkpoints out of order or duplicated")
    if start > prev.add_count:
        return (f"{start - prev.add_count} transitions were never logged between checkpoints {prev.ckpt} "
                f"(add_count {prev.add_count}) and {cur.ckpt} (add_count {cur.add_count})")
    return None


# ---------------------------------------------------------------------------------------------- episodes

@dataclass(frozen=True, eq=False)
class EpisodeRef:
    """Where one episode lies in a run, plus its small per-step arrays (no frames).

    `start` = (ckpt, row) of the first real row, `row` counted in the *valid-ordered* stream of that ckpt.
    `spans` = ((ckpt, valid_start, valid_stop), ...) for each checkpoint it touches, in order.
    `episode` numbers episodes in the scanned stream (so it depends on the checkpoints scanned).
    """

    game: str
    run: int | str
    episode: int
    start: tuple[int, int]
    length: int  # real rows (padding excluded)
    ret: float  # sum of clipped rewards
    complete: bool  # ends with a terminal (False: cut at the end of the data or at a gap)
    actions: np.ndarray  # (T,) int32, minimal-action-set ids
    rewards: np.ndarray  # (T,) float32, clipped
    terminals: np.ndarray  # (T,) uint8
    spans: tuple[tuple[int, int, int], ...] = ()

    @property
    def checkpoints(self) -> tuple[int, ...]:
        return tuple(s[0] for s in self.spans)


@dataclass(frozen=True, eq=False)
class Episode:
    """An EpisodeRef with its frames: row t is (frames[t], actions[t], rewards[t], terminals[t])."""

    ref: EpisodeRef
    frames: np.ndarray  # (T, 84, 84) uint8

    def __getattr__(self, name: str):  # ref fields read through: ep.actions, ep.length, ...
        if name == "ref":
            raise AttributeError(name)
        return getattr(self.ref, name)


@dataclass
class RunScan:
    """Episodes of a run plus what the scan dropped, for stats and sanity checks."""

    game: str
    run: int | str
    checkpoints: list[int]
    episodes: list[EpisodeRef] = field(default_factory=list)
    rows: int = 0  # valid rows read, padding and fragments included
    padding_rows: int = 0  # Dopamine's zero rows before each episode
    dropped_rows: int = 0  # rows of episode fragments with no start in the scanned stream
    gaps: list[str] = field(default_factory=list)  # where stitching restarted (allow_gaps=True)

    def to_dict(self) -> dict:
        eps = self.episodes
        return {"game": self.game, "run": self.run, "checkpoints": self.checkpoints, "rows": self.rows,
                "padding_rows": self.padding_rows, "dropped_rows": self.dropped_rows, "gaps": self.gaps,
                "episodes": len(eps), "complete_episodes": sum(e.complete for e in eps),
                "transitions": sum(e.length for e in eps),
                "mean_return": float(np.mean([e.ret for e in eps])) if eps else 0.0,
                "mean_length": float(np.mean([e.length for e in eps])) if eps else 0.0}


class _Stitcher:
    """Walks the concatenated valid stream, drops padding by position, and cuts episodes at terminals."""

    def __init__(self, scan: RunScan, logs: _Loc):
        self.scan, self.logs = scan, logs
        self.pad_left = 0  # padding rows still expected
        self.fragment = True  # inside rows that belong to an episode whose start we did not see
        self.pieces: list[tuple[int, int, int, dict[str, np.ndarray]]] = []

    def start_clean(self, pad_left: int) -> None:
        self.pad_left, self.fragment = pad_left, False

    def restart(self, why: str) -> None:
        """A gap: the open episode is cut (complete=False), and what follows is a fragment."""
        self.flush(complete=False)
        self.scan.gaps.append(why)
        self.pad_left, self.fragment = 0, True

    def flush(self, complete: bool) -> None:
        if not self.pieces:
            return
        arr = {k: np.concatenate([p[3][k] for p in self.pieces]) for k in ("action", "reward", "terminal")}
        spans = tuple((c, lo, hi) for c, lo, hi, _ in self.pieces)
        self.scan.episodes.append(EpisodeRef(
            game=self.scan.game, run=self.scan.run, episode=len(self.scan.episodes), start=spans[0][:2],
            length=int(arr["action"].shape[0]), ret=float(arr["reward"].sum(dtype=np.float64)), complete=complete,
            actions=arr["action"], rewards=arr["reward"], terminals=arr["terminal"], spans=spans))
        self.pieces = []

    def feed(self, info: _Ckpt, v: dict[str, np.ndarray]) -> None:
        term = v["terminal"]
        n = term.shape[0]
        ends = np.flatnonzero(term)
        self.scan.rows += n
        pos = 0
        while pos < n:
            if self.pad_left:
                k = min(self.pad_left, n - pos)
                if term[pos:pos + k].any() or v["action"][pos:pos + k].any() or v["reward"][pos:pos + k].any():
                    r = pos + int(np.flatnonzero(term[pos:pos + k] | (v["action"][pos:pos + k] != 0)
                                                 | (v["reward"][pos:pos + k] != 0))[0])
                    raise ReplayFormatError(
                        f"{self.logs}: checkpoint {info.ckpt}, valid row {r}: expected one of Dopamine's zero "
                        f"padding rows after a terminal, found action={v['action'][r]} reward={v['reward'][r]} "
                        f"terminal={term[r]} (files misaligned or not Dopamine logs)")
                self.pad_left -= k
                self.scan.padding_rows += k
                pos += k
                continue
            i = np.searchsorted(ends, pos)
            stop = int(ends[i]) + 1 if i < len(ends) else n
            if self.fragment:
                self.scan.dropped_rows += stop - pos
            else:
                self.pieces.append((info.ckpt, pos, stop, {k: a[pos:stop] for k, a in v.items()}))
            pos = stop
            if i < len(ends):  # a terminal: the episode (or fragment) ends, padding follows
                if not self.fragment:
                    self.flush(complete=True)
                self.fragment, self.pad_left = False, STACK_PADDING


def _lookbehind(logs: _Loc, listing: dict[int, set[str]], first: _Ckpt, st: _Stitcher, decoder: str) -> None:
    """Decide how a stream starting at suffix k > 0 begins, from suffix k-1's terminals when it is on disk."""
    prev_k = first.ckpt - 1
    kinds = listing.get(prev_k, set())
    if not {"terminal", "add_count"} <= kinds:
        return  # unknown: stays a fragment until the first terminal
    prev, v = _load_small(logs, prev_k, kinds | set(REQUIRED_KINDS), decoder, fields=("terminal",))
    try:
        if _continuity(prev, first, logs) is not None:
            return
    except ReplayFormatError:
        return  # the previous suffix does not fit; do not guess
    ends = np.flatnonzero(v["terminal"])
    if len(ends) == 0:
        return
    after = v["terminal"].shape[0] - 1 - int(ends[-1])  # rows after the last terminal (padding first)
    if after <= STACK_PADDING:
        st.start_clean(STACK_PADDING - after)


def inspect_run(root: Root, game: str, run: int | str, checkpoints: Iterable[int] | None = None,
                allow_gaps: bool = False, decoder: str = "auto") -> RunScan:
    """Scan a run's small files: episodes (with actions/rewards/terminals) and drop statistics.

    `checkpoints`: suffixes to read (default: all listed). They must be contiguous, and consecutive add_counts
    must continue each other, unless `allow_gaps` (then stitching restarts after each gap, see `RunScan.gaps`).
    Never opens observation files (it only checks that they are listed).
    """
    decoder = resolve_decoder(decoder)
    logs = _run_dir(root, game, run)
    listing = _listing(logs)
    if not listing:
        raise ReplayFormatError(f"{logs}: no DQN-Replay checkpoint files (*_ckpt.N.gz)")
    if checkpoints is None:
        sel = sorted(listing)
    else:
        sel = sorted(set(int(c) for c in checkpoints))
        absent = [c for c in sel if c not in listing]
        if absent:
            raise ReplayFormatError(f"{logs}: checkpoint(s) {absent} not found (present: {sorted(listing)})")
    scan = RunScan(game=game, run=run, checkpoints=sel)
    st = _Stitcher(scan, logs)
    prev: _Ckpt | None = None
    for k in sel:
        info, v = _load_small(logs, k, listing[k], decoder)
        if prev is None:
            if k == 0:
                if info.add_count <= info.capacity:  # holds add 0 onwards (a skipped first log does not)
                    st.start_clean(STACK_PADDING)
            else:
                _lookbehind(logs, listing, info, st, decoder)
        else:
            gap = _continuity(prev, info, logs)
            if gap is not None:
                if not allow_gaps:
                    raise ReplayFormatError(f"{logs}: {gap}; pass allow_gaps=True (--allow-gaps) to read the "
                                            "pieces separately (stitching restarts after the gap)")
                st.restart(gap)
                if info.ckpt - 1 in listing and info.ckpt - 1 != prev.ckpt:
                    _lookbehind(logs, listing, info, st, decoder)
        st.feed(info, v)
        prev = info
    st.flush(complete=False)
    return scan


def scan_run(root: Root, game: str, run: int | str, checkpoints: Iterable[int] | None = None,
             allow_gaps: bool = False, decoder: str = "auto") -> list[EpisodeRef]:
    """Episodes of a run, cheap (no observation file is read). See `inspect_run` for the drop statistics."""
    return inspect_run(root, game, run, checkpoints, allow_gaps, decoder).episodes


# ---------------------------------------------------------------------------------------------- frames

def _open_obs(logs: _Loc, ckpt: int, stack: contextlib.ExitStack, decoder: str) -> tuple[IO[bytes], NpyHeader, str]:
    name = file_name("observation", ckpt)
    where = str(logs.child(name))
    f = stack.enter_context(logs.open_gz(name, decoder))
    h = read_header(f, where)
    check_header(h, where, np.uint8, FRAME_SHAPE)
    return f, h, where


def _fill(logs: _Loc, jobs: dict[int, list[tuple[int, int, object, int]]], sizes: dict[object, int],
          cap_check: dict[int, int], decoder: str, chunk_rows: int) -> Iterator[tuple[object, np.ndarray]]:
    """Stream each needed observation file once, in file order, copying rows into per-key buffers.

    `jobs[ckpt]` = [(file_lo, file_hi, key, dest_offset)], disjoint. Yields `(key, frames)` as soon as a key's
    `sizes[key]` rows are all filled, so at most the keys that are in progress are held in memory.
    """
    bufs: dict[object, np.ndarray] = {}
    left = dict(sizes)
    for key in [k for k, n in sizes.items() if n == 0]:
        del left[key]
        yield key, np.zeros((0, *FRAME_SHAPE), np.uint8)
    for ckpt in sorted(jobs):
        reqs = sorted(jobs[ckpt], key=lambda r: r[0])
        if not reqs:
            continue
        stop = max(r[1] for r in reqs)
        with contextlib.ExitStack() as stack:
            f, h, where = _open_obs(logs, ckpt, stack, decoder)
            if ckpt in cap_check and h.rows != cap_check[ckpt]:
                raise ReplayFormatError(f"{where}: {h.rows} rows, but the terminal file has {cap_check[ckpt]}")
            if stop > h.rows:
                raise ReplayFormatError(f"{where}: {h.rows} rows, but row {stop - 1} is needed")
            i = 0
            for r0, rows in iter_chunks(f, h, reqs[0][0], stop, where, chunk_rows):
                r1 = r0 + rows.shape[0]
                while i < len(reqs) and reqs[i][1] <= r0:
                    i += 1
                j = i
                while j < len(reqs) and reqs[j][0] < r1:
                    lo, hi, key, off = reqs[j]
                    a, b = max(lo, r0), min(hi, r1)
                    if key not in bufs:
                        bufs[key] = np.empty((sizes[key], *FRAME_SHAPE), np.uint8)
                    bufs[key][off + a - lo: off + b - lo] = rows[a - r0: b - r0]
                    left[key] -= b - a
                    if left[key] == 0:
                        del left[key]
                        yield key, bufs.pop(key)
                    j += 1
            if stop == h.rows:
                check_end(f, where)  # whole file read: verify the gzip CRC and that nothing trails


def _episode_jobs(logs: _Loc, refs: Sequence[EpisodeRef], infos: dict[int, _Ckpt]
                  ) -> dict[int, list[tuple[int, int, object, int]]]:
    jobs: dict[int, list[tuple[int, int, object, int]]] = {}
    for idx, ref in enumerate(refs):
        off = 0
        for ckpt, vlo, vhi in ref.spans:
            for flo, fhi, o in infos[ckpt].file_ranges(vlo, vhi):
                jobs.setdefault(ckpt, []).append((flo, fhi, idx, off + o))
            off += vhi - vlo
        if off != ref.length:
            raise ValueError(f"EpisodeRef {ref.game}/{ref.run}#{ref.episode}: spans cover {off} rows, "
                             f"length {ref.length}")
    return jobs


def _infos_for(logs: _Loc, ckpts: Iterable[int], decoder: str) -> dict[int, _Ckpt]:
    """Validity of the given suffixes from add_count and the headers of the terminal/observation files.

    Only headers are decoded; the capacities of both files must agree (the scan used the terminal file's).
    """
    out = {}
    for k in sorted(set(ckpts)):
        n = _read_add_count(logs, k, decoder)
        name = file_name("terminal", k)
        with logs.open_gz(name, decoder) as f:
            ht = read_header(f, str(logs.child(name)))
        check_header(ht, str(logs.child(name)), np.uint8, ())
        with contextlib.ExitStack() as stack:
            _, h, where = _open_obs(logs, k, stack, decoder)
        if h.rows != ht.rows:
            raise ReplayFormatError(f"{where}: {h.rows} rows, but the terminal file has {ht.rows}")
        out[k] = _Ckpt(k, n, h.rows, _segments(n, h.rows, k))
    return out


def iter_episodes(root: Root, game: str, run: int | str, checkpoints: Iterable[int] | None = None,
                  allow_gaps: bool = False, decoder: str = "auto", refs: Sequence[EpisodeRef] | None = None,
                  chunk_rows: int = 2048) -> Iterator[Episode]:
    """Episodes with frames, reading each observation file once, sequentially.

    Episodes are yielded as soon as their frames are complete: nearly in episode order, except that an episode
    whose rows include a wrapped buffer's oldest slot (the last row of a full checkpoint file) comes out after
    the episodes stored after it in that file. Sort by `.ref.episode` if order matters.
    `refs`: read only these (e.g. a subsampled list from `scan_run` of the same run); memory stays bounded by the
    episodes in progress.
    """
    decoder = resolve_decoder(decoder)
    logs = _run_dir(root, game, run)
    if refs is None:
        refs = scan_run(root, game, run, checkpoints, allow_gaps, decoder)
    refs = list(refs)
    infos = _infos_for(logs, {c for r in refs for c in r.checkpoints}, decoder)
    jobs = _episode_jobs(logs, refs, infos)
    caps = {k: i.capacity for k, i in infos.items()}
    for idx, frames in _fill(logs, jobs, {i: r.length for i, r in enumerate(refs)}, caps, decoder, chunk_rows):
        yield Episode(refs[idx], frames)


def read_episode(root: Root, ref: EpisodeRef, decoder: str = "auto") -> Episode:
    """One episode's frames. Decompresses each file it touches from the start up to its last row."""
    return next(iter_episodes(root, ref.game, ref.run, decoder=decoder, refs=[ref]))


def read_frames(root: Root, game: str, run: int | str, ckpt: int, rows: Sequence[int] | np.ndarray,
                decoder: str = "auto", chunk_rows: int = 2048) -> np.ndarray:
    """Frames at `rows` (indices into checkpoint `ckpt`'s valid-ordered stream, any order) in one pass.

    Returns (len(rows), 84, 84) uint8 in the order given. Memory: the output only.
    """
    decoder = resolve_decoder(decoder)
    logs = _run_dir(root, game, run)
    rows = np.asarray(rows, dtype=np.int64).reshape(-1)
    info = _infos_for(logs, [ckpt], decoder)[ckpt]
    if rows.size and (rows.min() < 0 or rows.max() >= info.n_valid):
        raise ReplayFormatError(f"{logs.child(file_name('observation', ckpt))}: rows must be in [0, {info.n_valid}) "
                                f"(the valid rows of checkpoint {ckpt}), got [{rows.min()}, {rows.max()}]")
    out = np.empty((rows.size, *FRAME_SHAPE), np.uint8)
    if not rows.size:
        return out
    order = np.argsort(rows, kind="stable")
    uniq, first = np.unique(rows[order], return_index=True)
    jobs = {ckpt: []}
    for u_i, v in enumerate(uniq):
        (flo, fhi, _), = info.file_ranges(int(v), int(v) + 1)
        jobs[ckpt].append((flo, fhi, u_i, 0))
    for u_i, frame in _fill(logs, jobs, {i: 1 for i in range(len(uniq))}, {}, decoder, chunk_rows):
        lo = first[u_i]
        hi = first[u_i + 1] if u_i + 1 < len(first) else len(order)
        out[order[lo:hi]] = frame[0]
    return out
