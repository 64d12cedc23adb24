"""scripts/gpu_check.sh --cpu: the GPU check's every part (tokenize, training step with FLOP count and MFU, three
planners, `jowa eval` end to end) runs at tiny sizes through the shell wrapper, so the GPU path cannot rot unseen;
its table and JSON carry a positive figure per row. Also: the one-line errors and the bf16 peak table."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "gpu_check.py"
ROWS = ["tokenize tiny_conv bf16 B=16", "train tiny bf16 step B=2x8", "plan tiny greedy", "plan tiny beam H=2 K=3",
        "plan tiny MCTS 20 sims", "eval Breakout end to end"]


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = mod  # its dataclasses look their module up there
    try:
        spec.loader.exec_module(mod)
        yield mod
    finally:
        sys.modules.pop("gpu_check", None)


def figure(text: str) -> float:
    return float(text.replace(",", ""))


@pytest.mark.slow
def test_cpu_run_through_the_wrapper(tmp_path):
    out = tmp_path / "check.json"
    # the wrapper with this interpreter (JOWA_PYTHON), run from elsewhere: --json is relative to the caller
    env = dict(os.environ, JOWA_PYTHON=sys.executable)
    p = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--cpu", "--json", "check.json",
                        "--peak-tflops", "0.5"], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    lines = p.stdout.splitlines()
    assert all(len(line) <= 100 for line in lines), max(lines, key=len)
    assert "CPU" in lines[0] and f"torch {torch.__version__}" in lines[1]
    for part in ("tokenize", "train tiny", "plan tiny greedy", "plan tiny beam_k3", "plan tiny mcts", "eval"):
        assert f"] {part}" in p.stderr  # a progress line per part
    table = {}
    for name in ROWS:
        (line,) = [x for x in lines if x.startswith(name + " ")]
        table[name] = line[len(name):].split()
        assert figure(table[name][0]) > 0, line
    assert "MFU " in " ".join(table["train tiny bf16 step B=2x8"])
    doc = json.loads(out.read_text())
    assert doc["format"] == "jowa-gpu-check-v1" and doc["machine"]["device"] == "cpu"
    rows = {r["check"]: r for r in doc["rows"]}
    assert list(rows) == ROWS
    assert all(r["value"] > 0 for r in rows.values())
    assert [rows[n]["unit"] for n in ROWS] == ["frames/s", "tokens/s"] + ["decisions/s"] * 3 + ["frames/s"]
    train = rows["train tiny bf16 step B=2x8"]["details"]
    # FLOPs really counted: at least the backbone's 6 * params * tokens (embeddings aside), and MFU from them
    assert train["model_tflop_per_step"] * 1e12 > 6 * 0.5 * train["trainable_params"] * train["tokens_per_step"]
    assert train["mfu_percent"] == pytest.approx(100 * train["achieved_tflops"] / 0.5)
    ev = rows["eval Breakout end to end"]["details"]
    assert 0 < ev["frames"] <= 200 and ev["decisions"] == ev["frames"] // 4 and ev["decisions_per_s"] > 0
    assert ev["device"] == "cpu" and ev["settings"]["planner"] == "beam" and ev["settings"]["precision"] == "bf16"


def test_no_cuda_is_one_line_exit_2(gpu_check, capsys):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    assert gpu_check.main(["--device", "cuda"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no CUDA device" in err[0] and "--cpu" in err[0]
    assert gpu_check.main([]) == 2  # the default device is cuda


def test_bad_arguments_are_one_line(gpu_check, capsys):
    assert gpu_check.main(["--cpu", "--parts", "tokenize,fly"]) == 2
    assert gpu_check.main(["--cpu", "--device", "tpu"]) == 2
    assert gpu_check.main(["--cpu", "--train-batch", "0"]) == 2
    assert gpu_check.main(["--cpu", "--budget-s", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 4 and "fly" in err[0] and "tpu" in err[1] and "train-batch" in err[2] and "budget" in err[3]


def test_peak_table(gpu_check):
    peak = gpu_check.peak_tflops
    assert peak("NVIDIA H100 80GB HBM3") == 989.0
    assert peak("NVIDIA H100 PCIe") == 756.0 and peak("NVIDIA H100 NVL") == 835.0
    assert peak("NVIDIA H200") == 989.0
    assert peak("NVIDIA A100-SXM4-80GB") == 312.0 and peak("NVIDIA A10") == 125.0
    assert peak("NVIDIA L4") == 121.0 and peak("NVIDIA L40S") == 362.0 and peak("NVIDIA L40") == 181.0
    assert peak("NVIDIA A10G") is None and peak("Tesla V100-SXM2-16GB") is None


def test_table_keeps_to_100_columns(gpu_check):
    info = {"date": "2026-01-01 00:00 UTC", "gpu": "NVIDIA H200", "torch": "2", "cuda": "12", "python": "3.11",
            "device": "cuda:0", "cpus": 16, "peak_bf16_tflops": 989.0}
    rows = [gpu_check.Row("plan 150M beam H=2 K=3", 123.4, "decisions/s", "x" * 200, 1.26),
            gpu_check.Row("train 150M bf16 step B=128x8", 1.5e6, "tokens/s", "MFU 40.0%")]
    text = gpu_check.format_table(info, rows)
    assert all(len(line) <= 100 for line in text.splitlines())
    assert "989 TFLOP/s" in text and "1,500,000" in text and " 1.26 " in text


def test_eval_is_shortened_to_the_budget(gpu_check):
    cap = gpu_check.eval_frame_cap
    gpu = gpu_check.GPU
    assert cap(gpu, 1e4, 0.5) == gpu.eval_frames and cap(gpu, 1e4, None) == gpu.eval_frames
    assert cap(gpu, 100.0, 0.5) == 532  # 100 s / (1.5 x 0.5 s) decisions x 4 frames, a multiple of 4
    assert cap(gpu, -5.0, 0.5) == 200  # never fewer than 50 decisions
