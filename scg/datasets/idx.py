"""Reader for the IDX binary format used by the MNIST files.

An IDX file (LeCun et al., http://yann.lecun.com/exdb/mnist/) is

    magic:   4 bytes  0x00 0x00 <dtype code> <number of dimensions d>
    dims:    d big-endian uint32 sizes
    payload: prod(dims) items of the dtype, big-endian, C order

MNIST images have magic 0x00000803 (uint8, 3 dims: N x 28 x 28), labels
0x00000801 (uint8, 1 dim: N). Files may be gzip-compressed; compression is
detected from the gzip magic bytes, not from the file name, so a mis-named
file still reads correctly.
"""

from __future__ import annotations

import gzip
import math
import os
import zlib

import numpy as np

from scg.datasets.errors import DataError

__all__ = [
    "IDX_DTYPES",
    "IDX_IMAGES_MAGIC",
    "IDX_LABELS_MAGIC",
    "read_idx",
    "read_maybe_gzipped",
]

# IDX dtype code -> big-endian numpy dtype (the format stores items big-endian).
IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

IDX_IMAGES_MAGIC = 0x00000803  # uint8, 3 dimensions
IDX_LABELS_MAGIC = 0x00000801  # uint8, 1 dimension

_GZIP_MAGIC = b"\x1f\x8b"


def _describe_magic(magic: int) -> str:
    """Human-readable meaning of an IDX magic number, e.g. 'uint8, 3 dims'."""
    code, ndim = (magic >> 8) & 0xFF, magic & 0xFF
    dtype = IDX_DTYPES.get(code)
    kind = dtype.newbyteorder("=").name if dtype is not None else f"unknown dtype code 0x{code:02x}"
    return f"{kind}, {ndim} dims"


def read_maybe_gzipped(
    path: os.PathLike | str,
    *,
    kind: str = "data file",
    how_to_fix: str = "Delete it and download it again.",
) -> bytes:
    """The file's bytes, gunzipped when they start with the gzip magic bytes.

    Compression is detected from the content, not the suffix, so ``x.gz`` holding
    raw bytes and ``x`` holding gzip both read correctly. ``kind`` names the
    file in error messages (e.g. ``"IDX file"``); ``how_to_fix`` ends the message
    for a truncated or corrupted file.

    Raises:
      DataError: the file is missing or unreadable, or its gzip stream is
        truncated or corrupted.
    """
    name = os.fspath(path)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise DataError(f"{kind} not found: {name!r}. Check the path.") from None
    except OSError as err:
        raise DataError(f"cannot read {kind} {name!r}: {err}") from err
    if not raw.startswith(_GZIP_MAGIC):
        return raw
    try:
        return gzip.decompress(raw)
    except (EOFError, OSError, zlib.error) as err:
        # EOFError: the gzip stream stops early (truncated download);
        # BadGzipFile (an OSError) / zlib.error: corrupted bytes.
        raise DataError(
            f"{kind} {name!r} starts with the gzip magic bytes but is not a valid gzip "
            f"stream ({type(err).__name__}: {err}); the file is truncated or corrupted. "
            f"{how_to_fix}"
        ) from err


def read_idx(path: os.PathLike | str, *, expected_magic: int | None = None) -> np.ndarray:
    """Reads an IDX file (gzip-compressed or raw) into a native-endian numpy array.

    Args:
      path: the file. Gzip compression is detected from its first two bytes.
      expected_magic: when given (e.g. ``IDX_IMAGES_MAGIC``), the file's 4-byte
        magic number must equal it: this checks the dtype and the number of
        dimensions in one go.

    Returns:
      A writable array of shape ``dims`` with the file's dtype in native byte
      order (``uint8`` for MNIST).

    Raises:
      DataError: the file is missing, is not IDX (bad magic), has an unknown
        dtype code, a header shorter than its dimension count says, or a payload
        whose length differs from ``prod(dims) * itemsize`` (truncated file or
        wrong dimensions). The message names the file and both numbers.
    """
    name = os.fspath(path)
    content = read_maybe_gzipped(path, kind="IDX file")
    if len(content) < 4:
        raise DataError(
            f"IDX file {name!r} has {len(content)} bytes, fewer than the 4-byte magic "
            "number; the file is truncated or not an IDX file."
        )
    magic = int.from_bytes(content[:4], "big")
    zero_bytes, code, ndim = content[:2], content[2], content[3]
    if zero_bytes != b"\x00\x00" or code not in IDX_DTYPES:
        raise DataError(
            f"IDX file {name!r} has bad magic number 0x{magic:08x}: an IDX magic number is "
            f"0x0000 followed by a dtype code in "
            f"{{{', '.join(f'0x{c:02x}' for c in IDX_DTYPES)}}} and the number of "
            "dimensions. The file is not an IDX file (or is compressed with something "
            "other than gzip)."
        )
    if expected_magic is not None and magic != expected_magic:
        raise DataError(
            f"IDX file {name!r} has magic number 0x{magic:08x} ({_describe_magic(magic)}), "
            f"expected 0x{expected_magic:08x} ({_describe_magic(expected_magic)}). "
            "Is it the wrong file (images vs labels)?"
        )
    header_len = 4 + 4 * ndim
    if len(content) < header_len:
        raise DataError(
            f"IDX file {name!r} is truncated: its magic number declares {ndim} dimensions, "
            f"so the header needs {header_len} bytes, but the file has {len(content)}."
        )
    dims = tuple(int.from_bytes(content[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = IDX_DTYPES[code]
    expected_bytes = math.prod(dims) * dtype.itemsize
    actual_bytes = len(content) - header_len
    if actual_bytes != expected_bytes:
        problem = "is truncated" if actual_bytes < expected_bytes else "has trailing bytes"
        raise DataError(
            f"IDX file {name!r} {problem}: dimensions {dims} of {dtype.newbyteorder('=').name} "
            f"need a payload of {expected_bytes} bytes, but the file holds {actual_bytes} "
            "bytes after the header. Delete it and download it again."
        )
    items = np.frombuffer(content, dtype=dtype, count=math.prod(dims), offset=header_len)
    # astype copies, so the result is writable and native-endian.
    return items.astype(dtype.newbyteorder("="), copy=True).reshape(dims)
