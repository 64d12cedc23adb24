"""Replay roots as URLs, with real clients against real servers on 127.0.0.1.

Servers (each its own process, started once per module and always stopped): `python -m http.server` (folder
listings as HTML links), moto's S3 server (read through s3fs), gcp-storage-emulator (read through gcsfs); plus
fsspec's in-process `memory://`. Each serves a copy of the recorded replay fixture, so every URL read must give
exactly what the local folder gives: equal stats, equal subsample indexes, and built data files (zarr, tars,
episodes.parquet, files.json, stats.json, task records) byte-identical to the local build; plan.json and info.json
differ only in the recorded replay root. `jowa-data download` is checked against the S3, GCS and HTTP servers.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from jowa_data.cli import main
from jowa_data.layout import EPISODES, INFO, PLAN
from tests.fixtures_data import build_args, make_recorded_replay, tree_bytes

# gcsfs asks a gRPC API (absent from the emulator) for the bucket type unless told not to; read at import.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

REPO = Path(__file__).resolve().parents[2]
CREDS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
ROOT_KINDS = ("memory", "http", "s3", "gs")


# --- servers -----------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _server(cmd: list[str], port: int | None, what: str, log: Path, env: dict | None = None):
    """Start a server process (its log in a file: a pipe nobody reads would fill up and stall it), wait until it
    accepts connections, always stop it."""
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    try:
        deadline = time.monotonic() + 30
        while True:
            if port is None:  # http.server prints the port it bound
                text = log.read_text()
                port = int(text.split(" port ")[1].split()[0]) if " port " in text else None
            try:
                if port is not None:
                    socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                    break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{what} did not start: {log.read_text()[-2000:]}")
            time.sleep(0.05)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def local_root(recorded_replay) -> Path:
    return recorded_replay.root


@pytest.fixture(scope="module")
def http_root(local_root, tmp_path_factory):
    cmd = [sys.executable, "-u", "-m", "http.server", "0", "--bind", "127.0.0.1", "--directory", str(local_root)]
    with _server(cmd, None, "http.server", tmp_path_factory.mktemp("http") / "log") as port:
        yield f"http://127.0.0.1:{port}"


@contextlib.contextmanager
def _environ(env: dict[str, str]):
    """These environment variables set for the block (a module fixture cannot use `monkeypatch`)."""
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        yield


@pytest.fixture(scope="module")
def s3_env(tmp_path_factory):
    port = _free_port()
    cmd = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    with _server(cmd, port, "moto", tmp_path_factory.mktemp("moto") / "log") as port:
        env = {**CREDS, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
        with _environ(env):
            yield env


@pytest.fixture(scope="module")
def s3_root(s3_env, local_root):
    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=s3_env["AWS_ENDPOINT_URL"])
    fs.mkdir("replay")
    fs.put(str(local_root) + "/", "replay/dqn", recursive=True)
    return "s3://replay/dqn"


@pytest.fixture(scope="module")
def gs_env(tmp_path_factory):
    port = _free_port()
    cmd = [sys.executable, "-m", "gcp_storage_emulator", "start", "--host", "127.0.0.1", "--port", str(port), "--in-memory", "--default-bucket", "replay", "-q"]
    with _server(cmd, port, "gcp-storage-emulator", tmp_path_factory.mktemp("gcs") / "log") as port:
        env = {"STORAGE_EMULATOR_HOST": f"http://127.0.0.1:{port}", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}
        with _environ(env):
            yield env


@pytest.fixture(scope="module")
def gs_root(gs_env, local_root):
    import gcsfs

    fs = gcsfs.GCSFileSystem(token="anon")
    fs.put(str(local_root) + "/", "replay/dqn", recursive=True)
    return "gs://replay/dqn"


@pytest.fixture(scope="module")
def memory_root(local_root):
    import fsspec

    fs = fsspec.filesystem("memory")
    fs.put(str(local_root) + "/", "/jowa-test-replay", recursive=True)
    yield "memory://jowa-test-replay"
    fs.rm("/jowa-test-replay", recursive=True)


@pytest.fixture(params=ROOT_KINDS)
def url_root(request) -> str:
    return request.getfixturevalue(f"{request.param}_root")


# --- stats, subsample ---------------------------------------------------------------------------------

def _stats(root: str) -> dict:
    r = CliRunner().invoke(main, ["stats", root, "--json"])
    assert r.exit_code == 0, r.output
    return json.loads(r.output)


def test_stats_of_url_root_equal_local(url_root, local_root):
    got, want = _stats(url_root), _stats(str(local_root))
    assert got.pop("path") == url_root and want.pop("path") == str(local_root)
    assert got == want
    assert want["overall"]["bytes"]["replay"] > 0 and want["overall"]["episodes"] > 0


def _index(root: str, out: Path) -> tuple:
    import pyarrow.parquet as pq

    from jowa_data.subsample import index_metadata

    r = CliRunner().invoke(main, ["subsample", "Pong", "Phoenix", "--replay", root, "--out", str(out),
                                  "--checkpoints", "0-50", "--fraction", "0.5", "--seed", "3", "--allow-fewer-runs",
                                  "--json"])
    assert r.exit_code == 0, r.output
    t = pq.read_table(out)
    return t, index_metadata(t)


def test_subsample_of_url_root_equals_local(url_root, local_root, tmp_path):
    got, got_meta = _index(url_root, tmp_path / "url.parquet")
    want, want_meta = _index(str(local_root), tmp_path / "local.parquet")
    assert got.equals(want) and got.num_rows > 0
    assert got_meta.pop("replay_root") == url_root and want_meta.pop("replay_root") == str(local_root.resolve())
    assert got_meta == want_meta  # selection, seeds, source bytes: all the same


def test_replay_scan_with_frames_over_url(url_root, local_root):
    def scan(root):
        r = CliRunner().invoke(main, ["replay-scan", root, "Pong", "--frames", "--json"])
        assert r.exit_code == 0, r.output
        d = json.loads(r.output)
        return {k: v for k, v in d.items() if not k.endswith(("seconds", "per_s"))}

    assert scan(url_root) == scan(str(local_root))


# --- build ---------------------------------------------------------------------------------------------

def _assert_same_build(out: Path, built: Path, url: str) -> None:
    """Every data file byte-identical; plan.json and info.json differ only where they name the replay root."""
    got, want = tree_bytes(out), tree_bytes(built)
    assert sorted(got) == sorted(want) and EPISODES in got and any(k.endswith(".tar") for k in got)
    for rel in want:
        if rel not in (PLAN, INFO):
            assert got[rel] == want[rel], rel
    gp, wp = json.loads(got[PLAN]), json.loads(want[PLAN])
    assert gp.pop("replay_root") == url and wp.pop("replay_root") != url
    assert gp == wp
    gi, wi = json.loads(got[INFO]), json.loads(want[INFO])
    assert gi["source"].pop("replay_root") == url
    wi["source"].pop("replay_root")
    gi.pop("plan_checksum"), wi.pop("plan_checksum")
    assert gi == wi


@pytest.mark.parametrize("kind", ["http", "gs"])
def test_build_from_url_root_is_byte_identical(kind, built, tokenizer_ckpt, tmp_path, request):
    url = request.getfixturevalue(f"{kind}_root")
    out = tmp_path / "ds"
    r = CliRunner().invoke(main, build_args(url, tokenizer_ckpt, out, "--format", "both", "--json"))
    assert r.exit_code == 0, r.output
    _assert_same_build(out, built, url)


def test_build_from_s3_in_worker_processes_is_byte_identical(s3_root, s3_env, built, tokenizer_ckpt, tmp_path):
    """The real CLI in its own process, tasks on dask's process pool: each worker opens the bucket itself."""
    out = tmp_path / "ds"
    env = {**os.environ, **s3_env, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "jowa_data.cli", *build_args(s3_root, tokenizer_ckpt, out, "--format",
                        "both", "--scheduler", "processes", "--workers", "2", "--json")],
                       capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert json.loads(p.stdout)["built_tasks"] == 2
    _assert_same_build(out, built, s3_root)


def test_build_with_cache_is_byte_identical_and_fills_the_cache(http_root, built, tokenizer_ckpt, tmp_path):
    out, cache = tmp_path / "ds", tmp_path / "cache"
    r = CliRunner().invoke(main, build_args(http_root, tokenizer_ckpt, out, "--format", "both", "--cache",
                                            str(cache), "--json"))
    assert r.exit_code == 0, r.output
    _assert_same_build(out, built, http_root)  # the cache is not recorded: same plan as streaming
    cached = [p for p in cache.iterdir() if p.is_file() and p.name != "cache"]
    assert len(cached) >= 5  # every replay file the build opened was copied there whole


def test_each_task_opens_only_its_own_checkpoints(tmp_path):
    """A build task reads the small files of the checkpoints its episodes span (and the terminal/add_count of the
    one before), and the observation files of exactly those checkpoints: never the whole run."""
    import fsspec
    from fsspec.implementations.memory import MemoryFileSystem

    from jowa_data.build import BuildConfig, make_plan, read_task_frames
    from jowa_data.manifest import load_manifests
    from jowa_data.subsample import SubsampleOptions, build_index, index_metadata, scan_range

    opened: list[str] = []

    class CountingMemory(MemoryFileSystem):
        protocol = "jowacount"

        @classmethod
        def _strip_protocol(cls, path):
            return super()._strip_protocol(str(path).replace("jowacount://", "memory://", 1))

        def _open(self, path, *args, **kwargs):
            opened.append(path)
            return super()._open(path, *args, **kwargs)

    fsspec.register_implementation("jowacount", CountingMemory, clobber=True)
    local = tmp_path / "replay"
    make_recorded_replay(local, games=("Pong",), steps=900, capacity=150, max_episode_steps=60)
    CountingMemory().put(str(local) + "/", "/jowa-count-replay", recursive=True)
    try:
        url = "jowacount://jowa-count-replay"
        m = load_manifests().get("Pong")
        index = build_index([m], str(local), seed=0, fraction=1.0,
                            options=SubsampleOptions(checkpoints=(0, 50), allow_fewer_runs=True))
        n_ckpts = len(index_metadata(index)["games"]["Pong"]["checkpoints_used"]["1"])
        assert n_ckpts >= 5
        plan = make_plan(index, index_metadata(index), [m], url, "", BuildConfig(task_transitions=60))
        refs = {tuple(r.start): r for r in scan_range(local, "Pong", 1, (0, 10**6))[0]}
        assert len(plan["tasks"]) >= 4
        for t in plan["tasks"]:
            opened.clear()
            got = read_task_frames({**t, "replay_root": url})
            want = read_task_frames({**t, "replay_root": str(local)})
            for a, b in zip(got, want):
                assert a.tobytes() == b.tobytes()
            spans = {c for e in t["episodes"] for c, _, _ in refs[(e[1], e[2])].spans}
            obs = {int(p.split(".")[-2]) for p in opened if "observation" in p}
            small = {int(p.split(".")[-2]) for p in opened if "observation" not in p}
            assert obs == spans, (t["key"], obs, spans)
            assert small <= set(range(min(spans) - 1, max(spans) + 2)), (t["key"], small, spans)
            assert len(small) < n_ckpts  # not the whole run
    finally:
        CountingMemory().rm("/jowa-count-replay", recursive=True)


# --- download ------------------------------------------------------------------------------------------

def _download(source: str, out: Path, *extra: str, ckpts: str = "0-1"):
    return CliRunner().invoke(main, ["download", "Pong", "--runs", "1", "--checkpoints", ckpts, "--out", str(out),
                                     "--source", source, "--json", *extra])


def _logs(root: Path) -> Path:
    return root / "Pong" / "1" / "replay_logs"


@pytest.mark.parametrize("kind", ["s3", "gs", "http"])
def test_download_copies_verifies_and_resumes(kind, local_root, tmp_path, request):
    from jowa_data.download import RECORD
    from jowa_common.io import sha256_file

    source = request.getfixturevalue(f"{kind}_root")
    out = tmp_path / "copy"
    r = _download(source, out)
    assert r.exit_code == 0, r.output
    s = json.loads(r.output)
    names = sorted(p.name for p in _logs(local_root).iterdir() if "_ckpt.0." in p.name or "_ckpt.1." in p.name)
    assert s["files"] == s["copied"] == len(names) == 12 and s["skipped"] == 0
    assert sorted(p.name for p in _logs(out).iterdir()) == names  # no temp file left
    for n in names:
        assert (_logs(out) / n).read_bytes() == (_logs(local_root) / n).read_bytes(), n
    rec = json.loads((out / "Pong" / "1" / RECORD).read_text())["files"]
    assert all(rec[n]["sha256"] == sha256_file(_logs(out) / n) for n in names)
    assert all((rec[n]["md5"] is not None) for n in names)

    # Rerun: nothing copied.
    r = _download(source, out)
    assert json.loads(r.output)["copied"] == 0 and json.loads(r.output)["skipped"] == 12

    # An interrupted copy: a partial temp file left behind and the file itself never renamed into place.
    victim = _logs(out) / "$store$_observation_ckpt.1.gz"
    data = victim.read_bytes()
    victim.unlink()
    stale = _logs(out) / f".{victim.name}.x7k2.tmp"
    stale.write_bytes(data[: len(data) // 2])
    # A complete-looking file whose bytes were damaged afterwards (same size): found by --recheck only.
    damaged = _logs(out) / "$store$_action_ckpt.0.gz"
    good = damaged.read_bytes()
    damaged.write_bytes(bytes([good[0] ^ 0xFF]) + good[1:])
    r = _download(source, out)
    s = json.loads(r.output)
    assert (s["copied"], s["skipped"]) == (1, 11)
    assert victim.read_bytes() == (_logs(local_root) / victim.name).read_bytes() and not stale.exists()
    r = _download(source, out, "--recheck")
    assert json.loads(r.output)["copied"] == 1 and damaged.read_bytes() == good

    # The copy is a replay root like any other.
    assert _stats(str(out))["overall"]["transitions"] > 0


def test_download_adopts_a_file_copied_by_hand_when_the_md5_proves_it(s3_root, local_root, tmp_path):
    out = tmp_path / "copy"
    n = "$store$_observation_ckpt.0.gz"
    _logs(out).mkdir(parents=True)
    shutil.copyfile(_logs(local_root) / n, _logs(out) / n)
    s = json.loads(_download(s3_root, out, ckpts="0").output)
    assert (s["copied"], s["skipped"]) == (5, 1)


def test_download_missing_checkpoint_is_one_line_naming_the_url(s3_root, tmp_path):
    r = _download(s3_root, tmp_path / "copy", ckpts="1-7")
    assert r.exit_code == 1
    want = (f"Error: {s3_root}/Pong/1/replay_logs/$store$_observation_ckpt.3.gz: not found (checkpoint 3 of Pong "
            "run 1; checkpoints present there: 0-2)")
    assert r.output.strip() == want
    assert not (tmp_path / "copy").exists()  # nothing copied before the whole selection is known to exist


# --- errors ---------------------------------------------------------------------------------------------

def _error(args: list[str], env: dict | None = None) -> str:
    """Run the real CLI in its own process; it must fail with exit 1 and one line on stderr."""
    p = subprocess.run([sys.executable, "-m", "jowa_data.cli", *args], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})}, timeout=120)
    assert p.returncode == 1, (p.returncode, p.stdout, p.stderr)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    return lines[0]


def test_unknown_protocol_and_missing_package_errors():
    line = _error(["stats", "nosuch://bucket/dqn"])
    assert line.startswith("Error: nosuch://bucket/dqn: not a usable replay root URL (Protocol not known: nosuch)")
    line = _error(["stats", "abfs://container/dqn"])  # adlfs is not installed
    assert line.startswith("Error: abfs://container/dqn: abfs:// replay roots need an extra package")


def test_unreachable_server_and_missing_game_errors(s3_root, s3_env):
    port = _free_port()  # nothing listens there
    line = _error(["stats", f"http://127.0.0.1:{port}/dqn"])
    assert line.startswith(f"Error: http://127.0.0.1:{port}/dqn: cannot read this folder (ClientConnectorError")
    line = _error(["subsample", "Breakout", "--replay", s3_root, "--out", "/tmp/never-written.parquet"], env=s3_env)
    assert line == f"Error: {s3_root}/Breakout: game folder not found under the replay root {s3_root}"
    assert not Path("/tmp/never-written.parquet").exists()
