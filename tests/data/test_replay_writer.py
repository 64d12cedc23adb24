"""ReplayLogger: Dopamine 2019 buffer semantics and the exact on-disk format, on tiny synthetic streams."""

import gzip
import io

import numpy as np
import pytest

from jowa_data import replay_writer as W
from jowa_common.errors import ReplayFormatError


def load(d, name, suffix):
    with gzip.open(d / W.ckpt_filename(name, suffix), "rb") as f:
        return np.load(io.BytesIO(f.read()), allow_pickle=False)


def frame(v):
    return np.full((84, 84), v, dtype=np.uint8)


def play(logger, lengths, start=1):
    """Add episodes of the given lengths; obs value / action / reward encode the global step."""
    v = start
    for L in lengths:
        for t in range(L):
            logger.add(frame(v % 256), v % 6, float((v % 3) - 1), t == L - 1)
            v += 1
    return v


def read_stream(d, logged):
    """Dopamine read rule per suffix, stitched: list of (obs value, action, reward, terminal)."""
    rows = []
    for lc in logged:
        n = int(load(d, "add_count", lc.suffix))
        arrs = [load(d, W.STORE_PREFIX + k, lc.suffix) for k in W.STORE_NAMES]
        cap = len(arrs[0])
        if n >= cap:
            idx = np.r_[np.arange(n % cap, cap), np.arange(n % cap)]
        elif lc.suffix == 0:
            idx = np.arange(n)
        else:  # final log after earlier ones: slot cap-1 holds the add right after the previous log
            idx = np.r_[[] if n == cap - 1 else [cap - 1], np.arange(n)].astype(int)
        rows += [(int(arrs[0][i, 0, 0]), int(arrs[1][i]), float(arrs[2][i]), int(arrs[3][i])) for i in idx]
    return rows


def test_padding_rotation_and_final(tmp_path):
    cap = 10
    lg = W.ReplayLogger(tmp_path, "Pong", 1, capacity=cap)
    play(lg, [5])  # 3 pad + 5 = 8 adds
    lg.add(frame(100), 0, 0.0, False)  # 3 pad + 1: 8 -> 12 jumps over 9 = cap-1: the 2019 skip quirk
    assert lg.add_count == 12 and lg.logged == [] and lg.skipped_logs == 1
    for v in range(101, 108):  # adds 12..18; add_count 19 = 2*cap-1 -> log suffix 0
        lg.add(frame(v), v % 6, 1.0, False)
    assert [(c.suffix, c.add_count, c.first_add, c.stop_add) for c in lg.logged] == [(0, 19, 9, 19)]
    lg.add(frame(108), 4, -1.0, True)  # add 19 (slot 9), add_count 20
    lg.add(frame(203), 5, 0.0, False)  # 3 pad + 1 -> 24
    lg.close()
    d = W.replay_dir(tmp_path, "Pong", 1)
    assert d == tmp_path / "Pong" / "1" / "replay_logs"
    assert sorted(p.name for p in d.iterdir()) == sorted(
        W.ckpt_filename(n, s) for n in W.FILE_NAMES for s in (0, 1))
    final = lg.logged[-1]
    assert (final.suffix, final.add_count, final.first_add, final.stop_add, final.final) == (1, 4, 19, 24, True)
    assert int(load(d, "add_count", 1)) == 24 % cap
    # dtypes and shapes exactly as DQN-Replay
    for s in (0, 1):
        assert load(d, "$store$_observation", s).dtype == np.uint8
        assert load(d, "$store$_observation", s).shape == (cap, 84, 84)
        assert load(d, "$store$_action", s).dtype == np.int32 and load(d, "$store$_action", s).shape == (cap,)
        assert load(d, "$store$_reward", s).dtype == np.float32
        assert load(d, "$store$_terminal", s).dtype == np.uint8
        ac = load(d, "add_count", s)
        assert ac.dtype == np.int64 and ac.shape == ()
        ir = load(d, "invalid_range", s)
        assert ir.dtype == np.int64 and ir.shape == (5,)
    np.testing.assert_array_equal(load(d, "invalid_range", 0), [8, 9, 0, 1, 2])  # cursor 9
    np.testing.assert_array_equal(load(d, "invalid_range", 1), [3, 4, 5, 6, 7])  # cursor 4
    # suffix 1 = final: slots 0..3 = pad, pad, pad, frame 203; slot 9 still holds the add 19 (frame 108)
    obs1 = load(d, "$store$_observation", 1)[:, 0, 0]
    assert obs1[:4].tolist() == [0, 0, 0, 203] and obs1[9] == 108
    assert load(d, "$store$_terminal", 1)[9] == 1
    # stitched read: suffix 0 = adds 9..18, final = add 19 (slot 9) then adds 20..23 (slots 0..3)
    rows = read_stream(d, lg.logged)
    assert [r[0] for r in rows] == [0, 0, 100, 101, 102, 103, 104, 105, 106, 107] + [108, 0, 0, 0, 203]
    assert [r[3] for r in rows] == [0] * 10 + [1, 0, 0, 0, 0]
    assert rows[3][1:] == (101 % 6, 1.0, 0) and rows[-1][1:] == (5, 0.0, 0)
    assert lg.logged[0].first_add == 9  # adds 0..8 (ep 1 and the padding) were overwritten unlogged


def test_first_suffix_starts_with_padding_and_rows_are_gapless(tmp_path):
    cap = 16
    lg = W.ReplayLogger(tmp_path, "G", "r", capacity=cap)
    lengths = [1, 12, 2, 4, 9, 4, 1, 30]  # chosen so no log is skipped
    with lg:
        play(lg, lengths)
    d = W.replay_dir(tmp_path, "G", "r")
    regular = [c for c in lg.logged if not c.final]
    assert len(regular) >= 2 and lg.skipped_logs == 0
    assert regular[0].first_add == 0 and regular[0].add_count == cap - 1
    for a, b in zip(regular, regular[1:]):  # consecutive full logs cover consecutive adds
        assert b.first_add == a.stop_add and b.add_count == a.add_count + cap
    s0 = load(d, "$store$_observation", 0)[:, 0, 0]
    assert s0[:4].tolist() == [0, 0, 0, 1]  # very first episode starts with 3 padding rows
    assert s0[4:7].tolist() == [0, 0, 0]  # episode of length 1 ended; the next one is padded
    assert s0[cap - 1] == 0  # never written in suffix 0
    # Reconstruct the real rows from the ground-truth add order and compare with the stitched read.
    truth, v = [], 1
    for L in lengths:
        truth += [0, 0, 0]
        truth += list(range(v, v + L))
        v += L
    rows = read_stream(d, regular)
    assert [r[0] for r in rows] == [x % 256 for x in truth[: regular[-1].stop_add]]
    final = lg.logged[-1]
    assert final.final and final.first_add == regular[-1].stop_add and final.stop_add == len(truth)
    rows = read_stream(d, lg.logged)  # with the final log: every add, in order
    assert [r[0] for r in rows] == [x % 256 for x in truth]


def test_byte_exact_and_reproducible_gzip_header(tmp_path):
    for sub in ("a", "b"):
        with W.ReplayLogger(tmp_path / sub, "Pong", 1, capacity=8) as lg:
            play(lg, [3, 4, 5])
    da, db = W.replay_dir(tmp_path / "a", "Pong", 1), W.replay_dir(tmp_path / "b", "Pong", 1)
    names = sorted(p.name for p in da.iterdir())
    assert names == sorted(p.name for p in db.iterdir()) and len(names) % 6 == 0
    for n in names:
        raw = (da / n).read_bytes()
        assert raw == (db / n).read_bytes()
        assert raw[:2] == b"\x1f\x8b" and raw[4:8] == b"\0\0\0\0"  # gzip magic, mtime 0
        assert raw[3] & 0x08 == 0  # no FNAME field
    assert not [p for p in da.iterdir() if ".tmp" in p.name]


def test_add_count_written_last_and_kill_leaves_no_partial_file(tmp_path, monkeypatch):
    order = []
    real = W.write_npy_gz

    def spy(path, arr, compresslevel=9):
        order.append(path.name.split("_ckpt")[0])
        if path.name.startswith("add_count"):
            raise KeyboardInterrupt  # killed just before the last file of the suffix
        real(path, arr, compresslevel)

    monkeypatch.setattr(W, "write_npy_gz", spy)
    lg = W.ReplayLogger(tmp_path, "Pong", 1, capacity=8)
    with pytest.raises(KeyboardInterrupt):
        play(lg, [10])
    assert order == list(W.FILE_NAMES) and order[-1] == "add_count"
    d = W.replay_dir(tmp_path, "Pong", 1)
    names = sorted(p.name for p in d.iterdir())
    assert len(names) == 5 and not any("add_count" in n for n in names)  # suffix 0 incomplete
    assert not any(n.startswith(".") for n in names)


def test_kill_inside_a_file_leaves_no_file_under_its_final_name(tmp_path, monkeypatch):
    def boom(*a, **k):
        raise KeyboardInterrupt

    lg = W.ReplayLogger(tmp_path, "Pong", 1, capacity=8)
    monkeypatch.setattr(W.np, "save", boom)
    with pytest.raises(KeyboardInterrupt):
        play(lg, [10])
    assert list(W.replay_dir(tmp_path, "Pong", 1).iterdir()) == []


def test_existing_run_is_refused_unless_overwrite(tmp_path):
    with W.ReplayLogger(tmp_path, "Pong", 2, capacity=8) as lg:
        play(lg, [3])
    with pytest.raises(ReplayFormatError, match=r"Pong/2/replay_logs.*already holds 6 checkpoint files"):
        W.ReplayLogger(tmp_path, "Pong", 2, capacity=8)
    with W.ReplayLogger(tmp_path, "Pong", 2, capacity=8, overwrite=True) as lg:
        play(lg, [1])
    assert int(load(W.replay_dir(tmp_path, "Pong", 2), "add_count", 0)) == 4


def test_bad_obs_rejected(tmp_path):
    lg = W.ReplayLogger(tmp_path, "Pong", 1, capacity=8)
    with pytest.raises(ValueError, match="uint8"):
        lg.add(np.zeros((84, 84), np.float32), 0, 0.0, False)
    with pytest.raises(ValueError, match="capacity"):
        W.ReplayLogger(tmp_path, "X", 1, capacity=3)


def test_close_right_after_a_full_log_and_readable_ranges(tmp_path):
    cap = 8
    with W.ReplayLogger(tmp_path, "Pong", 1, capacity=cap) as lg:
        play(lg, [4])  # 3 pad + 4 = 7 = cap-1 -> suffix 0; close() then logs suffix 1 with add_count 7
    assert [(c.suffix, c.add_count, c.first_add, c.stop_add, c.final) for c in lg.logged] == [
        (0, 7, 0, 7, False), (1, 7, 7, 7, True)]  # the final log holds nothing new
    d = W.replay_dir(tmp_path, "Pong", 1)
    assert int(load(d, "add_count", 1)) == 7
    assert W.readable_adds(0, 5, cap, 5) == (0, 5)  # only log: arr[:n]
    assert W.readable_adds(3, 2, cap, 40) == (37, 40)  # final after earlier logs: slot cap-1 + arr[:2]
    assert W.readable_adds(3, 31, cap, 31) == (23, 31)  # full log: the last cap adds
    with pytest.raises(RuntimeError, match="after close"):
        lg.add(frame(1), 0, 0.0, False)
