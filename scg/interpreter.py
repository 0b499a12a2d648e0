"""The one graph walker, in the textbook shape (``env``, ``read``/``write``, ``bind``).

:func:`walk` evaluates a Graph node by node. Deterministic nodes re-bind their
JAX primitive, log-density nodes call the family's ``log_prob``, and at every
site it hands control to a *site handler* in continuation-passing style::

    on_site(site, distribution, env, continue_with) -> result

where ``continue_with(value, extra={})`` walks the rest of the graph with the
site set to ``value`` (and ``extra`` added to the environment: handlers keep
per-site quantities such as log densities there) and returns what
``on_end(env)`` returns. A sampling handler calls it
once; an enumerating handler calls it under ``jax.vmap`` over the support and
takes the weighted sum. Walking happens at trace time: the compiled function
has no Python per node.
"""
from __future__ import annotations

from typing import Any, Callable

from scg import _jax
from scg.ir import Equation, Graph, Literal, LogProb, Site, Var


def initial_env(graph: Graph, param_leaves: list, input_leaves: list) -> dict:
    env: dict = {}
    for v, x in zip(graph.params, param_leaves):
        env[v] = x
    for v, x in zip(graph.inputs, input_leaves):
        env[v] = x
    for v, c in graph.consts:
        env[v] = c
    return env


def read(env: dict, atom: Any) -> Any:
    return atom.value if isinstance(atom, Literal) else env[atom]


def walk(graph: Graph, env: dict, *, on_site: Callable, on_end: Callable, start: int = 0) -> Any:
    """Evaluates ``graph.nodes[start:]`` in ``env`` (a dict Var -> value, not mutated)."""
    env = dict(env)
    nodes = graph.nodes
    for i in range(start, len(nodes)):
        node = nodes[i]
        if isinstance(node, Equation):
            outs = _jax.bind(node.primitive, node.params, [read(env, a) for a in node.inputs])
            for v, x in zip(node.outputs, outs):
                env[v] = x
        elif isinstance(node, LogProb):
            distribution = node.dist.build([read(env, a) for a in node.dist_inputs])
            env[node.output] = distribution.log_prob(read(env, node.value))
        elif isinstance(node, Site):
            distribution = node.dist.build([read(env, a) for a in node.inputs])

            def continue_with(value, extra=None, _env=env, _site=node, _next=i + 1):
                rest = dict(_env)
                rest[_site.output] = value
                rest.update(extra or {})
                return walk(graph, rest, on_site=on_site, on_end=on_end, start=_next)

            return on_site(node, distribution, env, continue_with)
        # Cost nodes define nothing: on_end reads their inputs from env
    return on_end(env)
