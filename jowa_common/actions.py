"""ALE action names and the 18-action full set: the only copy of the action tables.

The model acts in the full 18-action space (one action token vocabulary shared by all games);
DQN-Replay stores indices into each game's *minimal* action set. A manifest lists the minimal set
by ALE action name; `minimal_to_full` maps those names to full ids.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

# Order = ale_py.Action values 0..17 (checked against ale-py in tests/data/test_manifest.py).
FULL_ACTIONS: tuple[str, ...] = (
    "NOOP", "FIRE", "UP", "RIGHT", "LEFT", "DOWN", "UPRIGHT", "UPLEFT", "DOWNRIGHT", "DOWNLEFT",
    "UPFIRE", "RIGHTFIRE", "LEFTFIRE", "DOWNFIRE", "UPRIGHTFIRE", "UPLEFTFIRE", "DOWNRIGHTFIRE",
    "DOWNLEFTFIRE",
)
NUM_FULL_ACTIONS = len(FULL_ACTIONS)  # 18
ACTION_ID: dict[str, int] = {name: i for i, name in enumerate(FULL_ACTIONS)}


def action_ids(names: Sequence[str]) -> np.ndarray:
    """Full-set ids (int64) of the given ALE action names. Raises KeyError on an unknown name."""
    return np.array([ACTION_ID[n] for n in names], dtype=np.int64)


def action_mask(names: Sequence[str]) -> np.ndarray:
    """Bool mask (18,) of the full-set actions that are valid for a game with this minimal set."""
    mask = np.zeros(NUM_FULL_ACTIONS, dtype=bool)
    mask[action_ids(names)] = True
    return mask


def full_to_minimal_table(names: Sequence[str]) -> np.ndarray:
    """(18,) int64: full id -> index in the minimal set, -1 where the action is not valid."""
    table = np.full(NUM_FULL_ACTIONS, -1, dtype=np.int64)
    table[action_ids(names)] = np.arange(len(names))
    return table
