"""No silent wrong number: invalid inputs give NaN or a named error, never plausible values."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import pytest

import scg


@scg.model
def normal_model(params, x):
    q = dist.Normal(params["mu"], params["s"])
    z = scg.sample("z", q)
    scg.cost("fit", (z - x) ** 2)
    scg.cost("kl", scg.log_prob(q, z) - scg.log_prob(dist.Normal(0.0, 1.0), z))


@scg.model
def bernoulli_model(params, x):
    b = scg.sample("b", dist.Bernoulli(probs=params["p"]))
    scg.cost("err", (b - x) ** 2.0)


@scg.model
def bad_prior_model(params, x):
    q = dist.Normal(params["mu"], 1.0)
    z = scg.sample("z", q)
    # the prior's scale is invalid; integrate_kl consumes it into an analytic KL
    scg.cost("kl", scg.log_prob(q, z) - scg.log_prob(dist.Normal(0.0, params["s"]), z))


CASES = [
    (normal_model, {"mu": jnp.array(0.2), "s": jnp.array(-1.0)}, "site 'z': parameter 'scale'"),
    (bernoulli_model, {"p": jnp.array(1.5)}, "site 'b': parameter 'probs'"),
    (bad_prior_model, {"mu": jnp.array(0.2), "s": jnp.array(-1.0)}, r"scg.log_prob\(Normal\): parameter 'scale'"),
]


@pytest.mark.parametrize("passes", ["auto", []], ids=["auto", "naive"])
@pytest.mark.parametrize("model, params, _", CASES, ids=["normal-scale", "bernoulli-probs", "prior-scale"])
def test_invalid_parameters_give_nan_values_and_nan_gradients(model, params, _, passes, key):
    # before: Normal(mu, -1) under auto gave finite losses and gradients (as if the scale were +1)
    objective = scg.compile(model, passes=passes)
    loss, grads = objective.value_and_grad(params, jnp.array(1.0), key=key, num_samples=2)
    assert np.isnan(float(loss))
    assert all(np.all(np.isnan(np.asarray(g))) for g in jax.tree_util.tree_leaves(grads)), grads
    assert np.isnan(float(scg.expectation(model, params, jnp.array(1.0))))


@pytest.mark.parametrize("model, params, message", CASES, ids=["normal-scale", "bernoulli-probs", "prior-scale"])
def test_checked_mode_names_the_site_and_the_parameter(model, params, message, key):
    objective = scg.compile(model, checked=True)
    with pytest.raises(scg.ModelError, match=message):
        objective.grad(params, jnp.array(1.0), key=key)


def test_checked_mode_changes_nothing_on_valid_parameters(key):
    params = {"mu": jnp.array(0.2), "s": jnp.array(0.7)}
    plain = scg.compile(normal_model).value_and_grad(params, jnp.array(1.0), key=key)
    checked = scg.compile(normal_model, checked=True).value_and_grad(params, jnp.array(1.0), key=key)
    jax.tree_util.tree_map(np.testing.assert_array_equal, plain, checked)


def test_checks_are_printed_in_the_ir():
    text = str(normal_model.trace({"mu": jnp.array(0.2), "s": jnp.array(0.7)}, jnp.array(1.0)))
    assert "check  Normal(loc=" in text and "[site 'z']" in text
