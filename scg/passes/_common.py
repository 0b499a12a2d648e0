"""Pieces every pass shares: choosing the sites, recording preconditions, refusing."""
from __future__ import annotations

from typing import Iterable

from scg.errors import PreconditionError
from scg.ir import Graph, Site
from scg.passes.certificate import Precondition


def candidate_sites(graph: Graph, sites: Iterable[str] | None, pass_name: str) -> tuple[list[Site], bool]:
    """The sites a pass considers, and whether the user named them (then failures raise)."""
    if sites is None:
        return list(graph.sites), False
    if isinstance(sites, str):
        sites = [sites]
    names = list(sites)
    known = {s.name: s for s in graph.sites}
    for n in names:
        if n not in known:
            raise PreconditionError(
                f"the graph has no such site (its sites: {', '.join(map(repr, known)) or 'none'})",
                pass_name=pass_name, site=n, precondition="site exists")
    return [known[n] for n in names], True


class Checks:
    """Collects preconditions of one site; raises on the first failure when the site was named."""

    def __init__(self, pass_name: str, site: str, strict: bool):
        self.pass_name, self.site, self.strict = pass_name, site, strict
        self.records: list[Precondition] = []

    def check(self, name: str, held: bool, detail: str = "") -> bool:
        self.records.append(Precondition(self.site, name, bool(held), detail))
        if not held and self.strict:
            raise PreconditionError(detail, pass_name=self.pass_name, site=self.site, precondition=name)
        return bool(held)

    @property
    def all_held(self) -> bool:
        return all(r.held for r in self.records)
