"""`jowa-data build` on real recorded DQN-Replay files with a real (tiny) tokenizer."""

from __future__ import annotations

import json

import numpy as np
import torch
from click.testing import CliRunner

from jowa_data.cli import main
from tests.fixtures_data import build_args, tree_bytes
from jowa_data.layout import INFO, PLAN, read_info



def test_tokens_equal_direct_encode_of_recorded_frames(built, recorded_replay, tokenizer_ckpt):
    import pyarrow.parquet as pq

    from jowa_data.backends import get_backend
    from jowa_model.tokenizer import load_tokenizer

    rec = recorded_replay["Pong"]
    tok = load_tokenizer(tokenizer_ckpt)
    info = read_info(built)
    eps = pq.read_table(built / "episodes.parquet").to_pydict()
    assert info.total_episodes == len(eps["episode"]) >= 2 and info.total_transitions >= 300
    frames = np.concatenate([rec.frames[rec.episode_starts[e]:rec.episode_starts[e] + n]
                             for e, n in zip(eps["episode"], eps["length"])])
    assert all(rec.episode_lengths[e] == n for e, n in zip(eps["episode"], eps["length"]))
    want = tok.encode(frames)
    acts = np.concatenate([rec.actions[rec.episode_starts[e]:rec.episode_starts[e] + n]
                           for e, n in zip(eps["episode"], eps["length"])])
    full_ids = np.array([0, 1, 3, 4, 11, 12])  # Pong's minimal set NOOP FIRE RIGHT LEFT RIGHTFIRE LEFTFIRE
    for fmt in ("zarr", "wds"):
        be = get_backend(fmt)
        got = [be.read_task(built, "Pong", k) for k in info.games["Pong"]["tasks"]]
        tokens = np.concatenate([g.tokens for g in got])
        assert tokens.dtype == np.uint16 and tokens.shape == (len(frames), 36)
        np.testing.assert_array_equal(tokens, want)
        np.testing.assert_array_equal(np.concatenate([g.actions for g in got]), full_ids[acts])
        terms = np.concatenate([g.terminals for g in got])
        assert terms.sum() == len(eps["episode"])  # one terminal per (complete) episode, at its end
        np.testing.assert_array_equal(np.flatnonzero(terms), np.array(eps["offset"]) + np.array(eps["length"]) - 1)


def test_layout_is_self_describing(built, tokenizer_ckpt):
    from jowa_model.tokenizer import tokenizer_checksum

    info = json.loads((built / INFO).read_text())
    assert info["tokens_per_frame"] == 36 and info["vocab_size"] == 2048
    assert info["dtypes"]["tokens"] == "uint16" and info["formats"] == ["wds", "zarr"]
    assert info["games"]["Pong"]["task_id"] == 39
    assert info["tokenizer_checksum"] == tokenizer_checksum(tokenizer_ckpt)
    assert set(info["manifest_checksums"]) == {"Pong"}
    stats = json.loads((built / "stats.json").read_text())["games"]["Pong"]
    assert 0 < stats["codebook"]["unique_tokens"] <= 2048 and stats["codebook"]["perplexity"] >= 1
    assert stats["storage"]["zarr"]["files"] > 0 and stats["storage"]["wds"]["bytes_per_frame"] > 0
    assert not (built / "_tmp").exists()
    for tar in (built / "wds" / "Pong").glob("*.tar"):  # reproducible tars: mtime 0, no dots in keys
        import tarfile

        with tarfile.open(tar) as tf:
            for m in tf.getmembers():
                assert m.mtime == 0 and m.name.count(".") == 2, m.name


def test_rerun_is_noop_and_validate_passes(built, recorded_replay, tokenizer_ckpt):
    before = tree_bytes(built)
    r = CliRunner().invoke(main, build_args(recorded_replay.root, tokenizer_ckpt, built, "--format", "both", "--json"))
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["status"] == "already built"
    assert tree_bytes(built) == before
    r = CliRunner().invoke(main, ["validate", str(built), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output) == {"path": str(built), "ok": True, "problems": []}


def test_different_build_into_same_folder_fails(built, recorded_replay, tokenizer_ckpt):
    args = build_args(recorded_replay.root, tokenizer_ckpt, built, "--format", "zarr")
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 1
    assert PLAN in r.output and "different build" in r.output


def test_bad_inputs_exit_1_naming_the_file(tmp_path, recorded_replay, tokenizer_ckpt):
    r = CliRunner().invoke(main, build_args(recorded_replay.root, tmp_path / "nope.pt", tmp_path / "o"))
    assert r.exit_code == 1 and "nope.pt" in r.output
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    r = CliRunner().invoke(main, build_args(recorded_replay.root, bad, tmp_path / "o2"))
    assert r.exit_code == 1 and "bad.pt" in r.output
    r = CliRunner().invoke(main, ["validate", str(tmp_path)])
    assert r.exit_code == 1 and "info.json" in r.output


def test_processes_scheduler_gives_identical_bytes(built, recorded_replay, tokenizer_ckpt, tmp_path):
    out = tmp_path / "ds"
    r = CliRunner().invoke(main, build_args(recorded_replay.root, tokenizer_ckpt, out, "--format", "both",
                                            "--scheduler", "processes", "--workers", "2", "--json"))
    assert r.exit_code == 0, r.output
    assert tree_bytes(out) == tree_bytes(built)


def test_stats_of_built_dataset(built):
    from jowa_data.build import dataset_stats
    from jowa_data.stats import replay_stats

    s = dataset_stats(built)
    assert s["games"]["Pong"]["transitions"] == s["total_transitions"]
    assert s["storage"]["zarr"]["bytes_per_frame"] > 0 and s["storage"]["wds"]["files"] >= 2
    idx = replay_stats(built)  # the index stats of A work on the dataset's episodes.parquet
    assert idx["overall"]["transitions"] == s["total_transitions"]


def test_on_the_fly_frames_source_equals_token_stream(built, tokenizer_ckpt):
    from jowa_data.stream import FrameSegmentStream, SegmentStream
    from jowa_model.tokenizer import load_tokenizer

    a = SegmentStream(built, batch_size=4, seed=3, rank=0, world_size=1)
    b = FrameSegmentStream(built, load_tokenizer(tokenizer_ckpt), batch_size=4, seed=3, rank=0, world_size=1)
    for x, y, _ in zip(a, b, range(3)):
        for k in x:
            assert torch.equal(x[k], y[k]), k
