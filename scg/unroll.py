"""Unrolling loops: a Graph with ``Scan`` nodes becomes the flat Graph of its steps.

Step ``t`` of a loop becomes a copy of the body whose sites are named
``"z[t]"`` and keep the loop site's key with ``steps=(t,)``, so the unrolled
graph draws exactly the values the loop draws from the same key. Its costs are
``"c[t]"``. The unrolled graph is the loop's twin: the exact integrator works
on it (tiny chains, within its grid budget), and the tests compare every loop
feature against it.
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from scg.ir import Check, Cost, Equation, Graph, LogProb, Scan, Site, Var, substitute
from scg.trace import emit


def _renamed(node, t: int):
    """A copy of a body node for step ``t``: fresh outputs, names and keys of step ``t``."""
    if isinstance(node, Site):
        return node.replace(name=f"{node.name}[{t}]", output=Var(node.output.shape, node.output.dtype),
                            steps=(*node.steps, t))
    if isinstance(node, Cost):
        return node.replace(name=f"{node.name}[{t}]")
    if isinstance(node, Check):
        return node.replace(subject=f"{node.subject} at step {t}")
    if isinstance(node, Scan):
        body = _prefixed(node.body, t)
        return node.replace(name=f"{node.name}[{t}]", body=body,
                            outputs=tuple(Var(v.shape, v.dtype) for v in node.outputs))
    if isinstance(node, LogProb):
        return node.replace(output=Var(node.output.shape, node.output.dtype))
    return node.replace(outputs=tuple(Var(v.shape, v.dtype) for v in node.outputs))


def _prefixed(body: Graph, t: int) -> Graph:
    """A nested loop's body inside step ``t``: its sites' keys and names carry ``t`` first."""
    nodes = []
    for n in body.nodes:
        if isinstance(n, Site):
            n = n.replace(name=f"{n.name}[{t}]", steps=(t, *n.steps))
        elif isinstance(n, Cost):
            n = n.replace(name=f"{n.name}[{t}]")
        elif isinstance(n, Scan):
            n = n.replace(name=f"{n.name}[{t}]", body=_prefixed(n.body, t))
        nodes.append(n)
    return body.with_nodes(nodes)


def _copy_step(node: Scan, t: int, consts: list, carry: list, xs_t: list) -> tuple[list, list, list]:
    """``(nodes, carry_out, ys_t)`` of step ``t`` of ``node`` with its operands bound to outer atoms."""
    mapping = dict(zip(node.body.inputs, [*consts, *carry, *xs_t]))
    nodes = []
    for n in node.body.nodes:
        copy = _renamed(substitute([n], mapping)[0], t)
        mapping.update(zip(n.outputs, copy.outputs))
        nodes.append(copy)
    results = [mapping.get(a, a) if isinstance(a, Var) else a for a in node.body_outputs]
    return nodes, results[:node.num_carry], results[node.num_carry:]


def unroll(graph: Graph, *, max_steps: int | None = None) -> Graph:
    """The graph with every loop replaced by its steps (nested loops included).

    ``max_steps``: refuse (ValueError naming the loop and its length) beyond this
    many steps in total, before building anything.

    Examples:
      >>> import jax, jax.numpy as jnp, numpyro.distributions as dist, scg
      >>> @scg.model
      ... def chain(params, x):
      ...     def step(state, x_t):
      ...         z = scg.sample("z", dist.Normal(params["a"] * state, 1.0))
      ...         scg.cost("fit", (z - x_t) ** 2)
      ...         return z, None
      ...     jax.lax.scan(step, jnp.zeros(()), x)
      >>> params, x = {"a": jnp.array(0.5)}, jnp.ones(3)
      >>> twin = scg.unroll(chain.trace(params, x))
      >>> [site.name for site in twin.sites]
      ['z[0]', 'z[1]', 'z[2]']
      >>> key = jax.random.key(0)   # the twin draws exactly what the loop draws
      >>> bool(scg.compile(twin).loss(params, x, key=key) == scg.compile(chain).loss(params, x, key=key))
      True
    """
    total = sum(s.length for s in graph.scans)
    if max_steps is not None and total > max_steps:
        longest = max(graph.scans, key=lambda s: s.length)
        raise ValueError(f"unrolling {longest.name} (T = {longest.length}) would make {total:,} steps, above "
                         f"the limit of {max_steps:,}")
    if not graph.scans:
        return graph
    nodes: list = []
    consts = list(graph.consts)
    mapping: dict = {}
    for n in graph.nodes:
        n = substitute([n], mapping)[0] if mapping else n
        if not isinstance(n, Scan):
            nodes.append(n)
            continue
        k, c = n.num_consts, n.num_carry
        outer_consts, carry, xs = list(n.inputs[:k]), list(n.inputs[k:k + c]), list(n.inputs[k + c:])
        consts.extend(n.body.consts)
        ys_steps: dict = {}
        for t in (reversed(range(n.length)) if n.reverse else range(n.length)):
            xs_t = []
            for x in xs:
                sliced, (x_t,), new_consts = emit(lambda a, t=t: a[t], [x], "unroll", n.source)
                nodes.extend(sliced)
                consts.extend(new_consts)
                xs_t.append(x_t)
            step_nodes, carry, ys_steps[t] = _copy_step(n, t, outer_consts, carry, xs_t)
            nodes.extend(step_nodes)
        stacked = []
        for j in range(len(n.outputs) - c):
            parts = [ys_steps[t][j] for t in range(n.length)]
            stack_nodes, (out,), new_consts = emit(lambda *a: jnp.stack(a), parts, "unroll", n.source)
            nodes.extend(stack_nodes)
            consts.extend(new_consts)
            stacked.append(out)
        mapping.update(zip(n.outputs, [*carry, *stacked]))
    flat = dataclasses.replace(graph, nodes=tuple(nodes), consts=tuple(consts))
    flat.validate()
    return unroll(flat, max_steps=max_steps)  # nested loops, now at the outer level
