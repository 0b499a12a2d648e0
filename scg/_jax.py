"""Every use of ``jax.extend`` and of jaxpr data lives here.

``jax.extend`` promises no stability, so the surface scg touches is kept in this
one small module: the three scg primitives (made with
``jax.extend.core.Primitive``, each defined beside its rules, as Oryx does),
re-binding a jaxpr equation in the textbook interpreter, finding the sub-jaxprs
of a higher-order primitive, and reading the user's source line of an equation.
"""
from __future__ import annotations

import os
from typing import Any, Iterator

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
