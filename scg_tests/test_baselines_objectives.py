"""Stateful baselines (moving average, NVIL-style learned) and the multi-sample objectives
(IWAE, VIMCO): unbiasedness against exact answers, variance reduction, errors."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import optax
import pytest

import scg


def assert_within_se(samples, exact, k=4.0):
    samples = np.asarray(samples, dtype=np.float64)
    mean, se = samples.mean(0), samples.std(0, ddof=1) / np.sqrt(samples.shape[0])
    assert np.all(np.abs(mean - np.asarray(exact)) < k * se + 1e-6), (mean, exact, se)


@scg.model
def plated_bernoulli(p, x):
    with scg.plate("data", x.shape[0]):
        b = scg.sample("b", dist.Bernoulli(logits=p["w"] * x))
        scg.cost("c", (b - 0.3) ** 2 + 4.0 + x)  # a large offset: what baselines remove


P = {"w": jnp.array(0.7)}
X = jnp.array([0.5, -1.0, 2.0, 0.1])
TRUTH = jax.grad(lambda q: scg.expectation(plated_bernoulli, q, X))(P)["w"]


def draws(objective, state, key, n=3000, num_samples=1):
    def one(k):
        out = objective.unjitted_grad(P, X, num_samples=num_samples, baseline_state=state)(k)
        return out["w"]

    return jax.jit(jax.vmap(one))(jax.random.split(key, n))


def test_moving_average_is_unbiased_for_any_state_and_learns_the_mean(key):
    obj = scg.compile(plated_bernoulli, passes=[], baseline="moving_average")
    state = obj.init_baseline_state(P, X)
    assert set(state) == {"b"}
    plain = draws(scg.compile(plated_bernoulli, passes=[]), None, key)
    for fixed in (0.0, 2.5, 4.5):
        assert_within_se(draws(obj, {"b": jnp.array(fixed)}, key), TRUTH)
    for i in range(60):  # carry the state through estimates, as a training step does
        _, _, state = obj.value_and_grad(P, X, key=jax.random.fold_in(key, i), baseline_state=state)
    expected_q = float(scg.expectation(plated_bernoulli, P, X)) / X.shape[0]
    assert abs(float(state["b"]) - expected_q) < 0.2
    assert np.var(plain) > 5 * np.var(draws(obj, state, key))


def test_learned_baseline_is_unbiased_and_trains_to_lower_variance(key):
    net = lambda psi, x: psi["a"] * x + psi["c"]  # per-example baseline from the data
    baseline = scg.baselines.learned(net, {"a": jnp.array(0.0), "c": jnp.array(0.0)}, optax.adam(0.05))
    obj = scg.compile(plated_bernoulli, passes=[], baseline=baseline)
    state = obj.init_baseline_state(P, X)
    assert_within_se(draws(obj, state, key), TRUTH)
    for i in range(300):
        _, _, state = obj.value_and_grad(P, X, key=jax.random.fold_in(key, i), baseline_state=state)
    assert_within_se(draws(obj, state, key), TRUTH)
    plain = draws(scg.compile(plated_bernoulli, passes=[]), None, key)
    assert np.var(plain) > 5 * np.var(draws(obj, state, key))


def test_per_site_baselines(key):
    @scg.model
    def two(p, x):
        a = scg.sample("a", dist.Bernoulli(logits=p["w"]))
        b = scg.sample("b", dist.Bernoulli(logits=-p["w"]))
        scg.cost("c", 3.0 + a + 2.0 * b * a)

    truth = jax.grad(lambda q: scg.expectation(two, q, X))(P)["w"]
    obj = scg.compile(two, passes=[], baseline={"a": "moving_average", "b": "leave_one_out"})
    state = obj.init_baseline_state(P, X)
    assert set(state) == {"a"}
    g = jax.jit(jax.vmap(lambda k: obj.unjitted_grad(P, X, num_samples=4, baseline_state={"a": {"a": 3.5}})(k)["w"]))(
        jax.random.split(key, 3000))
    assert_within_se(g, truth)


def test_stateful_baseline_errors(key):
    obj = scg.compile(plated_bernoulli, passes=[], baseline="moving_average")
    with pytest.raises(ValueError, match=r"baseline 'moving_average\(0.9\)' keeps state: pass baseline_state="):
        obj.grad(P, X, key=key)
    with pytest.raises(ValueError, match=r"baseline_state was given, but this objective's baseline keeps no state"):
        scg.compile(plated_bernoulli, passes=[]).grad(P, X, key=key, baseline_state={})
    with pytest.raises(ValueError, match=r"decay must be in \[0, 1\)"):
        scg.baselines.moving_average(1.5)


# --- IWAE and VIMCO ---------------------------------------------------------------------------------


@scg.model
def discrete_vae(p, x):
    q = dist.Bernoulli(logits=p["enc"] * x)
    z = scg.sample("z", q)
    prior = dist.Bernoulli(logits=p["prior"])
    lik = dist.Normal(p["dec"] * z, 1.0)
    scg.cost("neg_log_w", scg.log_prob(q, z) - scg.log_prob(prior, z) - scg.log_prob(lik, x))


Q = {"enc": jnp.array(0.4), "prior": jnp.array(-0.3), "dec": jnp.array(1.2)}
XS = jnp.array(0.8)


def exact_iwae_loss(params, k):
    """E[L_K] by enumerating the K particles' joint support (z ∈ {0, 1} each)."""
    q = dist.Bernoulli(logits=params["enc"] * XS)
    total = 0.0
    for zs in itertools.product([0, 1], repeat=k):
        zs = jnp.array(zs)
        log_w = (dist.Bernoulli(logits=params["prior"]).log_prob(zs) + dist.Normal(params["dec"] * zs, 1.0).log_prob(XS)
                 - q.log_prob(zs))
        prob = jnp.exp(jnp.sum(q.log_prob(zs)))
        total = total + prob * -(jax.nn.logsumexp(log_w) - jnp.log(k))
    return total


@pytest.mark.parametrize("k", [2, 4])
def test_vimco_gradient_is_unbiased_for_the_iwae_bound(k, key):
    obj = scg.compile(discrete_vae, passes=[], objective="iwae")
    np.testing.assert_allclose(
        np.mean(jax.vmap(lambda kk: obj.loss(Q, XS, key=kk, num_samples=k))(jax.random.split(key, 4000))),
        exact_iwae_loss(Q, k), rtol=0.02)
    truth = jax.grad(lambda p: exact_iwae_loss(p, k))(Q)
    g = jax.jit(jax.vmap(obj.unjitted_grad(Q, XS, num_samples=k)))(jax.random.split(key, 4000))
    for name in Q:
        assert_within_se(g[name], truth[name])


def test_iwae_bound_tightens_with_more_particles(key):
    obj = scg.compile(discrete_vae, passes=[], objective="iwae")
    assert exact_iwae_loss(Q, 4) < exact_iwae_loss(Q, 2) < exact_iwae_loss(Q, 1)
    # K = 1 is the ELBO: the same sample gives the same loss
    elbo = scg.compile(discrete_vae, passes=[])
    assert obj.loss(Q, XS, key=key) == pytest.approx(float(elbo.loss(Q, XS, key=key)), rel=1e-6)


@scg.model
def gaussian_vae(p, x):
    q = dist.Normal(p["m"] * x, jnp.exp(p["s"]))
    z = scg.sample("z", q)
    scg.cost("neg_log_w", scg.log_prob(q, z) - scg.log_prob(dist.Normal(0.0, 1.0), z)
             - scg.log_prob(dist.Normal(z, 0.5), x))


def test_iwae_with_reparameterized_latents_is_unbiased(key):
    params = {"m": jnp.array(0.3), "s": jnp.array(-0.5)}
    x = jnp.array(1.1)
    obj = scg.compile(gaussian_vae, objective="iwae", passes=["reparameterize"])
    assert [s.name for s in obj.graph_for(params, x).sites] == ["z.eps"]

    def exact(p):  # E over two particles by 2-D Gauss–Hermite
        nodes, weights = np.polynomial.hermite.hermgauss(24)
        e1, e2 = np.meshgrid(np.sqrt(2) * nodes, np.sqrt(2) * nodes)
        w = np.outer(weights, weights) / np.pi
        q = dist.Normal(p["m"] * x, jnp.exp(p["s"]))
        z = jnp.stack([q.loc + q.scale * e1, q.loc + q.scale * e2])
        log_w = dist.Normal(0.0, 1.0).log_prob(z) + dist.Normal(z, 0.5).log_prob(x) - q.log_prob(z)
        return jnp.sum(w * -(jax.nn.logsumexp(log_w, axis=0) - jnp.log(2.0)))

    truth = jax.grad(exact)(params)
    g = jax.jit(jax.vmap(obj.unjitted_grad(params, x, num_samples=2)))(jax.random.split(key, 4000))
    for name in params:
        assert_within_se(g[name], truth[name])


def test_iwae_errors(key):
    with pytest.raises(ValueError, match=r"unknown objective 'renyi'"):
        scg.compile(discrete_vae, objective="renyi")
    with pytest.raises(ValueError, match=r"has its own leave-one-out signals \(VIMCO\)"):
        scg.compile(discrete_vae, objective="iwae", baseline="leave_one_out")
    # one particle: the ELBO and its plain score-function gradient, sample for sample
    iwae_1 = scg.compile(discrete_vae, passes=[], objective="iwae").grad(Q, XS, key=key)
    elbo = scg.compile(discrete_vae, passes=[]).grad(Q, XS, key=key)
    for name in Q:
        np.testing.assert_allclose(iwae_1[name], elbo[name], rtol=1e-5)
