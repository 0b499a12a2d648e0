"""Loops (``lax.scan``): chains of T steps in scg, NumPyro and hand-written JAX.

    python benchmarks/scan_chain.py --out benchmarks/results/scan_chain.json [--quick]

Four measurements (issue 10, item 9):

1. **Gaussian chain** (state-space model, learned Gaussian guide)::

       model  z_t ~ N(0.9 z_{t-1}, 1),  x_t ~ N(z_t, 1) observed
       guide  q(z_t | z_{t-1}, x_t) = N(a z_{t-1} + b x_t, exp(log_s))

   scg: one model, ``z ~ q`` inside ``lax.scan`` with the per-step cost
   ``log q(z) − log p(z | z_{t-1}) − log N(x_t; z, 1)``, compiled with
   ``passes="auto"`` (which integrates the KL analytically *and* reparameterizes
   z) and with ``passes=["reparameterize"]`` (sampled KL, NumPyro
   ``Trace_ELBO``'s estimator). NumPyro: ``numpyro.contrib.control_flow.scan``
   in model and guide, ``jax.value_and_grad`` of ``Trace_ELBO().loss``.
   Hand-written JAX: one ``lax.scan`` with the same reparameterized sample and
   the same per-step terms, sampled KL (``jax_sampled``, scg reparameterize's
   twin) and analytic KL (``jax_analytic``, scg auto's twin).
2. **Bernoulli chain** (discrete latents, score function)::

       model  b_t ~ Bernoulli(sigmoid(w b_{t-1} + c)),  x_t ~ N(b_t, 1) observed
       guide  q(b_t | b_{t-1}, x_t) = Bernoulli(logits u b_{t-1} + v x_t + d)

   scg naive (``passes=[]``: score function, per-step reward-to-go) and auto
   (the Bernoulli KL integrated, b stays score-function); NumPyro
   ``TraceGraph_ELBO``; hand-written REINFORCE with reward-to-go in one scan
   (sampled KL, ``jax_reinforce``; analytic KL, ``jax_reinforce_analytic``).

   Diagnostics (steady step only): the hand-written twin of scg's default
   drawing exactly scg's random numbers, with each step's key
   ``fold_in(fold_in(key, crc32(site)), t)`` derived inside the loop body as
   scg does (``*_stepkeys``), and with the same draws made before the loop by
   one ``vmap`` over t (``*_hoisted``); both reproduce scg's loss and gradient.

   For both chains and T = 10, 100, 1000, 10000: **first call** (trace +
   passes + compile + one step) in a fresh subprocess per measurement,
   alternating the systems round after round, and **steady step** (the jitted
   value-and-gradient, ``block_until_ready``, median over many calls), all
   systems alternating in one process, round after round.
3. **Unrolled chain**: a Python ``for`` loop of N Normal sites
   ``z_t ~ N(a z_{t-1}, 1)``, cost ``(z_t − x_t)²``; trace, passes ("auto") and
   lowering to a jaxpr (``jax.make_jaxpr`` of ``objective.unjitted_grad``),
   N = 25 … 2000, one subprocess each.
4. **Gradient variance** on the Bernoulli chain (T = 20, 100) over many keys
   at fixed parameters: scg naive / auto, NumPyro ``TraceGraph_ELBO`` and
   ``Trace_ELBO``, each estimator's mean checked against the exact gradient
   (scg's forward recursion through the chain) so that no low variance comes
   from a biased estimator; and the per-step Rao-Blackwellization check on
   T = 20 independent Bernoulli steps against the exact single-step bound.

Every ratio is formed within one round of an alternation (A B C A B C ...) and
summarized by its median (and min–max) over rounds: the machine is shared.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _harness  # noqa: E402

SCRIPT = os.path.basename(__file__)
TS = (10, 100, 1000, 10_000)
TS_QUICK = (10, 100, 1000)
NS = (25, 50, 100, 200, 400, 1000, 2000)
NS_QUICK = (25, 50, 100, 200)
VAR_TS = (20, 100)

GAUSS_SYSTEMS = ("scg_auto", "scg_reparam", "numpyro", "jax_analytic", "jax_sampled")
BERN_SYSTEMS = ("scg_naive", "scg_auto", "numpyro", "jax_reinforce", "jax_reinforce_analytic")
SYSTEMS = {"gauss": GAUSS_SYSTEMS, "bern": BERN_SYSTEMS}
# the hand-written twin of each system (same math); NumPyro's estimators are the sampled-KL ones
TWIN = {"gauss": {"scg_auto": "jax_analytic", "scg_reparam": "jax_sampled", "numpyro": "jax_sampled",
                  "jax_analytic": "jax_analytic", "jax_sampled": "jax_sampled"},
        "bern": {"scg_naive": "jax_reinforce", "scg_auto": "jax_reinforce_analytic", "numpyro": "jax_reinforce",
                 "jax_reinforce": "jax_reinforce", "jax_reinforce_analytic": "jax_reinforce_analytic"}}
# diagnostics, steady step only: the hand-written twin of scg's default with scg's per-step keys drawn
# inside the loop ("stepkeys") and the same draws computed before the loop ("hoisted")
DIAGNOSTICS = {"gauss": ("jax_analytic_stepkeys", "jax_analytic_hoisted"),
               "bern": ("jax_reinforce_stepkeys", "jax_reinforce_hoisted")}
SCG_DEFAULT = {"gauss": "scg_auto", "bern": "scg_naive"}
REFERENCE = {"gauss": "jax_sampled", "bern": "jax_reinforce"}  # the first-call reference (brief: "hand-written")

GAUSS_PARAMS = {"a": 0.5, "b": 0.4, "log_s": -0.5}
BERN_PARAMS = {"w": 1.0, "c": -0.3, "u": 0.5, "v": 1.0, "d": -0.5}
HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


# --------------------------------------------------------------------------- #
# Data.
# --------------------------------------------------------------------------- #


def gauss_data(T: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    z, x = 0.0, np.empty(T, np.float32)
    for t in range(T):
        z = 0.9 * z + rng.standard_normal()
        x[t] = z + rng.standard_normal()
    return x


def bern_data(T: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    b, x = 0.0, np.empty(T, np.float32)
    for t in range(T):
        b = float(rng.random() < 1.0 / (1.0 + math.exp(-(1.5 * b - 0.5))))
        x[t] = b + rng.standard_normal()
    return x


def params_of(chain: str) -> dict:
    import jax.numpy as jnp

    return {k: jnp.asarray(v, jnp.float32) for k, v in (GAUSS_PARAMS if chain == "gauss" else BERN_PARAMS).items()}


# --------------------------------------------------------------------------- #
# The models, system by system. Each builder returns ``step(params, x, key) -> (loss, grads)``,
# not yet jitted (``jax.jit`` is applied by the caller, so the first call includes it).
# --------------------------------------------------------------------------- #


def scg_gauss_model():
    import jax
    import jax.numpy as jnp
    import numpyro.distributions as dist

    import scg

    @scg.model
    def gauss_chain(params, x):
        def step(z_prev, x_t):
            q = dist.Normal(params["a"] * z_prev + params["b"] * x_t, jnp.exp(params["log_s"]))
            z = scg.sample("z", q)
            scg.cost("elbo", scg.log_prob(q, z) - scg.log_prob(dist.Normal(0.9 * z_prev, 1.0), z)
                     - scg.log_prob(dist.Normal(z, 1.0), x_t))
            return z, None

        jax.lax.scan(step, jnp.zeros(()), x)

    return gauss_chain


def scg_bern_model():
    import jax
    import jax.numpy as jnp
    import numpyro.distributions as dist

    import scg

    @scg.model
    def bern_chain(params, x):
        def step(b_prev, x_t):
            q = dist.Bernoulli(logits=params["u"] * b_prev + params["v"] * x_t + params["d"])
            b = scg.sample("b", q)
            p = dist.Bernoulli(logits=params["w"] * b_prev + params["c"])
            bf = b.astype(jnp.float32)
            scg.cost("elbo", scg.log_prob(q, b) - scg.log_prob(p, b) - scg.log_prob(dist.Normal(bf, 1.0), x_t))
            return bf, None

        jax.lax.scan(step, jnp.zeros(()), x)

    return bern_chain


def scg_step(chain: str, passes: Any):
    import scg

    objective = scg.compile(scg_gauss_model() if chain == "gauss" else scg_bern_model(), passes=passes)

    def step(params, x, key):
        return objective.value_and_grad(params, x, key=key)

    step.objective = objective
    return step


def numpyro_model_guide(chain: str):
    import jax.numpy as jnp
    import numpyro
    import numpyro.distributions as dist
    from numpyro.contrib.control_flow import scan

    if chain == "gauss":
        def model(x):
            def step(z_prev, x_t):
                z = numpyro.sample("z", dist.Normal(0.9 * z_prev, 1.0))
                numpyro.sample("x", dist.Normal(z, 1.0), obs=x_t)
                return z, None

            scan(step, jnp.zeros(()), x)

        def guide(x):
            a, b, log_s = (numpyro.param(k, GAUSS_PARAMS[k]) for k in ("a", "b", "log_s"))

            def step(z_prev, x_t):
                z = numpyro.sample("z", dist.Normal(a * z_prev + b * x_t, jnp.exp(log_s)))
                return z, None

            scan(step, jnp.zeros(()), x)
    else:
        def model(x):
            w, c = (numpyro.param(k, BERN_PARAMS[k]) for k in ("w", "c"))

            def step(b_prev, x_t):
                b = numpyro.sample("b", dist.Bernoulli(logits=w * b_prev + c))
                numpyro.sample("x", dist.Normal(b, 1.0), obs=x_t)
                return b.astype(jnp.float32), None

            scan(step, jnp.zeros(()), x)

        def guide(x):
            u, v, d = (numpyro.param(k, BERN_PARAMS[k]) for k in ("u", "v", "d"))

            def step(b_prev, x_t):
                b = numpyro.sample("b", dist.Bernoulli(logits=u * b_prev + v * x_t + d))
                return b.astype(jnp.float32), None

            scan(step, jnp.zeros(()), x)

    return model, guide


def numpyro_step(chain: str, elbo_name: str | None = None):
    import jax
    from numpyro import infer

    model, guide = numpyro_model_guide(chain)
    elbo_name = elbo_name or ("Trace_ELBO" if chain == "gauss" else "TraceGraph_ELBO")
    elbo = getattr(infer, elbo_name)()

    def step(params, x, key):
        # what SVI.update differentiates (the parameters are unconstrained reals here)
        return jax.value_and_grad(lambda p: elbo.loss(key, p, model, guide, x))(params)

    return step


def _noise(key, x, site: str, keys: str, draw):
    """The per-step random draws of a hand-written loop, as ``(xs for the scan, draw inside the body)``.

    ``keys="vector"``: one vectorized draw for all T steps before the loop (what one writes by hand);
    ``"step"``: scg's scheme, ``fold_in(fold_in(key, crc32(site)), t)`` drawn inside the loop body, step
    by step; ``"hoisted"``: the same per-step keys and draws as ``"step"``, computed vectorized (``vmap``
    over t) before the loop. ``"step"`` and ``"hoisted"`` reproduce scg's draws.
    """
    import zlib

    import jax
    import jax.numpy as jnp

    T = x.shape[0]
    if keys == "vector":
        return draw(key, (T,)), lambda n: n
    site_key = jax.random.fold_in(key, zlib.crc32(site.encode()) & 0x7FFFFFFF)
    if keys == "hoisted":
        return jax.vmap(lambda t: draw(jax.random.fold_in(site_key, t), ()))(jnp.arange(T)), lambda n: n
    return jnp.arange(T), lambda t: draw(jax.random.fold_in(site_key, t), ())


def jax_gauss_loss(params, x, key, analytic: bool, keys: str = "vector"):
    import jax
    import jax.numpy as jnp

    noise, eps_of = _noise(key, x, "z", keys, lambda k, shape: jax.random.normal(k, shape))
    log_s = params["log_s"]
    s = jnp.exp(log_s)

    def step(z_prev, inputs):
        x_t, n_t = inputs
        e = eps_of(n_t)
        m = params["a"] * z_prev + params["b"] * x_t
        z = m + s * e
        m_p = 0.9 * z_prev
        if analytic:  # KL(N(m, s) || N(m_p, 1))
            kl = 0.5 * (s * s + (m - m_p) ** 2 - 1.0) - log_s
        else:  # log q(z) − log p(z), at the reparameterized z
            kl = (-0.5 * e * e - log_s) - (-0.5 * (z - m_p) ** 2)
        nll = 0.5 * (x_t - z) ** 2 + HALF_LOG_2PI
        return z, kl + nll

    _, costs = jax.lax.scan(step, jnp.zeros(()), (x, noise))
    return jnp.sum(costs)


def jax_gauss_step(analytic: bool, keys: str = "vector"):
    import jax

    def step(params, x, key):
        return jax.value_and_grad(jax_gauss_loss)(params, x, key, analytic, keys)

    return step


def jax_bern_surrogate(params, x, key, analytic: bool, keys: str = "vector"):
    """REINFORCE with reward-to-go in one scan: Σ_t c_t + Σ_t sg(c_t)·Λ_t, Λ_t = Σ_{s≤t} log q(b_s)."""
    import jax
    import jax.numpy as jnp

    sg = jax.lax.stop_gradient
    noise, uniform_of = _noise(key, x, "b", keys, lambda k, shape: jax.random.uniform(k, shape))

    def step(carry, inputs):
        b_prev, cum_logq = carry
        x_t, n_t = inputs
        lq = params["u"] * b_prev + params["v"] * x_t + params["d"]
        lp = params["w"] * b_prev + params["c"]
        b = sg((uniform_of(n_t) < jax.nn.sigmoid(lq)).astype(jnp.float32))
        logq = b * lq - jax.nn.softplus(lq)
        if analytic:  # KL(Bern(σ(lq)) || Bern(σ(lp))) given b_{t-1}
            pq = jax.nn.sigmoid(lq)
            kl = pq * (lq - lp) + jax.nn.softplus(lp) - jax.nn.softplus(lq)
        else:
            kl = logq - (b * lp - jax.nn.softplus(lp))
        cost = kl + 0.5 * (x_t - b) ** 2 + HALF_LOG_2PI
        cum_logq = cum_logq + logq
        # the cost meets the log q of its own step and of every earlier step (through the carry), as scg's
        # per-cost DiCE exponent does (the analytic KL of step t does not depend on b_t: that term has mean 0)
        scored = cost + sg(cost) * cum_logq
        return (b, cum_logq), (cost, scored)

    _, (costs, scored) = jax.lax.scan(step, (jnp.zeros(()), jnp.zeros(())), (x, noise))
    return jnp.sum(scored), jnp.sum(costs)


def jax_bern_step(analytic: bool, keys: str = "vector"):
    import jax

    def step(params, x, key):
        (_, loss), grads = jax.value_and_grad(jax_bern_surrogate, has_aux=True)(params, x, key, analytic, keys)
        return loss, grads

    return step


def build(chain: str, system: str):
    if chain == "gauss":
        table = {"scg_auto": lambda: scg_step(chain, "auto"),
                 "scg_reparam": lambda: scg_step(chain, ["reparameterize"]),
                 "numpyro": lambda: numpyro_step(chain),
                 "jax_analytic": lambda: jax_gauss_step(True),
                 "jax_sampled": lambda: jax_gauss_step(False),
                 "jax_analytic_stepkeys": lambda: jax_gauss_step(True, "step"),
                 "jax_analytic_hoisted": lambda: jax_gauss_step(True, "hoisted")}
    else:
        table = {"scg_naive": lambda: scg_step(chain, []),
                 "scg_auto": lambda: scg_step(chain, "auto"),
                 "numpyro": lambda: numpyro_step(chain),
                 "jax_reinforce": lambda: jax_bern_step(False),
                 "jax_reinforce_analytic": lambda: jax_bern_step(True),
                 "jax_reinforce_stepkeys": lambda: jax_bern_step(False, "step"),
                 "jax_reinforce_hoisted": lambda: jax_bern_step(False, "hoisted")}
    return table[system]()


# --------------------------------------------------------------------------- #
# Workers (one subprocess each; each prints one tagged JSON line).
# --------------------------------------------------------------------------- #


def _warm_jax() -> None:
    """JAX's backend start-up (client, first dispatch), paid before any timer starts."""
    import jax
    import jax.numpy as jnp

    jax.jit(lambda a: a + 1.0)(jnp.zeros(3)).block_until_ready()
    jax.random.normal(jax.random.key(0), (2,)).block_until_ready()


def worker_first_call(chain: str, system: str, T: int) -> dict:
    """Trace + passes + XLA compile + one step, in this fresh process (nothing cached)."""
    import jax
    import jax.numpy as jnp

    import numpyro.contrib.control_flow  # noqa: F401 - every import before the timer starts
    import numpyro.infer  # noqa: F401

    import scg  # noqa: F401

    _warm_jax()
    x = jnp.asarray(gauss_data(T) if chain == "gauss" else bern_data(T))
    params, key = params_of(chain), jax.random.key(1)
    c0 = time.process_time()
    t0 = time.perf_counter()
    step = build(chain, system)
    out: dict = {}
    if hasattr(step, "objective"):  # scg: trace + passes alone (cached for the lowering below)
        step.objective.graph_and_certificates(params, x)
        out["trace_passes_s"] = time.perf_counter() - t0
    lowered = jax.jit(step).lower(params, x, key)  # tracing to a jaxpr, lowering to StableHLO
    t1 = time.perf_counter()
    compiled = lowered.compile()  # XLA
    t2 = time.perf_counter()
    loss, grads = jax.block_until_ready(compiled(params, x, key))
    t3 = time.perf_counter()
    out.update(first_call_s=t3 - t0, first_call_cpu_s=time.process_time() - c0,
               lower_s=t1 - t0,  # trace + passes + tracing the estimator + lowering to StableHLO
               xla_compile_s=t2 - t1, run_s=t3 - t2, loss=float(loss),
               grads={k: float(v) for k, v in grads.items()})
    return out


def worker_steady(chain: str, T: int, rounds: int, block_s: float) -> dict:
    """Every system jitted in this one process, timed call by call, alternating round after round."""
    import jax
    import jax.numpy as jnp

    x = jnp.asarray(gauss_data(T) if chain == "gauss" else bern_data(T))
    params = params_of(chain)
    fns = {s: jax.jit(build(chain, s)) for s in (*SYSTEMS[chain], *DIAGNOSTICS[chain])}
    # scg's Objective method called directly (entry checks in Python, then its own jit)
    objective = build(chain, SCG_DEFAULT[chain]).objective
    fns[SCG_DEFAULT[chain] + "_call"] = lambda p, x_, k: objective.value_and_grad(p, x_, key=k)
    key = jax.random.key(2)
    estimate, failed = {}, {}
    for s, fn in list(fns.items()):
        try:
            jax.block_until_ready(fn(params, x, key))  # compile
        except Exception as err:  # one system failing (e.g. NumPyro on a newer JAX) must not lose the others
            failed[s] = f"{type(err).__name__}: {str(err).strip().splitlines()[-1] if str(err).strip() else ''}"
            del fns[s]
            continue
        times = []
        for i in range(5):
            t0 = time.perf_counter()
            jax.block_until_ready(fn(params, x, jax.random.fold_in(key, i)))
            times.append(time.perf_counter() - t0)
        estimate[s] = min(times)
    calls = int(max(5, min(2000, block_s / max(estimate.values()))))
    keys = list(jax.random.split(key, calls))
    names = list(fns)
    per_round: dict = {s: [] for s in names}
    losses: dict = {s: [] for s in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]  # rotate: no system always first
        for s in order:
            fn, times, acc = fns[s], [], 0.0
            for k in keys:
                t0 = time.perf_counter()
                loss, _ = jax.block_until_ready(fn(params, x, k))
                times.append(time.perf_counter() - t0)
                acc += float(loss)
            per_round[s].append(1000.0 * statistics.median(times))
            losses[s].append(acc / len(keys))
    return {"ms_per_round": per_round, "calls_per_round": calls,
            "mean_loss": {s: statistics.fmean(v) for s, v in losses.items()}, "failed": failed}


def unrolled_model(N: int):
    import jax.numpy as jnp
    import numpyro.distributions as dist

    import scg

    @scg.model
    def unrolled_chain(params, x):
        z = jnp.zeros(())
        for t in range(N):
            z = scg.sample(f"z{t}", dist.Normal(params["a"] * z, 1.0))
            scg.cost(f"fit{t}", (z - x[t]) ** 2)

    return unrolled_chain


def jax_unrolled_loss(params, x, key):
    """The unrolled chain by hand, reparameterized (what scg's auto lowers to), with scg's per-site keys."""
    import zlib

    import jax
    import jax.numpy as jnp
    import numpyro.distributions as dist

    z, total = jnp.zeros(()), jnp.zeros(())
    for t in range(x.shape[0]):
        k = jax.random.fold_in(key, zlib.crc32(f"z{t}".encode()) & 0x7FFFFFFF)
        z = dist.Normal(params["a"] * z, 1.0).rsample(k)
        total = total + (z - x[t]) ** 2
    return total


def worker_unrolled(N: int) -> dict:
    """Trace, passes and lowering of the unrolled chain, wall and CPU seconds; then the hand-written floor."""
    import jax
    import jax.numpy as jnp

    import scg

    _warm_jax()
    x = jnp.asarray(np.random.default_rng(0).standard_normal(N), jnp.float32)
    params, key = {"a": jnp.asarray(0.7, jnp.float32)}, jax.random.key(0)
    clock = lambda: (time.perf_counter(), time.process_time())  # noqa: E731
    t0 = clock()
    graph = unrolled_model(N).trace(params, x)
    t1 = clock()
    graph, cert = scg.passes.auto(graph)
    t2 = clock()
    objective = scg.compile(graph, passes=[])
    jaxpr = jax.make_jaxpr(objective.unjitted_grad(params, x))(key)
    t3 = clock()
    # the same lowering by hand (numpyro Normal.rsample, jax.grad): JAX's own cost per site
    hand = jax.make_jaxpr(jax.grad(jax_unrolled_loss))(params, x, key)
    t4 = clock()
    out = {"N": N, "rewritten": len(cert.rewritten), "jaxpr_eqns": len(jaxpr.jaxpr.eqns),
           "graph_nodes": len(graph.nodes), "hand_jaxpr_eqns": len(hand.jaxpr.eqns)}
    for i, (name, a, b) in enumerate((("trace", t0, t1), ("passes", t1, t2), ("jaxpr", t2, t3), ("total", t0, t3),
                                      ("hand_jaxpr", t3, t4))):
        out[name + "_s"], out[name + "_cpu_s"] = b[0] - a[0], b[1] - a[1]
    return out


def exact_bern_loss(params, x):
    """``E_q[Σ_t cost_t]`` of the Bernoulli chain by the forward recursion over ``q(b_{t-1})`` (exact)."""
    import jax
    import jax.numpy as jnp

    b_prev, b = jnp.array([[0.0], [1.0]]), jnp.array([[0.0, 1.0]])

    def step(marginal, x_t):  # marginal: q(b_{t-1} = 0), q(b_{t-1} = 1)
        lq = params["u"] * b_prev + params["v"] * x_t + params["d"]
        lp = params["w"] * b_prev + params["c"]
        logq = b * lq - jax.nn.softplus(lq)  # [i, j] = log q(b_t = j | b_{t-1} = i)
        cost = logq - (b * lp - jax.nn.softplus(lp)) + 0.5 * (x_t - b) ** 2 + HALF_LOG_2PI
        joint = marginal[:, None] * jnp.exp(logq)
        return joint.sum(0), jnp.sum(joint * cost)

    _, costs = jax.lax.scan(step, jnp.array([1.0, 0.0]), x)
    return jnp.sum(costs)


def jax_bern_all_costs(params, x, key):
    """REINFORCE without Rao-Blackwellization: every step's score times the whole chain's cost."""
    import jax
    import jax.numpy as jnp

    sg = jax.lax.stop_gradient
    uniforms = jax.random.uniform(key, x.shape)

    def step(b_prev, inputs):
        x_t, u_t = inputs
        lq = params["u"] * b_prev + params["v"] * x_t + params["d"]
        lp = params["w"] * b_prev + params["c"]
        b = sg((u_t < jax.nn.sigmoid(lq)).astype(jnp.float32))
        logq = b * lq - jax.nn.softplus(lq)
        cost = logq - (b * lp - jax.nn.softplus(lp)) + 0.5 * (x_t - b) ** 2 + HALF_LOG_2PI
        return b, (cost, logq)

    _, (costs, logq) = jax.lax.scan(step, jnp.zeros(()), (x, uniforms))
    return jnp.sum(costs) + sg(jnp.sum(costs)) * jnp.sum(logq)


def _moments(grad_fn, keys, chunk: int = 2000) -> dict:
    """Per-parameter mean and variance of ``grad_fn(key)`` over ``keys`` (vmapped in chunks)."""
    import jax

    fn = jax.jit(jax.vmap(grad_fn))
    parts = [fn(keys[i:i + chunk]) for i in range(0, len(keys), chunk)]
    stacked = {k: np.concatenate([np.asarray(p[k], np.float64) for p in parts]) for k in parts[0]}
    return {k: {"mean": float(v.mean()), "var": float(v.var(ddof=1))} for k, v in stacked.items()}


def independent_model():
    import jax
    import numpyro.distributions as dist

    import scg

    @scg.model
    def independent_steps(params, x, s):
        def step(_, inputs):
            x_t, s_t = inputs
            b = scg.sample("b", dist.Bernoulli(logits=params["w"] + params["c"] * s_t))
            scg.cost("err", (b - x_t) ** 2.0)
            return None, None

        jax.lax.scan(step, None, (x, s))

    return independent_steps


def worker_variance(T: int, n_keys: int, independent_T: int) -> dict:
    import jax
    import jax.numpy as jnp

    import scg

    x = jnp.asarray(bern_data(T))
    params = params_of("bern")
    keys = jax.random.split(jax.random.key(10 + T), n_keys)
    exact = {k: float(v) for k, v in jax.grad(exact_bern_loss)(params, x).items()}
    estimators = {
        "scg_naive": scg.compile(scg_bern_model(), passes=[]).unjitted_grad(params, x),
        "scg_auto": scg.compile(scg_bern_model(), passes="auto").unjitted_grad(params, x),
        "numpyro_tracegraph": lambda k: numpyro_step("bern", "TraceGraph_ELBO")(params, x, k)[1],
        "numpyro_trace": lambda k: numpyro_step("bern", "Trace_ELBO")(params, x, k)[1],
        "jax_all_costs": lambda k: jax.grad(jax_bern_all_costs)(params, x, k),
    }
    out: dict = {"T": T, "keys": n_keys, "exact_grad": exact, "estimators": {}}
    for name, fn in estimators.items():
        m = _moments(fn, keys)
        for k, v in m.items():  # bias check: (mean − exact) / standard error
            v["z"] = (v["mean"] - exact[k]) / math.sqrt(v["var"] / n_keys) if v["var"] > 0 else float("nan")
        out["estimators"][name] = m
    if independent_T:
        out["independent"] = independent_check(independent_T, n_keys)
    return out


def independent_check(T: int, n_keys: int) -> dict:
    """T independent Bernoulli steps (nothing carried): the loop's gradient std against the exact single-step bound.

    Step t's score meets only cost t, so the loop's estimator is the sum of T
    independent single-step estimators: its variance must be the sum of their
    variances, computed here in closed form (b takes two values).
    """
    import jax
    import jax.numpy as jnp

    import scg

    rng = np.random.default_rng(3)
    x = rng.integers(0, 2, T).astype(np.float32)
    s = rng.choice([-1.0, 1.0], T).astype(np.float32)
    params = {"w": jnp.asarray(0.4, jnp.float32), "c": jnp.asarray(-0.7, jnp.float32)}
    keys = jax.random.split(jax.random.key(7), n_keys)
    loop = _moments(scg.compile(independent_model(), passes=[]).unjitted_grad(params, jnp.asarray(x),
                                                                              jnp.asarray(s)), keys)

    def all_costs(k):  # no Rao-Blackwellization: every step's score times the whole chain's cost
        b = jax.random.bernoulli(k, jax.nn.sigmoid(params["w"] + params["c"] * s)).astype(jnp.float32)
        total = jnp.sum((b - x) ** 2)

        def surrogate(p):
            logits = p["w"] + p["c"] * s
            return total * jnp.sum(b * logits - jax.nn.softplus(logits))

        return jax.grad(surrogate)(params)

    no_rb = _moments(all_costs, keys)
    # exact single-step variances: g(b) = f(b) (b − p) ∇logit, b ∈ {0, 1}
    w, c = float(params["w"]), float(params["c"])
    bound = {"w": 0.0, "c": 0.0}
    for x_t, s_t in zip(x.astype(float), s.astype(float)):
        p = 1.0 / (1.0 + math.exp(-(w + c * s_t)))
        for name, dlogit in (("w", 1.0), ("c", s_t)):
            g = {b: (b - x_t) ** 2 * (b - p) * dlogit for b in (0.0, 1.0)}
            mean = p * g[1.0] + (1 - p) * g[0.0]
            bound[name] += p * g[1.0] ** 2 + (1 - p) * g[0.0] ** 2 - mean ** 2
    return {"T": T, "keys": n_keys, "params": {"w": w, "c": c},
            "coordinates": {k: {"loop_std": math.sqrt(loop[k]["var"]), "single_step_bound_std": math.sqrt(bound[k]),
                                "ratio": math.sqrt(loop[k]["var"] / bound[k]),
                                "all_costs_std": math.sqrt(no_rb[k]["var"])} for k in bound}}


# --------------------------------------------------------------------------- #
# Driver.
# --------------------------------------------------------------------------- #


def _fit_loglog(xs, ys) -> float:
    """The slope of log y against log x (least squares): 1 for linear growth, 2 for quadratic."""
    lx, ly = np.log(np.asarray(xs, float)), np.log(np.asarray(ys, float))
    return float(np.polyfit(lx, ly, 1)[0])


def _stats(values) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def summarize(raw: dict) -> dict:
    out: dict = {"first_call": {}, "steady": {}, "unrolled": {}, "variance": {}}
    for chain in ("gauss", "bern"):
        # first call: per round, each system's seconds over the reference's (hand-written JAX, same T, same round)
        fc = raw["first_call"].get(chain, {})
        table = {}
        for T, by_system in fc.items():
            ref = by_system.get(REFERENCE[chain], [])
            row = {}
            for s, runs in by_system.items():
                ok = [r for r in runs if "error" not in r]
                if not ok:
                    row[s] = {"error": runs[0].get("error", "?")}
                    continue
                entry = {k: statistics.median(r[k] for r in ok) for k in
                         ("first_call_s", "first_call_cpu_s", "lower_s", "xla_compile_s", "run_s") if k in ok[0]}
                if "trace_passes_s" in ok[0]:
                    entry["trace_passes_s"] = statistics.median(r["trace_passes_s"] for r in ok)
                ratios = [a["first_call_s"] / b["first_call_s"] for a, b in zip(runs, ref)
                          if "error" not in a and "error" not in b]
                if ratios:
                    entry["ratio_to_reference"] = _stats(ratios)
                row[s] = entry
            table[T] = row
        out["first_call"][chain] = table
        # steady: per round, system / twin and system / reference
        st = raw["steady"].get(chain, {})
        table = {}
        for T, res in st.items():
            if "error" in res:
                table[T] = {"error": res["error"]}
                continue
            ms = res["ms_per_round"]
            row = {}
            for s, values in ms.items():
                base = s.removesuffix("_call")
                twin = TWIN[chain].get(base, TWIN[chain][SCG_DEFAULT[chain]])
                row[s] = {"ms": statistics.median(values),
                          "ratio_to_twin": _stats([a / b for a, b in zip(values, ms[twin])]), "twin": twin,
                          "ratio_to_reference": _stats([a / b for a, b in zip(values, ms[REFERENCE[chain]])]),
                          "ratio_to_stepkeys": _stats([a / b for a, b in zip(values, ms[DIAGNOSTICS[chain][0]])]),
                          "mean_loss": res["mean_loss"][s]}
            row["_calls_per_round"] = res["calls_per_round"]
            row["_rounds"] = len(next(iter(ms.values())))
            table[T] = row
        out["steady"][chain] = table
    ok = [r for r in raw["unrolled"] if "error" not in r]
    out["unrolled"]["rows"] = raw["unrolled"]
    if len(ok) >= 2:
        Ns = [r["N"] for r in ok]
        out["unrolled"]["slope_total"] = _fit_loglog(Ns, [r["total_s"] for r in ok])
        big = [r for r in ok if r["N"] >= 200]
        if len(big) >= 2:
            out["unrolled"]["slope_total_N_ge_200"] = _fit_loglog([r["N"] for r in big], [r["total_s"] for r in big])
        out["unrolled"]["slope_total_cpu"] = _fit_loglog(Ns, [r["total_cpu_s"] for r in ok])
        for k in ("trace_cpu_s", "passes_cpu_s", "jaxpr_cpu_s", "hand_jaxpr_cpu_s"):
            out["unrolled"]["slope_" + k.removesuffix("_s")] = _fit_loglog(Ns, [max(r[k], 1e-6) for r in ok])
    for res in raw["variance"]:
        if "error" in res:
            continue
        T = res["T"]
        ref = res["estimators"]["numpyro_tracegraph"]
        rows = {}
        for name, m in res["estimators"].items():
            rows[name] = {k: {**v, "var_ratio_to_numpyro_tracegraph": v["var"] / ref[k]["var"] if ref[k]["var"] else
                              float("nan")} for k, v in m.items()}
        out["variance"][T] = {"exact_grad": res["exact_grad"], "keys": res["keys"], "estimators": rows}
        if "independent" in res:
            out["independent"] = res["independent"]
    return out


def _fmt(v: float, digits: int = 3) -> str:
    if v != v:
        return "nan"
    if v == 0:
        return "0"
    if abs(v) >= 1000 or abs(v) < 1e-3:
        return f"{v:.3g}"
    return f"{v:.{digits}g}" if abs(v) < 1 else f"{v:.{digits}g}" if abs(v) < 10 else f"{v:.4g}"


def _ratio(r: dict | None) -> str:
    if not r:
        return "—"
    if r["n"] == 1:
        return f"{r['median']:.2f}"
    return f"{r['median']:.2f} ({r['min']:.2f}–{r['max']:.2f})"


NAMES = {
    "gauss": {"scg_auto": "scg `auto` (analytic KL + reparam.)",
              "scg_reparam": "scg `[\"reparameterize\"]` (sampled KL)",
              "numpyro": "NumPyro `Trace_ELBO` (sampled KL)", "jax_analytic": "hand-written JAX, analytic KL",
              "jax_sampled": "hand-written JAX, sampled KL",
              "jax_analytic_stepkeys": "hand-written, analytic KL, scg's per-step keys in the loop",
              "jax_analytic_hoisted": "hand-written, analytic KL, scg's draws made before the loop",
              "scg_auto_call": "scg `auto`, `objective.value_and_grad` called directly"},
    "bern": {"scg_naive": "scg naive (`passes=[]`)", "scg_auto": "scg `auto` (Bernoulli KL integrated)",
             "numpyro": "NumPyro `TraceGraph_ELBO`", "jax_reinforce": "hand-written REINFORCE, reward-to-go",
             "jax_reinforce_analytic": "hand-written REINFORCE, reward-to-go, analytic KL",
             "jax_reinforce_stepkeys": "hand-written REINFORCE, scg's per-step keys in the loop",
             "jax_reinforce_hoisted": "hand-written REINFORCE, scg's draws made before the loop",
             "scg_naive_call": "scg naive, `objective.value_and_grad` called directly"},
}
CHAIN_TITLE = {"gauss": "Gaussian chain", "bern": "Bernoulli chain"}


def markdown(summary: dict) -> str:
    parts = []
    for chain in ("gauss", "bern"):
        fc = summary["first_call"].get(chain, {})
        if fc:
            Ts = sorted(fc, key=int)
            parts.append(f"**{CHAIN_TITLE[chain]}, first call** (s; ratio to {NAMES[chain][REFERENCE[chain]]})\n")
            header = ["system", *[f"T = {int(T):,}" for T in Ts]]
            rows = []
            for s in SYSTEMS[chain]:
                cells = []
                for T in Ts:
                    e = fc[T].get(s, {})
                    if "error" in e:
                        cells.append("FAILED")
                    elif e:
                        cells.append(f"{e['first_call_s']:.2f} s ({_ratio(e.get('ratio_to_reference'))}); "
                                     f"CPU {e.get('first_call_cpu_s', float('nan')):.2f} s")
                    else:
                        cells.append("—")
                rows.append([NAMES[chain][s], *cells])
            parts.append(_harness.markdown_table(header, rows) + "\n")
            rows = []
            for s in SYSTEMS[chain]:
                if not s.startswith("scg"):
                    continue
                cells = []
                for T in Ts:
                    e = fc[T].get(s, {})
                    cells.append(f"{e.get('trace_passes_s', float('nan')):.2f} / {e.get('lower_s', float('nan')):.2f}"
                                 f" / {e.get('xla_compile_s', float('nan')):.2f}" if "first_call_s" in e else "—")
                rows.append([NAMES[chain][s] + ": trace+passes / +lowering / XLA (s)", *cells])
            parts.append(_harness.markdown_table(header, rows) + "\n")
        failed = {T: e["error"] for T, e in summary["steady"].get(chain, {}).items() if "error" in e}
        for T, err in failed.items():
            parts.append(f"**{CHAIN_TITLE[chain]}, steady step, T = {int(T):,}: failed** "
                         f"(`{err.strip().splitlines()[-1]}`)\n")
        st = {T: e for T, e in summary["steady"].get(chain, {}).items() if T not in failed}
        if st:
            Ts = sorted(st, key=int)
            parts.append(f"**{CHAIN_TITLE[chain]}, steady step** (ms per jitted value-and-gradient, median; "
                         "ratio to the hand-written twin of the same math, median (min–max) over rounds)\n")
            header = ["system", "twin", *[f"T = {int(T):,}" for T in Ts]]
            rows = []
            names = [s for s in next(iter(st.values())) if not s.startswith("_")]
            for s in names:
                cells = []
                for T in Ts:
                    e = st[T].get(s)
                    cells.append(f"{e['ms']:.3g} ms ({_ratio(e['ratio_to_twin'])})" if e else "—")
                rows.append([NAMES[chain].get(s, s), st[Ts[0]][s]["twin"], *cells])
            parts.append(_harness.markdown_table(header, rows) + "\n")
            rows = []
            for s in names:
                if s.startswith("scg"):
                    rows.append([NAMES[chain].get(s, s), *[_ratio(st[T][s]["ratio_to_stepkeys"]) for T in Ts]])
            parts.append(f"ratio of scg to `{DIAGNOSTICS[chain][0]}` "
                         "(hand-written with scg's per-step keys in the loop):\n")
            parts.append(_harness.markdown_table(["system", *[f"T = {int(T):,}" for T in Ts]], rows) + "\n")
            rounds = {T: (st[T]["_rounds"], st[T]["_calls_per_round"]) for T in Ts}
            parts.append("rounds × calls per round: " + ", ".join(f"T = {int(T):,}: {r} × {c}"
                                                                     for T, (r, c) in rounds.items()) + "\n")
    un = summary["unrolled"]
    if un.get("rows"):
        parts.append("**Unrolled chain: trace + passes + lowering to a jaxpr against N sites**\n")
        rows = []
        for r in un["rows"]:
            if "error" in r:
                rows.append([f"{r.get('N', '?'):,}", "FAILED: " + r["error"].splitlines()[-1][:80], *[""] * 7])
                continue
            rows.append([f"{r['N']:,}", f"{r['trace_s']:.2f} / {r['trace_cpu_s']:.2f}",
                         f"{r['passes_s']:.2f} / {r['passes_cpu_s']:.2f}",
                         f"{r['jaxpr_s']:.2f} / {r['jaxpr_cpu_s']:.2f}",
                         f"**{r['total_s']:.2f} / {r['total_cpu_s']:.2f}**",
                         f"{1000 * r['total_s'] / r['N']:.1f} / {1000 * r['total_cpu_s'] / r['N']:.1f}",
                         f"{r['hand_jaxpr_s']:.2f} / {r['hand_jaxpr_cpu_s']:.2f}",
                         f"{r['jaxpr_cpu_s'] / r['hand_jaxpr_cpu_s']:.2f}",
                         f"{r['jaxpr_eqns']:,} / {r['hand_jaxpr_eqns']:,}"])
        parts.append(_harness.markdown_table(
            ["N", "trace s", "passes s", "lowering s", "total s", "ms / site", "hand-written lowering s",
             "scg / hand lowering (CPU)", "jaxpr equations scg / hand"], rows) + "\n")
        parts.append("(wall / CPU seconds of the worker process)\n")
        slopes = ", ".join(f"{k.removeprefix('slope_')} {v:.2f}" for k, v in un.items() if k.startswith("slope"))
        parts.append(f"log-log slopes (1 = linear): {slopes}\n")
    var = summary["variance"]
    for T, res in sorted(var.items(), key=lambda kv: int(kv[0])):
        parts.append(f"**Gradient variance, Bernoulli chain T = {T}** ({res['keys']:,} keys; per parameter: "
                     "variance (its ratio to NumPyro `TraceGraph_ELBO`'s); mean, and the bias "
                     "z = (mean − exact) / SE)\n")
        params = list(res["exact_grad"])
        header = ["estimator", *params]
        rows = [["exact gradient", *[f"{res['exact_grad'][k]:.4g}" for k in params]]]
        for name, m in res["estimators"].items():
            rows.append([name, *[f"{_fmt(m[k]['var'])} (×{_fmt(m[k]['var_ratio_to_numpyro_tracegraph'])}); "
                                 f"mean {m[k]['mean']:.3g}, z {m[k]['z']:+.1f}" for k in params]])
        parts.append(_harness.markdown_table(header, rows) + "\n")
    ind = summary.get("independent")
    if ind:
        parts.append(f"**Per-step Rao-Blackwellization, T = {ind['T']} independent Bernoulli steps** "
                     f"({ind['keys']:,} keys)\n")
        rows = [[k, f"{v['loop_std']:.4f}", f"{v['single_step_bound_std']:.4f}", f"{v['ratio']:.3f}",
                 f"{v['all_costs_std']:.4f}"] for k, v in ind["coordinates"].items()]
        parts.append(_harness.markdown_table(["coordinate", "loop std", "single-step bound std (exact)",
                                              "ratio", "all costs on every score, std"], rows) + "\n")
    return "\n".join(parts)


def plot(summary: dict, prefix: str) -> list:
    paths = []
    fig = _harness.new_figure(11, 7.5)
    axes = fig.subplots(2, 2)
    styles = {"scg": ("C0", "o"), "numpyro": ("C1", "s"), "jax": ("C2", "^")}
    for col, chain in enumerate(("gauss", "bern")):
        for row, what in enumerate(("steady", "first_call")):
            ax = axes[row][col]
            data = summary[what].get(chain, {})
            if not data:
                continue
            Ts = sorted(data, key=int)
            systems = [s for s in next(iter(data.values())) if not s.startswith("_")]
            for s in systems:
                if what == "steady" and s.endswith("_call"):
                    continue
                ys = [(data[T][s]["ms"] if what == "steady" else data[T][s].get("first_call_s", float("nan")))
                      if s in data[T] else float("nan") for T in Ts]
                color, marker = styles[s.split("_")[0]]
                if s in DIAGNOSTICS[chain]:  # the keying diagnostics: their own colours, dotted
                    color, marker = ("C3", "v") if s == DIAGNOSTICS[chain][0] else ("C7", "D")
                dashed = s in DIAGNOSTICS[chain] or (s.startswith("scg") and s != SCG_DEFAULT[chain]) or (
                    s.startswith("jax") and s not in (REFERENCE[chain], TWIN[chain][SCG_DEFAULT[chain]]))
                ax.plot([int(T) for T in Ts], ys, marker=marker, color=color,
                        ls=":" if s in DIAGNOSTICS[chain] else "--" if dashed else "-",
                        alpha=0.6 if dashed else 1.0, label=NAMES[chain].get(s, s))
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("T (steps)")
            ax.set_ylabel("ms per jitted value-and-gradient (whole chain)" if what == "steady"
                          else "first call, s (trace + passes + compile + run)")
            ax.set_title(f"{CHAIN_TITLE[chain]}: {'steady step' if what == 'steady' else 'first call'}")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=6.5)
    path = prefix + "_time.png"
    fig.savefig(path)
    paths.append(path)
    rows = [r for r in summary["unrolled"].get("rows", []) if "error" not in r]
    if rows:
        fig = _harness.new_figure(6.5, 4.5)
        ax = fig.subplots()
        Ns = [r["N"] for r in rows]
        for key, label, lw in (("total_s", "total, wall", 2), ("total_cpu_s", "total, CPU", 2),
                               ("trace_cpu_s", "trace, CPU", 1), ("passes_cpu_s", "passes (auto), CPU", 1),
                               ("jaxpr_cpu_s", "lowering to a jaxpr, CPU", 1),
                               ("hand_jaxpr_cpu_s", "hand-written JAX lowering, CPU", 1)):
            ax.plot(Ns, [max(r[key], 1e-4) for r in rows], marker="o", label=label, lw=lw,
                    ls="--" if key.startswith("hand") else "-")
        ref = rows[0]["total_cpu_s"] / Ns[0]
        ax.plot(Ns, [ref * n for n in Ns], ls=":", color="gray", label="linear (through the first CPU point)")
        ax.axhline(30, color="red", lw=0.8, ls="--", label="target at N = 2000: 30 s")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("N (sites in the unrolled chain)")
        ax.set_ylabel("seconds")
        slope = summary["unrolled"].get("slope_total_cpu")
        ax.set_title(f"Unrolled chain: compile time vs N" + (f" (CPU log-log slope {slope:.2f})" if slope else ""))
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
        path = prefix + "_unrolled.png"
        fig.savefig(path)
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--worker", choices=("first_call", "steady", "unrolled", "variance"), help=argparse.SUPPRESS)
    p.add_argument("--chain", choices=("gauss", "bern"), help=argparse.SUPPRESS)
    p.add_argument("--system", help=argparse.SUPPRESS)
    p.add_argument("--T", type=int, help=argparse.SUPPRESS)
    p.add_argument("--N", type=int, help=argparse.SUPPRESS)
    p.add_argument("--independent-T", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--out", default=os.path.join(_harness.BENCH_DIR, "results", "scan_chain.json"))
    p.add_argument("--quick", action="store_true", help="smoke run: T ≤ 1000, N ≤ 200, 1 first-call round")
    p.add_argument("--T-values", type=int, nargs="+", metavar="T",
                   help="chain lengths to measure (default 10 100 1000 10000; --quick 10 100 1000)")
    p.add_argument("--rounds", type=int, help="first-call rounds (default 3; --quick 1)")
    p.add_argument("--steady-rounds", type=int, help="steady-step rounds (default 15; --quick 3)")
    p.add_argument("--block", type=float, default=0.3, help="seconds of calls per system per steady round")
    p.add_argument("--keys", type=int, help="keys for the gradient variance (default 20000; --quick 2000)")
    p.add_argument("--only", nargs="*", choices=("first_call", "steady", "unrolled", "variance"),
                   help="run only these parts (the others are kept from --out if it exists)")
    p.add_argument("--resummarize", action="store_true", help="rewrite tables and plots from --out's raw results")
    args = p.parse_args(argv)

    if args.worker:
        if args.worker == "first_call":
            res = worker_first_call(args.chain, args.system, args.T)
        elif args.worker == "steady":
            res = worker_steady(args.chain, args.T, args.steady_rounds, args.block)
        elif args.worker == "unrolled":
            res = worker_unrolled(args.N)
        else:
            res = worker_variance(args.T, args.keys, args.independent_T)
        _harness.emit(res)
        return

    prefix = os.path.splitext(args.out)[0]
    if args.resummarize:
        import json

        with open(args.out, encoding="utf-8") as f:
            payload = json.load(f)
        payload["summary"] = summarize(payload["raw"])
        _finish(payload, args.out, prefix)
        return

    Ts = tuple(args.T_values) if args.T_values else (TS_QUICK if args.quick else TS)
    Ns = NS_QUICK if args.quick else NS
    rounds = args.rounds or (1 if args.quick else 3)
    steady_rounds = args.steady_rounds or (3 if args.quick else 15)
    n_keys = args.keys or (2000 if args.quick else 20_000)
    parts = set(args.only or ("first_call", "steady", "unrolled", "variance"))
    raw: dict = {"first_call": {}, "steady": {}, "unrolled": [], "variance": []}
    if args.only and os.path.exists(args.out):
        import json

        with open(args.out, encoding="utf-8") as f:
            raw.update(json.load(f).get("raw", {}))
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    settings = {"Ts": list(Ts), "Ns": list(Ns), "first_call_rounds": rounds, "steady_rounds": steady_rounds,
                "block_s": args.block, "variance_keys": n_keys, "quick": args.quick}
    log(f"scan_chain: {settings}")

    if "first_call" in parts:
        raw["first_call"] = {c: {str(T): {s: [] for s in SYSTEMS[c]} for T in Ts} for c in ("gauss", "bern")}
        for r in range(rounds):
            for T in Ts:
                for chain in ("gauss", "bern"):
                    for s in SYSTEMS[chain]:
                        res = _harness.run_worker(SCRIPT, "first_call", ["--chain", chain, "--system", s, "--T", T],
                                                  timeout=600)
                        res["round"] = r
                        raw["first_call"][chain][str(T)][s].append(res)
                        msg = res["error"].splitlines()[-1] if "error" in res else (
                            f"{res['first_call_s']:.2f} s (lower {res['lower_s']:.2f}, XLA {res['xla_compile_s']:.2f})")
                        log(f"  first call  round {r + 1}/{rounds}  {chain:5s} T={T:<6d} {s:<24s} {msg}")
    if "steady" in parts:
        raw["steady"] = {"gauss": {}, "bern": {}}
        for T in Ts:
            for chain in ("gauss", "bern"):
                res = _harness.run_worker(SCRIPT, "steady", ["--chain", chain, "--T", T, "--steady-rounds",
                                                             steady_rounds, "--block", args.block], timeout=1800)
                raw["steady"][chain][str(T)] = res
                if "error" in res:
                    log(f"  steady {chain} T={T}: FAILED {res['error'].splitlines()[-1]}")
                else:
                    log(f"  steady {chain} T={T}: " + ", ".join(f"{s} {statistics.median(v):.3g} ms" for s, v in
                                                                 res["ms_per_round"].items())
                        + "".join(f"; {s} FAILED {why}" for s, why in res.get("failed", {}).items()))
    if "unrolled" in parts:
        raw["unrolled"] = []
        for N in Ns:
            res = _harness.run_worker(SCRIPT, "unrolled", ["--N", N], timeout=900)
            res.setdefault("N", N)
            raw["unrolled"].append(res)
            log(f"  unrolled N={N}: " + (res["error"].splitlines()[-1] if "error" in res else
                                         f"trace {res['trace_s']:.2f} s, passes {res['passes_s']:.2f} s, "
                                         f"jaxpr {res['jaxpr_s']:.2f} s, total {res['total_s']:.2f} s"))
    if "variance" in parts:
        raw["variance"] = []
        for i, T in enumerate(VAR_TS):
            res = _harness.run_worker(SCRIPT, "variance", ["--T", T, "--keys", n_keys, "--independent-T",
                                                           20 if i == 0 else 0], timeout=1800)
            raw["variance"].append(res)
            log(f"  variance T={T}: " + ("FAILED " + res["error"].splitlines()[-1] if "error" in res else "done"))

    payload = {"benchmark": "scan_chain", "settings": settings,
               "machine": _harness.machine_info(sgemm=False), "busy_at_end": _harness.busy_fraction(),
               "raw": raw}
    payload["summary"] = summarize(raw)
    _finish(payload, args.out, prefix)


def _finish(payload: dict, out: str, prefix: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    _harness.write_json(out, payload)
    text = markdown(payload["summary"])
    print("\n" + text)
    print("machine: " + _harness.describe_machine(payload["machine"]))
    for path in plot(payload["summary"], prefix):
        print("wrote " + path)
    print("wrote " + out)


if __name__ == "__main__":
    main()
