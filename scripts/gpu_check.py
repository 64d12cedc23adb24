"""The GPU check: one command that measures, on one CUDA device, every path a paper-scale run leans on.

    bash scripts/gpu_check.sh [--json OUT] [--compile reduce-overhead] [--peak-tflops T]   # <= 8 min on one GPU
    bash scripts/gpu_check.sh --cpu [--json OUT]                                           # tiny sizes, < 1 min

Why: all of jowa was developed and measured on a 2-core CPU. When a GPU is lent, the questions are always the
same (does the build tokenize fast enough, what do the 40M/150M training steps reach against the GPU's peak, how
far above the paper's planning speed do the batched beams go, does `jowa eval` run end to end on CUDA), and they
must be answered in one short run, without writing code on a clock. `--cpu` runs the very same functions at tiny
sizes and is part of the test suite (tests/pipelines/test_gpu_check.py), so this script cannot rot unseen.

Parts (each timed with the device synchronized around every repetition; warmup first, then the median):
  (a) tokenize  the build's path (`jowa_data.tokenize.encode_frames`, host frames in, host tokens out) with the
                paper tokenizer (random weights) in bf16: frames/s.
  (b) train     one stage-2 step of the 40M and the 150M presets (fwd + every loss + bwd + clip + AdamW + target
                copy, as `pipelines.pretrain` runs it) under bf16 autocast, flash attention forced when the GPU
                has it: tokens/s and MFU. Model FLOPs per step are counted by `torch.utils.flop_counter` over one
                extra step (every matmul and attention kernel, forward and backward; causal attention counted
                as full T x T, the PaLM convention), divided by the median step time and by the GPU's dense bf16
                peak (`BF16_PEAK_TFLOPS`; unknown GPU: MFU n/a unless --peak-tflops).
  (c) plan      the 150M preset (random weights) with `Planner` over `WorldModelImagination` in bf16: greedy,
                beam H=2 K=3 and MCTS (20 simulations), settings of `jowa bench plan` (Phoenix, 8-step history,
                the new frame's encode included); decisions/s beside the paper's Table 5 (10.8 / 1.26 / 0.12 per
                second on its GPU). `--compile MODE` puts `torch.compile` (reduce-overhead = CUDA graphs) on the
                one-token pass; a compile failure is reported and the part continues eagerly.
  (d) eval      `pipelines.evaluate.evaluate` (the function behind `jowa eval`) on checkpoint files of a random-
                init 150M model and paper tokenizer: one Breakout episode capped at 2,000 emulator frames, beam
                planning in bf16, on the device: emulator frames/s (whole loop) and decisions/s (planning time).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, ContextManager, Sequence

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from jowa_common.io import atomic_write_json

# Paper Table 5 (JOWA-150M on the authors' GPU), decisions/s: docs/official_code.md §5.
PAPER_PLAN = {"greedy": 10.8, "beam_k3": 1.26, "mcts": 0.12}

# Dense bf16 tensor-core peaks in TFLOP/s, matched in order as substrings of torch.cuda.get_device_name()
# (more specific names first). Sources: NVIDIA datasheets, whose headline tensor figures are "with sparsity"; the
# dense figure is half of it. H100 SXM and H200: 1,979 sparse; H100 NVL and H200 NVL: 1,671; H100 PCIe: 1,513;
# A100 (SXM and PCIe): 624; L40S: 733; L40: 362; L4: 242; A10: 250; B200 (HGX B200): 4,500.
BF16_PEAK_TFLOPS: list[tuple[str, float | None]] = [
    ("H100 NVL", 835.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),  # SXM, also GH200
    ("H200 NVL", 835.0),
    ("H200", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L40", 181.0),
    ("L4", 121.0),
    ("A10G", None),  # no NVIDIA datasheet (an AWS variant of the A10): unknown, not the A10's figure
    ("A10", 125.0),
]


@dataclass(frozen=True)
class Sizes:
    """What each part runs. `GPU` is the real check, `CPU` the same code at sizes a 2-core CPU does in seconds."""

    tokenizer: str  # tokenizer preset of (a), (c) and (d)
    tokenize_batch: int  # frames per encode call (the build's encode_batch)
    tokenize_frames: int  # frames per timed repetition
    tokenize_reps: int
    train_presets: tuple[str, ...]  # world-action presets of (b)
    train_batch: int  # segments per step
    train_steps: int  # steps per segment (L)
    train_warmup: int
    train_reps: int
    plan_preset: str  # world-action preset of (c) and (d)
    plan_warmup: int
    plan_reps: int  # timed decisions per planner
    plan_game: str  # sets task id and valid actions (bench plan's Phoenix: 8 actions)
    eval_game: str
    eval_frames: int  # emulator frames of the one eval episode (fewer if --budget-s would be overrun)


GPU = Sizes(tokenizer="paper", tokenize_batch=1024, tokenize_frames=8192, tokenize_reps=3,
            train_presets=("40M", "150M"), train_batch=128, train_steps=8, train_warmup=3, train_reps=10,
            plan_preset="150M", plan_warmup=3, plan_reps=20, plan_game="Phoenix", eval_game="Breakout",
            eval_frames=2000)
# tiny_conv: the paper tokenizer's convnet architecture, narrow (the same encode code path as `paper`).
CPU = Sizes(tokenizer="tiny_conv", tokenize_batch=16, tokenize_frames=32, tokenize_reps=2,
            train_presets=("tiny",), train_batch=2, train_steps=8, train_warmup=1, train_reps=2,
            plan_preset="tiny", plan_warmup=1, plan_reps=3, plan_game="Phoenix", eval_game="Breakout",
            eval_frames=200)


@dataclass
class Row:
    """One line of the table: `value` in `unit`, the paper's figure when there is one, a short note."""

    check: str
    value: float
    unit: str
    note: str = ""
    paper: float | None = None
    details: dict[str, Any] = field(default_factory=dict)


class UsageError(Exception):
    """A bad command line: printed as one line, exit status 2."""


# ---------------------------------------------------------------------------------------------- helpers


def peak_tflops(device_name: str) -> float | None:
    """Dense bf16 peak of a GPU by its name (None when unknown)."""
    for key, tf in BF16_PEAK_TFLOPS:
        if key.lower() in device_name.lower():
            return tf
    return None


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], warmup: int, reps: int, device: torch.device) -> list[float]:
    """Seconds of each of `reps` calls of fn after `warmup` untimed ones, the device synchronized around each."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(reps):
        synchronize(device)
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        out.append(time.perf_counter() - t0)
    return out


class AttentionOps(TorchDispatchMode):
    """Names of the attention kernels that really run (SDPA dispatches to flash / efficient / cudnn / math)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__
        if "attention" in name and "backward" not in name:
            self.seen.add(name.split(".")[0])
        return func(*args, **(kwargs or {}))


def attention_kind(ops: set[str]) -> str:
    for kind in ("flash", "cudnn", "efficient"):
        if any(kind in op for op in ops):
            return kind
    return "math" if not ops else "+".join(sorted(ops))


def flash_context() -> ContextManager:
    """Only the flash SDPA kernel (a step then raises if it cannot run: the caller falls back)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.FLASH_ATTENTION)


def fmt(v: float) -> str:
    if v >= 1000:
        return f"{v:,.0f}"
    if v >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}" if v >= 0.1 else f"{v:.3g}"


# ---------------------------------------------------------------------------------------------- (a) tokenize


def make_tokenizer(preset: str, device: torch.device):
    from jowa_model.tokenizer import Tokenizer, tokenizer_preset

    return Tokenizer(tokenizer_preset(preset)).eval().requires_grad_(False).to(device)


def check_tokenize(sizes: Sizes, device: torch.device, log: Callable[[str], None]) -> Row:
    """(a) The build's tokenizing path in bf16: uint8 frames on the host -> uint16 tokens on the host."""
    import numpy as np

    from jowa_data.tokenize import encode_frames

    tok = make_tokenizer(sizes.tokenizer, device)
    frames = np.random.default_rng(0).integers(0, 256, (sizes.tokenize_frames, 84, 84), dtype=np.uint8)
    run = lambda: encode_frames(tok, frames, batch=sizes.tokenize_batch, device=str(device), precision="bf16")  # noqa: E731
    log(f"tokenize: {sizes.tokenizer} tokenizer, {sizes.tokenize_frames} frames per rep, batch {sizes.tokenize_batch}")
    times = timed(run, 1, sizes.tokenize_reps, device)
    fps = sizes.tokenize_frames / statistics.median(times)
    return Row(f"tokenize {sizes.tokenizer} bf16 B={sizes.tokenize_batch}", fps, "frames/s",
               "build path, host to host",
               details={"frames": sizes.tokenize_frames, "batch": sizes.tokenize_batch, "times_s": times,
                        "params": sum(p.numel() for p in tok.parameters())})


# ---------------------------------------------------------------------------------------------- (b) train


def check_train(preset: str, sizes: Sizes, device: torch.device, peak: float | None,
                log: Callable[[str], None]) -> Row:
    """(b) One stage-2 training step as `pipelines.pretrain` runs it, bf16 autocast, flash attention if it can."""
    from jowa_model.losses import LossConfig, compute_loss
    from jowa_model.presets import model_preset
    from jowa_model.world_action import WorldActionModel
    from pipelines.train_core import (OptimConfig, autocast_ctx, make_optimizer, optimizer_step, random_batch,
                                      set_stage)

    torch.manual_seed(0)
    cfg = model_preset(preset)
    model = WorldActionModel(cfg).to(device).train()
    set_stage(model, 2)
    optim = OptimConfig()
    opt = make_optimizer(model, 2, optim)
    data = {k: v.to(device) for k, v in random_batch(cfg, sizes.train_batch, sizes.train_steps,
                                                       torch.Generator().manual_seed(0)).items()}
    loss_cfg = LossConfig()
    state = {"step": 0, "flash": True}

    def step() -> None:
        with (flash_context() if state["flash"] else nullcontext()), autocast_ctx(str(device), "bf16"):
            terms = compute_loss(model, data, loss_cfg, stage=2)
        optimizer_step(terms.total, opt, optim.grad_clip)
        state["step"] += 1
        model.step_target(state["step"])

    log(f"train {preset}: B={sizes.train_batch} x L={sizes.train_steps}, {model.parameter_counts()['trainable']:,} "
        "trainable parameters")
    try:
        with warnings.catch_warnings():  # SDPA warns once per kernel it rules out before raising
            warnings.simplefilter("ignore", UserWarning)
            step()
    except RuntimeError as e:  # no flash kernel for this device / dtype / dropout: SDPA picks another one
        state["flash"] = False
        log(f"train {preset}: flash attention could not be forced ({str(e).splitlines()[0][:120]}); default SDPA")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = timed(step, sizes.train_warmup, sizes.train_reps, device)
    with FlopCounterMode(display=False) as counter, AttentionOps() as ops:
        step()
    flops = counter.get_total_flops()
    sec = statistics.median(times)
    tokens = sizes.train_batch * sizes.train_steps * cfg.block_size
    kind = attention_kind(ops.seen)
    tflops = flops / sec / 1e12
    mfu = 100.0 * tflops / peak if peak else None
    # the attention kernel that ran says whether flash could be forced (the log line says why not)
    note = (f"MFU {mfu:.1f}% ({tflops:.3g} TF/s)" if mfu is not None else f"{tflops:.3g} TF/s") + f"; {kind} attn"
    details = {"preset": preset, "batch": sizes.train_batch, "steps": sizes.train_steps, "ms_per_step": 1e3 * sec,
               "times_s": times, "tokens_per_step": tokens, "model_tflop_per_step": flops / 1e12,
               "achieved_tflops": tflops, "mfu_percent": mfu, "peak_tflops": peak, "attention": kind,
               "attention_ops": sorted(ops.seen), "flash_forced": state["flash"],
               "trainable_params": model.parameter_counts()["trainable"]}
    if device.type == "cuda":
        details["max_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return Row(f"train {preset} bf16 step B={sizes.train_batch}x{sizes.train_steps}", tokens / sec, "tokens/s",
               note, details=details)


# ---------------------------------------------------------------------------------------------- (c) plan


def compile_one_token_pass(model, mode: str) -> None:
    """`torch.compile` the planner's inner loop, the one-token cached pass (instance attribute over the method;
    dynamic shapes: the beam batch and the cache length change from call to call)."""
    model.decode_step = torch.compile(model.decode_step, mode=None if mode == "default" else mode, dynamic=True)


def uncompile(model) -> None:
    model.__dict__.pop("decode_step", None)  # the class's eager method again


def check_plan(sizes: Sizes, device: torch.device, compile_mode: str, log: Callable[[str], None]) -> list[Row]:
    """(c) decisions/s of greedy, beam H=2 K=3 and MCTS (bench plan's settings) with the plan preset in bf16."""
    from jowa_data.manifest import load_manifests
    from jowa_model.planner import Planner, WorldModelImagination
    from jowa_model.presets import model_preset
    from jowa_model.world_action import WorldActionModel
    from pipelines.bench_plan import PLANNERS

    torch.manual_seed(0)
    game = load_manifests().get(sizes.plan_game)
    model = WorldActionModel(model_preset(sizes.plan_preset)).to(device).eval()
    world = WorldModelImagination(model, autocast_dtype=torch.bfloat16)
    tok = make_tokenizer(sizes.tokenizer, device)
    gen = torch.Generator().manual_seed(0)
    hist = model.cfg.max_steps
    mask = torch.from_numpy(game.action_mask)[None]
    valid = mask[0].nonzero().squeeze(1)
    state = {"obs": torch.randint(0, model.cfg.obs_vocab, (1, hist, 36), generator=gen).to(device),
             "acts": valid[torch.randint(0, len(valid), (1, hist - 1), generator=gen)],
             "task": torch.tensor([game.task_id])}  # host tensors, as the evaluator passes them
    compiled = "eager"
    if compile_mode != "none":
        compile_one_token_pass(model, compile_mode)
        compiled = f"compile {compile_mode}"

    rows = []
    for name in ("greedy", "beam_k3", "mcts"):
        planner = Planner(world, PLANNERS[name])

        def decide() -> None:
            frame = torch.randint(0, 256, (1, 84, 84), dtype=torch.uint8, generator=gen).to(device)
            new = tok.encode(frame, dtype=torch.bfloat16)  # (1, 36) on the device
            state["obs"] = torch.cat([state["obs"][:, 1:], new[:, None]], 1)
            a = planner.plan(state["obs"], state["acts"], state["task"], mask).cpu()  # the env needs it on the host
            state["acts"] = torch.cat([state["acts"][:, 1:], a[:, None]], 1)

        log(f"plan {sizes.plan_preset} {name} ({compiled}): {sizes.plan_warmup} warmup + {sizes.plan_reps} decisions")
        note = compiled
        try:
            times = timed(decide, sizes.plan_warmup, sizes.plan_reps, device)
        except Exception as e:  # noqa: BLE001 - a compile failure must not end the check: report, go on eagerly
            if compiled == "eager":
                raise
            log(f"plan: torch.compile failed ({type(e).__name__}: {str(e).splitlines()[0][:120]}); eager from here")
            uncompile(model)
            compiled = note = "eager (compile failed)"
            times = timed(decide, sizes.plan_warmup, sizes.plan_reps, device)
        dps = 1.0 / statistics.median(times)
        paper = PAPER_PLAN[name] if sizes.plan_preset == "150M" else None
        if paper:
            note += f"; {dps / paper:.1f}x paper"
        label = {"greedy": "greedy", "beam_k3": "beam H=2 K=3", "mcts": "MCTS 20 sims"}[name]
        rows.append(Row(f"plan {sizes.plan_preset} {label}", dps, "decisions/s", note, paper,
                        details={"planner": vars(PLANNERS[name]), "game": game.name, "history": hist,
                                 "ms_per_decision": 1e3 * statistics.median(times), "times_s": times,
                                 "compile": compiled, "encode_included": True}))
    return rows


# ---------------------------------------------------------------------------------------------- (d) eval


def eval_frame_cap(sizes: Sizes, time_left_s: float, beam_s: float | None) -> int:
    """Emulator frames for (d) that fit in `time_left_s`: one decision per 4 frames at the measured beam K=3
    decision time (the eval's beam is no wider) plus half again for the emulator and the encode; never more
    than `sizes.eval_frames`, never fewer than 200 (50 decisions)."""
    if beam_s is None:
        return sizes.eval_frames
    frames = int(max(time_left_s, 0.0) / (1.5 * beam_s) * 4)
    return max(200, min(sizes.eval_frames, frames - frames % 4))


def check_eval(sizes: Sizes, device: torch.device, tmp: Path, log: Callable[[str], None],
               max_frames: int | None = None) -> Row:
    """(d) `jowa eval`'s function on checkpoint files of a random-init model and tokenizer, one short episode."""
    from jowa_model.checkpoint import save_world_action
    from jowa_model.presets import model_preset
    from jowa_model.tokenizer import Tokenizer, save_tokenizer, tokenizer_preset
    from jowa_model.world_action import WorldActionModel
    from pipelines.evaluate import EvalConfig, evaluate

    torch.manual_seed(0)
    ckpt, tok_path, out = tmp / "model.pt", tmp / "tokenizer.pt", tmp / "scores.json"
    save_world_action(WorldActionModel(model_preset(sizes.plan_preset)), ckpt)
    save_tokenizer(Tokenizer(tokenizer_preset(sizes.tokenizer)), tok_path)
    cap = max_frames or sizes.eval_frames
    cfg = EvalConfig(episodes=1, planner="beam", max_frames=cap, device=str(device), precision="bf16")
    log(f"eval: {sizes.eval_game}, 1 episode of <= {cap} frames, {sizes.plan_preset} random-init, "
        "beam, bf16")
    t0 = time.perf_counter()
    doc = evaluate(ckpt, tok_path, [sizes.eval_game], cfg, out=out)
    wall = time.perf_counter() - t0  # loading the checkpoints included
    g = doc["games"][sizes.eval_game]
    frames = sum(g["frames"])
    s = g["settings"]
    return Row(f"eval {sizes.eval_game} end to end", frames / g["wall_s"], "frames/s",
               f"{fmt(g['decisions_per_s'])} dec/s; H={s.get('horizon')} K={s.get('beam_width')}, {frames} frames",
               details={"frames": frames, "decisions": g["decisions"], "decisions_per_s": g["decisions_per_s"],
                        "game_wall_s": g["wall_s"], "plan_s": g["plan_s"], "encode_s": g["encode_s"],
                        "env_s": g["env_s"], "wall_s_with_loading": wall, "return": g["returns"][0],
                        "device": doc["device"], "settings": s})


# ---------------------------------------------------------------------------------------------- report


def machine_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                            "device": str(device), "torch": torch.__version__, "cuda": torch.version.cuda,
                            "python": platform.python_version(), "cpus": os.cpu_count()}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info |= {"gpu": torch.cuda.get_device_name(device), "gpu_memory_gib": round(p.total_memory / 2**30, 1),
                 "capability": f"{p.major}.{p.minor}", "cudnn": torch.backends.cudnn.version(),
                 "bf16_supported": torch.cuda.is_bf16_supported(),
                 "sdp_enabled": {"flash": torch.backends.cuda.flash_sdp_enabled(),
                                 "mem_efficient": torch.backends.cuda.mem_efficient_sdp_enabled(),
                                 "cudnn": torch.backends.cuda.cudnn_sdp_enabled(),
                                 "math": torch.backends.cuda.math_sdp_enabled()}}
    else:
        info["gpu"] = None
    return info


def format_table(info: dict[str, Any], rows: Sequence[Row], width: int = 100) -> str:
    """Plain text, at most `width` columns: a header with the machine, then one line per row."""
    what = info.get("gpu") or f"CPU ({info['cpus']} cores)"
    head = [f"jowa GPU check, {info['date']}: {what}",
            f"torch {info['torch']}, CUDA {info['cuda'] or '-'}, Python {info['python']}, device {info['device']}"]
    peak = info.get("peak_bf16_tflops")
    head.append(f"MFU against a dense bf16 peak of {peak:g} TFLOP/s" if peak else
                "MFU n/a: no bf16 peak known for this device (--peak-tflops T gives one)")
    if info.get("sdp_enabled"):
        head.append("SDPA backends enabled: " + ", ".join(k for k, v in info["sdp_enabled"].items() if v)
                    + f"; bf16 supported: {info['bf16_supported']}")
    cols = f"{'check':<30} {'figure':>10} {'unit':<11} {'paper':>6}  note"
    lines = [*head, "", cols, "-" * min(width, 100)]
    for r in rows:
        paper = f"{r.paper:g}" if r.paper is not None else "-"
        line = f"{r.check:<30} {fmt(r.value):>10} {r.unit:<11} {paper:>6}  {r.note}"
        lines.append(line if len(line) <= width else line[:width - 3] + "...")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu", action="store_true", help="tiny sizes on the CPU (the test suite's run, < 1 min)")
    p.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda; cpu with --cpu)")
    p.add_argument("--json", dest="json_out", default=None, metavar="OUT", help="also write the table as JSON")
    p.add_argument("--compile", default="none", choices=("none", "default", "reduce-overhead", "max-autotune"),
                   help="torch.compile the planner's one-token pass (reduce-overhead = CUDA graphs); default none")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="the device's dense bf16 peak in TFLOP/s (default: looked up by GPU name)")
    p.add_argument("--parts", default="tokenize,train,plan,eval",
                   help="comma-separated subset of tokenize,train,plan,eval")
    p.add_argument("--train-batch", type=int, default=None, help="segments per training step (default 128 on GPU)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--budget-s", type=float, default=480.0,
                   help="wall-clock target of the whole check; the eval episode is shortened to fit (default 480)")
    return p.parse_args(argv)


def resolve_device(args: argparse.Namespace) -> torch.device:
    name = args.device or ("cpu" if args.cpu else "cuda")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise UsageError(f"--device {name}: {e}") from e
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name}: no CUDA device is available here (torch {torch.__version__}, "
                             f"CUDA build {torch.version.cuda or 'none'}); the CPU smoke run is --cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s)")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    elif device.type != "cpu":
        raise UsageError(f"--device {name}: use cuda, cuda:N or cpu")
    return device


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)

    def log(msg: str) -> None:
        print(f"[gpu_check {time.perf_counter() - t_start:6.1f}s] {msg}", file=sys.stderr, flush=True)

    t_start = time.perf_counter()
    try:
        device = resolve_device(args)
        parts = [p for p in args.parts.split(",") if p]
        bad = sorted(set(parts) - {"tokenize", "train", "plan", "eval"})
        if bad or not parts:
            raise UsageError(f"--parts: unknown part(s) {', '.join(bad) or '(none given)'}; "
                             "choose from tokenize,train,plan,eval")
        if args.budget_s <= 0:
            raise UsageError(f"--budget-s must be > 0, got {args.budget_s:g}")
        if args.train_batch is not None and args.train_batch < 1:
            raise UsageError(f"--train-batch must be >= 1, got {args.train_batch}")
    except UsageError as e:
        print(f"gpu_check: {e}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = CPU if args.cpu else GPU
    if args.train_batch is not None:
        sizes = Sizes(**(asdict(sizes) | {"train_batch": args.train_batch}))
    info = machine_info(device)
    peak = args.peak_tflops if args.peak_tflops is not None else (
        peak_tflops(info["gpu"]) if info.get("gpu") else None)
    info["peak_bf16_tflops"] = peak
    info["sizes"] = asdict(sizes)
    info["compile"] = args.compile
    log(f"{info.get('gpu') or 'CPU'}: torch {info['torch']}, CUDA {info['cuda']}, "
        f"{'cpu' if args.cpu else 'gpu'} sizes, parts {','.join(parts)}")

    rows: list[Row] = []
    if "tokenize" in parts:
        rows.append(check_tokenize(sizes, device, log))
    if "train" in parts:
        for preset in sizes.train_presets:
            rows.append(check_train(preset, sizes, device, peak, log))
            if device.type == "cuda":
                torch.cuda.empty_cache()
    if "plan" in parts:
        rows += check_plan(sizes, device, args.compile, log)
    if "eval" in parts:
        beam = [r.details["ms_per_decision"] / 1e3 for r in rows if r.check.endswith("beam H=2 K=3")]
        left = args.budget_s - (time.perf_counter() - t_start) - 15.0  # loading the checkpoints, the report
        cap = eval_frame_cap(sizes, left, beam[0] if beam else None)
        if cap < sizes.eval_frames:
            log(f"eval: {cap} frames instead of {sizes.eval_frames}, to end within --budget-s {args.budget_s:g}")
        with tempfile.TemporaryDirectory(prefix="jowa_gpu_check_") as tmp:
            rows.append(check_eval(sizes, device, Path(tmp), log, cap))
    info["total_s"] = round(time.perf_counter() - t_start, 1)
    log(f"done in {info['total_s']} s" + (f", over --budget-s {args.budget_s:g}"
                                             if info["total_s"] > args.budget_s else ""))
    print(format_table(info, rows))
    if args.json_out:
        doc = {"format": "jowa-gpu-check-v1", "machine": info, "rows": [asdict(r) for r in rows]}
        out = Path(args.json_out)
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out, doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
