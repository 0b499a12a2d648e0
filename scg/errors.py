"""The exceptions scg raises: one type per failure family.

Every message names the place that is wrong (a site, a cost, a primitive, an
argument), says what was found, and says how to fix it. The attributes carry
the same facts for programs that catch the error.
"""
from __future__ import annotations

from typing import Any

import jax
import numpy as np


class ScgError(Exception):
    """Base class of every error scg raises on purpose."""


class ModelError(ScgError, ValueError):
    """A model violates a structural precondition at trace time.

    Attributes:
      site: the site or cost name involved, or ``None``.
      source: ``"file.py:LINE"`` of the offending call in the user's model, or ``None``.
    """

    def __init__(self, message: str, *, site: str | None = None, source: str | None = None):
        where = f" (at {source})" if source else ""
        super().__init__(message + where)
        self.site = site
        self.source = source


class UnsupportedPrimitiveError(ScgError, NotImplementedError):
    """The dependency walk met a JAX primitive it cannot reason about.

    scg refuses rather than guesses: an unknown higher-order primitive could hide
    sampling or data flow that the estimator must see.
    """

    def __init__(self, message: str, *, primitive: str, source: str | None = None):
        where = f" (at {source})" if source else ""
        super().__init__(message + where)
        self.primitive = primitive
        self.source = source


class PreconditionError(ScgError, ValueError):
    """A pass was asked to rewrite a site whose precondition does not hold.

    Attributes:
      pass_name: the pass that refused (``"reparameterize"``, ...).
      site: the site it refused.
      precondition: the name of the precondition that failed.
    """

    def __init__(self, message: str, *, pass_name: str, site: str, precondition: str):
        super().__init__(f"{pass_name}: site '{site}': precondition '{precondition}' failed: {message}")
        self.pass_name = pass_name
        self.site = site
        self.precondition = precondition


class BudgetError(ScgError, ValueError):
    """An exact computation (enumeration, quadrature) exceeds its size budget."""

    def __init__(self, message: str, *, size: int, budget: int):
        super().__init__(message)
        self.size = size
        self.budget = budget


class IntractableError(ScgError, ValueError):
    """An exact expectation was asked of a site scg cannot integrate exactly."""

    def __init__(self, message: str, *, site: str):
        super().__init__(message)
        self.site = site


def check_key(key: Any, where: str) -> None:
    """Raises a ``TypeError``/``ValueError`` naming ``key=`` unless ``key`` is one JAX PRNG key.

    Accepted: a new-style typed key (``jax.random.key(seed)``, shape ``()``) or a
    legacy raw key (``jax.random.PRNGKey(seed)``, ``uint32[2]`` under the default
    threefry implementation), concrete or traced (``jit``/``vmap``). Refused, with a
    message saying what to pass: ``None``, Python numbers, arrays of another dtype,
    and stacks of keys (``jax.random.split(key, n)``: pass one key and use
    ``num_samples=``, or ``jax.vmap`` over the stack).

    Examples:
      >>> import jax
      >>> from scg.errors import check_key
      >>> check_key(jax.random.key(0), "Objective.grad")       # typed key: fine
      >>> check_key(jax.random.PRNGKey(0), "Objective.grad")    # legacy uint32[2] key: fine
      >>> check_key(0, "Objective.grad")  # doctest: +ELLIPSIS
      Traceback (most recent call last):
      ...
      TypeError: Objective.grad: key=0 is an int, not a JAX PRNG key; pass one key made with jax.random.key(seed), ...
    """
    how = ("pass one key made with jax.random.key(seed), e.g. key=jax.random.key(0) "
           "(a legacy jax.random.PRNGKey(seed) works too)")
    if key is None:
        raise TypeError(f"{where}: key=None; scg never draws randomness implicitly: {how}")
    dtype, shape = getattr(key, "dtype", None), getattr(key, "shape", None)
    if dtype is None or shape is None:
        kind = type(key).__name__
        raise TypeError(f"{where}: key={key!r:.40} is {'an' if kind[0] in 'aeiou' else 'a'} {kind}, not a JAX "
                        f"PRNG key; {how}")
    shape = tuple(shape)
    if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        if shape != ():
            raise ValueError(
                f"{where}: key= is a stack of {int(np.prod(shape))} keys (shape {shape}); {how}. For more draws "
                "per call use num_samples=K; to map over several keys, jax.vmap the call over them")
        return
    raw = _raw_key_shape()
    if np.dtype(dtype) == np.uint32 and len(shape) >= len(raw) and shape[len(shape) - len(raw):] == raw:
        if len(shape) > len(raw):
            n = int(np.prod(shape[:len(shape) - len(raw)]))
            raise ValueError(
                f"{where}: key= is a stack of {n} legacy keys (shape {shape}); {how}. For more draws per call "
                "use num_samples=K; to map over several keys, jax.vmap the call over them")
        return
    raise TypeError(f"{where}: key= is an array of dtype {np.dtype(dtype).name} and shape {shape}, not a JAX PRNG "
                    f"key (a typed key, or a legacy uint32{list(raw)}); {how}")


_RAW_KEY_SHAPES: dict = {}


def _raw_key_shape() -> tuple:
    """The shape of a legacy raw key under the configured default PRNG implementation (``(2,)`` for threefry)."""
    impl = str(jax.config.jax_default_prng_impl)
    if impl not in _RAW_KEY_SHAPES:
        _RAW_KEY_SHAPES[impl] = tuple(jax.eval_shape(lambda: jax.random.PRNGKey(0)).shape)
    return _RAW_KEY_SHAPES[impl]
