"""`jowa-data build` on a real dask cluster: `dask scheduler` and two `dask worker` processes on 127.0.0.1 (tcp),
started with the README's commands. The result must be byte-identical to the synchronous build, also when one
worker (nanny and worker process) is SIGKILLed while it executes a build task; and `--device cuda` tasks must ask
the scheduler for a worker with the `GPU` resource.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import psutil
import pytest

from tests.fixtures_data import tree_bytes
from tests.procs import kill_tree

pytestmark = pytest.mark.multiproc

BIN = Path(sys.executable).parent
# 14 tasks (one episode each) of Pong and Phoenix, zarr and webdataset
BUILD = ["--checkpoints", "0-50", "--transitions", "1000", "--seed", "0", "--task-transitions", "60",
         "--allow-fewer-runs", "--format", "both"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


@contextlib.contextmanager
def cluster(tmp: Path, workers: int = 2) -> Iterator[tuple[str, list[subprocess.Popen]]]:
    """A scheduler and `workers` workers, as the README starts them (HEAD = 127.0.0.1); always torn down."""
    from distributed import Client

    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    logs = tmp / "dask-logs"
    logs.mkdir(exist_ok=True)
    procs: list[subprocess.Popen] = []

    def start(name: str, args: list[str]) -> subprocess.Popen:
        with open(logs / f"{name}.log", "wb") as log:
            p = subprocess.Popen([str(BIN / "dask"), *args], env=_env(), cwd=tmp, stdout=log,
                                 stderr=subprocess.STDOUT)
        procs.append(p)
        return p

    try:
        start("scheduler", ["scheduler", "--host", "127.0.0.1", "--port", str(port)])
        ws = [start(f"worker{i}", ["worker", address, "--nworkers", "1", "--nthreads", "1"]) for i in range(workers)]
        with Client(address, timeout=60) as c:
            c.wait_for_workers(workers, timeout=90)
        yield address, ws
    finally:
        for p in reversed(procs):
            kill_tree(p)


def _build(replay: Path, tok: Path, out: Path, *extra: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([str(BIN / "jowa-data"), "build", "Pong", "Phoenix", "--replay", str(replay),
                             "--tokenizer", str(tok), "--out", str(out), *BUILD, *extra], env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


@pytest.fixture(scope="module")
def reference(recorded_replay, tokenizer_ckpt, tmp_path_factory) -> dict[str, bytes]:
    """The synchronous build's bytes (every file but the folder lock)."""
    out = tmp_path_factory.mktemp("sync") / "ds"
    p = _build(recorded_replay.root, tokenizer_ckpt, out, "--json")
    so, se = p.communicate(timeout=300)
    assert p.returncode == 0, se[-3000:]
    assert json.loads(so)["tasks"] == 14
    return tree_bytes(out)


def _same(out: Path, ref: dict[str, bytes]) -> None:
    got = tree_bytes(out)
    assert sorted(got) == sorted(ref)
    assert [k for k in ref if got[k] != ref[k]] == []


def test_cluster_build_is_byte_identical(recorded_replay, tokenizer_ckpt, reference, tmp_path):
    with cluster(tmp_path) as (address, _):
        out = tmp_path / "ds"
        p = _build(recorded_replay.root, tokenizer_ckpt, out, "--scheduler", address, "--json")
        so, se = p.communicate(timeout=300)
        assert p.returncode == 0, se[-3000:]
        assert json.loads(so)["built_tasks"] == 14
        from distributed import Client

        with Client(address) as c:  # both workers took part
            ran = c.run(lambda dask_worker: sum(1 for k in dask_worker.state.log if "jowa-build-" in str(k)))
        assert len(ran) == 2 and all(n > 0 for n in ran.values()), ran
    _same(out, reference)


def test_worker_killed_mid_task_still_gives_identical_bytes(recorded_replay, tokenizer_ckpt, reference, tmp_path):
    from distributed import Client

    out = tmp_path / "ds"
    with cluster(tmp_path) as (address, workers), Client(address) as c:
        p = _build(recorded_replay.root, tokenizer_ckpt, out, "--scheduler", address, "--json")
        try:
            victim, executing, deadline = None, [], time.time() + 120
            while victim is None:  # the first worker seen executing a build task is SIGKILLed, nanny and all
                assert time.time() < deadline and p.poll() is None, "no build task was seen running"
                busy = c.run(lambda dask_worker: (os.getpid(), [str(k) for k in dask_worker.state.executing]))
                for addr, (pid, keys) in busy.items():
                    if any("jowa-build-" in k for k in keys):
                        victim = next(w for w in workers
                                      if pid in [q.pid for q in psutil.Process(w.pid).children(recursive=True)])
                        executing = keys
                        kill_tree(victim)
                        break
                else:
                    time.sleep(0.02)
            assert not (out / "info.json").exists()  # killed mid-build
            so, se = p.communicate(timeout=300)
        finally:
            if p.poll() is None:
                p.kill()
        assert p.returncode == 0, se[-3000:]
        summary = json.loads(so)
        assert summary["built_tasks"] == 14  # one run: the lost task ran again on the other worker
        assert len(c.scheduler_info()["workers"]) == 1
    assert executing
    _same(out, reference)  # no temp file or half task of the killed worker is left


def test_worker_killed_in_a_temp_file_window_leaves_nothing(recorded_replay, tokenizer_ckpt, reference, tmp_path):
    """A third worker runs its tasks in its own process (--no-nanny) and is SIGKILLed by the kernel just before it
    renames its first complete temp tar into place (tests/killpoint.py): its task runs again elsewhere, and the
    temp file it left is gone from the finished dataset."""
    out = tmp_path / "ds"
    with cluster(tmp_path, workers=1) as (address, _):
        victim = subprocess.Popen([sys.executable, "-m", "tests.killpoint", r"\.tar\.[^/]+\.tmp$", "1",
                                   "distributed.cli.dask_worker", address, "--nworkers", "1", "--nthreads", "1",
                                   "--no-nanny"], env=_env(), cwd=Path(__file__).resolve().parents[2],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            from distributed import Client

            with Client(address) as c:
                c.wait_for_workers(2, timeout=90)
            p = _build(recorded_replay.root, tokenizer_ckpt, out, "--scheduler", address, "--json")
            so, se = p.communicate(timeout=300)
            assert victim.wait(timeout=60) == -signal.SIGKILL  # it died in the window, with its temp tar on disk
        finally:
            kill_tree(victim)
    assert p.returncode == 0, se[-3000:]
    assert json.loads(so)["built_tasks"] == 14
    _same(out, reference)


def test_cuda_tasks_ask_for_a_gpu_worker(recorded_replay, tokenizer_ckpt, tmp_path):
    """On CPU workers (no `--resources GPU=1`), `--device cuda` tasks wait for a GPU worker: none runs."""
    from distributed import Client

    with cluster(tmp_path, workers=1) as (address, _), Client(address) as c:
        p = _build(recorded_replay.root, tokenizer_ckpt, tmp_path / "ds", "--scheduler", address, "--device", "cuda",
                   "--json")
        try:
            deadline, restrictions = time.time() + 120, {}
            while len(restrictions) < 14:
                assert time.time() < deadline and p.poll() is None, "the build tasks never reached the scheduler"
                restrictions = c.run_on_scheduler(lambda dask_scheduler: {
                    str(k): (ts.resource_restrictions, ts.state) for k, ts in dask_scheduler.tasks.items()
                    if "jowa-build-" in str(k)})
                time.sleep(0.1)
            assert all(r == {"GPU": 1} for r, _ in restrictions.values()), restrictions
            assert all(s == "no-worker" for _, s in restrictions.values()), restrictions
        finally:
            p.send_signal(signal.SIGTERM)
            _, se = p.communicate(timeout=60)
    assert "no worker of tcp://127.0.0.1:" in se and "--resources GPU=1" in se
    shutil.rmtree(tmp_path / "ds", ignore_errors=True)
