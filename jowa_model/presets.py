"""World-action model presets: the paper's three sizes (Tables 11-12) and a CPU-sized `tiny`.

Trainable counts with the defaults (official code, docs/official_code.md §2): 40M 17,416,091; 70M 50.6M;
150M 109.1M. The size names also count the target head and the tokenizer (same section).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from jowa_common.errors import ConfigError
from jowa_model.world_action import WorldActionConfig


def tiny() -> WorldActionConfig:
    """Trains in minutes on a 2-core CPU: for tests, demos and `jowa bench learn`. Two Q members exercise the
    ensemble. Two changes for runs of a few thousand steps (the paper's sizes keep the paper's values):
    - `target_update_every=10` (paper: 1000, for 1.5M steps): a stage 2 of 2-4k steps would otherwise see only
      2-4 target copies, and the TD target would stay the initial head's (measured: TD loss flat at ln 51);
    - `q_prior_std=1.0`: return distributions start near N(0, 1) instead of near uniform on [-10, 30] (mean 10),
      which backups shrink only by gamma each: with it the TD loss falls from ~3.9 to ~1.9 and Q at the data's
      actions settles at 3-4 (returns of these games) instead of drifting up from 10 (docs/learning.md)."""
    return WorldActionConfig(num_layers=2, num_heads=2, embed_dim=64, q_hidden=64, num_q=2,
                             target_update_every=10, q_prior_std=1.0)


def jowa_40m() -> WorldActionConfig:
    return WorldActionConfig(num_layers=4, num_heads=8, embed_dim=512, q_hidden=768, num_q=1)


def jowa_70m() -> WorldActionConfig:
    return WorldActionConfig(num_layers=6, num_heads=12, embed_dim=768, q_hidden=1024, num_q=1)


def jowa_150m() -> WorldActionConfig:
    return WorldActionConfig(num_layers=12, num_heads=12, embed_dim=768, q_hidden=1792, num_q=3)


PRESETS: dict[str, Callable[[], WorldActionConfig]] = {"tiny": tiny, "40M": jowa_40m, "70M": jowa_70m,
                                                        "150M": jowa_150m}


def model_preset(name: str, **overrides) -> WorldActionConfig:
    """Config of a named preset, with optional field overrides (e.g. mtbc=True)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown model preset '{name}' (choose from {', '.join(PRESETS)})")
    return dataclasses.replace(PRESETS[name](), **overrides)
