"""Tokenizer training pipeline: outputs of a run, exact resume after SIGKILL of a real process, frames from an
episode index of recorded replay (two games), and the `jowa tokenizer` CLI (errors exit 1 naming the file)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from jowa_common.config import apply_overrides, parse_set_args
from jowa_common.errors import ConfigError, DatasetError
from jowa_model.tokenizer import load_tokenizer
from pipelines.cli import main as jowa_main
from pipelines.frames import FrameSampler, open_frames
from pipelines.train_tokenizer import train_preset, train_tokenizer
from tests.killpoint import run_killed

ROOT = Path(__file__).resolve().parents[2]
# Smallest useful run: a narrow tiny model, 8 frames per step.
RESUME_SETS = ["model.ch=8", "batch_size=8", "steps=12", "log_every=1", "ckpt_every=3", "image_every=6",
               "tensorboard=false", "seed=3"]


def train_args(preset: str, run: Path, frames: Path, sets: list[str]) -> list[str]:
    """`jowa tokenizer train` arguments for a run folder, without a progress bar."""
    args = ["tokenizer", "train", "--preset", preset, "--out", str(run), "--frames", str(frames), "--no-progress"]
    return args + [x for s in sets for x in ("--set", s)]


def kill_before_checkpoint(nth: int, args: list[str]):
    """Run the CLI in a child SIGKILLed just before its `nth` checkpoint temp file is renamed into place."""
    r = run_killed(r"/\.checkpoint\.pt\.[^/]+\.tmp$", nth, "pipelines.cli", args)
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    return r


def read_metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_run_outputs(trained_tokenizer):
    run, cfg = trained_tokenizer.run, trained_tokenizer.cfg
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == list(range(cfg.log_every, cfg.steps + 1, cfg.log_every))
    for r in rows:
        assert {"l1", "codebook", "commitment", "perceptual", "usage", "perplexity", "dead_codes", "grad_norm",
                "batch"} <= set(r)
        assert 0 < r["usage"] <= 1 and 1 <= r["perplexity"] <= 2048
    assert rows[-1]["l1"] < rows[0]["l1"]
    assert (run / "recon" / f"step_{cfg.steps:07d}.png").is_file()
    from PIL import Image

    im = Image.open(run / "recon" / f"step_{cfg.steps:07d}.png")
    assert im.mode == "L" and im.size == (2 * (8 * 84 + 9 * 2), 2 * (2 * 84 + 3 * 2))
    cfg_json = json.loads((run / "config.json").read_text())
    assert cfg_json["config"]["batch_size"] == cfg.batch_size and cfg_json["data"]["n"] == 192
    assert load_tokenizer(run / "checkpoint.pt").cfg == load_tokenizer(run / "tokenizer.pt").cfg


def test_sampler_walks_permutations_and_resumes():
    s = FrameSampler(10, 4, seed=1)
    batches = [s.next_indices() for _ in range(5)]  # 20 positions = 2 epochs
    assert sorted(np.concatenate(batches[:2]).tolist() + batches[2][:2].tolist()) == list(range(10))
    s2 = FrameSampler(10, 4, seed=1)
    for _ in range(3):
        s2.next_indices()
    st = s2.state_dict()
    s3 = FrameSampler(10, 4, seed=1)
    s3.load_state_dict(st)
    assert np.array_equal(s3.next_indices(), batches[3])
    with pytest.raises(DatasetError, match="batch_size"):
        FrameSampler(10, 5, seed=1).load_state_dict(st)


@pytest.fixture
def one_thread():
    """Bit-exact comparisons across processes need the same intra-op thread count (conv reduction order);
    other tests in this process may have changed it (e.g. `jowa bench plan --threads`)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_resume_after_sigkill_is_exact(tmp_path, atari_frames_npy, one_thread):
    """A killed run resumed from its checkpoint logs the same batches and losses and ends with the same weights."""
    ref = tmp_path / "ref"
    cfg = apply_overrides(train_preset("tiny"), parse_set_args(RESUME_SETS))
    train_tokenizer(cfg, ref, frames=atari_frames_npy, progress=False)

    run = tmp_path / "killed"
    cmd = [sys.executable, "-c", "from pipelines.cli import main; main()", "tokenizer", "train", "--preset", "tiny",
           "--out", str(run), "--frames", str(atari_frames_npy), "--no-progress"]
    for s in RESUME_SETS:
        cmd += ["--set", s]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    killed_at = None
    deadline = time.time() + 120
    try:
        while time.time() < deadline and proc.poll() is None:
            if (run / "checkpoint.pt").exists() and (run / "metrics.jsonl").exists():
                steps = [r["step"] for r in read_metrics(run)]
                if steps and steps[-1] >= 4:  # past the step-3 checkpoint, before the end
                    proc.send_signal(signal.SIGKILL)
                    killed_at = steps[-1]
                    break
            time.sleep(0.05)
    finally:
        if proc.poll() is None and killed_at is None:
            proc.kill()
        proc.wait()
    assert killed_at is not None and killed_at < 12, proc.stderr.read().decode()[-2000:]
    ckpt_step = torch.load(run / "checkpoint.pt", weights_only=True)["step"]
    assert ckpt_step < 12

    # Without --resume the folder is refused; with it the run continues from the checkpoint.
    r = CliRunner().invoke(jowa_main, cmd[3:])
    assert r.exit_code == 1 and "checkpoint.pt" in r.output and "--resume" in r.output
    r = CliRunner().invoke(jowa_main, cmd[3:] + ["--resume", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output[r.output.index("{"):])["step"] == 12

    want, got = read_metrics(ref), read_metrics(run)
    assert [x["step"] for x in got] == list(range(1, 13))  # lines after the checkpoint were not duplicated
    for a, b in zip(want, got):
        assert a["batch"] == b["batch"], a["step"]  # same data, in the same order, after the resume too
        assert a["loss"] == b["loss"] and a["perplexity"] == b["perplexity"], a["step"]
    sa, sb = load_tokenizer(ref / "tokenizer.pt").state_dict(), load_tokenizer(run / "tokenizer.pt").state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert (run / "recon" / "step_0000012.png").is_file()


def test_train_from_an_index_of_two_games(tmp_path, recorded_replay):
    from jowa_data.manifest import load_manifests
    from jowa_data.subsample import SubsampleOptions, build_index, read_index, write_index

    reg = load_manifests()
    opts = SubsampleOptions(runs=(1,), num_runs=1, checkpoints=(0, 999), fraction=1.0)
    index = write_index(build_index([reg.get(g) for g in recorded_replay.games], recorded_replay.root, options=opts),
                        tmp_path / "episodes.parquet")
    rows = read_index(index).to_pylist()
    cfg = apply_overrides(train_preset("tiny"), {"model": {"ch": 8}, "batch_size": 4, "steps": 2, "log_every": 1,
                                                 "tensorboard": True, "max_frames": 200})
    out = tmp_path / "run"
    s = train_tokenizer(cfg, out, index=index, replay_root=recorded_replay.root, progress=False)
    frames = open_frames(out / "frames.npy")
    assert frames.shape == (200, 84, 84) and s["num_frames"] == 200
    # Each game gives an equal share: its first indexed episodes, in order, as recorded by the emulator.
    i = 0
    for game in sorted(recorded_replay.games):
        res, left = recorded_replay[game], 100
        for row in (r for r in rows if r["game"] == game):
            take = min(left, row["length"])
            start = int(res.episode_starts[row["episode"]])
            assert np.array_equal(frames[i:i + take], res.frames[start:start + take]), (game, row["episode"])
            i, left = i + take, left - take
            if left == 0:
                break
    assert i == 200
    assert any(p.name.startswith("events.out.tfevents") for p in (out / "tb").iterdir())


def test_cli_info_recon_and_errors(tmp_path, trained_tokenizer, atari_frames_npy):
    runner = CliRunner()
    r = runner.invoke(jowa_main, ["tokenizer", "info", "--json"])
    assert r.exit_code == 0, r.output
    info = json.loads(r.output)
    assert info["params"] == info["official_params"] and info["tokens_per_frame"] == 36
    r = runner.invoke(jowa_main, ["tokenizer", "info", str(trained_tokenizer.path)])
    assert r.exit_code == 0 and "sha256" in r.output and "codebook" in r.output
    png = tmp_path / "grid.png"
    r = runner.invoke(jowa_main, ["tokenizer", "recon", str(trained_tokenizer.path), "--frames", str(atari_frames_npy),
                                  "--count", "4", "--stride", "30", "--out", str(png), "--json"])
    assert r.exit_code == 0, r.output
    assert png.is_file() and json.loads(r.output)["frames"] == [0, 30, 60, 90]
    # Errors: one line naming the file, exit status 1.
    r = runner.invoke(jowa_main, ["tokenizer", "recon", str(tmp_path / "nope.pt"), "--frames", str(atari_frames_npy),
                                  "--out", str(png)])
    assert r.exit_code == 1 and "nope.pt" in r.output
    bad = tmp_path / "bad.npy"
    np.save(bad, np.zeros((3, 64, 64), np.uint8))
    r = runner.invoke(jowa_main, ["tokenizer", "train", "--preset", "tiny", "--out", str(tmp_path / "x"),
                                  "--frames", str(bad)])
    assert r.exit_code == 1 and "bad.npy" in r.output and "(N, 84, 84)" in r.output
    r = runner.invoke(jowa_main, ["tokenizer", "train", "--preset", "tiny", "--out", str(tmp_path / "y"),
                                  "--frames", str(atari_frames_npy), "--set", "batchsize=4"])
    assert r.exit_code == 1 and "batch_size" in r.output
    r = runner.invoke(jowa_main, ["tokenizer", "train", "--preset", "tiny", "--out", str(tmp_path / "z")])
    assert r.exit_code == 1 and "--frames" in r.output
    with pytest.raises(ConfigError, match="perceptual"):
        apply_overrides(train_preset("tiny"), {"model": {"perceptual": "alexnet"}})


def test_kill_while_the_checkpoint_is_a_temp_file(tmp_path, atari_frames_npy, one_thread):
    """SIGKILL just before the second checkpoint's temp file is renamed: the first checkpoint stays intact, the
    resumed run removes the temp file and ends with the uninterrupted run's weights."""
    ref = tmp_path / "ref"
    cfg = apply_overrides(train_preset("tiny"), parse_set_args(RESUME_SETS))
    train_tokenizer(cfg, ref, frames=atari_frames_npy, progress=False)
    run = tmp_path / "killed"
    args = train_args("tiny", run, atari_frames_npy, RESUME_SETS)
    r = kill_before_checkpoint(2, args)
    temps = list(run.glob(".checkpoint.pt.*.tmp"))
    assert len(temps) == 1 and torch.load(run / "checkpoint.pt", weights_only=True)["step"] < 12
    r = CliRunner().invoke(jowa_main, args + ["--resume", "--json"])
    assert r.exit_code == 0, r.output
    assert not temps[0].exists()
    sa, sb = load_tokenizer(ref / "tokenizer.pt").state_dict(), load_tokenizer(run / "tokenizer.pt").state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


CELLS_SETS = ["model.vocab_size=64", "steps=40", "ckpt_every=1", "tensorboard=false", "seed=2"]


def test_cells_fit_resumes_after_a_kill_and_converges(tmp_path, atari_frames_npy, one_thread):
    """The k-means preset: Lloyd iterations logged, stops when no cell changes code, and a run killed just before
    its third checkpoint lands resumes to the uninterrupted run's codebook."""
    ref = tmp_path / "ref"
    cfg = apply_overrides(train_preset("cells"), parse_set_args(CELLS_SETS))
    summary = train_tokenizer(cfg, ref, frames=atari_frames_npy, progress=False)
    rows = read_metrics(ref)
    assert summary["converged"] and summary["step"] == len(rows) < 40 and rows[-1]["changed"] == 0
    assert [r["step"] for r in rows] == list(range(1, len(rows) + 1))
    assert all(b["objective"] <= a["objective"] + 1e-9 for a, b in zip(rows, rows[1:]))  # Lloyd never goes up
    assert rows[-1]["usage"] == 1.0 and summary["distinct_cells"] > 64
    assert (ref / "recon" / f"step_{summary['step']:07d}.png").is_file()

    run = tmp_path / "killed"
    args = train_args("cells", run, atari_frames_npy, CELLS_SETS)
    kill_before_checkpoint(3, args)
    assert torch.load(run / "checkpoint.pt", weights_only=True)["step"] == 2
    r = CliRunner().invoke(jowa_main, args + ["--resume"])
    assert r.exit_code == 0, r.output
    assert f"k-means: {summary['step']} Lloyd iterations (converged)" in r.output
    assert [x["objective"] for x in read_metrics(run)] == [x["objective"] for x in rows]
    sa, sb = load_tokenizer(ref / "tokenizer.pt").state_dict(), load_tokenizer(run / "tokenizer.pt").state_dict()
    assert list(sa) == ["embedding.weight"] and torch.equal(sa["embedding.weight"], sb["embedding.weight"])
