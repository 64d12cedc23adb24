"""Replay roots as locations: a local folder, or any fsspec URL (gs://, s3://, http(s)://, memory://, ...).

Why one helper: DQN-Replay lives in a public bucket (`gs://atari-replay-datasets/dqn`, see the batch_rl
README), and copying its ~400 GB of the paper's selection first should be a choice, not a requirement. Every
command that reads replay (stats, replay-scan, subsample, build, the trainers' frame readers) turns its root
into a `ReplayRoot` here, so URL handling, the optional local cache and the error messages are the same
everywhere. Local paths keep the plain `os` path (`fs is None`): the gzip decoders open them directly.

Remote files are opened one by one and streamed (`STREAM_BLOCK` bytes of read-ahead), never copied whole,
unless a cache folder is given: then fsspec's `filecache::` keeps a local copy of each file the first time it is
opened (reruns read it from the cache; the cache grows to the size of the files read).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

from jowa_common.errors import ConfigError

CACHE_PROTOCOLS = ("filecache", "simplecache", "blockcache")  # fsspec's caching layers: not part of "where"
STREAM_BLOCK = 8 << 20  # read-ahead per open remote file: bounds memory per stream, few requests per file
# The optional extra that provides each protocol's fsspec implementation (what to tell a user who lacks it).
EXTRAS = {"gs": ("gcsfs", "gcs"), "gcs": ("gcsfs", "gcs"), "s3": ("s3fs", "s3"), "s3a": ("s3fs", "s3"),
          "http": ("aiohttp", "http"), "https": ("aiohttp", "http")}

__all__ = ["ReplayRoot", "Root", "open_root", "root_url", "is_url", "CACHE_PROTOCOLS", "STREAM_BLOCK"]


def is_url(root: str | os.PathLike) -> bool:
    """True for a URL other than file:// (those are plain local paths)."""
    s = os.fspath(root)
    return "://" in s and not _target(s).startswith("file://")


def _target(s: str) -> str:
    """The URL without leading caching layers (`filecache::s3://b/p` -> `s3://b/p`)."""
    parts = s.split("::")
    while len(parts) > 1 and parts[0].split("://")[0] in CACHE_PROTOCOLS:
        parts = parts[1:]
    return "::".join(parts)


def root_url(root: "str | os.PathLike | ReplayRoot") -> str:
    """How a root is recorded in metadata (plan.json, info.json, the index): the absolute local path, or the URL
    without caching layers and trailing slash. A cache changes no output byte, so it is never recorded."""
    if isinstance(root, ReplayRoot):
        return root.url
    s = os.fspath(root)
    if "://" not in s:
        return str(Path(s).resolve())
    t = _target(s)
    if t.startswith("file://"):
        return str(Path(t[len("file://"):]).resolve())
    proto, rest = t.split("://", 1)
    return f"{proto}://{rest.rstrip('/')}" if rest.rstrip("/") else t


@dataclass(frozen=True)
class ReplayRoot:
    """A resolved replay root: `fs` is None for the local disk, else the fsspec filesystem and `path` within it."""

    url: str  # root_url(): named in messages and recorded in metadata
    path: str  # local path as given, or the path inside `fs`
    fs: Any = None  # fsspec AbstractFileSystem, None = local disk
    cache: str | None = None  # local cache folder (filecache::), None = stream every read
    quoted_listing: bool = False  # listings are percent-encoded URLs (http(s): `$store$` is listed as %24store%24)
    lister: Any = None  # the filesystem asked for listings and sizes: `fs` itself, or the one a cache layer wraps

    @property
    def meta(self) -> Any:
        """Filesystem for metadata calls (isdir, ls, info). A cache layer only caches file contents, and its
        generic isdir/info fail on some stores (an http host root), so metadata goes to the store itself."""
        return self.lister if self.lister is not None else self.fs

    def __str__(self) -> str:
        return self.url if self.fs is not None else self.path


Root = Union[str, "os.PathLike[str]", ReplayRoot]  # what every replay reader accepts as a root


def open_root(root: "str | os.PathLike | ReplayRoot", cache: str | os.PathLike | None = None) -> ReplayRoot:
    """Resolve a replay root (local path, Path, fsspec URL, or a ReplayRoot) to a filesystem and a path.

    `cache`: a local folder; remote files are then copied there whole on first open (fsspec `filecache::`) and
    read locally afterwards. Ignored for local roots. Raises ConfigError for an unknown protocol or a missing
    optional package, naming the URL and the fix.
    """
    if isinstance(root, ReplayRoot):
        if cache is None or root.fs is None or (root.cache and os.fspath(cache) == root.cache):
            return root
        root = root.url
    s = os.fspath(root)
    if "://" not in s:
        return ReplayRoot(url=root_url(s), path=s)
    target = _target(s)
    if target.startswith("file://"):
        local = target[len("file://"):]
        return ReplayRoot(url=root_url(local), path=local)
    import fsspec

    url = root_url(s)
    proto = target.split("://", 1)[0]
    try:
        if cache is not None:
            cache = os.fspath(cache)
            fs, path = fsspec.core.url_to_fs(f"filecache::{target}",
                                             filecache={"cache_storage": cache, "check_files": False})
        else:
            fs, path = fsspec.core.url_to_fs(s)
    except ImportError as e:
        pkg, extra = EXTRAS.get(proto, (None, None))
        fix = f"pip install 'jowa[{extra}]' (or {pkg})" if extra else "install the fsspec implementation for it"
        raise ConfigError(f"{url}: {proto}:// replay roots need an extra package: {fix} ({e})") from e
    except ValueError as e:
        raise ConfigError(f"{url}: not a usable replay root URL ({e}); use a local path or an fsspec URL such "
                          "as gs://atari-replay-datasets/dqn, s3://BUCKET/PATH, https://HOST/PATH") from e
    from fsspec.implementations.cached import CachingFileSystem

    base = fs.fs if isinstance(fs, CachingFileSystem) else fs  # a caching layer wraps the real filesystem
    protos = base.protocol if isinstance(base.protocol, (tuple, list)) else (base.protocol,)
    return ReplayRoot(url=url, path=path.rstrip("/") or path, fs=fs, cache=cache,
                      quoted_listing=any(p in ("http", "https") for p in protos), lister=base)
