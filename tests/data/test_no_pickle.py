"""A dataset cannot run code: tar members jowa does not write (.pyd, .pickle) are refused, never unpickled,
by every path that reads the shards (validate, the stream, training, webdataset's own decoders)."""

from __future__ import annotations

import io
import json
import pickle
import tarfile

import numpy as np
import pytest
from click.testing import CliRunner

from jowa_data.backends.wds_backend import decode_sample
from jowa_data.cli import main as data_cli
from jowa_common.errors import DatasetError
from jowa_data.stream import SegmentStream
from jowa_data.validate import validate_dataset
from pipelines.cli import main as cli
from tests.data.test_validate import small_dataset
from tests.tamper import Boom, forge_checksums, plant


@pytest.fixture(params=["pyd", "pickle"])
def poisoned(request, tmp_path):
    d = small_dataset(tmp_path / "ds", formats=("wds",))
    tar = sorted((d / "wds").rglob("*.tar"))[0]
    with tarfile.open(tar) as tf:
        key = tf.getnames()[0].split(".")[0]
    marker = tmp_path / "ran.txt"
    plant(tar, f"{key}.evil.{request.param}", pickle.dumps(Boom(str(marker))))
    return d, tar, marker, request.param


def test_validate_refuses_and_nothing_runs(poisoned):
    d, tar, marker, ext = poisoned
    problems = validate_dataset(d)
    assert any(str(tar) in p and f"evil.{ext}" in p and "not a jowa member" in p for p in problems), problems
    r = CliRunner().invoke(data_cli, ["validate", str(d)])
    assert r.exit_code == 1 and f"evil.{ext}" in r.output
    assert not marker.exists()


def test_stream_and_training_refuse_and_nothing_runs(poisoned, tmp_path):
    d, tar, marker, ext = poisoned
    # The planted member changed the tar: the checksum check refuses it before any byte is decoded.
    with pytest.raises(DatasetError, match=rf"{tar.name}: sha256 differs from files\.json"):
        SegmentStream(d, batch_size=2, rank=0, world_size=1, backend="wds", cache_dir=tmp_path / "cache")
    # With forged checksums the tar reaches the decoder, which refuses the member without decoding it.
    forge_checksums(d, tar)
    with pytest.raises(DatasetError, match=rf"{tar.name}.*evil\.{ext}.*not a jowa member"):
        SegmentStream(d, batch_size=2, rank=0, world_size=1, backend="wds", cache_dir=tmp_path / "cache")
    r = CliRunner().invoke(cli, ["train", "tiny", "--data", str(d), "--out", str(tmp_path / "run"),
                                 "--set", "data.backend=wds", "--set", "data.batch_size=2",
                                 "--set", "stage1_steps=1", "--set", "stage2_steps=0"])
    assert r.exit_code == 1 and f"evil.{ext}" in r.output and "Traceback" not in r.output
    assert not marker.exists()


def test_decoders_are_explicit(tmp_path):
    """Only .npy (no pickle) and meta.json decode; webdataset's secure mode is set before any read."""
    buf = io.BytesIO()
    np.save(buf, np.arange(3, dtype=np.int16), allow_pickle=False)
    s = decode_sample({"__key__": "k", "__url__": "x.tar", "tokens.npy": buf.getvalue(),
                       "meta.json": json.dumps({"start": 0}).encode()})
    assert s["tokens.npy"].tolist() == [0, 1, 2] and s["meta.json"] == {"start": 0}
    obj = io.BytesIO()
    np.save(obj, np.array([{"a": 1}], dtype=object), allow_pickle=True)  # an object array: needs pickle
    with pytest.raises(DatasetError, match=r"x\.tar: member k\.tokens\.npy cannot be decoded"):
        decode_sample({"__key__": "k", "__url__": "x.tar", "tokens.npy": obj.getvalue()})
    import webdataset

    d = small_dataset(tmp_path / "ds", formats=("wds",))
    SegmentStream(d, batch_size=2, rank=0, world_size=1, backend="wds", cache_dir=tmp_path / "cache")
    assert webdataset.utils.enforce_security is True
