"""Tracing: ``@scg.model`` turns a call of the user's function into an :class:`scg.Graph`.

The model function runs once under ``jax.make_jaxpr`` on abstract values of its
arguments. ``scg.sample``, ``scg.cost`` and ``scg.log_prob`` bind the scg
primitives (``scg/_jax.py``), so they appear in the jaxpr as equations next to
the deterministic computation; :func:`graph_from_jaxpr` then reads the jaxpr
into IR nodes, inlining ``jax.jit`` calls and refusing higher-order primitives
it cannot see into.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import os
import re
import threading
import traceback
from dataclasses import dataclass
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist

from scg import _jax
from scg.errors import ModelError, ScgError
from scg.interpreter import log_density
from scg.ir import (Check, Cost, DistSpec, Equation, Graph, Literal, LogProb, Plate, Scan, Site, Var,
                    all_sites, eliminate_dead_code)

# --- the trace context ---------------------------------------------------------------------------


class _TraceState:
    def __init__(self, model_name: str):
        self.model_name = model_name
        self.site_names: dict[str, str] = {}
        self.cost_names: dict[str, str] = {}
        self.plates: list[Plate] = []
        self.vmaps: list = []  # (vmap axis, plate name) for each jax.vmap seen so far


_local = threading.local()


def _state(api: str, name: Any) -> _TraceState:
    stack = getattr(_local, "stack", None)
    if not stack:
        raise ModelError(
            f"{api}({name!r}, ...) was called outside a traced model: a model function is never called "
            "directly (there are no random keys to draw from). Decorate it with @scg.model (if it is not yet) "
            "and run it through model.trace(params, *args), scg.compile(model) or "
            "scg.expectation(model, params, *args).",
            site=name if isinstance(name, str) else None, source=_caller_source())
    return stack[-1]


@contextlib.contextmanager
def _tracing(model_name: str):
    stack = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = []
    state = _TraceState(model_name)
    stack.append(state)
    try:
        yield state
    finally:
        stack.pop()


def _caller_source() -> str | None:
    frames = [(f.filename, f.lineno) for f in reversed(traceback.extract_stack())]
    return _jax.user_source_of_frames(frames)


# --- specs carried by the primitives -------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class SiteSpec:
    name: str
    dist: DistSpec
    shape: tuple
    dtype: Any
    source: str | None
    plates: tuple
    discrete: bool
    enumerable: bool
    reparameterizable: bool
    support_inputs: tuple = ()

    def __str__(self) -> str:  # shown by jaxpr printing
        return f"{self.name}~{self.dist.name}"


@dataclass(frozen=True, eq=False)
class LogProbSpec:
    dist: DistSpec
    shape: tuple
    dtype: Any
    source: str | None

    def __str__(self) -> str:
        return f"log_prob {self.dist.name}"


@dataclass(frozen=True, eq=False)
class CostSpec:
    name: str
    source: str | None
    plates: tuple

    def __str__(self) -> str:
        return self.name


def _leaf_names(distribution: Any, leaves: list) -> tuple:
    """Names of the distribution's operands (``loc``, ``scale``, ...), found by identity."""
    candidates: list[tuple[str, Any]] = []
    d, prefix = distribution, ""
    while d is not None:
        for k in getattr(d, "arg_constraints", {}):
            v = d.__dict__.get(k)
            if v is not None:
                candidates.append((prefix + k, v))
        d, prefix = getattr(d, "base_dist", None), prefix + "base."
    names = []
    for i, leaf in enumerate(leaves):
        found = next((k for k, v in candidates if v is leaf), None)
        names.append(found or f"arg{i}")
    return tuple(names)


def _as_operand(leaf: Any) -> Any:
    return leaf if isinstance(leaf, jax.Array) else jnp.asarray(leaf)


def _dist_spec(distribution: Any) -> tuple[DistSpec, list]:
    leaves, treedef = jax.tree_util.tree_flatten(distribution)
    names = _leaf_names(distribution, leaves)
    return DistSpec(type(distribution), treedef, names), [_as_operand(x) for x in leaves]


_ABSTRACT_RESULTS: dict = {}


def _abstract_result(what: str, spec: DistSpec, shapes: list, fn: Callable) -> Any:
    """``jax.eval_shape(fn, shapes)``, once per family, structure and operand shapes.

    A model with thousands of sites of a few kinds (an unrolled chain) evaluates each kind once.
    """
    key = (what, spec.family, spec.treedef, tuple((s.shape, str(s.dtype)) for s in shapes))
    try:
        hit = _ABSTRACT_RESULTS.get(key)
    except TypeError:  # an unhashable treedef: no caching
        return jax.eval_shape(fn, shapes)
    if hit is None:
        hit = _ABSTRACT_RESULTS[key] = jax.eval_shape(fn, shapes)
    return hit


def _support_operands(support: Any, leaves: list) -> tuple:
    """Indices of the distribution's operands its support is built from (found by identity)."""
    bounds = [v for v in vars(support).values() if isinstance(v, jax.Array)] if support is not None else []
    return tuple(i for i, leaf in enumerate(leaves) if any(leaf is b for b in bounds))


def _check_distribution(api: str, name: str, distribution: Any) -> None:
    if not isinstance(distribution, dist.Distribution):
        raise ModelError(
            f"{api}: site {name!r} was given {type(distribution).__name__!s} ({distribution!r:.60}), "
            "not a distribution. Pass a numpyro.distributions object, e.g. "
            "scg.sample('z', dist.Normal(loc, scale)).",
            site=name, source=_caller_source())


def _check_plates(kind: str, name: str, shape: tuple, plates: tuple, source: str | None) -> None:
    for p in plates:
        if len(shape) <= p.dim or shape[p.dim] != p.size:
            found = f"size {shape[p.dim]}" if len(shape) > p.dim else "no such dimension"
            raise ModelError(
                f"{kind} {name!r} is inside plate {p.name!r} of size {p.size}, so its dimension {p.dim} "
                f"must have size {p.size}, but its shape is {tuple(shape)} ({found}). Make the plate "
                "dimension the leading dimension (vectorize over the examples), or move the "
                f"{kind} outside the plate.", site=name, source=source)


# --- jax.vmap: the mapped axis is a plate ------------------------------------------------------------


def _vmap_plate(axis: Any, size: int, plates: tuple) -> tuple:
    """The plates of a site or cost under one more ``jax.vmap``: that vmap's plate at dimension 0.

    Sites and costs under the same ``jax.vmap`` share its plate (``vmap1``, ``vmap2``, ... in order
    of first use); sibling vmaps are distinct plates, nested vmaps nested plates.
    """
    state = _state("jax.vmap of a model", "<vmap>")
    for seen, name in state.vmaps:
        if seen is axis:
            break
    else:
        name = f"vmap{len(state.vmaps) + 1}"
        state.vmaps.append((axis, name))  # the axis object is kept, so its identity stays unique
    return (Plate(name, int(size), 0), *(Plate(p.name, p.size, p.dim + 1) for p in plates))


def _batched_distribution(spec: DistSpec, leaves: list, dims: list, size: int, what: str) -> tuple[DistSpec, list]:
    """The distribution of every example at once: batched operands moved to the front, rebuilt by the
    family's constructor (so its batch shape gains the mapped axis); unmapped operands broadcast.

    With no mapped operand every example still draws its own value: the distribution is expanded.
    """
    if all(d is None for d in dims):
        base = spec.build(leaves)
        return _dist_spec(base.expand((size, *base.batch_shape)))
    if any("." in n or n.startswith("arg") for n in spec.leaf_names):
        raise ModelError(
            f"{what}: a {spec.name} inside jax.vmap is not supported (its operands are not the constructor's "
            "own arguments, e.g. a .to_event() or .expand() wrapper). Build the distribution outside the "
            "wrapper's vmap, or use scg.plate over a batch dimension instead of jax.vmap.")
    moved = [x if d is None else jnp.moveaxis(x, d, 0) for x, d in zip(leaves, dims)]
    return _dist_spec(spec.family(**dict(zip(spec.leaf_names, moved))))


def _sample_batched(axis, size, args, dims, *, spec):
    new_dist, leaves = _batched_distribution(spec.dist, list(args), list(dims), size, f"site {spec.name!r}")
    shape = (size, *spec.shape)
    new = dataclasses.replace(spec, dist=new_dist, shape=shape, plates=_vmap_plate(axis, size, spec.plates))
    return _jax.sample_p.bind(*leaves, spec=new), 0


def _log_prob_batched(axis, size, args, dims, *, spec):
    *leaves, value = args
    *leaf_dims, value_dim = dims
    if all(d is None for d in leaf_dims):  # one distribution, many values: nothing to rebuild
        new_dist, new_leaves = spec.dist, list(leaves)
    else:
        new_dist, new_leaves = _batched_distribution(spec.dist, leaves, leaf_dims, size, "scg.log_prob")
    value = jnp.broadcast_to(value[None], (size, *value.shape)) if value_dim is None else jnp.moveaxis(value, value_dim, 0)
    out = jax.eval_shape(lambda ls: new_dist.build(ls[:-1]).log_prob(ls[-1]),
                         [jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)) for x in (*new_leaves, value)])
    new = dataclasses.replace(spec, dist=new_dist, shape=tuple(out.shape), dtype=out.dtype)
    return _jax.log_prob_p.bind(*new_leaves, value, spec=new), 0


def _cost_batched(axis, size, args, dims, *, spec):
    (value,), (dim,) = args, dims
    # a cost every example shares (not mapped) is still each example's cost
    value = jnp.broadcast_to(value, (size, *value.shape)) if dim is None else jnp.moveaxis(value, dim, 0)
    new = dataclasses.replace(spec, plates=_vmap_plate(axis, value.shape[0], spec.plates))
    return _jax.cost_p.bind(value, spec=new), 0


_jax.def_batching(_jax.sample_p, _sample_batched)
_jax.def_batching(_jax.log_prob_p, _log_prob_batched)
_jax.def_batching(_jax.cost_p, _cost_batched)


# --- the user-facing primitives --------------------------------------------------------------------


def sample(name: str, distribution: Any) -> jax.Array:
    """Draws the site ``name`` from ``distribution`` (a ``numpyro.distributions`` object).

    Inside a traced model this records a stochastic node; the value is drawn by
    the compiled objective from a key derived from the objective's key and ``name``.

    Examples:
      >>> import jax, jax.numpy as jnp, numpyro.distributions as dist, scg
      >>> @scg.model
      ... def m(params, x):
      ...     z = scg.sample("z", dist.Normal(params["mu"], 1.0))
      ...     scg.cost("fit", (z - x) ** 2)
      >>> params, x = {"mu": jnp.array(0.5)}, jnp.array(1.0)
      >>> site = m.trace(params, x).site("z")
      >>> site.dist.name, site.output.shape
      ('Normal', ())
    """
    state = _state("scg.sample", name)
    source = _caller_source()
    if not isinstance(name, str) or not name:
        raise ModelError(f"scg.sample: the site name must be a non-empty string, got {name!r}", source=source)
    _check_distribution("scg.sample", name, distribution)
    # JAX may trace a loop body twice (to settle the carry's weak types): a name seen again at the
    # very same line is left to the graph's own duplicate check, which sees the final jaxpr only
    if name in state.site_names and state.site_names[name] != (source or "?"):
        raise ModelError(
            f"duplicate site name {name!r} (first sampled at {state.site_names[name]}); site names must be "
            "unique within a model: give each scg.sample its own name (e.g. f'z_{i}' in a loop)",
            site=name, source=source)
    spec, leaves = _dist_spec(distribution)
    try:
        shapes = [jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)) for x in leaves]
        out = _abstract_result("sample", spec, shapes, lambda ls: spec.build(ls).sample(jax.random.key(0)))
    except (ValueError, TypeError) as e:
        raise ModelError(f"site {name!r}: cannot draw from {spec.name} with these parameters: {e}",
                         site=name, source=source) from e
    plates = tuple(state.plates)
    _check_plates("site", name, out.shape, plates, source)
    support = getattr(distribution, "support", None)
    site_spec = SiteSpec(
        name=name, dist=spec, shape=tuple(out.shape), dtype=out.dtype, source=source, plates=plates,
        discrete=bool(getattr(support, "is_discrete", False)),
        enumerable=bool(distribution.has_enumerate_support),
        reparameterizable=bool(distribution.has_rsample),
        support_inputs=_support_operands(support, leaves))
    state.site_names[name] = source or "?"
    return _jax.sample_p.bind(*leaves, spec=site_spec)


def cost(name: str, value: Any) -> None:
    """Declares ``value`` (a floating array) a cost: its elements are summed into the loss.

    Examples:
      >>> import jax, jax.numpy as jnp, numpyro.distributions as dist, scg
      >>> @scg.model
      ... def m(params, x):
      ...     z = scg.sample("z", dist.Normal(params["mu"], 1.0))
      ...     scg.cost("fit", (z - x) ** 2)
      >>> params, x = {"mu": jnp.array(0.5)}, jnp.array(1.0)
      >>> round(float(scg.expectation(m, params, x)), 5)  # E[(z - x)²] = (μ - x)² + 1
      1.25
    """
    state = _state("scg.cost", name)
    source = _caller_source()
    if not isinstance(name, str) or not name:
        raise ModelError(f"scg.cost: the cost name must be a non-empty string, got {name!r}", source=source)
    if name in state.cost_names and state.cost_names[name] != (source or "?"):
        raise ModelError(
            f"duplicate cost name {name!r} (first declared at {state.cost_names[name]}); cost names must be "
            "unique within a model", site=name, source=source)
    if isinstance(value, (float, int)) and not isinstance(value, bool):
        value = jnp.asarray(value, dtype=jnp.result_type(float))
    if not isinstance(value, (jax.Array, np.ndarray)):
        raise ModelError(
            f"cost {name!r} is a {type(value).__name__}, not an array; pass a JAX array of floats "
            "(e.g. jnp.sum(...)); its elements are summed into the loss", site=name, source=source)
    if not jnp.issubdtype(value.dtype, jnp.floating):
        raise ModelError(
            f"cost {name!r} has dtype {value.dtype}, but costs must be floating arrays; convert it "
            "with .astype(jnp.float32) if the value is meant as a number", site=name, source=source)
    plates = tuple(state.plates)
    _check_plates("cost", name, value.shape, plates, source)
    state.cost_names[name] = source or "?"
    _jax.cost_p.bind(jnp.asarray(value), spec=CostSpec(name, source, plates))


def log_prob(distribution: Any, value: Any) -> jax.Array:
    """``distribution.log_prob(value)``, recorded so that passes can recognize it.

    Inside a model this is the form ``integrate_kl`` pattern-matches (a sampled KL
    ``log q(z) - log p(z)``). Outside a model it simply evaluates the log density.

    Examples:
      >>> import jax, jax.numpy as jnp, numpyro.distributions as dist, scg
      >>> @scg.model
      ... def m(params, x):
      ...     q = dist.Normal(params["mu"], 1.0)
      ...     z = scg.sample("z", q)
      ...     scg.cost("kl", scg.log_prob(q, z) - scg.log_prob(dist.Normal(0.0, 1.0), z))
      >>> params = {"mu": jnp.array(0.5)}
      >>> round(float(scg.expectation(m, params, jnp.zeros(()))), 6)  # KL(N(0.5, 1) ‖ N(0, 1)) = 0.5²/2
      0.125
      >>> round(float(scg.log_prob(dist.Normal(0.0, 1.0), 0.0)), 4)  # outside a model: the log density
      -0.9189
    """
    stack = getattr(_local, "stack", None)
    if not stack:
        return log_density(distribution, value)
    source = _caller_source()
    _check_distribution("scg.log_prob", "<log_prob>", distribution)
    spec, leaves = _dist_spec(distribution)
    value = _as_operand(value)
    try:
        shapes = [jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)) for x in (*leaves, value)]
        out = _abstract_result("log_prob", spec, shapes, lambda ls: spec.build(ls[:-1]).log_prob(ls[-1]))
    except (ValueError, TypeError) as e:
        raise ModelError(f"scg.log_prob: {spec.name}.log_prob cannot take a value of shape "
                         f"{jnp.shape(value)}: {e}", source=source) from e
    return _jax.log_prob_p.bind(*leaves, value, spec=LogProbSpec(spec, tuple(out.shape), out.dtype, source))


@contextlib.contextmanager
def plate(name: str, size: int):
    """Declares a conditionally independent batch dimension (the Pyro/NumPyro idiom).

    Inside ``with scg.plate("data", N):`` dimension ``k`` of every site and cost
    (``k`` = the number of enclosing plates) has size ``N`` and indexes examples
    that are independent given what is outside the plate, so the score term of
    example ``i`` is multiplied only by example ``i``'s downstream costs.

    Examples:
      >>> import jax, jax.numpy as jnp, numpyro.distributions as dist, scg
      >>> @scg.model
      ... def m(params, x):
      ...     with scg.plate("data", x.shape[0]):
      ...         b = scg.sample("b", dist.Bernoulli(logits=params["w"] * jnp.ones(x.shape[0])))
      ...         scg.cost("err", (b - x) ** 2.0)
      >>> graph = m.trace({"w": jnp.array(0.0)}, jnp.array([0.0, 1.0, 1.0]))
      >>> [p.name for p in graph.site("b").plates]
      ['data']
    """
    state = _state("scg.plate", name)
    if any(p.name == name for p in state.plates):
        raise ModelError(f"plate {name!r} is already open; nested plates need distinct names", site=name,
                         source=_caller_source())
    if not isinstance(size, (int, np.integer)) or size < 1:
        raise ModelError(f"plate {name!r}: size must be a positive int, got {size!r}", site=name,
                         source=_caller_source())
    state.plates.append(Plate(name, int(size), len(state.plates)))
    try:
        yield
    finally:
        state.plates.pop()


# --- the model ---------------------------------------------------------------------------------


def _check_params(model_name: str, params: Any) -> None:
    # None is an empty pytree to JAX: without is_leaf a None parameter would vanish silently
    leaves_with_paths, _ = jax.tree_util.tree_flatten_with_path(params, is_leaf=lambda x: x is None)
    for path, leaf in leaves_with_paths:
        if leaf is None:
            raise ModelError(
                f"model {model_name!r}: parameter params{jax.tree_util.keystr(path)} is None; every parameter "
                "must be a floating array (JAX would silently drop a None leaf, and its gradient with it). Give "
                "it a value, e.g. jnp.zeros(3), or remove the entry")
    if not leaves_with_paths:
        raise ModelError(f"model {model_name!r}: the first argument (the parameters) has no array leaves; "
                         "pass a pytree of floating arrays, e.g. {'w': jnp.zeros(3)}")
    for path, leaf in leaves_with_paths:
        dtype = getattr(leaf, "dtype", None)
        if dtype is None and isinstance(leaf, float):
            continue
        if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
            where = "params" + jax.tree_util.keystr(path)
            kind = (f"dtype {dtype}" if dtype is not None else
                    f"{'an' if type(leaf).__name__[0] in 'aeiou' else 'a'} {type(leaf).__name__} ({leaf!r:.40})")
            raise ModelError(
                f"model {model_name!r}: parameter {where} is {kind}; the first argument must be a pytree "
                "of floating arrays (gradients are taken with respect to it). Pass data and integer "
                "settings as later arguments or close over them.")


def _check_data(where: str, args: tuple, input_name: Callable) -> None:
    """Raises a ``TypeError`` naming the data argument unless every leaf of ``args`` is an array or a number.

    The one check of the model's data arguments, shared by :meth:`Model.trace` and the
    :class:`scg.Objective` methods. ``input_name(path)`` names a leaf (``x``, ``batch['y']``).
    """
    leaves, _ = jax.tree_util.tree_flatten_with_path(tuple(args))
    for path, leaf in leaves:
        array_like = hasattr(leaf, "dtype") and hasattr(leaf, "shape")
        # numpy arrays of strings, objects or datetimes have a dtype JAX cannot hold
        not_numeric = array_like and isinstance(leaf.dtype, np.dtype) and leaf.dtype.kind in "OSUVMm"
        if not_numeric or (not array_like and not isinstance(leaf, (bool, int, float, complex))):
            index = getattr(path[0], "idx", None)
            at = f" (position {index + 1} after params)" if index is not None else ""
            kind = f"an array of dtype {leaf.dtype}" if not_numeric else f"{type(leaf).__name__} {leaf!r:.40}"
            raise TypeError(f"{where}: data argument {input_name(path)}{at} is {kind}, not an array of numbers; "
                            "pass arrays (or numbers) as the model's data arguments, and close over other "
                            "settings in the model function")


def _is_shape_error(text: str) -> bool:
    text = text.lower()
    return "broadcast" in text or "incompatible shapes" in text or "rank promotion" in text


_COST_CALL = re.compile(r"\bcost\(\s*(['\"])([^'\"]+)\1")


def _translate_trace_error(model_name: str, e: Exception) -> ModelError | None:
    """A shape error JAX raised while running the model, as a ModelError naming the model code that failed.

    Errors scg raised on purpose pass unchanged. A failure inside a numpyro distribution's constructor
    is about that distribution's parameters; any other one is in the model's own JAX code, named by its
    line (and by the cost, when the line declares one).
    """
    if isinstance(e, ScgError) or not _is_shape_error(str(e)):
        return None
    text = str(e).rstrip(".")
    summary = traceback.extract_tb(e.__traceback__)
    frames = [(f.filename, f.lineno) for f in reversed(summary)]
    source = _jax.user_source_of_frames(frames)
    family = None
    tb = e.__traceback__
    while tb is not None:  # the innermost numpyro distribution under construction, if any
        code = tb.tb_frame.f_code
        if code.co_name == "__init__" and f"{os.sep}numpyro{os.sep}distributions{os.sep}" in code.co_filename:
            this = tb.tb_frame.f_locals.get("self")
            if isinstance(this, dist.Distribution):
                family = type(this).__name__
        tb = tb.tb_next
    if family == "ExpandedDistribution":
        return ModelError(
            f"model {model_name!r}: .expand() cannot reach the batch shape it was given: {text}. The shape "
            "passed to .expand(...) must broadcast from the distribution's own batch shape (numpy rules: "
            "equal sizes or 1, new axes on the left)", source=source)
    if family is not None:
        return ModelError(
            f"model {model_name!r}: distribution parameters do not broadcast ({family}): {text}. Give every "
            "parameter of a distribution shapes that broadcast together (numpy rules)", source=source)
    user_line = next((f.line for f in reversed(summary)
                      if source and f"{os.path.basename(f.filename)}:{f.lineno}" == source), None)
    match = _COST_CALL.search(user_line or "")
    what = (f"the value of cost {match.group(2)!r} has operands whose shapes do not broadcast"
            if match else "array shapes in the model's code do not broadcast")
    line = f" (`{user_line.strip()}`)" if user_line else ""
    ranks = ("; under jax_numpy_rank_promotion='raise' their ranks must match too: add the missing leading "
             "axes with x[None] or jnp.expand_dims") if "rank_promotion" in text else ""
    return ModelError(
        f"model {model_name!r}: {what}{line}: JAX says: {text}. Give the arrays combined there shapes that "
        f"broadcast together (numpy rules{ranks})", site=match.group(2) if match else None, source=source)


class Model:
    """A model function decorated with :func:`model`. ``model.trace(params, *args)`` gives its Graph."""

    def __init__(self, fn: Callable):
        self.fn = fn
        self.name = getattr(fn, "__name__", "model")
        functools.update_wrapper(self, fn)
        try:
            self._arg_names = list(inspect.signature(fn).parameters)[1:]
        except (TypeError, ValueError):
            self._arg_names = []

    def __call__(self, params, *args):
        # inside another model's trace, calling a model inlines its sites and costs
        if not getattr(_local, "stack", None):
            raise ModelError(
                f"model {self.name!r} was called directly; a model decorated with @scg.model is not run by "
                "calling it (there are no random keys to draw from). Use "
                f"{self.name}.trace(params, *args) for its graph, scg.compile({self.name}).loss/grad(params, "
                f"*args, key=...) for estimates, or scg.expectation({self.name}, params, *args) for the exact "
                "expected cost.", source=_caller_source())
        return self.fn(params, *args)

    def trace(self, params: Any, *args: Any) -> Graph:
        """Traces one call into a Graph. Only shapes and dtypes of the arguments matter."""
        _check_params(self.name, params)
        _check_data(f"model {self.name!r}", args, self._input_name)
        param_leaves, params_treedef = jax.tree_util.tree_flatten_with_path(params)
        input_leaves, inputs_treedef = jax.tree_util.tree_flatten_with_path(tuple(args))
        param_names = tuple("params" + jax.tree_util.keystr(p) for p, _ in param_leaves)
        input_names = tuple(self._input_name(p) for p, _ in input_leaves)
        params_def = jax.tree_util.tree_structure(params)
        inputs_def = jax.tree_util.tree_structure(tuple(args))

        with _tracing(self.name) as state:
            def flat(p_leaves, x_leaves):
                p = jax.tree_util.tree_unflatten(params_def, p_leaves)
                xs = jax.tree_util.tree_unflatten(inputs_def, x_leaves)
                try:
                    self.fn(p, *xs)
                except (ValueError, TypeError) as e:
                    translated = _translate_trace_error(self.name, e)
                    if translated is None:
                        raise
                    raise translated from e
                # jax.make_jaxpr keeps equations whose results are unused, so nothing needs returning
                return []

            closed = jax.make_jaxpr(flat)([l for _, l in param_leaves], [l for _, l in input_leaves])
        n_params = len(param_leaves)
        return graph_from_jaxpr(self.name, closed, n_params, params_treedef, param_names, inputs_treedef, input_names)

    def _input_name(self, path) -> str:
        # path[0] indexes the positional data argument; name it after the function's parameter
        first, rest = path[0], path[1:]
        index = getattr(first, "idx", None)
        base = self._arg_names[index] if index is not None and index < len(self._arg_names) else f"args[{index}]"
        return base + jax.tree_util.keystr(tuple(rest))


def model(fn: Callable) -> Model:
    """Decorates a model function ``fn(params, *data)`` that calls scg.sample / scg.cost.

    Examples:
      >>> import jax, jax.numpy as jnp, numpyro.distributions as dist, scg
      >>> @scg.model
      ... def m(params, x):
      ...     z = scg.sample("z", dist.Normal(params["mu"], 1.0))
      ...     scg.cost("fit", (z - x) ** 2)
      >>> params, x = {"mu": jnp.array(0.5)}, jnp.array(1.0)
      >>> graph = m.trace(params, x)
      >>> [site.name for site in graph.sites], graph.downstream_costs
      (['z'], {'z': ('fit',)})
    """
    return Model(fn)


# --- jaxpr -> IR -----------------------------------------------------------------------------------

_SCG_API = {"scg_sample": "scg.sample", "scg_cost": "scg.cost", "scg_log_prob": "scg.log_prob"}


class _JaxprReader:
    """Reads jaxpr equations into IR nodes (one node per equation; ``jit`` calls inlined)."""

    def __init__(self, model_name: str):
        self.model_name = model_name
        self.env: dict = {}
        self.consts: list = []
        self.nodes: list = []

    @staticmethod
    def fresh(v) -> Var:
        return Var(tuple(v.aval.shape), v.aval.dtype)

    def read(self, a):
        if _jax.is_literal(a):
            val = _jax.literal_value(a)
            return Literal(val, tuple(np.shape(val)), a.aval.dtype)
        return self.env[a]

    def bind_consts(self, constvars, values) -> None:
        for v, c in zip(constvars, values):
            self.env[v] = self.fresh(v)
            self.consts.append((self.env[v], c))

    def emit(self, eqns) -> None:
        for eqn in eqns:
            prim = eqn.primitive
            inputs = [self.read(a) for a in eqn.invars]
            body = _jax.inline_body(eqn)
            if body is not None:
                sub_jaxpr, sub_consts = body
                self.bind_consts(sub_jaxpr.constvars, sub_consts)
                for v, a in zip(sub_jaxpr.invars, inputs):
                    self.env[v] = a
                self.emit(sub_jaxpr.eqns)
                for outer, inner in zip(eqn.outvars, sub_jaxpr.outvars):
                    self.env[outer] = self.read(inner)
                continue
            outputs = [self.fresh(v) for v in eqn.outvars]
            for v, o in zip(eqn.outvars, outputs):
                self.env[v] = o
            loop = _jax.scan_parts(eqn)
            if loop is not None and _jax.scg_primitive_inside(eqn.params):
                self.nodes.append(self._scan(eqn, loop, inputs, outputs))
                continue
            if prim is _jax.sample_p:
                spec = eqn.params["spec"]
                self.nodes.append(Site(
                    name=spec.name, dist=spec.dist, inputs=tuple(inputs), output=outputs[0], source=spec.source,
                    key_name=spec.name, plates=spec.plates, discrete=spec.discrete, enumerable=spec.enumerable,
                    reparameterizable=spec.reparameterizable, support_inputs=spec.support_inputs))
                self.nodes.append(Check(f"site {spec.name!r}", spec.dist, tuple(inputs), spec.source))
            elif prim is _jax.log_prob_p:
                spec = eqn.params["spec"]
                self.nodes.append(LogProb(dist=spec.dist, dist_inputs=tuple(inputs[:-1]), value=inputs[-1],
                                          output=outputs[0], source=spec.source))
                self.nodes.append(Check(f"scg.log_prob({spec.dist.name})", spec.dist, tuple(inputs[:-1]),
                                        spec.source))
            elif prim is _jax.cost_p:
                spec = eqn.params["spec"]
                # the cost primitive is the identity: its output is its input
                self.env[eqn.outvars[0]] = inputs[0]
                self.nodes.append(Cost(name=spec.name, input=inputs[0], source=spec.source, plates=spec.plates))
            else:
                self._check_higher_order(eqn)
                self.nodes.append(Equation(prim, dict(eqn.params), tuple(inputs), tuple(outputs),
                                           _jax.equation_source(eqn)))

    def _scan(self, eqn, loop, inputs, outputs) -> Scan:
        """Reads the body of a ``lax.scan`` holding sites or costs into a nested Graph."""
        body_jaxpr, body_consts, length, reverse, num_consts, num_carry = loop
        source = _jax.equation_source(eqn)
        reader = _JaxprReader(self.model_name)
        reader.bind_consts(body_jaxpr.constvars, body_consts)
        body_inputs = [reader.fresh(v) for v in body_jaxpr.invars]
        for v, b in zip(body_jaxpr.invars, body_inputs):
            reader.env[v] = b
        reader.emit(body_jaxpr.eqns)
        body_outputs = tuple(reader.read(v) for v in body_jaxpr.outvars)
        labels = ([f"consts[{i}]" for i in range(num_consts)] + [f"carry[{i}]" for i in range(num_carry)]
                  + [f"xs[{i}]" for i in range(len(body_inputs) - num_consts - num_carry)])
        name = f"scan@{source}" if source else "scan"
        taken = {n.name for n in self.nodes if isinstance(n, Scan)}
        name = name if name not in taken else f"{name}#{len(taken)}"
        body = Graph(name=f"{self.model_name}/{name}", params=(), params_treedef=None, param_names=(),
                     inputs=tuple(body_inputs), inputs_treedef=None, input_names=tuple(labels),
                     consts=tuple(reader.consts), nodes=tuple(reader.nodes))
        body.validate()
        body = eliminate_dead_code(body, keep=body_outputs)
        return Scan(name=name, body=body, body_outputs=body_outputs, inputs=tuple(inputs), outputs=tuple(outputs),
                    length=length, reverse=reverse, num_consts=num_consts, num_carry=num_carry, source=source)

    def _check_higher_order(self, eqn) -> None:
        """Refuses an scg primitive inside a higher-order equation; any other one is an opaque node."""
        inner = _jax.scg_primitive_inside(eqn.params)
        refusal = _jax.CONTROL_FLOW_REFUSALS.get(eqn.primitive.name)
        if inner and refusal:
            raise ModelError(
                f"model {self.model_name!r}: {_SCG_API[inner]} is called inside `{eqn.primitive.name}`: {refusal}",
                source=_jax.equation_source(eqn))
        if inner:
            raise ModelError(
                f"model {self.model_name!r}: {_SCG_API[inner]} is called inside `{eqn.primitive.name}` "
                f"(e.g. jax.lax.{eqn.primitive.name} or a custom derivative rule); scg cannot see sites or "
                "costs inside this primitive. Move the sample out of it, or write the loop with jax.lax.scan "
                "(sites inside scan bodies are supported).", source=_jax.equation_source(eqn))


def _check_unique_names(graph: Graph) -> None:
    """Site and cost names are unique across the model, scan bodies included."""
    seen: dict = {}
    for site in all_sites(graph):
        if site.name in seen:
            raise ModelError(
                f"duplicate site name {site.name!r} (first sampled at {seen[site.name]}); site names must be "
                "unique within a model: give each scg.sample its own name (e.g. f'z_{i}' in a Python loop; "
                "inside jax.lax.scan one name is one stacked site)", site=site.name, source=site.source)
        seen[site.name] = site.source or "?"


def _check_has_cost(graph: Graph) -> None:
    """A model declares at least one cost, at its top level or in a scan body (a scan body alone may have none)."""
    stack = [graph]
    while stack:
        g = stack.pop()
        if g.costs:
            return
        stack.extend(s.body for s in g.scans)
    sites = [s.name for s in all_sites(graph)]
    drawn = f" (it draws {', '.join(repr(n) for n in sites)})" if sites else ""
    raise ModelError(
        f"model {graph.name!r} declares no cost{drawn}: its loss would be 0 for every parameter, and every "
        "gradient 0. A model needs at least one scg.cost: the arrays whose elements are summed into the loss "
        "(a value the model function returns is ignored). Declare what to minimize, e.g. "
        "scg.cost('nll', -scg.log_prob(dist.Normal(z, 1.0), x)) or scg.cost('fit', jnp.sum((z - x) ** 2))")


def graph_from_jaxpr(name, closed, n_params, params_treedef, param_names, inputs_treedef, input_names) -> Graph:
    """Reads a closed jaxpr of a traced model into a Graph."""
    reader = _JaxprReader(name)
    reader.bind_consts(closed.jaxpr.constvars, closed.consts)
    invars = [reader.fresh(v) for v in closed.jaxpr.invars]
    for v, iv in zip(closed.jaxpr.invars, invars):
        reader.env[v] = iv
    reader.emit(closed.jaxpr.eqns)
    graph = Graph(
        name=name, params=tuple(invars[:n_params]), params_treedef=params_treedef, param_names=param_names,
        inputs=tuple(invars[n_params:]), inputs_treedef=inputs_treedef, input_names=input_names,
        consts=tuple(reader.consts), nodes=tuple(reader.nodes))
    graph.validate()
    _check_unique_names(graph)
    _check_has_cost(graph)
    # distribution constructors leave argument-validation computations nobody reads
    return eliminate_dead_code(graph)


_EMITTED: dict = {}


def emit(fn: Callable, inputs: list, name: str = "pass", source: str | None = None, *,
         cache_key: Any = None) -> tuple[list, list, list]:
    """Traces ``fn(*input_values)`` and returns ``(nodes, outputs, consts)`` that compute it from ``inputs``.

    Passes use this to build deterministic nodes (``loc + scale * eps``, an analytic KL)
    in the graph's own IR, from the same jaxpr reading the tracer uses.
    """
    avals = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in inputs]
    # a pass rewriting thousands of sites of one kind traces the rewrite once (cache_key names the kind)
    key = None if cache_key is None else (cache_key, tuple((a.shape, str(a.dtype)) for a in avals))
    closed = _EMITTED.get(key) if key is not None else None
    if closed is None:
        closed = jax.make_jaxpr(lambda *xs: fn(*xs))(*avals)
        if key is not None:
            _EMITTED[key] = closed
    reader = _JaxprReader(name)
    reader.bind_consts(closed.jaxpr.constvars, closed.consts)
    for v, a in zip(closed.jaxpr.invars, inputs):
        reader.env[v] = a
    reader.emit(closed.jaxpr.eqns)
    outputs = [reader.read(v) for v in closed.jaxpr.outvars]
    nodes = [n.replace(source=source) for n in reader.nodes]
    return nodes, outputs, reader.consts
