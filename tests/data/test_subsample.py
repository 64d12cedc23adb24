"""Subsampling: seeded, deterministic, without replacement, per-game independent; runs/checkpoints/targets
per manifest with CLI overrides; the index round-trips with its metadata; bad input names the file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from jowa_data.cli import main as cli
from jowa_common.errors import ConfigError, DatasetError
from jowa_data.manifest import load_manifests
from jowa_data.replay_writer import ReplayLogger
from jowa_data.subsample import (SubsampleOptions, build_index, choose_runs, draw_episodes, game_seed_sequences,
                                 index_metadata, read_index, resolve_selection, target_transitions, write_index)

PAD = 3  # Dopamine's stack_size - 1 zero rows before every episode


def _layout(lengths: list[int], capacity: int) -> list[int] | None:
    """First-real-row add index of each episode, or None if this capacity skips a log (a Dopamine quirk that
    loses rows) or gives a single checkpoint file (no stitching across files to test)."""
    firsts, n, full_logs = [], 0, 0
    for t in lengths:
        firsts.append(n + PAD)
        for j in range(t):
            before, n = n, n + (PAD + 1 if j == 0 else 1)
            if n % capacity == capacity - 1:
                full_logs += 1
            elif (n + 1) // capacity > (before + 1) // capacity:
                return None  # skipped log
    return firsts if full_logs else None


def write_run(root: Path, game: str, run: int, episodes: list[tuple[list[int], list[float], bool]],
              capacity: int = 7) -> list[dict]:
    """Write episodes (actions, clipped rewards, complete) with the real Dopamine-semantics ReplayLogger.

    The capacity is raised from `capacity` until no log is skipped and >= 2 checkpoint files exist, so the files
    hold exactly what was written. Returns, per episode, the expected (ckpt, row) of its first real row: suffix k
    >= 1 (the final log too) starts at add k * cap - 1, suffix 0 at add 0.
    """
    lengths = [len(a) for a, _, _ in episodes]
    while (firsts := _layout(lengths, capacity)) is None:
        capacity += 1
    with ReplayLogger(root, game, run, capacity=capacity) as log:
        for i, (acts, rews, complete) in enumerate(episodes):
            for j, (a, r) in enumerate(zip(acts, rews)):
                frame = np.full((84, 84), (i * 37 + j) % 256, np.uint8)
                log.add(frame, a, r, terminal=complete and j == len(acts) - 1)
    assert log.skipped_logs == 0 and len(log.logged) >= 2
    out = []
    for f in firsts:
        k = 0 if f < capacity - 1 else (f + 1) // capacity
        out.append({"ckpt": k, "row": f if k == 0 else f - (k * capacity - 1)})
    return out


def episodes_of(lengths: list[int], seed: int, n_actions: int = 6, incomplete_tail: int = 0):
    rng = np.random.default_rng(seed)
    eps = [(rng.integers(0, n_actions, t).tolist(), rng.choice([-1.0, 0.0, 1.0], t).tolist(), True) for t in lengths]
    if incomplete_tail:
        eps.append(([0] * incomplete_tail, [0.0] * incomplete_tail, False))
    return eps


# --- pure logic -------------------------------------------------------------------------------------

def test_draw_episodes_without_replacement_until_target():
    lengths = np.array([10, 20, 30, 40, 50])
    for seed in range(20):
        rng = np.random.default_rng(seed)
        order = np.random.default_rng(seed).permutation(5)
        picked = draw_episodes(lengths, 45, rng)
        assert len(set(picked.tolist())) == len(picked) and picked.tolist() == sorted(picked.tolist())
        cum = np.cumsum(lengths[order])
        k = int(np.argmax(cum >= 45)) + 1  # the shortest prefix of the seeded order that reaches 45
        assert picked.tolist() == sorted(order[:k].tolist())
        assert lengths[picked].sum() >= 45 and lengths[order[:k - 1]].sum() < 45
    assert draw_episodes(lengths, 10_000, np.random.default_rng(0)).tolist() == [0, 1, 2, 3, 4]
    assert draw_episodes(lengths, 150, np.random.default_rng(0)).tolist() == [0, 1, 2, 3, 4]
    small = draw_episodes(lengths, 30, np.random.default_rng(3))
    big = draw_episodes(lengths, 100, np.random.default_rng(3))
    assert set(small.tolist()) <= set(big.tolist())  # one seeded order: a larger target takes a superset


def test_targets_selection_overrides_and_seed_rule():
    reg = load_manifests()
    pong, phoenix = reg.get("Pong"), reg.get("Phoenix")
    sel = resolve_selection(phoenix, SubsampleOptions())
    assert (sel.num_runs, sel.fraction, sel.transitions) == (2, 0.1, 0)
    assert target_transitions(sel, 1000) == 100  # exact: 0.1 * 1000 is not rounded up to 101
    assert target_transitions(resolve_selection(phoenix, SubsampleOptions(fraction=0.3)), 10) == 3
    assert target_transitions(resolve_selection(phoenix, SubsampleOptions(fraction=0.25)), 10) == 3  # ceil(2.5)
    assert target_transitions(resolve_selection(pong, SubsampleOptions()), 10**6) == 5000  # manifest transitions
    # a fraction given on the command line replaces the manifest's transitions
    assert target_transitions(resolve_selection(pong, SubsampleOptions(fraction=0.5)), 10) == 5
    s = resolve_selection(phoenix, SubsampleOptions(runs=(3, 1), checkpoints=(2, 4), seed=7))
    assert (s.runs, s.num_runs, s.checkpoints, s.seed) == ((1, 3), 2, (2, 4), 7)
    with pytest.raises(ConfigError, match="not both"):
        resolve_selection(phoenix, SubsampleOptions(fraction=0.5, transitions=10))
    with pytest.raises(ConfigError, match=r"num_runs must be in \[1, 2\]"):
        resolve_selection(phoenix, SubsampleOptions(runs=(1, 2), num_runs=3))
    with pytest.raises(ConfigError, match="checkpoints must be A-B"):
        resolve_selection(phoenix, SubsampleOptions(checkpoints=(5, 2)))
    with pytest.raises(ConfigError, match="fraction must be in"):
        resolve_selection(phoenix, SubsampleOptions(fraction=1.5))
    # documented seed rule
    r, e = game_seed_sequences(0, 37)
    ref_r, ref_e = np.random.SeedSequence([0, 37]).spawn(2)
    assert np.array_equal(r.generate_state(4), ref_r.generate_state(4))
    assert np.array_equal(e.generate_state(4), ref_e.generate_state(4))
    assert choose_runs([1, 2, 3, 4, 5], 2, np.random.default_rng(r)) == sorted(
        np.random.default_rng(ref_r).choice([1, 2, 3, 4, 5], 2, replace=False).tolist())
    assert choose_runs([2, 4], 3, np.random.default_rng(0)) == [2, 4]


# --- real replay files ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def replay(tmp_path_factory) -> tuple[Path, dict]:
    """Pong runs 1, 2, 4 and Phoenix runs 1, 2, 3 (real DQN-Replay files; episodes cross checkpoint files)."""
    root = tmp_path_factory.mktemp("replay")
    written = {}
    for game, runs in (("Pong", (1, 2, 4)), ("Phoenix", (1, 2, 3))):
        n_act = 6 if game == "Pong" else 8
        for run in runs:
            lengths = [5 + (7 * i + run) % 11 for i in range(10 + run)]
            eps = episodes_of(lengths, seed=run * 100 + len(game), n_actions=n_act, incomplete_tail=4)
            written[(game, run)] = (eps, write_run(root, game, run, eps, capacity=9))
    return root, written


def test_index_rows_match_what_was_written(replay, tmp_path: Path):
    root, written = replay
    reg = load_manifests()
    opts = SubsampleOptions(runs=(1, 2, 4), checkpoints=(0, 999), fraction=1.0, include_incomplete=True)
    t = build_index([reg.get("Pong")], root, options=opts)
    rows = t.to_pylist()
    for run in (1, 2, 4):
        eps, starts = written[("Pong", run)]
        got = [r for r in rows if r["run"] == run]
        assert [r["length"] for r in got] == [len(a) for a, _, _ in eps]
        assert [r["ret"] for r in got] == [float(sum(rw)) for _, rw, _ in eps]
        assert [r["complete"] for r in got] == [c for _, _, c in eps]
        assert [(r["ckpt"], r["row"]) for r in got] == [(s["ckpt"], s["row"]) for s in starts]
        assert [r["action_counts"] for r in got] == [np.bincount(a, minlength=6).tolist() for a, _, _ in eps]
        assert [r["reward_pos"] for r in got] == [sum(x > 0 for x in rw) for _, rw, _ in eps]
        assert {r["game"] for r in got} == {"Pong"} and {r["task_id"] for r in got} == {39}
        assert [r["episode"] for r in got] == sorted(r["episode"] for r in got)
    # default: only complete episodes
    t2 = build_index([reg.get("Pong")], root, options=SubsampleOptions(runs=(1, 2, 4), checkpoints=(0, 999),
                                                                         fraction=1.0))
    assert all(t2.column("complete").to_pylist()) and t2.num_rows == t.num_rows - 3
    meta = index_metadata(t2)
    assert meta["games"]["Pong"]["incomplete_skipped"] == 3


def test_fraction_target_and_determinism_and_game_independence(replay, tmp_path: Path):
    root, written = replay
    reg = load_manifests()
    opts = SubsampleOptions(seed=3, fraction=0.3, checkpoints=(0, 999))
    a = write_index(build_index([reg.get("Phoenix")], root, options=opts), tmp_path / "a.parquet")
    b = write_index(build_index([reg.get("Phoenix")], root, options=opts), tmp_path / "b.parquet")
    assert a.read_bytes() == b.read_bytes()  # byte-identical
    phx = read_index(a)
    meta = index_metadata(phx)["games"]["Phoenix"]
    assert len(meta["runs"]) == 2 and set(meta["runs"]) <= {1, 2, 3}
    pool = sum(sum(len(a) for a, _, c in written[("Phoenix", r)][0] if c) for r in meta["runs"])
    assert meta["pool_transitions"] == pool and meta["target_transitions"] == int(np.ceil(0.3 * pool))
    lengths = phx.column("length").to_numpy()
    assert lengths.sum() == meta["selected_transitions"] >= meta["target_transitions"]
    # exactly the shortest prefix of the seeded order (SEED_RULE) over the pool sorted by (run, episode)
    pool = [len(a) for r in meta["runs"] for a, _, c in written[("Phoenix", r)][0] if c]
    order = np.random.default_rng(game_seed_sequences(3, 37)[1]).permutation(len(pool))
    k = int(np.argmax(np.cumsum(np.array(pool)[order]) >= meta["target_transitions"])) + 1
    assert lengths.tolist() == [pool[i] for i in sorted(order[:k])]
    keys = list(zip(phx.column("run").to_pylist(), phx.column("episode").to_pylist()))
    assert len(set(keys)) == len(keys)  # without replacement
    # a different seed gives a different selection
    c = build_index([reg.get("Phoenix")], root, options=SubsampleOptions(seed=4, fraction=0.3, checkpoints=(0, 999)))
    assert c.select(["run", "episode"]).to_pylist() != phx.select(["run", "episode"]).to_pylist()


def test_game_selection_independent_of_other_games(replay):
    root, _ = replay
    reg = load_manifests()
    opts = SubsampleOptions(seed=11, fraction=0.5, checkpoints=(0, 999), runs=(1, 2, 3, 4), num_runs=2,
                            allow_fewer_runs=True)
    alone = build_index([reg.get("Phoenix")], root, options=opts)
    with_pong = build_index([reg.get("Pong"), reg.get("Phoenix")], root, options=opts)
    rows = [r for r in with_pong.to_pylist() if r["game"] == "Phoenix"]
    assert rows == alone.to_pylist()
    assert index_metadata(with_pong)["games"]["Phoenix"] == index_metadata(alone)["games"]["Phoenix"]
    assert [r["game"] for r in with_pong.to_pylist()] == sorted(r["game"] for r in with_pong.to_pylist())


def test_checkpoint_range_keeps_episodes_starting_in_it(replay):
    root, written = replay
    reg = load_manifests()
    eps, starts = written[("Pong", 1)]
    last = max(s["ckpt"] for s in starts)
    assert last >= 2
    t = build_index([reg.get("Pong")], root, options=SubsampleOptions(runs=(1,), checkpoints=(1, last - 1),
                                                                        fraction=1.0))
    want = [(s["ckpt"], s["row"], len(e[0])) for s, e in zip(starts, eps) if 1 <= s["ckpt"] <= last - 1 and e[2]]
    assert list(zip(t.column("ckpt").to_pylist(), t.column("row").to_pylist(), t.column("length").to_pylist())) == want
    meta = index_metadata(t)["games"]["Pong"]
    assert meta["checkpoints_used"] == {"1": list(range(1, last))}
    logs = root / "Pong" / "1" / "replay_logs"
    assert meta["source_bytes"]["1"] == sum(p.stat().st_size for p in logs.iterdir()
                                            if int(p.name.rsplit(".", 2)[-2]) in range(1, last))


def test_missing_runs_and_folders_name_the_folder(replay, tmp_path: Path):
    root, _ = replay
    reg = load_manifests()
    with pytest.raises(DatasetError, match=r"Pong: 2 runs needed but only 1 of the candidate runs \[3, 4, 5\]"):
        build_index([reg.get("Pong")], root, options=SubsampleOptions(runs=(3, 4, 5), num_runs=2))
    t = build_index([reg.get("Pong")], root, options=SubsampleOptions(runs=(3, 4, 5), num_runs=2,
                                                                        allow_fewer_runs=True, fraction=1.0,
                                                                        checkpoints=(0, 999)))
    assert set(t.column("run").to_pylist()) == {4}
    with pytest.raises(DatasetError, match=r"Seaquest: game folder not found"):
        build_index([reg.get("Seaquest")], root)
    with pytest.raises(DatasetError, match=r"Pong/1/replay_logs: no checkpoint in the range 500-600"):
        build_index([reg.get("Pong")], root, options=SubsampleOptions(runs=(1,), checkpoints=(500, 600)))


def test_subsample_cli_writes_index_and_reports(replay, tmp_path: Path):
    root, _ = replay
    out = tmp_path / "sub" / "episodes.parquet"
    args = ["subsample", "Pong", "Phoenix", "--replay", str(root), "--out", str(out), "--runs", "1,2",
            "--checkpoints", "0-99", "--fraction", "0.5", "--seed", "5"]
    r = CliRunner().invoke(cli, args + ["--json"])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.output)
    assert rep["games"]["Pong"]["runs"] == [1, 2] and rep["games"]["Phoenix"]["seed"] == 5
    assert rep["format"] == "jowa-episode-index" and rep["seed_rule"].startswith("per game")
    first = out.read_bytes()
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0 and "Phoenix" in r.output and out.read_bytes() == first
    meta = json.loads(pq.read_schema(out).metadata[b"jowa"])
    assert len(meta["games"]["Pong"]["manifest_sha256"]) == 64 and meta["jowa_version"]
    # Pong's manifest asks for 5000 transitions: more than exist → all taken, warned on stderr
    r = CliRunner().invoke(cli, ["subsample", "Pong", "--replay", str(root), "--out", str(tmp_path / "p.parquet"),
                                 "--checkpoints", "0-99", "--allow-fewer-runs"])
    assert r.exit_code == 0 and "fewer than the target 5000" in r.output

    r = CliRunner().invoke(cli, ["subsample", "Pong", "--replay", str(root), "--out", str(tmp_path / "x.parquet"),
                                 "--fraction", "0.1", "--transitions", "5"])
    assert r.exit_code == 1 and "not both" in r.output
    r = CliRunner().invoke(cli, ["subsample", "Pongg", "--replay", str(root), "--out", str(tmp_path / "x.parquet")])
    assert r.exit_code == 1 and "unknown game 'Pongg'" in r.output
    r = CliRunner().invoke(cli, ["subsample", "Pong", "--replay", str(root), "--out", str(tmp_path / "x.parquet"),
                                 "--checkpoints", "a-b"])
    assert r.exit_code == 2
    assert not (tmp_path / "x.parquet").exists()


def test_read_index_rejects_bad_files(tmp_path: Path):
    missing = tmp_path / "none.parquet"
    with pytest.raises(DatasetError, match="episode index not found") as e:
        read_index(missing)
    assert str(missing) in str(e.value)
    junk = tmp_path / "junk.parquet"
    junk.write_bytes(b"PAR1 nope")
    with pytest.raises(DatasetError, match="not a readable Parquet file"):
        read_index(junk)


def test_checkpoints_without_a_complete_episode_say_so(recorded_replay):
    """The final log of the fixture run holds only the cut last episode: selecting it alone is an error that
    says why, not an empty selection."""
    from jowa_common.errors import DatasetError
    from jowa_data.manifest import load_manifests
    from jowa_data.subsample import SubsampleOptions, build_index

    from jowa_data.replay import list_checkpoints

    last = max(list_checkpoints(recorded_replay.root, "Pong", 1))
    with pytest.raises(DatasetError, match=rf"Pong: checkpoints {last}-{last} of runs \[1\] hold no complete "
                                           r"episode that starts there \(1 incomplete\); widen --checkpoints"):
        build_index([load_manifests(None).get("Pong")], recorded_replay.root,
                    options=SubsampleOptions(checkpoints=(last, last), runs=(1,), num_runs=1))
