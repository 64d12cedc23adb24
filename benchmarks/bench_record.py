"""Recording speed: agent steps/s and emulator frames/s, for the bare environment and for `record()`.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_record.py --game Pong --steps 5000 [--json]

`env` = AtariEnv alone (ALE + max-pool + INTER_AREA resize, random actions);
`record` = the full recorder (policy + ReplayLogger + gzip checkpoint files; level 9 = Dopamine's,
`--compresslevel 1` is the fast option).
Reference (docs/performance.md §6): raw `ALEInterface.act` at ~18k frames/s and gymnasium's
AtariPreprocessing at ~9.9k frames/s (2.5k steps/s) on Pong, one core.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import numpy as np

from jowa_data.atari import AtariConfig, AtariEnv
from jowa_data.manifest import load_manifests
from jowa_data.record import record


def bench_env(rom: str, steps: int, seed: int = 0) -> dict:
    env = AtariEnv(rom, AtariConfig(), seed=seed)
    rng = np.random.default_rng(seed)
    env.reset()
    t0 = time.perf_counter()
    for _ in range(steps):
        _, _, term, trunc = env.step(int(rng.integers(env.num_actions)))
        if term or trunc:
            env.reset()
    dt = time.perf_counter() - t0
    return {"steps_per_s": steps / dt, "frames_per_s": env.total_frames / dt, "seconds": dt}


def bench_record(game: str, steps: int, capacity: int, seed: int = 0, compresslevel: int = 9) -> dict:
    m = load_manifests().get(game)
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        r = record(m, d, run=1, steps=steps, seed=seed, capacity=capacity, keep_frames=False, progress=False,
                   compresslevel=compresslevel)
        dt = time.perf_counter() - t0
        size = sum(p.stat().st_size for p in r.replay_dir.iterdir())
    return {"steps_per_s": steps / dt, "frames_per_s": r.emulator_frames / dt, "seconds": dt,
            "checkpoints": len(r.checkpoints), "episodes": r.num_episodes, "bytes_on_disk": size}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--game", default="Pong")
    ap.add_argument("--steps", type=int, default=5000)
    ap.add_argument("--capacity", type=int, default=2000, help="rows per checkpoint file (rotation cost included)")
    ap.add_argument("--compresslevel", type=int, default=9, help="gzip level (9 = Dopamine's)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    m = load_manifests().get(a.game)
    out = {"game": m.name, "steps": a.steps, "capacity": a.capacity, "compresslevel": a.compresslevel,
           "env": bench_env(m.ale_rom, a.steps),
           "record": bench_record(m.name, a.steps, a.capacity, compresslevel=a.compresslevel)}
    if a.json:
        print(json.dumps(out, indent=2))
        return
    for k in ("env", "record"):
        v = out[k]
        print(f"{m.name} {k:6s}: {v['steps_per_s']:8.0f} agent steps/s  {v['frames_per_s']:8.0f} emulator frames/s"
              f"  ({a.steps} steps in {v['seconds']:.2f} s)")
    r = out["record"]
    print(f"  record wrote {r['checkpoints']} checkpoints (capacity {a.capacity}), {r['episodes']} episodes, "
          f"{r['bytes_on_disk'] / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
