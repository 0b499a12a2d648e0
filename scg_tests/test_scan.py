"""Sites inside ``jax.lax.scan``: every loop feature against its unrolled twin and against exact answers.

The unrolled twin (``scg.unroll.unroll``) draws exactly what the loop draws from
the same key, so where the Rao-Blackwellization is the same the two estimators
agree draw for draw — a far stronger check than comparing means.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import pytest

import scg
from scg.unroll import unroll


@scg.model
def gaussian_chain(params, x):
    def step(state, x_t):
        z = scg.sample("z", dist.Normal(params["a"] * state, jnp.exp(params["log_s"])))
        scg.cost("fit", (z - x_t) ** 2)
        return z, z

    last, zs = jax.lax.scan(step, jnp.zeros(()), x)
    scg.cost("end", 0.5 * last ** 2)


@scg.model
def bernoulli_chain(params, x):
    def step(state, x_t):
        b = scg.sample("b", dist.Bernoulli(logits=params["w"] * state + params["c"]))
        scg.cost("err", (b - x_t) ** 2.0)
        return b.astype(jnp.float32), None

    jax.lax.scan(step, jnp.zeros(()), x)


@scg.model
def independent_steps(params, x):
    def step(_, x_t):
        b = scg.sample("b", dist.Bernoulli(logits=params["w"]))
        scg.cost("err", (b - x_t) ** 2.0)
        return None, None

    jax.lax.scan(step, None, x)


GAUSS = {"a": jnp.array(0.6), "log_s": jnp.array(-0.2)}
BERN = {"w": jnp.array(0.8), "c": jnp.array(-0.3)}
X3 = jnp.array([0.5, -0.2, 1.0])
B3 = jnp.array([1.0, 0.0, 1.0])


def draws(objective, params, x, key, n):
    return jax.vmap(lambda k: objective.value_and_grad(params, x, key=k))(jax.random.split(key, n))


def test_printer_shows_the_body_nested_with_its_operands():
    text = str(gaussian_chain.trace(GAUSS, X3))
    assert "1 scan)" in text and "scan[length=3]" in text
    assert "body consts" in text and "carry" in text and "xs" in text
    assert "    z:f32[] ~ Normal(" in text and "    cost 'fit'" in text and "    return" in text


@pytest.mark.parametrize("model, params, x", [(gaussian_chain, GAUSS, X3), (bernoulli_chain, BERN, B3)],
                         ids=["gaussian", "bernoulli"])
@pytest.mark.parametrize("passes", [[], "auto"], ids=["naive", "auto"])
def test_loop_and_unrolled_twin_agree_draw_for_draw(model, params, x, passes, key):
    loop = scg.compile(model, passes=passes)
    twin = scg.compile(unroll(model.trace(params, x)), passes=passes)
    for k in jax.random.split(key, 3):
        (l1, g1), (l2, g2) = loop.value_and_grad(params, x, key=k), twin.value_and_grad(params, x, key=k)
        np.testing.assert_allclose(l1, l2, rtol=1e-5)
        jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), g1, g2)


def test_exact_expectation_of_a_loop_is_its_twins_and_a_closed_form():
    # z_t = a z_{t-1} + s ε_t: E[Σ (z_t − x_t)²] + E[z_T²]/2 in closed form from the AR(1) moments
    a, s = 0.6, float(np.exp(-0.2))
    var, total = 0.0, 0.0
    for x_t in np.asarray(X3):
        var = a * a * var + s * s
        total += var + x_t ** 2  # E[z_t] = 0
    total += 0.5 * var
    value = scg.expectation(gaussian_chain, GAUSS, X3, order=4)  # polynomial of degree 2: exact at order 4
    np.testing.assert_allclose(value, total, rtol=1e-5)
    np.testing.assert_allclose(value, scg.expectation(unroll(gaussian_chain.trace(GAUSS, X3)), GAUSS, X3, order=4),
                               rtol=1e-6)


@pytest.mark.parametrize("model, params, x", [(gaussian_chain, GAUSS, X3), (bernoulli_chain, BERN, B3)],
                         ids=["gaussian", "bernoulli"])
def test_loop_estimator_is_unbiased(model, params, x, key):
    report = scg.check_grad(model, params, x, key=key, num_samples=4000, passes=[], order=4)
    assert report.ok, report


def test_reward_to_go_independent_steps_match_the_single_step_variance(key):
    # T independent Bernoulli steps sharing θ: step t's score meets only cost t (nothing flows into the carry),
    # so the gradient's variance is T times one step's, not T² times (all costs on every score)
    T, n = 20, 8000
    x = jnp.asarray(np.random.default_rng(0).integers(0, 2, T), jnp.float32)
    params = {"w": jnp.array(0.4)}
    _, g = draws(scg.compile(independent_steps, passes=[]), params, x, key, n)
    var_loop = float(jnp.var(g["w"]))

    @scg.model
    def one(params, x_t):
        b = scg.sample("b", dist.Bernoulli(logits=params["w"]))
        scg.cost("err", (b - x_t) ** 2.0)

    # one step's variance depends only on x_t ∈ {0, 1}: one compile, one vmap per value
    single = scg.compile(one, passes=[])
    var_of = {v: float(jnp.var(draws(single, params, jnp.float32(v), jax.random.fold_in(key, v + 1), n)[1]["w"]))
              for v in (0.0, 1.0)}
    var_steps = sum(var_of[float(x_t)] for x_t in x)
    # the sum of T independent variances; a sample variance of n draws has relative SE ≈ √(2/n) ≈ 1.6 %
    assert abs(var_loop / var_steps - 1.0) < 0.15, (var_loop, var_steps)


def test_a_site_feeding_the_carry_meets_later_costs_and_nothing_else():
    # reward-to-go: the twin's downstream costs are the loop's (they agree draw for draw above)
    twin = unroll(bernoulli_chain.trace(BERN, B3))
    assert twin.downstream_costs["b[2]"] == ("err[2]",)
    assert twin.downstream_costs["b[0]"] == ("err[0]", "err[1]", "err[2]")


def test_fori_loop_reverse_and_nested_loops_match_their_twins(key):
    @scg.model
    def nested(params, x):
        def outer(c, x_t):
            def inner(d, _):
                u = scg.sample("u", dist.Normal(params["m"] + d, 1.0))
                scg.cost("inner", (u - x_t) ** 2)
                return u, None

            d, _ = jax.lax.scan(inner, c, None, length=2)
            return d, None

        jax.lax.scan(outer, jnp.zeros(()), x, reverse=True)

        def body(i, c):
            v = scg.sample("v", dist.Normal(c * params["m"], 1.0))
            scg.cost("loop", v ** 2)
            return v

        jax.lax.fori_loop(0, 3, body, jnp.ones(()))

    params, x = {"m": jnp.array(0.3)}, jnp.array([0.1, -0.4])
    graph = nested.trace(params, x)
    assert len(graph.scans) == 2 and len(graph.scans[0].body.scans) == 1
    loop, twin = scg.compile(nested, passes=[]), scg.compile(unroll(graph), passes=[])
    (l1, g1), (l2, g2) = loop.value_and_grad(params, x, key=key), twin.value_and_grad(params, x, key=key)
    np.testing.assert_allclose(l1, l2, rtol=1e-5)
    np.testing.assert_allclose(g1["m"], g2["m"], rtol=1e-4)
    np.testing.assert_allclose(scg.expectation(nested, params, x, order=3),
                               scg.expectation(unroll(graph), params, x, order=3), rtol=1e-6)


def test_plates_inside_a_loop_body_are_unbiased(key):
    @scg.model
    def plated(params, x):
        def step(c, x_t):
            with scg.plate("data", x_t.shape[0]):
                b = scg.sample("b", dist.Bernoulli(logits=(params["w"] + c) * jnp.ones(x_t.shape[0])))
                scg.cost("err", (b - x_t) ** 2.0)
            return c + 0.1, None

        jax.lax.scan(step, jnp.zeros(()), x)

    params, x = {"w": jnp.array(0.2)}, jnp.array([[1.0, 0.0], [0.0, 0.0]])
    report = scg.check_grad(plated, params, x, key=key, num_samples=4000, passes=[])
    assert report.ok, report


def test_same_key_same_samples_under_jit_and_vmap(key):
    objective = scg.compile(gaussian_chain)
    a = objective.loss(GAUSS, X3, key=key)
    b = jax.jit(lambda k: objective.loss(GAUSS, X3, key=k))(key)
    c = jax.vmap(lambda k: objective.loss(GAUSS, X3, key=k))(jnp.stack([key, key]))
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(c, jnp.stack([a, a]))


def test_iwae_over_a_loop_matches_its_twin(key):
    loop = scg.compile(gaussian_chain, passes=[], objective="iwae")
    twin = scg.compile(unroll(gaussian_chain.trace(GAUSS, X3)), passes=[], objective="iwae")
    l1 = loop.loss(GAUSS, X3, key=key, num_samples=4)
    l2 = twin.loss(GAUSS, X3, key=key, num_samples=4)
    np.testing.assert_allclose(l1, l2, rtol=1e-5)


def test_long_loop_exact_reference_is_refused_naming_its_length():
    x = jnp.zeros(40)
    with pytest.raises(scg.BudgetError, match=r"T = 40.*budget"):
        scg.expectation(gaussian_chain, GAUSS, x)


@scg.model
def markov_vae(params, x):
    # a deep-Markov-model-shaped loop: q(z_t | z_{t-1}, x_t), prior p(z_t | z_{t-1}), sampled KL per step
    def step(state, x_t):
        q = dist.Normal(params["a"] * state + params["b"] * x_t, 0.5)
        z = scg.sample("z", q)
        scg.cost("kl", scg.log_prob(q, z) - scg.log_prob(dist.Normal(0.9 * state, 1.0), z))
        scg.cost("fit", (z - x_t) ** 2)
        return z, None

    jax.lax.scan(step, jnp.zeros(()), x)


def test_passes_rewrite_sites_inside_loop_bodies_with_certificates(key):
    params = {"a": jnp.array(0.5), "b": jnp.array(0.3)}
    objective = scg.compile(markov_vae)
    graph, (cert,) = objective.graph_and_certificates(params, X3)
    assert cert.rewritten == ("z",)
    assert {p.name for p in cert.preconditions if p.site == "z" and p.held} >= {
        "enters costs linearly", "differentiable paths to costs", "p does not depend on z"}
    body = graph.scans[0].body
    assert [s.name for s in body.sites] == ["z.eps"] and "integrate_kl: KL(z)" in str(graph)
    # the rewrite preserves E[loss] and its gradient (exactly: the twin is integrated by quadrature)
    assert cert.verify(params, X3, key=key, order=4).ok
    report = scg.check_grad(objective, params, X3, key=key, num_samples=2000, order=4)
    assert report.ok, report


def test_a_kink_inside_a_loop_keeps_its_site_score_function():
    @scg.model
    def kinked(params, x):
        def step(state, x_t):
            z = scg.sample("z", dist.Normal(params["m"] + state, 1.0))
            scg.cost("hinge", jnp.maximum(z - x_t, 0.0) + (z > 0).astype(jnp.float32))
            return z, None

        jax.lax.scan(step, jnp.zeros(()), x)

    with pytest.raises(scg.PreconditionError, match=r"'z'.*through `gt`"):
        scg.passes.reparameterize(kinked.trace({"m": jnp.array(0.1)}, X3), sites=["z"])


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_per_step_leave_one_out_baseline_matches_the_twin_and_lowers_variance(reverse, key):
    # the loop's step-t score meets Q_t = its own cost + every later cost (the carry flows on); the
    # leave-one-out baseline is the mean Q_t of the other particles: the twin does the same per site
    @scg.model
    def chain(params, x):
        def step(state, x_t):
            b = scg.sample("b", dist.Bernoulli(logits=params["w"] * state + params["c"]))
            scg.cost("err", (b - x_t) ** 2.0 + 2.0)  # an offset a baseline removes
            return b.astype(jnp.float32), None

        jax.lax.scan(step, jnp.zeros(()), x, reverse=reverse)

    loop = scg.compile(chain, passes=[], baseline="leave_one_out")
    twin = scg.compile(unroll(chain.trace(BERN, B3)), passes=[], baseline="leave_one_out")
    for k in jax.random.split(key, 3):
        g1 = loop.grad(BERN, B3, key=k, num_samples=4)
        g2 = twin.grad(BERN, B3, key=k, num_samples=4)
        jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), g1, g2)
    if reverse:  # the order only changes which steps are "later": the twin comparison above covers it
        return
    n = 1000
    plain = scg.compile(chain, passes=[])
    with_b = jax.vmap(lambda k: loop.grad(BERN, B3, key=k, num_samples=4)["c"])(jax.random.split(key, n))
    without = jax.vmap(lambda k: plain.grad(BERN, B3, key=k, num_samples=4)["c"])(jax.random.split(key, n))
    # both unbiased for the same mean; the baseline removes the constant offset's noise: a variance ratio
    # of 2 is far outside what two 1000-draw sample variances of equal truth could show (F quantile ≈ 1.2)
    assert float(jnp.var(without)) > 2.0 * float(jnp.var(with_b))
    se = float(jnp.sqrt(jnp.var(with_b) / n + jnp.var(without) / n))
    assert abs(float(with_b.mean() - without.mean())) < 4 * se


def test_a_sampled_loss_needs_no_baseline(key):
    # leave-one-out needs two particles for a gradient, not for a loss (the same episodes, the same value)
    with_baseline = scg.compile(bernoulli_chain, passes=[], baseline="leave_one_out")
    plain = scg.compile(bernoulli_chain, passes=[])
    np.testing.assert_array_equal(with_baseline.loss(BERN, B3, key=key), plain.loss(BERN, B3, key=key))


@scg.model
def discrete_hmm(params, x):
    def step(state, x_t):
        z = scg.sample("z", dist.Categorical(logits=params["T"][state]))
        scg.cost("nll", (x_t - params["mu"][z]) ** 2)
        return z, None

    jax.lax.scan(step, jnp.int32(0), x)


HMM = {"T": jnp.array([[0.5, -0.2, 0.1], [0.0, 1.0, -1.0], [0.3, 0.3, 0.9]]), "mu": jnp.array([-1.0, 0.0, 1.5])}


def test_a_discrete_chain_is_integrated_by_the_forward_recursion(key):
    x = jnp.array([0.3, -1.0, 1.2, 0.5])
    # the recursion (T·K²) against the unrolled twin's joint enumeration (K^T): value and gradient
    twin = scg.unroll(discrete_hmm.trace(HMM, x))
    # both in one compiled program (eagerly, every primitive of the quadrature compiles on its own shapes)
    exact, joint = jax.jit(lambda q: (jax.value_and_grad(lambda p: scg.expectation(discrete_hmm, p, x))(q),
                                      jax.value_and_grad(lambda p: scg.expectation(twin, p, x))(q)))(HMM)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6), exact, joint)
    # a chain far beyond any joint grid: T = 300 (3^300 paths) is exact, and the estimator agrees with it
    long_x = jnp.sin(jnp.arange(300.0))
    assert np.isfinite(float(jax.jit(lambda q: scg.expectation(discrete_hmm, q, long_x))(HMM)))
    report = scg.check_grad(discrete_hmm, HMM, long_x[:60], key=key, num_samples=1000)
    assert report.ok, report
