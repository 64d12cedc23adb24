"""World-action checkpoints: weights + the resolved model config + format version, loaded weights-only.

A checkpoint written by `pipelines.pretrain` / `pipelines.finetune` holds more (optimizer, RNG, stream
position); `load_world_action` reads only what evaluation, planning and fine-tuning need.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


from jowa_common.config import config_from_dict, config_to_dict
from jowa_common.errors import CheckpointError
from jowa_common.io import atomic_torch_save, safe_torch_load
from jowa_model import cpu_kernels as kernels
from jowa_model.world_action import WorldActionConfig, WorldActionModel

FORMAT = "jowa-world-action-v1"


def model_state(model: WorldActionModel) -> dict[str, Any]:
    """The part of a checkpoint that describes the model (config as a plain dict, weights)."""
    return {"format": FORMAT, "model_config": config_to_dict(model.cfg), "model": model.state_dict()}


def save_world_action(model: WorldActionModel, path: str | Path, **extra: Any) -> None:
    """Atomic save of the model (and any extra plain/tensor entries)."""
    atomic_torch_save(model_state(model) | extra, path)


def load_world_action(path: str | Path, device: str = "cpu",
                      cpu_kernels: bool = True) -> tuple[WorldActionModel, dict[str, Any]]:
    """(model in eval mode, the whole checkpoint dict). Errors name the file. `cpu_kernels`: switch on the CPU
    fast paths of jowa_model/cpu_kernels.py (they take the plain path on other devices)."""
    ckpt = safe_torch_load(path, map_location=device)
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a jowa world-action checkpoint (format {ckpt.get('format') if isinstance(ckpt, dict) else type(ckpt).__name__!r}, expected {FORMAT!r})")
    cfg = config_from_dict(WorldActionConfig, ckpt["model_config"])
    model = WorldActionModel(cfg)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise CheckpointError(f"{path}: weights do not match the stored config: {e}") from e
    if cpu_kernels:
        kernels.apply(model)
    return model.to(device).eval(), ckpt
