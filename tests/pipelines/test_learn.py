"""`jowa bench learn`: the report's arithmetic on hand-made numbers, its flags, and one tiny end-to-end run."""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest
from click.testing import CliRunner
from rich.console import Console

from jowa_data.manifest import load_manifests
from pipelines.cli import main
from pipelines.learn import learn_checks, normalized, render_report, summarize_returns, td_flag
from pipelines.scores import bootstrap_ci, top_action


def test_bootstrap_ci_and_summary_by_hand():
    x = [1.0, 2.0, 3.0, 10.0]
    lo, hi = bootstrap_ci(x, n_boot=4000, ci=0.95, seed=0)
    assert lo < np.mean(x) < hi and 1.0 <= lo < 3.0 and 6.0 < hi <= 10.0
    assert bootstrap_ci(x, 4000, 0.95, 0) == (lo, hi)  # seeded
    assert bootstrap_ci([5.0, 5.0, 5.0], 100) == (5.0, 5.0)  # no spread, no interval
    assert bootstrap_ci([7.0], 100) == (7.0, 7.0)
    s = summarize_returns(x, 4000, 0)
    assert s["mean"] == 4.0 and s["episodes"] == 4 and s["ci"] == [lo, hi]
    assert math.isclose(s["std"], np.std(x, ddof=1))  # sample std
    assert summarize_returns([3.0], 100, 0)["std"] == 0.0


def test_checks_on_hand_made_numbers():
    def r(m, hns=None):
        return {"mean": m, "ci": [m, m]} | ({} if hns is None else {"hns": hns})

    games = {"A": {"random": r(0.0), "data": r(10.0), "greedy": r(12.0, 0.5) | {"top_action": top_action(
                       {"NOOP": 1, "UP": 19, "DOWN": 0})}, "beam": r(14.0, 0.4) | {"top_action": ["UP", 0.94]}},
             "B": {"random": r(2.0), "data": r(4.0), "greedy": r(3.0, 0.1), "beam": r(3.0, 0.1)},
             "C": {"random": r(5.0), "data": r(6.0), "greedy": r(4.0, 0.0), "beam": r(5.0, 0.05)}}
    world = {"A": {"token_acc": 0.9, "token_acc_copy": 0.8, "reward_balanced_acc": 0.75,
                   "reward_balanced_acc_baseline": 0.5},
             "B": {"token_acc": 0.5, "token_acc_copy": 0.6, "reward_balanced_acc": 0.5,
                   "reward_balanced_acc_baseline": 0.5}}
    c = learn_checks(games, world)
    assert c["beats_random"] == {"A": True, "B": True, "C": False}
    assert c["beats_data"] == {"A": True, "B": False, "C": False} and c["games_beating_data"] == 1
    # normalized: A greedy 1.2 beam 1.4; B 0.5, 0.5; C -1.0, 0.0 -> greedy 0.2333, beam 0.6333
    assert normalized(12.0, 0.0, 10.0) == 1.2
    assert math.isclose(c["normalized_mean"]["greedy"], (1.2 + 0.5 - 1.0) / 3)
    assert math.isclose(c["normalized_mean"]["beam"], (1.4 + 0.5 + 0.0) / 3)
    # the test is the paper's aggregate, the mean HNS: greedy 0.2, beam 0.1833 (the data-normalized mean says beam)
    assert math.isclose(c["hns_mean"]["greedy"], 0.2) and math.isclose(c["hns_mean"]["beam"], 0.55 / 3)
    assert c["beam_ge_greedy"] is False
    games["C"]["beam"]["hns"] = 0.1  # beam 0.2 = greedy 0.2: ties count as >=
    assert learn_checks(games, world)["beam_ge_greedy"] is True
    assert c["world_model_ge_copy"] == {"A": True, "B": False}
    assert c["reward_head_silent"] == {"A": False, "B": True}  # B's reward argmax is the majority sign only
    # greedy sends UP on 19 of 20 decisions (0.95: constant), beam on 0.94 (not); no counts, no verdict
    assert c["constant_players"] == {"A": {"greedy": ["UP", 0.95]}, "B": {}, "C": {}}
    assert top_action({"NOOP": 0, "FIRE": 0}) is None and top_action(None) is None


def test_td_flag_spots_a_uniform_return_distribution():
    rows = [{"stage": 1, "train/loss_td": 0.0}] + [{"stage": 2, "train/loss_td": v} for v in (3.93, 3.92, 3.931)]
    f = td_flag(rows, 51)
    assert f["learned"] is False and math.isclose(f["ln_atoms"], math.log(51))
    rows += [{"stage": 2, "train/loss_td": v} for v in (2.1, 2.0, 1.9)]
    assert td_flag(rows, 51)["learned"] is True and td_flag(rows, 51)["td_first"] == 3.93
    assert td_flag([{"stage": 1}], 51)["learned"] is None


@pytest.mark.slow
def test_learn_end_to_end_tiny_and_resume(tmp_path):
    """Every stage on the real emulator at a toy size; a rerun resumes (every stage skipped) with the same report."""
    sets = ["games=[\"Freeway\", \"Breakout\"]", "record_steps=700", "heldout_steps=300", "capacity=400",
            "max_frames=1200", "tokenizer_steps=6", "stage1_steps=4", "stage2_steps=4", "batch_size=4",
            "eval_episodes=2", "eval_sticky=0.25", "n_boot=50", "threads=1"]
    args = ["bench", "learn", "--out", str(tmp_path / "L"), "--json"] + [x for s in sets for x in ("--set", s)]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    assert set(rep["games"]) == {"Freeway", "Breakout"} and rep["config"]["games"] == ["Freeway", "Breakout"]
    for g, row in rep["games"].items():
        assert set(row) == {"random", "data", "greedy", "beam"}
        for k, d in row.items():
            assert d["ci"][0] <= d["mean"] <= d["ci"][1], (g, k)
        assert row["random"]["episodes"] == 2 and row["data"]["episodes"] >= 1
        assert row["greedy"]["frames_mean"] <= 1200
    for g, w in rep["world_model"].items():
        assert 0 <= w["token_acc"] <= 1 and 0 <= w["token_acc_copy"] <= 1 and w["tokens"] > 0
    assert 0 < rep["tokenizer"]["all"]["moving_l1"] <= 1 and 0 < rep["tokenizer"]["all"]["l1"] <= 1
    for g in ("Freeway", "Breakout"):  # the sprite checks are shares of moving cells / pixels
        assert 0 <= rep["tokenizer"][g]["moving_cells_changed"] <= 1 and 0 <= rep["tokenizer"][g]["moving_drawn"] <= 1
    assert set(rep["checks"]["beats_random"]) == {"Freeway", "Breakout"}
    pics = tmp_path / "L" / "pictures"
    for name in ("report.png", "reconstructions.png", "training_curves.png"):
        assert (pics / name).stat().st_size > 1000, name
    con = Console(file=io.StringIO(), width=100)
    render_report(rep, con)
    text = con.file.getvalue()
    assert "Freeway" in text and "world model" in text and max(len(ln) for ln in text.splitlines()) <= 100
    assert "frames, sticky 0.25)" in text  # the protocol the players were evaluated under
    silent = [g for g, v in rep["checks"]["reward_head_silent"].items() if v]
    assert set(rep["checks"]["reward_head_silent"]) == {"Freeway", "Breakout"}
    assert ("reward head's argmax" in text) == bool(silent)  # the note names the games whose reward head is silent
    ev = json.loads((tmp_path / "L" / "eval" / "greedy.json").read_text())
    assert all(ev["games"][g]["settings"]["sticky"] == 0.25 for g in ("Freeway", "Breakout"))
    for g in ("Freeway", "Breakout"):  # the share of the most sent action comes from the eval file's counts
        counts = ev["games"][g]["action_counts"]
        name, share = rep["games"][g]["greedy"]["top_action"]
        assert sum(counts.values()) == sum(ev["games"][g]["lengths"]) and share == counts[name] / sum(counts.values())
        assert (g in rep["checks"]["constant_players"] and "greedy" in rep["checks"]["constant_players"][g]) == (
            share >= 0.95)
        assert f"{name} {share:.0%}" in text  # the checks table's "greedy plays" column
    const = [g for g, players in rep["checks"]["constant_players"].items() if "greedy" in players]
    assert ("note: constant policies" in text) == any(rep["checks"]["constant_players"].values())
    if const:  # the note names the games where greedy is constant
        assert f"greedy on {', '.join(const)}" in " ".join(text.split())
        sc = load_manifests().get(g).scores  # HNS of the raw game score, the manifest's Atari-57 references
        hns = (ev["games"][g]["mean"] - sc.random) / (sc.human - sc.random)
        assert math.isclose(rep["games"][g]["greedy"]["hns"], hns)
    beam_hns = [rep["games"][g]["beam"]["hns"] for g in rep["games"]]
    assert math.isclose(rep["checks"]["hns_mean"]["beam"], np.mean(beam_hns))
    # the main job's summary (this report + fine-tuning + the pictures) fits 100 columns on a wide terminal too
    from pipelines.demo import render_summary

    con = Console(file=io.StringIO(), width=300)
    render_summary({"learn": rep, "total_seconds": 1.0, "pictures": [f"pictures/{g}_{i}.gif" for g in rep["games"]
                                                                     for i in range(6)],
                    "finetune": {"game": "Pong", "task_id": 39, "transitions": 2000, "steps": 80,
                                 "agent_clipped_mean": -21.0, "random_clipped_mean": -21.0, "max_frames": 10_000}},
                   con)
    text = con.file.getvalue()
    assert "Freeway_5.gif" in text and "-21.0" in text and max(len(ln) for ln in text.splitlines()) <= 100
    # resume: every stage finds its output; the returns are the same numbers
    r2 = CliRunner().invoke(main, args)
    assert r2.exit_code == 0, r2.output
    rep2 = json.loads(r2.stdout)
    assert rep2["games"] == rep["games"] and rep2["world_model"] == rep["world_model"]
    assert rep2["seconds"]["pretrain"] < rep["seconds"]["pretrain"] + 5


def test_reconstruction_report_sprite_checks_exact(trained_tokenizer, atari_frames):
    """A frame against itself: nothing moves (nan checks); against a frame whose first grid cell is painted
    white: exactly that cell moves, so its share of re-coded cells is the share of frames whose cell-0 token
    changed, and every painted pixel counts as moving."""
    import math

    import numpy as np

    from jowa_model.tokenizer import load_tokenizer
    from pipelines.learn import reconstruction_report

    tok = load_tokenizer(trained_tokenizer.path)
    frames = atari_frames[:6]
    same, _ = reconstruction_report(tok, frames, frames)
    assert same["moving_fraction"] == 0 and math.isnan(same["moving_cells_changed"]) and math.isnan(same["moving_drawn"])
    prev = frames.copy()
    prev[:, :14, :14] = np.where(frames[:, :14, :14] > 127, 0, 255)  # every pixel of cell 0 differs by > 127
    rep, rec = reconstruction_report(tok, frames, prev)
    assert rep["moving_fraction"] == 14 * 14 / (84 * 84)
    changed = tok.encode(frames)[:, 0] != tok.encode(prev)[:, 0]
    assert rep["moving_cells_changed"] == changed.mean()
    f, p, r = (a[:, :14, :14].astype(np.float32) for a in (frames, prev, rec))
    assert rep["moving_drawn"] == pytest.approx((np.abs(r - f) < np.abs(r - p)).mean())
