"""What pretraining and fine-tuning share: optimizer, one optimizer step, RNG state, run folder, metrics, progress.

Both trainers compute their loss with `jowa_model.losses.compute_loss` and go through the pieces below, so a
fix to any of them (the optimizer groups, the clip, which RNG streams a checkpoint holds, how metrics reach
TensorBoard) reaches both. RNG state holds the CPU generator and, on CUDA, the device generator: dropout
masks on a GPU come from the latter, so an exact resume needs both.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch

from jowa_common.errors import ConfigError
from jowa_common.io import atomic_write_text
from jowa_model.world_action import WorldActionModel


@dataclass
class OptimConfig:
    lr_stage1: float = 1e-4  # world LR in stage 1 (Table 13)
    lr_stage2: float = 5e-5  # world LR in stage 2 (Table 13)
    critic_lr: float = 5e-5  # Q-head LR (stage 2)
    weight_decay: float = 0.01  # AdamW decay on Linear weights and the Q head
    grad_clip: float = 1.0  # global grad-norm clip


def set_stage(model: WorldActionModel, stage: int) -> None:
    """Stage 1 freezes the Q head (it gets no loss); stage 2 trains it."""
    model.head_q.requires_grad_(stage == 2)


def make_optimizer(model: WorldActionModel, stage: int, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW over the model's parameter groups (Table 13) with the stage's world LR and the critic LR."""
    lr = cfg.lr_stage1 if stage == 1 else cfg.lr_stage2
    return model.configure_optimizer(world_lr=lr, critic_lr=cfg.critic_lr, weight_decay=cfg.weight_decay)


def optimizer_step(total: torch.Tensor, opt: torch.optim.Optimizer, grad_clip: float) -> torch.Tensor:
    """Backward, clip the global grad norm, step. Returns the (pre-clip) grad norm tensor (no host sync)."""
    opt.zero_grad(set_to_none=True)
    total.backward()
    gnorm = torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], grad_clip)
    opt.step()
    return gnorm


def autocast_ctx(device: str, precision: str):
    use_bf16 = precision == "bf16" or (precision == "auto" and device.startswith("cuda"))
    dev_type = "cuda" if device.startswith("cuda") else "cpu"
    return torch.autocast(dev_type, dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext()


def endless(stream) -> Iterator[dict[str, torch.Tensor]]:
    """Batches of `stream` epoch after epoch (the stream advances its own epoch and position)."""
    while True:
        n = 0
        for batch in stream:
            n += 1
            yield batch
        if n == 0:
            raise ConfigError(f"{getattr(stream, 'dataset_dir', 'stream')}: an epoch yields no batch "
                              "(fewer segments than one batch): lower the batch size")


def random_batch(cfg, batch: int, steps: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """A training batch of random tokens, actions, rewards and tasks (CPU) for speed checks: row 0 ends at step 5
    and is padded after it, so every loss and mask of `compute_loss` is exercised. `cfg`: a WorldActionConfig."""
    b = dict(tokens=torch.randint(0, cfg.obs_vocab, (batch, steps, cfg.obs_tokens), generator=gen),
             actions=torch.randint(0, cfg.num_actions, (batch, steps), generator=gen),
             rewards=torch.randint(-1, 2, (batch, steps), generator=gen).float(),
             ends=torch.zeros(batch, steps, dtype=torch.long),
             mask_padding=torch.ones(batch, steps, dtype=torch.bool),
             task_ids=torch.randint(0, 15, (batch,), generator=gen))
    if steps > 5:
        b["ends"][0, 5] = 1
        b["mask_padding"][0, 6:] = False
    return b


def to_device(batch: dict[str, torch.Tensor], device: str) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def rng_state(device: str) -> dict[str, Any]:
    """This process's RNG streams: the CPU generator and, on CUDA, the current device's generator."""
    return {"cpu": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.startswith("cuda") else None}


def set_rng_state(state: dict[str, Any] | torch.Tensor, device: str) -> None:
    """Restore `rng_state` (also a bare CPU state tensor, as older checkpoints hold)."""
    if isinstance(state, torch.Tensor):
        torch.set_rng_state(state)
        return
    torch.set_rng_state(state["cpu"])
    if state.get("cuda") is not None and device.startswith("cuda"):
        torch.cuda.set_rng_state(state["cuda"], device)


class RunFiles:
    """The run folder: config.json, metrics.jsonl, tb/, ckpt/step_XXXXXXXX.pt, images/."""

    def __init__(self, out: str | Path):
        self.root = Path(out)
        self.ckpt_dir = self.root / "ckpt"
        self.metrics = self.root / "metrics.jsonl"
        self.images = self.root / "images"

    def checkpoints(self) -> list[Path]:
        return sorted(self.ckpt_dir.glob("step_*.pt"))

    def latest(self) -> Path | None:
        c = self.checkpoints()
        return c[-1] if c else None

    def ckpt_path(self, step: int) -> Path:
        return self.ckpt_dir / f"step_{step:08d}.pt"

    def prune(self, keep: int) -> None:
        for p in self.checkpoints()[:-keep] if keep > 0 else []:
            p.unlink(missing_ok=True)

    def truncate_metrics(self, step: int) -> None:
        """Drop rows after `step` (written by a run that was killed after its last checkpoint)."""
        if not self.metrics.exists():
            return
        keep = []
        for ln in self.metrics.read_text().splitlines():
            try:
                if ln.strip() and json.loads(ln)["step"] <= step:
                    keep.append(ln)
            except (json.JSONDecodeError, KeyError, TypeError):
                break  # a torn last line from the kill
        atomic_write_text(self.metrics, "".join(ln + "\n" for ln in keep))


class MetricsLog:
    """One metric row per call: appended to metrics.jsonl and, when tensorboard is installed, to tb/ as scalars
    (pretraining and fine-tuning log the same names: train/loss_*, train/q_data, perf/*)."""

    def __init__(self, run: RunFiles, purge_step: int | None = None, enabled: bool = True) -> None:
        self.run, self.enabled, self.tb = run, enabled, None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run.root / "tb"), purge_step=purge_step or None)
            except Exception:  # tensorboard missing: metrics.jsonl still has everything
                self.tb = None

    def log(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.run.metrics, "a") as f:
            f.write(json.dumps(row, sort_keys=True) + "\n")
        if self.tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, row["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


class Progress:
    """A progress line while training runs: stage, step / total, the latest losses, tokens/s and the ETA."""

    def __init__(self, total: int, start: int, desc: str, enabled: bool = True) -> None:
        self.bar = None
        self.t0, self.start = time.perf_counter(), start
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, desc=desc, unit="step", dynamic_ncols=True, mininterval=1.0)

    def update(self, step: int, stage: int | None = None, row: dict[str, Any] | None = None,
               keys: Iterable[str] = ()) -> None:
        if self.bar is None:
            return
        self.bar.update(step - self.bar.n)
        if row is not None:
            post = {} if stage is None else {"stage": stage}
            for k in keys:
                if isinstance(row.get(k), float):
                    post[k.rsplit("/", 1)[-1].removeprefix("loss_")] = f"{row[k]:.3g}"
            if "perf/tokens_per_s" in row:
                post["tok/s"] = f"{row['perf/tokens_per_s']:,.0f}"
            self.bar.set_postfix(post, refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
