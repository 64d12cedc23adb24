"""Opt-in compiled single-token decoding for planning on CPU (torch.compile, inductor C++ GEMM micro-kernels).

A planning pass reads every weight of the model for 1-16 rows, so it is bound by how fast the matmul kernels
stream weights. For small batches MKL's kernels do that poorly; inductor's C++ GEMM template with frozen
(prepacked) weights does it faster for the 40M model at batch 1-4: one imagined step (37 passes), CPU ms at
1 thread, eager -> compiled: B=1 185 -> 160, B=2 309 -> 205, B=4 360 -> 217; no gain at B=8/16 (473 -> 494,
673 -> 720), hence `max_batch` 4 (measured at load ~3). Tokens are the same as the eager `decode_step`'s
(fp32; tested).

Costs and limits, why it is opt-in (`WorldModelImagination(model, compile=True)`):
  * a cold compile of ~30-45 s per batch size (inductor caches it on disk for later processes);
  * "freezing" bakes the weights into the compiled code: any weight update (fine-tuning between plans) is
    detected by parameter identity + version and triggers a rebuild (another compile);
  * fp32 only (under autocast the eager path runs); batches above `max_batch` use the eager path;
  * measured at 1 thread. With 2 threads on a machine whose other core is busy, the many short parallel
    regions of the compiled kernels stall on OpenMP barriers (one run: 10 s per K=4 decision), so prefer 1 thread
    per process (or an idle machine) with it.
The attention over the cache stays eager (its length changes every pass); only the per-layer Linear/LayerNorm/
MLP parts and the obs head are compiled, each for a fixed batch size.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

_INDUCTOR = dict(freezing=True, max_autotune=True, max_autotune_gemm_backends="CPP,ATEN")


class _PreAttention(nn.Module):
    def __init__(self, blk: nn.Module) -> None:
        super().__init__()
        self.ln, self.qkv = blk.ln_1, blk.attn.qkv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.qkv(self.ln(x))  # (B, 3D)


class _PostAttention(nn.Module):
    def __init__(self, blk: nn.Module) -> None:
        super().__init__()
        self.proj, self.ln, self.fc, self.act, self.out = blk.attn.proj, blk.ln_2, blk.mlp[0], blk.mlp[1], blk.mlp[2]

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x = x + self.proj(y)
        return x + self.out(self.act(self.fc(self.ln(x))))


class _Final(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.ln, self.head = model.ln_f, model.head_obs

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.ln(x)
        return h, self.head(h).argmax(-1)  # hidden after ln_f, greedy next obs token


class CompiledDecoder:
    """`decode(tokens (B,), task_ids (B,), cache) -> (h (B, D), next_obs_token (B,))` like
    `WorldActionModel.decode_step` + the obs head's argmax, with compiled Linear parts per batch size."""

    def __init__(self, model: nn.Module, max_batch: int = 4) -> None:
        self.model, self.max_batch = model, max_batch
        self._parts: dict[int, tuple[list, list, object]] = {}
        self._fingerprint = self._weights_key()

    def _weights_key(self) -> tuple:
        return tuple((id(p), p._version) for p in self.model.parameters())

    def usable(self, batch: int) -> bool:
        w = self.model.pos_emb.weight
        return (batch <= self.max_batch and w.device.type == "cpu" and w.dtype == torch.float32
                and not torch.is_autocast_enabled("cpu") and not self.model.training)

    def _get(self, batch: int):
        key = self._weights_key()
        if key != self._fingerprint:  # weights changed since compiling: frozen copies are stale
            self._parts.clear()
            torch._dynamo.reset()
            self._fingerprint = key
        parts = self._parts.get(batch)
        if parts is None:
            m = self.model
            pre = [torch.compile(_PreAttention(b), dynamic=False) for b in m.blocks]
            post = [torch.compile(_PostAttention(b), dynamic=False) for b in m.blocks]
            final = torch.compile(_Final(m), dynamic=False)
            x = torch.zeros(batch, m.cfg.embed_dim)
            with torch._inductor.config.patch(_INDUCTOR), torch._dynamo.config.patch(recompile_limit=1024), \
                    torch.no_grad():  # compile now, with these settings (compilation is lazy)
                for p, q in zip(pre, post):
                    p(x)
                    q(x, x.clone())  # distinct tensors: dynamo would guard on `y is x`
                final(x)
            parts = self._parts[batch] = (pre, post, final)
        return parts

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor, task_ids: torch.Tensor, cache) -> tuple[torch.Tensor, torch.Tensor]:
        m, cfg, p = self.model, self.model.cfg, cache.length
        x = m.embed_next(tokens, task_ids, cache)  # (B, D)
        B, D = x.shape
        H = cfg.num_heads
        pre, post, final = self._get(B)
        for i in range(len(pre)):
            qkv = pre[i](x).view(B, 3, H, D // H)
            kc, vc = cache.k[i], cache.v[i]
            kc[:, :, p] = qkv[:, 1]
            vc[:, :, p] = qkv[:, 2]
            y = F.scaled_dot_product_attention(qkv[:, 0].unsqueeze(2), kc[:, :, :p + 1], vc[:, :, :p + 1])
            x = post[i](x, y.view(B, D))
        cache.length = p + 1
        return final(x)
