"""Planner tests on a hand-built world model whose transitions, rewards, terminations and Q are known.

`TableWorld` is a tabular MDP behind the `ImaginationModel` protocol: the state id is written in the frame's
tokens, so every imagined step and every Eq. 11 score can be computed by hand.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from jowa_common.errors import ConfigError
from jowa_model.planner import (
    Imagined, Planner, PlannerConfig, beam_search, greedy_actions, mcts_search,
)

G = 0.99
VALID = [0, 1, 3]  # full action ids valid in our toy game
BIG = 100.0  # Q of invalid actions: must never be chosen nor count in max Q


def _q(*vals: float) -> torch.Tensor:
    q = torch.full((18,), BIG)
    q[VALID] = torch.tensor(vals)
    return q


def toy_tables(terminal_wins: bool = False):
    """Root 0: greedy takes action 0 (Q 1.0), but action 1 leads to state 2 whose action 0 pays +1.

    States: 1 and 5 are dull, 4 is after the reward, 3 follows action 3 from the root.
    With `terminal_wins`, action 3 from the root pays +1 and terminates; state 3 has a huge Q that must NOT
    be bootstrapped, and the +1 reward from state 2 is removed so that the terminal path is the best one.
    """
    s = 8
    nxt = torch.zeros(s, 18, dtype=torch.long)
    rew = torch.zeros(s, 18)
    done = torch.zeros(s, 18, dtype=torch.bool)
    q = torch.zeros(s, 18)
    nxt[0, 0], nxt[0, 1], nxt[0, 3] = 1, 2, 3
    q[0] = _q(1.0, 0.9, 0.5)
    nxt[1] = 5
    q[1] = _q(0.8, 0.7, 0.1)
    nxt[2] = 5
    nxt[2, 0] = 4
    rew[2, 0] = 0.0 if terminal_wins else 1.0
    q[2] = _q(0.6, 0.5, 0.4)
    nxt[3] = 3
    q[3] = _q(50.0, 0.0, 0.0) if terminal_wins else _q(0.3, 0.2, 0.1)
    if terminal_wins:
        rew[0, 3], done[0, 3] = 1.0, True
    nxt[4] = 5
    q[4] = _q(0.5, 0.4, 0.3)
    nxt[5] = 5
    q[5] = _q(0.2, 0.1, 0.0)
    nxt[6] = 7
    rew[6, 1] = -1.0
    q[6] = _q(0.1, 0.3, 0.2)
    nxt[7] = 7
    q[7] = _q(0.0, 0.0, 0.0)
    return nxt, rew, done, q


@dataclass
class _State:
    s: torch.Tensor | None  # (B,) state ids (cached path)
    hist: torch.Tensor | None  # (B, L) full token history (recompute path)


class TableWorld:
    """Tabular world model. `recompute=True` keeps the whole token history and re-derives the state from it at
    every step (the uncached path); otherwise it carries the state id (the cached path)."""

    max_steps = 8

    def __init__(self, tables, recompute: bool = False) -> None:
        self.nxt, self.rew, self.done, self.q = tables
        self.recompute = recompute
        self.calls: list[int] = []
        self.context_steps: list[int] = []

    def start(self, obs_tokens, actions, task_ids):
        n, t, _ = obs_tokens.shape
        assert actions.shape == (n, t - 1) and task_ids.shape == (n,)
        self.context_steps.append(t)
        s = obs_tokens[:, -1, 0]
        if self.recompute:
            blocks = torch.cat([obs_tokens[:, :-1], actions[..., None]], 2).reshape(n, -1)
            return _State(None, torch.cat([blocks, obs_tokens[:, -1]], 1)), self.q[s]
        return _State(s.clone(), None), self.q[s]

    def _s(self, st: _State) -> torch.Tensor:
        return st.hist[:, -36] if self.recompute else st.s

    def step(self, st: _State, actions):
        self.calls.append(int(actions.numel()))
        s = self._s(st)
        ns = self.nxt[s, actions]
        obs = ns[:, None].expand(-1, 36).clone()
        out = Imagined(self.rew[s, actions], self.done[s, actions], obs, self.q[ns])
        if self.recompute:
            return _State(None, torch.cat([st.hist, actions[:, None], obs], 1)), out
        return _State(ns, None), out

    def select(self, st: _State, index):
        return _State(None, st.hist[index]) if self.recompute else _State(st.s[index], None)


def _mask(n: int = 1) -> torch.Tensor:
    m = torch.zeros(n, 18, dtype=torch.bool)
    m[:, VALID] = True
    return m


def _ctx(states: list[int], t: int = 8):
    """Context whose current frame shows `states[i]`; earlier frames and actions are arbitrary."""
    n = len(states)
    obs = torch.randint(0, 8, (n, t, 36), generator=torch.Generator().manual_seed(0))
    obs[:, -1] = torch.tensor(states)[:, None]
    return obs, torch.zeros(n, t - 1, dtype=torch.long), torch.zeros(n, dtype=torch.long)


def _search(world, states, h, k, n=None):
    obs, act, task = _ctx(states)
    st, q = world.start(obs, act, task)
    return beam_search(world, st, q, _mask(len(states)), h, k, G)


# --------------------------------------------------------------------------- beam search

def test_beam_finds_better_first_action_than_greedy():
    world = TableWorld(toy_tables())
    obs, act, task = _ctx([0])
    greedy = Planner(world, PlannerConfig(kind="greedy")).plan(obs, act, task, _mask())
    assert greedy.tolist() == [0]
    res = _search(world, [0], h=2, k=2)
    assert res.actions.tolist() == [1]
    assert res.paths.tolist() == [[1, 0]]
    # Eq. 11 by hand: r0 + γ r1 + γ² max Q(s2) = 0 + 0.99*1 + 0.99²*0.5
    assert res.scores.item() == pytest.approx(G * 1 + G**2 * 0.5, abs=1e-6)
    assert Planner(world, PlannerConfig(kind="beam", horizon=2, beam_width=2)).plan(obs, act, task, _mask()).tolist() == [1]


def test_all_children_of_a_depth_are_one_batch():
    world = TableWorld(toy_tables())
    assert _search(world, [0], h=2, k=2).model_calls == [2, 4]
    assert _search(world, [0], h=2, k=3).model_calls == [3, 9]
    assert _search(world, [0, 6], h=3, k=2).model_calls == [4, 8, 8]
    assert _search(world, [0], h=2, k=5).model_calls == [3, 9]  # only 3 valid actions
    assert world.calls == [2, 4, 3, 9, 4, 8, 8, 3, 9]


@pytest.mark.parametrize("h,k", [(0, 1), (0, 3), (1, 1), (2, 1), (3, 1), (4, 1)])
def test_k1_or_h0_is_greedy(h, k):
    for root in range(8):
        world = TableWorld(toy_tables())
        obs, act, task = _ctx([root])
        st, q = world.start(obs, act, task)
        greedy = greedy_actions(q, _mask())
        res = beam_search(world, st, q, _mask(), h, k, G)
        assert res.actions.tolist() == greedy.tolist()
        assert Planner(world, PlannerConfig(kind="beam", horizon=h, beam_width=k)).plan(obs, act, task, _mask()).tolist() == greedy.tolist()


def test_invalid_actions_are_never_chosen_nor_bootstrapped():
    world = TableWorld(toy_tables())
    res = _search(world, [0], h=1, k=3)
    assert res.actions.tolist() == [0]  # invalid actions have Q = 100
    assert res.scores.item() == pytest.approx(G * 0.8, abs=1e-6)  # not γ*100
    assert set(res.paths.flatten().tolist()) <= set(VALID)


def test_predicted_terminal_is_absorbing():
    world = TableWorld(toy_tables(terminal_wins=True))
    res = _search(world, [0], h=2, k=3)
    # Path [3] pays +1 and terminates: score exactly 1, no γ*Q(s=3)=γ*50 bootstrap, not expanded further.
    assert res.actions.tolist() == [3]
    assert res.paths.tolist() == [[3, -1]]
    assert res.scores.item() == pytest.approx(1.0, abs=1e-6)
    # Depth 1 alone: the terminal child scores 1.0 < γ*0.8? No: 1.0 > 0.792, so it wins already.
    res1 = _search(world, [0], h=1, k=3)
    assert res1.actions.tolist() == [3] and res1.scores.item() == pytest.approx(1.0, abs=1e-6)


def test_terminal_path_competes_on_fixed_score():
    tables = toy_tables(terminal_wins=True)
    tables[1][2, 0] = 1.0  # restore the +1 behind action 1: 0.99 + 0.99²*0.5 = 1.480 beats the terminal 1.0
    res = _search(TableWorld(tables), [0], h=2, k=3)
    assert res.actions.tolist() == [1]
    assert res.scores.item() == pytest.approx(G + G**2 * 0.5, abs=1e-6)


def test_batched_envs_equal_one_by_one():
    roots = [0, 6, 2, 1, 0]
    batched = _search(TableWorld(toy_tables()), roots, h=3, k=2)
    for i, r in enumerate(roots):
        one = _search(TableWorld(toy_tables()), [r], h=3, k=2)
        assert batched.actions[i] == one.actions[0]
        assert batched.scores[i] == pytest.approx(one.scores[0].item(), abs=1e-6)
        assert batched.paths[i].tolist() == one.paths[0].tolist()


@pytest.mark.parametrize("kind,h,k", [("beam", 2, 2), ("beam", 3, 3), ("mcts", 3, 2), ("greedy", 0, 1)])
def test_cached_and_recompute_paths_agree(kind, h, k):
    roots = [0, 6, 2]
    obs, act, task = _ctx(roots)
    cfg = PlannerConfig(kind=kind, horizon=h, beam_width=k, num_simulations=12)
    a = Planner(TableWorld(toy_tables()), cfg).plan(obs, act, task, _mask(3))
    b = Planner(TableWorld(toy_tables(), recompute=True), cfg).plan(obs, act, task, _mask(3))
    assert a.tolist() == b.tolist()
    if kind == "beam":
        ra = _search(TableWorld(toy_tables()), roots, h, k)
        rb = _search(TableWorld(toy_tables(), recompute=True), roots, h, k)
        assert torch.equal(ra.scores, rb.scores) and torch.equal(ra.paths, rb.paths)


# --------------------------------------------------------------------------- plan() API

def test_context_is_cut_to_fit_imagined_steps_and_lengths_group():
    world = TableWorld(toy_tables())
    planner = Planner(world, PlannerConfig(kind="beam", horizon=2, beam_width=2))
    obs, act, task = _ctx([0, 0, 6], t=8)
    out = planner.plan(obs, act, task, _mask(3), lengths=torch.tensor([8, 3, 1]))
    assert out.tolist() == [1, 1, 3]  # state 6: greedy's action 1 (Q 0.3) costs r=-1; action 3 does not
    assert sorted(world.context_steps) == [1, 3, 6]  # 8 -> 8-H = 6; one start per history length
    world.context_steps.clear()
    Planner(world, PlannerConfig(kind="greedy")).plan(obs, act, task, _mask(3))
    assert world.context_steps == [8]


def test_bad_config_raises_config_error():
    with pytest.raises(ConfigError, match="planner.kind"):
        Planner(TableWorld(toy_tables()), PlannerConfig(kind="astar"))  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="planner.horizon"):
        Planner(TableWorld(toy_tables()), PlannerConfig(kind="beam", horizon=8))
    with pytest.raises(ConfigError, match="planner.beam_width"):
        Planner(TableWorld(toy_tables()), PlannerConfig(beam_width=0))


# --------------------------------------------------------------------------- MCTS

def _mcts(world, root, **kw):
    obs, act, task = _ctx([root])
    st, q = world.start(obs, act, task)
    return mcts_search(world, st, q[0], _mask()[0], PlannerConfig(kind="mcts", **kw))


def test_mcts_depth_cap_one_values_are_one_step_lookahead():
    world = TableWorld(toy_tables())
    res = _mcts(world, 0, horizon=2, num_simulations=20)
    # depth cap 1: root children only; value = r + γ max Q(child) = γ*0.8, γ*0.6, γ*0.3
    assert res.root_values[VALID].tolist() == pytest.approx([G * 0.8, G * 0.6, G * 0.3], abs=1e-6)
    assert res.action == 0
    assert int(res.root_visits.sum()) == 20
    assert res.model_calls == [3]  # all root children imagined once, in one batch, then memoised


def test_mcts_deeper_tree_finds_the_reward():
    world = TableWorld(toy_tables())
    res = _mcts(world, 0, horizon=3, num_simulations=40)
    assert res.action == 1
    assert res.root_values[1].item() > res.root_values[0].item()


def test_mcts_lazy_and_batched_expansion_build_the_same_tree():
    a = _mcts(TableWorld(toy_tables()), 0, horizon=4, num_simulations=30, mcts_expand_all=True)
    b = _mcts(TableWorld(toy_tables()), 0, horizon=4, num_simulations=30, mcts_expand_all=False)
    assert a.action == b.action
    assert torch.equal(a.root_visits, b.root_visits)
    assert torch.allclose(a.root_values, b.root_values)
    assert all(c == 1 for c in b.model_calls)
    assert len(a.model_calls) < len(b.model_calls)


def test_mcts_terminal_leaf_has_no_bootstrap():
    res = _mcts(TableWorld(toy_tables(terminal_wins=True)), 0, horizon=3, num_simulations=30)
    assert res.root_values[3].item() == pytest.approx(1.0, abs=1e-6)  # r=+1, then absorbing (not 1+γ*50)
    assert res.action == 3


def test_mcts_zero_simulations_is_greedy_and_count_mode():
    assert _mcts(TableWorld(toy_tables()), 0, horizon=2, num_simulations=0).action == 0
    res = _mcts(TableWorld(toy_tables()), 0, horizon=2, num_simulations=20, mcts_final="count")
    assert res.action == int(res.root_visits.argmax())


# --------------------------------------------------------------------------- real model adapter

def _tiny_model(never_done: bool):
    from jowa_model.presets import model_preset
    from jowa_model.world_action import WorldActionModel

    torch.manual_seed(0)
    m = WorldActionModel(model_preset("tiny"))
    if never_done:  # random heads predict `done` often; this exercises deeper non-terminal paths too
        with torch.no_grad():
            m.head_end[-1].bias.copy_(torch.tensor([5.0, -5.0]))
    return m


def _real_ctx(n: int = 3, t: int = 8):
    g = torch.Generator().manual_seed(1)
    obs = torch.randint(0, 2048, (n, t, 36), generator=g)
    act = torch.randint(0, 18, (n, t - 1), generator=g)
    mask = torch.zeros(n, 18, dtype=torch.bool)
    mask[:, :6] = True
    mask[1, :] = True
    return obs, act, torch.tensor([0, 13, 37])[:n], mask


@pytest.mark.parametrize("never_done", [False, True])
def test_real_model_cached_and_recompute_agree(never_done):
    from jowa_model.planner import RecomputeImagination, WorldModelImagination

    m = _tiny_model(never_done)
    cached, ref = WorldModelImagination(m), RecomputeImagination(m)
    obs, act, task, mask = _real_ctx()
    # one imagined step: identical tokens/rewards/dones, same Q
    (sa, qa), (sb, qb) = cached.start(obs[:, 2:], act[:, 2:], task), ref.start(obs[:, 2:], act[:, 2:], task)
    torch.testing.assert_close(qa, qb, rtol=1e-5, atol=1e-5)
    idx, acts = torch.tensor([0, 0, 1, 2]), torch.tensor([0, 5, 17, 3])
    _, oa = cached.step(cached.select(sa, idx), acts)
    _, ob = ref.step(ref.select(sb, idx), acts)
    assert torch.equal(oa.obs_tokens, ob.obs_tokens) and torch.equal(oa.rewards, ob.rewards)
    assert torch.equal(oa.dones, ob.dones)
    torch.testing.assert_close(oa.q, ob.q, rtol=1e-5, atol=1e-5)
    # whole searches: same actions, paths and scores
    for h, k in [(2, 3), (3, 2)]:
        (sa, qa), (sb, qb) = cached.start(obs[:, -5:], act[:, -4:], task), ref.start(obs[:, -5:], act[:, -4:], task)
        ra = beam_search(cached, sa, qa, mask, h, k, G)
        rb = beam_search(ref, sb, qb, mask, h, k, G)
        assert torch.equal(ra.actions, rb.actions) and torch.equal(ra.paths, rb.paths)
        torch.testing.assert_close(ra.scores, rb.scores, rtol=1e-5, atol=1e-5)
        assert ra.model_calls == rb.model_calls
    for kind in ("greedy", "mcts"):
        cfg = PlannerConfig(kind=kind, horizon=2, num_simulations=6)
        assert torch.equal(Planner(cached, cfg).plan(obs, act, task, mask), Planner(ref, cfg).plan(obs, act, task, mask))


def test_real_model_start_matches_full_forward_and_respects_masks():
    from jowa_model.planner import WorldModelImagination

    m = _tiny_model(False)
    world = WorldModelImagination(m)
    obs, act, task, mask = _real_ctx()
    _, q = world.start(obs, act, task)
    with torch.no_grad():
        h = m(obs, torch.cat([act, torch.zeros(3, 1, dtype=torch.long)], 1), task)  # (B, L, 37, D)
        expect = m.q_values(h[:, -1, 35])
    torch.testing.assert_close(q, expect, rtol=1e-5, atol=1e-5)
    for cfg in (PlannerConfig(kind="beam", horizon=2, beam_width=4), PlannerConfig(kind="mcts", num_simulations=8)):
        out = Planner(world, cfg).plan(obs, act, task, mask)
        assert mask[torch.arange(3), out].all()


# --------------------------------------------------------------------------- `jowa bench plan`

def test_bench_plan_cli_json_and_errors():
    import json

    from click.testing import CliRunner

    from pipelines.cli import main

    r = CliRunner().invoke(main, ["bench", "plan", "--config", "tiny", "--reps", "1", "--warmup", "0",
                                  "--no-encode", "--threads", "1", "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    for k in ("greedy", "beam_k2", "beam_k3", "beam_k4", "mcts"):
        assert isinstance(res[k], float) and res[k] > 0
        assert res["ratio_to_greedy"][k] == pytest.approx(res[k] / res["greedy"])
    assert res["settings"]["valid_actions"] == 8 and res["settings"]["game"] == "Phoenix"
    bad = CliRunner().invoke(main, ["bench", "plan", "--config", "41M", "--json"])
    assert bad.exit_code == 1 and "unknown model preset '41M'" in bad.output
    bad = CliRunner().invoke(main, ["bench", "plan", "--config", "tiny", "--game", "NoSuchGame"])
    assert bad.exit_code == 1 and "NoSuchGame" in bad.output
