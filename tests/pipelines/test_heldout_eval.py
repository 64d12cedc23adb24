"""Held-out accuracies and their baselines: exact per-class reward counts, the balanced reward
accuracy of constant guesses, the copy baseline, all on real segments of the built fixture dataset."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from jowa_data.stream import SegmentStream
from jowa_model.presets import model_preset
from jowa_model.world_action import WorldActionModel
from pipelines.pretrain import heldout_eval, world_accuracy


def constant_reward_model(cls: int) -> WorldActionModel:
    """A tiny model whose reward head always says class `cls` (0: negative, 1: zero, 2: positive)."""
    torch.manual_seed(0)
    model = WorldActionModel(model_preset("tiny"))
    last = model.head_reward[-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.fill_(-10.0)
        last.bias[cls] = 10.0
    return model


@pytest.fixture(scope="module")
def stream(built_dataset):
    return SegmentStream(built_dataset.path, batch_size=8, seq_len=8, seed=0, rank=0, world_size=1, stride=8)


def reward_signs(stream) -> np.ndarray:
    out = []
    for i in range(len(stream)):
        b = stream.gather(stream.batch_ids(0, i))
        out.append(np.sign(b["rewards"].numpy()[b["mask_padding"].numpy()]).astype(int) + 1)
    return np.concatenate(out)


def test_world_accuracy_counts_per_reward_class(stream):
    b = stream.gather(stream.batch_ids(0, 0))
    b["rewards"] = torch.zeros_like(b["rewards"])
    b["rewards"][:, ::3] = 1.0  # a known mix of zero and positive signs
    b["rewards"][:, 1::5] = -2.0
    model = constant_reward_model(2).eval()
    c = world_accuracy(model, b)
    cls = (np.sign(b["rewards"].numpy()) + 1).astype(int)[b["mask_padding"].numpy()]
    expect = np.bincount(cls, minlength=3)
    assert c["rew_class_total"].tolist() == expect.tolist()
    assert c["rew_class_correct"].tolist() == [0, 0, int(expect[2])]  # only the positive steps are right
    assert int(c["rew_correct"]) == int(expect[2]) and int(c["steps"]) == int(expect.sum())
    assert int(c["tok_total_later"]) < int(c["tok_total"])  # frames 2..L are a subset


@pytest.mark.parametrize("cls", [1, 2])
def test_constant_guess_scores_one_over_classes_present(stream, cls):
    signs = reward_signs(stream)
    counts = np.bincount(signs, minlength=3)
    present = int((counts > 0).sum())
    assert present >= 2, "the fixture needs rewarded steps"
    res = heldout_eval(constant_reward_model(cls), stream, 10_000, "cpu", "fp32")
    assert res["eval/reward_class_counts"] == counts.tolist()
    assert res["eval/reward_balanced_acc_baseline"] == pytest.approx(1.0 / present)
    assert res["eval/reward_balanced_acc"] == pytest.approx(1.0 / present)  # a constant guess never beats it
    assert res["eval/reward_acc"] == pytest.approx(counts[cls] / counts.sum())
    assert res["eval/reward_acc_majority"] == pytest.approx(counts.max() / counts.sum())


def test_copy_and_unigram_baselines_exact(stream):
    hits = total = 0
    tok_counts = np.zeros(2048, np.int64)
    for i in range(len(stream)):
        b = stream.gather(stream.batch_ids(0, i))
        t, m = b["tokens"].numpy(), b["mask_padding"].numpy()
        tok_counts += np.bincount(t[m].ravel(), minlength=2048)
        for s in range(t.shape[0]):
            for j in range(1, t.shape[1]):
                if m[s, j] and m[s, j - 1]:
                    hits += int((t[s, j] == t[s, j - 1]).sum())
                    total += t.shape[2]
    res = heldout_eval(constant_reward_model(1), stream, 10_000, "cpu", "fp32")
    assert res["eval/token_acc_copy"] == pytest.approx(hits / total)
    assert res["eval/token_acc_unigram"] == pytest.approx(tok_counts.max() / tok_counts.sum())
    assert 0.0 <= res["eval/token_acc_later"] <= 1.0 and 0.0 <= res["eval/token_acc"] <= 1.0
