"""Property tests over randomly generated stochastic computation graphs (hypothesis).

Each drawn graph mixes Bernoulli, Categorical and Normal sites whose parameters
depend on earlier sites, with random differentiable costs (and sometimes a
sampled KL written with scg.log_prob). For every graph:

* the compiled estimator passes ``check_grad`` against ``jax.grad`` of the exact
  expectation (naive graph and ``auto``);
* every pass leaves ``scg.expectation`` and its gradient unchanged.

The CI profile draws a few graphs; ``SCG_HYPOTHESIS_PROFILE=slow pytest -m slow`` runs a larger sweep.
"""
from dataclasses import dataclass

import chex
import jax
import jax.numpy as jnp
import numpyro.distributions as dist
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import scg

N_PARAMS = 4
CATEGORY_VALUES = jnp.array([-1.0, 0.5, 2.0])


@dataclass(frozen=True)
class SiteSpec:
    kind: str  # "normal" | "bernoulli" | "categorical"
    param: int
    parents: tuple  # (index of earlier site, coefficient)


@dataclass(frozen=True)
class CostSpec:
    kind: str  # "product" | "sin" | "linear" | "square"
    sites: tuple
    param: int
    weight: float


@dataclass(frozen=True)
class GraphSpec:
    sites: tuple
    costs: tuple
    kl_on: int | None  # a Normal site whose sampled KL against N(0, 1) is a cost


coef = st.sampled_from([-0.8, -0.3, 0.4, 0.9])


@st.composite
def graph_specs(draw):
    n = draw(st.integers(1, 4))
    sites = []
    for i in range(n):
        kind = draw(st.sampled_from(["normal", "bernoulli", "categorical"]))
        if kind == "normal" and sum(s.kind == "normal" for s in sites) >= 2:
            kind = "bernoulli"
        parents = tuple(draw(st.lists(st.tuples(st.integers(0, max(i - 1, 0)), coef), max_size=2))) if i else ()
        sites.append(SiteSpec(kind, draw(st.integers(0, N_PARAMS - 1)), parents))
    costs = []
    for j in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["product", "sin", "linear", "square"]))
        members = tuple(draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=2)))
        costs.append(CostSpec(kind, members, draw(st.integers(0, N_PARAMS - 1)), draw(coef)))
    normals = [i for i, s in enumerate(sites) if s.kind == "normal"]
    kl_on = draw(st.sampled_from([None] + normals))
    return GraphSpec(tuple(sites), tuple(costs), kl_on)


def build(spec: GraphSpec):
    @scg.model
    def random_graph(p, x):
        t = p["t"]
        features = []
        for i, s in enumerate(spec.sites):
            h = t[s.param] + sum(c * features[j] for j, c in s.parents)
            if s.kind == "normal":
                q = dist.Normal(h, 0.5 + 0.5 * jax.nn.sigmoid(t[(s.param + 1) % N_PARAMS]))
                z = scg.sample(f"s{i}", q)
                features.append(z)
                if spec.kl_on == i:
                    scg.cost(f"kl{i}", scg.log_prob(q, z) - scg.log_prob(dist.Normal(0.0, 1.0), z))
            elif s.kind == "bernoulli":
                features.append(scg.sample(f"s{i}", dist.Bernoulli(logits=h)).astype(jnp.float32))
            else:
                logits = h * jnp.array([1.0, -1.0, 0.5])
                features.append(jnp.take(CATEGORY_VALUES, scg.sample(f"s{i}", dist.Categorical(logits=logits))))
        for j, c in enumerate(spec.costs):
            v = [features[k] for k in c.sites]
            if c.kind == "product":
                value = c.weight * v[0] * v[-1] + t[c.param]
            elif c.kind == "sin":
                value = jnp.sin(v[0] + t[c.param]) * c.weight
            elif c.kind == "linear":
                value = t[c.param] * v[0] + c.weight
            else:
                value = (v[0] - x) ** 2 * c.weight
            scg.cost(f"c{j}", value)

    return random_graph


PARAMS = {"t": jnp.array([0.3, -0.5, 0.8, 0.1])}
X = jnp.array(0.4)
ORDER = 10


def _exact_value_and_grad(graph):
    # one compiled program per graph (run eagerly, the nested vmaps of the quadrature compile every
    # primitive on its own shapes: hundreds of small XLA compiles per graph)
    f = lambda p: scg.expectation(graph, p, X, order=ORDER)
    return jax.jit(jax.value_and_grad(f))(PARAMS)


@given(graph_specs(), st.sampled_from([(), "auto"]))
def test_estimator_is_unbiased_on_random_graphs(spec, passes):
    model = build(spec)
    report = scg.check_grad(model, PARAMS, X, key=jax.random.key(1), num_samples=2000, passes=passes, order=ORDER)
    assert report.ok, f"{spec}\n{report}"


@given(graph_specs(), st.sampled_from(["reparameterize", "integrate_kl", "enumerate", "auto"]))
def test_passes_preserve_the_expectation_and_its_gradient(spec, pass_name):
    model = build(spec)
    graph = model.trace(PARAMS, X)
    rewrite = {"reparameterize": scg.passes.reparameterize, "integrate_kl": scg.passes.integrate_kl,
               "enumerate": scg.passes.enumerate, "auto": scg.passes.auto}[pass_name]
    before_nodes = graph.nodes
    new_graph, cert = rewrite(graph)
    assert graph.nodes is before_nodes  # passes never mutate their input
    v0, g0 = _exact_value_and_grad(graph)
    v1, g1 = _exact_value_and_grad(new_graph)
    # the same quadrature (ORDER) before and after: a pass preserves E exactly, so the two agree to
    # float32 rounding of the sums (not to a Monte Carlo error)
    chex.assert_trees_all_close((v1, g1), (v0, g0), rtol=1e-4, atol=1e-5)
    if cert.rewritten:
        report = scg.check_grad(scg.compile(new_graph, passes=[]), PARAMS, X, key=jax.random.key(2),
                                num_samples=2000, order=ORDER)
        assert report.ok, f"{spec}\n{cert}\n{report}"


@pytest.mark.slow
@settings(max_examples=150)
@given(graph_specs(), st.sampled_from([(), "auto", ["enumerate", "auto"]]))
def test_estimator_is_unbiased_on_many_random_graphs(spec, passes):
    report = scg.check_grad(build(spec), PARAMS, X, key=jax.random.key(3), num_samples=4000, passes=passes,
                            order=ORDER)
    assert report.ok, f"{spec}\n{report}"
