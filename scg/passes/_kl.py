r"""Analytic KL divergences numpyro's registry lacks, registered into it.

numpyro (0.22) registers ``kl_divergence`` for ``CategoricalProbs`` pairs but not
for Bernoulli at all, nor for the logits parametrizations. ``integrate_kl``
promises Bernoulli/Bernoulli and Categorical/Categorical in every
parametrization, so the missing pairs are registered here, each only when
numpyro has no rule of its own for it:

.. math::  \mathrm{KL}(q\|p) = \sum_v q(v)\,(\log q(v) - \log p(v)),

with ``0·log 0 = 0`` and log-probabilities taken from logits through
``log_sigmoid`` / ``log_softmax`` for stability.
"""
from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpyro.distributions as dist
from numpyro.distributions.kl import kl_divergence

_BERNOULLI = (dist.BernoulliLogits, dist.BernoulliProbs)
_CATEGORICAL = (dist.CategoricalLogits, dist.CategoricalProbs)


def _bernoulli_log_probs(d) -> tuple[jax.Array, jax.Array]:
    """``(log P(1), log P(0))``."""
    if isinstance(d, dist.BernoulliLogits):
        return jax.nn.log_sigmoid(d.logits), jax.nn.log_sigmoid(-d.logits)
    return jnp.log(d.probs), jnp.log1p(-d.probs)


def _categorical_log_probs(d) -> jax.Array:
    if isinstance(d, dist.CategoricalLogits):
        return jax.nn.log_softmax(d.logits, axis=-1)
    return jnp.log(d.probs)


def _weighted_log_ratio(log_q: jax.Array, log_p: jax.Array) -> jax.Array:
    q = jnp.exp(log_q)
    return jnp.where(q > 0, q * (log_q - log_p), 0.0)


def kl_bernoulli(q, p) -> jax.Array:
    q1, q0 = _bernoulli_log_probs(q)
    p1, p0 = _bernoulli_log_probs(p)
    return _weighted_log_ratio(q1, p1) + _weighted_log_ratio(q0, p0)


def kl_bernoulli_logits(q, p) -> jax.Array:
    """``σ(ℓ_q)·(ℓ_q − ℓ_p) + softplus(ℓ_p) − softplus(ℓ_q)``: the sum above written in logits.

    The same function as :func:`kl_bernoulli` for finite logits (the only valid ones), without
    its ``exp``/``where``: inside a loop, XLA:CPU ran ``value_and_grad`` of that form 7–25×
    slower than ``grad`` alone (measured on the Bernoulli chain of benchmarks/scan_chain.py).
    In floating point it differs by up to a few ulps of ``|ℓ|`` (so a KL near 0 between
    nearly equal large logits can come out as −1e-6); gradients are unaffected.
    """
    return jax.nn.sigmoid(q.logits) * (q.logits - p.logits) + jax.nn.softplus(p.logits) - jax.nn.softplus(q.logits)


def kl_categorical(q, p) -> jax.Array:
    return jnp.sum(_weighted_log_ratio(_categorical_log_probs(q), _categorical_log_probs(p)), axis=-1)


def _has_rule(a: type, b: type) -> bool:
    rule = kl_divergence.dispatch(a, b)
    # the generic Distribution/ExpandedDistribution rules only unwrap expand(); they are not a KL for (a, b)
    return rule is not None and (a, b) in kl_divergence.funcs


for family, rule in ((_BERNOULLI, kl_bernoulli), (_CATEGORICAL, kl_categorical)):
    for a, b in itertools.product(family, repeat=2):
        if not _has_rule(a, b):
            pair_rule = kl_bernoulli_logits if (a, b) == (dist.BernoulliLogits, dist.BernoulliLogits) else rule
            kl_divergence.register(a, b)(pair_rule)  # numpyro's registry is a multipledispatch Dispatcher
