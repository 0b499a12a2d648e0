"""Exact enumeration of discrete sites whose support is a product or is set by an operand.

Before, ``scg.expectation`` took these sites for enumerable and crashed: a ``Binomial(n, logits=...)``
site with a JAX ``ConcretizationTypeError`` (its ``total_count`` was traced when the grid was sized
from abstract operands), and ``Bernoulli(logits=...).to_event(1)`` with numpyro's bare
``NotImplementedError`` (``Independent`` has no ``enumerate_support``). Now the joint support of a
site is the product of its scalar elements' supports (under ``Independent`` and ``expand``, and for
a Binomial whose ``total_count`` differs between elements), sized from the graph's constants; a
support set by a value computed from the parameters or data, or a masked site, is refused by name.
Every number is checked against a closed form of the sigmoid ``s = σ(ℓ)``, ``s' = s (1 − s)``.
"""
import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import pytest

import scg

RTOL, ATOL = 2e-5, 2e-6


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-np.asarray(x, np.float64)))


def f32(x):
    return x.astype(jnp.float32)


def binomial_moments(n, ell):
    """``E[k]``, ``E[k²]`` of ``Binomial(n, σ(ℓ))`` and their derivatives in ``ℓ``, elementwise (float64)."""
    s = sigmoid(ell)
    ds = s * (1 - s)
    mean, d_mean = n * s, n * ds
    second = n * s * (1 - s) + (n * s) ** 2
    d_second = n * ds * (1 - 2 * s) + 2 * n ** 2 * s * ds
    return mean, d_mean, second, d_second


def sum_squared(n, ell):
    """``E[(Σ_i k_i)²]`` of independent ``k_i ~ Binomial(n_i, σ(ℓ_i))`` and its gradient in ``ℓ``."""
    s = sigmoid(ell)
    ds = s * (1 - s)
    m = np.sum(n * s)
    return np.sum(n * s * (1 - s)) + m ** 2, n * ds * (1 - 2 * s) + 2 * m * n * ds


def value_and_grad(model, params, *args):
    return jax.value_and_grad(lambda p: scg.expectation(model, p, *args))(params)


# total_count as a Python int (a Literal in the IR) and as arrays the model closes over (constants)
COUNTS = {"python_int": 10, "numpy_array": np.array(10, np.int32), "jax_array": jnp.array(10)}


@pytest.mark.parametrize("count", list(COUNTS))
@pytest.mark.parametrize("power", [1, 2])
def test_a_binomial_with_a_constant_count_is_enumerated_exactly(count, power):
    n = COUNTS[count]

    @scg.model
    def m(p):
        k = scg.sample("k", dist.Binomial(n, logits=p["l"]))
        scg.cost("c", f32(k) ** power)

    params = {"l": jnp.array(0.3)}
    value, grad = value_and_grad(m, params)
    mean, d_mean, second, d_second = binomial_moments(10, 0.3)
    # E[k] = n σ(ℓ) = 5.74443, E[k²] = n σ (1 − σ) + (n σ)² = 35.4431
    np.testing.assert_allclose(value, mean if power == 1 else second, rtol=RTOL)
    np.testing.assert_allclose(grad["l"], d_mean if power == 1 else d_second, rtol=RTOL)


@pytest.mark.parametrize("count", [jnp.array(10), None], ids=["jax_scalar", "computed_in_the_model"])
def test_a_constant_count_reshaped_by_the_constructor_is_folded_also_under_jit(count):
    # with vector logits numpyro reshapes a scalar count (promote_shapes): an equation of the graph, folded
    # as a constant; a count computed in the model from constants alone (jnp.full) is one too
    @scg.model
    def m(p):
        n = count if count is not None else jnp.full(3, 5) * 2
        k = scg.sample("k", dist.Binomial(n, logits=p["l"]))
        scg.cost("c", jnp.sum(f32(k) ** 2))

    params = {"l": jnp.array([0.3, -0.2, 0.1])}
    s = jax.nn.sigmoid(params["l"])
    exact = float(jnp.sum(10 * s * (1 - s) + (10 * s) ** 2))
    np.testing.assert_allclose(scg.expectation(m, params), exact, rtol=RTOL)
    np.testing.assert_allclose(jax.jit(lambda q: scg.expectation(m, q))(params), exact, rtol=RTOL)


def test_a_binomial_whose_count_differs_between_elements_is_a_product_of_their_supports():
    # numpyro's enumerate_support refuses an inhomogeneous total_count; the grid is {0..2}×{0..3}×{0..4}
    n = np.array([2, 3, 4])

    @scg.model
    def m(p):
        k = scg.sample("k", dist.Binomial(n, logits=p["l"]))
        scg.cost("c", jnp.sum(f32(k)) ** 2)

    ell = jnp.array([0.3, -0.2, 0.1])
    value, grad = value_and_grad(m, {"l": ell})
    want, d_want = sum_squared(n, ell)
    np.testing.assert_allclose(value, want, rtol=RTOL)  # 23.3825
    np.testing.assert_allclose(grad["l"], d_want, rtol=RTOL, atol=ATOL)


# (builder, ℓ per element as the closed form sees it, n per element)
PRODUCTS = {
    "Independent(Bernoulli)": (lambda p: dist.Bernoulli(logits=p["l"]).to_event(1), [0.3, -0.2, 0.5], 1),
    "Independent(expand(Bernoulli))": (lambda p: dist.Bernoulli(logits=p["l"]).expand([3]).to_event(1), 0.3, 1),
    "Independent(Bernoulli) of 2x2": (lambda p: dist.Bernoulli(logits=p["l"]).to_event(2),
                                       [[0.3, -0.2], [0.5, 0.0]], 1),
    "Independent(Binomial)": (lambda p: dist.Binomial(2, logits=p["l"]).to_event(1), [0.3, -0.2, 0.5], 2),
}


@pytest.mark.parametrize("name", list(PRODUCTS))
def test_independent_sites_are_enumerated_over_the_product_of_their_elements(name):
    build, ell, n = PRODUCTS[name]

    @scg.model
    def m(p):
        b = scg.sample("b", build(p))
        scg.cost("c", jnp.sum(f32(b)) ** 2)

    params = {"l": jnp.asarray(ell, jnp.float32)}
    value, grad = value_and_grad(m, params)
    elements = np.broadcast_to(np.asarray(ell, np.float64), (3,) if np.ndim(ell) == 0 else np.shape(ell))
    want, d_want = sum_squared(np.full(elements.shape, n), elements)
    np.testing.assert_allclose(value, want, rtol=RTOL)  # Σ s(1 − s) + (Σ s)² = 3.43981 for the first
    d_want = np.sum(d_want) if np.ndim(ell) == 0 else d_want  # one shared logit: the elements' sum
    np.testing.assert_allclose(grad["l"], d_want, rtol=RTOL, atol=ATOL)


def binomial_squared(p):
    k = scg.sample("k", dist.Binomial(10, logits=p["l"]))
    scg.cost("c", f32(k) ** 2)


def bernoulli_sum_squared(p):
    b = scg.sample("b", dist.Bernoulli(logits=p["l"]).to_event(1))
    scg.cost("c", jnp.sum(f32(b)) ** 2)


ESTIMATED = {"Binomial(10)": (binomial_squared, {"l": jnp.array(0.3)}),
             "Independent(Bernoulli)": (bernoulli_sum_squared, {"l": jnp.array([0.3, -0.2, 0.5])})}


@pytest.mark.parametrize("name", list(ESTIMATED))
def test_check_grad_is_ok_against_the_enumerated_reference(name, key):
    fn, params = ESTIMATED[name]
    report = scg.check_grad(scg.model(fn), params, key=key, num_samples=2000)
    assert report.ok, report


@pytest.mark.parametrize("name", list(ESTIMATED))
def test_the_enumerate_pass_sums_them_without_noise(name, key):
    fn, params = ESTIMATED[name]
    model = scg.model(fn)
    graph, cert = scg.passes.enumerate(model.trace(params))
    assert len(cert.rewritten) == 1, str(cert)
    grad = scg.compile(graph, passes=[]).grad(params, key=key)
    exact = jax.grad(lambda p: scg.expectation(model, p))(params)
    np.testing.assert_allclose(grad["l"], exact["l"], rtol=1e-5, atol=ATOL)


@pytest.mark.parametrize("counts", [5, np.array([2, 3, 4])])
def test_a_plated_binomial_is_exact_with_shared_or_per_example_counts(counts):
    # the same count in every example: integrated per example (6 points); different counts: one joint grid
    @scg.model
    def m(p):
        with scg.plate("data", 3):
            k = scg.sample("k", dist.Binomial(counts, logits=p["l"] * jnp.ones(3)))
            scg.cost("c", f32(k) ** 2)

    value, grad = value_and_grad(m, {"l": jnp.array(0.3)})
    _, _, second, d_second = binomial_moments(np.broadcast_to(counts, (3,)).astype(np.float64), 0.3)
    np.testing.assert_allclose(value, np.sum(second), rtol=RTOL)
    np.testing.assert_allclose(grad["l"], np.sum(d_second), rtol=RTOL)


def count_from_params(p, x):
    return dist.Binomial(jnp.round(jnp.exp(p["l"])).astype(jnp.int32), logits=p["l"])


def count_from_data(p, x):
    return dist.Binomial(x, logits=p["l"])


@pytest.mark.parametrize("build", [count_from_params, count_from_data], ids=["from_params", "from_data"])
def test_a_count_that_is_not_a_constant_is_refused_by_name(build):
    @scg.model
    def m(p, x):
        scg.sample("k", build(p, x))
        scg.cost("c", jnp.zeros(()))

    params, x = {"l": jnp.array(1.0)}, jnp.array(4)
    message = (r"scg.expectation: site 'k' \(BinomialLogits\) cannot be enumerated: its support is set by "
               r"total_count, which the model computes from its parameters or data, .* Make total_count a "
               r"constant of the model: a Python number, or an array the model closes over")
    with pytest.raises(scg.IntractableError, match=message) as e:
        scg.expectation(m, params, x)
    assert e.value.site == "k"
    # the enumerate pass skips it with that reason, and refuses it when asked for it by name
    graph = m.trace(params, x)
    _, cert = scg.passes.enumerate(graph)
    assert cert.rewritten == () and "its support is set by total_count" in str(cert)
    with pytest.raises(scg.PreconditionError, match=r"enumerate: site 'k': precondition 'finite support' failed: "
                                                    r".*its support is set by total_count"):
        scg.passes.enumerate(graph, sites=["k"])


def test_a_product_over_the_budget_is_refused_naming_the_site():
    @scg.model
    def m(p):
        b = scg.sample("b", dist.Bernoulli(logits=p["l"] * jnp.ones(30)).to_event(1))
        scg.cost("c", jnp.sum(f32(b)))

    with pytest.raises(scg.BudgetError, match=r"scg.expectation: the joint grid over sites has at least "
                                              r"1,073,741,824 points \(b: 1,073,741,824\), above the budget"):
        scg.expectation(m, {"l": jnp.array(0.3)})


def test_a_masked_site_is_refused_rather_than_summed_with_weight_one():
    # the masked element has log p = 0 for both values: summed over the grid it would count each with weight
    # 1 (this model gave 2 σ(0.3) + 1 = 2.149 for the sampled expectation σ(0.3) + σ(0.1) = 1.099)
    @scg.model
    def m(p):
        b = scg.sample("b", dist.Bernoulli(logits=p["l"]).mask(jnp.array([True, False])))
        scg.cost("c", jnp.sum(f32(b)))

    with pytest.raises(scg.IntractableError, match=r"site 'b' \(MaskedDistribution\) cannot be enumerated: it is "
                                                   r"masked \(.mask\(...\)\)"):
        scg.expectation(m, {"l": jnp.array([0.3, 0.1])})
