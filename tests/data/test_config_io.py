"""Dataclass config overrides (strict) and atomic writes."""

import json
import os
from dataclasses import dataclass, field

import numpy as np
import pytest

from jowa_common.config import apply_overrides, config_to_dict, load_override_file, parse_set_args, resolve_config
from jowa_common.errors import CheckpointError, ConfigError
from jowa_common.io import atomic_path, atomic_torch_save, atomic_write_json, safe_torch_load, sha256_file


@dataclass
class Inner:
    lr: float = 1e-4
    steps: int = 10


@dataclass
class Outer:
    name: str = "tiny"
    dims: tuple[int, ...] = (1, 2)
    inner: Inner = field(default_factory=Inner)
    tag: str | None = None


def test_overrides_nested_and_typed(tmp_path):
    cfg = apply_overrides(Outer(), {"inner": {"lr": 1, "steps": 3}, "dims": [4, 5, 6]})
    assert cfg.inner.lr == 1.0 and isinstance(cfg.inner.lr, float) and cfg.dims == (4, 5, 6)
    assert Outer().inner.lr == 1e-4  # the preset is untouched
    f = tmp_path / "o.toml"
    f.write_text('name = "x"\n[inner]\nsteps = 7\n')
    cfg = resolve_config(Outer(), f, ["inner.lr=0.5", "tag=hello"])
    assert (cfg.name, cfg.inner.steps, cfg.inner.lr, cfg.tag) == ("x", 7, 0.5, "hello")
    y = tmp_path / "o.yaml"
    y.write_text("inner:\n  steps: 9\n")
    assert load_override_file(y) == {"inner": {"steps": 9}}
    assert config_to_dict(cfg)["dims"] == [1, 2]


def test_unknown_key_and_bad_type():
    with pytest.raises(ConfigError, match="unknown config key 'inner.lrr'.*did you mean 'inner.lr'"):
        apply_overrides(Outer(), {"inner": {"lrr": 1}})
    with pytest.raises(ConfigError, match="inner.steps: expected an integer"):
        apply_overrides(Outer(), parse_set_args(["inner.steps=1.5"]))
    with pytest.raises(ConfigError, match="key=value"):
        parse_set_args(["novalue"])


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "a.json"
    atomic_write_json(target, {"b": 1, "a": 2})
    assert json.loads(target.read_text()) == {"a": 2, "b": 1}
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("partial")
            raise RuntimeError("killed")
    assert json.loads(target.read_text()) == {"a": 2, "b": 1}
    assert os.listdir(tmp_path) == ["a.json"]


def test_safe_torch_load_refuses_pickled_code(tmp_path):
    import torch

    p = tmp_path / "ok.pt"
    atomic_torch_save({"w": torch.ones(2)}, p)
    assert torch.equal(safe_torch_load(p)["w"], torch.ones(2))
    bad = tmp_path / "bad.pt"
    torch.save({"obj": np.random.default_rng(0)}, bad)  # arbitrary object: needs unpickling
    with pytest.raises(CheckpointError, match="bad.pt") as e:
        safe_torch_load(bad)
    assert "\n" not in str(e.value) and str(e.value).endswith("jowa loads weights only")
    with pytest.raises(CheckpointError, match="not found"):
        safe_torch_load(tmp_path / "missing.pt")
    assert len(sha256_file(p)) == 64


def test_atomic_files_get_normal_permissions(tmp_path):
    target = tmp_path / "x.json"
    atomic_write_json(target, {})
    mask = os.umask(0)
    os.umask(mask)
    assert (target.stat().st_mode & 0o777) == (0o666 & ~mask)
