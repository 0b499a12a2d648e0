"""A loop draws the noise of Bernoulli, Categorical and Normal sites before it runs; the values must not change.

``scg.estimators.NOISE_BEFORE_LOOPS`` splits a family's draw into noise that depends on the key
alone and a transform of the parameters. These tests pin, for every entry, that the split
reproduces the family's own ``sample(key)`` bit for bit (a JAX or numpyro release that draws
otherwise fails here, not silently elsewhere), and that a loop draws what its unrolled twin
draws with the family's own sampler.
"""
import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import pytest

import scg
from scg.estimators import NOISE_BEFORE_LOOPS, _from_noise

@pytest.fixture(autouse=True)
def noise_for_short_loops_too(monkeypatch):
    # the loops below are short (T = 4), which draw in the body by default: draw their noise before them
    from scg import estimators

    monkeypatch.setattr(estimators, "NOISE_BEFORE_LOOPS_MIN_STEPS", 1)


PARAMETERS = {
    dist.BernoulliLogits: lambda rng, shape: dist.BernoulliLogits(jnp.asarray(rng.normal(size=shape), jnp.float32)),
    dist.BernoulliProbs: lambda rng, shape: dist.BernoulliProbs(jnp.asarray(rng.uniform(size=shape), jnp.float32)),
    dist.CategoricalLogits: lambda rng, shape: dist.CategoricalLogits(
        jnp.asarray(rng.normal(size=(*shape, 4)), jnp.float32)),
    dist.Normal: lambda rng, shape: dist.Normal(jnp.asarray(rng.normal(size=shape), jnp.float32),
                                                jnp.asarray(rng.uniform(0.1, 2.0, size=shape), jnp.float32)),
}


def test_every_family_in_the_table_has_a_check_here():
    assert set(NOISE_BEFORE_LOOPS) == set(PARAMETERS)


@pytest.mark.parametrize("family", list(PARAMETERS), ids=lambda f: f.__name__)
@pytest.mark.parametrize("shape", [(), (3,), (2, 4)])
def test_noise_and_transform_reproduce_the_familys_own_draw(family, shape):
    rng = np.random.default_rng(0)
    rule = NOISE_BEFORE_LOOPS[family]
    for i in range(20):
        d = PARAMETERS[family](rng, shape)
        key = jax.random.fold_in(jax.random.key(1), i)
        noise = rule.draw(key, rule.shape(d), rule.dtype(d))
        drawn = _from_noise(d, noise)
        expected = d.sample(key)
        assert drawn.dtype == expected.dtype and drawn.shape == expected.shape
        np.testing.assert_array_equal(np.asarray(drawn), np.asarray(expected))


def test_noise_of_another_shape_or_dtype_is_not_used():
    d = dist.Normal(jnp.zeros(3), 1.0)
    assert _from_noise(d, jnp.zeros((2,), jnp.float32)) is None  # the batch shape differs
    assert _from_noise(dist.BernoulliProbs(jnp.full((3,), 0.5, jnp.bfloat16)), jnp.zeros(3, jnp.float32)) is None


@scg.model
def mixed_chain(params, x):
    def step(state, x_t):
        b = scg.sample("b", dist.Bernoulli(logits=params["w"] * state + x_t * jnp.ones(3)))
        z = scg.sample("z", dist.Normal(params["m"] + state, jnp.exp(params["s"])))
        k = scg.sample("k", dist.Categorical(logits=params["c"] * state + jnp.arange(3.0) * x_t))
        scg.cost("fit", jnp.sum((b - x_t) ** 2) + (z - x_t) ** 2 + (k - 1.0) ** 2)
        return 0.5 * z + 0.1 * jnp.sum(b) + 0.2 * k, (b, z, k)

    return jax.lax.scan(step, jnp.zeros(()), x)


@pytest.mark.parametrize("passes", [[], "auto"])
def test_a_loop_draws_what_its_twin_draws_with_the_familys_sampler(passes):
    params = {"w": jnp.array(0.4), "m": jnp.array(-0.2), "s": jnp.array(-0.5), "c": jnp.array([0.3, -0.1, 0.2])}
    x = jnp.linspace(-1.0, 1.0, 4)
    loop = scg.compile(mixed_chain, passes=passes)
    twin = scg.compile(scg.unroll(mixed_chain.trace(params, x)), passes=passes)
    for key in jax.random.split(jax.random.key(3), 3):
        np.testing.assert_allclose(loop.loss(params, x, key=key), twin.loss(params, x, key=key), rtol=1e-6)
        g1, g2 = loop.grad(params, x, key=key), twin.grad(params, x, key=key)
        jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), g1, g2)


def _loop_and_twin_losses(key):
    params = {"w": jnp.array(0.4), "m": jnp.array(-0.2), "s": jnp.array(-0.5), "c": jnp.array([0.3, -0.1, 0.2])}
    x = jnp.linspace(-1.0, 1.0, 4)
    loop = scg.compile(mixed_chain, passes=[])
    twin = scg.compile(scg.unroll(mixed_chain.trace(params, x)), passes=[])
    return loop.loss(params, x, key=key), twin.loss(params, x, key=key)


def test_the_loop_takes_its_values_from_the_noise_drawn_before_it(monkeypatch):
    # the path the tests above compare must be the one taken: every site of the body is drawn from noise
    from scg import estimators

    used = []
    spy = lambda d, noise: used.append(type(d).__name__) or _from_noise(d, noise)  # noqa: E731
    monkeypatch.setattr(estimators, "_from_noise", spy)
    _loop_and_twin_losses(jax.random.key(0))
    assert sorted(set(used)) == ["BernoulliLogits", "CategoricalLogits", "Normal"]


def test_keys_whose_draws_do_not_batch_and_sites_too_large_to_hold_draw_inside_the_body(monkeypatch):
    # JAX's batching rule of rbg's random bits draws every key of a batch from the first one: rbg keys (and
    # sites over the size limit) draw step by step in the body, still the values of the twin
    loop, twin = _loop_and_twin_losses(jax.random.key(5, impl="rbg"))
    np.testing.assert_allclose(loop, twin, rtol=1e-6)
    from scg import estimators

    monkeypatch.setattr(estimators, "NOISE_BEFORE_LOOPS_MAX_ELEMENTS", 0)
    monkeypatch.setattr(estimators, "_from_noise", lambda d, noise: pytest.fail("no noise should be drawn"))
    loop, twin = _loop_and_twin_losses(jax.random.key(6))
    np.testing.assert_allclose(loop, twin, rtol=1e-6)


def test_a_short_loop_draws_in_its_body_by_default(monkeypatch):
    from scg import estimators

    monkeypatch.setattr(estimators, "NOISE_BEFORE_LOOPS_MIN_STEPS", 16)
    monkeypatch.setattr(estimators, "_from_noise", lambda d, noise: pytest.fail("a 4-step loop drew noise before it"))
    loop, twin = _loop_and_twin_losses(jax.random.key(7))
    np.testing.assert_allclose(loop, twin, rtol=1e-6)
