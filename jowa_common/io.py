"""Atomic writes, checksums and safe loaders.

Why: a build or a training run may be killed at any moment. Every file we write first goes to a
temporary name in the same directory, is fsynced, then renamed with `os.replace`, so a reader never
sees a half-written file under its final name. Nothing we load is unpickled: checkpoints go through
`torch.load(weights_only=True)` and arrays through `np.load(allow_pickle=False)`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from jowa_common.errors import CheckpointError

PathLike = str | os.PathLike


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success fsync it and rename it onto `path`.

    On an exception the temporary file is removed and `path` is left untouched.
    `suffix` is appended to the temporary name (some writers choose their format by extension).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600 files; results should be as readable as open()'s
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
        _fsync_dir(path.parent)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        if isinstance(e, OSError) and e.filename is None:  # a failed write() names no file: name the one we wrote
            raise OSError(e.errno, e.strerror or str(e), str(path)) from e
        raise


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Write `data` to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: PathLike, text: str) -> None:
    """Write `text` (UTF-8) to `path` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: PathLike, obj: Any, indent: int | None = 2) -> None:
    """Write `obj` as JSON to `path` atomically (sorted keys, so equal objects give equal bytes)."""
    atomic_write_text(path, json.dumps(obj, indent=indent, sort_keys=True) + "\n")


def atomic_torch_save(obj: Any, path: PathLike) -> None:
    """`torch.save` to a temporary file, then rename: a kill mid-save never destroys a checkpoint."""
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def safe_torch_load(path: PathLike, map_location: Any = "cpu") -> Any:
    """Load a checkpoint with `weights_only=True` (never executes pickled code)."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises several types for corrupt/unsafe files
        text = str(e)
        if "Weights only load failed" in text or "weights_only" in text:
            # torch's message is a page long; the first line that names what was refused is enough.
            import re

            m = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
            raise CheckpointError(f"{path}: contains pickled objects that are not plain weights"
                                  + (f" (it would call {m.group(1)})" if m else "") + "; jowa loads weights only") from e
        first = text.strip().splitlines()[0][:200] if text.strip() else ""
        raise CheckpointError(f"{path}: cannot load checkpoint safely ({type(e).__name__}: {first})") from e


def safe_np_load(path_or_file: Any) -> np.ndarray:
    """`np.load` with `allow_pickle=False`."""
    return np.load(path_or_file, allow_pickle=False)


def sha256_file(path: PathLike, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, streamed."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


LOCK_NAME = ".jowa.lock"


@contextlib.contextmanager
def folder_lock(folder: PathLike, what: str, wait: bool = False) -> Iterator[Path]:
    """Hold an exclusive lock on `folder` (an flock on `folder/.jowa.lock`, which records the holder's pid).

    Why flock: the kernel drops it when the holder dies, so a lock left by a killed process is simply taken
    over, never stale. `wait=False` (builds, training, evaluation into one folder): a second process gets a
    one-line error naming the folder and the holder's pid. `wait=True` (a token cache that several ranks
    may make at once): wait for the holder, who will have made it.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with lock_file(folder / LOCK_NAME, folder, what, wait) as p:
        yield p


@contextlib.contextmanager
def lock_file(path: PathLike, guarded: PathLike, what: str, wait: bool = False) -> Iterator[Path]:
    """The flock behind `folder_lock`, on any lock file (`guarded` is what the error message names)."""
    import fcntl

    from jowa_common.errors import LockedError

    path = Path(path)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666 & ~_umask())
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            raise LockedError(f"{guarded}: in use by another {what} (pid {holder}); "
                              "wait for it to finish or stop it") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield path
    finally:
        os.close(fd)  # closing the descriptor releases the flock


def remove_stale_temps(folder: PathLike, recursive: bool = True, skip: tuple[str, ...] = ("_cache",)) -> list[Path]:
    """Delete the temp files `atomic_path` names `.NAME.XXXX.tmp[SUFFIX]` that a killed writer left in `folder`
    (never a finished file: those only appear by rename). Call it holding the folder's lock. `skip`: subfolders
    owned by other locks (the token cache)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    gone = []
    for p in (folder.rglob(".*.tmp*") if recursive else folder.glob(".*.tmp*")):
        if p.is_file() and not any(part in skip for part in p.relative_to(folder).parts):
            p.unlink(missing_ok=True)
            gone.append(p)
    return gone
