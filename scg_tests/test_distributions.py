"""A sweep of ``numpyro.distributions`` families through both estimators.

For each family ``D(φ(θ))`` (a parameter table of our own, unconstrained ``θ``
mapped through ``exp``/``sigmoid``/``softmax``) the model is
``z ~ D; cost f(z)`` with a smooth ``f`` whose expectation has a closed form:
by default ``f(z) = Σ z + ½ Σ z²``, so ``E[f] = Σ mean + ½ Σ (variance + mean²)``
from numpyro's own ``mean``/``variance`` (bounded ``cos z`` where moments do not
exist: Cauchy, HalfCauchy; the circular VonMises). The gradient ``∇θ E[f]``
is ``jax.grad`` of that closed form, and the estimator is

* the score function: ``scg.compile(model, passes=[])``;
* pathwise: ``scg.compile(model, passes=["reparameterize"])`` where the family
  has ``rsample`` (the certificate must show the site rewritten); a family
  without one must be refused by ``reparameterize(graph, sites=["z"])`` with
  a ``PreconditionError`` naming the site and the precondition.

Statistics: ``N`` i.i.d. single-particle estimates drawn under one
``jax.jit(jax.vmap(...))`` (one compile per case), fixed seed. Each coordinate
must satisfy ``|mean − exact| < K·SE + atol``. ``K = 4.5``: by the CLT a correct
estimator's coordinate leaves that window with probability ``6.8e-6``; the
sweep tests about 150 coordinates, so the family-wise false-alarm rate is
about ``1e-3`` (Bonferroni), and with the fixed seed a passing run stays
passing. ``atol = 1e-4·(1 + |exact|)`` covers float32 rounding of coordinates
that have no noise (pathwise gradients of a location).

The results table is in ``docs/distributions.md``.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import pytest
from jax.scipy.special import i0e, i1e

import scg

N = 3000
K = 4.5


def moments(z, p):
    z = jnp.asarray(z, jnp.float32)
    return jnp.sum(z) + 0.5 * jnp.sum(z * z)


def moments_exact(d, p):
    mean, var = d.mean, d.variance
    return jnp.sum(mean) + 0.5 * jnp.sum(var + mean * mean)


def cos_f(z, p):
    return jnp.sum(jnp.cos(z))


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[dict], Any]           # params -> distribution
    params: dict
    f: Callable = moments                  # (z, params) -> scalar cost
    exact: Callable = moments_exact        # (distribution, params) -> E[f(z)]
    sf: str | None = None                  # why the score-function path is refused (a support that moves)
    rank_promotion: str = "raise"          # numpyro's sampler of this family relies on implicit rank promotion

    @property
    def slow(self) -> bool:
        return self.name not in FAST


# the default tier (`pytest`): one or two families of each kind, cheap to compile; the rest run
# under `pytest -m slow` (each case compiles one XLA program, and rejection samplers compile slowly)
FAST = {"Normal", "Exponential", "Cauchy", "Gamma", "MultivariateNormal", "Independent(Normal)", "VonMises",
        "Bernoulli(logits)", "Categorical(probs)", "Poisson"}


def _exp(x):
    return jnp.exp(x)


def _tril2(v):
    return jnp.array([[jnp.exp(v[0]), 0.0], [v[1], jnp.exp(v[2])]])


def _cat_exact(d, p):
    k = jnp.arange(d.probs.shape[-1], dtype=jnp.float32)
    return jnp.sum(d.probs * (k + 0.5 * k * k))


CASES = [
    # --- continuous, with rsample -----------------------------------------------------------------
    Case("Normal", lambda p: dist.Normal(p["loc"], _exp(p["log_scale"])), {"loc": 0.3, "log_scale": -0.2}),
    Case("LogNormal", lambda p: dist.LogNormal(p["loc"], _exp(p["log_scale"])), {"loc": 0.1, "log_scale": -1.2}),
    Case("Gamma", lambda p: dist.Gamma(_exp(p["log_conc"]), _exp(p["log_rate"])), {"log_conc": 1.0, "log_rate": 0.3}),
    Case("Beta", lambda p: dist.Beta(_exp(p["a"]), _exp(p["b"])), {"a": 0.7, "b": 1.0}),
    Case("Exponential", lambda p: dist.Exponential(_exp(p["log_rate"])), {"log_rate": 0.4}),
    Case("Laplace", lambda p: dist.Laplace(p["loc"], _exp(p["log_scale"])), {"loc": -0.3, "log_scale": -0.5}),
    Case("Cauchy", lambda p: dist.Cauchy(p["loc"], _exp(p["log_scale"])), {"loc": 0.4, "log_scale": -0.3},
         f=cos_f, exact=lambda d, p: jnp.cos(d.loc) * jnp.exp(-d.scale)),
    Case("StudentT", lambda p: dist.StudentT(5.0 + _exp(p["log_df"]), p["loc"], _exp(p["log_scale"])),
         {"log_df": 0.5, "loc": 0.2, "log_scale": -0.4}),
    Case("Uniform", lambda p: dist.Uniform(p["low"], p["low"] + _exp(p["log_width"])), {"low": -0.5, "log_width": 0.2},
         sf="the support [low, high] moves with θ: the score function ignores the moving boundary, so it is "
            "biased for low/high: scg refuses it"),
    Case("HalfNormal", lambda p: dist.HalfNormal(_exp(p["log_scale"])), {"log_scale": 0.1}),
    Case("HalfCauchy", lambda p: dist.HalfCauchy(_exp(p["log_scale"])), {"log_scale": -0.2},
         f=cos_f, exact=lambda d, p: jnp.exp(-d.scale)),
    Case("InverseGamma", lambda p: dist.InverseGamma(5.0 + _exp(p["log_conc"]), _exp(p["log_rate"])),
         {"log_conc": 0.5, "log_rate": 0.8}),
    Case("Chi2", lambda p: dist.Chi2(_exp(p["log_df"])), {"log_df": 1.0}),
    Case("Gumbel", lambda p: dist.Gumbel(p["loc"], _exp(p["log_scale"])), {"loc": 0.2, "log_scale": -0.5}),
    Case("Logistic", lambda p: dist.Logistic(p["loc"], _exp(p["log_scale"])), {"loc": -0.1, "log_scale": -0.6}),
    Case("Weibull", lambda p: dist.Weibull(_exp(p["log_scale"]), _exp(p["log_conc"])), {"log_scale": 0.1, "log_conc": 0.6}),
    # Pareto(scale, alpha): the support z ≥ scale moves with scale, so the score-function case keeps it fixed
    Case("Pareto", lambda p: dist.Pareto(jnp.ones(()), 5.0 + _exp(p["log_alpha"])), {"log_alpha": 0.3}),
    Case("Pareto(scale)", lambda p: dist.Pareto(_exp(p["log_scale"]), 6.0), {"log_scale": -0.2},
         sf="the support z ≥ scale moves with θ: the score function is biased for scale"),
    Case("Dirichlet", lambda p: dist.Dirichlet(_exp(p["log_conc"])), {"log_conc": [0.3, 0.8, -0.2]}),
    Case("MultivariateNormal", lambda p: dist.MultivariateNormal(p["loc"], scale_tril=_tril2(p["L"])),
         {"loc": [0.2, -0.4], "L": [-0.3, 0.5, -0.6]}),
    Case("LowRankMultivariateNormal",
         lambda p: dist.LowRankMultivariateNormal(p["loc"], p["factor"], _exp(p["log_diag"])),
         {"loc": [0.1, -0.2], "factor": [[0.5], [-0.3]], "log_diag": [-0.5, -0.8]}),
    Case("Kumaraswamy", lambda p: dist.Kumaraswamy(_exp(p["a"]), _exp(p["b"])), {"a": 0.8, "b": 0.5}),
    Case("TruncatedNormal", lambda p: dist.TruncatedNormal(p["loc"], _exp(p["log_scale"]), low=-1.0, high=2.0),
         {"loc": 0.3, "log_scale": -0.1}),
    Case("SoftLaplace", lambda p: dist.SoftLaplace(p["loc"], _exp(p["log_scale"])), {"loc": 0.3, "log_scale": -0.4}),
    Case("AsymmetricLaplace", lambda p: dist.AsymmetricLaplace(p["loc"], _exp(p["log_scale"]), _exp(p["log_asym"])),
         {"loc": 0.1, "log_scale": -0.5, "log_asym": 0.3}),
    Case("BetaProportion", lambda p: dist.BetaProportion(jax.nn.sigmoid(p["m"]), _exp(p["log_conc"])),
         {"m": -0.4, "log_conc": 1.5}),
    Case("Independent(Normal)", lambda p: dist.Normal(p["loc"], _exp(p["log_scale"])).to_event(1),
         {"loc": [0.1, -0.3, 0.5], "log_scale": [-0.2, 0.1, -0.4]}),
    Case("Expanded(Normal)", lambda p: dist.Normal(p["loc"], _exp(p["log_scale"])).expand([3]),
         {"loc": 0.2, "log_scale": -0.3}),
    Case("GaussianRandomWalk", lambda p: dist.GaussianRandomWalk(_exp(p["log_scale"]), 3), {"log_scale": -0.5}),
    # --- continuous, no rsample --------------------------------------------------------------------
    Case("VonMises", lambda p: dist.VonMises(p["loc"], _exp(p["log_conc"])), {"loc": 0.5, "log_conc": 0.4},
         f=cos_f, exact=lambda d, p: jnp.cos(d.loc) * i1e(d.concentration) / i0e(d.concentration)),
    Case("MixtureSameFamily(Normal)",
         lambda p: dist.MixtureSameFamily(dist.Categorical(logits=p["logits"]),
                                          dist.Normal(p["locs"], _exp(p["log_scales"]))),
         {"logits": [0.3, -0.2], "locs": [-0.5, 0.8], "log_scales": [-0.3, -0.6]}),
    # --- discrete ----------------------------------------------------------------------------------
    Case("Bernoulli(probs)", lambda p: dist.Bernoulli(probs=jax.nn.sigmoid(p["w"])), {"w": 0.4}),
    Case("Bernoulli(logits)", lambda p: dist.Bernoulli(logits=p["w"]), {"w": -0.3}),
    Case("Categorical(probs)", lambda p: dist.Categorical(probs=jax.nn.softmax(p["w"])), {"w": [0.2, -0.1, 0.5]},
         exact=_cat_exact),
    Case("Categorical(logits)", lambda p: dist.Categorical(logits=p["w"]), {"w": [0.4, 0.0, -0.3]},
         exact=_cat_exact),
    Case("Binomial", lambda p: dist.Binomial(5, jax.nn.sigmoid(p["w"])), {"w": 0.3}),
    Case("Poisson", lambda p: dist.Poisson(_exp(p["log_rate"])), {"log_rate": 0.4}),
    Case("Geometric(probs)", lambda p: dist.Geometric(probs=jax.nn.sigmoid(p["w"])), {"w": 0.5}),
    Case("Geometric(logits)", lambda p: dist.Geometric(logits=p["w"]), {"w": 0.2}),
    Case("NegativeBinomialProbs", lambda p: dist.NegativeBinomialProbs(_exp(p["log_n"]), jax.nn.sigmoid(p["w"])),
         {"log_n": 1.0, "w": -0.5}),
    Case("NegativeBinomial2", lambda p: dist.NegativeBinomial2(_exp(p["log_mean"]), _exp(p["log_conc"])),
         {"log_mean": 0.5, "log_conc": 1.0}),
    Case("BetaBinomial", lambda p: dist.BetaBinomial(_exp(p["a"]), _exp(p["b"]), 5), {"a": 0.5, "b": 0.2}),
    Case("Multinomial", lambda p: dist.Multinomial(4, probs=jax.nn.softmax(p["w"])), {"w": [0.3, -0.2, 0.1]},
         rank_promotion="allow"),
    Case("GammaPoisson", lambda p: dist.GammaPoisson(_exp(p["log_conc"]), _exp(p["log_rate"])),
         {"log_conc": 1.0, "log_rate": 0.2}),
    Case("ZeroInflatedPoisson", lambda p: dist.ZeroInflatedPoisson(jax.nn.sigmoid(p["g"]), _exp(p["log_rate"])),
         {"g": -1.0, "log_rate": 0.5}),
    # parameter-free site (integer bounds): θ enters the cost only, so the gradient is E[f(z)] itself
    Case("DiscreteUniform", lambda p: dist.DiscreteUniform(0, 4), {"w": 0.7},
         f=lambda z, p: p["w"] * moments(z, p), exact=lambda d, p: p["w"] * moments_exact(d, p)),
]


def _params(case):
    return jax.tree_util.tree_map(lambda v: jnp.asarray(v, jnp.float32), case.params,
                                  is_leaf=lambda v: isinstance(v, list))


def _model(case):
    @scg.model
    def model(params, x):
        z = scg.sample("z", case.build(params))
        scg.cost("f", case.f(z, params) * x)

    model.name = case.name
    return model


def _exact_grad(case, params):
    return jax.grad(lambda p: case.exact(case.build(p), p))(params)


def _has_rsample(case):
    return bool(case.build(_params(case)).has_rsample)


def _param_sets():
    out = []
    for case in CASES:
        for path in ("score_function", "pathwise"):
            refusal = path == "pathwise" and not _has_rsample(case)  # no compile: cheap
            marks = [pytest.mark.slow] if case.slow and not refusal else []
            out.append(pytest.param(case, path, id=f"{case.name}-{path}", marks=marks))
    return out


@pytest.mark.parametrize("case, path", _param_sets())
def test_gradient_of_expected_cost(case, path):
    with jax.numpy_rank_promotion(case.rank_promotion):
        _check_gradient(case, path)


def _check_gradient(case, path):
    params, x = _params(case), jnp.ones((), jnp.float32)
    model = _model(case)
    if path == "pathwise" and not _has_rsample(case):
        # refused, naming the site and the precondition (unnamed, the site simply stays score-function)
        with pytest.raises(scg.PreconditionError, match=r"reparameterize: site 'z': precondition "
                           r"'reparameterizable family' failed: .* has no reparameterized sampler"):
            scg.passes.reparameterize(model.trace(params, x), sites=["z"])
        return
    if path == "score_function" and case.sf:
        # refused: the support moves with θ, so the score function would be silently biased
        with pytest.raises(scg.ModelError, match=r"site 'z': the support of .* is set by its operands .* biased"):
            scg.compile(model, passes=[]).grad(params, x, key=jax.random.key(0))
        return
    objective = scg.compile(model, passes=[] if path == "score_function" else ["reparameterize"])
    certs = objective.certificates_for(params, x)
    if path == "pathwise":
        assert certs[0].rewritten == ("z",), str(certs[0])
    keys = jax.random.split(jax.random.key(20240611), N)
    draws = jax.jit(jax.vmap(objective.unjitted_grad(params, x)))(keys)
    exact = _exact_grad(case, params)
    for name in params:
        d = np.asarray(draws[name], np.float64).reshape(N, -1)
        e = np.asarray(exact[name], np.float64).reshape(-1)
        assert np.all(np.isfinite(d)), f"{case.name} {path}: non-finite gradient draws for {name}"
        mean, se = d.mean(0), d.std(0, ddof=1) / np.sqrt(N)
        ok = np.abs(mean - e) < K * se + 1e-4 * (1 + np.abs(e))
        assert np.all(ok), (f"{case.name} {path} params[{name!r}]: mean {mean}, exact {e}, se {se}, "
                            f"|z| {np.abs(mean - e) / np.where(se > 0, se, np.inf)}")


@pytest.mark.slow
def test_the_closed_forms_are_right():
    # the references themselves, checked against long Monte Carlo runs of numpyro's own sampler
    key = jax.random.key(1)
    for case in CASES:
        if case.sf and case.name == "Uniform":
            continue
        params = _params(case)
        d = case.build(params)
        with jax.numpy_rank_promotion("allow"):  # numpyro's samplers with a sample shape rely on it
            z = d.sample(key, (20000,))
        vals = np.asarray(jax.vmap(lambda zi: case.f(zi, params))(z), np.float64)
        e = float(case.exact(d, params))
        assert abs(vals.mean() - e) < K * vals.std() / np.sqrt(len(vals)) + 1e-4 * (1 + abs(e)), case.name
