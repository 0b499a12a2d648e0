"""Stateful baselines (moving average, NVIL-style learned) and the multi-sample objectives
(IWAE, VIMCO): unbiasedness against exact answers, variance reduction, errors."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import optax
import pytest
from helpers import assert_variance_ratio_above, assert_within_se, mc_mean_and_se

import scg

# Statistical tests: a fixed seed, and a Monte Carlo mean within k = 4 standard errors of the exact
# value (two-sided normal tail 6.3e-5 per coordinate); variance ratios are asserted with 4 standard
# errors of the log ratio to spare (helpers.assert_variance_ratio_above).


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
    steps, decay = 60, 0.9
    for i in range(steps):  # carry the state through estimates, as a training step does
        _, _, state = obj.value_and_grad(P, X, key=jax.random.fold_in(key, i), baseline_state=state)
    # m_T = Σ_t (1 − d)·d^(T−t)·Q̄_t from m_0 = 0, with Q̄_t the mean over the 4 examples of
    # Q_i = (b_i − 0.3)² + 4 + x_i, independent across steps. So E[m_T] = (1 − d^T)·E[Q̄] and
    # Var[m_T] = (1 − d)²·(1 − d^(2T))/(1 − d²)·Var(Q̄), where (b − 0.3)² is 0.49 or 0.09:
    # Var(Q̄) = Σ_i 0.4²·s_i(1 − s_i) / 4², s_i = σ(w x_i). Assert |m_T − E[m_T]| < 4 standard deviations.
    # Catches a moving average that does not update, updates with the wrong weight, or averages
    # anything but the downstream costs.
    expected_q = float(scg.expectation(plated_bernoulli, P, X)) / X.shape[0]
    s = jax.nn.sigmoid(P["w"] * X)
    var_q = float(jnp.sum(0.4 ** 2 * s * (1 - s))) / X.shape[0] ** 2
    sd_m = np.sqrt((1 - decay) ** 2 * (1 - decay ** (2 * steps)) / (1 - decay ** 2) * var_q)
    assert abs(float(state["b"]) - (1 - decay ** steps) * expected_q) < 4 * sd_m, (float(state["b"]), expected_q, sd_m)
    assert_variance_ratio_above(plain, draws(obj, state, key), 5.0)


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
    assert_variance_ratio_above(plain, draws(obj, state, key), 5.0)


@scg.model
def two_sites(p, x):
    a = scg.sample("a", dist.Bernoulli(logits=p["u"]))  # site a's score term moves only p["u"]
    b = scg.sample("b", dist.Bernoulli(logits=p["v"]))  # site b's only p["v"]
    scg.cost("c", 3.0 + a + 2.0 * b * a)  # a large offset (≈ E[c] = 4.1): what a baseline removes


P2 = {"u": jnp.array(0.7), "v": jnp.array(-0.7)}


@pytest.mark.parametrize("choice, state", [
    ({"a": "leave_one_out"}, None),
    ({"b": "moving_average"}, {"b": {"b": jnp.array(3.5)}}),
    ({"a": "moving_average", "b": "leave_one_out"}, {"a": {"a": jnp.array(3.5)}}),
], ids=["a-loo", "b-moving-average", "both"])
def test_per_site_baselines_act_on_the_named_sites_only(choice, state, key):
    # Catches: per-site baselines computed but not applied (no variance reduction on the named
    # sites), or applied to every site (the other sites' coordinates change).
    truth = jax.grad(lambda q: scg.expectation(two_sites, q, X))(P2)
    obj = scg.compile(two_sites, passes=[], baseline=choice)
    assert set(obj.init_baseline_state(P2, X) or {}) == {n for n, c in choice.items() if c == "moving_average"}
    keys = jax.random.split(key, 3000)
    g = jax.jit(jax.vmap(obj.unjitted_grad(P2, X, num_samples=4, baseline_state=state)))(keys)
    plain = jax.jit(jax.vmap(scg.compile(two_sites, passes=[]).unjitted_grad(P2, X, num_samples=4)))(keys)
    for site, param in (("a", "u"), ("b", "v")):
        assert_within_se(g[param], truth[param])
        if site in choice:  # the named site: a large offset removed (measured ratios 8 to 41)
            assert_variance_ratio_above(plain[param], g[param], 3.0)
        else:  # the same key draws the same samples: the other site's coordinates are untouched
            np.testing.assert_allclose(g[param], plain[param], rtol=1e-6, atol=1e-7)


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


def plain_signal_iwae_grad(params, key, k):
    """The IWAE gradient with the plain learning signal (no leave-one-out), written out by hand:
    ``∇L_K`` at fixed samples plus ``L_K · Σ_k ∇log q(z_k)``."""
    z = dist.Bernoulli(logits=params["enc"] * XS).sample(key, (k,))

    def surrogate(p):
        log_q = dist.Bernoulli(logits=p["enc"] * XS).log_prob(z)
        log_w = dist.Bernoulli(logits=p["prior"]).log_prob(z) + dist.Normal(p["dec"] * z, 1.0).log_prob(XS) - log_q
        loss = -(jax.nn.logsumexp(log_w) - jnp.log(k))
        return loss + jax.lax.stop_gradient(loss) * jnp.sum(log_q - jax.lax.stop_gradient(log_q))

    return jax.grad(surrogate)(params)


@pytest.mark.parametrize("k", [2, 4])
def test_vimco_gradient_is_unbiased_for_the_iwae_bound(k, key):
    obj = scg.compile(discrete_vae, passes=[], objective="iwae")
    # the loss: within 4 SE of E[L_K]; and E[L_K] is more than 8 SE from the ELBO E[L_1] (the gap is
    # 0.0087 at K = 2: 20,000 draws make SE ≈ 0.001), so a loss that returned the ELBO fails by at
    # least 4 SE (catches it)
    losses = jax.jit(jax.vmap(lambda kk: obj.loss(Q, XS, key=kk, num_samples=k)))(jax.random.split(key, 20_000))
    _, se = mc_mean_and_se(losses)
    assert float(exact_iwae_loss(Q, 1) - exact_iwae_loss(Q, k)) > 8 * se
    assert_within_se(losses, exact_iwae_loss(Q, k))
    truth = jax.grad(lambda p: exact_iwae_loss(p, k))(Q)
    g = jax.jit(jax.vmap(obj.unjitted_grad(Q, XS, num_samples=k)))(jax.random.split(key, 4000))
    for name in Q:
        assert_within_se(g[name], truth[name])
    # VIMCO's leave-one-out signal: the encoder's gradient variance is 11x (K=2) and 33x (K=4) below
    # the plain signal's (both unbiased). Catches VIMCO replaced by the plain bound (ratio ≈ 1).
    plain_keys = jax.random.split(jax.random.fold_in(key, 1), 4000)
    plain = jax.jit(jax.vmap(lambda kk: plain_signal_iwae_grad(Q, kk, k)))(plain_keys)
    assert_within_se(plain["enc"], truth["enc"])
    assert_variance_ratio_above(plain["enc"], g["enc"], 3.0)


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
