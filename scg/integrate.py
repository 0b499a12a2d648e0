"""Exact integration of one site: enumeration of a finite support, Gauss–Hermite for Normals.

A site handler in :mod:`scg.interpreter` style: :func:`integrate_site` returns

.. math::  \\sum_j w_j \\, \\mathrm{rest}(z_j)

where ``rest`` is the continuation (the rest of the graph as a function of the
site's value), evaluated for every point ``z_j`` at once with ``jax.vmap``.

* Discrete sites with ``enumerate_support``: the points are the joint support of
  all the site's elements (``m ** n`` points for ``n`` elements of support ``m``)
  and ``w_j = p(z_j)``, differentiable in the distribution's parameters.
* Normal sites (also under ``Independent`` / ``expand``): tensor-product
  Gauss–Hermite, ``z_j = μ + √2 σ x_j``, ``w_j = Π_e ω_{j_e} / √π``. Exact for
  polynomial integrands of degree ``< 2·order`` in each coordinate; the points
  carry the gradient with respect to ``μ`` and ``σ``.
"""
from __future__ import annotations

import itertools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist

from scg.errors import BudgetError, IntractableError
from scg.ir import Graph, Site

DEFAULT_ORDER = 16
DEFAULT_BUDGET = 2**20


def _unwrap(d: Any) -> Any:
    while isinstance(d, (dist.Independent, dist.ExpandedDistribution)):
        d = d.base_dist
    return d


def is_normal(d: Any) -> bool:
    return isinstance(_unwrap(d), dist.Normal)


def _flat_index_grid(n_elements: int, per_element: int) -> np.ndarray:
    """All ``per_element ** n_elements`` index tuples, shape (M, n_elements)."""
    if n_elements == 0:
        return np.zeros((1, 0), dtype=np.int32)
    grid = np.indices((per_element,) * n_elements, dtype=np.int32).reshape(n_elements, -1).T
    return grid


def support_points(d: Any, shape: tuple, dtype: Any, order: int) -> tuple[jax.Array, jax.Array]:
    """The points ``(M, *shape)`` and log-weights ``(M,)`` that integrate ``d`` exactly."""
    n = int(np.prod(shape, dtype=np.int64))
    if d.has_enumerate_support:
        batch_shape, event_shape = tuple(d.batch_shape), tuple(d.event_shape)
        support = d.enumerate_support(expand=False)
        per_element = support.shape[0]
        values = support.reshape((per_element,) + event_shape)
        n_batch = int(np.prod(batch_shape, dtype=np.int64))
        idx = _flat_index_grid(n_batch, per_element)
        points = values[idx].reshape((idx.shape[0],) + batch_shape + event_shape).astype(dtype)
        log_w = jax.vmap(lambda z: jnp.sum(d.log_prob(z)))(points)
        return points, log_w
    if is_normal(d):
        nodes, weights = np.polynomial.hermite.hermgauss(order)
        idx = _flat_index_grid(n, order)
        x = jnp.asarray(nodes[idx].reshape((idx.shape[0],) + tuple(shape)), dtype=dtype)
        log_w = jnp.asarray(np.sum(np.log(weights[idx] / math.sqrt(math.pi)), axis=1), dtype=dtype)
        loc = jnp.broadcast_to(d.mean, shape)
        scale = jnp.sqrt(jnp.broadcast_to(d.variance, shape))
        return loc[None] + math.sqrt(2.0) * scale[None] * x, log_w
    raise IntractableError("", site="")


def site_grid_size(site: Site, order: int) -> int:
    """How many points :func:`support_points` uses for ``site`` (from shapes alone)."""
    n = int(np.prod(site.output.shape, dtype=np.int64))
    if site.enumerable:
        shapes = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in site.inputs]
        d_shape = jax.eval_shape(lambda ls: site.dist.build(ls).enumerate_support(expand=False), shapes)
        per_element = d_shape.shape[0]
        batch = jax.eval_shape(lambda ls: jnp.zeros(site.dist.build(ls).batch_shape), shapes).shape
        return per_element ** int(np.prod(batch, dtype=np.int64))
    return order**n


def check_budget(graph: Graph, sites: list[Site], order: int, budget: int, what: str) -> int:
    """Raises BudgetError when the joint grid of ``sites`` exceeds ``budget`` points."""
    sizes = {}
    total = 1
    for s in sites:
        if not (s.enumerable or _site_is_normal(s)):
            raise IntractableError(
                f"{what}: site {s.name!r} has family {s.dist.name}, which has neither a finite support to "
                "enumerate nor a Normal density for Gauss-Hermite quadrature; exact expectations need "
                "discrete sites with finite support or Normal sites (reparameterize Normals first if they "
                "are wrapped in another family)", site=s.name)
        sizes[s.name] = site_grid_size(s, order)
        total *= sizes[s.name]
        if total > budget:
            break
    if total > budget:
        detail = ", ".join(f"{k}: {v:,}" for k, v in sizes.items())
        raise BudgetError(
            f"{what}: the joint grid over sites has at least {total:,} points ({detail}), above the budget of "
            f"{budget:,}. Lower the quadrature order (order=...), enumerate fewer sites, use smaller shapes "
            "(plates enumerate per example), or raise budget=... if the memory allows.",
            size=total, budget=budget)
    return total


def _site_is_normal(site: Site) -> bool:
    family = site.dist.family
    if issubclass(family, dist.Normal):
        return True
    if issubclass(family, (dist.Independent, dist.ExpandedDistribution)):
        shapes = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in site.inputs]
        found = []
        jax.eval_shape(lambda ls: found.append(is_normal(site.dist.build(ls))) or 0, shapes)
        return bool(found and found[0])
    return False


def integrate_site(site: Site, distribution: Any, continue_with: Callable, order: int = DEFAULT_ORDER,
                   extra: Callable | None = None) -> Any:
    """``Σ_j w_j · continue_with(z_j)`` over the exact grid of ``site`` (a pytree of results).

    ``extra(points)`` may return per-point entries for the environment (under the vmap).
    """
    try:
        points, log_w = support_points(distribution, site.output.shape, site.output.dtype, order)
    except IntractableError:
        raise IntractableError(
            f"site {site.name!r} ({site.dist.name}) cannot be integrated exactly: it is neither discrete "
            "with a finite support nor Normal", site=site.name) from None
    weights = jnp.exp(log_w)
    results = jax.vmap(lambda z: continue_with(z, extra(z) if extra else None))(points)
    return jax.tree_util.tree_map(lambda r: jnp.tensordot(weights.astype(r.dtype), r, axes=1), results)
