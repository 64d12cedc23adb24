"""`jowa train` under real `torchrun` (c10d rendezvous on 127.0.0.1, gloo on CPU, dropout on), with the README's
launch line: two single-process "nodes" keep identical weights, a SIGKILLed job relaunched as is continues the
uninterrupted loss curve exactly, and the token cache is decoded once per node, outside the (read-only) dataset.
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

import pytest
import torch

from jowa_common.io import safe_torch_load
from pipelines.viz import read_metrics
from tests.procs import kill_tree

pytestmark = pytest.mark.multiproc

BIN = Path(sys.executable).parent
SETS = ["--set", "stage1_steps=6", "--set", "stage2_steps=6", "--set", "log_every=1", "--set", "ckpt_every=3",
        "--set", "data.batch_size=8", "--set", "model.dropout=0.1", "--set", "model.q_dropout=0.05"]
LOSSES = ("train/loss", "train/loss_obs", "train/loss_reward", "train/loss_end", "train/loss_td", "train/loss_cql",
          "train/grad_norm", "train/token_acc")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def launch(args: list[str], nnodes: int, nproc: int, logs: Path):
    """One `torchrun` per node, as the README's launch line (HEAD = 127.0.0.1); each node's output to a log."""
    endpoint = f"127.0.0.1:{_free_port()}"
    procs = []
    try:
        for node in range(nnodes):
            with open(logs.with_name(f"{logs.name}.node{node}.log"), "wb") as log:
                procs.append(subprocess.Popen(
                    [str(BIN / "torchrun"), "--nnodes", str(nnodes), "--nproc_per_node", str(nproc),
                     "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "-m", "pipelines.cli", *args],
                    env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=log, stderr=subprocess.STDOUT))
        yield procs
    finally:
        for p in procs:
            kill_tree(p)


def _run(args: list[str], nnodes: int, nproc: int, logs: Path) -> str:
    """Launch and wait; returns every node's output."""
    with launch(args, nnodes, nproc, logs) as procs:
        codes = [p.wait(timeout=300) for p in procs]
    out = "".join(p.read_text(errors="replace") for p in sorted(logs.parent.glob(f"{logs.name}.node*.log")))
    assert codes == [0] * nnodes, out[-4000:]
    return out


def _tree(d: Path) -> dict[str, tuple[int, int, int]]:
    return {str(p.relative_to(d)): (p.stat().st_size, p.stat().st_mtime_ns, p.stat().st_mode)
            for p in sorted(d.rglob("*"))}


@pytest.fixture
def readonly_dataset(built_dataset, tmp_path):
    """A copy of the built dataset without its cache, read-only (as root, writes would still succeed: the test
    also checks that nothing in it changed)."""
    d = tmp_path / "readonly_ds"
    shutil.copytree(built_dataset.path, d, ignore=shutil.ignore_patterns("_cache", ".jowa.lock"))
    for p in [d, *d.rglob("*")]:
        p.chmod(p.stat().st_mode & ~0o222)
    before = _tree(d)
    yield d
    assert _tree(d) == before  # training wrote nothing into the dataset folder
    for p in [d, *d.rglob("*")]:
        p.chmod(p.stat().st_mode | 0o200)


def test_two_nodes_stay_identical_and_a_killed_job_resumes_exactly(readonly_dataset, tmp_path):
    cache = tmp_path / "node_cache"
    base = ["train", "tiny", "--data", str(readonly_dataset), *SETS, "--set", f"data.cache_dir={cache}"]

    full = tmp_path / "full"
    out = _run([*base, "--out", str(full)], 2, 1, tmp_path / "full")
    assert out.count("token cache of") == 1  # both "nodes" share this machine's cache folder: decoded once
    assert json.loads((full / "config.json").read_text())["model"]["dropout"] == 0.1
    curve = read_metrics(full / "metrics.jsonl")
    assert [r["step"] for r in curve] == list(range(1, 13))
    for step in (9, 12):  # ranks identical at every checkpoint; each rank's own dropout RNG state saved
        ck = safe_torch_load(full / "ckpt" / f"step_{step:08d}.pt")
        digests, rngs = ck["train"]["replica_sha256"], ck["train"]["rng"]
        assert len(digests) == 2 and digests[0] == digests[1], step
        assert len(rngs) == 2 and not torch.equal(rngs[0]["cpu"], rngs[1]["cpu"])

    # the same job SIGKILLed (agents and workers) once its step-3 checkpoint exists, then relaunched as is
    run = tmp_path / "killed"
    with launch([*base, "--out", str(run)], 2, 1, tmp_path / "killed") as procs:
        deadline = time.time() + 300
        while not (run / "ckpt" / "step_00000003.pt").exists():
            assert time.time() < deadline and all(p.poll() is None for p in procs), "no step-3 checkpoint"
            time.sleep(0.01)
    assert [p.returncode for p in procs] == [-signal.SIGKILL] * 2
    assert not (run / "ckpt" / "step_00000012.pt").exists()
    _run([*base, "--out", str(run)], 2, 1, tmp_path / "resumed")
    resumed = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in resumed] == list(range(1, 13))
    for a, b in zip(curve, resumed):
        for k in LOSSES:
            assert a[k] == b[k], (a["step"], k, a[k], b[k])
    fa, fb = safe_torch_load(full / "ckpt" / "step_00000012.pt"), safe_torch_load(run / "ckpt" / "step_00000012.pt")
    for k, v in fa["model"].items():
        assert torch.equal(v, fb["model"][k]), k
    assert fb["train"]["replica_sha256"] == fa["train"]["replica_sha256"]


def test_token_cache_is_decoded_once_per_node(readonly_dataset, tmp_path):
    """Two ranks on one node: local rank 0 decodes into data.cache_dir, local rank 1 waits and maps its files."""
    cache = tmp_path / "node_cache"
    out = _run(["train", "tiny", "--data", str(readonly_dataset), *SETS, "--set", f"data.cache_dir={cache}",
                "--stop-after", "1", "--out", str(tmp_path / "run")], 1, 2, tmp_path / "run")
    lines = [ln for ln in out.splitlines() if "token cache of" in ln]
    assert len(lines) == 1 and lines[0].endswith("(local rank 0)"), out[-3000:]
    [meta] = list(cache.glob("*/zarr-v2/meta.json"))
    assert meta.parent.parent.name.startswith("readonly_ds-")

