"""How well a world-action model predicts held-out data, beside the baselines it must beat.

Atari frames change little from one step to the next, so a model that copies the previous frame's tokens is the
bar for next-frame prediction (`copy`); the tokens that DO change are where the model has to know the game
(copying scores 0 there by definition). Rewards are rare, so a constant guess of the most frequent reward sign
(`majority`) is the bar for reward prediction, and the balanced accuracy (mean recall over the classes present)
shows whether rewards are predicted at all.

`world_predictions` is the teacher-forced argmax of every head; `world_accuracy` and `heldout_eval` give the
training log's aggregate figures; `world_model_report` gives them per game over a whole held-out dataset.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from jowa_model.world_action import WorldActionModel
from pipelines.train_core import autocast_ctx, to_device


@torch.no_grad()
def world_predictions(model: WorldActionModel, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Teacher-forced argmax predictions: `tokens` (B, L, K) of every obs token from the tokens before it (frame
    0's first token has no prediction: -1), `rewards` (B, L) reward class sign+1, `ends` (B, L)."""
    h = model(batch["tokens"], batch["actions"], batch["task_ids"])  # (B, L, K+1, D)
    B, L, K1, D = h.shape
    K = K1 - 1
    # positions 0..K-2 of a block predict its next obs token, its action token (K) the next block's first one
    h_obs = torch.cat([h[:, :, : K - 1], h[:, :, K:]], dim=2).reshape(B, L * K, D)[:, :-1]
    pred = torch.cat([torch.full((B, 1), -1, dtype=torch.long, device=h.device),
                      model.obs_logits(h_obs).argmax(-1)], dim=1).view(B, L, K)
    h_act = h[:, :, K]
    return {"tokens": pred, "rewards": model.reward_logits(h_act).argmax(-1),
            "ends": model.end_logits(h_act).argmax(-1)}


@torch.no_grad()
def world_accuracy(model: WorldActionModel, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Correct/total counts of next-obs-token, reward-sign and termination predictions on real steps."""
    p = world_predictions(model, batch)
    B, L, K = batch["tokens"].shape
    mask = batch["mask_padding"]
    valid = mask.repeat_interleave(K, dim=1)[:, 1:]
    tok_ok = (p["tokens"].reshape(B, L * K)[:, 1:] == batch["tokens"].reshape(B, L * K)[:, 1:]) & valid
    rew_cls = (torch.sign(batch["rewards"]) + 1).long()  # {0: negative, 1: zero, 2: positive}
    rew_ok = (p["rewards"] == rew_cls) & mask
    end_ok = (p["ends"] == batch["ends"].long()) & mask
    # per-class counts for the balanced (mean per-class recall) reward accuracy: rewards are rare
    rew_by_class = torch.zeros(3, dtype=torch.long, device=rew_cls.device)
    rew_by_class.index_add_(0, rew_cls[mask], torch.ones_like(rew_cls[mask]))
    rew_ok_by_class = torch.zeros(3, dtype=torch.long, device=rew_cls.device)
    rew_ok_by_class.index_add_(0, rew_cls[rew_ok], torch.ones_like(rew_cls[rew_ok]))
    return {"tok_correct": tok_ok.sum(), "tok_total": valid.sum(),
            "tok_correct_later": tok_ok[:, K - 1:].sum(), "tok_total_later": valid[:, K - 1:].sum(),  # frames 2..L
            "rew_correct": rew_ok.sum(),
            "end_correct": end_ok.sum(), "steps": mask.sum(), "rew_class_total": rew_by_class,
            "rew_class_correct": rew_ok_by_class}


def heldout_eval(model: WorldActionModel, stream, n_batches: int, device: str, precision: str) -> dict[str, float]:
    """Accuracies on held-out segments and the baselines they must beat: the most frequent obs token
    (unigram) and the most frequent reward sign (majority), both counted on the same segments.

    Rewards are rare (a few % of steps under random play), so a majority guess already scores ~97% on raw
    reward-sign accuracy; `reward_balanced_acc` (mean recall over the classes present) is what shows whether
    rewards are predicted at all: any constant guess scores 1 / (classes present) on it. Atari frames change
    little between steps, so `token_acc_copy` (previous frame's token at the same place) is reported too.
    """
    was_training = model.training
    model.eval()
    tot: dict[str, float] = {}
    tok_counts = np.zeros(model.cfg.obs_vocab, np.int64)
    rew_counts = np.zeros(3, np.int64)
    rew_correct = np.zeros(3, np.int64)
    copy_hits = copy_total = 0
    for i in range(min(n_batches, len(stream))):
        b = to_device(stream.gather(stream.batch_ids(0, i)), device)
        with autocast_ctx(device, precision):
            c = world_accuracy(model, b)
        rew_correct += c.pop("rew_class_correct").cpu().numpy()
        c.pop("rew_class_total")
        for k, v in c.items():
            tot[k] = tot.get(k, 0.0) + float(v)
        m = b["mask_padding"].cpu().numpy()
        toks = b["tokens"].cpu().numpy()
        tok_counts += np.bincount(toks[m].ravel(), minlength=model.cfg.obs_vocab)
        # copy baseline: a frame's tokens = the previous frame's (the first frame of a segment has none)
        both = m[:, 1:] & m[:, :-1]
        copy_hits += int((toks[:, 1:] == toks[:, :-1])[both].sum())
        copy_total += int(both.sum()) * toks.shape[-1]
        rew_counts += np.bincount((np.sign(b["rewards"].cpu().numpy()[m]) + 1).astype(int), minlength=3)
    model.train(was_training)
    if not tot:
        return {}
    steps = max(tot["steps"], 1.0)
    present = rew_counts > 0
    return {"eval/token_acc": tot["tok_correct"] / max(tot["tok_total"], 1.0),
            "eval/token_acc_unigram": tok_counts.max() / max(tok_counts.sum(), 1),
            "eval/token_acc_later": tot["tok_correct_later"] / max(tot["tok_total_later"], 1.0),  # frames 2..L
            "eval/token_acc_copy": copy_hits / max(copy_total, 1),  # same frames: copy the previous frame's token
            "eval/reward_acc": tot["rew_correct"] / steps,
            "eval/reward_acc_majority": rew_counts.max() / max(rew_counts.sum(), 1),
            "eval/reward_balanced_acc": float((rew_correct[present] / rew_counts[present]).mean()),
            "eval/reward_balanced_acc_baseline": 1.0 / max(int(present.sum()), 1),
            "eval/reward_class_counts": [int(x) for x in rew_counts],  # steps with sign -1, 0, +1
            "eval/reward_class_correct": [int(x) for x in rew_correct],
            "eval/end_acc": tot["end_correct"] / steps}


@torch.no_grad()
def world_model_report(model: WorldActionModel, dataset: str, device: str = "cpu", precision: str = "fp32",
                       batch_size: int = 32, max_segments: int = 0, names: dict[int, str] | None = None,
                       backend: str = "zarr") -> dict[str, dict[str, Any]]:
    """Per game (by task id, or `names[task_id]`), over the non-overlapping segments of a held-out dataset (up to
    `max_segments`, 0 = all): next-frame token accuracy on frames 2..L against copying the previous frame, the
    same restricted to the tokens that change between the two frames, and reward-sign accuracy against the
    majority sign (plus the balanced accuracy and its constant-guess baseline)."""
    from jowa_data.stream import SegmentStream

    stream = SegmentStream(dataset, batch_size=batch_size, seq_len=model.cfg.max_steps, seed=0, rank=0,
                           world_size=1, backend=backend, stride=model.cfg.max_steps)
    n_seg = stream.num_segments if not max_segments else min(max_segments, stream.num_segments)
    was_training = model.training
    model.eval()
    acc: dict[int, dict[str, Any]] = {}
    for i in range(0, n_seg, batch_size):
        b = to_device(stream.gather(np.arange(i, min(i + batch_size, n_seg))), device)
        with autocast_ctx(device, precision):
            p = world_predictions(model, b)
        tok, mask, task = b["tokens"].cpu().numpy(), b["mask_padding"].cpu().numpy(), b["task_ids"].cpu().numpy()
        pred = p["tokens"].cpu().numpy()
        both = mask[:, 1:] & mask[:, :-1]  # frame t and t-1 both real
        cur, prev, guess = tok[:, 1:], tok[:, :-1], pred[:, 1:]
        changed = cur != prev
        rew_cls = (np.sign(b["rewards"].cpu().numpy()) + 1).astype(int)
        rew_ok = p["rewards"].cpu().numpy() == rew_cls
        for t in np.unique(task):
            r = task == t
            a = acc.setdefault(int(t), {"tokens": 0, "correct": 0, "copy": 0, "changed": 0, "changed_correct": 0,
                                        "rew_counts": np.zeros(3, np.int64), "rew_correct": np.zeros(3, np.int64)})
            sel = both[r][..., None] & np.ones_like(cur[r], dtype=bool)  # (rows, L-1, K)
            a["tokens"] += int(sel.sum())
            a["correct"] += int(((guess[r] == cur[r]) & sel).sum())
            a["copy"] += int(((prev[r] == cur[r]) & sel).sum())
            ch = changed[r] & sel
            a["changed"] += int(ch.sum())
            a["changed_correct"] += int(((guess[r] == cur[r]) & ch).sum())
            m = mask[r]
            a["rew_counts"] += np.bincount(rew_cls[r][m], minlength=3)
            a["rew_correct"] += np.bincount(rew_cls[r][m & rew_ok[r]], minlength=3)
    model.train(was_training)
    out = {}
    for t, a in sorted(acc.items()):
        n, counts = max(a["tokens"], 1), a["rew_counts"]
        present = counts > 0
        out[(names or {}).get(t, str(t))] = {
            "task_id": t, "tokens": a["tokens"], "token_acc": a["correct"] / n, "token_acc_copy": a["copy"] / n,
            "changed_tokens": a["changed"], "changed_fraction": a["changed"] / n,
            "token_acc_changed": a["changed_correct"] / max(a["changed"], 1),
            "reward_steps": int(counts.sum()), "reward_acc": float(a["rew_correct"].sum() / max(counts.sum(), 1)),
            "reward_acc_majority": float(counts.max() / max(counts.sum(), 1)),
            "reward_balanced_acc": float((a["rew_correct"][present] / counts[present]).mean()) if present.any() else 0.0,
            "reward_balanced_acc_baseline": 1.0 / max(int(present.sum()), 1),
            "reward_class_counts": [int(x) for x in counts]}
    return out
