"""Two-stage JOWA pretraining (paper sec. 4.3), streamed from token shards, single process or torchrun/DDP.

Stage 1 (M1 steps) trains the world heads and the backbone on the world loss (Eq. 7); stage 2 (M2 steps)
trains everything on the joint loss (Eq. 9). One run, one step counter: at step M1 the optimizer is rebuilt
with the stage-2 learning rates (the official single-run path keeps the stage-1 world LR by an off-by-one,
docs/official_code.md §3; ours switches at exactly M1) and the Q head becomes trainable.

DDP really averages gradients: the loss is computed inside the wrapped module's forward, so DDP's reducer
sees every backward (the official code calls `ddp.module.compute_loss`, bypassing DDP's forward, so its
ranks never synchronise, docs/official_code.md §9.1). `data.batch_size` is GLOBAL: each of W ranks gets
batch_size / W segments, and the averaged gradient equals that of one process on the whole batch.

Resume is exact: rerunning the same command continues from the newest checkpoint in the run folder with
the model, optimizer, target head, step, RNG and stream position it had; metrics rows after that step are
dropped, so the curve continues as if never interrupted.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn

from jowa_common.config import config_from_dict, config_to_dict
from jowa_common.errors import CheckpointError, ConfigError
from jowa_common.io import atomic_torch_save, atomic_write_json, safe_torch_load
from jowa_model import cpu_kernels
from jowa_model.checkpoint import FORMAT, model_state
from jowa_model.losses import LossConfig, compute_loss, term_counts
from jowa_model.presets import model_preset
from jowa_model.world_action import WorldActionConfig, WorldActionModel
from pipelines.dist import DistInfo, all_reduce_mean, barrier, init_distributed, node_first, shutdown
from pipelines.heldout import heldout_eval, world_accuracy
from pipelines.train_core import (MetricsLog, OptimConfig, Progress, RunFiles, autocast_ctx, endless,
                                  make_optimizer, optimizer_step, rng_state, set_rng_state, set_stage, to_device)

# --------------------------------------------------------------------------------------------- config


@dataclass
class DataConfig:
    dataset: str = ""  # built dataset folder (`jowa-data build --out`)
    backend: str = "zarr"  # zarr | wds: which shards feed the token cache
    batch_size: int = 512  # GLOBAL segments per optimizer step (Table 13); each rank gets batch_size / world
    seq_len: int = 8  # L, steps per segment (Table 10)
    stride: int = 4  # steps between segment starts within an episode (official tau = 4)
    weights: str = "uniform"  # per-game sampling: uniform | proportional
    eval_dataset: str = ""  # optional held-out dataset: accuracies vs unigram/majority baselines
    eval_batches: int = 8  # batches of the held-out set per evaluation
    cache_dir: str = ""  # token caches go under this folder ("": in the dataset's _cache/); set it when the
    # dataset folder is read-only or shared between nodes (a node-local disk: each node decodes its own copy)


@dataclass
class PretrainConfig:
    model: WorldActionConfig = field(default_factory=WorldActionConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    stage1_steps: int = 250_000  # M1 (paper sec. 4.3)
    stage2_steps: int = 1_500_000  # M2
    seed: int = 0  # model init and dropout; the stream has its own seed derived from it
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | fp32 | bf16
    log_every: int = 100  # steps between metric rows (one host sync each)
    eval_every: int = 0  # steps between held-out evaluations (0: only at the end)
    ckpt_every: int = 5000  # steps between checkpoints (and one at the end)
    keep_ckpts: int = 3  # newest checkpoints kept
    image_every: int = 0  # steps between imagined-rollout PNGs (needs `tokenizer`); 0: only at the end
    tokenizer: str = ""  # tokenizer checkpoint used to decode imagined rollouts to pixels
    manifests: tuple[str, ...] = ()  # manifest folders for the valid-action masks (empty: shipped manifests)
    progress: bool = True  # a progress line on stderr (stage, step, losses, tokens/s, ETA)
    cpu_kernels: bool = True  # jowa_model/cpu_kernels.py: faster CPU dropout/attention and eval (same math)

    @property
    def total_steps(self) -> int:
        return self.stage1_steps + self.stage2_steps


def train_preset(name: str) -> PretrainConfig:
    """`tiny` (CPU demo/tests) or a paper size (`40M`, `70M`, `150M`: Tables 11-13)."""
    if name == "tiny":
        # CQL alpha 1.0 (paper: 0.1; Kumar et al. 2020 use 1-4 on Atari): measured with the tiny model on 30k
        # transitions per game, alpha 0.1 left Breakout's greedy agent pressing LEFT for whole episodes (clipped
        # return 0.75, random play 1.2), alpha 1.0 scored 3.5 with the same data and steps (docs/learning.md).
        # TD backup from the data's next action (SARSA; paper: max over actions, Eq. 8): with the max, this small
        # critic over-valued contexts whose last actions were random-looking (max over near-equal noisy values),
        # so beam search, which scores imagined states by V, drove Freeway's chicken DOWN: beam 0.0 vs greedy 22.4.
        # With it, on the same data and steps, Q at the data's actions 5.5 -> 1.5 (the games' returns), beam
        # on Freeway 22.2, greedy unchanged on all three games (docs/learning.md).
        return PretrainConfig(model=model_preset("tiny"), loss=LossConfig(cql_alpha=1.0, td_backup="data"),
                              data=DataConfig(batch_size=16), stage1_steps=200, stage2_steps=200, log_every=10, ckpt_every=100, eval_every=100,
                              optim=OptimConfig(lr_stage1=1e-3, lr_stage2=5e-4, critic_lr=5e-4))
    return PretrainConfig(model=model_preset(name))


SHAPE_FIELDS = ("model", "data.seq_len", "data.batch_size", "data.stride", "data.weights", "data.backend",
                "stage1_steps", "seed", "loss")  # must match to resume: a changed loss is another run, not a resume


def _get(d: dict, dotted: str) -> Any:
    for k in dotted.split("."):
        d = d[k]
    return d


# --------------------------------------------------------------------------------------------- pieces


class LossModule(nn.Module):
    """Wraps the model so the whole loss runs inside `forward`: this is what DDP must call.

    Under DDP each term is rescaled by W * local_count / global_count (one small all-reduce of 5 counts), so
    the averaged gradient is exactly that of one process on the whole global batch, even when ranks hold
    different amounts of padding.
    """

    def __init__(self, model: WorldActionModel, loss_cfg: LossConfig, info: DistInfo | None = None):
        super().__init__()
        self.model, self.loss_cfg, self.info = model, loss_cfg, info or DistInfo()

    def forward(self, batch: dict[str, torch.Tensor], stage: int):
        scales = None
        if self.info.distributed:
            import torch.distributed as dist

            local = term_counts(batch, self.model.cfg.obs_tokens)
            glob = local.clone()
            dist.all_reduce(glob)
            scales = self.info.world_size * local / glob.clamp_min(1.0)
        terms = compute_loss(self.model, batch, self.loss_cfg, stage, scales)
        return terms.total, terms


def wrap(module: nn.Module, info: DistInfo) -> nn.Module:
    if not info.distributed:
        return module
    from torch.nn.parallel import DistributedDataParallel as DDP

    dev = [torch.device(info.device).index] if info.device.startswith("cuda") else None
    return DDP(module, device_ids=dev)


@torch.no_grad()
def imagined_rollout_png(model: WorldActionModel, tokenizer, batch: dict[str, torch.Tensor], path: Path,
                         context: int = 4) -> Path | None:
    """Real frames vs frames imagined from `context` real steps with the real actions, decoded to pixels."""
    from jowa_model.planner import WorldModelImagination
    from pipelines.viz import save_frame_grid

    valid = batch["mask_padding"][0]
    L = int(valid.sum())
    if L <= context:
        return None
    was_training = model.training
    imag = WorldModelImagination(model)
    tok, act, task = batch["tokens"][:1, :L], batch["actions"][:1, :L], batch["task_ids"][:1]
    state, _ = imag.start(tok[:, :context], act[:, : context - 1], task)
    imagined = [tok[0, t] for t in range(context)]
    for t in range(context, L):
        state, out = imag.step(state, act[:, t - 1])
        imagined.append(out.obs_tokens[0])
    model.train(was_training)
    real = tokenizer.decode(tok[0].cpu())
    fake = tokenizer.decode(torch.stack(imagined).cpu())
    return save_frame_grid([np.asarray(real), np.asarray(fake)], path,
                           labels=["real", f"imagined (ctx {context})"])


# --------------------------------------------------------------------------------------------- run


def node_token_cache(data: DataConfig, info: DistInfo, dataset: str):
    """The token cache of `dataset`, decoded at most once per node: local rank 0 makes it (if missing or stale)
    while the node's other ranks wait at a barrier, then they map the finished files. The rank that decoded says
    so on stderr (one line), so a run shows how often it happened."""
    from jowa_data.stream import cache_location, load_cache

    cdir = cache_location(dataset, data.backend, data.cache_dir or None)
    cache = node_first(info, lambda: load_cache(dataset, data.backend, cdir, progress=info.is_main))
    if cache.made:
        print(f"token cache of {dataset} decoded into {cdir} by rank {info.rank} (local rank {info.local_rank})",
              file=sys.stderr, flush=True)
    return cache


def replicas_digest(model: nn.Module) -> str:
    """sha256 of every parameter and buffer, bit for bit: equal on all ranks iff DDP kept the replicas identical."""
    import hashlib

    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _check_resume_config(saved: dict, now: dict, path: Path) -> None:
    diff = [k for k in SHAPE_FIELDS if _get(saved, k) != _get(now, k)]
    if diff:
        raise ConfigError(f"{path}: cannot resume: these settings differ from the checkpoint's: {', '.join(diff)} "
                          "(use a new --out folder, or the same settings)")


def pretrain(cfg: PretrainConfig, out: str | Path, stop_after: int | None = None,
             on_step: Callable[[int, dict], None] | None = None) -> dict[str, Any]:
    """Train (or resume) in `out`. Launch with torchrun for several processes. Returns a summary dict.

    `stop_after` ends the run early at that global step (after checkpointing), e.g. for tests.
    """
    if not cfg.data.dataset:
        raise ConfigError("data.dataset is not set: give the folder written by `jowa-data build`")
    import contextlib

    from jowa_common.io import folder_lock, remove_stale_temps

    info = init_distributed(cfg.device)
    try:
        # One training run per folder: the main rank holds the lock (the others write nothing there).
        with folder_lock(out, "jowa train") if info.is_main else contextlib.nullcontext():
            if info.is_main:
                remove_stale_temps(out)  # a checkpoint or metrics file half-written when a run was killed
            return _pretrain(cfg, RunFiles(out), info, stop_after, on_step)
    finally:
        shutdown(info)


def _pretrain(cfg: PretrainConfig, run: RunFiles, info: DistInfo, stop_after: int | None,
              on_step: Callable[[int, dict], None] | None) -> dict[str, Any]:
    from jowa_data.manifest import action_mask_table, load_manifests
    from jowa_data.stream import SegmentStream, cache_location

    if cfg.data.batch_size % info.world_size:
        raise ConfigError(f"data.batch_size={cfg.data.batch_size} is not divisible by the world size {info.world_size}")
    per_rank = cfg.data.batch_size // info.world_size
    cfg_dict = config_to_dict(cfg)
    device = info.device

    torch.manual_seed(cfg.seed)  # same init everywhere (DDP also broadcasts rank 0's weights)
    model = WorldActionModel(cfg.model)
    if cfg.cpu_kernels:
        cpu_kernels.apply(model)
    model.set_action_masks(torch.from_numpy(action_mask_table(load_manifests(list(cfg.manifests) or None),
                                                              cfg.model.num_tasks)))
    model.to(device)
    torch.manual_seed(cfg.seed + 1000 * info.rank)  # dropout masks differ across ranks
    stream = SegmentStream(cfg.data.dataset, batch_size=per_rank, seq_len=cfg.data.seq_len, seed=cfg.seed,
                           rank=info.rank, world_size=info.world_size, backend=cfg.data.backend,
                           stride=cfg.data.stride, weights=cfg.data.weights,
                           cache=node_token_cache(cfg.data, info, cfg.data.dataset))
    if len(stream) == 0:
        raise ConfigError(f"{cfg.data.dataset}: {stream.num_segments} segments are fewer than one global batch "
                          f"of {cfg.data.batch_size}: lower data.batch_size")
    eval_stream = None
    if cfg.data.eval_dataset and info.is_main:
        eval_cache = cache_location(cfg.data.eval_dataset, cfg.data.backend, cfg.data.cache_dir or None)
        eval_stream = SegmentStream(cfg.data.eval_dataset, batch_size=per_rank, seq_len=cfg.data.seq_len,
                                    seed=cfg.seed + 1, rank=0, world_size=1, backend=cfg.data.backend,
                                    stride=cfg.data.seq_len, cache_dir=eval_cache)

    step, opt_state = 0, None
    latest = run.latest()
    if latest is not None:
        ckpt = safe_torch_load(latest)
        if ckpt.get("format") != FORMAT or "train" not in ckpt:
            raise CheckpointError(f"{latest}: not a jowa pretraining checkpoint")
        # through the dataclass: fields added to the config since the checkpoint was written take their defaults
        saved = config_to_dict(config_from_dict(PretrainConfig, json.loads(ckpt["train"]["config"])))
        _check_resume_config(saved, cfg_dict, latest)
        model.load_state_dict(ckpt["model"])
        step = int(ckpt["train"]["step"])
        stream.load_state_dict(ckpt["train"]["stream"])
        rngs = ckpt["train"]["rng"]
        set_rng_state(rngs[info.rank] if len(rngs) > info.rank else rngs[0], device)
        opt_state = ckpt["optimizer"]
        if info.is_main:
            run.truncate_metrics(step)
    elif info.is_main:
        run.root.mkdir(parents=True, exist_ok=True)
        atomic_write_json(run.root / "config.json", cfg_dict)
        run.truncate_metrics(-1)

    metrics = MetricsLog(run, purge_step=step, enabled=info.is_main)

    tokenizer = None
    if cfg.tokenizer and info.is_main:
        from jowa_model.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(cfg.tokenizer)

    def stage_of(s: int) -> int:
        return 1 if s < cfg.stage1_steps else 2

    stage = stage_of(step)
    set_stage(model, stage)
    opt = make_optimizer(model, stage, cfg.optim)
    if opt_state is not None and len(opt_state["param_groups"]) == len(opt.param_groups):
        opt.load_state_dict(opt_state)
    ddp = wrap(LossModule(model, cfg.loss, info), info)
    model.train()

    def save(s: int) -> None:
        rngs, digests = [rng_state(device)], []
        if info.distributed:  # every rank's dropout RNG (CPU and CUDA) for an exact resume, and its weights' digest
            import torch.distributed as dist

            gathered = [None] * info.world_size
            dist.all_gather_object(gathered, (rng_state(device), replicas_digest(model)))
            rngs, digests = [r for r, _ in gathered], [h for _, h in gathered]
            if info.is_main and len(set(digests)) > 1:
                print(f"warning: step {s}: the ranks hold different weights (DDP replicas diverged); "
                      f"checkpointing rank 0's", file=sys.stderr, flush=True)
        if info.is_main:
            ckpt = model_state(model) | {
                "optimizer": opt.state_dict(),
                "train": {"step": s, "stage": stage_of(s), "config": json.dumps(cfg_dict),
                          "stream": stream.state_dict(), "rng": rngs, "replica_sha256": digests}}
            atomic_torch_save(ckpt, run.ckpt_path(s))
            run.prune(cfg.keep_ckpts)
        barrier(info)

    def images(s: int) -> None:
        if tokenizer is None:
            return
        src = eval_stream or stream
        b = to_device(src.gather(src.batch_ids(0, 0)), device)
        imagined_rollout_png(model, tokenizer, b, run.images / f"imagined_{s:08d}.png")

    it = endless(stream)
    t_last, tokens_since, summary = time.perf_counter(), 0, {}
    end = cfg.total_steps if stop_after is None else min(stop_after, cfg.total_steps)
    progress = Progress(end, step, f"pretrain {cfg.stage1_steps}+{cfg.stage2_steps}",
                        enabled=cfg.progress and info.is_main)
    while step < end:
        if stage_of(step) != stage:  # the stage switch: new LRs, fresh moments, Q head trainable
            stage = stage_of(step)
            set_stage(model, stage)
            opt = make_optimizer(model, stage, cfg.optim)
            ddp = wrap(LossModule(model, cfg.loss, info), info)
        batch = to_device(next(it), device)
        with autocast_ctx(device, cfg.precision):
            total, terms = ddp(batch, stage)
        gnorm = optimizer_step(total, opt, cfg.optim.grad_clip)
        step += 1
        progress.update(step)
        model.step_target(step)
        tokens_since += int(batch["tokens"].shape[0] * batch["tokens"].shape[1] * (cfg.model.obs_tokens + 1))

        if step % cfg.log_every == 0 or step == end:
            vals = torch.stack([terms.total.detach().float(), gnorm.float()])
            vals = all_reduce_mean(vals, info).tolist()
            row = {"step": step, "stage": stage, "train/loss": vals[0], "train/grad_norm": vals[1]}
            row |= {k: float(v) for k, v in terms.to_dict().items()}
            with torch.no_grad(), autocast_ctx(device, cfg.precision):
                acc = world_accuracy(model, batch)
            row["train/token_acc"] = float(acc["tok_correct"]) / max(float(acc["tok_total"]), 1.0)
            row["train/reward_acc"] = float(acc["rew_correct"]) / max(float(acc["steps"]), 1.0)
            row["train/end_acc"] = float(acc["end_correct"]) / max(float(acc["steps"]), 1.0)
            dt = time.perf_counter() - t_last
            row["perf/tokens_per_s"] = tokens_since * info.world_size / max(dt, 1e-9)
            t_last, tokens_since = time.perf_counter(), 0
            if eval_stream is not None and ((cfg.eval_every and step % cfg.eval_every == 0) or step == end):
                row |= heldout_eval(model, eval_stream, cfg.data.eval_batches, device, cfg.precision)
            metrics.log(row)
            progress.update(step, stage, row, ("train/loss_obs", "train/loss_td", "train/loss_cql"))
            summary = row
            if on_step is not None:
                on_step(step, row)
        if (cfg.image_every and step % cfg.image_every == 0) or step == end:
            if info.is_main:
                images(step)
        if step % cfg.ckpt_every == 0 or step == end:
            save(step)
    progress.close()
    metrics.close()
    return {"step": step, "run": str(run.root), "last": summary,
            "checkpoint": str(run.ckpt_path(step)) if info.is_main else None}
