"""Shared benchmark machinery: worker processes, alternation, step timing, machine facts, tables.

Every benchmark here follows one protocol:

* the *driver* (``python benchmarks/<name>.py``) never times a system itself;
  it starts one *worker* subprocess per (system, configuration, round) —
  ``python benchmarks/<worker script> --worker SYSTEM ...`` — and reads the one
  line of JSON the worker prints after :data:`RESULT_TAG`;
* systems are run in alternation (``A B C D A B C D ...``), so slow drifts of a
  shared, noisy machine hit every system alike; ratios are formed per round;
* a worker measures its compile (trace) time apart from steady-state steps:
  the first step is timed alone, then a few warm-up steps are discarded, then
  each timed step is measured on its own (synchronously, the loss read back to
  the host, as a training loop that logs the loss does);
* the worker reports its peak resident memory (``getrusage`` ``ru_maxrss``).
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(BENCH_DIR)
RESULT_TAG = "@@BENCH-RESULT@@ "
TF_INSTALL = 'pip install -e ".[bench]"   (tensorflow-cpu and psutil)'


# --------------------------------------------------------------------------- #
# Worker side.
# --------------------------------------------------------------------------- #


def peak_rss_mb() -> float:
    """This process's peak resident set size in MiB (Linux reports ``ru_maxrss`` in KiB)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024.0 * 1024.0) if sys.platform == "darwin" else rss / 1024.0


def emit(result: Mapping[str, Any]) -> None:
    """Prints a worker's result for the driver (one tagged JSON line) and adds its peak RSS."""
    out = dict(result)
    out.setdefault("peak_rss_mb", peak_rss_mb())
    out.setdefault("loadavg_1min", os.getloadavg()[0])  # how busy the shared machine was
    sys.stdout.write(RESULT_TAG + json.dumps(out) + "\n")
    sys.stdout.flush()


def quiet_tensorflow_env() -> None:
    """Silences TensorFlow's C++ start-up chatter (must run before ``import tensorflow``)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@dataclasses.dataclass
class StepTimes:
    """What :func:`time_steps` measured."""

    first_step_s: float  # the first call: tracing + compilation + one step
    step_s: list  # the timed steady-state steps, one wall time each
    losses: list  # the loss of every step taken (first, warm-up and timed), in order

    @property
    def median_ms(self) -> float:
        return 1000.0 * statistics.median(self.step_s)

    def summary(self) -> dict:
        median = statistics.median(self.step_s)
        finite = [v for v in self.losses if v == v and abs(v) != float("inf")]
        return {
            "ms_per_step": 1000.0 * median,
            "ms_per_step_min": 1000.0 * min(self.step_s),
            "ms_per_step_mean": 1000.0 * statistics.fmean(self.step_s),
            "timed_steps": len(self.step_s),
            "first_step_s": self.first_step_s,
            # compile/trace time: the first call less one steady-state step
            "compile_s": max(0.0, self.first_step_s - median),
            "steps_taken": len(self.losses),
            "mean_loss": statistics.fmean(finite) if finite else float("nan"),
            "final_loss": self.losses[-1],
            "losses": self.losses,
        }


def time_steps(step: Callable[[int], float], *, warmup: int, steps: int) -> StepTimes:
    """Times ``step(i)`` (which must run step ``i`` to completion and return its loss as a float).

    Step 0 is timed alone (compilation), steps ``1..warmup`` are discarded,
    the next ``steps`` are timed one by one.
    """
    losses = []
    t0 = time.perf_counter()
    losses.append(float(step(0)))
    first = time.perf_counter() - t0
    for i in range(1, warmup + 1):
        losses.append(float(step(i)))
    times = []
    for i in range(warmup + 1, warmup + 1 + steps):
        t0 = time.perf_counter()
        losses.append(float(step(i)))
        times.append(time.perf_counter() - t0)
    return StepTimes(first, times, losses)


# --------------------------------------------------------------------------- #
# Driver side.
# --------------------------------------------------------------------------- #


def run_worker(script: str, system: str, args: Sequence[str] = (), *, timeout: float = 900.0,
               env: Mapping[str, str] | None = None) -> dict:
    """Runs ``python benchmarks/<script> --worker <system> <args>`` and returns its JSON result.

    A worker that crashes or prints no result gives ``{"error": <its stderr's tail>}``.
    """
    cmd = [sys.executable, os.path.join(BENCH_DIR, script), "--worker", system, *map(str, args)]
    child_env = dict(os.environ)
    child_env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    child_env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO_ROOT, child_env.get("PYTHONPATH", "")]))
    child_env.update(env or {})
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=child_env, cwd=REPO_ROOT)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    wall = time.perf_counter() - t0
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_TAG):
            result = json.loads(line[len(RESULT_TAG):])
            result["process_wall_s"] = wall
            return result
    tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
    return {"error": f"worker exited with {proc.returncode} and no result:\n{tail}"}


def describe_step(result: Mapping[str, Any]) -> str:
    return (f"{result.get('ms_per_step', float('nan')):9.3f} ms/step"
            f"   compile {result.get('compile_s', float('nan')):6.2f} s")


def _cpu_times() -> tuple[float, float] | None:
    """``(busy, total)`` jiffies of all CPUs since boot, from ``/proc/stat`` (None elsewhere)."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            fields = [float(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)  # idle + iowait
    return sum(fields) - idle, sum(fields)


def busy_fraction(interval: float = 0.5) -> float | None:
    """The fraction of all cores' time spent busy over ``interval`` seconds (None if unknown)."""
    a = _cpu_times()
    time.sleep(interval)
    b = _cpu_times()
    if a is None or b is None or b[1] <= a[1]:
        return None
    return (b[0] - a[0]) / (b[1] - a[1])


def wait_for_quiet(max_busy: float = 0.25, timeout: float = 5.0) -> float | None:
    """Waits (up to ``timeout`` s) until other processes leave the cores mostly idle; returns the last reading.

    On a shared machine a run that starts during another job's burst measures
    that burst; waiting a few seconds skips short bursts. A long job (a training
    run beside the benchmark) outlasts any wait: then every system runs beside
    it, alternation keeps the comparison fair, and ``busy_before`` in each
    result records it.
    """
    deadline = time.monotonic() + timeout
    while True:
        busy = busy_fraction()
        if busy is None or busy <= max_busy or time.monotonic() > deadline:
            return busy
        time.sleep(2.0)


def alternate(systems: Sequence[str], rounds: int, run: Callable[[str, int], dict], *,
              log: Callable[[str], None] = print,
              describe: Callable[[Mapping[str, Any]], str] = describe_step,
              quiet_timeout: float = 5.0) -> dict[str, list[dict]]:
    """Runs ``run(system, round)`` for every system, round after round (A B C A B C ...).

    Before each run, waits up to ``quiet_timeout`` s for the cores to be quiet (:func:`wait_for_quiet`) and
    records the busy fraction it saw as ``busy_before``. Logs one line per run
    (``describe(result)``). Returns ``{system: [result of round 0, round 1, ...]}``.
    """
    results: dict[str, list[dict]] = {s: [] for s in systems}
    for r in range(rounds):
        for s in systems:
            busy = wait_for_quiet(timeout=quiet_timeout)
            res = run(s, r)
            res["busy_before"] = busy
            results[s].append(res)
            if "error" in res:
                log(f"  round {r + 1}/{rounds}  {s:<24s} FAILED: {res['error'].splitlines()[-1]}")
            elif "skipped" in res:
                log(f"  round {r + 1}/{rounds}  {s:<24s} skipped: {res['skipped']}")
            else:
                log(f"  round {r + 1}/{rounds}  {s:<24s} {describe(res)}")
    return results


def ok_rounds(rounds: Iterable[dict]) -> list[dict]:
    return [r for r in rounds if "error" not in r and "skipped" not in r]


def ratio_stats(results: Mapping[str, list[dict]], system: str, reference: str,
                key: str = "ms_per_step") -> dict | None:
    """Per-round ratio ``system / reference`` of ``key``: median, min, max over the rounds both ran."""
    pairs = [(a[key], b[key]) for a, b in zip(results[system], results[reference])
             if key in a and key in b]
    if not pairs:
        return None
    ratios = [a / b for a, b in pairs]
    return {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios), "rounds": len(ratios)}


def median_of(rounds: Iterable[dict], key: str) -> float:
    values = [r[key] for r in rounds if key in r and r[key] is not None]
    return statistics.median(values) if values else float("nan")


# --------------------------------------------------------------------------- #
# Machine facts.
# --------------------------------------------------------------------------- #


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def library_versions(names: Sequence[str] = ("jax", "jaxlib", "numpyro", "optax", "numpy", "tensorflow-cpu",
                                             "tensorflow", "keras", "psutil", "scg")) -> dict:
    out = {}
    for name in names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def sgemm_gflops(n: int = 2000, repeats: int = 10) -> dict:
    """Best-of-``repeats`` GFLOP/s of an ``n x n`` float32 matmul in numpy (BLAS) and in jitted JAX (XLA)."""
    import numpy as np

    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    flop = 2.0 * n ** 3

    def best(fn: Callable[[], Any]) -> float:
        fn()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return flop / min(times) / 1e9

    out = {"n": n, "numpy_gflops": best(lambda: a @ b)}
    try:
        import jax
        import jax.numpy as jnp

        ja, jb = jnp.asarray(a), jnp.asarray(b)
        mm = jax.jit(jnp.matmul)
        out["jax_gflops"] = best(lambda: mm(ja, jb).block_until_ready())
    except ImportError:
        pass
    out["peak_gflops"] = max(v for k, v in out.items() if k.endswith("_gflops"))
    return out


def machine_info(*, sgemm: bool = True) -> dict:
    info = {
        "cpu_model": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "libraries": library_versions(),
    }
    try:
        import psutil

        info["memory_gib"] = round(psutil.virtual_memory().total / 2 ** 30, 1)
        info["physical_cores"] = psutil.cpu_count(logical=False)
    except ImportError:
        pass
    if sgemm:
        info["sgemm"] = sgemm_gflops()
    return info


def describe_machine(info: Mapping[str, Any]) -> str:
    libs = ", ".join(f"{k} {v}" for k, v in info["libraries"].items())
    text = f"{info['cpu_model']}, {info['cpu_cores']} cores"
    if "memory_gib" in info:
        text += f", {info['memory_gib']} GiB"
    text += f"; Python {info['python']}; {libs}"
    if "sgemm" in info:
        s = info["sgemm"]
        parts = [f"{k.removesuffix('_gflops')} {v:.1f}" for k, v in s.items() if k.endswith("_gflops") and k != "peak_gflops"]
        text += f"; sgemm {s['n']}x{s['n']} float32: " + ", ".join(parts) + " GFLOP/s"
    return text


# --------------------------------------------------------------------------- #
# Output.
# --------------------------------------------------------------------------- #


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(str(c) for c in row) + " |")
    return "\n".join(lines)


def write_json(path: str, payload: Any) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=2, sort_keys=False)
        f.write("\n")
    os.replace(tmp, path)


def new_figure(width: float, height: float):
    """A matplotlib Figure on the Agg canvas (no pyplot, no screen)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig
