"""Epoch to quality: AEVB negative ELBO against wall-clock seconds over one epoch, every system.

    python benchmarks/epoch_quality.py [--quick] [--json PATH] [--plot PNG] [--data-dir DIR]

Each system of ``aevb_mnist.py`` trains one epoch of MNIST (240 batches of
250, one shuffled order shared by all) from the same initial weights, in its
own process, one after the other. The worker records the wall time of every
step, the first one (tracing and compilation) included, and the training loss
of each step; the plot draws each step's training negative ELBO against the
seconds since the first step began. After the epoch,
each system's final weights are scored by one common evaluator (the
hand-written JAX negative ELBO with the analytic KL, one sample per test
image, the same key for all), so the end points compare the models, not the
systems' loss code. ``--quick`` trains a quarter epoch (60 steps).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _aevb  # noqa: E402
import _harness  # noqa: E402

BATCH = 250
SMOOTH = 20


def test_neg_elbo(weights: dict, test: np.ndarray, *, batch: int = 1000, seed: int = 123) -> float:
    """The mean per-example negative ELBO of ``test`` (analytic KL, one sample), in nats."""
    import jax
    import jax.numpy as jnp

    loss = jax.jit(_aevb._jax_loss)
    params = {k: jnp.asarray(v) for k, v in weights.items()}
    n = (test.shape[0] // batch) * batch
    values = [float(loss(params, jnp.asarray(test[i:i + batch]), jax.random.fold_in(jax.random.key(seed), i)))
              for i in range(0, n, batch)]
    return float(np.mean(values))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a quarter epoch")
    p.add_argument("--json")
    p.add_argument("--plot")
    p.add_argument("--data-dir")
    p.add_argument("--systems", default=",".join(_aevb.SYSTEMS))
    a = p.parse_args(argv)
    systems = [s for s in a.systems.split(",") if s]
    start = time.time()
    machine = _harness.machine_info(sgemm=False)
    print("machine:", _harness.describe_machine(machine))
    train, test, data = _aevb.load_images(a.data_dir)
    print("data:", data)
    n_batches = train.shape[0] // BATCH // (4 if a.quick else 1)
    results = {}
    with tempfile.TemporaryDirectory(prefix="scg-epoch-") as tmp:
        init, batches = _aevb.write_inputs(tmp, train, batch=BATCH, n_batches=n_batches)
        with np.load(init) as f:
            initial = test_neg_elbo({k: f[k] for k in _aevb.LAYERS}, test)
        print(f"{n_batches} steps of batch {BATCH}; test negative ELBO at the initial weights: {initial:.2f}")

        def run(system: str, _round: int) -> dict:
            out = os.path.join(tmp, f"final_{system}.npz")
            args = _aevb.worker_args(init, batches, warmup=0, steps=n_batches - 1, save_params=out,
                                     record_times=True)
            res = _aevb.run_aevb(system, args, timeout=1800)
            if "ms_per_step" in res:
                with np.load(out) as f:
                    res["test_neg_elbo"] = test_neg_elbo({k: f[k] for k in _aevb.LAYERS}, test)
                res["seconds"] = np.cumsum([res["first_step_s"], *res["step_s"]]).tolist()
            return res

        raw = _harness.alternate(systems, 1, run)
    rows = []
    for s in systems:
        res = raw[s][0]
        if "ms_per_step" not in res:
            results[s] = {k: v for k, v in res.items() if k in ("skipped", "error")}
            rows.append([f"`{s}`", res.get("skipped") or "FAILED", "", "", ""])
            continue
        results[s] = {"seconds": res["seconds"], "losses": res["losses"], "epoch_s": res["seconds"][-1],
                      "compile_s": res["compile_s"], "ms_per_step": res["ms_per_step"],
                      "final_train_neg_elbo": float(np.mean(res["losses"][-SMOOTH:])),
                      "test_neg_elbo": res["test_neg_elbo"]}
        r = results[s]
        rows.append([f"`{s}`", f"{r['epoch_s']:.1f}", f"{r['compile_s']:.2f}",
                     f"{r['final_train_neg_elbo']:.2f}", f"{r['test_neg_elbo']:.2f}"])
    print()
    print(_harness.markdown_table(["system", "epoch wall s (incl. compile)", "compile s",
                                   f"train −ELBO (last {SMOOTH} steps)", "test −ELBO (common evaluator)"], rows))
    print(f"total {time.time() - start:.0f} s")
    if a.json:
        _harness.write_json(a.json, {"benchmark": "epoch_quality", "data": data, "steps": n_batches,
                                     "batch": BATCH, "initial_test_neg_elbo": initial, "systems": results,
                                     "machine": machine, "seconds": time.time() - start})
    if a.plot:
        plot(results, a.plot, n_batches, data)


def plot(results: dict, path: str, steps: int, data: str) -> None:
    fig = _harness.new_figure(7.5, 4.5)
    ax = fig.add_subplot()
    for i, (s, r) in enumerate(results.items()):
        if "seconds" not in r:
            continue
        ax.plot(r["seconds"], r["losses"], label=f"{s} (test {r['test_neg_elbo']:.1f})",
                lw=1.8 if s == "scg" else 1.0, color=f"C{i}", zorder=3 if s == "scg" else 2)
    ax.set_xlabel("wall-clock seconds since the first step began (compilation included; one point per step)")
    ax.set_ylabel("training negative ELBO of the step's batch, nats")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"AEVB, {steps} steps of batch {BATCH}: " + data.split(" (")[0], fontsize=9)
    fig.savefig(path)


if __name__ == "__main__":
    main()
