"""Dispatch-bound training: a tiny model where per-step overhead, not arithmetic, is the cost.

    python benchmarks/dispatch.py [--quick] [--json PATH] [--steps 20000]

Bayesian linear regression, 100 points, 3 features, known noise (sigma 0.5)::

    w ~ N(0, I_3),   y_n ~ N(x_n . w, 0.5^2),   guide q(w) = N(loc, diag(exp(log_scale))^2)

trained for 20,000 Adam steps (lr 1e-2) on the full data set, from loc = 0,
log_scale = 0, in three systems:

* ``scg``: the model written with ``scg.sample`` / ``scg.log_prob`` (sampled KL),
  compiled with ``passes="auto"`` (analytic KL, reparameterized w);
* ``numpyro``: model + guide under ``SVI`` with ``Trace_ELBO`` (sampled KL) and,
  as ``numpyro_meanfield``, ``TraceMeanField_ELBO`` (analytic KL);
* ``jax``: the same math hand-written (the floor).

Each in two variants:

* ``loop``: one jitted step per Python call (``scg.training.make_step``;
  ``jax.jit(svi.update)``), 20,000 dispatches, losses fetched at the end
  (JAX's asynchronous dispatch is allowed to run ahead);
* ``scan``: ``--per-dispatch`` steps per call in ``lax.scan``
  (``scg.training.make_multi_step``; for NumPyro, ``jax.jit`` of the same
  ``lax.scan`` over ``svi.update`` that ``svi.run(..., progress_bar=False)``
  runs, jitted so that it is compiled once).

plus ``numpyro_run``: ``svi.run(key, 20000, progress_bar=False)`` exactly as
shipped, whose one call includes its tracing and compilation (``svi.run`` builds
a fresh ``lax.scan`` each call, so nothing is cached across calls), and, once
(not in ``--quick``), ``numpyro_run_default``: ``svi.run(key, 20000)`` with its
default ``progress_bar=True``, a Python loop over ``jit(svi.update)`` that ends
with ``jnp.stack`` of the 20,000 losses (host floats), which JAX compiles as
one 20,000-operand concatenate.

Per-step time is the steady state: the wall time after the first dispatch
(which is timed apart as compile time) divided by the steps it ran. Each run
also reports the final loss (mean of the last 1,000 steps) and how far the
learned ``loc`` is from the exact posterior mean (the model is conjugate).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _harness  # noqa: E402

N, D, NOISE, LR = 100, 3, 0.5, 1e-2
# worker name -> (system, variant); the alternated ones run every round
ALTERNATED = {
    "scg_loop": ("scg", "loop"), "numpyro_loop": ("numpyro", "loop"),
    "numpyro_meanfield_loop": ("numpyro_meanfield", "loop"), "jax_loop": ("jax", "loop"),
    "scg_scan": ("scg", "scan"), "numpyro_scan": ("numpyro", "scan"),
    "numpyro_meanfield_scan": ("numpyro_meanfield", "scan"), "jax_scan": ("jax", "scan"),
    "numpyro_run": ("numpyro", "run"),
}
# svi.run with its defaults (progress_bar=True): slow for a reason unrelated to dispatch, so run once
ONCE = {"numpyro_run_default": ("numpyro", "run_default")}
WORKERS = {**ALTERNATED, **ONCE}


def make_data(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((N, D)).astype(np.float32)
    w = np.array([1.0, -2.0, 0.5])
    y = (x @ w + NOISE * rng.standard_normal(N)).astype(np.float32)
    return x, y


def exact_posterior_mean(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The posterior mean of w (also the optimal mean-field guide's loc, the posterior being Gaussian)."""
    x, y = x.astype(np.float64), y.astype(np.float64)
    precision = np.eye(D) + x.T @ x / NOISE ** 2
    return np.linalg.solve(precision, x.T @ y / NOISE ** 2)


# --------------------------------------------------------------------------- #
# The systems: each gives (step(params, opt_state, key, i) -> (params, opt_state, loss), params, opt_state)
# or, for NumPyro, (update(svi_state) -> (svi_state, loss), svi_state).
# --------------------------------------------------------------------------- #


def _init_params() -> dict:
    import jax.numpy as jnp

    return {"loc": jnp.zeros(D, jnp.float32), "log_scale": jnp.zeros(D, jnp.float32)}


def scg_objective():
    import jax.numpy as jnp
    import numpyro.distributions as dist

    import scg

    @scg.model
    def blr(params, x, y):
        q = dist.Normal(params["loc"], jnp.exp(params["log_scale"]))
        w = scg.sample("w", q)
        scg.cost("kl", jnp.sum(scg.log_prob(q, w) - scg.log_prob(dist.Normal(0.0, 1.0), w)))
        scg.cost("nll", -jnp.sum(dist.Normal(x @ w, NOISE).log_prob(y)))

    return scg.compile(blr, passes="auto")


def jax_loss(params: dict, x, y, key):
    import jax
    import jax.numpy as jnp

    scale = jnp.exp(params["log_scale"])
    w = params["loc"] + scale * jax.random.normal(key, (D,))
    kl = 0.5 * jnp.sum(jnp.square(params["loc"]) + jnp.square(scale) - 1.0 - 2.0 * params["log_scale"])
    nll = jnp.sum(0.5 * jnp.square((y - x @ w) / NOISE) + np.log(NOISE) + 0.5 * np.log(2 * np.pi))
    return kl + nll


def numpyro_svi(mean_field: bool):
    import jax.numpy as jnp
    import numpyro
    import numpyro.distributions as dist
    import optax
    from numpyro.infer import SVI, Trace_ELBO, TraceMeanField_ELBO

    def model(x, y):
        w = numpyro.sample("w", dist.Normal(jnp.zeros(D), 1.0).to_event(1))
        with numpyro.plate("data", x.shape[0]):
            numpyro.sample("y", dist.Normal(x @ w, NOISE), obs=y)

    def guide(x, y):
        loc = numpyro.param("loc", jnp.zeros(D))
        log_scale = numpyro.param("log_scale", jnp.zeros(D))
        numpyro.sample("w", dist.Normal(loc, jnp.exp(log_scale)).to_event(1))

    return SVI(model, guide, optax.adam(LR), TraceMeanField_ELBO() if mean_field else Trace_ELBO())


def run_worker(name: str, steps: int, per_dispatch: int, seed: int) -> dict:
    import jax
    import jax.numpy as jnp
    import optax

    x_np, y_np = make_data()
    x, y = jnp.asarray(x_np), jnp.asarray(y_np)
    key = jax.random.key(seed)
    system, variant = WORKERS[name]
    out: dict[str, Any] = {"system": system, "variant": variant, "steps": steps}

    if variant.startswith("run"):  # svi.run as shipped, one call
        svi = numpyro_svi(mean_field=False)
        t0 = time.perf_counter()
        result = svi.run(key, steps, x, y, progress_bar=variant == "run_default")
        losses = np.asarray(result.losses)
        total = time.perf_counter() - t0
        out.update(total_s=total, us_per_step_incl_compile=1e6 * total / steps, dispatches=1,
                   loc=np.asarray(result.params["loc"]).tolist())
        return _finish(out, losses, x_np, y_np)

    if system.startswith("numpyro"):
        svi = numpyro_svi(mean_field=system == "numpyro_meanfield")
        state0 = svi.init(key, x, y)
        one = jax.jit(svi.update)

        def scan_fn(state):
            return jax.lax.scan(lambda s, _: svi.update(s, x, y), state, None, length=per_dispatch)

        many = jax.jit(scan_fn)
        carry = state0
        call_one = lambda c, i: one(c, x, y)  # noqa: E731
        call_many = lambda c, i: many(c)  # noqa: E731
        get_loc = lambda c: svi.get_params(c)["loc"]  # noqa: E731
    else:
        optimizer = optax.adam(LR)
        params = _init_params()
        if system == "scg":
            import scg.training

            objective = scg_objective()
            stepped = scg.training.make_step(objective, optimizer)
            stepped_many = scg.training.make_multi_step(objective, optimizer)
            no_state = scg.baselines.EmptyState()  # the objective's baseline keeps none

            def one_step(p, o, k, i, *batch):
                p, o, _, loss = stepped(p, o, no_state, k, i, *batch)
                return p, o, loss

            def multi_step(p, o, k, first, *batches):
                p, o, _, losses = stepped_many(p, o, no_state, k, first, *batches)
                return p, o, losses
        else:
            def body(p, o, k, i, xb, yb):
                loss, g = jax.value_and_grad(jax_loss)(p, xb, yb, jax.random.fold_in(k, i))
                u, o = optimizer.update(g, o, p)
                return optax.apply_updates(p, u), o, loss

            def multi(p, o, k, first, xs, ys):
                def f(c, inp):
                    i, xb, yb = inp
                    p2, o2, loss = body(*c, k, first + i, xb, yb)
                    return (p2, o2), loss

                (p, o), losses = jax.lax.scan(f, (p, o), (jnp.arange(xs.shape[0]), xs, ys))
                return p, o, losses

            one_step = jax.jit(body, donate_argnums=(0, 1))
            multi_step = jax.jit(multi, donate_argnums=(0, 1))
        xs = jnp.broadcast_to(x, (per_dispatch, *x.shape)) + 0.0  # a materialized stack of the same batch
        ys = jnp.broadcast_to(y, (per_dispatch, *y.shape)) + 0.0
        carry = (params, optimizer.init(params))

        def call_one(c, i):
            p, o, loss = one_step(c[0], c[1], key, i, x, y)
            return (p, o), loss

        def call_many(c, i):
            p, o, losses = multi_step(c[0], c[1], key, i, xs, ys)
            return (p, o), losses

        get_loc = lambda c: c[0]["loc"]  # noqa: E731

    call, per_call = (call_one, 1) if variant == "loop" else (call_many, per_dispatch)
    if steps % per_call:
        raise SystemExit(f"--steps must be a multiple of --per-dispatch ({per_dispatch})")
    losses = []
    t0 = time.perf_counter()
    carry, loss = call(carry, 0)
    jax.block_until_ready(loss)
    first = time.perf_counter() - t0
    losses.append(loss)
    t0 = time.perf_counter()
    for i in range(per_call, steps, per_call):
        carry, loss = call(carry, i)
        losses.append(loss)
    jax.block_until_ready((carry, losses[-1]))
    steady = time.perf_counter() - t0
    steady_steps = steps - per_call
    us = 1e6 * steady / steady_steps
    out.update(us_per_step=us, first_dispatch_s=first, compile_s=max(0.0, first - per_call * us * 1e-6),
               total_s=first + steady, dispatches=steps // per_call, steps_per_dispatch=per_call,
               loc=np.asarray(get_loc(carry)).tolist())
    return _finish(out, np.concatenate([np.reshape(np.asarray(v), -1) for v in losses]), x_np, y_np)


def _finish(out: dict, losses: np.ndarray, x: np.ndarray, y: np.ndarray) -> dict:
    out["final_loss"] = float(np.mean(losses[-1000:]))
    out["loc_error"] = float(np.max(np.abs(np.asarray(out["loc"]) - exact_posterior_mean(x, y))))
    return out


# --------------------------------------------------------------------------- #
# Driver.
# --------------------------------------------------------------------------- #


def describe(result: dict) -> str:
    if "us_per_step" in result:
        return f"{result['us_per_step']:8.1f} µs/step   compile {result['compile_s']:5.2f} s"
    return f"{result['us_per_step_incl_compile']:8.1f} µs/step, compile included ({result['total_s']:.2f} s in all)"


def summarize(results: dict) -> dict:
    out = {}
    for name, rounds in results.items():
        ok = _harness.ok_rounds(rounds)
        if not ok:
            out[name] = {"error": rounds[-1].get("error", "?")}
            continue
        key = "us_per_step" if "us_per_step" in ok[0] else "us_per_step_incl_compile"
        entry = {k: _harness.median_of(ok, k) for k in
                 (key, "compile_s", "total_s", "final_loss", "loc_error", "peak_rss_mb") if k in ok[0]}
        entry["us_per_step_rounds"] = [r[key] for r in ok]
        entry["steps_per_dispatch"] = ok[0].get("steps_per_dispatch", ok[0]["steps"])
        ref = "scg_" + WORKERS[name][1]
        if key == "us_per_step" and ref in results:
            entry["ratio_to_" + ref] = _harness.ratio_stats(results, name, ref, key="us_per_step")
        out[name] = entry
    return out


def table(summary: dict) -> str:
    rows = []
    for name, s in summary.items():
        if "error" in s:
            rows.append([f"`{name}`", "FAILED: " + s["error"].splitlines()[-1]] + [""] * 6)
            continue
        ratio = next((v for k, v in s.items() if k.startswith("ratio_to_")), None)
        if "us_per_step" in s:
            per_step = f"{s['us_per_step']:.1f}"
        else:
            per_step = f"{s['us_per_step_incl_compile']:.1f} (incl. compile)"
        rows.append([f"`{name}`", s["steps_per_dispatch"], per_step,
                     f"{ratio['median']:.2f} ({ratio['min']:.2f}–{ratio['max']:.2f})" if ratio else "—",
                     f"{s['compile_s']:.2f}" if "compile_s" in s else "(in total)",
                     f"{s['total_s']:.2f}", f"{s['final_loss']:.3f}", f"{s['loc_error']:.1e}"])
    return _harness.markdown_table(
        ["variant", "steps/dispatch", "µs/step (median)", "÷ scg (same variant): median (min–max)",
         "compile s", "total s for all steps", "final loss (last 1k)", "max |loc − posterior mean|"], rows)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--worker", choices=WORKERS, help=argparse.SUPPRESS)
    p.add_argument("--quick", action="store_true", help="1 round (about a minute)")
    p.add_argument("--json")
    p.add_argument("--steps", type=int, default=20_000)
    p.add_argument("--per-dispatch", type=int, default=1000, help="steps per dispatch of the scan variants")
    p.add_argument("--rounds", type=int)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if a.worker:
        _harness.emit(run_worker(a.worker, a.steps, a.per_dispatch, a.seed))
        return
    rounds = a.rounds or (1 if a.quick else 3)
    start = time.time()
    machine = _harness.machine_info(sgemm=False)
    machine["loadavg_start"] = os.getloadavg()
    print("machine:", _harness.describe_machine(machine))
    print(f"{a.steps} steps per run, {rounds} rounds, scan variants with {a.per_dispatch} steps per dispatch")
    args = ["--steps", a.steps, "--per-dispatch", a.per_dispatch, "--seed", a.seed]
    run = lambda s, r: _harness.run_worker("dispatch.py", s, args)  # noqa: E731
    results = _harness.alternate(list(ALTERNATED), rounds, run, describe=describe)
    if not a.quick:
        results.update(_harness.alternate(list(ONCE), 1, run, describe=describe))
    machine["loadavg_end"] = os.getloadavg()
    summary = summarize(results)
    print()
    print(table(summary))
    targets = {}
    for variant in ("loop", "scan"):
        r = summary.get(f"numpyro_{variant}", {}).get(f"ratio_to_scg_{variant}")
        if r:
            targets[f"scg at least as fast as numpyro ({variant})"] = {"numpyro_over_scg": r["median"],
                                                                     "met": r["median"] >= 1.0}
    for name, t in targets.items():
        print(f"target {name}: {'MET' if t['met'] else 'MISSED'} (numpyro/scg {t['numpyro_over_scg']:.2f})")
    print(f"total {time.time() - start:.0f} s")
    if a.json:
        _harness.write_json(a.json, {"benchmark": "dispatch", "config": {
            "model": "Bayesian linear regression, 100 points, 3 features, noise 0.5, Normal guide",
            "steps": a.steps, "steps_per_dispatch_scan": a.per_dispatch, "optimizer": "Adam lr 1e-2",
            "rounds": rounds}, "systems": summary, "targets": targets, "machine": machine, "raw": results,
            "seconds": time.time() - start})


if __name__ == "__main__":
    main()
