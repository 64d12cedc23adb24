"""`jowa bench plan`: decisions/s of greedy, beam search (H=2, K=2/3/4) and MCTS (20 simulations) for one model.

Settings follow the official measurement (docs/performance.md §2): one environment, Phoenix
(8 valid actions), an 8-step token history that rolls after every decision, fp32 unless asked, random weights of
the named preset when no checkpoint is given. One timed decision = tokenizer.encode of the new 84x84 frame with
the paper-size tokenizer (random weights) + `Planner.plan` over the history (which cuts the context to
8 - H steps for planning, as the official code does). The env step is excluded, as in the official figures.
`encode_ms` is also reported, so token-path-only numbers can be compared with the official component latencies.
`greedy_rolling` (RollingGreedy: incremental cache, rebuilt from the newest `keep` steps when full) is a faster
greedy that does NOT reproduce the official sliding window; it is reported apart and never in the headline keys.

Like-for-like on a shared machine: `cpu_ms` (process CPU time per decision, all threads) inflates much less with
the load than wall time; with 1 thread it is the stand-in for an idle machine's wall time at 1 thread.
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from jowa_model.planner import Planner, PlannerConfig, RollingGreedy, WorldModelImagination

# Official JOWA-40M on this machine, fp32 / bf16 autocast, decisions/s (docs/performance.md §2).
OFFICIAL_40M = {
    "float32": {"greedy": 10.85, "beam_k2": 0.82, "beam_k3": 0.62, "beam_k4": 0.55, "mcts": 0.143},
    "bfloat16": {"greedy": 15.07, "beam_k2": 1.23, "beam_k3": 0.96, "beam_k4": 0.78, "mcts": 0.186},
}
OFFICIAL_ENCODE_MS = {"float32": 20.5, "bfloat16": 14.4}  # their tokenizer.encode of 1 frame, included above (§4)

PLANNERS: dict[str, PlannerConfig] = {
    "greedy": PlannerConfig(kind="greedy"),
    "beam_k2": PlannerConfig(kind="beam", horizon=2, beam_width=2),
    "beam_k3": PlannerConfig(kind="beam", horizon=2, beam_width=3),
    "beam_k4": PlannerConfig(kind="beam", horizon=2, beam_width=4),
    "mcts": PlannerConfig(kind="mcts", horizon=2, num_simulations=20, temperature=0.9),
}


@dataclass
class BenchPlanConfig:
    preset: str = "40M"  # world-action model preset when no checkpoint is given (random weights)
    game: str = "Phoenix"  # sets task id and valid actions (official anchors used Phoenix: 8 actions)
    history: int = 8  # steps of token history kept between decisions (official buffer_size 8)
    warmup: int = 2  # untimed decisions per planner
    reps: int = 5  # timed decisions per planner (median reported)
    dtype: str = "float32"  # "float32" or "bfloat16" (CPU autocast) for the world model and tokenizer
    encode: bool = True  # include tokenizer.encode of the new frame in each decision (as the official figures)
    threads: int = 2  # torch intra-op threads (official figures: 2)
    seed: int = 0  # weights and synthetic tokens
    rolling_keep: int = 4  # also time RollingGreedy(keep) (NOT the official rule; reported apart); 0 = skip
    cpu_kernels: bool = True  # jowa_model/cpu_kernels.py on (False: the plain model of world_action.py)


def _load_model(ckpt: str | Path | None, preset: str, kernels: bool):
    from jowa_model import checkpoint, cpu_kernels
    from jowa_model.presets import model_preset
    from jowa_model.world_action import WorldActionModel

    if ckpt is not None:
        return checkpoint.load_world_action(ckpt, cpu_kernels=kernels)[0]
    model = WorldActionModel(model_preset(preset))
    return cpu_kernels.apply(model) if kernels else model


def bench_plan(ckpt: str | Path | None = None, cfg: BenchPlanConfig | None = None,
               progress: Callable[[str], None] | None = None, registry=None) -> dict[str, Any]:
    """Run every planner of `PLANNERS` on the same model; returns decisions/s per planner plus details."""
    from jowa_data.manifest import load_manifests

    cfg = cfg or BenchPlanConfig()
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    game = (registry or load_manifests()).get(cfg.game)
    model = _load_model(ckpt, cfg.preset, cfg.cpu_kernels)
    amp = torch.bfloat16 if cfg.dtype == "bfloat16" else None
    world = WorldModelImagination(model, autocast_dtype=amp)
    tokenizer = None
    if cfg.encode:
        from jowa_model.tokenizer import Tokenizer, tokenizer_preset

        tokenizer = Tokenizer(tokenizer_preset("paper")).eval()
    gen = torch.Generator().manual_seed(cfg.seed)
    vocab = model.cfg.obs_vocab
    obs = torch.randint(0, vocab, (1, cfg.history, 36), generator=gen)
    mask = torch.from_numpy(game.action_mask)[None]
    valid = mask[0].nonzero().squeeze(1)
    acts = valid[torch.randint(0, len(valid), (1, cfg.history - 1), generator=gen)]
    task = torch.tensor([game.task_id])

    results: dict[str, Any] = {}
    ms: dict[str, float] = {}
    encode_ms: list[float] = []
    cpu_ms: dict[str, float] = {}
    for name, pcfg in PLANNERS.items():
        if progress:
            progress(name)
        planner = Planner(world, pcfg)
        times, cpu = [], []
        for i in range(cfg.warmup + cfg.reps):
            frame = torch.randint(0, 256, (1, 84, 84), dtype=torch.uint8, generator=gen)
            c0 = time.process_time()
            t0 = time.perf_counter()
            if tokenizer is not None:
                new = tokenizer.encode(frame, dtype=amp)  # (1, 36)
                t1 = time.perf_counter()
                obs = torch.cat([obs[:, 1:], new[:, None]], 1)
            a = planner.plan(obs, acts, task, mask)
            t2 = time.perf_counter()
            c2 = time.process_time()
            acts = torch.cat([acts[:, 1:], a[:, None].cpu()], 1)
            if i >= cfg.warmup:
                times.append(t2 - t0)
                cpu.append(c2 - c0)
                if tokenizer is not None:
                    encode_ms.append((t1 - t0) * 1e3)
        med = statistics.median(times)
        ms[name] = med * 1e3
        cpu_ms[name] = statistics.median(cpu) * 1e3
        results[name] = 1.0 / med
    rolling = None
    if cfg.rolling_keep:
        if progress:
            progress("greedy_rolling")
        actor, times, cpu, prev = RollingGreedy(world, cfg.rolling_keep), [], [], None
        n = max(cfg.warmup, world.max_steps) + 2 * cfg.reps  # past the first rebuild, over whole cycles
        for i in range(n):
            frame = torch.randint(0, 256, (1, 84, 84), dtype=torch.uint8, generator=gen)
            c0, t0 = time.process_time(), time.perf_counter()
            new = tokenizer.encode(frame, dtype=amp) if tokenizer is not None else obs[:, -1]
            prev = actor.act(new, task, mask, prev)
            if i >= n - 2 * cfg.reps:
                times.append(time.perf_counter() - t0)
                cpu.append(time.process_time() - c0)
        rolling = {"keep": cfg.rolling_keep, "identical_to_official": False,
                   "decisions_per_s": len(times) / sum(times), "ms": 1e3 * sum(times) / len(times),
                   "cpu_ms": 1e3 * sum(cpu) / len(cpu),
                   "speedup_vs_official_greedy": None}  # mean over whole rebuild cycles, not a median
    official = OFFICIAL_40M[cfg.dtype]
    enc = statistics.median(encode_ms) if encode_ms else 0.0
    out: dict[str, Any] = dict(results)
    out["ms"] = ms
    out["encode_ms"] = enc
    # CPU seconds of this process per decision (all threads): on a shared machine wall time inflates with the
    # load, CPU time much less; with `threads` threads the idle-machine wall time is >= cpu_ms / threads.
    out["cpu_ms"] = cpu_ms
    out["ratio_to_greedy"] = {k: results[k] / results["greedy"] for k in results}
    if cfg.preset == "40M" and ckpt is None:
        # like-for-like: both sides with the encode, or both without it (official minus their encode latency)
        off_tok = {k: 1e3 / (1e3 / v - OFFICIAL_ENCODE_MS[cfg.dtype]) for k, v in official.items()}
        ours_tok = {k: 1e3 / max(ms[k] - enc, 1e-9) for k in results}
        out["official"] = official
        out["speedup_vs_official"] = {k: results[k] / official[k] for k in results} if cfg.encode else None
        out["speedup_vs_official_token_path"] = {k: ours_tok[k] / off_tok[k] for k in results}
    if rolling is not None:
        if cfg.preset == "40M" and ckpt is None and cfg.encode:
            rolling["speedup_vs_official_greedy"] = rolling["decisions_per_s"] / official["greedy"]
        out["greedy_rolling"] = rolling
    out["load_avg"] = list(os.getloadavg())
    out["settings"] = {"ckpt": str(ckpt) if ckpt else None, "preset": cfg.preset, "game": cfg.game,
                       "task_id": game.task_id, "valid_actions": int(mask.sum()), "history": cfg.history,
                       "dtype": cfg.dtype, "encode": cfg.encode, "threads": cfg.threads, "reps": cfg.reps,
                       "warmup": cfg.warmup, "torch": torch.__version__,
                       "planners": {k: vars(v) for k, v in PLANNERS.items()}}
    return out
