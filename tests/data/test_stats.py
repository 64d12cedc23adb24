"""Stats: exact numbers on hand-made episodes, exact merges, and raw-replay/index reports that equal
what was actually played (real ALE via the recorder) or written (real DQN-Replay files)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from jowa_common.actions import FULL_ACTIONS
from jowa_data.cli import main as cli
from jowa_common.errors import DatasetError
from jowa_data.manifest import load_manifests
from jowa_data.replay import EpisodeRef
from jowa_data.stats import (PartialStats, distribution, merge, partial_from_episodes, replay_stats, summarize,
                             summary)
from jowa_data.subsample import build_index, write_index
from tests.data.test_subsample import write_run

PONG = ("NOOP", "FIRE", "RIGHT", "LEFT", "RIGHTFIRE", "LEFTFIRE")  # full ids 0, 1, 3, 4, 11, 12


def ref(episode: int, actions: list[int], rewards: list[float], complete: bool = True, run: int = 1) -> EpisodeRef:
    t = len(actions)
    terminals = np.zeros(t, np.uint8)
    if complete:
        terminals[-1] = 1
    return EpisodeRef(game="Pong", run=run, episode=episode, start=(0, 0), length=t, ret=float(sum(rewards)),
                      complete=complete, actions=np.array(actions, np.int32),
                      rewards=np.array(rewards, np.float32), terminals=terminals)


def test_distribution_exact_on_five_values():
    d = distribution(np.array([5, 1, 4, 2, 3]))
    assert d["count"] == 5 and d["mean"] == 3.0 and d["min"] == 1.0 and d["max"] == 5.0
    assert d["std"] == pytest.approx(np.sqrt(2.0), abs=1e-15)  # population std, like LeRobot
    # numpy linear interpolation: q = 1 + 4p
    for k, v in {"q01": 1.04, "q10": 1.4, "q25": 2.0, "q50": 3.0, "q75": 4.0, "q90": 4.6, "q99": 4.96}.items():
        assert d[k] == pytest.approx(v, abs=1e-12), k
    empty = distribution(np.zeros(0))
    assert empty["count"] == 0 and empty["mean"] is None and empty["q50"] is None


def test_partial_counts_actions_rewards_and_skips_incomplete_returns():
    refs = [ref(0, [0, 1, 1, 5], [0, 1, 0, -1]),  # ret 0, len 4
            ref(1, [2, 2, 3], [1, 1, 0]),  # ret 2, len 3
            ref(2, [4, 4], [-1, 0], complete=False)]  # cut at the end: counted in transitions/histograms only
    p = partial_from_episodes("Pong", 1, PONG, refs, {"replay": 123})
    assert p.episodes == 2 and p.incomplete_episodes == 1 and p.transitions == 9
    assert p.lengths.tolist() == [4, 3] and p.returns.tolist() == [0.0, 2.0]
    assert p.action_counts.tolist() == [1, 2, 2, 1, 2, 1]
    full = np.zeros(18, np.int64)
    full[[0, 1, 3, 4, 11, 12]] = [1, 2, 2, 1, 2, 1]
    assert p.full_action_counts.tolist() == full.tolist()
    assert p.reward_counts.tolist() == [2, 4, 3]  # -1, 0, +1

    s = summary(p, step_cap=4)
    assert s["capped_episodes"] == 1  # length 4 >= cap 4
    assert s["return"]["mean"] == 1.0 and s["return"]["std"] == 1.0 and s["length"]["q50"] == 3.5
    assert s["actions"]["minimal"] == {"NOOP": 1, "FIRE": 2, "RIGHT": 2, "LEFT": 1, "RIGHTFIRE": 2, "LEFTFIRE": 1}
    assert s["actions"]["full"]["RIGHTFIRE"] == 2 and s["actions"]["full"]["UP"] == 0
    assert list(s["actions"]["full"]) == list(FULL_ACTIONS)
    assert s["rewards"] == {"-1": 2, "0": 4, "1": 3} and s["bytes"] == {"replay": 123}


def test_action_id_outside_the_minimal_set_is_an_error():
    with pytest.raises(DatasetError, match=r"Pong/1/replay_logs/\$store\$_action_ckpt\.0\.gz: episode 0 \(starting "
                                           r"at row 0 of that file\) has action id 6 at its step 1, outside \[0, 6\)"):
        partial_from_episodes("Pong", 1, PONG, [ref(0, [0, 6], [0, 0])])


def test_merge_is_exact_and_json_round_trips():
    a = partial_from_episodes("Pong", 1, PONG, [ref(0, [0] * 5, [1] * 5), ref(1, [1] * 2, [0, 0])], {"replay": 10})
    b = partial_from_episodes("Pong", 2, PONG, [ref(0, [2] * 9, [-1] * 9, run=2)], {"replay": 5})
    whole = partial_from_episodes("Pong", 1, PONG, [ref(0, [0] * 5, [1] * 5), ref(1, [1] * 2, [0, 0]),
                                                    ref(2, [2] * 9, [-1] * 9)], {"replay": 15})
    m = merge([a, b])
    assert m.game == "Pong" and m.run is None
    s_m, s_w = summary(m), summary(whole)
    assert s_m == s_w  # quantiles of a merge are exact, not bounds
    assert s_m["length"]["q50"] == 5.0 and s_m["return"]["mean"] == pytest.approx((5 + 0 - 9) / 3)

    back = PartialStats.from_dict(json.loads(json.dumps(a.to_dict())))
    assert summary(back) == summary(a)

    other = PartialStats(game="Breakout", run=1, action_names=("NOOP", "FIRE", "RIGHT", "LEFT"),
                         lengths=np.array([7]), returns=np.array([3.0]), transitions=7,
                         action_counts=np.array([7, 0, 0, 0]), full_action_counts=np.eye(18, dtype=np.int64)[0] * 7,
                         reward_counts=np.array([0, 4, 3]))
    both = merge([m, other])
    assert both.game is None and both.action_names is None and both.action_counts is None
    assert both.full_action_counts[0] == 5 + 7 and both.transitions == 16 + 7

    rep = summarize([a, b, other], step_cap=9)
    assert set(rep["games"]) == {"Breakout", "Pong"} and set(rep["games"]["Pong"]["runs"]) == {"1", "2"}
    assert rep["games"]["Pong"]["capped_episodes"] == 1 and rep["overall"]["episodes"] == 4
    assert "minimal" not in rep["overall"]["actions"]


# --- real files -----------------------------------------------------------------------------------

EPISODES = {  # run -> list of (actions, rewards, complete) written with the real ReplayLogger
    1: [([0, 1, 2, 3, 4], [0, 1, 1, 0, -1], True), ([5] * 12, [1] * 12, True), ([1, 1, 1], [0, 0, -1], True),
        ([2, 2], [0, 1], False)],
    2: [([3] * 7, [0] * 7, True), ([0, 5, 0, 5], [-1, -1, 1, 0], True)],
}


@pytest.fixture
def pong_root(tmp_path: Path) -> Path:
    for run, eps in EPISODES.items():
        write_run(tmp_path, "Pong", run, eps, capacity=10)  # capacity 10: episodes cross checkpoint files
    return tmp_path


def _hand_summary(eps) -> tuple[list[int], list[float], np.ndarray, list[int], int]:
    complete = [e for e in eps if e[2]]
    counts = np.bincount(np.concatenate([e[0] for e in eps]), minlength=6)
    r = np.concatenate([e[1] for e in eps])
    return ([len(e[0]) for e in complete], [float(sum(e[1])) for e in complete], counts,
            [int((r < 0).sum()), int((r == 0).sum()), int((r > 0).sum())], sum(len(e[0]) for e in eps))


def test_replay_root_stats_equal_what_was_written(pong_root: Path):
    rep = replay_stats(pong_root, load_manifests(), step_cap=12)
    assert rep["kind"] == "replay"
    for run, eps in EPISODES.items():
        lengths, rets, counts, rewards, transitions = _hand_summary(eps)
        s = rep["games"]["Pong"]["runs"][str(run)]
        assert s["episodes"] == len(lengths) and s["transitions"] == transitions
        assert s["incomplete_episodes"] == sum(not e[2] for e in eps)
        assert s["return"] == distribution(np.array(rets)) and s["length"] == distribution(np.array(lengths))
        assert list(s["actions"]["minimal"].values()) == counts.tolist()
        assert [s["rewards"][k] for k in ("-1", "0", "1")] == rewards
        logs = pong_root / "Pong" / str(run) / "replay_logs"
        assert s["bytes"] == {"replay": sum(p.stat().st_size for p in logs.iterdir())}
    assert rep["games"]["Pong"]["capped_episodes"] == 1 and rep["overall"]["episodes"] == 5


def test_index_stats_from_the_index_alone_equal_replay_stats(pong_root: Path, tmp_path: Path):
    reg = load_manifests()
    from jowa_data.subsample import SubsampleOptions

    opts = SubsampleOptions(runs=(1, 2), checkpoints=(0, 99), fraction=1.0, include_incomplete=True)
    out = write_index(build_index([reg.get("Pong")], pong_root, options=opts), tmp_path / "idx" / "episodes.parquet")
    raw = replay_stats(pong_root, reg)
    # move the replay away: the index must be self-sufficient
    pong_root.joinpath("Pong").rename(tmp_path / "moved")
    idx = replay_stats(out)
    assert idx["kind"] == "index"
    strip = lambda s: {k: v for k, v in s.items() if k not in ("bytes", "runs", "selection")}  # noqa: E731
    assert strip(idx["overall"]) == strip(raw["overall"])
    for run in ("1", "2"):
        assert strip(idx["games"]["Pong"]["runs"][run]) == strip(raw["games"]["Pong"]["runs"][run])
    assert idx["overall"]["bytes"]["index"] == out.stat().st_size
    assert idx["overall"]["bytes"]["source"] == raw["overall"]["bytes"]["replay"]
    assert idx["games"]["Pong"]["selection"]["runs"] == [1, 2]
    # a folder holding episodes.parquet is read as an index too
    assert replay_stats(out.parent)["overall"] == idx["overall"]


def test_stats_cli_json_table_and_errors(pong_root: Path, tmp_path: Path):
    r = CliRunner().invoke(cli, ["stats", str(pong_root), "--json"])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.output)
    assert rep["games"]["Pong"]["runs"]["1"]["episodes"] == 3 and rep["step_cap"] == 27000
    r = CliRunner().invoke(cli, ["stats", str(pong_root)])
    assert r.exit_code == 0 and "Pong" in r.output and "overall" in r.output

    missing = tmp_path / "nope"
    r = CliRunner().invoke(cli, ["stats", str(missing)])
    assert r.exit_code == 1 and str(missing) in r.output

    empty = tmp_path / "empty"
    empty.mkdir()
    r = CliRunner().invoke(cli, ["stats", str(empty)])
    assert r.exit_code == 1 and "no DQN-Replay runs found" in r.output and str(empty) in r.output

    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"not parquet at all")
    r = CliRunner().invoke(cli, ["stats", str(bad)])
    assert r.exit_code == 1 and "not a readable Parquet file" in r.output and str(bad) in r.output

    foreign = tmp_path / "foreign.parquet"
    pq.write_table(pa.table({"x": [1, 2]}), foreign)
    with pytest.raises(DatasetError, match="not a jowa episode index"):
        replay_stats(foreign)


# --- acceptance: stats of real emulator recordings equal what was played ---------------------------

def _played(res) -> dict:
    """Hand computation from the recorder's own record of play (not from the files).

    The reader also recovers the row Dopamine's final log keeps in slot cap-1, so the files give back every
    played step (no skipped log in this fixture).
    """
    assert res.skipped_logs == 0
    eps = [np.arange(sl.start, sl.stop) for sl in res.episode_slices()]
    complete = [e for e in eps if res.terminals[e[-1]] == 1]
    steps = np.concatenate(eps)
    r = res.rewards[steps]
    return {"lengths": np.array([len(e) for e in complete]),
            "returns": np.array([float(res.rewards[e].sum()) for e in complete]),
            "incomplete": len(eps) - len(complete), "transitions": len(steps),
            "rewards": {"-1": int((r < 0).sum()), "0": int((r == 0).sum()), "1": int((r > 0).sum())}}


def test_stats_of_recorded_replay_equal_what_was_played(recorded_replay, tmp_path: Path):
    root, cap = recorded_replay.root, recorded_replay.max_episode_steps
    r = CliRunner().invoke(cli, ["stats", str(root), "--json", "--step-cap", str(cap)])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.output)
    reg = load_manifests()
    total_eps = 0
    for game in recorded_replay.games:
        res, names = recorded_replay[game], reg.get(game).actions
        want = _played(res)
        s = rep["games"][game]["runs"][recorded_replay.run]
        assert s["episodes"] == len(want["lengths"]) >= 3 and s["incomplete_episodes"] == want["incomplete"] == 1
        assert s["transitions"] == want["transitions"]
        assert s["length"] == distribution(want["lengths"]) and s["return"] == distribution(want["returns"])
        assert s["capped_episodes"] == int((want["lengths"] >= cap).sum())
        counts = np.bincount(res.actions, minlength=len(names))  # every played step
        assert s["actions"]["minimal"] == dict(zip(names, counts.tolist()))
        full = dict.fromkeys(FULL_ACTIONS, 0)
        for n, c in zip(names, counts.tolist()):
            full[n] = c
        assert s["actions"]["full"] == full
        assert s["rewards"] == want["rewards"] and s["dropped_rows"] == 0 and s["gaps"] == 0
        assert s["bytes"]["replay"] == sum(p.stat().st_size for p in res.replay_dir.iterdir())
        total_eps += s["episodes"]
    assert rep["overall"]["episodes"] == total_eps

    # the whole-data index (every episode) gives the same numbers from the index alone
    out = tmp_path / "all.parquet"
    r = CliRunner().invoke(cli, ["subsample", *recorded_replay.games, "--replay", str(root), "--out", str(out),
                                 "--runs", recorded_replay.run, "--checkpoints", "0-99", "--fraction", "1.0",
                                 "--include-incomplete", "--json"])
    assert r.exit_code == 0, r.output
    idx = json.loads(CliRunner().invoke(cli, ["stats", str(out), "--json", "--step-cap", str(cap)]).output)
    for game in recorded_replay.games:
        a, b = idx["games"][game], rep["games"][game]
        for k in ("episodes", "incomplete_episodes", "transitions", "capped_episodes", "return", "length",
                  "actions", "rewards"):
            assert a[k] == b[k], (game, k)


def test_stats_of_a_built_dataset_reads_its_index_and_adds_codebook_usage(tmp_path: Path):
    from jowa_data.build import EpisodeArrays, write_dataset

    rng = np.random.default_rng(0)
    eps = []
    for t, run in ((5, 1), (9, 1), (4, 2)):
        term = np.zeros(t, np.uint8)
        term[-1] = 1
        eps.append(EpisodeArrays(tokens=rng.integers(0, 64, (t, 36)).astype(np.uint16),
                                 actions=rng.integers(0, 6, t), rewards=rng.choice([-1.0, 0.0, 1.0], t).astype(
                                     np.float32), terminals=term, run=run))
    out = tmp_path / "ds"
    write_dataset(out, [load_manifests().get("Pong")], {"Pong": eps})
    r = CliRunner().invoke(cli, ["stats", str(out), "--json"])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.output)
    assert rep["kind"] == "dataset" and set(rep["games"]["Pong"]["runs"]) == {"1", "2"}
    s = rep["games"]["Pong"]
    assert s["episodes"] == 3 and s["transitions"] == 18 and s["length"] == distribution(np.array([5, 9, 4]))
    assert s["return"]["mean"] == pytest.approx(np.mean([float(e.rewards.sum()) for e in eps]))
    counts = np.bincount(np.concatenate([e.actions for e in eps]), minlength=6)
    assert s["actions"]["minimal"] == dict(zip(PONG, counts.tolist()))
    r = CliRunner().invoke(cli, ["stats", str(out)])
    assert r.exit_code == 0 and "Pong" in r.output
    from jowa_data import build

    if hasattr(build, "dataset_stats"):  # the build module's part of the report
        assert rep["dataset"]["games"]["Pong"]["transitions"] == 18 and "token dataset" in r.output
