"""The JOWA world-action model: one causal transformer, four heads (paper sec. 4.1, appendix E).

A segment of L steps is one token sequence of interleaved blocks `[36 obs tokens, 1 action token]`
(37 tokens per step, L=8 gives 296 tokens). Input = token embedding (separate tables for the 2048 obs
codes and the 18 full ALE actions) + a learned absolute position embedding + a task embedding (separate
tables for obs and action positions). Which table a token uses is implied by its absolute position:
`pos % 37 == 36` is an action token. The backbone is minGPT/nanoGPT pre-LN with a fused qkv Linear and
`F.scaled_dot_product_attention` (flash kernels on GPU, the fused CPU kernel here).

Heads read only the positions they need (official JOWA "slicers", docs/official_code.md §2):
  obs head     positions 0..34 and 36 of each block -> the NEXT obs token (2048 classes)
  reward head  position 36 (action token)            -> sign(r_t) + 1 (3 classes)
  end head     position 36                           -> d_t (2 classes)
  Q head       position 35 (last obs token)          -> num_q x 18 x 51 C51 logits (sees o_<=t, a_<t)
The target Q head is a frozen copy of the Q head applied to the ONLINE backbone features (there is no
target transformer); `update_target()` hard-copies it (every 1000 steps, see `step_target`).

Planner API (KV cache; exact: cached incremental forward == full forward, see tests):
  cache = model.init_cache(batch, max_tokens=296, dtype=None)     # KVCache, preallocated, length 0
  h = model.forward_cached(tokens (B, T) long, task_ids (B,), cache)   # (B, T, D); cache.length += T
      token kinds are implied by the absolute position cache.length + arange(T) (mod 37)
  cache.repeat_interleave(k) / cache.index_select(idx) / cache.clone()  # beams: whole-tensor ops
  model.obs_logits(h) (.., 2048) · model.reward_logits(h) (.., 3) · model.end_logits(h) (.., 2)
  model.q_values(h, action_mask) (.., 18): expected Q of the ensemble-mean C51 distribution, -inf where
      action_mask is False.  model.action_mask_for(task_ids) -> (B, 18) bool from the buffer.

Inference fast paths (eval mode, no grad; equal to the plain forward up to float rounding, see tests):
  model.decode_step(tokens (B,), task_ids, cache) -> (B, D)   one token per row (forward_cached uses it at T=1)
  model.forward_cached(seq, task_ids, cache, last_only=True)   last block runs only the last query (roots)
  model.backbone_last(seq, task_ids) -> (B, D)                 the greedy critic's input, no cache
  cache.shared / cache.groups: a planning root's context is read once per block of >= 8 rows
"""

from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from jowa_common.actions import FULL_ACTIONS
from jowa_common.errors import ConfigError

NUM_TASKS = 60  # the official alphabetical 60-game list (Breakout = 13)


@dataclass
class WorldActionConfig:
    # --- token layout (paper sec. 4.1; docs/official_code.md §2) ---
    obs_vocab: int = 2048  # VQ codebook size = obs token classes (Table 9)
    num_actions: int = 18  # full ALE action set; action tokens are full ids 0..17
    obs_tokens: int = 36  # tokens per frame (6x6 grid)
    max_steps: int = 8  # L: steps per segment (Table 10: 296 max tokens = 8 x 37)
    num_tasks: int = NUM_TASKS  # rows of the task-embedding tables
    use_task_embed: bool = True  # paper ablation "no task embedding" sets False
    # --- transformer (Tables 10-11) ---
    num_layers: int = 4  # transformer blocks
    num_heads: int = 8  # attention heads
    embed_dim: int = 512  # D, hidden size
    dropout: float = 0.1  # embedding, attention and residual dropout (Table 10)
    # --- distributional Q head (Table 12; C51, Bellemare et al. 2017) ---
    q_hidden: int = 768  # M, MLP width of each ensemble member
    num_q: int = 1  # ensemble members; their softmax probabilities are averaged
    q_dropout: float = 0.01  # dropout after the first Q-head Linear (TD-MPC2 style)
    num_atoms: int = 51  # C51 atoms
    v_min: float = -10.0  # support lower edge (official critic config)
    v_max: float = 30.0  # support upper edge
    q_prior_std: float = 0.0  # > 0: Q head starts at a return distribution N(0, this^2) (0 = the paper's init)
    # --- variants ---
    mtbc: bool = False  # paper E.1.2 MTBC baseline: no world heads, Q head -> 18 action logits (BC)
    target_update_every: int = 1000  # steps between hard target-head copies (official config)

    @property
    def block_size(self) -> int:
        """Tokens per step: the obs tokens plus one action token."""
        return self.obs_tokens + 1

    @property
    def max_tokens(self) -> int:
        return self.max_steps * self.block_size

    def validate(self) -> "WorldActionConfig":
        if self.embed_dim % self.num_heads:
            raise ConfigError(f"model.embed_dim={self.embed_dim} is not divisible by model.num_heads={self.num_heads}")
        if self.num_atoms < 2 and not self.mtbc:
            raise ConfigError(f"model.num_atoms must be >= 2, got {self.num_atoms}")
        if not self.v_min < self.v_max:
            raise ConfigError(f"model.v_min ({self.v_min}) must be < model.v_max ({self.v_max})")
        for name in ("dropout", "q_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"model.{name} must be in [0, 1), got {getattr(self, name)}")
        for name in ("num_layers", "num_heads", "num_q", "max_steps", "obs_tokens", "num_tasks"):
            if getattr(self, name) < 1:
                raise ConfigError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        return self


# ---------------------------------------------------------------------------------------------- cache


@dataclass
class KVCache:
    """Keys/values of every layer in two preallocated tensors (layers, B, heads, max_tokens, head_dim).

    One tensor per K and V (not per layer) so that beam bookkeeping is a single tensor op.
    `length` is the number of filled positions, equal for every row (beams advance together).
    Optional sharing info (set by the planner after a root pass): positions < `shared` hold the same keys/values
    in every row of a group (`groups` (B,): the root row each row descends from). Single-token passes then read
    that shared prefix once per group instead of once per row (`rows_per_group`).
    """

    k: torch.Tensor
    v: torch.Tensor
    length: int = 0
    shared: int = 0  # positions [0, shared) are equal within a group; 0 = nothing known to be shared
    groups: torch.Tensor | None = None  # (B,) long group (root row) of each row
    _rpg: int | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    @property
    def max_tokens(self) -> int:
        return self.k.shape[3]

    def _rows(self, k: torch.Tensor, v: torch.Tensor, groups: torch.Tensor | None) -> "KVCache":
        return KVCache(k, v, self.length, self.shared if groups is not None else 0, groups)

    def repeat_interleave(self, repeats: int) -> "KVCache":
        """Row i becomes rows i*r .. i*r+r-1 (children of beam node i)."""
        g = None if self.groups is None else self.groups.repeat_interleave(repeats)
        return self._rows(self.k.repeat_interleave(repeats, dim=1), self.v.repeat_interleave(repeats, dim=1), g)

    def index_select(self, idx: torch.Tensor) -> "KVCache":
        """Keep/reorder rows (surviving beams); idx (B',) long."""
        g = None if self.groups is None else self.groups[idx.to(self.groups.device)]
        return self._rows(self.k.index_select(1, idx), self.v.index_select(1, idx), g)

    def clone(self) -> "KVCache":
        return self._rows(self.k.clone(), self.v.clone(), None if self.groups is None else self.groups.clone())

    def rows_per_group(self) -> int:
        """R when the rows form equal consecutive blocks of R rows that each lie in one group (so the shared
        prefix of block b is row b*R's), else 0. Computed once per cache object."""
        if self._rpg is None:
            g, self._rpg = self.groups, 0
            if g is not None and self.shared > 0 and g.numel() == self.batch_size:
                n = int((g[1:] != g[:-1]).sum()) + 1  # blocks of equal consecutive ids
                r = g.numel() // n
                if g.numel() % n == 0 and bool((g.view(n, r) == g[::r, None]).all()):
                    self._rpg = r
        return self._rpg


# ---------------------------------------------------------------------------------------------- backbone


def _onednn_packing() -> bool:
    try:
        return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
    except (AttributeError, RuntimeError):
        return False


_ONEDNN = _onednn_packing()
PACK_BATCH_HINT = 4  # oneDNN picks the packed layout for this many rows; fast for 1..300 rows (measured)
PACK_MIN_NUMEL = 1 << 18  # smaller weights stay in cache, where F.linear's ~4 us call beats oneDNN's ~15 us


class Linear(nn.Linear):
    """nn.Linear whose CPU inference (eval, no grad; fp32, or bf16 under autocast) runs on a cached oneDNN-packed
    weight.

    Why: a planning pass pushes 1-16 rows through every weight of the model, so it is bound by how fast the
    kernel streams the weight. MKL's sgemm does that at 6-10 GB/s for such skinny inputs, oneDNN's packed
    kernel at 20-30 GB/s (all 40M per-pass weights: 8-11 ms -> 1.5-3 ms for 1-16 rows), and it is ~25% faster
    for the 221-295-row planning roots and greedy windows too (41 -> 29 ms at 221 rows). Same fp32 math, other
    summation order (errors ~1e-6). Only in eval mode: the pack is a cache, not state, never saved or copied,
    dropped by every train()/eval() call and by `drop_packed_weights` (which our optimizers call after each
    step: fused AdamW updates weights without bumping their version counters), and rebuilt when the weight is
    replaced or its version changes (load_state_dict, in-place edits). Under CPU bf16 autocast the pack is bf16
    (half the bytes; the same result as autocast's F.linear). Training, GPUs and weights under PACK_MIN_NUMEL
    elements (all of `tiny`'s: its planning is 1.4x slower packed) use F.linear unchanged.
    `act` fuses a following ReLU/GELU (and `rows` slices output features) on either path.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x)

    def act(self, x: torch.Tensor, post: str = "none", rows: tuple[int, int] | None = None) -> torch.Tensor:
        """post(x @ W[rows]^T + b[rows]) with post in none / relu / gelu (exact erf GELU, as nn.GELU())."""
        w, b = self.weight, self.bias
        if (_ONEDNN and not self.training and w.numel() >= PACK_MIN_NUMEL and w.dtype == torch.float32
                and x.device.type == "cpu" and not torch.is_grad_enabled()):
            dt = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype
            if dt in (torch.float32, torch.bfloat16):  # bf16: what autocast would compute, on a bf16 pack
                packed, bias = self._packed(rows, dt)
                return torch.ops.mkldnn._linear_pointwise(x.to(dt), packed, bias, post, [],
                                                          "none" if post == "gelu" else "")
        if rows is not None:
            w, b = w[rows[0]:rows[1]], None if b is None else b[rows[0]:rows[1]]
        y = F.linear(x, w, b)
        return y if post == "none" else F.relu(y) if post == "relu" else F.gelu(y)

    def _packed(self, rows: tuple[int, int] | None, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
        cache = self.__dict__.setdefault("_packs", {})
        w, b = self.weight, self.bias
        stamp = (w, w._version, None if b is None else b._version)
        hit = cache.get((rows, dtype))
        if hit is None or hit[0][0] is not w or hit[0][1:] != stamp[1:]:
            lo, hi = rows or (0, w.shape[0])
            weight = w.detach()[lo:hi].to(dtype).contiguous()
            packed = torch.ops.mkldnn._reorder_linear_weight(weight, PACK_BATCH_HINT)
            bias = None if b is None else b.detach()[lo:hi].to(dtype).contiguous()
            hit = cache[(rows, dtype)] = (stamp, packed, bias)
        return hit[1], hit[2]

    def train(self, mode: bool = True) -> "Linear":
        self.drop_pack()  # weights may change before the next inference: an optimizer steps in training mode
        return super().train(mode)

    def drop_pack(self) -> None:
        self.__dict__.pop("_packs", None)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.pop("_packs", None)  # opaque oneDNN tensors cannot be copied or pickled; rebuilt on demand
        return state


def drop_packed_weights(model: nn.Module) -> None:
    """Forget every packed inference weight of `model` (call after an optimizer step; `make_optimizer` does)."""
    for m in model.modules():
        if isinstance(m, Linear):
            m.drop_pack()


def keep_scale(shape: torch.Size | tuple[int, ...], p: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Dropout multiplier: 0 with probability p (to 1/65536), else 1/(1-p), in `dtype`.

    Each 64-bit random draw gives four 16-bit lanes: ~5x cheaper than bernoulli_ on CPU, where RNG calls dominate
    dropout (9.6 vs 52 ms for 5.6M, measured). Built with vectorised float ops (int16 -> fp32, clamp, affine) so
    that dropout is one vectorised multiply forward and one backward: CPU `torch.where`/`masked_fill` and bool
    compares are scalar loops (4.3 vs 0.9 ms for a 2.8M fp32 tensor, measured). In bf16 the scale rounds to bf16,
    as in F.dropout on bf16 inputs.
    """
    n = math.prod(shape)
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=device).random_(-(2 ** 63), None)
    thr = round(p * 65536) - 32768  # drop iff lane < thr
    f = words.view(torch.int16)[:n].to(torch.float32).view(shape)
    f.clamp_(thr - 0.5, thr).sub_(thr - 0.5).mul_(2.0 / (1.0 - p))  # lane < thr -> 0, else 1/(1-p)
    return f if dtype == torch.float32 else f.to(dtype)


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """F.dropout, with the cheaper `keep_scale` multiplier on CPU (elsewhere the native kernel is already fast)."""
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu":
        return F.dropout(x, p, True)
    return x * keep_scale(x.shape, p, x.dtype, x.device)


class Dropout(nn.Module):
    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"


def _attention_with_dropout(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p: float, chunks: int = 2):
    """Causal attention with dropout on the probabilities, for CPU training. CPU SDPA has no fused kernel with
    dropout and falls back to a slow math path (268 vs 57 ms fwd+bwd per 40M layer at B=8, measured). Queries
    are split into `chunks` row blocks that only multiply the keys they can see (2 blocks skip 1/4 of the FLOPs).
    """
    B, H, T, hd = q.shape
    q, k, v = (x.reshape(B * H, T, hd) for x in (q, k, v))
    bounds = [round(T * i / chunks) for i in range(chunks + 1)]
    out = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        causal = torch.full((b - a, b), float("-inf"), dtype=q.dtype, device=q.device).triu_(a + 1)  # additive
        att = torch.baddbmm(causal, q[:, a:b], k[:, :b].transpose(1, 2), alpha=1.0 / math.sqrt(hd)).softmax(-1)
        att = att * keep_scale(att.shape, p, att.dtype, q.device)  # (B*H, b-a, b)
        out.append(att @ v[:, :b])  # (B*H, b-a, hd)
    return torch.cat(out, 1).view(B, H, T, hd)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: WorldActionConfig):
        super().__init__()
        self.n_head = cfg.num_heads
        self.qkv = Linear(cfg.embed_dim, 3 * cfg.embed_dim)  # fused q, k, v
        self.proj = Linear(cfg.embed_dim, cfg.embed_dim)
        self.attn_dropout = cfg.dropout
        self.resid_dropout = Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor] | None = None, start: int = 0):
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)  # 3x (B, H, T, hd)
        p = self.attn_dropout if self.training else 0.0
        if kv is None and p > 0 and x.device.type == "cpu":
            y = _attention_with_dropout(q, k, v, p)
        elif kv is None:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        else:
            kc, vc = kv  # (B, H, max_tokens, hd) views into the cache
            kc[:, :, start:start + T] = k
            vc[:, :, start:start + T] = v
            k, v = kc[:, :, :start + T].to(q.dtype), vc[:, :, :start + T].to(q.dtype)  # (B, H, start+T, hd)
            mask = None
            if T > 1 and start == 0:  # empty cache: the fused causal kernel, no explicit mask
                y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
                return self.resid_dropout(self.proj(y.transpose(1, 2).reshape(B, T, C)))
            if T > 1:  # SDPA's is_causal is top-left aligned; new queries sit at the bottom right
                pos = torch.arange(start + T, device=x.device)
                mask = pos <= pos[start:, None]  # (T, start+T): query start+i sees keys 0..start+i
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, D)
        return self.resid_dropout(self.proj(y))


class Block(nn.Module):
    """minGPT pre-LN block: x += attn(ln(x)); x += mlp(ln(x))."""

    def __init__(self, cfg: WorldActionConfig):
        super().__init__()
        d = cfg.embed_dim
        self.ln_1 = nn.LayerNorm(d)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(Linear(d, 4 * d), nn.GELU(), Linear(4 * d, d), Dropout(cfg.dropout))

    def forward(self, x, kv=None, start: int = 0):
        x = x + self.attn(self.ln_1(x), kv, start)
        return x + self.mlp(self.ln_2(x))


def _attend_one(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Attention of ONE query per row over all given keys: q (B, H, hd), k/v (B, H, S, hd) -> (B, H*hd)."""
    B, H, hd = q.shape
    y = F.scaled_dot_product_attention(q.unsqueeze(2), k.to(q.dtype), v.to(q.dtype))  # (B, H, 1, hd)
    return y.view(B, H * hd)  # SDPA beats q@k^T+softmax+@v here (0.04 vs 0.06 ms at B=1, 222 keys) and k@q by 4x


SHARED_ATTENTION_MIN_ROWS = 8  # rows per group from which the shared-prefix attention pays (measured below)


def _attend_shared_prefix(q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, p: int, shared: int,
                          rows: int) -> torch.Tensor:
    """`_attend_one` over cache positions 0..p when positions < `shared` are equal within blocks of `rows`
    consecutive rows: the prefix keys/values are read once per block (row b*rows's), as one matmul for the
    block's queries, and only the suffix per row; one softmax over both parts. Same result up to rounding.
    A 40M imagined step at B=16 (one root, 221-token prefix): 700 -> 526 ms CPU; B=9: 533 -> 479 (1 thread)."""
    B, H, hd = q.shape
    G, P = B // rows, shared
    kp, vp = kc[::rows, :, :P], vc[::rows, :, :P]  # (G, H, P, hd) views, no copy
    ks, vs = kc[:, :, P:p + 1], vc[:, :, P:p + 1]  # (B, H, S, hd)
    sp = torch.matmul(q.view(G, rows, H, hd).transpose(1, 2), kp.transpose(-1, -2).to(q.dtype))  # (G, H, R, P)
    ss = torch.matmul(q.unsqueeze(2), ks.transpose(-1, -2).to(q.dtype))  # (B, H, 1, S)
    w = torch.cat([sp.transpose(1, 2).reshape(B, H, P), ss.view(B, H, -1)], -1).mul_(1.0 / math.sqrt(hd))
    w = w.softmax(-1)
    yp = torch.matmul(w[..., :P].reshape(G, rows, H, P).transpose(1, 2), vp.to(q.dtype))  # (G, H, R, hd)
    ys = torch.matmul(w[..., P:].unsqueeze(2), vs.to(q.dtype)).view(B, H, hd)
    return (yp.transpose(1, 2).reshape(B, H, hd) + ys).reshape(B, H * hd)


def _block_last_query(blk: "Block", x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor] | None,
                      start: int) -> torch.Tensor:
    """A block over x (B, T, D) that returns only the LAST position's output (B, 1, D) (eval, no dropout).
    Keys/values of all T positions are computed (and written to `kv` at start.. when given)."""
    B, T, D = x.shape
    a = blk.attn
    H = a.n_head
    h = blk.ln_1(x)
    kvt = a.qkv.act(h, rows=(D, 3 * D)).view(B, T, 2, H, D // H).permute(2, 0, 3, 1, 4)
    q = a.qkv.act(h[:, -1], rows=(0, D)).view(B, H, D // H)  # (B, H, hd)
    k, v = kvt[0], kvt[1]  # (B, H, T, hd)
    if kv is not None:
        kc, vc = kv
        kc[:, :, start:start + T] = k
        vc[:, :, start:start + T] = v
        k, v = kc[:, :, :start + T], vc[:, :, :start + T]
    x = x[:, -1] + a.proj(_attend_one(q, k, v))  # (B, D)
    return (x + blk.mlp(blk.ln_2(x)))[:, None]


def _mlp_head(d: int, out: int) -> nn.Sequential:
    """2-layer predictor of the world heads (appendix E: Linear, ReLU, Linear)."""
    return nn.Sequential(Linear(d, d), nn.ReLU(), Linear(d, out))


class EnsembleQHead(nn.Module):
    """`num_q` TD-MPC2-style MLPs run as batched matmuls over stacked weights (no vmap).

    Member: Linear(D,M), Dropout, LN, Mish; Linear(M,M), LN, Mish; Linear(M, out). Weights are stored
    (num_q, in, out) and initialised like nn.Linear's default (the official head skips the GPT init).
    """

    def __init__(self, d: int, m: int, num_q: int, out: int, dropout: float):
        super().__init__()
        shapes = [(d, m), (m, m), (m, out)]
        self.weights = nn.ParameterList([nn.Parameter(torch.empty(num_q, i, o)) for i, o in shapes])
        self.biases = nn.ParameterList([nn.Parameter(torch.empty(num_q, o)) for _, o in shapes])
        self.ln_weights = nn.ParameterList([nn.Parameter(torch.ones(num_q, m)) for _ in range(2)])
        self.ln_biases = nn.ParameterList([nn.Parameter(torch.zeros(num_q, m)) for _ in range(2)])
        self.dropout = Dropout(dropout)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for w, b in zip(self.weights, self.biases):
            bound = 1.0 / math.sqrt(w.shape[1])  # = kaiming_uniform(a=sqrt(5)) of nn.Linear
            nn.init.uniform_(w, -bound, bound)
            nn.init.uniform_(b, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, D) -> (num_q, N, out)."""
        h = x.unsqueeze(0).expand(self.weights[0].shape[0], -1, -1)  # (Q, N, D)
        for i in range(3):
            h = torch.baddbmm(self.biases[i].unsqueeze(1), h, self.weights[i])  # (Q, N, out_i)
            if i == 2:
                return h
            if i == 0:
                h = self.dropout(h)
            h = F.layer_norm(h, h.shape[-1:]) * self.ln_weights[i].unsqueeze(1) + self.ln_biases[i].unsqueeze(1)
            h = F.mish(h)
        raise AssertionError("unreachable")


# ---------------------------------------------------------------------------------------------- model


class WorldActionModel(nn.Module):
    def __init__(self, cfg: WorldActionConfig | None = None):
        super().__init__()
        self.cfg = cfg = (cfg or WorldActionConfig()).validate()
        d = cfg.embed_dim
        self.obs_emb = nn.Embedding(cfg.obs_vocab, d)
        self.act_emb = nn.Embedding(cfg.num_actions, d)
        self.pos_emb = nn.Embedding(cfg.max_tokens, d)
        if cfg.use_task_embed:
            self.task_obs_emb = nn.Embedding(cfg.num_tasks, d)
            self.task_act_emb = nn.Embedding(cfg.num_tasks, d)
        self.drop = Dropout(cfg.dropout)
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.num_layers)])
        self.ln_f = nn.LayerNorm(d)
        if not cfg.mtbc:
            self.head_obs = _mlp_head(d, cfg.obs_vocab)
            self.head_reward = _mlp_head(d, 3)
            self.head_end = _mlp_head(d, 2)
        q_out = cfg.num_actions if cfg.mtbc else cfg.num_actions * cfg.num_atoms
        self.head_q = EnsembleQHead(d, cfg.q_hidden, cfg.num_q, q_out, cfg.q_dropout)
        self.apply(self._init_weights)
        if cfg.q_prior_std > 0 and not cfg.mtbc:
            self._init_q_prior(cfg.q_prior_std)
        if not cfg.mtbc:
            self.head_q_target = copy.deepcopy(self.head_q).requires_grad_(False).eval()
        self.register_buffer("support", torch.linspace(cfg.v_min, cfg.v_max, cfg.num_atoms), persistent=False)
        # valid full actions per task (num_tasks, 18); all True until set from the manifests
        self.register_buffer("action_masks", torch.ones(cfg.num_tasks, cfg.num_actions, dtype=torch.bool))

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):  # GPT init (official JOWA); the Q head keeps its own
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)

    @torch.no_grad()
    def _init_q_prior(self, std: float) -> None:
        """Start every action's C51 distribution near N(0, std^2) instead of near uniform on [v_min, v_max].

        Why (small scale only): a uniform start has mean (v_min + v_max) / 2 = 10 and every Bellman backup only
        shrinks its width by gamma, so it takes hundreds of target updates before the TD target carries the
        rewards (a few thousand steps leave the TD loss at ln(atoms), and max over noisy uniform Q values drifts
        upwards). Starting at "return ~ 0" lets each backup add the rewards one step further back."""
        last = self.head_q.weights[-1]
        z = torch.linspace(self.cfg.v_min, self.cfg.v_max, self.cfg.num_atoms)
        prior = (-0.5 * (z / std) ** 2).repeat(self.cfg.num_actions)  # (18 * atoms,) log-density up to a constant
        self.head_q.biases[-1].copy_(prior.expand_as(self.head_q.biases[-1]))
        last.mul_(0.1)  # keep the features' share small at the start: the prior dominates the first outputs

    def train(self, mode: bool = True):
        super().train(mode)
        if hasattr(self, "head_q_target"):
            self.head_q_target.eval()  # the target head never uses dropout
        return self

    # ------------------------------------------------------------------ backbone

    def embed(self, seq: torch.Tensor, task_ids: torch.Tensor, start: int = 0) -> torch.Tensor:
        """seq (B, T) long at absolute positions start..start+T -> (B, T, D). Kinds follow position % 37."""
        cfg = self.cfg
        T = seq.shape[1]
        if start + T > cfg.max_tokens:
            raise ValueError(f"{start + T} tokens exceed the model window of {cfg.max_tokens}")
        pos = torch.arange(start, start + T, device=seq.device)  # (T,)
        is_act = (pos % cfg.block_size == cfg.obs_tokens)[:, None]  # (T, 1)
        x = torch.where(is_act, self.act_emb(torch.where(is_act[:, 0], seq, 0)),
                        self.obs_emb(torch.where(is_act[:, 0], 0, seq)))  # (B, T, D)
        x = x + self.pos_emb(pos)
        if cfg.use_task_embed:
            x = x + torch.where(is_act, self.task_act_emb(task_ids)[:, None], self.task_obs_emb(task_ids)[:, None])
        return self.drop(x)

    def backbone(self, seq: torch.Tensor, task_ids: torch.Tensor) -> torch.Tensor:
        """Full causal pass over a window that starts at position 0: (B, T) -> (B, T, D) after ln_f."""
        x = self.embed(seq, task_ids)
        for block in self.blocks:
            x = block(x)
        return self.ln_f(x)

    def forward(self, tokens: torch.Tensor, actions: torch.Tensor, task_ids: torch.Tensor) -> torch.Tensor:
        """tokens (B, L, 36), actions (B, L), task_ids (B,) -> hidden (B, L, 37, D)."""
        B, L, K = tokens.shape
        seq = torch.cat([tokens, actions.unsqueeze(-1)], dim=-1).view(B, L * (K + 1))  # (B, L*37)
        return self.backbone(seq, task_ids).view(B, L, K + 1, -1)

    # ------------------------------------------------------------------ KV cache (planning)

    def init_cache(self, batch: int, max_tokens: int | None = None, dtype: torch.dtype | None = None,
                   device: torch.device | None = None) -> KVCache:
        cfg = self.cfg
        p = self.pos_emb.weight
        shape = (cfg.num_layers, batch, cfg.num_heads, max_tokens or cfg.max_tokens, cfg.embed_dim // cfg.num_heads)
        kw = dict(dtype=dtype or p.dtype, device=device or p.device)
        return KVCache(torch.zeros(shape, **kw), torch.zeros(shape, **kw), 0)

    @torch.no_grad()
    def forward_cached(self, seq: torch.Tensor, task_ids: torch.Tensor, cache: KVCache,
                       last_only: bool = False) -> torch.Tensor:
        """Append seq (B, T) at positions cache.length.. and return their hidden states (B, T, D).

        last_only: return (B, 1, D) for the last position only. The last block then computes keys/values for
        every position (they go to the cache) but attention and MLP only for the last query: what a planning
        root needs (the critic at the newest obs token), 1/5 fewer FLOPs for a 4-layer model.
        """
        start, T = cache.length, seq.shape[1]
        if start + T > cache.max_tokens:
            raise ValueError(f"KV cache full: {start} + {T} tokens > {cache.max_tokens} slots")
        if T == 1 and not self.training:
            h = self.decode_step(seq[:, 0], task_ids, cache)
            return h[:, None]
        x = self.embed(seq, task_ids, start)
        n = len(self.blocks)
        for i, block in enumerate(self.blocks):
            if last_only and i == n - 1:
                x = _block_last_query(block, x, (cache.k[i], cache.v[i]), start)
            else:
                x = block(x, (cache.k[i], cache.v[i]), start)
        cache.length = start + T
        return self.ln_f(x)

    @torch.no_grad()
    def backbone_last(self, seq: torch.Tensor, task_ids: torch.Tensor) -> torch.Tensor:
        """Hidden state (B, D) of the LAST position of a window starting at position 0, without a cache: the
        greedy critic. Equal to backbone(seq)[:, -1] up to float rounding; the last block runs 1 query."""
        x = self.embed(seq, task_ids)
        for block in self.blocks[:-1]:
            x = block(x)
        return self.ln_f(_block_last_query(self.blocks[-1], x, None, 0))[:, 0]

    def embed_next(self, tokens: torch.Tensor, task_ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Embedding (B, D) of one new token per row at position cache.length (its kind follows the position)."""
        cfg, p = self.cfg, cache.length
        if p >= cache.max_tokens:
            raise ValueError(f"KV cache full: {p} + 1 tokens > {cache.max_tokens} slots")
        is_act = p % cfg.block_size == cfg.obs_tokens
        x = (self.act_emb if is_act else self.obs_emb).weight[tokens] + self.pos_emb.weight[p]  # (B, D)
        if cfg.use_task_embed:
            x = x + (self.task_act_emb if is_act else self.task_obs_emb).weight[task_ids]
        return x

    @torch.no_grad()
    def decode_step(self, tokens: torch.Tensor, task_ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """One new token per row, tokens (B,) at position cache.length -> hidden (B, D) after ln_f (eval only).

        The planner's inner loop (37 of these per imagined step): no dropout branches, the token kind is known
        from the position, embeddings are row lookups, the Linears run on packed weights (see `Linear`) with
        the MLP's GELU fused, and attention of the single query is the fused SDPA kernel over the cache slice.
        """
        cfg, p = self.cfg, cache.length
        x = self.embed_next(tokens, task_ids, cache)  # (B, D)
        B, D = x.shape
        H = cfg.num_heads
        rpg = cache.rows_per_group() if p >= cache.shared else 0
        # CPU autocast: attention of the single query in the cache's fp32 (bf16 SDPA is 2-3x slower there)
        fp32_attention = x.device.type == "cpu" and torch.is_autocast_enabled("cpu") and cache.k.dtype == torch.float32
        for i, blk in enumerate(self.blocks):
            a = blk.attn
            h = F.layer_norm(x, (D,), blk.ln_1.weight, blk.ln_1.bias, blk.ln_1.eps)
            qkv = a.qkv(h).view(B, 3, H, D // H)
            kc, vc = cache.k[i], cache.v[i]  # (B, H, max_tokens, hd)
            kc[:, :, p] = qkv[:, 1]
            vc[:, :, p] = qkv[:, 2]
            with torch.autocast("cpu", enabled=False) if fp32_attention else contextlib.nullcontext():
                q = qkv[:, 0].float() if fp32_attention else qkv[:, 0]
                if rpg >= SHARED_ATTENTION_MIN_ROWS:
                    y = _attend_shared_prefix(q, kc, vc, p, cache.shared, rpg)  # (B, D)
                else:
                    y = _attend_one(q, kc[:, :, :p + 1], vc[:, :, :p + 1])  # (B, D)
            x = x + a.proj(y)
            h = F.layer_norm(x, (D,), blk.ln_2.weight, blk.ln_2.bias, blk.ln_2.eps)
            x = x + blk.mlp[2](blk.mlp[0].act(h, "gelu"))
        cache.length = p + 1
        return F.layer_norm(x, (D,), self.ln_f.weight, self.ln_f.bias, self.ln_f.eps)

    # ------------------------------------------------------------------ heads

    def obs_logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.head_obs[2](self.head_obs[0].act(h, "relu"))  # (..., 2048): the next obs token

    def reward_logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.head_reward(h)  # (..., 3): sign(r) + 1

    def end_logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.head_end(h)  # (..., 2)

    def q_logits(self, h: torch.Tensor, target: bool = False) -> torch.Tensor:
        """h (..., D) -> (num_q, ..., 18, atoms) C51 logits (MTBC: (num_q, ..., 18))."""
        head = self.head_q_target if target else self.head_q
        lead = h.shape[:-1]
        out = head(h.reshape(-1, h.shape[-1]))  # (Q, N, 18*atoms)
        tail = (self.cfg.num_actions,) if self.cfg.mtbc else (self.cfg.num_actions, self.cfg.num_atoms)
        return out.view(out.shape[0], *lead, *tail)

    def q_probs(self, h: torch.Tensor, target: bool = False) -> torch.Tensor:
        """Ensemble-mean C51 probabilities (..., 18, atoms), in fp32."""
        return self.q_logits(h, target).float().softmax(-1).mean(0)

    def q_values(self, h: torch.Tensor, action_mask: torch.Tensor | None = None, target: bool = False) -> torch.Tensor:
        """Expected Q (..., 18) of the ensemble-mean distribution (MTBC: mean logits); -inf where masked."""
        if self.cfg.mtbc:
            q = self.q_logits(h, target).float().mean(0)
        else:
            q = expected_q(self.q_probs(h, target), self.support)  # (..., 18)
        if action_mask is not None:
            q = q.masked_fill(~action_mask, float("-inf"))
        return q

    def action_mask_for(self, task_ids: torch.Tensor) -> torch.Tensor:
        return self.action_masks[task_ids]  # (B, 18) bool

    # ------------------------------------------------------------------ target head, masks, optimizer

    @torch.no_grad()
    def update_target(self) -> None:
        """Hard copy of the online Q head into the target head."""
        if hasattr(self, "head_q_target"):
            for t, s in zip(self.head_q_target.parameters(), self.head_q.parameters()):
                t.copy_(s)

    def step_target(self, step: int) -> bool:
        """Call once per optimizer step with the global step; copies when step % target_update_every == 0."""
        if step % self.cfg.target_update_every == 0:
            self.update_target()
            return True
        return False

    @torch.no_grad()
    def set_action_masks(self, masks: torch.Tensor) -> None:
        if masks.shape != self.action_masks.shape:
            raise ValueError(f"action masks must be {tuple(self.action_masks.shape)}, got {tuple(masks.shape)}")
        self.action_masks.copy_(masks.to(torch.bool))

    def param_groups(self, world_lr: float = 5e-5, critic_lr: float = 5e-5, weight_decay: float = 0.01) -> list[dict]:
        """AdamW groups as in the official configure_optimizer (Table 13): Linear weights decay; biases, LN and
        embeddings do not; the whole Q head (its own LR) decays. The target head is excluded."""
        decay, no_decay, critic = [], [], []
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            if name.startswith("head_q."):
                critic.append(p)
            elif p.dim() >= 2 and "emb" not in name:
                decay.append(p)
            else:
                no_decay.append(p)
        return [dict(params=decay, lr=world_lr, weight_decay=weight_decay),
                dict(params=no_decay, lr=world_lr, weight_decay=0.0),
                dict(params=critic, lr=critic_lr, weight_decay=weight_decay)]

    def configure_optimizer(self, world_lr: float = 5e-5, critic_lr: float = 5e-5,
                            weight_decay: float = 0.01) -> torch.optim.AdamW:
        """AdamW over `param_groups` (default betas/eps, Table 13). The fused kernel is ~9x faster than the
        foreach one on CPU for the 40M model (23 vs 203 ms per step, measured)."""
        opt = torch.optim.AdamW(self.param_groups(world_lr, critic_lr, weight_decay), fused=True)
        opt.register_step_post_hook(lambda *_: drop_packed_weights(self))  # fused steps keep version counters
        return opt

    def parameter_counts(self) -> dict[str, int]:
        """Per-part counts (the official parts of docs/official_code.md §2) + trainable total."""
        def n(mods) -> int:
            return sum(p.numel() for m in mods for p in m.parameters())

        emb = [self.obs_emb, self.act_emb, self.pos_emb]
        if self.cfg.use_task_embed:
            emb += [self.task_obs_emb, self.task_act_emb]
        counts = {"backbone": n([self.blocks, self.ln_f]), "embeddings": n(emb)}
        if not self.cfg.mtbc:
            counts |= {"head_obs": n([self.head_obs]), "head_reward": n([self.head_reward]),
                       "head_end": n([self.head_end])}
        counts["head_q"] = n([self.head_q])
        counts["head_q_target"] = n([self.head_q_target]) if hasattr(self, "head_q_target") else 0
        counts["total"] = sum(p.numel() for p in self.parameters())
        counts["trainable"] = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return counts


def expected_q(probs: torch.Tensor, support: torch.Tensor) -> torch.Tensor:
    """E[Z] = sum_z p(z) z over the last dim, in fp32 (a matmul would run in bf16 under autocast and blur
    near-equal Q values: 10.31 vs 10.3125)."""
    return (probs.float() * support.float()).sum(-1)
