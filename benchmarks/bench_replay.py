"""Benchmark the DQN-Replay reader: frames/s per gzip decoder and peak RSS on a full-size checkpoint.

Generates (in a temp dir) one Dopamine-format checkpoint, suffix 0 of `Bench/1`: a `--rows`-row (default 1M)
84x84 uint8 observation file with Atari-like content (flat background, a few moving sprites, sparse noise;
compresses ~30-60x like real frames), plus the small companion files (episodes of ~`--episode` steps, 3 padding
rows each). Then, for each decoder, in a fresh child process (so peak RSS is per decoder):
  * `stream`: the raw path (npy header + `iter_chunks` over every row + CRC check);
  * `episodes`: `replay.iter_episodes` over the whole run (scan + episode buffers), i.e. what the build reads.

    .venv/bin/python benchmarks/bench_replay.py                 # 1M rows (~1 min to generate)
    .venv/bin/python benchmarks/bench_replay.py --rows 50000    # quick check
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

GAME, RUN = "Bench", 1


def make_frames(rng: np.random.Generator, start: int, n: int, templates: np.ndarray) -> np.ndarray:
    """Frames start..start+n: a background per 'scene', 6 sprites moving with time, 3 noisy pixels."""
    idx = np.arange(start, start + n)
    f = templates[(idx // 500) % len(templates)].copy()
    for s in range(6):
        y = (idx * (s + 1) // 3 + 13 * s) % 80
        x = (idx * (7 - s) // 5 + 29 * s) % 80
        for dy in range(4):
            for dx in range(4):
                f[np.arange(n), y + dy, x + dx] = 60 + 30 * s
    k = rng.integers(0, 84 * 84, (n, 3))
    f.reshape(n, -1)[np.arange(n)[:, None], k] = rng.integers(0, 256, (n, 3), dtype=np.uint8)
    return f


def generate(root: Path, rows: int, episode: int, level: int) -> dict:
    from isal import igzip

    from jowa_data.replay_writer import invalid_range, replay_dir, write_npy_gz

    d = replay_dir(root, GAME, RUN)
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:84, 0:84]
    templates = np.stack([((yy * (i + 1) // 7 + xx // (i + 2)) % 4 * 20 + 10 * i).astype(np.uint8) for i in range(8)])
    t0 = time.perf_counter()
    path = d / "$store$_observation_ckpt.0.gz"
    with igzip.open(path, "wb", compresslevel=level) as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False, "shape": (rows, 84, 84)})
        for s in range(0, rows, 4096):
            f.write(make_frames(rng, s, min(4096, rows - s), templates).tobytes())
    gen_s = time.perf_counter() - t0
    # small files: episodes of `episode` real rows, each preceded by 3 zero padding rows
    n = rows - 1  # a first Dopamine log: add_count = cap - 1
    act = rng.integers(0, 6, rows).astype(np.int32)
    rew = np.zeros(rows, np.float32)
    term = np.zeros(rows, np.uint8)
    period = episode + 3
    pos = np.arange(rows)
    pad = (pos % period) < 3
    act[pad] = 0
    term[(pos % period) == period - 1] = 1
    for name, a in (("$store$_action", act), ("$store$_reward", rew), ("$store$_terminal", term),
                    ("invalid_range", invalid_range(n % rows, rows)), ("add_count", np.array(n, np.int64))):
        write_npy_gz(d / f"{name}_ckpt.0.gz", a, compresslevel=1)
    return {"rows": rows, "gen_seconds": round(gen_s, 1), "obs_gz_MB": round(path.stat().st_size / 1e6, 1),
            "ratio": round(rows * 7056 / path.stat().st_size, 1)}


def _peak_rss_kib() -> int:
    """Peak RSS of this process's own address space. `ru_maxrss` is not: Linux keeps it across execve, so a
    child started from a big parent (e.g. `jowa bench`, with torch loaded) would report the parent's RSS."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux


def child(root: str, decoder: str, mode: str) -> None:
    """Measure one decoder in this (fresh) process and print a JSON line."""
    from jowa_data import replay
    from jowa_data.npy_stream import check_end, iter_chunks, read_header

    rss0 = _peak_rss_kib()
    t0 = time.perf_counter()
    frames = 0
    checksum = 0
    if mode == "stream":
        p = Path(root) / GAME / str(RUN) / "replay_logs" / "$store$_observation_ckpt.0.gz"
        with replay.open_gz(p, decoder) as f:
            h = read_header(f, str(p))
            for _, rows in iter_chunks(f, h, 0, h.rows, str(p)):
                frames += rows.shape[0]
                checksum += int(rows[:, 40, 40].sum())
            check_end(f, str(p))
    else:
        for ep in replay.iter_episodes(root, GAME, RUN, decoder=decoder):
            frames += ep.frames.shape[0]
            checksum += int(ep.frames[:, 40, 40].sum())
    dt = time.perf_counter() - t0
    peak = _peak_rss_kib()
    print(json.dumps({"decoder": decoder, "mode": mode, "frames": frames, "seconds": round(dt, 2),
                      "frames_per_s": round(frames / dt), "MB_per_s_decompressed": round(frames * 7056 / dt / 1e6),
                      "peak_rss_MB": round(peak / 1024), "rss_after_import_MB": round(rss0 / 1024),
                      "checksum": checksum}))


def run(rows: int = 1_000_000, episode: int = 2000, level: int = 1, decoders: list[str] | None = None,
        modes: tuple[str, ...] = ("stream", "episodes"), root: str | Path | None = None,
        log=None) -> dict:
    """Generate (or reuse) a checkpoint and measure every decoder x mode, each in a fresh child process.

    Returns {"generated": info, "results": [per decoder/mode dicts], "errors": [...], "agree": bool}.
    `log(obj)` is called with each JSON-able line as it comes (the script prints them).
    """
    from jowa_data.npy_stream import available_decoders

    decoders = list(decoders or available_decoders())
    log = log or (lambda obj: None)
    with tempfile.TemporaryDirectory(prefix="bench_replay_") as tmp:
        root = Path(root or tmp)
        obs = root / GAME / str(RUN) / "replay_logs" / "$store$_observation_ckpt.0.gz"
        if obs.exists():
            info = {"rows": rows, "reused": str(obs)}
        else:
            info = generate(root, rows, episode, level)
        log({"generated": info})
        results, errors = [], []
        env = dict(os.environ, OMP_NUM_THREADS="1")
        for mode in modes:
            for dec in decoders:
                out = subprocess.run([sys.executable, __file__, "--child", str(root), dec, mode],
                                     capture_output=True, text=True, env=env)
                if out.returncode != 0:
                    errors.append({"decoder": dec, "mode": mode, "error": out.stderr.strip()[-500:]})
                    log(errors[-1])
                    continue
                r = json.loads(out.stdout.strip().splitlines()[-1])
                results.append(r)
                log(r)
    agree = all(len({r["checksum"] for r in results if r["mode"] == m}) == 1 for m in {r["mode"] for r in results})
    return {"generated": info, "results": results, "errors": errors, "agree": agree}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000, help="observation rows (DQN-Replay: 1,000,000)")
    ap.add_argument("--episode", type=int, default=2000, help="real rows per synthetic episode")
    ap.add_argument("--level", type=int, default=1, help="isal compression level of the generated file (0-3)")
    ap.add_argument("--decoders", default="", help="comma list (default: all installed)")
    ap.add_argument("--modes", default="stream,episodes")
    ap.add_argument("--root", help="reuse/keep a generated root here instead of a temp dir")
    ap.add_argument("--child", nargs=3, metavar=("ROOT", "DECODER", "MODE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(*args.child)
        return
    out = run(args.rows, args.episode, args.level, [d for d in args.decoders.split(",") if d] or None,
              tuple(args.modes.split(",")), args.root, log=lambda obj: print(json.dumps(obj), flush=True))
    results = out["results"]
    print(f"\n{'mode':9s} {'decoder':10s} {'frames/s':>10s} {'MB/s':>7s} {'peak RSS MB':>12s}")
    for r in results:
        print(f"{r['mode']:9s} {r['decoder']:10s} {r['frames_per_s']:>10,d} {r['MB_per_s_decompressed']:>7d} "
              f"{r['peak_rss_MB']:>12d}")
    ok_rss = all(r["peak_rss_MB"] < 1024 for r in results)
    print(f"all decoders agree (per mode): {out['agree']}; peak RSS < 1 GB: {ok_rss}")


if __name__ == "__main__":
    main()
