"""Kill a real `jowa-data build` subprocess with SIGKILL mid-way, rerun it, compare byte for byte."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.fixtures_data import make_tokenizer, tree_bytes

pytestmark = pytest.mark.multiproc

ARGS = ["--checkpoints", "0-50", "--transitions", "450", "--seed", "1", "--task-transitions", "100",
        "--allow-fewer-runs", "--format", "both", "--json"]


def _cmd(replay: Path, tok: Path, out: Path) -> list[str]:
    return [sys.executable, "-c", "from jowa_data.cli import main; main()", "build", "Pong", "--replay", str(replay),
            "--tokenizer", str(tok), "--out", str(out), *ARGS]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def test_sigkill_then_rerun_is_byte_identical(recorded_replay, tmp_path):
    tok = make_tokenizer(tmp_path / "tok.pt")
    killed = tmp_path / "killed"
    p = subprocess.Popen(_cmd(recorded_replay.root, tok, killed), env=_env(), stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    try:
        while time.time() < deadline:  # kill as soon as one task is done (and others are not)
            if (killed / "_tasks").is_dir() and any((killed / "_tasks").glob("*.json")):
                break
            assert p.poll() is None, "build finished before it could be killed"
            time.sleep(0.05)
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == -signal.SIGKILL
    plan = json.loads((killed / "_plan.json").read_text())
    done_before = {q.stem for q in (killed / "_tasks").glob("*.json")}
    assert 1 <= len(done_before) < len(plan["tasks"])
    assert not (killed / "info.json").exists()  # nothing looks finished

    r = subprocess.run(_cmd(recorded_replay.root, tok, killed), env=_env(), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["built_tasks"] == len(plan["tasks"]) - len(done_before)  # finished tasks were not redone

    clean = tmp_path / "clean"
    r = subprocess.run(_cmd(recorded_replay.root, tok, clean), env=_env(), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    a, b = tree_bytes(killed), tree_bytes(clean)
    assert a.keys() == b.keys()
    assert [k for k in a if a[k] != b[k]] == []


def test_leftovers_of_a_killed_task_are_replaced(recorded_replay, tmp_path):
    """Simulate kill points the SIGKILL test may miss: stray temp dir, a task's data without its record."""
    from click.testing import CliRunner

    from jowa_data.cli import main

    tok = make_tokenizer(tmp_path / "tok.pt")
    args = ["build", "Pong", "--replay", str(recorded_replay.root), "--tokenizer", str(tok), *ARGS[:-1]]
    ref = tmp_path / "ref"
    assert CliRunner().invoke(main, args + ["--out", str(ref)]).exit_code == 0
    out = tmp_path / "out"
    assert CliRunner().invoke(main, args + ["--out", str(out)]).exit_code == 0
    (out / "info.json").unlink()
    key = sorted((out / "_tasks").glob("*.json"))[-1]
    key.unlink()  # the task's data exists, its record does not: must be redone
    tar = sorted((out / "wds" / "Pong").glob(f"{key.stem}-*.tar"))[0]
    tar.write_bytes(b"half a tar")
    (out / "_tmp" / "x.zarr.123").mkdir(parents=True)
    r = CliRunner().invoke(main, args + ["--out", str(out), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["built_tasks"] == 1
    assert tree_bytes(out) == tree_bytes(ref)
