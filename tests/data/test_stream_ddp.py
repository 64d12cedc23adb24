"""SegmentStream under 2 real torch.distributed processes (gloo): equal, disjoint, covering."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from jowa_data.build import write_dataset
from jowa_data.manifest import load_manifests
from tests.data.test_stream import GAMES, episodes

pytestmark = pytest.mark.multiproc


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, dataset: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from jowa_data.stream import SegmentStream

        s = SegmentStream(dataset, batch_size=4, seed=7, weights="proportional")  # rank/world from dist
        ids, steps = [], 0
        for b in s:
            ids.extend(b["segment_ids"].tolist())
            steps += 1
            dist.all_reduce(torch.ones(1))  # a collective per step: uneven counts would hang here
        gathered = [None] * world
        dist.all_gather_object(gathered, {"rank": s.rank, "world": s.world_size, "steps": steps, "ids": ids,
                                          "len": len(s), "num_segments": s.num_segments})
        if rank == 0:
            Path(out).write_text(json.dumps(gathered))
    finally:
        dist.destroy_process_group()


def test_two_ranks_get_equal_disjoint_batches_covering_the_epoch(tmp_path):
    reg = load_manifests()
    d = tmp_path / "ds"
    eps = episodes()
    eps["Assault"] = eps["Assault"][:1]  # uneven games: the split must still be equal
    write_dataset(d, [reg.get(g) for g in GAMES], eps, formats=("zarr",), task_transitions=50)
    from jowa_data.stream import build_cache

    build_cache(d, "zarr")  # node-shared cache, made once before the ranks start
    out = tmp_path / "result.json"
    mp.spawn(_worker, args=(2, _free_port(), str(d), str(out)), nprocs=2, join=True)
    res = json.loads(out.read_text())
    assert [r["rank"] for r in res] == [0, 1] and all(r["world"] == 2 for r in res)
    n = res[0]["len"]
    assert n > 0 and all(r["steps"] == n for r in res)
    a, b = set(res[0]["ids"]), set(res[1]["ids"])
    assert len(a) == len(res[0]["ids"]) and not a & b
    from jowa_data.stream import SegmentStream, epoch_order

    s = SegmentStream(d, batch_size=4, seed=7, rank=0, world_size=2, weights="proportional")
    assert a | b == set(epoch_order(s.seg_game, s.weights, 7, 0)[:n * 2 * 4].tolist())
    assert n == res[0]["num_segments"] // 8
