"""Opt-in compiled planning passes (jowa_model.compiled_decode) give the eager path's imagined steps, and a
weight update between plans is picked up (frozen weights rebuilt). Slow: compiles twice (~30 s each, cold)."""

from __future__ import annotations

import pytest
import torch

from jowa_model.planner import WorldModelImagination
from jowa_model.presets import model_preset
from jowa_model.world_action import WorldActionModel

pytestmark = pytest.mark.slow


def test_compiled_steps_equal_eager_and_follow_weight_updates():
    torch.set_num_threads(1)
    torch.manual_seed(0)
    m = WorldActionModel(model_preset("tiny")).eval()
    eager, comp = WorldModelImagination(m), WorldModelImagination(m, compile=True)
    g = torch.Generator().manual_seed(0)
    obs, act, task = torch.randint(0, 2048, (1, 3, 36), generator=g), torch.randint(0, 18, (1, 2), generator=g), \
        torch.tensor([13])
    acts = torch.tensor([4])

    def both():
        st, _ = eager.start(obs, act, task)
        _, a = eager.step(eager.select(st, torch.zeros(1, dtype=torch.long)), acts)
        st, _ = comp.start(obs, act, task)
        _, b = comp.step(comp.select(st, torch.zeros(1, dtype=torch.long)), acts)
        return a, b

    a, b = both()
    assert comp.decoder._parts  # the compiled path ran
    assert torch.equal(a.obs_tokens, b.obs_tokens) and torch.equal(a.rewards, b.rewards)
    torch.testing.assert_close(a.q, b.q, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        m.head_obs[2].weight.mul_(-3.0)  # an in-place update, as an optimizer step does
    a2, b2 = both()
    assert not torch.equal(a2.obs_tokens, a.obs_tokens)  # the update changes the imagined frame...
    assert torch.equal(a2.obs_tokens, b2.obs_tokens)  # ...and the compiled path follows it
    assert comp.decoder.usable(1) and not comp.decoder.usable(5)
