"""Gzip'd `.npy` files read as streams: parse the header, then read rows in bounded chunks.

Why: a DQN-Replay observation file is 7 GB once decompressed, so `np.load` on it is not an option.
We parse the NPY header with `np.lib.format` (never assuming the data offset: 2019 numpy may have
padded differently), check dtype and row shape, then copy rows from the decompressor straight into
caller-owned buffers. Object dtypes are refused: nothing is ever unpickled.

Decoders (`open_gz`): `isal` (ISA-L igzip, C, ~3x zlib), `rapidgzip` (parallel), `gzip` (stdlib zlib).
`benchmarks/bench_replay.py` measures them; "auto" takes the first installed one of `AUTO_ORDER`.
"""

from __future__ import annotations

import gzip
import importlib.util
import io
import zlib
from dataclasses import dataclass
from typing import IO, Any, Iterator

import numpy as np

from jowa_common.errors import ReplayFormatError

DECODERS = ("isal", "rapidgzip", "gzip")
# Measured on the shared 2-core dev machine (benchmarks/bench_replay.py, 1M-row file, raw stream):
# isal 120k frames/s, rapidgzip (1 thread) 46k, gzip 46k. rapidgzip is never picked automatically.
AUTO_ORDER = ("isal", "gzip")
RAPIDGZIP_CHUNK = 512 * 1024  # bytes of compressed input per rapidgzip chunk (bounds its cache)

_DECODE_ERRORS: tuple[type[BaseException], ...] = (OSError, EOFError, ValueError, RuntimeError, zlib.error)
try:  # isal raises its own error type for corrupt deflate data
    from isal.isal_zlib import error as _IsalError

    _DECODE_ERRORS += (_IsalError,)
except ImportError:  # pragma: no cover - isal is a declared dependency
    pass


def available_decoders() -> list[str]:
    """Decoders importable here, in `DECODERS` order (gzip is always available)."""
    return [d for d in DECODERS if d == "gzip" or importlib.util.find_spec(d) is not None]


def resolve_decoder(decoder: str = "auto") -> str:
    if decoder == "auto":
        have = available_decoders()
        return next(d for d in AUTO_ORDER if d in have)
    if decoder not in DECODERS:
        raise ValueError(f"unknown gzip decoder {decoder!r}; choose one of auto, {', '.join(DECODERS)}")
    if decoder not in available_decoders():
        raise ValueError(f"gzip decoder {decoder!r} is not installed (pip install {decoder})")
    return decoder


def wrap_gz(raw: IO[bytes] | str, decoder: str = "auto", threads: int = 1) -> IO[bytes]:
    """A decompressing reader over `raw` (a local path or a binary file object)."""
    decoder = resolve_decoder(decoder)
    if decoder == "isal":
        from isal import igzip

        return igzip.open(raw, "rb") if isinstance(raw, str) else igzip.IGzipFile(fileobj=raw, mode="rb")
    if decoder == "rapidgzip":
        import rapidgzip

        # Small chunks bound its decoded-chunk cache: with the default 4 MiB (compressed) chunks, a 1M-row
        # observation file peaked at 1.3 GB RSS (benchmarks/bench_replay.py); 512 KiB stays well under 1 GB.
        return rapidgzip.RapidgzipFile(raw, parallelization=threads, chunk_size=RAPIDGZIP_CHUNK)
    return gzip.open(raw, "rb") if isinstance(raw, str) else gzip.GzipFile(fileobj=raw, mode="rb")


@dataclass(frozen=True)
class NpyHeader:
    """What the `.npy` header says; `offset` = bytes before the data (in the decompressed stream)."""

    shape: tuple[int, ...]
    dtype: np.dtype
    fortran_order: bool
    offset: int

    @property
    def rows(self) -> int:
        return self.shape[0] if self.shape else 1

    @property
    def row_shape(self) -> tuple[int, ...]:
        return tuple(self.shape[1:])

    @property
    def row_bytes(self) -> int:
        return int(np.prod(self.row_shape, dtype=np.int64)) * self.dtype.itemsize


def _decode_error(name: str, e: BaseException) -> ReplayFormatError:
    return ReplayFormatError(f"{name}: corrupt or truncated gzip stream ({type(e).__name__}: {e})")


def read_exact_into(f: IO[bytes], buf: memoryview, name: str) -> None:
    """Fill `buf` from `f` (decompressors may return short reads); truncation is a ReplayFormatError."""
    got, n = 0, len(buf)
    while got < n:
        try:
            k = f.readinto(buf[got:])
        except _DECODE_ERRORS as e:
            raise _decode_error(name, e) from e
        if not k:
            raise ReplayFormatError(f"{name}: truncated: the data ends {n - got} bytes early")
        got += k


def read_header(f: IO[bytes], name: str) -> NpyHeader:
    """Parse the NPY magic + header dict from the start of a decompressed stream."""
    try:
        head = f.read(8)  # magic (6) + version (2)
    except _DECODE_ERRORS as e:
        raise _decode_error(name, e) from e
    if len(head) < 8 or not head.startswith(b"\x93NUMPY"):
        raise ReplayFormatError(f"{name}: not a .npy file inside the gzip (bad magic {head[:8]!r})")
    bio = io.BytesIO(head)
    version = np.lib.format.read_magic(bio)
    if version not in ((1, 0), (2, 0)):
        raise ReplayFormatError(f"{name}: unsupported .npy format version {version}")
    hlen_size = 2 if version == (1, 0) else 4
    hlen_bytes = bytearray(hlen_size)
    read_exact_into(f, memoryview(hlen_bytes), name)
    hlen = int.from_bytes(hlen_bytes, "little")
    if hlen > 1 << 16:
        raise ReplayFormatError(f"{name}: .npy header of {hlen} bytes is implausibly long")
    body = bytearray(hlen)
    read_exact_into(f, memoryview(body), name)
    reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    try:
        shape, fortran, dtype = reader(io.BytesIO(bytes(hlen_bytes) + bytes(body)))
    except ValueError as e:
        raise ReplayFormatError(f"{name}: malformed .npy header ({e})") from e
    if dtype.hasobject:
        raise ReplayFormatError(f"{name}: .npy holds Python objects (dtype {dtype}); refusing to unpickle")
    return NpyHeader(tuple(int(s) for s in shape), dtype, bool(fortran), 8 + hlen_size + hlen)


def check_header(h: NpyHeader, name: str, dtype: Any, row_shape: tuple[int, ...], ndim: int | None = None) -> None:
    """Raise a ReplayFormatError naming `name` unless the array has `dtype` and rows of `row_shape`."""
    want = np.dtype(dtype)
    if h.dtype != want:
        raise ReplayFormatError(f"{name}: dtype {h.dtype} (expected {want})")
    ndim = 1 + len(row_shape) if ndim is None else ndim
    if len(h.shape) != ndim or (ndim > 0 and h.row_shape != row_shape):
        exp = "()" if ndim == 0 else str(("N", *row_shape)).replace("'", "")
        raise ReplayFormatError(f"{name}: shape {h.shape} (expected {exp})")
    if h.fortran_order and ndim > 1:
        raise ReplayFormatError(f"{name}: Fortran-ordered array; rows are not contiguous")


def check_end(f: IO[bytes], name: str) -> None:
    """Read to the end of the stream: the gzip CRC/length trailer is verified, trailing bytes are an error."""
    try:
        extra = f.read(1)
        if extra:
            raise ReplayFormatError(f"{name}: extra data after the array (shape in the header is wrong)")
    except _DECODE_ERRORS as e:
        raise _decode_error(name, e) from e


def read_small(f: IO[bytes], name: str) -> tuple[NpyHeader, np.ndarray]:
    """Read a whole (small) array: action/reward/terminal/add_count files, a few MB at most."""
    h = read_header(f, name)
    if h.fortran_order and len(h.shape) > 1:
        raise ReplayFormatError(f"{name}: Fortran-ordered array is not supported")
    n = int(np.prod(h.shape, dtype=np.int64)) if h.shape else 1
    buf = bytearray(n * h.dtype.itemsize)
    read_exact_into(f, memoryview(buf), name)
    check_end(f, name)
    return h, np.frombuffer(buf, dtype=h.dtype).reshape(h.shape)


def iter_chunks(f: IO[bytes], h: NpyHeader, start: int, stop: int, name: str,
                chunk_rows: int = 2048) -> Iterator[tuple[int, np.ndarray]]:
    """Yield `(first_row, rows)` for rows [start, stop) of a stream positioned just after the header.

    Rows before `start` are read and discarded. The yielded array is a reused buffer: copy what you keep.
    """
    if not 0 <= start <= stop <= h.rows:
        raise ValueError(f"rows [{start}, {stop}) outside [0, {h.rows}) of {name}")
    rb = h.row_bytes
    buf = np.empty((chunk_rows, *h.row_shape), dtype=h.dtype)
    mv = memoryview(buf.reshape(-1).view(np.uint8))
    row = 0
    while row < stop:
        k = min(chunk_rows, stop - row)
        read_exact_into(f, mv[: k * rb], name)
        if row + k > start:
            lo = max(start - row, 0)
            yield row + lo, buf[lo:k]
        row += k
