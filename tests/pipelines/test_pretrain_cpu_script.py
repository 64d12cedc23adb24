"""scripts/pretrain_cpu.py end to end on tiny inputs: real recording, build and pretraining, the summary's
accuracies and baselines, a rerun that resumes (nothing recomputed), and a bad --tokenizer named in the error."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "pretrain_cpu.py"


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("pretrain_cpu", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


TINY = ["--record-steps", "300", "--heldout-steps", "120", "--max-episode-steps", "150", "--chunk", "4",
        "--batch-size", "4", "--threads", "1", "--json"]


def test_missing_tokenizer_is_named(script, tmp_path, capsys):
    rc = script.main(["--out", str(tmp_path / "w"), "--tokenizer", str(tmp_path / "nope.pt"), *TINY])
    assert rc == 1
    err = capsys.readouterr().err
    assert "nope.pt" in err and "not found" in err


def test_end_to_end_summary_and_resume(script, built_dataset, tmp_path, capsys):
    out = tmp_path / "w"
    args = ["--out", str(out), "--tokenizer", str(built_dataset.tokenizer), "--minutes", "0.1", *TINY]
    assert script.main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert json.loads(capsys.readouterr().out)["pretrain"]["steps"] == summary["pretrain"]["steps"]
    p = summary["pretrain"]
    # the budget was tiny: stage 1 is one chunk, stage 2 was cut to what fit (possibly nothing)
    assert p["stage1_steps"] == 4 and p["steps"] >= 4 and p["steps"] % 4 == 0
    last = p["last"]
    for k in ("eval/token_acc", "eval/token_acc_unigram", "eval/token_acc_copy", "eval/reward_acc",
              "eval/reward_acc_majority", "eval/reward_balanced_acc", "eval/reward_balanced_acc_baseline"):
        assert 0.0 <= last[k] <= 1.0, k
    counts = last["eval/reward_class_counts"]
    assert 0 < sum(counts) <= summary["build"]["heldout"]["transitions"]  # held-out steps, each at most once
    assert set(summary["parameters"]) == {"tiny", "40M", "70M", "150M"}
    assert summary["parameters"]["40M"]["trainable"] == 17_416_091  # official count (docs/official_code.md §2)
    assert summary["record"]["FishingDerby/2"]["steps"] == 120  # the default game
    # rerun: every stage is complete, the same checkpoint is reported
    ckpts = sorted((out / "pretrain" / "ckpt").glob("step_*.pt"))
    assert script.main(args) == 0
    again = json.loads((out / "summary.json").read_text())
    assert again["pretrain"]["steps"] == p["steps"] and again["pretrain"]["last"] == last
    assert sorted((out / "pretrain" / "ckpt").glob("step_*.pt")) == ckpts
