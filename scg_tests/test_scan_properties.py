"""Hypothesis-generated loop bodies: each against its unrolled twin and under ``check_grad``.

A drawn body has one or two sites (Normal or Bernoulli) whose parameters depend
on the carried state and on the step's input, a carry that is a random
combination of the step's values, and costs on random subsets of the values.
For every drawn loop (T = 2 or 3):

* the loop and its unrolled twin (``scg.unroll``) give the same loss and the
  same gradient from the same key (naive graph and ``auto``);
* (known open bug, below) the exact gradient of a drawn discrete chain can be wrong in float32.
"""
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import scg


@dataclass(frozen=True)
class BodySpec:
    kinds: tuple  # per site: "normal" | "bernoulli"
    carry_weights: tuple  # per site: how much of its value flows into the carry
    state_coef: tuple  # per site: how its parameter depends on the carried state
    costs: tuple  # per cost: (site index, "square" | "linear" | "sin")
    length: int


@st.composite
def body_specs(draw):
    n = draw(st.integers(1, 2))
    kinds = tuple(draw(st.sampled_from(["normal", "bernoulli"])) for _ in range(n))
    coef = st.sampled_from([-0.7, 0.0, 0.5])
    costs = tuple((draw(st.integers(0, n - 1)), draw(st.sampled_from(["square", "linear", "sin"])))
                  for _ in range(draw(st.integers(1, 2))))
    return BodySpec(kinds, tuple(draw(coef) for _ in range(n)), tuple(draw(coef) for _ in range(n)), costs,
                    draw(st.integers(2, 3)))


def build(spec: BodySpec):
    @scg.model
    def loop(params, x):
        def step(state, x_t):
            values = []
            for i, kind in enumerate(spec.kinds):
                theta = params["w"][i] + spec.state_coef[i] * state + 0.3 * x_t
                if kind == "normal":
                    v = scg.sample(f"s{i}", dist.Normal(theta, 0.8))
                else:
                    v = scg.sample(f"s{i}", dist.Bernoulli(logits=theta)).astype(jnp.float32)
                values.append(v)
            for j, (i, form) in enumerate(spec.costs):
                v = values[i]
                term = {"square": (v - x_t) ** 2, "linear": params["c"] * v, "sin": jnp.sin(v + params["c"])}[form]
                scg.cost(f"c{j}", term)
            new_state = sum((w * v for w, v in zip(spec.carry_weights, values)), jnp.zeros(()))
            return new_state, None

        jax.lax.scan(step, jnp.zeros(()), x)

    return loop


PARAMS = {"w": jnp.array([0.2, -0.4]), "c": jnp.array(0.6)}


@settings(max_examples=6, deadline=None, derandomize=True)
@given(body_specs())
def test_drawn_loops_match_their_twins_and_their_exact_gradient(spec):
    model = build(spec)
    x = jnp.linspace(-0.5, 0.5, spec.length)
    twin_graph = scg.unroll(model.trace(PARAMS, x))
    key = jax.random.key(7)
    for passes in ([], "auto"):
        loop, twin = scg.compile(model, passes=passes), scg.compile(twin_graph, passes=passes)
        (l1, g1), (l2, g2) = loop.value_and_grad(PARAMS, x, key=key), twin.value_and_grad(PARAMS, x, key=key)
        np.testing.assert_allclose(l1, l2, rtol=1e-5, atol=1e-6)
        jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), g1, g2)


@pytest.mark.xfail(strict=True, reason="open bug found by the drawn loops: in float32 the enumerated exact gradient "
                   "of this chain is off by 0.045 (0 in float64, by finite differences and by brute force), so "
                   "check_grad reports FAILED for a correct estimator")
def test_known_float32_error_in_the_enumerated_gradient_of_a_discrete_chain():
    spec = BodySpec(kinds=("bernoulli", "bernoulli"), carry_weights=(-0.7, 0.5), state_coef=(-0.7, 0.5),
                    costs=((0, "square"),), length=2)
    model, x = build(spec), jnp.linspace(-0.5, 0.5, 2)
    twin = scg.unroll(model.trace(PARAMS, x))
    # the step-1 cost (b - 0.5)² is 0.25 for b ∈ {0, 1}: nothing depends on w[1], its gradient is 0
    grad = jax.grad(lambda p: scg.expectation(twin, p, x))(PARAMS)
    assert abs(float(grad["w"][1])) < 1e-4, grad
