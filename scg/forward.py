r"""Exact expectations of discrete chains by the forward recursion (cost T·K², not K^T).

Approximates
    nothing: ``E[Σ_t Σ costs_t]`` of a loop whose carried value is a discrete
    state, exactly.
With
    the forward recursion over the state's distribution ``α_t(k) = P(s_t = v_k)``:

    .. math::

        E\Big[\sum_t c_t\Big] = \sum_t \sum_k α_t(k)\, E[c_t \mid s_{t-1} = v_k], \qquad
        α_{t+1}(k') = \sum_k α_t(k)\, P(s_t = v_{k'} \mid s_{t-1} = v_k),

    where step ``t``'s conditional expectation and transition row are computed
    by enumerating the body's sites given the carried value (``vmap`` over the
    ``K`` values), differentiable in the parameters through the enumeration
    weights. Step 0 starts from the loop's initial carry, whatever it is.
Requires
    ``eligible``: one carried value, which is (a cast of) a scalar Bernoulli or
    Categorical site of the body; every site of the body discrete with a finite
    support; no plates and no nested loop in the body; and nothing outside the
    loop reads the loop's results (their joint law is not computed). Other
    loops are unrolled within the grid budget.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpyro.distributions as dist
from jax import lax

from scg.interpreter import initial_env, read, validity_factor, walk
from scg.ir import Equation, Graph, Scan, Site, Var

_STATES = (dist.BernoulliLogits, dist.BernoulliProbs, dist.CategoricalLogits, dist.CategoricalProbs)


def _state_site(node: Scan) -> Site | None:
    """The body site whose value is carried (through at most a cast), else None."""
    if node.num_carry != 1 or not isinstance(node.body_outputs[0], Var):
        return None
    out = node.body_outputs[0]
    producers = {v: n for n in node.body.nodes for v in n.outputs}
    n = producers.get(out)
    if isinstance(n, Equation) and n.primitive.name == "convert_element_type" and isinstance(n.inputs[0], Var):
        n = producers.get(n.inputs[0])
    return n if isinstance(n, Site) and n.output.shape == () and issubclass(n.dist.family, _STATES) else None


def eligible(graph: Graph, node: Scan) -> bool:
    """Whether the forward recursion integrates ``node`` exactly (see the module's Requires)."""
    body = node.body
    return (_state_site(node) is not None and not body.scans
            and all(s.enumerable and not s.plates for s in body.sites) and not any(c.plates for c in body.costs)
            and not any(graph.consumers.get(v) for v in node.outputs))


def _support(site: Site) -> jax.Array:
    """The values of a Bernoulli/Categorical state (they depend on the operands' shapes only)."""
    zeros = [jnp.zeros(a.shape, a.dtype) for a in site.inputs]
    return site.dist.build(zeros).enumerate_support(expand=False).reshape(-1)


def expected_cost(node: Scan, operands: list, integrate_site: Callable) -> jax.Array:
    """``E[Σ_t costs_t]`` of an eligible loop, given its operands (see the module docstring).

    ``integrate_site(site, distribution, continue_with)`` integrates one site exactly (enumeration).
    """
    body, k = node.body, node.num_consts
    consts, init, xs = operands[:k], operands[k], operands[k + 1:]
    state = _state_site(node)
    support = _support(state)
    carry_dtype = body.inputs[k].dtype

    def given(carry_value, xs_t) -> tuple[jax.Array, jax.Array]:
        """(E[step cost | carry], P(next carry = v_k | carry)) by enumerating the body's sites."""
        env = initial_env(body, [], [*consts, jnp.asarray(carry_value).astype(carry_dtype), *xs_t])

        def on_end(env):
            valid = validity_factor(env)
            total = sum((jnp.sum(read(env, c.input)) for c in body.costs), jnp.zeros(()))
            total = total if isinstance(valid, float) else total * valid
            nxt = jnp.asarray(read(env, node.body_outputs[0]), jnp.float32)
            return total, (nxt == support.astype(jnp.float32)).astype(total.dtype)

        return walk(body, env, on_site=lambda s, d, e, cont: integrate_site(s, d, cont), on_end=on_end)

    order = (lambda a: a[::-1]) if node.reverse else (lambda a: a)
    xs = [order(x) for x in xs]
    first_cost, alpha = given(init, [x[0] for x in xs])

    def step(alpha, xs_t):
        costs, transitions = jax.vmap(lambda v: given(v, xs_t))(support)
        return alpha @ transitions, alpha @ costs

    _, later = lax.scan(step, alpha, [x[1:] for x in xs], length=node.length - 1)
    return first_cost + jnp.sum(later)
