"""Plates: conditionally independent batch dimensions, and moving per-example terms between them.

Inside ``with scg.plate("data", N):`` axis ``k`` of every site and cost (``k``
the number of enclosing plates) indexes examples that are independent given
what lies outside the plate. The estimator and the exact integrator both keep
terms *per example*: an array whose leading axes are its plates. The two
functions here are the only arithmetic on those axes.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def per_example(x: jax.Array, plates: tuple) -> jax.Array:
    """Sums ``x`` over every dimension that is not a plate dimension (plates lead)."""
    k = len(plates)
    x = jnp.asarray(x)
    return jnp.sum(x, axis=tuple(range(k, x.ndim))) if x.ndim > k else x


def align(x: jax.Array, source: tuple, target: tuple) -> jax.Array:
    """Moves per-example terms from ``source`` plates to ``target`` plates.

    Sums over plates the target is outside of; broadcasts (size-1 axes) over
    plates only the target is inside of.
    """
    source = sorted(source, key=lambda p: p.dim)
    target = sorted(target, key=lambda p: p.dim)
    target_names = [p.name for p in target]
    drop = tuple(i for i, p in enumerate(source) if p.name not in target_names)
    x = jnp.sum(x, axis=drop) if drop else x
    kept = [p.name for p in source if p.name in target_names]
    x = jnp.transpose(x, [kept.index(n) for n in target_names if n in kept]) if kept else x
    for pos, name in enumerate(target_names):
        if name not in kept:
            x = jnp.expand_dims(x, pos)
    return x
