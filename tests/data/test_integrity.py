"""A built dataset is never trusted blindly: every reader checks its files against files.json, a damaged
dataset is refused with the file named (never decoded into zeros or wrong tokens), `jowa-data build` verifies
a finished dataset and repairs only the damaged tasks, and one folder has one builder at a time."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from jowa_data.cli import main
from jowa_common.errors import DatasetError
from tests.fixtures_data import build_args, tree_bytes
from tests.killpoint import run_killed



@pytest.fixture()
def ds(built, tmp_path) -> Path:
    d = tmp_path / "ds"
    shutil.copytree(built, d, ignore=shutil.ignore_patterns("_cache"))
    return d


def _rebuild(recorded_replay, tokenizer_ckpt, d: Path, *extra: str):
    return CliRunner().invoke(main, build_args(recorded_replay.root, tokenizer_ckpt, d, "--format", "both", *extra))


def _stream(d: Path, backend: str = "zarr"):
    from jowa_data.stream import SegmentStream

    return SegmentStream(d, batch_size=4, seq_len=4, backend=backend, as_torch=False)


def _a_zarr_shard(d: Path) -> Path:
    return sorted((d / "zarr" / "Pong").rglob("c/0/0"))[0]  # a tokens shard of the first task


def _flip_a_byte(p: Path, at: int) -> None:
    b = bytearray(p.read_bytes())
    b[at] ^= 0xFF
    p.write_bytes(bytes(b))


def test_missing_zarr_shard_is_refused_everywhere_then_repaired(ds, built, recorded_replay, tokenizer_ckpt):
    shard = _a_zarr_shard(ds)
    shard.unlink()
    rel = str(shard.relative_to(ds))
    with pytest.raises(DatasetError, match=rel.replace("/", ".")) as e:  # the stream (jowa train, finetune)
        _stream(ds)
    assert "missing data file" in str(e.value) and "jowa-data build" in str(e.value)
    assert not (ds / "_cache" / "zarr-v2" / "meta.json").exists()  # no cache made from a damaged dataset
    r = CliRunner().invoke(main, ["stats", str(ds)])
    assert r.exit_code == 1 and rel in r.output.replace("\n", "") and "Traceback" not in r.output
    r = CliRunner().invoke(main, ["validate", str(ds)])
    assert r.exit_code == 1 and "missing data file" in r.output

    r = _rebuild(recorded_replay, tokenizer_ckpt, ds, "--json")
    assert r.exit_code == 0, r.output
    summary = json.loads(r.output)
    assert summary["status"] == "repaired" and summary["built_tasks"] == 1
    assert summary["repaired"] == [shard.relative_to(ds / "zarr" / "Pong").parts[0]]  # only the damaged task
    assert tree_bytes(ds) == tree_bytes(built)
    assert CliRunner().invoke(main, ["validate", str(ds)]).exit_code == 0
    got = _stream(ds).cache.tokens
    assert np.array_equal(got, _stream(built).cache.tokens)


def test_same_size_byte_flip_in_a_tar_needs_checksums(ds, built, recorded_replay, tokenizer_ckpt):
    tar = sorted((ds / "wds" / "Pong").glob("*.tar"))[0]
    _flip_a_byte(tar, 2048)  # inside the first member's data: same size, other tokens
    with pytest.raises(DatasetError, match=r"sha256 differs from files\.json") as e:
        _stream(ds, backend="wds")
    assert tar.name in str(e.value)
    r = _rebuild(recorded_replay, tokenizer_ckpt, ds, "--json")  # the default check is sizes only
    assert json.loads(r.output)["status"] == "already built"
    r = _rebuild(recorded_replay, tokenizer_ckpt, ds, "--verify", "full", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["repaired"] == [tar.name.rsplit("-", 1)[0]]
    assert tree_bytes(ds) == tree_bytes(built)
    assert np.array_equal(_stream(ds, "wds").cache.tokens, _stream(built, "wds").cache.tokens)


def test_cache_is_tied_to_the_files_it_was_made_from(ds, recorded_replay, tokenizer_ckpt):
    from jowa_data.stream import load_cache

    good = np.array(load_cache(ds).tokens)
    meta = json.loads((ds / "_cache" / "zarr-v2" / "meta.json").read_text())
    assert meta["files_checksum"] == json.loads((ds / "info.json").read_text())["files_checksum"]
    shard = _a_zarr_shard(ds)
    shard.write_bytes(shard.read_bytes()[:-1] + b"\0")  # altered after the cache was made
    with pytest.raises(DatasetError, match="sha256 differs"):
        load_cache(ds)  # the old cache is not served: the files changed, and they are not the build's
    assert _rebuild(recorded_replay, tokenizer_ckpt, ds, "--verify", "full").exit_code == 0
    assert np.array_equal(load_cache(ds).tokens, good)


def test_damaged_files_json_is_refused_and_fully_rebuilt(ds, built, recorded_replay, tokenizer_ckpt):
    f = ds / "files.json"
    f.write_text(f.read_text().replace('"bytes": ', '"bytes": 1', 1))
    with pytest.raises(DatasetError, match=r"files\.json: sha256 differs from info\.json"):
        _stream(ds)
    r = _rebuild(recorded_replay, tokenizer_ckpt, ds, "--json")
    assert r.exit_code == 0 and json.loads(r.output)["status"] == "repaired"
    assert tree_bytes(ds) == tree_bytes(built)


def test_stale_temp_files_of_a_killed_build_are_removed(ds, built, recorded_replay, tokenizer_ckpt):
    """The temp names atomic writes use (a tar, a task record, files.json, episodes.parquet, a zarr scratch dir)."""
    planted = [ds / "wds" / "Pong" / ".Pong-r001-t00000-00000.tar.k3j2.tmp", ds / "_tasks" / ".x.json.ab12.tmp",
               ds / ".files.json.zz.tmp", ds / ".episodes.parquet.q1.tmp.parquet"]
    for p in planted:
        p.write_bytes(b"partial")
    (ds / "_tmp" / "Pong-r001-t00000.zarr.4242").mkdir(parents=True)
    r = _rebuild(recorded_replay, tokenizer_ckpt, ds, "--json")
    assert r.exit_code == 0, r.output
    assert not any(p.exists() for p in planted) and not (ds / "_tmp").exists()
    assert tree_bytes(ds) == tree_bytes(built)
    assert CliRunner().invoke(main, ["validate", str(ds)]).exit_code == 0


def test_one_builder_per_folder_and_a_dead_holder_is_taken_over(ds, recorded_replay, tokenizer_ckpt, tmp_path):
    from jowa_common.io import folder_lock

    with folder_lock(ds, "test"):
        r = _rebuild(recorded_replay, tokenizer_ckpt, ds)
    assert r.exit_code == 1
    line = r.output.strip()
    assert "\n" not in line and str(ds) in line and f"pid {os.getpid()}" in line and "in use" in line

    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from jowa_common.io import folder_lock
        with folder_lock({str(ds)!r}, "build"):
            print("locked", flush=True)
            time.sleep(600)
        """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        r = _rebuild(recorded_replay, tokenizer_ckpt, ds)
        assert r.exit_code == 1 and f"pid {holder.pid}" in r.output
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    finally:
        if holder.poll() is None:
            holder.kill()
    r = _rebuild(recorded_replay, tokenizer_ckpt, ds, "--json")  # the killed holder's lock is gone with it
    assert r.exit_code == 0 and json.loads(r.output)["status"] == "already built"


def test_a_full_disk_is_one_line_and_the_rerun_finishes(built, recorded_replay, tokenizer_ckpt, tmp_path):
    """A write limit on the build process (RLIMIT_FSIZE: writes past it fail with EFBIG, as a full disk fails
    with ENOSPC) stops it with one line naming the file; the rerun without the limit gives the same bytes."""
    import resource

    out = tmp_path / "ds"
    cmd = [sys.executable, "-c", "from jowa_data.cli import main; main()",
           *build_args(recorded_replay.root, tokenizer_ckpt, out, "--format", "both")]

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills the process instead of failing write
        resource.setrlimit(resource.RLIMIT_FSIZE, (8192, 8192))

    r = subprocess.run(cmd, preexec_fn=limit, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 1, r.stderr
    err = [ln for ln in r.stderr.splitlines() if ln.startswith("Error:")]
    assert len(err) == 1 and "Traceback" not in r.stderr, r.stderr
    assert str(out) in err[0] and "(EFBIG)" in err[0]
    assert not (out / "info.json").exists()  # nothing looks finished
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    assert tree_bytes(out) == tree_bytes(built)


# Every kind of temp file a build publishes, in the order it writes them: (what, regex of the temp path, which one).
KILL_POINTS = [
    ("zarr task folder", r"/_tmp/[^/]+\.zarr\.\d+$", 2),
    ("tar", r"/wds/Pong/\.[^/]+\.tar\.[^/]+\.tmp$", 2),
    ("task record", r"/_tasks/\.[^/]+\.json\.[^/]+\.tmp$", 2),
    ("episodes.parquet", r"/\.episodes\.parquet\.[^/]+\.tmp\.parquet$", 1),
    ("files.json", r"/\.files\.json\.[^/]+\.tmp$", 1),
    ("info.json", r"/\.info\.json\.[^/]+\.tmp$", 1),
]


@pytest.mark.multiproc
@pytest.mark.parametrize("what,pattern,nth", KILL_POINTS, ids=[k[0] for k in KILL_POINTS])
def test_kill_in_each_temp_file_window_then_rerun_is_identical(what, pattern, nth, built, recorded_replay,
                                                               tokenizer_ckpt, tmp_path):
    import re

    out = tmp_path / "ds"
    args = build_args(recorded_replay.root, tokenizer_ckpt, out, "--format", "both")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = run_killed(pattern, nth, "jowa_data.cli", args)
    assert r.returncode == -signal.SIGKILL, r.stderr
    left = [p for p in out.rglob("*") if re.search(pattern, str(p))]
    assert left, f"no {what} temp file when the build was killed"
    assert not (out / "info.json").exists() or what != "info.json"
    r = subprocess.run([sys.executable, "-c", "from jowa_data.cli import main; main()", *args], capture_output=True,
                       text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr
    assert not any(p.exists() for p in left)
    assert tree_bytes(out) == tree_bytes(built)
    assert CliRunner().invoke(main, ["validate", str(out)]).exit_code == 0
