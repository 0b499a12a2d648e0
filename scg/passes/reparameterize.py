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
from scg.ir import DistSpec, Equation, Graph, Literal, Site, Var, eliminate_dead_code, splice
from scg.passes._common import Checks, candidate_sites
from scg.passes.certificate import Certificate
from scg.trace import _leaf_names, emit

NAME = "reparameterize"
NORMAL_IDENTITY = "E_{z~N(μ,σ)}[f(z)] = E_{ε~N(0,1)}[f(μ+σε)]"
RSAMPLE_IDENTITY = "E_{z~D(φ)}[f(z)] = E_{ε~r}[f(g_φ(ε))] (the family's rsample)"


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
        if _jax.has_zero_derivative(name, [v.dtype for v in node.outputs], allow):
            return name, node.source
        if name in _jax.TRUSTED_DERIVATIVE:
            continue
        found = _jax.zero_derivative_inside(node.params, allow)
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
            current = graph.with_nodes(nodes, consts)
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
            nodes = splice(nodes, index, [noise, *new_nodes], {current_site.output: z_new})
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
