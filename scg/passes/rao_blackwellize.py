r"""Finer Rao-Blackwellization: two certified rewrites that remove terms of zero mean from the estimator.

``split_costs``
    Approximates
        nothing new: it splits a cost written as a sum of terms into one cost per term.
    With
        :math:`\sum c = \sum_i c_i` for ``c = ±c_1 ± c_2 ± …`` (``add``/``sub``/``neg``
        under an optional ``reduce_sum``, each term broadcast to the cost's shape).
        Downstream costs are found per cost, so a site's score then meets only
        the terms it reaches: after ``integrate_kl`` the analytic KL of a site no
        longer multiplies that site's score just because it shares a cost with a
        term that depends on the site.
    Requires
        ``terms with different stochastic ancestors``: a split that changes no
        score's downstream set is not made (nothing to gain).

``drop_own_score``
    Approximates
        the same gradient without the term ``∇_θ log q_θ(z)`` at the site's own
        sample, which has mean zero (NumPyro's ``TraceGraph_ELBO`` drops it too;
        Roeder et al., 2017, "sticking the landing").
    With
        :math:`E_{z\sim q_θ}[∇_θ \log q_θ(z)] = ∫ ∇_θ q_θ = ∇_θ 1 = 0`: the log density's
        operands go through ``stop_gradient``, so its value is unchanged and only
        the zero-mean direct derivative is gone (the score term still comes from
        the site itself).
    Requires
        1. ``q is the site's own distribution`` (same family and operands as the site);
        2. ``enters costs linearly`` with coefficients that do not depend on z
           (the identity holds for the expectation of the term itself only).
"""
from __future__ import annotations

from typing import Iterable

import jax
import jax.numpy as jnp

from scg.ir import Cost, Equation, Graph, LogProb, Scan, Site, Var, eliminate_dead_code, substitute
from scg.passes._common import Checks, candidate_sites
from scg.passes.certificate import Certificate, Precondition
from scg.passes.integrate_kl import _is_own, _nonlinear_use
from scg.trace import emit

SPLIT = "split_costs"
DROP = "drop_own_score"
SPLIT_IDENTITY = "Σ c = Σ_i c_i (a cost split at + and −: each score meets the terms it reaches)"
DROP_IDENTITY = "E_{z~q_θ}[∇_θ log q_θ(z)] = 0 (the direct derivative of log q at its own sample dropped)"


def _terms(graph: Graph, var, sign: float = 1.0) -> list:
    """``[(atom, sign)]`` whose signed sum (broadcast) is ``var``, looking through add, sub and neg."""
    i = graph.producers.get(var) if isinstance(var, Var) else None
    node = graph.nodes[i] if i is not None else None
    if isinstance(node, Equation) and node.primitive.name in ("add", "add_any", "sub"):
        a, b = node.inputs
        return _terms(graph, a, sign) + _terms(graph, b, -sign if node.primitive.name == "sub" else sign)
    if isinstance(node, Equation) and node.primitive.name == "neg":
        return _terms(graph, node.inputs[0], -sign)
    return [(var, sign)]


def split_costs(graph: Graph, sites: Iterable[str] | None = None) -> tuple[Graph, Certificate]:
    """Splits each cost that is a signed sum of terms with different stochastic ancestors.

    Args:
      graph: the graph (not modified).
      sites: ignored (the pass rewrites costs, not sites); accepted so it composes with ``chain``.

    Returns:
      ``(new_graph, certificate)``.

    Examples:
      >>> import jax, jax.numpy as jnp, numpyro.distributions as dist, scg
      >>> @scg.model
      ... def m(params, x):
      ...     b = scg.sample("b", dist.Bernoulli(logits=params["w"]))
      ...     scg.cost("elbo", params["w"] ** 2 + (b - x) ** 2.0)
      >>> graph, cert = scg.passes.split_costs(m.trace({"w": jnp.array(0.3)}, jnp.array(1.0)))
      >>> [c.name for c in graph.costs], graph.downstream_costs
      (['elbo.0', 'elbo.1'], {'b': ('elbo.1',)})
    """
    nodes, consts, described, split = [], list(graph.consts), [], []
    for n in graph.nodes:
        if isinstance(n, Scan):
            body, cert = split_costs(n.body)
            if cert.rewritten:
                n = n.replace(body=body)
                split += cert.rewritten
                described += cert.nodes
            nodes.append(n)
            continue
        if not isinstance(n, Cost) or not isinstance(n.input, Var):
            nodes.append(n)
            continue
        top, reduced = n.input, None
        producer = graph.producers.get(top)
        if producer is not None and isinstance(graph.nodes[producer], Equation) and \
                graph.nodes[producer].primitive.name == "reduce_sum":
            reduced = graph.nodes[producer]
            top = reduced.inputs[0]
        terms = _terms(graph, top)
        if len(terms) < 2 or len({graph.stochastic_ancestors_of([t]) for t, _ in terms}) < 2:
            nodes.append(n)
            continue
        full = top.shape
        for k, (term, sign) in enumerate(terms):
            axes = reduced.params["axes"] if reduced is not None else None

            def piece(t, sign=sign, axes=axes, full=full):
                value = sign * jnp.broadcast_to(t, full)
                return jnp.sum(value, axis=axes) if axes is not None else value

            new_nodes, (out,), new_consts = emit(piece, [term], SPLIT, n.source)
            nodes += new_nodes
            consts += new_consts
            nodes.append(Cost(f"{n.name}.{k}", out, n.source, n.plates))
        split.append(n.name)
        described.append(f"cost {n.name!r} -> {len(terms)} costs {n.name}.0 … {n.name}.{len(terms) - 1}")
    if not split:
        return graph, Certificate(SPLIT, (), (), (), SPLIT_IDENTITY, before=graph, after=graph,
                                  notes=("no cost is a sum of terms with different stochastic ancestors",))
    new_graph = eliminate_dead_code(graph.replace(nodes=tuple(nodes), consts=tuple(consts)))
    return new_graph, Certificate(SPLIT, tuple(split), tuple(described), (), SPLIT_IDENTITY, before=graph,
                                  after=new_graph)


def drop_own_score(graph: Graph, sites: Iterable[str] | None = None) -> tuple[Graph, Certificate]:
    """Stops the gradient of ``log q(z)`` through ``q``'s operands where ``q`` is ``z``'s own distribution.

    Args:
      graph: the graph (not modified).
      sites: names of sites whose log densities to rewrite (a named site whose
        precondition fails raises :class:`scg.PreconditionError`); default: every
        sampled site where the preconditions hold.

    Returns:
      ``(new_graph, certificate)``.

    Examples:
      >>> import jax, jax.numpy as jnp, numpyro.distributions as dist, scg
      >>> @scg.model
      ... def m(params, x):
      ...     q = dist.Bernoulli(logits=params["w"])
      ...     b = scg.sample("b", q)
      ...     scg.cost("elbo", scg.log_prob(q, b) + (b - x) ** 2.0)
      >>> graph, cert = scg.passes.drop_own_score(m.trace({"w": jnp.array(0.3)}, jnp.array(1.0)))
      >>> cert.rewritten
      ('b',)
    """
    candidates, strict = candidate_sites(graph, sites, DROP)
    by_value: dict = {}
    for n in graph.nodes:
        if isinstance(n, LogProb):
            by_value.setdefault(n.value, []).append(n)
    records, chosen, notes = [], {}, []
    for site in candidates:
        if site.reparameterized or site.enumerated:
            notes.append(f"{site.name}: skipped, not a sampled score-function site")
            continue
        own = [lp for lp in by_value.get(site.output, []) if _is_own(lp, site)]
        if not own:
            if strict:
                Checks(DROP, site.name, True).check("q is the site's own distribution", False,
                                                    "no scg.log_prob(q, z) with the site's own distribution")
            continue
        z_reach = graph.forward_reach([site.output]) | {graph.producers[site.output]}
        for lp in own:
            checks = Checks(DROP, site.name, strict)
            checks.check("q is the site's own distribution", True, f"q = {site.dist.name}")
            why = _nonlinear_use(graph, lp.output, z_reach)
            checks.check("enters costs linearly", why is None,
                         f"the direct derivative has mean zero only for the term itself, but {why}" if why
                         else "only linear operations with z-free coefficients lead to costs")
            records.extend(checks.records)
            if checks.all_held:
                chosen[lp] = site.name
    if not chosen:
        return graph, Certificate(DROP, (), (), tuple(records), DROP_IDENTITY, before=graph, after=graph,
                                  notes=tuple(notes))
    nodes, consts = [], list(graph.consts)
    for n in graph.nodes:
        if n in chosen:
            stopped = []
            for a in n.dist_inputs:
                if isinstance(a, Var):
                    new_nodes, (out,), new_consts = emit(jax.lax.stop_gradient, [a], DROP, n.source,
                                                         cache_key="stop_gradient")
                    nodes += new_nodes
                    consts += new_consts
                    a = out
                stopped.append(a)
            n = n.replace(dist_inputs=tuple(stopped))
        nodes.append(n)
    new_graph = graph.replace(nodes=tuple(nodes), consts=tuple(consts))
    rewritten = tuple(dict.fromkeys(chosen.values()))
    described = tuple(f"log q({name}) at its own sample: the operands of q under stop_gradient" for name in rewritten)
    return new_graph, Certificate(DROP, rewritten, described, tuple(records), DROP_IDENTITY, before=graph,
                                  after=new_graph, notes=tuple(notes))
