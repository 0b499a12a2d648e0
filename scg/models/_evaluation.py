"""Evaluation shared by the bundled models."""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np


def iwae_in_batches(iwae_batch: Callable, params: Any, x: Any, key: jax.Array, k: int, batch_size: int) -> np.ndarray:
    """Runs a jitted per-example IWAE estimator ``iwae_batch(params, chunk, key, k=k)`` over ``x`` in batches.

    The last batch is padded with copies of its first row so one compiled shape
    serves every batch; the padding is dropped from the result. Batch ``j`` uses
    ``fold_in(key, j)``. Returns an ``(N,)`` float64 array.
    """
    if not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"iwae_log_likelihood: k must be a positive int, got {k!r}.")
    x = np.asarray(x)
    n = x.shape[0]
    batch_size = max(1, min(int(batch_size), n))
    out = []
    for j, start in enumerate(range(0, n, batch_size)):
        chunk = x[start : start + batch_size]
        real = chunk.shape[0]
        if real < batch_size:  # pad with copies of the first row; the padding is dropped below
            chunk = np.concatenate([chunk, np.repeat(chunk[:1], batch_size - real, axis=0)])
        values = iwae_batch(params, jnp.asarray(chunk), jax.random.fold_in(key, j), k=int(k))
        out.append(np.asarray(values, dtype=np.float64)[:real])
    return np.concatenate(out) if out else np.zeros((0,), np.float64)
