"""``integrate_kl``: replace a sampled KL (or log density) by its analytic expectation.

Approximates
    nothing: it removes sampling noise from log-density terms of a site ``z ~ q``.
With
    the identities ``E_{z~q}[log q(z) − log p(z)] = KL(q‖p)`` (numpyro's
    ``kl_divergence`` registry: Normal/Normal, Categorical/Categorical,
    ``Independent`` wrappers, Beta, Gamma, Dirichlet, ...; scg registers the
    Bernoulli and logits-parametrized Categorical pairs numpyro lacks, see
    :mod:`scg.kl`) and ``E_{z~q}[log q(z)] = −H(q)`` for a lone ``log q(z)``.
    Both are conditional on ``q``'s and ``p``'s parameters, so the term becomes a
    deterministic function of them; the downstream-cost sets are recomputed
    from the new graph, so ``z``'s score term (if ``z`` stays score-function) no
    longer multiplies it.
Requires
    1. ``q is the site's own distribution``: the ``scg.log_prob(q, z)`` term uses
       the same family and the same operands as the site;
    2. ``p does not depend on z``: no operand of ``p`` is downstream of ``z``;
    3. ``KL registered`` (``entropy known`` for a lone ``log q``);
    4. ``enters costs linearly``: from the term to the costs only sums,
       differences, negation, reshapes and products or quotients by factors that
       are not downstream of ``z`` (linearity is what lets ``E`` move inside).
    Unlike Certigrad, the KL need not be the first cost, nor be preceded by no
    random node: the pattern is found anywhere under these conditions.
"""
from __future__ import annotations

from typing import Iterable

import jax
import jax.numpy as jnp
import numpy as np
from numpyro.distributions import kl_divergence

from scg import _jax
from scg.passes import _kl as _registers_missing_kl_rules  # noqa: F401
from scg.ir import (Check, Cost, Equation, Graph, Literal, LogProb, Scan, Site, Var, all_sites,
                    eliminate_dead_code, splice)
from scg.passes._common import Checks, candidate_sites
from scg.passes.certificate import Certificate
from scg.trace import emit

NAME = "integrate_kl"
KL_IDENTITY = "E_q[log q(z) − log p(z)] = KL(q‖p)"
ENTROPY_IDENTITY = "E_q[log q(z)] = −H(q)"


def _same_atom(a, b) -> bool:
    if a is b:
        return True
    if isinstance(a, Literal) and isinstance(b, Literal):
        return a.shape == b.shape and np.array_equal(np.asarray(a.value), np.asarray(b.value))
    return False


def _is_own(lp: LogProb, site: Site) -> bool:
    return (lp.dist.same_as(site.dist) and len(lp.dist_inputs) == len(site.inputs)
            and all(_same_atom(a, b) for a, b in zip(lp.dist_inputs, site.inputs)))


def _nonlinear_use(graph: Graph, start: Var, z_reach: frozenset, results: frozenset = frozenset()) -> str | None:
    """Why ``start`` does not enter the costs linearly (None when it does).

    ``results``: in a loop body, the body's results; a term that flows into them leaves the step
    (into the carry or the stacked outputs), where linearity is not checked, so it is refused.
    """
    term_vars = {start}
    for i, n in enumerate(graph.nodes):
        used = [k for k, a in enumerate(n.inputs) if isinstance(a, Var) and a in term_vars]
        if not used:
            continue
        if isinstance(n, (Cost, Check)):
            continue
        if isinstance(n, Scan):
            return f"it flows into the loop {n.name}"
        if not isinstance(n, Equation):
            return f"it is an operand of {'site ' + repr(n.name) if isinstance(n, Site) else 'a log density'}"
        name = n.primitive.name
        others = [a for k, a in enumerate(n.inputs) if k not in used]
        downstream_other = any(isinstance(a, Var) and graph.producers.get(a) in z_reach for a in others)
        kind = _jax.linearity(name)
        if kind == "linear":
            if name == "convert_element_type" and not np.issubdtype(np.dtype(n.outputs[0].dtype), np.floating):
                return "it is cast to a non-float type"
        elif kind == "scaling":
            if len(used) > 1:
                return f"it is multiplied by itself through `{name}`"
            if downstream_other:
                return f"it is multiplied through `{name}` by a factor that depends on the site"
        elif kind == "divide":
            if used != [0]:
                return "it is a divisor"
            if downstream_other:
                return "it is divided by a factor that depends on the site"
        else:
            return f"it passes through the nonlinear `{name}`" + (f" at {n.source}" if n.source else "")
        term_vars.update(n.outputs)
    if term_vars & results:
        return "it is returned from the loop body (into the carry or the stacked results)"
    return None


def _log_density_behind(graph: Graph, var: Var):
    """The LogProb node behind ``var``, looking through casts and broadcasts (None if there is none).

    A broadcast only repeats the term, and the replacement is broadcast to the
    same shape, so the identity holds element by element.
    """
    while var in graph.producers:
        node = graph.nodes[graph.producers[var]]
        if isinstance(node, LogProb):
            return node
        if not (isinstance(node, Equation) and node.primitive.name in _jax.SHAPE_ONLY and isinstance(node.inputs[0], Var)
                and np.issubdtype(np.dtype(node.outputs[0].dtype), np.floating)):
            return None
        var = node.inputs[0]
    return None


def _abstract(atoms) -> list:
    return [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in atoms]


def _abstract_ok(fn, *abstract_args) -> tuple[bool, str]:
    try:
        jax.eval_shape(fn, *abstract_args)
        return True, ""
    except NotImplementedError as e:
        return False, str(e) or "not implemented"


def integrate_kl(graph: Graph, sites: Iterable[str] | None = None) -> tuple[Graph, Certificate]:  # noqa: D417
    """Replaces ``log q(z) − log p(z)`` by ``KL(q‖p)`` and a lone ``log q(z)`` by ``−H(q)``.

    Args:
      graph: the graph (not modified).
      sites: names of sites whose log-density terms to integrate; a named site
        with no matching term, or whose term fails a precondition, raises
        :class:`scg.PreconditionError`. Default: wherever the pattern matches.

    Returns:
      ``(new_graph, certificate)``.

    Examples:
      >>> import jax, jax.numpy as jnp, numpyro.distributions as dist, scg
      >>> @scg.model
      ... def m(params, x):
      ...     q = dist.Normal(params["mu"], 1.0)
      ...     z = scg.sample("z", q)
      ...     scg.cost("fit", (z - x) ** 2)
      ...     scg.cost("kl", scg.log_prob(q, z) - scg.log_prob(dist.Normal(0.0, 1.0), z))
      >>> params, x = {"mu": jnp.array(0.5)}, jnp.array(1.0)
      >>> graph = m.trace(params, x)
      >>> new_graph, cert = scg.passes.integrate_kl(graph)
      >>> cert.rewritten, cert.identity
      (('z',), 'E_q[log q(z) − log p(z)] = KL(q‖p)')
      >>> round(float(scg.expectation(new_graph, params, x)), 5)   # 1.25 + KL = 1.25 + 0.125
      1.375
    """
    return _integrate_kl(graph, sites, frozenset())


def _integrate_kl(graph: Graph, sites: Iterable[str] | None, results: frozenset) -> tuple[Graph, Certificate]:
    """The pass on one graph; ``results`` are a loop body's results (empty outside loops)."""
    named = None if sites is None else ([sites] if isinstance(sites, str) else list(sites))
    inside = {s.name for s in all_sites(graph)} - {s.name for s in graph.sites}
    candidates, strict = candidate_sites(graph, None if named is None else [n for n in named if n not in inside],
                                         NAME)
    nodes = list(graph.nodes)
    consts = list(graph.consts)
    records, rewritten, described, identities, notes = [], [], [], set(), []
    integrated_before = {n.source for n in graph.nodes if isinstance(n, Equation) and isinstance(n.source, str)
                         and n.source.startswith(f"{NAME}:")}

    def current_graph() -> Graph:
        return graph.with_nodes(nodes, consts)

    # the sites some scg.log_prob reads, found once: a site without one costs nothing below
    measured = {n.value for n in graph.nodes if isinstance(n, LogProb)}
    for site in candidates:
        if site.enumerated:
            notes.append(f"{site.name}: skipped, summed exactly by an earlier enumerate pass (no sampled log "
                         "density to integrate)")
            continue
        if site.output in measured:
            g = current_graph()
            site_now = next(n for n in g.sites if n.name == site.name)
            z_reach = g.forward_reach([site_now.output]) | {g.producers[site_now.output]}
            log_probs = [n for n in g.nodes if isinstance(n, LogProb) and n.value is site_now.output]
        else:
            g, site_now, z_reach, log_probs = None, site, frozenset(), []
        checks = Checks(NAME, site.name, strict)
        if not log_probs:
            if strict:
                checks.check("log-density term present", False,
                             "no scg.log_prob(..., value) of this site was found; write the sampled KL as "
                             "scg.log_prob(q, z) - scg.log_prob(p, z)")
            key = site.key_name
            if site.name == f"{key}.eps":
                notes.append(f"{site.name}: skipped, it is the noise site an earlier reparameterize put in place of "
                             f"{key!r}; the scg.log_prob(q, {key}) terms now take the transformed value "
                             f"{key} = g({site.name}), not a sample of this site's own distribution, so there is no "
                             "log q of the site to integrate. Run integrate_kl before reparameterize (as "
                             "passes='auto' does)")
            elif integrated_before & {f"{NAME}: KL({site.name})", f"{NAME}: -H({site.name})"}:
                notes.append(f"{site.name}: skipped, its log-density terms were already integrated by an earlier "
                             "integrate_kl")
            else:
                notes.append(f"{site.name}: skipped, no scg.log_prob(..., {site.name}) term of this site in the graph")
            continue
        own = [lp for lp in log_probs if _is_own(lp, site_now)]
        foreign = [lp for lp in log_probs if not _is_own(lp, site_now)]
        # pairs: sub(log q(z), log p(z)) where the first is the site's own distribution
        pairs = []
        for n in g.nodes:
            if isinstance(n, Equation) and n.primitive.name == "sub" and all(isinstance(a, Var) for a in n.inputs):
                a, b = (_log_density_behind(g, x) for x in n.inputs)
                if isinstance(a, LogProb) and isinstance(b, LogProb) and a in log_probs and b in log_probs:
                    pairs.append((n, a, b))
        if not own:
            checks.check("q is the site's own distribution", False,
                         f"the log densities at {site.name!r} use {', '.join(lp.dist.name for lp in foreign)} with "
                         f"operands other than the site's own {site.dist.name}; write scg.log_prob(q, z) with the "
                         "very distribution object passed to scg.sample")
            records.extend(checks.records)
            continue
        handled = set()
        for sub_node, q_lp, p_lp in pairs:
            pair_checks = Checks(NAME, site.name, strict)
            if not pair_checks.check("q is the site's own distribution", _is_own(q_lp, site_now),
                                     "the first log density is not the site's own distribution"
                                     if not _is_own(q_lp, site_now) else f"q = {site.dist.name}"):
                records.extend(pair_checks.records)
                continue
            p_depends = any(isinstance(a, Var) and (a is site_now.output or g.producers.get(a) in z_reach)
                            for a in p_lp.dist_inputs)
            pair_checks.check("p does not depend on z", not p_depends,
                              f"the operands of p ({p_lp.dist.name}) are computed from {site.name!r}, so "
                              "E_q[log p(z)] is not KL-shaped" if p_depends else f"p = {p_lp.dist.name}")
            if pair_checks.all_held:
                ok, why = _abstract_ok(lambda ql, pl: kl_divergence(q_lp.dist.build(ql), p_lp.dist.build(pl)),
                                       _abstract(q_lp.dist_inputs), _abstract(p_lp.dist_inputs))
                pair_checks.check("KL registered", ok,
                                  f"numpyro registers no kl_divergence({q_lp.dist.name}, {p_lp.dist.name}): {why}; "
                                  "register one with numpyro.distributions.kl.register_kl" if not ok else
                                  f"KL({q_lp.dist.name}‖{p_lp.dist.name}) is registered")
            if pair_checks.all_held:
                why = _nonlinear_use(g, sub_node.outputs[0], z_reach, results)
                pair_checks.check("enters costs linearly", why is None,
                                  f"the sampled KL cannot be replaced by its expectation because {why}"
                                  if why else "only linear operations lead to costs")
            records.extend(pair_checks.records)
            if not pair_checks.all_held:
                continue
            shape = sub_node.outputs[0].shape
            n_q = len(q_lp.dist_inputs)

            def analytic_kl(*leaves, q_lp=q_lp, p_lp=p_lp, n_q=n_q, shape=shape):
                q = q_lp.dist.build(leaves[:n_q])
                p = p_lp.dist.build(leaves[n_q:])
                return jnp.broadcast_to(kl_divergence(q, p), shape).astype(sub_node.outputs[0].dtype)

            new_nodes, outputs, new_consts = emit(analytic_kl, [*q_lp.dist_inputs, *p_lp.dist_inputs], NAME,
                                                  f"{NAME}: KL({site.name})")
            nodes = splice(nodes, nodes.index(sub_node), new_nodes, {sub_node.outputs[0]: outputs[0]})
            consts += new_consts
            handled.add(q_lp)
            identities.add(KL_IDENTITY)
            described.append(f"log q({site.name}) − log p({site.name}) -> KL({q_lp.dist.name}‖{p_lp.dist.name})")
            g = current_graph()
            z_reach = g.forward_reach([site_now.output]) | {g.producers[site_now.output]}
        # a lone log q(z) (not part of an integrated pair) -> −H(q)
        for q_lp in own:
            if q_lp in handled or q_lp not in nodes:
                continue
            g = current_graph()
            if not g.consumers.get(q_lp.output):
                continue
            lone_checks = Checks(NAME, site.name, strict and not pairs)
            ok, why = _abstract_ok(lambda ql: q_lp.dist.build(ql).entropy(), _abstract(q_lp.dist_inputs))
            lone_checks.check("entropy known", ok, f"{q_lp.dist.name}.entropy is not implemented: {why}"
                              if not ok else f"H({q_lp.dist.name}) is known")
            if lone_checks.all_held:
                why = _nonlinear_use(g, q_lp.output, z_reach, results)
                lone_checks.check("enters costs linearly", why is None,
                                  f"log q cannot be replaced by −H(q) because {why}" if why else
                                  "only linear operations lead to costs")
            records.extend(lone_checks.records)
            if not lone_checks.all_held:
                continue
            shape, dtype = q_lp.output.shape, q_lp.output.dtype

            def negative_entropy(*leaves, q_lp=q_lp, shape=shape, dtype=dtype):
                return jnp.broadcast_to(-q_lp.dist.build(leaves).entropy(), shape).astype(dtype)

            new_nodes, outputs, new_consts = emit(negative_entropy, list(q_lp.dist_inputs), NAME,
                                                  f"{NAME}: -H({site.name})")
            nodes = splice(nodes, nodes.index(q_lp), new_nodes, {q_lp.output: outputs[0]})
            consts += new_consts
            identities.add(ENTROPY_IDENTITY)
            described.append(f"log q({site.name}) -> −H({q_lp.dist.name})")
            handled.add(q_lp)
        if handled:
            rewritten.append(site.name)
        elif strict and not any(not r.held for r in records if r.site == site.name):
            raise_checks = Checks(NAME, site.name, True)
            raise_checks.check("log-density term present", False,
                               "no log q(z) − log p(z) term nor lone log q(z) of the site's own distribution "
                               "reaches a cost")
    for i, n in enumerate(nodes):  # sites inside loop bodies: the same pass on each body
        if isinstance(n, Scan):
            body_results = frozenset(a for a in n.body_outputs if isinstance(a, Var))
            body, cert = _integrate_kl(n.body, named, body_results)
            if cert.rewritten:
                nodes[i] = n.replace(body=body)
                identities.update(i.strip() for i in cert.identity.split(";"))
            rewritten += cert.rewritten
            described += cert.nodes
            records += cert.preconditions
            notes += cert.notes
    new_graph = graph.replace(nodes=tuple(nodes), consts=tuple(consts))
    if rewritten:
        new_graph = eliminate_dead_code(new_graph, keep=results)
    identity = "; ".join(sorted(identities)) or KL_IDENTITY
    return new_graph, Certificate(NAME, tuple(rewritten), tuple(described), tuple(records), identity,
                                  before=graph, after=new_graph, notes=tuple(notes))
