"""Lowering: a Graph (after passes) becomes one ``jax.jit``-compiled function per method.

``scg.compile(model)`` returns an :class:`Objective`. Tracing and passes run
once per model and argument signature (pytree structure, shapes, dtypes), at
the first call; changing data values never retraces. Each method is one jitted
computation: the graph walker runs only while JAX traces it.
"""
from __future__ import annotations

from typing import Any, Callable

import jax

from scg import estimators, integrate
from scg.errors import ModelError
from scg.ir import Graph
from scg.trace import Model


def _signature(params: Any, args: tuple) -> tuple:
    leaves, treedef = jax.tree_util.tree_flatten((params, args))
    return treedef, tuple((tuple(jax.numpy.shape(x)), jax.numpy.result_type(x)) for x in leaves)


def _abstract(tree: Any) -> Any:
    return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(jax.numpy.shape(x), jax.numpy.result_type(x)), tree)


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
                 order: int = integrate.DEFAULT_ORDER):
        from scg.passes import resolve_passes

        if not isinstance(source, (Model, Graph)):
            raise TypeError(f"scg.compile expects a function decorated with @scg.model or an scg.Graph, "
                            f"got {type(source).__name__}")
        if baseline is not None and not callable(baseline) and baseline not in estimators.BASELINES:
            raise ValueError(f"unknown baseline {baseline!r}; choose one of {sorted(estimators.BASELINES)} or pass "
                             "a function mapping downstream costs to baselines")
        self.source = source
        self.passes = resolve_passes(passes)
        self.baseline = baseline
        self.order = order
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
                    graph, cert = p(graph)
                    certificates.append(cert)
            self._graphs[sig] = (graph, tuple(certificates))
        return self._graphs[sig]

    def graph_for(self, params: Any, *args: Any) -> Graph:
        return self.graph_and_certificates(params, *args)[0]

    def certificates_for(self, params: Any, *args: Any) -> tuple:
        return self.graph_and_certificates(params, *args)[1]

    # --- the compiled methods ----------------------------------------------------------------------
    def _surrogate_fn(self, params: Any, args: tuple, num_samples: int) -> Callable:
        graph = self.graph_for(params, *args)
        input_leaves = jax.tree_util.tree_leaves(tuple(args))

        def surrogate(p, key):
            return estimators.surrogate_and_loss(graph, jax.tree_util.tree_leaves(p), input_leaves, key,
                                                 num_samples=num_samples, baseline=self.baseline, order=self.order)

        return surrogate

    def _compiled(self, method: str, num_samples: int) -> Callable:
        if not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
        cache_key = (method, num_samples)
        if cache_key not in self._jitted:
            def run(params, args, key):
                self.trace_count += 1
                surrogate = self._surrogate_fn(params, args, num_samples)
                if method == "loss":
                    return surrogate(params, key)[1]
                if method == "surrogate":
                    return surrogate(params, key)[0]
                value, grads = jax.value_and_grad(lambda p: surrogate(p, key)[0])(params)
                return grads if method == "grad" else (value, grads)

            self._jitted[cache_key] = jax.jit(run)
        return self._jitted[cache_key]

    def loss(self, params: Any, *args: Any, key: jax.Array, num_samples: int = 1) -> jax.Array:
        return self._compiled("loss", num_samples)(params, args, key)

    def grad(self, params: Any, *args: Any, key: jax.Array, num_samples: int = 1) -> Any:
        return self._compiled("grad", num_samples)(params, args, key)

    def value_and_grad(self, params: Any, *args: Any, key: jax.Array, num_samples: int = 1) -> tuple:
        return self._compiled("value_and_grad", num_samples)(params, args, key)

    def surrogate(self, params: Any, *args: Any, key: jax.Array, num_samples: int = 1) -> jax.Array:
        return self._compiled("surrogate", num_samples)(params, args, key)

    def unjitted_grad(self, params: Any, *args: Any, num_samples: int = 1) -> Callable:
        """``key -> grad`` at fixed ``params`` and data, for use inside the caller's own transformations."""
        surrogate = self._surrogate_fn(params, args, num_samples)
        return lambda key: jax.grad(lambda p: surrogate(p, key)[0])(params)

    def __repr__(self) -> str:
        name = self.source.name
        return f"<scg.Objective of {name!r}: passes={[getattr(p, '__name__', p) for p in self.passes]}, baseline={self.baseline!r}>"


def compile(model_or_graph: Model | Graph, passes: Any = "auto", *, baseline: Any = None,
            order: int = integrate.DEFAULT_ORDER) -> Objective:  # noqa: A001 - the public name
    """Compiles a model (or a traced Graph) into an :class:`Objective`.

    ``passes``: ``"auto"`` (analytic KL where the pattern matches, then
    reparameterization wherever certified), ``[]``/``None``/``"none"`` for the
    naive score-function graph, or a list of passes (functions ``Graph ->
    (Graph, Certificate)`` or their names). ``baseline``: ``None`` or
    ``"leave_one_out"`` (needs ``num_samples >= 2``).
    """
    return Objective(model_or_graph, passes=passes, baseline=baseline, order=order)
