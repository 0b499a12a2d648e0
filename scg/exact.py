"""Exact expectations and the cross-check of an estimator against them.

``expectation`` computes ``E[Σ costs]`` by integrating every site exactly
(:mod:`scg.integrate`: enumeration of discrete sites, Gauss–Hermite over
Normal sites, mixed freely, piecewise rules across kinks and jumps at affine
functions of a Normal site) with nested ``vmap``; it is differentiable, so
``jax.grad(expectation)`` is the exact gradient the estimators must match.
Where no exact rule applies it says so: :func:`reference` returns the value and
gradient with estimated errors, ``expectation`` refuses, and ``check_grad``
accounts for the error and can answer "reference not exact enough".
"""
from __future__ import annotations

import dataclasses
import numbers
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import ndtri

from scg import integrate
from scg.errors import check_key
from scg.integrate import Reference, graph_expectation
from scg.ir import Graph
from scg.lower import Objective, compile as compile_objective

OK, FAILED, NOT_EXACT = "ok", "FAILED", "reference not exact enough"


def _graph_of(model_or_graph: Any, params: Any, args: tuple) -> Graph:
    if isinstance(model_or_graph, Graph):
        return model_or_graph
    return model_or_graph.trace(params, *args)


def _check_int(value: Any, name: str, where: str, minimum: int, why: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{where}: {name}={value!r} must be an integer >= {minimum} ({why})")
    if value < minimum:
        raise ValueError(f"{where}: {name}={value!r} must be >= {minimum} ({why})")
    return int(value)


def _check_rules(order: Any, budget: Any, where: str) -> None:
    _check_int(order, "order", where, 1, "the number of Gauss-Hermite points per coordinate of a Normal site")
    _check_int(budget, "budget", where, 1, "the largest joint grid, in points, an exact expectation may use")


def expectation(model_or_graph: Any, params: Any, *args: Any, order: int = integrate.DEFAULT_ORDER,
                budget: int = integrate.DEFAULT_BUDGET, rtol: float = integrate.DEFAULT_RTOL) -> jax.Array:
    r"""The exact expected loss ``E[Σ costs]``, differentiable in ``params``.

    Integrates discrete sites with finite support by enumerating their joint
    support and Normal sites by tensor-product Gauss–Hermite quadrature of
    ``order`` points per coordinate (exact for polynomial costs of degree
    ``< 2·order``, accurate to float32 for smooth costs). A discrete site's
    joint support is the product of its elements' (``Independent``, ``expand``,
    a Binomial whose ``total_count`` differs between elements); bounds set by
    operands (``total_count``) must be constants of the model. Raises
    ``BudgetError`` when the joint grid has more than ``budget`` points and
    ``IntractableError`` for a site of another family, a support bound computed
    from the parameters or data, or a masked discrete site, naming the site.

    **Kinks and jumps.** Where a cost depends on a Normal site's value through a
    non-smooth primitive (``relu``/``max``, ``abs``, ``clip``, ``sort``,
    comparisons such as ``jnp.where(z > c, ...)``, ``sign``) at an *affine*
    function of the site's value, the site is integrated piecewise, split at
    the breakpoints, exactly in value and gradient. Anywhere else (``relu(sin
    z)``, ``z**3 > 0.5``, ``floor(z)``, a kink whose place also depends on a
    later discrete site, a plated site) quadrature is not exact: a kink's
    reference is computed with several rules and returned only when their spread
    is at most ``rtol · max(|E|, 1)``, on concrete parameters (under
    ``jax.grad``/``jit``/``vmap`` no error can be estimated, so it is refused);
    a jump that cannot be located is always refused. Refusals are
    ``IntractableError``\ s naming the primitive and its source line.
    ``scg.exact.reference`` gives value, gradient and their estimated errors
    instead of refusing.

    **stop_gradient** does not change a value, so the value is ``E[Σ costs]``.
    Its gradient reads ``stop_gradient`` as ``jax.grad`` does along the
    deterministic data flow, while every site's value stays an integration
    variable whose density carries its dependence on the parameters:
    ``∇θ ∫ Σ costs(θ, z) Π p_θ(z) dz``. Without ``stop_gradient`` this is
    ``∇θ E[Σ costs]``; with it, it is the gradient of the surrogate, which is
    what scg's estimators estimate (the score-function term of a site counts
    its costs whatever stops their gradient; ``reparameterize`` refuses a site
    whose value reaches a ``stop_gradient``). So ``cost = stop_gradient(z) * mu``
    with ``z ~ N(mu, 1)`` has gradient ``2 mu``, and ``stop_gradient(mu) * z``
    has ``mu``.

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
      >>> @scg.model
      ... def step(params, x):
      ...     z = scg.sample("z", dist.Normal(params["mu"], 1.0))
      ...     scg.cost("above", jnp.where(z > x, 1.0, 0.0))
      >>> round(float(scg.expectation(step, {"mu": jnp.array(0.3)}, 0.0)), 4)   # Φ(0.3), exactly
      0.6179
    """
    _check_rules(order, budget, "scg.expectation")
    graph = _graph_of(model_or_graph, params, args)
    param_leaves = jax.tree_util.tree_leaves(params)
    input_leaves = jax.tree_util.tree_leaves(tuple(args))
    return graph_expectation(graph, param_leaves, input_leaves, order=order, budget=budget, rtol=rtol)


def reference(model_or_graph: Any, params: Any, *args: Any, order: int = integrate.DEFAULT_ORDER,
              budget: int = integrate.DEFAULT_BUDGET) -> Reference:
    """``E[Σ costs]`` and its gradient (shaped like ``params``) with their estimated errors.

    Never refuses for non-smoothness: where :func:`expectation` would refuse, the
    errors say how far the numbers can be trusted (0 for exact rules; the
    spread of several quadrature rules at an unlocated kink; infinite
    for the gradient at an unlocated jump). ``notes`` says where each kink is
    and how it was integrated.

    Examples:
      >>> import jax, jax.numpy as jnp, numpyro.distributions as dist, scg
      >>> from scg.exact import reference
      >>> @scg.model
      ... def m(params, x):
      ...     z = scg.sample("z", dist.Normal(params["mu"], 1.0))
      ...     scg.cost("hinge", jax.nn.relu(z - x))
      >>> ref = reference(m, {"mu": jnp.array(0.3)}, 0.0)
      >>> ref.exact, round(float(ref.grad["mu"]), 4)   # Φ(0.3)
      (True, 0.6179)
    """
    _check_rules(order, budget, "scg.exact.reference")
    graph = _graph_of(model_or_graph, params, args)
    treedef = jax.tree_util.tree_structure(params)
    ref = integrate.reference(graph, jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(tuple(args)),
                              order=order, budget=budget)
    return dataclasses.replace(ref, grad=jax.tree_util.tree_unflatten(treedef, ref.grad),
                               grad_error=jax.tree_util.tree_unflatten(treedef, ref.grad_error))


@dataclasses.dataclass(frozen=True)
class GradReport:
    """The estimator's mean against the exact gradient, coordinate by coordinate.

    ``z = (mean − exact) / (std / √N)``, judged against ``bound``, a two-sided
    Bonferroni quantile for ``alpha`` over all coordinates, widened by the
    reference's error ``e`` (:func:`reference`, at least float32 rounding).
    With ``d = |mean − exact|`` and ``s = max(bound · stderr, 1e-5 (1 + |exact|))``
    a coordinate is consistent when ``d + e ≤ s`` (whatever the truth within the
    reference's error), inconsistent when ``d − e > s``, undecided otherwise.
    ``status`` is ``"FAILED"`` when some coordinate is inconsistent,
    ``"reference not exact enough"`` when some is undecided, ``"ok"``
    otherwise; ``ok`` is ``status == "ok"``. A correct
    estimator is never FAILED (but for the ``alpha`` chance).
    """

    ok: bool
    bound: float
    num_samples: int
    z_scores: Any
    mean: Any
    exact: Any
    stderr: Any
    names: tuple
    status: str = OK
    reference_error: Any = None
    notes: tuple = ()

    @property
    def max_abs_z(self) -> float:
        leaves = jax.tree_util.tree_leaves(self.z_scores)
        return float(max((np.max(np.abs(np.asarray(z))) for z in leaves), default=0.0))

    def __str__(self) -> str:
        lines = [f"check_grad: {self.status}  (N={self.num_samples}, max |z| = {self.max_abs_z:.2f}, "
                 f"bound {self.bound:.2f})"]
        if self.status == NOT_EXACT:
            lines.append("  the reference's own error is too large to decide: the estimator is neither confirmed nor "
                         "refuted (see the notes; a kink at an affine function of a Normal coordinate is exact)")
        lines.append(f"  {'parameter':<28} {'max|z|':>7} {'estimate mean':>14} {'exact':>12} {'stderr':>10} "
                     f"{'ref. error':>10}")
        errors = self.reference_error if self.reference_error is not None else jax.tree_util.tree_map(
            jnp.zeros_like, self.exact)
        flat = zip(self.names, *(jax.tree_util.tree_leaves(t) for t in (self.z_scores, self.mean, self.exact,
                                                                       self.stderr, errors)))
        for name, z, m, e, s, r in flat:
            z, m, e, s, r = map(np.asarray, (z, m, e, s, r))
            i = int(np.argmax(np.abs(z))) if z.size else 0
            pick = lambda a: a.reshape(-1)[i] if a.size else float("nan")
            lines.append(f"  {name:<28} {np.abs(pick(z)):>7.2f} {pick(m):>14.6g} {pick(e):>12.6g} {pick(s):>10.3g} "
                         f"{pick(r):>10.3g}")
        lines.extend(f"  note: {n}" for n in self.notes)
        return "\n".join(lines)


def check_grad(model: Any, params: Any, *args: Any, key: jax.Array, num_samples: int = 10_000,
               passes: Any = "auto", baseline: Any = None, particles: int = 1, alpha: float = 1e-3,
               order: int = integrate.DEFAULT_ORDER, budget: int = integrate.DEFAULT_BUDGET,
               chunk_size: int = 1000) -> GradReport:
    """Draws ``num_samples`` gradient estimates and compares their mean with the exact gradient.

    The estimator is ``scg.compile(model, passes=passes, baseline=baseline)``
    with ``particles`` particles per estimate; the truth is the gradient of
    ``scg.expectation`` of the *original* model, from :func:`reference`, with
    its estimated error. ``report.status`` is ``"ok"``, ``"FAILED"`` (the
    estimator's mean is inconsistent with the truth even allowing for the
    reference's error) or ``"reference not exact enough"`` (a kink or jump the
    reference cannot integrate exactly leaves the verdict open; the notes name
    it). ``stop_gradient`` inside the model: the truth is the gradient of the
    surrogate the estimators differentiate (see :func:`expectation`).
    ``num_samples`` must be at least 2 (a standard error needs two draws); the
    draws run ``chunk_size`` at a time, and exactly ``num_samples`` are drawn.

    Examples:
      >>> import jax, jax.numpy as jnp, numpyro.distributions as dist, scg
      >>> @scg.model
      ... def m(params, x):
      ...     b = scg.sample("b", dist.Bernoulli(logits=params["w"]))
      ...     scg.cost("err", (b - x) ** 2.0)
      >>> params, x = {"w": jnp.array(0.0)}, jnp.array(1.0)
      >>> report = scg.check_grad(m, params, x, key=jax.random.key(0), num_samples=2000)
      >>> report.ok, report.status
      (True, 'ok')
    """
    check_key(key, "scg.check_grad")
    where = "scg.check_grad"
    num_samples = _check_int(num_samples, "num_samples", where, 2, "a standard error needs at least two estimates")
    chunk_size = _check_int(chunk_size, "chunk_size", where, 1, "how many estimates are drawn at once")
    particles = _check_int(particles, "particles", where, 1, "particles averaged per estimate")
    if not (isinstance(alpha, numbers.Real) and 0.0 < float(alpha) < 1.0):
        raise ValueError(f"{where}: alpha={alpha!r} must be a probability strictly between 0 and 1 (the chance "
                         "that a correct estimator is reported FAILED)")
    _check_rules(order, budget, where)
    objective = model if isinstance(model, Objective) else compile_objective(model, passes=passes, baseline=baseline)
    ref = reference(objective.source, params, *args, order=order, budget=budget)
    exact_grad = ref.grad

    grad_one = objective.unjitted_grad(params, *args, num_samples=particles)
    chunk_size = min(chunk_size, num_samples)
    n_chunks, remainder = divmod(num_samples, chunk_size)
    keys = jax.random.split(key, num_samples)

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

    main = keys[:n_chunks * chunk_size]
    s1, s2 = moments(main.reshape((n_chunks, chunk_size) + main.shape[1:]))
    if remainder:  # the last draws, one smaller chunk: exactly num_samples estimates
        rest = keys[n_chunks * chunk_size:]
        r1, r2 = moments(rest.reshape((1, remainder) + rest.shape[1:]))
        s1 = jax.tree_util.tree_map(jnp.add, s1, r1)
        s2 = jax.tree_util.tree_map(jnp.add, s2, r2)
    n = num_samples
    mean_dev = jax.tree_util.tree_map(lambda a: a / n, s1)
    var = jax.tree_util.tree_map(lambda a, m: jnp.maximum(a / n - m * m, 0.0) * n / (n - 1), s2, mean_dev)
    stderr = jax.tree_util.tree_map(lambda v: jnp.sqrt(v / n), var)
    mean = jax.tree_util.tree_map(lambda m, e: m + e, mean_dev, exact_grad)

    def zscore(m, se, e):
        tol = 1e-5 * (1.0 + jnp.abs(e))
        return jnp.where(se > 0, m / jnp.where(se > 0, se, 1.0), jnp.where(jnp.abs(m) <= tol, 0.0, jnp.inf))

    z = jax.tree_util.tree_map(zscore, mean_dev, stderr, exact_grad)
    n_coords = sum(int(np.size(x)) for x in jax.tree_util.tree_leaves(exact_grad))
    bound = float(-ndtri(alpha / (2 * max(n_coords, 1))))
    # float32 rounding of the reference's sums is part of its error, even for exact rules
    ref_error = jax.tree_util.tree_map(lambda r, e: jnp.maximum(r, 2e-6 * (1.0 + jnp.abs(e))), ref.grad_error,
                                       exact_grad)
    status = _status(mean_dev, stderr, exact_grad, ref_error, bound)
    names = objective.graph_for(params, *args).param_names
    return GradReport(ok=status == OK, bound=bound, num_samples=n, z_scores=z, mean=mean, exact=exact_grad,
                      stderr=stderr, names=names, status=status, reference_error=ref_error, notes=ref.notes)


def _status(mean_dev: Any, stderr: Any, exact: Any, ref_error: Any, bound: float) -> str:
    failed = undecided = False
    for m, se, e, r in zip(*(jax.tree_util.tree_leaves(t) for t in (mean_dev, stderr, exact, ref_error))):
        d, se, e, r = (np.asarray(x, dtype=np.float64) for x in (jnp.abs(m), se, e, r))
        # differences within float tolerance agree whatever the spread (a near-deterministic estimate)
        s = np.maximum(bound * se, 1e-5 * (1.0 + np.abs(e)))
        with np.errstate(invalid="ignore"):
            bad = np.isnan(d) | (d - r > s)
            good = ~np.isnan(d) & (d + r <= s)
        failed |= bool(np.any(bad))
        undecided |= bool(np.any(~good & ~bad))
    return FAILED if failed else NOT_EXACT if undecided else OK
