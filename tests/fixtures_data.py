"""Data fixtures: real DQN-Replay files recorded from the real emulator (ale-py), made once per session.

`recorded_replay`: Pong and Phoenix, run "1", capacity 500 per checkpoint file and a 150-step
episode cap, so each game has 3 suffixes (2 full logs + the final one), 8 episodes, episodes that
cross file boundaries, and a last episode cut by the end of recording (no terminal). No log is
skipped, so every played step is readable: compare a reader's episodes with
`result.episode_slices()` (== `result.expected_episodes()` here) and `result.frames[sl]`,
`result.actions[sl]`, `result.rewards[sl]`, `result.terminals[sl]`.

`bowling_manifest_dir`: a folder holding only `Bowling.toml` (task id 11, NOOP/FIRE/RIGHT/LEFT):
a game defined by a manifest file alone.

`make_recorded_replay(root, games, runs, ...)` builds more (other runs, capacities) for own fixtures.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from jowa_data.manifest import load_manifests
from jowa_data.record import RecordResult, record

FIXTURE_GAMES = ("Pong", "Phoenix")
FIXTURE_CAPACITY = 500  # rows per checkpoint file (DQN-Replay: 1,000,000)
FIXTURE_STEPS = 1130  # agent steps per game: 7 full episodes + a cut one
FIXTURE_MAX_EPISODE_STEPS = 150  # step cap (Dopamine: 27,000)

BOWLING_TOML = """\
# A game outside the shipped manifests: defined by this file alone.
name = "Bowling"
ale_rom = "bowling"
split = "other"
task_id = 11
actions = ["NOOP", "FIRE", "UP", "DOWN", "UPFIRE", "DOWNFIRE"]

[scores]
random = 23.1
human = 160.7
dqn = 42.4
"""


@dataclass
class RecordedReplay:
    root: Path  # DQN-Replay root: <root>/<Game>/<run>/replay_logs/...
    games: tuple[str, ...]
    run: str
    results: dict[str, RecordResult]  # per game: what was played and what was logged
    capacity: int
    max_episode_steps: int

    def __getitem__(self, game: str) -> RecordResult:
        return self.results[game]


def make_recorded_replay(root: Path, games=FIXTURE_GAMES, runs=("1",), steps: int = FIXTURE_STEPS,
                         capacity: int = FIXTURE_CAPACITY, max_episode_steps: int = FIXTURE_MAX_EPISODE_STEPS,
                         manifest_dirs=None, seed: int = 0) -> dict[tuple[str, str], RecordResult]:
    """Record `games` × `runs` under `root` (seed differs per game and run); returns {(game, run): result}."""
    reg = load_manifests(manifest_dirs)
    out = {}
    for gi, g in enumerate(games):
        for ri, r in enumerate(runs):
            out[(g, str(r))] = record(reg.get(g), root, run=r, steps=steps, policy="random",
                                      seed=seed + 1000 * gi + ri, capacity=capacity,
                                      max_episode_steps=max_episode_steps, progress=False)
    return out


@pytest.fixture(scope="session")
def recorded_replay(tmp_path_factory) -> RecordedReplay:
    root = tmp_path_factory.mktemp("dqn_replay")
    res = make_recorded_replay(root)
    results = {g: res[(g, "1")] for g in FIXTURE_GAMES}
    for g, r in results.items():  # the properties the tests downstream rely on
        assert r.skipped_logs == 0 and r.fully_logged() and len(r.checkpoints) >= 3 and r.num_episodes >= 3, g
        assert r.terminals[-1] == 0, g  # last episode cut
    return RecordedReplay(root=root, games=FIXTURE_GAMES, run="1", results=results,
                          capacity=FIXTURE_CAPACITY, max_episode_steps=FIXTURE_MAX_EPISODE_STEPS)


@pytest.fixture(scope="session")
def bowling_manifest_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("manifests_bowling")
    (d / "Bowling.toml").write_text(BOWLING_TOML)
    return d


# --- a built Pong dataset (both formats) of the recorded replay, with a fixed random tiny tokenizer ---------------

def make_tokenizer(path: Path) -> Path:
    """A tiny VQ-VAE with fixed random weights: real encode path, deterministic tokens."""
    import torch

    from jowa_model.tokenizer import Tokenizer, save_tokenizer, tokenizer_preset

    torch.manual_seed(0)
    return save_tokenizer(Tokenizer(tokenizer_preset("tiny")), path)


def build_args(replay: Path, tok: Path, out: Path, *extra: str) -> list[str]:
    """`jowa-data build` arguments of the fixture dataset: 300 Pong transitions in tasks of 150."""
    return ["build", "Pong", "--replay", str(replay), "--tokenizer", str(tok), "--out", str(out),
            "--checkpoints", "0-50", "--transitions", "300", "--seed", "0", "--task-transitions", "150",
            "--allow-fewer-runs", *extra]


def tree_bytes(d: Path) -> dict[str, bytes]:
    """Every file of a dataset (the stream's _cache and the folder lock, which holds a pid, excluded)."""
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*"))
            if p.is_file() and "_cache" not in p.relative_to(d).parts and p.name != ".jowa.lock"}


@pytest.fixture(scope="session")
def tokenizer_ckpt(tmp_path_factory) -> Path:
    return make_tokenizer(tmp_path_factory.mktemp("tok") / "tok.pt")


@pytest.fixture(scope="session")
def built(recorded_replay, tokenizer_ckpt, tmp_path_factory) -> Path:
    """The fixture dataset, built once with the real CLI (zarr + wds). Tests that damage it work on a copy."""
    from click.testing import CliRunner

    from jowa_data.cli import main

    out = tmp_path_factory.mktemp("built") / "ds"
    r = CliRunner().invoke(main, build_args(recorded_replay.root, tokenizer_ckpt, out, "--format", "both", "--json"))
    assert r.exit_code == 0, r.output
    return out
