"""Verified downloads through pooch: a cache folder, mirror fallback and a timeout.

The cache root is the explicit argument, else ``$SCG_CACHE_DIR``, else
``$XDG_CACHE_HOME/scg``, else ``~/.cache/scg``. A file is fetched from the first
mirror (``SCG_MNIST_MIRRORS``, comma-separated, else the defaults) that delivers
it with the SHA-256 of the registry: pooch streams it to a temporary file beside
the target and renames it into place only after the hash matched, so the cache
never holds a partial or wrong file. A mirror that refuses the connection or
does not answer within the timeout is unreachable: it is skipped for later files.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pathlib
import sys
from collections.abc import Iterator, Sequence

import pooch
import requests

__all__ = [
    "CACHE_DIR_ENV",
    "DEFAULT_MNIST_MIRRORS",
    "MIRRORS_ENV",
    "Downloads",
    "cache_dir_from",
    "mirrors_from",
]

CACHE_DIR_ENV = "SCG_CACHE_DIR"
MIRRORS_ENV = "SCG_MNIST_MIRRORS"

# Public mirrors of the original MNIST files (yann.lecun.com now refuses downloads).
DEFAULT_MNIST_MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)

_CHUNK = 1 << 16


def cache_dir_from(arg: str | os.PathLike | None) -> pathlib.Path:
    """The download-cache root: ``arg``, else ``$SCG_CACHE_DIR``, else the user cache.

    The user cache is ``$XDG_CACHE_HOME/scg`` or ``~/.cache/scg``. Data sets live in
    sub-folders (``<root>/mnist/``), mirroring the data-dir layout.
    """
    if arg is not None and os.fspath(arg) != "":
        return pathlib.Path(arg).expanduser()
    from_env = os.environ.get(CACHE_DIR_ENV, "")
    if from_env:
        return pathlib.Path(from_env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    base = pathlib.Path(xdg).expanduser() if xdg else pathlib.Path.home() / ".cache"
    return base / "scg"


def mirrors_from(arg: Sequence[str] | None) -> tuple[str, ...]:
    """Mirror base URLs: ``arg``, else ``$SCG_MNIST_MIRRORS`` (comma-separated), else the defaults."""
    if arg is not None:
        if isinstance(arg, str):
            raise TypeError(
                f"mirrors must be a sequence of base URLs, got the string {arg!r}; "
                f"write mirrors=[{arg!r}]."
            )
        return tuple(arg)
    from_env = [m.strip() for m in os.environ.get(MIRRORS_ENV, "").split(",") if m.strip()]
    return tuple(from_env) if from_env else DEFAULT_MNIST_MIRRORS


@contextlib.contextmanager
def _pooch_quiet() -> Iterator[None]:
    """Silences pooch's own "Downloading ..." log line; scg prints its own."""
    logger = pooch.get_logger()
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


class Downloads:
    """Verified files in ``folder``, downloaded over HTTP(S) from ``mirrors`` in order.

    ``attempts`` collects ``(URL or path, why it failed)`` for error messages;
    ``timeout`` (seconds) bounds the connection and each read.
    """

    def __init__(self, folder: pathlib.Path, mirrors: Sequence[str], timeout: float) -> None:
        self.folder, self.mirrors, self.timeout = folder, tuple(mirrors), timeout
        self.attempts: list[tuple[str, str]] = []
        self._unreachable: dict[str, str] = {}  # mirror -> why; skipped for later files

    def check(self, path: pathlib.Path, sha256: str) -> bool:
        """Whether the file has SHA-256 ``sha256``; a damaged one is deleted (and noted)."""
        if pooch.file_hash(str(path)) == sha256.lower():
            return True
        path.unlink(missing_ok=True)
        self.attempts.append((str(path), "cached file failed its sha256 check; deleted"))
        return False

    def fetch(self, name: str, sha256: str) -> pathlib.Path | None:
        """``folder/name`` from the first mirror that delivers it with SHA-256 ``sha256``, else None."""
        for mirror in self.mirrors:
            url = mirror.rstrip("/") + "/" + name
            if mirror in self._unreachable:
                self.attempts.append((url, f"skipped: mirror unreachable earlier ({self._unreachable[mirror]})"))
                continue
            print(f"scg: downloading {name} from {url} into {self.folder} (timeout {self.timeout:g} s)",
                  file=sys.stderr, flush=True)
            fetcher = pooch.create(path=self.folder, base_url=mirror, registry={name: f"sha256:{sha256}"})
            downloader = pooch.HTTPDownloader(timeout=self.timeout, chunk_size=_CHUNK)
            try:
                with _pooch_quiet():
                    return pathlib.Path(fetcher.fetch(name, downloader=downloader))
            except requests.HTTPError as err:
                reason = f"HTTP {err.response.status_code} {err.response.reason}"
            except requests.Timeout:
                reason = self._unreachable[mirror] = f"no answer within the timeout of {self.timeout:g} s"
            except requests.ConnectionError as err:
                cause = getattr(err.args[0], "reason", None) if err.args else None
                reason = self._unreachable[mirror] = f"cannot connect: {cause or err}"
            except (requests.exceptions.InvalidURL, requests.exceptions.InvalidSchema,
                    requests.exceptions.MissingSchema) as err:  # only http(s) mirrors are supported
                reason = self._unreachable[mirror] = f"not an http(s) URL: {type(err).__name__}: {err}"
            except OSError as err:  # other requests errors; the cache is not writable, the disk is full
                reason = f"download failed: {type(err).__name__}: {err}"
            except ValueError as err:  # pooch: the hash differs, the download was deleted
                reason = f"checksum mismatch, the download was rejected and deleted: {err}"
            self.attempts.append((url, reason))
        return None
