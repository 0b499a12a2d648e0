"""Every use of ``jax.extend``, and every table keyed by JAX primitive, lives here.

``jax.extend`` promises no stability, and primitive names change between JAX
releases (``checkpoint`` became ``remat2``, ``xla_call`` became ``pjit``), so
the surface scg touches is kept in this one small module: the three scg
primitives (made with ``jax.extend.core.Primitive``, each defined beside its
rules, as Oryx does), re-binding a jaxpr equation in the textbook interpreter,
finding the sub-jaxprs of a higher-order primitive, reading the user's source
line of an equation, and the rule tables the reader and the passes consult.

Every table lookup has an **explicit default** (NumPyro's ``ops/provenance.py``
shape), chosen so that an unknown or renamed primitive is handled soundly:

* reading a jaxpr: an equation whose sub-jaxprs hold no scg primitive is one
  opaque deterministic node whose outputs depend on all its inputs (a sound
  over-approximation of its data flow); only the call primitives in
  :data:`INLINE_CALLS` are read into the graph;
* derivatives (``reparameterize``): a primitive is differentiable when all its
  outputs are floating, unless it is listed in :data:`ZERO_DERIVATIVE`; the
  check looks into every sub-jaxpr it finds;
* linearity (``integrate_kl``): a primitive not in :data:`LINEARITY` is
  nonlinear, so the pass refuses rather than guesses.
"""
from __future__ import annotations

import os
from typing import Any, Iterable, Iterator

import jax
import jax.extend as jex
import numpy as np

Primitive = jex.core.Primitive
ClosedJaxpr = jex.core.ClosedJaxpr
Jaxpr = jex.core.Jaxpr
JaxprVar = jex.core.Var
JaxprLiteral = jex.core.Literal


def _never_executed(name):
    def impl(*args, **params):
        raise RuntimeError(
            f"the scg primitive {name!r} was executed outside the scg interpreter; "
            "call the model through scg.compile / scg.expectation, not directly under jax.jit."
        )

    return impl


# --- sample_p: one draw ``value ~ family(*leaves)``. -------------------------------------------
# Operands: the flattened leaves of the distribution pytree. Params: ``spec`` (a trace.SiteSpec).
sample_p = Primitive("scg_sample")
sample_p.def_impl(_never_executed("scg_sample"))
sample_p.def_abstract_eval(lambda *leaves, spec: jax.core.ShapedArray(spec.shape, spec.dtype))

# --- log_prob_p: ``log family(*leaves).log_prob(value)``, visible to passes. -----------------------
# Operands: distribution leaves, then the value. Params: ``spec`` (a trace.LogProbSpec).
log_prob_p = Primitive("scg_log_prob")
log_prob_p.def_impl(_never_executed("scg_log_prob"))
log_prob_p.def_abstract_eval(lambda *operands, spec: jax.core.ShapedArray(spec.shape, spec.dtype))

# --- cost_p: marks an array as a cost; the identity on its operand. ----------------------------
cost_p = Primitive("scg_cost")
cost_p.def_impl(_never_executed("scg_cost"))
cost_p.def_abstract_eval(lambda value, *, spec: jax.core.ShapedArray(value.shape, value.dtype))

SCG_PRIMITIVES = (sample_p, log_prob_p, cost_p)


def def_batching(primitive: Any, rule: Any) -> None:
    """Registers ``rule(axis, size, batched_args, batch_dims, **params) -> (out, out_dim)`` for ``jax.vmap``.

    ``axis`` is the same object for every primitive under one ``jax.vmap`` and another
    object under another one (so a vmap can be told apart from its siblings), ``size``
    its length; a batch dimension of ``None`` marks an argument that is not mapped. The
    rule is called even when no argument is mapped (a sample under vmap is still drawn
    per example).
    """
    from jax.interpreters import batching  # the public module; imported here to keep it beside the rule

    batching.fancy_primitive_batchers[primitive] = (
        lambda axis, args, dims, **params: rule(axis, axis.size, args, dims, **params))


def bind(primitive: Any, params: dict, invals: list) -> list:
    """Re-binds a jaxpr equation on new operands; always returns a list of outputs."""
    bind_params = primitive.get_bind_params(params)
    subfuns: tuple = ()
    if isinstance(bind_params, tuple):  # older JAX: (subfuns, params)
        subfuns, bind_params = bind_params
    out = primitive.bind(*subfuns, *invals, **bind_params)
    return list(out) if primitive.multiple_results else [out]


def sub_jaxprs(params: dict) -> Iterator[Jaxpr]:
    """The sub-jaxprs of a higher-order equation (empty for a first-order one)."""
    return jex.core.jaxprs_in_params(params)


def literal_value(atom: Any) -> Any:
    return atom.val


def is_literal(atom: Any) -> bool:
    return isinstance(atom, JaxprLiteral)


_LIBRARY_DIRS = tuple(
    os.path.dirname(m.__file__) + os.sep
    for m in (jax, np)
) + (os.path.dirname(os.path.abspath(__file__)) + os.sep,)


_USER_DIRS_IN_SCG = (os.path.join(os.path.dirname(os.path.abspath(__file__)), "models") + os.sep,)


def _is_library_file(file_name: str) -> bool:
    if file_name.startswith(_USER_DIRS_IN_SCG):  # the bundled example models are user code
        return False
    if file_name.startswith(_LIBRARY_DIRS):
        return True
    # numpyro, optax, the standard library's contextlib and similar plumbing
    return any(part in file_name for part in (f"{os.sep}numpyro{os.sep}", f"{os.sep}contextlib.py", f"{os.sep}jaxlib{os.sep}", f"{os.sep}multipledispatch{os.sep}"))


def user_source_of_frames(frames: list[tuple[str, int]]) -> str | None:
    """The first frame, innermost first, that is the user's code, as ``file:line``."""
    for file_name, line in frames:
        if not _is_library_file(file_name):
            return f"{os.path.basename(file_name)}:{line}"
    return None


def equation_source(eqn: Any) -> str | None:
    """Best-effort ``file:line`` of the user code that emitted a jaxpr equation."""
    try:
        frames = [(f.file_name, f.line_num) for f in eqn.source_info.traceback.frames]
    except AttributeError:
        return None
    return user_source_of_frames(frames)


def is_scg_primitive(primitive: Any) -> bool:
    return any(primitive is p for p in SCG_PRIMITIVES)


def scg_primitive_inside(params: dict) -> str | None:
    """The name of an scg primitive anywhere in the sub-jaxprs of an equation's params, else None."""
    stack = list(sub_jaxprs(params))
    while stack:
        jaxpr = stack.pop()
        for eqn in jaxpr.eqns:
            if is_scg_primitive(eqn.primitive):
                return eqn.primitive.name
            stack.extend(sub_jaxprs(eqn.params))
    return None


# --- reading a jaxpr: which equations are inlined ------------------------------------------------
# Call primitives change nothing about the math: their body is read into the graph, so sites and
# costs inside a jax.jit-decorated helper are seen. Default: any other equation is one opaque
# deterministic node (its sub-jaxprs, if any, must hold no scg primitive).
INLINE_CALLS = frozenset({"jit", "pjit", "closed_call", "core_call"})


def inline_body(eqn: Any) -> tuple[Jaxpr, list] | None:
    """``(jaxpr, consts)`` of a call equation whose body is to be inlined, else None."""
    if eqn.primitive.name not in INLINE_CALLS or "jaxpr" not in eqn.params:
        return None
    sub = eqn.params["jaxpr"]
    if isinstance(sub, ClosedJaxpr):
        return sub.jaxpr, list(sub.consts)
    return sub, []


# --- loops and branches holding sites -------------------------------------------------------------
# `scan` (and everything that lowers to it: fori_loop with a static trip count, map) is read into a
# Scan node. Default for any other primitive holding an scg primitive: refused, with the reasons
# below where scg knows them.
CONTROL_FLOW_REFUSALS = {
    "while": "JAX cannot reverse-differentiate a while_loop, so no gradient estimator exists for sites in it. "
             "Give the loop a static trip count (jax.lax.fori_loop with Python-int bounds, or jax.lax.scan) "
             "and stop early with jnp.where inside the body.",
    "cond": "a site in one branch of jax.lax.cond / switch would be drawn on some paths only, which scg's "
            "estimators do not support. Sample the site unconditionally before the branch and select its use "
            "with jnp.where (the same distribution of the value, an unbiased estimator), or sample a site in "
            "every branch with the same name outside the cond.",
}


def scan_parts(eqn: Any) -> tuple | None:
    """``(body jaxpr, body consts, length, reverse, num_consts, num_carry)`` of a scan equation, else None."""
    if eqn.primitive.name != "scan":
        return None
    closed = eqn.params["jaxpr"]
    return (closed.jaxpr, list(closed.consts), int(eqn.params["length"]), bool(eqn.params["reverse"]),
            *_scan_operand_counts(eqn.params))


def _scan_operand_counts(params: dict) -> tuple[int, int]:
    """How many of a scan's operands are loop constants and how many are carried, in either layout.

    JAX ≤ 0.10 records them as ``num_consts`` / ``num_carry``; JAX 0.11 replaced both by
    ``ft_in``, a flat tree packed from the three groups (consts, carry, xs).
    """
    if "num_consts" in params and "num_carry" in params:
        return int(params["num_consts"]), int(params["num_carry"])
    if "ft_in" in params:
        consts, carry, _ = params["ft_in"].unpack()
        return len(consts), len(carry)
    raise NotImplementedError(
        "this JAX release records a lax.scan's operands in a layout scg does not know (neither num_consts/"
        f"num_carry nor ft_in; its params are {sorted(params)}); sites inside loops need scg updated for it")


# --- derivatives: primitives whose derivative is zero or undefined almost everywhere ------------
# Default: differentiable when every output is floating (an integer or boolean output has no
# useful derivative whatever the primitive is called).
ZERO_DERIVATIVE = frozenset({
    "lt", "le", "gt", "ge", "eq", "ne", "sign", "floor", "ceil", "round", "stop_gradient", "is_finite",
    "argmax", "argmin", "nextafter", "and", "or", "not", "xor", "population_count", "shift_left",
    "shift_right_logical", "shift_right_arithmetic", "rng_bit_generator", "random_bits",
})
# Primitives carrying the user's own derivative rule: trusted, their bodies are not searched.
TRUSTED_DERIVATIVE = frozenset({"custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr"})


def has_zero_derivative(primitive_name: str, out_dtypes: Iterable, allow: frozenset = frozenset()) -> bool:
    """Whether the primitive's derivative is useless (zero or undefined almost everywhere)."""
    if primitive_name in allow or primitive_name in TRUSTED_DERIVATIVE:
        return False
    if primitive_name in ZERO_DERIVATIVE:
        return True
    return any(not np.issubdtype(np.dtype(d), np.inexact) for d in out_dtypes if not str(d).startswith("key"))


def zero_derivative_inside(params: dict, allow: frozenset = frozenset()) -> str | None:
    """The first listed zero-derivative primitive inside the sub-jaxprs of ``params``, else None.

    Inside bodies only :data:`ZERO_DERIVATIVE` counts: loop counters and branch indices are
    integers by design and carry no value of the site.
    """
    stack = list(sub_jaxprs(params))
    while stack:
        jaxpr = stack.pop()
        for eqn in jaxpr.eqns:
            name = eqn.primitive.name
            if name in TRUSTED_DERIVATIVE or name in allow:
                continue
            if name in ZERO_DERIVATIVE:
                return name
            stack.extend(sub_jaxprs(eqn.params))
    return None


# --- linearity (integrate_kl: may an expectation move inside?) ----------------------------------
# "linear": the output is a linear map of each operand (sums, differences, reshapes, casts);
# "scaling": bilinear (a product: linear in the term when the other factor does not depend on z);
# "divide": linear in the numerator. Default: "nonlinear".
LINEARITY = {
    **dict.fromkeys(("neg", "reduce_sum", "broadcast_in_dim", "reshape", "squeeze", "expand_dims", "transpose",
                     "copy", "copy_p", "convert_element_type", "add", "sub", "add_any"), "linear"),
    **dict.fromkeys(("mul", "dot_general"), "scaling"),
    "div": "divide",
}
# Primitives that only cast or repeat a value (a log density behind them is still that density).
SHAPE_ONLY = frozenset({"convert_element_type", "broadcast_in_dim", "reshape"})


def linearity(primitive_name: str) -> str:
    return LINEARITY.get(primitive_name, "nonlinear")


# --- printing: equation params that are JAX plumbing, not math -----------------------------------
HIDDEN_PARAMS = frozenset({
    "sharding", "out_sharding", "accuracy", "precision", "preferred_element_type", "in_shardings",
    "out_shardings", "in_layouts", "out_layouts", "donated_invars", "ctx_mesh", "keep_unused", "inline",
    "compiler_options_kvs", "symbolic_zeros", "jvp_jaxpr_fun", "jvp_jaxpr_thunk", "num_consts",
    "ft_in", "ft_out",
    "fwd_jaxpr_thunk", "bwd", "out_trees"})


def is_jaxpr(value: Any) -> bool:
    return isinstance(value, (Jaxpr, ClosedJaxpr))


# --- smoothness (exact references: where a Normal site's value meets a kink or a jump) ------------
# "kink": continuous, with a derivative that jumps (abs, max/min, relu, clamp, sort);
# "jump": the value jumps (comparisons, rounding, sign, argmax);
# "null": differs from a constant or a smooth function only on a set of measure zero (x == y,
# is_finite), which no integral sees.
# Default (:func:`smoothness`): a primitive not listed is smooth when every output is floating or
# no operand is floating; a floating operand turned into an integer or boolean output (a cast to
# int, an unknown primitive) is a jump whose location scg does not know.
NON_SMOOTH = {
    **dict.fromkeys(("lt", "le", "gt", "ge", "sign", "floor", "ceil", "round", "argmax", "argmin", "rem",
                     "nextafter", "reduce_precision", "atan2", "random_bits", "rng_bit_generator"), "jump"),
    **dict.fromkeys(("abs", "max", "min", "clamp", "sort", "reduce_max", "reduce_min", "cummax", "cummin",
                     "top_k"), "kink"),
    **dict.fromkeys(("eq", "ne", "is_finite"), "null"),
}


def _pairwise_differences(x: Any, axes: Iterable[int]) -> Any:
    """``x_i − x_j`` for every pair ``i < j`` along ``axes`` (flattened), where orderings change."""
    axes = tuple(a % max(np.ndim(x), 1) for a in axes)
    x = jax.numpy.moveaxis(x, axes, tuple(range(np.ndim(x) - len(axes), np.ndim(x))))
    n = int(np.prod(x.shape[np.ndim(x) - len(axes):], dtype=np.int64))
    x = x.reshape(x.shape[:np.ndim(x) - len(axes)] + (n,))
    i, j = np.triu_indices(n, 1)
    return x[..., i] - x[..., j]


# Where a kink or a jump sits: each function maps the equation's operands and params to arrays
# whose zeros are the breakpoints. Default: absent, the breakpoints are unknown (floor jumps at every
# integer), and a reference that meets such a primitive is not exact.
KINK_ARGUMENTS = {
    **dict.fromkeys(("lt", "le", "gt", "ge", "max", "min"), lambda ins, p: [ins[0] - ins[1]]),
    **dict.fromkeys(("abs", "sign"), lambda ins, p: [ins[0]]),
    "clamp": lambda ins, p: [ins[1] - ins[0], ins[1] - ins[2]],
    **dict.fromkeys(("reduce_max", "reduce_min", "argmax", "argmin"),
                    lambda ins, p: [_pairwise_differences(ins[0], p["axes"])]),
    **dict.fromkeys(("sort", "cummax", "cummin"),
                    lambda ins, p: [_pairwise_differences(ins[0], (p["dimension"] if "dimension" in p else p["axis"],))]),
}


def _is_floating(dtype: Any) -> bool:
    return not str(dtype).startswith("key") and np.issubdtype(np.dtype(dtype), np.inexact)


def smoothness(primitive_name: str, params: dict, in_dtypes: Iterable, out_dtypes: Iterable,
               literal_operands: dict | None = None) -> str:
    """``"smooth"``, ``"null"``, ``"kink"`` or ``"jump"`` for one first-order equation.

    ``literal_operands`` maps operand positions to constant values: ``max(x, -inf)`` (how
    ``logsumexp`` guards an empty reduction) is the identity, not a kink.
    """
    in_dtypes, out_dtypes = list(in_dtypes), list(out_dtypes)
    literal_operands = literal_operands or {}
    if primitive_name in ("max", "min") and any(np.all(np.isinf(np.asarray(v))) for v in literal_operands.values()):
        return "smooth"
    if primitive_name == "sort" and len(in_dtypes) > int(params.get("num_keys", 1)):
        return "jump"  # the values sorted along with the keys swap where two keys cross
    kind = NON_SMOOTH.get(primitive_name)
    if kind is not None:
        # a comparison or rounding of integers cannot follow a continuous value (its cast is the jump)
        return kind if any(_is_floating(d) for d in in_dtypes) else "smooth"
    if any(_is_floating(d) for d in in_dtypes) and not all(_is_floating(d) for d in out_dtypes):
        return "jump"
    return "smooth"


def kink_arguments(primitive_name: str, invals: list, params: dict) -> list | None:
    """The arrays whose zeros are the equation's breakpoints, or None where scg does not know them."""
    rule = KINK_ARGUMENTS.get(primitive_name)
    return None if rule is None else rule(invals, params)


# Transparent calls: a body that computes the equation's outputs from its operands, one to one.
# Their bodies are analysed for kinks. Default: any other sub-jaxpr (a loop, a branch) is opaque.
CALL_BODY_PARAM = {"custom_jvp_call": "call_jaxpr", "custom_vjp_call": "call_jaxpr", "custom_vjp_call_jaxpr": "fun_jaxpr",
                   "jit": "jaxpr", "pjit": "jaxpr", "closed_call": "call_jaxpr", "core_call": "call_jaxpr",
                   "remat2": "jaxpr", "checkpoint": "jaxpr"}
# Calls whose derivative is the user's rule, not the body's: a stop_gradient in their body is not
# on a differentiated path.
CUSTOM_DERIVATIVE_CALLS = frozenset({"custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr"})


def call_body(primitive_name: str, params: dict) -> tuple[Jaxpr, list] | None:
    """``(jaxpr, consts)`` of a transparent call (its invars are the equation's operands), else None."""
    key = CALL_BODY_PARAM.get(primitive_name)
    body = params.get(key) if key else None
    if isinstance(body, ClosedJaxpr):
        return body.jaxpr, list(body.consts)
    if isinstance(body, Jaxpr):
        return body, []
    return None


# Affine maps (exact references: a kink whose argument is affine in a Normal coordinate is
# integrated piecewise). "linear": the output is linear in the operands jointly, except the operands
# listed in AFFINE_CONSTANT_OPERANDS, which must not depend on the coordinate (indices, a where's
# predicate); "scaling" and "divide" as in LINEARITY. Default: not affine.
AFFINE = {
    **{k: v for k, v in LINEARITY.items()},
    **dict.fromkeys(("slice", "concatenate", "pad", "rev", "cumsum", "select_n", "dynamic_slice",
                     "dynamic_update_slice", "gather", "stack", "real"), "linear"),
}
AFFINE_CONSTANT_OPERANDS = {
    "select_n": lambda n: (0,),
    "dynamic_slice": lambda n: tuple(range(1, n)),
    "dynamic_update_slice": lambda n: tuple(range(2, n)),
    "gather": lambda n: (1,),
}


def affine_rule(primitive_name: str, n_operands: int) -> tuple[str, tuple]:
    """``(kind, operands that must be constant)`` for the affine analysis."""
    rule = AFFINE.get(primitive_name, "nonlinear")
    constant = AFFINE_CONSTANT_OPERANDS.get(primitive_name)
    return rule, (constant(n_operands) if constant else ())


# Calls that JAX writes with max/abs for numerical stability but whose value is smooth everywhere:
# their bodies are not searched for kinks. Matched by the name of the JAX function that made the
# call (a function of the same name outside JAX is analysed like any other). Default: searched.
SMOOTH_JAX_CALLS = frozenset({"logaddexp", "logaddexp2", "logsumexp", "softplus", "log_softmax", "softmax",
                              "log_sigmoid", "sigmoid", "silu", "swish", "gelu", "logit", "log1mexp"})
_JAX_DIR = os.path.dirname(jax.__file__) + os.sep


def jax_call_name(primitive_name: str, params: dict) -> str | None:
    """The name of the JAX library function a call equation came from (``"logaddexp"``), else None."""
    body = params.get(CALL_BODY_PARAM.get(primitive_name, ""))
    jaxpr = body.jaxpr if isinstance(body, ClosedJaxpr) else body
    info = getattr(jaxpr, "debug_info", None)
    where = getattr(info, "func_src_info", None) or ""
    name, _, path = where.partition(" at ")
    return name if name and path.startswith(_JAX_DIR) else None


# Sign analysis (a kink of |x| or sign(x) is none where x cannot be negative: logsumexp takes the
# absolute value of a sum of exponentials). Primitives whose output is non-negative whatever their
# operands, and those that keep non-negative operands non-negative. Default: unknown sign.
NONNEGATIVE_OUTPUT = frozenset({"exp", "exp2", "logistic", "sqrt", "rsqrt", "abs", "square"})
NONNEGATIVE_PRESERVING = frozenset({"add", "add_any", "mul", "div", "max", "min", "reduce_sum", "reduce_max",
                                    "reduce_min", "reduce_prod", "cumsum", "cumprod", "broadcast_in_dim",
                                    "reshape", "squeeze", "expand_dims", "transpose", "convert_element_type",
                                    "slice", "concatenate", "pad", "rev", "copy", "copy_p", "select_n", "gather",
                                    "dynamic_slice", "stack"})


def nonnegative_output(primitive_name: str, params: dict, operands_nonnegative: list) -> bool:
    if primitive_name in NONNEGATIVE_OUTPUT:
        return True
    if primitive_name == "integer_pow":
        return int(params.get("y", 1)) % 2 == 0 or all(operands_nonnegative)
    if primitive_name == "select_n":
        return all(operands_nonnegative[1:])
    if primitive_name in ("gather", "dynamic_slice"):
        return bool(operands_nonnegative) and operands_nonnegative[0]
    return primitive_name in NONNEGATIVE_PRESERVING and all(operands_nonnegative)
