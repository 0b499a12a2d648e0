"""Data parallelism for the training loop: a one-axis device mesh, several processes, global batches.

The model of :func:`scg.training.fit` with ``mesh=``: each batch is split along its leading (plate,
example) axis over the mesh's ``"data"`` axis (``NamedSharding(mesh, P("data"))``); parameters,
optimizer state, baseline state and the run's key are replicated (``P()``) — the bundled models are
small (AEVB 784-1000-1000-30: 3.66 M parameters, 14.6 MB in float32; SBN 784-200: 0.31 M), so every
device holding all of them costs little, and the only communication a step needs is the all-reduce of
the gradients, which XLA's partitioner (GSPMD) inserts into the one jitted step. See docs/devices.md.

Several processes (``jax.distributed``): :func:`initialize` starts JAX's distributed runtime; the
mesh then spans every process's devices (:func:`data_mesh`), each process holds only its rows of a
batch (:func:`put_batch`), and only process 0 (:func:`is_main_process`) writes files other than
checkpoints.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

__all__ = [
    "DATA_AXIS",
    "barrier",
    "batch_rows",
    "batch_sharding",
    "check_batch_size",
    "data_mesh",
    "initialize",
    "is_main_process",
    "local_copy",
    "put_batch",
    "put_replicated",
    "replicated",
]

DATA_AXIS = "data"


def initialize(*, coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
               auto: bool = False, cpu_devices: int | None = None) -> None:
    """Starts JAX's distributed runtime (``jax.distributed.initialize``) before anything touches a device.

    Args:
      coordinator: ``HOST:PORT`` of process 0 (every process passes the same); with ``num_processes``
        and ``process_id``.
      num_processes, process_id: the number of processes and this one's index (0 … N−1).
      auto: let JAX read the cluster's settings (SLURM, Open MPI, Cloud TPU, ...): ``initialize()``
        with no arguments. Excludes the three above.
      cpu_devices: on CPU, how many devices this process shows (``jax_num_cpu_devices``; for tests
        and for trying the data-parallel code on one machine). None: leave JAX's default.

    On CPU, the collectives between processes go through gloo
    (``jax_cpu_collectives_implementation``), set here before the runtime starts. With none of
    ``coordinator``/``auto``, only ``cpu_devices`` is applied (a single process).
    """
    if cpu_devices is not None and "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        jax.config.update("jax_num_cpu_devices", int(cpu_devices))
    if auto and (coordinator or num_processes is not None or process_id is not None):
        raise ValueError("initialize: auto=True reads the cluster's settings; do not also pass coordinator, "
                         "num_processes or process_id.")
    if not auto and coordinator is None:
        if num_processes not in (None, 1) or process_id not in (None, 0):
            raise ValueError("initialize: several processes need the coordinator's address (HOST:PORT).")
        return
    if not auto and (num_processes is None or process_id is None):
        raise ValueError("initialize: with a coordinator, pass num_processes and process_id too.")
    if not auto and not 0 <= process_id < num_processes:
        raise ValueError(f"initialize: process_id must be between 0 and num_processes - 1 = {num_processes - 1}, "
                         f"got {process_id}.")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if auto:
        jax.distributed.initialize()
    else:
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                                   process_id=process_id)


def data_mesh(devices_per_process: int | None = None, *, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A one-axis mesh named ``"data"`` over the first ``devices_per_process`` devices of every process.

    Args:
      devices_per_process: how many of each process's devices to use (None: all of them). Every
        process must pass the same number.
      devices: use exactly these devices instead (one process).

    The devices are ordered by process, so each process's share of a batch is one contiguous block
    of rows (what :func:`put_batch` sends).
    """
    if devices is None:
        by_process: dict[int, list] = {}
        for d in jax.devices():
            by_process.setdefault(d.process_index, []).append(d)
        local = len(by_process[jax.process_index()])
        n = local if devices_per_process is None else int(devices_per_process)
        if not 1 <= n <= local:
            raise ValueError(f"data_mesh: asked for {devices_per_process} devices per process, but this process "
                             f"has {local} ({jax.local_devices()[0].platform}).")
        devices = [d for p in sorted(by_process) for d in sorted(by_process[p], key=lambda d: d.id)[:n]]
    return Mesh(np.array(list(devices)), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    """``NamedSharding(mesh, P())``: every device holds the whole array."""
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh, *, stacked: bool = False) -> NamedSharding:
    """``NamedSharding(mesh, P("data"))``: the leading (example) axis split over the devices
    (``P(None, "data")`` for a stack of batches, the step axis first)."""
    return NamedSharding(mesh, PartitionSpec(None, DATA_AXIS) if stacked else PartitionSpec(DATA_AXIS))


def is_main_process() -> bool:
    """Process 0: the one that prints and writes metrics, plots and results."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Waits until every process gets here (nothing to do with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def check_batch_size(batch_size: int, mesh: Mesh, what: str = "the batch size") -> None:
    """Raises ValueError unless ``batch_size`` splits evenly over the mesh's data axis."""
    n = mesh.shape[DATA_AXIS]
    if batch_size % n:
        raise ValueError(f"{what} ({batch_size}) must be divisible by the number of devices ({n}): each device "
                         f"takes an equal share of every batch. Choose a multiple of {n}, e.g. "
                         f"{max(n, batch_size - batch_size % n)}.")


def batch_rows(mesh: Mesh, batch_size: int) -> tuple[int, int]:
    """``(start, stop)``: the rows of a ``batch_size`` batch this process's devices hold (contiguous)."""
    check_batch_size(batch_size, mesh)
    index = batch_sharding(mesh).addressable_devices_indices_map((batch_size,))
    spans = sorted((s[0].start or 0, batch_size if s[0].stop is None else s[0].stop) for s in index.values())
    if any(a[1] != b[0] for a, b in zip(spans, spans[1:])):
        raise ValueError("batch_rows: this process's devices do not hold one contiguous block of the batch; build "
                         "the mesh with scg.training.data_mesh (devices ordered by process).")
    return spans[0][0], spans[-1][1]


def _put(value: Any, sharding: NamedSharding) -> jax.Array:
    """A global array with ``sharding`` from a value every process holds whole."""
    if isinstance(value, jax.Array) and jax.dtypes.issubdtype(value.dtype, jax.dtypes.prng_key):
        impl = jax.random.key_impl(value)
        return jax.random.wrap_key_data(_put(jax.random.key_data(value), sharding), impl=impl)
    if isinstance(value, jax.Array) and value.sharding == sharding:
        return value
    if isinstance(value, jax.Array) and not value.is_fully_addressable:
        value = value.addressable_data(0)  # replicated: any shard is the whole array
    host = np.asarray(value)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def put_replicated(tree: Any, mesh: Mesh) -> Any:
    """``tree`` with every array leaf replicated over ``mesh`` (typed PRNG keys too)."""
    sharding = replicated(mesh)
    return jax.tree_util.tree_map(lambda leaf: _put(leaf, sharding), tree)


def put_batch(local_rows: Sequence[Any], mesh: Mesh, batch_size: int, *, stacked: bool = False) -> tuple:
    """The global batch from this process's rows of it (``jax.make_array_from_process_local_data``).

    ``local_rows``: one array per data argument holding rows ``batch_rows(mesh, batch_size)`` of the
    batch (for ``stacked``, ``(steps, rows, ...)``); returns global arrays of ``batch_size`` rows split
    over the mesh's data axis.
    """
    sharding = batch_sharding(mesh, stacked=stacked)
    out = []
    for rows in local_rows:
        rows = np.asarray(rows)
        shape = (*rows.shape[:1], batch_size, *rows.shape[2:]) if stacked else (batch_size, *rows.shape[1:])
        out.append(jax.make_array_from_process_local_data(sharding, rows, shape))
    return tuple(out)


def local_copy(tree: Any) -> Any:
    """One device's copy of replicated arrays (no transfer: the first shard this process holds).

    For evaluation, plots and results after data-parallel training: a computation on the
    replicated arrays themselves would run once per device of the mesh (and, over several
    processes, needs every process to take part).
    """
    def one(leaf: Any) -> Any:
        if isinstance(leaf, jax.Array) and len(leaf.sharding.device_set) > 1:
            if not leaf.sharding.is_fully_replicated:
                raise ValueError("local_copy: the array is split over devices, not replicated.")
            return leaf.addressable_data(0)
        return leaf

    return jax.tree_util.tree_map(one, tree)
