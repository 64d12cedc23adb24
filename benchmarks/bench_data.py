"""Data-path figures in one run: build frames/s (read / tokenize / write split), segments/s streamed per
process from zarr and webdataset, the on-the-fly tokenizing source's segments/s, and RAM per million
transitions.

    OMP_NUM_THREADS=1 python benchmarks/bench_data.py [--steps 2000] [--transitions 1000000] [--tokenizer CKPT]

Official figures on this machine (docs/performance.md §5): in-memory token loader
6,200-8,000 segments/s and 310 MiB per million transitions per rank. Targets: >= 60,000 segments/s per
process from shards, <= 80 MiB per million transitions shared by the ranks of a node.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np


def _rss_mib() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def bench_build(tmp: Path, steps: int, tokenizer: str | None) -> tuple[dict, Path, Path]:
    import torch

    from jowa_data.build import BuildConfig, build_dataset
    from jowa_data.manifest import load_manifests
    from jowa_data.record import record
    from jowa_data.subsample import SubsampleOptions
    from jowa_model.tokenizer import Tokenizer, save_tokenizer, tokenizer_preset

    reg = load_manifests()
    record(reg.get("Pong"), tmp / "replay", run=1, steps=steps, seed=0, capacity=max(steps // 2, 100),
           max_episode_steps=400, progress=False)
    tok = Path(tokenizer) if tokenizer else tmp / "tok.pt"
    if not tokenizer:
        torch.manual_seed(0)
        save_tokenizer(Tokenizer(tokenizer_preset("tiny")), tok)
    cfg = BuildConfig(formats=("zarr", "wds"), fraction=1.0, progress=False, task_transitions=1000,
                      selection=SubsampleOptions(checkpoints=(0, 1000), include_incomplete=True))
    s = build_dataset([reg.get("Pong")], tmp / "replay", tok, tmp / "built", cfg)
    return s, tmp / "built", tok


def synthetic_dataset(out: Path, transitions: int) -> Path:
    """Token arrays with realistic redundancy (each token changes w.p. 0.2 per step), episodes ~1,000 steps."""
    from jowa_data.build import EpisodeArrays, write_dataset
    from jowa_data.manifest import load_manifests

    reg = load_manifests()
    rng = np.random.default_rng(0)
    games = ["Assault", "Pong"]
    eps: dict[str, list] = {g: [] for g in games}
    left = transitions
    gi = 0
    while left > 0:
        T = int(min(left, rng.integers(500, 1500)))
        base = rng.integers(0, 2048, 36)
        change = rng.random((T, 36)) < 0.2
        tok = np.where(change, rng.integers(0, 2048, (T, 36)), base[None]).astype(np.uint16)
        term = np.zeros(T, np.uint8)
        term[-1] = 1
        g = games[gi % 2]
        n_act = reg.get(g).num_actions
        eps[g].append(EpisodeArrays(tok, rng.integers(0, n_act, T), rng.integers(-1, 2, T).astype(np.float32), term))
        left -= T
        gi += 1
    write_dataset(out, [reg.get(g) for g in games], eps, formats=("zarr", "wds"), task_transitions=200_000)
    return out


def segments_per_s(stream, seconds: float = 3.0) -> float:
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for b in stream:
            n += len(b["task_ids"])
            if time.perf_counter() - t0 >= seconds:
                break
    return n / (time.perf_counter() - t0)


def stream_figures(tmp: Path, transitions: int, batch: int, built: Path, tok: Path, seconds: float = 3.0,
                   otf_seconds: float = 5.0) -> dict:
    """Segments/s per process from zarr and wds over a synthetic token set of `transitions`, RAM per 1M
    transitions, and the on-the-fly tokenizing source over `built` (a small built dataset, tokenizer `tok`)."""
    from jowa_data.stream import FrameSegmentStream, SegmentStream, load_cache
    from jowa_model.tokenizer import load_tokenizer

    res: dict = {}
    t0 = time.perf_counter()
    d = synthetic_dataset(tmp / "synth", transitions)
    res["synthetic_write_s"] = time.perf_counter() - t0
    for backend in ("zarr", "wds"):
        t0 = time.perf_counter()
        rss0 = _rss_mib()
        cache = load_cache(d, backend)
        decode_s = time.perf_counter() - t0
        s = SegmentStream(d, batch_size=batch, seed=0, rank=0, world_size=1, backend=backend, cache=cache)
        sps = segments_per_s(s, seconds)
        res[backend] = {"cache_decode_s": decode_s, "segments_per_s": sps,
                        "shared_cache_mib_per_1M": cache.nbytes / 2**20 / (cache.num_transitions / 1e6),
                        "index_mib_per_1M": (s.seg_start.nbytes + s.seg_valid.nbytes + s.seg_game.nbytes)
                        / 2**20 / (cache.num_transitions / 1e6),
                        "rss_growth_mib_per_1M": (_rss_mib() - rss0) / (cache.num_transitions / 1e6)}
    f = FrameSegmentStream(built, load_tokenizer(tok), batch_size=batch, seed=0, rank=0, world_size=1)
    res["on_the_fly_segments_per_s"] = segments_per_s(f, seconds=otf_seconds)
    return res


def run(steps: int = 2000, transitions: int = 1_000_000, batch: int = 64, tokenizer: str | None = None,
        seconds: float = 3.0, otf_seconds: float = 5.0) -> dict:
    """Every figure of this script as one dict (build, synthetic_write_s, zarr, wds, on_the_fly_segments_per_s)."""
    with tempfile.TemporaryDirectory() as td:
        tmp = Path(td)
        b, built, tok = bench_build(tmp, steps, tokenizer)
        res = {"build": {k: b[k] for k in ("rows", "frames_per_s", "read_s", "tokenize_s", "write_s", "run_s")}}
        res.update(stream_figures(tmp, transitions, batch, built, tok, seconds, otf_seconds))
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=2000, help="agent steps recorded for the build benchmark")
    ap.add_argument("--transitions", type=int, default=1_000_000, help="synthetic dataset size for streaming")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--tokenizer", help="tokenizer checkpoint (default: tiny preset, random weights)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    res = run(a.steps, a.transitions, a.batch, a.tokenizer)
    if a.json:
        print(json.dumps(res, indent=2))
        return
    bb = res["build"]
    print(f"build: {bb['rows']} frames, {bb['frames_per_s']:.0f} frames/s "
          f"(read+gzip decode {bb['read_s']:.2f} s, tokenize {bb['tokenize_s']:.2f} s, write {bb['write_s']:.2f} s)")
    for backend in ("zarr", "wds"):
        r = res[backend]
        print(f"stream {backend}: {r['segments_per_s']:,.0f} segments/s per process (batch {a.batch}); cache decode "
              f"{r['cache_decode_s']:.1f} s; RAM {r['shared_cache_mib_per_1M']:.1f} MiB/1M transitions shared "
              f"(page cache) + {r['index_mib_per_1M']:.1f} MiB/1M per rank (segment index); "
              f"RSS growth {r['rss_growth_mib_per_1M']:.1f} MiB/1M")
    print(f"on-the-fly tokenizing source: {res['on_the_fly_segments_per_s']:,.1f} segments/s")


if __name__ == "__main__":
    main()
