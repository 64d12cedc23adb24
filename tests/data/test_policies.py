"""Behaviour policies: heuristic controllers on the real emulator, the decaying epsilon schedule, spec parsing."""

from __future__ import annotations

import numpy as np
import pytest

from jowa_data.atari import AtariConfig, AtariEnv
from jowa_common.errors import ConfigError
from jowa_data.manifest import load_manifests
from jowa_data.policies import CONTROLLERS, EpsilonSchedule, make_policy, random_policy
from jowa_data.record import record


def play(rom: str, spec: str, steps: int, seed: int = 0, sticky: float = 0.0) -> tuple[float, list[int]]:
    """Return and actions of `steps` agent steps of `spec` (one episode, no reset), sticky actions off."""
    env = AtariEnv(rom, AtariConfig(sticky=sticky), seed=seed)
    pol = make_policy(spec, env.num_actions, rom=rom, steps=steps)
    pol.bind(env) if hasattr(pol, "bind") else None
    rng = np.random.default_rng(seed)
    obs, total, acts = env.reset(), 0.0, []
    for _ in range(steps):
        a = pol(obs, rng, env.num_actions)
        acts.append(a)
        obs, r, term, _ = env.step(a)
        total += r
        if term:
            break
    return total, acts


# Returns of the controllers over their first steps (no sticky actions, no epsilon): far above random play.
# docs/behaviour_policies.md has the full-episode figures under the evaluation protocol.
@pytest.mark.parametrize("rom, steps, at_least, random_at_most", [
    ("breakout", 600, 10, 3),  # the tracker keeps the ball in play; random play loses its 5 balls in ~200 steps
    ("freeway", 600, 5, 0),  # running up crosses every ~110 steps; random play never crosses
    ("space_invaders", 600, 150, 150),
])
def test_controllers_beat_random_play(rom, steps, at_least, random_at_most):
    ret, acts = play(rom, "heuristic", steps)
    assert ret >= at_least
    rand = np.mean([play(rom, "random", steps, seed=s)[0] for s in range(3)])
    assert rand <= random_at_most < ret
    assert play(rom, "heuristic", steps) == (ret, acts)  # deterministic


def test_controllers_are_deterministic_for_a_seed_under_epsilon():
    a = play("breakout", "epsilon:0.3:heuristic", 400, seed=5)
    b = play("breakout", "epsilon:0.3:heuristic", 400, seed=5)
    c = play("breakout", "epsilon:0.3:heuristic", 400, seed=6)
    assert a == b and a[1] != c[1]


def test_epsilon_schedule_decays_linearly_and_mixes_actions():
    inner_calls = []

    def inner(obs, rng, n):
        inner_calls.append(1)
        return 0

    s = EpsilonSchedule(1.0, 0.0, 100, inner)
    assert [s.epsilon(t) for t in (0, 50, 100, 1000)] == [1.0, 0.5, 0.0, 0.0]
    rng = np.random.default_rng(0)
    acts = [s(None, rng, 4) for _ in range(300)]
    # first 100 steps mostly random, last 200 all inner (epsilon 0)
    assert sum(a != 0 for a in acts[:50]) > 25 and all(a == 0 for a in acts[100:])
    assert 200 <= len(inner_calls) < 260
    s2 = EpsilonSchedule(1.0, 0.0, 100, inner)
    rng2 = np.random.default_rng(0)
    assert [s2(None, rng2, 4) for _ in range(300)] == acts  # same seed, same actions


def test_spec_parsing():
    p = make_policy("epsilon:1.0-0.05:heuristic", 4, rom="breakout", steps=1000)
    assert isinstance(p, EpsilonSchedule) and (p.start, p.end, p.steps) == (1.0, 0.05, 1000)
    assert isinstance(p.inner, CONTROLLERS["breakout"])
    p = make_policy("epsilon:0.8-0.1@50:random", 4, steps=1000)
    assert (p.start, p.end, p.steps) == (0.8, 0.1, 50) and p.inner is random_policy
    assert make_policy("epsilon:0.2", 4).epsilon(10**6) == 0.2
    with pytest.raises(ConfigError, match="no heuristic controller for ROM 'pitfall'"):
        make_policy("heuristic", 18, rom="pitfall")
    with pytest.raises(ConfigError, match="needs the number of steps"):
        make_policy("epsilon:1-0", 4)
    with pytest.raises(ConfigError, match=r"epsilon must be in \[0, 1\], got 1.5"):
        make_policy("epsilon:1.5-0", 4, steps=10)
    with pytest.raises(ConfigError, match="reads the emulator's RAM: bind it"):
        make_policy("heuristic", 4, rom="breakout")(np.zeros((84, 84), np.uint8), np.random.default_rng(0), 4)
    with pytest.raises(ConfigError, match="plays ROM 'breakout', not 'pong'"):
        make_policy("heuristic", 4, rom="breakout").bind(AtariEnv("pong", AtariConfig(sticky=0.0)))


def test_recording_with_a_decaying_epsilon_mixes_bad_and_good_play(tmp_path):
    """DQN-Replay-shaped data: early episodes near random, late episodes (epsilon 0 after step 3000) the controller."""
    m = load_manifests().get("Freeway")
    r = record(m, tmp_path, "1", 6000, policy="epsilon:1.0-0.0@3000:heuristic", seed=0, capacity=2000,
               max_episode_steps=1000, keep_frames=False, progress=False, compresslevel=1)
    ups = r.actions == m.actions.index("UP")
    first, last = ups[:1000].mean(), ups[-1000:].mean()
    assert first < 0.5 and last == 1.0
    rets = [float(r.rewards[sl].sum()) for sl in r.episode_slices()]
    assert rets[0] < rets[-1] and len(rets) == 6
    again = record(m, tmp_path / "again", "1", 6000, policy="epsilon:1.0-0.0@3000:heuristic", seed=0, capacity=2000,
                   max_episode_steps=1000, keep_frames=False, progress=False, compresslevel=1)
    np.testing.assert_array_equal(r.actions, again.actions)
