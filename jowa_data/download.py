"""`jowa-data download`: copy a selection of DQN-Replay (the public bucket, or any fsspec URL) to a local root.

For users who prefer a local copy to streaming (`build --replay gs://...` streams). The layout is the bucket's
(`<out>/<Game>/<run>/replay_logs/<file>`, see the batch_rl README and Dopamine's `circular_replay_buffer.py`
for the file names), so the copy is a replay root for every jowa-data command.

- Resumable: a file is skipped when it is complete and verified (its record matches the source's size, and
  md5 where the store lists one); anything else is copied again. `recheck=True` re-hashes local files too.
- Atomic: each file is written to a temp name beside it (`.NAME.XXXX.tmp`), checked, then renamed; temp files
  of a killed copy are removed by the next run. A file's name only ever holds complete, verified bytes.
- Checksummed: the bytes copied are counted and hashed (sha256, md5) while streaming; the size must equal the
  source's and the md5 the source's where the store publishes one (GCS `md5Hash`, S3 single-part `ETag`).
  Each run folder keeps `.jowa-download.json`: file -> bytes, sha256, md5, source URL.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from jowa_common.errors import ConfigError, ReplayFormatError
from jowa_common.io import atomic_path, atomic_write_json, folder_lock, remove_stale_temps

DEFAULT_SOURCE = "gs://atari-replay-datasets/dqn"  # the public DQN-Replay bucket (batch_rl README)
RECORD = ".jowa-download.json"  # per run folder: what was copied and verified
CHUNK = 1 << 20  # bytes per read while copying (the stream itself reads ahead roots.STREAM_BLOCK)

__all__ = ["DEFAULT_SOURCE", "RECORD", "DownloadFile", "plan_download", "download", "source_md5"]


@dataclass(frozen=True)
class DownloadFile:
    """One file to copy: where it comes from, where it goes, and what the source says about it."""

    game: str
    run: int
    ckpt: int
    name: str
    url: str  # source, for messages and the record
    dest: Path
    size: int
    md5: str | None  # hex md5 the source publishes, or None (http: size only)


def source_md5(info: dict[str, Any]) -> str | None:
    """The md5 a store lists for a file, as hex: GCS `md5Hash` (base64); S3 `ETag` of a single-part upload (32 hex
    digits; multipart ETags hold a '-' and are not an md5 of the bytes). Other stores: None."""
    h = info.get("md5Hash")
    if h:
        return base64.b64decode(h).hex()
    etag = str(info.get("ETag") or "").strip('"')
    return etag if re.fullmatch(r"[0-9a-f]{32}", etag) else None


def _kinds() -> tuple[str, ...]:
    from jowa_data.replay import REQUIRED_KINDS

    return (*REQUIRED_KINDS, "invalid_range")


def plan_download(source: str, game: str, runs: Sequence[int], checkpoints: Sequence[int],
                  out: str | Path) -> list[DownloadFile]:
    """The files of `checkpoints` of `runs` of `game` under `source`, with their sizes and checksums (one listing
    per run). A missing required file is a one-line ReplayFormatError naming its URL; `invalid_range` is copied
    when present (the reader checks it when it is there)."""
    from jowa_data.replay import file_name, run_logs
    from jowa_data.roots import open_root

    if not runs or not checkpoints:
        raise ConfigError("give at least one run (--runs 1,2) and one checkpoint (--checkpoints 0-50)")
    root = open_root(source)
    files: list[DownloadFile] = []
    for run in sorted(set(int(r) for r in runs)):
        logs = run_logs(root, game, run)
        infos = logs.file_infos()
        present = sorted({int(m.group(1)) for n in infos if (m := re.search(r"_ckpt\.(\d+)\.gz$", n))})
        for c in sorted(set(int(c) for c in checkpoints)):
            for kind in _kinds():
                name = file_name(kind, c)
                if name not in infos:
                    if kind == "invalid_range":
                        continue
                    have = f"{present[0]}-{present[-1]}" if present and present == list(
                        range(present[0], present[-1] + 1)) else ", ".join(map(str, present)) or "none"
                    raise ReplayFormatError(f"{logs.child(name)}: not found (checkpoint {c} of {game} run {run}; "
                                            f"checkpoints present there: {have})")
                info = infos[name]
                files.append(DownloadFile(game=game, run=run, ckpt=c, name=name, url=str(logs.child(name)),
                                          dest=Path(out) / game / str(run) / "replay_logs" / name,
                                          size=int(info["size"]), md5=source_md5(info)))
    return files


def _hash_file(path: Path) -> tuple[str, str]:
    sha, md5 = hashlib.sha256(), hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            sha.update(chunk)
            md5.update(chunk)
    return sha.hexdigest(), md5.hexdigest()


def _read_record(run_dir: Path) -> dict[str, Any]:
    p = run_dir / RECORD
    if not p.is_file():
        return {}
    try:
        rec = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}  # unreadable record: every file is verified again (copied again unless its md5 proves it)
    return rec.get("files", {}) if isinstance(rec, dict) else {}


def _is_done(f: DownloadFile, rec: dict[str, Any] | None, recheck: bool) -> tuple[bool, dict[str, Any] | None]:
    """(complete and verified?, the record entry to keep). A file present without a record (copied by hand, or
    killed between rename and record) is adopted only when the source's md5 proves it."""
    if not f.dest.is_file() or f.dest.stat().st_size != f.size:
        return False, None
    if rec and rec.get("bytes") == f.size and (f.md5 is None or rec.get("md5") in (None, f.md5)):
        if not recheck:
            return True, rec
        sha, md5 = _hash_file(f.dest)
        return sha == rec.get("sha256") and (f.md5 is None or md5 == f.md5), rec
    if f.md5 is not None:
        sha, md5 = _hash_file(f.dest)
        if md5 == f.md5:
            return True, {"bytes": f.size, "sha256": sha, "md5": md5, "source": f.url}
    return False, None


def _copy(logs: Any, f: DownloadFile, update: Callable[[int], None]) -> dict[str, Any]:
    """Stream one file to a temp name beside its destination, check size and md5, rename it into place."""
    sha, md5 = hashlib.sha256(), hashlib.md5()
    n = 0
    with atomic_path(f.dest) as tmp:
        try:
            src = logs.open_raw(f.name)
        except FileNotFoundError as e:
            raise ReplayFormatError(f"{f.url}: not found (it was listed a moment ago; the source changed?)") from e
        with src, open(tmp, "wb") as out:
            while chunk := src.read(CHUNK):
                out.write(chunk)
                sha.update(chunk)
                md5.update(chunk)
                n += len(chunk)
                update(len(chunk))
        if n != f.size:
            raise ReplayFormatError(f"{f.url}: copied {n} bytes, the source lists {f.size} (connection cut?); "
                                    "run the same command again to resume")
        if f.md5 is not None and md5.hexdigest() != f.md5:
            raise ReplayFormatError(f"{f.url}: md5 of the copy {md5.hexdigest()} differs from the source's {f.md5} "
                                    "(corrupted in transfer); run the same command again")
    return {"bytes": n, "sha256": sha.hexdigest(), "md5": md5.hexdigest(), "source": f.url}


def download(game: str, runs: Sequence[int], checkpoints: Sequence[int], out: str | Path,
             source: str = DEFAULT_SOURCE, recheck: bool = False, progress: bool = True) -> dict[str, Any]:
    """Copy the selection to `out` (a local replay root). Returns a summary: files copied/skipped, bytes, seconds.

    Holds a lock on each run folder while writing it (two downloads of the same run cannot interleave).
    """
    from tqdm import tqdm

    from jowa_data.replay import run_logs
    from jowa_data.roots import is_url, open_root

    out = Path(out)
    if is_url(str(out)):
        raise ConfigError(f"{out}: --out must be a local folder")
    files = plan_download(source, game, runs, checkpoints, out)
    root = open_root(source)
    t0 = time.perf_counter()
    copied, skipped, nbytes = [], [], 0
    by_run: dict[int, list[DownloadFile]] = {}
    for f in files:
        by_run.setdefault(f.run, []).append(f)
    total = sum(f.size for f in files)
    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=f"download {game}",
              disable=not progress, dynamic_ncols=True, mininterval=0.5) as bar:
        done_files = 0
        for run, fs in sorted(by_run.items()):
            run_dir = out / game / str(run)
            with folder_lock(run_dir, "jowa-data download"):
                remove_stale_temps(run_dir / "replay_logs", recursive=False)  # a killed copy's partial files
                record = _read_record(run_dir)
                logs = run_logs(root, game, run)
                for f in fs:
                    done, entry = _is_done(f, record.get(f.name), recheck)
                    if done:
                        skipped.append(f.name)
                        bar.update(f.size)
                    else:
                        entry = _copy(logs, f, bar.update)
                        copied.append(f.name)
                        nbytes += entry["bytes"]
                    if record.get(f.name) != entry:
                        record[f.name] = entry
                        atomic_write_json(run_dir / RECORD, {"format": "jowa-download", "version": 1,
                                                             "files": dict(sorted(record.items()))})
                    done_files += 1
                    bar.set_postfix_str(f"files {done_files}/{len(files)}", refresh=False)
    dt = time.perf_counter() - t0
    return {"game": game, "source": str(root), "out": str(out), "runs": sorted(by_run),
            "checkpoints": sorted({f.ckpt for f in files}), "files": len(files), "copied": len(copied),
            "skipped": len(skipped), "bytes_total": total, "bytes_copied": nbytes, "seconds": round(dt, 3),
            "mb_per_s": round(nbytes / dt / 1e6, 2) if dt > 0 else None}
