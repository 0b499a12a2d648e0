"""Tests of scg.datasets: the IDX reader, MNIST location/download (pooch)/verification,
binarized MNIST, and minibatching. Downloads are served by a local http.server on
127.0.0.1 (and a socket server that never answers); any other network access fails
the test."""

from __future__ import annotations

import functools
import gzip
import hashlib
import http.server
import os
import pathlib
import socket
import threading
import time

import jax
import numpy as np
import pytest

from scg.datasets import DataError, MNIST, batches, data_dir_from, load_binarized_mnist, load_mnist, read_idx
from scg.datasets.download import DEFAULT_MNIST_MIRRORS
from scg.datasets.idx import IDX_IMAGES_MAGIC, IDX_LABELS_MAGIC
from scg.datasets.mnist import MNIST_FILES, cache_dir_from, mirrors_from

# Read at import, before the isolation fixture clears it for every test.
_REAL_DATA_DIR = os.environ.get("SCG_DATA_DIR", "")

# --------------------------------------------------------------------------- #
# Helpers and fixtures.
# --------------------------------------------------------------------------- #

_IDX_CODES = {np.dtype(np.uint8): 0x08, np.dtype(np.int8): 0x09, np.dtype(np.int16): 0x0B,
              np.dtype(np.int32): 0x0C, np.dtype(np.float32): 0x0D, np.dtype(np.float64): 0x0E}


def idx_bytes(array: np.ndarray) -> bytes:
    """The IDX encoding of ``array`` (big-endian header and payload)."""
    header = bytes([0, 0, _IDX_CODES[array.dtype], array.ndim])
    header += b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def synthetic_mnist(seed: int = 0, n_train: int = 6, n_test: int = 4) -> dict[str, np.ndarray]:
    """Small MNIST-shaped uint8 arrays keyed by file name (without suffix)."""
    rng = np.random.default_rng(seed)
    return {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test, dtype=np.uint8),
    }


def write_mnist(folder: pathlib.Path, arrays: dict[str, np.ndarray], *, gz: bool = True) -> dict[str, str]:
    """Writes the files into ``folder``; returns the sha256 of each written ``.gz`` file."""
    folder.mkdir(parents=True, exist_ok=True)
    checksums = {}
    for name, array in arrays.items():
        raw = idx_bytes(array)
        if gz:
            data = gzip.compress(raw, mtime=0)
            (folder / f"{name}.gz").write_bytes(data)
            checksums[f"{name}.gz"] = hashlib.sha256(data).hexdigest()
        else:
            (folder / name).write_bytes(raw)
    return checksums


def assert_matches(mnist: MNIST, arrays: dict[str, np.ndarray]) -> None:
    images = {"train": mnist.train_images, "test": mnist.test_images}
    labels = {"train": mnist.train_labels, "test": mnist.test_labels}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        expected = arrays[f"{prefix}-images-idx3-ubyte"].reshape(-1, 784).astype(np.float32) / np.float32(255)
        assert images[split].dtype == np.float32 and images[split].shape == expected.shape
        np.testing.assert_array_equal(images[split], expected)
        assert labels[split].dtype == np.int32
        np.testing.assert_array_equal(labels[split], arrays[f"{prefix}-labels-idx1-ubyte"])


@pytest.fixture(autouse=True)
def isolated_environment(monkeypatch, tmp_path):
    """No scg settings or proxies from the caller's shell; only loopback network."""
    for var in ("SCG_DATA_DIR", "SCG_CACHE_DIR", "SCG_MNIST_MIRRORS", "http_proxy", "https_proxy",
                "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))

    loopback = {"127.0.0.1", "::1", "localhost"}
    real_getaddrinfo = socket.getaddrinfo
    real_connect = socket.socket.connect

    def guarded_getaddrinfo(host, *args, **kwargs):
        if host not in loopback:
            raise RuntimeError(f"test tried to resolve {host!r}; only loopback is allowed")
        return real_getaddrinfo(host, *args, **kwargs)

    def guarded_connect(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in loopback:
            raise RuntimeError(f"test tried to connect to {address!r}; only loopback is allowed")
        return real_connect(self, address)

    monkeypatch.setattr(socket, "getaddrinfo", guarded_getaddrinfo)
    monkeypatch.setattr(socket.socket, "connect", guarded_connect)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # keep test output clean
        pass


@pytest.fixture
def http_root(tmp_path):
    """(folder served, base URL) of a local HTTP server on 127.0.0.1."""
    root = tmp_path / "served"
    root.mkdir()
    handler = functools.partial(_QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    # A short poll interval keeps shutdown() (and so each test) fast.
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.fixture
def mirror(http_root):
    """A good mirror at <base>/good/ serving synthetic MNIST; returns (arrays, checksums, base)."""
    root, base = http_root
    arrays = synthetic_mnist()
    checksums = write_mnist(root / "good", arrays)
    return arrays, checksums, base


@pytest.fixture
def silent_mirror():
    """Base URL of a server on 127.0.0.1 that accepts every connection and never answers."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.01)
    stop, held = threading.Event(), []

    def accept_and_sleep():
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except TimeoutError:
                pass

    thread = threading.Thread(target=accept_and_sleep, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}/"
    finally:
        stop.set()
        thread.join()
        for connection in held:
            connection.close()
        server.close()


# --------------------------------------------------------------------------- #
# read_idx.
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("compress", [False, True])
def test_read_idx_images_and_labels(tmp_path, compress):
    arrays = synthetic_mnist()
    for name, array in arrays.items():
        raw = idx_bytes(array)
        path = tmp_path / name
        path.write_bytes(gzip.compress(raw) if compress else raw)
        magic = IDX_IMAGES_MAGIC if array.ndim == 3 else IDX_LABELS_MAGIC
        result = read_idx(path, expected_magic=magic)
        assert result.dtype == np.uint8 and result.flags.writeable
        np.testing.assert_array_equal(result, array)


def test_read_idx_detects_gzip_by_content_not_suffix(tmp_path):
    array = np.arange(12, dtype=np.uint8).reshape(3, 4)
    (tmp_path / "gzipped-without-suffix").write_bytes(gzip.compress(idx_bytes(array)))
    (tmp_path / "raw-with-suffix.gz").write_bytes(idx_bytes(array))
    np.testing.assert_array_equal(read_idx(tmp_path / "gzipped-without-suffix"), array)
    np.testing.assert_array_equal(read_idx(tmp_path / "raw-with-suffix.gz"), array)


@pytest.mark.parametrize("dtype", [np.int8, np.int16, np.int32, np.float32, np.float64])
def test_read_idx_other_dtypes_native_endian(tmp_path, dtype):
    array = (np.arange(-6, 6) * 3).astype(dtype).reshape(2, 3, 2)
    (tmp_path / "x").write_bytes(idx_bytes(array))
    result = read_idx(tmp_path / "x")
    assert result.dtype == np.dtype(dtype) and result.dtype.isnative
    np.testing.assert_array_equal(result, array)


def test_read_idx_bad_magic_names_file_and_magic(tmp_path):
    path = tmp_path / "not-idx"
    path.write_bytes(b"\x12\x34\x56\x78" + bytes(16))
    with pytest.raises(DataError, match=r"not-idx.*bad magic number 0x12345678"):
        read_idx(path)


def test_read_idx_unknown_dtype_code_is_bad_magic(tmp_path):
    path = tmp_path / "odd"
    path.write_bytes(bytes([0, 0, 0x07, 1]) + (4).to_bytes(4, "big") + bytes(4))
    with pytest.raises(DataError, match=r"bad magic number 0x00000701"):
        read_idx(path)


def test_read_idx_expected_magic_mismatch(tmp_path):
    path = tmp_path / "labels"
    path.write_bytes(idx_bytes(np.zeros(5, np.uint8)))
    with pytest.raises(
        DataError, match=r"labels.*magic number 0x00000801 \(uint8, 1 dims\), expected 0x00000803 \(uint8, 3 dims\)"
    ):
        read_idx(path, expected_magic=IDX_IMAGES_MAGIC)


def test_read_idx_truncated_payload_reports_byte_counts(tmp_path):
    path = tmp_path / "short-images"
    path.write_bytes(idx_bytes(np.zeros((1, 28, 28), np.uint8))[:-84])
    with pytest.raises(
        DataError, match=r"short-images.*is truncated.*need a payload of 784 bytes, but the file holds 700 bytes"
    ):
        read_idx(path)


def test_read_idx_truncated_header(tmp_path):
    path = tmp_path / "short-header"
    path.write_bytes(bytes([0, 0, 0x08, 3]) + (1).to_bytes(4, "big"))
    with pytest.raises(DataError, match=r"short-header.*is truncated.*declares 3 dimensions.*needs 16 bytes.*has 8"):
        read_idx(path)


def test_read_idx_dims_smaller_than_payload(tmp_path):
    # Header says 2 images but the payload holds 3: wrong dimensions.
    content = bytearray(idx_bytes(np.zeros((3, 28, 28), np.uint8)))
    content[4:8] = (2).to_bytes(4, "big")
    path = tmp_path / "wrong-dims"
    path.write_bytes(bytes(content))
    with pytest.raises(DataError, match=r"wrong-dims.*has trailing bytes.*\(2, 28, 28\).*1568 bytes.*2352 bytes"):
        read_idx(path)


def test_read_idx_truncated_gzip_stream(tmp_path):
    data = gzip.compress(idx_bytes(np.arange(1000, dtype=np.int32)))
    path = tmp_path / "cut.gz"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"cut\.gz.*not a valid gzip stream.*truncated or corrupted"):
        read_idx(path)


def test_read_idx_missing_file(tmp_path):
    with pytest.raises(DataError, match=r"IDX file not found: .*nowhere"):
        read_idx(tmp_path / "nowhere")


# --------------------------------------------------------------------------- #
# Settings.
# --------------------------------------------------------------------------- #


def test_data_dir_from_flag_then_env_then_none(monkeypatch, tmp_path):
    assert data_dir_from(None) is None
    assert data_dir_from("") is None
    monkeypatch.setenv("SCG_DATA_DIR", str(tmp_path / "env"))
    assert data_dir_from(None) == tmp_path / "env"
    assert data_dir_from(str(tmp_path / "flag")) == tmp_path / "flag"


def test_cache_dir_and_mirrors_settings(monkeypatch, tmp_path):
    assert cache_dir_from(None) == tmp_path / "xdg-cache" / "scg"
    monkeypatch.setenv("SCG_CACHE_DIR", str(tmp_path / "c"))
    assert cache_dir_from(None) == tmp_path / "c"
    assert cache_dir_from(tmp_path / "arg") == tmp_path / "arg"
    monkeypatch.setenv("SCG_MNIST_MIRRORS", " http://a/ , http://b/,")
    assert mirrors_from(None) == ("http://a/", "http://b/")
    assert mirrors_from(["http://c/"]) == ("http://c/",)
    monkeypatch.setenv("SCG_MNIST_MIRRORS", " , ")
    assert mirrors_from(None) == DEFAULT_MNIST_MIRRORS
    with pytest.raises(TypeError, match=r"sequence of base URLs.*mirrors=\['http://c/'\]"):
        mirrors_from("http://c/")


# --------------------------------------------------------------------------- #
# load_mnist from local files.
# --------------------------------------------------------------------------- #


def test_load_mnist_from_data_dir_gz_and_raw(tmp_path):
    arrays = synthetic_mnist()
    gz_part = dict(list(arrays.items())[:2])
    raw_part = dict(list(arrays.items())[2:])
    write_mnist(tmp_path / "data" / "mnist", gz_part, gz=True)
    write_mnist(tmp_path / "data" / "mnist", raw_part, gz=False)
    mnist = load_mnist(tmp_path / "data", download=False)
    assert_matches(mnist, arrays)
    assert mnist.train_images.min() >= 0.0 and mnist.train_images.max() <= 1.0


def test_load_mnist_reads_data_dir_from_env(monkeypatch, tmp_path):
    arrays = synthetic_mnist(seed=3)
    write_mnist(tmp_path / "data" / "mnist", arrays)
    monkeypatch.setenv("SCG_DATA_DIR", str(tmp_path / "data"))
    assert_matches(load_mnist(download=False), arrays)


def test_load_mnist_rejects_wrong_image_size(tmp_path):
    arrays = synthetic_mnist()
    arrays["train-images-idx3-ubyte"] = np.zeros((6, 28, 27), np.uint8)
    write_mnist(tmp_path / "mnist", arrays)
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte\.gz.*shape \(28, 27\), expected \(28, 28\)"):
        load_mnist(tmp_path, download=False)


def test_load_mnist_rejects_image_label_count_mismatch(tmp_path):
    arrays = synthetic_mnist()
    arrays["t10k-labels-idx1-ubyte"] = np.zeros(3, np.uint8)
    write_mnist(tmp_path / "mnist", arrays)
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte\.gz.*holds 4 images but .*t10k-labels.*3 labels"):
        load_mnist(tmp_path, download=False)


def test_load_mnist_missing_without_download_lists_files_and_folders(tmp_path):
    write_mnist(tmp_path / "data" / "mnist", dict(list(synthetic_mnist().items())[:3]))
    with pytest.raises(DataError) as caught:
        load_mnist(tmp_path / "data", cache_dir=tmp_path / "cache", download=False)
    message = str(caught.value)
    assert "1 of the 4 files" in message and "t10k-labels-idx1-ubyte" in message
    assert str(tmp_path / "data" / "mnist") in message and str(tmp_path / "cache" / "mnist") in message
    assert "download=False" in message and "--data-dir <DIR>" in message and "SCG_DATA_DIR" in message


# --------------------------------------------------------------------------- #
# load_mnist downloads (local HTTP server).
# --------------------------------------------------------------------------- #


def test_download_succeeds_verifies_caches_and_says_so(mirror, tmp_path, capsys):
    arrays, checksums, base = mirror
    cache = tmp_path / "cache"
    mnist = load_mnist(cache_dir=cache, mirrors=[base + "good/"], checksums=checksums, timeout=7)
    assert_matches(mnist, arrays)
    assert sorted(p.name for p in (cache / "mnist").iterdir()) == sorted(checksums)  # no temp files left
    printed = capsys.readouterr()
    assert printed.out == ""
    assert printed.err.splitlines() == [
        f"scg: downloading {name}.gz from {base}good/{name}.gz into {cache / 'mnist'} (timeout 7 s)"
        for name in MNIST_FILES
    ]
    # The second load is served from the cache: no mirror, no downloads, nothing printed.
    assert_matches(load_mnist(cache_dir=cache, mirrors=[], download=False, checksums=checksums), arrays)
    assert capsys.readouterr().err == ""


def test_files_in_data_dir_are_used_without_network(tmp_path, monkeypatch, capsys):
    arrays = synthetic_mnist(seed=4)
    write_mnist(tmp_path / "data" / "mnist", arrays)

    def no_network(*args, **kwargs):
        raise AssertionError("load_mnist used the network although the data dir holds every file")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    # download=True (the default) and a mirror: the files in the data dir win.
    assert_matches(load_mnist(tmp_path / "data", cache_dir=tmp_path / "cache", mirrors=["http://127.0.0.1:9/"]),
                   arrays)
    assert capsys.readouterr().err == ""
    assert not (tmp_path / "cache").exists()


def test_download_uses_env_cache_and_mirrors(mirror, tmp_path, monkeypatch):
    arrays, checksums, base = mirror
    monkeypatch.setenv("SCG_CACHE_DIR", str(tmp_path / "env-cache"))
    monkeypatch.setenv("SCG_MNIST_MIRRORS", base + "good")  # no trailing slash on purpose
    assert_matches(load_mnist(checksums=checksums), arrays)
    assert (tmp_path / "env-cache" / "mnist" / "train-images-idx3-ubyte.gz").is_file()


def test_download_only_fetches_files_missing_from_data_dir(http_root, tmp_path):
    root, base = http_root
    arrays = synthetic_mnist()
    local = dict(list(arrays.items())[:2])
    remote = dict(list(arrays.items())[2:])
    write_mnist(tmp_path / "data" / "mnist", local)
    checksums = write_mnist(root / "good", remote)
    cache = tmp_path / "cache"
    mnist = load_mnist(tmp_path / "data", cache_dir=cache, mirrors=[base + "good/"], checksums=checksums)
    assert_matches(mnist, arrays)
    assert sorted(p.name for p in (cache / "mnist").iterdir()) == sorted(checksums)


def test_download_rejects_checksum_mismatch(http_root, tmp_path):
    root, base = http_root
    arrays = synthetic_mnist()
    checksums = write_mnist(root / "good", arrays)
    write_mnist(root / "bad", synthetic_mnist(seed=1))  # same names, other bytes
    cache = tmp_path / "cache"
    with pytest.raises(DataError) as caught:
        load_mnist(cache_dir=cache, mirrors=[base + "bad/"], checksums=checksums)
    message = str(caught.value)
    assert "4 of the 4 files" in message
    for name in MNIST_FILES:
        line = next(line for line in message.splitlines() if f"{base}bad/{name}.gz: " in line)
        assert "checksum mismatch, the download was rejected and deleted" in line
        assert checksums[f"{name}.gz"] in line  # the expected hash
    assert list((cache / "mnist").iterdir()) == []  # nothing unverified was kept, no temporary files


def test_checksum_mismatch_falls_through_to_next_mirror(http_root, tmp_path):
    root, base = http_root
    arrays = synthetic_mnist()
    checksums = write_mnist(root / "good", arrays)
    write_mnist(root / "bad", synthetic_mnist(seed=1))
    mnist = load_mnist(cache_dir=tmp_path / "cache", mirrors=[base + "bad/", base + "good/"], checksums=checksums)
    assert_matches(mnist, arrays)


def test_404_mirror_falls_through_to_second(mirror, tmp_path):
    arrays, checksums, base = mirror
    mnist = load_mnist(cache_dir=tmp_path / "cache", mirrors=[base + "missing/", base + "good/"], checksums=checksums)
    assert_matches(mnist, arrays)


def test_all_mirrors_failing_reports_every_url_and_how_to_fix(mirror, tmp_path):
    _, checksums, base = mirror
    with socket.socket() as probe:  # a port nobody listens on: connection refused
        probe.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{probe.getsockname()[1]}/"
    with pytest.raises(DataError) as caught:
        load_mnist(tmp_path / "data", cache_dir=tmp_path / "cache", mirrors=[base + "missing/", dead, "file:///x/"],
                   checksums=checksums)
    message = str(caught.value)
    assert "4 of the 4 files" in message
    for name in MNIST_FILES:
        assert f"{base}missing/{name}.gz: HTTP 404" in message
    assert f"{dead}train-images-idx3-ubyte.gz: cannot connect" in message and "Connection refused" in message
    assert f"{dead}t10k-labels-idx1-ubyte.gz: skipped: mirror unreachable earlier (cannot connect" in message
    assert "file:///x/train-images-idx3-ubyte.gz: not an http(s) URL" in message
    assert "file:///x/t10k-labels-idx1-ubyte.gz: skipped: mirror unreachable earlier (not an http(s) URL" in message
    assert str(tmp_path / "data" / "mnist") in message
    assert "--data-dir <DIR> or set SCG_DATA_DIR=<DIR>" in message and "SCG_MNIST_MIRRORS" in message


def test_silent_mirror_is_abandoned_within_the_timeout(silent_mirror, mirror, tmp_path, capsys):
    arrays, checksums, base = mirror
    start = time.monotonic()
    mnist = load_mnist(cache_dir=tmp_path / "cache", mirrors=[silent_mirror, base + "good/"], checksums=checksums,
                       timeout=1)
    elapsed = time.monotonic() - start
    assert_matches(mnist, arrays)
    assert elapsed < 10, f"took {elapsed:.1f} s with a 1 s timeout"
    # The silent mirror is tried once (the first file), then skipped; every file comes from the good one.
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == (f"scg: downloading {MNIST_FILES[0]}.gz from {silent_mirror}{MNIST_FILES[0]}.gz into "
                        f"{tmp_path / 'cache' / 'mnist'} (timeout 1 s)")
    assert [line.split(" from ")[1].split(" into ")[0] for line in lines[1:]] == [
        f"{base}good/{name}.gz" for name in MNIST_FILES]


def test_only_a_silent_mirror_gives_data_error_within_the_timeout(silent_mirror, tmp_path):
    start = time.monotonic()
    with pytest.raises(DataError) as caught:
        load_mnist(cache_dir=tmp_path / "cache", mirrors=[silent_mirror], timeout=1)
    elapsed = time.monotonic() - start
    assert elapsed < 10, f"took {elapsed:.1f} s with a 1 s timeout"
    message = str(caught.value)
    assert f"{silent_mirror}{MNIST_FILES[0]}.gz: no answer within the timeout of 1 s" in message
    for name in MNIST_FILES[1:]:
        assert f"{silent_mirror}{name}.gz: skipped: mirror unreachable earlier (no answer within" in message
    assert list((tmp_path / "cache" / "mnist").iterdir()) == []


def test_damaged_cached_file_is_replaced(mirror, tmp_path):
    arrays, checksums, base = mirror
    cache = tmp_path / "cache"
    load_mnist(cache_dir=cache, mirrors=[base + "good/"], checksums=checksums)
    damaged = cache / "mnist" / "train-labels-idx1-ubyte.gz"
    damaged.write_bytes(b"\x1f\x8b garbage")
    assert_matches(load_mnist(cache_dir=cache, mirrors=[base + "good/"], checksums=checksums), arrays)
    assert hashlib.sha256(damaged.read_bytes()).hexdigest() == checksums[damaged.name]


def test_download_without_known_checksum_is_refused(mirror, tmp_path):
    _, checksums, base = mirror
    partial = {k: v for k, v in checksums.items() if not k.startswith("t10k-labels")}
    with pytest.raises(DataError, match=r"no known sha256 for 't10k-labels-idx1-ubyte\.gz'.*checksums="):
        load_mnist(cache_dir=tmp_path / "cache", mirrors=[base + "good/"], checksums=partial)


# --------------------------------------------------------------------------- #
# Binarized MNIST.
# --------------------------------------------------------------------------- #


def amat_text(rows: np.ndarray, newline: str = "\n") -> bytes:
    return "".join(" ".join(str(int(v)) for v in row) + newline for row in rows).encode()


def write_binarized(folder: pathlib.Path, splits: dict[str, np.ndarray], *, gz: bool) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for split, rows in splits.items():
        name = f"binarized_mnist_{split}.amat"
        text = amat_text(rows)
        if gz:
            (folder / f"{name}.gz").write_bytes(gzip.compress(text))
        else:
            (folder / name).write_bytes(text)


@pytest.mark.parametrize("gz", [False, True])
def test_load_binarized_mnist(tmp_path, gz):
    rng = np.random.default_rng(0)
    splits = {s: rng.integers(0, 2, (n, 784)) for s, n in (("train", 5), ("valid", 3), ("test", 2))}
    write_binarized(tmp_path / "binarized_mnist", splits, gz=gz)
    loaded = load_binarized_mnist(tmp_path)
    for array, expected in zip(loaded, splits.values()):
        assert array.dtype == np.float32 and array.shape == expected.shape
        np.testing.assert_array_equal(array, expected)


def test_load_binarized_mnist_tolerates_crlf_and_missing_final_newline(tmp_path):
    rng = np.random.default_rng(1)
    rows = rng.integers(0, 2, (3, 784))
    folder = tmp_path / "binarized_mnist"
    write_binarized(folder, {"valid": rows[:1], "test": rows[:1]}, gz=False)
    (folder / "binarized_mnist_train.amat").write_bytes(amat_text(rows, newline="\r\n").rstrip())
    train, _, _ = load_binarized_mnist(tmp_path)
    np.testing.assert_array_equal(train, rows)


def test_load_binarized_mnist_bad_content(tmp_path):
    folder = tmp_path / "binarized_mnist"
    write_binarized(folder, {"valid": np.zeros((1, 784)), "test": np.zeros((1, 784))}, gz=False)
    (folder / "binarized_mnist_train.amat").write_bytes(b"0 1 2\n")
    with pytest.raises(DataError, match=r"binarized_mnist_train\.amat.*line 1 has 3 values, expected 784"):
        load_binarized_mnist(tmp_path)
    (folder / "binarized_mnist_train.amat").write_bytes(amat_text(np.full((1, 784), 2)))
    with pytest.raises(DataError, match=r"binarized_mnist_train\.amat.*holds the value '2', expected only 0 and 1"):
        load_binarized_mnist(tmp_path)


@pytest.mark.parametrize("damage", ["truncated", "corrupted"])
def test_load_binarized_mnist_damaged_gzip_names_file_without_download_advice(tmp_path, damage):
    folder = tmp_path / "binarized_mnist"
    rng = np.random.default_rng(2)
    splits = {s: rng.integers(0, 2, (4, 784)) for s in ("train", "valid", "test")}
    write_binarized(folder, splits, gz=True)
    path = folder / "binarized_mnist_valid.amat.gz"
    data = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    else:
        path.write_bytes(data[:20] + bytes(b ^ 0xFF for b in data[20:40]) + data[40:])
    with pytest.raises(DataError) as caught:
        load_binarized_mnist(tmp_path)
    message = str(caught.value)
    assert str(path) in message and "truncated or corrupted" in message
    assert "download" not in message.lower()


def test_load_binarized_mnist_truncated_raw_file(tmp_path):
    folder = tmp_path / "binarized_mnist"
    write_binarized(folder, {s: np.ones((2, 784)) for s in ("train", "valid", "test")}, gz=False)
    path = folder / "binarized_mnist_test.amat"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(DataError, match=r"binarized_mnist_test\.amat.*line 2 has 734 values.*truncated") as caught:
        load_binarized_mnist(tmp_path)
    assert "download" not in str(caught.value).lower()


def test_load_binarized_mnist_missing(tmp_path):
    write_binarized(tmp_path / "binarized_mnist", {"train": np.zeros((1, 784))}, gz=True)
    missing = r"binarized_mnist_valid\.amat, binarized_mnist_test\.amat not found in .*binarized_mnist.*--data-dir"
    with pytest.raises(DataError, match=missing):
        load_binarized_mnist(tmp_path)
    with pytest.raises(DataError, match=r"no data dir given.*SCG_DATA_DIR"):
        load_binarized_mnist()


# --------------------------------------------------------------------------- #
# batches.
# --------------------------------------------------------------------------- #


def test_batches_deterministic_per_seed_and_epoch():
    x = np.arange(10)
    first = [b.tolist() for b in batches(x, 3, key_or_seed=7)]
    assert first == [b.tolist() for b in batches(x, 3, key_or_seed=7)]
    assert len(first) == 3 and all(len(b) == 3 for b in first)  # remainder dropped
    assert len(set(sum(first, []))) == 9  # no example twice
    other_epoch = [b.tolist() for b in batches(x, 3, key_or_seed=7, epoch=1)]
    assert other_epoch != first


def test_batches_tuple_shares_permutation_and_keeps_remainder():
    images, labels = np.arange(20).reshape(10, 2), np.arange(10) * 10
    seen = []
    for xb, yb in batches((images, labels), 4, key_or_seed=1, drop_remainder=False):
        np.testing.assert_array_equal(xb[:, 0] * 5, yb)
        seen.extend(yb.tolist())
    assert sorted(seen) == labels.tolist()


def test_batches_accepts_jax_keys():
    x = np.arange(8)
    typed = [b.tolist() for b in batches(x, 4, key_or_seed=jax.random.key(0))]
    raw = [b.tolist() for b in batches(x, 4, key_or_seed=jax.random.PRNGKey(0))]
    assert typed == raw and sorted(sum(typed, [])) == list(range(8))


def test_batches_errors():
    with pytest.raises(ValueError, match=r"different numbers of examples \[3, 2\]"):
        batches((np.zeros(3), np.zeros(2)), 1, key_or_seed=0)
    with pytest.raises(ValueError, match=r"batch_size 5 exceeds the 3 examples"):
        batches(np.zeros(3), 5, key_or_seed=0)
    with pytest.raises(ValueError, match=r"batch_size must be a positive int, got 0"):
        batches(np.zeros(3), 0, key_or_seed=0)
    with pytest.raises(ValueError, match=r"key_or_seed must be non-negative"):
        batches(np.zeros(3), 1, key_or_seed=-1)
    with pytest.raises(TypeError, match=r"key_or_seed must be .* got float"):
        batches(np.zeros(3), 1, key_or_seed=0.5)


# --------------------------------------------------------------------------- #
# The real data, when available.
# --------------------------------------------------------------------------- #


def _real_data_dir(subfolder: str) -> pathlib.Path:
    """SCG_DATA_DIR as set when the tests started; skips the test when it lacks ``subfolder``."""
    if not _REAL_DATA_DIR or not (pathlib.Path(_REAL_DATA_DIR) / subfolder).is_dir():
        pytest.skip(f"set SCG_DATA_DIR to a folder holding {subfolder}/ to test the real data")
    return pathlib.Path(_REAL_DATA_DIR)


def test_real_mnist_from_scg_data_dir():
    folder = _real_data_dir("mnist")
    mnist = load_mnist(folder, download=False)
    assert mnist.train_images.shape == (60000, 784) and mnist.test_images.shape == (10000, 784)
    assert mnist.train_labels.shape == (60000,) and mnist.test_labels.shape == (10000,)
    assert mnist.train_images.dtype == np.float32 and mnist.train_labels.dtype == np.int32
    assert mnist.train_images.min() == 0.0 and mnist.train_images.max() == 1.0
    np.testing.assert_allclose(mnist.train_images.mean() * 255, 33.318, atol=1e-3)
    np.testing.assert_array_equal(
        np.bincount(mnist.train_labels), [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    )


def test_real_binarized_mnist_from_scg_data_dir():
    folder = _real_data_dir("binarized_mnist")
    train, valid, test = load_binarized_mnist(folder)
    assert (train.shape, valid.shape, test.shape) == ((50000, 784), (10000, 784), (10000, 784))
    assert set(np.unique(train)) == {0.0, 1.0}
    np.testing.assert_allclose([train.mean(), valid.mean(), test.mean()], [0.13056, 0.13113, 0.13251], atol=1e-5)
