"""`pipelines.evaluate` / `jowa eval` on the real emulator: a tiny random-weight checkpoint on Pong and Phoenix
(greedy, beam, MCTS), the raw-score JSON `jowa scores` reads, GIF/MP4 of an episode, per-env ε, the frame cap
in frames, invalid actions never reaching the emulator (a brand-new game from a manifest), resume, CLI errors."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from jowa_common.errors import ConfigError
from jowa_common.io import sha256_file
from jowa_data.manifest import load_manifests
from jowa_model.checkpoint import save_world_action
from jowa_model.planner import Planner, PlannerConfig, WorldModelImagination
from jowa_model.presets import model_preset
from jowa_model.tokenizer import load_tokenizer, tokenizer_checksum
from jowa_model.world_action import WorldActionModel
from pipelines.evaluate import EvalConfig, apply_epsilon, epsilon_generators, evaluate
from pipelines.scores import load_raw_scores
from tests.killpoint import run_killed

PONG_IDS, BOWLING_IDS = {0, 1, 3, 4, 11, 12}, {0, 1, 2, 5, 10, 13}  # full ids of their minimal sets


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """Random weights (no masks set: every action-mask row allows all 18 actions)."""
    torch.manual_seed(0)
    p = tmp_path_factory.mktemp("wa") / "wa.pt"
    save_world_action(WorldActionModel(model_preset("tiny")), p)
    return p


def jowa(*args: str):
    from pipelines.cli import main

    return CliRunner().invoke(main, [str(a) for a in args], prog_name="jowa")


def test_acceptance_two_games_json_and_gif(ckpt, tiny_tokenizer_ckpt, tmp_path):
    out, gifs = tmp_path / "eval.json", tmp_path / "gifs"
    r = jowa("eval", ckpt, "--tokenizer", tiny_tokenizer_ckpt, "--games", "Pong", "Phoenix", "--episodes", 2,
             "--planner", "greedy", "--max-frames", 400, "--out", out, "--gif", gifs, "--threads", 1, "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(out.read_text())
    assert json.loads(r.stdout)["games"] == doc["games"]
    assert doc["format"] == "jowa-raw-scores-v1" and sorted(doc["games"]) == ["Phoenix", "Pong"]
    assert doc["checkpoint_sha256"] == sha256_file(ckpt)
    assert doc["tokenizer_checksum"] == tokenizer_checksum(tiny_tokenizer_ckpt)
    for game in ("Pong", "Phoenix"):
        g = doc["games"][game]
        # 400 emulator frames = 100 agent steps (neither game can end that fast)
        assert g["lengths"] == [100, 100] and g["frames"] == [400, 400] and g["terminal"] == [False, False]
        assert len(g["returns"]) == 2 and g["decisions"] == 200 and g["decisions_per_s"] > 0
        s = g["settings"]
        assert (s["planner"], s["history"], s["epsilon"], s["sticky"], s["max_frames"]) == ("greedy", 8, 0.001,
                                                                                            0.0, 400)
        from PIL import Image

        with Image.open(gifs / f"{game}.gif") as im:
            assert im.n_frames > 1 and im.size == (160, 210)
        assert g["video"] == str(gifs / f"{game}.gif")
    assert doc["games"]["Pong"]["settings"]["task_id"] == 39
    reg = load_manifests()
    res = load_raw_scores([out], reg)
    assert res["Phoenix"].returns.tolist() == doc["games"]["Phoenix"]["returns"]
    r = jowa("scores", out, "--boot", 10)
    assert r.exit_code == 0, r.output
    assert "Pong" in r.stdout and "Phoenix" in r.stdout


def test_beam_search_uses_manifest_settings_and_valid_actions(ckpt, tiny_tokenizer_ckpt):
    cfg = EvalConfig(episodes=2, planner="beam", max_frames=40, device="cpu")
    doc = evaluate(ckpt, tiny_tokenizer_ckpt, ["Pong", "Phoenix"], cfg)
    for game in ("Pong", "Phoenix"):
        s = doc["games"][game]["settings"]
        # manifest: H=2, K=2, history 8 -> cut to 8 - H = 6 context steps so imagined steps fit
        assert (s["planner"], s["horizon"], s["beam_width"], s["history"]) == ("beam", 2, 2, 6)
        assert doc["games"][game]["lengths"] == [10, 10]
    over = evaluate(ckpt, tiny_tokenizer_ckpt, ["Pong"], EvalConfig(episodes=1, planner="beam", horizon=1,
                                                                  beam_width=3, history=2, max_frames=8))
    s = over["games"]["Pong"]["settings"]
    assert (s["horizon"], s["beam_width"], s["history"]) == (1, 3, 2)


def test_invalid_actions_never_reach_the_env_new_game(ckpt, tiny_tokenizer_ckpt, bowling_manifest_dir):
    """Bowling exists only as a manifest file (task 11, 6 actions); the checkpoint's mask row allows all 18 and
    its critic prefers DOWNLEFTFIRE (17). The evaluator must mask it, and ε draws only valid actions."""
    from jowa_model.checkpoint import load_world_action

    model, _ = load_world_action(ckpt)
    with torch.no_grad():
        model.head_q.biases[2].view(model.cfg.num_q, 18, -1)[:, 17, -1] = 1e3  # Q(17) ≈ v_max
    assert model.action_masks[11].all()
    # the test can fail: unmasked, the planner picks the invalid action
    imag = WorldModelImagination(model)
    tok = torch.zeros(1, 1, 36, dtype=torch.long)
    assert Planner(imag).plan(tok, torch.zeros(1, 0, dtype=torch.long), torch.tensor([11]),
                              torch.ones(1, 18, dtype=torch.bool)).item() == 17
    from pipelines.evaluate import play_game, set_action_mask_rows

    manifest = load_manifests([bowling_manifest_dir]).get("Bowling")
    set_action_mask_rows(model, [manifest])
    assert model.action_masks[11].sum() == 6 and model.action_masks[12].all()
    res = play_game(model, load_tokenizer(tiny_tokenizer_ckpt), manifest,
                    EvalConfig(episodes=3, planner="beam", epsilon=0.5, max_frames=48))
    sent = {a for ep in res.actions for a in ep}
    assert sent <= BOWLING_IDS and len(sent) > 1 and sum(res.random_actions) > 0
    assert [len(a) for a in res.actions] == res.lengths == [12, 12, 12]
    counts = res.to_json()["action_counts"]  # by name, the manifest's order, every step of every episode
    assert list(counts) == ["NOOP", "FIRE", "UP", "DOWN", "UPFIRE", "DOWNFIRE"] and sum(counts.values()) == 36
    assert counts == {n: sum(ep.count(int(i)) for ep in res.actions) for n, i in zip(counts, manifest.full_action_ids)}
    # the same through evaluate() with --manifests: the mask row is set from the manifest
    doc = evaluate(ckpt, tiny_tokenizer_ckpt, ["Bowling"],
                   EvalConfig(episodes=1, planner="greedy", epsilon=0.0, max_frames=8,
                              manifests=(str(bowling_manifest_dir),)))
    assert doc["games"]["Bowling"]["settings"]["actions"] == ["NOOP", "FIRE", "UP", "DOWN", "UPFIRE", "DOWNFIRE"]


def test_epsilon_is_per_env_and_independent_of_other_envs():
    valid = np.array([0, 1, 3, 4])

    def run(envs_alive: list[list[int]]) -> dict[int, list[tuple[bool, int]]]:
        rngs = epsilon_generators(seed=0, task_id=39, n=4)
        seen: dict[int, list] = {i: [] for i in range(4)}
        for alive in envs_alive:
            acts = np.full(len(alive), 99)
            rep = apply_epsilon(acts, alive, rngs, 0.5, valid)
            for j, i in enumerate(alive):
                seen[i].append((bool(rep[j]), int(acts[j])))
        return seen

    all_alive = run([[0, 1, 2, 3]] * 50)
    alone = run([[2]] * 50)
    assert alone[2] == all_alive[2]  # env 2's stream does not depend on the other envs
    patterns = {tuple(r for r, _ in all_alive[i]) for i in range(4)}
    assert len(patterns) == 4  # no draw shared by all envs (official bug)
    for i in range(4):
        assert all((a in valid) if r else a == 99 for r, a in all_alive[i])
    assert 10 < sum(r for r, _ in all_alive[0]) < 40
    assert apply_epsilon(np.array([5]), [0], epsilon_generators(0, 0, 1), 0.0, valid).tolist() == [False]


def test_epsilon_one_envs_differ_and_runs_repeat(ckpt, tiny_tokenizer_ckpt):
    cfg = EvalConfig(episodes=2, planner="greedy", epsilon=1.0, max_frames=40)
    a = evaluate(ckpt, tiny_tokenizer_ckpt, ["Pong"], cfg)["games"]["Pong"]
    assert a["random_actions"] == a["lengths"] == [10, 10]
    from pipelines.evaluate import play_game, set_action_mask_rows
    from jowa_model.checkpoint import load_world_action

    model, _ = load_world_action(ckpt)
    pong = load_manifests().get("Pong")
    set_action_mask_rows(model, [pong])
    res = play_game(model, load_tokenizer(tiny_tokenizer_ckpt), pong, cfg)
    assert res.actions[0] != res.actions[1] and set(res.actions[0]) <= PONG_IDS
    assert res.returns == a["returns"] and res.lengths == a["lengths"]  # seeded: the same episodes again


def test_frame_cap_is_in_emulator_frames(ckpt, tiny_tokenizer_ckpt):
    g = evaluate(ckpt, tiny_tokenizer_ckpt, ["Phoenix"],
                 EvalConfig(episodes=1, planner="greedy", max_frames=10))["games"]["Phoenix"]
    # the episode is cut at the first agent step that reaches 10 frames: 3 steps of 4 frames
    assert g["lengths"] == [3] and g["frames"] == [12] and g["terminal"] == [False]


def test_mcts_and_mp4(ckpt, tiny_tokenizer_ckpt, tmp_path):
    import cv2

    r = jowa("eval", ckpt, "--tokenizer", tiny_tokenizer_ckpt, "--games", "Pong", "--episodes", 1, "--planner",
             "mcts", "--simulations", 3, "--max-frames", 12, "--mp4", tmp_path / "v", "--out", tmp_path / "m.json")
    assert r.exit_code == 0, r.output
    g = json.loads((tmp_path / "m.json").read_text())["games"]["Pong"]
    assert g["settings"]["planner"] == "mcts" and g["settings"]["num_simulations"] == 3 and g["lengths"] == [3]
    cap = cv2.VideoCapture(str(tmp_path / "v" / "Pong.mp4"))
    n = 0
    while cap.read()[0]:
        n += 1
    assert n == 4  # the reset frame + one per agent step


def test_rerun_keeps_finished_games(ckpt, tiny_tokenizer_ckpt, tmp_path):
    out = tmp_path / "e.json"
    cfg = EvalConfig(episodes=1, planner="greedy", max_frames=8)
    first = evaluate(ckpt, tiny_tokenizer_ckpt, ["Pong"], cfg, out=out)  # as if killed after Pong
    both = evaluate(ckpt, tiny_tokenizer_ckpt, ["Pong", "Phoenix"], cfg, out=out)
    assert both["reused"] == ["Pong"] and both["games"]["Pong"] == first["games"]["Pong"]
    assert sorted(json.loads(out.read_text())["games"]) == ["Phoenix", "Pong"]
    other = evaluate(ckpt, tiny_tokenizer_ckpt, ["Pong"], EvalConfig(episodes=1, planner="greedy", max_frames=12),
                     out=out)
    assert other["reused"] == [] and other["games"]["Pong"]["lengths"] == [3]
    foreign = tmp_path / "notes.json"
    foreign.write_text('{"my": "notes"}')
    with pytest.raises(ConfigError, match=r"notes\.json: exists and is not a jowa raw-score file"):
        evaluate(ckpt, tiny_tokenizer_ckpt, ["Pong"], cfg, out=foreign)
    assert json.loads(foreign.read_text()) == {"my": "notes"}


def test_config_errors(ckpt, tiny_tokenizer_ckpt):
    with pytest.raises(ConfigError, match="eval.planner"):
        EvalConfig(planner="randomly").validate()
    with pytest.raises(ConfigError, match="needs a checkpoint and its tokenizer"):
        evaluate(None, None, ["Pong"], EvalConfig(planner="greedy", max_frames=4))
    with pytest.raises(ConfigError, match="max_frames"):
        EvalConfig(max_frames=0).validate()
    with pytest.raises(ConfigError, match="no room for context"):
        evaluate(ckpt, tiny_tokenizer_ckpt, ["Pong"], EvalConfig(planner="beam", horizon=8, max_frames=4))


def test_cli_errors(ckpt, tiny_tokenizer_ckpt, tmp_path):
    base = ["eval", ckpt, "--tokenizer", tiny_tokenizer_ckpt, "--episodes", 1, "--max-frames", 4]
    r = jowa(*base, "--games", "Pong", "Pongg")
    assert r.exit_code == 1 and "unknown game 'Pongg'" in r.output
    r = jowa("eval", tmp_path / "nope.pt", "--tokenizer", tiny_tokenizer_ckpt, "--games", "Pong")
    assert r.exit_code == 1 and "nope.pt" in r.output
    bad = tmp_path / "bad.pt"
    bad.write_text("not a checkpoint")
    r = jowa("eval", bad, "--tokenizer", tiny_tokenizer_ckpt, "--games", "Pong")
    assert r.exit_code == 1 and "bad.pt" in r.output and "Traceback" not in r.output
    r = jowa("eval", tiny_tokenizer_ckpt, "--tokenizer", tiny_tokenizer_ckpt, "--games", "Pong", "--max-frames", 4)
    assert r.exit_code == 1 and "not a jowa world-action checkpoint" in r.output
    r = jowa(*base)
    assert r.exit_code == 2 and "--games" in r.output
    r = jowa(*base, "--games", "Pong", "--gif", tmp_path / "g", "--mp4", tmp_path / "m")
    assert r.exit_code == 2


def test_history_matches_a_step_by_step_reference(ckpt):
    """The batched evaluator's left-padded history (tokens + actions, newest last) gives the same decisions as
    planning on exactly the real last `history` steps, one env at a time."""
    from jowa_data.atari import AtariConfig, AtariEnv
    from jowa_model.checkpoint import load_world_action
    from pipelines.evaluate import play_game, set_action_mask_rows

    from jowa_model.tokenizer import Tokenizer, tokenizer_preset

    model, _ = load_world_action(ckpt)
    torch.manual_seed(0)  # an untrained convnet tokenizer: its tokens change with every Pong frame
    tok = Tokenizer(tokenizer_preset("tiny_conv")).eval()
    pong = load_manifests().get("Pong")
    set_action_mask_rows(model, [pong])
    cfg = EvalConfig(episodes=2, planner="greedy", history=3, epsilon=0.0, max_frames=60)
    res = play_game(model, tok, pong, cfg)

    planner = Planner(WorldModelImagination(model), PlannerConfig(kind="greedy"))
    mask, to_min = torch.from_numpy(pong.action_mask)[None], {int(f): i for i, f in enumerate(pong.full_action_ids)}

    def reference(hist: int) -> list[int]:
        env = AtariEnv(pong.ale_rom, AtariConfig(sticky=0.0, max_frames=60), seed=0, actions=pong.actions)
        frames, acts = [env.reset()], []
        for _ in range(15):
            t = tok.encode(torch.from_numpy(np.stack(frames[-hist:])))[None]  # (1, <=hist, 36): real steps only
            past = torch.tensor(acts[len(acts) - (t.shape[1] - 1):], dtype=torch.long)[None]
            a = int(planner.plan(t, past, torch.tensor([39]), mask))
            acts.append(a)
            frames.append(env.step(to_min[a])[0])
        return acts

    assert res.actions[0] == res.actions[1] == reference(3)
    assert len(set(res.actions[0])) > 1 and reference(1) != reference(3)  # the history matters to this model


def test_random_and_heuristic_baselines_need_no_model(tmp_path):
    """`--planner random|heuristic`: the same protocol without a model; H and K are not recorded or shown."""
    out = tmp_path / "rnd.json"
    r = jowa("eval", "--planner", "random", "--games", "Breakout", "--episodes", 3, "--max-frames", 400,
             "--out", out)
    assert r.exit_code == 0, r.output
    doc = json.loads(out.read_text())
    g = doc["games"]["Breakout"]
    assert doc["checkpoint"] is None and doc["model_free"] == "random"
    assert g["settings"]["planner"] == "random" and "horizon" not in g["settings"] and "history" not in g["settings"]
    assert len(g["returns"]) == 3 and all(f <= 400 for f in g["frames"])
    assert all(0 <= c <= r for c, r in zip(g["clipped_returns"], g["returns"]))  # Breakout rewards are 1, 4 or 7
    assert g["std"] == pytest.approx(np.std(g["returns"], ddof=1))  # sample std
    assert "Breakout" in r.output and "random" in r.output
    # same seed, same episodes; the rerun keeps them
    r2 = jowa("eval", "--planner", "random", "--games", "Breakout", "--episodes", 3, "--max-frames", 400,
              "--out", out, "--json")
    assert json.loads(r2.stdout)["reused"] == ["Breakout"]
    h = evaluate(None, None, ["Freeway"], EvalConfig(planner="heuristic", episodes=2, max_frames=2000))
    f = h["games"]["Freeway"]
    assert f["returns"][0] >= 1 and f["clipped_returns"] == f["returns"]  # the runner crosses the road
    assert f["action_counts"] == {"NOOP": 0, "UP": sum(f["lengths"]), "DOWN": 0}  # it only ever presses UP
    from rich.console import Console

    from pipelines.cli_eval import results_table

    con = Console(file=io.StringIO(), width=200)
    con.print(results_table(h))
    assert "UP 100%" in con.file.getvalue()  # the table names a constant policy
    r = jowa("eval", "--planner", "greedy", "--games", "Pong")
    assert r.exit_code == 2 and "CHECKPOINT and --tokenizer" in r.output


@pytest.mark.multiproc
def test_kill_while_the_score_file_is_written_then_rerun(tmp_path):
    """SIGKILL while the second game's raw-score file is a complete temp file (not yet renamed): the file on disk
    still holds the first game; the rerun keeps it, plays the second, removes the temp file, and equals a clean run."""
    import os
    import signal
    import subprocess
    import sys

    args = ["eval", "--planner", "random", "--games", "Breakout", "Freeway", "--episodes", "2", "--max-frames",
            "300"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = tmp_path / "rnd.json"
    r = run_killed(r"/\.rnd\.json\.[^/]+\.tmp$", 2, "pipelines.cli", [*args, "--out", out])
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    temps = list(tmp_path.glob(".rnd.json.*.tmp"))
    assert len(temps) == 1 and list(json.loads(out.read_text())["games"]) == ["Breakout"]
    r = subprocess.run([sys.executable, "-m", "pipelines.cli", *args, "--out", str(out), "--json"],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout)["reused"] == ["Breakout"] and not temps[0].exists()
    clean = jowa("eval", *args[1:], "--out", tmp_path / "clean.json")
    assert clean.exit_code == 0, clean.output
    a, b = json.loads(out.read_text())["games"], json.loads((tmp_path / "clean.json").read_text())["games"]
    assert list(a) == list(b) == ["Breakout", "Freeway"]
    for g in a:
        assert [a[g][k] for k in ("returns", "clipped_returns", "frames")] == \
            [b[g][k] for k in ("returns", "clipped_returns", "frames")]
