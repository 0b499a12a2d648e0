"""Shuffled minibatches, a pure function of ``(key_or_seed, epoch)``."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

__all__ = ["batches"]


def _seed_entropy(key_or_seed: Any) -> list[int]:
    """Non-negative integers that seed numpy's SeedSequence, from an int, ints or a JAX key."""
    if isinstance(key_or_seed, (int, np.integer)) and not isinstance(key_or_seed, bool):
        words = [int(key_or_seed)]
    else:
        import jax  # only needed for JAX keys; keep the data module importable without it

        value = key_or_seed
        if isinstance(value, jax.Array) and jax.dtypes.issubdtype(value.dtype, jax.dtypes.prng_key):
            value = jax.random.key_data(value)
        array = np.asarray(value)
        if array.dtype.kind not in "iu" or array.size == 0:
            raise TypeError(
                "key_or_seed must be a non-negative int, a sequence of non-negative ints, or "
                f"a JAX PRNG key; got {type(key_or_seed).__name__} with dtype {array.dtype}."
            )
        words = [int(w) for w in array.ravel()]
    if any(w < 0 for w in words):
        raise ValueError(f"key_or_seed must be non-negative, got {key_or_seed!r}.")
    return words


def batches(
    array_or_tuple: np.ndarray | Sequence[np.ndarray],
    batch_size: int,
    *,
    key_or_seed: Any,
    epoch: int = 0,
    drop_remainder: bool = True,
) -> Iterator[Any]:
    """Shuffled minibatches for one epoch, a pure function of ``(key_or_seed, epoch)``.

    The permutation comes from ``numpy.random.default_rng([*seed, epoch])``, so a
    run restarted from a checkpoint at epoch ``e`` sees exactly the batches it
    would have seen, and each epoch has its own order::

        for epoch in range(num_epochs):
            for x, y in batches((images, labels), 100, key_or_seed=seed, epoch=epoch):
                ...

    Args:
      array_or_tuple: one array, or a tuple/list of arrays sharing the leading
        dimension (shuffled with the same permutation).
      batch_size: examples per batch (positive).
      key_or_seed: a non-negative int, a sequence of them, or a JAX PRNG key
        (typed or raw ``uint32``).
      epoch: mixed into the seed so each epoch is shuffled differently.
      drop_remainder: drop the last, smaller batch (keeps shapes static under
        ``jit``); otherwise yield it.

    Returns:
      An iterator of arrays (or tuples of arrays, matching the input).

    Raises:
      ValueError: ``batch_size`` is not positive, the arrays disagree on their
        leading dimension, or ``drop_remainder`` would leave no batch at all.
    """
    is_tuple = isinstance(array_or_tuple, (tuple, list))
    arrays = [np.asarray(a) for a in (array_or_tuple if is_tuple else [array_or_tuple])]
    if not arrays:
        raise ValueError("batches: got an empty tuple of arrays; pass at least one array.")
    if any(a.ndim == 0 for a in arrays):
        raise ValueError("batches: every array needs a leading (example) dimension; got a scalar.")
    sizes = [a.shape[0] for a in arrays]
    if len(set(sizes)) != 1:
        raise ValueError(f"batches: the arrays have different numbers of examples {sizes}; they must agree.")
    if not isinstance(batch_size, (int, np.integer)) or batch_size <= 0:
        raise ValueError(f"batches: batch_size must be a positive int, got {batch_size!r}.")
    num_examples = sizes[0]
    if drop_remainder and batch_size > num_examples:
        raise ValueError(
            f"batches: batch_size {batch_size} exceeds the {num_examples} examples, so with "
            "drop_remainder=True no batch would be produced. Use a smaller batch_size."
        )
    if not isinstance(epoch, (int, np.integer)) or epoch < 0:
        raise ValueError(f"batches: epoch must be a non-negative int, got {epoch!r}.")
    rng = np.random.default_rng([*_seed_entropy(key_or_seed), int(epoch)])
    order = rng.permutation(num_examples)
    stop = num_examples - num_examples % batch_size if drop_remainder else num_examples

    def generate() -> Iterator[Any]:
        for start in range(0, stop, batch_size):
            index = order[start : start + batch_size]
            picked = tuple(a[index] for a in arrays)
            yield picked if is_tuple else picked[0]

    return generate()
