"""The on-disk layout of a built token dataset (LeRobot-style: the folder describes itself).

    DIR/
      info.json          format version, games + task ids, counts, dtypes, tokenizer + manifest checksums,
                         source selection, seed, the build plan checksum (no timestamps: rebuilds are byte-equal)
      stats.json         per-game episode/return/length stats, codebook usage, bytes on disk
      episodes.parquet   one row per episode: provenance (run, episode, ckpt, row) + where it lives (task, offset)
      files.json         every data file: size and sha256 (what `jowa-data validate` checks)
      zarr/<Game>/<task>/{tokens,actions,rewards,terminals}     zarr v3 arrays, sharded, zstd
      wds/<Game>/<task>-<part>.tar                              webdataset tars (mtime=0, keys without dots)
      _plan.json         the build plan (tasks and their episodes); a rerun must match it
      _tasks/<task>.json completion record of one task (written last, atomically)
      _tmp/              scratch of running tasks (removed on rerun)

A game's data is the concatenation of its tasks in sorted task order; `episodes.parquet` gives each
episode's `offset` in that concatenation. Each build task owns its own arrays/tars, so parallel
writers never share a zarr shard (partial-shard writes from several processes lose data).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from jowa_common.errors import DatasetError

FORMAT_VERSION = 1  # bump on any incompatible layout change
TOKENS_PER_FRAME = 36  # 6x6 VQ grid (paper sec. 4.1)
VOCAB_SIZE = 2048  # codebook size (paper Table 7) -> uint16 tokens
FIELDS = ("tokens", "actions", "rewards", "terminals")
DTYPES = {"tokens": "uint16", "actions": "uint8", "rewards": "float32", "terminals": "uint8"}
FORMATS = ("zarr", "wds")

INFO = "info.json"
STATS = "stats.json"
EPISODES = "episodes.parquet"
FILES = "files.json"
PLAN = "_plan.json"
TASKS_DIR = "_tasks"
TMP_DIR = "_tmp"


@dataclass
class DatasetInfo:
    """Typed view of info.json. Every field has a default so `DatasetInfo()` works for tests."""

    format_version: int = FORMAT_VERSION  # layout version (this module's FORMAT_VERSION)
    formats: list[str] = field(default_factory=lambda: ["zarr"])  # which data folders exist
    games: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> {task_id, episodes, transitions, tasks}
    total_episodes: int = 0
    total_transitions: int = 0
    tokens_per_frame: int = TOKENS_PER_FRAME
    vocab_size: int = VOCAB_SIZE
    dtypes: dict[str, str] = field(default_factory=lambda: dict(DTYPES))
    tokenizer_checksum: str = ""  # jowa_model.tokenizer.tokenizer_checksum of the frozen tokenizer
    manifest_checksums: dict[str, str] = field(default_factory=dict)  # game -> sha256 of its manifest file
    source: dict[str, Any] = field(default_factory=dict)  # replay root name, selection (fraction/transitions)
    seed: int | None = None  # subsampling seed (None = each manifest's own)
    plan_checksum: str = ""  # sha256 of _plan.json: identifies the exact build
    files_checksum: str = ""  # sha256 of files.json
    zarr: dict[str, Any] = field(default_factory=dict)  # codec, chunk and shard rows
    wds: dict[str, Any] = field(default_factory=dict)  # rows per sample, samples per tar

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], path: Path | str = INFO) -> "DatasetInfo":
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(d) - known)
        if unknown:
            raise DatasetError(f"{path}: unknown keys {unknown} (written by a newer jowa?)")
        return cls(**d)

    @property
    def game_names(self) -> list[str]:
        return sorted(self.games)


def read_info(dataset_dir: str | Path) -> DatasetInfo:
    """Load and check info.json; clear errors for a missing, unfinished or incompatible dataset."""
    d = Path(dataset_dir)
    p = d / INFO
    if not p.is_file():
        hint = " (the build did not finish: run the same `jowa-data build` again)" if (d / PLAN).is_file() else ""
        raise DatasetError(f"{p}: not a built jowa dataset: info.json missing{hint}")
    try:
        raw = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DatasetError(f"{p}: invalid JSON: {e}") from e
    v = raw.get("format_version")
    if v != FORMAT_VERSION:
        raise DatasetError(f"{p}: format_version {v!r} is not supported (this jowa reads {FORMAT_VERSION}); "
                           "rebuild the dataset with this version's `jowa-data build`")
    return DatasetInfo.from_dict(raw, p)


def is_built_dataset(path: str | Path) -> bool:
    """True if `path` is a folder holding a finished jowa token dataset (for `jowa-data stats` dispatch)."""
    p = Path(path)
    return p.is_dir() and (p / INFO).is_file() and (p / EPISODES).is_file()


def task_key(game: str, run: int, part: int) -> str:
    """Build task name: sortable, no dots (webdataset keys end at the first dot)."""
    return f"{game}-r{run:03d}-t{part:05d}"


def zarr_task_dir(dataset_dir: Path, game: str, key: str) -> Path:
    return Path(dataset_dir) / "zarr" / game / key


def wds_tar_name(key: str, part: int) -> str:
    return f"{key}-{part:05d}.tar"
