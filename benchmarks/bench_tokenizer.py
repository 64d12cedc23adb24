"""Tokenizer speed on this machine: encode / decode frames/s (paper and tiny presets, fp32 and bf16 autocast),
one training step (tiny), and the LPIPS-VGG perceptual term. Real frames from the emulator (Pong).

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_tokenizer.py [--frames 64] [--json]

Official figures on this CPU (docs/performance.md §3-4): tokenizer.encode, 1 frame: 20.5 ms fp32,
14.4 ms bf16; 64 frames: 1930 ms fp32 (33 frames/s), 897 ms bf16 (71 frames/s).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch


def real_frames(n: int) -> np.ndarray:
    from jowa_data.atari import AtariEnv

    env = AtariEnv("pong", seed=0)
    rng = np.random.default_rng(0)
    out = [env.reset()]
    while len(out) < n:
        obs, _, term, trunc = env.step(int(rng.integers(len(env.actions))))
        out.append(env.reset() if term or trunc else obs)
    return np.stack(out)


def timed(fn, reps: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def run(frames: int = 64, reps: int = 2, presets: tuple[str, ...] = ("paper", "tiny"), train: bool = True,
        lpips: bool = True) -> dict[str, float]:
    """Encode/decode frames/s per preset and dtype on `frames` real Pong frames; optionally the tiny tokenizer's
    training step and the LPIPS-VGG term (ms)."""
    from jowa_model.perceptual import load_lpips_vgg
    from jowa_model.tokenizer import Tokenizer, tokenizer_preset

    torch.manual_seed(0)
    n = frames
    frames = real_frames(n)
    res: dict[str, float] = {"threads": torch.get_num_threads(), "frames": n}
    for preset in presets:
        tok = Tokenizer(tokenizer_preset(preset)).eval()
        tokens = tok.encode(frames)
        for name, dt in (("fp32", None), ("bf16", torch.bfloat16)):
            s = timed(lambda: tok.encode(frames, chunk_size=64, dtype=dt), reps)
            res[f"{preset}.encode.{name}.frames_per_s"] = n / s
            s = timed(lambda: tok.decode(tokens, chunk_size=64, dtype=dt), reps)
            res[f"{preset}.decode.{name}.frames_per_s"] = n / s
        res[f"{preset}.encode.fp32.1frame_ms"] = 1000 * timed(lambda: tok.encode(frames[:1]), 5)
        res[f"{preset}.bf16_token_agreement"] = float((tok.encode(frames, dtype=torch.bfloat16) == tokens).mean())
    if train:
        tok = Tokenizer(tokenizer_preset("tiny")).train()
        opt = torch.optim.Adam(tok.parameters(), lr=1e-3)

        def step() -> None:
            loss, _ = tok.compute_loss(frames[:32])
            opt.zero_grad()
            loss.backward()
            opt.step()

        res["tiny.train_step_b32_ms"] = 1000 * timed(step, reps)
    if lpips:
        lp = load_lpips_vgg()
        x = torch.from_numpy(frames[:8]).float().unsqueeze(1).div(127.5).sub(1).requires_grad_(True)
        y = torch.from_numpy(frames[8:16]).float().unsqueeze(1).div(127.5).sub(1)
        res["lpips_vgg.fwd_bwd_b8_ms"] = 1000 * timed(lambda: lp(x, y).mean().backward(), reps)
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--frames", type=int, default=64)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    res = run(a.frames, a.reps)
    if a.json:
        print(json.dumps(res, indent=2))
    else:
        for k, v in res.items():
            print(f"{k:40s} {v:10.2f}")


if __name__ == "__main__":
    main()
