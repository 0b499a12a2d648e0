"""MNIST and binarized MNIST: locating and loading.

Where MNIST files are looked for, in order:

1. the data dir: ``<data_dir>/mnist/`` where ``data_dir`` is the explicit
   argument (the command line's ``--data-dir``), else the ``SCG_DATA_DIR``
   environment variable;
2. the download cache: ``<cache_dir>/mnist/`` (see :mod:`scg.datasets.download`);
3. the mirrors: each missing ``<name>.gz`` is downloaded into the cache through
   pooch and verified against its SHA-256 (:class:`scg.datasets.download.Downloads`).

Each MNIST file may be gzip-compressed or raw (``<name>.gz`` or ``<name>``);
compression is detected from the content. Binarized MNIST is read from
``<data_dir>/binarized_mnist/`` only; nothing is downloaded for it.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import numpy as np

from scg.datasets.download import (
    CACHE_DIR_ENV,
    DEFAULT_MNIST_MIRRORS,
    MIRRORS_ENV,
    Downloads,
    cache_dir_from,
    mirrors_from,
)
from scg.datasets.errors import DataError
from scg.datasets.idx import IDX_IMAGES_MAGIC, IDX_LABELS_MAGIC, read_idx, read_maybe_gzipped

__all__ = [
    "BINARIZED_MNIST_SPLITS",
    "CACHE_DIR_ENV",
    "DATA_DIR_ENV",
    "DEFAULT_MNIST_MIRRORS",
    "MIRRORS_ENV",
    "MNIST",
    "MNIST_FILES",
    "MNIST_SHA256",
    "cache_dir_from",
    "data_dir_from",
    "load_binarized_mnist",
    "load_mnist",
    "mirrors_from",
]

DATA_DIR_ENV = "SCG_DATA_DIR"

# The four files, without compression suffix, in MNIST-tuple order.
MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)

# SHA-256 of the canonical gzipped files (equal to the TFDS/Keras checksums).
MNIST_SHA256 = {
    "train-images-idx3-ubyte.gz": "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
    "train-labels-idx1-ubyte.gz": "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
    "t10k-images-idx3-ubyte.gz": "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
    "t10k-labels-idx1-ubyte.gz": "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
}

BINARIZED_MNIST_SPLITS = ("train", "valid", "test")

_IMAGE_SIDE = 28
_NUM_PIXELS = _IMAGE_SIDE * _IMAGE_SIDE
_NUM_CLASSES = 10


class MNIST(NamedTuple):
    """The MNIST training (60,000) and test (10,000) sets.

    Images are ``(N, 784) float32`` in ``[0, 1]`` (pixel / 255, rows of the
    28x28 image concatenated); labels are ``(N,) int32`` in ``0..9``.
    """

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray


# --------------------------------------------------------------------------- #
# Configuration: explicit argument, else environment variable, else default.
# --------------------------------------------------------------------------- #


def data_dir_from(arg: str | os.PathLike | None) -> pathlib.Path | None:
    """The data dir: ``arg`` when given, else ``$SCG_DATA_DIR``, else None.

    An empty string counts as not given, so ``--data-dir ""`` defers to the
    environment like an absent flag does.
    """
    if arg is not None and os.fspath(arg) != "":
        return pathlib.Path(arg).expanduser()
    from_env = os.environ.get(DATA_DIR_ENV, "")
    return pathlib.Path(from_env).expanduser() if from_env else None


# --------------------------------------------------------------------------- #
# Locating (and downloading through scg.datasets.download).
# --------------------------------------------------------------------------- #


def _find_in(folder: pathlib.Path, name: str) -> pathlib.Path | None:
    """``folder/name.gz`` or ``folder/name``, whichever exists first, else None."""
    for candidate in (folder / f"{name}.gz", folder / name):
        if candidate.is_file():
            return candidate
    return None


def _mnist_not_found_error(
    missing: Sequence[str],
    search_dirs: Sequence[tuple[pathlib.Path, str]],
    attempts: Sequence[tuple[str, str]],  # (URL or path, why it failed)
    data_dir: pathlib.Path | None,
    download: bool,
) -> DataError:
    lines = [
        f"MNIST: {len(missing)} of the {len(MNIST_FILES)} files were neither found nor "
        f"downloaded: {', '.join(missing)}.",
        "Looked for each as '<name>.gz' or '<name>' in:",
    ]
    lines += [f"  {folder}  ({role})" for folder, role in search_dirs]
    if data_dir is None:
        lines.append(f"  (no data dir: --data-dir and {DATA_DIR_ENV} are unset)")
    if not download:
        lines.append("Downloads were disabled (download=False).")
    if attempts:
        lines.append("Tried:")
        lines += [f"  {source}: {reason}" for source, reason in attempts]
    lines.append(
        "How to fix: put the four files "
        f"({', '.join(f'{n}.gz' for n in MNIST_FILES)}; gzipped or raw) in a folder "
        f"<DIR>/mnist/ and pass --data-dir <DIR> or set {DATA_DIR_ENV}=<DIR>; "
        f"or set {MIRRORS_ENV} to comma-separated base URLs of a reachable mirror."
    )
    return DataError("\n".join(lines))


def _locate_mnist_files(
    data_dir: pathlib.Path | None,
    cache: pathlib.Path,
    mirrors: Sequence[str],
    download: bool,
    checksums: Mapping[str, str],
    timeout: float,
) -> dict[str, pathlib.Path]:
    """Path of each of MNIST_FILES: found locally or downloaded into ``cache``."""
    search_dirs = []
    if data_dir is not None:
        search_dirs.append((data_dir / "mnist", "the data dir, from --data-dir or " + DATA_DIR_ENV))
    search_dirs.append((cache, "the download cache"))

    downloads = Downloads(cache, mirrors, timeout)
    found: dict[str, pathlib.Path] = {}
    missing = []
    for name in MNIST_FILES:
        gz_name = f"{name}.gz"
        for folder, _ in search_dirs:
            path = _find_in(folder, name)
            if path is None:
                continue
            # Files in the cache were verified when downloaded; re-check so a
            # file damaged since is replaced rather than failing every run.
            if folder == cache and path.name == gz_name and gz_name in checksums:
                if not downloads.check(path, checksums[gz_name]):
                    continue
            found[name] = path
            break
        if name in found:
            continue
        if download and gz_name not in checksums:
            raise DataError(
                f"MNIST: no known sha256 for {gz_name!r}, so a download of it cannot be "
                f"verified; the checksums given cover {sorted(checksums)}. Add "
                f"{gz_name!r} to checksums= or put the file in <DIR>/mnist/ with --data-dir."
            )
        path = downloads.fetch(gz_name, checksums[gz_name]) if download else None
        if path is None:
            missing.append(name)
        else:
            found[name] = path
    if missing:
        raise _mnist_not_found_error(missing, search_dirs, downloads.attempts, data_dir, download)
    return found


# --------------------------------------------------------------------------- #
# Loading.
# --------------------------------------------------------------------------- #


def _load_split(images_path: pathlib.Path, labels_path: pathlib.Path) -> tuple[np.ndarray, np.ndarray]:
    """(images (N, 784) float32 in [0, 1], labels (N,) int32) from two IDX files."""
    images = read_idx(images_path, expected_magic=IDX_IMAGES_MAGIC)
    labels = read_idx(labels_path, expected_magic=IDX_LABELS_MAGIC)
    if images.shape[1:] != (_IMAGE_SIDE, _IMAGE_SIDE):
        raise DataError(
            f"MNIST images file {os.fspath(images_path)!r} holds images of shape "
            f"{images.shape[1:]}, expected ({_IMAGE_SIDE}, {_IMAGE_SIDE}). Is it MNIST?"
        )
    if images.shape[0] != labels.shape[0]:
        raise DataError(
            f"MNIST files disagree: {os.fspath(images_path)!r} holds {images.shape[0]} "
            f"images but {os.fspath(labels_path)!r} holds {labels.shape[0]} labels. "
            "One of them is from another data set or split; replace it."
        )
    if labels.size and int(labels.max()) >= _NUM_CLASSES:
        raise DataError(
            f"MNIST labels file {os.fspath(labels_path)!r} holds label {int(labels.max())}, "
            f"expected labels in 0..{_NUM_CLASSES - 1}. Is it MNIST?"
        )
    # float32 / float32 stays float32: exactly pixel / 255 rounded once.
    pixels = images.reshape(images.shape[0], _NUM_PIXELS).astype(np.float32) / np.float32(255)
    return pixels, labels.astype(np.int32)


def load_mnist(
    data_dir: str | os.PathLike | None = None,
    *,
    cache_dir: str | os.PathLike | None = None,
    mirrors: Sequence[str] | None = None,
    download: bool = True,
    checksums: Mapping[str, str] | None = None,
    timeout: float = 30.0,
) -> MNIST:
    """Loads MNIST, downloading (through pooch) and verifying missing files into the cache.

    Args:
      data_dir: folder holding ``mnist/`` with the four files (gzipped or raw);
        default ``$SCG_DATA_DIR``. Missing or unset: the cache and mirrors are used.
      cache_dir: download-cache root (files go to ``<cache_dir>/mnist/``);
        default ``$SCG_CACHE_DIR``, else ``~/.cache/scg``.
      mirrors: base URLs tried in order for each missing file; default
        ``$SCG_MNIST_MIRRORS`` (comma-separated), else ``DEFAULT_MNIST_MIRRORS``.
      download: whether missing files may be downloaded.
      checksums: SHA-256 of each ``<name>.gz`` a download must match; default
        ``MNIST_SHA256``. A mismatching download is deleted and the next mirror tried.
        A line naming the file, URL, cache folder and timeout is printed to stderr
        before each download.
      timeout: seconds a mirror may take to accept the connection and to send each
        piece of the file; one that takes longer is unreachable and skipped.

    Returns:
      ``MNIST(train_images, train_labels, test_images, test_labels)``, the
      standard 60,000 / 10,000 split; images ``(N, 784) float32`` in ``[0, 1]``,
      labels ``(N,) int32``.

    Raises:
      DataError: a file is neither found nor downloadable (the message lists the
        files, the folders searched, each URL tried with its failure, and how to
        provide the files), or a file is not valid MNIST IDX.
    """
    data_root = data_dir_from(data_dir)
    cache = cache_dir_from(cache_dir) / "mnist"
    paths = _locate_mnist_files(
        data_root,
        cache,
        mirrors_from(mirrors),
        download,
        MNIST_SHA256 if checksums is None else checksums,
        timeout,
    )
    train_images, train_labels = _load_split(paths[MNIST_FILES[0]], paths[MNIST_FILES[1]])
    test_images, test_labels = _load_split(paths[MNIST_FILES[2]], paths[MNIST_FILES[3]])
    return MNIST(train_images, train_labels, test_images, test_labels)


def _parse_amat(content: bytes, path: pathlib.Path) -> np.ndarray:
    """(N, 784) float32 of 0/1 from the text of a binarized-MNIST ``.amat`` file."""
    row_bytes = 2 * _NUM_PIXELS  # "d d d ... d\n": a digit and a separator per pixel
    chars = np.frombuffer(content, dtype=np.uint8)
    if len(content) % row_bytes == 0:
        # Fast path for the canonical layout: single spaces, "\n" line ends.
        rows = chars.reshape(-1, row_bytes)
        separators_ok = np.all(rows[:, 1:-1:2] == ord(" ")) and np.all(rows[:, -1] == ord("\n"))
        digits = rows[:, 0::2]
        if separators_ok and np.all((digits == ord("0")) | (digits == ord("1"))):
            return (digits - ord("0")).astype(np.float32)
    # General layout: any whitespace, "\r\n", a missing final newline.
    lines = [line for line in content.splitlines() if line.strip()]
    for number, line in enumerate(lines, start=1):
        values = line.split()
        if len(values) != _NUM_PIXELS:
            raise DataError(
                f"binarized MNIST file {os.fspath(path)!r}: line {number} has {len(values)} "
                f"values, expected {_NUM_PIXELS} (one 28x28 image of 0/1 per line); the file is "
                f"truncated or corrupted, or not binarized MNIST. {_REPLACE_AMAT}"
            )
    tokens = np.array(b" ".join(lines).split(), dtype="S")
    ones, zeros = tokens == b"1", tokens == b"0"
    if not np.all(ones | zeros):
        bad = tokens[~(ones | zeros)][0].decode(errors="replace")
        raise DataError(
            f"binarized MNIST file {os.fspath(path)!r} holds the value {bad!r}, expected "
            "only 0 and 1. Is it the binarized (.amat) data set?"
        )
    return ones.reshape(-1, _NUM_PIXELS).astype(np.float32)


_REPLACE_AMAT = "Replace it with an intact copy of the file."


def load_binarized_mnist(
    data_dir: str | os.PathLike | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Loads the fixed binarization of MNIST (Larochelle & Murray, 2011).

    Reads ``<data_dir>/binarized_mnist/binarized_mnist_{train,valid,test}.amat``
    (each gzipped or raw; ``.amat.gz`` is tried first). Nothing is downloaded.

    Args:
      data_dir: folder holding ``binarized_mnist/``; default ``$SCG_DATA_DIR``.

    Returns:
      ``(train, valid, test)``: ``(50000, 784)``, ``(10000, 784)``,
      ``(10000, 784)`` float32 arrays of 0/1.

    Raises:
      DataError: no data dir is set, a file is missing (the message lists each
        file and the folder), or a file is truncated, corrupted or not in the
        ``.amat`` layout (the message names the file).
    """
    data_root = data_dir_from(data_dir)
    names = [f"binarized_mnist_{split}.amat" for split in BINARIZED_MNIST_SPLITS]
    how_to_fix = (
        f"put {', '.join(f'{n}.gz' for n in names)} (gzipped or raw) in a folder "
        f"<DIR>/binarized_mnist/ and pass --data-dir <DIR> or set {DATA_DIR_ENV}=<DIR>."
    )
    if data_root is None:
        raise DataError(
            f"binarized MNIST: no data dir given (--data-dir and {DATA_DIR_ENV} are unset), "
            f"and this data set is not downloaded automatically. How to fix: {how_to_fix}"
        )
    folder = data_root / "binarized_mnist"
    paths = [_find_in(folder, name) for name in names]
    missing = [name for name, path in zip(names, paths) if path is None]
    if missing:
        raise DataError(
            f"binarized MNIST: {', '.join(missing)} not found in {folder} (looked for "
            f"'<name>.gz' and '<name>'). How to fix: {how_to_fix}"
        )
    train, valid, test = (
        _parse_amat(read_maybe_gzipped(path, kind="binarized MNIST file", how_to_fix=_REPLACE_AMAT), path)
        for path in paths
    )
    return train, valid, test
