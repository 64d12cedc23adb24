"""SegmentStream: exact segment contents, right padding, determinism, resume, rank split, weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from jowa_data.build import EpisodeArrays, write_dataset
from jowa_common.errors import ConfigError
from jowa_data.manifest import load_manifests
from jowa_data.stream import SegmentStream, epoch_order, segment_index

GAMES = {"Pong": (39, 6, [0, 1, 3, 4, 11, 12]), "Assault": (3, 7, None)}


def episodes(seed: int = 0) -> dict[str, list[EpisodeArrays]]:
    """Episodes whose token values identify (game, episode, step): checkable after any gather."""
    rng = np.random.default_rng(seed)
    out = {}
    for gi, (g, (_, n_act, _)) in enumerate(GAMES.items()):
        out[g] = []
        for e in range(8 if g == "Pong" else 3):
            T = int(rng.integers(3, 60))
            tok = (gi * 1000 + e * 60 + np.arange(T)[:, None] + np.arange(36)[None, :] * 0).astype(np.uint16) + 1
            term = np.zeros(T, np.uint8)
            term[-1] = e % 4 != 3  # some episodes are cut (no terminal)
            out[g].append(EpisodeArrays(tok, rng.integers(0, n_act, T), rng.integers(-1, 2, T).astype(np.float32), term))
    return out


@pytest.fixture(scope="module")
def ds(tmp_path_factory) -> tuple[Path, dict]:
    reg = load_manifests()
    eps = episodes()
    d = tmp_path_factory.mktemp("stream") / "ds"
    write_dataset(d, [reg.get(g) for g in GAMES], eps, formats=("zarr", "wds"), task_transitions=100)
    return d, eps


def test_segment_index_exact():
    starts, valid, game = segment_index(np.array([0, 5]), np.array([5, 10]), np.array([0, 1]), seq_len=8, stride=4)
    assert starts.tolist() == [0, 4, 5, 9, 13]
    assert valid.tolist() == [5, 1, 8, 6, 2]
    assert game.tolist() == [0, 0, 1, 1, 1]
    starts, valid, _ = segment_index(np.array([0]), np.array([3]), np.array([0]), seq_len=8, stride=1)
    assert starts.tolist() == [0, 1, 2] and valid.tolist() == [3, 2, 1]


def test_batches_match_source_episodes_with_right_padding(ds):
    d, eps = ds
    s = SegmentStream(d, batch_size=16, seq_len=8, stride=4, seed=1, rank=0, world_size=1)
    assert len(s) == s.num_segments // 16 > 0
    games = sorted(GAMES)
    # Global row -> (game, episode, step): rebuild from the episode table the stream itself uses.
    c = s.cache
    seen = 0
    for b in s:
        assert b["tokens"].shape == (16, 8, 36) and b["tokens"].dtype == torch.long
        for i, sid in enumerate(b["segment_ids"].tolist()):
            start = int(s.seg_start[sid])
            ep = int(np.searchsorted(c.ep_start, start, side="right") - 1)
            g = games[int(c.ep_game[ep])]
            e_in_game = ep - int(np.flatnonzero(c.ep_game == c.ep_game[ep])[0])
            src = eps[g][e_in_game]
            k = start - int(c.ep_start[ep])
            assert k % 4 == 0  # starts every tau steps within the episode
            n = min(8, len(src.actions) - k)
            m = b["mask_padding"][i]
            assert m.tolist() == [True] * n + [False] * (8 - n)
            assert torch.equal(b["tokens"][i, :n], torch.from_numpy(src.tokens[k:k + n].astype(np.int64)))
            assert (b["tokens"][i, n:] == 0).all() and (b["actions"][i, n:] == 0).all()
            task_id, _, full = GAMES[g]
            assert int(b["task_ids"][i]) == task_id
            if full is not None:
                assert b["actions"][i, :n].tolist() == [full[a] for a in src.actions[k:k + n]]
            assert b["rewards"][i, :n].tolist() == src.rewards[k:k + n].tolist()
            assert b["ends"][i, :n].tolist() == src.terminals[k:k + n].tolist()
            assert int(b["ends"][i].sum()) <= 1
            seen += 1
    assert seen == len(s) * 16


def test_zarr_and_wds_streams_are_identical(ds):
    d, _ = ds
    a = SegmentStream(d, batch_size=8, seed=5, rank=0, world_size=1, backend="zarr")
    b = SegmentStream(d, batch_size=8, seed=5, rank=0, world_size=1, backend="wds")
    for x, y in zip(a, b):
        assert all(torch.equal(x[k], y[k]) for k in x)


def test_deterministic_per_seed_and_epoch(ds):
    d, _ = ds
    ids = lambda s: [b["segment_ids"].tolist() for b in s]  # noqa: E731
    a, b = SegmentStream(d, batch_size=8, seed=2, world_size=1, rank=0), SegmentStream(d, batch_size=8, seed=2,
                                                                                      world_size=1, rank=0)
    e0a, e0b = ids(a), ids(b)
    assert e0a == e0b
    assert a.epoch == 1 and ids(a) != e0a  # next epoch: another order
    c = SegmentStream(d, batch_size=8, seed=3, world_size=1, rank=0)
    assert ids(c) != e0a


def test_resume_mid_epoch_gives_the_same_rest(ds):
    d, _ = ds
    full = [b["segment_ids"].tolist() for b in SegmentStream(d, batch_size=4, seed=9, rank=1, world_size=2)]
    s = SegmentStream(d, batch_size=4, seed=9, rank=1, world_size=2)
    it = iter(s)
    head = [next(it)["segment_ids"].tolist() for _ in range(3)]
    state = s.state_dict()
    assert state["epoch"] == 0 and state["batch"] == 3
    r = SegmentStream(d, batch_size=4, seed=9, rank=1, world_size=2)
    r.load_state_dict(state)
    assert head + [b["segment_ids"].tolist() for b in r] == full
    with pytest.raises(ConfigError, match="batch_size"):
        SegmentStream(d, batch_size=8, seed=9, rank=1, world_size=2).load_state_dict(state)


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_equal_disjoint_and_cover_the_epoch(ds, world):
    d, _ = ds
    per_rank = []
    for r in range(world):
        s = SegmentStream(d, batch_size=4, seed=0, rank=r, world_size=world, weights="proportional")
        per_rank.append([b["segment_ids"].tolist() for b in s])
    n = len(per_rank[0])
    assert all(len(p) == n for p in per_rank) and n == s.num_segments // (world * 4)
    flat = [i for p in per_rank for b in p for i in b]
    assert len(flat) == len(set(flat))  # disjoint
    order = epoch_order(s.seg_game, s.weights, 0, 0)
    assert sorted(order.tolist()) == list(range(s.num_segments))  # proportional = a permutation of all
    assert set(flat) == set(order[:n * world * 4].tolist())  # together they cover the epoch's batches


def test_game_weights(ds):
    d, _ = ds
    s = SegmentStream(d, batch_size=1, seed=0, rank=0, world_size=1)  # uniform over games
    order = epoch_order(s.seg_game, s.weights, 0, 0)
    share = np.bincount(s.seg_game[order], minlength=2) / len(order)
    assert np.allclose(share, 0.5, atol=1.0 / len(order))
    s = SegmentStream(d, batch_size=1, seed=0, rank=0, world_size=1, weights={"Pong": 1.0})
    assert set(s.seg_game[epoch_order(s.seg_game, s.weights, 0, 0)].tolist()) == {s.cache.games.index("Pong")}
    with pytest.raises(ConfigError, match="Breakout"):
        SegmentStream(d, batch_size=1, rank=0, world_size=1, weights={"Breakout": 1.0})


def test_dataloader_workers_give_the_same_batches_in_order(ds):
    d, _ = ds
    s = SegmentStream(d, batch_size=4, seed=4, rank=0, world_size=1)
    ref = [b["segment_ids"].tolist() for b in SegmentStream(d, batch_size=4, seed=4, rank=0, world_size=1)]
    dl = torch.utils.data.DataLoader(s, batch_size=None, num_workers=2)
    got = [b["segment_ids"].tolist() for b in dl]
    assert got == ref


def test_missing_backend_is_a_clear_error(tmp_path):
    from jowa_common.errors import DatasetError

    reg = load_manifests()
    d = tmp_path / "ds"
    write_dataset(d, [reg.get("Pong")], {"Pong": episodes()["Pong"][:2]}, formats=("zarr",))
    with pytest.raises(DatasetError, match="no 'wds' data"):
        SegmentStream(d, backend="wds", rank=0, world_size=1)


def test_cache_outside_an_unwritable_dataset(tmp_path):
    """A dataset whose folder cannot be written: the default cache location is refused in one line saying what to
    set, and `cache_location(..., cache_root)` puts the cache elsewhere with the dataset left as it was. (Tests may
    run as root, whom chmod does not stop: a file where the `_cache` folder would go stands in for the mount.)"""
    from jowa_common.errors import DatasetError
    from jowa_data.stream import cache_location, load_cache

    reg = load_manifests()
    d = tmp_path / "ds"
    write_dataset(d, [reg.get("Pong")], {"Pong": episodes()["Pong"][:2]}, formats=("zarr",))
    (d / "_cache").write_text("in the way")
    before = {p: p.stat().st_mtime_ns for p in d.rglob("*")}
    with pytest.raises(DatasetError, match=r"_cache/zarr-v2: cannot make the token cache there .*data\.cache_dir"):
        load_cache(d)
    cdir = cache_location(d, "zarr", tmp_path / "caches")
    assert cdir.parent.parent == tmp_path / "caches" and cdir.parent.name.startswith("ds-")
    assert cache_location(d, "zarr") == d / "_cache" / "zarr-v2"
    c = load_cache(d, "zarr", cdir)
    assert c.made and c.directory == cdir and (cdir / "meta.json").is_file()
    assert not load_cache(d, "zarr", cdir).made  # fresh: mapped, not decoded again
    s = SegmentStream(d, batch_size=2, rank=0, world_size=1, cache_dir=cdir)
    assert s.cache.num_transitions == sum(len(e.actions) for e in episodes()["Pong"][:2])
    assert {p: p.stat().st_mtime_ns for p in d.rglob("*")} == before
