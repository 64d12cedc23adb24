"""Model fixtures: real Atari frames (ale-py) and a tiny tokenizer trained on them, made once per session.

`atari_frames`: uint8 (2*96, 84, 84): 96 Breakout frames then 96 Pong frames, random play, DQN preprocessing
(frame skip 4, max over the last 2 screens, grayscale, 84x84 INTER_AREA). `atari_frames_npy`: the same as a .npy.
`trained_tokenizer`: a `tiny`-preset tokenizer (narrowed to 8 channels so it trains in seconds on CPU) trained
by the real pipeline (`pipelines.train_tokenizer`) on those frames: `.path` (tokenizer.pt), `.run` (run folder),
`.cfg` (TokenizerTrainConfig). Use `.path` wherever a tokenizer checkpoint is needed (e.g. dataset builds).
`tiny_model(**overrides)` / `token_sequence(B, steps)`: a seeded `tiny` world-action model in eval mode and
random interleaved token rows for it, shared by the model tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

FIXTURE_FRAMES_PER_GAME = 96
# tiny preset, narrower: the fixture must train in seconds on a shared 2-core CPU.
FIXTURE_TRAIN_SETS = {"model": {"ch": 8}, "batch_size": 16, "lr": 3e-3, "steps": 40, "log_every": 5,
                      "ckpt_every": 20, "image_every": 0, "tensorboard": False, "seed": 0}


def tiny_model(**overrides):
    """The `tiny` world-action model (WorldActionConfig field overrides), seeded, in eval mode."""
    import torch

    from jowa_model.presets import model_preset
    from jowa_model.world_action import WorldActionModel

    torch.manual_seed(0)
    return WorldActionModel(model_preset("tiny", **overrides)).eval()


def token_sequence(B: int, steps: int, seed: int = 0):
    """(B, steps*37) long interleaved tokens: obs codes at obs positions, action ids at every 37th."""
    import torch

    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 2048, (B, steps, 36), generator=g)
    actions = torch.randint(0, 18, (B, steps, 1), generator=g)
    return torch.cat([tokens, actions], -1).view(B, -1)


def ale_frames(rom: str, n: int, seed: int = 0) -> np.ndarray:
    """`n` preprocessed frames of random play in `rom` (resets on game over)."""
    import ale_py
    import cv2

    ale = ale_py.ALEInterface()
    ale.setLoggerMode(ale_py.LoggerMode.Error)
    ale.setInt("random_seed", seed)
    ale.setFloat("repeat_action_probability", 0.0)
    ale.loadROM(ale_py.roms.get_rom_path(rom))
    actions = ale.getMinimalActionSet()
    rng = np.random.default_rng(seed)
    out = np.empty((n, 84, 84), dtype=np.uint8)
    for i in range(n):
        a = actions[rng.integers(len(actions))]
        screens = []
        for _ in range(4):
            ale.act(a)
            screens.append(ale.getScreenGrayscale())
        frame = np.maximum(screens[-1], screens[-2])
        out[i] = cv2.resize(frame, (84, 84), interpolation=cv2.INTER_AREA)
        if ale.game_over():
            ale.reset_game()
    return out


@pytest.fixture(scope="session")
def atari_frames() -> np.ndarray:
    n = FIXTURE_FRAMES_PER_GAME
    return np.concatenate([ale_frames("breakout", n, seed=1), ale_frames("pong", n, seed=2)])


@pytest.fixture(scope="session")
def atari_frames_npy(tmp_path_factory, atari_frames) -> Path:
    path = tmp_path_factory.mktemp("frames") / "frames.npy"
    np.save(path, atari_frames, allow_pickle=False)
    return path


@dataclass
class TrainedTokenizer:
    path: Path  # tokenizer.pt
    run: Path  # run folder (checkpoint.pt, metrics.jsonl, ...)
    cfg: object  # TokenizerTrainConfig
    summary: dict


@pytest.fixture(scope="session")
def trained_tokenizer(tmp_path_factory, atari_frames_npy) -> TrainedTokenizer:
    from jowa_common.config import apply_overrides
    from pipelines.train_tokenizer import train_preset, train_tokenizer

    cfg = apply_overrides(train_preset("tiny"), FIXTURE_TRAIN_SETS)
    run = tmp_path_factory.mktemp("tokenizer_run")
    summary = train_tokenizer(cfg, run, frames=atari_frames_npy, progress=False)
    return TrainedTokenizer(path=run / "tokenizer.pt", run=run, cfg=cfg, summary=summary)
