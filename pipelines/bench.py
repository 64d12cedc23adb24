"""`jowa bench`: every speed benchmark of the project in one process run, as one table of figures.

Each section calls the benchmark that owns the measurement (`benchmarks/bench_*.py`, `pipelines/bench_plan.py`)
through its `run`-style function, so `python benchmarks/x.py` and `jowa bench x` measure the same thing. The result
is one dict: the machine it ran on (CPU, cores, torch threads, GPU, load average before and after: a loaded machine
must say so), the sizes used, the raw figures per section, and a flat list of figures, each with a unit and, where
one exists, the official figure measured on this machine (docs/performance.md) and our ratio to it.
"""

from __future__ import annotations

import importlib.util
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from jowa_common.config import apply_overrides, config_to_dict
from jowa_common.errors import ConfigError, JowaError

SECTIONS = ("read", "record", "build", "stream", "train", "tokenizer", "plan")
SIZES = ("tiny", "quick", "full")

# Official JOWA figures on this 2-core CPU (docs/performance.md §2-§5), or the emulator figures (§6) where the
# official code has no such path. Values are in the unit of the figure they are compared with.
OFFICIAL = {
    "train.40M.fp32": (1493.0, "official 40M fp32, B=8 L=8"),  # docs/performance.md §3 (4a): 1587 ms/step
    "train.40M.bf16": (2522.0, "official 40M bf16, B=8 L=8"),  # §3 (4a): 939 ms/step
    "encode.fp32": (64 / 1.930, "official encode, 64 frames fp32"),  # §3 (4b): 1930 ms
    "encode.bf16": (64 / 0.897, "official encode, 64 frames bf16"),  # §3 (4b): 897 ms
    "decode.fp32": (9 / 0.3056, "official decode, B=9 fp32"),  # §4: 305.6 ms
    "decode.bf16": (9 / 0.1334, "official decode, B=9 bf16"),  # §4: 133.4 ms
    "encode_1frame_ms": (20.5, "official encode, 1 frame fp32"),  # §4
    "segments_per_s": (6616.0, "official token-in-memory loader, workers=0, 800k"),  # §5
    "mib_per_1M": (310.0, "official token-in-memory RSS per rank"),  # §5
    "env.steps_per_s": (2480.0, "gymnasium AtariPreprocessing, Pong (docs/performance.md §6)"),
    "env.frames_per_s": (9900.0, "gymnasium AtariPreprocessing, Pong (docs/performance.md §6)"),
}


@dataclass
class ReadBench:
    rows: int = 200_000  # observation rows in the generated checkpoint (DQN-Replay files hold 1,000,000)
    decoders: tuple[str, ...] = ()  # gzip decoders to compare; () = every installed one (isal, rapidgzip, gzip)
    modes: tuple[str, ...] = ("stream",)  # "stream" (raw rows) and/or "episodes" (replay.iter_episodes)


@dataclass
class RecordBench:
    game: str = "Pong"  # manifest name (the emulator figures of docs/performance.md §6 are on Pong)
    steps: int = 2000  # agent steps, for the bare env and for record()
    capacity: int = 1000  # rows per checkpoint file, so rotation is included
    compresslevel: int = 9  # gzip level of the written files (9 = Dopamine's)


@dataclass
class BuildBench:
    steps: int = 1000  # Pong agent steps recorded, then built with the tiny tokenizer (zarr + wds)
    encode_frames: int = 32  # real frames encoded by the `encode_preset` tokenizer (random weights)
    encode_preset: str = "paper"  # tokenizer whose encode rate sets the paper-scale build rate (tiny: tests)


@dataclass
class StreamBench:
    transitions: int = 200_000  # synthetic token set streamed (official RSS figure: 800k)
    batch: int = 64  # segments per batch (official loader figures: 64)
    seconds: float = 2.0  # timed window per backend, s
    otf_seconds: float = 3.0  # timed window of the on-the-fly tokenizing source, s


@dataclass
class TrainBench:
    configs: tuple[str, ...] = ("tiny", "40M")  # model presets (70M, 150M with --full)
    dtypes: tuple[str, ...] = ("fp32", "bf16")  # fp32 and CPU bf16 autocast
    batch: int = 8  # segments per step (official anchor: 8)
    steps: int = 8  # steps per segment, L (official anchor: 8)
    warmup: int = 1  # untimed steps
    reps: int = 3  # timed steps (median)
    matmul_floor: bool = True  # also time the step's own matrix products (what only a faster GEMM would shorten)
    plain: bool = False  # the plain model of world_action.py, without jowa_model/cpu_kernels.py


@dataclass
class TokenizerBench:
    frames: int = 32  # real Pong frames per encode/decode call (official encode figure: 64)
    reps: int = 1  # timed calls (best of)
    presets: tuple[str, ...] = ("paper", "tiny")  # tokenizer presets
    train: bool = True  # time one tiny-tokenizer training step (batch 32)
    lpips: bool = True  # time the LPIPS-VGG term (batch 8; needs >= 16 frames)


@dataclass
class PlanBench:
    preset: str = "40M"  # world-action model preset, random weights (official anchors: 40M)
    dtypes: tuple[str, ...] = ("float32",)  # "float32" and/or "bfloat16"
    warmup: int = 1  # untimed decisions per planner
    reps: int = 2  # timed decisions per planner (median)
    encode: bool = True  # include tokenizer.encode of the new frame (as the official figures do)


@dataclass
class BenchConfig:
    size: str = "quick"  # the preset these sizes came from: tiny (tests), quick (a few minutes), full
    threads: int = 2  # torch intra-op threads (official figures: 2)
    read: ReadBench = field(default_factory=ReadBench)
    record: RecordBench = field(default_factory=RecordBench)
    build: BuildBench = field(default_factory=BuildBench)
    stream: StreamBench = field(default_factory=StreamBench)
    train: TrainBench = field(default_factory=TrainBench)
    tokenizer: TokenizerBench = field(default_factory=TokenizerBench)
    plan: PlanBench = field(default_factory=PlanBench)


def bench_config(size: str = "quick", overrides: dict[str, Any] | None = None) -> BenchConfig:
    """Sizes: `tiny` (seconds per section, for tests), `quick` (minutes in all), `full` (paper-size inputs)."""
    if size == "tiny":
        cfg = BenchConfig(size="tiny", read=ReadBench(rows=3000), record=RecordBench(steps=200, capacity=100),
                          build=BuildBench(steps=200, encode_frames=4, encode_preset="tiny"),
                          stream=StreamBench(transitions=5000, batch=16, seconds=0.3, otf_seconds=0.5),
                          train=TrainBench(configs=("tiny",), batch=2, steps=4, warmup=0, reps=1),
                          tokenizer=TokenizerBench(frames=4, presets=("tiny",), train=False, lpips=False),
                          plan=PlanBench(preset="tiny", warmup=0, reps=1, encode=False))
    elif size == "quick":
        cfg = BenchConfig()
    elif size == "full":
        cfg = BenchConfig(size="full", read=ReadBench(rows=1_000_000, modes=("stream", "episodes")),
                          record=RecordBench(steps=10_000, capacity=5000), build=BuildBench(steps=5000, encode_frames=64),
                          stream=StreamBench(transitions=1_000_000, seconds=3.0, otf_seconds=5.0),
                          train=TrainBench(configs=("tiny", "40M", "70M", "150M"), warmup=2, reps=5),
                          tokenizer=TokenizerBench(frames=64, reps=2),
                          plan=PlanBench(dtypes=("float32", "bfloat16"), warmup=2, reps=5))
    else:
        raise ConfigError(f"bench size '{size}': choose one of {', '.join(SIZES)}")
    return apply_overrides(cfg, overrides) if overrides else cfg


# ----------------------------------------------------------------------------------------------------------- machine

def machine_info() -> dict[str, Any]:
    """What the figures depend on: CPU, cores, memory, torch and its threads, GPU, and how loaded the machine is."""
    import psutil
    import torch

    try:
        info = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        info = []
    cpu = next((ln.split(":", 1)[1].strip() for ln in info if ln.startswith("model name")), platform.processor())
    flags = next((ln for ln in info if ln.startswith("flags")), "")
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = os.getloadavg()
    return {"cpu": cpu or "unknown", "cores": cores, "logical_cpus": os.cpu_count(), "avx512_bf16": "avx512_bf16" in flags,
            "ram_gib": round(psutil.virtual_memory().total / 2**30, 1), "python": platform.python_version(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "gpu": gpu,
            "load_avg_start": [round(x, 2) for x in load], "loaded": load[0] > 0.5 * (cores or 1),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def _script(name: str):
    """Import `benchmarks/<name>.py` of this checkout (the scripts are not part of the installed packages)."""
    key = f"jowa_benchmarks.{name}"
    if key in sys.modules:
        return sys.modules[key]
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    if not path.is_file():
        raise ConfigError(f"{path}: benchmark script not found (jowa bench needs a source checkout of jowa)")
    spec = importlib.util.spec_from_file_location(key, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[key] = mod
    spec.loader.exec_module(mod)
    return mod


# ---------------------------------------------------------------------------------------------------------- sections

Log = Callable[[str], None]


def run_read(cfg: BenchConfig, work: Path, state: dict, log: Log) -> dict:
    """Frames/s streaming a generated observation file, per gzip decoder, each in a fresh process (peak RSS)."""
    from jowa_data.npy_stream import available_decoders

    have = available_decoders()
    for d in cfg.read.decoders:
        if d not in have:
            raise ConfigError(f"read.decoders: '{d}' is not an installed gzip decoder ({', '.join(have)})")
    for m in cfg.read.modes:
        if m not in ("stream", "episodes"):
            raise ConfigError(f"read.modes: '{m}' is not stream or episodes")
    out = _script("bench_replay").run(rows=cfg.read.rows, decoders=list(cfg.read.decoders) or None,
                                      modes=cfg.read.modes, root=work / "read")
    if out["errors"]:
        raise RuntimeError(f"bench_replay: {out['errors'][0]['decoder']}: {out['errors'][0]['error']}")
    return out


def run_record(cfg: BenchConfig, work: Path, state: dict, log: Log) -> dict:
    """Agent steps/s and emulator frames/s: the bare AtariEnv, then record() writing DQN-Replay files."""
    from jowa_data.manifest import load_manifests

    c = cfg.record
    m = load_manifests().get(c.game)
    br = _script("bench_record")
    return {"game": m.name, "steps": c.steps, "env": br.bench_env(m.ale_rom, c.steps),
            "record": br.bench_record(m.name, c.steps, c.capacity, compresslevel=c.compresslevel)}


def run_build(cfg: BenchConfig, work: Path, state: dict, log: Log) -> dict:
    """`build_dataset` frames/s with the tiny tokenizer and its read/tokenize/write split, plus the paper-size
    tokenizer's encode frames/s and the build rate it implies (read + write costs kept, encode swapped): the
    build at paper scale is bound by that encode."""
    import torch

    from jowa_model.tokenizer import Tokenizer, tokenizer_preset

    bd = _script("bench_data")
    tmp = work / "build"
    tmp.mkdir(parents=True, exist_ok=True)
    b, built, tok = bd.bench_build(tmp, cfg.build.steps, None)
    state["built"], state["tokenizer"] = built, tok
    out = {k: b[k] for k in ("rows", "frames_per_s", "read_s", "tokenize_s", "write_s", "run_s")}
    frames = _script("bench_tokenizer").real_frames(cfg.build.encode_frames)
    torch.manual_seed(0)
    out["encode_preset"] = cfg.build.encode_preset
    tokenizer = Tokenizer(tokenizer_preset(cfg.build.encode_preset)).eval()
    for name, dt in (("fp32", None), ("bf16", torch.bfloat16)):
        tokenizer.encode(frames[:1], dtype=dt)  # warm-up
        t0 = time.perf_counter()
        tokenizer.encode(frames, chunk_size=64, dtype=dt)
        fps = len(frames) / (time.perf_counter() - t0)
        out[f"encode_{name}_frames_per_s"] = fps
        per_row = (out["read_s"] + out["write_s"]) / max(out["rows"], 1)
        out[f"build_{name}_frames_per_s"] = 1.0 / (per_row + 1.0 / fps)
    return out


def run_stream(cfg: BenchConfig, work: Path, state: dict, log: Log) -> dict:
    """Segments/s per process from zarr and wds, RAM per 1M transitions, and the on-the-fly tokenizing source."""
    bd = _script("bench_data")
    tmp = work / "stream"
    tmp.mkdir(parents=True, exist_ok=True)
    if "built" not in state:  # the on-the-fly source reads a built dataset; the build section makes one
        log("building a small dataset for the on-the-fly source")
        _, state["built"], state["tokenizer"] = bd.bench_build(tmp, cfg.build.steps, None)
    c = cfg.stream
    return bd.stream_figures(tmp, c.transitions, c.batch, state["built"], state["tokenizer"], c.seconds,
                             c.otf_seconds)


def run_train(cfg: BenchConfig, work: Path, state: dict, log: Log) -> dict:
    """Tokens/s of a stage-2 train step (fwd + 5 losses + bwd + clip + AdamW) per preset, fp32 and bf16 autocast."""
    bt = _script("bench_train_step")
    c = cfg.train
    out: dict[str, Any] = {}
    for preset in c.configs:
        for dt in c.dtypes:
            if dt not in ("fp32", "bf16"):
                raise ConfigError(f"train.dtypes: '{dt}' is not fp32 or bf16")
            log(f"train step {preset} {dt}")
            out[f"{preset}.{dt}"] = bt.run(preset, c.batch, c.steps, dt == "bf16", cfg.threads, c.warmup, c.reps,
                                           matmul_floor=c.matmul_floor, plain=c.plain)
    return out


def run_tokenizer(cfg: BenchConfig, work: Path, state: dict, log: Log) -> dict:
    """Encode/decode frames/s per tokenizer preset and dtype; the tiny training step; the LPIPS-VGG term."""
    c = cfg.tokenizer
    return _script("bench_tokenizer").run(c.frames, c.reps, c.presets, c.train, c.lpips and c.frames >= 16)


def run_plan(cfg: BenchConfig, work: Path, state: dict, log: Log) -> dict:
    """Decisions/s greedy, beam H=2 K=2/3/4, MCTS 20 simulations (pipelines/bench_plan.py), per dtype."""
    from pipelines.bench_plan import BenchPlanConfig, bench_plan

    c = cfg.plan
    out = {}
    for dt in c.dtypes:
        pc = BenchPlanConfig(preset=c.preset, reps=c.reps, warmup=c.warmup, dtype=dt, encode=c.encode,
                             threads=cfg.threads)
        out[dt] = bench_plan(None, pc, progress=lambda name, dt=dt: log(f"plan {dt} {name}"))
    return out


RUNNERS: dict[str, Callable[[BenchConfig, Path, dict, Log], dict]] = {
    "read": run_read, "record": run_record, "build": run_build, "stream": run_stream, "train": run_train,
    "tokenizer": run_tokenizer, "plan": run_plan}


# ----------------------------------------------------------------------------------------------------------- figures

def _fig(section: str, key: str, figure: str, value: float, unit: str, ref: str | None = None,
         higher_is_better: bool = True) -> dict[str, Any]:
    row: dict[str, Any] = {"section": section, "key": key, "figure": figure, "value": float(value), "unit": unit,
                           "higher_is_better": higher_is_better, "reference": None, "reference_source": None,
                           "ratio": None}
    if ref is not None:
        rv, src = OFFICIAL[ref]
        row.update(reference=rv, reference_source=src,
                   ratio=(value / rv if higher_is_better else rv / value) if value > 0 else None)
    return row


def figures(section: str, r: dict) -> list[dict[str, Any]]:
    """The flat figures of one section's raw result (what the table prints and the tests check)."""
    f: list[dict[str, Any]] = []
    if section == "read":
        rows = r["generated"].get("rows")
        for x in r["results"]:
            k = f"read.{x['mode']}.{x['decoder']}"
            f.append(_fig(section, f"{k}.frames_per_s", f"{x['mode']}, {x['decoder']} ({rows:,} rows)",
                          x["frames_per_s"], "frames/s"))
            f.append(_fig(section, f"{k}.peak_rss_MB", f"{x['mode']}, {x['decoder']}: peak RSS", x["peak_rss_MB"],
                          "MB", higher_is_better=False))
    elif section == "record":
        for part, what in (("env", "AtariEnv alone"), ("record", "record() to DQN-Replay files")):
            x = r[part]
            f.append(_fig(section, f"record.{part}.steps_per_s", f"{what} ({r['game']})", x["steps_per_s"],
                          "agent steps/s", "env.steps_per_s" if part == "env" else None))
            f.append(_fig(section, f"record.{part}.frames_per_s", f"{what} ({r['game']})", x["frames_per_s"],
                          "emulator frames/s", "env.frames_per_s" if part == "env" else None))
    elif section == "build":
        stage = r["read_s"] + r["tokenize_s"] + r["write_s"]
        f.append(_fig(section, "build.frames_per_s", f"jowa-data build, tiny tokenizer ({r['rows']:,} frames)",
                      r["frames_per_s"], "frames/s"))
        for k, what in (("read_s", "read + gzip decode"), ("tokenize_s", "tokenize"), ("write_s", "write shards")):
            pct = 100 * r[k] / stage if stage > 0 else 0.0
            f.append(_fig(section, f"build.{k}", f"  {what} ({pct:.0f}% of stage time)", r[k], "s",
                          higher_is_better=False))
        p = r["encode_preset"]
        for dt in ("fp32", "bf16"):
            f.append(_fig(section, f"build.{p}_encode_{dt}_frames_per_s", f"{p} tokenizer encode, {dt}",
                          r[f"encode_{dt}_frames_per_s"], "frames/s", f"encode.{dt}" if p == "paper" else None))
            f.append(_fig(section, f"build.{p}_build_{dt}_frames_per_s",
                          "  implied build rate with it (read + write kept)", r[f"build_{dt}_frames_per_s"],
                          "frames/s"))
    elif section == "stream":
        for b in ("zarr", "wds"):
            x = r[b]
            f.append(_fig(section, f"stream.{b}.segments_per_s", f"{b}: segments/s, 1 process", x["segments_per_s"],
                          "segments/s", "segments_per_s"))
            ram = x["shared_cache_mib_per_1M"] + x["index_mib_per_1M"]
            f.append(_fig(section, f"stream.{b}.mib_per_1M",
                          f"{b}: RAM (shared cache {x['shared_cache_mib_per_1M']:.0f} + index per rank)", ram,
                          "MiB/1M transitions", "mib_per_1M", higher_is_better=False))
        f.append(_fig(section, "stream.on_the_fly.segments_per_s", "on-the-fly tokenizing source (tiny tokenizer)",
                      r["on_the_fly_segments_per_s"], "segments/s"))
    elif section == "train":
        for k, x in r.items():
            preset, dt = k.split(".")
            ref = f"train.{preset}.{dt}" if preset == "40M" and x["batch"] == 8 and x["steps"] == 8 else None
            gf = f", {x['gflop_per_s']:.0f} GFLOP/s" if "gflop_per_s" in x else ""
            f.append(_fig(section, f"train.{k}.tokens_per_s",
                          f"{preset} {dt}, B={x['batch']} L={x['steps']} ({x['ms_per_step']:.0f} ms/step, "
                          f"CPU {x['cpu_ms_per_step']:.0f} ms{gf})",
                          x["tokens_per_s"], "tokens/s", ref))
            if "matmul_ms" in x:
                f.append(_fig(section, f"train.{k}.matmul_ms",
                              f"{preset} {dt}: of which its {x['matmul_calls']} matrix products "
                              f"({x['matmul_gflop']} GFLOP at {x['matmul_gflop_per_s']:.0f} GFLOP/s; "
                              f"rest of the step {x['other_ms']:.0f} ms)",
                              x["matmul_ms"], "ms", higher_is_better=False))
    elif section == "tokenizer":
        presets = sorted({k.split(".")[0] for k in r if k.endswith("frames_per_s") and k.count(".") == 3})
        for p in presets:
            for op in ("encode", "decode"):
                for dt in ("fp32", "bf16"):
                    ref = f"{op}.{dt}" if p == "paper" else None
                    f.append(_fig(section, f"tokenizer.{p}.{op}.{dt}.frames_per_s", f"{p} {op} {dt}",
                                  r[f"{p}.{op}.{dt}.frames_per_s"], "frames/s", ref))
            f.append(_fig(section, f"tokenizer.{p}.encode.fp32.1frame_ms", f"{p} encode 1 frame fp32",
                          r[f"{p}.encode.fp32.1frame_ms"], "ms", "encode_1frame_ms" if p == "paper" else None,
                          higher_is_better=False))
        if "tiny.train_step_b32_ms" in r:
            f.append(_fig(section, "tokenizer.tiny.train_step_b32_ms", "tiny training step, batch 32",
                          r["tiny.train_step_b32_ms"], "ms", higher_is_better=False))
        if "lpips_vgg.fwd_bwd_b8_ms" in r:
            f.append(_fig(section, "tokenizer.lpips_vgg.fwd_bwd_b8_ms", "LPIPS-VGG fwd+bwd, batch 8",
                          r["lpips_vgg.fwd_bwd_b8_ms"], "ms", higher_is_better=False))
    elif section == "plan":
        names = {"greedy": "greedy", "beam_k2": "beam H=2 K=2", "beam_k3": "beam H=2 K=3", "beam_k4": "beam H=2 K=4",
                 "mcts": "MCTS 20 sims H=2"}
        for dt, x in r.items():
            s = x["settings"]
            for k, what in names.items():
                row = _fig(section, f"plan.{dt}.{k}", f"{s['preset']} {dt}: {what}"
                           + ("" if s["encode"] else " (no encode)") + f" (CPU {x['cpu_ms'][k]:.0f} ms)",
                           x[k], "decisions/s")
                off = (x.get("official") or {}).get(k)
                if off and s["encode"]:
                    row.update(reference=off, reference_source=f"official 40M {dt}", ratio=x[k] / off)
                f.append(row)
    return f


# -------------------------------------------------------------------------------------------------------- umbrella

def run_bench(cfg: BenchConfig | None = None, sections: tuple[str, ...] = SECTIONS,
              progress: Callable[[str], None] | None = None, keep_going: bool = True) -> dict[str, Any]:
    """Run `sections` in this process, in order, and return {machine, config, results, figures, errors, seconds}.

    A failing section is recorded under `errors` (and the others still run) when `keep_going`.
    """
    import torch

    cfg = cfg or bench_config()
    for s in sections:
        if s not in RUNNERS:
            raise ConfigError(f"bench section '{s}': choose from {', '.join(SECTIONS)}")
    log = progress or (lambda msg: None)
    torch.set_num_threads(cfg.threads)
    machine = machine_info()
    results: dict[str, Any] = {}
    figs: list[dict[str, Any]] = []
    errors: dict[str, str] = {}
    seconds: dict[str, float] = {}
    state: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="jowa_bench_") as td:
        for s in sections:
            log(s)
            t0 = time.perf_counter()
            try:
                results[s] = RUNNERS[s](cfg, Path(td), state, lambda msg, s=s: log(f"{s}: {msg}"))
                figs.extend(figures(s, results[s]))
            except Exception as e:  # noqa: BLE001 - one broken benchmark must not hide the others' figures
                if not keep_going or isinstance(e, JowaError):  # bad input: one line, exit 1
                    raise
                errors[s] = f"{type(e).__name__}: {e}"
            seconds[s] = round(time.perf_counter() - t0, 1)
            torch.set_num_threads(cfg.threads)  # sections may change it
    machine["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
    return {"machine": machine, "config": config_to_dict(cfg), "sections": list(sections), "results": results,
            "figures": figs, "errors": errors, "seconds": seconds}


def machine_line(m: dict[str, Any]) -> str:
    """One header line naming the machine and its load (so a reader can discount figures from a busy machine)."""
    gpu = m["gpu"] or "no GPU"
    load = " ".join(f"{x:.2f}" for x in m["load_avg_start"])
    end = m.get("load_avg_end")
    warn = f"  LOADED (1-min load {m['load_avg_start'][0]:.1f} on {m['cores']} cores)" if m["loaded"] else ""
    return (f"{m['cpu']}, {m['cores']} cores{' (avx512_bf16)' if m['avx512_bf16'] else ''}, {m['ram_gib']} GiB; "
            f"torch {m['torch']} ({m['torch_threads']} thread{'s' if m['torch_threads'] != 1 else ''}); {gpu}; load avg {load}"
            + (f" -> {end[0]:.2f}" if end else "") + f"; {m['started']}{warn}")


def render_table(res: dict[str, Any], console=None) -> None:
    """Print the one table: section | figure | value | unit | reference | ratio."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    cfg = res["config"]
    t = Table(title=f"jowa bench ({cfg['size']})", caption=machine_line(res["machine"]), caption_justify="left")
    t.add_column("section")
    t.add_column("figure")
    t.add_column("value", justify="right")
    t.add_column("unit")
    t.add_column("reference", justify="right")
    t.add_column("x better", justify="right")
    last = None
    for f in res["figures"]:
        if last is not None and f["section"] != last:
            t.add_section()
        v = f["value"]
        val = f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}" if abs(v) < 1 else f"{v:.2f}"
        ref = "-"
        if f["reference"] is not None:
            rv = f["reference"]
            ref = f"{rv:,.0f}" if rv >= 100 else f"{rv:.3g}"
            ref += f" ({f['reference_source']})"
        ratio = f"{f['ratio']:.2f}x" if f["ratio"] else "-"
        t.add_row(f["section"] if f["section"] != last else "", f["figure"], val, f["unit"], ref, ratio)
        last = f["section"]
    console.print(t)
    m = res["machine"]
    if m["loaded"] and m["torch_threads"] > 1:
        console.print(f"[yellow]The machine was loaded (1-min load {m['load_avg_start'][0]:.1f} on {m['cores']} cores):"
                      f" with {m['torch_threads']} torch threads every parallel region waits (spinning) for descheduled"
                      " threads, so build/train/tokenizer/plan wall and CPU times are inflated, often several-fold;"
                      " compare with the official figures only on an idle machine, or rerun with"
                      " --set threads=1.[/yellow]")
    for s, err in res["errors"].items():
        console.print(f"[red]{s} failed:[/red] {err}")
    console.print("seconds per section: " + ", ".join(f"{k} {v:.0f}" for k, v in res["seconds"].items()))
