"""The record every pass returns: what it rewrote, which preconditions held, which identity it used."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax

from scg.errors import check_key
from scg.verify import verify_rewrite


@dataclasses.dataclass(frozen=True)
class Precondition:
    """One precondition checked on one site: its name, whether it held, and why."""

    site: str
    name: str
    held: bool
    detail: str = ""

    def __str__(self) -> str:
        mark = "held" if self.held else "FAILED"
        return f"{self.site}: {self.name}: {mark}{' — ' + self.detail if self.detail else ''}"


@dataclasses.dataclass(frozen=True)
class Certificate:
    """A frozen record of one pass over one graph.

    Attributes:
      pass_name: the pass.
      rewritten: the sites (or log-density terms) the pass rewrote.
      nodes: a description of each node added or replaced.
      preconditions: every precondition checked, held or not (failures on sites
        not named in ``sites=`` are recorded here and the site left as it was).
      identity: the expectation-preserving identity the rewrite relies on.
      before, after: the graphs, so :meth:`verify` can compare them.
      notes: why sites were left alone (e.g. already rewritten by an earlier
        pass), so a pass that rewrote nothing says why.
    """

    pass_name: str
    rewritten: tuple
    nodes: tuple
    preconditions: tuple
    identity: str
    before: Any = dataclasses.field(repr=False, compare=False, default=None)
    after: Any = dataclasses.field(repr=False, compare=False, default=None)
    notes: tuple = ()

    def __str__(self) -> str:
        lines = [f"certificate: {self.pass_name}",
                 f"  identity: {self.identity}",
                 f"  rewritten: {', '.join(self.rewritten) if self.rewritten else '(nothing)'}"]
        lines += [f"  node: {n}" for n in self.nodes]
        lines += [f"  precondition {p}" for p in self.preconditions]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)

    def verify(self, params: Any, *args: Any, key: jax.Array, num_samples: int = 2000, **options: Any):
        """Checks on this instance that the pass preserved ``E[loss]`` and ``∇E[loss]``.

        Exactly (``scg.expectation`` of both graphs) where the graph allows it;
        otherwise by Monte Carlo, comparing both estimators' means through their
        standard errors. Returns a :class:`scg.passes.VerifyReport`.

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
          >>> _, cert = scg.passes.integrate_kl(graph)
          >>> cert.verify(params, x, key=jax.random.key(0)).ok
          True
        """
        check_key(key, "Certificate.verify")
        return verify_rewrite(self, params, *args, key=key, num_samples=num_samples, **options)


Pass = Callable[..., tuple]
