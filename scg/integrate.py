r"""Exact integration of one site: enumeration of a finite support, Gauss–Hermite for Normals.

A site handler in :mod:`scg.interpreter` style: :func:`integrate_site` returns

.. math::  \sum_j w_j \, \mathrm{rest}(z_j)

where ``rest`` is the continuation (the rest of the graph as a function of the
site's value), evaluated for every point ``z_j`` at once with ``jax.vmap``.

* Discrete sites with ``enumerate_support``: the points are the joint support of
  the site's elements (``m ** n`` points for ``n`` elements of support ``m``; the
  product of each element's own support, so also under ``Independent`` and for a
  Binomial whose ``total_count`` differs between elements) and ``w_j = p(z_j)``,
  differentiable in the distribution's parameters. A support whose bounds are
  operands (Binomial's ``total_count``) is sized from their values, which must be
  constants of the graph; one computed from parameters or data is refused.
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

**Kinks and jumps** (:mod:`scg.nonsmooth`). Where a cost depends on a Normal
site's value through a non-smooth primitive (``max``/``relu``, ``abs``,
comparisons under ``jnp.where``, ...), Gauss–Hermite is not exact and its
gradient can be wrong (a jump contributes nothing). A kink or jump at an affine
function of the site's value is integrated piecewise, exactly; any other makes
the reference *estimated*: :func:`reference` integrates the sites involved with
several rules (:data:`LEVELS`: Gauss–Hermite of ``order`` and ``2·order``,
composite Gauss–Legendre of two sizes) and reports their spread as the error;
:func:`graph_expectation` returns the finest value when that error is within
tolerance and refuses otherwise, naming the primitive and its line.

**stop_gradient.** It does not change a value, so ``E[Σ costs]`` is unchanged.
For differentiation it is a constant along the deterministic data flow, as in
``jax.grad``, while a site's value is always an integration variable whose
density carries its dependence on the parameters: the gradient is
``∇θ ∫ Σ costs(θ, z) Π p_θ(z) dz`` with ``stop_gradient`` read as JAX reads it,
which is what every estimator of scg estimates. Normal sites whose values reach
a ``stop_gradient`` are therefore integrated with points held constant and the
parameter dependence carried by the weights (``w · p/stop_gradient(p)``), as
enumerated discrete sites always are.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
from numpyro.distributions import constraints

from scg import forward, nonsmooth
from scg.errors import BudgetError, IntractableError
from scg.interpreter import initial_env, log_density, read, validity_factor, walk
from scg.ir import Graph, Literal, Site, Var
from scg.plates import align, per_example
from scg.unroll import unroll

DEFAULT_ORDER = 16
DEFAULT_BUDGET = 2**20
DEFAULT_RTOL = 1e-4  # graph_expectation: largest estimated error, relative to max(|E|, 1), it returns


def _unwrap(d: Any) -> Any:
    while isinstance(d, (dist.Independent, dist.ExpandedDistribution)):
        d = d.base_dist
    return d


def is_normal(d: Any) -> bool:
    return isinstance(_unwrap(d), dist.Normal)


_WRAPPERS = (dist.Independent, dist.ExpandedDistribution)
_INTERVAL = type(constraints.integer_interval(0, 1))


def _innermost(d: Any) -> Any:
    """``d`` without the wrappers that only reshape its elements (``Independent``, ``expand``)."""
    while isinstance(d, _WRAPPERS):
        d = d.base_dist
    if isinstance(d, dist.MaskedDistribution):
        # its density leaves the masked elements out (log p = 0 for both values of a Bernoulli): summed over
        # the grid they would count each value with weight 1, a wrong number, so they are refused
        raise IntractableError("it is masked (.mask(...)): the masked elements have no density to weight the "
                               "grid with (log p = 0 for every value), so the sum over its support is not an "
                               "expectation; drop the mask and multiply the costs by the mask instead", site="")
    return d


class _TracedBounds(Exception):
    """The bounds of a discrete support are traced values (computed from parameters or data)."""

    def __init__(self, family: str, bounds: tuple):
        super().__init__(f"the bounds of the support of {family} are traced values, not constants of the model")
        self.family, self.bounds = family, bounds


class _UnevenBounds(IntractableError):
    """The bounds of a discrete support differ between the examples of the site's plates."""


class _Elements(NamedTuple):
    """The supports of a discrete site's scalar elements beyond its plates (every example has the same).

    Element ``e`` takes ``lower[e], …, lower[e] + sizes[e] − 1`` (integer intervals: Binomial,
    Categorical, DiscreteUniform), or else each of ``shared`` (Bernoulli's ``0, 1``).
    """

    sizes: np.ndarray
    lower: np.ndarray | None
    shared: Any


def _elements(d: Any, shape: tuple, n_parallel: int) -> _Elements:
    """The joint support of ``d``'s elements is the product of theirs: each element's support.

    numpyro's ``Independent`` has no ``enumerate_support`` and Binomial's refuses a ``total_count``
    that differs between elements; both are products of scalar supports, enumerated here. Raises
    ``_TracedBounds`` when an interval's bounds are not concrete, IntractableError otherwise.
    """
    base = _innermost(d)
    family = type(base).__name__
    if base.event_shape:
        raise IntractableError(f"{family} has event shape {tuple(base.event_shape)}; scg enumerates discrete "
                               "families whose elements are scalars", site="")
    support = base.support
    if isinstance(support, _INTERVAL):
        bounds = (support.lower_bound, support.upper_bound)
        if any(isinstance(b, jax.core.Tracer) for b in bounds):
            raise _TracedBounds(family, bounds)
        concrete = [np.asarray(b) for b in bounds]
        if not all(np.all(np.isfinite(b)) and np.all(b == np.round(b)) for b in concrete):
            raise IntractableError(f"the bounds of the support of {family} are not all whole numbers "
                                   f"(lower {concrete[0]!r}, upper {concrete[1]!r})", site="")
        head = (0,) * n_parallel
        lower, upper = (np.broadcast_to(b.astype(np.int64), shape) for b in concrete)
        if not (np.array_equal(lower, np.broadcast_to(lower[head], shape))
                and np.array_equal(upper, np.broadcast_to(upper[head], shape))):
            raise _UnevenBounds(f"the bounds of the support of {family} differ between the examples of its "
                                "plates, so the examples cannot share one grid", site="")
        sizes = upper[head] - lower[head] + 1
        if np.any(sizes < 1):
            raise IntractableError(f"the support of {family} is empty for some element (upper bound below the "
                                   "lower)", site="")
        return _Elements(sizes, lower[head], None)
    try:
        values = jnp.reshape(base.enumerate_support(expand=False), (-1,))
    except (NotImplementedError, jax.errors.ConcretizationTypeError) as e:
        raise IntractableError(f"numpyro cannot enumerate the support of {family} ({type(e).__name__}: {e})",
                               site="") from None
    return _Elements(np.full(tuple(shape[n_parallel:]), values.shape[0], dtype=np.int64), None, values)


def _grid_size(el: _Elements) -> int:
    return math.prod(int(k) for k in el.sizes.ravel())


def _joint_indices(sizes: tuple) -> np.ndarray:
    """Every index tuple of a mixed-radix grid, shape ``(Π sizes, len(sizes))``, the last index fastest."""
    if not sizes:
        return np.zeros((1, 0), dtype=np.int32)
    return np.indices(sizes, dtype=np.int32).reshape(len(sizes), -1).T


def support_points(d: Any, shape: tuple, dtype: Any, order: int, n_parallel: int = 0,
                   elements: "_Elements | None" = None) -> tuple[jax.Array, jax.Array]:
    """The points ``(M, *shape)`` and log-weights ``(M, *shape[:n_parallel])`` that integrate ``d`` exactly.

    The leading ``n_parallel`` dimensions (plates) are enumerated in parallel:
    every example gets the same combination of values in point ``j``. ``elements``:
    the supports sized from the graph's constants (:func:`site_elements`), for
    bounds that are traced values at run time (a constant folded under ``jit``).
    """
    if d.has_enumerate_support:
        try:
            el = elements if elements is not None else _elements(d, tuple(shape), n_parallel)
        except _TracedBounds as e:
            raise IntractableError(f"{e}; make them constants of the model (a Python number or an array the "
                                   "model closes over)", site="") from None
        inner_shape = tuple(shape[n_parallel:])
        idx = _joint_indices(tuple(int(k) for k in el.sizes.ravel()))
        values = el.shared[idx] if el.shared is not None else el.lower.reshape(1, -1).astype(np.int32) + idx
        inner = jnp.asarray(values).reshape((idx.shape[0],) + inner_shape).astype(dtype)
        points = jnp.broadcast_to(inner[(slice(None),) + (None,) * n_parallel], (idx.shape[0],) + tuple(shape))
        log_p = jax.vmap(lambda z: log_density(d, z))(points)
        log_w = jnp.sum(log_p, axis=tuple(range(1 + n_parallel, log_p.ndim)))
        return points, log_w
    if is_normal(d):
        nodes, weights = np.polynomial.hermite.hermgauss(order)
        return normal_tensor_points(d, shape, dtype, math.sqrt(2.0) * nodes, weights / math.sqrt(math.pi), n_parallel)
    raise IntractableError(f"{type(d).__name__} is neither discrete with a finite support nor Normal", site="")


def normal_tensor_points(d: Any, shape: tuple, dtype: Any, nodes: np.ndarray, weights: np.ndarray,
                         n_parallel: int = 0) -> tuple[jax.Array, jax.Array]:
    """Tensor-product grid of a 1-D rule ``Σ w_i g(ε_i) ≈ E g(ε)``, ``ε ~ N(0, 1)``, over a Normal ``d``:
    points ``μ + σ ε`` ``(M, *shape)`` and log-weights ``(M, *shape[:n_parallel])``."""
    parallel = tuple(shape[:n_parallel])
    per_element = len(nodes)
    inner_shape = tuple(shape[n_parallel:])
    idx = _joint_indices((per_element,) * int(np.prod(inner_shape, dtype=np.int64)))
    x = jnp.asarray(nodes[idx].reshape((idx.shape[0],) + (1,) * n_parallel + inner_shape), dtype=dtype)
    log_w = np.sum(np.log(weights[idx]), axis=1)
    log_w = jnp.broadcast_to(jnp.asarray(log_w, dtype=dtype).reshape((-1,) + (1,) * n_parallel),
                             (idx.shape[0],) + parallel)
    loc = jnp.broadcast_to(d.mean, shape)
    scale = jnp.sqrt(jnp.broadcast_to(d.variance, shape))
    return loc[None] + scale[None] * x, log_w


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


def site_elements(site: Site, graph: Graph | None = None, n_parallel: int = 0, what: str = "scg.expectation"):
    """The supports of an enumerable site's elements, from the operands' shapes and the graph's constants.

    A support whose bounds are operands (Binomial's ``total_count``, DiscreteUniform's ``low`` and
    ``high``) is sized from their values, which must be constants of ``graph`` (Literals or
    closed-over arrays). Raises IntractableError naming the site and the operand otherwise.
    """
    fixed = {i: graph.constant(a) if graph is not None else (a.value if isinstance(a, Literal) else None)
             for i, a in enumerate(site.inputs)}
    free = [i for i, v in fixed.items() if v is None]
    found: list = []

    def sized(traced: list) -> int:
        leaves = [fixed[i] for i in range(len(site.inputs))]
        for i, t in zip(free, traced):
            leaves[i] = t
        try:
            found.append(_elements(site.dist.build(leaves), tuple(site.output.shape), n_parallel))
        except _TracedBounds as e:
            names = [site.dist.leaf_names[i] for i in free if any(leaves[i] is b for b in e.bounds)]
            found.append(names or ["its bounds"])
        return 0

    where = f"{what}: " if what else ""
    try:
        jax.eval_shape(sized, [jax.ShapeDtypeStruct(site.inputs[i].shape, site.inputs[i].dtype) for i in free])
    except IntractableError as e:
        raise type(e)(f"{where}site {site.name!r} ({site.dist.name}) cannot be enumerated: {e}. Exact "
                      "expectations enumerate discrete sites whose elements have finite supports known when the "
                      "model is traced", site=site.name) from None
    if isinstance(found[0], list):
        operands = ", ".join(found[0])
        raise IntractableError(
            f"{where}site {site.name!r} ({site.dist.name}) cannot be enumerated: its support is set by "
            f"{operands}, which the model computes from its parameters or data, so the support's size is not "
            "known when the model is traced (a traced value cannot size the grid). Make "
            f"{operands} a constant of the model: a Python number, or an array the model closes over (e.g. "
            "dist.Binomial(10, logits=...)), not one computed from params or passed as data",
            site=site.name)
    return found[0]


def site_grid_size(site: Site, order: int, n_parallel: int = 0, graph: Graph | None = None,
                   what: str = "scg.expectation") -> int:
    """How many points :func:`support_points` uses for ``site`` (from shapes and ``graph``'s constants)."""
    if site.enumerable:
        return _grid_size(site_elements(site, graph, n_parallel, what))
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
    if inside and site.enumerable:
        try:
            site_elements(site, graph, len(site.plates))
        except _UnevenBounds:
            return 0  # the examples' supports differ (Binomial counts per example): one joint grid instead
        except IntractableError:
            pass  # refused where the site is sized, with its reason
    return len(site.plates) if inside else 0


def check_families(sites: list[Site], what: str) -> None:
    """Raises IntractableError for a site that is neither discrete with finite support nor Normal."""
    for s in sites:
        if not (s.enumerable or _site_is_normal(s)):
            raise IntractableError(
                f"{what}: site {s.name!r} has family {s.dist.name}, which has neither a finite support to "
                "enumerate nor a Normal density for Gauss-Hermite quadrature; exact expectations need "
                "discrete sites with finite support or Normal sites (reparameterize Normals first if they "
                "are wrapped in another family)", site=s.name)


def check_budget(graph: Graph, sites: list[Site], order: int, budget: int, what: str, *,
                 per_example: bool = False, size_of: Callable[[Site], int] | None = None) -> int:
    """Raises BudgetError when the joint grid of ``sites`` exceeds ``budget`` points.

    ``size_of(site)``, when given, is the size of each site's grid (default: :func:`site_grid_size`).
    """
    sizes = {}
    total = 1
    check_families(sites, what)
    for s in sites:
        sizes[s.name] = size_of(s) if size_of else site_grid_size(
            s, order, parallel_plates(graph, s) if per_example else 0, graph, what)
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


def _points_or_refuse(site: Site, distribution: Any, order: int, n_parallel: int, graph: Graph | None = None):
    elements = site_elements(site, graph, n_parallel) if graph is not None and site.enumerable else None
    if elements is not None and elements.shared is not None:
        elements = None  # values shared by every element (Bernoulli's 0, 1) come from the distribution itself
    try:
        return support_points(distribution, site.output.shape, site.output.dtype, order, n_parallel, elements)
    except IntractableError as e:
        raise IntractableError(f"site {site.name!r} ({site.dist.name}) cannot be integrated exactly: {e}",
                               site=site.name) from None


def integrate_site(site: Site, distribution: Any, continue_with: Callable, order: int = DEFAULT_ORDER,
                   graph: Graph | None = None) -> Any:
    """``Σ_j w_j · continue_with(z_j)`` over the joint grid of ``site`` (any pytree of results)."""
    points, log_w = _points_or_refuse(site, distribution, order, 0, graph)
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
    return _combine_per_example(site, jnp.exp(log_w), jax.vmap(continue_with)(points))


def _combine_per_example(site: Site, weights: Any, results: dict) -> dict:
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


def _detach(distribution: Any, points: Any, weights: Any, n_parallel: int) -> tuple[Any, Any]:
    """Points held constant, the parameter dependence moved into the weights: ``w · p / stop_gradient(p)``.

    The value is unchanged; the gradient is the score-function form ``Σ w (∇f + f ∇log p)``, the
    one every estimator agrees on when a ``stop_gradient`` sits downstream of the site.
    """
    points = jax.lax.stop_gradient(points)
    log_p = jax.vmap(lambda z: log_density(distribution, z))(points)
    log_p = jnp.sum(log_p, axis=tuple(range(1 + n_parallel, log_p.ndim)))
    box = jnp.exp(log_p - jax.lax.stop_gradient(log_p))
    return points, weights * box.reshape(weights.shape).astype(weights.dtype)


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


# The rules compared where a reference is estimated (sites near an unlocated kink; other sites keep
# level 0): Gauss–Hermite of order and 2·order, then composite Gauss–Legendre of 32 and 64 panels of 4
# points. A site with located kinks uses piecewise rules instead (8 panels of 8 and 16 points, then 32
# and 64 panels of 4). Two rule families at two resolutions: their spread is the error estimate.
LEVELS = (("gh", 1, nonsmooth.PANELS, nonsmooth.PANEL_POINTS), ("gh", 2, nonsmooth.PANELS, 2 * nonsmooth.PANEL_POINTS),
          ("panels", 0, 32, 4), ("panels", 0, 64, 4))


@dataclasses.dataclass(frozen=True)
class Prepared:
    """A graph ready to integrate: loops unrolled, sites classified, kinks located (see :mod:`scg.nonsmooth`)."""

    graph: Graph
    order: int
    n_parallel: dict
    analysis: nonsmooth.Analysis
    probes: dict
    slots: dict
    levels: tuple  # indices into LEVELS of the rules the estimate compares (0 alone when exact)

    def rule(self, site: Site, level: int) -> tuple:
        """``("gh", order)``, ``("panels", panels, points)`` or ``("piecewise", panels, points)``."""
        kind, mult, panels, points = LEVELS[level if site.name in self.analysis.refine else 0]
        if site.name in self.analysis.resolved:
            return ("piecewise", panels, points)
        if kind == "gh":
            return ("gh", self.order * mult)
        return ("panels", panels, points)

    def size(self, site: Site, level: int) -> int:
        if site.enumerable:
            return site_grid_size(site, self.order, self.n_parallel[site.name], self.graph)
        rule = self.rule(site, level)
        if rule[0] == "piecewise":
            n = int(np.prod(site.output.shape[self.n_parallel[site.name]:], dtype=np.int64))
            return nonsmooth.piecewise_grid_size(n, self.slots[site.name], rule[1], rule[2])
        per = rule[1] if rule[0] == "gh" else rule[1] * rule[2]
        return per ** int(np.prod(site.output.shape[self.n_parallel[site.name]:], dtype=np.int64))


def prepare(graph: Graph, order: int, budget: int, what: str = "scg.expectation") -> Prepared:
    """Unrolls loops, checks families and the budget, and finds the kinks (linear in the graph).

    Discrete chains (see :func:`scg.forward.eligible`) stay loops: the forward recursion integrates
    them at a cost of T·K², whatever T.
    """
    if graph.scans and not all(forward.eligible(graph, s) for s in graph.scans):
        graph = _unrolled_within_budget(graph, order, budget)
    check_families(list(graph.sites), what)
    n_parallel = {s.name: parallel_plates(graph, s) for s in graph.sites}
    normal = frozenset(s.name for s in graph.sites if not s.enumerable and _site_is_normal(s))

    def size_of(site: Site, slots: int, refined: bool) -> int:
        if slots:
            n = int(np.prod(site.output.shape[n_parallel[site.name]:], dtype=np.int64))
            _, _, panels, points = LEVELS[1 if refined else 0]
            return nonsmooth.piecewise_grid_size(n, slots, panels, points)
        o = 2 * order if refined and site.name in normal else order
        return site_grid_size(site, o, n_parallel[site.name], graph, what)

    analysis = nonsmooth.analyze(graph, normal, size_of=size_of, budget=budget)
    slots = {name: sum(k.slots for k in ks) for name, ks in analysis.resolved.items()}
    probes = {name: nonsmooth.kink_probe(graph, graph.site(name), ks, analysis.plans[name])
              for name, ks in analysis.resolved.items()}
    prep = Prepared(graph, order, n_parallel, analysis, probes, slots, (0,))
    top = 1 if analysis.unresolved else 0
    check_budget(graph, list(graph.sites), order, budget, what, size_of=lambda s: prep.size(s, top))
    if not analysis.unresolved:
        return prep
    levels = [0, 1]
    for level in (2, 3):
        total = 1
        for s in graph.sites:
            total *= prep.size(s, level)
        if total <= budget:
            levels.append(level)
    return dataclasses.replace(prep, levels=tuple(levels))


def integrate_prepared(prep: Prepared, param_leaves: list, input_leaves: list, *, level: int = 0) -> jax.Array:
    """``E[Σ costs]`` with each site's rule at ``level`` (see :data:`LEVELS`)."""
    graph, analysis = prep.graph, prep.analysis
    env = initial_env(graph, param_leaves, input_leaves)

    def on_site(site, distribution, env, continue_with):
        k = prep.n_parallel[site.name]
        rule = prep.rule(site, level) if not site.enumerable else ("enumerate",)
        if rule[0] == "piecewise":
            points, weights = nonsmooth.piecewise_points(distribution, site.output.shape, site.output.dtype,
                                                         prep.probes[site.name], env, rule[1], rule[2], k)
        elif rule[0] == "panels":
            nodes, w = nonsmooth.panel_rule(rule[1], rule[2])
            points, log_w = normal_tensor_points(distribution, site.output.shape, site.output.dtype, nodes, w, k)
            weights = jnp.exp(log_w)
        else:
            points, log_w = _points_or_refuse(site, distribution, rule[1] if rule[0] == "gh" else prep.order, k,
                                              prep.graph)
            weights = jnp.exp(log_w)
        if site.name in analysis.detached:
            points, weights = _detach(distribution, points, weights, k)
        results = jax.vmap(continue_with)(points)
        if k:
            return _combine_per_example(site, weights, results)
        return jax.tree_util.tree_map(lambda r: jnp.tensordot(weights.astype(r.dtype), r, axes=1), results)

    def on_end(env):
        # per-example cost sums, grouped by the plates the costs sit in
        groups: dict = {}
        valid = validity_factor(env)  # NaN when a distribution's parameters violate its constraints
        for c in graph.costs:
            plates = tuple(sorted(c.plates, key=lambda p: p.dim))
            term = per_example(read(env, c.input), plates)
            term = term if isinstance(valid, float) else term * valid.astype(c.input.dtype)
            groups[plates] = groups[plates] + term if plates in groups else term
        for node in graph.scans:  # discrete chains, by the forward recursion
            term = env[("scg.forward", node.name)]
            groups[()] = groups[()] + term if () in groups else term
        return groups

    def on_scan(node, operands, env):
        total = forward.expected_cost(node, operands, lambda s, d, cont: integrate_site(s, d, cont, prep.order))
        # nothing reads an eligible loop's results: placeholders keep the environment complete
        return [jnp.zeros(v.shape, v.dtype) for v in node.outputs], {("scg.forward", node.name): total}

    groups = walk(graph, env, on_site=on_site, on_end=on_end, on_scan=on_scan)
    return sum((jnp.sum(v) for v in groups.values()), jnp.zeros(()))


def _spread(values: list) -> Any:
    """Largest difference between any two of the levels' results (elementwise)."""
    lo = values[0]
    hi = values[0]
    for v in values[1:]:
        lo, hi = jnp.minimum(lo, v), jnp.maximum(hi, v)
    return hi - lo


ROUGH = 2.0  # an estimate from the two Gauss–Hermite orders alone (the panels did not fit) is doubled


def _first(kinks: tuple, kind: str | None = None):
    return next((k for k in kinks if kind is None or k.kind == kind), kinks[0])


def refusal(kinks: tuple, what: str, detail: str) -> IntractableError:
    """The error for a reference that is not exact, naming the first offending primitive and its line."""
    k = _first(kinks, "jump")
    more = f" (and {len(kinks) - 1} more non-smooth place{'s' if len(kinks) > 2 else ''})" if len(kinks) > 1 else ""
    site = k.normal_sites[-1] if k.normal_sites else ""
    return IntractableError(f"{what}: the cost reaches {k.describe()}{more}. {detail}", site=site)


_AFFINE_HINT = ("A kink or jump at an affine function of one Normal coordinate (z > c, relu(a*z + b), "
                "abs(z - c), jnp.where(z > 0, f(z), g(z))) is integrated exactly.")


def graph_expectation(graph: Graph, param_leaves: list, input_leaves: list, *,
                      order: int = DEFAULT_ORDER, budget: int = DEFAULT_BUDGET, rtol: float = DEFAULT_RTOL) -> jax.Array:
    """``E[Σ costs]`` of a Graph on flattened parameters and inputs.

    Loops are unrolled first (:func:`scg.unroll.unroll`): exact for chains whose
    joint grid fits the budget; a longer one is refused naming its length.
    Kinks and jumps at affine functions of a Normal site are integrated
    piecewise. Any other kink makes the reference estimated: on concrete values
    it is integrated with the rules of :data:`LEVELS` and the finest is returned
    when their spread is at most ``rtol · max(|E|, 1)``; under a transformation (``jax.grad``, ``jit``,
    ``vmap``) no error can be estimated and it is refused, as is any jump whose
    location is not known.
    """
    prep = prepare(graph, order, budget)
    analysis = prep.analysis
    if analysis.exact:
        if not analysis.resolved:
            return integrate_prepared(prep, param_leaves, input_leaves)
        # piecewise rules are many small operations: one compiled program instead of one per operation
        return jax.jit(lambda p, x: integrate_prepared(prep, p, x))(list(param_leaves), list(input_leaves))
    if analysis.has_unresolved_jump:
        raise refusal(analysis.unresolved, "scg.expectation",
                      "Quadrature cannot integrate a jump it cannot locate (its gradient through the quadrature "
                      "points misses the jump entirely), so scg refuses rather than return a wrong number. "
                      + _AFFINE_HINT + " scg.check_grad still runs on this model and reports that its reference "
                      "is not exact enough.")
    if any(isinstance(x, jax.core.Tracer) for x in (*param_leaves, *input_leaves)):
        raise refusal(analysis.unresolved, "scg.expectation",
                      "Quadrature is not exact there, so this reference needs an error estimate (several quadrature "
                      "rules compared), which needs concrete values: it cannot be made under jax.grad, jax.jit or "
                      "jax.vmap. Call scg.expectation on concrete parameters for the value, scg.check_grad for a "
                      "gradient check that accounts for the reference's error, or scg.exact.reference(...) for the "
                      "value, the gradient and their estimated errors. " + _AFFINE_HINT)
    run = jax.jit(lambda p, x: [integrate_prepared(prep, p, x, level=lv) for lv in prep.levels])
    values = run(list(param_leaves), list(input_leaves))
    fine = values[-1]
    error = float(_spread(values)) * (ROUGH if len(values) == 2 else 1.0)
    if not error <= rtol * max(abs(float(fine)), 1.0):
        raise refusal(analysis.unresolved, "scg.expectation",
                      f"Quadrature is not exact there: its estimated error is {error:.3g} on a value of "
                      f"{float(fine):.6g}, above rtol={rtol:g}. Raise order=... (the error shrinks slowly at a "
                      "kink), loosen rtol=..., or check the estimator with scg.check_grad, which accounts for the "
                      "reference's error. " + _AFFINE_HINT)
    return fine


@dataclasses.dataclass(frozen=True)
class Reference:
    """An expectation, its gradient, and their estimated errors (0 where the integration is exact).

    ``notes``: one line per kink or jump that a Normal site's value reaches, saying
    where it is and how it was integrated, and one per ``stop_gradient``.
    """

    value: jax.Array
    grad: list
    value_error: float
    grad_error: list
    notes: tuple
    exact: bool


def reference(graph: Graph, param_leaves: list, input_leaves: list, *, order: int = DEFAULT_ORDER,
              budget: int = DEFAULT_BUDGET) -> Reference:
    """Value and gradient of ``E[Σ costs]`` with error estimates; never refuses for non-smoothness.

    Exact rules (enumeration, Gauss–Hermite on smooth costs, piecewise rules at located kinks)
    report error 0. Otherwise the sites near the unlocated kinks are integrated with the rules of
    :data:`LEVELS` that fit the budget (two families, two resolutions each), the finest is returned
    and the spread of all is the error; where a jump is not located the gradient's error is
    infinite (the quadrature misses the jump's contribution at every resolution).
    """
    prep = prepare(graph, order, budget)
    analysis = prep.analysis
    # one compiled program (an eager walk compiles every primitive on its own shapes)
    run = jax.jit(lambda p, x, levels: [jax.value_and_grad(
        lambda leaves: integrate_prepared(prep, leaves, x, level=lv))(p) for lv in levels], static_argnums=2)
    notes = tuple(k.describe() for k in analysis.kinks) + tuple(
        f"a stop_gradient{' at ' + src if src else ''} in the value of Normal site {s!r}: its points are held "
        "constant and the weights carry the gradient" for s, src in analysis.stop_gradients)
    results = run(list(param_leaves), list(input_leaves), prep.levels)
    value, grad = results[-1]
    if analysis.exact:
        return Reference(value, grad, 0.0, [jnp.zeros_like(g) for g in grad], notes, True)
    factor = ROUGH if len(results) == 2 else 1.0
    value_error = float(_spread([v for v, _ in results])) * factor
    if analysis.has_unresolved_jump:
        grad_error = [jnp.full_like(g, jnp.inf) for g in grad]
    else:
        grad_error = [_spread([gs[i] for _, gs in results]) * factor for i in range(len(grad))]
    how = ("Gauss-Hermite of two orders and composite rules of two sizes" if factor == 1.0 else
           "Gauss-Hermite of two orders (doubled: the composite rules do not fit the budget)")
    notes += (f"the reference is estimated: its error is the spread of {how}",)
    return Reference(value, grad, value_error, grad_error, notes, False)
