"""The lowered estimator: unbiasedness against closed forms and exact expectations, jit/vmap
behaviour, particles, baselines, DiCE higher-order gradients."""
import jax
import jax.numpy as jnp
import numpy as np
import chex
import numpyro.distributions as dist
import pytest
from helpers import assert_variance_ratio_above, assert_within_se, log_variance_ratio

import scg

# Statistical tests: a fixed seed, and a Monte Carlo mean within k = 4 standard errors of the exact
# value unless a bound says otherwise (two-sided normal tail 6.3e-5 per coordinate; see helpers.py).


def estimates(objective, params, *args, key, n=4000, num_samples=1):
    grad = objective.unjitted_grad(params, *args, num_samples=num_samples)
    return jax.jit(jax.vmap(grad))(jax.random.split(key, n))


# --- closed forms through the score-function path -----------------------------------------------


@scg.model
def normal_square(p, x):
    z = scg.sample("z", dist.Normal(p["mu"], jnp.exp(p["log_sigma"])))
    scg.cost("c", (z - x) ** 2)


def test_normal_score_function_against_closed_form(key):
    # E[(z − x)²] = (μ − x)² + σ²  ⇒  ∂μ = 2(μ − x), ∂logσ = 2σ²
    p, x = {"mu": jnp.array(0.7), "log_sigma": jnp.array(-0.4)}, jnp.array(0.2)
    g = estimates(scg.compile(normal_square, passes=[]), p, x, key=key)
    assert_within_se(g["mu"], 2 * (0.7 - 0.2))
    assert_within_se(g["log_sigma"], 2 * np.exp(-0.8))
    np.testing.assert_allclose(scg.expectation(normal_square, p, x), (0.7 - 0.2) ** 2 + np.exp(-0.8), rtol=1e-5)


@scg.model
def bernoulli_categorical(p, x):
    b = scg.sample("b", dist.Bernoulli(logits=p["l"]))
    c = scg.sample("c", dist.Categorical(logits=p["cl"]))
    scg.cost("c", (b - x) ** 2 + jnp.take(jnp.array([1.0, -2.0, 3.0]), c) * b)


def test_discrete_score_function_against_enumeration(key):
    p = {"l": jnp.array(0.3), "cl": jnp.array([0.1, -0.5, 0.4])}
    x = jnp.array(0.25)
    # closed form: s = σ(l), π = softmax(cl): E = s(1−x)² + (1−s)x² + s Σπ_k v_k
    def exact(p):
        s = jax.nn.sigmoid(p["l"])
        pi = jax.nn.softmax(p["cl"])
        return s * (1 - x) ** 2 + (1 - s) * x ** 2 + s * jnp.dot(pi, jnp.array([1.0, -2.0, 3.0]))

    np.testing.assert_allclose(scg.expectation(bernoulli_categorical, p, x), exact(p), rtol=1e-6)
    truth = jax.grad(exact)(p)
    g = estimates(scg.compile(bernoulli_categorical, passes=[]), p, x, key=key)
    assert_within_se(g["l"], truth["l"])
    assert_within_se(g["cl"], truth["cl"])


@pytest.mark.parametrize("make, mean", [
    (lambda a: dist.Gamma(jnp.exp(a), 2.0), lambda a: jnp.exp(a) / 2.0),
    (lambda a: dist.Beta(jnp.exp(a), 1.5), lambda a: jnp.exp(a) / (jnp.exp(a) + 1.5)),
    (lambda a: dist.Exponential(jnp.exp(a)), lambda a: jnp.exp(-a)),
    (lambda a: dist.Poisson(jnp.exp(a)), lambda a: jnp.exp(a)),
    (lambda a: dist.LogNormal(a, 0.5), lambda a: jnp.exp(a + 0.125)),
    (lambda a: dist.Geometric(probs=jax.nn.sigmoid(a)), lambda a: (1 - jax.nn.sigmoid(a)) / jax.nn.sigmoid(a)),
], ids=["gamma", "beta", "exponential", "poisson", "lognormal", "geometric"])
def test_other_families_through_the_score_function(make, mean, key):
    @scg.model
    def m(p, x):
        z = scg.sample("z", make(p["a"]))
        scg.cost("c", z.astype(jnp.float32))

    a = jnp.array(0.3)
    g = estimates(scg.compile(m, passes=[]), {"a": a}, jnp.zeros(()), key=key, n=6000)
    assert_within_se(g["a"], jax.grad(mean)(a))


@pytest.mark.parametrize("make, mean", [
    (lambda a: dist.Gamma(jnp.exp(a), 2.0), lambda a: jnp.exp(a) / 2.0),
    (lambda a: dist.Beta(jnp.exp(a), 1.5), lambda a: jnp.exp(a) / (jnp.exp(a) + 1.5)),
], ids=["gamma", "beta"])
def test_rsample_families_through_the_pathwise_path(make, mean, key):
    @scg.model
    def m(p, x):
        z = scg.sample("z", make(p["a"]))
        scg.cost("c", z)

    a = jnp.array(0.3)
    obj = scg.compile(m)  # auto: marks the site reparameterized (implicit reparameterization)
    assert obj.graph_for({"a": a}, jnp.zeros(())).site("z").reparameterized
    g = estimates(obj, {"a": a}, jnp.zeros(()), key=key, n=4000)
    assert_within_se(g["a"], jax.grad(mean)(a))


# --- jit, vmap, keys, retracing --------------------------------------------------------------------


def test_same_key_same_sample_under_jit_vmap_and_twice(key):
    obj = scg.compile(bernoulli_categorical, passes=[])
    p = {"l": jnp.array(0.3), "cl": jnp.array([0.1, -0.5, 0.4])}
    x = jnp.array(0.25)
    a = obj.loss(p, x, key=key)
    b = obj.loss(p, x, key=key)
    assert a == b
    keys = jax.random.split(key, 8)
    batched = jax.vmap(lambda k: obj.loss(p, x, key=k))(keys)
    looped = jnp.stack([obj.loss(p, x, key=k) for k in keys])
    np.testing.assert_array_equal(batched, looped)
    with jax.disable_jit():
        unjitted = scg.compile(bernoulli_categorical, passes=[]).grad(p, x, key=key)
    jitted = obj.grad(p, x, key=key)
    chex.assert_trees_all_close(unjitted, jitted, rtol=1e-6)


def test_passes_keep_the_sample(key):
    p, x = {"mu": jnp.array(0.7), "log_sigma": jnp.array(-0.4)}, jnp.array(0.2)
    naive = scg.compile(normal_square, passes=[]).loss(p, x, key=key)
    auto = scg.compile(normal_square).loss(p, x, key=key)
    np.testing.assert_allclose(naive, auto, rtol=1e-6)


def test_no_retrace_when_only_values_change(key):
    obj = scg.compile(normal_square)
    p = {"mu": jnp.array(0.7), "log_sigma": jnp.array(-0.4)}
    for i in range(3):
        obj.value_and_grad(jax.tree_util.tree_map(lambda v: v + i, p), jnp.array(0.1 * i), key=jax.random.fold_in(key, i))
    assert obj.trace_count == 1
    obj.value_and_grad(p, jnp.ones(2), key=key)  # a new shape traces once more
    assert obj.trace_count == 2


def test_value_and_grad_value_is_the_loss(key):
    obj = scg.compile(bernoulli_categorical, passes=[])
    p = {"l": jnp.array(0.3), "cl": jnp.array([0.1, -0.5, 0.4])}
    value, grads = obj.value_and_grad(p, jnp.array(0.25), key=key)
    assert value == obj.loss(p, jnp.array(0.25), key=key)
    chex.assert_trees_all_equal_structs(grads, p)


def test_num_samples_averages_particles(key):
    # Catches: particles not averaged (first particle only: ratio 1), or averaged over the wrong
    # number of independent draws (6 or 11 particles' worth of variance reduction instead of 8).
    obj = scg.compile(bernoulli_categorical, passes=[])
    p = {"l": jnp.array(0.3), "cl": jnp.array([0.1, -0.5, 0.4])}
    x = jnp.array(0.25)
    truth = jax.grad(lambda q: scg.expectation(bernoulli_categorical, q, x))(p)["l"]
    n = 8000
    one = estimates(obj, p, x, key=jax.random.fold_in(key, 1), n=n)["l"]  # independent of `eight`
    eight = estimates(obj, p, x, key=jax.random.fold_in(key, 2), n=n, num_samples=8)["l"]
    assert_within_se(one, truth)
    assert_within_se(eight, truth)
    # K independent particles divide the variance by K. log(s1²/s8²) has the delta-method standard
    # error se = sqrt((κ1 − 1)/n + (κ8 − 1)/n) (κ: the draws' kurtosis; helpers.log_variance_ratio).
    # Accept log 8 ± 4·se. The design condition 4·se < log(8/6)/2 and < log(11/8)/2 makes the
    # window exclude 6 and 11: a ratio of 6 (or 11) would need a 4-se error towards 8 to pass.
    log_ratio, se = log_variance_ratio(one, eight)
    low, high = 8 * np.exp(-4 * se), 8 * np.exp(4 * se)
    assert 4 * se < min(np.log(8 / 6), np.log(11 / 8)) / 2, se  # the window separates 6, 8 and 11
    assert abs(log_ratio - np.log(8)) < 4 * se, (np.exp(log_ratio), low, high)


def test_bad_num_samples(key):
    obj = scg.compile(normal_square)
    with pytest.raises(ValueError, match="num_samples must be a positive int"):
        obj.grad({"mu": jnp.array(0.0), "log_sigma": jnp.array(0.0)}, jnp.zeros(()), key=key, num_samples=0)


def test_compile_rejects_non_models():
    with pytest.raises(TypeError, match=r"decorated with @scg.model"):
        scg.compile(lambda p: p)
    with pytest.raises(ValueError, match=r"unknown pass 'reparam'"):
        scg.compile(normal_square, passes=["reparam"])
    with pytest.raises(ValueError, match=r"unknown baseline 'mean'; choose one of \['leave_one_out', 'moving_average'\]"):
        scg.compile(normal_square, baseline="mean")


# --- downstream costs only: lower variance than Certigrad's all-costs estimator ---------------------


@scg.model
def two_independent(p, x):
    a = scg.sample("a", dist.Bernoulli(logits=p["la"]))
    b = scg.sample("b", dist.Bernoulli(logits=p["lb"]))
    scg.cost("ca", (a - 0.3) ** 2)
    scg.cost("cb", 10.0 * b + 5.0)  # large, and not downstream of a


def test_downstream_costs_reduce_variance(key):
    p = {"la": jnp.array(0.2), "lb": jnp.array(-0.1)}
    g = estimates(scg.compile(two_independent, passes=[]), p, jnp.zeros(()), key=key, n=4000)["la"]
    truth = jax.grad(lambda q: scg.expectation(two_independent, q, jnp.zeros(())))(p)["la"]
    assert_within_se(g, truth)
    # Certigrad's estimator: ∇log p(a) · (all costs)
    def all_costs(k):
        ka, kb = jax.random.split(k)
        s = jax.nn.sigmoid(p["la"])
        a = jax.random.bernoulli(ka, s).astype(jnp.float32)
        b = jax.random.bernoulli(kb, jax.nn.sigmoid(p["lb"])).astype(jnp.float32)
        return (a - s) * ((a - 0.3) ** 2 + 10.0 * b + 5.0)

    certigrad = jax.vmap(all_costs)(jax.random.split(key, 4000))
    assert_within_se(certigrad, truth)
    # catches the downstream-cost rule replaced by all costs (measured ratio 1700; 4 SE of the log to spare)
    assert_variance_ratio_above(certigrad, g, 50.0)


# --- baselines -------------------------------------------------------------------------------------


def test_leave_one_out_is_unbiased_and_lowers_variance(key):
    p = {"l": jnp.array(0.3), "cl": jnp.array([0.1, -0.5, 0.4])}
    x = jnp.array(3.0)  # a large constant offset in the cost: the case baselines are for
    truth = jax.grad(lambda q: scg.expectation(bernoulli_categorical, q, x))(p)
    plain = estimates(scg.compile(bernoulli_categorical, passes=[]), p, x, key=key, n=3000, num_samples=4)
    loo = estimates(scg.compile(bernoulli_categorical, passes=[], baseline="leave_one_out"), p, x, key=key,
                    n=3000, num_samples=4)
    assert_within_se(loo["l"], truth["l"])
    assert_within_se(loo["cl"], truth["cl"])
    assert_variance_ratio_above(plain["l"], loo["l"], 3.0)  # measured 12 (same keys: a conservative SE)


def test_leave_one_out_needs_two_particles(key):
    obj = scg.compile(bernoulli_categorical, passes=[], baseline="leave_one_out")
    with pytest.raises(ValueError, match="needs num_samples >= 2"):
        obj.grad({"l": jnp.array(0.3), "cl": jnp.zeros(3)}, jnp.zeros(()), key=key)


# --- DiCE: higher-order derivatives are unbiased -----------------------------------------------------


@scg.model
def mixed_small(p, x):
    b = scg.sample("b", dist.Bernoulli(logits=p["t"][0]))
    z = scg.sample("z", dist.Normal(p["t"][1] * b, 1.0))
    scg.cost("c", z ** 2 + jnp.sin(p["t"][0] * z) + b * p["t"][1])


def mixed_small_closed_form(t):
    """E[cost] of mixed_small: b ~ Bern(s), s = σ(t0); z | b ~ N(t1·b, 1); E[z² | b] = t1²·b + 1,
    E[sin(t0 z) | b] = sin(t0 t1 b)·exp(−t0²/2) (zero at b = 0), E[b t1] = s t1."""
    s = jax.nn.sigmoid(t[0])
    return 1.0 + s * (t[1] ** 2 + t[1]) + s * jnp.sin(t[0] * t[1]) * jnp.exp(-t[0] ** 2 / 2)


def test_hessian_reference_is_exact():
    # The Monte Carlo tests below compare with a reference; a reference error would be invisible to
    # them if it were below their k·SE (≈ 0.09 on the largest entry). So the reference is checked on
    # its own, against the closed form, far tighter than the SE: catches a default quadrature order too
    # low for sin(t0·z) (order 2 is off by 0.016 on an entry).
    p, x = {"t": jnp.array([0.3, -0.6])}, jnp.zeros(())
    quadrature = jax.hessian(lambda q: scg.expectation(mixed_small, q, x))(p)["t"]["t"]  # default order
    closed = jax.hessian(mixed_small_closed_form)(p["t"])
    np.testing.assert_allclose(quadrature, closed, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("passes", [[], "auto"])
def test_hessian_of_the_surrogate_is_unbiased(passes, key):
    p, x = {"t": jnp.array([0.3, -0.6])}, jnp.zeros(())
    exact = jax.hessian(mixed_small_closed_form)(p["t"])
    obj = scg.compile(mixed_small, passes=passes)
    hess = jax.jit(jax.vmap(lambda k: jax.hessian(lambda q: obj.surrogate(q, x, key=k))(p)["t"]["t"]))
    draws = hess(jax.random.split(key, 6000))
    # k = 4.5 = the Bonferroni bound for alpha ≈ 2.7e-5 over the 4 entries (helpers.bonferroni_z)
    assert_within_se(draws.reshape(-1, 4), exact.reshape(4), k=4.5)


# --- exact expectations --------------------------------------------------------------------------


def test_expectation_budget_error():
    @scg.model
    def big(p, x):
        z = scg.sample("z", dist.Bernoulli(logits=p["l"] * jnp.ones(30)))
        scg.cost("c", jnp.sum(z).astype(jnp.float32))

    with pytest.raises(scg.BudgetError, match=r"at least 1,073,741,824 points .*above the budget of 1,048,576"):
        scg.expectation(big, {"l": jnp.array(0.0)}, jnp.zeros(()))


def test_expectation_refuses_other_families():
    @scg.model
    def gamma(p, x):
        scg.cost("c", scg.sample("g", dist.Gamma(jnp.exp(p["a"]), 1.0)))

    with pytest.raises(scg.IntractableError, match=r"site 'g' has family Gamma"):
        scg.expectation(gamma, {"a": jnp.array(0.0)}, jnp.zeros(()))


def test_expectation_gauss_hermite_is_exact_for_polynomials():
    @scg.model
    def poly(p, x):
        z = scg.sample("z", dist.Normal(p["m"] * jnp.ones(2), jnp.array([0.5, 2.0])).to_event(1))
        scg.cost("c", z[0] ** 4 + z[0] * z[1] ** 2)

    m = 0.3
    # E[z0^4] = m^4 + 6 m^2 s0^2 + 3 s0^4 ; E[z0 z1^2] = m (m^2 + s1^2)
    exact = m**4 + 6 * m**2 * 0.25 + 3 * 0.0625 + m * (m**2 + 4.0)
    np.testing.assert_allclose(scg.expectation(poly, {"m": jnp.array(m)}, jnp.zeros(()), order=4), exact, rtol=1e-5)


def test_check_grad_report_fails_on_a_wrong_estimator(key):
    p, x = {"mu": jnp.array(0.7), "log_sigma": jnp.array(-0.4)}, jnp.array(0.2)
    report = scg.check_grad(normal_square, p, x, key=key, num_samples=2000)
    assert report.ok and "check_grad: ok" in str(report) and "params['mu']" in str(report)

    # a baseline that uses the particle's own downstream cost is not independent of its sample:
    # it cancels the score term, so the estimator is biased and check_grad must say so
    own_cost = lambda downstream: downstream
    bad = scg.check_grad(scg.compile(normal_square, passes=[], baseline=own_cost), p, x, key=key, num_samples=2000)
    assert not bad.ok and "FAILED" in str(bad)


def test_jvp_of_the_gradient_is_an_unbiased_hessian_vector_product(key):
    p, x = {"t": jnp.array([0.3, -0.6])}, jnp.zeros(())
    v = {"t": jnp.array([1.0, -2.0])}
    exact = jax.hessian(mixed_small_closed_form)(p["t"]) @ v["t"]
    obj = scg.compile(mixed_small, passes=[])

    def hvp(k):
        grad = lambda q: jax.grad(lambda r: obj.surrogate(r, x, key=k))(q)
        return jax.jvp(grad, (p,), (v,))[1]["t"]

    assert_within_se(jax.jit(jax.vmap(hvp))(jax.random.split(key, 6000)), exact, k=4.5)
