"""Bad DQN-Replay input → a ReplayFormatError that names the file and the problem; the CLI exits 1."""

from __future__ import annotations

import gzip
import io
import re
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from jowa_data import replay
from jowa_data.cli import main
from jowa_common.errors import ReplayFormatError
from jowa_data.npy_stream import available_decoders
from jowa_data.replay_writer import ReplayLogger, replay_dir, write_npy_gz


@pytest.fixture
def run(tmp_path):
    """Pong/1 with capacity 20: 4 suffixes (0..3), episodes across files, black frames included."""
    rng = np.random.default_rng(1)
    with ReplayLogger(tmp_path, "Pong", 1, capacity=20, compresslevel=1) as lg:
        for n in (10, 8, 12, 5, 12):  # logs at adds 19, 39, 59; final log with cursor 2
            for t in range(n):
                lg.add(rng.integers(0, 256, (84, 84), dtype=np.uint8), int(rng.integers(6)), 0.0, t == n - 1)
    assert replay.list_checkpoints(tmp_path, "Pong", 1) == [0, 1, 2, 3]
    return tmp_path, replay_dir(tmp_path, "Pong", 1)


def _read_all(root):
    for _ in replay.iter_episodes(root, "Pong", 1):
        pass


def _raises(fn, *patterns):
    with pytest.raises(ReplayFormatError) as ei:
        fn()
    msg = str(ei.value)
    for p in patterns:
        assert re.search(p, msg), f"{p!r} not in {msg!r}"
    return msg


def _cli_fails(root, *patterns, args=("Pong", "--run", "1", "--frames")):
    res = CliRunner().invoke(main, ["replay-scan", str(root), *args])
    assert res.exit_code == 1, res.output
    line = re.split(r"[\r\n]", res.stderr.strip())[-1]  # after any progress bar
    assert line.startswith("Error: ") and "Traceback" not in res.output
    for p in patterns:
        assert re.search(p, line), f"{p!r} not in {line!r}"


# --- gzip / npy level ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("decoder", available_decoders())
def test_truncated_observation_gz(run, decoder):
    root, d = run
    p = d / "$store$_observation_ckpt.2.gz"
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    with pytest.raises(ReplayFormatError, match=r"observation_ckpt\.2\.gz: corrupt or truncated|truncated"):
        for _ in replay.iter_episodes(root, "Pong", 1, decoder=decoder):
            pass
    _cli_fails(root, r"\$store\$_observation_ckpt\.2\.gz", "truncated")


@pytest.mark.parametrize("decoder", available_decoders())
def test_corrupt_observation_gz(run, decoder):
    root, d = run
    p = d / "$store$_observation_ckpt.1.gz"
    b = bytearray(p.read_bytes())
    mid = len(b) // 2
    b[mid:mid + 64] = bytes(64)  # zeroed deflate data: bad codes or a CRC mismatch at the end
    p.write_bytes(bytes(b))
    with pytest.raises(ReplayFormatError, match=r"observation_ckpt\.1\.gz: (corrupt or truncated|truncated)"):
        for _ in replay.iter_episodes(root, "Pong", 1, decoder=decoder):
            pass


def test_truncated_small_file_fails_the_cheap_scan(run):
    root, d = run
    p = d / "$store$_action_ckpt.1.gz"
    p.write_bytes(p.read_bytes()[:30])
    _raises(lambda: replay.scan_run(root, "Pong", 1), r"\$store\$_action_ckpt\.1\.gz: ", "truncated")
    _cli_fails(root, r"action_ckpt\.1\.gz", "truncated", args=("Pong", "--run", "1", "--json"))


def test_not_gzip_and_not_npy(run):
    root, d = run
    (d / "$store$_reward_ckpt.0.gz").write_bytes(b"plain text, not gzip at all")
    _raises(lambda: replay.scan_run(root, "Pong", 1), r"reward_ckpt\.0\.gz: corrupt or truncated gzip")
    with gzip.open(d / "$store$_reward_ckpt.0.gz", "wb") as f:
        f.write(b"PK\x03\x04 a zip, not a .npy")
    _raises(lambda: replay.scan_run(root, "Pong", 1), r"reward_ckpt\.0\.gz: not a \.npy file")


def test_pickled_object_array_is_refused(run):
    root, d = run
    buf = io.BytesIO()
    np.save(buf, np.array([{"evil": 1}] * 20, dtype=object), allow_pickle=True)
    with gzip.open(d / "$store$_action_ckpt.0.gz", "wb") as f:
        f.write(buf.getvalue())
    _raises(lambda: replay.scan_run(root, "Pong", 1), r"action_ckpt\.0\.gz: .*refusing to unpickle")


def test_trailing_data(run):
    root, d = run
    buf = io.BytesIO()
    np.save(buf, np.zeros(20, np.uint8))
    with gzip.open(d / "$store$_terminal_ckpt.0.gz", "wb") as f:
        f.write(buf.getvalue() + b"\x00" * 5)
    _raises(lambda: replay.scan_run(root, "Pong", 1), r"terminal_ckpt\.0\.gz: extra data after the array")


# --- dtype / shape / values --------------------------------------------------------------------------------------

def test_wrong_dtype(run):
    root, d = run
    write_npy_gz(d / "$store$_action_ckpt.1.gz", np.zeros(20, np.int64), compresslevel=1)
    _raises(lambda: replay.scan_run(root, "Pong", 1), r"action_ckpt\.1\.gz: dtype int64 \(expected int32\)")
    _cli_fails(root, r"action_ckpt\.1\.gz", "dtype int64")
    write_npy_gz(d / "$store$_action_ckpt.1.gz", np.zeros(20, np.int32), compresslevel=1)
    write_npy_gz(d / "add_count_ckpt.1.gz", np.array(39, np.int32), compresslevel=1)
    _raises(lambda: replay.scan_run(root, "Pong", 1), r"add_count_ckpt\.1\.gz: dtype int32 \(expected int64\)")


def test_wrong_shapes(run):
    root, d = run
    write_npy_gz(d / "$store$_reward_ckpt.2.gz", np.zeros((20, 2), np.float32), compresslevel=1)
    _raises(lambda: replay.scan_run(root, "Pong", 1), r"reward_ckpt\.2\.gz: shape \(20, 2\) \(expected \(N,\)\)")
    write_npy_gz(d / "$store$_reward_ckpt.2.gz", np.zeros(19, np.float32), compresslevel=1)
    _raises(lambda: replay.scan_run(root, "Pong", 1), r"reward_ckpt\.2\.gz: 19 rows, but .*action_ckpt\.2\.gz has 20")
    write_npy_gz(d / "$store$_reward_ckpt.2.gz", np.zeros(20, np.float32), compresslevel=1)
    write_npy_gz(d / "$store$_observation_ckpt.2.gz", np.zeros((20, 64, 64), np.uint8), compresslevel=1)
    replay.scan_run(root, "Pong", 1)  # the scan never opens observations
    _raises(lambda: _read_all(root), r"observation_ckpt\.2\.gz: shape \(20, 64, 64\) \(expected \(N, 84, 84\)\)")
    write_npy_gz(d / "$store$_observation_ckpt.2.gz", np.zeros((21, 84, 84), np.uint8), compresslevel=1)
    _raises(lambda: _read_all(root), r"observation_ckpt\.2\.gz: 21 rows, but the terminal file has 20")
    write_npy_gz(d / "invalid_range_ckpt.3.gz", np.zeros(4, np.int64), compresslevel=1)
    _raises(lambda: replay.scan_run(root, "Pong", 1), r"invalid_range_ckpt\.3\.gz: shape \(4,\) \(expected \(5,\)\)")


def test_bad_values(run):
    root, d = run
    t = np.zeros(20, np.uint8)
    t[4] = 2
    write_npy_gz(d / "$store$_terminal_ckpt.1.gz", t, compresslevel=1)
    _raises(lambda: replay.scan_run(root, "Pong", 1), r"terminal_ckpt\.1\.gz: values other than 0/1")
    shutil.copy(d / "$store$_terminal_ckpt.0.gz", d / "$store$_terminal_ckpt.1.gz")
    r = np.zeros(20, np.float32)
    r[3] = np.nan
    write_npy_gz(d / "$store$_reward_ckpt.1.gz", r, compresslevel=1)
    _raises(lambda: replay.scan_run(root, "Pong", 1, checkpoints=[1]), r"reward_ckpt\.1\.gz: non-finite rewards")
    write_npy_gz(d / "add_count_ckpt.0.gz", np.array(-1, np.int64), compresslevel=1)
    _raises(lambda: replay.scan_run(root, "Pong", 1, checkpoints=[0]), r"add_count_ckpt\.0\.gz: negative add_count")


def test_misaligned_terminals_break_the_padding_rule(run):
    """Terminals shifted by one row: the rows after a terminal are no longer Dopamine's zero padding."""
    root, d = run
    from jowa_data.npy_stream import read_small

    with replay.open_gz(d / "$store$_terminal_ckpt.0.gz") as f:
        _, t = read_small(f, "t")
    write_npy_gz(d / "$store$_terminal_ckpt.0.gz", np.roll(t, -1), compresslevel=1)
    _raises(lambda: replay.scan_run(root, "Pong", 1), r"replay_logs: checkpoint 0, valid row \d+: expected one of "
            r"Dopamine's zero padding rows")


def test_invalid_range_disagrees_with_add_count(run):
    root, d = run
    shutil.copy(d / "invalid_range_ckpt.3.gz", d / "invalid_range_ckpt.2.gz")
    _raises(lambda: replay.scan_run(root, "Pong", 1),
            r"invalid_range_ckpt\.2\.gz: invalid_range \[1, 2, 3, 4, 5\] disagrees with add_count 59")


# --- files and checkpoints ---------------------------------------------------------------------------------------

def test_missing_companion_file(run):
    root, d = run
    (d / "$store$_reward_ckpt.1.gz").unlink()
    _raises(lambda: replay.scan_run(root, "Pong", 1),
            r"replay_logs: checkpoint 1 is missing companion file\(s\): \$store\$_reward_ckpt\.1\.gz")
    _cli_fails(root, r"missing companion file\(s\): \$store\$_reward_ckpt\.1\.gz")
    replay.scan_run(root, "Pong", 1, checkpoints=[2, 3])  # other suffixes stay readable
    (d / "$store$_observation_ckpt.3.gz").unlink()
    _raises(lambda: replay.scan_run(root, "Pong", 1, checkpoints=[2, 3]), r"observation_ckpt\.3\.gz")


def test_non_contiguous_suffixes_name_the_gap(run):
    root, d = run
    _raises(lambda: replay.scan_run(root, "Pong", 1, checkpoints=[0, 1, 3]),
            r"checkpoints 1 and 3 are not contiguous \(suffix 2 missing\); pass allow_gaps=True")
    _cli_fails(root, r"checkpoints 1 and 3 are not contiguous", args=("Pong", "--checkpoints", "0,1,3"))
    res = CliRunner().invoke(main, ["replay-scan", str(root), "Pong", "--checkpoints", "0,1,3", "--allow-gaps",
                                    "--json"])
    assert res.exit_code == 0 and '"gaps"' in res.stdout
    _raises(lambda: replay.scan_run(root, "Pong", 1, checkpoints=[1, 7]), r"checkpoint\(s\) \[7\] not found")


def test_duplicated_or_misordered_checkpoints(run):
    root, d = run
    for kind in ("$store$_observation", "$store$_action", "$store$_reward", "$store$_terminal", "add_count",
                 "invalid_range"):
        shutil.copy(d / f"{kind}_ckpt.1.gz", d / f"{kind}_ckpt.2.gz")
    _raises(lambda: replay.scan_run(root, "Pong", 1),
            r"add_count_ckpt\.2\.gz: add_count 39 overlaps checkpoint 1 \(add_count 39\)")


def test_final_log_followed_by_more(run):
    root, d = run
    for kind in ("$store$_observation", "$store$_action", "$store$_reward", "$store$_terminal", "add_count",
                 "invalid_range"):
        shutil.copy(d / f"{kind}_ckpt.2.gz", d / f"{kind}_ckpt.4.gz")
    _raises(lambda: replay.scan_run(root, "Pong", 1), r"add_count_ckpt\.3\.gz: add_count \d+ marks the run's "
            r"final log, but checkpoint 4 follows it")


def test_unknown_game_run_and_empty_folder(run, tmp_path):
    root, d = run
    _raises(lambda: replay.scan_run(root, "Pnog", 1), r"Pnog: unknown game 'Pnog' .*\(games found: Pong\)")
    _cli_fails(root, "unknown game 'Pnog'", args=("Pnog",))
    _raises(lambda: replay.list_checkpoints(root, "Pong", 3), r"Pong/3: no run 3 for game Pong \(runs found: 1\)")
    _raises(lambda: replay.scan_run(tmp_path / "nope", "Pong", 1), r"nope: replay root folder not found")
    for p in d.iterdir():
        p.unlink()
    _raises(lambda: replay.scan_run(root, "Pong", 1), r"replay_logs: no DQN-Replay checkpoint files")


def test_read_frames_rows_out_of_range(run):
    root, d = run
    _raises(lambda: replay.read_frames(root, "Pong", 1, 1, [0, 20]),
            r"observation_ckpt\.1\.gz: rows must be in \[0, 20\)")


def test_unknown_decoder_is_a_usage_error(run):
    root, _ = run
    with pytest.raises(ValueError, match="unknown gzip decoder 'zstd'"):
        replay.scan_run(root, "Pong", 1, decoder="zstd")
    res = CliRunner().invoke(main, ["replay-scan", str(root), "Pong", "--decoder", "zstd"])
    assert res.exit_code == 2
