"""`jowa-data validate ROOT` on a DQN-Replay root: every problem, each with the file that holds it.

Replay roots are passed between people as much as built datasets are. This reads every file of every run once:
the six files of each checkpoint are present; each gzip decodes to a `.npy` of the dtype and shape Dopamine
writes (`np.uint8 (N, 84, 84)` observations, `int32` actions, `float32` rewards, `uint8` terminals, `int64`
add_count and invalid_range; the `.npy` header is parsed by us, never unpickled); add_count and invalid_range
agree (Dopamine's `OutOfGraphReplayBuffer` writes `invalid_range = [(cursor - 1 + i) % cap for i in range(5)]`,
dopamine/replay_memory/circular_replay_buffer.py); valid actions lie in the game's minimal action set (its
manifest); consecutive checkpoints continue each other and episodes stitch (`replay.inspect_run`). Unlike the
reader, which stops at the first problem, it goes on and reports all of them.
"""

from __future__ import annotations

import os
from typing import Callable

import numpy as np

from jowa_common.errors import JowaError, ManifestError
from jowa_data.npy_stream import check_end, check_header, iter_chunks, read_header, resolve_decoder
from jowa_data.replay import (FRAME_SHAPE, REQUIRED_KINDS, checkpoint_files, file_name, inspect_run, list_games,
                              list_runs, load_checkpoint, run_logs)


def is_replay_root(path: str | os.PathLike) -> bool:
    """True if `path` holds `<Game>/<run>/replay_logs` folders."""
    try:
        return any(list_runs(path, g) for g in list_games(path))
    except (JowaError, OSError):
        return False


def _check_observations(logs, ckpt: int, cap: int, decoder: str) -> str | None:
    """Decode a whole observation file (gzip CRC included) without keeping it: 84x84 uint8 rows, `cap` of them."""
    name = file_name("observation", ckpt)
    where = str(logs.child(name))
    try:
        with logs.open_gz(name, decoder) as f:
            h = read_header(f, where)
            check_header(h, where, np.uint8, FRAME_SHAPE)
            if h.rows != cap:
                return f"{where}: {h.rows} rows, but the other files of checkpoint {ckpt} have {cap}"
            for _ in iter_chunks(f, h, h.rows, h.rows, where, chunk_rows=4096):
                pass
            check_end(f, where)
    except JowaError as e:
        return str(e)
    except OSError as e:
        return f"{where}: cannot read ({e.strerror or e})"
    return None


def validate_replay_root(root: str | os.PathLike, registry=None, observations: bool = True,
                         decoder: str = "auto", progress: Callable[[str], None] | None = None) -> list[str]:
    """Every problem found under a DQN-Replay root ([] = valid). `registry`: game manifests (default: the
    built-in ones) for the action sets; `observations=False` skips decoding the large observation files."""
    from jowa_data.manifest import load_manifests

    decoder = resolve_decoder(decoder)
    registry = registry or load_manifests(None)
    problems: list[str] = []
    games = list_games(root)
    if not games:
        return [f"{root}: no game folders (<root>/<Game>/<run>/replay_logs)"]
    for game in games:
        runs = list_runs(root, game)
        if not runs:
            problems.append(f"{run_logs(root, game, '*')}: no run folders with replay_logs")
            continue
        try:
            n_actions = registry.get(game).num_actions
        except ManifestError:
            n_actions = None
            problems.append(f"{root}/{game}: no manifest for game {game!r}; its action ids were not checked "
                            "(`jowa-data manifests` lists the known games)")
        for run in runs:
            logs = run_logs(root, game, run)
            listing = checkpoint_files(logs)
            if not listing:
                problems.append(f"{logs}: no DQN-Replay checkpoint files (*_ckpt.N.gz)")
                continue
            intact = True
            for ckpt in sorted(listing):
                if progress:
                    progress(f"{game}/{run} checkpoint {ckpt}")
                missing = [file_name(k, ckpt) for k in (*REQUIRED_KINDS, "invalid_range") if k not in listing[ckpt]]
                if missing:
                    problems.append(f"{logs}: checkpoint {ckpt} is missing {', '.join(missing)}")
                    intact = False
                    continue
                try:
                    info, valid = load_checkpoint(logs, ckpt, listing[ckpt], decoder)
                except JowaError as e:
                    problems.append(str(e))
                    intact = False
                    continue
                actions = valid["action"]
                if n_actions is not None and actions.size and (actions.min() < 0 or actions.max() >= n_actions):
                    bad = actions[(actions < 0) | (actions >= n_actions)]
                    problems.append(f"{logs.child(file_name('action', ckpt))}: {bad.size} action ids outside "
                                    f"{game}'s {n_actions} actions (e.g. {int(bad[0])})")
                    intact = False
                if observations:
                    p = _check_observations(logs, ckpt, info.capacity, decoder)
                    if p:
                        problems.append(p)
                        intact = False
            if intact:  # stitching needs every file readable; it reports gaps between checkpoints
                try:
                    inspect_run(root, game, run, decoder=decoder)
                except JowaError as e:
                    problems.append(str(e))
    return problems
