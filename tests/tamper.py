"""What an attacker or an accident does to a dataset, for the tests and scripts/tamper_check.py: a pickle whose
unpickling leaves a file behind (proof that code ran), a member appended to a tar, checksums forged to match."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path


class Boom:
    """Unpickling this writes a marker file: proof that code ran."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "pickle code ran"))


def plant(tar: Path, member: str, payload: bytes) -> None:
    """Append `member` (e.g. 'KEY.evil.pyd') to an existing tar, the way an attacker would."""
    with tarfile.open(tar, "a") as tf:
        ti = tarfile.TarInfo(member)
        ti.size = len(payload)
        tf.addfile(ti, io.BytesIO(payload))


def forge_checksums(d: Path, tar: Path) -> None:
    """What an attacker who also rewrites the metadata does: files.json and info.json made to match the file."""
    from jowa_common.io import sha256_bytes, sha256_file

    files = json.loads((d / "files.json").read_text())
    files[str(tar.relative_to(d))] = {"bytes": tar.stat().st_size, "sha256": sha256_file(tar)}
    raw = (json.dumps(files, indent=1, sort_keys=True) + "\n").encode()
    (d / "files.json").write_bytes(raw)
    info = json.loads((d / "info.json").read_text())
    info["files_checksum"] = sha256_bytes(raw)
    (d / "info.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
