"""Gradient variance against cost per estimate for the sigmoid belief net on binarized MNIST.

At fixed parameters (the SBN trained briefly, see below) and one fixed batch of
training images, each estimator below draws ``--num-estimates`` independent
gradient estimates; the table reports the per-coordinate variance summed over
the recognition parameters (``E‖ĝ − E ĝ‖²`` over ``V, d``, which carry the score
terms), the same for the generative parameters, and the wall-clock time of one
jitted estimate (median of ``--repeats``). Estimators:

* ``all costs, no plate`` — :data:`scg.models.sbn.sbn_no_plate`: each example's
  score multiplies every example's costs (Certigrad's estimator);
* ``downstream costs (plates)`` — :data:`scg.models.sbn.sbn`: example ``i``'s score
  multiplies example ``i``'s costs only;
* ``+ analytic KL (auto)`` — the ``auto`` pipeline: the Bernoulli KL integrated, so
  ``h``'s score multiplies the likelihood term only;
* ``moving average`` and ``NVIL (learned)`` baselines, their state trained for
  ``--baseline-steps`` estimates at the fixed parameters (random training
  batches), then frozen;
* ``leave-one-out, K = 2, 8, 32`` — K particles per estimate;
* ``enumerate`` — exact summation over ``h``: 2^200 values per example for the
  200-unit SBN (refused: ``scg.BudgetError``), so it is shown on an 8-unit SBN
  (2^8 = 256 values per example), whose other estimators are measured too.

The fixed parameters: ``--train-steps`` Adam steps (lr 3e-3, batch 100) of the
NVIL-trained SBN from the initialization of ``scg sbn`` (seed 0); each model size
is trained separately.

Run (about 3 minutes on 2 CPU cores)::

    SCG_DATA_DIR=/work/shared/data python benchmarks/variance.py

Writes ``benchmarks/results/variance.json``, ``variance.png`` (variance against
cost, log-log) and ``variance.md`` (the table), and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(BENCH_DIR))

import scg  # noqa: E402
from scg import training  # noqa: E402
from scg.datasets import load_binarized_mnist  # noqa: E402
from scg.models import sbn  # noqa: E402

RESULTS = os.path.join(BENCH_DIR, "results")


# --------------------------------------------------------------------------- #
# Fixed parameters.
# --------------------------------------------------------------------------- #


def trained_params(train_x: np.ndarray, hidden: int, steps: int, batch_size: int, seed: int) -> dict:
    """The SBN after ``steps`` NVIL-baseline Adam steps (the initialization of ``scg sbn``)."""
    init_key, baseline_key, run_key = jax.random.split(jax.random.key(seed), 3)
    params = sbn.init_params(init_key, hidden=hidden, data_mean=train_x.mean(axis=0))
    if steps == 0:
        return params
    objective = scg.compile(sbn.sbn, baseline=sbn.nvil_baseline(baseline_key))
    batches = training.EpochBatches(train_x, batch_size, seed=seed)
    epochs = -(-steps // len(batches))

    def limited(epoch):
        for i, b in enumerate(batches(epoch)):
            if epoch * len(batches) + i < steps:
                yield b

    state = training.fit(objective, optax.adam(3e-3), params, limited, epochs=epochs, key=run_key, progress=False,
                      log=None)
    return state.params


def train_baseline_state(objective: scg.Objective, params: dict, train_x: np.ndarray, steps: int,
                         batch_size: int, key: jax.Array) -> Any:
    """A stateful baseline's state after ``steps`` estimates at fixed ``params`` on random batches."""
    rng = np.random.default_rng(0)
    state = objective.init_baseline_state(params, jnp.asarray(train_x[:batch_size]))
    update = jax.jit(lambda s, x, k: objective.grad(params, x, key=k, baseline_state=s)[1])
    for i in range(steps):
        x = jnp.asarray(train_x[rng.choice(train_x.shape[0], batch_size, replace=False)])
        state = update(state, x, jax.random.fold_in(key, i))
    return state


# --------------------------------------------------------------------------- #
# Measurements.
# --------------------------------------------------------------------------- #


def gradient_moments(grad_of_key: Callable, n: int, chunk: int, key: jax.Array) -> dict:
    """Per-coordinate mean and variance of ``n`` estimates ``grad_of_key(k)`` (sums in chunks of ``chunk``)."""
    chunk = max(1, min(chunk, n))
    n = (n // chunk) * chunk
    keys = jax.random.split(key, n + 1)
    reference = jax.jit(grad_of_key)(keys[-1])  # a shift: sums of (g − ref) lose fewer digits in float32
    keys = keys[:-1].reshape((n // chunk, chunk) + keys.shape[1:])

    @jax.jit
    def sums(keys):
        def body(carry, ks):
            d = jax.tree_util.tree_map(lambda g, r: g - r[None], jax.vmap(grad_of_key)(ks), reference)
            s1 = jax.tree_util.tree_map(lambda a, x: a + jnp.sum(x, 0), carry[0], d)
            s2 = jax.tree_util.tree_map(lambda a, x: a + jnp.sum(x * x, 0), carry[1], d)
            return (s1, s2), None

        zeros = jax.tree_util.tree_map(jnp.zeros_like, reference)
        return jax.lax.scan(body, (zeros, zeros), keys)[0]

    s1, s2 = sums(keys)
    mean_d = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64) / n, s1)
    var = jax.tree_util.tree_map(lambda a, m: np.maximum(np.asarray(a, np.float64) / n - m * m, 0.0) * n / (n - 1),
                                 s2, mean_d)
    total = lambda tree: float(sum(np.sum(v) for v in jax.tree_util.tree_leaves(tree)))
    size = lambda tree: int(sum(np.size(v) for v in jax.tree_util.tree_leaves(tree)))
    return {"n": n, "var_recognition": total(var["recognition"]), "var_generative": total(var["generative"]),
            "var_prior": total(var["prior"]), "coords_recognition": size(var["recognition"])}


def time_estimates(estimates: list, key: jax.Array, repeats: int, rounds: int = 5) -> list:
    """Median wall-clock milliseconds of one jitted estimate, for each of ``estimates``.

    Each is compiled and warmed up first; then the estimators are timed in
    alternation (``rounds`` rounds of ``repeats / rounds`` calls each), so slow
    drifts of a shared machine hit all of them alike.
    """
    fns = [jax.jit(e) for e in estimates]
    for fn in fns:
        for i in range(2):
            jax.block_until_ready(fn(jax.random.fold_in(key, i)))
    times: list = [[] for _ in fns]
    per_round = max(1, repeats // rounds)
    for r in range(rounds):
        for fn, ts in zip(fns, times):
            for i in range(per_round):
                k = jax.random.fold_in(key, 100 + r * per_round + i)
                start = time.perf_counter()
                jax.block_until_ready(fn(k))
                ts.append((time.perf_counter() - start) * 1e3)
    return [statistics.median(ts) for ts in times]


# --------------------------------------------------------------------------- #
# The estimators.
# --------------------------------------------------------------------------- #


def estimators(params: dict, x: jax.Array, train_x: np.ndarray, args: argparse.Namespace, hidden: int) -> list:
    """``(name, grad_of_key, estimate_of_key, chunk)`` per estimator at fixed ``params`` and batch ``x``.

    ``chunk``: estimates per vmapped chunk of the variance computation (0: the
    estimator is deterministic, and 20 estimates suffice).

    ``grad_of_key`` is the gradient with any baseline state frozen (for the
    variance); ``estimate_of_key`` is what a training step calls (with the state
    update of a stateful baseline), for the timing.
    """
    key = jax.random.key(args.seed + 7)
    out = []

    def stateless(name, model, passes, baseline=None, k=1):
        objective = scg.compile(model, passes=passes, baseline=baseline)
        out.append((name, objective.unjitted_grad(params, x, num_samples=k),
                    lambda kk: objective.grad(params, x, key=kk, num_samples=k), max(1, args.chunk // k)))

    def stateful(name, passes, baseline):
        objective = scg.compile(sbn.sbn, passes=passes, baseline=baseline)
        state = train_baseline_state(objective, params, train_x, args.baseline_steps, args.batch_size, key)
        out.append((name, objective.unjitted_grad(params, x, baseline_state=state),
                    lambda kk: objective.grad(params, x, key=kk, baseline_state=state), args.chunk))

    nvil = lambda: sbn.nvil_baseline(jax.random.key(args.seed + 1))
    stateless("all costs, no plate (Certigrad)", sbn.sbn_no_plate, "none")
    stateless("downstream costs (plates)", sbn.sbn, "none")
    stateless("plates + analytic KL (auto)", sbn.sbn, "auto")
    stateful("moving average", "none", "moving_average")
    stateful("NVIL (learned)", "none", nvil())
    stateful("NVIL (learned) + analytic KL", "auto", nvil())
    for k in args.loo_k:
        stateless(f"leave-one-out, K={k}", sbn.sbn, "none", "leave_one_out", k)
    if 2 ** hidden <= 4096:
        # scg.passes.enumerate sums over the joint support of the site's elements, the batch
        # included (2^(hidden·batch) values); one graph per example keeps it at 2^hidden
        objective = scg.compile(sbn.sbn, passes=["enumerate"])
        per_example = lambda kk: jax.tree_util.tree_map(
            lambda g: jnp.mean(g, 0), jax.vmap(lambda xi: objective.grad(params, xi[None], key=kk))(x))
        out.append((f"enumerate (2^{hidden} values per example)", per_example, per_example, 0))
    return out


def enumerate_refusal(params: dict, x: jax.Array) -> str:
    try:
        scg.passes.enumerate(sbn.sbn.trace(params, x))
    except scg.BudgetError as err:
        return str(err)
    return "(accepted)"


# --------------------------------------------------------------------------- #
# Output.
# --------------------------------------------------------------------------- #


def table(rows: list) -> str:
    lines = ["| model | estimator | Var, recognition (sum) | Var, generative (sum) | ms / estimate | Var × ms |",
             "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        exact = is_exact(r, rows)
        var = lambda v: f"0 (rounding: {v:.0e})" if exact else f"{v:.4g}"
        product = "0" if exact else f"{r['var_recognition'] * r['ms']:.3g}"
        lines.append(f"| {r['model']} | {r['estimator']} | {var(r['var_recognition'])} | {var(r['var_generative'])} "
                     f"| {r['ms']:.2f} | {product} |")
    return "\n".join(lines)


def is_exact(row: dict, rows: list) -> bool:
    """A variance at float-rounding level (enumeration): below 1e-12 of the largest one."""
    return row["var_recognition"] <= 1e-12 * max(r["var_recognition"] for r in rows)


def plot(rows: list, path: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(9.5, 6.0), dpi=110, layout="constrained")
    FigureCanvasAgg(figure)
    ax = figure.subplots()
    noisy = [r["var_recognition"] for r in rows if not is_exact(r, rows)]
    floor = min(noisy) / 20
    names = list(dict.fromkeys(r["estimator"] for r in rows))
    colors = {n: f"C{i % 10}" for i, n in enumerate(names)}
    for model, marker in (("SBN-200", "o"), ("SBN-8", "s")):
        mine = [r for r in rows if r["model"] == model]
        for r in mine:
            exact = is_exact(r, rows)
            y = floor if exact else r["var_recognition"]
            ax.scatter([r["ms"]], [y], marker="v" if exact else marker, s=60, color=colors[r["estimator"]],
                       edgecolors="black" if model == "SBN-8" else "none", zorder=3)
            if exact:
                ax.annotate(f"{model}: variance 0 (exact sum;\nfloat rounding {r['var_recognition']:.0e})",
                            (r["ms"], y), fontsize=8, xytext=(-150, 8), textcoords="offset points")
        loo = sorted((r for r in mine if r["estimator"].startswith("leave-one-out")), key=lambda r: r["ms"])
        ax.plot([r["ms"] for r in loo], [r["var_recognition"] for r in loo], color="grey", lw=0.8, zorder=2)
        ax.annotate(model, (mine[0]["ms"], mine[0]["var_recognition"]), fontsize=9, xytext=(8, -3),
                    textcoords="offset points")
    for n in names:
        ax.scatter([], [], marker="o", color=colors[n], label=n)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("wall-clock ms per gradient estimate (jitted, median; batch of 100)")
    ax.set_ylabel("Σ per-coordinate variance, recognition parameters")
    ax.set_title("SBN on binarized MNIST: gradient variance vs cost per estimate\n"
                 "(●: 200 hidden units, ■ outlined: 8 hidden units; grey line: leave-one-out K = 2, 8, 32)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    with open(path, "wb") as f:
        figure.savefig(f, format="png")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", default=None, help="folder holding binarized_mnist/ (default $SCG_DATA_DIR)")
    parser.add_argument("--hidden", type=int, nargs="+", default=[200, 8], help="model sizes (default 200 8)")
    parser.add_argument("--train-steps", type=int, default=1000, help="Adam steps to the fixed parameters")
    parser.add_argument("--baseline-steps", type=int, default=1000, help="estimates that train a stateful baseline")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--num-estimates", type=int, default=500, help="estimates per variance (default 500)")
    parser.add_argument("--repeats", type=int, default=30,
                        help="timed estimates per estimator, in 5 alternating rounds (default 30)")
    parser.add_argument("--loo-k", type=int, nargs="+", default=[2, 8, 32])
    parser.add_argument("--chunk", type=int, default=50, help="estimates per vmapped chunk (divided by K)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=os.path.join(RESULTS, "variance"), help="output prefix (.json .png .md)")
    parser.add_argument("--replot", action="store_true", help="only redraw the PNG and table from the JSON")
    args = parser.parse_args(argv)
    if args.replot:
        with open(args.out + ".json") as f:
            rows = json.load(f)["rows"]
        plot(rows, args.out + ".png")
        with open(args.out + ".md", "w") as f:
            f.write(table(rows) + "\n")
        print(table(rows))
        return 0

    train_x, _, _ = load_binarized_mnist(args.data_dir)
    x = jnp.asarray(train_x[np.random.default_rng(args.seed).choice(train_x.shape[0], args.batch_size, False)])
    rows, notes = [], {}
    for hidden in args.hidden:
        model = f"SBN-{hidden}"
        start = time.perf_counter()
        params = trained_params(train_x, hidden, args.train_steps, args.batch_size, args.seed)
        neg_elbo = training.evaluate_loss(scg.compile(sbn.sbn), params, train_x[:5000], key=jax.random.key(1),
                                       batch_size=500)
        print(f"{model}: trained {args.train_steps} steps in {time.perf_counter() - start:.0f} s; "
              f"-ELBO on 5,000 training images {neg_elbo:.2f}", flush=True)
        notes[model] = {"train_neg_elbo": neg_elbo}
        if 2 ** hidden > 4096:
            notes[model]["enumerate"] = enumerate_refusal(params, x[:1])
            print(f"  enumerate: {notes[model]['enumerate'][:160]}...", flush=True)
        found = estimators(params, x, train_x, args, hidden)
        model_rows = []
        for name, grad_of_key, _, chunk in found:
            t0 = time.perf_counter()
            # chunk 0: a deterministic estimator (enumeration); 20 estimates show its variance is 0
            n = args.num_estimates if chunk else min(args.num_estimates, 20)
            moments = gradient_moments(grad_of_key, n, max(chunk, 1), jax.random.key(args.seed + 3))
            model_rows.append({"model": model, "estimator": name, **moments})
            print(f"  {name:<40} var(recognition) {moments['var_recognition']:.4g}  var(generative) "
                  f"{moments['var_generative']:.4g}  ({time.perf_counter() - t0:.0f} s)", flush=True)
        costs = time_estimates([e for _, _, e, _ in found], jax.random.key(args.seed + 5), args.repeats)
        for row, ms in zip(model_rows, costs):
            row["ms"] = ms
            print(f"  {row['estimator']:<40} {ms:.2f} ms/estimate", flush=True)
        rows += model_rows
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    result = {"rows": rows, "notes": notes, "settings": vars(args), "machine": {
        "platform": platform.platform(), "cpus": os.cpu_count(), "jax": jax.__version__,
        "devices": [str(d) for d in jax.devices()], "loadavg_1min_at_end": os.getloadavg()[0]}}
    with open(args.out + ".json", "w") as f:
        json.dump(result, f, indent=1)
    text = table(rows)
    with open(args.out + ".md", "w") as f:
        f.write(text + "\n")
    plot(rows, args.out + ".png")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
