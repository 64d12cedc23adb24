"""`jowa-data validate DIR`: check a built dataset and report every problem found, not only the first.

Checks: info.json version; files.json against info.json; every data file's size and sha256; files on
disk that no task wrote; each task decodes in each format with the right dtypes and shapes; tokens
< vocab, actions valid for the game, rewards in [-1, 1], terminals 0/1; zarr and wds hold equal data;
episodes tile each game's rows exactly, terminals sit only on the last step of complete episodes.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from jowa_common.errors import JowaError
from jowa_common.io import sha256_bytes
from jowa_data.integrity import check_file
from jowa_data.layout import EPISODES, FILES, INFO, STATS, read_info


def validate_dataset(dataset_dir: str | Path, checksums: bool = True) -> list[str]:
    """All problems found, each naming the file; [] = valid. Raises only if info.json itself is unusable."""
    from jowa_common.actions import action_mask
    from jowa_data.backends import get_backend

    d = Path(dataset_dir)
    info = read_info(d)
    problems: list[str] = []
    files: dict = {}
    fp = d / FILES
    try:
        raw = fp.read_bytes()
        if sha256_bytes(raw) != info.files_checksum:
            problems.append(f"{fp}: checksum differs from info.json (files.json was modified)")
        files = json.loads(raw)
    except (OSError, json.JSONDecodeError) as e:
        problems.append(f"{fp}: unreadable ({e})")
    if not (d / STATS).is_file():
        problems.append(f"{d / STATS}: missing")
    for rel, meta in files.items():  # the check every reader makes (jowa_data.integrity), here for all files
        if problem := check_file(d, rel, meta, "full" if checksums else "size"):
            problems.append(problem)
    for fmt in info.formats:
        for p in sorted((d / fmt).rglob("*")):
            rel = str(p.relative_to(d))
            if p.is_file() and rel not in files and p.name != "zarr.json":  # group metadata is not per task
                problems.append(f"{p}: not written by any build task (stray file)")

    try:
        import pyarrow.parquet as pq

        ep = pq.read_table(d / EPISODES, columns=["game", "offset", "length", "complete"]).to_pydict()
    except Exception as e:
        problems.append(f"{d / EPISODES}: unreadable ({type(e).__name__}: {e})")
        return problems

    selection = info.source.get("selection", {})
    for g in info.game_names:
        gi = info.games[g]
        sel = np.array(ep["game"], dtype=object) == g
        offs = np.array(ep["offset"], dtype=np.int64)[sel]
        lens = np.array(ep["length"], dtype=np.int64)[sel]
        comp = np.array(ep["complete"], dtype=bool)[sel]
        if len(offs) != gi["episodes"]:
            problems.append(f"{d / EPISODES}: {g} has {len(offs)} episodes, info.json says {gi['episodes']}")
        expect_offs = np.concatenate([[0], np.cumsum(lens)[:-1]]) if len(lens) else lens
        if not np.array_equal(offs, expect_offs) or int(lens.sum()) != gi["transitions"]:
            problems.append(f"{d / EPISODES}: {g} episodes do not tile its {gi['transitions']} rows "
                            "(offsets/lengths inconsistent)")
        names = selection.get(g, {}).get("actions")
        mask = action_mask(names) if names else np.ones(18, dtype=bool)
        per_fmt = {}
        for fmt in info.formats:
            be = get_backend(fmt)
            parts, ok = [], True
            for key in gi["tasks"]:
                try:
                    parts.append(be.read_task(d, g, key))
                except JowaError as e:
                    problems.append(str(e))
                    ok = False
                except Exception as e:  # any decoder failure is a problem to report, not a crash
                    problems.append(f"{d / fmt / g}: task {key}: cannot decode ({type(e).__name__}: {e})")
                    ok = False
            if not ok:
                continue
            cat = {f: np.concatenate([getattr(a, f) for a in parts]) for f in ("tokens", "actions", "rewards",
                                                                               "terminals")}
            where = d / fmt / g
            n = len(cat["tokens"])
            if n != gi["transitions"]:
                problems.append(f"{where}: {n} rows, info.json says {gi['transitions']}")
                continue
            if n and int(cat["tokens"].max()) >= info.vocab_size:
                bad = np.argwhere(cat["tokens"] >= info.vocab_size)[:3].tolist()
                problems.append(f"{where}: token ids >= vocab {info.vocab_size} "
                                f"({int((cat['tokens'] >= info.vocab_size).sum())} of them, first at [row, pos] {bad})")
            if n and ((cat["actions"] >= 18).any() or not mask[np.minimum(cat["actions"], 17)].all()):
                problems.append(f"{where}: actions outside the game's action set")
            if n and (np.abs(cat["rewards"]) > 1).any():
                problems.append(f"{where}: rewards outside [-1, 1] (not clipped)")
            if n and (cat["terminals"] > 1).any():
                problems.append(f"{where}: terminals other than 0/1")
            if n == int(lens.sum()) and n:
                last = offs + lens - 1
                t = cat["terminals"].astype(bool)
                if not np.array_equal(t[last], comp):
                    problems.append(f"{where}: terminal flags on episodes' last steps disagree with "
                                    f"{EPISODES} 'complete'")
                inner = t.copy()
                inner[last] = False
                if inner.any():
                    problems.append(f"{where}: {int(inner.sum())} terminal flags inside episodes "
                                    "(episode boundaries inconsistent)")
            per_fmt[fmt] = cat
        if len(per_fmt) == 2:
            a, b = per_fmt.values()
            diff = [f for f in a if not np.array_equal(a[f], b[f])]
            if diff:
                problems.append(f"{d}: {g}: zarr and wds data differ in {diff}")
    return problems


__all__ = ["validate_dataset", "INFO"]
