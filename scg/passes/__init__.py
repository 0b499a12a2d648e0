"""Certified passes: each is a plain function ``Graph -> (Graph, Certificate)``.

Every pass takes an optional ``sites=`` (names to restrict it to; default:
every site where its preconditions hold), never mutates its input, refuses
with a :class:`scg.PreconditionError` naming the site and the precondition when
a site named in ``sites=`` fails one, and records every check in its certificate.
:func:`chain` composes passes into one; ``auto`` is one such chain.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

from scg.ir import Graph
from scg.passes.certificate import Certificate as Certificate, Precondition as Precondition
from scg.passes.enumerate import enumerate as enumerate  # noqa: A004 - the public name
from scg.passes.integrate_kl import integrate_kl as integrate_kl
from scg.passes.rao_blackwellize import drop_own_score as drop_own_score, split_costs as split_costs
from scg.passes.reparameterize import reparameterize as reparameterize
from scg.verify import VerifyReport as VerifyReport


def chain(*passes: Callable) -> Callable:
    """Composes passes left to right; the certificate of the chain lists each pass's certificate.

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
      >>> both = scg.passes.chain(scg.passes.integrate_kl, scg.passes.reparameterize)
      >>> new_graph, cert = both(graph)
      >>> cert.pass_name, cert.rewritten
      ('integrate_kl → reparameterize', ('z',))
    """

    def chained(graph, sites=None):
        certificates = []
        for p in passes:
            graph, cert = _check_pass_result(p, p(graph, sites=sites) if sites is not None else p(graph))
            certificates.append(cert)
        first, last = certificates[0].before if certificates else graph, graph
        cert = Certificate(
            pass_name=" → ".join(c.pass_name for c in certificates),
            rewritten=tuple(dict.fromkeys(s for c in certificates for s in c.rewritten)),
            nodes=tuple(n for c in certificates for n in c.nodes),
            preconditions=tuple(p for c in certificates for p in c.preconditions),
            identity="; ".join(c.identity for c in certificates if c.rewritten) or "(no rewrite)",
            before=first, after=last,
            notes=tuple(f"{c.pass_name}: {n}" for c in certificates for n in getattr(c, "notes", ())))
        return graph, cert

    chained.__name__ = "chain(" + ", ".join(getattr(p, "__name__", "?") for p in passes) + ")"
    return chained


def auto(graph, sites=None):
    """The default pipeline: ``integrate_kl`` wherever its pattern matches, then
    ``reparameterize`` wherever certified; every other site stays score-function.

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
      >>> new_graph, cert = scg.passes.auto(graph)
      >>> [site.name for site in new_graph.sites]
      ['z.eps']
    """
    return chain(integrate_kl, reparameterize)(graph, sites=sites)


def _pass_name(p: Any) -> str:
    return getattr(p, "__name__", None) or repr(p)


def _check_pass_result(p: Callable, result: Any) -> tuple:
    """``result`` as ``(graph, certificate)``; a TypeError naming the pass when it returned anything else."""
    if (isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], Graph)
            and isinstance(result[1], Certificate)):
        return result
    got = (f"a tuple of ({', '.join(type(x).__name__ for x in result)})" if isinstance(result, tuple)
           else f"a {type(result).__name__}")
    raise TypeError(
        f"pass {_pass_name(p)!r} returned {got}; a pass returns (graph, certificate): the new scg.Graph and an "
        "scg.passes.Certificate(pass_name, rewritten, nodes, preconditions, identity, before=graph, "
        "after=new_graph) recording what it did")


def rao_blackwellize(graph, sites=None):
    """``split_costs`` then ``drop_own_score``: the two zero-mean terms of a score estimator, removed.

    Opt-in (it renames split costs ``c.0``, ``c.1``, ...): ``passes=["integrate_kl",
    "rao_blackwellize", "reparameterize"]`` or after ``auto``.

    Examples:
      >>> import jax, jax.numpy as jnp, numpyro.distributions as dist, scg
      >>> @scg.model
      ... def m(params, x):
      ...     q = dist.Bernoulli(logits=params["w"])
      ...     b = scg.sample("b", q)
      ...     scg.cost("elbo", scg.log_prob(q, b) - scg.log_prob(dist.Bernoulli(0.5), b) + (b - x) ** 2.0)
      >>> graph, cert = scg.passes.rao_blackwellize(m.trace({"w": jnp.array(0.3)}, jnp.array(1.0)))
      >>> cert.pass_name
      'split_costs → drop_own_score'
    """
    return chain(split_costs, drop_own_score)(graph, sites=sites)


_BY_NAME = {"auto": auto, "reparameterize": reparameterize, "integrate_kl": integrate_kl, "enumerate": enumerate,
            "split_costs": split_costs, "drop_own_score": drop_own_score, "rao_blackwellize": rao_blackwellize}


def resolve_passes(passes: Any) -> list:
    """``"auto"`` | ``None`` | ``"none"`` | ``[]`` | a sequence of passes or pass names -> list of passes.

    Examples:
      >>> import scg
      >>> [p.__name__ for p in scg.passes.resolve_passes(["integrate_kl", scg.passes.reparameterize])]
      ['integrate_kl', 'reparameterize']
      >>> scg.passes.resolve_passes("none")
      []
    """
    if passes is None or (isinstance(passes, str) and passes == "none"):
        return []
    if isinstance(passes, str):
        passes = [passes]
    if callable(passes):
        passes = [passes]
    if not isinstance(passes, (list, tuple)):
        raise TypeError(f"passes= must be 'auto', None/'none'/[], a pass, or a list of passes (functions "
                        f"Graph -> (Graph, Certificate)) or pass names {sorted(_BY_NAME)}; got "
                        f"{type(passes).__name__} {passes!r:.60}")
    out = []
    for i, p in zip(range(len(passes)), passes):  # `enumerate` is the pass here
        if isinstance(p, str):
            if p not in _BY_NAME:
                raise ValueError(f"unknown pass {p!r} in passes= (item {i}); known passes: {sorted(_BY_NAME)}")
            p = _BY_NAME[p]
        if not callable(p):
            raise TypeError(f"passes= item {i}: a pass must be a function Graph -> (Graph, Certificate) or a pass "
                            f"name {sorted(_BY_NAME)}, got {type(p).__name__} {p!r:.60}")
        out.append(p)
    return out
