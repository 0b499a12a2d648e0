"""Lowering: a Graph (after passes) becomes one ``jax.jit``-compiled function per method.

``scg.compile(model)`` returns an :class:`Objective`. Tracing and passes run
once per model and argument signature (pytree structure, shapes, dtypes), at
the first call; changing data values never retraces. Each method is one jitted
computation: the graph walker runs only while JAX traces it.
"""
from __future__ import annotations

import operator
from typing import Any, Callable

import jax
import numpy as np
from jax.experimental import checkify

from scg import baselines, estimators, integrate
from scg.errors import ModelError, check_key
from scg.ir import Graph, all_sites
from scg.passes import _check_pass_result, resolve_passes
from scg.trace import Model, _check_data, _check_params


def _check_num_samples(num_samples: Any) -> int:
    """``num_samples`` as an int; a ValueError naming it unless it is a positive integer (not a bool)."""
    how = "pass the number of particles to average as a positive Python int, e.g. num_samples=4"
    if isinstance(num_samples, (bool, np.bool_)) or getattr(num_samples, "dtype", None) == np.bool_:
        raise ValueError(f"num_samples must be a positive int, got the bool {num_samples!r}; {how}")
    try:
        n = operator.index(num_samples)
    except Exception:  # floats, strings, traced values: it is static (it sets the particle axis)
        raise ValueError(f"num_samples must be a positive int, got {num_samples!r:.60} "
                         f"({type(num_samples).__name__}); it is static (it sets the shape of the particle "
                         f"axis), so {how}") from None
    if n < 1:
        raise ValueError(f"num_samples must be a positive int, got {n}; {how}")
    return int(n)


def _signature(params: Any, args: tuple) -> tuple:
    leaves, treedef = jax.tree_util.tree_flatten((params, args))
    return treedef, tuple((tuple(jax.numpy.shape(x)), jax.numpy.result_type(x)) for x in leaves)


def _abstract(tree: Any) -> Any:
    return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(jax.numpy.shape(x), jax.numpy.result_type(x)), tree)


def _with_checks(run: Callable) -> Callable:
    """``jax.jit(run)`` that raises a ModelError naming the site and parameter when a check fails."""
    checked_run = jax.jit(checkify.checkify(run))

    def call(*args):
        error, out = checked_run(*args)
        message = error.get()
        if message:
            raise ModelError(f"invalid distribution parameters: {message.splitlines()[0]}")
        return out

    return call


def _score_shapes(graph: Graph) -> dict:
    """Each score of ``graph``: a score-function site, or a loop holding some (one score per step)."""
    shapes = {s.name: baselines.ScoreShape(tuple(p.size for p in s.plates), (), (s.name,))
              for s in estimators.score_sites(graph)}
    for loop in graph.scans:
        scored = tuple(s.name for s in all_sites(loop.body) if not (s.reparameterized or s.enumerated))
        shapes[loop.name] = baselines.ScoreShape((), (loop.length,), scored)
    return shapes


class Objective:
    """The compiled stochastic objective ``L(θ) = E[Σ costs]`` of a model.

    Methods (``key`` is always explicit; ``num_samples`` particles are averaged):

    * ``loss(params, *args, key, num_samples=1)`` — a sample of ``Σ costs``
      (enumerated sites are summed exactly);
    * ``grad(params, *args, key, num_samples=1)`` — an unbiased estimate of ``∇_θ L``,
      shaped like ``params``;
    * ``value_and_grad(...)`` — both from one evaluation;
    * ``surrogate(...)`` — the DiCE surrogate whose derivatives of any order are
      unbiased (use it with ``jax.hessian``).
    """

    def __init__(self, source: Model | Graph, passes: Any = "auto", baseline: Any = None,
                 order: int = integrate.DEFAULT_ORDER, objective: str = "elbo", checked: bool = False):
        if not isinstance(source, (Model, Graph)):
            fn_name = getattr(source, "__name__", "fn")
            fn_name = fn_name if fn_name.isidentifier() else "fn"
            hint = f"; decorate it with @scg.model (or pass scg.model({fn_name}))" if callable(source) else ""
            raise TypeError(f"scg.compile expects a function decorated with @scg.model or an scg.Graph as its "
                            f"first argument (model_or_graph), got {type(source).__name__}{hint}")
        if isinstance(order, (bool, np.bool_)) or not isinstance(order, (int, np.integer)) or order < 1:
            raise ValueError(f"scg.compile: order= (the Gauss-Hermite order of exact expectations) must be a "
                             f"positive int, got {order!r}")
        if objective not in estimators.OBJECTIVES:
            raise ValueError(f"unknown objective {objective!r}; choose one of {estimators.OBJECTIVES}")
        if objective == "iwae" and baseline is not None:
            raise ValueError("objective='iwae' has its own leave-one-out signals (VIMCO); pass baseline=None")
        self.source = source
        self.passes = resolve_passes(passes)
        self.baseline = baselines.resolve(baseline)
        self.objective = objective
        self.order = order
        self.checked = bool(checked)
        self.trace_count = 0  # how many times JAX traced a method (tests count retraces)
        self._graphs: dict = {}
        self._jitted: dict = {}

    # --- graphs ------------------------------------------------------------------------------------
    def graph_and_certificates(self, params: Any, *args: Any) -> tuple[Graph, tuple]:
        """The rewritten graph for these argument shapes and the passes' certificates (cached)."""
        sig = _signature(params, args)
        if sig not in self._graphs:
            if isinstance(self.source, Graph):
                graph = self.source
                expected = [(v.shape, v.dtype) for v in (*graph.params, *graph.inputs)]
                got = [(s, d) for s, d in sig[1]]
                if [(tuple(s), jax.numpy.dtype(d)) for s, d in expected] != [(tuple(s), jax.numpy.dtype(d)) for s, d in got]:
                    raise ModelError(f"graph {graph.name!r} was traced for arguments of shapes "
                                     f"{[s for s, _ in expected]}, but was called with {[s for s, _ in got]}; "
                                     "compile the model (not a fixed graph) to accept new shapes")
            else:
                graph = self.source.trace(*_abstract((params, *args)))
            certificates = []
            # passes build constants; when a method is first called under an outer jit they must
            # stay concrete values, not tracers of that jit
            with jax.ensure_compile_time_eval():
                for p in self.passes:
                    graph, cert = _check_pass_result(p, p(graph))
                    certificates.append(cert)
            self._graphs[sig] = (graph, tuple(certificates))
        return self._graphs[sig]

    def graph_for(self, params: Any, *args: Any) -> Graph:
        return self.graph_and_certificates(params, *args)[0]

    def certificates_for(self, params: Any, *args: Any) -> tuple:
        return self.graph_and_certificates(params, *args)[1]

    # --- baseline state ----------------------------------------------------------------------------
    @property
    def stateful(self) -> bool:
        """Whether the baseline keeps state that ``grad``/``value_and_grad`` take and return."""
        return self.baseline is not None and self.baseline.stateful

    def init_baseline_state(self, params: Any, *args: Any) -> Any:
        """The initial state of a stateful baseline; ``scg.baselines.EmptyState()`` for every other objective."""
        if not self.stateful:
            return baselines.EmptyState()
        graph = self.graph_for(params, *args)
        return self._baseline_for(graph).init(_score_shapes(graph), *args)

    def _baseline_for(self, graph: Graph) -> Any:
        """The objective's baseline bound to ``graph``'s scores (a per-site choice names sites)."""
        if self.baseline is None or self.baseline.bind is None:
            return self.baseline
        return self.baseline.bind(_score_shapes(graph), tuple(s.name for s in all_sites(graph)))

    def _check_call(self, method: str, params: Any, args: tuple, key: Any) -> None:
        """Entry checks of the public methods: one PRNG key, floating parameters, array-like data."""
        check_key(key, f"Objective.{method}")
        _check_params(self.source.name, params)
        input_name = (self.source._input_name if isinstance(self.source, Model)
                      else lambda path: "args" + jax.tree_util.keystr(path))
        _check_data(f"Objective.{method}", args, input_name)

    def _check_state(self, baseline_state: Any) -> None:
        if self.stateful and baseline_state is None:
            raise ValueError(f"the baseline {self.baseline.name!r} keeps state: pass baseline_state= (start from "
                             "objective.init_baseline_state(params, *args)) and carry the state it returns")
        if not self.stateful and baseline_state is not None and not isinstance(baseline_state, baselines.EmptyState):
            raise ValueError("baseline_state was given, but this objective's baseline keeps no state")

    # --- the compiled methods ----------------------------------------------------------------------
    def _surrogate_fn(self, params: Any, args: tuple, num_samples: int, *, with_baseline: bool = True) -> Callable:
        graph = self.graph_for(params, *args)
        input_leaves = jax.tree_util.tree_leaves(tuple(args))
        # a sampled loss needs no baseline (and leave-one-out would refuse a single particle)
        baseline = self._baseline_for(graph) if with_baseline else None

        def surrogate(p, key, baseline_state=None):
            return estimators.surrogate_and_loss(
                graph, jax.tree_util.tree_leaves(p), input_leaves, key, num_samples=num_samples,
                baseline=baseline, baseline_state=baseline_state, baseline_args=tuple(args),
                objective=self.objective, order=self.order, checked=self.checked)

        return surrogate

    def _compiled(self, method: str, num_samples: int) -> Callable:
        num_samples = _check_num_samples(num_samples)
        cache_key = (method, num_samples)
        if cache_key not in self._jitted:
            def run(params, args, key, baseline_state):
                self.trace_count += 1
                surrogate = self._surrogate_fn(params, args, num_samples, with_baseline=method != "loss")
                if method == "loss":
                    return surrogate(params, key, baseline_state)[1][0]
                if method == "surrogate":
                    return surrogate(params, key, baseline_state)[0]
                (_, (value, new_state)), grads = jax.value_and_grad(
                    lambda p: surrogate(p, key, baseline_state), has_aux=True)(params)
                if method == "value_and_grad_with_state":
                    return value, grads, new_state if self.stateful else baselines.EmptyState()
                if method == "grad":
                    return (grads, new_state) if self.stateful else grads
                return (value, grads, new_state) if self.stateful else (value, grads)

            self._jitted[cache_key] = _with_checks(run) if self.checked else jax.jit(run)
        return self._jitted[cache_key]

    def loss(self, params: Any, *args: Any, key: jax.Array, num_samples: int = 1,
             baseline_state: Any = None) -> jax.Array:
        self._check_call("loss", params, args, key)
        return self._compiled("loss", num_samples)(params, args, key, baseline_state)

    def grad(self, params: Any, *args: Any, key: jax.Array, num_samples: int = 1, baseline_state: Any = None) -> Any:
        """An unbiased estimate of ``∇_θ L``; with a stateful baseline, ``(grads, new_baseline_state)``."""
        self._check_call("grad", params, args, key)
        self._check_state(baseline_state)
        return self._compiled("grad", num_samples)(params, args, key, baseline_state)

    def value_and_grad(self, params: Any, *args: Any, key: jax.Array, num_samples: int = 1,
                       baseline_state: Any = None) -> tuple:
        """``(loss, grads)``; with a stateful baseline, ``(loss, grads, new_baseline_state)``."""
        self._check_call("value_and_grad", params, args, key)
        self._check_state(baseline_state)
        return self._compiled("value_and_grad", num_samples)(params, args, key, baseline_state)

    def value_and_grad_with_state(self, params: Any, *args: Any, key: jax.Array, baseline_state: Any,
                                  num_samples: int = 1) -> tuple:
        """``(loss, grads, new_baseline_state)`` for every objective: the one shape a training step needs.

        ``baseline_state`` starts as ``objective.init_baseline_state(params, *args)``
        (``scg.baselines.EmptyState()`` when the baseline keeps no state, which is
        then returned unchanged), and the state returned goes into the next call.

        Examples:
          >>> import jax, jax.numpy as jnp, numpyro.distributions as dist, scg
          >>> @scg.model
          ... def m(params, x):
          ...     b = scg.sample("b", dist.Bernoulli(logits=params["w"]))
          ...     scg.cost("c", (b - x) ** 2.0)
          >>> params, x = {"w": jnp.array(0.0)}, jnp.array(1.0)
          >>> objective = scg.compile(m, baseline="moving_average")
          >>> state = objective.init_baseline_state(params, x)
          >>> loss, grads, state = objective.value_and_grad_with_state(params, x, key=jax.random.key(0),
          ...                                                          baseline_state=state)
          >>> sorted(state)
          ['b']
        """
        self._check_call("value_and_grad_with_state", params, args, key)
        if baseline_state is None:
            raise ValueError("value_and_grad_with_state: pass baseline_state= (start from "
                             "objective.init_baseline_state(params, *args)); it is scg.baselines.EmptyState() "
                             "for objectives whose baseline keeps no state")
        self._check_state(baseline_state)
        state_in = baseline_state if self.stateful else None
        return self._compiled("value_and_grad_with_state", num_samples)(params, args, key, state_in)

    def surrogate(self, params: Any, *args: Any, key: jax.Array, num_samples: int = 1,
                  baseline_state: Any = None) -> jax.Array:
        self._check_call("surrogate", params, args, key)
        return self._compiled("surrogate", num_samples)(params, args, key, baseline_state)

    def unjitted_grad(self, params: Any, *args: Any, num_samples: int = 1, baseline_state: Any = None) -> Callable:
        """``key -> grad`` at fixed ``params``, data and baseline state, for the caller's own transformations."""
        surrogate = self._surrogate_fn(params, args, _check_num_samples(num_samples))

        def grad_at(key):
            check_key(key, "Objective.unjitted_grad(...)(key)")
            return jax.grad(lambda p: surrogate(p, key, baseline_state)[0])(params)

        return grad_at

    def __repr__(self) -> str:
        name = self.source.name
        baseline = self.baseline.name if self.baseline else None
        return (f"<scg.Objective of {name!r}: passes={[getattr(p, '__name__', p) for p in self.passes]}, "
                f"baseline={baseline!r}, objective={self.objective!r}>")


def compile(model_or_graph: Model | Graph, passes: Any = "auto", *, baseline: Any = None,
            objective: str = "elbo", order: int = integrate.DEFAULT_ORDER, checked: bool = False) -> Objective:  # noqa: A001
    """Compiles a model (or a traced Graph) into an :class:`Objective`.

    ``passes``: ``"auto"`` (analytic KL where the pattern matches, then
    reparameterization wherever certified), ``[]``/``None``/``"none"`` for the
    naive score-function graph, or a list of passes (functions ``Graph ->
    (Graph, Certificate)`` or their names). ``baseline``: ``None``,
    ``"leave_one_out"`` (needs ``num_samples >= 2``), ``"moving_average"``,
    ``scg.baselines.learned(...)`` (NVIL), a dict of per-site choices, or a
    function of the downstream costs (see :mod:`scg.baselines`).
    ``objective``: ``"elbo"`` (the expected sum of costs) or ``"iwae"`` (the
    importance-weighted bound over ``num_samples`` particles, with VIMCO
    signals for score-function sites). ``checked``: raise a ``ModelError`` naming
    the site and the parameter when a distribution's parameters violate its
    constraints (``jax.experimental.checkify``; slower). Unchecked, such a call
    returns NaN values and NaN gradients, never plausible numbers.

    Examples:
      >>> import jax, jax.numpy as jnp, numpyro.distributions as dist, scg
      >>> @scg.model
      ... def m(params, x):
      ...     z = scg.sample("z", dist.Normal(params["mu"], 1.0))
      ...     scg.cost("fit", (z - x) ** 2)
      >>> params, x = {"mu": jnp.array(0.5)}, jnp.array(1.0)
      >>> objective = scg.compile(m)            # passes="auto": z is reparameterized
      >>> loss, grads = objective.value_and_grad(params, x, key=jax.random.key(0), num_samples=4)
      >>> grads["mu"].shape
      ()
    """
    return Objective(model_or_graph, passes=passes, baseline=baseline, order=order, objective=objective,
                     checked=checked)
