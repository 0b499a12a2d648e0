"""The one graph walker, in the textbook shape (``env``, ``read``/``write``, ``bind``).

:func:`walk` evaluates a Graph node by node. Deterministic nodes re-bind their
JAX primitive, log-density nodes call :func:`log_density` (the family's
``log_prob``, with exact slopes for logit-parameterized Bernoulli and
Binomial), and at every site it hands control to a *site handler* in
continuation-passing style::

    on_site(site, distribution, env, continue_with) -> result

where ``continue_with(value, extra={})`` walks the rest of the graph with the
site set to ``value`` (and ``extra`` added to the environment: handlers keep
per-site quantities such as log densities there) and returns what
``on_end(env)`` returns. An enumerating handler calls it under ``jax.vmap``
over the support and takes the weighted sum. A sampling handler, which would
call it once in tail position, returns ``Draw(value, extra)`` instead and the
walk goes on in the same loop: no Python recursion per site, so a chain of
thousands of sites walks in constant stack depth (only enumerated and
integrated sites nest, and their number is bounded by the grid budget).

A ``Scan`` node is handed to ``on_scan(node, operands, env) -> (results,
extra)``, which runs the loop (the estimator walks the body once per step
inside ``lax.scan``). Walking happens at trace time: the compiled function
has no Python per node.

**Check nodes** evaluate numpyro's ``arg_constraints`` of a distribution's
operands. Their conjunction is kept in ``env[VALID]``; :func:`validity_factor`
turns it into ``1`` or ``NaN``, which the estimator and the exact integrator
multiply into everything they return, so an invalid parameter gives NaN values
*and* NaN gradients (``∂(NaN·S) = NaN·∂S``) instead of plausible numbers. With
``checked=True`` each failed constraint also raises through
``jax.experimental.checkify``, naming the site and the parameter.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpyro.distributions as dist
from jax.experimental import checkify
from jax.scipy.special import gammaln
from numpyro.distributions import constraints
from numpyro.distributions.util import validate_sample

from scg import _jax
from scg.errors import ModelError
from scg.ir import Check, Equation, Graph, Literal, LogProb, Scan, Site, Var

VALID = ("scg.valid",)  # env key: the conjunction of every check walked so far


class Draw(NamedTuple):
    """A site handler's answer "the site takes ``value``; go on" (``extra`` joins the environment)."""

    value: Any
    extra: dict = {}


def initial_env(graph: Graph, param_leaves: list, input_leaves: list) -> dict:
    env: dict = {}
    for v, x in zip(graph.params, param_leaves):
        env[v] = x
    for v, x in zip(graph.inputs, input_leaves):
        env[v] = x
    for v, c in graph.consts:
        env[v] = c
    return env


def read(env: dict, atom: Any) -> Any:
    return atom.value if isinstance(atom, Literal) else env[atom]


class _BernoulliLogits(dist.BernoulliLogits):
    """``log p(v) = v·ℓ − softplus(ℓ)``: slope ``v − σ(ℓ)`` everywhere, ``ℓ = 0`` too.

    numpyro's own formula with its ``max(ℓ, 0) + log1p(exp(−|ℓ|))`` replaced by
    ``softplus`` (``logaddexp(ℓ, 0)``, whose derivative is ``σ(ℓ)``), and the same
    limits at infinite logits: as cheap as numpyro's, so loops pay nothing for it.
    """

    @validate_sample
    def log_prob(self, value: Any) -> jax.Array:
        finite = jnp.isfinite(self.logits)
        logits = jnp.where(finite, self.logits, jnp.zeros_like(self.logits))
        usual = value * logits - jax.nn.softplus(logits)
        # the limits: 0 where the value is the one an infinite logit makes sure, −∞ where it is the other
        return jnp.where(finite, usual, jnp.where(jnp.logical_xor(value, self.logits > 0), -jnp.inf, 0.0))


class _BinomialLogits(dist.BinomialLogits):
    """``log C(n, k) + k·ℓ − n·softplus(ℓ)``: slope ``k − n·σ(ℓ)`` everywhere (numpyro's, with ``softplus``)."""

    @validate_sample
    def log_prob(self, value: Any) -> jax.Array:
        n = jnp.asarray(self.total_count, dtype=jnp.result_type(float))
        log_choose = gammaln(n + 1) - gammaln(value + 1) - gammaln(n - value + 1)
        return log_choose + value * self.logits - n * jax.nn.softplus(self.logits)


def _validates(d: Any) -> bool:
    # a distribution rebuilt from its leaves (tree_unflatten) has _validate_args None: numpyro's
    # log_prob then does not validate, while __init__(validate_args=None) would take numpyro's
    # global default (on since 0.22) and score fractional Bernoulli values −∞
    return bool(getattr(d, "_validate_args", False))


_EXACT_SLOPES = {dist.BernoulliLogits: lambda d: _BernoulliLogits(d.logits, validate_args=_validates(d)),
                 dist.BinomialLogits: lambda d: _BinomialLogits(d.logits, d.total_count,
                                                                validate_args=_validates(d))}


def log_density(distribution: Any, value: Any) -> jax.Array:
    """``distribution.log_prob(value)`` with the right gradient where numpyro's is wrong; scg's one way to score.

    numpyro writes ``softplus(ℓ)`` in ``BernoulliLogits`` and ``BinomialLogits``
    as ``max(ℓ, 0) + log1p(exp(−|ℓ|))``; at ``ℓ = 0`` exactly JAX gives the two
    pieces the slopes ``1/2`` and ``−1/2`` (``∂|ℓ| = 1`` there), so
    ``∂ℓ log p(v)`` is ``v`` instead of ``v − 1/2``. A logit of exactly 0 is
    common (zero-initialized biases; float32 sums such as ``−0.4 + 0.25 + 0.15``),
    and there the enumeration weights ``Σ_v p(v)`` get a nonzero gradient
    and a score-function term a biased one. Those families (also inside
    ``Independent``, ``expand`` and masks) are scored with ``softplus``, whose
    slope is ``σ(ℓ)`` everywhere; values are numpyro's to float rounding.
    """
    is_fixed = lambda x: type(x) in _EXACT_SLOPES
    if not any(is_fixed(d) for d in _nested(distribution)):
        return distribution.log_prob(value)
    fixed = jax.tree_util.tree_map(lambda x: _EXACT_SLOPES[type(x)](x) if is_fixed(x) else x, distribution,
                                   is_leaf=is_fixed)
    return fixed.log_prob(value)


def _nested(distribution: Any) -> list:
    """The distribution and the ones it wraps (``base_dist`` of ``Independent``, ``expand``, masks)."""
    found, d = [], distribution
    while d is not None:
        found.append(d)
        d = getattr(d, "base_dist", None)
    return found


def parameter_checks(distribution: Any) -> list[tuple[str, Any]]:
    """``(parameter, all elements satisfy its constraint)`` for each parameter the distribution was given.

    Looks through wrappers (``Independent``, ``expand``, masks) to the base
    distribution; parameters with a ``dependent`` constraint are not checkable
    on their own and are skipped.
    """
    checks, d, prefix = [], distribution, ""
    continuous = not getattr(getattr(distribution, "support", None), "is_discrete", False)
    while d is not None:
        for name, constraint in getattr(d, "arg_constraints", {}).items():
            value = d.__dict__.get(name)  # only what the user gave (probs vs logits), not lazy properties
            if value is None or constraints.is_dependent(constraint):
                continue
            if continuous and constraint in (constraints.real, constraints.real_vector):
                continue  # a NaN or infinite real parameter of a continuous family already gives NaN values
            checks.append((prefix + name, jnp.all(constraint(value))))
        d, prefix = getattr(d, "base_dist", None), prefix + "base."
    return checks


def validity_factor(env: dict, dtype: Any = jnp.float32) -> Any:
    """``1`` where every check walked so far held, ``NaN`` otherwise (multiply it into results).

    A Python ``1.0`` when no check needed run-time work, so nothing is added to the computation.
    """
    if VALID not in env:
        return 1.0
    return jnp.where(env[VALID], jnp.ones((), dtype), jnp.full((), jnp.nan, dtype))


def walk(graph: Graph, env: dict, *, on_site: Callable, on_end: Callable, on_scan: Callable | None = None,
         start: int = 0, checked: bool = False) -> Any:
    """Evaluates ``graph.nodes[start:]`` in ``env`` (a dict Var -> value, not mutated).

    ``checked``: raise (through ``checkify``) on a failed parameter check, besides recording it.
    """
    env = dict(env)
    nodes = graph.nodes
    for i in range(start, len(nodes)):
        node = nodes[i]
        if isinstance(node, Equation):
            outs = _jax.bind(node.primitive, node.params, [read(env, a) for a in node.inputs])
            for v, x in zip(node.outputs, outs):
                env[v] = x
        elif isinstance(node, LogProb):
            distribution = node.dist.build([read(env, a) for a in node.dist_inputs])
            env[node.output] = log_density(distribution, read(env, node.value))
        elif isinstance(node, Check):
            distribution = node.dist.build([read(env, a) for a in node.inputs])
            valid = env.get(VALID, True)
            for parameter, ok in parameter_checks(distribution):
                if not isinstance(ok, jax.core.Tracer) and bool(ok):
                    continue  # held on constants, at trace time: nothing to compute at run time
                if checked:
                    checkify.check(ok, f"{node.subject}: parameter {parameter!r} of {node.dist.name} violates its "
                                       f"constraint {type(distribution).arg_constraints.get(parameter.split('.')[-1], '')}"
                                       + (f" (at {node.source})" if node.source else ""))
                valid = jnp.logical_and(valid, ok)
            env[VALID] = valid
        elif isinstance(node, Site):
            distribution = node.dist.build([read(env, a) for a in node.inputs])

            def continue_with(value, extra=None, _env=env, _site=node, _next=i + 1):
                rest = dict(_env)
                rest[_site.output] = value
                rest.update(extra or {})
                return walk(graph, rest, on_site=on_site, on_end=on_end, on_scan=on_scan, start=_next,
                            checked=checked)

            result = on_site(node, distribution, env, continue_with)
            if not isinstance(result, Draw):
                return result  # the handler walked the rest of the graph itself
            env[node.output] = result.value
            env.update(result.extra)
        elif isinstance(node, Scan):
            if on_scan is None:
                raise ModelError(f"graph {graph.name!r}: this walk cannot run {node.name} (a loop holding sites); "
                                 "its caller must pass on_scan", source=node.source)
            outs, extra = on_scan(node, [read(env, a) for a in node.inputs], env)
            for v, x in zip(node.outputs, outs):
                env[v] = x
            env.update(extra)
        # Cost nodes define nothing: on_end reads their inputs from env
    return on_end(env)
