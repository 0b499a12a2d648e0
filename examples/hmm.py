"""A hidden Markov model fitted by variational inference through scg, checked against the exact likelihood.

    python examples/hmm.py            # full run (~1 min on 2 cores), writes examples/hmm.png
    python examples/hmm.py --quick    # a short run

**The model.** ``K`` hidden states, ``z_1 ~ Categorical(π)``,
``z_t | z_{t-1} ~ Categorical(A[z_{t-1}])`` and Gaussian emissions
``x_t | z_t ~ Normal(μ[z_t], σ)``. The data are ``T`` draws from a known HMM.

**What is estimated.** The evidence lower bound

    ELBO(θ, φ) = E_q[Σ_t log p_θ(z_t | z_{t-1}) + log p_θ(x_t | z_t) − log q_φ(z_t | z_{t-1}, x_t)]
               ≤ log p_θ(x)

under a structured (Markov) guide ``q_φ(z_t | z_{t-1}, x_t) = Categorical(logits = G[z_{t-1}] + w·x_t)``
(a ``(K+1) × K`` table, its last row for ``t = 1``, plus a linear map of ``x_t``). The
scg model runs one ``jax.lax.scan`` over t whose body samples ``z_t`` from the guide
with ``scg.sample`` and declares the per-step costs (the negative ELBO) with
``scg.cost``/``scg.log_prob``: ``log q(z_t) − log p(z_t | z_{t-1})`` ("kl") and
``−log p(x_t | z_t)`` ("nll"). scg minimizes ``E[Σ costs] = −ELBO`` jointly in the HMM's
parameters θ = (π, A, μ, σ) and the guide's φ = (G, w), with optax Adam:

* θ enters the costs directly: its gradient is the pathwise ``−∇θ log p``;
* φ enters through ``log q`` directly and through the discrete samples: scg's score-function
  term, where step t's score meets only the costs it can reach — its own step's and, since
  ``z_t`` is carried, every later step's — with a leave-one-out baseline across particles;
* the default pass pipeline (``passes="auto"``) recognizes ``log q(z_t) − log p(z_t | z_{t-1})``
  as a Categorical/Categorical KL whose ``p`` is not downstream of ``z_t`` and integrates it
  analytically inside the loop body (its certificate is printed).

**Exact references.** ``log p(x)`` by the forward recursion (``T·K²``, ``lax.scan`` and
``logsumexp``), and the exact ELBO of the current guide by the same kind of recursion over
the guide's marginals ``q(z_{t-1})``. Both are plotted over training: the ELBO stays below
``log p(x)`` and approaches it; what remains is the gap ``KL(q ‖ p(z | x))`` of a guide that
cannot see the future observations (the script also reports the gap of the best guide of this
family for the fitted HMM). ``scg.expectation`` would give the same exact ELBO, but it integrates
a loop by unrolling it and enumerating the joint support (at most 20 steps), so it is the
reference for T = 4 in ``scg_tests/test_examples.py``, not here.
"""
from __future__ import annotations

import argparse
import functools
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import optax
from jax.scipy.special import logsumexp

import scg

HERE = os.path.dirname(os.path.abspath(__file__))

TRUE_MEANS = (-2.0, 0.0, 2.0)
TRUE_STAY = 0.9  # the chance of keeping the state; the rest is spread evenly over the others
TRUE_SIGMA = 0.7


# --- the HMM and its data ---------------------------------------------------------------------------------
def true_params(k: int = 3) -> dict:
    """The data-generating HMM in the parameterization of :func:`init_params` (model part only)."""
    means = jnp.asarray(TRUE_MEANS[:k]) if k <= len(TRUE_MEANS) else jnp.linspace(-2.0, 2.0, k)
    off = (1.0 - TRUE_STAY) / (k - 1)
    trans = jnp.full((k, k), off) + (TRUE_STAY - off) * jnp.eye(k)
    init = jnp.full((1, k), 1.0 / k)
    return {"trans_logits": jnp.log(jnp.concatenate([trans, init])), "means": means,
            "log_sigma": jnp.log(jnp.asarray(TRUE_SIGMA))}


@functools.partial(jax.jit, static_argnames="length")
def simulate(key: jax.Array, params: dict, length: int) -> tuple[jnp.ndarray, jnp.ndarray]:
    """``(z, x)``: a path of ``length`` steps of the HMM ``params``."""
    k = params["means"].shape[0]

    def body(prev, key):
        kz, kx = jax.random.split(key)
        z = jax.random.categorical(kz, params["trans_logits"][prev])
        x = params["means"][z] + jnp.exp(params["log_sigma"]) * jax.random.normal(kx)
        return z, (z, x)

    _, (z, x) = jax.lax.scan(body, jnp.asarray(k), jax.random.split(key, length))
    return z, x


def init_params(key: jax.Array, x: jnp.ndarray, k: int) -> dict:
    """HMM parameters θ (rows ``0..K-1`` of ``trans_logits`` are ``A``, row ``K`` is ``π``) and guide φ."""
    levels = (jnp.arange(k) + 0.5) / k
    return {
        "trans_logits": jnp.zeros((k + 1, k)),  # uniform transitions and start
        "means": jnp.quantile(x, levels),  # spread over the data: the K-quantiles' midpoints
        "log_sigma": jnp.log(jnp.std(x) / k),
        "guide_table": 0.01 * jax.random.normal(key, (k + 1, k)),
        "guide_w": jnp.zeros(k),
    }


def guide_logits(params: dict, prev: jnp.ndarray, x_t: jnp.ndarray) -> jnp.ndarray:
    return params["guide_table"][prev] + params["guide_w"] * x_t


def log_emissions(params: dict, x: jnp.ndarray) -> jnp.ndarray:
    """``log p(x_t | z_t = k)`` as a ``(T, K)`` table."""
    return dist.Normal(params["means"][None, :], jnp.exp(params["log_sigma"])).log_prob(x[:, None])


# --- the variational objective, as an scg model ----------------------------------------------------------
@scg.model
def negative_elbo(params, x):
    k = params["means"].shape[0]

    def body(prev, x_t):
        q = dist.Categorical(logits=guide_logits(params, prev, x_t))
        z = scg.sample("z", q)
        prior = dist.Categorical(logits=params["trans_logits"][prev])
        scg.cost("kl", scg.log_prob(q, z) - scg.log_prob(prior, z))
        scg.cost("nll", -scg.log_prob(dist.Normal(params["means"][z], jnp.exp(params["log_sigma"])), x_t))
        return z, None

    jax.lax.scan(body, jnp.asarray(k), x)  # the carry starts at K: "no previous state"


# --- exact references: forward recursions, T·K² --------------------------------------------------------
def _tables(params: dict, x: jnp.ndarray) -> tuple:
    log_rows = jax.nn.log_softmax(params["trans_logits"], axis=-1)  # (K+1, K)
    log_emit = log_emissions(params, x)  # (T, K)
    return log_rows[:-1], log_rows[-1], log_emit


def log_marginal(params: dict, x: jnp.ndarray) -> jnp.ndarray:
    """Exact ``log p(x)`` by the forward recursion ``α_t = logsumexp(α_{t-1} + log A) + log p(x_t | ·)``."""
    log_a, log_pi, log_emit = _tables(params, x)

    def body(alpha, log_e):
        return logsumexp(alpha[:, None] + log_a, axis=0) + log_e, None

    alpha, _ = jax.lax.scan(body, log_pi + log_emit[0], log_emit[1:])
    return logsumexp(alpha)


def exact_elbo(params: dict, x: jnp.ndarray) -> jnp.ndarray:
    """The ELBO of the current guide, exactly: ``Σ_t Σ_{z_{t-1}, z_t} q(z_{t-1}) q(z_t | z_{t-1}, x_t) f_t``.

    ``f_t = log p(z_t | z_{t-1}) + log p(x_t | z_t) − log q(z_t | z_{t-1}, x_t)``; the marginals
    ``q(z_t)`` are carried forward (the first step is the row ``K``, "no previous state").
    """
    k = params["means"].shape[0]
    log_rows = jax.nn.log_softmax(params["trans_logits"], axis=-1)  # (K+1, K)
    log_emit = log_emissions(params, x)  # (T, K)
    prevs = jnp.arange(k + 1)

    def body(marginal, inputs):  # marginal: (K+1,) over the previous state, K = "none"
        x_t, log_e = inputs
        log_q = jax.nn.log_softmax(jax.vmap(lambda p: guide_logits(params, p, x_t))(prevs), axis=-1)  # (K+1, K)
        joint = marginal[:, None] * jnp.exp(log_q)
        f = log_rows + log_e[None, :] - log_q
        nxt = jnp.concatenate([jnp.sum(joint, axis=0), jnp.zeros(1)])
        return nxt, jnp.sum(joint * f)

    start = jnp.zeros(k + 1).at[k].set(1.0)
    _, terms = jax.lax.scan(body, start, (x, log_emit))
    return jnp.sum(terms)


def brute_force_log_marginal(params: dict, x: jnp.ndarray) -> jnp.ndarray:
    """``log Σ_z p(z, x)`` over all ``K^T`` paths (for tests on tiny T)."""
    k, t = params["means"].shape[0], x.shape[0]
    log_rows = jax.nn.log_softmax(params["trans_logits"], axis=-1)
    log_emit = log_emissions(params, x)
    paths = jnp.asarray(np.array(np.meshgrid(*[np.arange(k)] * t, indexing="ij")).reshape(t, -1).T)  # (K^T, T)
    prev = jnp.concatenate([jnp.full((paths.shape[0], 1), k), paths[:, :-1]], axis=1)
    log_joint = jnp.sum(log_rows[prev, paths] + log_emit[jnp.arange(t)[None, :], paths], axis=1)
    return logsumexp(log_joint)


# --- training --------------------------------------------------------------------------------------------
def train(*, steps: int, length: int, k: int, particles: int, lr: float, seed: int = 0, eval_every: int = 10,
          log_every: int = 0, passes="auto") -> dict:
    data_key, init_key, run_key = jax.random.split(jax.random.key(seed), 3)
    z_true, x = simulate(data_key, true_params(k), length)
    params = init_params(init_key, x, k)
    objective = scg.compile(negative_elbo, passes=passes, baseline="leave_one_out")
    optimizer = optax.adam(lr)
    opt_state = optimizer.init(params)

    @jax.jit
    def update(params, opt_state, i):
        key = jax.random.fold_in(run_key, i)
        loss, grads = objective.value_and_grad(params, x, key=key, num_samples=particles)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    references = jax.jit(lambda p: (exact_elbo(p, x), log_marginal(p, x)))
    history = {"step": [], "elbo": [], "log_px": [], "sampled_elbo": []}
    start = time.perf_counter()
    for i in range(steps):
        if i % eval_every == 0 or i == steps - 1:
            elbo, log_px = references(params)
            history["step"].append(i)
            history["elbo"].append(float(elbo))
            history["log_px"].append(float(log_px))
            if log_every and i % log_every == 0:
                print(f"step {i:5d}  exact ELBO {float(elbo):9.3f}  log p(x) {float(log_px):9.3f}  "
                      f"gap {float(log_px - elbo):7.3f}", flush=True)
        params, opt_state, loss = update(params, opt_state, i)
        history["sampled_elbo"].append(-float(loss))
    elbo, log_px = references(params)
    history = {name: np.asarray(v) for name, v in history.items()}
    return {"history": history, "params": params, "x": x, "z_true": z_true, "objective": objective,
            "elbo": float(elbo), "log_px": float(log_px),
            "log_px_true": float(jax.jit(log_marginal)(true_params(k), x)),
            "seconds": time.perf_counter() - start}


def best_guide_gap(params: dict, x: jnp.ndarray, steps: int = 3000, lr: float = 0.3) -> float:
    """The gap ``log p(x) − ELBO`` of the best guide of this family for the HMM ``params``, approximately.

    The HMM is held fixed and only the guide is optimized, by Adam on the *exact* ELBO (no sampling).
    What remains is the price of a guide ``q(z_t | z_{t-1}, x_t)`` that cannot see ``x_{t+1:T}``.
    """
    guide = {name: params[name] for name in ("guide_table", "guide_w")}
    optimizer = optax.adam(lr)

    def body(carry, _):
        guide, state = carry
        grads = jax.grad(lambda g: -exact_elbo({**params, **g}, x))(guide)
        updates, state = optimizer.update(grads, state, guide)
        return (optax.apply_updates(guide, updates), state), None

    (guide, _), _ = jax.jit(lambda g: jax.lax.scan(body, (g, optimizer.init(g)), None, length=steps))(guide)
    return float(log_marginal(params, x) - exact_elbo({**params, **guide}, x))


def plot(history: dict, log_px_true: float, path: str, title: str, floor: float = float("nan")) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax_gap) = plt.subplots(1, 2, figsize=(10.0, 4.0))
    sampled = history["sampled_elbo"]
    ax.plot(np.arange(len(sampled)), sampled, lw=0.5, alpha=0.35, color="C1", label="sampled ELBO (training loss)")
    ax.plot(history["step"], history["elbo"], lw=1.8, color="C1", label="ELBO (exact, forward recursion over q)")
    ax.plot(history["step"], history["log_px"], lw=1.8, color="C0", label="log p(x) (exact, forward recursion)")
    ax.axhline(log_px_true, color="k", lw=0.8, ls=":", label="log p(x) under the true HMM")
    lo = min(np.min(history["elbo"][len(history["elbo"]) // 10:]), log_px_true) - 20.0
    ax.set_ylim(lo, max(np.max(history["log_px"]), log_px_true) + 10.0)
    ax.set_xlabel("Adam step")
    ax.set_ylabel("nats")
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize=8)
    gap = history["log_px"] - history["elbo"]
    ax_gap.semilogy(history["step"], gap, color="C2", label="gap of the fitted guide")
    if np.isfinite(floor):
        ax_gap.axhline(floor, color="k", lw=0.8, ls="--", label="best guide of the family, fitted HMM")
        ax_gap.legend(loc="upper right", fontsize=8)
    ax_gap.set_xlabel("Adam step")
    ax_gap.set_ylabel("log p(x) − ELBO (nats)")
    ax_gap.set_title("gap = KL(q ‖ p(z | x)) ≥ 0")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short run (no PNG unless --out)")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--length", type=int, default=200, help="T, the length of the observed sequence")
    parser.add_argument("--states", type=int, default=3, help="K, the number of hidden states")
    parser.add_argument("--particles", type=int, default=32, help="samples of z per step (leave-one-out needs 2+)")
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="PNG path (default examples/hmm.png)")
    args = parser.parse_args(argv)
    steps = args.steps if args.steps is not None else (100 if args.quick else 4000)
    out = args.out or (None if args.quick else os.path.join(HERE, "hmm.png"))

    result = train(steps=steps, length=args.length, k=args.states, particles=args.particles, lr=args.lr,
                   seed=args.seed, eval_every=max(steps // 200, 1), log_every=max(steps // 10, 1))
    graph, certificates = result["objective"].graph_and_certificates(result["params"], result["x"])
    for certificate in certificates:
        print("\n" + str(certificate))
    history, p = result["history"], result["params"]
    floor = best_guide_gap(result["params"], result["x"]) if not args.quick else float("nan")
    if out:
        plot(history, result["log_px_true"], out, f"HMM, K = {args.states}, T = {args.length}: ELBO vs log p(x)",
             floor)

    below = bool(np.all(history["elbo"] <= history["log_px"] + 1e-3 * np.abs(history["log_px"])))
    order = np.argsort(np.asarray(p["means"]))
    trans = np.asarray(jax.nn.softmax(p["trans_logits"][:-1], axis=-1))[np.ix_(order, order)]
    print(f"\nT = {args.length}, K = {args.states}, {steps} Adam({args.lr}) steps, {args.particles} particles, "
          f"leave-one-out baseline; {result['seconds']:.1f} s")
    print(f"final exact ELBO {result['elbo']:.3f}   log p(x) {result['log_px']:.3f}   "
          f"gap {result['log_px'] - result['elbo']:.3f} nats ({(result['log_px'] - result['elbo']) / args.length:.4f} "
          f"per step)")
    if not args.quick:
        print(f"the best guide of this family for the fitted HMM (exact-gradient Adam on the guide alone) has gap "
              f"{floor:.3f} nats: the price of not seeing x_(t+1:T); the fitted guide is "
              f"{result['log_px'] - result['elbo'] - floor:.3f} nats from it")
    print(f"log p(x) under the true HMM {result['log_px_true']:.3f}; ELBO <= log p(x) at every evaluation: {below}")
    print(f"fitted means {np.round(np.asarray(p['means'])[order], 3)} (true {TRUE_MEANS[:args.states]}), "
          f"sigma {float(jnp.exp(p['log_sigma'])):.3f} (true {TRUE_SIGMA})")
    print(f"fitted transition matrix (states sorted by mean; true: {TRUE_STAY} on the diagonal):\n"
          f"{np.round(trans, 3)}")
    if out:
        print(f"wrote {out}")
    return {**result, "below": below, "best_guide_gap": floor}


if __name__ == "__main__":
    main()
