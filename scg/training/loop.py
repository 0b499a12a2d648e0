"""The training loop: any compiled objective, any optax optimizer, resumable bit for bit.

``fit`` runs epochs of jitted optimizer steps on an :class:`scg.Objective` (or
anything with the same ``value_and_grad(params, *batch, key=, num_samples=)``
method), shows a progress bar per epoch, evaluates through a callback, appends
one JSON line per epoch to ``metrics.jsonl`` and writes an atomic checkpoint
after every epoch. Everything random is a pure function of the run's key and
the step or epoch number, so a run resumed from the checkpoint of epoch ``k``
ends with exactly the parameters of an uninterrupted run::

    objective = scg.compile(model)
    optimizer = optax.adam(1e-3)
    batches = scg.training.EpochBatches(train_images, 250, seed=0)
    state = scg.training.fit(objective, optimizer, params, batches, epochs=10,
                          key=jax.random.key(0), out_dir="runs/model",
                          evaluate=lambda params, key: {"test_loss": ...})

Stateful baselines (``objective.stateful``: a moving average, NVIL's learned
baseline) keep their state in :attr:`TrainState.baseline_state`; the step takes
and returns it, and checkpoints hold it, so such runs resume bit for bit too.

Data parallelism (``mesh=``, see :mod:`scg.training.devices` and docs/devices.md): each batch is
split along its leading (example) axis over the mesh's ``"data"`` axis, parameters, optimizer and
baseline state are replicated, and the step stays one jitted computation (GSPMD adds the gradient
all-reduce). The same key gives the same samples on any number of devices, so a run on one device and
on four follow the same trajectory up to the order of floating-point sums, and a checkpoint written on
one mesh resumes on another. With several processes (``jax.distributed``), each process sends only its
rows of each batch to its devices, and only process 0 prints and writes ``metrics.jsonl``; every
process takes part in the checkpoints.

Run folders: a new run refuses an ``out_dir`` that holds one (a checkpoint, ``metrics.jsonl`` or
``final.json``) unless ``resume=True`` (continue it) or ``overwrite=True`` (delete it and start
afresh); leftovers of interrupted writes are removed at the start.

Randomness: the run key is split once into a training and an evaluation key;
step ``s`` (counted over the whole run from 0) uses ``fold_in(train_key, s)``,
the evaluation after epoch ``e`` gets ``fold_in(eval_key, e)``, and the batch
order of epoch ``e`` is whatever ``batches(e)`` yields (for :class:`EpochBatches`,
a permutation seeded by ``(seed, e)``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import re
import shutil
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import scg
from scg.training import devices
from scg.training.checkpoint import (CheckpointError, atomic_write, load_checkpoint, load_metadata, remove_leftovers,
                                     save_checkpoint)
from scg.datasets import batches as _shuffled_batches
from scg import ScgError

__all__ = [
    "CHECKPOINT_NAME",
    "FINAL_NAME",
    "METRICS_NAME",
    "EpochBatches",
    "NonFiniteLossError",
    "RunExistsError",
    "TrainState",
    "evaluate_loss",
    "fit",
    "init_state",
    "load_state",
    "make_multi_step",
    "make_step",
    "run_files",
    "save_state",
]

CHECKPOINT_NAME = "checkpoint"  # a directory (see scg.training.checkpoint)
METRICS_NAME = "metrics.jsonl"
FINAL_NAME = "final.json"  # the command's results (scg.cli); part of a run, never left stale
_CHECKPOINT_KIND = "scg.training.TrainState"


class TrainState(NamedTuple):
    """Everything a run needs to continue.

    Attributes:
      params: the parameters (a pytree).
      opt_state: the optax optimizer state.
      key: the run's PRNG key (constant over the run; see the module docstring).
      epoch: epochs completed.
      step: optimizer steps completed over the whole run.
      metrics: one dict per completed epoch (what ``metrics.jsonl`` holds).
      baseline_state: the state of the objective's baseline (see
        ``Objective.init_baseline_state``); ``scg.baselines.EmptyState()`` for
        objectives whose baseline keeps none.
    """

    params: Any
    opt_state: Any
    key: jax.Array
    epoch: int
    step: int
    metrics: tuple
    baseline_state: Any = scg.baselines.EmptyState()


class NonFiniteLossError(ScgError, FloatingPointError):
    """The training loss became NaN or infinite; training stopped.

    Attributes:
      step: the global step (1-based, counted over the whole run) whose loss was not finite.
      epoch: the epoch (1-based) it belongs to.
      loss: the loss value.
      checkpoint: the last good checkpoint (left untouched), or None if none was written.
      site: the sample site whose distribution parameters were invalid at that step, when the
        objective is an :class:`scg.Objective` and a checked replay found one; else None.
      cause: what the replay of the step found (invalid parameters of a site, non-finite
        parameters or data), or None.
    """

    def __init__(self, message: str, *, step: int, epoch: int, loss: float, checkpoint: str | None,
                 site: str | None = None, cause: str | None = None):
        super().__init__(message)
        self.step = step
        self.epoch = epoch
        self.loss = loss
        self.checkpoint = checkpoint
        self.site = site
        self.cause = cause


class RunExistsError(ScgError, FileExistsError):
    """A new run was started in a folder that holds one. Attributes: ``path``, the folder;
    ``found``, the names of the run's files there (checkpoint, metrics.jsonl, final.json)."""

    def __init__(self, message: str, *, path: os.PathLike | str, found: Iterable[str]):
        super().__init__(message)
        self.path = os.fspath(path)
        self.found = tuple(found)


def init_state(params: Any, optimizer: optax.GradientTransformation, key: jax.Array, *,
               baseline_state: Any = scg.baselines.EmptyState()) -> TrainState:
    """The state before the first step: ``optimizer.init(params)``, epoch and step 0, no metrics.

    ``baseline_state``: the initial state of a stateful baseline, e.g.
    ``objective.init_baseline_state(params, *batch)`` (default: the objective keeps none).
    """
    return TrainState(params, optimizer.init(params), key, 0, 0, (), baseline_state)


def _step_body(objective: Any, optimizer: optax.GradientTransformation, num_samples: int) -> Callable:
    """``body(params, opt_state, baseline_state, train_key, step, batch) -> (params, opt_state, baseline_state, loss)``."""

    def body(params, opt_state, baseline_state, train_key, step, batch):
        key = jax.random.fold_in(train_key, step)
        loss, grads, baseline_state = objective.value_and_grad_with_state(
            params, *batch, key=key, num_samples=num_samples, baseline_state=baseline_state)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, baseline_state, loss

    return body


def make_step(objective: Any, optimizer: optax.GradientTransformation, *, num_samples: int = 1,
              mesh: jax.sharding.Mesh | None = None) -> Callable:
    """One jitted optimizer step on one batch.

    Args:
      objective: an :class:`scg.Objective` (anything with
        ``value_and_grad_with_state(params, *batch, key=, num_samples=, baseline_state=)``).
      optimizer: an optax ``GradientTransformation``.
      num_samples: particles averaged per gradient estimate.
      mesh: data parallelism over a one-axis mesh named ``"data"`` (e.g.
        :func:`scg.training.devices.data_mesh`): the step is jitted with explicit
        ``in_shardings``/``out_shardings``: every batch array split along its leading axis
        (``P("data")``; its length must divide evenly), everything else replicated (``P()``).
        Arguments must be placed accordingly for several processes
        (:func:`scg.training.devices.put_replicated`, :func:`~scg.training.devices.put_batch`).

    Returns:
      ``step(params, opt_state, baseline_state, train_key, step, *batch) ->
      (params, opt_state, baseline_state, loss)``: pure and jitted; the
      gradient's key is ``fold_in(train_key, step)``. ``baseline_state`` is the
      objective's (``objective.init_baseline_state(params, *batch)``;
      ``scg.baselines.EmptyState()`` when its baseline keeps none). The buffers
      of ``params``, ``opt_state`` and ``baseline_state`` are donated (do not
      reuse them).
    """
    body = _step_body(objective, optimizer, num_samples)
    if mesh is not None:
        return _sharded(body, mesh, stacked=False)

    def step(params, opt_state, baseline_state, train_key, step, *batch):
        return body(params, opt_state, baseline_state, train_key, step, batch)

    return jax.jit(step, donate_argnums=(0, 1, 2))


def _sharded(fn: Callable, mesh: jax.sharding.Mesh, *, stacked: bool) -> Callable:
    """``fn(params, opt_state, baseline_state, train_key, step, batch_tuple)`` jitted for ``mesh``,
    called as ``(..., step, *batch)``; the jitted function is its ``.jitted`` (for ``.lower``)."""
    rep, data = devices.replicated(mesh), devices.batch_sharding(mesh, stacked=stacked)
    jitted = jax.jit(fn, in_shardings=(rep, rep, rep, rep, rep, data), out_shardings=(rep, rep, rep, rep),
                     donate_argnums=(0, 1, 2))

    def step(params, opt_state, baseline_state, train_key, step, *batch):
        return jitted(params, opt_state, baseline_state, train_key, step, batch)

    step.jitted = jitted
    return step


def make_multi_step(objective: Any, optimizer: optax.GradientTransformation, *, num_samples: int = 1,
                    mesh: jax.sharding.Mesh | None = None) -> Callable:
    """Several optimizer steps in one dispatch (``lax.scan`` over a stack of batches).

    ``mesh``: as for :func:`make_step`; the stacked batches are split along their second
    (example) axis (``P(None, "data")``).

    Returns:
      ``multi_step(params, opt_state, baseline_state, train_key, first_step, *stacked) ->
      (params, opt_state, baseline_state, losses)`` where each array of ``stacked``
      has a leading axis of ``n`` batches; step ``i`` uses the key
      ``fold_in(train_key, first_step + i)``, as ``n`` calls of
      :func:`make_step`'s step would. ``losses``: ``(n,)``.
    """
    body = _step_body(objective, optimizer, num_samples)

    def multi_step(params, opt_state, baseline_state, train_key, first_step, *stacked):
        n = jax.tree_util.tree_leaves(stacked)[0].shape[0]

        def scan_body(carry, inputs):
            i, batch = inputs
            *carry, loss = body(*carry, train_key, first_step + i, batch)
            return tuple(carry), loss

        (params, opt_state, baseline_state), losses = jax.lax.scan(
            scan_body, (params, opt_state, baseline_state), (jnp.arange(n, dtype=jnp.int32), stacked))
        return params, opt_state, baseline_state, losses

    if mesh is not None:
        return _sharded(lambda p, o, b, k, s, stacked: multi_step(p, o, b, k, s, *stacked), mesh, stacked=True)
    return jax.jit(multi_step, donate_argnums=(0, 1, 2))


# --------------------------------------------------------------------------- #
# Data and evaluation.
# --------------------------------------------------------------------------- #


@dataclasses.dataclass(frozen=True)
class EpochBatches:
    """Shuffled minibatches per epoch: ``batches(epoch)`` is a pure function of ``(seed, epoch)``.

    Wraps :func:`scg.datasets.batches` (the last, smaller batch is dropped so
    shapes stay static). ``len(batches)`` is the number of steps per epoch.

    Attributes:
      data: one array or a tuple of arrays sharing the leading (example) axis.
      batch_size: examples per batch.
      seed: a non-negative int (or a JAX key) seeding every epoch's permutation.
    """

    data: Any
    batch_size: int
    seed: Any = 0

    def __post_init__(self) -> None:
        first = self.data[0] if isinstance(self.data, (tuple, list)) else self.data
        n = int(np.shape(first)[0])
        if not isinstance(self.batch_size, (int, np.integer)) or not 0 < self.batch_size <= n:
            raise ValueError(
                f"EpochBatches: batch_size must be an int between 1 and the number of examples ({n}), "
                f"got {self.batch_size!r}.")

    def __len__(self) -> int:
        first = self.data[0] if isinstance(self.data, (tuple, list)) else self.data
        return int(np.shape(first)[0]) // int(self.batch_size)

    def __call__(self, epoch: int) -> Iterable:
        return _shuffled_batches(self.data, self.batch_size, key_or_seed=self.seed, epoch=epoch)

    def rows(self, epoch: int, start: int, stop: int) -> Iterable[tuple]:
        """Rows ``start:stop`` of each batch of ``epoch`` (the same batches as ``self(epoch)``), gathering
        only those rows: what one process of a data-parallel run sends to its devices."""
        arrays = tuple(self.data) if isinstance(self.data, (tuple, list)) else (self.data,)
        n = int(np.shape(arrays[0])[0])
        # the permutation depends on (seed, epoch, n) only: batch the indices, then gather
        for index in _shuffled_batches(np.arange(n), self.batch_size, key_or_seed=self.seed, epoch=epoch):
            yield tuple(np.asarray(a[index[start:stop]]) for a in arrays)


def evaluate_loss(
    objective: Any, params: Any, data: Any, *, key: jax.Array, batch_size: int = 500, num_samples: int = 1
) -> float:
    """The example-weighted mean of ``objective.loss`` over ``data`` in batches (no shuffling).

    For models whose costs are per-batch means (divided by the batch size, as
    :mod:`scg.models.aevb`'s), this is the mean loss per example of the whole
    set. Batch ``j`` uses ``fold_in(key, j)``. A last, smaller batch is evaluated
    at its own size (one extra compilation); choose ``batch_size`` dividing the
    number of examples to avoid it.
    """
    arrays = tuple(data) if isinstance(data, (tuple, list)) else (data,)
    n = int(np.shape(arrays[0])[0])
    if n == 0:
        raise ValueError("evaluate_loss: the data set is empty.")
    batch_size = max(1, min(int(batch_size), n))
    total = 0.0
    for j, start in enumerate(range(0, n, batch_size)):
        batch = tuple(jnp.asarray(a[start : start + batch_size]) for a in arrays)
        loss = objective.loss(params, *batch, key=jax.random.fold_in(key, j), num_samples=num_samples)
        total += float(loss) * batch[0].shape[0]
    return total / n


# --------------------------------------------------------------------------- #
# Checkpoints and metrics files.
# --------------------------------------------------------------------------- #


def _json_config(config: Mapping[str, Any] | None) -> str:
    try:
        return json.dumps(dict(config or {}), sort_keys=True)
    except TypeError as err:
        raise TypeError(f"fit: config must be JSON-serializable (str, int, float, bool, None, lists): {err}") from err


class _Arrays(NamedTuple):
    """The arrays of a checkpoint, in the order mismatches are looked for (dicts would sort them)."""

    params: Any
    opt_state: Any
    key: jax.Array
    baseline_state: Any = None  # None (no leaves) where the baseline keeps no state


def save_state(path: os.PathLike | str, state: TrainState, config: Mapping[str, Any] | None = None) -> None:
    """Writes ``state`` (and the run's ``config``) to the directory ``path`` atomically (see
    :mod:`scg.training.checkpoint`): the arrays with orbax, epoch, step, metrics and config as JSON.

    The ``baseline_state`` of a stateful baseline is saved too (an ``EmptyState`` or None is not).
    """
    stateful = _keeps_baseline_state(state.baseline_state)
    arrays = _Arrays(state.params, state.opt_state, state.key, state.baseline_state if stateful else None)
    save_checkpoint(path, arrays, {"kind": _CHECKPOINT_KIND, "epoch": int(state.epoch), "step": int(state.step),
                                 "metrics": list(state.metrics), "config": json.loads(_json_config(config)),
                                 "baseline_state": stateful})


def load_state(path: os.PathLike | str, like: TrainState, config: Mapping[str, Any] | None = None) -> TrainState:
    """Reads a checkpoint written by :func:`save_state`, checked against a template state.

    Args:
      path: the checkpoint directory.
      like: a state of the same model and optimizer (e.g. :func:`init_state` of
        fresh parameters, with the initial ``baseline_state`` if the objective
        keeps one): every array must match its shape and dtype. The arrays are
        restored with its leaves' shardings (a checkpoint written on any mesh
        resumes on the template's).
      config: the run's settings; when given, must equal the ones saved (checked
        first, so a different architecture is reported by its setting).

    Raises:
      FileNotFoundError: no checkpoint at ``path``.
      CheckpointError: the checkpoint is corrupted, or was written for another model,
        optimizer, baseline or configuration (the message names the first difference).
    """
    meta = load_metadata(path)
    if meta.get("kind") != _CHECKPOINT_KIND:
        raise CheckpointError(f"checkpoint {os.fspath(path)!r} is a {meta.get('kind')!r}, not a training state.",
                              path=path, leaf="kind")
    try:
        metrics, saved_config = tuple(meta["metrics"]), dict(meta["config"])
        epoch, step = int(meta["epoch"]), int(meta["step"])
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"checkpoint {os.fspath(path)!r} is corrupted: its epoch, step, metrics or config "
                              f"are missing or invalid ({type(err).__name__}: {err}).", path=path,
                              leaf="metrics") from err
    if config is not None:  # before the arrays: a setting names the difference better than a shape
        wanted = json.loads(_json_config(config))
        differ = sorted(k for k in set(wanted) | set(saved_config) if wanted.get(k) != saved_config.get(k))
        if differ:
            listing = ", ".join(f"{k}: checkpoint {saved_config.get(k)!r} vs now {wanted.get(k)!r}" for k in differ)
            raise CheckpointError(
                f"checkpoint {os.fspath(path)!r} was written by a run with other settings ({listing}). "
                "Resume with the checkpoint's settings, or start a new run in another output folder (or "
                "overwrite this one).", path=path, leaf=f"config/{differ[0]}")
    stateful = _keeps_baseline_state(like.baseline_state)
    if meta.get("baseline_state") != stateful:
        saved, now = ("the state of a stateful baseline", "none") if meta.get("baseline_state") else \
            ("no baseline state", "one")
        raise CheckpointError(
            f"checkpoint {os.fspath(path)!r} does not match the template (like=) at leaf 'baseline_state': it "
            f"holds {saved}, but this run's baseline keeps {now}. Resume with the same baseline, or choose another "
            "output folder to start a new run.", path=path, leaf="baseline_state")
    arrays = load_checkpoint(path, like=_Arrays(like.params, like.opt_state, like.key,
                                                like.baseline_state if stateful else None))
    if len(metrics) != epoch or epoch < 0 or step < 0:
        raise CheckpointError(
            f"checkpoint {os.fspath(path)!r} is inconsistent: epoch {epoch} but {len(metrics)} metric "
            "records. Delete it to start afresh, or choose another output folder.", path=path, leaf="metrics")
    return TrainState(arrays.params, arrays.opt_state, arrays.key, epoch, step, metrics,
                      arrays.baseline_state if stateful else scg.baselines.EmptyState())


def _keeps_baseline_state(baseline_state: Any) -> bool:
    return baseline_state is not None and not isinstance(baseline_state, scg.baselines.EmptyState)


def _write_metrics(path: pathlib.Path, metrics: Iterable[Mapping]) -> None:
    with atomic_write(path) as f:
        f.write("".join(json.dumps(m) + "\n" for m in metrics).encode())


def _append_metrics(path: pathlib.Path, record: Mapping) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _finite_or_none(x: float) -> float | None:
    return x if math.isfinite(x) else None


# --------------------------------------------------------------------------- #
# The loop.
# --------------------------------------------------------------------------- #


def _as_tuple(batch: Any) -> tuple:
    return tuple(batch) if isinstance(batch, (tuple, list)) else (batch,)


def _groups(iterator: Iterable, size: int) -> Iterable[list]:
    group: list = []
    for item in iterator:
        group.append(_as_tuple(item))
        if len(group) == size:
            yield group
            group = []
    if group:
        yield group


def _format_record(record: Mapping, epochs: int) -> str:
    parts = [f"epoch {record['epoch']}/{epochs}"]
    for k, v in record.items():
        if k in ("epoch", "step"):
            continue
        if isinstance(v, float):
            parts.append(f"{k} {v:.1f}" if k == "seconds" else f"{k} {v:.3f}")
        elif v is not None:
            parts.append(f"{k} {v}")
    return "  ".join(parts)


def run_files(out_dir: os.PathLike | str) -> list[str]:
    """The files of a run in ``out_dir``: which of ``checkpoint``, ``metrics.jsonl`` and ``final.json`` exist."""
    out = pathlib.Path(out_dir)
    return [name for name in (CHECKPOINT_NAME, METRICS_NAME, FINAL_NAME) if (out / name).exists()]


def _remove(path: pathlib.Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _prepare_out(out: pathlib.Path, *, resume: bool, overwrite: bool) -> None:
    """Refuses to start a new run over an old one (unless ``overwrite``: then deletes it); removes the
    leftovers of interrupted writes. The removals happen on process 0; every process waits for them."""
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"the output folder {os.fspath(out)!r} is a file, not a folder; choose another.")
    found = run_files(out) if out.is_dir() else []
    if found and not resume and not overwrite:
        raise RunExistsError(
            f"{os.fspath(out)!r} already holds a run ({', '.join(found)}): pass resume=True to continue it, or "
            "overwrite=True to delete it and start afresh (or choose another output folder).", path=out, found=found)
    if devices.is_main_process() and out.is_dir():
        if overwrite and not resume:
            for name in found:
                _remove(out / name)
        remove_leftovers(out / CHECKPOINT_NAME)
        for leftover in out.glob(".*.tmp"):  # atomic_write's temporary files (metrics, final.json, plots)
            if leftover.is_file():
                leftover.unlink(missing_ok=True)
    devices.barrier("scg.training.fit: output folder prepared")


def _place(tree: Any, mesh: jax.sharding.Mesh | None) -> Any:
    """A copy of ``tree`` the steps may donate: replicated over ``mesh``, or on the default device."""
    if mesh is None:
        return jax.tree_util.tree_map(jnp.array, tree)
    placed = devices.put_replicated(tree, mesh)
    return jax.tree_util.tree_map(jnp.array, placed)  # put_replicated may return the caller's arrays


def _fetch(x: jax.Array) -> np.ndarray:
    return np.asarray(x if x.is_fully_addressable else x.addressable_data(0))


def fit(
    objective: Any,
    optimizer: optax.GradientTransformation,
    params: Any,
    batches: Callable[[int], Iterable],
    *,
    epochs: int,
    key: jax.Array,
    num_samples: int = 1,
    baseline_state: Any = None,
    steps_per_dispatch: int = 1,
    evaluate: Callable[[Any, jax.Array], Mapping[str, Any]] | None = None,
    on_epoch_end: Callable[[TrainState], None] | None = None,
    out_dir: os.PathLike | str | None = None,
    resume: bool = False,
    overwrite: bool = False,
    config: Mapping[str, Any] | None = None,
    train_metric: str = "train_loss",
    progress: bool = True,
    log: Callable[[str], None] | None = print,
    mesh: jax.sharding.Mesh | None = None,
) -> TrainState:
    """Trains ``params`` for ``epochs`` epochs (in total, counting resumed ones).

    Args:
      objective: an :class:`scg.Objective` (anything with ``stateful``,
        ``init_baseline_state`` and ``value_and_grad_with_state``).
      optimizer: an optax ``GradientTransformation``.
      params: initial parameters; on ``resume``, the template the checkpoint must
        match (its values are not used). Not modified (the loop works on a copy).
      batches: ``epoch -> iterable of batches`` (0-based epoch; a batch is an array
        or a tuple of arrays passed as ``objective``'s data arguments), a pure
        function of the epoch for reproducible resumes, e.g. :class:`EpochBatches`.
        ``len(batches)``, if defined, sizes the progress bar. With a ``mesh``, a
        ``batches.rows(epoch, start, stop)`` method (as :class:`EpochBatches` has)
        is used to gather only this process's rows of each batch.
      epochs: the epoch to train up to.
      key: the run's PRNG key (see the module docstring).
      num_samples: particles per gradient estimate.
      baseline_state: for an objective with a stateful baseline
        (``objective.stateful``), the state to start from (e.g. a pre-trained
        learned baseline); None: ``objective.init_baseline_state(params,
        *first_batch)`` with the first batch of ``batches(0)``. It is carried
        from step to step, kept in :attr:`TrainState.baseline_state` and in the
        checkpoints (on ``resume``, the template of the saved one). Must be
        None for objectives without one.
      steps_per_dispatch: optimizer steps per jitted call (``lax.scan`` over that
        many batches; a smaller last group per epoch compiles once more).
      evaluate: ``(params, key) -> {name: value}`` called after every epoch (on
        every process, with one device's copy of the parameters); its entries join
        the epoch's metrics record.
      on_epoch_end: ``state -> None`` called after the checkpoint of each epoch is
        written (plots, ...), on every process; with a ``mesh`` the state's arrays
        are replicated over it (:func:`scg.training.devices.local_copy` gives one
        device's copy).
      out_dir: where the ``checkpoint`` directory and ``metrics.jsonl`` go; None: nowhere.
      resume: continue from ``out_dir``'s checkpoint (a stale ``final.json`` there is
        removed before training goes on).
      overwrite: start a new run in an ``out_dir`` that holds one, deleting its
        checkpoint, ``metrics.jsonl`` and ``final.json`` first. Without it (and
        without ``resume``) such a folder is refused (:class:`RunExistsError`).
      config: JSON-serializable settings saved in the checkpoint; resuming with
        different ones is refused (architecture, seed, batch size, ...).
      train_metric: the metrics key of the epoch's mean training loss.
      progress: show a tqdm progress bar per epoch with the running loss (process 0).
      log: where each epoch's one-line summary goes (None: nowhere; process 0 only).
      mesh: train data-parallel over this one-axis mesh named ``"data"`` (see
        :func:`scg.training.devices.data_mesh`; it may span several processes):
        every batch is split along its leading axis, whose length must be divisible
        by the number of devices; parameters, optimizer and baseline state are
        replicated. None: one device, as plain ``jax.jit``.

    Returns:
      The final :class:`TrainState`. Each epoch's record in ``state.metrics`` has
      ``epoch`` (1-based), ``step``, ``train_metric`` (the mean loss over the
      epoch's steps), the entries of ``evaluate``, and ``seconds`` (wall time
      since the run started, summed over resumed sessions).

    Raises:
      NonFiniteLossError: a loss was NaN or infinite; names the global step and
        the epoch, and, for an :class:`scg.Objective`, the site whose distribution
        parameters were invalid (found by replaying the epoch up to that step on
        one device and running the step with ``scg.compile(..., checked=True)``);
        the last good checkpoint is left as it was.
      RunExistsError: ``out_dir`` holds a run and neither ``resume`` nor ``overwrite`` was given.
      CheckpointError, FileNotFoundError: on ``resume``, the checkpoint is
        missing, corrupted or from another configuration.
    """
    from tqdm.auto import tqdm

    if not isinstance(epochs, (int, np.integer)) or epochs < 0:
        raise ValueError(f"fit: epochs must be a non-negative int, got {epochs!r}.")
    if not isinstance(steps_per_dispatch, (int, np.integer)) or steps_per_dispatch < 1:
        raise ValueError(f"fit: steps_per_dispatch must be a positive int, got {steps_per_dispatch!r}.")
    if resume and overwrite:
        raise ValueError("fit: resume=True continues the run in out_dir, overwrite=True deletes it; pass one.")
    if mesh is not None and devices.DATA_AXIS not in mesh.axis_names:
        raise ValueError(f"fit: the mesh needs an axis named {devices.DATA_AXIS!r}; it has {mesh.axis_names}.")
    if mesh is not None and isinstance(getattr(batches, "batch_size", None), (int, np.integer)):
        devices.check_batch_size(int(batches.batch_size), mesh, "fit: the batch size")
    out = pathlib.Path(out_dir) if out_dir is not None else None
    checkpoint = out / CHECKPOINT_NAME if out is not None else None
    metrics_file = out / METRICS_NAME if out is not None else None
    _json_config(config)  # refuse a bad config before any work
    main = devices.is_main_process()
    if out is not None:
        _prepare_out(out, resume=resume, overwrite=overwrite)

    stateful = bool(objective.stateful)
    if not stateful and baseline_state is None:
        baseline_state = scg.baselines.EmptyState()
    elif stateful and baseline_state is None:
        first_batch = next(iter(batches(0)), None)
        if first_batch is None:
            raise ValueError("fit: batches(0) yielded no batch; an epoch needs at least one.")
        baseline_state = objective.init_baseline_state(devices.local_copy(params),
                                                       *map(jnp.asarray, _as_tuple(first_batch)))
    elif not stateful and _keeps_baseline_state(baseline_state):
        raise ValueError("fit: baseline_state was given, but the objective's baseline keeps no state "
                         "(objective.stateful is False).")
    # Copies: the steps donate their input buffers, and the caller keeps its params (and the
    # baseline keeps the initial state it hands out). With a mesh, replicated over it.
    fresh = init_state(_place(params, mesh), optimizer, key if mesh is None else _place(key, mesh),
                       baseline_state=_place(baseline_state, mesh))
    if mesh is not None:  # optimizer.init may leave scalars (step counts) on the default device
        fresh = fresh._replace(opt_state=devices.put_replicated(fresh.opt_state, mesh))
    if resume:
        if checkpoint is None:
            raise ValueError("fit: resume=True needs out_dir (the folder holding the checkpoint).")
        if not checkpoint.is_dir():
            raise FileNotFoundError(
                f"cannot resume: there is no checkpoint at {os.fspath(checkpoint)!r}. Run without resuming "
                "to start a new run, or point the output folder at an earlier run.")
        state = load_state(checkpoint, fresh, config)  # restored with fresh's shardings: any mesh
    else:
        state = fresh
    if out is not None and main:
        out.mkdir(parents=True, exist_ok=True)
        if state.epoch < epochs:  # results of the run's end are about to be outdated
            (out / FINAL_NAME).unlink(missing_ok=True)
        _write_metrics(metrics_file, state.metrics)  # consistent with the checkpoint we continue from
    devices.barrier("scg.training.fit: started")

    def make(factory: Callable) -> Callable:
        return factory(objective, optimizer, num_samples=num_samples, mesh=mesh)

    step_fn = make(make_step) if steps_per_dispatch == 1 else None
    multi_fn = make(make_multi_step) if steps_per_dispatch > 1 else None
    copy = lambda tree: jax.tree_util.tree_map(jnp.array, tree)  # keeps each array's sharding
    train_key, eval_key = jax.random.split(state.key)
    local_eval_key = devices.local_copy(eval_key)
    seconds_before = float(state.metrics[-1].get("seconds", 0.0)) if state.metrics else 0.0
    start = time.perf_counter()
    total = len(batches) if hasattr(batches, "__len__") else None
    # the steps donate their inputs: `state` keeps the epoch's first arrays (the NaN guard replays from them)
    params, opt_state, baseline = copy(state.params), copy(state.opt_state), copy(state.baseline_state)
    step = state.step
    feed = _Feed(batches, mesh)

    for epoch in range(state.epoch, epochs):
        losses: list[np.ndarray] = []
        running, count = 0.0, 0
        bar = tqdm(total=total, desc=f"epoch {epoch + 1}/{epochs}", unit="step", disable=not (progress and main),
                   leave=False, dynamic_ncols=True)
        try:
            for group in _groups(feed.epoch(epoch), steps_per_dispatch):
                carried = (params, opt_state, baseline)
                first = feed.counter(step)
                if multi_fn is None:
                    *carried, loss = step_fn(*carried, train_key, first, *feed.batch(group[0]))
                else:
                    *carried, loss = multi_fn(*carried, train_key, first, *feed.stack(group))
                values = _fetch(loss).astype(np.float64).reshape(-1)
                params, opt_state, baseline = carried
                bad = np.flatnonzero(~np.isfinite(values))
                if bad.size:
                    at = step + int(bad[0]) + 1
                    site, cause = _diagnose(objective, optimizer, num_samples, state, batches, epoch, at,
                                            train_key)
                    _raise_non_finite(at, epoch + 1, float(values[bad[0]]), checkpoint, site, cause)
                losses.append(values)
                step += values.size
                running, count = running + float(values.sum()), count + values.size
                bar.update(values.size)
                bar.set_postfix_str(f"loss {running / count:.3f}", refresh=False)
        finally:
            bar.close()
        if not losses:
            raise ValueError(f"fit: batches({epoch}) yielded no batch; an epoch needs at least one.")
        record: dict[str, Any] = {"epoch": epoch + 1, "step": step,
                                  train_metric: _finite_or_none(float(np.concatenate(losses).mean()))}
        if evaluate is not None:
            record.update(evaluate(devices.local_copy(params), jax.random.fold_in(local_eval_key, epoch)))
        record["seconds"] = seconds_before + time.perf_counter() - start
        state = TrainState(params, opt_state, state.key, epoch + 1, step, (*state.metrics, record), baseline)
        if out is not None:
            save_state(checkpoint, state, config)  # every process: orbax writes each one's shards
            if main:
                _append_metrics(metrics_file, record)
        if log is not None and main:
            log(_format_record(record, epochs))
        if on_epoch_end is not None:
            on_epoch_end(state)
        # the donated buffers now belong to the next step; keep the state's arrays valid
        if epoch + 1 < epochs:
            params, opt_state, baseline = copy(params), copy(opt_state), copy(baseline)
    return state


class _Feed:
    """Batches as the step takes them: device arrays on one device, or global arrays over a mesh built
    from this process's rows only."""

    def __init__(self, batches: Callable[[int], Iterable], mesh: jax.sharding.Mesh | None):
        self.batches, self.mesh = batches, mesh
        self.size: int | None = None
        self.rows: tuple[int, int] | None = None
        self.counters: dict[int, jax.Array] = {}

    def epoch(self, epoch: int) -> Iterable[tuple]:
        if self.mesh is None:
            return (_as_tuple(b) for b in self.batches(epoch))
        size = getattr(self.batches, "batch_size", None)
        if hasattr(self.batches, "rows") and isinstance(size, (int, np.integer)):
            self._sized(int(size))
            return self.batches.rows(epoch, *self.rows)
        return (self._local(_as_tuple(b)) for b in self.batches(epoch))  # the whole batch, then our rows

    def _sized(self, size: int) -> None:
        if self.size is None:
            devices.check_batch_size(size, self.mesh, "fit: the batch size (the batches' leading axis)")
            self.size, self.rows = size, devices.batch_rows(self.mesh, size)
        elif size != self.size:
            raise ValueError(f"fit: with a mesh every batch must have {self.size} examples (got {size}).")

    def _local(self, batch: tuple) -> tuple:
        sizes = {int(np.shape(a)[0]) if np.ndim(a) else None for a in batch}
        if len(sizes) != 1 or None in sizes:
            raise ValueError("fit: with a mesh every data argument must have the same leading (example) axis; "
                             f"got leading sizes {sorted(map(str, sizes))}.")
        self._sized(sizes.pop())
        start, stop = self.rows
        return tuple(np.asarray(a)[start:stop] for a in batch)

    def batch(self, batch: tuple) -> tuple:
        if self.mesh is None:
            return tuple(map(jnp.asarray, batch))
        return devices.put_batch(batch, self.mesh, self.size)

    def stack(self, group: list) -> tuple:
        stacked = tuple(np.stack(parts) for parts in zip(*group))
        if self.mesh is None:
            return tuple(map(jnp.asarray, stacked))
        return devices.put_batch(stacked, self.mesh, self.size, stacked=True)

    def counter(self, step: int) -> jax.Array:
        if self.mesh is None or jax.process_count() == 1:
            return jnp.asarray(step, jnp.int32) if self.mesh is None else np.int32(step)
        return devices.put_replicated(np.int32(step), self.mesh)


# --------------------------------------------------------------------------- #
# The NaN guard.
# --------------------------------------------------------------------------- #


def _first_non_finite(tree: Any) -> str | None:
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    for path, leaf in flat:
        array = np.asarray(leaf)
        if array.dtype.kind in "fc" and not np.all(np.isfinite(array)):
            return jax.tree_util.keystr(path)
    return None


def _diagnose(objective: Any, optimizer: optax.GradientTransformation, num_samples: int, start: TrainState,
              batches: Callable[[int], Iterable], epoch: int, bad_step: int, train_key: jax.Array
              ) -> tuple[str | None, str | None]:
    """``(site, cause)`` of the non-finite loss of global step ``bad_step`` (1-based): replays the epoch
    from ``start`` (its first state, which the steps did not donate) up to that step on one device,
    then looks at that step's inputs: non-finite data, non-finite parameters, and, for an
    :class:`scg.Objective`, the step run by a checked copy (``scg.compile(..., checked=True)``), whose
    ModelError names the site. Best effort: (None, None) when nothing is found."""
    try:
        local = devices.local_copy
        params, opt_state = local(start.params), local(start.opt_state)
        baseline, train_key = local(start.baseline_state), local(train_key)
        body = jax.jit(_step_body(objective, optimizer, num_samples))
        batch = None
        for s, item in enumerate(batches(epoch), start=start.step):
            batch = tuple(map(jnp.asarray, _as_tuple(item)))
            if s == bad_step - 1:
                break
            params, opt_state, baseline, _ = body(params, opt_state, baseline, train_key, jnp.int32(s), batch)
        else:
            return None, None
        where = _first_non_finite(batch)
        if where is not None:
            return None, f"the batch of that step holds NaN or infinite values (data argument {where})"
        where = _first_non_finite(params)
        if where is not None:
            return None, (f"the parameter {where} was already NaN or infinite before that step (the previous "
                          "update overflowed)")
        if not isinstance(objective, scg.Objective):
            return None, None
        checked = objective if objective.checked else scg.compile(
            objective.source, objective.passes, baseline=objective.baseline, objective=objective.objective,
            order=objective.order, checked=True)
        try:
            checked.value_and_grad_with_state(params, *batch, key=jax.random.fold_in(train_key, bad_step - 1),
                                              num_samples=num_samples, baseline_state=baseline)
        except scg.ModelError as err:
            message = str(err)
            found = re.search(r"site '([^']+)'", message)
            return (getattr(err, "site", None) or (found.group(1) if found else None)), message
        return None, None
    except Exception:  # the diagnosis must never hide the error it explains
        return None, None


def _raise_non_finite(step: int, epoch: int, loss: float, checkpoint: pathlib.Path | None,
                      site: str | None = None, cause: str | None = None) -> None:
    if checkpoint is not None and checkpoint.is_dir():
        kept = f"The last good checkpoint, {os.fspath(checkpoint)!r}, is kept as it was"
        where = os.fspath(checkpoint)
    else:
        kept = "No checkpoint had been written yet (the failure came before the end of the first epoch)"
        where = None
    found = f" Replaying the step: {cause}." if cause else ""
    raise NonFiniteLossError(
        f"training stopped: the loss is {loss} at global step {step} (epoch {epoch}).{found} {kept}. Lower the "
        "learning rate, check the data for NaN, or guard the model against overflow (e.g. log of 0).",
        step=step, epoch=epoch, loss=loss, checkpoint=where, site=site, cause=cause)
