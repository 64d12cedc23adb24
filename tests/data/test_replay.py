"""DQN-Replay reader: exact round-trips through the real writer (ReplayLogger) and the real recorder (ALE)."""

from __future__ import annotations

import shutil
from dataclasses import dataclass

import numpy as np
import pytest
from click.testing import CliRunner

from jowa_data import replay
from jowa_common.errors import ReplayFormatError
from jowa_data.npy_stream import available_decoders
from jowa_data.replay_writer import ReplayLogger, replay_dir


@dataclass
class Played:
    frames: np.ndarray  # (S, 84, 84)
    actions: np.ndarray
    rewards: np.ndarray
    terminals: np.ndarray
    episodes: list[slice]  # per played episode, in step order
    skipped_logs: int


def play(root, lengths, game="Pong", run=1, capacity=40, seed=0, cut_last=0) -> Played:
    """Write episodes of the given lengths (+ a cut tail of `cut_last` steps) with the real writer."""
    rng = np.random.default_rng(seed)
    lens = list(lengths) + ([cut_last] if cut_last else [])
    s = sum(lens)
    frames = rng.integers(0, 256, (s, 84, 84), dtype=np.uint8)
    frames[::5] = 0  # black real frames: padding must be dropped by position, not by value
    actions = rng.integers(0, 6, s).astype(np.int32)
    rewards = rng.choice(np.array([-1.0, 0.0, 1.0], np.float32), s)
    terms = np.zeros(s, np.uint8)
    eps, t = [], 0
    for i, n in enumerate(lens):
        eps.append(slice(t, t + n))
        if not (cut_last and i == len(lens) - 1):
            terms[t + n - 1] = 1
        t += n
    with ReplayLogger(root, game, run, capacity=capacity, compresslevel=1) as lg:
        for i in range(s):
            lg.add(frames[i], int(actions[i]), float(rewards[i]), bool(terms[i]))
    return Played(frames, actions, rewards, terms, eps, lg.skipped_logs)


def check_episodes(eps, played: Played, slices: list[slice], complete: list[bool] | None = None) -> None:
    eps = sorted(eps, key=lambda e: e.ref.episode)
    assert [e.ref.episode for e in eps] == list(range(len(eps)))
    assert len(eps) == len(slices)
    for e, sl in zip(eps, slices):
        assert e.length == sl.stop - sl.start
        np.testing.assert_array_equal(e.frames, played.frames[sl])
        np.testing.assert_array_equal(e.actions, played.actions[sl])
        np.testing.assert_array_equal(e.rewards, played.rewards[sl])
        np.testing.assert_array_equal(e.terminals, played.terminals[sl])
        assert e.ret == pytest.approx(float(played.rewards[sl].sum()))
    if complete is not None:
        assert [e.complete for e in eps] == complete


LENGTHS = [25, 18, 10, 4, 9, 31, 1, 22, 14, 37, 3]  # 174 steps + 33 padding rows over capacity 40


@pytest.fixture
def run40(tmp_path):
    played = play(tmp_path, LENGTHS, cut_last=7)
    assert played.skipped_logs == 0
    return tmp_path, played


def test_round_trip_across_checkpoints_padding_gone(run40):
    root, played = run40
    ckpts = replay.list_checkpoints(root, "Pong", 1)
    assert ckpts == list(range(len(ckpts))) and len(ckpts) >= 5
    scan = replay.inspect_run(root, "Pong", 1)
    assert scan.padding_rows == 3 * (len(LENGTHS) + 1) and scan.dropped_rows == 0
    assert scan.rows == scan.padding_rows + len(played.actions)  # the final log's slot cap-1 included: no row lost
    assert any(len(r.spans) > 1 for r in scan.episodes)  # some episodes straddle files
    eps = list(replay.iter_episodes(root, "Pong", 1, chunk_rows=7))  # chunk edges inside episodes
    check_episodes(eps, played, played.episodes, [True] * len(LENGTHS) + [False])


def test_refs_point_into_the_valid_stream(run40):
    root, played = run40
    refs = replay.scan_run(root, "Pong", 1)
    assert refs[0].start == (0, 3)  # after the 3 padding rows of suffix 0
    for r in refs:
        assert r.start == r.spans[0][:2]
        assert sum(hi - lo for _, lo, hi in r.spans) == r.length
        assert r.actions.dtype == np.int32 and r.rewards.dtype == np.float32 and r.terminals.dtype == np.uint8
    # frames of a straddling episode, alone, equal the batched read; read_frames maps valid rows the same way
    multi = next(r for r in refs if len(r.spans) > 1)
    ep = replay.read_episode(root, multi)
    sl = played.episodes[multi.episode]
    np.testing.assert_array_equal(ep.frames, played.frames[sl])
    ckpt, lo, hi = multi.spans[1]
    rows = [hi - 1, lo, lo, hi - 1, lo + 1 if hi - lo > 1 else lo]
    got = replay.read_frames(root, "Pong", 1, ckpt, rows)
    off = multi.spans[0][2] - multi.spans[0][1]
    np.testing.assert_array_equal(got, ep.frames[[off + r - lo for r in rows]])


@pytest.mark.parametrize("decoder", available_decoders())
def test_every_decoder_gives_the_same_frames(run40, decoder):
    root, played = run40
    eps = list(replay.iter_episodes(root, "Pong", 1, decoder=decoder))
    check_episodes(eps, played, played.episodes)


def test_fsspec_memory_and_file_urls(run40):
    import fsspec

    root, played = run40
    fs = fsspec.filesystem("memory")
    base = f"/replay-{id(played)}"
    for p in replay_dir(root, "Pong", 1).iterdir():
        fs.pipe(f"{base}/Pong/1/replay_logs/{p.name}", p.read_bytes())
    for url in (f"memory://{base}", f"file://{root}"):
        assert replay.list_checkpoints(url, "Pong", 1) == replay.list_checkpoints(root, "Pong", 1)
        eps = list(replay.iter_episodes(url, "Pong", 1))
        check_episodes(eps, played, played.episodes)
    with replay.open_gz(f"memory://{base}/Pong/1/replay_logs/add_count_ckpt.0.gz") as f:
        assert f.read(6) == b"\x93NUMPY"
    fs.rm(base, recursive=True)


def test_ignores_files_it_does_not_need(run40):
    root, played = run40
    d = replay_dir(root, "Pong", 1)
    (d / "episode_end_indices_ckpt.0.gz").write_bytes(b"\x80\x04 not a pickle we would ever load")
    (d / "checkpoint").write_text("junk")
    (d / ".add_count_ckpt.9.gz.tmp").write_bytes(b"half")
    check_episodes(list(replay.iter_episodes(root, "Pong", 1)), played, played.episodes)


def test_start_after_suffix_zero(run40):
    """JOWA reads 1..N: the reader uses suffix 0's terminals when present, else drops the start fragment."""
    root, played = run40
    full = replay.scan_run(root, "Pong", 1)
    later = replay.inspect_run(root, "Pong", 1, checkpoints=range(1, 5))
    # with suffix 0 on disk, the episode that started in it is a fragment; later ones match the full scan exactly
    first = next(r for r in full if r.start[0] >= 1)
    assert later.episodes[0].start == first.start and later.episodes[0].length == first.length
    # remove suffix 0: still the same episodes (the fragment is recognised by its terminal), fragment counted
    for p in replay_dir(root, "Pong", 1).glob("*_ckpt.0.gz"):
        p.unlink()
    assert replay.list_checkpoints(root, "Pong", 1)[0] == 1
    scan = replay.inspect_run(root, "Pong", 1)
    assert scan.dropped_rows > 0
    assert [(r.start, r.length) for r in scan.episodes] == [(r.start, r.length) for r in full if r.start[0] >= 1]
    i0 = next(i for i, r in enumerate(full) if r.start[0] >= 1)
    eps = list(replay.iter_episodes(root, "Pong", 1))
    check_episodes(eps, played, played.episodes[i0:])


def test_lookbehind_sees_a_clean_start(tmp_path):
    """A terminal in the last valid rows of suffix k-1: suffix k starts with (the rest of) padding, then an episode."""
    played = play(tmp_path, [36, 10, 5], capacity=40)  # 3 pad + 36 rows = 39 = cap-1: terminal ends suffix 0
    assert replay.list_checkpoints(tmp_path, "Pong", 1) == [0, 1]
    scan = replay.inspect_run(tmp_path, "Pong", 1, checkpoints=[1])
    assert scan.dropped_rows == 0 and scan.padding_rows == 6
    check_episodes(list(replay.iter_episodes(tmp_path, "Pong", 1, checkpoints=[1])), played, played.episodes[1:])


def test_gap_in_suffixes_is_an_error_unless_allowed(run40):
    root, played = run40
    for p in replay_dir(root, "Pong", 1).glob("*_ckpt.2.gz"):
        p.unlink()
    with pytest.raises(ReplayFormatError, match=r"checkpoints 1 and 3 are not contiguous \(suffix 2 missing\)"):
        replay.scan_run(root, "Pong", 1)
    scan = replay.inspect_run(root, "Pong", 1, allow_gaps=True)
    assert len(scan.gaps) == 1 and scan.dropped_rows > 0
    full_slices = played.episodes
    refs = scan.episodes
    cut = [r for r in refs if not r.complete]
    assert cut and cut[0].spans[-1][0] == 1  # the episode open at the gap is kept, cut
    eps = {e.ref.episode: e for e in replay.iter_episodes(root, "Pong", 1, allow_gaps=True)}
    for r in refs:  # every episode read equals a played episode (or its beginning, if cut)
        e = eps[r.episode]
        match = [sl for sl in full_slices if np.array_equal(played.actions[sl][: r.length], e.actions)
                 and np.array_equal(played.frames[sl][: r.length], e.frames)]
        assert match and r.complete == bool(e.terminals[-1])


def test_skipped_log_is_a_gap(tmp_path):
    """Dopamine's quirk: an episode start jumping over cap-1 skips a log; add_counts reveal the lost rows."""
    played = play(tmp_path, [22, 15, 30, 30, 30, 20], capacity=40)  # the start of ep 3 jumps over add 79
    assert played.skipped_logs == 1
    with pytest.raises(ReplayFormatError, match="40 transitions were never logged between checkpoints 0 "):
        replay.scan_run(tmp_path, "Pong", 1)
    scan = replay.inspect_run(tmp_path, "Pong", 1, allow_gaps=True)
    assert len(scan.gaps) == 1 and "never logged" in scan.gaps[0]
    assert [r.complete for r in scan.episodes][:2] == [True, False]  # ep 1 is cut by the lost wrap
    eps = sorted(replay.iter_episodes(tmp_path, "Pong", 1, allow_gaps=True), key=lambda e: e.ref.episode)
    check_episodes(eps[:1], played, played.episodes[:1])
    np.testing.assert_array_equal(eps[1].frames, played.frames[played.episodes[1]][: eps[1].length])
    np.testing.assert_array_equal(eps[-1].frames, played.frames[played.episodes[-1]])


def test_skipped_first_log_starts_with_a_fragment(tmp_path):
    """The first wrap was not logged: suffix 0 already holds a wrapped buffer, so it starts mid-episode."""
    played = play(tmp_path, [35, 2, 30, 30, 30], capacity=40)  # 3+35 = 38: ep 1's start jumps over add 39
    assert played.skipped_logs >= 1
    scan = replay.inspect_run(tmp_path, "Pong", 1, checkpoints=[0])
    assert scan.dropped_rows > 0 and scan.episodes
    last = scan.episodes[-1]
    n = last.length
    sl = next(sl for sl in played.episodes if np.array_equal(played.actions[sl][:n], last.actions))
    ep = replay.read_episode(tmp_path, last)
    np.testing.assert_array_equal(ep.frames, played.frames[sl][:n])


def test_tail_without_terminal_is_incomplete(tmp_path):
    played = play(tmp_path, [12], cut_last=50, capacity=40)
    refs = replay.scan_run(tmp_path, "Pong", 1)
    assert [r.complete for r in refs] == [True, False] and refs[1].length == 50
    check_episodes(list(replay.iter_episodes(tmp_path, "Pong", 1)), played, played.episodes)


def test_unwrapped_single_final_log(tmp_path):
    """A run shorter than one capacity: only suffix 0, written by close() with add_count = cursor."""
    played = play(tmp_path, [5, 7], capacity=1000)
    assert replay.list_checkpoints(tmp_path, "Pong", 1) == [0]
    check_episodes(list(replay.iter_episodes(tmp_path, "Pong", 1)), played, played.episodes, [True, True])


def test_cli_replay_scan_json(run40):
    import json

    from jowa_data.cli import main

    root, played = run40
    res = CliRunner().invoke(main, ["replay-scan", str(root), "Pong", "--run", "1", "--frames", "--json"])
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout)
    assert d["episodes"] == len(LENGTHS) + 1 and d["complete_episodes"] == len(LENGTHS)
    assert d["frames_read"] == d["transitions"] == len(played.actions) and d["dropped_rows"] == 0


# --- acceptance: the real recorder (ALE), two games, several checkpoints ---------------------------------------

@pytest.mark.slow
def test_recorder_round_trip_two_games(tmp_path):
    from jowa_data.manifest import load_manifests
    from jowa_data.record import record

    reg = load_manifests()
    for game, seed in (("Pong", 3), ("Seaquest", 4)):
        res = record(reg.get(game), tmp_path, run=2, steps=500, policy="random", seed=seed, capacity=150,
                     max_episode_steps=67, progress=False)
        assert len(res.checkpoints) >= 3 and res.num_episodes >= 5 and res.skipped_logs == 0
        assert replay.list_checkpoints(tmp_path, game, 2) == list(range(len(res.checkpoints)))
        eps = sorted(replay.iter_episodes(tmp_path, game, 2), key=lambda e: e.ref.episode)
        assert any(len(e.ref.spans) > 1 for e in eps)
        assert len(eps) == res.num_episodes
        for e, sl in zip(eps, res.episode_slices()):
            assert (e.ref.game, e.ref.run) == (game, 2)
            np.testing.assert_array_equal(e.frames, res.frames[sl])
            np.testing.assert_array_equal(e.actions, res.actions[sl])
            np.testing.assert_array_equal(e.rewards, res.rewards[sl])
            np.testing.assert_array_equal(e.terminals, res.terminals[sl])
            assert e.complete == bool(res.terminals[sl][-1])
        # the whole played sequence, in order, with padding gone
        np.testing.assert_array_equal(np.concatenate([e.frames for e in eps]), res.frames)
        np.testing.assert_array_equal(np.concatenate([e.actions for e in eps]), res.actions)
        np.testing.assert_array_equal(np.concatenate([e.terminals for e in eps]), res.terminals)


def test_unknown_game_lists_the_games(run40):
    root, _ = run40
    with pytest.raises(ReplayFormatError, match=r"unknown game 'Breakout'.*games found: Pong"):
        replay.scan_run(root, "Breakout", 1)
    with pytest.raises(ReplayFormatError, match=r"no run 7 for game Pong \(runs found: 1\)"):
        replay.scan_run(root, "Pong", 7)
    shutil.rmtree(replay_dir(root, "Pong", 1))
    with pytest.raises(ReplayFormatError, match="replay_logs"):
        replay.list_checkpoints(root, "Pong", 1)


def test_final_log_right_after_a_wrap_log_adds_nothing(tmp_path):
    """close() just after a regular log: the final suffix repeats the previous buffer, so it holds no new rows."""
    played = play(tmp_path, [10, 8, 12, 5, 9], capacity=20)  # 59 adds = the log at add_count 59, then close()
    assert replay.list_checkpoints(tmp_path, "Pong", 1) == [0, 1, 2, 3]
    scan = replay.inspect_run(tmp_path, "Pong", 1)
    assert scan.rows == 59 and scan.episodes[-1].spans[-1][0] == 2
    check_episodes(list(replay.iter_episodes(tmp_path, "Pong", 1)), played, played.episodes, [True] * 5)
