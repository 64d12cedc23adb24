"""A game outside the shipped manifests (Bowling, official task id 11) works end to end with no code change:
one manifest file in a temp folder → `jowa-data manifests` → `record` (real ALE) → `subsample` → `stats`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from click.testing import CliRunner

from jowa_data.cli import main as cli

STEPS, CAPACITY, CAP = 700, 300, 120  # per run: 3 checkpoint files, ~5-6 episodes, some at the step cap


def run_cli(*args: str) -> dict | list:
    r = CliRunner().invoke(cli, [*args, "--json"])
    assert r.exit_code == 0, r.output
    return json.loads(r.output)


def test_bowling_manifest_record_subsample_stats(bowling_manifest_dir: Path, tmp_path: Path):
    mdir = str(bowling_manifest_dir)
    listed = run_cli("manifests", "--manifests", mdir)
    assert [(m["name"], m["task_id"], m["actions"]) for m in listed] == [("Bowling", 11,
                                                                          ["NOOP", "FIRE", "UP", "DOWN", "UPFIRE", "DOWNFIRE"])]
    # the shipped registry does not know the game
    r = CliRunner().invoke(cli, ["record", "Bowling", "--out", str(tmp_path / "x"), "--steps", "5"])
    assert r.exit_code == 1 and "unknown game 'Bowling'" in r.output

    root = tmp_path / "replay"
    recs = {}
    for run in ("1", "2"):  # the manifest's default [data]: 2 of runs 1..5, checkpoints 1-50, fraction 0.1
        recs[run] = run_cli("record", "Bowling", "--out", str(root), "--run", run, "--steps", str(STEPS),
                            "--seed", run, "--capacity", str(CAPACITY), "--max-episode-steps", str(CAP), "--quiet",
                            "--manifests", mdir)
        assert recs[run]["task_id"] == 11 and recs[run]["skipped_logs"] == 0 and len(recs[run]["checkpoints"]) == 3

    r = CliRunner().invoke(cli, ["stats", str(root)])  # action names come from the manifest: say which is missing
    assert r.exit_code == 1 and "unknown game 'Bowling'" in r.output
    raw = run_cli("stats", str(root), "--step-cap", str(CAP), "--manifests", mdir)
    g = raw["games"]["Bowling"]
    assert set(g["runs"]) == {"1", "2"} and g["transitions"] == 2 * STEPS
    for run, rec in recs.items():
        s = g["runs"][run]
        assert s["episodes"] == rec["complete_episodes"] and s["episodes"] + s["incomplete_episodes"] == rec["episodes"]
        assert sum(s["actions"]["minimal"].values()) == STEPS
    assert sorted(g["actions"]["minimal"]) == sorted(["NOOP", "FIRE", "UP", "DOWN", "UPFIRE", "DOWNFIRE"])
    full = g["actions"]["full"]  # minimal ids map to full ids 0, 1, 2, 5, 10, 13
    assert {n: full[n] for n in ("NOOP", "FIRE", "UP", "DOWN", "UPFIRE", "DOWNFIRE")} == g["actions"]["minimal"]
    assert sum(full.values()) == 2 * STEPS and full["RIGHT"] == 0
    assert g["capped_episodes"] >= 1 and g["length"]["max"] == CAP  # the recorder's cap ends episodes at CAP

    out = tmp_path / "bowling.parquet"
    sel = run_cli("subsample", "Bowling", "--replay", str(root), "--out", str(out), "--manifests", mdir)
    rec = sel["games"]["Bowling"]
    assert rec["runs"] == [1, 2] and rec["checkpoints"] == [1, 50] and rec["fraction"] == 0.1
    assert rec["checkpoints_used"] == {"1": [1, 2], "2": [1, 2]}
    assert rec["target_transitions"] == int(np.ceil(0.1 * rec["pool_transitions"]))
    assert rec["selected_transitions"] >= rec["target_transitions"] and rec["selected_episodes"] >= 1

    idx = run_cli("stats", str(out), "--step-cap", str(CAP))
    s = idx["games"]["Bowling"]
    assert s["episodes"] == rec["selected_episodes"] and s["transitions"] == rec["selected_transitions"]
    assert s["incomplete_episodes"] == 0 and s["selection"]["runs"] == [1, 2]
    assert idx["overall"]["bytes"]["index"] == out.stat().st_size and idx["overall"]["bytes"]["source"] > 0
    # the index stats hold no more episodes than the raw replay
    assert s["episodes"] <= g["episodes"] and s["length"]["max"] <= g["length"]["max"]
