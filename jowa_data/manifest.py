"""Game manifests: one TOML file per game under `manifests/`, validated against a strict schema.

Adding a game means writing one file. A manifest holds everything game-specific that the rest of
jowa needs: the ALE ROM, the split, a stable task id (one game -> task map everywhere, never a
proxy game), the minimal action set by ALE name, reference scores with their sources, planning
settings (paper Table 17) and the data selection used to subsample DQN-Replay (paper sec. 5.1).
"""

from __future__ import annotations

import dataclasses
import difflib
import tomllib
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from jowa_common import actions as A
from jowa_common.errors import ManifestError

SPLITS = ("pretrain", "finetune", "other")


def default_manifest_dir() -> Path:
    """The `manifests/` folder that ships with jowa (repository root)."""
    return Path(__file__).resolve().parents[1] / "manifests"


@dataclass(frozen=True)
class ReferenceScores:
    """Raw-score references used for normalisation (HNS/DNS). `source` says where each number comes from."""

    random: float
    human: float
    dqn: float
    source: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class PlanningSettings:
    """Beam-search settings used at evaluation (paper Table 17: H=2 everywhere, K by action count)."""

    horizon: int = 2
    beam_width: int = 2
    history: int = 8  # context length in steps given to the model when acting


@dataclass(frozen=True)
class DataSelection:
    """Which part of DQN-Replay to draw from (paper sec. 5.1: 2 of 5 runs, 10% of transitions)."""

    runs: tuple[int, ...] = (1, 2, 3, 4, 5)  # candidate runs
    num_runs: int = 2  # how many of `runs` to draw (seeded)
    checkpoints: tuple[int, int] = (1, 50)  # inclusive range of checkpoint suffixes
    fraction: float = 0.1  # target fraction of the selected transitions
    transitions: int = 0  # if > 0: target number of transitions instead of `fraction` (fine-tuning: 5k)
    seed: int = 0


@dataclass(frozen=True)
class GameManifest:
    name: str  # CamelCase game name, as in the DQN-Replay bucket (e.g. "MsPacman")
    ale_rom: str  # ale-py ROM id (e.g. "ms_pacman")
    split: str  # pretrain | finetune | other
    task_id: int  # stable integer id: the index of the task embedding
    actions: tuple[str, ...]  # minimal action set by ALE name, in ALE's minimal-set order
    scores: ReferenceScores
    planning: PlanningSettings = PlanningSettings()
    data: DataSelection = DataSelection()
    path: Path | None = None  # file it was loaded from

    @cached_property
    def full_action_ids(self) -> np.ndarray:
        """(n_minimal,) int64: minimal-set index -> full 18-action id."""
        return A.action_ids(self.actions)

    @cached_property
    def action_mask(self) -> np.ndarray:
        """(18,) bool: valid full actions for this game."""
        return A.action_mask(self.actions)

    @property
    def num_actions(self) -> int:
        return len(self.actions)


# --- schema -------------------------------------------------------------------------------------

_TOP_KEYS = {"name": str, "ale_rom": str, "split": str, "task_id": int, "actions": list,
             "scores": dict, "planning": dict, "data": dict}
_REQUIRED = ("name", "ale_rom", "split", "task_id", "actions", "scores")
_SCORE_KEYS = {"random": float, "human": float, "dqn": float, "source": dict}
_PLAN_KEYS = {"horizon": int, "beam_width": int, "history": int}
_DATA_KEYS = {"runs": list, "num_runs": int, "checkpoints": list, "fraction": float, "transitions": int,
              "seed": int}


def _err(path: Path | str, key: str, msg: str) -> ManifestError:
    return ManifestError(f"{path}: key '{key}': {msg}")


def _check_keys(path, section: str, d: dict, schema: dict[str, type]) -> None:
    for k, v in d.items():
        full = f"{section}.{k}" if section else k
        if k not in schema:
            close = difflib.get_close_matches(k, schema.keys(), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise _err(path, full, f"unknown key{hint}; allowed: {sorted(schema)}")
        want = schema[k]
        ok = isinstance(v, want) and not (want is int and isinstance(v, bool))
        if want is float:
            ok = isinstance(v, (int, float)) and not isinstance(v, bool)
        if not ok:
            raise _err(path, full, f"expected {want.__name__}, got {type(v).__name__} ({v!r})")


def parse_manifest(raw: dict[str, Any], path: Path | str = "<manifest>") -> GameManifest:
    """Validate a parsed TOML dict and build a `GameManifest`. Errors name the file and the key."""
    _check_keys(path, "", raw, _TOP_KEYS)
    for k in _REQUIRED:
        if k not in raw:
            raise _err(path, k, "missing required key")
    if raw["split"] not in SPLITS:
        raise _err(path, "split", f"must be one of {SPLITS}, got {raw['split']!r}")
    if raw["task_id"] < 0:
        raise _err(path, "task_id", f"must be >= 0, got {raw['task_id']}")
    names = raw["actions"]
    if not names or not all(isinstance(n, str) for n in names):
        raise _err(path, "actions", "must be a non-empty list of ALE action names")
    for n in names:
        if n not in A.ACTION_ID:
            close = difflib.get_close_matches(n, A.FULL_ACTIONS, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise _err(path, "actions", f"'{n}' is not an ALE action{hint}")
    if len(set(names)) != len(names):
        raise _err(path, "actions", "duplicate action names")

    sc = raw["scores"]
    _check_keys(path, "scores", sc, _SCORE_KEYS)
    for k in ("random", "human", "dqn"):
        if k not in sc:
            raise _err(path, f"scores.{k}", "missing required key")
    src = sc.get("source", {})
    for k, v in src.items():
        if k not in ("random", "human", "dqn") or not isinstance(v, str):
            raise _err(path, f"scores.source.{k}", "must map random|human|dqn to a source string")
    scores = ReferenceScores(float(sc["random"]), float(sc["human"]), float(sc["dqn"]), dict(src))

    pl = raw.get("planning", {})
    _check_keys(path, "planning", pl, _PLAN_KEYS)
    planning = PlanningSettings(**pl)
    if planning.horizon < 0 or planning.beam_width < 1 or not 1 <= planning.history <= 8:
        raise _err(path, "planning", "need horizon >= 0, beam_width >= 1, 1 <= history <= 8")

    da = dict(raw.get("data", {}))
    _check_keys(path, "data", da, _DATA_KEYS)
    if "runs" in da:
        if not da["runs"] or not all(isinstance(r, int) and r >= 1 for r in da["runs"]):
            raise _err(path, "data.runs", "must be a non-empty list of run numbers >= 1")
        da["runs"] = tuple(da["runs"])
    if "checkpoints" in da:
        c = da["checkpoints"]
        if len(c) != 2 or not all(isinstance(x, int) for x in c) or c[0] > c[1] or c[0] < 0:
            raise _err(path, "data.checkpoints", "must be [first, last] with 0 <= first <= last")
        da["checkpoints"] = (c[0], c[1])
    data = DataSelection(**da)
    if not 0.0 < data.fraction <= 1.0:
        raise _err(path, "data.fraction", f"must be in (0, 1], got {data.fraction}")
    if data.transitions < 0:
        raise _err(path, "data.transitions", f"must be >= 0, got {data.transitions}")
    if data.num_runs < 1 or data.num_runs > len(data.runs):
        raise _err(path, "data.num_runs", f"must be in [1, {len(data.runs)}], got {data.num_runs}")

    return GameManifest(name=raw["name"], ale_rom=raw["ale_rom"], split=raw["split"],
                        task_id=raw["task_id"], actions=tuple(names), scores=scores,
                        planning=planning, data=data, path=Path(path) if path else None)


def load_manifest(path: str | Path) -> GameManifest:
    """Load and validate one manifest file."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"{path}: manifest file not found")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise ManifestError(f"{path}: invalid TOML: {e}") from e
    m = parse_manifest(raw, path)
    if path.stem != m.name:
        raise _err(path, "name", f"'{m.name}' must equal the file name '{path.stem}'")
    return m


class ManifestRegistry:
    """All manifests of one or more folders, checked together (unique names and task ids)."""

    def __init__(self, manifests: Iterable[GameManifest]):
        self._by_name: dict[str, GameManifest] = {}
        by_task: dict[int, GameManifest] = {}
        for m in manifests:
            if m.name in self._by_name:
                raise _err(m.path, "name", f"game '{m.name}' is also defined in {self._by_name[m.name].path}")
            if m.task_id in by_task:
                raise _err(m.path, "task_id",
                           f"duplicate task id {m.task_id} (also used by {by_task[m.task_id].path})")
            self._by_name[m.name] = m
            by_task[m.task_id] = m

    def __iter__(self):
        return iter(sorted(self._by_name.values(), key=lambda m: m.name))

    def __len__(self) -> int:
        return len(self._by_name)

    def __contains__(self, name: str) -> bool:
        return name in self._by_name

    @property
    def names(self) -> list[str]:
        return sorted(self._by_name)

    def get(self, name: str) -> GameManifest:
        """The manifest of `name` (case-insensitive match accepted); clear error if unknown."""
        if name in self._by_name:
            return self._by_name[name]
        lower = {k.lower(): v for k, v in self._by_name.items()}
        if name.lower() in lower:
            return lower[name.lower()]
        close = difflib.get_close_matches(name, self.names, n=3)
        hint = f"; did you mean {close}?" if close else ""
        raise ManifestError(f"unknown game '{name}': no manifest defines it{hint} "
                            f"(known: {len(self)} games; add manifests/{name}.toml to define it)")

    def by_task_id(self, task_id: int) -> GameManifest:
        for m in self._by_name.values():
            if m.task_id == task_id:
                return m
        raise ManifestError(f"no manifest has task id {task_id}")

    def split(self, split: str) -> list[GameManifest]:
        return [m for m in self if m.split == split]

    def resolve(self, games_or_paths: Sequence[str]) -> list[GameManifest]:
        """Resolve CLI arguments: game names, manifest file paths, or split names ('pretrain')."""
        out: list[GameManifest] = []
        for g in games_or_paths:
            if g.endswith(".toml") or Path(g).is_file():
                m = load_manifest(g)
                known = self._by_name.get(m.name)
                if known is not None and known.task_id != m.task_id:
                    raise _err(g, "task_id", f"{m.task_id} differs from {known.path} ({known.task_id})")
                out.append(m)
            elif g in SPLITS:
                out.extend(self.split(g))
            else:
                out.append(self.get(g))
        return out


def load_manifests(dirs: str | Path | Sequence[str | Path] | None = None) -> ManifestRegistry:
    """Load every `*.toml` in the given folders (default: the shipped `manifests/`)."""
    if dirs is None:
        dirs = [default_manifest_dir()]
    elif isinstance(dirs, (str, Path)):
        dirs = [dirs]
    manifests = []
    for d in dirs:
        d = Path(d)
        if not d.is_dir():
            raise ManifestError(f"{d}: manifest folder not found")
        manifests.extend(load_manifest(p) for p in sorted(d.glob("*.toml")))
    return ManifestRegistry(manifests)


def manifest_to_dict(m: GameManifest) -> dict[str, Any]:
    """JSON-friendly dict (for `jowa-data manifests --json` and dataset provenance)."""
    d = dataclasses.asdict(m)
    d["path"] = str(m.path) if m.path else None
    d["full_action_ids"] = m.full_action_ids.tolist()
    return d


def action_mask_table(registry: ManifestRegistry, num_tasks: int) -> np.ndarray:
    """(num_tasks, 18) bool valid-action table from the game manifests (a model's per-task action masks); tasks
    without a manifest allow all 18 actions."""
    masks = np.ones((num_tasks, len(A.FULL_ACTIONS)), dtype=bool)
    for m in registry:
        if m.task_id >= num_tasks:
            raise ManifestError(f"{m.path}: task_id {m.task_id} >= model.num_tasks {num_tasks}")
        masks[m.task_id] = m.action_mask
    return masks
