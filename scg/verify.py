"""``Certificate.verify``: the per-instance check that a rewrite preserved E[loss] and its gradient."""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import ndtri

from scg import estimators, integrate
from scg.errors import BudgetError, IntractableError
from scg.integrate import graph_expectation


@dataclasses.dataclass(frozen=True)
class VerifyReport:
    """Before/after comparison of one rewrite on one instance.

    method: ``"exact"`` (both graphs integrated exactly; compared to float
    tolerance ``rtol``) or ``"monte-carlo"`` (means compared through their
    standard errors; ``max_z`` against a Bonferroni bound).
    """

    ok: bool
    method: str
    value_before: float
    value_after: float
    grad_before: Any
    grad_after: Any
    max_discrepancy: float
    bound: float

    def __str__(self) -> str:
        unit = "relative error" if self.method == "exact" else "|z|"
        return (f"verify ({self.method}): {'ok' if self.ok else 'FAILED'}; E[loss] before {self.value_before:.6g}, "
                f"after {self.value_after:.6g}; max {unit} over value and gradient = {self.max_discrepancy:.3g} "
                f"(bound {self.bound:.3g})")


def _exact(cert, params, args, order, budget, rtol):
    p_leaves = jax.tree_util.tree_leaves(params)
    x_leaves = jax.tree_util.tree_leaves(tuple(args))
    treedef = jax.tree_util.tree_structure(params)

    def value_and_grad(graph):
        f = lambda leaves: graph_expectation(graph, leaves, x_leaves, order=order, budget=budget)
        v, g = jax.value_and_grad(f)(p_leaves)
        return v, jax.tree_util.tree_unflatten(treedef, g)

    v0, g0 = value_and_grad(cert.before)
    v1, g1 = value_and_grad(cert.after)
    pairs = [(v0, v1)] + list(zip(jax.tree_util.tree_leaves(g0), jax.tree_util.tree_leaves(g1)))
    scale = max(1.0, max(float(jnp.max(jnp.abs(a))) for a, _ in pairs))
    err = max(float(jnp.max(jnp.abs(a - b))) for a, b in pairs) / scale
    return VerifyReport(err <= rtol, "exact", float(v0), float(v1), g0, g1, err, rtol)


def _monte_carlo(cert, params, args, key, num_samples, alpha):
    p_leaves = jax.tree_util.tree_leaves(params)
    x_leaves = jax.tree_util.tree_leaves(tuple(args))

    def draws(graph, k, p_leaves, x_leaves):
        def one(kk):
            f = lambda leaves: estimators.surrogate_and_loss(graph, leaves, x_leaves, kk)
            (_, (v, _)), g = jax.value_and_grad(f, has_aux=True)(p_leaves)
            return jnp.concatenate([jnp.reshape(v, (1,))] + [jnp.ravel(x) for x in g])

        return jax.lax.map(one, jax.random.split(k, num_samples), batch_size=min(num_samples, 256))

    k0, k1 = jax.random.split(key)
    # one compiled program per graph (run eagerly, the remainder batch of lax.map, when num_samples is not
    # a multiple of 256, would compile every primitive on its own); params and data as arguments, not
    # constants baked into the program
    a, b = (jax.jit(functools.partial(draws, graph))(k, p_leaves, x_leaves)
            for graph, k in ((cert.before, k0), (cert.after, k1)))
    diff = jnp.mean(a, 0) - jnp.mean(b, 0)
    se = jnp.sqrt(jnp.var(a, 0, ddof=1) / num_samples + jnp.var(b, 0, ddof=1) / num_samples)
    z = jnp.where(se > 0, jnp.abs(diff) / jnp.where(se > 0, se, 1.0), jnp.where(jnp.abs(diff) < 1e-5, 0.0, jnp.inf))
    bound = float(-ndtri(alpha / (2 * z.size)))
    max_z = float(jnp.max(z))
    treedef = jax.tree_util.tree_structure(params)

    def unflatten(row):
        sizes = [int(np.size(x)) for x in p_leaves]
        parts = np.split(np.asarray(row[1:]), np.cumsum(sizes)[:-1])
        return jax.tree_util.tree_unflatten(treedef, [p.reshape(np.shape(x)) for p, x in zip(parts, p_leaves)])

    ma, mb = jnp.mean(a, 0), jnp.mean(b, 0)
    return VerifyReport(max_z < bound, "monte-carlo", float(ma[0]), float(mb[0]), unflatten(ma), unflatten(mb),
                        max_z, bound)


def verify_rewrite(cert, params: Any, *args: Any, key: jax.Array, num_samples: int = 2000,
                   order: int = integrate.DEFAULT_ORDER, budget: int = integrate.DEFAULT_BUDGET,
                   rtol: float = 1e-4, alpha: float = 1e-3) -> VerifyReport:
    if cert.before is None or cert.after is None:
        raise ValueError("this certificate does not carry its graphs; verify needs the graphs before and after")
    try:
        return _exact(cert, params, args, order, budget, rtol)
    except (BudgetError, IntractableError):
        return _monte_carlo(cert, params, args, key, num_samples, alpha)
