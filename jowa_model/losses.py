"""JOWA losses (paper sec. 4.1.2-4.1.3): world loss (Eq. 7), action loss (Eq. 8: C51 TD + CQL), joint loss (Eq. 9).

Pure tensor code over one forward pass of `WorldActionModel`. Every term is vectorised (no per-row Python,
no `.item()`); `LossTerms` carries the weighted total plus detached terms for logging.

Decisions (official code: docs/official_code.md §3, §9):
- TD targets: step t bootstraps from block t+1 of the same segment when both steps are real and t is not
  terminal; a terminal step (ends=1) targets clip(r_t) alone. The last real step of a cut segment has no target.
  a* = argmax over the game's VALID actions of the target head's expected Q (same head selects and evaluates,
  as in the official code). The target head reads the online backbone features (no target transformer).
  `td_backup="data"` (opt-in) bootstraps from the data's next action instead of a*: no max over actions, so no
  overestimation from maximising over noisy values of actions the data rarely takes (docs/learning.md).
- CQL action set: `cql_actions="valid"` (default) takes the logsumexp over the game's valid actions only.
  The official code uses all 18 (its TD argmax and acting are masked, its CQL is not). Invalid actions never
  occur in the data and are never chosen, so pushing their Q down only wastes gradient, and an unmasked
  logsumexp grows with 18 - n_valid, making the penalty's strength depend on the game's action count.
  `cql_actions="all"` reproduces the official behaviour.
- Padding (mask_padding False) is ignored by every term; masked means divide by max(count, 1), never NaN.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Literal, Mapping

import torch
import torch.nn.functional as F

from jowa_model.world_action import WorldActionModel, expected_q

LOG_EPS = 1e-8  # log(p + eps) in the C51 cross-entropy (official value)


@dataclass
class LossConfig:
    gamma: float = 0.99  # discount (Table 13)
    world_weight: float = 0.1  # beta of Eq. 9 in stage 2 (0.5 in the official fine-tuning); 0 = model-free ablation
    cql_alpha: float = 0.1  # alpha of Eq. 8 (paper sec. 4.1.3; CQL: sec. 3.2); 0 = "no CQL" ablation
    cql_actions: Literal["valid", "all"] = "valid"  # logsumexp action set; "all" = official (see module doc)
    td_loss: Literal["c51", "mse"] = "c51"  # "mse" = ablation: squared error on expected Q (Table 6)
    td_backup: Literal["max", "data"] = "max"  # next action of the TD target: "max" = a* of the target head
    # (Q-learning, Eq. 8); "data" = the data's own next action (SARSA: the critic evaluates the behaviour and
    # acting greedily on it is one step of policy improvement, Brandfonbrener et al. 2021). Opt-in, see module doc.
    action_grad_to_backbone: bool = True  # False = sg(L_action) ablation: Q losses do not train the transformer


@dataclass
class LossTerms:
    """`total` has the graph; the other terms are detached (log them with `to_dict()`, one sync)."""

    total: torch.Tensor
    obs: torch.Tensor  # next-obs-token CE
    reward: torch.Tensor  # reward-sign CE
    end: torch.Tensor  # termination CE
    td: torch.Tensor  # C51 (or MSE) TD loss
    cql: torch.Tensor  # alpha * (logsumexp_a Q - Q(s, a_data))
    q_data: torch.Tensor  # mean expected Q at the data actions (diagnostic)
    bc: torch.Tensor  # MTBC action CE

    def to_dict(self, prefix: str = "train/loss_") -> dict[str, float]:
        names = [f.name for f in fields(self)]
        values = torch.stack([getattr(self, n).detach().float() for n in names]).tolist()
        return {(prefix + n if n != "q_data" else "train/q_data"): v for n, v in zip(names, values)}


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.to(x.dtype)
    return (x * mask).sum() / mask.sum().clamp_min(1.0)


def masked_ce(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean CE over positions where mask is True; (..., C), (...), (...)."""
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), reduction="none")
    return masked_mean(ce, mask.reshape(-1))


# ---------------------------------------------------------------------------------------------- C51


def c51_project(next_probs: torch.Tensor, rewards: torch.Tensor, dones: torch.Tensor, support: torch.Tensor,
                gamma: float) -> torch.Tensor:
    """Project r + gamma * (1 - done) * z onto the fixed support (Bellemare et al. 2017, Alg. 1).

    next_probs (N, A), rewards (N,), dones (N,) -> (N, A) target probabilities. Terminal rows collapse every
    atom onto clip(r). One scatter_add_ over [lower, upper] neighbours; clamping the lower index to A-2 keeps
    the upper one in range and removes the l == u special case (an exact hit puts weight 1 on one side).
    """
    n_atoms = support.shape[0]
    v_min, v_max = support[0], support[-1]  # tensors: no host sync
    dz = (v_max - v_min) / (n_atoms - 1)
    cont = gamma * (1.0 - dones.float())  # (N,)
    tz = (rewards.float()[:, None] + cont[:, None] * support[None]).clamp(v_min, v_max)  # (N, A)
    b = ((tz - v_min) / dz).clamp(0, n_atoms - 1)  # fractional atom index
    lower = b.floor().clamp(max=n_atoms - 2)
    w_up = b - lower  # in [0, 1]
    p = next_probs.float()
    idx = torch.cat([lower, lower + 1], dim=1).long()  # (N, 2A)
    val = torch.cat([p * (1.0 - w_up), p * w_up], dim=1)  # (N, 2A)
    return torch.zeros_like(p).scatter_add_(1, idx, val)


# ---------------------------------------------------------------------------------------------- terms


def world_loss(model: WorldActionModel, h: torch.Tensor, batch: Mapping[str, torch.Tensor]):
    """Eq. 7 on hidden states h (B, L, 37, D): (obs CE, reward-sign CE, termination CE), padding ignored."""
    B, L, K1, D = h.shape
    K = K1 - 1
    mask = batch["mask_padding"]  # (B, L) True = real step
    # positions 0..34 and 36 of every block predict the next obs token; the very last position predicts nothing
    h_obs = torch.cat([h[:, :, : K - 1], h[:, :, K:]], dim=2).reshape(B, L * K, D)[:, :-1]  # (B, L*36-1, D)
    labels = batch["tokens"].reshape(B, L * K)[:, 1:]  # (B, L*36-1)
    valid = mask.repeat_interleave(K, dim=1)[:, 1:]  # a label counts when its own step is real
    obs = masked_ce(model.obs_logits(h_obs), labels, valid)
    h_act = h[:, :, K]  # (B, L, D): action tokens
    reward_cls = (torch.sign(batch["rewards"]) + 1).long()  # {0, 1, 2}
    rew = masked_ce(model.reward_logits(h_act), reward_cls, mask)
    end = masked_ce(model.end_logits(h_act), batch["ends"].long(), mask)
    return obs, rew, end


def td_targets_mask(mask: torch.Tensor, dones: torch.Tensor) -> torch.Tensor:
    """(B, L) bool: steps with a TD target (terminal, or real with a real next step in the segment)."""
    next_real = F.pad(mask[:, 1:], (0, 1), value=False)  # (B, L)
    return mask & (dones | next_real)


def action_loss(model: WorldActionModel, h_q: torch.Tensor, batch: Mapping[str, torch.Tensor], cfg: LossConfig,
                cql_mask: torch.Tensor | None = None):
    """Eq. 8 on last-obs-token features h_q (B, L, D): (TD loss, CQL term, mean Q at data actions).
    `cql_mask` (B, L) picks the steps CQL sees (default: the real steps, `mask_padding`)."""
    actions, rewards, mask = batch["actions"], batch["rewards"], batch["mask_padding"]
    dones = batch["ends"].bool()
    support = model.support
    valid_actions = model.action_mask_for(batch["task_ids"])[:, None, :]  # (B, 1, 18)

    probs = model.q_probs(h_q)  # (B, L, 18, atoms) fp32
    p_data = probs.gather(2, actions[:, :, None, None].expand(-1, -1, 1, probs.shape[-1])).squeeze(2)  # (B, L, atoms)
    q_exp = expected_q(probs, support)  # (B, L, 18)
    q_data = q_exp.gather(2, actions[:, :, None]).squeeze(2)  # (B, L)

    with torch.no_grad():
        tp = model.q_probs(h_q.detach(), target=True)  # (B, L, 18, atoms)
        tq = expected_q(tp, support).masked_fill(~valid_actions, float("-inf"))  # (B, L, 18)
        a_star = actions if cfg.td_backup == "data" else tq.argmax(-1)  # (B, L): block t+1's next action
        p_next = tp.gather(2, a_star[:, :, None, None].expand(-1, -1, 1, tp.shape[-1])).squeeze(2)  # (B, L, atoms)
        p_next = F.pad(p_next[:, 1:], (0, 0, 0, 1))  # step t bootstraps from block t+1; (B, L, atoms)
        # terminal rows: any distribution of mass 1 collapses onto clip(r) (official: uniform placeholder)
        p_next = torch.where(dones[:, :, None], torch.full_like(p_next, 1.0 / p_next.shape[-1]), p_next)
        has_target = td_targets_mask(mask, dones)
        if cfg.td_loss == "c51":
            m = c51_project(p_next.reshape(-1, p_next.shape[-1]), rewards.reshape(-1), dones.reshape(-1),
                            support, cfg.gamma).view_as(p_next)
        else:
            v_next = F.pad(tq.gather(2, a_star[:, :, None]).squeeze(2)[:, 1:], (0, 1)).nan_to_num(0.0, neginf=0.0)
            y = rewards.float() + cfg.gamma * (~dones).float() * v_next
    if cfg.td_loss == "c51":
        td = masked_mean(-(m * torch.log(p_data + LOG_EPS)).sum(-1), has_target)
    else:
        td = masked_mean((q_data - y) ** 2, has_target)

    cql = td.new_zeros(())
    if cfg.cql_alpha:
        cql = cql_penalty(q_exp, q_data, mask if cql_mask is None else cql_mask,
                          valid_actions if cfg.cql_actions == "valid" else None, cfg.cql_alpha)
    return td, cql, masked_mean(q_data.detach(), mask)


def cql_penalty(q_exp: torch.Tensor, q_data: torch.Tensor, mask: torch.Tensor, valid_actions: torch.Tensor | None,
                alpha: float) -> torch.Tensor:
    """CQL(H) (Kumar et al. 2020): alpha * (mean logsumexp_a Q(s, a) - mean Q(s, a_data)) over real steps.

    q_exp (B, L, A) expected Q, q_data (B, L), mask (B, L); valid_actions (B, 1|L, A) bool or None (all A).
    Unlike TD, the last real step of a segment counts too (official)."""
    if valid_actions is not None:
        q_exp = q_exp.masked_fill(~valid_actions, float("-inf"))
    return alpha * (masked_mean(torch.logsumexp(q_exp, -1), mask) - masked_mean(q_data, mask))


def bc_loss(model: WorldActionModel, h_q: torch.Tensor, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """MTBC (paper E.1.2): 18-way classification of the data action over the game's valid actions."""
    logits = model.q_logits(h_q).float().mean(0)  # (B, L, 18)
    valid_actions = model.action_mask_for(batch["task_ids"])[:, None, :]
    return masked_ce(logits.masked_fill(~valid_actions, float("-inf")), batch["actions"], batch["mask_padding"])


# ---------------------------------------------------------------------------------------------- joint


def check_batch(batch: Mapping[str, torch.Tensor], model: WorldActionModel) -> None:
    """Shape/key check of a stream batch (cheap: no data-dependent syncs)."""
    need = ("tokens", "actions", "rewards", "ends", "mask_padding", "task_ids")
    missing = [k for k in need if k not in batch]
    if missing:
        raise KeyError(f"batch lacks {missing} (has {sorted(batch)})")
    B, L, K = batch["tokens"].shape
    if K != model.cfg.obs_tokens or L > model.cfg.max_steps:
        raise ValueError(f"tokens must be (B, <= {model.cfg.max_steps}, {model.cfg.obs_tokens}), "
                         f"got {tuple(batch['tokens'].shape)}")
    for k in ("actions", "rewards", "ends", "mask_padding"):
        if tuple(batch[k].shape) != (B, L):
            raise ValueError(f"batch['{k}'] must be {(B, L)}, got {tuple(batch[k].shape)}")
    if tuple(batch["task_ids"].shape) != (B,):
        raise ValueError(f"batch['task_ids'] must be ({B},), got {tuple(batch['task_ids'].shape)}")


def term_counts(batch: Mapping[str, torch.Tensor], obs_tokens: int) -> torch.Tensor:
    """(5,) float counts of the items each masked mean divides by: obs labels, real steps (reward, end, CQL,
    BC), TD targets. Used to turn per-rank means into one global mean under DDP (see `compute_loss`)."""
    mask, dones = batch["mask_padding"], batch["ends"].bool()
    steps = mask.sum()
    obs = mask.repeat_interleave(obs_tokens, dim=1)[:, 1:].sum()
    return torch.stack([obs, steps, td_targets_mask(mask, dones).sum(), steps, steps]).float()


TERM_ORDER = ("obs", "steps", "td", "cql", "bc")  # rows of `term_counts`; reward and end use "steps"


def compute_loss(model: WorldActionModel, batch: Mapping[str, torch.Tensor], cfg: LossConfig | None = None,
                 stage: int = 2, scales: torch.Tensor | None = None, world_rows: int | None = None,
                 cql_mask: torch.Tensor | None = None) -> LossTerms:
    """Stage 1: L_world (Eq. 7). Stage 2: beta * L_world + L_action (Eq. 9). MTBC: the BC loss only.

    The one loss of pretraining and fine-tuning. `scales` (5,) multiplies each masked-mean term in `total` (order
    `TERM_ORDER`). Under DDP with W ranks, scales = W * local_count / global_count makes the gradient average
    equal to the gradient of ONE mean over the global batch, whatever the padding on each rank. The logged terms
    stay local means. Fine-tuning appends imagined rows: `world_rows` = how many leading rows are real (the world
    loss sees only those), `cql_mask` = the steps CQL sees (see `action_loss`).
    """
    cfg = cfg or LossConfig()
    check_batch(batch, model)
    s = scales if scales is not None else torch.ones(len(TERM_ORDER))
    h = model(batch["tokens"], batch["actions"], batch["task_ids"])  # (B, L, 37, D)
    zero = h.new_zeros((), dtype=torch.float32)
    obs = rew = end = td = cql = q_data = bc = zero
    h_q = h[:, :, model.cfg.obs_tokens - 1]  # (B, L, D): last obs token of each block
    if not cfg.action_grad_to_backbone:
        h_q = h_q.detach()
    if model.cfg.mtbc:
        bc = bc_loss(model, h_q, batch)
        total = s[4] * bc
    else:
        world_w = 1.0 if stage == 1 else cfg.world_weight
        total = zero
        if world_w:
            real = batch if world_rows is None else {k: v[:world_rows] for k, v in batch.items()}
            obs, rew, end = world_loss(model, h if world_rows is None else h[:world_rows], real)
            total = world_w * (s[0] * obs + s[1] * (rew + end))
        if stage == 2:
            td, cql, q_data = action_loss(model, h_q, batch, cfg, cql_mask)
            total = total + s[2] * td + s[3] * cql
    d = lambda t: t.detach()  # noqa: E731
    return LossTerms(total, d(obs), d(rew), d(end), d(td), d(cql), d(q_data), d(bc))
