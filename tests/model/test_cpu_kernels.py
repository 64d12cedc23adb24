"""jowa_model/cpu_kernels.py: every fast path equals the plain model of world_action.py (up to float rounding),
`apply` keeps parameters and checkpoints unchanged, `remove` undoes it, and world_action.py stays plain."""

from __future__ import annotations

import ast
import copy
import io
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from jowa_model import cpu_kernels
from jowa_model.cpu_kernels import (CPUKVCache, CPUTrainingAttention, CPUWorldActionModel, FastDropout,
                                    PackedLinear, attention_with_dropout, keep_scale)
from jowa_model.planner import WorldModelImagination
from jowa_model.world_action import CausalSelfAttention, KVCache, WorldActionModel
from tests.fixtures_model import tiny_model, token_sequence

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[2]


def test_apply_swaps_classes_keeps_state_and_remove_undoes_it():
    m = tiny_model(embed_dim=512)  # 512x512 weights and larger are packed (PACK_MIN_NUMEL); 512x3 are not
    before = {k: v.clone() for k, v in m.state_dict().items()}
    params = [id(p) for p in m.parameters()]
    cpu_kernels.apply(m)
    assert type(m.blocks[0].attn.qkv) is PackedLinear and type(m.head_obs[0]) is PackedLinear
    assert type(m.head_reward[2]) is nn.Linear  # 512x3: F.linear is faster for weights that stay in cache
    assert type(m.drop) is FastDropout and type(m.head_q.dropout) is FastDropout
    assert type(m.blocks[1].attn) is CPUTrainingAttention and type(m.init_cache(1)) is CPUKVCache
    assert type(m) is CPUWorldActionModel
    assert [id(p) for p in m.parameters()] == params
    assert m.state_dict().keys() == before.keys() and all(torch.equal(m.state_dict()[k], v) for k, v in before.items())
    cpu_kernels.remove(m)
    kinds = {type(x) for x in m.modules()}
    assert not kinds & {PackedLinear, FastDropout, CPUTrainingAttention} and type(m.init_cache(1)) is KVCache
    assert type(m) is WorldActionModel
    assert CausalSelfAttention in kinds


def test_kernels_equal_the_plain_model_in_eval_and_in_a_training_step():
    """Same outputs and gradients with dropout 0 (the kernels change how masks are drawn, not the math)."""
    seq, task = token_sequence(2, 3), torch.tensor([3, 13])
    plain = tiny_model(embed_dim=512, dropout=0.0, q_dropout=0.0)
    fast = cpu_kernels.apply(copy.deepcopy(plain))
    with torch.no_grad():
        torch.testing.assert_close(fast.backbone(seq, task), plain.backbone(seq, task), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(fast.obs_logits(plain.backbone(seq, task)), plain.obs_logits(plain.backbone(seq, task)),
                                   atol=1e-5, rtol=1e-5)
    for autocast in (False, True):  # the one-token pass (packed, fused GELU) and the last-query root pass
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            outs = []
            for m in (plain, fast):
                cache = m.init_cache(2)
                root = m.forward_cached(seq[:, :40], task, cache, last_only=True)
                outs.append(torch.cat([root[:, 0]] + [m.decode_step(seq[:, p], task, cache) for p in range(40, 75)]))
        tol = dict(atol=0.05, rtol=0.05) if autocast else dict(atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(outs[1].float(), outs[0].float(), **tol)
    for m in (plain, fast):
        m.train()
        m.zero_grad()
        h = m.backbone(seq, task)
        (m.obs_logits(h).logsumexp(-1).mean() + m.q_values(h[:, 35]).mean()).backward()
    for (name, a), b in zip(plain.named_parameters(), fast.parameters()):
        if a.grad is not None:
            torch.testing.assert_close(b.grad, a.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_packed_linear_follows_weight_updates_and_is_never_copied():
    m = cpu_kernels.apply(tiny_model(embed_dim=512))
    x = torch.randn(3, m.cfg.embed_dim)
    layer = m.head_obs[0]

    def plain():
        return x @ layer.weight.detach().t() + layer.bias.detach()

    with torch.no_grad():
        torch.testing.assert_close(layer(x), plain(), atol=1e-5, rtol=1e-5)
        assert layer.__dict__.get("_packs"), "fp32 CPU inference should run on the packed weight"
        layer.weight.mul_(2.0)  # in-place update: the pack must be rebuilt
        torch.testing.assert_close(layer(x), plain(), atol=1e-5, rtol=1e-5)
        layer.bias.add_(1.0)
        torch.testing.assert_close(layer(x), plain(), atol=1e-5, rtol=1e-5)
        m.load_state_dict(tiny_model(embed_dim=512).state_dict())  # copy_ into the same tensors
        torch.testing.assert_close(layer(x), plain(), atol=1e-5, rtol=1e-5)
    m.train()  # a mode switch drops the packs; training-mode forwards never use them
    assert "_packs" not in layer.__dict__
    with torch.no_grad():
        layer(x)
    assert "_packs" not in layer.__dict__
    opt = m.configure_optimizer(1e-2, 1e-2)  # fused AdamW: updates weights WITHOUT moving their versions
    version = layer.weight._version
    layer(x).square().sum().backward()
    opt.step()
    assert layer.weight._version == version  # why the trainers step in training mode (see PackedLinear)
    m.eval()
    with torch.no_grad():
        torch.testing.assert_close(layer(x), plain(), atol=1e-5, rtol=1e-5)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # bf16 autocast: a bf16 pack, same result
        y, ref = layer(x), F.linear(x, layer.weight, layer.bias)
    assert y.dtype == torch.bfloat16 and torch.equal(y, ref)
    assert torch.bfloat16 in layer.__dict__["_packs"]
    twin = copy.deepcopy(m)  # the opaque packs are dropped, not copied (deepcopy of them raises)
    assert "_packs" not in twin.head_obs[0].__dict__
    torch.save(m, io.BytesIO())  # pickling the module works too
    y = layer(x)  # with grad enabled: plain F.linear, differentiable
    y.sum().backward()
    assert layer.weight.grad is not None


def test_keep_scale_rate_values_and_gradient():
    torch.manual_seed(0)
    k = keep_scale((300, 1000), 0.1, torch.float32, torch.device("cpu"))
    assert k.unique().tolist() == [0.0, pytest.approx(1 / 0.9)]
    assert abs((k == 0).float().mean().item() - 0.1) < 0.003
    assert keep_scale((5,), 0.1, torch.bfloat16, torch.device("cpu")).dtype == torch.bfloat16
    assert (keep_scale((10_000,), 1e-9, torch.float32, torch.device("cpu")) == 1.0).all()  # p -> 0 keeps all
    drop = FastDropout(0.5)
    x = torch.randn(4096, requires_grad=True)
    y = drop(x)
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.where(y == 0, 0.0, 2.0))  # gradient flows through kept units only
    assert drop.eval()(x) is x


@pytest.mark.parametrize("chunks", [1, 2, 3])
def test_cpu_training_attention_equals_sdpa_without_drops(chunks):
    """The CPU dropout-attention path (query blocks) is plain causal attention when nothing is dropped."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 40, 8) for _ in range(3))
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(attention_with_dropout(q, k, v, 1e-9, chunks), ref, atol=1e-5, rtol=1e-5)
    y16 = attention_with_dropout(q.bfloat16(), k.bfloat16(), v.bfloat16(), 1e-9, chunks)  # pure bf16
    torch.testing.assert_close(y16.float(), ref, atol=0.05, rtol=0.05)
    torch.manual_seed(1)
    assert not torch.allclose(attention_with_dropout(q, k, v, 0.5), ref)  # some probabilities were dropped


def test_shared_prefix_attention_equals_full_forward():
    """Rows descending from 2 roots in blocks of 8 read the roots' prefix once; hidden states still equal
    each row's own full forward. An irregular layout (blocks of 3 and 5) falls back to per-row attention."""
    m = cpu_kernels.apply(tiny_model())
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


def test_the_model_file_is_plain_and_private_ops_live_in_one_module():
    """world_action.py: no private torch op, no hand-written dropout or attention, <= 450 lines; no module of
    the project but cpu_kernels.py calls torch.ops."""
    src = (ROOT / "jowa_model" / "world_action.py").read_text()
    assert len(src.splitlines()) <= 450
    tree = ast.parse(src)
    names = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    assert not names & {"ops", "random_", "bernoulli_", "_version"} and {"Dropout", "Linear"} <= names
    attention = [{n.attr for n in ast.walk(c) if isinstance(n, ast.Attribute)} for c in ast.walk(tree)
                 if isinstance(c, ast.ClassDef) and c.name in ("KVCache", "CausalSelfAttention")]
    assert len(attention) == 2 and all("scaled_dot_product_attention" in a for a in attention)
    assert not set().union(*attention) & {"softmax", "matmul", "bmm", "baddbmm"}
    offenders = [str(p.relative_to(ROOT)) for pkg in ("jowa_common", "jowa_data", "jowa_model", "pipelines")
                 for p in (ROOT / pkg).rglob("*.py")
                 if p.name != "cpu_kernels.py" and "torch.ops." in p.read_text()]
    assert offenders == []
