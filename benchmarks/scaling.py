"""AEVB step time against batch size and hidden width, scg against hand-written JAX.

    python benchmarks/scaling.py [--quick] [--json PATH] [--plot PNG]

Two sweeps of the AEVB of ``aevb_mnist.py`` (same workers, same math):
batch size 50 ... 2000 at hidden width 1000, and hidden width 250 ... 2000 at
batch 250 (latent 30 throughout). For each configuration, scg and jax run in
alternating processes (scg, jax, scg, jax, ...); the table gives the median
ms/step, the scg/jax ratio per round (median and min-max) and the GFLOP/s
each reaches (matmul FLOPs from ``_aevb.step_flops``).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _aevb  # noqa: E402
import _harness  # noqa: E402

BATCHES = (50, 100, 250, 500, 1000, 2000)
WIDTHS = (250, 500, 1000, 2000)
SYSTEMS = ("scg", "jax")


def configurations(quick: bool) -> list[tuple[int, int]]:
    batches = (50, 250, 1000) if quick else BATCHES
    widths = (250, 1000) if quick else WIDTHS
    configs = [(b, 1000) for b in batches] + [(250, h) for h in widths]
    return list(dict.fromkeys(configs))  # (250, 1000) once


def timed_steps(batch: int, hidden: int, budget_s: float) -> int:
    """Roughly ``budget_s`` of timed steps, at least 8 (a guess from the FLOPs at ~60 GFLOP/s)."""
    guess = _aevb.step_flops(batch, 784, hidden)["total"] / 60e9 + 0.002
    return max(8, min(60, int(budget_s / guess)))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer configurations, 1 round")
    p.add_argument("--json")
    p.add_argument("--plot")
    p.add_argument("--rounds", type=int)
    p.add_argument("--data-dir")
    a = p.parse_args(argv)
    rounds = a.rounds or (1 if a.quick else 2)
    budget = 1.0 if a.quick else 2.5
    start = time.time()
    machine = _harness.machine_info()
    print("machine:", _harness.describe_machine(machine))
    train, _, data = _aevb.load_images(a.data_dir)
    print("data:", data)
    rows, results = [], []
    with tempfile.TemporaryDirectory(prefix="scg-scaling-") as tmp:
        for batch, hidden in configurations(a.quick):
            steps = timed_steps(batch, hidden, budget)
            init, batches = _aevb.write_inputs(tmp, train, batch=batch, n_batches=10, hidden=hidden)
            args = _aevb.worker_args(init, batches, warmup=3, steps=steps)
            print(f"batch {batch}, hidden {hidden}: {steps} timed steps")
            res = _harness.alternate(SYSTEMS, rounds, lambda s, r: _aevb.run_aevb(s, args))
            flops = _aevb.step_flops(batch, 784, hidden)["total"]
            entry = {"batch": batch, "hidden": hidden, "flops": flops, "timed_steps": steps}
            for s in SYSTEMS:
                ok = _harness.ok_rounds(res[s])
                entry[s] = {"ms_per_step": _harness.median_of(ok, "ms_per_step"),
                            "ms_per_step_rounds": [r["ms_per_step"] for r in ok],
                            "compile_s": _harness.median_of(ok, "compile_s")}
                entry[s]["gflops"] = flops / entry[s]["ms_per_step"] / 1e6
            ratio = _harness.ratio_stats(res, "scg", "jax")
            entry["scg_over_jax"] = ratio
            results.append(entry)
            rows.append([batch, hidden, f"{flops / 1e9:.2f}", f"{entry['scg']['ms_per_step']:.1f}",
                         f"{entry['jax']['ms_per_step']:.1f}",
                         f"{ratio['median']:.3f} ({ratio['min']:.3f}–{ratio['max']:.3f})" if ratio else "—",
                         f"{entry['scg']['gflops']:.0f} / {entry['jax']['gflops']:.0f}"])
    print()
    print(_harness.markdown_table(["batch", "hidden", "GFLOP/step", "scg ms/step", "jax ms/step",
                                   "scg ÷ jax: median (min–max)", "GFLOP/s scg / jax"], rows))
    print(f"sgemm peak {machine['sgemm']['peak_gflops']:.0f} GFLOP/s; total {time.time() - start:.0f} s")
    if a.json:
        _harness.write_json(a.json, {"benchmark": "scaling", "rounds": rounds, "data": data,
                                     "configurations": results, "machine": machine,
                                     "seconds": time.time() - start})
    if a.plot:
        plot(results, a.plot, machine)


def plot(results: list[dict], path: str, machine: dict) -> None:
    fig = _harness.new_figure(10, 4)
    sweeps = (("batch", [r for r in results if r["hidden"] == 1000], "batch size (hidden 1000)"),
              ("hidden", [r for r in results if r["batch"] == 250], "hidden width (batch 250)"))
    for i, (key, rs, xlabel) in enumerate(sweeps):
        ax = fig.add_subplot(1, 2, i + 1)
        rs = sorted(rs, key=lambda r: r[key])
        xs = [r[key] for r in rs]
        for s, style in (("scg", "o-"), ("jax", "s--")):
            ax.plot(xs, [r[s]["ms_per_step"] for r in rs], style, label=s)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.set_xticks([], minor=True)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("ms per training step (median)")
        for r in rs:
            if r["scg_over_jax"]:
                ax.annotate(f"{r['scg_over_jax']['median']:.2f}", (r[key], r["scg"]["ms_per_step"]),
                            textcoords="offset points", xytext=(0, 8), ha="center", fontsize=7)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(title="labels: scg ÷ jax", fontsize=8, title_fontsize=8)
    fig.suptitle(f"AEVB step time, scg vs hand-written JAX ({machine['cpu_model']}, {machine['cpu_cores']} cores)",
                 fontsize=10)
    fig.savefig(path)


if __name__ == "__main__":
    main()
