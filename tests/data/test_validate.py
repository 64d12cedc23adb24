"""`jowa-data validate` finds planted damage and reports every problem, naming the file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from click.testing import CliRunner

from jowa_data.build import EpisodeArrays, write_dataset
from jowa_data.cli import main
from jowa_data.manifest import load_manifests
from jowa_data.validate import validate_dataset


def small_dataset(out: Path, formats=("zarr", "wds"), bad_token: bool = False, seed: int = 0) -> Path:
    reg = load_manifests()
    rng = np.random.default_rng(seed)
    eps = {}
    for g, n_act in (("Pong", 6), ("Assault", 7)):
        eps[g] = []
        for _ in range(6):
            T = int(rng.integers(20, 120))
            term = np.zeros(T, np.uint8)
            term[-1] = 1
            eps[g].append(EpisodeArrays(rng.integers(0, 2048, (T, 36)).astype(np.uint16), rng.integers(0, n_act, T),
                                        rng.integers(-1, 2, T).astype(np.float32), term))
    if bad_token:
        eps["Pong"][2].tokens[5, 7] = 2048 + 100
    write_dataset(out, [reg.get("Pong"), reg.get("Assault")], eps, formats=formats, task_transitions=200)
    return out


def test_clean_dataset_is_valid(tmp_path):
    d = small_dataset(tmp_path / "ds")
    assert validate_dataset(d) == []
    r = CliRunner().invoke(main, ["validate", str(d)])
    assert r.exit_code == 0 and "valid" in r.output


def test_token_over_vocab_is_caught(tmp_path):
    d = small_dataset(tmp_path / "ds", bad_token=True)
    problems = validate_dataset(d)
    assert any("token ids >= vocab 2048" in p and "Pong" in p for p in problems), problems
    assert len(problems) == 2  # once per format; Assault is clean
    r = CliRunner().invoke(main, ["validate", str(d), "--json"])
    assert r.exit_code == 1 and json.loads(r.output)["ok"] is False


def _flip(p: Path, at: float = 0.5) -> None:
    b = bytearray(p.read_bytes())
    i = int(len(b) * at)
    b[i:i + 8] = bytes(x ^ 0xFF for x in b[i:i + 8])
    p.write_bytes(bytes(b))


def test_corrupted_zarr_chunk_and_tar_member_are_both_reported(tmp_path):
    d = small_dataset(tmp_path / "ds")
    chunk = sorted((d / "zarr" / "Assault").rglob("tokens/c/0/0"))[0]
    _flip(chunk)
    tar = sorted((d / "wds" / "Pong").glob("*.tar"))[0]
    _flip(tar, 0.3)
    problems = validate_dataset(d)
    assert any(str(chunk) in p and "sha256" in p for p in problems), problems
    assert any(str(tar) in p and "sha256" in p for p in problems), problems
    # Without checksums, the damage is still found by decoding (zarr's shard crc32c / zstd).
    assert any("Assault" in p for p in validate_dataset(d, checksums=False))
    r = CliRunner().invoke(main, ["validate", str(d)])
    assert r.exit_code == 1 and str(chunk) in r.output and str(tar) in r.output


def test_missing_stray_and_inconsistent_files(tmp_path):
    d = small_dataset(tmp_path / "ds", formats=("zarr",))
    gone = sorted((d / "zarr" / "Pong").rglob("actions/c/0"))[0]
    gone.unlink()
    stray = d / "zarr" / "Pong" / "junk.bin"
    stray.write_bytes(b"x")
    files = json.loads((d / "files.json").read_text())
    (d / "files.json").write_text(json.dumps(files, indent=2))  # re-formatted: checksum differs
    problems = validate_dataset(d)
    assert any(str(gone) in p and "missing" in p for p in problems)
    assert any(str(stray) in p and "stray" in p for p in problems)
    assert any("files.json" in p and "checksum" in p for p in problems)
    # zarr reads a missing chunk as fill_value (no decode error): files.json is what catches it, even
    # without checksums.
    assert any(str(gone) in p for p in validate_dataset(d, checksums=False))


def test_wrong_version_is_a_clear_error(tmp_path):
    d = small_dataset(tmp_path / "ds", formats=("zarr",))
    info = json.loads((d / "info.json").read_text())
    info["format_version"] = 99
    (d / "info.json").write_text(json.dumps(info))
    r = CliRunner().invoke(main, ["validate", str(d)])
    assert r.exit_code == 1 and "info.json" in r.output and "format_version 99" in r.output
