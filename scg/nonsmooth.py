r"""Where a Normal site's value meets a kink or a jump, and the piecewise rule that integrates it exactly.

Gauss–Hermite quadrature is exact for polynomials and very accurate for smooth
costs, but not where a cost depends on a Normal site through a non-smooth
primitive: at ``z ~ N(0.3, 1)`` it gives ``E[1{z > 0}] = 0.5000`` for ``0.6179``
with gradient ``0`` for ``0.381``, and more points do not help. This module
finds those places in a Graph and integrates them piecewise.

**Analysis** (:func:`analyze`, once per graph, linear in its size). A *kink* is a
live equation (one whose value reaches a cost or a site) that is non-smooth in
the sense of :func:`scg._jax.smoothness` (``max``, ``abs``, comparisons, ...;
also inside ``custom_jvp`` bodies such as ``jax.nn.relu``) and whose operands
the *value* of a Normal site reaches through deterministic nodes. A site drawn
later cuts the value path: integrating over it smooths what it depends on. The
kink is *resolved* at the last site whose value reaches it when that site is
Normal and the kink's argument (``x − y`` for ``max(x, y)``, the
pairwise differences for ``sort``, ...) is an affine function of the site's
value; the other sites it depends on come earlier and are fixed by then.

**Piecewise rule** (:func:`piecewise_points`). In the site's standard
coordinates ``z = μ + σ ε`` each coordinate ``c`` (the site's elements, in
order) is integrated over ``[−L, L]`` (``L = 8``) with Gauss–Legendre rules of
``m`` points on panels bounded by ``P + 1`` fixed edges *and* the breakpoints
``ε*`` of the kinks whose last coordinate is ``c`` (found numerically: the
argument ``A(z)`` is affine, so ``A(z) = A(z₀) + J (z − z₀)`` with ``J`` from
``jax.jacfwd``). The breakpoints are functions of ``μ``, ``σ`` and the earlier
coordinates, so the nodes move with them and the derivative of the rule is the
derivative of the integral, jump terms included. On each smooth piece the rule
is exact to float32 (truncation at ``|ε| = 8``: ``Φ(−8) ≈ 6e-16``). Earlier
coordinates see a smooth integrand: integrating a kink over its last
coordinate leaves a smooth function of the earlier ones. A site integrated
per example (plates) gets rules per example, each with its own breakpoints.

Every other kink is *unresolved*: :mod:`scg.integrate` then estimates the
reference's error by comparing several rules, and refuses or reports it.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from scg import _jax
from scg.interpreter import log_density, read
from scg.ir import Cost, Equation, Graph, Literal, LogProb, Site, Var

CUTOFF = 8.0        # |ε| beyond which the Gaussian mass is ignored (Φ(−8) ≈ 6e-16)
PANELS = 8          # fixed panels of [−L, L], width 2
PANEL_POINTS = 8    # Gauss–Legendre points per panel (and per piece between breakpoints)


@dataclasses.dataclass(frozen=True)
class Kink:
    """One non-smooth equation that a Normal site's value reaches.

    ``node``: index of the graph equation holding it; ``path``: indices of the
    inner equation inside nested call bodies (empty for the equation itself).
    ``resolved_at``: the site where it is integrated piecewise, or None with
    ``reason`` saying why not. ``slots``: breakpoints per coordinate it adds.
    """

    primitive: str
    kind: str  # "kink" | "jump"
    source: str | None
    node: int
    path: tuple
    sites: tuple  # names of the sites whose values reach its operands, in program order
    normal_sites: tuple
    resolved_at: str | None = None
    reason: str = ""
    slots: int = 0

    @property
    def where(self) -> str:
        return f"`{self.primitive}`" + (f" at {self.source}" if self.source else "")

    def describe(self) -> str:
        what = "jump" if self.kind == "jump" else "kink"
        sites = ", ".join(repr(s) for s in self.normal_sites)
        head = f"a {what} ({self.where}) in the value of Normal site{'s' if len(self.normal_sites) > 1 else ''} {sites}"
        if self.resolved_at:
            return f"{head}: integrated piecewise at site {self.resolved_at!r}"
        return f"{head}: not integrated exactly, because {self.reason}"


@dataclasses.dataclass(frozen=True)
class Analysis:
    kinks: tuple
    resolved: dict  # site name -> tuple of Kinks integrated piecewise at it
    plans: dict  # site name -> node indices to evaluate (after the site) to read its kinks' operands
    unresolved: tuple
    detached: frozenset  # Normal sites whose value reaches a stop_gradient
    refine: frozenset  # Normal sites whose rule is refined for the error estimate
    stop_gradients: tuple  # (site name, source) of each stop_gradient a site's value reaches

    @property
    def exact(self) -> bool:
        return not self.unresolved

    @property
    def has_unresolved_jump(self) -> bool:
        return any(k.kind == "jump" for k in self.unresolved)


# --- equations of the graph and of call bodies, seen alike --------------------------------------

@dataclasses.dataclass(frozen=True)
class _Eq:
    name: str
    params: dict
    ins: tuple
    outs: tuple
    source: str | None


def _graph_eq(n: Equation) -> _Eq:
    return _Eq(n.primitive.name, n.params, tuple(n.inputs), tuple(n.outputs), n.source)


def _jaxpr_eqs(jaxpr: Any) -> list:
    return [_Eq(e.primitive.name, e.params, tuple(e.invars), tuple(e.outvars), _jax.equation_source(e))
            for e in jaxpr.eqns]


def _is_literal(a: Any) -> bool:
    return isinstance(a, Literal) or _jax.is_literal(a)


def _literal_value(a: Any) -> Any:
    return a.value if isinstance(a, Literal) else _jax.literal_value(a)


def _aval(a: Any) -> tuple:
    if isinstance(a, (Var, Literal)):
        return tuple(a.shape), a.dtype
    return tuple(a.aval.shape), a.aval.dtype


def _smoothness(e: _Eq) -> str:
    literals = {k: _literal_value(a) for k, a in enumerate(e.ins) if _is_literal(a)}
    return _jax.smoothness(e.name, e.params, [_aval(a)[1] for a in e.ins], [_aval(v)[1] for v in e.outs], literals)


def _opaque_non_smooth(params: dict) -> tuple[str, str] | None:
    """``(primitive, kind)`` of the first kink or jump inside the sub-jaxprs of an opaque equation."""
    found = None
    stack = list(_jax.sub_jaxprs(params))
    while stack:
        jaxpr = stack.pop()
        for e in _jaxpr_eqs(jaxpr):
            if any(True for _ in _jax.sub_jaxprs(e.params)):
                stack.extend(_jax.sub_jaxprs(e.params))
                continue
            kind = _smoothness(e)
            if kind == "jump":
                return e.name, kind
            if kind == "kink" and found is None:
                found = (e.name, kind)
    return found


# --- the analysis --------------------------------------------------------------------------------

def _value_bits(graph: Graph, bit: dict) -> dict:
    """Var -> bitset of the sites whose *value* reaches it through deterministic nodes and log densities."""
    bits: dict = {}
    for n in graph.nodes:
        if isinstance(n, Site):
            bits[n.output] = bit[n.name]
        elif n.outputs:
            b = 0
            for a in n.inputs:
                if isinstance(a, Var):
                    b |= bits.get(a, 0)
            for v in n.outputs:
                bits[v] = b
    return bits


def _live_nodes(graph: Graph) -> set:
    """Indices of the nodes whose outputs reach a cost or a site's distribution."""
    live_vars: set = set()
    live: set = set()
    for i in range(len(graph.nodes) - 1, -1, -1):
        n = graph.nodes[i]
        if isinstance(n, (Site, Cost)):
            live_vars.update(a for a in n.inputs if isinstance(a, Var))
        elif any(v in live_vars for v in n.outputs):
            live.add(i)
            live_vars.update(a for a in n.inputs if isinstance(a, Var))
    return live


def _bits_of(atoms, bits: dict) -> int:
    b = 0
    for a in atoms:
        if not _is_literal(a):
            b |= bits.get(a, 0)
    return b


def _literal_nonnegative(a: Any) -> bool:
    with np.errstate(invalid="ignore"):
        return bool(np.all(np.asarray(_literal_value(a)) >= 0))


def _nonnegative_operands(e: _Eq, nonneg: dict) -> list:
    return [_literal_nonnegative(a) if _is_literal(a) else nonneg.get(a, False) for a in e.ins]


def _update_nonnegative(e: _Eq, nonneg: dict) -> None:
    """Records which outputs of ``e`` cannot be negative (:func:`scg._jax.nonnegative_output`)."""
    ops = _nonnegative_operands(e, nonneg)
    body = _jax.call_body(e.name, e.params)
    if body is not None:
        jaxpr, _ = body
        inner = dict(zip(jaxpr.invars, ops))
        for ie in _jaxpr_eqs(jaxpr):
            _update_nonnegative(ie, inner)
        outs = [_literal_nonnegative(v) if _is_literal(v) else inner.get(v, False) for v in jaxpr.outvars]
    else:
        outs = [_jax.nonnegative_output(e.name, e.params, ops)] * len(e.outs)
    for v, n in zip(e.outs, outs):
        if n:
            nonneg[v] = True


def _collect(e: _Eq, bits: dict, nonneg: dict, normal_mask: int, path: tuple, out: list, stops: list) -> None:
    """Appends ``(eq, path, bits of its operands, kind, reason)`` for each non-smooth equation in ``e``
    (``e`` itself, or inside its call body) that a Normal site's value reaches."""
    b = _bits_of(e.ins, bits)
    if not b & normal_mask:
        return
    body = _jax.call_body(e.name, e.params)
    if body is not None:
        if _jax.jax_call_name(e.name, e.params) in _jax.SMOOTH_JAX_CALLS:
            return  # logaddexp and friends: max/abs for stability, a smooth value
        jaxpr, _ = body
        inner = {v: _bits_of((a,), bits) for v, a in zip(jaxpr.invars, e.ins)}
        inner_nonneg = dict(zip(jaxpr.invars, _nonnegative_operands(e, nonneg)))
        for j, ie in enumerate(_jaxpr_eqs(jaxpr)):
            if not (e.name in _jax.CUSTOM_DERIVATIVE_CALLS and ie.name == "stop_gradient"):
                _collect(ie, inner, inner_nonneg, normal_mask, path + (j,), out, stops)
            ib = _bits_of(ie.ins, inner)
            for v in ie.outs:
                inner[v] = ib
            _update_nonnegative(ie, inner_nonneg)
        return
    if e.name == "stop_gradient":
        stops.append((b, e.source))
        return
    if any(True for _ in _jax.sub_jaxprs(e.params)):
        found = _opaque_non_smooth(e.params)
        if found is not None:
            out.append((dataclasses.replace(e, name=found[0]), path, b, found[1],
                        f"it sits inside `{e.name}`, whose body scg does not integrate piecewise"))
        if _sub_has_stop_gradient(e.params):
            stops.append((b, e.source))
        return
    if e.name in ("abs", "sign") and _nonnegative_operands(e, nonneg)[0]:
        return  # |x| = x and sign(x) = 1 almost everywhere where x cannot be negative
    kind = _smoothness(e)
    if kind in ("kink", "jump"):
        out.append((e, path, b, kind, ""))


def _sub_has_stop_gradient(params: dict) -> bool:
    stack = list(_jax.sub_jaxprs(params))
    while stack:
        jaxpr = stack.pop()
        for e in jaxpr.eqns:
            if e.primitive.name == "stop_gradient":
                return True
            stack.extend(_jax.sub_jaxprs(e.params))
    return False


def _statuses(eqs, status: dict) -> dict:
    """Forward affine analysis: atom -> "affine" | "nonaffine" (absent: constant in the coordinate)."""
    for e in eqs:
        st = ["const" if _is_literal(a) else status.get(a, "const") for a in e.ins]
        if all(s == "const" for s in st):
            continue
        if any(s == "nonaffine" for s in st):
            outs = ["nonaffine"] * len(e.outs)
        else:
            body = _jax.call_body(e.name, e.params)
            if body is not None:
                jaxpr, _ = body
                inner = _statuses(_jaxpr_eqs(jaxpr), {v: s for v, s in zip(jaxpr.invars, st) if s != "const"})
                outs = [inner.get(v, "const") if not _is_literal(v) else "const" for v in jaxpr.outvars]
            else:
                rule, constant = _jax.affine_rule(e.name, len(e.ins))
                floating = all(_jax._is_floating(_aval(v)[1]) for v in e.outs)
                n_affine = sum(s == "affine" for s in st)
                ok = floating and (
                    (rule == "linear" and all(st[k] == "const" for k in constant if k < len(st)))
                    or (rule == "scaling" and n_affine == 1)
                    or (rule == "divide" and st[0] == "affine" and all(s == "const" for s in st[1:])))
                outs = ["affine" if ok else "nonaffine"] * len(e.outs)
        for v, s in zip(e.outs, outs):
            if s != "const":
                status[v] = s
    return status


def _graph_statuses(graph: Graph, site_index: int) -> dict:
    """Affine statuses of the graph's values in the value of the site at ``site_index``."""
    status: dict = {graph.nodes[site_index].output: "affine"}
    for n in graph.nodes[site_index + 1:]:
        if isinstance(n, Equation):
            _statuses([_graph_eq(n)], status)
        elif isinstance(n, LogProb) and any(isinstance(a, Var) and a in status for a in n.inputs):
            status[n.output] = "nonaffine"
    return status


def _operand_statuses(graph: Graph, status: dict, node: int, path: tuple) -> list:
    e = _graph_eq(graph.nodes[node])
    st = ["const" if _is_literal(a) else status.get(a, "const") for a in e.ins]
    for j in path:
        jaxpr, _ = _jax.call_body(e.name, e.params)
        inner = _statuses(_jaxpr_eqs(jaxpr)[:j], {v: s for v, s in zip(jaxpr.invars, st) if s != "const"})
        e = _jaxpr_eqs(jaxpr)[j]
        st = ["const" if _is_literal(a) else inner.get(a, "const") for a in e.ins]
    return st


def _argument_size(e: _Eq) -> int | None:
    if e.name not in _jax.KINK_ARGUMENTS:
        return None
    shapes = [jax.ShapeDtypeStruct(*_aval(a)) for a in e.ins]
    out = jax.eval_shape(lambda *xs: _jax.kink_arguments(e.name, list(xs), e.params), *shapes)
    return int(sum(int(np.prod(o.shape, dtype=np.int64)) for o in out))


def analyze(graph: Graph, normal: frozenset, *,
            size_of: Callable[[Site, int, bool], int] | None = None, budget: int | None = None) -> Analysis:
    """Finds the kinks and jumps Normal sites' values reach, and decides where each is integrated.

    ``normal``: names of the Normal sites.
    ``size_of(site, slots, refined)``: the grid size of a site that is not piecewise (``slots`` = 0) or
    piecewise with ``slots`` breakpoints per coordinate; with ``budget``, sites whose piecewise grid
    would exceed it are left to the error-estimated rule instead.
    """
    sites = graph.sites
    bit = {s.name: 1 << k for k, s in enumerate(sites)}
    index = {n.name: i for i, n in enumerate(graph.nodes) if isinstance(n, Site)}
    normal_mask = sum(bit[s] for s in normal)
    if not normal_mask:
        return Analysis((), {}, {}, (), frozenset(), frozenset(), ())
    bits = _value_bits(graph, bit)
    live = _live_nodes(graph)
    found: list = []
    stops: list = []
    nonneg: dict = {}
    for i, n in enumerate(graph.nodes):
        if not isinstance(n, Equation):
            continue
        e = _graph_eq(n)
        if i in live:
            here: list = []
            here_stops: list = []
            _collect(e, bits, nonneg, normal_mask, (), here, here_stops)
            found.extend((i, *f) for f in here)
            stops.extend((b, src or n.source) for b, src in here_stops)
        _update_nonnegative(e, nonneg)

    def names(b: int) -> tuple:  # the sites of a bitset, in program order
        out, k = [], 0
        while b:
            if b & 1:
                out.append(sites[k].name)
            b >>= 1
            k += 1
        return tuple(out)

    statuses: dict = {}
    kinks = []
    for i, e, path, b, kind, reason in found:
        deps = names(b)
        normals = tuple(s for s in deps if s in normal)
        last = deps[-1]
        slots = 0
        if not reason:
            slots = _argument_size(e)
            if slots is None:
                reason = f"scg does not locate the breakpoints of `{e.name}`" + (
                    " (it jumps at every integer)" if e.name in ("floor", "ceil", "round") or e.name.startswith("convert")
                    else "")
            elif last not in normal:
                reason = (f"its location also depends on the value of site {last!r}, drawn after "
                          f"{', '.join(repr(s) for s in normals)}")
            else:
                if last not in statuses:
                    statuses[last] = _graph_statuses(graph, index[last])
                operand = _operand_statuses(graph, statuses[last], i, path)
                floating = [s for s, a in zip(operand, e.ins) if _jax._is_floating(_aval(a)[1])]
                if any(s == "nonaffine" for s in floating):
                    reason = f"its argument is not an affine function of site {last!r}"
        kinks.append(Kink(e.name, kind, e.source or _nearest_source(graph, i), i, path, deps, normals,
                          None if reason else last, reason, slots if not reason else 0))
    kinks = _fit_budget(graph, kinks, normal, size_of, budget)
    resolved: dict = {}
    for k in kinks:
        if k.resolved_at:
            resolved.setdefault(k.resolved_at, []).append(k)
    plans = {s: _plan(graph, index[s], [k.node for k in ks]) for s, ks in resolved.items()}
    unresolved = tuple(k for k in kinks if not k.resolved_at)
    refine = frozenset(s for k in unresolved for s in k.normal_sites)
    detached = frozenset(s for b, _ in stops for s in names(b) if s in normal)
    stop_list = tuple((s, src) for b, src in stops for s in names(b) if s in normal)
    return Analysis(tuple(kinks), {s: tuple(v) for s, v in resolved.items()}, plans, unresolved, detached, refine,
                    stop_list)


def _nearest_source(graph: Graph, i: int, limit: int = 64) -> str | None:
    """The node's source line, else the first one found downstream (an equation inlined from a
    library's jitted function, such as ``jnp.clip``, has none of its own)."""
    queue, seen = [i], {i}
    while queue and len(seen) <= limit:
        j = queue.pop(0)
        if graph.nodes[j].source:
            return graph.nodes[j].source
        for v in graph.nodes[j].outputs:
            for k in graph.consumers.get(v, ()):
                if k not in seen:
                    seen.add(k)
                    queue.append(k)
    return None


def _fit_budget(graph: Graph, kinks: list, normal: frozenset, size_of, budget) -> list:
    """Leaves the kinks of the sites whose piecewise grids do not fit the budget to the estimated rule."""
    if size_of is None or budget is None:
        return kinks
    while True:
        slots: dict = {}
        for k in kinks:
            if k.resolved_at:
                slots[k.resolved_at] = slots.get(k.resolved_at, 0) + k.slots
        if not slots:
            return kinks
        refined = {s for k in kinks if not k.resolved_at for s in k.normal_sites}
        sizes = {s.name: size_of(s, slots.get(s.name, 0), s.name in refined) for s in graph.sites}
        total = 1
        for v in sizes.values():
            total *= v
        if total <= budget:
            return kinks
        worst = max(slots, key=lambda s: sizes[s])
        grid = sizes[worst]
        kinks = [dataclasses.replace(k, resolved_at=None, slots=0,
                                     reason=f"the piecewise grid at site {worst!r} ({grid:,} points) does not fit "
                                            f"the budget of {budget:,} points")
                 if k.resolved_at == worst else k for k in kinks]


def _plan(graph: Graph, site_index: int, nodes: list) -> tuple:
    needed: set = set()
    for i in nodes:
        needed |= {j for j in graph.ancestors(graph.nodes[i]) if j > site_index}
    for j in needed:
        if not isinstance(graph.nodes[j], (Equation, LogProb)):  # the kink's last site is this one
            raise AssertionError(f"node {j} between a site and its kink is not deterministic")
    return tuple(sorted(needed))


# --- evaluation of the kinks' arguments -----------------------------------------------------------

def _body_operands(jaxpr: Any, consts: list, invals: list, path: tuple) -> tuple:
    env: dict = {}
    rd = lambda a: _jax.literal_value(a) if _jax.is_literal(a) else env[a]
    for v, c in zip(jaxpr.constvars, consts):
        env[v] = c
    for v, x in zip(jaxpr.invars, invals):
        env[v] = x
    for j, eqn in enumerate(jaxpr.eqns[:path[0] + 1]):
        ins = [rd(a) for a in eqn.invars]
        if j == path[0]:
            if len(path) == 1:
                return eqn.primitive.name, eqn.params, ins
            body, body_consts = _jax.call_body(eqn.primitive.name, eqn.params)
            return _body_operands(body, body_consts, ins, path[1:])
        for v, x in zip(eqn.outvars, _jax.bind(eqn.primitive, eqn.params, ins)):
            env[v] = x
    raise AssertionError("path outside the body")


def kink_probe(graph: Graph, site: Site, kinks: tuple, plan: tuple) -> Callable[[dict, Any], Any]:
    """``probe(env, value)``: the kinks' arguments (flattened, concatenated) with the site at ``value``."""

    def probe(env: dict, value: Any) -> Any:
        env = dict(env)
        env[site.output] = value
        for j in plan:
            n = graph.nodes[j]
            if isinstance(n, Equation):
                for v, x in zip(n.outputs, _jax.bind(n.primitive, n.params, [read(env, a) for a in n.inputs])):
                    env[v] = x
            else:
                d = n.dist.build([read(env, a) for a in n.dist_inputs])
                env[n.output] = log_density(d, read(env, n.value))
        parts = []
        for k in kinks:
            n = graph.nodes[k.node]
            name, params, ins = n.primitive.name, n.params, [read(env, a) for a in n.inputs]
            if k.path:
                body, consts = _jax.call_body(name, params)
                name, params, ins = _body_operands(body, consts, ins, k.path)
            parts.extend(jnp.ravel(a) for a in _jax.kink_arguments(name, ins, params))
        return jnp.concatenate(parts)

    return probe


# --- the piecewise rule ---------------------------------------------------------------------------

def piecewise_grid_size(n_coordinates: int, slots: int, panels: int = PANELS, points: int = PANEL_POINTS) -> int:
    """Points of :func:`piecewise_points` for a site of ``n_coordinates`` elements."""
    return ((panels + slots) * points) ** n_coordinates


def panel_rule(panels: int, points: int) -> tuple[np.ndarray, np.ndarray]:
    """Composite Gauss–Legendre nodes and weights for ``∫ g(ε) φ(ε) dε`` over ``[−L, L]`` (no breakpoints)."""
    x, w = np.polynomial.legendre.leggauss(points)
    edges = np.linspace(-CUTOFF, CUTOFF, panels + 1)
    a, b = edges[:-1, None], edges[1:, None]
    nodes = (a + b) / 2 + (b - a) / 2 * x[None, :]
    weights = (b - a) / 2 * w[None, :] * np.exp(-nodes ** 2 / 2) / math.sqrt(2 * math.pi)
    return nodes.reshape(-1), weights.reshape(-1)


def _rule_1d(eps: Any, panels: int, points: int, dtype: Any) -> tuple[Any, Any]:
    """Nodes and weights of ``∫ g(ε) φ(ε) dε`` over ``[−L, L]`` with pieces split at the breakpoints ``eps``."""
    x, w = np.polynomial.legendre.leggauss(points)
    fixed = jnp.asarray(np.linspace(-CUTOFF, CUTOFF, panels + 1), dtype)
    edges = jnp.sort(jnp.concatenate([fixed, jnp.clip(eps, -CUTOFF, CUTOFF)]))
    a, b = edges[:-1, None], edges[1:, None]
    half = (b - a) / 2
    nodes = (a + b) / 2 + half * jnp.asarray(x, dtype)[None, :]
    weights = half * jnp.asarray(w, dtype)[None, :] * jnp.exp(-nodes ** 2 / 2) / math.sqrt(2 * math.pi)
    return nodes.reshape(-1), weights.reshape(-1)


def piecewise_points(distribution: Any, shape: tuple, dtype: Any, probe: Callable, env: dict,
                     panels: int = PANELS, points: int = PANEL_POINTS, n_parallel: int = 0) -> tuple[Any, Any]:
    """Points ``(M, *shape)`` and weights ``(M, *shape[:n_parallel])`` integrating a Normal site exactly
    across its kinks.

    With ``n_parallel`` plate dimensions each example gets its own rules (its own breakpoints), and
    point ``j`` combines the ``j``-th nodes of every example, as :func:`scg.integrate.support_points`
    does; a kink is assumed to depend on the coordinates of one example (the plate's promise).
    """
    parallel = tuple(shape[:n_parallel])
    n_ex = int(np.prod(parallel, dtype=np.int64))
    n = int(np.prod(shape[n_parallel:], dtype=np.int64))
    loc = jnp.broadcast_to(distribution.mean, shape).reshape(n_ex, n).astype(dtype)
    scale = jnp.sqrt(jnp.broadcast_to(distribution.variance, shape)).reshape(n_ex, n).astype(dtype)
    argument = lambda flat: probe(env, flat.reshape(shape))
    a0 = argument(loc)
    jac = jax.jacfwd(argument)(loc)  # (K, examples, coordinates)
    nonzero = jac != 0
    later = jnp.flip(jnp.cumsum(jnp.flip(nonzero, 2), 2), 2) - nonzero > 0
    relevant = jnp.transpose(nonzero & ~later, (1, 2, 0))  # (E, n, K): c is the last coordinate k depends on
    slope = jnp.transpose(jac, (1, 2, 0))  # (E, n, K)
    z = jnp.zeros((1, n_ex, 0), dtype)
    w = jnp.ones((1, n_ex), dtype)
    for c in range(n):
        # the arguments at the prefix of each point, with coordinate c at loc: (M, E, K)
        base = a0[None, None, :] + jnp.einsum("mec,eck->mek", z - loc[None, :, :c], slope[:, :c, :])
        safe = jnp.where(relevant[:, c, :], slope[:, c, :], jnp.ones((), jac.dtype))[None]
        eps = -base / (safe * scale[None, :, c, None])  # z_c* = loc_c − base / J_kc, in standard units
        eps = jnp.where(relevant[None, :, c, :], eps, jnp.full((), CUTOFF, eps.dtype))
        nodes, weights = jax.vmap(jax.vmap(lambda e: _rule_1d(e, panels, points, dtype)))(eps)  # (M, E, k)
        k = nodes.shape[2]
        zc = loc[None, :, c, None] + scale[None, :, c, None] * nodes
        z = jnp.concatenate([jnp.repeat(z, k, axis=0), jnp.transpose(zc, (0, 2, 1)).reshape(-1, n_ex, 1)], axis=2)
        w = (w[:, None, :] * jnp.transpose(weights, (0, 2, 1))).reshape(-1, n_ex)
    return z.reshape((-1,) + tuple(shape)), w.reshape((-1,) + parallel)
