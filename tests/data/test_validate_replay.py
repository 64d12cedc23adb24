"""`jowa-data validate ROOT` on a real recorded DQN-Replay root: every problem reported, each with its file;
nothing unpickled; `jowa-data stats` says what it did not decode."""

from __future__ import annotations

import gzip
import io
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from jowa_data.cli import main
from jowa_data.replay_writer import write_npy_gz
from jowa_data.validate_replay import validate_replay_root


@pytest.fixture()
def root(recorded_replay, tmp_path) -> Path:
    r = tmp_path / "replay"
    shutil.copytree(recorded_replay.root, r)
    return r


def _logs(root: Path, game: str = "Pong") -> Path:
    return root / game / "1" / "replay_logs"


def _read(p: Path) -> np.ndarray:
    with gzip.open(p, "rb") as f:
        return np.load(io.BytesIO(f.read()), allow_pickle=False)


def test_intact_root_is_valid(root):
    assert validate_replay_root(root) == []
    r = CliRunner().invoke(main, ["validate", str(root)])
    assert r.exit_code == 0 and "replay root is valid" in r.output


def test_every_problem_is_reported_with_its_file(root, tmp_path):
    pong, phoenix = _logs(root), _logs(root, "Phoenix")
    (pong / "add_count_ckpt.1.gz").unlink()  # a missing companion file
    a = _read(pong / "$store$_action_ckpt.0.gz").copy()
    a[7] = 6  # Pong has 6 actions: ids 0..5
    write_npy_gz(pong / "$store$_action_ckpt.0.gz", a)
    obs = phoenix / "$store$_observation_ckpt.2.gz"
    obs.write_bytes(obs.read_bytes()[: obs.stat().st_size // 2])  # a truncated observation file
    sentinel = tmp_path / "pwned"
    buf = io.BytesIO()  # a pickled object array whose unpickling would create the sentinel file
    np.save(buf, np.array([_Evil(str(sentinel))] * 4, dtype=object), allow_pickle=True)
    with gzip.open(phoenix / "$store$_reward_ckpt.0.gz", "wb") as f:
        f.write(buf.getvalue())
    n = _read(pong / "add_count_ckpt.2.gz")
    write_npy_gz(pong / "add_count_ckpt.2.gz", np.asarray(n + 3, np.int64))  # disagrees with invalid_range

    problems = validate_replay_root(root)
    text = "\n".join(problems)
    assert f"{pong}: checkpoint 1 is missing add_count_ckpt.1.gz" in text
    assert "$store$_action_ckpt.0.gz: 1 action ids outside Pong's 6 actions (e.g. 6)" in text
    assert "observation_ckpt.2.gz" in text and "truncated" in text
    assert "reward_ckpt.0.gz" in text and "unpickle" in text
    assert "invalid_range_ckpt.2.gz" in text and "disagrees with add_count" in text
    assert len(problems) == 5, problems
    assert not sentinel.exists()  # nothing ran
    r = CliRunner().invoke(main, ["validate", str(root)])
    assert r.exit_code == 1 and "5 problem(s)" in r.output


def test_stats_says_observations_were_not_decoded(root):
    r = CliRunner().invoke(main, ["stats", str(root)])
    assert r.exit_code == 0, r.output
    assert f"`jowa-data validate {root}` decodes" in r.output.replace("\n", " ")


class _Evil:
    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))
