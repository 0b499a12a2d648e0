r"""The surrogate objective whose gradient is the estimator.

Approximates
    ``∇_θ E[Σ_j c_j]`` for a stochastic computation graph.
With
    the stochastic-computation-graph surrogate (Schulman et al., 2015) in the
    DiCE form (Foerster et al., 2018):

    .. math::

        S = \sum_j \sum c_j \cdot ⊡\Big(\sum_{i \in \mathrm{anc}(j)} \log p(z_i \mid φ_i)\Big)
            + \sum_i \big(1 - ⊡(\log p(z_i \mid φ_i))\big)\, b_i,
        \qquad ⊡(x) = \exp(x - \bot(x)),

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

Plates: a site or cost inside ``scg.plate``\ s contributes per-example terms; a
cost of example ``n`` is multiplied only by the log densities of example ``n``
of sites that share the plate (and all of a site's examples for plates the
cost is outside of).
"""
from __future__ import annotations

import math
import zlib
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpyro.distributions as dist
from jax import lax

from scg import integrate
from scg.errors import ModelError
from scg.interpreter import Draw, initial_env, log_density, read, validity_factor, walk
from scg.ir import Graph, Literal, Scan, Site, Var
from scg.plates import align, per_example


def magic_box(x: jax.Array) -> jax.Array:
    """DiCE's ⊡(x) = exp(x − stop_gradient(x)): 1 in value, ∇⊡(x) = ⊡(x)∇x."""
    return jnp.exp(x - lax.stop_gradient(x))


def site_key(key: jax.Array, key_name: str) -> jax.Array:
    """The site's key: the objective's key folded with a stable hash of the site name."""
    return jax.random.fold_in(key, zlib.crc32(key_name.encode()) & 0x7FFFFFFF)


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
    log_densities: dict
    costs: dict


def score_sites(graph: Graph, *, every_sampled: bool = False) -> tuple:
    """Sites that contribute a score term: sampled (not reparameterized, not enumerated), θ-dependent.

    ``every_sampled``: skip the θ-dependence test (a scan body sees the
    parameters only through its operands, so every sampled site of a body is
    scored; a site whose density does not depend on θ adds an exactly zero term).
    """
    dependent = graph.param_dependent_sites
    return tuple(s for s in graph.sites if not s.reparameterized and not s.enumerated
                 and (every_sampled or s.name in dependent))


def _logp_key(name: str) -> tuple:
    return ("scg.logp", name)


def _scan_key(name: str) -> tuple:
    return ("scg.scan", name)


class ScanTerms(NamedTuple):
    """What a loop contributes to its enclosing graph, summed over its steps.

    surrogate: ``Σ_t Σ_c c_t · ⊡(log-densities cost c_t meets)`` (value = ``loss``).
    loss: ``Σ_t Σ_c c_t``.
    log_density: ``Σ_t Σ_z log p(z_t)`` over the loop's score sites: the exponent
      an enclosing cost that reads the loop's results meets.
    """

    surrogate: jax.Array
    loss: jax.Array
    log_density: jax.Array
    step_log_densities: jax.Array  # (T,): Σ_z log p(z_t) of each step's score sites
    step_downstream: jax.Array  # (T,): ⊥(Q_t), the costs step t's score meets (reward-to-go)


def _refuse_moving_supports(graph: Graph, sites: Any, in_loop_body: bool) -> None:
    """A score-function site whose support moves with θ (Uniform's bounds, Pareto's scale) is refused.

    ``∇E[f(z)] = E[f(z)∇log p(z)]`` needs the support to stay put: when it moves with θ the
    boundary term of the Leibniz rule is missing and the estimate is biased, silently.
    """
    constants = {v for v, _ in graph.consts}
    for site in sites:
        operands = [site.inputs[i] for i in site.support_inputs if isinstance(site.inputs[i], Var)]
        if in_loop_body:  # θ reaches a body only through its operands: any computed bound may depend on it
            moving = [a for a in operands if a not in constants]
        else:
            moving = [a for a in operands if graph.depends_on_params(a)]
        if moving:
            names = ", ".join(dict.fromkeys(site.dist.leaf_names[i] for i in site.support_inputs))
            raise ModelError(
                f"site {site.name!r}: the support of {site.dist.name} is set by its operands ({names}), which "
                "depend on the parameters; the score-function estimator is biased when the support moves with "
                "θ (the boundary term is missing). Reparameterize the site (passes='auto' or "
                f"scg.passes.reparameterize(graph, sites=[{site.name!r}])), or make the bounds constants.",
                site=site.name, source=site.source)


def _draw_key(key: jax.Array, site: Site, steps: tuple) -> jax.Array:
    """``fold_in(site_key(key, name), t)`` for every enclosing loop step ``t`` (none outside loops)."""
    k = site_key(key, site.key_name)
    for t in (*steps, *site.steps):
        k = jax.random.fold_in(k, t)
    return k


# --- a loop's noise, drawn before it runs ---------------------------------------------------------
# Families whose draw splits into noise that depends on the key alone and a transform of the
# parameters: ``(noise(key, shape, dtype), transform(distribution, noise))``. A loop draws every step's
# noise before it runs, in one vectorized draw, and its body applies the transform; drawing inside the
# body is one serial random-bits computation per step and site, the bottleneck of a long loop on a CPU.
# Each pair reproduces the family's own ``sample(key)`` draw for draw (scg_tests/test_scan_noise.py
# pins it), so drawing before the loop changes where the bits are made, never a value.
class NoiseDraw(NamedTuple):
    draw: Callable       # (key, shape, dtype) -> the step's noise
    shape: Callable      # distribution -> the shape of the noise its own sample(key) draws
    dtype: Callable      # distribution -> the dtype of that noise
    transform: Callable  # (distribution, noise) -> the site's value


def _bernoulli_from_uniform(distribution: Any, u: jax.Array) -> jax.Array:
    below = u < distribution.probs  # jax.random.bernoulli(key, p) is uniform(key, shape, p.dtype) < p
    return below.astype(jnp.result_type(below, int))


_values_shape = lambda d: tuple(d.batch_shape + d.event_shape)  # noqa: E731
_BERNOULLI = NoiseDraw(jax.random.uniform, _values_shape, lambda d: jnp.result_type(d.probs), _bernoulli_from_uniform)
NOISE_BEFORE_LOOPS = {
    dist.BernoulliProbs: _BERNOULLI,
    dist.BernoulliLogits: _BERNOULLI,
    # jax.random.categorical(key, logits) is argmax(gumbel(key, logits' shape) + logits) (the Gumbel-max trick)
    dist.CategoricalLogits: NoiseDraw(jax.random.gumbel, lambda d: jnp.shape(d.logits),
                                      lambda d: jnp.result_type(d.logits),
                                      lambda d, g: jnp.argmax(g + d.logits, axis=-1)),
    # numpyro's Normal draws standard normals of the default float dtype, whatever loc's dtype
    dist.Normal: NoiseDraw(jax.random.normal, _values_shape, lambda d: jnp.result_type(float),
                           lambda d, eps: d.loc + eps * d.scale),
}


# the noise of all T steps is held at once: a site with more than this many values over the loop draws
# inside the body instead (its per-step draw is then large enough to amortize the serial cost)
NOISE_BEFORE_LOOPS_MAX_ELEMENTS = 1 << 22
# a loop shorter than this draws inside the body: XLA:CPU unrolls such short loops when their body is small,
# and the vectorized draw before it then costs more than it saves (Bernoulli chain, T = 10: 24 µs drawing in
# the body, 95 µs before the loop; T = 20: 106 µs against 89 µs; benchmarks/README.md, "Loops")
NOISE_BEFORE_LOOPS_MIN_STEPS = 16


def _draws_by_key_under_vmap(key: jax.Array) -> bool:
    """Whether a vmap of draws over a batch of keys draws each key's own values (threefry does; JAX's batching
    rule of rbg's random bits uses the first key only, so those keys draw inside the body)."""
    impl = jax.random.key_impl(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else None
    return impl is None or str(impl) == "threefry2x32"  # a raw uint32[2] key is threefry's


def _noise_spec(site: Site) -> tuple | None:
    """``(shape, dtype)`` of a body site's noise if its family draws from noise, else None (from shapes alone)."""
    rule = NOISE_BEFORE_LOOPS.get(site.dist.family)
    if site.enumerated or rule is None:
        return None
    free = [i for i, a in enumerate(site.inputs) if isinstance(a, Var)]

    def noise(avals):
        leaves = [a.value if isinstance(a, Literal) else None for a in site.inputs]
        for i, x in zip(free, avals):
            leaves[i] = x
        d = site.dist.build(leaves)
        return jnp.zeros(rule.shape(d), rule.dtype(d))

    out = jax.eval_shape(noise, [jax.ShapeDtypeStruct(site.inputs[i].shape, site.inputs[i].dtype) for i in free])
    return tuple(out.shape), out.dtype


def _from_noise(distribution: Any, noise: jax.Array) -> jax.Array | None:
    """The site's value from its step's noise; None where the distribution's own draw would use other
    noise (of another dtype or shape), so that the body draws with the key as usual."""
    rule = NOISE_BEFORE_LOOPS.get(type(distribution))
    if rule is None or noise.dtype != rule.dtype(distribution) or noise.shape != tuple(rule.shape(distribution)):
        return None
    return rule.transform(distribution, noise)


def _walk_estimate(graph: Graph, env: dict, key: jax.Array, *, steps: tuple, order: int, checked: bool,
                   finish: Callable, every_sampled: bool = False, drawn_keys: dict | None = None,
                   drawn_noise: dict | None = None) -> Any:
    """One walk that samples every site, integrates enumerated ones, runs loops, then calls ``finish``.

    ``finish(env, scored, exponent_of)``: ``exponent_of(node, plates)`` is the sum
    of the log densities of the score sites and loops ``node`` (a cost or a loop)
    depends on, aligned to ``plates`` — the argument of DiCE's ⊡ for that node.
    """
    scored = {s.name: s for s in score_sites(graph, every_sampled=every_sampled)}
    loops = {s.name: s for s in graph.scans}
    _refuse_moving_supports(graph, scored.values(), every_sampled)

    def on_site(site: Site, distribution: Any, env: dict, continue_with: Callable):
        if site.enumerated:
            return integrate.integrate_site(site, distribution, continue_with, order, graph)
        # a loop hands its body each site's key of the step, derived before the loop in one vmap, and
        # the step's noise of the families that draw from noise, drawn before the loop
        k = drawn_keys[site.name] if drawn_keys is not None else _draw_key(key, site, steps)
        value = None
        if drawn_noise is not None and site.name in drawn_noise:
            value = _from_noise(distribution, drawn_noise[site.name])
        if value is None:
            value = distribution.rsample(k) if site.reparameterized else distribution.sample(k)
        if not site.reparameterized:
            # a score-function site must not leak a pathwise gradient through its value
            value = lax.stop_gradient(value)
        extra = {}
        if site.name in scored:
            log_p = log_density(distribution, value)
            if jnp.ndim(log_p) < len(site.plates):
                raise ModelError(
                    f"site {site.name!r}: its log density has shape {jnp.shape(log_p)}, but the site is "
                    f"inside plates {[p.name for p in site.plates]}; plate dimensions must be batch dimensions "
                    "of the distribution, not event dimensions (do not .to_event() them)", site=site.name,
                    source=site.source)
            extra[_logp_key(site.name)] = per_example(log_p, site.plates)
        return Draw(value, extra)

    def on_scan(node: Scan, operands: list, env: dict):
        results, terms = _run_scan(node, operands, key, steps=steps, order=order, checked=checked)
        return results, {_scan_key(node.name): terms, _logp_key(node.name): terms.log_density}

    # DiCE's exponent of a node is a sum over the set of its stochastic ancestors; sets are bitsets
    # (graph._stochastic_ancestry), and sums of sets are memoized by stripping the highest ancestor,
    # so a chain of n sites costs n additions, not n²/2
    stochastic = graph.stochastic_nodes
    counted = 0
    for k, n in enumerate(stochastic):
        if n.name in scored or n.name in loops:
            counted |= 1 << k
    ancestry = graph._stochastic_ancestry

    def exponents(env: dict) -> Callable:
        memo: dict = {}

        def term(k: int, plates: tuple) -> jax.Array:
            n = stochastic[k]
            return align(env[_logp_key(n.name)], n.plates if n.name in scored else (), plates)

        def exponent_of(node: Any, plates: tuple) -> jax.Array:
            bits = 0
            for a in node.inputs:
                if isinstance(a, Var):
                    bits |= ancestry.get(a, 0)
            bits &= counted
            plates = tuple(plates)
            stripped, b = [], bits
            while b and (b, plates) not in memo:
                high = b.bit_length() - 1
                stripped.append(high)
                b ^= 1 << high
            if not b and not stripped:
                return None  # no score-function ancestor: no ⊡ to build
            value = memo[(b, plates)] if b else jnp.zeros(())
            for high in reversed(stripped):
                b |= 1 << high
                value = value + term(high, plates)
                memo[(b, plates)] = value
            return value

        return exponent_of

    return walk(graph, env, on_site=on_site, on_scan=on_scan, checked=checked,
                on_end=lambda env: finish(env, scored, exponents(env)))


def _cost_terms(graph: Graph, env: dict) -> dict:
    """``{cost name: (per-example term, plates)}``; NaN everywhere when a parameter check failed."""
    valid = validity_factor(env)
    if isinstance(valid, float):  # no check needed run-time work
        return {c.name: (per_example(read(env, c.input), c.plates), c.plates) for c in graph.costs}
    return {c.name: (per_example(read(env, c.input), c.plates) * valid.astype(c.input.dtype), c.plates)
            for c in graph.costs}


def _box(exponent: Any, extra: Any) -> Any:
    """``⊡(exponent + extra)``, or a plain 1 when there is no log density to differentiate."""
    if exponent is None and isinstance(extra, float) and extra == 0.0:
        return 1.0
    return magic_box((0.0 if exponent is None else exponent) + extra)


def _surrogate(graph: Graph, env: dict, cost_terms: dict, exponent_of: Callable,
               extra_exponent: Callable = lambda node: 0.0) -> tuple[jax.Array, jax.Array]:
    """``(Σ_j c_j·⊡(exponent_j), Σ_j c_j)`` over the graph's costs and loops."""
    surrogate, loss = jnp.zeros(()), jnp.zeros(())
    for c in graph.costs:
        term, plates = cost_terms[c.name]
        surrogate = surrogate + jnp.sum(term * _box(exponent_of(c, plates), extra_exponent(c)))
        loss = loss + jnp.sum(term)
    for node in graph.scans:
        terms = env[_scan_key(node.name)]
        surrogate = surrogate + terms.surrogate * _box(exponent_of(node, ()), extra_exponent(node))
        loss = loss + terms.loss
    return surrogate, loss


def _run_scan(node: Scan, operands: list, key: jax.Array, *, steps: tuple, order: int,
              checked: bool) -> tuple[list, ScanTerms]:
    r"""Runs a loop holding sites with ``lax.scan``: one walk of the body per step.

    Approximates
        the loop's share of ``∇_θ E[Σ costs]``.
    With
        DiCE's cumulative form over time: a cost of step ``t`` meets the log
        densities of the step-``t`` sites it depends on and, when it reads the
        carry, ``Λ_{t-1} = Σ_{s<t} Σ_{z→carry} log p(z_s)``, the log densities
        of every earlier site whose value flowed into the carry (reward-to-go:
        a site's score meets only the costs of its own step and of later steps).
        ``Λ`` is carried beside the loop's own carry.
    Requires
        no enumerated sites in the body. Dependencies through the carry are
        tracked for the carry as a whole (any carried value that depends on a
        site counts for every cost that reads any carried value): a sound
        over-approximation — extra terms have mean zero — that loses no
        variance on chains with a single carried state.
    """
    body = node.body
    if any(s.enumerated for s in body.sites):
        raise ModelError(f"{node.name}: enumerated sites inside a loop are not supported; enumerate sites "
                         "outside loops, or leave the loop's sites sampled", source=node.source)
    k, c = node.num_consts, node.num_carry
    consts, init, xs = operands[:k], operands[k:k + c], operands[k + c:]
    # the Vars computed from the carried values (through sites and nested loops)
    from_carry = set(node.carry_inputs).union(*(body.nodes[i].outputs for i in body.forward_reach(node.carry_inputs)))
    reads_carry = lambda n: any(isinstance(a, Var) and a in from_carry for a in n.inputs)
    into_carry = set(body.stochastic_ancestors_of(node.carry_outputs))
    # what a step's score meets, for baselines: its own step's costs that depend on its sites and,
    # when its sites flow into the carry, every later step's costs that read the carry
    scored_here = {s.name for s in score_sites(body, every_sampled=True)} | {s.name for s in body.scans}
    feeds_carry = bool(into_carry & scored_here)
    meets_own = {n.name for n in (*body.costs, *body.scans)
                 if scored_here & set(body.stochastic_ancestors(n))}

    def step(carry_aug, step_inputs):
        carry, carried_logp = carry_aug
        t, xs_t, keys_t, noise_t = step_inputs
        env = initial_env(body, [], [*consts, *carry, *xs_t])

        def finish(env, scored, exponent_of):
            cost_terms = _cost_terms(body, env)
            surrogate, loss = _surrogate(body, env, cost_terms, exponent_of,
                                         lambda n: carried_logp if reads_carry(n) else 0.0)
            logp = {name: align(env[_logp_key(name)], scored[name].plates if name in scored else (), ())
                    for name in (*scored, *(s.name for s in body.scans))}
            step_logp = sum(logp.values(), jnp.zeros(()))
            new_logp = carried_logp + sum((logp[n] for n in into_carry if n in logp), jnp.zeros(()))
            results = [read(env, a) for a in node.body_outputs]
            totals = {c.name: jnp.sum(cost_terms[c.name][0]) for c in body.costs}
            totals.update({s.name: env[_scan_key(s.name)].loss for s in body.scans})
            own = sum((v for n, v in totals.items() if n in meets_own), jnp.zeros(()))
            from_carry_costs = sum((totals[n.name] for n in (*body.costs, *body.scans) if reads_carry(n)),
                                   jnp.zeros(()))
            return results, surrogate, loss, step_logp, new_logp, lax.stop_gradient(own), lax.stop_gradient(
                from_carry_costs)

        results, surrogate, loss, step_logp, new_logp, own, later = _walk_estimate(
            body, env, key, steps=(*steps, t), order=order, checked=checked, finish=finish, every_sampled=True,
            drawn_keys=keys_t, drawn_noise=noise_t)
        return (results[:c], new_logp), (results[c:], surrogate, loss, step_logp, own, later)

    zero = jnp.zeros(())
    # every step's key of every site, before the loop (one vmap each): fold_in inside the body would be
    # one serial hash per step and site, the loop's bottleneck on long chains
    steps_t = jnp.arange(node.length)
    keys = {s.name: jax.vmap(lambda t, s=s: _draw_key(key, s, (*steps, t)))(steps_t)
            for s in body.sites if not s.enumerated}
    noise = {}
    for s in body.sites:
        spec = (_noise_spec(s) if node.length >= NOISE_BEFORE_LOOPS_MIN_STEPS and _draws_by_key_under_vmap(key)
                else None)
        if spec is not None and node.length * math.prod(spec[0]) <= NOISE_BEFORE_LOOPS_MAX_ELEMENTS:
            draw = NOISE_BEFORE_LOOPS[s.dist.family].draw
            noise[s.name] = jax.vmap(lambda k, draw=draw, spec=spec: draw(k, *spec))(keys[s.name])
    (final, _), (ys, surrogates, losses, log_densities, own, later) = lax.scan(
        step, (list(init), zero), (steps_t, list(xs), keys, noise), length=node.length, reverse=node.reverse)
    downstream = own
    if feeds_carry:  # + the carry-reading costs of the steps that run after step t
        after = jnp.cumsum(later[::-1])[::-1] - later if not node.reverse else jnp.cumsum(later) - later
        downstream = own + after
    return [*final, *ys], ScanTerms(jnp.sum(surrogates), jnp.sum(losses), jnp.sum(log_densities),
                                    log_densities, downstream)


def particle_estimate(graph: Graph, env: dict, key: jax.Array, *, order: int = integrate.DEFAULT_ORDER,
                      checked: bool = False) -> ParticleEstimate:
    """Walks the graph once: samples each site, integrates enumerated ones, runs loops, builds the surrogate."""

    def finish(env, scored, exponent_of) -> ParticleEstimate:
        cost_terms = _cost_terms(graph, env)
        surrogate, loss = _surrogate(graph, env, cost_terms, exponent_of)
        score_factors, downstream, log_densities = {}, {}, {}
        for name, site in scored.items():
            logp = env[_logp_key(name)]
            score_factors[name] = 1.0 - magic_box(logp)
            q = jnp.zeros(jnp.shape(logp))
            for cname in graph.downstream_costs[name]:
                term, plates = cost_terms[cname]
                q = q + align(lax.stop_gradient(term), plates, site.plates)
            downstream[name] = q
            log_densities[name] = logp
        for node in graph.scans:  # a loop joins the IWAE weights as one more cost and one more density
            log_densities[node.name] = env[_logp_key(node.name)]
            terms = env[_scan_key(node.name)]  # and baselines as one score per step (shape (T,))
            score_factors[node.name] = 1.0 - magic_box(terms.step_log_densities)
            downstream[node.name] = terms.step_downstream
        costs = {name: term for name, (term, _) in cost_terms.items()}
        costs.update({node.name: env[_scan_key(node.name)].loss for node in graph.scans})
        return ParticleEstimate(surrogate, loss, score_factors, downstream, log_densities, costs)

    return _walk_estimate(graph, env, key, steps=(), order=order, checked=checked, finish=finish)


# --- combining particles: the ELBO-style surrogate with baselines, or the IWAE / VIMCO bound -------


def _common_plates(graph: Graph) -> tuple:
    """The plates every cost lies in (the per-example axes of a multi-sample objective)."""
    if not graph.costs:
        return ()
    shared = set.intersection(*({p.name for p in c.plates} for c in graph.costs))
    return tuple(p for p in sorted(graph.costs[0].plates, key=lambda p: p.dim) if p.name in shared)


def importance_weighted(graph: Graph, estimates: ParticleEstimate) -> tuple[jax.Array, jax.Array]:
    """The IWAE objective (Burda et al., 2016) with VIMCO's leave-one-out signals (Mnih & Rezende, 2016).

    Approximates
        ``∇_θ E[L_K]``, ``L_K = −log (1/K) Σ_k exp(−C_k)`` per example, where ``C_k``
        is particle ``k``'s total cost: with costs ``log q(z|x) − log p(x, z)``,
        ``−L_K`` is the importance-weighted bound on ``log p(x)``.
    With
        ``∇L_K`` pathwise and through the costs' direct dependence on θ, plus, for
        score-function sites, ``Σ_k (L_K − L_K^{(−k)}) ∇log q(z_k)`` where
        ``L_K^{(−k)}`` replaces ``−C_k`` by the mean of the other particles'
        ``−C_j`` (VIMCO): a baseline that depends only on the other particles.
    Requires
        no enumerated sites. With ``num_samples = 1`` the bound is the ELBO and the
        signal is the plain ``L_1`` (VIMCO needs a second particle).
    """
    plates = _common_plates(graph)
    log_w = -sum(align(c, cost.plates, plates) for c, cost in
                 ((estimates.costs[cost.name], cost) for cost in graph.costs))
    for node in graph.scans:
        log_w = log_w - align(estimates.costs[node.name], (), plates)
    k = log_w.shape[0]
    bound = jax.nn.logsumexp(log_w, axis=0) - jnp.log(k)
    loss = -jnp.sum(bound)
    surrogate = loss
    if estimates.log_densities:
        site_plates = {s.name: s.plates for s in graph.sites}
        log_q = sum(align(lp, site_plates.get(n, ()), plates) for n, lp in estimates.log_densities.items())
        if k == 1:  # L_1 is the ELBO: the plain score signal, with no other particle to lean on
            return surrogate + jnp.sum(lax.stop_gradient(-bound) * (log_q - lax.stop_gradient(log_q))), loss
        mean_others = (jnp.sum(log_w, 0, keepdims=True) - log_w) / (k - 1)
        eye = jnp.eye(k, dtype=bool).reshape((k, k) + (1,) * (log_w.ndim - 1))
        replaced = jnp.where(eye, mean_others[:, None], log_w[None])  # row k: particle k replaced
        bound_minus_k = jax.nn.logsumexp(replaced, axis=1) - jnp.log(k)
        signal = lax.stop_gradient(bound_minus_k - bound[None])  # L_K − L_K^(−k) with L = −bound
        surrogate = surrogate + jnp.sum(signal * (log_q - lax.stop_gradient(log_q)))
    return surrogate, loss


OBJECTIVES = ("elbo", "iwae")


def surrogate_and_loss(graph: Graph, param_leaves: list, input_leaves: list, key: jax.Array, *,
                       num_samples: int = 1, baseline: Any = None, baseline_state: Any = None,
                       baseline_args: tuple = (), objective: str = "elbo",
                       order: int = integrate.DEFAULT_ORDER,
                       checked: bool = False) -> tuple[jax.Array, tuple[jax.Array, Any]]:
    """The surrogate over ``num_samples`` independent particles (``vmap``), and ``(loss, new baseline state)``.

    ``objective="elbo"``: the mean over particles of each particle's surrogate
    (plus the baseline terms); ``"iwae"``: :func:`importance_weighted`.
    """
    env = initial_env(graph, param_leaves, input_leaves)

    def one(k):
        return particle_estimate(graph, env, k, order=order, checked=checked)

    if num_samples == 1:
        estimates = jax.tree_util.tree_map(lambda x: x[None], one(key))
    else:
        estimates = jax.vmap(one)(jax.random.split(key, num_samples))
    if objective == "iwae":
        if any(s.enumerated for s in graph.sites):
            raise ValueError("objective='iwae' cannot combine with enumerated sites (the bound is not linear in "
                             "the costs); drop scg.passes.enumerate")
        surrogate, loss = importance_weighted(graph, estimates)
        return surrogate, (loss, baseline_state)
    surrogate = jnp.mean(estimates.surrogate)
    new_state = baseline_state
    if baseline is not None and estimates.downstream:
        baselines, new_state = baseline.apply(baseline_state, estimates.downstream, *baseline_args)
        for name, b in baselines.items():
            b = lax.stop_gradient(jnp.broadcast_to(b, estimates.score_factors[name].shape))
            surrogate = surrogate + jnp.sum(estimates.score_factors[name] * b) / num_samples
    return surrogate, (jnp.mean(estimates.loss), new_state)
