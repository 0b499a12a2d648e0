"""Atomic, bit-exact checkpoints of pytrees (parameters, optimizer state, keys, metrics).

File format (``FORMAT_VERSION`` 1): a numpy ``.npz`` archive written with
``allow_pickle=False``. Each array leaf is one member (``leaf_<i>.npy``); the
member ``__scg_checkpoint__.npy`` holds UTF-8 JSON (as ``uint8``) with the format
name and version and the tree structure: containers (dict, list, tuple,
NamedTuple, other registered pytree nodes), Python scalars and strings inline,
and for each array its member, dtype and library (numpy or JAX). Typed JAX PRNG
keys are stored as their ``jax.random.key_data`` plus the implementation name and
re-wrapped on load. Dtypes numpy cannot store natively (``bfloat16``, float8, ...)
are stored as same-width unsigned integers and viewed back, so every leaf
round-trips bit for bit.

Writes are atomic: the archive is written to a temporary file in the target's
folder, flushed and fsynced, then renamed over the target with ``os.replace``.
A failed or interrupted write leaves the previous checkpoint untouched and no
temporary file behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import tempfile
import zipfile
from collections.abc import Iterator, Mapping
from typing import IO, Any

import jax
import jax.numpy as jnp
import numpy as np

from scg import ScgError

__all__ = ["FORMAT_VERSION", "CheckpointError", "atomic_write", "load_checkpoint", "save_checkpoint"]

FORMAT_NAME = "scg.training.checkpoint"
FORMAT_VERSION = 1

_META_MEMBER = "__scg_checkpoint__"
# dtype kinds np.save stores natively without pickling.
_NATIVE_KINDS = frozenset("biufcSUmM")
_RAW_VIEWS = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}
_RECOVERY_HINT = "Delete the file to start afresh, or choose another --out."


class CheckpointError(ScgError, ValueError):
    """A checkpoint cannot be written or read, or does not match its template.

    Attributes:
      path: the checkpoint file.
      leaf: the ``/``-separated path of the offending leaf in the tree, or None.
    """

    def __init__(self, message: str, *, path: os.PathLike | str, leaf: str | None = None):
        super().__init__(message)
        self.path = os.fspath(path)
        self.leaf = leaf


# --------------------------------------------------------------------------- #
# Atomic file writes.
# --------------------------------------------------------------------------- #


def _fsync_dir(folder: pathlib.Path) -> None:
    """Makes a rename in ``folder`` durable; best effort (not every OS allows it)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_write(path: os.PathLike | str) -> Iterator[IO[bytes]]:
    """Opens a binary file that replaces ``path`` only when the block succeeds.

    Writes go to a temporary file in the same folder (so the final
    ``os.replace`` is an atomic rename on one file system); on success it is
    flushed, fsynced and renamed over ``path``. On any exception the temporary
    file is removed, ``path`` keeps its previous content, and the exception
    propagates. Missing parent folders are created.

    Example::

        with atomic_write("out/figure.png") as f:
            figure.savefig(f, format="png")
    """
    target = pathlib.Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    # ".name.<random>.suffix.tmp": hidden, and matched by "*.png.tmp"-style ignores.
    fd, tmp_name = tempfile.mkstemp(
        dir=target.parent, prefix=f".{target.stem}.", suffix=f"{target.suffix}.tmp"
    )
    tmp = pathlib.Path(tmp_name)
    try:
        # mkstemp makes 0600 files; keep the mode a plain open() would give.
        mode = target.stat().st_mode & 0o777 if target.exists() else 0o644
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(target.parent)


# --------------------------------------------------------------------------- #
# Encoding: pytree -> (JSON structure, arrays).
# --------------------------------------------------------------------------- #


def _join(prefix: str, key: Any) -> str:
    return f"{prefix}/{key}" if prefix else str(key)


def _is_namedtuple(node: Any) -> bool:
    return isinstance(node, tuple) and hasattr(type(node), "_fields")


def _is_typed_key(node: Any) -> bool:
    return isinstance(node, jax.Array) and jax.dtypes.issubdtype(node.dtype, jax.dtypes.prng_key)


def _is_key_template(node: Any) -> bool:
    """A typed key array or a ``jax.ShapeDtypeStruct`` describing one."""
    dtype = getattr(node, "dtype", None)
    return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def _is_custom_pytree_node(node: Any) -> bool:
    """A registered pytree node that is not a dict/list/tuple/None (e.g. a dataclass)."""
    return not jax.tree_util.treedef_is_leaf(jax.tree_util.tree_structure(node))


def _children(node: Any) -> tuple[list[Any], Any]:
    """One level of a registered pytree node: its children and its treedef."""
    return jax.tree_util.tree_flatten(node, is_leaf=lambda child: child is not node)


def _type_name(node: Any) -> str:
    return f"{type(node).__module__}.{type(node).__qualname__}"


class _Encoder:
    """Walks a pytree once, collecting arrays and the JSON description of the tree."""

    def __init__(self, path: pathlib.Path):
        self.path = path
        self.arrays: dict[str, np.ndarray] = {}

    def _store(self, array: np.ndarray) -> str:
        member = f"leaf_{len(self.arrays)}"
        self.arrays[member] = array
        return member

    def _array(self, array: np.ndarray, lib: str, where: str) -> dict:
        dtype = array.dtype
        record = {"t": "array", "lib": lib, "dtype": dtype.name, "shape": list(array.shape)}
        if dtype.kind in _NATIVE_KINDS and dtype.isbuiltin == 1:
            record["m"] = self._store(array)
        elif dtype.itemsize in _RAW_VIEWS and dtype.kind != "O":
            # bfloat16, float8, int4, ...: numpy would save them as opaque void
            # bytes, so store the same bits as unsigned ints and view them back.
            record["m"] = self._store(np.ascontiguousarray(array).view(_RAW_VIEWS[dtype.itemsize]))
            record["raw"] = True
        else:
            raise CheckpointError(
                f"cannot save the leaf {where!r}: arrays of dtype {dtype} are not supported "
                "(object arrays would need pickle). Convert it to a numeric array.",
                path=self.path,
                leaf=where,
            )
        return record

    def encode(self, node: Any, where: str = "") -> dict:
        if node is None:
            return {"t": "none"}
        if isinstance(node, bool):  # before int: bool is an int subclass
            return {"t": "bool", "v": node}
        if isinstance(node, int):
            return {"t": "int", "v": node}
        if isinstance(node, float):
            return {"t": "float", "v": node}  # json writes repr(float): exact round trip
        if isinstance(node, str):
            return {"t": "str", "v": node}
        if _is_typed_key(node):
            data = np.asarray(jax.random.key_data(node))
            return {"t": "key", "impl": str(jax.random.key_impl(node)), "m": self._store(data)}
        if isinstance(node, jax.Array):
            return self._array(np.asarray(node), "jax", where)
        if isinstance(node, np.ndarray):
            return self._array(node, "numpy", where)
        if isinstance(node, np.generic):
            return self._array(np.asarray(node), "numpy_scalar", where)
        if isinstance(node, dict):
            bad = [k for k in node if not isinstance(k, str)]
            if bad:
                raise CheckpointError(
                    f"cannot save the dict at {where or '<root>'!r}: its key {bad[0]!r} is a "
                    f"{type(bad[0]).__name__}; checkpoints need string keys. Use str(key).",
                    path=self.path,
                    leaf=where,
                )
            return {
                "t": "dict",
                "k": list(node),
                "c": [self.encode(v, _join(where, k)) for k, v in node.items()],
            }
        if _is_namedtuple(node):
            fields = list(type(node)._fields)
            return {
                "t": "namedtuple",
                "name": _type_name(node),
                "fields": fields,
                "c": [self.encode(v, _join(where, f)) for f, v in zip(fields, node)],
            }
        if isinstance(node, (list, tuple)):
            kind = "list" if isinstance(node, list) else "tuple"
            return {"t": kind, "c": [self.encode(v, _join(where, i)) for i, v in enumerate(node)]}
        if _is_custom_pytree_node(node):
            children, _ = _children(node)
            return {
                "t": "node",
                "name": _type_name(node),
                "c": [self.encode(v, _join(where, i)) for i, v in enumerate(children)],
            }
        raise CheckpointError(
            f"cannot save the leaf {where or '<root>'!r} of type {_type_name(node)}: checkpoints "
            "hold numpy/JAX arrays, JAX PRNG keys, None, bool, int, float, str, and dicts, "
            "lists, tuples and pytree nodes of these. Convert it to one of them.",
            path=self.path,
            leaf=where,
        )


def save_checkpoint(path: os.PathLike | str, tree: Any) -> None:
    """Writes ``tree`` to ``path`` atomically, every leaf bit for bit.

    Args:
      path: the file to write (conventionally ``*.npz``; no suffix is added).
        Missing parent folders are created; an existing file is replaced only
        once the new one is completely on disk.
      tree: a pytree (usually a dict) of numpy/JAX arrays of any dtype, typed or
        raw JAX PRNG keys, None, bool, int, float and str, in dicts with string
        keys, lists, tuples, NamedTuples (e.g. optax states) and other registered
        pytree nodes.

    Raises:
      CheckpointError: a leaf cannot be stored (names its path in the tree).
      OSError: the file cannot be written; the previous checkpoint is intact.
    """
    target = pathlib.Path(path)
    encoder = _Encoder(target)
    # Encode (and copy arrays off the device) before touching the disk, so an
    # unsupported leaf fails without creating any file.
    structure = encoder.encode(tree)
    header = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "jax_version": jax.__version__,
        "numpy_version": np.__version__,
        "tree": structure,
    }
    header_bytes = np.frombuffer(json.dumps(header).encode("utf-8"), dtype=np.uint8)
    with atomic_write(target) as f:
        np.savez(f, allow_pickle=False, **{_META_MEMBER: header_bytes}, **encoder.arrays)


# --------------------------------------------------------------------------- #
# Decoding: (JSON structure, arrays) -> pytree, optionally checked against `like`.
# --------------------------------------------------------------------------- #

_NO_TEMPLATE = object()


def _describe(node: dict) -> str:
    """A short description of an encoded node for mismatch messages."""
    kind = node["t"]
    if kind == "array":
        return f"{node['lib']} array of shape {tuple(node['shape'])} and dtype {node['dtype']}"
    if kind == "key":
        return f"PRNG key ({node['impl']})"
    if kind in ("namedtuple", "node"):
        return f"{node['name']} with {len(node['c'])} children"
    if kind in ("list", "tuple"):
        return f"{kind} of length {len(node['c'])}"
    if kind == "dict":
        return f"dict with keys {sorted(node['k'])}"
    return kind


def _describe_template(like: Any) -> str:
    if _is_typed_key(like):
        return f"PRNG key ({jax.random.key_impl(like)})"
    if _is_key_template(like):
        return f"PRNG key of shape {tuple(like.shape)}"
    if hasattr(like, "shape") and hasattr(like, "dtype"):
        return f"{_type_name(like)} of shape {tuple(like.shape)} and dtype {like.dtype}"
    if isinstance(like, dict):
        return f"dict with keys {sorted(like)}"
    if isinstance(like, (list, tuple)):
        return f"{_type_name(like)} of length {len(like)}"
    return _type_name(like)


def _resolve_dtype(name: str) -> np.dtype:
    try:
        return np.dtype(name)
    except TypeError:
        import ml_dtypes  # installed with jax; registers bfloat16, float8, int4, ...

        return np.dtype(getattr(ml_dtypes, name))


class _Decoder:
    def __init__(self, path: pathlib.Path, members: Mapping[str, np.ndarray]):
        self.path = path
        self.members = members

    def mismatch(self, where: str, node: dict, like: Any) -> CheckpointError:
        return CheckpointError(
            f"checkpoint {os.fspath(self.path)!r} does not match the template (like=) at leaf "
            f"{where or '<root>'!r}: the file holds a {_describe(node)}, the template a "
            f"{_describe_template(like)}. It was written for another model or configuration; "
            f"load it without like= to inspect it. {_RECOVERY_HINT}",
            path=self.path,
            leaf=where or "<root>",
        )

    def member(self, name: str, where: str) -> np.ndarray:
        if name not in self.members:
            raise CheckpointError(
                f"checkpoint {os.fspath(self.path)!r} is corrupted: the array of leaf "
                f"{where!r} (member {name!r}) is missing. {_RECOVERY_HINT}",
                path=self.path,
                leaf=where,
            )
        return self.members[name]

    def array(self, node: dict, where: str) -> np.ndarray:
        stored = self.member(node["m"], where)
        dtype = _resolve_dtype(node["dtype"])
        array = stored.view(dtype) if node.get("raw") else stored
        if array.dtype != dtype or list(array.shape) != node["shape"]:
            raise CheckpointError(
                f"checkpoint {os.fspath(self.path)!r} is corrupted: leaf {where!r} should be "
                f"{tuple(node['shape'])} {dtype} but is {array.shape} {array.dtype}. "
                f"{_RECOVERY_HINT}",
                path=self.path,
                leaf=where,
            )
        return array

    def decode(self, node: dict, where: str = "", like: Any = _NO_TEMPLATE) -> Any:
        checked = like is not _NO_TEMPLATE
        kind = node["t"]
        if kind in ("none", "bool", "int", "float", "str"):
            value = node.get("v")
            if checked and type(like) is not type(value):
                raise self.mismatch(where, node, like)
            return value
        if kind == "key":
            data = self.member(node["m"], where)
            if checked and not (
                _is_key_template(like)
                and (not _is_typed_key(like) or str(jax.random.key_impl(like)) == node["impl"])
                and len(like.shape) == data.ndim - 1
                and tuple(like.shape) == data.shape[: len(like.shape)]
            ):
                raise self.mismatch(where, node, like)
            return jax.random.wrap_key_data(jnp.asarray(data), impl=node["impl"])
        if kind == "array":
            array = self.array(node, where)
            lib = node["lib"]
            if checked:
                if _is_key_template(like) or not (hasattr(like, "shape") and hasattr(like, "dtype")):
                    raise self.mismatch(where, node, like)
                if tuple(like.shape) != array.shape or np.dtype(like.dtype) != array.dtype:
                    raise self.mismatch(where, node, like)
                # The template decides the library: a numpy template gets numpy back.
                if isinstance(like, np.generic):
                    lib = "numpy_scalar"
                elif isinstance(like, np.ndarray):
                    lib = "numpy"
                else:
                    lib = "jax"  # jax.Array or jax.ShapeDtypeStruct
            if lib == "jax":
                return jnp.asarray(array)
            if lib == "numpy_scalar":
                return array[()]
            return array
        children = node["c"]
        if kind == "dict":
            keys = node["k"]
            if not checked:
                return {k: self.decode(c, _join(where, k)) for k, c in zip(keys, children)}
            if not isinstance(like, dict):
                raise self.mismatch(where, node, like)
            if set(keys) != set(like):
                missing = sorted(set(like) - set(keys))
                extra = sorted(set(keys) - set(like))
                first = _join(where, (missing or extra)[0])
                raise CheckpointError(
                    f"checkpoint {os.fspath(self.path)!r} does not match the template (like=) "
                    f"at leaf {first!r}: the dict at {where or '<root>'!r} lacks keys {missing} "
                    f"that the template has and has keys {extra} that it lacks. It was written "
                    "for another model or configuration; load it without like= to inspect it. "
                    f"{_RECOVERY_HINT}",
                    path=self.path,
                    leaf=first,
                )
            by_key = dict(zip(keys, children))
            restored = {k: self.decode(by_key[k], _join(where, k), like[k]) for k in like}
            return restored if type(like) is dict else type(like)(restored)
        if kind == "namedtuple":
            fields = node["fields"]
            if not checked:
                # The original class may not be importable; an equivalent namedtuple
                # with the same name and fields compares equal to it.
                cls = _namedtuple_class(node["name"], fields)
                return cls(*(self.decode(c, _join(where, f)) for f, c in zip(fields, children)))
            if not _is_namedtuple(like) or list(type(like)._fields) != fields:
                raise self.mismatch(where, node, like)
            return type(like)(
                *(self.decode(c, _join(where, f), l) for f, c, l in zip(fields, children, like))
            )
        if kind in ("list", "tuple"):
            container = list if kind == "list" else tuple
            if not checked:
                return container(self.decode(c, _join(where, i)) for i, c in enumerate(children))
            if type(like) is not container or len(like) != len(children):
                raise self.mismatch(where, node, like)
            return container(
                self.decode(c, _join(where, i), l) for i, (c, l) in enumerate(zip(children, like))
            )
        if kind == "node":
            if not checked:
                raise CheckpointError(
                    f"checkpoint {os.fspath(self.path)!r} holds a {node['name']} pytree node at "
                    f"{where or '<root>'!r}, which can only be rebuilt from a template: pass "
                    "like= (a pytree of the same structure, e.g. freshly initialized state).",
                    path=self.path,
                    leaf=where or "<root>",
                )
            if _type_name(like) != node["name"] or not _is_custom_pytree_node(like):
                raise self.mismatch(where, node, like)
            like_children, treedef = _children(like)
            if len(like_children) != len(children):
                raise self.mismatch(where, node, like)
            return jax.tree_util.tree_unflatten(
                treedef,
                [self.decode(c, _join(where, i), l) for i, (c, l) in enumerate(zip(children, like_children))],
            )
        raise CheckpointError(
            f"checkpoint {os.fspath(self.path)!r} is corrupted: unknown node kind {kind!r} at "
            f"{where or '<root>'!r}. {_RECOVERY_HINT}",
            path=self.path,
            leaf=where or "<root>",
        )


_NAMEDTUPLE_CLASSES: dict[tuple[str, tuple[str, ...]], type] = {}


def _namedtuple_class(qualified_name: str, fields: list[str]) -> type:
    """A namedtuple class standing in for ``qualified_name``; one per (name, fields)."""
    key = (qualified_name, tuple(fields))
    if key not in _NAMEDTUPLE_CLASSES:
        from collections import namedtuple

        short_name = qualified_name.rsplit(".", 1)[-1]
        _NAMEDTUPLE_CLASSES[key] = namedtuple(short_name, fields, rename=True)
    return _NAMEDTUPLE_CLASSES[key]


def _read_archive(path: pathlib.Path) -> tuple[dict, dict[str, np.ndarray]]:
    """The JSON header and every array member of a checkpoint file."""
    corrupted = (
        f"checkpoint {os.fspath(path)!r} is corrupted or truncated, or is not an scg "
        f"checkpoint"
    )
    try:
        # Opening the file here (not in np.load) guarantees it is closed even
        # when np.load fails on a damaged archive.
        with open(path, "rb") as file:
            # np.load would take a non-zip file for a pickle and suggest unpickling
            # it; a checkpoint is always a zip archive, so refuse anything else here.
            if file.read(4) != b"PK\x03\x04":
                raise CheckpointError(
                    f"{corrupted}: it is not a zip (.npz) archive. {_RECOVERY_HINT}", path=path
                )
            file.seek(0)
            with np.load(file, allow_pickle=False) as archive:
                if _META_MEMBER not in archive.files:
                    raise CheckpointError(
                        f"{corrupted}: it has no {_META_MEMBER!r} member. {_RECOVERY_HINT}",
                        path=path,
                    )
                header = json.loads(archive[_META_MEMBER].tobytes().decode("utf-8"))
                # Reading each member to its end makes zipfile check its CRC-32.
                members = {name: archive[name] for name in archive.files if name != _META_MEMBER}
    except CheckpointError:
        raise
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, KeyError) as err:
        # BadZipFile: truncation or a failed CRC-32; ValueError: bad JSON, bad
        # UTF-8 or a bad .npy header inside the archive.
        raise CheckpointError(
            f"{corrupted} ({type(err).__name__}: {err}). {_RECOVERY_HINT}", path=path
        ) from err
    if not isinstance(header, dict) or header.get("format") != FORMAT_NAME:
        raise CheckpointError(
            f"{corrupted}: its header does not name the format {FORMAT_NAME!r}. {_RECOVERY_HINT}",
            path=path,
        )
    version = header.get("version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {os.fspath(path)!r} has format version {version!r}; this scg reads "
            f"versions up to {FORMAT_VERSION}. Upgrade scg, or delete the file / choose "
            "another --out.",
            path=path,
        )
    return header, members


def load_checkpoint(path: os.PathLike | str, like: Any = None) -> Any:
    """Reads a checkpoint written by ``save_checkpoint``.

    Args:
      path: the checkpoint file.
      like: optional template pytree (e.g. freshly initialized params and
        optimizer state, or ``jax.eval_shape`` output). When given, the file
        must have the same structure, and every array the same shape and dtype;
        the result then has the template's container types (optax NamedTuple
        states, custom pytree nodes) and array libraries. Without it, dicts,
        lists, tuples and arrays come back as saved, and NamedTuples as
        equivalent namedtuples (equal, same fields, but not the original class).

    Returns:
      The saved tree, every leaf bit for bit (typed PRNG keys re-wrapped).

    Raises:
      FileNotFoundError: there is no file at ``path``.
      CheckpointError: the file is corrupted, truncated or from a newer format,
        or does not match ``like``; the message names the file and the first
        mismatching leaf path (also in ``error.leaf``).
    """
    target = pathlib.Path(path)
    if not target.is_file():
        raise FileNotFoundError(
            f"no checkpoint at {os.fspath(target)!r}: the file does not exist. Check the path "
            "(or --out), or start without resuming."
        )
    header, members = _read_archive(target)
    decoder = _Decoder(target, members)
    try:
        if like is None:
            return decoder.decode(header["tree"])
        return decoder.decode(header["tree"], "", like)
    except (KeyError, TypeError) as err:
        # A header that parses as JSON but not as a tree: damaged or hand-edited.
        raise CheckpointError(
            f"checkpoint {os.fspath(target)!r} is corrupted: its tree description is invalid "
            f"({type(err).__name__}: {err}). {_RECOVERY_HINT}",
            path=target,
        ) from err
