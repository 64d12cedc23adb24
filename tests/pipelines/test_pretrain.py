"""Pretraining: two stages in one run, real DDP gradient averaging (2 gloo processes), exact resume after SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from jowa_common.config import apply_overrides
from jowa_model.checkpoint import load_world_action
from pipelines.pretrain import train_preset, pretrain
from pipelines.viz import read_metrics
from tests.killpoint import run_killed


def small_cfg(dataset: Path, **over):
    cfg = train_preset("tiny")
    base = {"data": {"dataset": str(dataset), "batch_size": 8}, "stage1_steps": 3, "stage2_steps": 3,
            "log_every": 1, "ckpt_every": 2, "eval_every": 0}
    return apply_overrides(cfg, _merge(base, over))


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def test_two_stages_one_run(built_dataset, tmp_path, capsys):
    cfg = small_cfg(built_dataset.path)
    out = pretrain(cfg, tmp_path / "run")
    err = capsys.readouterr().err  # the progress line: stage, step / total, losses, tokens/s (tqdm adds the ETA)
    assert "pretrain 3+3" in err and "6/6" in err and "stage=2" in err and "tok/s=" in err and "td=" in err
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert [r["stage"] for r in rows] == [1, 1, 1, 2, 2, 2]
    assert all(r["train/loss_td"] == 0.0 for r in rows[:3]) and all(r["train/loss_td"] > 0 for r in rows[3:])
    model, ckpt = load_world_action(out["checkpoint"])
    assert ckpt["train"]["step"] == 6 and ckpt["train"]["stage"] == 2
    # the stage-2 optimizer has the stage-2 LRs (no off-by-one at the switch)
    lrs = sorted({g["lr"] for g in ckpt["optimizer"]["param_groups"]})
    assert lrs == sorted({cfg.optim.lr_stage2, cfg.optim.critic_lr})
    # the Q head learned in stage 2 only; the target head was copied from it (step % 1000 != 0: initial copy)
    assert (tmp_path / "run" / "config.json").is_file() and list((tmp_path / "run" / "tb").iterdir())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


RANK_SCRIPT = r"""
import json, os, sys, torch
torch.set_num_threads(1)
from jowa_common.config import config_from_dict
from pipelines.pretrain import PretrainConfig, pretrain
import pipelines.pretrain as P
cfg = config_from_dict(PretrainConfig, json.loads(sys.argv[1]))
captured = {}
orig = P.wrap
def spy(module, info):
    captured["model"] = module.model
    return orig(module, info)
P.wrap = spy
pretrain(cfg, sys.argv[2])
sd = {k: v.detach().cpu() for k, v in captured["model"].state_dict().items()}
torch.save(sd, os.path.join(sys.argv[3], f"params_rank{os.environ['RANK']}.pt"))
"""


@pytest.mark.multiproc
def test_ddp_two_ranks_average_gradients(built_dataset, tmp_path):
    from jowa_common.config import config_to_dict

    cfg = small_cfg(built_dataset.path, model={"dropout": 0.0, "q_dropout": 0.0}, stage1_steps=2, stage2_steps=3,
                    ckpt_every=100)
    # single process on the global batch of 8
    torch.manual_seed(0)
    single = pretrain(cfg, tmp_path / "single")
    ref, _ = load_world_action(single["checkpoint"])
    # two real processes (gloo), 4 segments each
    port = _free_port()
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, "-c", RANK_SCRIPT, json.dumps(config_to_dict(cfg)),
                                       str(tmp_path / "ddp"), str(tmp_path)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    for p in procs:
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0, out.decode()[-3000:]
    p0 = torch.load(tmp_path / "params_rank0.pt", weights_only=True)
    p1 = torch.load(tmp_path / "params_rank1.pt", weights_only=True)
    for k, v in ref.state_dict().items():
        assert torch.equal(p0[k], p1[k]), f"ranks differ in {k}"  # DDP kept the replicas identical
        torch.testing.assert_close(p0[k], v, rtol=1e-4, atol=1e-5, msg=f"DDP != single process in {k}")
    # and training did move the weights (a no-op run would pass the equalities trivially)
    torch.manual_seed(0)
    from jowa_model.world_action import WorldActionModel
    init = WorldActionModel(cfg.model).state_dict()
    assert any(not torch.equal(init[k], p0[k]) for k in init if k in p0 and init[k].dtype.is_floating_point)


def _run_cli(args: list[str], **kw) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "pipelines.cli", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, **kw)


@pytest.mark.slow
def test_resume_after_sigkill_continues_the_curve_exactly(built_dataset, tmp_path):
    sets = ["--set", "stage1_steps=4", "--set", "stage2_steps=6", "--set", "log_every=1", "--set", "ckpt_every=3",
            "--set", "data.batch_size=8", "--set", "keep_ckpts=2"]
    base = ["train", "tiny", "--data", str(built_dataset.path), *sets]
    p = _run_cli([*base, "--out", str(tmp_path / "full")])
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 0, out.decode()[-3000:]
    full = read_metrics(tmp_path / "full" / "metrics.jsonl")
    assert len(full) == 10

    # the same run, SIGKILLed while its step-6 checkpoint is a complete temp file not yet renamed (the exact
    # window of a checkpoint write), then rerun as is: it resumes from step 3 and removes the temp file
    run = tmp_path / "killed"
    r = run_killed(r"/\.step_00000006\.pt\.[^/]+\.tmp$", 1, "pipelines.cli", [*base, "--out", run])
    assert r.returncode == -signal.SIGKILL, r.stderr[-3000:]
    temps = list((run / "ckpt").glob(".step_00000006.pt.*.tmp"))
    assert len(temps) == 1 and not (run / "ckpt" / "step_00000006.pt").exists()
    assert [c.name for c in (run / "ckpt").glob("step_*")] == ["step_00000003.pt"]
    p = _run_cli([*base, "--out", str(run)])
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 0, out.decode()[-3000:]
    assert not temps[0].exists()
    resumed = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in resumed] == list(range(1, 11))
    for a, b in zip(full, resumed):
        for k in ("train/loss", "train/loss_obs", "train/loss_td", "train/loss_cql", "train/grad_norm"):
            assert a[k] == b[k], (a["step"], k, a[k], b[k])
    fa, _ = load_world_action(tmp_path / "full" / "ckpt" / "step_00000010.pt")
    fb, _ = load_world_action(run / "ckpt" / "step_00000010.pt")
    for k, v in fa.state_dict().items():
        assert torch.equal(v, fb.state_dict()[k]), k


def test_resume_with_other_shape_is_refused(built_dataset, tmp_path):
    from jowa_common.errors import ConfigError

    pretrain(small_cfg(built_dataset.path, stage1_steps=1, stage2_steps=1), tmp_path / "r")
    with pytest.raises(ConfigError, match="data.batch_size"):
        pretrain(small_cfg(built_dataset.path, stage1_steps=1, stage2_steps=2, data={"batch_size": 4}), tmp_path / "r")
    # another loss (e.g. the critic's backup, an ablation) is another run: resuming into it would mix two objectives
    with pytest.raises(ConfigError, match="loss"):
        pretrain(small_cfg(built_dataset.path, stage1_steps=1, stage2_steps=2, loss={"td_backup": "max"}), tmp_path / "r")


def test_paper_presets_keep_the_paper_backup_and_tiny_opts_in():
    """The paper sizes bootstrap from max_a Q (Eq. 8); only the CPU presets use the data's next action, and
    fine-tuning continues with the backup its pretraining used (docs/learning.md has the measurement)."""
    from jowa_model.losses import LossConfig
    from pipelines.finetune import finetune_preset

    assert LossConfig().td_backup == "max"
    for name in ("40M", "70M", "150M"):
        assert train_preset(name).loss == LossConfig()
    assert finetune_preset("paper").loss.td_backup == "max"
    assert train_preset("tiny").loss.td_backup == finetune_preset("tiny").loss.td_backup == "data"
