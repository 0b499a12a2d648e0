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

from typing import Any, Iterable

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist

from scg import _jax
from scg.integrate import _site_is_normal, _unwrap
from scg.ir import DistSpec, Equation, Graph, Literal, Site, Var, eliminate_dead_code, substitute
from scg.passes._common import Checks, candidate_sites
from scg.passes.certificate import Certificate
from scg.trace import _leaf_names, emit

NAME = "reparameterize"
NONDIFFERENTIABLE = frozenset({
    "lt", "le", "gt", "ge", "eq", "ne", "sign", "floor", "ceil", "round", "stop_gradient", "is_finite",
    "argmax", "argmin", "nextafter", "and", "or", "not", "xor", "population_count", "shift_left",
    "shift_right_logical", "shift_right_arithmetic", "rng_bit_generator", "random_bits",
})
_TRUSTED = frozenset({"custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr"})
NORMAL_IDENTITY = "E_{z~N(μ,σ)}[f(z)] = E_{ε~N(0,1)}[f(μ+σε)]"
RSAMPLE_IDENTITY = "E_{z~D(φ)}[f(z)] = E_{ε~r}[f(g_φ(ε))] (the family's rsample)"


def _is_nondifferentiable(primitive_name: str, out_dtypes: Iterable, allow: frozenset) -> bool:
    if primitive_name in allow:
        return False
    if primitive_name in NONDIFFERENTIABLE:
        return True
    return any(not np.issubdtype(np.dtype(d), np.inexact) for d in out_dtypes if not str(d).startswith("key"))


def _nondifferentiable_inside(jaxpr, allow: frozenset) -> str | None:
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name in _TRUSTED:
            continue
        if _is_nondifferentiable(name, [v.aval.dtype for v in eqn.outvars], allow):
            # loop counters and branch indices are integers by design: only flag float-path primitives
            if name in NONDIFFERENTIABLE:
                return name
        for sub in _jax.sub_jaxprs(eqn.params):
            found = _nondifferentiable_inside(sub, allow)
            if found:
                return found
    return None


def nondifferentiable_path(graph: Graph, site: Site, allow: frozenset = frozenset()) -> tuple[str, str | None] | None:
    """The first primitive with a useless derivative on a path from ``site`` to a cost, or None.

    Returns ``(primitive name, source line)``.
    """
    forward = graph.forward_reach([site.output], through_sites=False)
    # sinks: costs, and the operands of other sites' distributions (their log densities carry the gradient)
    sink_vars = [c.input for c in graph.costs if isinstance(c.input, Var)]
    sink_vars += [a for n in graph.sites if n is not site for a in n.inputs if isinstance(a, Var)]
    backward: set = set()
    for v in sink_vars:
        i = graph.producers.get(v)
        if i is not None:
            backward.add(i)
            backward |= graph.ancestors(graph.nodes[i])
    for i in sorted(forward & backward):
        node = graph.nodes[i]
        if not isinstance(node, Equation):
            continue
        name = node.primitive.name
        if name in _TRUSTED:
            continue
        if _is_nondifferentiable(name, [v.dtype for v in node.outputs], allow):
            return name, node.source
        for sub in _jax.sub_jaxprs(node.params):
            found = _nondifferentiable_inside(sub, allow)
            if found:
                return f"{found} (inside {name})", node.source
    return None


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
    """
    allow = frozenset(allow_primitives)
    candidates, strict = candidate_sites(graph, sites, NAME)
    records, rewritten, described = [], [], []
    nodes = list(graph.nodes)
    consts = list(graph.consts)
    for site in candidates:
        if site.reparameterized or site.enumerated:
            continue
        if not strict and site.name not in graph.param_dependent_sites:
            continue  # nothing to gain: a parameter-free site contributes no score term
        checks = Checks(NAME, site.name, strict)
        checks.check("reparameterizable family", site.reparameterizable and not site.discrete,
                     f"{site.dist.name} has no reparameterized sampler (rsample)"
                     + ("; it is discrete: use the score function, or scg.passes.enumerate" if site.discrete else "")
                     if not (site.reparameterizable and not site.discrete) else f"{site.dist.name} has rsample")
        if checks.all_held:
            # check on the graph as rewritten so far: earlier rewrites change nothing on z's paths
            current = Graph(graph.name, graph.params, graph.params_treedef, graph.param_names, graph.inputs,
                            graph.inputs_treedef, graph.input_names, tuple(consts), tuple(nodes))
            current_site = next(n for n in nodes if isinstance(n, Site) and n.name == site.name)
            bad = nondifferentiable_path(current, current_site, allow)
            detail = ("every path from the site to a cost is differentiable" if bad is None else
                      f"the value reaches a cost through `{bad[0]}`" + (f" at {bad[1]}" if bad[1] else "") +
                      ", whose derivative is zero or undefined almost everywhere, so a pathwise gradient would "
                      "be biased. Keep this site score-function (the default when it is not named), rewrite "
                      "the cost without it, or pass allow_primitives=(...) if the composite is differentiable")
            checks.check("differentiable paths to costs", bad is None, detail)
        records.extend(checks.records)
        if not checks.all_held:
            continue
        index = next(i for i, n in enumerate(nodes) if isinstance(n, Site) and n.name == site.name)
        current_site = nodes[index]
        if _site_is_normal(current_site):
            eps = Var(current_site.output.shape, current_site.output.dtype)
            shape = current_site.output.shape
            noise_dist = dist.Normal(np.zeros(shape, current_site.output.dtype), np.ones(shape, current_site.output.dtype))
            leaves, treedef = jax.tree_util.tree_flatten(noise_dist)
            noise = Site(
                name=f"{site.name}.eps", dist=DistSpec(dist.Normal, treedef, _leaf_names(noise_dist, leaves)),
                inputs=tuple(Literal(np.asarray(x), tuple(np.shape(x)), np.asarray(x).dtype) for x in leaves),
                output=eps, source=current_site.source, key_name=current_site.key_name,
                plates=current_site.plates, discrete=False, enumerable=False, reparameterizable=True)
            new_nodes, outputs, new_consts = emit(_normal_transform(current_site), [*current_site.inputs, eps], NAME,
                                                  f"{NAME}: {site.name} = loc + scale * eps")
            z_new = outputs[0]
            rest = substitute(nodes[index + 1:], {current_site.output: z_new})
            nodes = nodes[:index] + [noise] + new_nodes + rest
            consts += new_consts
            described.append(f"{site.name} ~ {site.dist.name}  ->  {site.name}.eps ~ Normal(0, 1); "
                             f"{site.name} = loc + scale * {site.name}.eps")
        else:
            nodes[index] = current_site.replace(reparameterized=True)
            described.append(f"{site.name} ~ {site.dist.name}  ->  drawn with {site.dist.name}.rsample (pathwise)")
        rewritten.append(site.name)
    new_graph = graph.replace(nodes=tuple(nodes), consts=tuple(consts))
    new_graph = eliminate_dead_code(new_graph) if rewritten else new_graph
    any_normal = any("Normal(0, 1)" in d for d in described)
    identity = NORMAL_IDENTITY if any_normal else RSAMPLE_IDENTITY
    if any_normal and any("rsample" in d for d in described):
        identity = f"{NORMAL_IDENTITY}; {RSAMPLE_IDENTITY}"
    return new_graph, Certificate(NAME, tuple(rewritten), tuple(described), tuple(records), identity,
                                  before=graph, after=new_graph)
