"""Losses: C51 projection against hand values and a per-row loop, TD target masks, CQL by hand, padding,
stage and ablation switches, MTBC, and a tiny model that actually learns on a fixed batch."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from jowa_model.losses import (LossConfig, LossTerms, c51_project, compute_loss, cql_penalty, masked_ce,
                               td_targets_mask)
from jowa_model.presets import model_preset
from jowa_model.world_action import WorldActionModel

torch.set_num_threads(1)
SUPPORT = torch.linspace(-10, 30, 51)  # paper support, dz = 0.8


def project_loop(next_probs, rewards, dones, support, gamma):
    """Reference: cleanrl c51_atari-style per-row loop with the (l == u) fix."""
    n = support.shape[0]
    v_min, v_max = support[0].item(), support[-1].item()
    dz = (v_max - v_min) / (n - 1)
    out = torch.zeros(next_probs.shape, dtype=torch.float64)
    for i in range(next_probs.shape[0]):
        for j in range(n):
            tz = min(max(rewards[i].item() + gamma * (1 - float(dones[i])) * support[j].item(), v_min), v_max)
            b = (tz - v_min) / dz
            lo, up = math.floor(b), math.ceil(b)
            p = next_probs[i, j].item()
            if lo == up:
                out[i, lo] += p
            else:
                out[i, lo] += p * (up - b)
                out[i, up] += p * (b - lo)
    return out.float()


def test_c51_projection_matches_loop_and_conserves_mass():
    g = torch.Generator().manual_seed(0)
    N = 64
    probs = torch.rand(N, 51, generator=g).softmax(-1)
    probs[0] = 0
    probs[0, 50] = 1  # all mass on the top atom
    probs[1] = 0
    probs[1, 0] = 1  # all mass on the bottom atom
    rewards = torch.randint(-1, 2, (N,), generator=g).float()
    rewards[2:6] = torch.tensor([0.4, -0.8, 0.0, 1.0])  # includes exact atom hits (0.0 + 0.99*z, -0.8)
    dones = torch.rand(N, generator=g) < 0.2
    m = c51_project(probs, rewards, dones, SUPPORT, 0.99)
    torch.testing.assert_close(m, project_loop(probs, rewards, dones, SUPPORT, 0.99), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(m.sum(-1), torch.ones(N))
    assert (m >= 0).all()


def test_c51_projection_hand_values_small_support():
    support = torch.tensor([-1.0, 0.0, 1.0])
    probs = torch.tensor([[0.2, 0.3, 0.5]])
    # r = 0.5, gamma = 0.5: Tz = [0, 0.5, 1.0] -> atom 1 gets 0.2 + 0.15, atom 2 gets 0.15 + 0.5
    m = c51_project(probs, torch.tensor([0.5]), torch.tensor([False]), support, 0.5)
    torch.testing.assert_close(m, torch.tensor([[0.0, 0.35, 0.65]]))


def test_c51_terminal_puts_all_mass_at_the_reward():
    probs = torch.rand(3, 51).softmax(-1)
    rewards = torch.tensor([0.5, 0.0, -1.0])
    m = c51_project(probs, rewards, torch.tensor([True, True, True]), SUPPORT, 0.99)
    expected = torch.zeros(3, 51)
    expected[0, 13], expected[0, 14] = 0.875, 0.125  # b = (0.5 + 10) / 0.8 = 13.125
    expected[1, 12], expected[1, 13] = 0.5, 0.5  # b = 12.5
    expected[2, 11] = 1.0  # b = 11.25 -> 0.75 / 0.25
    expected[2, 11], expected[2, 12] = 0.75, 0.25
    torch.testing.assert_close(m, expected)


def test_c51_clips_at_the_support_edges():
    top = torch.zeros(1, 51)
    top[0, 50] = 1  # z = 30: 1 + 0.99 * 30 = 30.7 > v_max
    bottom = torch.zeros(1, 51)
    bottom[0, 0] = 1  # z = -10: -1 - 9.9 = -10.9 < v_min
    m_top = c51_project(top, torch.tensor([1.0]), torch.tensor([False]), SUPPORT, 0.99)
    m_bot = c51_project(bottom, torch.tensor([-1.0]), torch.tensor([False]), SUPPORT, 0.99)
    assert m_top[0, 50] == 1 and m_top.sum() == 1
    assert m_bot[0, 0] == 1 and m_bot.sum() == 1
    # a reward beyond the support on a terminal step clips too
    m = c51_project(torch.full((1, 51), 1 / 51), torch.tensor([55.0]), torch.tensor([True]), SUPPORT, 0.99)
    assert m[0, 50].item() == pytest.approx(1.0)


def test_td_target_mask():
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.bool)
    dones = torch.tensor([[0, 0, 1, 0], [0, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    expected = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 0], [1, 0, 0, 0]], dtype=torch.bool)
    assert torch.equal(td_targets_mask(mask, dones), expected)  # terminal kept; cut-off last step has no target


def test_cql_penalty_by_hand():
    q = torch.tensor([[[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]]])  # (B=1, L=2, A=3)
    q_data = torch.tensor([[1.0, 0.0]])  # data actions 0 and 1
    valid = torch.tensor([[[True, True, False]]])
    only_first = torch.tensor([[True, False]])
    got = cql_penalty(q, q_data, only_first, valid, 0.1)
    assert got.item() == pytest.approx(0.1 * (math.log(math.e + math.e ** 2) - 1.0), abs=1e-6)
    got_all = cql_penalty(q, q_data, only_first, None, 0.1)  # official: all actions in the logsumexp
    assert got_all.item() == pytest.approx(0.1 * (math.log(math.e + math.e ** 2 + math.e ** 3) - 1.0), abs=1e-6)
    both = cql_penalty(q, q_data, torch.ones(1, 2, dtype=torch.bool), valid, 1.0)
    expected = ((math.log(math.e + math.e ** 2) + math.log(2.0)) / 2) - 0.5
    assert both.item() == pytest.approx(expected, abs=1e-6)


def test_masked_ce_ignores_masked_positions_and_never_nans():
    logits = torch.tensor([[2.0, 0.0], [0.0, 5.0]])
    labels = torch.tensor([0, 0])
    got = masked_ce(logits, labels, torch.tensor([True, False]))
    assert got.item() == pytest.approx(-math.log(math.e ** 2 / (math.e ** 2 + 1)), abs=1e-6)
    assert masked_ce(logits, labels, torch.tensor([False, False])).item() == 0.0


# ------------------------------------------------------------------------------------------- with a model


def tiny(**kw) -> WorldActionModel:
    torch.manual_seed(0)
    return WorldActionModel(model_preset("tiny", **kw))


def make_batch(B=3, L=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    b = dict(tokens=torch.randint(0, 2048, (B, L, 36), generator=g),
             actions=torch.randint(0, 4, (B, L), generator=g),
             rewards=torch.randint(-1, 2, (B, L), generator=g).float(),
             ends=torch.zeros(B, L, dtype=torch.long), mask_padding=torch.ones(B, L, dtype=torch.bool),
             task_ids=torch.tensor([6, 13, 3])[:B])
    b["ends"][0, 5] = 1
    b["mask_padding"][0, 6:] = False  # row 0: terminal at step 5, right-padded
    b["mask_padding"][1, 7:] = False  # row 1: cut at step 6 (no terminal)
    return b


def test_padding_does_not_change_any_loss():
    m = tiny().eval()
    b = make_batch()
    t1 = compute_loss(m, b)
    b2 = {k: v.clone() for k, v in b.items()}
    pad = ~b["mask_padding"]
    b2["tokens"][pad] = torch.randint(0, 2048, (int(pad.sum()), 36))
    b2["actions"][pad] = 17
    b2["rewards"][pad] = 1.0
    b2["ends"][pad] = 1
    t2 = compute_loss(m, b2)
    for name in ("total", "obs", "reward", "end", "td", "cql", "q_data"):
        torch.testing.assert_close(getattr(t1, name), getattr(t2, name))


def test_world_loss_equals_per_position_reference():
    m = tiny().eval()
    b = make_batch()
    terms = compute_loss(m, b, stage=1)
    h = m(b["tokens"], b["actions"], b["task_ids"])  # (B, L, 37, D)
    B, L = b["actions"].shape
    obs_ce, rew_ce, end_ce = [], [], []
    for i in range(B):
        for t in range(L):
            if not b["mask_padding"][i, t]:
                continue
            for k in range(36):  # token k of step t is predicted by the position before it
                if t == 0 and k == 0:
                    continue
                src = h[i, t, k - 1] if k > 0 else h[i, t - 1, 36]
                obs_ce.append(F.cross_entropy(m.obs_logits(src)[None], b["tokens"][i, t, k][None]))
            cls = int(torch.sign(b["rewards"][i, t]).item()) + 1
            rew_ce.append(F.cross_entropy(m.reward_logits(h[i, t, 36])[None], torch.tensor([cls])))
            end_ce.append(F.cross_entropy(m.end_logits(h[i, t, 36])[None], b["ends"][i, t][None]))
    mean = lambda xs: torch.stack(xs).mean()  # noqa: E731
    torch.testing.assert_close(terms.obs, mean(obs_ce), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(terms.reward, mean(rew_ce), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(terms.end, mean(end_ce), atol=1e-5, rtol=1e-5)
    assert terms.td == 0 and terms.cql == 0  # stage 1: world loss only
    torch.testing.assert_close(terms.total, terms.obs + terms.reward + terms.end)


@pytest.mark.parametrize("backup", ["max", "data"])
def test_td_loss_equals_per_row_reference(backup):
    m = tiny().eval()
    masks = torch.zeros(60, 18, dtype=torch.bool)
    masks[:, :4] = True
    masks[6] = torch.tensor([a in (0, 1, 11, 12) for a in range(18)])
    m.set_action_masks(masks)
    b = make_batch()
    cfg = LossConfig(cql_alpha=0.0, td_backup=backup)
    terms = compute_loss(m, b, cfg)
    h = m(b["tokens"], b["actions"], b["task_ids"])[:, :, 35]  # (B, L, D)
    losses = []
    B, L = b["actions"].shape
    for i in range(B):
        valid = masks[b["task_ids"][i]]
        for t in range(L):
            real, done = bool(b["mask_padding"][i, t]), bool(b["ends"][i, t])
            if not real or not (done or (t + 1 < L and b["mask_padding"][i, t + 1])):
                continue
            p = m.q_logits(h[i, t]).softmax(-1).mean(0)[b["actions"][i, t]]  # (51,)
            if done:
                nxt = torch.full((51,), 1 / 51)
            else:
                tp = m.q_logits(h[i, t + 1], target=True).softmax(-1).mean(0)  # (18, 51)
                q = (tp @ SUPPORT).masked_fill(~valid, -float("inf"))
                nxt = tp[q.argmax()] if backup == "max" else tp[b["actions"][i, t + 1]]  # a* or the data's
            target = project_loop(nxt[None], b["rewards"][i, t][None], torch.tensor([done]), SUPPORT, 0.99)[0]
            losses.append(-(target * torch.log(p + 1e-8)).sum())
    assert len(losses) == 6 + 6 + 7  # row 0: 0..5 (5 terminal); row 1: 0..5 (6 is cut); row 2: 0..6
    torch.testing.assert_close(terms.td, torch.stack(losses).mean(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(terms.total, 0.1 * (terms.obs + terms.reward + terms.end) + terms.td)


def grads(m: WorldActionModel, terms: LossTerms) -> dict[str, float]:
    m.zero_grad(set_to_none=True)
    terms.total.backward()
    norm = lambda mod: sum(float(p.grad.abs().sum()) for p in mod.parameters() if p.grad is not None)  # noqa: E731
    return {"backbone": norm(m.blocks), "q": norm(m.head_q), "obs": norm(m.head_obs), "target": norm(m.head_q_target)}


def test_stage1_trains_no_q_head_and_stage2_trains_all():
    m = tiny().train()
    g1 = grads(m, compute_loss(m, make_batch(), stage=1))
    assert g1["q"] == 0 and g1["backbone"] > 0 and g1["obs"] > 0
    g2 = grads(m, compute_loss(m, make_batch(), stage=2))
    assert g2["q"] > 0 and g2["backbone"] > 0 and g2["target"] == 0


def test_ablation_switches():
    b = make_batch()
    m = tiny().eval()
    base = compute_loss(m, b)
    # no CQL
    assert compute_loss(m, b, LossConfig(cql_alpha=0.0)).cql == 0
    torch.testing.assert_close(compute_loss(m, b, LossConfig(cql_alpha=0.0)).total, base.total - base.cql)
    # beta = 0: model-free; the backbone still learns from the action loss
    mf = compute_loss(m, b, LossConfig(world_weight=0.0))
    assert mf.obs == 0
    torch.testing.assert_close(mf.total, base.td + base.cql)
    g = grads(m, mf)
    assert g["backbone"] > 0 and g["obs"] == 0
    # sg(L_action): with beta = 0 nothing reaches the backbone
    sg = compute_loss(m, b, LossConfig(world_weight=0.0, action_grad_to_backbone=False))
    g = grads(m, sg)
    assert g["backbone"] == 0 and g["q"] > 0
    # MSE TD: squared error on expected Q, finite and different from C51
    mse = compute_loss(m, b, LossConfig(td_loss="mse"))
    assert torch.isfinite(mse.td) and not torch.isclose(mse.td, base.td)
    # SARSA backup (the data's next action): a different target than a*, in both TD forms
    assert not torch.isclose(compute_loss(m, b, LossConfig(td_backup="data")).td, base.td)
    assert not torch.isclose(compute_loss(m, b, LossConfig(td_loss="mse", td_backup="data")).td, mse.td)
    # CQL over all 18 actions (official) is larger: more terms in the logsumexp
    masks = torch.zeros(60, 18, dtype=torch.bool)
    masks[:, :4] = True
    m.set_action_masks(masks)
    base = compute_loss(m, b)
    assert compute_loss(m, b, LossConfig(cql_actions="all")).cql > base.cql


def test_mtbc_loss_is_masked_action_ce():
    m = tiny(mtbc=True).eval()
    masks = torch.zeros(60, 18, dtype=torch.bool)
    masks[:, :4] = True
    m.set_action_masks(masks)
    b = make_batch()
    t = compute_loss(m, b)
    h = m(b["tokens"], b["actions"], b["task_ids"])[:, :, 35]
    logits = m.q_logits(h).mean(0)[..., :4]  # valid actions only
    ref = F.cross_entropy(logits[b["mask_padding"]], b["actions"][b["mask_padding"]])
    torch.testing.assert_close(t.bc, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(t.total, t.bc)
    assert t.obs == 0 and t.td == 0


def test_batch_shape_errors():
    m = tiny()
    b = make_batch()
    b["actions"] = b["actions"][:, :5]
    with pytest.raises(ValueError, match=r"batch\['actions'\] must be \(3, 8\)"):
        compute_loss(m, b)
    with pytest.raises(KeyError, match="task_ids"):
        compute_loss(m, {k: v for k, v in make_batch().items() if k != "task_ids"})


def test_to_dict_names_and_values():
    m = tiny().eval()
    d = compute_loss(m, make_batch()).to_dict()
    assert set(d) == {"train/loss_total", "train/loss_obs", "train/loss_reward", "train/loss_end",
                      "train/loss_td", "train/loss_cql", "train/q_data", "train/loss_bc"}
    assert all(isinstance(v, float) and math.isfinite(v) for v in d.values())


def test_tiny_model_fits_a_fixed_batch_in_bf16():
    """20 AdamW steps under bf16 autocast reduce the joint loss and its parts (real training, no mocks)."""
    m = tiny().train()
    opt = m.configure_optimizer(3e-3, 3e-3, 0.0)
    b = make_batch(B=2)
    losses = []
    for step in range(1, 21):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            t = compute_loss(m, b)
        opt.zero_grad(set_to_none=True)
        t.total.backward()
        torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
        opt.step()
        m.step_target(step)
        losses.append(t.to_dict())
    first, last = losses[0], losses[-1]
    assert last["train/loss_total"] < 0.9 * first["train/loss_total"]
    assert last["train/loss_obs"] < 0.8 * first["train/loss_obs"]
    assert last["train/loss_td"] < first["train/loss_td"]
