"""Inference fast paths of the world-action model agree with the plain full forward: the single-token
`decode_step`, the last-query-only prefix (`forward_cached(last_only=True)`), the cache-free greedy critic
(`backbone_last`, `WorldModelImagination.root_q`), in fp32 and under bf16 autocast."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F

from jowa_model.planner import Planner, PlannerConfig, RecomputeImagination, WorldModelImagination
from jowa_model.presets import model_preset
from tests.fixtures_model import tiny_model, token_sequence

torch.set_num_threads(1)


@pytest.mark.parametrize("use_task_embed,B", [(True, 3), (False, 3), (True, 1), (True, 2)])
def test_decode_step_equals_full_forward_across_token_kinds(use_task_embed, B):
    """One row, a few rows, with and without task embeddings (packed weights: see the Linear test below)."""
    m = tiny_model(use_task_embed=use_task_embed)
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


@pytest.mark.parametrize("start", [0, 37])
def test_last_only_prefix_fills_the_same_cache(start):
    m = tiny_model()
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


def test_backbone_last_equals_backbone():
    m = tiny_model()
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


def test_fast_paths_under_bf16_autocast_stay_close():
    m = tiny_model()
    task = torch.tensor([7])
    seq = token_sequence(1, 2)
    full = m.backbone(seq, task)
    cache = m.init_cache(1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        m.forward_cached(seq[:, :50], task, cache, last_only=True)
        h = torch.stack([m.decode_step(seq[:, p], task, cache) for p in range(50, 74)], 1)
    assert cache.k.dtype == torch.float32
    torch.testing.assert_close(h.float(), full[:, 50:], atol=0.1, rtol=0.05)


def test_packed_linear_follows_weight_updates_and_is_never_copied():
    m = tiny_model(embed_dim=512)  # head_obs[0] 512x512: large enough to be packed (PACK_MIN_NUMEL)
    x = torch.randn(3, m.cfg.embed_dim)
    layer = m.head_obs[0]

    def plain(post="none", rows=None):
        w, b = layer.weight.detach(), layer.bias.detach()
        if rows:
            w, b = w[rows[0]:rows[1]], b[rows[0]:rows[1]]
        y = x @ w.t() + b
        return {"none": y, "relu": torch.relu(y), "gelu": F.gelu(y)}[post]

    with torch.no_grad():
        for post in ("none", "relu", "gelu"):
            torch.testing.assert_close(layer.act(x, post), plain(post), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(layer.act(x, rows=(8, 40)), plain(rows=(8, 40)), atol=1e-5, rtol=1e-5)
        assert layer.__dict__.get("_packs"), "fp32 CPU inference should run on the packed weight"
        layer.weight.mul_(2.0)  # in-place update (an optimizer step): the pack must be rebuilt
        torch.testing.assert_close(layer(x), plain(), atol=1e-5, rtol=1e-5)
        layer.bias.add_(1.0)
        torch.testing.assert_close(layer(x), plain(), atol=1e-5, rtol=1e-5)
        m.load_state_dict(tiny_model(embed_dim=512).state_dict())  # copy_ into the same tensors
        torch.testing.assert_close(layer(x), plain(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(m.obs_logits(x), m.head_obs(x), atol=1e-5, rtol=1e-5)
        assert layer.__dict__.get("_packs")
    m.train()  # a mode switch drops the packs; training-mode forwards never use them
    assert "_packs" not in layer.__dict__
    with torch.no_grad():
        layer(x)
    assert "_packs" not in layer.__dict__
    m.eval()
    opt = m.configure_optimizer(1e-2, 1e-2)  # fused AdamW: updates weights WITHOUT bumping their versions
    with torch.no_grad():
        layer(x)
    version = layer.weight._version
    layer(x).square().sum().backward()
    opt.step()
    assert layer.weight._version == version  # why a version check alone would serve a stale pack
    with torch.no_grad():
        torch.testing.assert_close(layer(x), plain(), atol=1e-5, rtol=1e-5)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # bf16 autocast: a bf16 pack, same result
        y, ref = layer(x), F.linear(x, layer.weight, layer.bias)
    assert y.dtype == torch.bfloat16 and torch.equal(y, ref)
    assert (None, torch.bfloat16) in layer.__dict__["_packs"]
    small = tiny_model().head_obs[0]  # 64x64: F.linear (oneDNN's call overhead loses on cache-resident weights)
    with torch.no_grad():
        small(torch.randn(2, 64))
    assert "_packs" not in small.__dict__
    twin = copy.deepcopy(m)  # the opaque packs are dropped, not copied (deepcopy of them raises)
    assert "_packs" not in twin.head_obs[0].__dict__
    buf = io.BytesIO()
    torch.save(m, buf)  # pickling the module works too
    y = layer(x)  # with grad enabled: plain F.linear, differentiable
    y.sum().backward()
    assert layer.weight.grad is not None


def test_keep_scale_rate_values_and_gradient():
    from jowa_model.world_action import dropout, keep_scale

    torch.manual_seed(0)
    k = keep_scale((300, 1000), 0.1, torch.float32, torch.device("cpu"))
    assert k.unique().tolist() == [0.0, pytest.approx(1 / 0.9)]
    assert abs((k == 0).float().mean().item() - 0.1) < 0.003
    assert keep_scale((5,), 0.1, torch.bfloat16, torch.device("cpu")).dtype == torch.bfloat16
    assert (keep_scale((10_000,), 1e-9, torch.float32, torch.device("cpu")) == 1.0).all()  # p -> 0 keeps all
    x = torch.randn(4096, requires_grad=True)
    torch.manual_seed(1)
    y = dropout(x, 0.5, True)
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.where(y == 0, 0.0, 2.0))  # gradient flows through kept units only


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


def test_shared_prefix_attention_equals_full_forward():
    """Rows descending from 2 roots in blocks of 8 read the roots' prefix once; hidden states still equal
    each row's own full forward. An irregular layout (blocks of 3 and 5) falls back to per-row attention."""
    m = tiny_model()
    world = WorldModelImagination(m)
    g = torch.Generator().manual_seed(7)
    obs, act = torch.randint(0, 2048, (2, 2, 36), generator=g), torch.randint(0, 18, (2, 1), generator=g)
    task = torch.tensor([3, 9])
    state, _ = world.start(obs, act, task)
    assert state.cache.shared == 73 and state.cache.groups.tolist() == [0, 1]
    nxt = torch.randint(0, 18, (16,), generator=g)
    prefix = WorldModelImagination.interleave(obs, act)  # (2, 73)
    for rows, expect_rpg in [(torch.arange(2).repeat_interleave(8), 8), (torch.tensor([0] * 3 + [1] * 5), 0)]:
        st = world.select(state, rows)
        assert st.cache.rows_per_group() == expect_rpg
        B = rows.numel()
        h = m.decode_step(nxt[:B], st.task_ids, st.cache)
        h2 = m.decode_step(nxt[:B].flip(0), st.task_ids, st.cache)  # a second pass: suffix of 2
        for r in range(B):
            seq = torch.cat([prefix[rows[r]], nxt[r:r + 1], nxt[:B].flip(0)[r:r + 1]])[None]
            ref = m.backbone(seq, task[rows[r]][None])[0]
            torch.testing.assert_close(h[r], ref[-2], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(h2[r], ref[-1], atol=1e-5, rtol=1e-5)
