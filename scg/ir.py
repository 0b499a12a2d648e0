"""The SCG intermediate representation: an immutable graph of nodes in topological order.

A :class:`Graph` holds the parameters (the model's first argument, flattened),
the data inputs, constants, and a tuple of nodes:

* :class:`Equation` — a deterministic node: one JAX primitive applied to its inputs;
* :class:`Site` — a stochastic node ``value ~ family(*operands)``;
* :class:`LogProb` — ``log family(*operands).log_prob(value)``, written with
  ``scg.log_prob`` so passes can see it;
* :class:`Cost` — an array whose elements are summed into the loss.

Nodes and graphs are frozen; passes build new ones with :meth:`Graph.replace`
and :func:`dataclasses.replace`. Dependency queries (ancestors, the downstream
costs of each site) are methods of the graph, computed once and cached.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence, Union

import jax
import numpy as np

from scg import _jax
from scg.errors import ModelError

_ids = itertools.count()


@dataclass(frozen=True, eq=False)
class Var:
    """A value in the graph: an array of a fixed shape and dtype. Compared by identity."""

    shape: tuple
    dtype: Any
    id: int = field(default_factory=lambda: next(_ids))

    def __repr__(self) -> str:
        return f"Var#{self.id}:{_type_str(self.shape, self.dtype)}"


@dataclass(frozen=True, eq=False)
class Literal:
    """A constant operand written inline (a scalar from the jaxpr)."""

    value: Any
    shape: tuple
    dtype: Any


Atom = Union[Var, Literal]


@dataclass(frozen=True)
class Plate:
    """A conditionally independent batch dimension: axis ``dim`` of size ``size``."""

    name: str
    size: int
    dim: int


@dataclass(frozen=True, eq=False)
class DistSpec:
    """A distribution family and how to rebuild an instance from its flattened operands."""

    family: type
    treedef: Any
    leaf_names: tuple

    def build(self, leaves: list) -> Any:
        return jax.tree_util.tree_unflatten(self.treedef, list(leaves))

    @property
    def name(self) -> str:
        return self.family.__name__

    def same_as(self, other: "DistSpec") -> bool:
        return self.family is other.family and self.treedef == other.treedef


@dataclass(frozen=True, eq=False)
class Equation:
    """A deterministic node: ``outputs = primitive(*inputs, **params)``."""

    primitive: Any
    params: dict
    inputs: tuple
    outputs: tuple
    source: str | None = None

    def replace(self, **changes) -> "Equation":
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True, eq=False)
class Site:
    """A stochastic node ``output ~ dist.build(inputs)``.

    ``reparameterized``: sampled with the family's reparameterized sampler, so
    gradients flow pathwise through ``output`` (no score term).
    ``enumerated``: summed over exactly (weighted by its probabilities) rather than sampled.
    ``key_name``: the name the site's random key is derived from (a pass that
    rewrites a site keeps the original name, so the same key gives the same value).
    ``support_inputs``: the operands the family's support depends on (``Uniform``'s
    bounds, ``Pareto``'s scale): a score-function estimator is biased when they depend on θ.
    ``steps``: for a site unrolled from step ``t`` of a scan, ``(t,)`` (``(t, u)``
    for nested scans); its key is the scan site's key folded with each step, so
    the unrolled graph draws the same values as the loop.
    """

    name: str
    dist: DistSpec
    inputs: tuple
    output: Var
    source: str | None = None
    key_name: str = ""
    plates: tuple = ()
    discrete: bool = False
    enumerable: bool = False
    reparameterizable: bool = False
    reparameterized: bool = False
    enumerated: bool = False
    steps: tuple = ()
    support_inputs: tuple = ()  # indices of the operands the support depends on (Uniform's low, high)

    @property
    def outputs(self) -> tuple:
        return (self.output,)

    def replace(self, **changes) -> "Site":
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True, eq=False)
class LogProb:
    """``output = dist.build(inputs[:-1]).log_prob(inputs[-1])``: a log density visible to passes."""

    dist: DistSpec
    dist_inputs: tuple
    value: Atom
    output: Var
    source: str | None = None

    @property
    def inputs(self) -> tuple:
        return (*self.dist_inputs, self.value)

    @property
    def outputs(self) -> tuple:
        return (self.output,)

    def replace(self, **changes) -> "LogProb":
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True, eq=False)
class Cost:
    """``input`` is a cost: its elements are summed into the loss."""

    name: str
    input: Atom
    source: str | None = None
    plates: tuple = ()

    @property
    def inputs(self) -> tuple:
        return (self.input,)

    @property
    def outputs(self) -> tuple:
        return ()

    def replace(self, **changes) -> "Cost":
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True, eq=False)
class Check:
    """``dist.build(inputs)`` must satisfy its family's parameter constraints (numpyro's ``arg_constraints``).

    The tracer adds one after every site and every ``scg.log_prob``. It defines
    nothing; the walker evaluates it, and where it fails the compiled methods
    and ``scg.expectation`` return NaN (or raise, with ``scg.compile(...,
    checked=True)``). Because it reads the distribution's operands and not the
    site, a pass that rewrites the site (reparameterize, integrate_kl) cannot
    make an invalid parameter give plausible numbers.
    """

    subject: str  # what is checked, for messages: "site 'z'" or "scg.log_prob(Normal)"
    dist: DistSpec
    inputs: tuple
    source: str | None = None

    @property
    def outputs(self) -> tuple:
        return ()

    def replace(self, **changes) -> "Check":
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True, eq=False)
class Scan:
    """``jax.lax.scan`` over a body that holds sites or costs.

    ``body`` is a Graph with no parameters whose ``inputs`` are the body's
    operands: ``num_consts`` loop-invariant values, ``num_carry`` carried
    values, then one slice of each scanned array; ``body_outputs`` are its
    results: the new carry, then one slice of each stacked output. ``inputs``
    and ``outputs`` are the outer operands and results in the same order.

    A site ``"z"`` of the body is one stacked site with a leading time axis:
    step ``t`` draws from a key derived from the objective's key, the site's
    name and ``t``; its value at step ``t`` reaches the costs of step ``t`` it
    feeds and, when it flows into the carry, the costs of every later step.
    """

    name: str  # "scan@file:line": how the estimator and the printer refer to the loop
    body: "Graph"
    body_outputs: tuple
    inputs: tuple
    outputs: tuple
    length: int
    reverse: bool
    num_consts: int
    num_carry: int
    source: str | None = None

    def replace(self, **changes) -> "Scan":
        return dataclasses.replace(self, **changes)

    @property
    def carry_inputs(self) -> tuple:
        return self.body.inputs[self.num_consts:self.num_consts + self.num_carry]

    @property
    def carry_outputs(self) -> tuple:
        return self.body_outputs[:self.num_carry]


Node = Union[Equation, Site, LogProb, Cost, Check, Scan]


@dataclass(frozen=True, eq=False)
class Graph:
    """An immutable stochastic computation graph.

    Attributes:
      name: the model function's name.
      params: the parameter leaves (the first argument of the model, flattened).
      params_treedef: the pytree structure of the parameters.
      param_names: a readable path for each parameter leaf (``params['w']``).
      inputs, inputs_treedef, input_names: the same for the data arguments.
      consts: ``(var, value)`` pairs of arrays closed over by the model.
      nodes: the nodes in topological order.
    """

    name: str
    params: tuple
    params_treedef: Any
    param_names: tuple
    inputs: tuple
    inputs_treedef: Any
    input_names: tuple
    consts: tuple
    nodes: tuple

    def replace(self, **changes) -> "Graph":
        """A new graph with ``changes``, validated (the structural preconditions hold)."""
        new = dataclasses.replace(self, **changes)
        new.validate()
        return new

    def with_nodes(self, nodes: Iterable[Node], consts: Iterable | None = None) -> "Graph":
        """A new graph with other nodes (and constants), *not* validated.

        Passes use it for the intermediate graphs they query while rewriting;
        the graph a pass returns goes through :meth:`replace`, which validates.
        """
        return dataclasses.replace(self, nodes=tuple(nodes), consts=self.consts if consts is None else tuple(consts))

    # --- lookups -------------------------------------------------------------------------------
    @functools.cached_property
    def sites(self) -> tuple:
        return tuple(n for n in self.nodes if isinstance(n, Site))

    @functools.cached_property
    def costs(self) -> tuple:
        return tuple(n for n in self.nodes if isinstance(n, Cost))

    @functools.cached_property
    def scans(self) -> tuple:
        return tuple(n for n in self.nodes if isinstance(n, Scan))

    @functools.cached_property
    def stochastic_nodes(self) -> tuple:
        """Sites and scans (a scan's sites count as one stochastic node of the outer graph), in order."""
        return tuple(n for n in self.nodes if isinstance(n, (Site, Scan)))

    def site(self, name: str) -> Site:
        for s in self.sites:
            if s.name == name:
                return s
        known = ", ".join(repr(s.name) for s in self.sites) or "none"
        raise KeyError(f"graph {self.name!r} has no site {name!r}; its sites are: {known}")

    @functools.cached_property
    def constant_values(self) -> dict:
        """Maps each constant Var (an array closed over by the model) to its value."""
        return dict(self.consts)

    def constant(self, atom: Any) -> Any:
        """The value of ``atom`` when it is a constant of the graph, else None.

        A constant is a Literal, an array the model closes over, or a value computed
        from those alone (``jnp.array(10)`` reshaped by a distribution's constructor),
        folded here once: one walk back over its producers, no recursion.
        """
        if isinstance(atom, Literal):
            return atom.value
        folded = self._folded_constants
        stack = [atom]
        while stack:
            v = stack[-1]
            if v in folded:
                stack.pop()
                continue
            i = self.producers.get(v)
            node = self.nodes[i] if i is not None else None
            if v in self.constant_values or not isinstance(node, Equation) or any(_jax.sub_jaxprs(node.params)):
                folded[v] = self.constant_values.get(v)
                stack.pop()
                continue
            pending = [a for a in node.inputs if isinstance(a, Var) and a not in folded]
            if pending:
                stack.extend(pending)
                continue
            values = [a.value if isinstance(a, Literal) else folded[a] for a in node.inputs]
            outs: list = [None] * len(node.outputs)
            if all(x is not None for x in values):
                try:
                    with jax.ensure_compile_time_eval():  # concrete values, also under an outer jit or grad
                        outs = [np.asarray(x) for x in _jax.bind(node.primitive, node.params, values)]
                except Exception:  # a primitive that cannot run eagerly is simply not a constant
                    pass
            folded.update(zip(node.outputs, outs))
            stack.pop()
        return folded[atom]

    @functools.cached_property
    def _folded_constants(self) -> dict:
        return {}

    @functools.cached_property
    def producers(self) -> dict:
        """Maps each Var to the index of the node that defines it (absent for params/inputs/consts)."""
        return {v: i for i, n in enumerate(self.nodes) for v in n.outputs}

    @functools.cached_property
    def consumers(self) -> dict:
        """Maps each Var to the indices of the nodes that read it."""
        table: dict = {}
        for i, n in enumerate(self.nodes):
            for a in n.inputs:
                if isinstance(a, Var):
                    table.setdefault(a, []).append(i)
        return table

    # --- dependency queries ----------------------------------------------------------------------
    def ancestors(self, node: Node) -> frozenset:
        """Indices of the nodes ``node`` depends on through the data flow (sites included)."""
        seen: set = set()
        stack = [a for a in node.inputs if isinstance(a, Var)]
        while stack:
            v = stack.pop()
            i = self.producers.get(v)
            if i is None or i in seen:
                continue
            seen.add(i)
            stack.extend(a for a in self.nodes[i].inputs if isinstance(a, Var))
        return frozenset(seen)

    def forward_reach(self, start: Iterable[Var], *, through_sites: bool = True) -> frozenset:
        """Indices of the nodes that read, directly or transitively, any of ``start``.

        With ``through_sites=False`` a site's value is not reached from its
        distribution operands (use it to follow differentiable data flow only).
        """
        reached_vars = set(start)
        reached: set = set()
        for i, n in enumerate(self.nodes):
            if any(isinstance(a, Var) and a in reached_vars for a in n.inputs):
                reached.add(i)
                if isinstance(n, Site) and not through_sites and not n.reparameterized:
                    continue
                reached_vars.update(n.outputs)
        return frozenset(reached)

    @functools.cached_property
    def _stochastic_ancestry(self) -> dict:
        """Maps each Var to a bitset (a Python int) of the stochastic nodes it depends on.

        Bit ``k`` is ``self.stochastic_nodes[k]``. One sweep in topological order;
        a union is one ``|`` of machine words, so the query stays linear in the
        graph for chains of thousands of sites.
        """
        table: dict = {}
        bit = {id(n): 1 << k for k, n in enumerate(self.stochastic_nodes)}
        for n in self.nodes:
            deps = 0
            for a in n.inputs:
                if isinstance(a, Var):
                    deps |= table.get(a, 0)
            deps |= bit.get(id(n), 0)
            for v in n.outputs:
                table[v] = deps
        return table

    def _names_of_bits(self, bits: int) -> tuple:
        names, k = [], 0
        while bits:
            if bits & 1:
                names.append(self.stochastic_nodes[k].name)
            bits >>= 1
            k += 1
        return tuple(names)

    def stochastic_ancestors(self, node: Any) -> tuple:
        """The names of the sites (and scans) a cost — or any node's inputs — depend on, in program order."""
        return self.stochastic_ancestors_of(node.inputs)

    def stochastic_ancestors_of(self, atoms: Iterable) -> tuple:
        """The names of the sites (and scans) any of ``atoms`` depends on, in program order."""
        bits = 0
        for a in atoms:
            if isinstance(a, Var):
                bits |= self._stochastic_ancestry.get(a, 0)
        return self._names_of_bits(bits)

    @functools.cached_property
    def downstream_costs(self) -> dict:
        """Maps each site name to the names of the costs reachable from it through the data flow.

        A cost is downstream of ``z`` when some path leads from ``z``'s value to it,
        through deterministic nodes, log densities, and other sites' distribution
        operands (a site whose distribution depends on ``z`` makes its own value, and
        so its costs, depend on ``z``). Only these costs multiply ``z``'s score term.
        """
        table = {s.name: [] for s in self.stochastic_nodes}
        for c in self.costs:
            for name in self.stochastic_ancestors(c):
                table[name].append(c.name)
        return {k: tuple(v) for k, v in table.items()}

    @functools.cached_property
    def param_reach(self) -> frozenset:
        """Indices of the nodes that read the parameters, directly or transitively."""
        return self.forward_reach(self.params)

    def depends_on_params(self, atom: Any) -> bool:
        return isinstance(atom, Var) and (atom in self.params or self.producers.get(atom) in self.param_reach)

    @functools.cached_property
    def param_dependent_sites(self) -> frozenset:
        """Names of the sites whose distribution operands depend on the parameters."""
        return frozenset(self.nodes[i].name for i in self.param_reach if isinstance(self.nodes[i], Site))

    # --- structural preconditions ----------------------------------------------------------------
    def validate(self) -> None:
        """Checks Certigrad's ``well_formed`` and ``nodup`` on this graph; raises ModelError."""
        defined = set(self.params) | set(self.inputs) | {v for v, _ in self.consts}
        site_names: dict = {}
        cost_names: dict = {}
        for n in self.nodes:
            for a in n.inputs:
                if isinstance(a, Var) and a not in defined:
                    raise ModelError(
                        f"graph {self.name!r}: node {_node_label(n)} reads a value that no earlier node defines; "
                        "nodes must be in topological order (a pass built an invalid graph)",
                        site=getattr(n, "name", None), source=n.source)
            for v in n.outputs:
                if v in defined:
                    raise ModelError(f"graph {self.name!r}: node {_node_label(n)} redefines a value", source=n.source)
                defined.add(v)
            if isinstance(n, Site):
                if n.name in site_names:
                    raise ModelError(
                        f"duplicate site name {n.name!r} (first at {site_names[n.name]}); "
                        "site names must be unique within a model: give each scg.sample its own name",
                        site=n.name, source=n.source)
                site_names[n.name] = n.source or "?"
            if isinstance(n, Cost):
                if n.name in cost_names:
                    raise ModelError(
                        f"duplicate cost name {n.name!r} (first at {cost_names[n.name]}); "
                        "cost names must be unique within a model: give each scg.cost its own name",
                        site=n.name, source=n.source)
                cost_names[n.name] = n.source or "?"
                if not np.issubdtype(np.dtype(n.input.dtype), np.floating):
                    raise ModelError(f"cost {n.name!r} has dtype {np.dtype(n.input.dtype).name}; "
                                     "costs must be floating arrays", site=n.name, source=n.source)

    # --- printing --------------------------------------------------------------------------------
    def __str__(self) -> str:
        return format_graph(self)

    def __repr__(self) -> str:
        return f"<scg.Graph {self.name!r}: {len(self.sites)} sites, {len(self.costs)} costs, {len(self.nodes)} nodes>"


def _node_label(n: Node) -> str:
    if isinstance(n, Site):
        return f"site {n.name!r}"
    if isinstance(n, Cost):
        return f"cost {n.name!r}"
    if isinstance(n, LogProb):
        return f"log_prob of {n.dist.name}"
    if isinstance(n, Check):
        return f"check of {n.subject}"
    if isinstance(n, Scan):
        return n.name
    return f"equation {n.primitive.name!r}"


def _type_str(shape, dtype) -> str:
    short = {"float32": "f32", "float64": "f64", "float16": "f16", "bfloat16": "bf16", "int32": "i32",
             "int64": "i64", "bool": "bool", "uint32": "u32", "int8": "i8", "uint8": "u8"}
    name = np.dtype(dtype).name if not str(dtype).startswith("key") else str(dtype)
    return f"{short.get(name, name)}[{','.join(str(d) for d in shape)}]"


def _param_str(key: str, value: Any) -> str | None:
    if key in _jax.HIDDEN_PARAMS or value is None:
        return None
    if _jax.is_jaxpr(value):
        return f"{key}={{...}}"
    if callable(value) and not isinstance(value, type):
        return None
    text = str(value)
    if "\n" in text:
        return None
    return f"{key}={text}" if len(text) <= 40 else f"{key}=..."


def _names_for(graph: Graph) -> Callable[[Atom], str]:
    names: dict = {}
    letters = (a + b for a in ("",) + tuple("abcdefghijklmnopqrstuvwxyz") for b in "abcdefghijklmnopqrstuvwxyz")
    sites = all_sites(graph)
    reserved = {s.name for s in sites} | {s.key_name for s in sites}

    def name(a: Atom) -> str:
        if isinstance(a, Literal):
            v = np.asarray(a.value)
            if v.dtype.kind in "fiub" and v.size and np.all(v == v.reshape(-1)[0]):
                scalar = f"{v.reshape(-1)[0].item():g}"
                return scalar if v.ndim == 0 else f"{scalar}:{_type_str(a.shape, a.dtype)}"
            return f"<const {_type_str(a.shape, a.dtype)}>"
        if a not in names:
            n = next(letters)
            while n in reserved:
                n = next(letters)
            names[a] = n
        return names[a]

    for s in sites:
        names[s.output] = s.name
    return name


def all_sites(graph: Graph) -> list:
    """The sites of the graph and of every scan body in it, outer first."""
    out, stack = [], [graph]
    while stack:
        g = stack.pop()
        out.extend(g.sites)
        stack.extend(s.body for s in g.scans)
    return out


def _rows(graph: Graph, name: Callable, indent: str) -> list:
    typed = lambda v: f"{name(v)}:{_type_str(v.shape, v.dtype)}"
    args_of = lambda dist, atoms: ", ".join(f"{k}={name(a)}" for k, a in sorted(zip(dist.leaf_names, atoms),
                                                                               key=lambda t: t[0]))
    rows: list[tuple[str, str]] = []
    for n in graph.nodes:
        src = n.source or ""
        if isinstance(n, Equation):
            params = [p for p in (_param_str(k, v) for k, v in n.params.items()) if p]
            head = n.primitive.name + (f"[{' '.join(params)}]" if params else "")
            outs = " ".join(typed(v) for v in n.outputs)
            rows.append((f"{indent}{outs} = {head} {' '.join(name(a) for a in n.inputs)}", src))
        elif isinstance(n, Site):
            tags = []
            if n.reparameterized:
                tags.append("reparameterized")
            if n.enumerated:
                tags.append("enumerated")
            if n.plates:
                tags.append("plates=" + ",".join(p.name for p in n.plates))
            if n.steps:
                tags.append(f"step {','.join(map(str, n.steps))}")
            kind = "discrete" if n.discrete else "continuous"
            tag = f"  [{kind}{', ' if tags else ''}{', '.join(tags)}]"
            rows.append((f"{indent}{typed(n.output)} ~ {n.dist.name}({args_of(n.dist, n.inputs)}){tag}", src))
        elif isinstance(n, LogProb):
            rows.append((f"{indent}{typed(n.output)} = log_prob {n.dist.name}({args_of(n.dist, n.dist_inputs)}) "
                         f"at {name(n.value)}", src))
        elif isinstance(n, Check):
            rows.append((f"{indent}check  {n.dist.name}({args_of(n.dist, n.inputs)}) is valid  [{n.subject}]", src))
        elif isinstance(n, Cost):
            plates = f"  [plates={','.join(p.name for p in n.plates)}]" if n.plates else ""
            rows.append((f"{indent}cost {n.name!r} += sum({name(n.input)}){plates}", src))
        elif isinstance(n, Scan):
            outs = " ".join(typed(v) for v in n.outputs)
            head = f"scan[length={n.length}{' reverse' if n.reverse else ''}]"
            rows.append((f"{indent}{outs} = {head} {' '.join(name(a) for a in n.inputs)}", src))
            k, c = n.num_consts, n.num_carry
            groups = (("consts", n.body.inputs[:k]), ("carry", n.body.inputs[k:k + c]), ("xs", n.body.inputs[k + c:]))
            listing = "  ".join(f"{label} {' '.join(typed(v) for v in vs)}" for label, vs in groups if vs)
            rows.append((f"{indent}  body {listing}:", ""))
            rows.extend((f"{indent}    const  {typed(v)}", "") for v, _ in n.body.consts)
            rows.extend(_rows(n.body, name, indent + "    "))
            rows.append((f"{indent}    return {' '.join(name(a) for a in n.body_outputs)}", ""))
    return rows


def format_graph(graph: Graph) -> str:
    """A jaxpr-like listing of the graph, with site and cost names and the user's source lines.

    Scan bodies are listed nested under their scan, with their operands
    (consts, carry, one slice of each scanned array) and results.
    """
    name = _names_for(graph)
    typed = lambda v: f"{name(v)}:{_type_str(v.shape, v.dtype)}"
    rows: list[tuple[str, str]] = []
    for v, path in zip(graph.params, graph.param_names):
        rows.append((f"param  {typed(v)} = {path}", ""))
    for v, path in zip(graph.inputs, graph.input_names):
        rows.append((f"input  {typed(v)} = {path}", ""))
    for v, value in graph.consts:
        rows.append((f"const  {typed(v)}", ""))
    rows.extend(_rows(graph, name, ""))
    width = min(max((len(r[0]) for r in rows), default=0), 72)
    body = "\n".join(f"  {text:<{width}}  # {src}" if src else f"  {text}" for text, src in rows)
    n_sites, n_scans = len(graph.sites), len(graph.scans)
    loops = f", {n_scans} scan{'s' if n_scans > 1 else ''}" if n_scans else ""
    header = f"graph {graph.name} ({n_sites} sites, {len(graph.costs)} costs{loops})"
    return f"{header}\n{body}"


# --- rewriting helpers used by passes -------------------------------------------------------------


def substitute(nodes: Iterable[Node], mapping: dict) -> list:
    """Returns the nodes with every input Var in ``mapping`` replaced by its image."""
    sub = lambda a: mapping.get(a, a) if isinstance(a, Var) else a
    out = []
    for n in nodes:
        if not any(isinstance(a, Var) and a in mapping for a in n.inputs):
            out.append(n)
        elif isinstance(n, Equation):
            out.append(n.replace(inputs=tuple(map(sub, n.inputs))))
        elif isinstance(n, (Site, Check, Scan)):
            out.append(n.replace(inputs=tuple(map(sub, n.inputs))))
        elif isinstance(n, LogProb):
            out.append(n.replace(dist_inputs=tuple(map(sub, n.dist_inputs)), value=sub(n.value)))
        else:
            out.append(n.replace(input=sub(n.input)))
    return out


def splice(nodes: Sequence[Node], index: int, new_nodes: Iterable[Node], mapping: dict) -> list:
    """``nodes`` with ``nodes[index]`` replaced by ``new_nodes``, and every later read of a Var in
    ``mapping`` redirected to its image (the rewritten node's outputs to the new nodes' outputs)."""
    return [*nodes[:index], *new_nodes, *substitute(nodes[index + 1:], mapping)]


def eliminate_dead_code(graph: Graph, keep: Iterable = ()) -> Graph:
    """Drops deterministic and log-density nodes whose values reach no site, cost, check (or ``keep``)."""
    live: set = {a for a in keep if isinstance(a, Var)}
    keep = []
    for n in reversed(graph.nodes):
        if isinstance(n, (Site, Cost, Check, Scan)) or any(v in live for v in n.outputs):
            keep.append(n)
            live.update(a for a in n.inputs if isinstance(a, Var))
    used_consts = tuple((v, c) for v, c in graph.consts if v in live)
    return graph.replace(nodes=tuple(reversed(keep)), consts=used_consts)
