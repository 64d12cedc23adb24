"""Inference paths of the world-action model agree with the plain full forward: the single-token
`decode_step`, the last-query-only prefix (`forward_cached(last_only=True)`), the cache-free greedy critic
(`backbone_last`, `WorldModelImagination.root_q`), in fp32 and under bf16 autocast, with and without the CPU
kernels of jowa_model/cpu_kernels.py (`kernels`: whose own tests are in test_cpu_kernels.py)."""

from __future__ import annotations


import pytest
import torch

from jowa_model import cpu_kernels
from jowa_model.planner import Planner, PlannerConfig, RecomputeImagination, WorldModelImagination
from tests.fixtures_model import tiny_model, token_sequence

torch.set_num_threads(1)


def model(kernels: bool, **overrides):
    m = tiny_model(**overrides)
    return cpu_kernels.apply(m) if kernels else m


@pytest.mark.parametrize("kernels", [False, True])
@pytest.mark.parametrize("use_task_embed,B", [(True, 3), (False, 3), (True, 1), (True, 2)])
def test_decode_step_equals_full_forward_across_token_kinds(use_task_embed, B, kernels):
    """One row, a few rows, with and without task embeddings."""
    m = model(kernels, use_task_embed=use_task_embed)
    task = torch.tensor([3, 6, 13])[:B]
    seq = token_sequence(B, 3)
    full = m.backbone(seq, task)  # (B, 111, D)
    cache = m.init_cache(B)
    m.forward_cached(seq[:, :30], task, cache)
    outs = [m.decode_step(seq[:, p], task, cache) for p in range(30, 111)]  # crosses two action positions
    assert cache.length == 111
    torch.testing.assert_close(torch.stack(outs, 1), full[:, 30:], atol=1e-5, rtol=1e-5)


def test_decode_step_full_cache_is_an_error():
    m = tiny_model()
    cache = m.init_cache(1, max_tokens=2)
    m.decode_step(torch.tensor([1]), torch.tensor([0]), cache)
    m.decode_step(torch.tensor([1]), torch.tensor([0]), cache)
    with pytest.raises(ValueError, match="KV cache full"):
        m.decode_step(torch.tensor([1]), torch.tensor([0]), cache)


@pytest.mark.parametrize("kernels", [False, True])
@pytest.mark.parametrize("start", [0, 37])
def test_last_only_prefix_fills_the_same_cache(start, kernels):
    m = model(kernels)
    task = torch.tensor([1, 2])
    seq = token_sequence(2, 4)[:, :147]
    ref_cache, fast = m.init_cache(2), m.init_cache(2)
    if start:
        m.forward_cached(seq[:, :start], task, ref_cache)
        m.forward_cached(seq[:, :start], task, fast)
    ref = m.forward_cached(seq[:, start:], task, ref_cache)
    last = m.forward_cached(seq[:, start:], task, fast, last_only=True)
    assert last.shape == (2, 1, m.cfg.embed_dim) and fast.length == ref_cache.length == 147
    torch.testing.assert_close(last[:, 0], ref[:, -1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast.k, ref_cache.k, atol=1e-5, rtol=1e-5)  # every layer's keys, last one too
    torch.testing.assert_close(fast.v, ref_cache.v, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kernels", [False, True])
def test_backbone_last_equals_backbone(kernels):
    m = model(kernels)
    task = torch.tensor([4, 5])
    seq = token_sequence(2, 8)[:, :295]
    torch.testing.assert_close(m.backbone_last(seq, task), m.backbone(seq, task)[:, -1], atol=1e-5, rtol=1e-5)


def test_root_q_equals_start_q_and_greedy_plans_agree():
    m = tiny_model()
    world = WorldModelImagination(m)
    g = torch.Generator().manual_seed(3)
    obs, act = torch.randint(0, 2048, (3, 8, 36), generator=g), torch.randint(0, 18, (3, 7), generator=g)
    task, mask = torch.tensor([0, 13, 37]), torch.ones(3, 18, dtype=torch.bool)
    _, q = world.start(obs, act, task)
    torch.testing.assert_close(world.root_q(obs, act, task), q, atol=1e-5, rtol=1e-5)
    cfg = PlannerConfig(kind="greedy")
    assert Planner(world, cfg).plan(obs, act, task, mask).tolist() == \
        Planner(RecomputeImagination(m), cfg).plan(obs, act, task, mask).tolist()


@pytest.mark.parametrize("kernels", [False, True])
def test_fast_paths_under_bf16_autocast_stay_close(kernels):
    m = model(kernels)
    task = torch.tensor([7])
    seq = token_sequence(1, 2)
    full = m.backbone(seq, task)
    cache = m.init_cache(1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        m.forward_cached(seq[:, :50], task, cache, last_only=True)
        h = torch.stack([m.decode_step(seq[:, p], task, cache) for p in range(50, 74)], 1)
    assert cache.k.dtype == torch.float32
    torch.testing.assert_close(h.float(), full[:, 50:], atol=0.1, rtol=0.05)


@pytest.mark.parametrize("keep", [4, 1])
def test_rolling_greedy_equals_greedy_on_its_own_window(keep):
    """Decision t uses the newest c_t steps: 1..8 while the window grows, then keep..8 after each rebuild; its
    actions equal the official greedy planner run on exactly that window."""
    from jowa_model.planner import RollingGreedy

    m = tiny_model()
    world = WorldModelImagination(m)
    actor = RollingGreedy(world, keep=keep)
    g = torch.Generator().manual_seed(5)
    n, steps = 2, 14
    obs = torch.randint(0, 2048, (n, steps, 36), generator=g)
    task = torch.tensor([13, 37])
    mask = torch.zeros(n, 18, dtype=torch.bool)
    mask[:, [0, 1, 3, 4, 11, 12]] = True
    greedy = Planner(world, PlannerConfig(kind="greedy"))
    acts = torch.zeros(n, 0, dtype=torch.long)
    expect_ctx, ctx = [], 0
    for t in range(steps):
        a = actor.act(obs[:, t], task, mask, None if t == 0 else acts[:, -1])
        ctx = 1 if t == 0 else (keep if ctx == 8 else ctx + 1)
        expect_ctx.append(actor.context_steps)
        assert actor.context_steps == ctx
        ref = greedy.plan(obs[:, t + 1 - ctx:t + 1], acts[:, acts.shape[1] - (ctx - 1):], task, mask)
        assert a.tolist() == ref.tolist()
        acts = torch.cat([acts, a[:, None]], 1)
    assert max(expect_ctx) == 8 and expect_ctx.count(8) >= 1


def test_rolling_greedy_bad_keep_is_a_config_error():
    from jowa_common.errors import ConfigError
    from jowa_model.planner import RollingGreedy

    with pytest.raises(ConfigError, match="keep"):
        RollingGreedy(WorldModelImagination(tiny_model()), keep=0)


def test_bench_plan_reports_rolling_greedy_apart():
    from pipelines.bench_plan import BenchPlanConfig, bench_plan

    res = bench_plan(cfg=BenchPlanConfig(preset="tiny", reps=1, warmup=0, encode=False, threads=1))
    roll = res["greedy_rolling"]
    assert roll["keep"] == 4 and roll["identical_to_official"] is False and roll["decisions_per_s"] > 0
    assert "greedy_rolling" not in res["ms"]  # never mixed into the official-rule keys
    assert len(res["load_avg"]) == 3
