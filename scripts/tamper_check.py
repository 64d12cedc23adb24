"""Damage a small real dataset and a replay root in every way docs/data_integrity.md lists, run the real command a
user would run on it, and print one Markdown row per case: what was done, the command, its exit status and the
line it printed, and whether anything ran or was lost. About a minute on 2 cores.

    .venv/bin/python scripts/tamper_check.py [--keep DIR]
"""

from __future__ import annotations

import argparse
import gzip
import io
import os
import pickle
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the damage helpers are the test suite's (tests/tamper.py)
from tests.tamper import Boom, forge_checksums, plant  # noqa: E402
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "400"}  # no wrapped lines
DATA = [sys.executable, "-m", "jowa_data.cli"]
JOWA = [sys.executable, "-m", "pipelines.cli"]


def run(cmd: list[str], limit_bytes: int | None = None) -> tuple[int, str]:
    def pre() -> None:
        if limit_bytes is not None:
            import resource

            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    r = subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=ROOT, preexec_fn=pre, timeout=600)
    text = (r.stderr + "\n" + r.stdout).replace("\r", "\n")  # progress bars end their lines with \r
    lines = [ln for ln in text.splitlines() if ln.strip() and "%|" not in ln]
    key = next((ln.strip() for ln in lines if ln.lstrip().startswith("Error:")),
               next((ln for ln in lines if ln.lstrip().startswith("✗")), lines[-1] if lines else ""))
    return r.returncode, key.strip()


def tree(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*"))
            if p.is_file() and "_cache" not in p.parts and p.name != ".jowa.lock"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keep", help="work in this folder and keep it (default: a temp folder, removed)")
    a = ap.parse_args()
    work = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix="jowa-tamper-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        rows = cases(work)
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
    print("| case | command | exit | what it printed | code ran / data lost |")
    print("|---|---|---|---|---|")
    for case, cmd, rc, line, harm in rows:
        print(f"| {case} | `{cmd}` | {rc} | {line.replace('|', '/')[:220]} | {harm} |")


def cases(work: Path) -> list[tuple]:
    import torch

    from jowa_model.tokenizer import Tokenizer, save_tokenizer, tokenizer_preset

    replay, tok = work / "replay", work / "tok.pt"
    if not replay.exists():
        subprocess.run([*DATA, "record", "Pong", "--out", str(replay), "--steps", "1130", "--capacity", "500",
                        "--max-episode-steps", "150", "--policy", "random"], check=True, env=ENV, cwd=ROOT,
                       capture_output=True)
    torch.manual_seed(0)
    save_tokenizer(Tokenizer(tokenizer_preset("tiny")), tok)
    build_args = ["build", "Pong", "--replay", str(replay), "--tokenizer", str(tok), "--checkpoints", "0-50",
                  "--transitions", "300", "--seed", "0", "--task-transitions", "150", "--allow-fewer-runs",
                  "--format", "both"]
    pristine = work / "pristine"
    shutil.rmtree(pristine, ignore_errors=True)
    rc, line = run([*DATA, *build_args, "--out", str(pristine)])
    assert rc == 0, line
    ref = tree(pristine)

    def copy(name: str) -> Path:
        d = work / name
        shutil.rmtree(d, ignore_errors=True)
        shutil.copytree(pristine, d, ignore=shutil.ignore_patterns("_cache", ".jowa.lock"))
        return d

    def train(d: Path, backend: str = "zarr") -> list[str]:
        return [*JOWA, "train", "tiny", "--data", str(d), "--out", str(work / f"run-{d.name}"), "--set",
                f"data.backend={backend}", "--set", "data.batch_size=2", "--set", "stage1_steps=1", "--set",
                "stage2_steps=0"]

    def same(d: Path) -> str:
        return "byte-identical to the undamaged build" if tree(d) == ref else "DIFFERS from the undamaged build"

    rows = []
    sentinel = work / "ran.txt"
    evil = pickle.dumps(Boom(str(sentinel)))

    d = copy("pyd")
    tar = sorted((d / "wds").rglob("*.tar"))[0]
    with tarfile.open(tar) as tf:
        key = tf.getnames()[0].split(".")[0]
    plant(tar, f"{key}.evil.pyd", evil)
    rc, line = run([*DATA, "validate", str(d)])
    rows.append(("a `.pyd` member appended to a tar", "jowa-data validate DS", rc, line,
                 "code ran!" if sentinel.exists() else "nothing ran"))
    rc, line = run(train(d, "wds"))
    rows.append(("the same", "jowa train tiny --data DS --set data.backend=wds", rc, line,
                 "code ran!" if sentinel.exists() else "nothing ran"))
    forge_checksums(d, tar)
    rc, line = run(train(d, "wds"))
    rows.append(("the same, files.json and info.json forged to match", "jowa train ... data.backend=wds", rc, line,
                 "code ran!" if sentinel.exists() else "nothing ran"))

    d = copy("shard")
    shard = sorted((d / "zarr" / "Pong").rglob("c/0/0"))[0]
    shard.unlink()
    rc, line = run(train(d))
    rows.append(("one zarr shard deleted (zarr would read zeros)", "jowa train tiny --data DS", rc, line,
                 "no cache made"))
    rc, line = run([*DATA, "stats", str(d)])
    rows.append(("the same", "jowa-data stats DS", rc, line, "-"))
    rc, line = run([*DATA, *build_args, "--out", str(d)])
    rows.append(("the same", "jowa-data build ... --out DS (again)", rc, line, same(d)))

    d = copy("flip")
    tar = sorted((d / "wds").rglob("*.tar"))[0]
    b = bytearray(tar.read_bytes())
    b[2048] ^= 0xFF
    tar.write_bytes(bytes(b))
    rc, line = run(train(d, "wds"))
    rows.append(("one byte flipped inside a tar (same size)", "jowa train ... data.backend=wds", rc, line, "-"))
    rc, line = run([*DATA, *build_args, "--out", str(d)])
    rows.append(("the same", "jowa-data build ... (default --verify size)", rc, line,
                 "not seen by a size check"))
    rc, line = run([*DATA, *build_args, "--out", str(d), "--verify", "full"])
    rows.append(("the same", "jowa-data build ... --verify full", rc, line, same(d)))

    d = copy("cache")
    rc, _ = run(train(d))
    shard = sorted((d / "zarr" / "Pong").rglob("c/0/0"))[0]
    shard.write_bytes(shard.read_bytes()[:-1] + b"\0")
    rc, line = run(train(d))
    rows.append(("a shard altered after the token cache was made", "jowa train tiny --data DS", rc, line,
                 "old cache not served"))

    d = copy("temps")
    for p in (d / ".episodes.parquet.k1.tmp.parquet", d / "_tasks" / ".x.json.ab.tmp",
              sorted((d / "wds").rglob("*"))[0].parent / ".Pong-r001-t00000-00000.tar.zz.tmp"):
        p.write_bytes(b"partial")
    rc, line = run([*DATA, *build_args, "--out", str(d)])
    left = sorted(str(p.name) for p in d.rglob(".*.tmp*"))
    rows.append(("temp files of a killed build left in the folder", "jowa-data build ... (again)", rc, line,
                 f"removed ({len(left)} left); " + same(d)))

    d = copy("lock")
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from jowa_common.io import folder_lock\n"
                               f"with folder_lock({str(d)!r}, 'jowa-data build'):\n print('x', flush=True)\n"
                               " time.sleep(300)"], stdout=subprocess.PIPE, text=True, cwd=ROOT, env=ENV)
    holder.stdout.readline()
    rc, line = run([*DATA, *build_args, "--out", str(d)])
    holder.kill()
    holder.wait()
    rc2, _ = run([*DATA, *build_args, "--out", str(d)])
    rows.append(("a second build into a folder another build holds", "jowa-data build ... --out DS", rc, line,
                 f"after the holder is killed: exit {rc2}"))

    d = work / "full"
    shutil.rmtree(d, ignore_errors=True)
    rc, line = run([*DATA, *build_args, "--out", str(d)], limit_bytes=8192)
    rc2, _ = run([*DATA, *build_args, "--out", str(d)])
    rows.append(("a write limit on the process (a full disk)", "jowa-data build ... --out NEW", rc, line,
                 f"rerun: exit {rc2}; " + same(d)))

    bad = work / "bad.pt"
    torch.save({"obj": Boom(str(sentinel))}, bad)
    rc, line = run([*JOWA, "eval", str(bad), "--tokenizer", str(tok), "--games", "Pong", "--episodes", "1"])
    rows.append(("a checkpoint holding a pickled object", "jowa eval bad.pt ...", rc, line,
                 "code ran!" if sentinel.exists() else "nothing ran"))

    r2 = work / "replay-bad"
    shutil.rmtree(r2, ignore_errors=True)
    shutil.copytree(replay, r2)
    logs = r2 / "Pong" / "1" / "replay_logs"
    obs = logs / "$store$_observation_ckpt.1.gz"
    obs.write_bytes(obs.read_bytes()[: obs.stat().st_size // 2])
    buf = io.BytesIO()
    np.save(buf, np.array([Boom(str(sentinel))] * 4, dtype=object), allow_pickle=True)
    with gzip.open(logs / "$store$_reward_ckpt.0.gz", "wb") as f:
        f.write(buf.getvalue())
    rc, line = run([*DATA, "validate", str(r2)])
    rows.append(("a replay root: truncated observation file + pickled reward file", "jowa-data validate ROOT", rc,
                 line, "code ran!" if sentinel.exists() else "nothing ran"))
    last = max(int(p.name.split(".")[-2]) for p in (replay / "Pong" / "1" / "replay_logs").glob("add_count*"))
    rc, line = run([*DATA, "build", "Pong", "--replay", str(replay), "--tokenizer", str(tok), "--checkpoints",
                    f"{last}-{last}", "--allow-fewer-runs", "--out", str(work / "empty")])
    rows.append(("a selection of the final log alone (a cut episode)", f"jowa-data build --checkpoints {last}-{last}",
                 rc, line, "-"))
    return rows


if __name__ == "__main__":
    main()
