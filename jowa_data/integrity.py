"""Prove that a built dataset's data files are the ones its build wrote, before anything reads them.

Why: zarr reads a missing chunk file as its fill value (zeros) and a flipped byte inside a tar member decodes
to other tokens; neither raises. The build records every data file's size and sha256 in `files.json`, and
`info.json` records the sha256 of `files.json`, so a reader can check what it is about to read:

- mode "size": every listed file exists with its size, and no task holds a file the build did not write
  (fast: one stat per file; what `jowa-data build` checks on a finished dataset by default);
- mode "full": also the sha256 of every byte (what a token cache is made under, and `--verify full`).

`stat_digest` fingerprints the files (size + mtime) so a cache can tell cheaply that they changed since it was
made, and be rebuilt (or refused) instead of serving data decoded from other bytes.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Callable

from jowa_common.errors import ConfigError, DatasetError
from jowa_common.io import sha256_bytes, sha256_file
from jowa_data.layout import FILES, DatasetInfo, read_info

VERIFY_MODES = ("off", "size", "full")


def check_mode(mode: str) -> str:
    if mode not in VERIFY_MODES:
        raise ConfigError(f"verify mode must be one of {', '.join(VERIFY_MODES)}, got {mode!r}")
    return mode


def read_files(dataset_dir: str | Path, info: DatasetInfo | None = None) -> dict[str, dict[str, Any]]:
    """files.json, refused unless its sha256 is the one info.json recorded."""
    d = Path(dataset_dir)
    info = info or read_info(d)
    p = d / FILES
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise DatasetError(f"{p}: cannot read the file list ({e.strerror or e})") from e
    if sha256_bytes(raw) != info.files_checksum:
        raise DatasetError(f"{p}: sha256 differs from info.json's files_checksum (files.json was modified)")
    try:
        return json.loads(raw)
    except json.JSONDecodeError as e:
        raise DatasetError(f"{p}: invalid JSON: {e}") from e


def task_files(files: dict[str, Any], fmt: str, game: str, key: str) -> list[str]:
    """The files.json entries of one task in one format (zarr: a folder per task; wds: `<key>-NNNNN.tar`)."""
    prefix = f"zarr/{game}/{key}/" if fmt == "zarr" else f"wds/{game}/{key}-"
    return sorted(rel for rel in files if rel.startswith(prefix))


def check_file(dataset_dir: Path, rel: str, meta: dict[str, Any], mode: str) -> str | None:
    """One problem line for a data file, or None when it is as the build wrote it."""
    p = Path(dataset_dir) / rel
    try:
        size = p.stat().st_size
    except FileNotFoundError:
        return f"{p}: missing data file (listed in {FILES})"
    except OSError as e:
        return f"{p}: cannot read ({e.strerror or e})"
    if size != meta["bytes"]:
        return f"{p}: size {size} B, {FILES} says {meta['bytes']} B (truncated or altered)"
    if mode == "full" and sha256_file(p) != meta["sha256"]:
        return f"{p}: sha256 differs from {FILES} (altered)"
    return None


def verify_task(dataset_dir: str | Path, files: dict[str, Any], fmt: str, game: str, key: str,
                mode: str = "full") -> list[str]:
    """Every problem with one task's files in one format (missing, resized, altered, stray); [] = intact."""
    from jowa_data.backends import get_backend

    d = Path(dataset_dir)
    listed = task_files(files, fmt, game, key)
    if not listed:
        return [f"{d / FILES}: lists no {fmt} files for task {key} of {game}"]
    problems = [m for rel in listed if (m := check_file(d, rel, files[rel], mode))]
    on_disk = get_backend(fmt).task_files(d, game, key)
    problems += [f"{d / rel}: not written by the build (stray file in task {key})"
                 for rel in on_disk if rel not in files]
    return problems


def verify_dataset(dataset_dir: str | Path, mode: str = "size", formats: list[str] | None = None,
                   info: DatasetInfo | None = None,
                   progress: Callable[[int], None] | None = None) -> dict[str, list[str]]:
    """Problems per damaged task key ({} = intact); `progress(1)` after each task. files.json itself must be
    intact (else DatasetError: nothing can be checked against it)."""
    d = Path(dataset_dir)
    check_mode(mode)
    info = info or read_info(d)
    if mode == "off":
        return {}
    files = read_files(d, info)
    damaged: dict[str, list[str]] = {}
    for g in info.game_names:
        for key in info.games[g]["tasks"]:
            for fmt in formats or info.formats:
                problems = verify_task(d, files, fmt, g, key, mode)
                if problems:
                    damaged.setdefault(key, []).extend(problems)
            if progress:
                progress(1)
    return damaged


def damage_error(dataset_dir: str | Path, damaged: dict[str, list[str]]) -> DatasetError:
    """One error for damaged tasks: the first problem, how many more, and what to do."""
    problems = [p for ps in damaged.values() for p in ps]
    more = f" (and {len(problems) - 1} more problems in {len(damaged)} tasks: `jowa-data validate "\
           f"{dataset_dir}` lists them)" if len(problems) > 1 else ""
    return DatasetError(f"{problems[0]}{more}; `jowa-data build` with the same arguments repairs it")


def require_intact(dataset_dir: str | Path, mode: str = "full", formats: list[str] | None = None,
                   info: DatasetInfo | None = None) -> None:
    """Raise a DatasetError naming the first damaged file, or return when every file is as the build wrote it."""
    damaged = verify_dataset(dataset_dir, mode, formats, info)
    if damaged:
        raise damage_error(dataset_dir, damaged)


def stat_digest(dataset_dir: str | Path, files: dict[str, Any], formats: list[str]) -> str:
    """sha256 over (path, size, mtime_ns) of the listed files of `formats`: changes when any of them is touched."""
    d = Path(dataset_dir)
    h = hashlib.sha256()
    for rel in sorted(files):
        if rel.split("/", 1)[0] not in formats:
            continue
        try:
            st = (d / rel).stat()
            h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{rel}\0missing\n".encode())
    return h.hexdigest()
