"""Plates: per-example score terms, per-example exact expectations, misuse errors."""
import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import pytest
from helpers import assert_variance_ratio_above, log_variance_ratio

import scg


def make_model(n, use_plate):
    @scg.model
    def m(p, x):
        def body():
            b = scg.sample("b", dist.Bernoulli(logits=p["l"] + x[:, None] * jnp.array([[1.0, -1.0]])))
            z = scg.sample("z", dist.Normal(p["m"] * jnp.sum(b, -1), 1.0))
            scg.cost("c", ((z - x) ** 2 + jnp.sum(b, -1)) / n)

        if use_plate:
            with scg.plate("data", n):
                body()
        else:
            body()

    return m


P = {"l": jnp.array(0.3), "m": jnp.array(-0.4)}


def test_per_example_expectation_matches_joint_enumeration():
    x = jnp.array([0.5, -1.0, 2.0])
    plated, joint = make_model(3, True), make_model(3, False)
    # values and gradients in one compiled program (eagerly, every primitive of the quadrature compiles
    # on its own shapes)
    (v1, g1), (v2, g2) = jax.jit(lambda q: (
        jax.value_and_grad(lambda r: scg.expectation(plated, r, x))(q),
        jax.value_and_grad(lambda r: scg.expectation(joint, r, x, order=4))(q)))(P)
    np.testing.assert_allclose(v1, v2, rtol=1e-4)
    for k in P:
        np.testing.assert_allclose(g1[k], g2[k], rtol=1e-4, atol=1e-6)


def test_per_example_expectation_scales_to_large_batches(key):
    x = jnp.linspace(-1.0, 1.0, 40)
    model = make_model(40, True)  # joint enumeration would need 4**40 * 16**40 points
    report = scg.check_grad(model, P, x, key=key, num_samples=2000, passes=[])
    assert report.ok, report
    with pytest.raises(scg.BudgetError, match=r"joint grid over sites has at least 1,208,925,819,614,629,174,706,176 "
                                              r"points .*above the budget of 1,048,576"):
        scg.expectation(make_model(40, False), P, x)


def _grad_draws(model, x, key, n=1500):
    obj = scg.compile(model, passes=[])
    return np.asarray(jax.jit(jax.vmap(obj.unjitted_grad(P, x)))(jax.random.split(key, n))["l"])


def test_plates_keep_variance_from_growing_with_batch_size(key):
    # Catches: the per-example Rao-Blackwellization lost (each example's score multiplied by every
    # example's cost). Four independent samples (a key each); every variance ratio is asserted with 4
    # standard errors of its log to spare (helpers.log_variance_ratio; measured ratios in comments).
    draws = {}
    for i, n in enumerate((8, 64)):
        x = jnp.linspace(-1.0, 1.0, n)
        draws[n] = (_grad_draws(make_model(n, True), x, jax.random.fold_in(key, 2 * i)),
                    _grad_draws(make_model(n, False), x, jax.random.fold_in(key, 2 * i + 1)))
    (plated_8, flat_8), (plated_64, flat_64) = draws[8], draws[64]
    # the mean cost's gradient gets more precise with more examples (measured 8.4)
    assert_variance_ratio_above(plated_8, plated_64, 2.0)
    # without plates every example's score multiplies every cost (measured 2600)
    assert_variance_ratio_above(flat_64, plated_64, 10.0)
    # and the gap grows with the batch (measured 62): log(flat/plated) at 64 minus at 8, SEs in quadrature
    log_64, se_64 = log_variance_ratio(flat_64, plated_64)
    log_8, se_8 = log_variance_ratio(flat_8, plated_8)
    assert log_64 - log_8 - 4 * np.hypot(se_64, se_8) > np.log(3.0), np.exp(log_64 - log_8)


@scg.model
def nested_and_mixed(p, x):
    g = scg.sample("g", dist.Normal(p["m"], 1.0))  # a site outside the plates, used inside
    with scg.plate("groups", 2):
        a = scg.sample("a", dist.Bernoulli(logits=p["l"] * jnp.ones(2)))
        with scg.plate("items", 3):
            b = scg.sample("b", dist.Bernoulli(logits=(g + a[:, None] - x) * jnp.ones((2, 3))))
            scg.cost("item_cost", (b - 0.5 * a[:, None]) ** 2 * x)
        scg.cost("group_cost", a * g)
    scg.cost("total", 0.1 * jnp.sum(a) ** 2)  # outside the plate, summing over it


def test_nested_plates_and_costs_outside_the_plate_are_unbiased(key):
    x = jnp.array([[0.2, -0.3, 0.5], [1.0, 0.0, -0.5]])
    params = {"m": jnp.array(0.2), "l": jnp.array(-0.3)}
    report = scg.check_grad(nested_and_mixed, params, x, key=key, num_samples=3000, passes=[], order=8)
    assert report.ok, report
    auto = scg.check_grad(nested_and_mixed, params, x, key=key, num_samples=3000, order=8)
    assert auto.ok, auto


def test_a_plate_dimension_that_is_an_event_dimension_is_refused(key):
    @scg.model
    def m(p, x):
        with scg.plate("data", 3):
            z = scg.sample("z", dist.Bernoulli(logits=p["l"] * jnp.ones(3)).to_event(1))
            scg.cost("c", z.astype(jnp.float32))

    with pytest.raises(scg.ModelError, match=r"site 'z': its log density has shape \(\), but the site is inside "
                                             r"plates \['data'\]"):
        scg.compile(m, passes=[]).grad(P, jnp.zeros(()), key=key)


def test_duplicate_plate_name():
    @scg.model
    def m(p, x):
        with scg.plate("data", 3):
            with scg.plate("data", 3):
                pass

    with pytest.raises(scg.ModelError, match=r"plate 'data' is already open"):
        m.trace(P, jnp.zeros(()))
