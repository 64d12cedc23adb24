"""World-action model: official parameter counts, token roles, causality, exact KV-cached planning passes,
the batched Q ensemble, the target head, optimizer groups and the `jowa model info` command."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from jowa_common.io import atomic_torch_save, safe_torch_load
from jowa_data.manifest import action_mask_table, load_manifests
from jowa_model.presets import PRESETS, model_preset
from jowa_model.world_action import EnsembleQHead, WorldActionConfig, WorldActionModel
from pipelines.bench import _script
from tests.fixtures_model import tiny_model, token_sequence

torch.set_num_threads(1)

# docs/official_code.md §2 (JOWA-40M as instantiated by the official code)
OFFICIAL_40M = {"backbone": 12_610_560, "embeddings": 1_270_784, "head_obs": 1_313_280, "head_reward": 264_195,
                "head_end": 263_682, "head_q": 1_693_590, "head_q_target": 1_693_590, "total": 19_109_681,
                "trainable": 17_416_091}


def test_40m_counts_match_official_exactly():
    with torch.device("meta"):
        counts = WorldActionModel(model_preset("40M")).parameter_counts()
    assert counts == OFFICIAL_40M


@pytest.mark.parametrize("name,trainable_m,total_m", [("70M", 50.6, 53.3), ("150M", 109.0, 127.8)])
def test_larger_presets_match_official_totals(name, trainable_m, total_m):
    with torch.device("meta"):
        counts = WorldActionModel(model_preset(name)).parameter_counts()
    assert round(counts["trainable"] / 1e6, 1) == trainable_m  # docs/official_code.md §2: 50.6M / 109.1M (ckpt sizes)
    assert round(counts["total"] / 1e6, 1) == total_m  # checkpoint sizes: 213 MB = 53.4M, 511 MB = 127.8M


def test_forward_shapes_and_heads():
    m = tiny_model()
    B, L = 2, 3
    seq = token_sequence(B, L)
    h = m(seq.view(B, L, 37)[..., :36], seq.view(B, L, 37)[..., 36], torch.tensor([3, 13]))
    assert h.shape == (B, L, 37, 64)
    assert m.obs_logits(h).shape == (B, L, 37, 2048)
    assert m.reward_logits(h[:, :, 36]).shape == (B, L, 3)
    assert m.end_logits(h[:, :, 36]).shape == (B, L, 2)
    assert m.q_logits(h[:, :, 35]).shape == (2, B, L, 18, 51)  # tiny has 2 ensemble members
    assert m.q_values(h[:, :, 35]).shape == (B, L, 18)


def test_action_token_uses_action_table_and_causality():
    m = tiny_model()
    seq = token_sequence(1, 3)
    task = torch.tensor([5])
    h0 = m.backbone(seq, task)
    seq2 = seq.clone()
    seq2[0, 36 + 37] = (seq2[0, 36 + 37] + 1) % 18  # change the action of step 1 (position 73)
    h1 = m.backbone(seq2, task)
    assert torch.equal(h0[:, :73], h1[:, :73])  # causal: nothing before the change moves
    assert not torch.allclose(h0[:, 73], h1[:, 73])
    # an action id >= 18 at an obs position is a valid obs code: obs and action tables are distinct
    e = m.embed(torch.full((1, 37), 7), task)
    assert not torch.allclose(e[0, 0], e[0, 36])
    assert torch.allclose(e[0, 0] - m.pos_emb.weight[0] - m.task_obs_emb.weight[5], m.obs_emb.weight[7])
    assert torch.allclose(e[0, 36] - m.pos_emb.weight[36] - m.task_act_emb.weight[5], m.act_emb.weight[7])


def test_window_overflow_is_an_error():
    m = tiny_model()
    with pytest.raises(ValueError, match="exceed the model window of 296"):
        m.backbone(torch.zeros(1, 297, dtype=torch.long), torch.tensor([0]))
    cache = m.init_cache(1, max_tokens=40)
    m.forward_cached(torch.zeros(1, 37, dtype=torch.long), torch.tensor([0]), cache)
    with pytest.raises(ValueError, match="KV cache full"):
        m.forward_cached(torch.zeros(1, 4, dtype=torch.long), torch.tensor([0]), cache)


@pytest.mark.parametrize("chunks", [[221, 1, 36, 1, 36], [1] * 40, [100, 150, 46], [296]])
def test_cached_incremental_forward_equals_full_forward(chunks):
    m = tiny_model()
    B, task = 3, torch.tensor([3, 6, 13])
    seq = token_sequence(B, 8)
    T = sum(chunks)
    full = m.backbone(seq[:, :T], task)
    cache = m.init_cache(B)
    outs, pos = [], 0
    for n in chunks:
        outs.append(m.forward_cached(seq[:, pos:pos + n], task, cache))
        pos += n
    assert cache.length == T
    torch.testing.assert_close(torch.cat(outs, 1), full, atol=1e-5, rtol=1e-5)


def test_cache_beam_ops_match_independent_rows():
    """repeat_interleave / index_select on the cache == running each beam from scratch."""
    m = tiny_model()
    task = torch.tensor([3, 13])
    prefix = token_sequence(2, 2)[:, :73]  # two full steps minus the last action
    cache = m.init_cache(2)
    m.forward_cached(prefix, task, cache)
    kids = cache.repeat_interleave(3)  # 6 children: each root tries 3 actions
    acts = torch.tensor([[0], [4], [17], [1], [2], [3]])
    h = m.forward_cached(acts, task.repeat_interleave(3), kids)
    keep = torch.tensor([5, 0])
    survivors = kids.index_select(keep)
    nxt = torch.tensor([[11], [12]])
    h2 = m.forward_cached(nxt, task.repeat_interleave(3)[keep], survivors)
    for row in range(6):
        ref = m.backbone(torch.cat([prefix[row // 3], acts[row]])[None], task[row // 3: row // 3 + 1])
        torch.testing.assert_close(h[row, 0], ref[0, -1], atol=1e-5, rtol=1e-5)
    for i, row in enumerate(keep.tolist()):
        ref = m.backbone(torch.cat([prefix[row // 3], acts[row], nxt[i]])[None], task[row // 3: row // 3 + 1])
        torch.testing.assert_close(h2[i, 0], ref[0, -1], atol=1e-5, rtol=1e-5)
    assert cache.length == 73 and kids.length == 74 and survivors.length == 75
    assert kids.clone().k.data_ptr() != kids.k.data_ptr()


def test_ensemble_head_equals_per_member_loop():
    torch.manual_seed(0)
    head = EnsembleQHead(16, 24, 3, 10, dropout=0.0).eval()
    x = torch.randn(5, 16)
    out = head(x)
    assert out.shape == (3, 5, 10)
    for q in range(3):
        h = x
        for i in range(3):
            h = h @ head.weights[i][q] + head.biases[i][q]
            if i < 2:
                h = F.mish(F.layer_norm(h, (24,), head.ln_weights[i][q], head.ln_biases[i][q]))
        torch.testing.assert_close(out[q], h, atol=1e-5, rtol=1e-5)


def test_q_values_are_expected_value_of_ensemble_mean_and_masked():
    m = tiny_model()
    h = torch.randn(4, 64)
    probs = m.q_logits(h).softmax(-1).mean(0)  # (4, 18, 51)
    support = torch.linspace(-10, 30, 51)
    mask = torch.zeros(4, 18, dtype=torch.bool)
    mask[:, [0, 1, 11, 12]] = True  # Atlantis
    q = m.q_values(h, mask)
    torch.testing.assert_close(q[mask].view(4, 4), (probs @ support)[mask].view(4, 4))
    assert torch.isinf(q[~mask]).all() and (q[~mask] < 0).all()


def test_target_head_copy_schedule_and_no_grad():
    m = tiny_model().train()
    assert not m.head_q_target.training  # stays in eval mode
    assert all(not p.requires_grad for p in m.head_q_target.parameters())
    for t, s in zip(m.head_q_target.parameters(), m.head_q.parameters()):
        assert torch.equal(t, s)
    with torch.no_grad():
        m.head_q.weights[0].add_(1.0)
    assert not m.step_target(999)
    assert not torch.equal(m.head_q_target.weights[0], m.head_q.weights[0])
    assert m.step_target(1000)
    assert torch.equal(m.head_q_target.weights[0], m.head_q.weights[0])


def test_q_prior_starts_every_return_distribution_at_zero():
    """q_prior_std > 0 (the tiny preset): expected Q ~ 0 and a TD target of zero rewards is already matched;
    the paper's init starts near uniform on [-10, 30] (mean 10) with a TD loss near ln(51)."""
    import dataclasses
    import math

    from jowa_model.losses import LossConfig, action_loss

    torch.manual_seed(0)
    base = dataclasses.replace(model_preset("tiny"), num_tasks=4)
    batch = {"actions": torch.randint(0, 18, (3, 8)), "rewards": torch.zeros(3, 8), "ends": torch.zeros(3, 8).long(),
             "mask_padding": torch.ones(3, 8, dtype=torch.bool), "task_ids": torch.zeros(3).long()}
    h = torch.randn(3, 8, 64)
    for std, q_near, td_near in ((0.0, 10.0, math.log(51)), (1.0, 0.0, None)):
        m = WorldActionModel(dataclasses.replace(base, q_prior_std=std)).eval()
        q = m.q_values(h).detach()
        assert (q - q_near).abs().max() < 2.0 and abs(float(q.mean()) - q_near) < 0.5, (std, q)
        td = float(action_loss(m, h, batch, LossConfig(cql_alpha=0.0))[0].detach())
        if td_near is not None:
            assert abs(td - td_near) < 0.05
        else:  # a concentrated prior: cross-entropy of the (same) prior projected at r = 0 is its small entropy
            assert td < 2.5
        assert torch.equal(m.q_values(h, target=True), q)  # the target head starts as the same copy


def test_optimizer_groups_partition_trainable_params():
    m = tiny_model()
    opt = m.configure_optimizer(1e-4, 5e-5, 0.01)
    groups = opt.param_groups
    ids = [id(p) for g in groups for p in g["params"]]
    trainable = [id(p) for p in m.parameters() if p.requires_grad]
    assert sorted(ids) == sorted(trainable) and len(ids) == len(set(ids))
    assert not opt.state_dict()["state"] and opt.defaults["fused"] is True
    decay, no_decay, critic = groups
    assert decay["lr"] == no_decay["lr"] == 1e-4 and no_decay["weight_decay"] == 0.0
    assert critic["lr"] == 5e-5 and critic["weight_decay"] == 0.01
    assert {id(p) for p in critic["params"]} == {id(p) for p in m.head_q.parameters()}
    assert id(m.obs_emb.weight) in {id(p) for p in no_decay["params"]}
    assert id(m.blocks[0].attn.qkv.weight) in {id(p) for p in decay["params"]}


def test_action_mask_table_from_manifests():
    masks = torch.from_numpy(action_mask_table(load_manifests(), 60))
    assert masks.shape == (60, 18)
    assert masks[6].tolist() == [a in (0, 1, 11, 12) for a in range(18)]  # Atlantis: NOOP FIRE RIGHTFIRE LEFTFIRE
    assert masks[0].all()  # a task without a manifest allows every action
    m = tiny_model()
    m.set_action_masks(masks)
    assert m.action_mask_for(torch.tensor([6])).sum() == 4
    with pytest.raises(ValueError, match="action masks must be"):
        m.set_action_masks(torch.ones(3, 18, dtype=torch.bool))


def test_state_dict_round_trip_is_exact(tmp_path):
    m = tiny_model()
    m.set_action_masks(torch.from_numpy(action_mask_table(load_manifests(), m.cfg.num_tasks)))
    path = tmp_path / "wam.pt"
    atomic_torch_save(m.state_dict(), path)
    m2 = WorldActionModel(model_preset("tiny")).eval()
    m2.load_state_dict(safe_torch_load(path))
    seq = token_sequence(2, 2)
    assert torch.equal(m.backbone(seq, torch.tensor([1, 2])), m2.backbone(seq, torch.tensor([1, 2])))
    assert torch.equal(m2.action_masks, m.action_masks)
    assert "head_q_target.weights.0" in m2.state_dict()


def test_mtbc_variant_has_no_world_heads():
    m = tiny_model(mtbc=True)
    counts = m.parameter_counts()
    assert "head_obs" not in counts and counts["head_q_target"] == 0
    assert m.q_logits(torch.randn(3, 64)).shape == (2, 3, 18)


def test_config_validation():
    from jowa_common.errors import ConfigError

    with pytest.raises(ConfigError, match="embed_dim=60 is not divisible by model.num_heads=8"):
        WorldActionModel(WorldActionConfig(embed_dim=60, num_heads=8))


# ------------------------------------------------------------------------------------------- CLI


def test_cli_model_info_json():
    from pipelines.cli import main

    r = CliRunner().invoke(main, ["model", "info", "40M", "--json"])
    assert r.exit_code == 0, r.output
    info = json.loads(r.output)
    assert info["parameters"] == OFFICIAL_40M
    assert info["config"]["num_layers"] == 4


def test_cli_model_info_table_lists_all_parts():
    from pipelines.cli import main

    r = CliRunner().invoke(main, ["model", "info", "tiny"])
    assert r.exit_code == 0, r.output
    for part in ("backbone", "embeddings", "head_obs", "head_reward", "head_end", "head_q", "head_q_target",
                 "trainable"):
        assert part in r.output


def test_cli_model_info_unknown_preset():
    from pipelines.cli import main

    r = CliRunner().invoke(main, ["model", "info", "41M"])
    assert r.exit_code == 1
    assert "unknown model preset '41M'" in r.output and "40M" in r.output
    assert set(PRESETS) == {"tiny", "40M", "70M", "150M"}


def test_train_step_benchmark_runs_tiny(capsys):
    """Smoke run of benchmarks/bench_train_step.py (no timing asserted): the full stage-2 step executes."""
    bench = _script("bench_train_step")
    out = bench.main(["--config", "tiny", "--batch", "2", "--warmup", "0", "--reps", "1", "--bf16", "--threads", "1",
                      "--matmul-floor", "--json"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == out
    assert out["tokens_per_s"] > 0 and out["trainable_params"] == 541_361
    assert bench.step_gflop(model_preset("40M"), 8, 8) == pytest.approx(205.48, abs=0.01)
    # 2 layers x 4 Linears, each with a forward, dX and dW product: the backward's products are counted too
    assert out["matmul_calls"] > 3 * 2 * 4 and out["matmul_gflop"] > 0 and out["matmul_ms"] > 0


def test_matmul_recorder_sees_backward_and_counts_flops():
    """The matmul floor of `bench_train_step --matmul-floor` must include the backward's products, exactly counted."""
    bench = _script("bench_train_step")
    lin = torch.nn.Linear(4, 3)
    x = torch.randn(5, 4, requires_grad=True)
    a, b = torch.randn(2, 5, 6, requires_grad=True), torch.randn(2, 6, 7)
    with bench.MatmulRecorder() as rec:
        (lin(x).sum() + (a @ b).sum()).backward()
    ops = sorted(str(f) for f, _, _ in rec.calls)
    assert ops == ["aten.addmm.default", "aten.bmm.default", "aten.bmm.default", "aten.mm.default", "aten.mm.default"]
    flop = sum(bench.matmul_flop(f, shapes) for f, shapes, _ in rec.calls)
    assert flop == 3 * 2 * 5 * 4 * 3 + 2 * (2 * 2 * 5 * 6 * 7)  # Linear fwd + dX + dW; bmm fwd + dA (b needs none)
    assert all(dt > 0 for _, _, dt in rec.calls)


def test_cli_model_info_bad_override_exits_1():
    from pipelines.cli import main

    r = CliRunner().invoke(main, ["model", "info", "tiny", "--set", "num_layer=3", "--json"])
    assert r.exit_code == 1
    assert "unknown config key 'num_layer'" in r.output and "num_layers" in r.output
    r = CliRunner().invoke(main, ["model", "info", "tiny", "--set", "num_layers=3", "--json"])
    assert r.exit_code == 0 and json.loads(r.output)["config"]["num_layers"] == 3


def test_q_values_stay_fp32_under_bf16_autocast():
    m = tiny_model()
    h = torch.randn(5, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        probs = m.q_probs(h)
        q = m.q_values(h)
    assert q.dtype == torch.float32 and probs.dtype == torch.float32
    torch.testing.assert_close(q, (probs.double() * torch.linspace(-10, 30, 51).double()).sum(-1).float(),
                               atol=1e-5, rtol=1e-6)
