"""Exact expectations and the cross-check of an estimator against them.

``expectation`` computes ``E[Σ costs]`` by integrating every site exactly
(:mod:`scg.integrate`: enumeration of discrete sites, Gauss–Hermite over
Normal sites, mixed freely) with nested ``vmap``; it is differentiable, so
``jax.grad(expectation)`` is the exact gradient the estimators must match.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import ndtri

from scg import integrate
from scg.integrate import graph_expectation
from scg.ir import Graph
from scg.lower import Objective, compile as compile_objective


def _graph_of(model_or_graph: Any, params: Any, args: tuple) -> Graph:
    if isinstance(model_or_graph, Graph):
        return model_or_graph
    return model_or_graph.trace(params, *args)


def expectation(model_or_graph: Any, params: Any, *args: Any, order: int = integrate.DEFAULT_ORDER,
                budget: int = integrate.DEFAULT_BUDGET) -> jax.Array:
    """The exact expected loss ``E[Σ costs]``, differentiable in ``params``.

    Integrates discrete sites with finite support by enumerating their joint
    support and Normal sites by tensor-product Gauss–Hermite quadrature of
    ``order`` points per coordinate (exact for polynomial costs of degree
    ``< 2·order``). Raises ``BudgetError`` when the joint grid has more than
    ``budget`` points and ``IntractableError`` for a site of another family.

    Quadrature is exact for polynomials and very accurate for smooth costs; it
    is *not* for costs that jump in a Normal site's value (``z > 0``): there the
    gradient through the quadrature points misses the jump. Check such models
    with discrete sites or closed forms.

    Examples:
      >>> import jax, jax.numpy as jnp, numpyro.distributions as dist, scg
      >>> @scg.model
      ... def m(params, x):
      ...     z = scg.sample("z", dist.Normal(params["mu"], 1.0))
      ...     scg.cost("fit", (z - x) ** 2)
      >>> params, x = {"mu": jnp.array(0.5)}, jnp.array(1.0)
      >>> round(float(scg.expectation(m, params, x)), 5)   # (μ - x)² + 1
      1.25
      >>> round(float(jax.grad(lambda p: scg.expectation(m, p, x))(params)["mu"]), 5)   # 2 (μ - x)
      -1.0
    """
    graph = _graph_of(model_or_graph, params, args)
    param_leaves = jax.tree_util.tree_leaves(params)
    input_leaves = jax.tree_util.tree_leaves(tuple(args))
    return graph_expectation(graph, param_leaves, input_leaves, order=order, budget=budget)


@dataclasses.dataclass(frozen=True)
class GradReport:
    """The estimator's mean against the exact gradient, coordinate by coordinate.

    ``z = (mean − exact) / (std / √N)``; ``ok`` is ``max |z| < bound`` with the
    bound a two-sided Bonferroni quantile for ``alpha`` over all coordinates.
    Coordinates whose estimate has no variance must match to float tolerance.
    """

    ok: bool
    bound: float
    num_samples: int
    z_scores: Any
    mean: Any
    exact: Any
    stderr: Any
    names: tuple

    @property
    def max_abs_z(self) -> float:
        leaves = jax.tree_util.tree_leaves(self.z_scores)
        return float(max((np.max(np.abs(np.asarray(z))) for z in leaves), default=0.0))

    def __str__(self) -> str:
        lines = [f"check_grad: {'ok' if self.ok else 'FAILED'}  (N={self.num_samples}, max |z| = "
                 f"{self.max_abs_z:.2f}, bound {self.bound:.2f})"]
        lines.append(f"  {'parameter':<28} {'max|z|':>7} {'estimate mean':>14} {'exact':>12} {'stderr':>10}")
        flat = zip(self.names, *(jax.tree_util.tree_leaves(t) for t in (self.z_scores, self.mean, self.exact, self.stderr)))
        for name, z, m, e, s in flat:
            z, m, e, s = map(np.asarray, (z, m, e, s))
            i = int(np.argmax(np.abs(z))) if z.size else 0
            pick = lambda a: a.reshape(-1)[i] if a.size else float("nan")
            lines.append(f"  {name:<28} {np.abs(pick(z)):>7.2f} {pick(m):>14.6g} {pick(e):>12.6g} {pick(s):>10.3g}")
        return "\n".join(lines)


def check_grad(model: Any, params: Any, *args: Any, key: jax.Array, num_samples: int = 10_000,
               passes: Any = "auto", baseline: Any = None, particles: int = 1, alpha: float = 1e-3,
               order: int = integrate.DEFAULT_ORDER, budget: int = integrate.DEFAULT_BUDGET,
               chunk_size: int = 1000) -> GradReport:
    """Draws ``num_samples`` gradient estimates and compares their mean with the exact gradient.

    The estimator is ``scg.compile(model, passes=passes, baseline=baseline)``
    with ``particles`` particles per estimate; the truth is
    ``jax.grad(scg.expectation)`` of the *original* model.

    Examples:
      >>> import jax, jax.numpy as jnp, numpyro.distributions as dist, scg
      >>> @scg.model
      ... def m(params, x):
      ...     b = scg.sample("b", dist.Bernoulli(logits=params["w"]))
      ...     scg.cost("err", (b - x) ** 2.0)
      >>> params, x = {"w": jnp.array(0.0)}, jnp.array(1.0)
      >>> report = scg.check_grad(m, params, x, key=jax.random.key(0), num_samples=2000)
      >>> report.ok
      True
    """
    objective = model if isinstance(model, Objective) else compile_objective(model, passes=passes, baseline=baseline)
    source = objective.source
    exact_grad = jax.grad(lambda p: expectation(source, p, *args, order=order, budget=budget))(params)

    grad_one = objective.unjitted_grad(params, *args, num_samples=particles)
    chunk_size = max(1, min(chunk_size, num_samples))
    n_chunks = math.ceil(num_samples / chunk_size)
    keys = jax.random.split(key, n_chunks * chunk_size).reshape(n_chunks, chunk_size, *jax.random.split(key, 1).shape[1:])

    @jax.jit
    def moments(keys):
        # sums of the estimates and of their squares, shifted by the exact value for numerical accuracy
        def chunk(carry, ks):
            g = jax.vmap(grad_one)(ks)
            d = jax.tree_util.tree_map(lambda x, e: x - jnp.expand_dims(e, 0), g, exact_grad)
            s1 = jax.tree_util.tree_map(lambda a, x: a + jnp.sum(x, 0), carry[0], d)
            s2 = jax.tree_util.tree_map(lambda a, x: a + jnp.sum(x * x, 0), carry[1], d)
            return (s1, s2), None

        zeros = jax.tree_util.tree_map(jnp.zeros_like, exact_grad)
        (s1, s2), _ = jax.lax.scan(chunk, (zeros, zeros), keys)
        return s1, s2

    s1, s2 = moments(keys)
    n = n_chunks * chunk_size
    mean_dev = jax.tree_util.tree_map(lambda a: a / n, s1)
    var = jax.tree_util.tree_map(lambda a, m: jnp.maximum(a / n - m * m, 0.0) * n / max(n - 1, 1), s2, mean_dev)
    stderr = jax.tree_util.tree_map(lambda v: jnp.sqrt(v / n), var)
    mean = jax.tree_util.tree_map(lambda m, e: m + e, mean_dev, exact_grad)

    def zscore(m, se, e):
        tol = 1e-5 * (1.0 + jnp.abs(e))
        return jnp.where(se > 0, m / jnp.where(se > 0, se, 1.0), jnp.where(jnp.abs(m) <= tol, 0.0, jnp.inf))

    z = jax.tree_util.tree_map(zscore, mean_dev, stderr, exact_grad)
    n_coords = sum(int(np.size(x)) for x in jax.tree_util.tree_leaves(exact_grad))
    bound = float(-ndtri(alpha / (2 * max(n_coords, 1))))
    max_z = max(float(jnp.max(jnp.abs(x))) for x in jax.tree_util.tree_leaves(z))
    names = objective.graph_for(params, *args).param_names
    return GradReport(ok=bool(max_z < bound), bound=bound, num_samples=n, z_scores=z, mean=mean,
                      exact=exact_grad, stderr=stderr, names=names)
