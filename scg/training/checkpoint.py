"""Atomic, bit-exact checkpoints of pytrees, written with orbax-checkpoint.

A checkpoint is a directory; each save adds an orbax checkpoint ``<dir>/<n>`` of two items:
``arrays``, the array leaves nested by tree path (``StandardSave``; typed PRNG keys as
``jax.random.key_data``), and ``scg``, JSON with the format version, each key's PRNG implementation and
the caller's metadata, and a CRC-32 of each array (orbax checks only its shard indexes). Orbax writes
``<n>.orbax-checkpoint-tmp`` and renames it when complete; only then are older saves (and leftovers of
interrupted ones) removed, so one complete save always remains.

Sharded arrays and several processes (``jax.distributed``): every process calls
:func:`save_checkpoint` (orbax writes each process's shards and synchronizes them); the save's number
is process 0's, and only process 0 removes older saves and leftovers. :func:`load_checkpoint` restores
each leaf with its template's sharding, so a checkpoint written on one mesh resumes on another (any
number of devices or processes).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import pathlib
import shutil
import tempfile
import zlib
from collections.abc import Iterable, Iterator, Mapping
from typing import IO, Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from scg import ScgError

__all__ = ["FORMAT_VERSION", "CheckpointError", "atomic_write", "load_checkpoint", "load_metadata", "remove_leftovers",
           "save_checkpoint"]

FORMAT_NAME = "scg.training.checkpoint"
FORMAT_VERSION = 2  # version 1 was a single .npz file
_HINT = "Delete it to start afresh, or choose another --out."
_CORRUPTED = "checkpoint {!r} is corrupted or truncated, or is not an scg checkpoint ({}: {}). " + _HINT


class CheckpointError(ScgError, ValueError):
    """A checkpoint cannot be written or read, or does not match its template. Attributes: ``path``, the
    checkpoint directory; ``leaf``, the ``/``-separated tree path of the offending leaf, or None."""

    def __init__(self, message: str, *, path: os.PathLike | str, leaf: str | None = None):
        super().__init__(message)
        self.path = os.fspath(path)
        self.leaf = leaf


@contextlib.contextmanager
def atomic_write(path: os.PathLike | str) -> Iterator[IO[bytes]]:
    """Opens a binary file that replaces ``path`` (via a fsynced temporary file and ``os.replace``) only
    when the block succeeds; on an exception ``path`` is left as it was. Creates missing parent folders."""
    target = pathlib.Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.stem}.", suffix=f"{target.suffix}.tmp")
    try:
        os.fchmod(fd, target.stat().st_mode & 0o777 if target.exists() else 0o644)
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise


def _leaves(tree: Any) -> tuple[list[tuple[str, Any]], Any]:  # ([("params/w", leaf), ...], treedef)
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    name = lambda k: str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))))
    return [("/".join(map(name, path)), leaf) for path, leaf in flat], treedef


def _nest(pairs: Iterable[tuple[str, Any]]) -> dict:  # [("a/b", x)] -> {"a": {"b": x}}, what orbax stores
    nested: dict = {}
    for where, value in pairs:
        *parents, last = where.split("/")
        functools.reduce(lambda node, part: node.setdefault(part, {}), parents, nested)[last] = value
    return nested


def _is_key(leaf: Any) -> bool:
    return hasattr(leaf, "dtype") and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key)


def _checkpointer() -> Any:  # synchronous; knows both items, so warns about neither
    return ocp.Checkpointer(ocp.CompositeCheckpointHandler(
        arrays=ocp.StandardCheckpointHandler(), scg=ocp.JsonCheckpointHandler()))


def _crc(array: Any) -> int | None:  # None for arrays split over processes: orbax checks only their indexes
    if getattr(array, "is_fully_addressable", True):
        return zlib.crc32(np.asarray(array).tobytes())
    if array.sharding.is_fully_replicated:  # every process holds the whole array
        return zlib.crc32(np.asarray(array.addressable_data(0)).tobytes())
    return None


def _main() -> bool:
    return jax.process_index() == 0


def remove_leftovers(path: os.PathLike | str) -> list[str]:
    """Removes the temporary directories of interrupted saves from the checkpoint directory ``path``
    (process 0 only); returns their names. Complete saves are kept."""
    root = pathlib.Path(path)
    if not _main() or not root.is_dir():
        return []
    found = sorted(root.glob("*.orbax-checkpoint-tmp*"))
    for leftover in found:
        shutil.rmtree(leftover, ignore_errors=True) if leftover.is_dir() else leftover.unlink(missing_ok=True)
    return [p.name for p in found]


def _agreed(n: int) -> int:  # process 0's number, on every process
    if jax.process_count() == 1:
        return n
    from jax.experimental import multihost_utils

    return int(multihost_utils.broadcast_one_to_all(np.int32(n)))


def _saves(root: pathlib.Path) -> list[int]:
    return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit())


def save_checkpoint(path: os.PathLike | str, tree: Any, metadata: Mapping[str, Any] | None = None) -> None:
    """Writes ``tree`` and the JSON-serializable ``metadata`` to the directory ``path`` atomically.

    ``tree``'s leaves must be numpy or JAX arrays (any dtype, sharded or not) or typed PRNG keys, in any
    containers. Raises CheckpointError naming a leaf that is none of these or TypeError for bad metadata
    (before writing anything), OSError if the write fails (the previous checkpoint stays).
    """
    root, arrays, keys = pathlib.Path(path).absolute(), {}, {}  # orbax wants absolute paths
    for where, leaf in _leaves(tree)[0]:
        if _is_key(leaf):
            keys[where], leaf = str(jax.random.key_impl(leaf)), jax.random.key_data(leaf)
        elif not isinstance(leaf, (jax.Array, np.ndarray)) or leaf.dtype == object:
            raise CheckpointError(f"cannot save the leaf {where!r} of type {type(leaf).__name__}: checkpoints "
                                  "hold numpy/JAX arrays and PRNG keys; pass other values as metadata.",
                                  path=root, leaf=where)
        arrays[where] = leaf
    info = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "keys": keys, "metadata": dict(metadata or {}),
            "crc32": {w: _crc(a) for w, a in arrays.items()}}
    json.dumps(info)  # refuse bad metadata before writing
    root.mkdir(parents=True, exist_ok=True)
    remove_leftovers(root)
    old = _saves(root)
    number = _agreed(max(old, default=0) + 1)
    items = {"scg": ocp.args.JsonSave(info)}
    if arrays:  # orbax refuses an empty item
        items["arrays"] = ocp.args.StandardSave(_nest(arrays.items()))
    with _checkpointer() as checkpointer:
        try:
            checkpointer.save(root / str(number), args=ocp.args.Composite(**items))
        except OSError:
            raise
        except Exception as err:  # tensorstore reports a full disk as ValueError; the previous save stays
            first = str(err).strip().splitlines()[0] if str(err).strip() else ""
            raise CheckpointError(f"cannot write the checkpoint {os.fspath(root)!r} ({type(err).__name__}: "
                                  f"{first}); the previous save is kept.", path=root) from err
    if _main():
        for n in old:
            if n != number:
                shutil.rmtree(root / str(n), ignore_errors=True)


def _open(root: pathlib.Path, checkpointer: Any) -> tuple[pathlib.Path, dict, dict]:
    """The newest complete save, its JSON item, and ``{leaf: (shape, dtype, key impl or None)}``."""
    if not root.is_dir():
        raise FileNotFoundError(f"no checkpoint at {os.fspath(root)!r}: the directory does not exist. "
                                "Check the path (or --out), or start without resuming.")
    try:
        if not _saves(root):
            raise ValueError("no complete save in it")
        step = root.absolute() / str(_saves(root)[-1])  # orbax wants absolute paths
        info = checkpointer.restore(step, args=ocp.args.Composite(scg=ocp.args.JsonRestore()))["scg"]
        if (info["format"], info["version"]) != (FORMAT_NAME, FORMAT_VERSION):
            raise ValueError(f"format {info['format']} {info['version']}; this scg reads version {FORMAT_VERSION}")
        stored = checkpointer.metadata(step).item_metadata.get("arrays")
        return step, info, {w: (tuple(m.shape), np.dtype(m.dtype).name, info["keys"].get(w))
                            for w, m in _leaves(stored.tree if stored is not None else {})[0]}
    except Exception as err:
        raise CheckpointError(_CORRUPTED.format(os.fspath(root), type(err).__name__, err), path=root) from err


def load_metadata(path: os.PathLike | str) -> dict:
    """The ``metadata`` saved with the checkpoint at ``path`` (raises like :func:`load_checkpoint`)."""
    with _checkpointer() as checkpointer:
        return dict(_open(pathlib.Path(path), checkpointer)[1]["metadata"])


def _expect(root: pathlib.Path, where: str, leaf: Any, impl: str | None) -> tuple[tuple, Any]:
    """What a template leaf expects, ``(shape, dtype, key impl)``, and what orbax restores it into."""
    sharding = getattr(leaf, "sharding", None)
    if _is_key(leaf):
        data = jax.eval_shape(jax.random.key_data, leaf)
        impl = str(jax.random.key_impl(leaf)) if isinstance(leaf, jax.Array) else impl or str(leaf.dtype)
        return (data.shape, data.dtype.name, impl), jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=sharding)
    if not hasattr(leaf, "shape"):
        raise CheckpointError(f"the template's leaf {where!r} is a {type(leaf).__name__}, not an array, PRNG key "
                              "or jax.ShapeDtypeStruct.", path=root, leaf=where)
    target = leaf if isinstance(leaf, np.ndarray) else jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)
    return (tuple(leaf.shape), np.dtype(leaf.dtype).name, None), target


def load_checkpoint(path: os.PathLike | str, like: Any) -> Any:
    """Reads the tree saved at ``path``, bit for bit, into the structure of the template ``like``.

    ``like``'s leaves are arrays or ``jax.ShapeDtypeStruct`` (e.g. from ``jax.eval_shape``) of the saved
    shapes and dtypes, typed PRNG keys where keys were saved; the result has its containers (optax
    NamedTuples, ...), array libraries and shardings. Raises FileNotFoundError (no directory at ``path``), or
    CheckpointError naming the directory and the first differing leaf (``error.leaf``) or the corruption.
    """
    root = pathlib.Path(path)
    with _checkpointer() as checkpointer:
        step, info, saved = _open(root, checkpointer)
        leaves, treedef = _leaves(like)
        expected = {w: _expect(root, w, leaf, info["keys"].get(w)) for w, leaf in leaves}
        wanted = {w: spec for w, (spec, _) in expected.items()}
        for leaf in (w for w in [*wanted, *saved] if wanted.get(w) != saved.get(w)):
            say = lambda s: "nothing" if s is None else (f"a {s[2]} PRNG key (data" if s[2] else "an array (dtype") + \
                f" {s[1]}, shape {s[0]})"
            raise CheckpointError(
                f"checkpoint {os.fspath(root)!r} does not match the template (like=) at leaf {leaf!r}: it holds "
                f"{say(saved.get(leaf))}, the template {say(wanted.get(leaf))}. It was written for another model "
                f"or configuration. {_HINT}", path=root, leaf=leaf)
        try:
            abstract = _nest((w, target) for w, (_, target) in expected.items())
            restored = checkpointer.restore(step, args=ocp.args.Composite(
                arrays=ocp.args.StandardRestore(abstract)))["arrays"] if abstract else {}
            values = dict(_leaves(restored)[0])
            for w, value in values.items():
                saved_crc, crc = info["crc32"].get(w), _crc(value)
                if None not in (saved_crc, crc) and saved_crc != crc:
                    raise ValueError(f"the data of leaf {w!r} fails its CRC-32 check")
        except Exception as err:
            raise CheckpointError(_CORRUPTED.format(os.fspath(root), type(err).__name__, err), path=root) from err
    return jax.tree_util.tree_unflatten(treedef, [jax.random.wrap_key_data(values[w], impl=info["keys"][w])
                                                  if info["keys"].get(w) else values[w] for w, _ in leaves])
