"""``reparameterize``: move a continuous site from the score-function to the pathwise estimator.

Approximates
    nothing: it rewrites the graph so that ``z ~ D(φ)`` becomes a parameter-free
    noise site and a deterministic transform, ``ε ~ r``, ``z = g_φ(ε)``.
With
    the identity ``E_{z~D(φ)}[f(z)] = E_{ε~r}[f(g_φ(ε))]``. For Normal
    (also under ``Independent``): ``ε ~ N(0, 1)``, ``z = μ + σ·ε``, written into
    the IR as explicit nodes; for other families with ``rsample`` the site is
    marked reparameterized and drawn with the family's reparameterized sampler.
    The noise site keeps the original site's key, so the same key gives the
    same ``z`` before and after the pass.
Requires
    1. ``reparameterizable family``: the family has ``rsample`` (``has_rsample``);
    2. ``differentiable paths to costs``: every path from ``z`` to a cost, or to
       another site's distribution operands, is made of primitives with a
       useful derivative. Comparisons, ``sign``, ``floor``/``ceil``/``round``,
       ``stop_gradient``, and any operation with an integer or boolean result
       (integer casts, ``argmax``, ``argsort``) have a derivative that is zero
       or undefined almost everywhere: through them the pathwise gradient of
       ``E[f(z)]`` is silently biased (cost ``z > 0`` gives gradient 0; the truth
       is the Normal density at 0). Bodies of ``scan``/``while``/``cond`` are
       searched too; ``custom_jvp``/``custom_vjp`` rules are trusted.
"""
from __future__ import annotations

from typing import Any, Iterable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist

from scg import _jax
from scg.integrate import _site_is_normal, _unwrap
from scg.ir import (Cost, DistSpec, Equation, Graph, Literal, Scan, Site, Var, all_sites, eliminate_dead_code,
                    substitute)
from scg.passes._common import Checks, candidate_sites
from scg.passes.certificate import Certificate
from scg.trace import _leaf_names, emit

NAME = "reparameterize"
NORMAL_IDENTITY = "E_{z~N(μ,σ)}[f(z)] = E_{ε~N(0,1)}[f(μ+σε)]"
RSAMPLE_IDENTITY = "E_{z~D(φ)}[f(z)] = E_{ε~r}[f(g_φ(ε))] (the family's rsample)"


def _zero_derivative_in_body(body: Graph, allow: frozenset) -> str | None:
    """The first zero-derivative primitive anywhere in a loop body (nested loops included), else None."""
    stack = [body]
    while stack:
        g = stack.pop()
        for n in g.nodes:
            if isinstance(n, Scan):
                stack.append(n.body)
            elif isinstance(n, Equation):
                if _jax.has_zero_derivative(n.primitive.name, [v.dtype for v in n.outputs], allow):
                    return n.primitive.name
                if n.primitive.name not in _jax.TRUSTED_DERIVATIVE:
                    found = _jax.zero_derivative_inside(n.params, allow)
                    if found:
                        return found
    return None


class _Loop(NamedTuple):
    """What a loop body's check needs from outside: its results, and whether they meet a blocker outside."""

    node: Scan
    outside: tuple | None  # (primitive, source) blocking the loop's results on their way to costs, or None


def blockers(graph: Graph, allow: frozenset = frozenset(), loop: _Loop | None = None) -> dict:
    """``{site or loop name: (primitive, source)}``: the first primitive with a useless derivative on a
    path from the site's value to a cost, another site's operands (or, in a loop body, the body's results).

    One forward sweep gives each value the bitset of the sites whose values reach it pathwise (not
    through another sampled site); one backward sweep marks the values that reach a sink. A site is
    blocked by a zero-derivative node that its value reaches and that reaches a sink. Linear in the
    graph (a bitset union is one ``|``), so the pass stays linear for chains of thousands of sites.
    In a loop body the carried values are swept twice, so that a site flowing into the carry is also
    checked along the next steps' paths.
    """
    order = [n for n in graph.nodes if isinstance(n, (Site, Scan))]
    bit = {id(n): 1 << k for k, n in enumerate(order)}
    # backward: values that reach a sink
    live: set = set()
    if loop is not None:
        live.update(a for a in loop.node.body_outputs if isinstance(a, Var))
    sink_nodes = (Cost, Site, Scan)
    for n in reversed(graph.nodes):
        if isinstance(n, sink_nodes) or any(v in live for v in n.outputs):
            live.update(a for a in n.inputs if isinstance(a, Var))

    def sweep(reach: dict) -> dict:
        for n in graph.nodes:
            incoming = 0
            for a in n.inputs:
                if isinstance(a, Var):
                    incoming |= reach.get(a, 0)
            if isinstance(n, Site):
                out = bit[id(n)] | (incoming if n.reparameterized else 0)
            elif isinstance(n, Scan):
                out = bit[id(n)] | incoming
            else:
                out = incoming
            for v in n.outputs:
                reach[v] = out
        return reach

    reach = sweep({})
    if loop is not None:  # a value carried out of step t enters step t + 1
        carried = 0
        for a in loop.node.carry_outputs:
            if isinstance(a, Var):
                carried |= reach.get(a, 0)
        reach = sweep({v: carried for v in loop.node.carry_inputs})
    found: dict = {}

    def block(bits: int, why: tuple) -> None:
        for n in order:
            if bits & bit[id(n)] and n.name not in found:
                found[n.name] = why

    for n in graph.nodes:
        incoming = 0
        for a in n.inputs:
            if isinstance(a, Var):
                incoming |= reach.get(a, 0)
        if not incoming:
            continue
        if isinstance(n, Equation) and any(v in live for v in n.outputs):
            name = n.primitive.name
            if _jax.has_zero_derivative(name, [v.dtype for v in n.outputs], allow):
                block(incoming, (name, n.source))
            elif name not in _jax.TRUSTED_DERIVATIVE:
                inner = _jax.zero_derivative_inside(n.params, allow)
                if inner:
                    block(incoming, (f"{inner} (inside {name})", n.source))
        elif isinstance(n, Scan):
            inner = _zero_derivative_in_body(n.body, allow)
            if inner:
                block(incoming, (f"{inner} (inside {n.name})", n.source))
    if loop is not None and loop.outside is not None:
        results = 0
        for a in loop.node.body_outputs:
            if isinstance(a, Var):
                results |= reach.get(a, 0)
        block(results, loop.outside)
    return found


def nondifferentiable_path(graph: Graph, site: Site, allow: frozenset = frozenset()) -> tuple[str, str | None] | None:
    """The first primitive with a useless derivative on a path from ``site`` to a cost, or None.

    Returns ``(primitive name, source line)``.
    """
    return blockers(graph, allow).get(site.name)


def _transform_kind(site: Site) -> Any:
    """What the traced transform of a site depends on besides operand shapes (None: do not cache)."""
    try:
        hash(site.dist.treedef)
    except TypeError:
        return None
    return ("normal_transform", site.dist.family, site.dist.treedef)


def _normal_transform(site: Site):
    """``(leaves, eps) -> μ + σ·ε`` for a Normal-family site."""

    def transform(*operands):
        *leaves, eps = operands
        base = _unwrap(site.dist.build(leaves))  # Normal, possibly under Independent / expand
        return jnp.broadcast_to(base.loc, eps.shape) + jnp.broadcast_to(base.scale, eps.shape) * eps

    return transform


def reparameterize(graph: Graph, sites: Iterable[str] | None = None, *, allow_primitives: Iterable[str] = ()) -> tuple[Graph, Certificate]:
    """Rewrites continuous sites into noise + transform so gradients flow pathwise.

    Args:
      graph: the graph (not modified).
      sites: names of sites to rewrite; a named site whose precondition fails
        raises :class:`scg.PreconditionError`. Default: every sampled site whose
        distribution depends on the parameters and whose preconditions hold.
      allow_primitives: primitive names to accept on paths to costs although their
        derivative is zero almost everywhere, when you know the composite is
        differentiable (e.g. the ``stop_gradient`` max-shift inside ``jax.nn.logsumexp``).

    Returns:
      ``(new_graph, certificate)``.

    Examples:
      >>> import jax, jax.numpy as jnp, numpyro.distributions as dist, scg
      >>> @scg.model
      ... def m(params, x):
      ...     z = scg.sample("z", dist.Normal(params["mu"], 1.0))
      ...     scg.cost("fit", (z - x) ** 2)
      >>> params, x = {"mu": jnp.array(0.5)}, jnp.array(1.0)
      >>> graph, cert = scg.passes.reparameterize(m.trace(params, x))
      >>> cert.rewritten, [site.name for site in graph.sites]
      (('z',), ['z.eps'])
    """
    new_graph, cert, _ = _reparameterize(graph, sites, frozenset(allow_primitives), None)
    return new_graph, cert


def _reparameterize(graph: Graph, sites: Iterable[str] | None, allow: frozenset,
                    loop: _Loop | None) -> tuple[Graph, Certificate, dict]:
    """The pass on one graph (a loop body when ``loop`` is given); also returns the Var substitution."""
    named = None if sites is None else ([sites] if isinstance(sites, str) else list(sites))
    here = {s.name for s in graph.sites}
    if named is not None:  # names of sites inside loop bodies are handled in the bodies
        inside = {s.name for s in all_sites(graph)} - here
        candidates, strict = candidate_sites(graph, [n for n in named if n not in inside], NAME)
    else:
        candidates, strict = candidate_sites(graph, None, NAME)
    # every sampled site of a loop body is scored (the body sees θ only through its operands)
    dependent = graph.param_dependent_sites if loop is None else here
    blocked = blockers(graph, allow, loop)
    records, rewritten, described, notes = [], [], [], []
    chosen: dict = {}
    for site in candidates:
        if site.reparameterized or site.enumerated:
            notes.append(f"{site.name}: skipped, already " + ("drawn pathwise (reparameterized by an earlier pass)"
                         if site.reparameterized else "summed exactly (enumerated by an earlier enumerate pass)"))
            continue
        if not strict and site.name not in dependent:
            notes.append(f"{site.name}: skipped, " + (
                f"it is the parameter-free noise site an earlier reparameterize put in place of {site.key_name!r} "
                f"(already rewritten)" if site.name == f"{site.key_name}.eps" else
                "its distribution does not depend on the parameters (no score term to replace)"))
            continue  # nothing to gain: a parameter-free site contributes no score term
        checks = Checks(NAME, site.name, strict)
        checks.check("reparameterizable family", site.reparameterizable and not site.discrete,
                     f"{site.dist.name} has no reparameterized sampler (rsample)"
                     + ("; it is discrete: use the score function, or scg.passes.enumerate" if site.discrete else "")
                     if not (site.reparameterizable and not site.discrete) else f"{site.dist.name} has rsample")
        if checks.all_held:
            bad = blocked.get(site.name)
            where = "a cost" if loop is None else "a cost (in this or a later step of its loop)"
            detail = ("every path from the site to a cost is differentiable" if bad is None else
                      f"the value reaches {where} through `{bad[0]}`" + (f" at {bad[1]}" if bad[1] else "") +
                      ", whose derivative is zero or undefined almost everywhere, so a pathwise gradient would "
                      "be biased. Keep this site score-function (the default when it is not named), rewrite "
                      "the cost without it, or pass allow_primitives=(...) if the composite is differentiable")
            checks.check("differentiable paths to costs", bad is None, detail)
        records.extend(checks.records)
        if checks.all_held:
            chosen[site.name] = site
    # one pass over the nodes: each chosen site becomes noise + transform (or an rsample draw)
    nodes, consts, mapping = [], list(graph.consts), {}
    sub_certificates = []
    for n in graph.nodes:
        if mapping and any(isinstance(a, Var) and a in mapping for a in n.inputs):
            n = substitute([n], mapping)[0]
        if isinstance(n, Scan):
            outside = blocked.get(n.name)
            body, cert, inner = _reparameterize(n.body, named, allow, _Loop(n, outside))
            sub_certificates.append(cert)
            if cert.rewritten:
                n = n.replace(body=body, body_outputs=tuple(inner.get(a, a) if isinstance(a, Var) else a
                                                            for a in n.body_outputs))
            nodes.append(n)
            continue
        if not (isinstance(n, Site) and n.name in chosen):
            nodes.append(n)
            continue
        if _site_is_normal(n):
            eps = Var(n.output.shape, n.output.dtype)
            shape = n.output.shape
            noise_dist = dist.Normal(np.zeros(shape, n.output.dtype), np.ones(shape, n.output.dtype))
            leaves, treedef = jax.tree_util.tree_flatten(noise_dist)
            noise = Site(
                name=f"{n.name}.eps", dist=DistSpec(dist.Normal, treedef, _leaf_names(noise_dist, leaves)),
                inputs=tuple(Literal(np.asarray(x), tuple(np.shape(x)), np.asarray(x).dtype) for x in leaves),
                output=eps, source=n.source, key_name=n.key_name, plates=n.plates, discrete=False,
                enumerable=False, reparameterizable=True, steps=n.steps)
            new_nodes, outputs, new_consts = emit(_normal_transform(n), [*n.inputs, eps], NAME,
                                                  f"{NAME}: {n.name} = loc + scale * eps",
                                                  cache_key=_transform_kind(n))
            nodes += [noise, *new_nodes]
            mapping[n.output] = outputs[0]
            consts += new_consts
            described.append(f"{n.name} ~ {n.dist.name}  ->  {n.name}.eps ~ Normal(0, 1); "
                             f"{n.name} = loc + scale * {n.name}.eps")
        else:
            nodes.append(n.replace(reparameterized=True))
            described.append(f"{n.name} ~ {n.dist.name}  ->  drawn with {n.dist.name}.rsample (pathwise)")
        rewritten.append(n.name)
    for cert in sub_certificates:
        rewritten += cert.rewritten
        described += cert.nodes
        records += cert.preconditions
        notes += cert.notes
    changed = bool(rewritten)
    new_graph = graph.replace(nodes=tuple(nodes), consts=tuple(consts)) if changed else graph
    if changed and loop is None:
        new_graph = eliminate_dead_code(new_graph)
    elif changed:
        new_graph = eliminate_dead_code(new_graph, keep=[mapping.get(a, a) for a in loop.node.body_outputs])
    any_normal = any("Normal(0, 1)" in d for d in described)
    identity = NORMAL_IDENTITY if any_normal else RSAMPLE_IDENTITY
    if any_normal and any("rsample" in d for d in described):
        identity = f"{NORMAL_IDENTITY}; {RSAMPLE_IDENTITY}"
    return new_graph, Certificate(NAME, tuple(rewritten), tuple(described), tuple(records), identity,
                                  before=graph, after=new_graph, notes=tuple(notes)), mapping
