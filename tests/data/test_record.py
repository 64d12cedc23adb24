"""Recorder: real ALE play → exact DQN-Replay files; preprocessing, policies, determinism, CLI."""

import gzip
import io

import numpy as np
import pytest
from click.testing import CliRunner

from jowa_data import replay_writer as W
from jowa_data.atari import AtariConfig, AtariEnv
from jowa_data.cli import main as cli
from jowa_common.errors import ConfigError, ManifestError
from jowa_data.manifest import load_manifests, parse_manifest
from jowa_data.policies import make_policy
from jowa_data.record import record


def load(d, name, suffix):
    with gzip.open(d / W.ckpt_filename(name, suffix), "rb") as f:
        return np.load(io.BytesIO(f.read()), allow_pickle=False)


# Policies used through `module:function` below.
def always_fire(obs, rng, num_actions):
    return 1


def cycle_factory(num_actions):
    state = {"t": -1}

    def act(obs, rng, n):
        state["t"] += 1
        return state["t"] % num_actions

    return act


@pytest.fixture(scope="module")
def reg():
    return load_manifests()


# --- the session fixture: what downstream tests rely on ------------------------------------------

@pytest.mark.parametrize("game", ["Pong", "Phoenix"])
def test_fixture_files_hold_exactly_what_was_played(recorded_replay, game):
    r = recorded_replay[game]
    d = recorded_replay.root / game / recorded_replay.run / "replay_logs"
    assert d == r.replay_dir
    suffixes = [c.suffix for c in r.checkpoints]
    assert suffixes == [0, 1, 2] and r.checkpoints[-1].final
    assert sorted(p.name for p in d.iterdir()) == sorted(W.ckpt_filename(n, s) for n in W.FILE_NAMES for s in suffixes)
    cap = recorded_replay.capacity
    for c in r.checkpoints:
        obs = load(d, "$store$_observation", c.suffix)
        act, rew, term = (load(d, f"$store$_{k}", c.suffix) for k in ("action", "reward", "terminal"))
        assert obs.shape == (cap, 84, 84) and obs.dtype == np.uint8
        assert act.dtype == np.int32 and rew.dtype == np.float32 and term.dtype == np.uint8
        n = int(load(d, "add_count", c.suffix))
        assert n == c.add_count
        slots = np.arange(c.first_add, c.stop_add) % cap  # where the adds this suffix yields live
        steps = r.add_steps[c.first_add:c.stop_add]
        real = steps >= 0
        np.testing.assert_array_equal(obs[slots[real]], r.frames[steps[real]])
        np.testing.assert_array_equal(act[slots[real]], r.actions[steps[real]])
        np.testing.assert_array_equal(rew[slots[real]], r.rewards[steps[real]])
        np.testing.assert_array_equal(term[slots[real]], r.terminals[steps[real]])
        assert not obs[slots[~real]].any() and not act[slots[~real]].any() and not term[slots[~real]].any()
    # padding: 3 rows before every episode's first step, including the very first one
    first_adds = np.flatnonzero(np.isin(r.add_steps, r.episode_starts))
    for a in first_adds:
        assert (r.add_steps[a - 3:a] == -1).all()
    assert r.add_steps[:4].tolist() == [-1, -1, -1, 0]
    assert (r.add_steps == -1).sum() == 3 * r.num_episodes
    # episodes cross file boundaries, clipped rewards, the cut last episode
    crossing = [b for b in (c.stop_add for c in r.checkpoints[:-1])  # last row of a file, first of the next
                if r.add_steps[b - 1] >= 0 and r.add_steps[b] == r.add_steps[b - 1] + 1]
    assert crossing and all(r.terminals[r.add_steps[b - 1]] == 0 for b in crossing)
    assert set(np.unique(r.rewards)) <= {-1.0, 0.0, 1.0}
    np.testing.assert_array_equal(r.rewards, np.clip(r.raw_rewards, -1, 1))
    ends = np.flatnonzero(r.terminals)
    np.testing.assert_array_equal(ends + 1, np.r_[r.episode_starts[1:]])
    assert r.episode_lengths.sum() == r.steps and r.episode_lengths.max() <= recorded_replay.max_episode_steps
    # what a reader returns: every played step, split at terminals (the final log's slot cap-1 included)
    eps = r.expected_episodes()
    assert r.fully_logged() and [len(e) for e in eps] == r.episode_lengths.tolist()
    final, prev = r.checkpoints[-1], r.checkpoints[-2]
    assert final.first_add == prev.stop_add == prev.add_count and final.stop_add == len(r.add_steps)
    last_slot = load(d, "$store$_observation", final.suffix)[cap - 1]
    np.testing.assert_array_equal(last_slot, r.frames[r.add_steps[prev.stop_add]])
    assert r.terminals[eps[-1][-1]] == 0 and all(r.terminals[e[-1]] == 1 for e in eps[:-1])


def test_fixture_games_differ_and_frames_are_real(recorded_replay):
    pong, phoenix = recorded_replay["Pong"], recorded_replay["Phoenix"]
    assert pong.frames.std() > 5 and phoenix.frames.std() > 5
    assert not np.array_equal(pong.frames[:50], phoenix.frames[:50])
    assert phoenix.actions.max() == 7 and pong.actions.max() == 5  # 8 and 6 minimal actions


def test_bowling_from_a_manifest_folder_records_without_code_change(tmp_path, bowling_manifest_dir):
    reg = load_manifests([bowling_manifest_dir])
    m = reg.get("Bowling")
    assert m.task_id == 11 and m.actions == ("NOOP", "FIRE", "UP", "DOWN", "UPFIRE", "DOWNFIRE")
    r = record(m, tmp_path, run=3, steps=120, seed=0, capacity=50, max_episode_steps=40, progress=False)
    assert r.actions.max() <= 5 and r.num_episodes == 3 and r.meta["task_id"] == 11
    assert (tmp_path / "Bowling" / "3" / "replay_logs" / "add_count_ckpt.0.gz").is_file()


def test_manifest_actions_must_match_ale_minimal_set(tmp_path):
    raw = {"name": "Pong", "ale_rom": "pong", "split": "other", "task_id": 39, "actions": ["NOOP", "FIRE"],
           "scores": {"random": 0.0, "human": 1.0, "dqn": 1.0}}
    with pytest.raises(ManifestError, match=r"bad/Pong.toml: key 'actions'.*minimal action set"):
        record(parse_manifest(raw, "bad/Pong.toml"), tmp_path, steps=2, progress=False)


# --- preprocessing ----------------------------------------------------------------------------------

def test_preprocessing_matches_gymnasium_atari_preprocessing():
    """Same emulator, sticky off: our frames equal gymnasium's AtariPreprocessing (an independent port)."""
    import ale_py
    import gymnasium as gym
    from gymnasium.wrappers import AtariPreprocessing

    gym.register_envs(ale_py)
    ref = AtariPreprocessing(gym.make("ALE/Pong-v5", frameskip=1, repeat_action_probability=0.0),
                             noop_max=0, frame_skip=4, screen_size=84, grayscale_obs=True)
    ours = AtariEnv("pong", AtariConfig(sticky=0.0), seed=0)
    o_ref, _ = ref.reset(seed=0)
    np.testing.assert_array_equal(ours.reset(), o_ref)
    rng = np.random.default_rng(0)
    total = 0.0
    for _ in range(200):
        a = int(rng.integers(ours.num_actions))
        o, r, term, trunc = ours.step(a)
        o_ref, r_ref, term_ref, _, _ = ref.step(a)
        np.testing.assert_array_equal(o, o_ref)
        assert (r, term) == (r_ref, term_ref)
        total += abs(r)
    assert total > 0  # points were scored, so rewards were compared for real
    ref.close()


def test_carnival_screen_is_214_rows_and_rgb_render():
    env = AtariEnv("carnival", seed=0)
    assert env.screen_shape == (214, 160)
    assert env.reset().shape == (84, 84)
    assert env.render_rgb().shape == (214, 160, 3)
    assert env.lives() >= 0


def test_truncation_at_max_frames_and_sticky_is_seeded():
    env = AtariEnv("pong", AtariConfig(max_frames=40), seed=0)
    env.reset()
    out = [env.step(0) for _ in range(10)]
    assert [o[3] for o in out] == [False] * 9 + [True] and env.episode_frames == 40
    with pytest.raises(ConfigError, match="sticky"):
        AtariEnv("pong", AtariConfig(sticky=1.5))
    with pytest.raises(ConfigError, match="ROM 'nope'"):
        AtariEnv("nope")


# --- determinism ------------------------------------------------------------------------------------

def test_same_seed_same_bytes_other_seed_other_play(tmp_path, reg):
    kw = dict(steps=200, capacity=64, max_episode_steps=70, progress=False)
    a = record(reg.get("Pong"), tmp_path / "a", seed=5, **kw)
    b = record(reg.get("Pong"), tmp_path / "b", seed=5, **kw)
    c = record(reg.get("Pong"), tmp_path / "c", seed=6, **kw)
    da, db = a.replay_dir, b.replay_dir
    names = sorted(p.name for p in da.iterdir())
    assert len(names) == 6 * len(a.checkpoints) >= 12
    for n in names:
        assert (da / n).read_bytes() == (db / n).read_bytes(), n
    np.testing.assert_array_equal(a.frames, b.frames)
    assert not np.array_equal(a.actions, c.actions)


# --- policies ---------------------------------------------------------------------------------------

def test_policies(tmp_path, reg):
    pong = reg.get("Pong")
    kw = dict(steps=30, capacity=64, progress=False)
    r = record(pong, tmp_path / "fire", policy="tests.data.test_record:always_fire", **kw)
    assert (r.actions == 1).all() and r.policy == "tests.data.test_record:always_fire"
    r = record(pong, tmp_path / "cyc", policy="tests.data.test_record:cycle_factory", **kw)
    np.testing.assert_array_equal(r.actions, np.arange(30) % 6)
    r = record(pong, tmp_path / "noop", policy="epsilon:0.0", **kw)
    assert (r.actions == 0).all()
    r = record(pong, tmp_path / "eps", policy="epsilon:0.5:tests.data.test_record:always_fire", **kw)
    assert 0 < (r.actions != 1).sum() < 30 and set(r.actions.tolist()) - {1}
    r2 = record(pong, tmp_path / "eps2", policy="epsilon:0.5:tests.data.test_record:always_fire", **kw)
    np.testing.assert_array_equal(r.actions, r2.actions)
    f = tmp_path / "my_policy.py"
    f.write_text("def act(obs, rng, n):\n    return 2 if obs.mean() > 0 else 3\n")
    r = record(pong, tmp_path / "file", policy=f"{f}:act", **kw)
    assert set(r.actions.tolist()) <= {2, 3} and (r.actions == 2).all()  # Pong frames are never black
    r = record(pong, tmp_path / "callable", policy=lambda o, g, n: n - 1, **kw)
    assert (r.actions == 5).all()


@pytest.mark.parametrize("spec, msg", [
    ("greedy", "unknown policy 'greedy'"),
    ("epsilon:x", "epsilon must be a number"),
    ("epsilon:1.5", r"epsilon must be in \[0, 1\]"),
    ("no_such_mod_xyz:f", "cannot import module 'no_such_mod_xyz'"),
    ("tests.data.test_record:nope", "has no callable 'nope'"),
    ("/no/file.py:f", "file /no/file.py not found"),
])
def test_bad_policy_specs(spec, msg):
    with pytest.raises(ConfigError, match=msg):
        make_policy(spec, 6)


def test_policy_out_of_range_action(tmp_path, reg):
    with pytest.raises(ConfigError, match="returned action 6"):
        record(reg.get("Pong"), tmp_path, steps=3, policy=lambda o, g, n: 6, progress=False)


# --- CLI --------------------------------------------------------------------------------------------

def test_cli_record(tmp_path, bowling_manifest_dir):
    import json

    runner = CliRunner()
    res = runner.invoke(cli, ["record", "Pong", "--out", str(tmp_path), "--run", "2", "--steps", "150",
                              "--capacity", "64", "--max-episode-steps", "50", "--seed", "3", "--json", "--quiet"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["game"] == "Pong" and out["steps"] == 150 and out["episodes"] == 3 and out["checkpoints"] == [0, 1, 2]
    assert out["skipped_logs"] == 0 and out["task_id"] == 39 and out["frames_per_s"] > 0
    d = tmp_path / "Pong" / "2" / "replay_logs"
    assert sorted(p.name for p in d.iterdir()) == sorted(W.ckpt_filename(n, s) for n in W.FILE_NAMES for s in range(3))

    res = runner.invoke(cli, ["record", "Pong", "--out", str(tmp_path), "--run", "2", "--steps", "5"])
    assert res.exit_code == 1 and "already holds" in res.output and "--overwrite" in res.output

    res = runner.invoke(cli, ["record", "Pongg", "--out", str(tmp_path), "--steps", "5"])
    assert res.exit_code == 1 and "unknown game 'Pongg'" in res.output and "Pong" in res.output
    assert "Traceback" not in res.output

    res = runner.invoke(cli, ["record", "Bowling", "--out", str(tmp_path), "--steps", "20", "--quiet",
                              "--manifests", str(bowling_manifest_dir), "--capacity", "16", "--compresslevel", "1"])
    assert res.exit_code == 0, res.output
    assert "Bowling run 1: 20 steps" in res.stdout
    bd = tmp_path / "Bowling" / "1" / "replay_logs"
    assert load(bd, "$store$_action", 1).shape == (16,) and int(load(bd, "add_count", 1)) == (20 + 3) % 16

    res = runner.invoke(cli, ["record", "Pong", "--out", str(tmp_path / "x"), "--steps", "5", "--policy", "bogus"])
    assert res.exit_code == 1 and "unknown policy 'bogus'" in res.output


def test_sticky_actions_follow_the_ale_seed():
    def play(seed, sticky):
        env = AtariEnv("pong", AtariConfig(sticky=sticky), seed=seed)
        frames = [env.reset()]
        for t in range(60):
            frames.append(env.step(2 + t % 2)[0])  # RIGHT/LEFT alternating: every step may stick
        return np.stack(frames)

    a, b, c = play(1, 0.25), play(1, 0.25), play(2, 0.25)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)  # repeated actions differ with the seed
    np.testing.assert_array_equal(play(1, 0.0), play(2, 0.0))  # no stickiness: the seed does not matter
