"""Stage-2 training-step throughput of the world-action model (fwd + all losses + bwd + clip + AdamW).

Same step as the official figure (docs/performance.md §3, 4a: JOWA-40M, B=8 segments x L=8 steps, token input,
bf16 autocast on CPU, 2 threads: 939 ms/step = 2,522 tokens/s): one row terminates at step 5 and is right-padded
for 2 steps, random actions / rewards in {-1,0,1} / tasks, model in train mode, target copy after the step.

    python benchmarks/bench_train_step.py --config 40M --batch 8 --bf16 [--matmul-floor] [--json]

--matmul-floor also times the step's own matrix products (every mm/addmm/bmm/baddbmm of the forward and backward,
timed one by one inside a few extra steps) and reports their sum: the part of the step that only a faster GEMM could
shorten, and so how much time any target leaves for everything else.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from jowa_model.losses import LossConfig, compute_loss
from jowa_model.presets import model_preset
from jowa_model import cpu_kernels
from jowa_model.world_action import WorldActionModel
from pipelines.train_core import random_batch

OFFICIAL_40M_BF16_TOK_S = 2522.0  # docs/performance.md §3, 4a


_aten = torch.ops.aten
MATMUL_OPS = (_aten.mm.default, _aten.addmm.default, _aten.bmm.default, _aten.baddbmm.default)


class MatmulRecorder(TorchDispatchMode):
    """Times every matrix product that reaches the kernels (below autocast, so in the dtypes that really run),
    forward and backward. `calls`: (op, shapes of its tensor arguments, seconds)."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in MATMUL_OPS:
            return func(*args, **kwargs)
        t0 = time.perf_counter()
        out = func(*args, **kwargs)
        dt = time.perf_counter() - t0
        self.calls.append((func, [tuple(a.shape) for a in args if isinstance(a, torch.Tensor)], dt))
        return out


def matmul_flop(func, shapes) -> int:
    """FLOPs of one recorded product (2 per multiply-add)."""
    a, b = shapes[-2:]  # mm / bmm: (mat1, mat2); addmm / baddbmm: (input, mat1, mat2)
    batch = a[0] if len(a) == 3 else 1
    return 2 * batch * a[-2] * a[-1] * b[-1]


def run(config: str = "40M", batch: int = 8, steps: int = 8, bf16: bool = False, threads: int = 2, warmup: int = 3,
        reps: int = 10, compile: bool = False, log=None, matmul_floor: bool = False, plain: bool = False) -> dict:
    """Median ms/step and tokens/s of the stage-2 step for one preset; `log(msg)` gets one line per step."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cfg = model_preset(config)
    model = WorldActionModel(cfg).train()
    if not plain:  # the trainers' default: jowa_model/cpu_kernels.py on
        cpu_kernels.apply(model)
    opt = model.configure_optimizer(5e-5, 5e-5, 0.01)
    params = [p for g in opt.param_groups for p in g["params"]]
    loss_cfg = LossConfig()
    data = random_batch(cfg, batch, steps, torch.Generator().manual_seed(0))
    fwd = torch.compile(model) if compile else model

    def step(i: int) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            terms = compute_loss(fwd, data, loss_cfg, stage=2)
        opt.zero_grad(set_to_none=True)
        terms.total.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
        opt.step()
        model.step_target(i)

    times, cpu = [], []
    load_before = os.getloadavg()[0]
    for i in range(warmup + reps):
        t0, c0 = time.perf_counter(), time.process_time()
        step(i + 1)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
        if log:
            log(f"step {i + 1}: {1000 * (time.perf_counter() - t0):.0f} ms")
    ms = 1000 * statistics.median(times)
    tokens = batch * steps * cfg.block_size
    out = dict(config=config, batch=batch, steps=steps, bf16=bf16, threads=threads,
               ms_per_step=round(ms, 1), tokens_per_s=round(tokens / ms * 1000, 1),
               segments_per_s=round(batch / ms * 1000, 2), reps=reps,
               min_ms_per_step=round(1000 * min(times), 1),
               cpu_ms_per_step=round(1000 * statistics.median(cpu), 1),  # process CPU time, all threads
               load_avg=[round(load_before, 2), round(os.getloadavg()[0], 2)],  # 1-min load before/after
               trainable_params=model.parameter_counts()["trainable"],
               gflop_per_step=round(step_gflop(cfg, batch, steps), 1))
    out["gflop_per_s"] = round(out["gflop_per_step"] / ms * 1000, 1)
    if config == "40M" and bf16 and batch == 8 and steps == 8:
        out["speedup_vs_official"] = round(out["tokens_per_s"] / OFFICIAL_40M_BF16_TOK_S, 2)
    if matmul_floor:  # extra steps, each timed product by product (the recorder's own overhead stays outside)
        per_step = []
        for i in range(max(3, reps // 2)):
            with MatmulRecorder() as rec:
                step(warmup + reps + 1 + i)
            per_step.append(sum(dt for _, _, dt in rec.calls))
        mm_s = statistics.median(per_step)
        gflop = sum(matmul_flop(f, shapes) for f, shapes, _ in rec.calls) / 1e9
        out.update(matmul_calls=len(rec.calls), matmul_gflop=round(gflop, 1), matmul_ms=round(1000 * mm_s, 1),
                   matmul_gflop_per_s=round(gflop / mm_s, 1), other_ms=round(ms - 1000 * mm_s, 1))
    return out


def step_gflop(cfg, batch: int, steps: int) -> float:
    """Matmul FLOPs of one training step (fwd x 3 for fwd + bwd), the work no implementation can skip:
    backbone Linears on every token, the obs head on its L*36-1 positions, causal attention (lower triangle)."""
    d, T = cfg.embed_dim, steps * cfg.block_size
    backbone = 2 * batch * T * cfg.num_layers * 12 * d * d
    obs_head = 2 * batch * (steps * cfg.obs_tokens - 1) * (d * d + d * cfg.obs_vocab)
    attention = cfg.num_layers * batch * 2 * 2 * (T * (T + 1) // 2) * d
    return 3 * (backbone + obs_head + attention) / 1e9


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="40M", help="model preset: tiny | 40M | 70M | 150M")
    ap.add_argument("--batch", type=int, default=8, help="segments per step")
    ap.add_argument("--steps", type=int, default=8, help="steps per segment (L)")
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast (fp32 master weights)")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads (the anchor used 2)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--compile", action="store_true",
                    help="torch.compile the model (experimental; slower here: 1682 vs 1390 CPU ms/step, 1 thread)")
    ap.add_argument("--matmul-floor", action="store_true",
                    help="also time the step's matrix products one by one (the GEMM-bound part of the step)")
    ap.add_argument("--plain", action="store_true", help="without jowa_model/cpu_kernels.py (the plain model)")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args(argv)
    out = run(args.config, args.batch, args.steps, args.bf16, args.threads, args.warmup, args.reps, args.compile,
              log=lambda msg: print(msg, file=sys.stderr), matmul_floor=args.matmul_floor, plain=args.plain)
    ms = out["ms_per_step"]
    if args.json:
        print(json.dumps(out))
    else:
        print(f"{args.config} B={args.batch} L={args.steps} bf16={args.bf16}: {ms:.1f} ms/step (median; min "
              f"{out['min_ms_per_step']:.0f}), {out['tokens_per_s']:.0f} tokens/s"
              + (f" ({out['speedup_vs_official']}x official 2,522 tok/s)" if "speedup_vs_official" in out else "")
              + f"; CPU {out['cpu_ms_per_step']:.0f} ms/step; {out['gflop_per_step']} GFLOP/step = "
              f"{out['gflop_per_s']} GFLOP/s; load {out['load_avg'][0]} -> {out['load_avg'][1]}")
        if "matmul_ms" in out:
            print(f"  of which matrix products: {out['matmul_calls']} calls, {out['matmul_gflop']} GFLOP, "
                  f"{out['matmul_ms']:.1f} ms ({out['matmul_gflop_per_s']:.0f} GFLOP/s); everything else "
                  f"{out['other_ms']:.1f} ms")
    return out


if __name__ == "__main__":
    main()
