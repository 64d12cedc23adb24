"""What every storage backend does: write one task's arrays atomically, read them back, list its files."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from jowa_common.errors import DatasetError
from jowa_data.layout import DTYPES, TOKENS_PER_FRAME


@dataclass
class TaskArrays:
    """The transitions of one build task, episodes back to back (rows = transitions)."""

    tokens: np.ndarray  # (N, 36) uint16 codebook ids
    actions: np.ndarray  # (N,) uint8 full 18-action ids
    rewards: np.ndarray  # (N,) float32 clipped rewards, as stored in DQN-Replay
    terminals: np.ndarray  # (N,) uint8 game-over flags

    def __post_init__(self) -> None:
        n = len(self.tokens)
        assert self.tokens.shape == (n, TOKENS_PER_FRAME), self.tokens.shape
        for name in ("actions", "rewards", "terminals"):
            assert getattr(self, name).shape == (n,), (name, getattr(self, name).shape)

    def __len__(self) -> int:
        return len(self.tokens)

    def as_dict(self) -> dict[str, np.ndarray]:
        return {"tokens": self.tokens, "actions": self.actions, "rewards": self.rewards, "terminals": self.terminals}

    @classmethod
    def checked(cls, arrays: dict[str, np.ndarray], where: Path | str) -> "TaskArrays":
        """Build from arrays read from disk, turning wrong dtypes/shapes into a `DatasetError` naming `where`."""
        for k, dt in DTYPES.items():
            if k not in arrays:
                raise DatasetError(f"{where}: missing array '{k}'")
            if arrays[k].dtype != np.dtype(dt):
                raise DatasetError(f"{where}: '{k}' has dtype {arrays[k].dtype}, expected {dt}")
        n = len(arrays["tokens"])
        if arrays["tokens"].ndim != 2 or arrays["tokens"].shape[1] != TOKENS_PER_FRAME:
            raise DatasetError(f"{where}: 'tokens' has shape {arrays['tokens'].shape}, expected (N, {TOKENS_PER_FRAME})")
        for k in ("actions", "rewards", "terminals"):
            if arrays[k].shape != (n,):
                raise DatasetError(f"{where}: '{k}' has shape {arrays[k].shape}, expected ({n},) like 'tokens'")
        return cls(**{k: arrays[k] for k in DTYPES})


class Backend(Protocol):
    name: str

    def write_task(self, dataset_dir: Path, game: str, key: str, arrays: TaskArrays) -> list[str]:
        """Write the task under a temporary name, then rename it into place. Returns the files (relative)."""

    def remove_task(self, dataset_dir: Path, game: str, key: str) -> None:
        """Delete whatever a killed run may have left of this task."""

    def read_task(self, dataset_dir: Path, game: str, key: str) -> TaskArrays:
        """Read one task back (raises `DatasetError` naming the file on damage)."""

    def task_files(self, dataset_dir: Path, game: str, key: str) -> list[str]:
        """The task's files, relative to `dataset_dir`, sorted."""
