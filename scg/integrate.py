r"""Exact integration of one site: enumeration of a finite support, Gauss–Hermite for Normals.

A site handler in :mod:`scg.interpreter` style: :func:`integrate_site` returns

.. math::  \sum_j w_j \, \mathrm{rest}(z_j)

where ``rest`` is the continuation (the rest of the graph as a function of the
site's value), evaluated for every point ``z_j`` at once with ``jax.vmap``.

* Discrete sites with ``enumerate_support``: the points are the joint support of
  the site's elements (``m ** n`` points for ``n`` elements of support ``m``)
  and ``w_j = p(z_j)``, differentiable in the distribution's parameters.
* Normal sites (also under ``Independent`` / ``expand``): tensor-product
  Gauss–Hermite, ``z_j = μ + √2 σ x_j``, ``w_j = Π_e ω_{j_e} / √π``. Exact for
  polynomial integrands of degree ``< 2·order`` in each coordinate; the points
  carry the gradient with respect to ``μ`` and ``σ``.

**Plates.** A site inside plates whose every downstream site and cost lies in
the same plates is integrated *per example*: point ``j`` gives every example
the same value combination, each example gets its own weight ``w_{j,n}``, and a
per-example cost ``c_n`` is combined as ``Σ_j w_{j,n} c_n(j)`` — exact because
example ``n``'s costs depend only on example ``n``'s values. The grid then grows
with the elements of one example, not of the batch.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist

from scg.errors import BudgetError, IntractableError
from scg.interpreter import initial_env, read, validity_factor, walk
from scg.ir import Graph, Site, Var
from scg.plates import align, per_example
from scg.unroll import unroll

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
    return np.indices((per_element,) * n_elements, dtype=np.int32).reshape(n_elements, -1).T


def support_points(d: Any, shape: tuple, dtype: Any, order: int, n_parallel: int = 0) -> tuple[jax.Array, jax.Array]:
    """The points ``(M, *shape)`` and log-weights ``(M, *shape[:n_parallel])`` that integrate ``d`` exactly.

    The leading ``n_parallel`` dimensions (plates) are enumerated in parallel:
    every example gets the same combination of values in point ``j``.
    """
    parallel = tuple(shape[:n_parallel])
    if d.has_enumerate_support:
        batch_shape, event_shape = tuple(d.batch_shape), tuple(d.event_shape)
        support = d.enumerate_support(expand=False)
        per_element = support.shape[0]
        values = support.reshape((per_element,) + event_shape)
        inner_batch = batch_shape[n_parallel:]
        idx = _flat_index_grid(int(np.prod(inner_batch, dtype=np.int64)), per_element)
        inner = values[idx].reshape((idx.shape[0],) + inner_batch + event_shape).astype(dtype)
        points = jnp.broadcast_to(inner[(slice(None),) + (None,) * n_parallel], (idx.shape[0],) + tuple(shape))
        log_p = jax.vmap(d.log_prob)(points)
        log_w = jnp.sum(log_p, axis=tuple(range(1 + n_parallel, log_p.ndim)))
        return points, log_w
    if is_normal(d):
        nodes, weights = np.polynomial.hermite.hermgauss(order)
        inner_shape = tuple(shape[n_parallel:])
        idx = _flat_index_grid(int(np.prod(inner_shape, dtype=np.int64)), order)
        x = nodes[idx].reshape((idx.shape[0],) + (1,) * n_parallel + inner_shape)
        x = jnp.asarray(x, dtype=dtype)
        log_w = np.sum(np.log(weights[idx] / math.sqrt(math.pi)), axis=1)
        log_w = jnp.broadcast_to(jnp.asarray(log_w, dtype=dtype).reshape((-1,) + (1,) * n_parallel),
                                 (idx.shape[0],) + parallel)
        loc = jnp.broadcast_to(d.mean, shape)
        scale = jnp.sqrt(jnp.broadcast_to(d.variance, shape))
        return loc[None] + math.sqrt(2.0) * scale[None] * x, log_w
    raise IntractableError(f"{type(d).__name__} is neither discrete with a finite support nor Normal", site="")


def _site_is_normal(site: Site) -> bool:
    family = site.dist.family
    if issubclass(family, dist.Normal):
        return True
    if issubclass(family, (dist.Independent, dist.ExpandedDistribution)):
        shapes = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in site.inputs]
        found: list = []
        jax.eval_shape(lambda ls: found.append(is_normal(site.dist.build(ls))) or 0, shapes)
        return bool(found and found[0])
    return False


def site_grid_size(site: Site, order: int, n_parallel: int = 0) -> int:
    """How many points :func:`support_points` uses for ``site`` (from shapes alone)."""
    if site.enumerable:
        shapes = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in site.inputs]
        support = jax.eval_shape(lambda ls: site.dist.build(ls).enumerate_support(expand=False), shapes)
        batch = jax.eval_shape(lambda ls: jnp.zeros(site.dist.build(ls).batch_shape), shapes).shape
        return support.shape[0] ** int(np.prod(batch[n_parallel:], dtype=np.int64))
    return order ** int(np.prod(site.output.shape[n_parallel:], dtype=np.int64))


def parallel_plates(graph: Graph, site: Site) -> int:
    """How many of ``site``'s plates can be integrated per example (all of them, or 0).

    Per-example integration is exact when everything downstream of the site —
    sites and costs — lies inside the site's plates.
    """
    if not site.plates:
        return 0
    names = {p.name for p in site.plates}
    downstream_sites = [s for s in graph.sites if s is not site and site.name in graph.stochastic_ancestors(s)]
    downstream_costs = [c for c in graph.costs if c.name in graph.downstream_costs[site.name]]
    inside = all(names <= {p.name for p in n.plates} for n in (*downstream_sites, *downstream_costs))
    return len(site.plates) if inside else 0


def check_budget(graph: Graph, sites: list[Site], order: int, budget: int, what: str, *,
                 per_example: bool = False) -> int:
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
        sizes[s.name] = site_grid_size(s, order, parallel_plates(graph, s) if per_example else 0)
        total *= sizes[s.name]
        if total > budget:
            break
    if total > budget:
        detail = ", ".join(f"{k}: {v:,}" for k, v in sizes.items())
        raise BudgetError(
            f"{what}: the joint grid over sites has at least {total:,} points ({detail}), above the budget of "
            f"{budget:,}. Lower the quadrature order (order=...), enumerate fewer sites, use smaller shapes "
            "(sites inside scg.plate are integrated per example), or raise budget=... if the memory allows.",
            size=total, budget=budget)
    return total


def _points_or_refuse(site: Site, distribution: Any, order: int, n_parallel: int):
    try:
        return support_points(distribution, site.output.shape, site.output.dtype, order, n_parallel)
    except IntractableError:
        raise IntractableError(
            f"site {site.name!r} ({site.dist.name}) cannot be integrated exactly: it is neither discrete "
            "with a finite support nor Normal", site=site.name) from None


def integrate_site(site: Site, distribution: Any, continue_with: Callable, order: int = DEFAULT_ORDER) -> Any:
    """``Σ_j w_j · continue_with(z_j)`` over the joint grid of ``site`` (any pytree of results)."""
    points, log_w = _points_or_refuse(site, distribution, order, 0)
    weights = jnp.exp(log_w)
    results = jax.vmap(continue_with)(points)
    return jax.tree_util.tree_map(lambda r: jnp.tensordot(weights.astype(r.dtype), r, axes=1), results)


def integrate_site_per_example(site: Site, distribution: Any, continue_with: Callable, order: int,
                               n_parallel: int) -> dict:
    """Per-example integration over a plated site.

    ``continue_with`` returns a dict mapping a tuple of plates to the per-example
    cost sums of the costs inside exactly those plates. Entries inside the
    site's plates are combined with per-example weights; the others do not
    depend on the site (see :func:`parallel_plates`) and are taken from any point.
    """
    points, log_w = _points_or_refuse(site, distribution, order, n_parallel)
    weights = jnp.exp(log_w)
    results = jax.vmap(continue_with)(points)
    names = {p.name for p in site.plates}
    out = {}
    for plates, values in results.items():
        if names <= {p.name for p in plates}:
            w = jax.vmap(lambda x: align(x, site.plates, plates))(weights)
            w = jnp.broadcast_to(w, values.shape).astype(values.dtype)
            out[plates] = jnp.sum(w * values, axis=0)
        else:
            out[plates] = values[0]
    return out


def _unrolled_within_budget(graph: Graph, order: int, budget: int) -> Graph:
    loops = ", ".join(f"{s.name} (T = {s.length})" for s in graph.scans)
    # each step adds at least one grid factor of 2: a loop longer than log2(budget) steps cannot fit
    steps_allowed = max(1, int(math.log2(budget)))
    try:
        flat = unroll(graph, max_steps=steps_allowed * max(1, len(graph.scans)))
        check_budget(flat, list(flat.sites), order, budget, "scg.expectation", per_example=True)
    except (ValueError, BudgetError) as e:
        raise BudgetError(
            f"scg.expectation: the loop {loops} is integrated exactly by unrolling it, and its joint grid over "
            f"the steps' sites exceeds the budget of {budget:,} points ({e}). Exact references for loops are "
            "for short chains: shorten T for the check, lower order=..., or raise budget=...",
            size=getattr(e, "size", None), budget=budget) from None
    return flat


def graph_expectation(graph: Graph, param_leaves: list, input_leaves: list, *,
                      order: int = DEFAULT_ORDER, budget: int = DEFAULT_BUDGET) -> jax.Array:
    """``E[Σ costs]`` of a Graph on flattened parameters and inputs.

    Loops are unrolled first (:func:`scg.unroll.unroll`): exact for chains whose
    joint grid fits the budget; a longer one is refused naming its length.
    """
    if graph.scans:
        graph = _unrolled_within_budget(graph, order, budget)
    check_budget(graph, list(graph.sites), order, budget, "scg.expectation", per_example=True)
    env = initial_env(graph, param_leaves, input_leaves)
    n_parallel = {s.name: parallel_plates(graph, s) for s in graph.sites}

    def on_site(site, distribution, env, continue_with):
        if n_parallel[site.name]:
            return integrate_site_per_example(site, distribution, continue_with, order, n_parallel[site.name])
        return integrate_site(site, distribution, continue_with, order)

    def on_end(env):
        # per-example cost sums, grouped by the plates the costs sit in
        groups: dict = {}
        valid = validity_factor(env)  # NaN when a distribution's parameters violate its constraints
        for c in graph.costs:
            plates = tuple(sorted(c.plates, key=lambda p: p.dim))
            term = per_example(read(env, c.input), plates) * valid.astype(c.input.dtype)
            groups[plates] = groups[plates] + term if plates in groups else term
        return groups

    groups = walk(graph, env, on_site=on_site, on_end=on_end)
    return sum((jnp.sum(v) for v in groups.values()), jnp.zeros(()))
