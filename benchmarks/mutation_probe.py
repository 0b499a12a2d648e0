"""Mutation probe: does the test suite see deliberate breakages of the library? (Not run in CI.)

Each mutation is an exact string replacement in one source file of ``scg/``. The probe copies
the repository (``scg/``, ``scg_tests/``, ``pyproject.toml``: the working tree as it is on
disk) to a temporary directory, runs the selected tests there once unmodified (the control:
they must pass), then, for each mutation, patches the copy, runs

    python -m pytest -q -x -p no:cacheprovider <the mutation's test files>

with ``PYTHONPATH`` pointing at the copy first, restores the file, and reports which tests
failed. A mutation is *caught* when a test that passes in the control fails with it. The
repository itself is never modified.

Usage::

    python benchmarks/mutation_probe.py                 # every mutation, stop at the first failure
    python benchmarks/mutation_probe.py --all-failures  # no -x: list every test that catches it
    python benchmarks/mutation_probe.py --only vimco-plain-signal default-order-2
    python benchmarks/mutation_probe.py --list

A mutation whose text is no longer found in the source is reported as ``not applied`` (the
library changed; update the mutation). Exit status: 0 when every applied mutation was caught.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
COPIED = ("scg", "scg_tests", "pyproject.toml")


@dataclasses.dataclass(frozen=True)
class Mutation:
    name: str
    what: str
    file: str
    old: str | tuple  # the text to replace; a tuple of alternatives (for versions of the source) pairs with `new`
    new: str | tuple
    tests: tuple  # pytest paths / node ids, relative to the repository root

    def apply(self, source: str) -> tuple[str | None, str]:
        """``(patched source or None, what happened)``: the first alternative found exactly once is applied."""
        olds = self.old if isinstance(self.old, tuple) else (self.old,)
        news = self.new if isinstance(self.new, tuple) else (self.new,) * len(olds)
        counts = [source.count(old) for old in olds]
        for old, new, count in zip(olds, news, counts):
            if count == 1:
                return source.replace(old, new), ""
        return None, f"text found {counts} times"


MUTATIONS = (
    Mutation(
        "vimco-plain-signal", "VIMCO's leave-one-out signal replaced by the plain bound L_K",
        "scg/estimators.py",
        "signal = lax.stop_gradient(bound_minus_k - bound[None])",
        "signal = lax.stop_gradient(0.0 * bound_minus_k - bound[None])",
        ("scg_tests/test_baselines_objectives.py",)),
    Mutation(
        "default-order-2", "the default Gauss-Hermite order 16 lowered to 2",
        "scg/integrate.py", "DEFAULT_ORDER = 16", "DEFAULT_ORDER = 2",
        ("scg_tests/test_exact_defaults.py", "scg_tests/test_estimators.py::test_hessian_reference_is_exact",
         "scg_tests/test_passes.py::test_reparameterize_identity_and_certificate")),
    Mutation(
        "per-site-not-applied", "per-site baselines computed but never applied",
        "scg/baselines.py", "baselines.update(out)", "pass  # baselines.update(out)",
        ("scg_tests/test_baselines_objectives.py",)),
    Mutation(
        "all-costs", "each score multiplied by all costs, not the downstream ones (Certigrad's estimator)",
        "scg/estimators.py",
        ("bits &= counted", "for name in graph.stochastic_ancestors(node):"),
        ("bits = counted", "for name in (*scored, *loops):"),
        ("scg_tests/test_estimators.py", "scg_tests/test_plates.py")),
    Mutation(
        "score-leak", "stop_gradient removed from score-function samples (a pathwise leak)",
        "scg/estimators.py",
        "value = lax.stop_gradient(distribution.sample(k))", "value = distribution.sample(k)",
        ("scg_tests/test_estimators.py",)),
    Mutation(
        "kl-sign", "the analytic KL of integrate_kl with its sign flipped",
        "scg/passes/integrate_kl.py",
        "jnp.broadcast_to(kl_divergence(q, p), shape)", "jnp.broadcast_to(-kl_divergence(q, p), shape)",
        ("scg_tests/test_aevb.py::test_auto_gradient_matches_the_naive_one_in_expectation",
         "scg_tests/test_passes.py")),
    Mutation(
        "first-particle-only", "num_samples particles drawn but only the first one used",
        "scg/estimators.py",
        "surrogate = jnp.mean(estimates.surrogate)", "surrogate = estimates.surrogate[0]",
        ("scg_tests/test_estimators.py::test_num_samples_averages_particles",)),
    Mutation(
        "iwae-loss-is-elbo", "objective='iwae' reports the ELBO as its loss (the gradient stays right)",
        "scg/estimators.py",
        "loss = -jnp.sum(bound)\n    surrogate = loss",
        "surrogate = -jnp.sum(bound)\n    loss = -jnp.sum(jnp.mean(log_w, axis=0))",
        ("scg_tests/test_baselines_objectives.py",)),
    Mutation(
        "moving-average-max", "the moving-average baseline tracks the max of the downstream costs, not the mean",
        "scg/baselines.py", "(1 - decay) * jnp.mean(q)", "(1 - decay) * jnp.max(q)",
        ("scg_tests/test_baselines_objectives.py", "scg_tests/test_sbn.py")),
    Mutation(
        "aevb-model-kl-sign", "the AEVB model's sampled KL written log p − log q (both pipelines agree with it)",
        "scg/models/aevb.py",
        "log_ratio = scg.log_prob(q, z) - scg.log_prob(dist.Normal(0.0, 1.0), z)",
        "log_ratio = scg.log_prob(dist.Normal(0.0, 1.0), z) - scg.log_prob(q, z)",
        ("scg_tests/test_aevb.py::test_auto_gradient_matches_the_naive_one_in_expectation",)),
    Mutation(
        "sbn-model-kl-sign", "the SBN model's sampled KL written log p − log q",
        "scg/models/sbn.py",
        "log_ratio = scg.log_prob(q, h) - scg.log_prob(prior, h)",
        "log_ratio = scg.log_prob(prior, h) - scg.log_prob(q, h)",
        ("scg_tests/test_sbn.py::test_costs_are_the_per_example_negative_elbo_and_iwae_bounds_log_px",)),
    Mutation(
        "aevb-nll-not-averaged", "the AEVB negative log-likelihood summed over the batch, not averaged",
        "scg/models/aevb.py",
        'scg.cost("nll", bernoulli_nll(decode_logits(params, z), x) / batch)',
        'scg.cost("nll", bernoulli_nll(decode_logits(params, z), x))',
        ("scg_tests/test_aevb.py::test_auto_gradient_matches_the_naive_one_in_expectation",
         "scg_tests/test_aevb.py::test_one_epoch_of_a_small_aevb_lowers_the_loss")),
)


def copy_tree(dest: pathlib.Path) -> None:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache", ".hypothesis")
    for name in COPIED:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=ignore)
        else:
            shutil.copy2(src, dest / name)


def run_pytest(repo: pathlib.Path, tests: tuple, *, stop_first: bool, timeout: float) -> tuple[int, list, str, float]:
    """``(exit code, failed node ids, output tail, seconds)``."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
               PYTHONDONTWRITEBYTECODE="1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-rfE", "-p", "no:cacheprovider", *(["-x"] if stop_first else []),
           *tests]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=timeout)
        code, out = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as e:
        code, out = -1, f"timed out after {timeout:.0f} s\n{e.stdout or ''}"
    failed = sorted(set(re.findall(r"^(?:FAILED|ERROR) (\S+)", out, flags=re.M)))
    return code, failed, "\n".join(out.strip().splitlines()[-15:]), time.perf_counter() - start


def check_isolation(repo: pathlib.Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(repo))
    where = subprocess.run([sys.executable, "-c", "import scg; print(scg.__file__)"], cwd=repo, env=env,
                           capture_output=True, text=True, check=True).stdout.strip()
    if not pathlib.Path(where).resolve().is_relative_to(repo.resolve()):
        raise SystemExit(f"the copy's scg is not the one imported ({where}); the probe would test the original")


def short(node: str) -> str:
    return node.replace("scg_tests/", "")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="*", default=None, help="mutation names to run (default: all)")
    parser.add_argument("--all-failures", action="store_true", help="run without -x and list every failing test")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per pytest run")
    args = parser.parse_args(argv)
    mutations = [m for m in MUTATIONS if args.only is None or m.name in args.only]
    if args.list or not mutations:
        for m in MUTATIONS:
            print(f"{m.name:<24} {m.file:<28} {m.what}")
        return 0

    rows = []
    with tempfile.TemporaryDirectory(prefix="scg-mutation-") as tmp:
        repo = pathlib.Path(tmp) / "repo"
        repo.mkdir()
        copy_tree(repo)
        check_isolation(repo)
        selected = tuple(dict.fromkeys(t for m in mutations for t in m.tests))
        print(f"control: {len(selected)} test selections on the unmodified copy ...", flush=True)
        code, control_failed, tail, seconds = run_pytest(repo, selected, stop_first=False, timeout=args.timeout)
        print(f"control: exit {code}, {len(control_failed)} failing, {seconds:.0f} s", flush=True)
        if code not in (0, 5):
            print(tail)
        for m in mutations:
            path = repo / m.file
            original = path.read_text()
            patched, why = m.apply(original)
            if patched is None:
                rows.append((m, "not applied", why, 0.0))
                print(f"{m.name}: not applied ({why})", flush=True)
                continue
            path.write_text(patched)
            try:
                code, failed, tail, seconds = run_pytest(repo, m.tests, stop_first=not args.all_failures,
                                                         timeout=args.timeout)
            finally:
                path.write_text(original)
            catching = [f for f in failed if f not in control_failed]
            if catching:
                status, detail = "caught", ", ".join(short(f) for f in catching)
            elif code == -1:
                status, detail = "timeout", ""
            elif failed:
                status, detail = "MISSED", f"only control failures failed: {', '.join(short(f) for f in failed)}"
            elif code not in (0, 5):
                status, detail = "error", f"pytest exit {code}: {tail.splitlines()[-1] if tail else ''}"
            else:
                status, detail = "MISSED", f"all of {', '.join(short(t) for t in m.tests)} passed"
            rows.append((m, status, detail, seconds))
            print(f"{m.name}: {status} ({seconds:.0f} s) {detail}", flush=True)

    print()
    print(f"| mutation | breakage | result | caught by | s |")
    print(f"|---|---|---|---|---|")
    for m, status, detail, seconds in rows:
        names = detail.split(", ") if status == "caught" else [detail]
        cell = ", ".join(names[:3]) + (f" (+{len(names) - 3} more)" if len(names) > 3 else "")
        print(f"| {m.name} | {m.what} | {status} | {cell} | {seconds:.0f} |")
    if control_failed:
        print(f"\ncontrol failures (not counted as catches): {', '.join(short(f) for f in control_failed)}")
    return 0 if all(status == "caught" for _, status, _, _ in rows if status != "not applied") else 1


if __name__ == "__main__":
    sys.exit(main())
