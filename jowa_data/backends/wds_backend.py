"""webdataset backend: tars of large samples, written deterministically.

Each sample holds `SAMPLE_ROWS` consecutive transitions of one task (one tar member per field, so the
~1.5 KB of headers per member are spread over thousands of segments), and each tar holds `TAR_SAMPLES`
samples, so tars are equal-sized except a task's last one. Keys have no dots (webdataset ends a key at
the first dot). We write the tars ourselves with `tarfile` (USTAR, mtime=0, uid/gid 0, no user names),
to a temporary name then rename: ShardWriter writes final names directly and stamps the clock.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Any

import numpy as np

from jowa_data.backends.base import TaskArrays
from jowa_common.errors import DatasetError
from jowa_common.io import atomic_path
from jowa_data.layout import DTYPES, FIELDS, wds_tar_name

SAMPLE_ROWS = 4096  # transitions per webdataset sample
TAR_SAMPLES = 16  # samples per tar -> 65,536 transitions (~4.7 MB of tokens) per full tar


def _npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    ti = tarfile.TarInfo(name)
    ti.size = len(data)
    ti.mtime = 0
    ti.mode = 0o444
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = ""
    tf.addfile(ti, io.BytesIO(data))


def sample_key(key: str, start: int) -> str:
    return f"{key}_{start:010d}"


MEMBERS = frozenset([f"{f}.npy" for f in FIELDS] + ["meta.json"])  # the only members a jowa sample holds


def decode_sample(raw: dict[str, Any]) -> dict[str, Any]:
    """Decode one webdataset sample with explicit decoders for exactly the members jowa writes: `.npy` through
    `np.load(allow_pickle=False)`, `meta.json` through `json`. Any other member is refused (naming the tar and
    the member) and never decoded: a tar from elsewhere cannot make the reader run code."""
    url = raw.get("__url__", "?")
    out: dict[str, Any] = {k: v for k, v in raw.items() if k.startswith("__")}
    for name, data in raw.items():
        if name.startswith("__"):
            continue
        if name not in MEMBERS:
            raise DatasetError(f"{url}: member {raw.get('__key__')}.{name} is not a jowa member "
                               f"(expected {', '.join(sorted(MEMBERS))}); refusing to read this tar")
        try:
            out[name] = (json.loads(data) if name == "meta.json"
                         else np.load(io.BytesIO(data), allow_pickle=False))
        except (ValueError, OSError, UnicodeDecodeError) as e:
            raise DatasetError(f"{url}: member {raw.get('__key__')}.{name} cannot be decoded ({e})") from e
    return out


class WdsBackend:
    name = "wds"

    def _dir(self, dataset_dir: Path, game: str) -> Path:
        return Path(dataset_dir) / "wds" / game

    def write_task(self, dataset_dir: Path, game: str, key: str, arrays: TaskArrays) -> list[str]:
        n = len(arrays)
        d = self._dir(dataset_dir, game)
        starts = list(range(0, n, SAMPLE_ROWS))
        parts = [starts[i:i + TAR_SAMPLES] for i in range(0, len(starts), TAR_SAMPLES)]
        for part, part_starts in enumerate(parts):
            with atomic_path(d / wds_tar_name(key, part)) as tmp:
                with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tf:
                    for s in part_starts:
                        e = min(n, s + SAMPLE_ROWS)
                        k = sample_key(key, s)
                        for name, data in arrays.as_dict().items():
                            _add(tf, f"{k}.{name}.npy", _npy_bytes(np.ascontiguousarray(data[s:e])))
                        _add(tf, f"{k}.meta.json", json.dumps({"start": s, "rows": e - s}, sort_keys=True).encode())
        return self.task_files(dataset_dir, game, key)

    def remove_task(self, dataset_dir: Path, game: str, key: str) -> None:
        d = self._dir(dataset_dir, game)
        if d.is_dir():
            for p in d.glob(f"{key}-*.tar"):
                p.unlink()

    def task_files(self, dataset_dir: Path, game: str, key: str) -> list[str]:
        root = Path(dataset_dir)
        d = self._dir(root, game)
        return sorted(str(p.relative_to(root)) for p in d.glob(f"{key}-*.tar")) if d.is_dir() else []

    def read_task(self, dataset_dir: Path, game: str, key: str) -> TaskArrays:
        """Read a task's tars through webdataset (order of samples = order of rows)."""
        import webdataset as wds

        root = Path(dataset_dir)
        urls = [str(root / f) for f in self.task_files(root, game, key)]
        if not urls:
            raise DatasetError(f"{self._dir(root, game)}: no tars for task {key}")
        pieces: dict[str, list[np.ndarray]] = {f: [] for f in FIELDS}
        expect = 0
        wds.utils.enforce_security = True  # webdataset's secure mode: its decoders refuse pickle and torch.load
        # No `.decode()`: its default handlers unpickle .pyd/.pickle members. We decode exactly what we write.
        ds = wds.WebDataset(urls, shardshuffle=False, nodesplitter=None, workersplitter=None, empty_check=False)
        try:
            for raw in ds:
                sample = decode_sample(raw)
                where = f"{sample.get('__url__', urls[0])}: sample {sample.get('__key__')}"
                missing = [f for f in FIELDS if f"{f}.npy" not in sample] + (["meta"] if "meta.json" not in sample else [])
                if missing:
                    raise DatasetError(f"{where}: missing members {missing}")
                meta = sample["meta.json"]
                if meta.get("start") != expect:
                    raise DatasetError(f"{where}: starts at row {meta.get('start')}, expected {expect} "
                                       "(a sample is missing or out of order)")
                for f in FIELDS:
                    a = sample[f"{f}.npy"]
                    if len(a) != meta["rows"]:
                        raise DatasetError(f"{where}: '{f}' has {len(a)} rows, meta.json says {meta['rows']}")
                    pieces[f].append(a)
                expect += meta["rows"]
        except DatasetError:
            raise
        except Exception as e:  # tar/npy decode errors
            raise DatasetError(f"{urls}: cannot read webdataset tar ({type(e).__name__}: {e})") from e
        arrays = {f: np.concatenate(pieces[f]) if pieces[f] else np.zeros(0, DTYPES[f]) for f in FIELDS}
        return TaskArrays.checked(arrays, self._dir(root, game) / f"{key}-*.tar")
