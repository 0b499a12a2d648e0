"""Data parallelism: step time and agreement on 1, 2 and 4 devices, and the scaling model on paper.

    python benchmarks/scaling_devices.py [--quick] [--json PATH] [--devices 1 2 4] [--model-only]

Measured: the training step of ``scg.training.make_step(..., mesh=)`` for the AEVB (784-1000-1000-30,
batch 200) and the SBN (784-200 with NVIL's baseline, batch 100), each device count in its own
worker process (``jax_num_cpu_devices``), alternating 1 2 4 1 2 4 ... The steps see the same
initial parameters, key and batches, so their losses must agree up to the order of floating-point
sums: the table reports the largest relative difference of the per-step losses from the 1-device
run. On a CPU the forced devices share the cores, so the ratios measure the overhead of the
partitioned program (collectives, smaller matmuls), not a speed-up.

On paper (``scaling_model``): the per-step all-reduce volume of each model, its FLOPs per step, and
the predicted data-parallel efficiency on 8, 64 and 512 accelerators at NVLink, InfiniBand and
Ethernet bandwidths (see benchmarks/README.md, "Scaling out").
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _aevb  # noqa: E402
import _harness  # noqa: E402

MODELS = {"aevb": {"batch": 200}, "sbn": {"batch": 100}}
DEVICES = (1, 2, 4)

# --------------------------------------------------------------------------- #
# The scaling model.
# --------------------------------------------------------------------------- #

# interconnects: (name, bandwidth in bytes/s per device, per-hop latency in s)
INTERCONNECTS = (("NVLink", 300e9, 3e-6), ("InfiniBand 400G", 50e9, 5e-6), ("InfiniBand 200G", 25e9, 5e-6),
                 ("Ethernet 100G", 12e9, 20e-6))
ACCELERATORS = (8, 64, 512)
ACHIEVED_FLOPS = 20e12  # float32/TF32 matmuls of this size on an A100/H100-class accelerator (assumed)
BYTES = 4  # float32 gradients


def model_sizes() -> dict:
    """Parameters (all-reduced each step) and matmul FLOPs per example of one training step."""
    x, h, z = 784, 1000, 30
    aevb_params = sum(a * b for a, b in _aevb.layer_shapes(x, h, z).values())  # no biases (Certigrad)
    aevb_flops = _aevb.step_flops(1, x, h, z)["total"]
    s = 200
    sbn_matmul = x * s + s * x  # recognition (x V) and likelihood (h W)
    sbn_params = sbn_matmul + s + s + x  # + recognition bias, prior logits, likelihood bias
    nvil_matmul = x * 100 + 100  # NVIL's baseline MLP 784-100-1
    nvil_params = nvil_matmul + 100 + 1
    # forward 2/weight, weight gradient 2/weight, input gradient 2/weight except where the input is x
    sbn_flops = 2 * sbn_matmul * 3 - 2 * x * s + 2 * nvil_matmul * 3 - 2 * x * 100
    return {
        "aevb": {"layers": "784-1000-1000-30", "params": aevb_params, "flops_per_example": aevb_flops,
                 "batch": 250},
        "sbn": {"layers": "784-200 + NVIL 784-100-1", "params": sbn_params + nvil_params,
                "flops_per_example": sbn_flops, "batch": 100},
    }


def allreduce_s(n: int, nbytes: float, bandwidth: float, latency: float) -> float:
    """Ring all-reduce: 2(n-1)/n of the bytes through each link, plus 2 log2(n) latencies (the tree
    or hierarchical schedule NCCL uses at scale; a flat ring would pay 2(n-1))."""
    if n == 1:
        return 0.0
    return 2 * (n - 1) / n * nbytes / bandwidth + 2 * math.log2(n) * latency


def scaling_model() -> dict:
    sizes = model_sizes()
    out = {"assumptions": {"achieved_flops": ACHIEVED_FLOPS, "bytes_per_gradient": BYTES,
                           "interconnects": [{"name": n, "bytes_per_s": b, "latency_s": l}
                                             for n, b, l in INTERCONNECTS]}, "models": {}}
    for name, m in sizes.items():
        nbytes = m["params"] * BYTES
        per_example_s = m["flops_per_example"] / ACHIEVED_FLOPS
        rows = []
        for ic, bw, lat in INTERCONNECTS:
            for n in ACCELERATORS:
                comm = allreduce_s(n, nbytes, bw, lat)
                row = {"interconnect": ic, "n": n, "allreduce_ms": 1e3 * comm}
                for label, b in (("weak", m["batch"]), ("strong", m["batch"] / n)):
                    compute = b * per_example_s
                    row[f"{label}_per_device_batch"] = b
                    row[f"{label}_compute_ms"] = 1e3 * compute
                    row[f"{label}_efficiency"] = compute / (compute + comm) if b >= 1 else None
                # the per-device batch at which compute equals communication (efficiency 1/2)
                row["break_even_batch"] = comm / per_example_s
                rows.append(row)
        out["models"][name] = {**m, "allreduce_bytes": nbytes,
                               "step_gflop_at_batch": m["flops_per_example"] * m["batch"] / 1e9, "rows": rows}
    return out


def print_model(model: dict) -> None:
    print(f"\nScaling model (achieved {ACHIEVED_FLOPS / 1e12:.0f} TFLOP/s per accelerator, float32 gradients, "
          "no overlap of communication with compute)")
    for name, m in model["models"].items():
        print(f"\n{name} {m['layers']}: {m['params']:,} parameters -> {m['allreduce_bytes'] / 1e6:.2f} MB all-reduced "
              f"per step; {m['flops_per_example'] / 1e6:.2f} MFLOP per example, "
              f"{m['step_gflop_at_batch']:.3f} GFLOP per step at batch {m['batch']}")
        print("| interconnect | accelerators | all-reduce ms | weak: efficiency at "
              f"{m['batch']}/device | strong: global batch {m['batch']}, efficiency | break-even batch/device |")
        print("|---|---:|---:|---:|---:|---:|")
        for r in m["rows"]:
            strong = "—" if r["strong_efficiency"] is None else f"{100 * r['strong_efficiency']:.0f}%"
            print(f"| {r['interconnect']} | {r['n']} | {r['allreduce_ms']:.3f} | {100 * r['weak_efficiency']:.0f}% | "
                  f"{strong} | {r['break_even_batch']:.0f} |")


# --------------------------------------------------------------------------- #
# Worker: one device count, one model.
# --------------------------------------------------------------------------- #


def worker(argv: list[str]) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--worker", type=int, required=True)  # devices
    p.add_argument("--model", choices=tuple(MODELS), required=True)
    p.add_argument("--batch", type=int, required=True)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--data-dir")
    a = p.parse_args(argv)
    import jax

    jax.config.update("jax_num_cpu_devices", a.worker)
    import numpy as np
    import optax

    import scg
    from scg import training
    from scg.models import aevb, sbn
    from scg.training import devices

    train, _, data = _aevb.load_images(a.data_dir)
    n = a.warmup + a.steps + 1
    images = np.asarray(train[: n * a.batch], np.float32)
    if a.model == "aevb":
        params = aevb.init_params(jax.random.key(0))
        objective = scg.compile(aevb.aevb)
        baseline_state = scg.baselines.EmptyState()
    else:
        images = (images > 0.5).astype(np.float32)
        params = sbn.init_params(jax.random.key(0), data_mean=images.mean(axis=0))
        objective = scg.compile(sbn.sbn, baseline=sbn.nvil_baseline(jax.random.key(1)))
        baseline_state = objective.init_baseline_state(params, images[: a.batch])
    optimizer = optax.adam(1e-3)
    mesh = None if a.worker == 1 else devices.data_mesh()
    step_fn = training.make_step(objective, optimizer, mesh=mesh)
    state = training.init_state(params, optimizer, jax.random.key(2), baseline_state=baseline_state)
    carried = (state.params, state.opt_state, state.baseline_state)
    key = state.key
    if mesh is not None:
        carried, key = devices.put_replicated(carried, mesh), devices.put_replicated(key, mesh)
    batches = [images[i * a.batch:(i + 1) * a.batch] for i in range(n)]

    def step(i: int) -> float:
        nonlocal carried
        batch = (devices.put_batch([batches[i]], mesh, a.batch) if mesh is not None
                 else (jax.numpy.asarray(batches[i]),))
        *carried, loss = step_fn(*carried, key, np.int32(i), *batch)
        return float(np.asarray(loss if loss.is_fully_addressable else loss.addressable_data(0)))

    times = _harness.time_steps(step, warmup=a.warmup, steps=a.steps)
    _harness.emit({**times.summary(), "devices": a.worker, "model": a.model, "batch": a.batch, "data": data})


# --------------------------------------------------------------------------- #
# Driver.
# --------------------------------------------------------------------------- #


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="1 round, fewer steps")
    p.add_argument("--rounds", type=int)
    p.add_argument("--devices", type=int, nargs="+", default=list(DEVICES))
    p.add_argument("--models", nargs="+", choices=tuple(MODELS), default=list(MODELS))
    p.add_argument("--model-only", action="store_true", help="print the scaling model only")
    p.add_argument("--json")
    p.add_argument("--data-dir")
    a = p.parse_args(argv)
    model = scaling_model()
    print_model(model)
    if a.model_only:
        return
    rounds = a.rounds or (1 if a.quick else 3)
    steps, warmup = (8, 2) if a.quick else (20, 3)
    start = time.time()
    machine = _harness.machine_info()
    print("\nmachine:", _harness.describe_machine(machine))
    out: dict = {"machine": machine, "scaling_model": model, "measured": {}}
    for name in a.models:
        batch = MODELS[name]["batch"]
        systems = [str(d) for d in a.devices]
        extra = ["--model", name, "--batch", batch, "--steps", steps, "--warmup", warmup]
        if a.data_dir:
            extra += ["--data-dir", a.data_dir]
        print(f"\n{name}, batch {batch}: devices {' '.join(systems)} alternating, {rounds} rounds")
        results = _harness.alternate(systems, rounds, lambda s, r: _harness.run_worker(
            "scaling_devices.py", s, extra, timeout=1200))
        reference = systems[0]
        table = []
        for s in systems:
            ok = _harness.ok_rounds(results[s])
            ratio = _harness.ratio_stats(results, s, reference)
            diffs = [max(abs(x - y) / max(1.0, abs(y)) for x, y in zip(r["losses"], ref["losses"]))
                     for r, ref in zip(results[s], results[reference]) if "losses" in r and "losses" in ref]
            table.append({"devices": int(s), "ms_per_step": _harness.median_of(ok, "ms_per_step"),
                          "compile_s": _harness.median_of(ok, "compile_s"), "ratio": ratio,
                          "max_rel_loss_diff": max(diffs) if diffs else None})
        out["measured"][name] = {"batch": batch, "rounds": results, "table": table}
        print(f"| devices | ms/step (median) | ratio to {reference} device (min–max) | compile s | "
              "max rel. loss difference |")
        print("|---:|---:|---:|---:|---:|")
        for row in table:
            r = row["ratio"]
            ratio = "—" if r is None else f"{r['median']:.2f} ({r['min']:.2f}–{r['max']:.2f})"
            diff = "—" if row["max_rel_loss_diff"] is None else f"{row['max_rel_loss_diff']:.1e}"
            print(f"| {row['devices']} | {row['ms_per_step']:.1f} | {ratio} | {row['compile_s']:.2f} | {diff} |")
    out["seconds"] = time.time() - start
    if a.json:
        with open(a.json, "w", encoding="utf-8") as f:
            json.dump(out, f, indent=1)
    print(f"\n{out['seconds']:.0f} s")


if __name__ == "__main__":
    if "--worker" in sys.argv:
        worker(sys.argv[1:])
    else:
        main()
