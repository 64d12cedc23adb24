"""Planning in the learned world model: greedy, beam search (paper Eq. 11) and MCTS (appendix F).

The planner never sees the transformer. It talks to an `ImaginationModel` (a small protocol below):
`start` runs the context once and returns the root critic, `step` imagines one step for a whole batch of
beams (action token + 36 greedy obs tokens: reward sign, termination, next-obs tokens, critic of the new
state), `select` gathers/duplicates rows of a batch state (KV caches are indexed, never deep-copied).
`WorldModelImagination` (below) implements it over `WorldActionModel` with its KV cache;
`RecomputeImagination` is the uncached reference (whole window re-run per token) used by the tests.

Beam search (Eq. 11). Every beam proposes its top-K valid actions by Q̂; ALL children of one depth are
imagined in ONE batched `step`; a child's score is
    Σ_{t<d} γ^t r̂_t + γ^d max_a Q̂(s_d, a)
and the global top-K children (per environment) form the next beam. The first action of the best path is
returned. K=1 or H=0 is the Q̂-greedy policy.

Predicted termination (our choice; the official code ignores it): a path whose step t predicts `done`
is absorbing. It keeps the rewards up to and including that step and gets NO bootstrap beyond it
(score = Σ γ^t r̂_t), is not expanded further, and competes with deeper paths on that fixed score.
MCTS treats a predicted terminal leaf the same way (value 0 after its reward, never expanded).

MCTS follows the official MuZero-style pUCT (pb_c_base 19652, pb_c_init 1.25, priors softmax(Q̂/t),
min-max normalised r + γV for visited children, 0 for unvisited ones, leaf value max Q̂, depth cap
max(1, H-1)). Because imagination is greedy (deterministic), a (node, action) child is imagined once and
memoised; with `mcts_expand_all` all valid children of a node are imagined in one batched step the first
time any of them is needed. Both build the same tree (tested) and the same statistics as the official
one-child-per-simulation loop, except for three documented changes: UCB ties go to the larger prior then
the lower action id (official: the larger action id), a predicted terminal is absorbing (official: ignored),
and the final "most valuable child" is argmax r + γV over visited valid children (official: argmax V over
all 18 children, which can return an invalid, unvisited action with V = 0 when every visited V < 0).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import torch

from jowa_common.errors import ConfigError

NUM_ACTIONS = 18  # full ALE action set: the model's action vocabulary
OBS_TOKENS = 36  # tokens per frame (6x6 VQ grid)


# ----------------------------------------------------------------------------------------------
# Config and protocol
# ----------------------------------------------------------------------------------------------

@dataclass
class PlannerConfig:
    kind: Literal["greedy", "beam", "mcts"] = "beam"  # planning algorithm (paper sec. 4.2; MCTS: appendix F)
    horizon: int = 2  # H, imagined steps (paper: 2 for all games, Table 17). MCTS depth cap = max(1, H-1)
    beam_width: int = 2  # K, beams kept per depth (Table 17: 2 if < 10 valid actions, else 3 or 4)
    gamma: float = 0.99  # discount of Eq. 11 (Table 12)
    num_simulations: int = 20  # MCTS simulations per decision (official eval_MCTS.sh)
    temperature: float = 0.9  # MCTS prior softmax(Q/t) (appendix F grid: t = 0.9)
    pb_c_base: float = 19652.0  # MuZero pUCT constant (official src/MCTS.py)
    pb_c_init: float = 1.25  # MuZero pUCT constant (official src/MCTS.py)
    mcts_final: Literal["value", "count"] = "value"  # root choice: max r+γV ("most valuable", appendix F) or visits
    mcts_expand_all: bool = True  # imagine all valid children of a node in one batch (exact: greedy model)

    def validate(self) -> "PlannerConfig":
        if self.kind not in ("greedy", "beam", "mcts"):
            raise ConfigError(f"planner.kind: must be greedy, beam or mcts, got {self.kind!r}")
        if self.horizon < 0:
            raise ConfigError(f"planner.horizon: must be >= 0, got {self.horizon}")
        if self.beam_width < 1:
            raise ConfigError(f"planner.beam_width: must be >= 1, got {self.beam_width}")
        if not 0.0 <= self.gamma <= 1.0:
            raise ConfigError(f"planner.gamma: must be in [0, 1], got {self.gamma}")
        if self.num_simulations < 0:
            raise ConfigError(f"planner.num_simulations: must be >= 0, got {self.num_simulations}")
        if self.temperature <= 0:
            raise ConfigError(f"planner.temperature: must be > 0, got {self.temperature}")
        if self.mcts_final not in ("value", "count"):
            raise ConfigError(f"planner.mcts_final: must be value or count, got {self.mcts_final!r}")
        return self

    @property
    def imagined_steps(self) -> int:
        """Steps imagined beyond the context (sets how much context fits in the position table)."""
        if self.kind == "greedy":
            return 0
        if self.kind == "mcts":
            return max(1, self.horizon)  # official: context = max_steps - H (depth cap max(1, H-1) fits)
        return self.horizon


@dataclass
class Imagined:
    """What one imagined step returns, for a batch of B beams."""

    rewards: torch.Tensor  # (B,) float32, predicted reward sign in {-1, 0, 1}
    dones: torch.Tensor  # (B,) bool, predicted termination
    obs_tokens: torch.Tensor  # (B, 36) long, greedy next-frame tokens
    q: torch.Tensor  # (B, 18) float32, expected Q̂ of the new state (unmasked)


class ImaginationModel(Protocol):
    """A world model the planner can imagine in. States are opaque batches (one row per beam)."""

    max_steps: int  # steps (37-token blocks) the model's position table holds: 8 in the paper

    def start(self, obs_tokens: torch.Tensor, actions: torch.Tensor, task_ids: torch.Tensor) -> tuple[Any, torch.Tensor]:
        """Run the context once. obs_tokens (N, T, 36), actions (N, T-1) full ids, task_ids (N,).
        Returns (state, q (N, 18)): the critic at the last obs token of the context."""
        ...

    def step(self, state: Any, actions: torch.Tensor) -> tuple[Any, Imagined]:
        """Imagine one step for every row: feed action (B,), then 36 greedy obs tokens.
        May modify `state` in place; returns the new state."""
        ...

    def select(self, state: Any, index: torch.Tensor) -> Any:
        """A new, independent state made of rows `index` (B',) of `state` (rows may repeat)."""
        ...


# ----------------------------------------------------------------------------------------------
# Small helpers
# ----------------------------------------------------------------------------------------------

def masked_q(q: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Q̂ with invalid actions at -inf. q (B, 18), masks (B, 18) bool."""
    return q.float().masked_fill(~masks, float("-inf"))


def ranked_actions(q: torch.Tensor, masks: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k actions by masked Q̂, ties to the lower action id. Returns (actions (B,k), valid (B,k))."""
    qm = masked_q(q, masks)
    order = torch.sort(qm, dim=-1, descending=True, stable=True).indices[:, :k]  # (B, k)
    return order, masks.gather(1, order)


def greedy_actions(q: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Q̂-greedy action among valid ones (B,), ties to the lower action id."""
    return ranked_actions(q, masks, 1)[0][:, 0]


# ----------------------------------------------------------------------------------------------
# Beam search (Eq. 11)
# ----------------------------------------------------------------------------------------------

@dataclass
class BeamResult:
    actions: torch.Tensor  # (N,) long, first action of the best path
    scores: torch.Tensor  # (N,) float32, Eq. 11 score of the best path
    paths: torch.Tensor  # (N, H) long, actions of the best path (-1 after a predicted terminal)
    model_calls: list[int] = field(default_factory=list)  # batch size of each `step` (one per depth)


def beam_search(model: ImaginationModel, state: Any, q_root: torch.Tensor, masks: torch.Tensor,
                horizon: int, beam_width: int, gamma: float) -> BeamResult:
    """Batched beam search over N environments (rows of `state`), see the module docstring.

    Beam rows are kept grouped by environment and, within one, sorted by score, so the best path of each
    environment is its first row at the end.
    """
    n, k = q_root.shape[0], beam_width
    dev = q_root.device
    masks = masks.to(dev)
    env = torch.arange(n, device=dev)  # (B,) environment of each beam row
    acc = torch.zeros(n, device=dev)  # (B,) Σ γ^t r̂_t so far
    done = torch.zeros(n, dtype=torch.bool, device=dev)  # (B,) path hit a predicted terminal
    q = q_root.float()
    score = masked_q(q, masks).amax(-1)  # (B,) depth-0 score = max Q̂ (greedy)
    paths = torch.empty(n, 0, dtype=torch.long, device=dev)
    calls: list[int] = []
    for d in range(1, horizon + 1):
        cand, valid = ranked_actions(q, masks[env], k)  # (B, K)
        # A terminal path has one "frozen" child (slot 0) that keeps its score; its imagined step is ignored.
        valid = valid.clone()
        valid[done, 1:] = False
        child = valid.flatten().nonzero().squeeze(1)  # (C,) flat ids row*K + slot, grouped by env
        parent = child // k
        act = cand.flatten()[child]
        state = model.select(state, parent)
        state, out = model.step(state, act)
        calls.append(int(child.numel()))
        frozen = done[parent]
        c_done = frozen | out.dones.to(dev)
        c_acc = torch.where(frozen, acc[parent], acc[parent] + gamma ** (d - 1) * out.rewards.to(dev).float())
        c_env = env[parent]
        v = masked_q(out.q.to(dev), masks[c_env]).amax(-1)
        c_score = torch.where(c_done, c_acc, c_acc + gamma ** d * v)
        c_score = torch.where(frozen, score[parent], c_score)
        c_path = torch.cat([paths[parent], torch.where(frozen, -1, act).unsqueeze(1)], 1)  # (C, d)
        # Global top-K per environment: scatter the children into an (N, K*K) table, sort each row.
        first_row = torch.searchsorted(env, torch.arange(n, device=dev))  # (N,) first beam row of each env
        col = (parent - first_row[c_env]) * k + (child % k)
        table = torch.full((n, k * k), float("-inf"), device=dev)
        table[c_env, col] = c_score
        where = torch.full((n, k * k), -1, dtype=torch.long, device=dev)
        where[c_env, col] = torch.arange(child.numel(), device=dev)
        top = torch.sort(table, dim=1, descending=True, stable=True)
        keep_val, keep_col = top.values[:, :k], top.indices[:, :k]  # (N, K)
        sel = where.gather(1, keep_col)[keep_val > float("-inf")]  # (B',) children kept, grouped by env
        env, acc, done, score = c_env[sel], c_acc[sel], c_done[sel], c_score[sel]
        q, paths = out.q.to(dev)[sel].float(), c_path[sel]
        if d < horizon:
            state = model.select(state, sel)
    if horizon == 0:
        return BeamResult(greedy_actions(q_root, masks), score, paths, calls)
    first_row = torch.searchsorted(env, torch.arange(n, device=dev))
    best = paths[first_row]
    return BeamResult(best[:, 0].clone(), score[first_row], best, calls)


# ----------------------------------------------------------------------------------------------
# MCTS (appendix F)
# ----------------------------------------------------------------------------------------------

@dataclass
class _Node:
    prior: float
    reward: float = 0.0
    visits: int = 0
    value_sum: float = 0.0
    terminal: bool = False
    children: dict[int, "_Node"] | None = None  # action -> node, once this node's critic is known
    q: torch.Tensor | None = None  # (18,) critic of this node's state
    state: Any = None  # batch state holding this node's row (shared with its imagined siblings)
    row: int = 0

    def value(self) -> float:
        return 0.0 if self.visits == 0 else self.value_sum / self.visits


@dataclass
class MCTSResult:
    action: int
    root_values: torch.Tensor  # (18,) r + γV of each root child (-inf where unvisited/invalid)
    root_visits: torch.Tensor  # (18,) visit counts
    model_calls: list[int] = field(default_factory=list)


class _MinMax:
    def __init__(self) -> None:
        self.lo, self.hi = math.inf, -math.inf

    def update(self, v: float) -> None:
        self.lo, self.hi = min(self.lo, v), max(self.hi, v)

    def normalize(self, v: float) -> float:
        return (v - self.lo) / (self.hi - self.lo) if self.hi > self.lo else v


def mcts_search(model: ImaginationModel, state: Any, q_root: torch.Tensor, mask: torch.Tensor,
                cfg: PlannerConfig) -> MCTSResult:
    """MCTS for ONE environment: `state` holds one row, q_root (18,), mask (18,) bool."""
    mask = mask.to(q_root.device)
    valid = mask.nonzero().squeeze(1).tolist()
    max_depth = max(1, cfg.horizon - 1)  # official: horizon - 1 (a cap of 0 behaves as 1 there too)
    stats, calls = _MinMax(), []

    def make_children(node: _Node, q: torch.Tensor) -> None:
        node.q = q
        prior = torch.softmax(masked_q(q, mask) / cfg.temperature, -1).tolist()
        node.children = {a: _Node(prior=prior[a]) for a in valid}

    def ucb(parent: _Node, child: _Node) -> float:
        pb_c = math.log((parent.visits + cfg.pb_c_base + 1) / cfg.pb_c_base) + cfg.pb_c_init
        prior_score = math.sqrt(parent.visits) * pb_c * child.prior / (child.visits + 1)
        value_score = stats.normalize(child.reward + cfg.gamma * child.value()) if child.visits else 0.0
        return prior_score + value_score

    def imagine(parent: _Node, action: int) -> None:
        """Imagine `action` from `parent` (and, with expand_all, all its not-yet-imagined siblings) at once."""
        assert parent.children is not None and parent.state is not None
        todo = [a for a, c in parent.children.items() if c.state is None] if cfg.mcts_expand_all else [action]
        rows = torch.full((len(todo),), parent.row, dtype=torch.long, device=q_root.device)
        st, out = model.step(model.select(parent.state, rows),
                             torch.tensor(todo, dtype=torch.long, device=q_root.device))
        calls.append(len(todo))
        for i, a in enumerate(todo):
            c = parent.children[a]
            c.state, c.row = st, i
            c.reward, c.terminal = float(out.rewards[i]), bool(out.dones[i])
            c.q = out.q[i].float()

    root = _Node(prior=1.0, state=state, row=0)
    make_children(root, q_root.float())
    for _ in range(cfg.num_simulations):
        node, path, action = root, [root], -1
        while node.children and not node.terminal and len(path) <= max_depth:
            # max UCB; ties -> the larger prior, then the lower action id
            action = max(node.children, key=lambda a: (ucb(node, node.children[a]), node.children[a].prior, -a))
            node = node.children[action]
            path.append(node)
        leaf, parent = path[-1], path[-2]
        if leaf.state is None:  # memoised: the greedy world model is deterministic
            imagine(parent, action)
        if leaf.children is None and not leaf.terminal:
            make_children(leaf, leaf.q)
        value = 0.0 if leaf.terminal else float(masked_q(leaf.q, mask).max())
        for nd in reversed(path):
            nd.value_sum += value
            nd.visits += 1
            stats.update(nd.value())
            value = nd.reward + cfg.gamma * value

    values = torch.full((NUM_ACTIONS,), float("-inf"))
    visits = torch.zeros(NUM_ACTIONS, dtype=torch.long)
    for a, c in root.children.items():
        visits[a] = c.visits
        if c.visits:
            values[a] = c.reward + cfg.gamma * c.value()
    if int(visits.sum()) == 0:
        action = int(greedy_actions(q_root[None], mask[None])[0])
    elif cfg.mcts_final == "count":
        action = int(torch.sort(visits, descending=True, stable=True).indices[0])
    else:
        action = int(torch.sort(values, descending=True, stable=True).indices[0])
    return MCTSResult(action, values, visits, calls)


# ----------------------------------------------------------------------------------------------
# The planner used by the evaluator
# ----------------------------------------------------------------------------------------------

class Planner:
    """`plan(obs_tokens, actions, task_ids, action_masks) -> actions` for N environments at once.

    obs_tokens (N, T, 36) long: the last T frames' tokens, newest last (the current frame included);
    actions (N, T-1) long full ids: the actions taken between those frames; task_ids (N,);
    action_masks (N, 18) bool; lengths (N,) optional: how many of the T steps are real for each env
    (left-padded histories, e.g. right after a reset). The context is cut to the newest
    `model.max_steps - imagined steps` steps so that imagined steps fit in the position table.
    """

    def __init__(self, model: ImaginationModel, cfg: PlannerConfig | None = None) -> None:
        self.model = model
        self.cfg = (cfg or PlannerConfig()).validate()
        self.context_steps = model.max_steps - self.cfg.imagined_steps
        if self.context_steps < 1:
            raise ConfigError(f"planner.horizon: {self.cfg.horizon} imagined steps leave no room for context "
                              f"in a {model.max_steps}-step model")

    @torch.no_grad()
    def plan(self, obs_tokens: torch.Tensor, actions: torch.Tensor, task_ids: torch.Tensor,
             action_masks: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        obs_tokens, actions = torch.as_tensor(obs_tokens), torch.as_tensor(actions)
        task_ids, action_masks = torch.as_tensor(task_ids), torch.as_tensor(action_masks, dtype=torch.bool)
        n, t = obs_tokens.shape[:2]
        assert obs_tokens.shape[2] == OBS_TOKENS and actions.shape == (n, t - 1), (obs_tokens.shape, actions.shape)
        if lengths is None:
            return self._plan_group(obs_tokens, actions, task_ids, action_masks)
        lengths = torch.as_tensor(lengths).clamp(1, t)
        out = torch.empty(n, dtype=torch.long)
        for length in lengths.unique().tolist():  # one batched search per history length
            idx = (lengths == length).nonzero().squeeze(1)
            out[idx] = self._plan_group(obs_tokens[idx, t - length:], actions[idx, t - length:],
                                        task_ids[idx], action_masks[idx]).cpu()
        return out

    def _plan_group(self, obs_tokens, actions, task_ids, masks) -> torch.Tensor:
        c = min(obs_tokens.shape[1], self.context_steps)
        obs_tokens = obs_tokens[:, -c:]
        actions = actions[:, actions.shape[1] - (c - 1):]
        cfg = self.cfg
        greedy = cfg.kind == "greedy" or (cfg.kind == "beam" and (cfg.horizon == 0 or cfg.beam_width == 1))
        root_q = getattr(self.model, "root_q", None)  # optional: the critic without building a cache
        if greedy and root_q is not None:
            q = root_q(obs_tokens, actions, task_ids)  # on the model's device, whatever the inputs' device
            return greedy_actions(q, masks.to(q.device))
        state, q = self.model.start(obs_tokens, actions, task_ids)
        masks = masks.to(q.device)
        if greedy:
            return greedy_actions(q, masks)
        if cfg.kind == "beam":
            return beam_search(self.model, state, q, masks, cfg.horizon, cfg.beam_width, cfg.gamma).actions
        out = []
        for i in range(q.shape[0]):  # MCTS is sequential per environment
            row = self.model.select(state, torch.tensor([i], device=q.device))
            out.append(mcts_search(self.model, row, q[i], masks[i], cfg).action)
        return torch.tensor(out, dtype=torch.long, device=q.device)


def beam_planner(model: ImaginationModel, horizon: int = 2, beam_width: int = 2, gamma: float = 0.99) -> Planner:
    """The paper's planner (Eq. 11)."""
    return Planner(model, PlannerConfig(kind="beam", horizon=horizon, beam_width=beam_width, gamma=gamma))


def mcts_planner(model: ImaginationModel, horizon: int = 2, num_simulations: int = 20, temperature: float = 0.9) -> Planner:
    """The appendix-F MCTS baseline."""
    return Planner(model, PlannerConfig(kind="mcts", horizon=horizon, num_simulations=num_simulations,
                                        temperature=temperature))


def greedy_planner(model: ImaginationModel) -> Planner:
    """No planning: argmax of the critic over valid actions."""
    return Planner(model, PlannerConfig(kind="greedy"))


# ----------------------------------------------------------------------------------------------
# ImaginationModel over the real WorldActionModel
# ----------------------------------------------------------------------------------------------

@dataclass
class CacheState:
    """A batch of imagined trajectories: their KV cache (one row each) and task ids."""

    cache: Any  # jowa_model.world_action.KVCache
    task_ids: torch.Tensor  # (B,) long


class WorldModelImagination:
    """`ImaginationModel` over `WorldActionModel` with its KV cache: the context is run once, then every
    imagined step is 37 one-token cached passes (action token, then 36 greedy obs tokens) for the whole
    batch. Each pass runs only the head its position needs: reward/end/obs heads at the action token, the
    obs head at obs tokens 0..34, the Q head at obs token 35. No pixels are decoded.

    The model is put in eval mode (dropout off): planning is inference.
    """

    def __init__(self, model, autocast_dtype: torch.dtype | None = None) -> None:
        self.model = model.eval()
        self.cfg = model.cfg
        self.max_steps = model.cfg.max_steps
        self.autocast_dtype = autocast_dtype  # e.g. torch.bfloat16 on CPUs with avx512_bf16 (not the default)

    def _autocast(self):
        dev = next(self.model.parameters()).device
        return torch.autocast(dev.type, dtype=self.autocast_dtype or torch.float32,
                              enabled=self.autocast_dtype is not None)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @staticmethod
    def interleave(obs_tokens: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """obs (N, T, 36), actions (N, T-1) -> (N, T*37-1): [o_1, a_1, ..., o_T] as one token row."""
        n, t, _ = obs_tokens.shape
        blocks = torch.cat([obs_tokens[:, :-1], actions[..., None]], 2).reshape(n, -1)  # (N, (T-1)*37)
        return torch.cat([blocks, obs_tokens[:, -1]], 1)

    @torch.no_grad()
    def start(self, obs_tokens, actions, task_ids):
        dev = self.device
        seq = self.interleave(obs_tokens.to(dev).long(), actions.to(dev).long())  # (N, T*37-1)
        task_ids = task_ids.to(dev).long()
        room = self.cfg.max_tokens if obs_tokens.shape[1] < self.max_steps else seq.shape[1]
        cache = self.model.init_cache(seq.shape[0], max_tokens=room)
        with self._autocast():
            h = self.model.forward_cached(seq, task_ids, cache, last_only=True)[:, -1]  # (N, D) last obs token
            q = self.model.q_values(h).float()  # (N, 18)
        cache.share_prefix()  # the imagined rows descend from these roots
        return CacheState(cache, task_ids), q

    @torch.no_grad()
    def root_q(self, obs_tokens, actions, task_ids) -> torch.Tensor:
        """The critic at the last obs token of the context (N, 18), without building a cache: what a greedy
        decision needs (one full causal pass; the last block runs only the last query)."""
        dev = self.device
        seq = self.interleave(obs_tokens.to(dev).long(), actions.to(dev).long())
        with self._autocast():
            return self.model.q_values(self.model.backbone_last(seq, task_ids.to(dev).long())).float()

    def select(self, state: CacheState, index: torch.Tensor) -> CacheState:
        index = index.to(state.task_ids.device)
        return CacheState(state.cache.index_select(index), state.task_ids[index])

    @torch.no_grad()
    def step(self, state: CacheState, actions: torch.Tensor):
        m, task = self.model, state.task_ids
        assert state.cache.length % self.cfg.block_size == self.cfg.obs_tokens, "step must follow a full frame"
        tokens = torch.empty(self.cfg.obs_tokens, actions.shape[0], dtype=torch.long, device=task.device)
        actions = actions.to(task.device).long()
        with self._autocast():
            h = m.decode_step(actions, task, state.cache)  # (B, D)
            rewards = m.reward_logits(h).argmax(-1).float() - 1.0  # sign class -> {-1, 0, 1}
            dones = m.end_logits(h).argmax(-1).bool()
            for i in range(self.cfg.obs_tokens):
                torch.argmax(m.obs_logits(h), -1, out=tokens[i])  # greedy next obs token
                h = m.decode_step(tokens[i], task, state.cache)
            q = m.q_values(h).float()  # (B, 18) at the last obs token
        return state, Imagined(rewards, dones, tokens.t().contiguous(), q)


@dataclass
class SeqState:
    seq: torch.Tensor  # (B, L) all tokens so far, window starting at position 0
    task_ids: torch.Tensor


class RecomputeImagination(WorldModelImagination):
    """Reference without a KV cache: every token re-runs the whole window (the official greedy path, and
    worse). Slow; used to check that the cached path gives the same plans."""

    root_q = None  # greedy goes through `start` too: the reference uses the plain full forward only

    @torch.no_grad()
    def _last(self, seq: torch.Tensor, task: torch.Tensor) -> torch.Tensor:
        with self._autocast():
            return self.model.backbone(seq, task)[:, -1]  # (B, D)

    @torch.no_grad()
    def start(self, obs_tokens, actions, task_ids):
        dev = self.device
        seq = self.interleave(obs_tokens.to(dev).long(), actions.to(dev).long())
        task_ids = task_ids.to(dev).long()
        return SeqState(seq, task_ids), self.model.q_values(self._last(seq, task_ids)).float()

    def select(self, state: SeqState, index: torch.Tensor) -> SeqState:
        return SeqState(state.seq[index], state.task_ids[index])

    @torch.no_grad()
    def step(self, state: SeqState, actions: torch.Tensor):
        m, task = self.model, state.task_ids
        seq = torch.cat([state.seq, actions.long()[:, None]], 1)
        h = self._last(seq, task)
        rewards = m.reward_logits(h).argmax(-1).float() - 1.0
        dones = m.end_logits(h).argmax(-1).bool()
        for _ in range(self.cfg.obs_tokens):
            seq = torch.cat([seq, m.obs_logits(h).argmax(-1)[:, None]], 1)
            h = self._last(seq, task)
        tokens = seq[:, -self.cfg.obs_tokens:]
        return SeqState(seq, task), Imagined(rewards, dones, tokens, m.q_values(h).float())


class RollingGreedy:
    """Q̂-greedy acting over an incrementally grown KV cache: a faster alternative to the official sliding
    window that is NOT identical to it (benchmarked separately; the headline figures use the official rule).

    Absolute position embeddings mean a window that slides by one step must be recomputed (295 tokens per
    decision at 8 steps). Here each `act` appends the previous action and the new frame (37 tokens, one cached
    pass) while the window grows; when it is full (`max_steps` steps) the cache is rebuilt from the newest
    `keep` steps at positions 0.. and grows again. The first `max_steps` decisions of an episode equal the
    official rule's; after that the context cycles through keep..max_steps steps instead of always max_steps
    (keep=4: ~59 tokens per decision on average instead of 295). All rows advance in lockstep; call `reset`
    when the episodes restart.
    """

    def __init__(self, world: WorldModelImagination, keep: int = 4) -> None:
        if not 1 <= keep <= world.max_steps:
            raise ConfigError(f"rolling greedy: keep must be in [1, {world.max_steps}], got {keep}")
        self.world, self.keep = world, keep
        self.reset()

    def reset(self) -> None:
        self.cache = None
        self.obs: torch.Tensor | None = None  # (N, steps, 36) tokens of the frames in the cache
        self.actions: torch.Tensor | None = None  # (N, steps-1) actions between them
        self.context_steps = 0  # steps in the cache (for tests and reports)

    @torch.no_grad()
    def act(self, obs_tokens: torch.Tensor, task_ids: torch.Tensor, action_masks: torch.Tensor,
            prev_actions: torch.Tensor | None = None) -> torch.Tensor:
        """obs_tokens (N, 36) of the new frame; prev_actions (N,) full ids taken before it (None on the first
        call after `reset`). Returns the Q̂-greedy valid actions (N,)."""
        w, m = self.world, self.world.model
        dev = w.device
        obs = torch.as_tensor(obs_tokens).to(dev).long()[:, None]  # (N, 1, 36)
        task = torch.as_tensor(task_ids).to(dev).long()
        masks = torch.as_tensor(action_masks, dtype=torch.bool).to(dev)
        if self.cache is None or prev_actions is None:
            self.obs, self.actions = obs, obs.new_zeros(obs.shape[0], 0)
            new = self._rebuild(task)
        else:
            prev = torch.as_tensor(prev_actions).to(dev).long()[:, None]
            self.obs, self.actions = torch.cat([self.obs, obs], 1), torch.cat([self.actions, prev], 1)
            if self.context_steps == w.max_steps:  # full: restart from the newest `keep` steps
                self.obs, self.actions = self.obs[:, -self.keep:], self.actions[:, self.actions.shape[1] - (self.keep - 1):]
                new = self._rebuild(task)
            else:
                new = torch.cat([prev, obs[:, 0]], 1)  # (N, 37): action, then the new frame
                self.context_steps += 1
        with w._autocast():
            h = m.forward_cached(new, task, self.cache, last_only=True)[:, -1]
            q = m.q_values(h).float()
        return greedy_actions(q, masks)

    def _rebuild(self, task: torch.Tensor) -> torch.Tensor:
        self.cache = self.world.model.init_cache(task.shape[0])
        self.context_steps = self.obs.shape[1]
        return WorldModelImagination.interleave(self.obs, self.actions)
