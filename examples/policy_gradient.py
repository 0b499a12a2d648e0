"""Policy gradient on cart-pole, trained through scg: reward-to-go and a leave-one-out baseline, from one loop.

    python examples/policy_gradient.py            # full run (~30 s on 2 cores), writes examples/policy_gradient.png
    python examples/policy_gradient.py --quick    # a short run

**What is estimated.** The policy ``π_θ(a | s) = Bernoulli(logits = f_θ(s))`` (``f_θ`` a
4-16-1 tanh MLP on the cart-pole state, see ``examples/cartpole.py``) acts for a
fixed horizon of ``H`` steps inside one ``jax.lax.scan``; a ``done`` flag in the
carry makes every reward after the pole falls (or the cart leaves) zero, and the
state is frozen there. The model declares the cost ``-reward_t`` at each step, so
scg minimizes ``L(θ) = -E[Σ_t reward_t] = -E[episode return]``.

**How.** The action ``a_t`` is one stacked site ``scg.sample("a", ...)`` in the scan
body; it is discrete, so scg uses the score function. scg's dependency analysis
gives step t's score only the costs it can reach: the state it produces flows
into the carry, so it meets every later step's cost, and not the earlier ones —
this is the *reward-to-go* estimator

    ĝ = Σ_t ∇_θ log π_θ(a_t | s_t) · (Q_t − b_t),   Q_t = Σ_{u > t} cost_u = −(the reward to go after a_t)

(the reward of step t itself is counted before ``a_t`` acts, so it is not
downstream of ``a_t``), written nowhere in this file: it falls out of the graph.
The baseline ``b_t`` is scg's ``"leave_one_out"``: with ``num_samples = P``
episodes per update, particle k's step-t baseline is the mean ``Q_t`` of the other
``P − 1`` episodes, which does not depend on particle k's actions, so the
estimator stays unbiased. After the episode ends the policy's logits are
replaced by the constant 0, so the (cost-free) actions taken there carry no score
at all; this changes neither ``L`` nor its gradient, only removes noise.
Updates use optax Adam.

**A check.** On a 3-step episode started near failure (the pole at 11.7°,
falling), whether the pole survives depends on the first action, and the
expectation over the 2³ joint actions is exact: ``scg.check_grad`` compares the
mean of the estimator (with the same leave-one-out baseline) to ``jax.grad`` of
that exact expectation, coordinate by coordinate.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import optax

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:  # imported by path (the tests): find cartpole.py next to this file
    sys.path.insert(0, HERE)
import cartpole  # noqa: E402  (examples/cartpole.py)

import scg  # noqa: E402


def init_policy(key: jax.Array, hidden: int = 16) -> dict:
    """A 4-``hidden``-1 tanh MLP; the output layer starts at zero (a uniformly random policy)."""
    return {"w1": jax.random.normal(key, (4, hidden)) * 0.5, "b1": jnp.zeros(hidden),
            "w2": jnp.zeros(hidden), "b2": jnp.zeros(())}


def policy_logit(params: dict, state: jnp.ndarray) -> jnp.ndarray:
    """The logit of pushing right in ``state``; the state is scaled to order one first."""
    scaled = state / jnp.array([2.4, 2.0, cartpole.THETA_LIMIT, 2.0])
    h = jnp.tanh(scaled @ params["w1"] + params["b1"])
    return h @ params["w2"] + params["b2"]


def make_episode(horizon: int, random_start: bool = True) -> scg.Model:
    """The model: one episode of ``horizon`` steps with cost ``-reward_t`` per step.

    ``random_start``: the initial state is ``s0 + u`` with ``u ~ Uniform(-0.05, 0.05)^4`` (a
    site that does not depend on θ, so it has no score term); otherwise exactly ``s0``.
    """

    @scg.model
    def episode(params, s0):
        start = s0
        if random_start:
            r = cartpole.INIT_RANGE * jnp.ones(4)
            start = s0 + scg.sample("s0", dist.Uniform(-r, r))

        def body(carry, _):
            state, alive = carry  # alive = 1 until the pole falls or the cart leaves, then 0 forever
            logit = jnp.where(alive > 0, policy_logit(params, state), 0.0)
            a = scg.sample("a", dist.Bernoulli(logits=logit))
            scg.cost("neg_reward", -alive)
            moved = cartpole.step(state, a)
            state = jnp.where(alive > 0, moved, state)  # frozen once done
            alive = alive * (1.0 - cartpole.failed(state).astype(jnp.float32))
            return (state, alive), None

        jax.lax.scan(body, (start, jnp.ones(())), None, length=horizon)

    return episode


def train(*, updates: int, horizon: int, particles: int, lr: float, hidden: int = 16, seed: int = 0,
          log_every: int = 0) -> dict:
    """Trains the policy; returns the per-update returns of every particle, timings and final params."""
    init_key, run_key = jax.random.split(jax.random.key(seed))
    params = init_policy(init_key, hidden)
    s0 = jnp.zeros(4)
    episode = make_episode(horizon)
    objective = scg.compile(episode, passes=[], baseline="leave_one_out")
    # the same model without a baseline, to read each episode's return (a leave-one-out objective's .loss
    # refuses num_samples=1); the same key draws the same episodes
    returns_of = scg.compile(episode, passes=[])
    optimizer = optax.adam(lr)
    opt_state = optimizer.init(params)

    @jax.jit
    def update(params, opt_state, i):
        key = jax.random.fold_in(run_key, i)
        loss, grads = objective.value_and_grad(params, s0, key=key, num_samples=particles)
        # the returns of the very episodes behind this gradient (particle k draws from split(key, P)[k])
        returns = -jax.vmap(lambda k: returns_of.loss(params, s0, key=k))(jax.random.split(key, particles))
        updates_, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates_), opt_state, loss, returns

    returns, losses = [], []
    start = time.perf_counter()
    for i in range(updates):
        params, opt_state, loss, ret = update(params, opt_state, i)
        if i == 0:
            jax.block_until_ready(ret)
            compiled_at = time.perf_counter() - start
        returns.append(ret)
        losses.append(loss)
        if log_every and (i % log_every == 0 or i == updates - 1):
            print(f"update {i:4d}  mean return {float(jnp.mean(ret)):6.1f}  "
                  f"(min {float(jnp.min(ret)):5.1f}, max {float(jnp.max(ret)):5.1f})", flush=True)
    returns = np.asarray(jnp.stack(returns))
    return {"returns": returns, "losses": np.asarray(jnp.stack(losses)), "params": params,
            "seconds": time.perf_counter() - start, "compile_seconds": compiled_at}


def check_unbiased(num_samples: int, particles: int = 4, seed: int = 1) -> scg.GradReport:
    """check_grad on a 3-step episode started near failure, where the first action decides survival."""
    params = init_policy(jax.random.key(seed), hidden=4)
    params["w2"] = 0.3 * jax.random.normal(jax.random.key(seed + 1), (4,))  # a non-trivial policy
    s0 = jnp.array([0.0, 0.0, 0.205, 0.1])  # 11.7°, tipping further: pushing left now loses it at step 2
    return scg.check_grad(make_episode(3, random_start=False), params, s0, key=jax.random.key(seed),
                          num_samples=num_samples, passes=[], baseline="leave_one_out", particles=particles)


def plot(returns: np.ndarray, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = np.arange(len(returns))
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    lo, hi = np.percentile(returns, [10, 90], axis=1)
    ax.fill_between(steps, lo, hi, alpha=0.25, label="10-90% of the episodes in the update")
    ax.plot(steps, returns.mean(axis=1), lw=1.5, label="mean episode return")
    ax.set_xlabel("update")
    ax.set_ylabel("episode return")
    ax.set_title(title)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short run (a few updates, no PNG unless --out)")
    parser.add_argument("--updates", type=int, default=None)
    parser.add_argument("--horizon", type=int, default=None,
                        help="steps per episode (default 500, CartPole-v1's limit; --quick: 200)")
    parser.add_argument("--particles", type=int, default=16, help="episodes per update (leave-one-out needs 2+)")
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--check-samples", type=int, default=None, help="check_grad draws (0: skip)")
    parser.add_argument("--out", default=None, help="PNG path (default examples/policy_gradient.png)")
    args = parser.parse_args(argv)
    updates = args.updates if args.updates is not None else (30 if args.quick else 150)
    args.horizon = args.horizon if args.horizon is not None else (200 if args.quick else 500)
    check_samples = args.check_samples if args.check_samples is not None else (500 if args.quick else 4000)
    out = args.out or (None if args.quick else os.path.join(HERE, "policy_gradient.png"))

    result = train(updates=updates, horizon=args.horizon, particles=args.particles, lr=args.lr, seed=args.seed,
                   log_every=max(updates // 10, 1))
    returns = result["returns"]
    first, last = returns[: max(updates // 20, 1)].mean(), returns[-max(updates // 20, 1):].mean()
    if out:
        plot(returns, out, f"cart-pole, reward-to-go + leave-one-out ({args.particles} episodes/update)")

    report = None
    if check_samples:
        t0 = time.perf_counter()
        report = check_unbiased(check_samples)
        print(f"\ngradient check on a 3-step episode (exact expectation over 2^3 joint actions), "
              f"{time.perf_counter() - t0:.1f} s:")
        print(report)

    print(f"\nupdates {updates}, horizon {args.horizon}, {args.particles} episodes/update, Adam({args.lr})")
    print(f"mean return: first {max(updates // 20, 1)} updates {first:.1f}, last {max(updates // 20, 1)} "
          f"updates {last:.1f}, best update {returns.mean(axis=1).max():.1f}")
    print(f"training time {result['seconds']:.1f} s (of which compiling {result['compile_seconds']:.1f} s)")
    if report is not None:
        print(f"check_grad: {report.status}")
    if out:
        print(f"wrote {out}")
    return {"returns": returns, "first": first, "last": last, "report": report}


if __name__ == "__main__":
    main()
