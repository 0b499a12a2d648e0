"""Compares the optimized XLA HLO of scg's AEVB training step with the hand-written JAX step.

    python benchmarks/hlo_compare.py [--batch 250] [--hidden 1000] [--dump DIR]

Compiles both steps (``jax.jit(...).lower(...).compile().as_text()``) for the
same shapes, counts the HLO instructions of each by opcode (over the whole
module: fusions' bodies included) and prints the opcodes whose counts differ,
the dots (matmuls) with their shapes, and XLA's own cost analysis (FLOPs,
transcendentals, bytes accessed). ``--dump DIR`` writes both modules as text.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _aevb  # noqa: E402

_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(\S+)\s+([\w\-]+)\(")


def opcode_counts(hlo: str) -> collections.Counter:
    counts: collections.Counter = collections.Counter()
    for line in hlo.splitlines():
        m = _INSTR.match(line)
        if m:
            counts[m.group(2)] += 1
    return counts


def top_level_counts(hlo: str) -> collections.Counter:
    """Opcodes in the ENTRY computation only (the kernels actually launched, fusions counted once)."""
    counts: collections.Counter = collections.Counter()
    inside = False
    for line in hlo.splitlines():
        if line.startswith("ENTRY"):
            inside = True
            continue
        if inside:
            if line.startswith("}"):
                break
            m = _INSTR.match(line)
            if m:
                counts[m.group(2)] += 1
    return counts


def dots(hlo: str) -> list[str]:
    out = []
    for line in hlo.splitlines():
        m = _INSTR.match(line)
        if m and m.group(2) in ("dot", "convolution"):
            out.append(m.group(1) + "  " + line.split("=", 1)[1].strip().split(", metadata")[0][:160])
        elif "custom-call" in line and ("matmul" in line.lower() or "gemm" in line.lower()):
            out.append(line.strip()[:160])
    return out


def compiled_steps(batch: int, hidden: int, latent: int = 30) -> dict:
    import jax
    import jax.numpy as jnp

    weights = _aevb.xavier_init(0, 784, hidden, latent)
    x = jnp.asarray(__import__("numpy").random.default_rng(0).random((batch, 784), dtype="float32"))
    key = jax.random.key(0)
    out = {}
    step, init_state = _aevb.jax_step()
    params, opt = init_state(weights)
    out["jax"] = step.lower(params, opt, key, 0, x).compile()
    objective, step, optimizer = _aevb.scg_step("auto")
    params = _aevb.scg_params(weights)
    no_state = objective.init_baseline_state(params, x)  # EmptyState(): `auto` leaves no score-function site
    out["scg"] = step.lower(params, optimizer.init(params), no_state, key, 0, x).compile()
    return out


def cost(compiled) -> dict:
    analysis = compiled.cost_analysis()
    if isinstance(analysis, list):
        analysis = analysis[0]
    return {k: analysis.get(k) for k in ("flops", "transcendentals", "bytes accessed") if k in analysis}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=250)
    p.add_argument("--hidden", type=int, default=1000)
    p.add_argument("--dump", help="folder to write scg_step.hlo.txt and jax_step.hlo.txt into")
    a = p.parse_args(argv)
    compiled = compiled_steps(a.batch, a.hidden)
    texts = {name: c.as_text() for name, c in compiled.items()}
    if a.dump:
        os.makedirs(a.dump, exist_ok=True)
        for name, text in texts.items():
            with open(os.path.join(a.dump, f"{name}_step.hlo.txt"), "w", encoding="utf-8") as f:
                f.write(text)
    for label, counter in (("all instructions (fusion bodies included)", opcode_counts),
                           ("ENTRY computation (fusions counted once)", top_level_counts)):
        c = {name: counter(text) for name, text in texts.items()}
        print(f"== {label}: total scg {sum(c['scg'].values())}, jax {sum(c['jax'].values())}")
        for op in sorted(set(c["scg"]) | set(c["jax"])):
            if c["scg"][op] != c["jax"][op]:
                print(f"   {op:<24s} scg {c['scg'][op]:4d}   jax {c['jax'][op]:4d}")
    for name, text in texts.items():
        d = dots(text)
        print(f"== {name}: {len(d)} dots")
        for line in d:
            print("   " + line)
    for name, c in compiled.items():
        print(f"== {name} cost analysis: {cost(c)}")


if __name__ == "__main__":
    main()
