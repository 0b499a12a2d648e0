"""The examples (``examples/policy_gradient.py``, ``examples/hmm.py``) in tiny configurations.

Each example is imported by path and run for a few updates on a short horizon; the
HMM's exact references are checked against brute-force enumeration and against
``scg.expectation`` of the scg model itself.
"""
from __future__ import annotations

import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import scg

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"scg_example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def pg():
    return load("policy_gradient")


@pytest.fixture(scope="module")
def hmm():
    return load("hmm")


def test_policy_gradient_trains_a_few_updates_with_finite_losses(pg):
    horizon, particles = 12, 4
    result = pg.train(updates=3, horizon=horizon, particles=particles, lr=0.01)
    assert result["returns"].shape == (3, particles)
    assert np.all(np.isfinite(result["losses"]))
    assert np.all((result["returns"] >= 1) & (result["returns"] <= horizon))
    # the loss is minus the mean return of the very episodes the returns were read from
    np.testing.assert_allclose(-result["losses"], result["returns"].mean(axis=1), rtol=1e-5)
    assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree_util.tree_leaves(result["params"]))


def test_cartpole_fails_at_twelve_degrees_and_the_reward_stops_there(pg):
    cartpole = pg.cartpole
    assert not bool(cartpole.failed(jnp.array([0.0, 0.0, 0.2, 0.0])))
    assert bool(cartpole.failed(jnp.array([0.0, 0.0, 0.21, 0.0])))
    assert bool(cartpole.failed(jnp.array([2.5, 0.0, 0.0, 0.0])))
    # from 11.7° and tipping, pushing left (a_0 = 0) loses the pole at step 2: E[return] = 2 + π(right | s_0)
    params = pg.init_policy(jax.random.key(0), hidden=4)
    s0 = jnp.array([0.0, 0.0, 0.205, 0.1])
    value = jax.jit(lambda p: scg.expectation(pg.make_episode(3, random_start=False), p, s0))(params)
    p_right = jax.nn.sigmoid(pg.policy_logit(params, s0))
    np.testing.assert_allclose(-value, 2.0 + p_right, rtol=1e-5)


def test_hmm_trains_and_its_exact_references_agree_with_brute_force_and_scg(hmm):
    # a few training steps on T = 4, K = 2, then the references at the trained parameters
    k, t = 2, 4
    result = hmm.train(steps=3, length=t, k=k, particles=2, lr=0.05, eval_every=1)
    history, params, x = result["history"], result["params"], result["x"]
    assert np.all(np.isfinite(history["sampled_elbo"])) and len(history["sampled_elbo"]) == 3
    assert np.all(np.isfinite(history["elbo"])) and np.all(history["elbo"] <= history["log_px"])
    params = {**params, "trans_logits": jax.random.normal(jax.random.key(3), (k + 1, k)),
              "guide_w": jnp.array([-0.7, 0.9])}  # away from the symmetric start

    @jax.jit
    def references(p):
        return (hmm.log_marginal(p, x), hmm.brute_force_log_marginal(p, x), hmm.exact_elbo(p, x),
                -scg.expectation(hmm.negative_elbo, p, x))  # scg enumerates the loop's 2^4 paths

    log_px, brute_force, elbo, scg_elbo = references(params)
    np.testing.assert_allclose(log_px, brute_force, rtol=1e-6)
    np.testing.assert_allclose(elbo, scg_elbo, rtol=1e-5)
    assert float(elbo) <= float(log_px)
    assert float(log_px - elbo) > 1e-3  # a guide that ignores the future is not the posterior
