"""CPU fast paths of the world-action model, switched on with one call: `apply(model, inference=, training=)`.

`world_action.py` is written with plain `nn.Linear`, `nn.Dropout`, `F.scaled_dot_product_attention` and a plain
KV cache. Each piece here replaces one of those by code measured to be faster on a CPU, with the same math (up
to float rounding; tests/model/test_cpu_kernels.py checks every piece against the plain model):

  inference (eval mode, no grad)
    CPUWorldActionModel   a lean `decode_step` (the planner's one-token pass: 2-D rows, row-lookup embeddings,
                          the MLP's GELU fused into its packed Linear)
    PackedLinear          Linears of >= PACK_MIN_NUMEL weights run on a cached oneDNN-packed weight
    CPUKVCache            one-query attention in fp32 under CPU bf16 autocast; a planning root's keys/values
                          read once per block of >= SHARED_ATTENTION_MIN_ROWS imagined rows
  training
    FastDropout           dropout masks from 16-bit random lanes (`keep_scale`)
    CPUTrainingAttention  causal attention with dropout in query blocks (CPU SDPA has no fused dropout kernel)

`apply` changes the class of the model and of existing modules (same parameters, same names, same state_dict)
and the class of KV cache `init_cache` builds; `remove` undoes it. Every piece checks the device at call time and takes the
plain path off the CPU, so a model with the kernels on trains and plans on a GPU unchanged. Both switches are
on by default where they pay today: pretraining (`PretrainConfig.cpu_kernels`) and every loaded checkpoint
(`load_world_action(cpu_kernels=True)`: evaluation, planning, fine-tuning); `jowa bench plan --plain` and
`jowa bench train --set train.plain=true` measure the model without them.

This is the only module that calls private torch ops (`torch.ops.mkldnn.*`); if a torch release drops them,
`PackedLinear` falls back to `F.linear` (checked once at import).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from jowa_model.world_action import CausalSelfAttention, KVCache, WorldActionModel


def _onednn_packing() -> bool:
    try:
        return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
    except (AttributeError, RuntimeError):
        return False


ONEDNN = _onednn_packing()
PACK_BATCH_HINT = 4  # oneDNN picks the packed layout for this many rows; fast for 1..300 rows (measured)
PACK_MIN_NUMEL = 1 << 18  # smaller weights stay in cache, where F.linear's ~4 us call beats oneDNN's ~15 us
SHARED_ATTENTION_MIN_ROWS = 8  # rows per root from which the shared-prefix attention pays (measured below)


def apply(model: WorldActionModel, inference: bool = True, training: bool = True) -> WorldActionModel:
    """Switch the CPU fast paths on for `model` (in place; returns it). Safe on any device and in any mode."""
    for m in model.modules():
        if inference and ONEDNN and type(m) is nn.Linear and m.weight.numel() >= PACK_MIN_NUMEL:
            m.__class__ = PackedLinear
        elif training and type(m) is nn.Dropout:
            m.__class__ = FastDropout
        elif training and type(m) is CausalSelfAttention:
            m.__class__ = CPUTrainingAttention
    if inference:
        model.__class__ = CPUWorldActionModel
        model.cache_class = CPUKVCache
    return model


def remove(model: WorldActionModel) -> WorldActionModel:
    """Back to the plain model of world_action.py (in place; returns it)."""
    plain = {PackedLinear: nn.Linear, FastDropout: nn.Dropout, CPUTrainingAttention: CausalSelfAttention,
             CPUWorldActionModel: WorldActionModel}
    for m in model.modules():
        if type(m) in plain:
            m.__dict__.pop("_packs", None)
            m.__class__ = plain[type(m)]
    model.cache_class = KVCache
    return model


# ---------------------------------------------------------------------------------------------- inference


class CPUWorldActionModel(WorldActionModel):
    """WorldActionModel with a lean one-token pass for CPU planning (37 of them per imagined step).

    Same math as `WorldActionModel.decode_step` (= `forward_cached` at T=1), without its generality: the token
    kind is known from the position, embeddings are row lookups, rows stay 2-D, LayerNorms are direct calls and
    the MLP's GELU is fused into its packed Linear. Per-pass overhead is what MCTS and wide beams pay: at 9-16
    rows of a 40M model the general pass measured 5.4-6.9 ms, this one 4.4-5.7 ms (2 threads).
    """

    @torch.no_grad()
    def decode_step(self, tokens: torch.Tensor, task_ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
        cfg, p = self.cfg, cache.length
        if self.training or tokens.device.type != "cpu":
            return super().decode_step(tokens, task_ids, cache)
        if p >= cache.max_tokens:
            raise ValueError(f"KV cache full: {p} + 1 tokens > {cache.max_tokens} slots")
        is_act = p % cfg.block_size == cfg.obs_tokens
        x = (self.act_emb if is_act else self.obs_emb).weight[tokens] + self.pos_emb.weight[p]  # (B, D)
        if cfg.use_task_embed:
            x = x + (self.task_act_emb if is_act else self.task_obs_emb).weight[task_ids]
        B, D = x.shape
        H = cfg.num_heads
        for i, blk in enumerate(self.blocks):
            a = blk.attn
            qkv = a.qkv(F.layer_norm(x, (D,), blk.ln_1.weight, blk.ln_1.bias, blk.ln_1.eps)).view(B, 3, 1, H, D // H)
            q, k, v = qkv.transpose(2, 3).unbind(1)  # 3x (B, H, 1, hd)
            x = x + a.proj(cache.attend(i, q, k, v).reshape(B, D))
            h = F.layer_norm(x, (D,), blk.ln_2.weight, blk.ln_2.bias, blk.ln_2.eps)
            x = x + blk.mlp[2](linear_gelu(blk.mlp[0], h))
        cache.length = p + 1
        return F.layer_norm(x, (D,), self.ln_f.weight, self.ln_f.bias, self.ln_f.eps)


def linear_gelu(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """gelu(layer(x)) (exact erf GELU, as nn.GELU()), fused into the packed kernel where `layer` has a pack."""
    if isinstance(layer, PackedLinear) and layer.packable(x):
        dt = layer.pack_dtype(x)
        packed, bias = layer._packed(dt)
        return torch.ops.mkldnn._linear_pointwise(x.to(dt), packed, bias, "gelu", [], "none")
    return F.gelu(layer(x))


class PackedLinear(nn.Linear):
    """nn.Linear whose CPU inference (eval, no grad; fp32, or bf16 under autocast) runs on a cached oneDNN-packed
    weight.

    Why: a planning pass pushes 1-16 rows through every weight of the model, so it is bound by how fast the
    kernel streams the weight. MKL's sgemm does that at 6-10 GB/s for such skinny inputs, oneDNN's packed
    kernel at 20-30 GB/s (all 40M per-pass weights: 8-11 ms -> 1.5-3 ms for 1-16 rows), and it is ~25% faster
    for the 221-295-row planning roots and greedy windows too (41 -> 29 ms at 221 rows). Same fp32 math, other
    summation order (errors ~1e-6). Under CPU bf16 autocast the pack is bf16 (half the bytes; the same result
    as autocast's F.linear). `apply` leaves weights under PACK_MIN_NUMEL elements (all of `tiny`'s: its
    planning is 1.4x slower packed) as nn.Linear.

    The pack is a cache, not state: never saved or copied, dropped by every train()/eval() call, rebuilt when
    the weight tensor is replaced or its version counter moves (load_state_dict, in-place edits). Fused
    optimizers (AdamW(fused=True)) update weights without moving the version counter: our trainers step in
    training mode, and whoever steps an optimizer in eval mode calls model.eval() again before inference.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packable(x):
            dt = self.pack_dtype(x)
            packed, bias = self._packed(dt)
            return torch.ops.mkldnn._linear_pointwise(x.to(dt), packed, bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)

    def pack_dtype(self, x: torch.Tensor) -> torch.dtype:
        """bf16 under CPU bf16 autocast (what autocast would compute, on a bf16 pack), else x's dtype."""
        return torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype

    def packable(self, x: torch.Tensor) -> bool:
        return (not self.training and not torch.is_grad_enabled() and x.device.type == "cpu"
                and self.weight.dtype == torch.float32 and self.pack_dtype(x) in (torch.float32, torch.bfloat16))

    def _packed(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
        cache = self.__dict__.setdefault("_packs", {})
        w, b = self.weight, self.bias
        stamp = (w._version, None if b is None else b._version)
        hit = cache.get(dtype)
        if hit is None or hit[0] is not w or hit[1] != stamp:
            packed = torch.ops.mkldnn._reorder_linear_weight(w.detach().to(dtype).contiguous(), PACK_BATCH_HINT)
            bias = None if b is None else b.detach().to(dtype).contiguous()
            hit = cache[dtype] = (w, stamp, packed, bias)
        return hit[2], hit[3]

    def train(self, mode: bool = True) -> "PackedLinear":
        self.__dict__.pop("_packs", None)  # weights may change before the next inference
        return super().train(mode)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.pop("_packs", None)  # opaque oneDNN tensors cannot be copied or pickled; rebuilt on demand
        return state


@dataclass
class CPUKVCache(KVCache):
    """KVCache with two CPU paths for the one-token passes of planning (`decode_step`).

    - Under CPU bf16 autocast the single query attends in the cache's fp32: bf16 SDPA is 2-3x slower there.
    - After `share_prefix` (the planner calls it after a root pass), positions < `shared` hold the same keys and
      values in every row of a group (`groups` (B,): the root each row descends from). When the rows form blocks
      of >= SHARED_ATTENTION_MIN_ROWS rows of one root, that prefix is read once per block (`attend_shared_prefix`).
    """

    shared: int = 0  # positions [0, shared) are equal within a group; 0 = nothing known to be shared
    groups: torch.Tensor | None = None  # (B,) long group (root row) of each row
    _rpg: int | None = field(default=None, init=False, repr=False, compare=False)

    def _with_rows(self, k: torch.Tensor, v: torch.Tensor, rows) -> "CPUKVCache":
        g = None if self.groups is None else rows(self.groups)
        return CPUKVCache(k, v, self.length, self.shared if g is not None else 0, g)

    def share_prefix(self) -> None:
        self.shared, self._rpg = self.length, None
        self.groups = torch.arange(self.k.shape[1], device=self.k.device)

    def rows_per_group(self) -> int:
        """R when the rows form equal consecutive blocks of R rows that each lie in one group (so the shared
        prefix of block b is row b*R's), else 0. Computed once per cache object."""
        if self._rpg is None:
            g, self._rpg = self.groups, 0
            if g is not None and self.shared > 0 and g.numel() == self.k.shape[1]:
                n = int((g[1:] != g[:-1]).sum()) + 1  # blocks of equal consecutive ids
                r = g.numel() // n
                if g.numel() % n == 0 and bool((g.view(n, r) == g[::r, None]).all()):
                    self._rpg = r
        return self._rpg

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if k.shape[2] != 1 or q.device.type != "cpu":
            return super().attend(layer, q, k, v)
        p = self.length
        kc, vc = self.k[layer], self.v[layer]  # (B, H, max_tokens, hd)
        kc[:, :, p] = k[:, :, 0]
        vc[:, :, p] = v[:, :, 0]
        fp32 = torch.is_autocast_enabled("cpu") and kc.dtype == torch.float32
        with torch.autocast("cpu", enabled=False) if fp32 else contextlib.nullcontext():
            q1 = q[:, :, 0].float() if fp32 else q[:, :, 0]  # (B, H, hd)
            rpg = self.rows_per_group() if p >= self.shared else 0
            if rpg >= SHARED_ATTENTION_MIN_ROWS:
                y = attend_shared_prefix(q1, kc, vc, p, self.shared, rpg)  # (B, H, hd)
            else:  # SDPA beats q@k^T+softmax+@v here (0.04 vs 0.06 ms at B=1, 222 keys)
                y = F.scaled_dot_product_attention(q1[:, :, None], kc[:, :, :p + 1].to(q1.dtype),
                                                   vc[:, :, :p + 1].to(q1.dtype))[:, :, 0]
        return y[:, :, None]  # (B, H, 1, hd)


def attend_shared_prefix(q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, p: int, shared: int,
                         rows: int) -> torch.Tensor:
    """One query per row, q (B, H, hd), over cache positions 0..p when positions < `shared` are equal within
    blocks of `rows` consecutive rows: the prefix keys/values are read once per block (row b*rows's), as one
    matmul for the block's queries, and only the suffix per row; one softmax over both parts -> (B, H, hd).
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
    return yp.transpose(1, 2).reshape(B, H, hd) + ys


# ---------------------------------------------------------------------------------------------- training


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


class FastDropout(nn.Dropout):
    """nn.Dropout with the `keep_scale` multiplier on CPU (elsewhere the native kernel is already fast)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0 or x.device.type != "cpu":
            return super().forward(x)
        return x * keep_scale(x.shape, self.p, x.dtype, x.device)


def attention_with_dropout(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p: float,
                           chunks: int = 2) -> torch.Tensor:
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


class CPUTrainingAttention(CausalSelfAttention):
    """CausalSelfAttention whose training-mode attention with dropout runs `attention_with_dropout` on CPU."""

    def causal_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p: float) -> torch.Tensor:
        if p > 0 and q.device.type == "cpu":
            return attention_with_dropout(q, k, v, p)
        return super().causal_attention(q, k, v, p)
