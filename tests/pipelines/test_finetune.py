"""Fine-tuning on a game the pretraining never saw (Bowling, defined by a manifest file alone): own task id and
action mask, planning-based synthetic data (tokens stay tokens, dummy step masked), evaluation on the real
emulator, best.pt/report.json, exact resume, CLI errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from jowa_common.config import apply_overrides
from jowa_common.errors import ConfigError, DatasetError
from jowa_data.manifest import load_manifests
from jowa_model.checkpoint import load_world_action
from jowa_model.losses import LossConfig, compute_loss, td_targets_mask
from jowa_model.planner import WorldModelImagination
from pipelines.finetune import (ContextSampler, FinetuneConfig, FinetuneDataConfig, build_finetune_dataset,
                                check_dataset, finetune, finetune_loss, finetune_preset, imagine_segments,
                                load_pretrained)
from pipelines.pretrain import pretrain, train_preset
from pipelines.viz import read_metrics
from tests.fixtures_data import make_recorded_replay
from tests.killpoint import run_killed

BOWLING_FULL_IDS = {0, 1, 2, 5, 10, 13}  # NOOP, FIRE, UP, DOWN, UPFIRE, DOWNFIRE


@pytest.fixture(scope="module")
def pretrained(built_dataset, tmp_path_factory) -> Path:
    """A tiny world-action model pretrained (both stages) on Pong + Phoenix only."""
    cfg = apply_overrides(train_preset("tiny"), {"data": {"dataset": str(built_dataset.path), "batch_size": 4},
                                                 "stage1_steps": 1, "stage2_steps": 1, "log_every": 1,
                                                 "ckpt_every": 2, "eval_every": 0})
    return Path(pretrain(cfg, tmp_path_factory.mktemp("pretrained"))["checkpoint"])


@pytest.fixture(scope="module")
def bowling(bowling_manifest_dir, built_dataset, tmp_path_factory):
    """Bowling recorded on the real emulator and built into a small fine-tuning set (checkpoints 1-2)."""
    root = tmp_path_factory.mktemp("bowling")
    make_recorded_replay(root / "replay", games=("Bowling",), steps=400, capacity=150,
                         manifest_dirs=[bowling_manifest_dir])
    manifest = load_manifests([bowling_manifest_dir]).get("Bowling")
    ds = build_finetune_dataset(manifest, root / "replay", built_dataset.tokenizer, root / "ds",
                                FinetuneDataConfig(transitions=120, checkpoints=(1, 2)), progress=False)
    return manifest, ds


def tiny_cfg(bowling_manifest_dir, tokenizer, dataset, **over) -> FinetuneConfig:
    base = {"game": "Bowling", "tokenizer": str(tokenizer), "manifests": [str(bowling_manifest_dir)],
            "data": {"dataset": str(dataset), "batch_size": 4}, "steps": 3, "log_every": 1, "ckpt_every": 2,
            "imagine": {"batch_size": 2, "after_steps": 0},
            "eval": {"every": 2, "episodes": 2, "max_frames": 60, "epsilon": 0.0}}
    for k, v in over.items():
        base[k] = base[k] | v if isinstance(v, dict) else v
    return apply_overrides(finetune_preset("tiny"), base)


def test_dataset_is_the_new_game_with_its_own_task_id(bowling, built_dataset):
    manifest, ds = bowling
    info = json.loads((ds / "info.json").read_text())
    assert list(info["games"]) == ["Bowling"] and info["games"]["Bowling"]["task_id"] == 11
    assert info["games"]["Bowling"]["transitions"] >= 100
    check_dataset(ds, manifest, built_dataset.tokenizer)
    with pytest.raises(DatasetError, match=r"info\.json.*Bowling alone"):
        check_dataset(built_dataset.path, manifest, None)


def test_acceptance_finetune_new_game_with_imagination(pretrained, bowling, bowling_manifest_dir, built_dataset,
                                                       tmp_path):
    manifest, ds = bowling
    pre, _ = load_world_action(pretrained)
    assert pre.action_masks[11].all()  # pretraining never set Bowling's row
    cfg = tiny_cfg(bowling_manifest_dir, built_dataset.tokenizer, ds)
    played = []
    rep = finetune(cfg, pretrained, tmp_path / "ft", on_eval=lambda s, r: played.append((s, r)), progress=False)

    # evaluated on the real emulator at steps 2 and 3, only with Bowling's valid actions
    assert [s for s, _ in played] == [2, 3] and [e["step"] for e in rep["evals"]] == [2, 3]
    for _, r in played:
        assert len(r.returns) == 2 and all(0 < n <= 15 for n in r.steps)  # 60 frames = 15 agent steps
        assert set(r.actions) <= BOWLING_FULL_IDS and len(r.actions) == sum(r.steps)
    # imagined samples were produced and used in every step's loss
    rows = read_metrics(tmp_path / "ft" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(r["imagine/segments"] == 2 and r["imagine/td_targets"] > 0 and r["imagine/cql_steps"] > 0
               for r in rows)
    assert rows[-1]["imagine/total"] == 6 and rep["imagined_segments"] == 6
    # best snapshot by mean return, with the game's own action-mask row
    best = max(rep["evals"], key=lambda e: (e["mean"], -e["step"]))
    assert rep["best"]["step"] == best["step"] and rep["best"]["mean"] == best["mean"]
    model, ckpt = load_world_action(tmp_path / "ft" / "best.pt")
    assert ckpt["finetune_best"]["step"] == best["step"] and ckpt["finetune_best"]["task_id"] == 11
    assert torch.equal(model.action_masks[11], torch.from_numpy(manifest.action_mask))
    assert int(model.action_masks[11].sum()) == 6
    assert torch.equal(model.action_masks[39], pre.action_masks[39])  # Pong's row untouched
    assert json.loads((tmp_path / "ft" / "report.json").read_text()) == json.loads(json.dumps(rep))


def _contexts(ds, n=3):
    return ContextSampler(ds, context=6, batch_size=n, seed=0, backend="zarr", stride=1).sample()


def test_imagined_segments_keep_tokens_and_mask_the_dummy(pretrained, bowling):
    manifest, ds = bowling
    model = load_pretrained(pretrained, manifest, "cpu")
    with torch.no_grad():  # never "done": the whole imagined path exists (see the next test for terminals)
        model.head_end[-1].bias.copy_(torch.tensor([1e4, -1e4]))
    ctx = _contexts(ds)
    assert (ctx["task_ids"] == 11).all() and ctx["mask_padding"].all()
    out = imagine_segments(model, ctx, horizon=2, beam_width=2)
    n = ctx["tokens"].shape[0]
    assert out["tokens"].shape == (n, 8, 36) and out["actions"].shape == (n, 8)
    assert torch.equal(out["tokens"][:, :6], ctx["tokens"])
    assert torch.equal(out["actions"][:, :5], ctx["actions"][:, :5])
    assert torch.equal(out["actions"][:, 5], out["root_actions"])  # the planner's root action
    assert torch.equal(out["actions"][:, 7], out["actions"][:, 6])  # dummy = copy of a_2
    assert set(out["actions"][:, 5:].flatten().tolist()) <= BOWLING_FULL_IDS
    assert out["rewards"][:, 7].eq(0).all() and out["ends"][:, 7].eq(0).all()
    # the imagined frames are exactly the greedy tokens of the chosen path (no pixel round trip)
    imag = WorldModelImagination(model)
    st, _ = imag.start(ctx["tokens"], ctx["actions"][:, :5], ctx["task_ids"])
    for d in range(2):
        st, step = imag.step(st, out["actions"][:, 5 + d])
        assert torch.equal(out["tokens"][:, 6 + d], step.obs_tokens)
        assert torch.equal(out["rewards"][:, 5 + d], step.rewards)
    # TD on steps 0..6 (step 6 bootstraps from the dummy's state); CQL on 0..6, never on the dummy
    assert out["ends"].eq(0).all() and out["mask_padding"].all()
    assert out["cql_mask"][:, :7].all() and not out["cql_mask"][:, 7].any()
    assert td_targets_mask(out["mask_padding"], out["ends"].bool()).sum(1).tolist() == [7] * n


def test_predicted_terminal_is_absorbing(pretrained, bowling):
    manifest, ds = bowling
    model = load_pretrained(pretrained, manifest, "cpu")
    with torch.no_grad():  # force "done" at every action token
        model.head_end[-1].bias.copy_(torch.tensor([-1e4, 1e4]))
    out = imagine_segments(model, _contexts(ds), horizon=2, beam_width=2)
    assert out["ends"][:, 5].eq(1).all() and out["ends"][:, 6:].eq(0).all()
    assert out["mask_padding"][:, :6].all() and not out["mask_padding"][:, 6:].any()
    assert not out["cql_mask"][:, 6:].any() and out["rewards"][:, 6:].eq(0).all()
    has = td_targets_mask(out["mask_padding"], out["ends"].bool())
    assert has[:, 5].all() and not has[:, 6:].any()  # step 5 targets r̂_1 alone


def test_dummy_step_does_not_reach_the_loss(pretrained, bowling):
    manifest, ds = bowling
    model = load_pretrained(pretrained, manifest, "cpu")
    with torch.no_grad():
        model.head_end[-1].bias.copy_(torch.tensor([1e4, -1e4]))  # no predicted terminal: step 6 is live
    real = ContextSampler(ds, context=8, batch_size=2, seed=3, backend="zarr", stride=1).sample()
    imagined = imagine_segments(model, _contexts(ds), horizon=2, beam_width=2)
    model.eval()  # no dropout: exact comparisons
    cfg = LossConfig(world_weight=0.5)
    base, terms = finetune_loss(model, real, imagined, cfg)
    other = dict(imagined, actions=imagined["actions"].clone())
    other["actions"][:, 7] = (other["actions"][:, 7] + 1) % 18  # another dummy action
    assert torch.equal(finetune_loss(model, real, other, cfg)[0], base)
    other["actions"][:, 7] = (other["actions"][:, 7] + 1) % 18
    assert torch.equal(finetune_loss(model, real, other, cfg)[0], base)
    changed = dict(imagined, actions=imagined["actions"].clone())
    changed["actions"][:, 6] = torch.where(changed["actions"][:, 6] == 1, 3, 1)  # a_2 matters
    assert not torch.equal(finetune_loss(model, real, changed, cfg)[0], base)
    # the world loss sees only the real rows: it equals the loss without imagined data
    _, t_real = finetune_loss(model, real, None, cfg)
    assert torch.equal(terms["train/loss_obs"], t_real["train/loss_obs"])


def test_finetune_and_pretrain_share_one_loss(pretrained, bowling):
    """On real data alone, fine-tuning's loss is pretraining's stage-2 loss (same code path): equal values and
    equal gradients. With imagined rows, CQL reads the imagined `cql_mask` and the world loss only the real rows."""
    manifest, ds = bowling
    model = load_pretrained(pretrained, manifest, "cpu").eval()  # no dropout: exact comparisons
    real = ContextSampler(ds, context=8, batch_size=3, seed=1, backend="zarr", stride=1).sample()
    cfg = LossConfig(world_weight=0.5, cql_alpha=0.3)
    ft_total, ft_terms = finetune_loss(model, real, None, cfg)
    grads_ft = torch.autograd.grad(ft_total, [p for p in model.parameters() if p.requires_grad])
    pre = compute_loss(model, real, cfg, stage=2)
    grads_pre = torch.autograd.grad(pre.total, [p for p in model.parameters() if p.requires_grad])
    assert torch.equal(ft_total, pre.total) and ft_terms["train/loss_td"] == pre.td
    assert ft_terms["train/loss_cql"] == pre.cql and ft_terms["train/q_data"] == pre.q_data
    assert all(torch.equal(a, b) for a, b in zip(grads_ft, grads_pre))
    # expected Q in fp32 on both paths (a bf16 matmul under autocast used to blur fine-tuning's CQL values)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a, _ = finetune_loss(model, real, None, cfg)
        b = compute_loss(model, real, cfg, stage=2).total
    assert torch.equal(a, b)


def test_resume_is_exact(pretrained, bowling, bowling_manifest_dir, built_dataset, tmp_path):
    _, ds = bowling
    cfg = tiny_cfg(bowling_manifest_dir, built_dataset.tokenizer, ds, steps=4,
                   eval={"every": 0, "episodes": 1, "max_frames": 20})
    full = finetune(cfg, pretrained, tmp_path / "a", progress=False)
    finetune(cfg, pretrained, tmp_path / "b", stop_after=2, progress=False)
    stopped = json.loads((tmp_path / "b" / "report.json").read_text())
    assert stopped["steps"] == 2 and stopped["evals"] == [] and stopped["best"] is None  # eval.every=0: end only
    resumed = finetune(cfg, pretrained, tmp_path / "b", progress=False)
    a, _ = load_world_action(tmp_path / "a" / "ckpt" / "step_00000004.pt")
    b, _ = load_world_action(tmp_path / "b" / "ckpt" / "step_00000004.pt")
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k
    assert full["evals"] == resumed["evals"] and resumed["imagined_segments"] == 8
    assert [r["step"] for r in read_metrics(tmp_path / "b" / "metrics.jsonl")] == [1, 2, 3, 4]
    with pytest.raises(ConfigError, match="cannot resume"):
        finetune(apply_overrides(cfg, {"imagine": {"horizon": 1}}), pretrained, tmp_path / "b", progress=False)


def test_cli(pretrained, bowling, bowling_manifest_dir, built_dataset, tmp_path):
    from pipelines.cli import main

    _, ds = bowling
    common = ["finetune", str(pretrained), "--game", "Bowling", "--tokenizer", str(built_dataset.tokenizer),
              "--manifests", str(bowling_manifest_dir), "--preset", "tiny"]
    r = CliRunner().invoke(main, common + ["--data", str(ds), "--out", str(tmp_path / "ok"), "--steps", "1",
                                           "--set", "data.batch_size=4", "--set", "imagine.batch_size=2",
                                           "--set", "eval.episodes=1", "--set", "eval.max_frames=20", "--json"],
                           prog_name="jowa", catch_exceptions=False)
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    assert rep["task_id"] == 11 and rep["steps"] == 1 and rep["imagined_segments"] == 2
    assert (tmp_path / "ok" / "best.pt").is_file()
    # a dataset of other games: exit 1, the message names its info.json
    r = CliRunner().invoke(main, common + ["--data", str(built_dataset.path), "--out", str(tmp_path / "bad")])
    assert r.exit_code == 1 and "info.json" in r.output and "Bowling alone" in r.output
    # tokens from another tokenizer would not match the frames seen at evaluation
    from jowa_model.tokenizer import Tokenizer, save_tokenizer, tokenizer_preset

    torch.manual_seed(1)
    other = save_tokenizer(Tokenizer(tokenizer_preset("tiny")), tmp_path / "other.pt")
    bad = [str(pretrained), "--game", "Bowling", "--tokenizer", str(other), "--manifests",
           str(bowling_manifest_dir), "--data", str(ds), "--out", str(tmp_path / "bad2")]
    r = CliRunner().invoke(main, ["finetune"] + bad)
    assert r.exit_code == 1 and "other.pt" in r.output and "checksums differ" in r.output
    r = CliRunner().invoke(main, common + ["--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "--data" in r.output
    r = CliRunner().invoke(main, ["finetune", str(pretrained), "--game", "Nope", "--tokenizer",
                                  str(built_dataset.tokenizer), "--data", str(ds), "--out", str(tmp_path / "y")])
    assert r.exit_code == 1 and "Nope" in r.output


def test_cli_builds_the_small_set_from_replay(pretrained, bowling, bowling_manifest_dir, built_dataset, tmp_path):
    """--replay: the 5k-style set (here 120 transitions of checkpoints 1-2) is built into OUT/data, then used."""
    from pipelines.cli import main

    _, ds = bowling
    out = tmp_path / "run"
    r = CliRunner().invoke(main, ["finetune", str(pretrained), "--game", "Bowling", "--tokenizer",
                                  str(built_dataset.tokenizer), "--manifests", str(bowling_manifest_dir),
                                  "--replay", str(ds.parent / "replay"), "--out", str(out), "--preset", "tiny",
                                  "--steps", "1", "--no-imagine", "--world-weight", "0.25",
                                  "--set", "data.checkpoints=[1, 2]", "--set", "data.transitions=120",
                                  "--set", "data.batch_size=4", "--set", "eval.episodes=1",
                                  "--set", "eval.max_frames=20"], prog_name="jowa", catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert "best: step 1" in r.output and "0 imagined segments" in r.output
    built = json.loads((out / "data" / "info.json").read_text())
    assert built["games"] == json.loads((ds / "info.json").read_text())["games"]  # same selection, same episodes
    saved = json.loads((out / "config.json").read_text())
    assert saved["loss"]["world_weight"] == 0.25 and saved["imagine"]["enabled"] is False
    assert saved["data"]["checkpoints"] == [1, 2]


@pytest.mark.multiproc
def test_kill_while_a_checkpoint_is_a_temp_file(pretrained, bowling, bowling_manifest_dir, built_dataset, tmp_path):
    """`jowa finetune` SIGKILLed just before its step-2 checkpoint's temp file is renamed; the rerun removes the
    temp file, resumes from what was published and ends with the weights of an uninterrupted run."""
    import signal

    _, ds = bowling
    args = ["finetune", str(pretrained), "--game", "Bowling", "--tokenizer", str(built_dataset.tokenizer),
            "--manifests", str(bowling_manifest_dir), "--preset", "tiny", "--data", str(ds), "--steps", "3",
            "--set", "data.batch_size=4", "--set", "imagine.batch_size=2", "--set", "eval.every=0",
            "--set", "eval.episodes=1", "--set", "eval.max_frames=20", "--set", "ckpt_every=1"]
    run = tmp_path / "killed"
    r = run_killed(r"/\.step_00000002\.pt\.[^/]+\.tmp$", 1, "pipelines.cli", [*args, "--out", run], timeout=600)
    assert r.returncode == -signal.SIGKILL, r.stderr[-3000:]
    temps = list((run / "ckpt").glob(".step_00000002.pt.*.tmp"))
    assert len(temps) == 1 and not (run / "ckpt" / "step_00000002.pt").exists()
    from pipelines.cli import main

    r = CliRunner().invoke(main, args + ["--out", str(run)])
    assert r.exit_code == 0, r.output
    assert not temps[0].exists()
    r = CliRunner().invoke(main, args + ["--out", str(tmp_path / "full")])
    assert r.exit_code == 0, r.output
    a, _ = load_world_action(tmp_path / "full" / "ckpt" / "step_00000003.pt")
    b, _ = load_world_action(run / "ckpt" / "step_00000003.pt")
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k
