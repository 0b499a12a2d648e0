"""Sites inside ``jax.vmap``: the mapped axis is a plate, checked draw for draw against ``scg.plate``."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import pytest

import scg

PARAMS = {"w": jnp.array(0.3), "m": jnp.array(0.1)}
X = jnp.array([1.0, 0.0, 1.0])


@scg.model
def with_vmap(params, x):
    def example(x_i):
        b = scg.sample("b", dist.Bernoulli(logits=params["w"] * x_i))
        z = scg.sample("z", dist.Normal(params["m"] + b, 1.0))
        scg.cost("err", (z - x_i) ** 2.0)

    jax.vmap(example)(x)


@scg.model
def with_plate(params, x):
    with scg.plate("data", x.shape[0]):
        b = scg.sample("b", dist.Bernoulli(logits=params["w"] * x))
        z = scg.sample("z", dist.Normal(params["m"] + b, 1.0))
        scg.cost("err", (z - x) ** 2.0)


def test_the_mapped_axis_is_one_plate_shared_by_the_sites_and_costs_of_that_vmap():
    graph = with_vmap.trace(PARAMS, X)
    assert [[p.name for p in s.plates] for s in graph.sites] == [["vmap1"], ["vmap1"]]
    assert [p.name for p in graph.costs[0].plates] == ["vmap1"]
    assert graph.site("z").output.shape == (3,)


@pytest.mark.parametrize("passes", [[], "auto"], ids=["naive", "auto"])
def test_vmap_and_plate_agree_draw_for_draw(passes, key):
    a, b = scg.compile(with_vmap, passes=passes), scg.compile(with_plate, passes=passes)
    for k in jax.random.split(key, 3):
        (l1, g1), (l2, g2) = a.value_and_grad(PARAMS, X, key=k), b.value_and_grad(PARAMS, X, key=k)
        np.testing.assert_allclose(l1, l2, rtol=1e-6)
        jax.tree_util.tree_map(lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-5), g1, g2)
    np.testing.assert_allclose(scg.expectation(with_vmap, PARAMS, X), scg.expectation(with_plate, PARAMS, X),
                               rtol=1e-6)


def test_unmapped_arguments_are_shared_and_nested_vmaps_are_nested_plates(key):
    @scg.model
    def nested(params, x, scale):
        def row(x_row):
            def cell(x_ij):
                z = scg.sample("z", dist.Normal(params["m"] * x_ij, scale))
                scg.cost("fit", (z - x_ij) ** 2)

            jax.vmap(cell)(x_row)

        jax.vmap(row)(x)

    @scg.model
    def plated(params, x, scale):
        with scg.plate("rows", x.shape[0]), scg.plate("cols", x.shape[1]):
            z = scg.sample("z", dist.Normal(params["m"] * x, scale * jnp.ones_like(x)))
            scg.cost("fit", (z - x) ** 2)

    params, x, scale = {"m": jnp.array(0.4)}, jnp.arange(6.0).reshape(2, 3) / 6, jnp.array(0.7)
    graph = nested.trace(params, x, scale)
    plates = graph.site("z").plates
    assert [(p.dim, p.size) for p in plates] == [(0, 2), (1, 3)] and plates[0].name != plates[1].name
    l1 = scg.compile(nested, passes=[]).loss(params, x, scale, key=key)
    l2 = scg.compile(plated, passes=[]).loss(params, x, scale, key=key)
    np.testing.assert_allclose(l1, l2, rtol=1e-6)


def test_sibling_vmaps_are_distinct_plates():
    @scg.model
    def siblings(params, x):
        jax.vmap(lambda x_i: scg.sample("a", dist.Normal(params["m"] * x_i, 1.0)))(x)
        jax.vmap(lambda x_i: scg.cost("c", x_i * params["m"]))(x)

    graph = siblings.trace({"m": jnp.array(0.0)}, X)
    assert graph.site("a").plates[0].name != graph.costs[0].plates[0].name


def test_per_example_rao_blackwellization_under_vmap_is_unbiased(key):
    report = scg.check_grad(with_vmap, PARAMS, X, key=key, num_samples=3000, passes=[], order=6)
    assert report.ok, report


def test_vmap_of_a_loop_holding_sites_matches_a_plate_inside_the_loop(key):
    @scg.model
    def vmapped_loop(params, x):
        def sequence(x_i):
            def step(c, x_t):
                z = scg.sample("z", dist.Normal(params["m"] * c, 1.0))
                scg.cost("fit", (z - x_t) ** 2)
                return z, None

            jax.lax.scan(step, jnp.zeros(()), x_i)

        jax.vmap(sequence)(x)

    x = jnp.arange(6.0).reshape(2, 3) / 6
    graph = vmapped_loop.trace({"m": jnp.array(0.5)}, x)
    (loop,) = graph.scans
    assert [p.name for p in loop.body.site("z").plates] == ["vmap1"] and loop.length == 3
    report = scg.check_grad(vmapped_loop, {"m": jnp.array(0.5)}, x, key=key, num_samples=2000, order=4)
    assert report.ok, report
