"""The surrogate objective whose gradient is the estimator.

Approximates
    ``∇_θ E[Σ_j c_j]`` for a stochastic computation graph.
With
    the stochastic-computation-graph surrogate (Schulman et al., 2015) in the
    DiCE form (Foerster et al., 2018):

    .. math::

        S = \\sum_j \\sum c_j \\cdot ⊡\\Big(\\sum_{i \\in \\mathrm{anc}(j)} \\log p(z_i \\mid φ_i)\\Big)
            + \\sum_i \\big(1 - ⊡(\\log p(z_i \\mid φ_i))\\big)\\, b_i,
        \\qquad ⊡(x) = \\exp(x - \\bot(x)),

    where ``anc(j)`` are the score-function sites cost ``j`` depends on (so each
    site's score is multiplied by its **downstream costs** only), ``⊥`` is
    ``stop_gradient`` and ``b_i`` an optional baseline that does not depend on
    ``z_i``. ``⊡`` evaluates to 1, so ``S`` equals the sampled loss, and
    ``∇S = Σ_i ∇log p(z_i)(Q_i - b_i) + Σ_j ∇c_j`` (``Q_i``: the sum of ``z_i``'s
    downstream costs) at first order; repeated differentiation of ``S`` stays
    unbiased for higher derivatives (DiCE).
Requires
    score-function sites sampled with ``stop_gradient`` (no pathwise leak);
    reparameterized sites drawn with ``rsample`` and every path from them to a
    cost differentiable (checked by ``scg.passes.reparameterize``).

Plates: a site or cost inside ``scg.plate``\\ s contributes per-example terms; a
cost of example ``n`` is multiplied only by the log densities of example ``n``
of sites that share the plate (and all of a site's examples for plates the
cost is outside of).
"""
from __future__ import annotations

import zlib
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from scg import integrate
from scg.errors import ModelError
from scg.interpreter import initial_env, read, walk
from scg.ir import Graph, Plate, Site


def magic_box(x: jax.Array) -> jax.Array:
    """DiCE's ⊡(x) = exp(x − stop_gradient(x)): 1 in value, ∇⊡(x) = ⊡(x)∇x."""
    return jnp.exp(x - lax.stop_gradient(x))


def site_key(key: jax.Array, key_name: str) -> jax.Array:
    """The site's key: the objective's key folded with a stable hash of the site name."""
    return jax.random.fold_in(key, zlib.crc32(key_name.encode()) & 0x7FFFFFFF)


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


class ParticleEstimate(NamedTuple):
    """One particle's contribution: weighted-averaged across enumerated branches and particles.

    surrogate: the DiCE surrogate (value = the sampled loss).
    loss: the sampled ``Σ costs``.
    score_factors: per score site, ``1 − ⊡(log p(z_i))`` per example (value 0).
    downstream: per score site, ``⊥(Q_i)``: its downstream costs per example.
    """

    surrogate: jax.Array
    loss: jax.Array
    score_factors: dict
    downstream: dict


def score_sites(graph: Graph) -> tuple:
    """Sites that contribute a score term: sampled (not reparameterized, not enumerated), θ-dependent."""
    dependent = graph.param_dependent_sites
    return tuple(s for s in graph.sites if not s.reparameterized and not s.enumerated and s.name in dependent)


def _logp_key(name: str) -> tuple:
    return ("scg.logp", name)


def particle_estimate(graph: Graph, env: dict, key: jax.Array, *, order: int = integrate.DEFAULT_ORDER) -> ParticleEstimate:
    """Walks the graph once: samples each site, integrates enumerated ones, builds the surrogate."""
    scored = {s.name: s for s in score_sites(graph)}

    def on_site(site: Site, distribution: Any, env: dict, continue_with: Callable):
        if site.enumerated:
            return integrate.integrate_site(site, distribution, continue_with, order)
        k = site_key(key, site.key_name)
        if site.reparameterized:
            value = distribution.rsample(k)
        else:
            # a score-function site must not leak a pathwise gradient through its value
            value = lax.stop_gradient(distribution.sample(k))
        extra = {}
        if site.name in scored:
            log_density = distribution.log_prob(value)
            if jnp.ndim(log_density) < len(site.plates):
                raise ModelError(
                    f"site {site.name!r}: its log density has shape {jnp.shape(log_density)}, but the site is "
                    f"inside plates {[p.name for p in site.plates]}; plate dimensions must be batch dimensions "
                    "of the distribution, not event dimensions (do not .to_event() them)", site=site.name,
                    source=site.source)
            extra[_logp_key(site.name)] = per_example(log_density, site.plates)
        return continue_with(value, extra)

    def on_end(env: dict) -> ParticleEstimate:
        surrogate = jnp.zeros(())
        loss = jnp.zeros(())
        cost_terms = {}
        for c in graph.costs:
            term = per_example(read(env, c.input), c.plates)
            cost_terms[c.name] = (term, c.plates)
            exponent = jnp.zeros(())
            for name in graph.stochastic_ancestors(c):
                if name in scored:
                    exponent = exponent + align(env[_logp_key(name)], scored[name].plates, c.plates)
            surrogate = surrogate + jnp.sum(term * magic_box(exponent))
            loss = loss + jnp.sum(term)
        score_factors, downstream = {}, {}
        for name, site in scored.items():
            logp = env[_logp_key(name)]
            score_factors[name] = 1.0 - magic_box(logp)
            q = jnp.zeros(jnp.shape(logp))
            for cname in graph.downstream_costs[name]:
                term, plates = cost_terms[cname]
                q = q + align(lax.stop_gradient(term), plates, site.plates)
            downstream[name] = q
        return ParticleEstimate(surrogate, loss, score_factors, downstream)

    return walk(graph, env, on_site=on_site, on_end=on_end)


# --- baselines ---------------------------------------------------------------------------------


def leave_one_out(downstream: dict) -> dict:
    """``b_i^{(k)} = (1/(K−1)) Σ_{k'≠k} Q_i^{(k')}``.

    Unbiased: particle ``k``'s baseline is a function of the other, independent
    particles only, so ``E[∇log p(z^{(k)}) b^{(k)}] = E[∇log p(z^{(k)})]·E[b^{(k)}] = 0``.
    Needs ``num_samples ≥ 2``.
    """
    out = {}
    for name, q in downstream.items():
        k = q.shape[0]
        if k < 2:
            raise ValueError("baseline='leave_one_out' needs num_samples >= 2 (it averages the other particles' "
                             f"downstream costs); got num_samples={k}")
        out[name] = (jnp.sum(q, axis=0, keepdims=True) - q) / (k - 1)
    return out


BASELINES = {"leave_one_out": leave_one_out}


def surrogate_and_loss(graph: Graph, param_leaves: list, input_leaves: list, key: jax.Array, *,
                       num_samples: int = 1, baseline: Any = None,
                       order: int = integrate.DEFAULT_ORDER) -> tuple[jax.Array, jax.Array]:
    """The surrogate averaged over ``num_samples`` independent particles (``vmap``), and the loss."""
    env = initial_env(graph, param_leaves, input_leaves)

    def one(k):
        return particle_estimate(graph, env, k, order=order)

    if num_samples == 1:
        estimates = jax.tree_util.tree_map(lambda x: x[None], one(key))
    else:
        estimates = jax.vmap(one)(jax.random.split(key, num_samples))
    surrogate = jnp.mean(estimates.surrogate)
    if baseline is not None and estimates.downstream:
        fn = BASELINES[baseline] if isinstance(baseline, str) else baseline
        baselines = jax.tree_util.tree_map(lax.stop_gradient, fn(estimates.downstream))
        for name, b in baselines.items():
            surrogate = surrogate + jnp.sum(estimates.score_factors[name] * b) / num_samples
    return surrogate, jnp.mean(estimates.loss)
