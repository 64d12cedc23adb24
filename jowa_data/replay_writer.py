"""Write DQN-Replay logs exactly as Dopamine 2019 / batch_rl did (`OutOfGraphLoggedReplayBuffer`).

Why a writer: every test and the demo need real DQN-Replay files, and the public bucket is ~1 TB.
This module reproduces the on-disk format and the buffer semantics bit for bit (see
docs/dqn_replay_format.md §1-3 and §5), including its quirks:

* every episode starts with 3 zero padding rows (obs 0, action 0, reward 0, terminal 0);
* the buffer is logged as suffix `_log_count` after an `add()` that leaves
  `add_count % cap == cap - 1` (the check runs once per `add()`, after the padding, so an episode
  start can jump over `cap - 1` and skip a log: the cause of runs that stop at suffix 49);
* `close()` logs once more with `add_count` replaced by the cursor c (`add_count % cap`); its new
  rows are slot `cap-1` (the add right after the previous log) then slots [0, c), which is how
  `jowa_data.replay` reads it (the plain `arr[:c]` rule would lose the slot `cap-1` row);
* slot `cap - 1` of suffix 0 is never written (Dopamine: `np.empty`; here: zeros, for reproducibility).

Files are gzip(`np.save(allow_pickle=False)`) with `mtime=0` and no file name in the gzip header,
so equal data gives equal bytes. Each file is written atomically, and `add_count` is written last:
a suffix without `add_count_ckpt.N.gz` is incomplete.
"""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from jowa_common.errors import ReplayFormatError
from jowa_common.io import atomic_path

STORE_PREFIX = "$store$_"  # Dopamine's STORE_FILENAME_PREFIX
STORE_NAMES = ("observation", "action", "reward", "terminal")
STACK_SIZE = 4  # Dopamine stack_size: 3 = STACK_SIZE - 1 padding rows per episode start
UPDATE_HORIZON = 1  # Dopamine update_horizon: invalid_range has STACK_SIZE + UPDATE_HORIZON entries
# Write order of one suffix: add_count LAST, so its presence marks a complete suffix.
FILE_NAMES = tuple(STORE_PREFIX + n for n in STORE_NAMES) + ("invalid_range", "add_count")


def replay_dir(root: str | os.PathLike, game: str, run: str | int) -> Path:
    """`<root>/<Game>/<run>/replay_logs`: where one run's checkpoint files live."""
    return Path(root) / game / str(run) / "replay_logs"


def ckpt_filename(name: str, suffix: int) -> str:
    """Dopamine's `'{}_ckpt.{}.gz'.format(name, suffix)`; `name` is e.g. `$store$_action` or `add_count`."""
    return f"{name}_ckpt.{suffix}.gz"


def invalid_range(cursor: int, capacity: int) -> np.ndarray:
    """Dopamine `invalid_range`: slot cursor-1 has no next state; cursor..cursor+3 straddle the write head."""
    return np.array([(cursor - UPDATE_HORIZON + i) % capacity for i in range(STACK_SIZE + UPDATE_HORIZON)],
                    dtype=np.int64)


def write_npy_gz(path: str | os.PathLike, arr: np.ndarray, compresslevel: int = 9) -> None:
    """Atomically write gzip(np.save(arr)) with a reproducible header (mtime 0, no file name)."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f, gzip.GzipFile(filename="", fileobj=f, mode="wb", mtime=0,
                                                 compresslevel=compresslevel) as gz:
            np.save(gz, arr, allow_pickle=False)


@dataclass(frozen=True)
class LoggedCheckpoint:
    """One written suffix and the global add indices [first_add, stop_add) a reader gets from it.

    Read rule (Dopamine `is_full`, as `jowa_data.replay` applies it): n = add_count; n >= cap → the
    oldest-first rotation at n % cap (the last cap adds); suffix 0 with n < cap → slots [0, n);
    a final log after earlier ones (suffix > 0, n = cursor < cap) → slot cap-1 then slots [0, n),
    i.e. the last n+1 adds (none if n == cap-1: nothing was added since the previous log).
    """

    suffix: int
    add_count: int  # value written to add_count_ckpt.N.gz
    first_add: int  # global index (0-based, padding included) of the first add the read rule yields
    stop_add: int  # one past the last
    final: bool  # written by close() (add_count = cursor)


def readable_adds(suffix: int, add_count: int, capacity: int, true_count: int) -> tuple[int, int]:
    """[first, stop) global add indices a suffix logged with `add_count` yields (see `LoggedCheckpoint`)."""
    n, cap, N = add_count, capacity, true_count
    if n >= cap:
        m = cap
    elif suffix == 0:
        m = n
    else:
        m = 0 if n == cap - 1 else n + 1
    return N - m, N


class ReplayLogger:
    """Dopamine 2019 `OutOfGraphLoggedReplayBuffer` with stack 4, horizon 1, writing to
    `<root>/<game>/<run>/replay_logs`.

    `add(obs, action, reward, terminal)` takes one transition: obs (84,84) uint8 (the frame the
    action was chosen on), the minimal-set action index, the *clipped* reward and the terminal flag.
    Use as a context manager or call `close()` to write the final checkpoint.
    """

    def __init__(self, root: str | os.PathLike, game: str, run: str | int, capacity: int = 1_000_000,
                 obs_shape: tuple[int, int] = (84, 84), compresslevel: int = 9, overwrite: bool = False):
        if capacity < STACK_SIZE + UPDATE_HORIZON + 1:
            raise ValueError(f"capacity must be > {STACK_SIZE + UPDATE_HORIZON}, got {capacity}")
        self.dir = replay_dir(root, game, run)
        self.capacity = capacity
        self.compresslevel = compresslevel
        existing = sorted(self.dir.glob("*_ckpt.*.gz")) if self.dir.is_dir() else []
        if existing and not overwrite:
            raise ReplayFormatError(f"{self.dir}: already holds {len(existing)} checkpoint files; "
                                    f"choose another run or pass overwrite=True (--overwrite)")
        for p in existing:
            p.unlink()
        self.dir.mkdir(parents=True, exist_ok=True)
        # zeros (not np.empty) so never-written slots are reproducible; calloc'd lazily by the OS.
        self.store = {
            "observation": np.zeros((capacity, *obs_shape), dtype=np.uint8),
            "action": np.zeros(capacity, dtype=np.int32),
            "reward": np.zeros(capacity, dtype=np.float32),
            "terminal": np.zeros(capacity, dtype=np.uint8),
        }
        self.add_count = 0  # number of rows added, padding included
        self.log_count = 0  # next suffix
        self.logged: list[LoggedCheckpoint] = []
        self.skipped_logs = 0  # wraps that were not logged because an episode start jumped over cap-1
        self.closed = False

    # --- Dopamine semantics ---------------------------------------------------------------------

    @property
    def cursor(self) -> int:
        return self.add_count % self.capacity

    def _add_row(self, obs, action: int, reward: float, terminal: int) -> None:
        c = self.cursor
        if obs is None:
            self.store["observation"][c] = 0
        else:
            self.store["observation"][c] = obs
        self.store["action"][c] = action
        self.store["reward"][c] = reward
        self.store["terminal"][c] = terminal
        self.add_count += 1

    def add(self, obs: np.ndarray, action: int, reward: float, terminal: bool) -> None:
        """Add one transition (after 3 padding rows if it starts an episode); log if the buffer wrapped."""
        if self.closed:
            raise RuntimeError("ReplayLogger.add after close()")
        obs = np.asarray(obs)
        if obs.shape != self.store["observation"].shape[1:] or obs.dtype != np.uint8:
            raise ValueError(f"obs must be uint8 {self.store['observation'].shape[1:]}, got {obs.dtype} {obs.shape}")
        before = self.add_count
        if self.add_count == 0 or self.store["terminal"][self.cursor - 1] == 1:
            for _ in range(STACK_SIZE - 1):
                self._add_row(None, 0, 0.0, 0)
        self._add_row(obs, int(action), float(reward), int(bool(terminal)))
        cap = self.capacity
        if self.add_count % cap == cap - 1:
            self._log(self.add_count, final=False)
        elif (self.add_count - before > 1
              and (self.add_count + 1) // cap > (before + 1) // cap):  # jumped over a k*cap - 1
            self.skipped_logs += 1

    def close(self) -> None:
        """Write the final checkpoint (`add_count` = cursor), as `log_final_buffer()` does."""
        if self.closed:
            return
        if self.add_count > 0:
            self._log(self.cursor, final=True)
        self.closed = True

    def _log(self, add_count: int, final: bool) -> None:
        suffix = self.log_count
        arrays = {STORE_PREFIX + k: v for k, v in self.store.items()}
        arrays["invalid_range"] = invalid_range(self.cursor, self.capacity)
        arrays["add_count"] = np.array(add_count, dtype=np.int64)
        for name in FILE_NAMES:  # add_count last
            write_npy_gz(self.dir / ckpt_filename(name, suffix), arrays[name], self.compresslevel)
        first, stop = readable_adds(suffix, int(add_count), self.capacity, self.add_count)
        self.logged.append(LoggedCheckpoint(suffix, int(add_count), first, stop, final))
        self.log_count += 1

    def __enter__(self) -> "ReplayLogger":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
