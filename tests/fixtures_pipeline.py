"""Pipeline fixtures: a token dataset built by the real pipeline from the recorded replay, once per session.

`built_dataset`: Pong + Phoenix recorded with the real emulator (tests/fixtures_data.py), all complete
episodes, tokenized by a tiny VQ-VAE (fixed random weights: the real encode path, deterministic tokens)
and written as zarr shards by `jowa_data.build`. `built_heldout`: the same games, another recorded run.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch


@dataclass
class BuiltDataset:
    path: Path
    tokenizer: Path
    replay_root: Path


def build_from_replay(replay_root: Path, tokenizer: Path, out: Path, games=("Pong", "Phoenix"),
                      runs: tuple[int, ...] | None = None) -> Path:
    from jowa_data.build import BuildConfig, build_dataset
    from jowa_data.manifest import load_manifests
    from jowa_data.subsample import SubsampleOptions

    reg = load_manifests()
    sel = SubsampleOptions(checkpoints=(0, 50), fraction=1.0, allow_fewer_runs=True, runs=runs, seed=0)
    build_dataset([reg.get(g) for g in games], replay_root, tokenizer, out,
                  BuildConfig(formats=("zarr",), selection=sel, progress=False, workers=1))
    return out


@pytest.fixture(scope="session")
def tiny_tokenizer_ckpt(tmp_path_factory) -> Path:
    from jowa_model.tokenizer import Tokenizer, save_tokenizer, tokenizer_preset

    torch.manual_seed(0)
    return save_tokenizer(Tokenizer(tokenizer_preset("tiny")), tmp_path_factory.mktemp("tok") / "tok.pt")


@pytest.fixture(scope="session")
def built_dataset(recorded_replay, tiny_tokenizer_ckpt, tmp_path_factory) -> BuiltDataset:
    out = build_from_replay(recorded_replay.root, tiny_tokenizer_ckpt, tmp_path_factory.mktemp("built") / "ds")
    return BuiltDataset(out, tiny_tokenizer_ckpt, recorded_replay.root)
