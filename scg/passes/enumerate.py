"""``enumerate``: exact marginalization of discrete sites with a small finite support.

Approximates
    nothing: the site contributes no sampling noise.
With
    ``E_{z~p_φ}[f(z)] = Σ_{v ∈ supp} p_φ(v) f(v)``: the rest of the graph is
    evaluated for every value of the site at once (``vmap`` over the joint
    support of its elements) and weighted by the probabilities, which carry the
    gradient with respect to ``φ``. Several sites are enumerated jointly
    (nested); downstream sites that are not enumerated are still sampled in
    each branch.
Requires
    1. ``finite support``: the family has ``enumerate_support``;
    2. ``joint support within budget``: the product of the enumerated sites'
       joint supports is at most ``budget`` points (it grows as ``m ** n`` for
       ``n`` elements of support ``m``, which is why this pass is opt-in and not
       part of ``auto``).
"""
from __future__ import annotations

from typing import Iterable

from scg import integrate
from scg.errors import BudgetError, IntractableError
from scg.ir import Graph, Site
from scg.passes._common import Checks, candidate_sites
from scg.passes.certificate import Certificate, Precondition

NAME = "enumerate"
IDENTITY = "E_{z~p}[f(z)] = Σ_{v∈supp(p)} p(v) f(v)"


def enumerate(graph: Graph, sites: Iterable[str] | None = None, *, budget: int = 4096) -> tuple[Graph, Certificate]:  # noqa: A001
    """Marks discrete sites for exact summation over their support.

    Args:
      graph: the graph (not modified).
      sites: names of the sites to enumerate (a named site that fails a
        precondition raises :class:`scg.PreconditionError`); default: every
        discrete site with ``enumerate_support``.
      budget: the largest joint support (number of branches) allowed.

    Returns:
      ``(new_graph, certificate)``. Raises :class:`scg.BudgetError` naming the
      support sizes when the joint support exceeds ``budget``.

    Examples:
      >>> import jax, jax.numpy as jnp, numpyro.distributions as dist, scg
      >>> @scg.model
      ... def m(params, x):
      ...     b = scg.sample("b", dist.Bernoulli(logits=params["w"]))
      ...     scg.cost("err", (b - x) ** 2.0)
      >>> params, x = {"w": jnp.array(0.0)}, jnp.array(1.0)
      >>> graph, cert = scg.passes.enumerate(m.trace(params, x))
      >>> cert.rewritten
      ('b',)
      >>> float(scg.compile(graph, passes=[]).loss(params, x, key=jax.random.key(0)))  # exact: P(b = 0)
      0.5
    """
    candidates, strict = candidate_sites(graph, sites, NAME)
    records, chosen, notes = [], [], []
    already = [s for s in graph.sites if s.enumerated]
    for site in candidates:
        if site.enumerated:
            notes.append(f"{site.name}: skipped, already enumerated by an earlier enumerate pass")
            continue
        if not strict and not site.discrete:
            notes.append(f"{site.name}: skipped, {site.dist.name} is continuous (no finite support to sum over)"
                         + (" and already drawn pathwise by reparameterize" if site.reparameterized else ""))
            continue
        checks = Checks(NAME, site.name, strict)
        sized = ""
        if site.enumerable and not site.reparameterized:
            try:
                integrate.site_grid_size(site, integrate.DEFAULT_ORDER, graph=graph, what="")
            except IntractableError as e:
                sized = str(e)  # a support set by a traced operand (Binomial's total_count from params)
        checks.check("finite support", site.enumerable and not site.reparameterized and not sized,
                     f"{site.dist.name} has no enumerate_support" if not site.enumerable else sized or
                     f"{site.dist.name} has a finite support")
        records.extend(checks.records)
        if checks.all_held:
            chosen.append(site)
    sizes = {s.name: integrate.site_grid_size(s, integrate.DEFAULT_ORDER, graph=graph, what=NAME)
             for s in already + chosen}
    total = 1
    for v in sizes.values():
        total *= v
    if total > budget:
        detail = ", ".join(f"{k}: {v:,}" for k, v in sizes.items())
        raise BudgetError(
            f"enumerate: the joint support of the enumerated sites has {total:,} values ({detail}), above the "
            f"budget of {budget:,}. Enumerate fewer sites (sites=[...]) or raise budget=... if the compute "
            "allows (each value is one evaluation of the downstream graph).", size=total, budget=budget)
    records += [Precondition(s.name, "joint support within budget", True, f"{total:,} ≤ {budget:,}") for s in chosen]
    names = {s.name for s in chosen}
    nodes = tuple(n.replace(enumerated=True) if isinstance(n, Site) and n.name in names else n for n in graph.nodes)
    new_graph = graph.replace(nodes=nodes)
    described = tuple(f"{s.name} ~ {s.dist.name}: summed over {sizes[s.name]:,} values" for s in chosen)
    return new_graph, Certificate(NAME, tuple(s.name for s in chosen), described, tuple(records), IDENTITY,
                                  before=graph, after=new_graph, notes=tuple(notes))
