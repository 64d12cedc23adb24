"""zarr v3 backend: one group per build task with sharded, zstd-compressed arrays.

Why these choices (docs/performance.md §7: measurements, zarr docs): plain zstd keeps the row-to-row
redundancy of token streams (ratio ~4.3 vs 1.45 with bitshuffle); shards keep the file count low; each task
writes all of its own shards in one call, so no two processes ever touch one shard. Consolidated metadata
is not used (experimental in v3 and not auto-updated): readers open arrays by path.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

import numpy as np

from jowa_data.backends.base import TaskArrays
from jowa_common.errors import DatasetError
from jowa_data.layout import DTYPES, FIELDS, TMP_DIR, TOKENS_PER_FRAME, zarr_task_dir

CHUNK_ROWS = 8192  # inner chunk (rows); 8192 x 36 x 2 B = 576 KiB raw
SHARD_ROWS = 131072  # rows per shard file (a multiple of CHUNK_ROWS); ~9 MiB raw tokens
ZSTD_LEVEL = 3  # fixed level: equal inputs give equal bytes


def _group_json() -> bytes:
    return (json.dumps({"zarr_format": 3, "node_type": "group", "attributes": {}}, indent=2) + "\n").encode()


def ensure_groups(dataset_dir: Path, games: list[str]) -> None:
    """Create the root and per-game group metadata once, before tasks run (tasks only add children)."""
    from jowa_common.io import atomic_write_bytes

    for p in [Path(dataset_dir) / "zarr"] + [Path(dataset_dir) / "zarr" / g for g in games]:
        if not (p / "zarr.json").is_file():
            atomic_write_bytes(p / "zarr.json", _group_json())


@contextlib.contextmanager
def _names_failed_writes(path: Path):
    """A full disk inside zarr's store raises an OSError without a file name: name the task folder."""
    try:
        yield
    except OSError as e:
        if e.filename is None:
            raise OSError(e.errno, e.strerror or str(e), str(path)) from e
        raise


class ZarrBackend:
    name = "zarr"

    def write_task(self, dataset_dir: Path, game: str, key: str, arrays: TaskArrays) -> list[str]:
        import zarr
        from zarr.codecs import ZstdCodec

        final = zarr_task_dir(dataset_dir, game, key)
        tmp = Path(dataset_dir) / TMP_DIR / f"{key}.zarr.{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.parent.mkdir(parents=True, exist_ok=True)
        n = len(arrays)
        # A synchronous, single-threaded write: dask workers already run in parallel.
        with zarr.config.set({"async.concurrency": 4, "threading.max_workers": 1}), _names_failed_writes(tmp):
            g = zarr.open_group(str(tmp), mode="w", zarr_format=3)
            for name, data in arrays.as_dict().items():
                shape = (n, TOKENS_PER_FRAME) if name == "tokens" else (n,)
                chunks = (CHUNK_ROWS,) + shape[1:]
                shards = (SHARD_ROWS,) + shape[1:]
                a = g.create_array(name, shape=shape, dtype=DTYPES[name], chunks=chunks, shards=shards,
                                   compressors=ZstdCodec(level=ZSTD_LEVEL), fill_value=0,
                                   dimension_names=["t", "tok"] if name == "tokens" else ["t"])
                a[:] = np.ascontiguousarray(data, dtype=DTYPES[name])
        final.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        return self.task_files(dataset_dir, game, key)

    def remove_task(self, dataset_dir: Path, game: str, key: str) -> None:
        shutil.rmtree(zarr_task_dir(dataset_dir, game, key), ignore_errors=True)

    def task_files(self, dataset_dir: Path, game: str, key: str) -> list[str]:
        root = Path(dataset_dir)
        d = zarr_task_dir(root, game, key)
        return sorted(str(p.relative_to(root)) for p in d.rglob("*") if p.is_file())

    def read_task(self, dataset_dir: Path, game: str, key: str) -> TaskArrays:
        """Decode one task. zarr reads a shard file that is not there as its fill value (zeros), so readers of a
        built dataset first check its files against files.json (`jowa_data.integrity`): a shard the build
        wrote is listed there; one it did not write was all zeros and skipped by zarr."""
        import zarr

        d = zarr_task_dir(dataset_dir, game, key)
        out = {}
        for name in FIELDS:
            p = d / name
            if not (p / "zarr.json").is_file():
                raise DatasetError(f"{p}: zarr array missing")
            try:
                out[name] = zarr.open_array(str(p), mode="r")[:]
            except Exception as e:  # codec/shard-index errors come in many types
                raise DatasetError(f"{p}: cannot read zarr array ({type(e).__name__}: {e})") from e
        return TaskArrays.checked(out, d)
