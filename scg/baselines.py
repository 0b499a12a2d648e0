"""Baselines (control variates) for the score-function terms.

Approximates
    nothing new: a baseline ``b_i`` changes the score term of site ``z_i`` from
    ``∇log p(z_i)·Q_i`` to ``∇log p(z_i)·(Q_i − b_i)``.
With
    ``E[∇log p(z_i) · b_i] = b_i · E[∇log p(z_i)] = 0`` whenever ``b_i`` does not
    depend on ``z_i`` (nor on anything sampled after it). Each baseline below is
    built so that this holds; it lowers variance when ``b_i ≈ E[Q_i | ...]``.
Requires
    ``Q_i`` (the downstream costs of ``z_i``, per example inside plates) is what
    the baseline sees; the stateful baselines update their state *after* the
    current estimate, from the current particles.

A baseline is a :class:`Baseline`: ``init(downstream_shapes, *args) -> state``
and ``apply(state, downstream, *args) -> (baselines, new_state)``, where
``downstream`` maps each score site to its ``Q_i`` of shape ``(K, *plates)``
(``K`` particles), and each loop holding score sites to its reward-to-go
``Q_t`` of shape ``(K, T)`` (one score per step), and ``baselines`` maps them
to arrays broadcastable to it. ``downstream_shapes`` maps the same names to
a :class:`ScoreShape`.
Stateless baselines have ``state = None``; stateful ones return their state
from ``Objective.value_and_grad(..., baseline_state=...)`` for the training
step to carry.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax


class EmptyState(NamedTuple):
    """The baseline state of an objective whose baseline keeps none (optax's ``EmptyState``).

    A pytree with no leaves, so a training step can take and return a baseline
    state whatever the objective's baseline is.
    """


class ScoreShape(NamedTuple):
    """The shape of one score's downstream cost ``Q`` in a particle: example axes, then time axes.

    ``plates``: the sizes of the plates a site lies in (examples change from batch
    to batch); ``steps``: ``(T,)`` for a loop's per-step scores (step ``t`` is the
    same step in every estimate), ``()`` for a site; ``sites``: the model's sites
    whose score terms these are (the site itself, or every scored site of a loop).
    """
    plates: tuple
    steps: tuple
    sites: tuple = ()


class Baseline(NamedTuple):
    init: Callable[..., Any]
    apply: Callable[..., tuple[dict, Any]]
    stateful: bool
    name: str
    # bind(shapes, site_names) -> Baseline: this baseline for one model's scores (None: the same for every
    # model); the objective binds it once per traced graph, before init and apply
    bind: Callable[..., "Baseline"] | None = None


def _leave_one_out_apply(state, downstream, *args):
    out = {}
    for name, q in downstream.items():
        k = q.shape[0]
        if k < 2:
            raise ValueError("baseline='leave_one_out' needs num_samples >= 2 (it averages the other particles' "
                             f"downstream costs); got num_samples={k}")
        out[name] = (jnp.sum(q, axis=0, keepdims=True) - q) / (k - 1)
    return out, None


def leave_one_out() -> Baseline:
    """``b_i^{(k)} = (1/(K−1)) Σ_{k'≠k} Q_i^{(k')}`` over ``K = num_samples`` particles.

    Unbiased: particle ``k``'s baseline is a function of the other, independent
    particles only. Stateless. Needs ``num_samples ≥ 2``.

    Examples:
      >>> import jax, jax.numpy as jnp, numpyro.distributions as dist, scg
      >>> @scg.model
      ... def m(params, x):
      ...     b = scg.sample("b", dist.Bernoulli(logits=params["w"]))
      ...     scg.cost("err", (b - x) ** 2.0)
      >>> params, x = {"w": jnp.array(0.0)}, jnp.array(1.0)
      >>> objective = scg.compile(m, baseline="leave_one_out")
      >>> grads = objective.grad(params, x, key=jax.random.key(0), num_samples=4)
      >>> grads["w"].shape
      ()
    """
    return Baseline(lambda shapes, *args: None, _leave_one_out_apply, False, "leave_one_out")


def moving_average(decay: float = 0.9, *, per_step: bool = True) -> Baseline:
    """``b_i = m_i`` with ``m_i ← decay·m_i + (1 − decay)·mean(Q_i)`` after each estimate.

    Unbiased: ``m_i`` is computed from earlier estimates only. The state is one
    scalar per site (``0`` at the start), carried by the training step. For the
    scores of a loop, with ``per_step=True``, one average per step index:
    ``m_t ← decay·m_t + (1 − decay)·mean_k Q_t^{(k)}``, ``b_t = m_t`` (the
    reward-to-go of step ``t`` has its own mean — early steps see more of the
    episode); ``per_step=False`` keeps one scalar for the whole loop.

    Examples:
      >>> import jax, jax.numpy as jnp, numpyro.distributions as dist, scg
      >>> @scg.model
      ... def m(params, x):
      ...     b = scg.sample("b", dist.Bernoulli(logits=params["w"]))
      ...     scg.cost("err", (b - x) ** 2.0)
      >>> params, x = {"w": jnp.array(0.0)}, jnp.array(1.0)
      >>> objective = scg.compile(m, baseline=scg.baselines.moving_average(0.9))
      >>> state = objective.init_baseline_state(params, x)
      >>> loss, grads, state = objective.value_and_grad(params, x, key=jax.random.key(0), baseline_state=state)
      >>> float(state["b"]) != 0.0   # moved towards the downstream cost
      True
    """
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"moving_average: decay must be in [0, 1), got {decay}")

    def init(shapes, *args):
        return {name: jnp.zeros(tuple(getattr(shape, "steps", ())) if per_step else ())
                for name, shape in shapes.items()}

    def apply(state, downstream, *args):
        baselines = {name: state[name] for name in downstream}
        # average over particles and examples; a per-step state keeps the trailing time axis
        mean = lambda q, m: jnp.mean(q, axis=tuple(range(jnp.ndim(q) - jnp.ndim(m))))
        new = {name: decay * state[name] + (1 - decay) * mean(q, state[name]) for name, q in downstream.items()}
        return baselines, new

    return Baseline(init, apply, True, f"moving_average({decay})" if per_step
                    else f"moving_average({decay}, per_step=False)")


def learned(apply_fn: Callable, init_params: Any, optimizer: optax.GradientTransformation | None = None, *,
            centering: bool = True, decay: float = 0.9) -> Baseline:
    """An input-dependent baseline trained alongside the model, as in NVIL (Mnih & Gregor, 2014).

    ``b_i(x) = f_ψ(x)_i + c_i`` where ``f_ψ = apply_fn(ψ, *args)`` is the user's
    network on the model's data arguments (an array per example for a single
    score site, or a dict per site; for a loop, an array of one baseline per
    step under the name of a site the loop draws), and ``c_i`` is a running mean of the
    residual ``Q_i − f_ψ(x)_i`` (NVIL's centering; off with ``centering=False``).
    ``ψ`` is trained by ``optimizer`` (default Adam 1e-3) to minimize
    ``E[(Q_i − c_i − f_ψ(x)_i)²]``; the update happens inside the estimate and
    returns in the state.

    Unbiased: ``f_ψ`` depends on the data and on ``ψ`` (fixed during the
    estimate), never on the current sample. NVIL also divides the learning
    signal by a running standard deviation; that rescales the gradient and is
    not an unbiased estimate of it, so scg leaves it out.

    Examples:
      >>> import jax, jax.numpy as jnp, numpyro.distributions as dist, scg
      >>> @scg.model
      ... def m(params, x):
      ...     b = scg.sample("b", dist.Bernoulli(logits=params["w"]))
      ...     scg.cost("err", (b - x) ** 2.0)
      >>> params, x = {"w": jnp.array(0.0)}, jnp.array(1.0)
      >>> baseline = scg.baselines.learned(lambda psi, x: psi["c"] + 0.0 * x, {"c": jnp.zeros(())})
      >>> objective = scg.compile(m, baseline=baseline)
      >>> state = objective.init_baseline_state(params, x)
      >>> loss, grads, state = objective.value_and_grad(params, x, key=jax.random.key(0), baseline_state=state)
      >>> sorted(state)
      ['center', 'opt_state', 'params']
    """
    optimizer = optimizer or optax.adam(1e-3)
    return _learned(apply_fn, init_params, optimizer, centering, decay, {})


def _learned(apply_fn: Callable, init_params: Any, optimizer: optax.GradientTransformation, centering: bool,
             decay: float, aliases: Mapping[str, tuple]) -> Baseline:
    """:func:`learned`, with ``aliases``: the names a dict from ``apply_fn`` may use for a score (a loop's sites)."""

    def init(shapes, *args):
        return {"params": init_params, "opt_state": optimizer.init(init_params),
                "center": {name: jnp.zeros(()) for name in shapes}}

    def predictions(psi, names, args):
        out = apply_fn(psi, *args)
        if isinstance(out, Mapping):
            found = {}
            for n in names:
                key = next((k for k in (n, *aliases.get(n, ())) if k in out), None)
                if key is None:
                    accepted = " or ".join(repr(k) for k in (n, *aliases.get(n, ())))
                    raise ValueError(f"learned baseline: apply_fn returned a dict with keys {sorted(out)}, but none "
                                     f"for the score {n!r}; add a prediction under {accepted}")
                found[n] = out[key]
            return found
        if len(names) != 1:
            raise ValueError(f"learned baseline: apply_fn returned one array but the model has {len(names)} score "
                             f"sites ({', '.join(names)}); return a dict mapping site names to baselines")
        return {names[0]: out}

    def apply(state, downstream, *args):
        names = list(downstream)
        center = state["center"] if centering else {n: jnp.zeros(()) for n in names}

        def regression_loss(psi):
            pred = predictions(psi, names, args)
            return sum(jnp.mean((lax.stop_gradient(downstream[n]) - center[n] - pred[n][None]) ** 2) for n in names)

        pred = predictions(state["params"], names, args)
        baselines = {n: pred[n][None] + center[n] for n in names}
        grads = jax.grad(regression_loss)(state["params"])
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
        new_center = {n: decay * state["center"][n] + (1 - decay) * jnp.mean(downstream[n] - pred[n][None])
                      for n in names}
        new = {"params": optax.apply_updates(state["params"], updates), "opt_state": opt_state,
               "center": new_center}
        return baselines, new

    def bind(shapes: Mapping[str, ScoreShape], site_names: tuple) -> Baseline:
        # a loop's per-step scores may be predicted under the name of a site the loop draws
        loops = {name: tuple(shape.sites) for name, shape in shapes.items() if getattr(shape, "steps", ())}
        return _learned(apply_fn, init_params, optimizer, centering, decay, loops)

    return Baseline(init, apply, True, "learned", bind)


def per_site(choices: Mapping[str, Any]) -> Baseline:
    """Different baselines for different sites: ``{"z1": "leave_one_out", "z2": moving_average()}``.

    Sites not named get no baseline. A site inside a loop names the loop's
    per-step scores (all scored sites of one loop share them, so they must get
    the same baseline). A name that is no site of the model is refused; a site
    without a score-function term (drawn pathwise, enumerated, or free of θ)
    needs no baseline and is passed over.

    Examples:
      >>> import jax, jax.numpy as jnp, numpyro.distributions as dist, scg
      >>> @scg.model
      ... def m(params, x):
      ...     a = scg.sample("a", dist.Bernoulli(logits=params["u"]))
      ...     b = scg.sample("b", dist.Bernoulli(logits=params["v"]))
      ...     scg.cost("err", (a + b - x) ** 2.0)
      >>> params, x = {"u": jnp.array(0.0), "v": jnp.array(0.0)}, jnp.array(1.0)
      >>> objective = scg.compile(m, baseline={"a": "leave_one_out"})   # b keeps no baseline
      >>> grads = objective.grad(params, x, key=jax.random.key(0), num_samples=4)
      >>> sorted(grads)
      ['u', 'v']
    """
    parts = {name: resolve(b) for name, b in choices.items()}

    def init(shapes, *args):
        return {name: b.init({name: shapes[name]}, *args) for name, b in parts.items()
                if name in shapes and b.stateful}

    def apply(state, downstream, *args):
        baselines, new = {}, {}
        for name, b in parts.items():
            if name not in downstream:
                continue
            out, site_state = b.apply((state or {}).get(name), {name: downstream[name]}, *args)
            baselines.update(out)
            if b.stateful:
                new[name] = site_state
        return baselines, new

    def bind(shapes: Mapping[str, ScoreShape], site_names: tuple) -> Baseline:
        owner = {}  # a site's name -> the score its term belongs to (its own, or its loop's)
        for score, shape in shapes.items():
            for site in getattr(shape, "sites", ()) or (score,):
                owner.setdefault(site, score)
        unknown = [n for n in parts if n not in shapes and n not in owner and n not in site_names]
        if unknown:
            which = "is not a site" if len(unknown) == 1 else "are not sites"
            raise ValueError(f"baseline= names {', '.join(map(repr, unknown))}, which {which} of this model; its "
                             f"sites are {', '.join(map(repr, site_names)) or 'none'}")
        bound: dict = {}
        for name, b in parts.items():
            score = name if name in shapes else owner.get(name)
            if score is None:
                continue  # no score-function term to control
            if score in bound and bound[score][1].name != b.name:
                raise ValueError(
                    f"baseline= gives sites {bound[score][0]!r} and {name!r} different baselines "
                    f"({bound[score][1].name} and {b.name}), but both are scored inside the loop {score!r}, whose "
                    "per-step scores they share: give every site of one loop the same baseline")
            bound.setdefault(score, (name, b))
        return per_site({score: b.bind({score: shapes[score]}, site_names) if b.bind else b
                         for score, (_, b) in bound.items()})

    return Baseline(init, apply, any(b.stateful for b in parts.values()), "per_site", bind)


_NAMED = {"leave_one_out": leave_one_out, "moving_average": moving_average}


def resolve(baseline: Any) -> Baseline | None:
    """``None`` | a name | a :class:`Baseline` | a dict of per-site choices -> Baseline or None.

    Examples:
      >>> import scg
      >>> scg.baselines.resolve("leave_one_out").name
      'leave_one_out'
      >>> scg.baselines.resolve(None) is None
      True
    """
    if baseline is None or isinstance(baseline, Baseline):
        return baseline
    if isinstance(baseline, str):
        if baseline not in _NAMED:
            raise ValueError(f"unknown baseline {baseline!r}; choose one of {sorted(_NAMED)} for baseline=, "
                             "or pass scg.baselines.learned(...), a dict of per-site choices, or a function")
        return _NAMED[baseline]()
    if isinstance(baseline, Mapping):
        for site, choice in baseline.items():
            if not isinstance(site, str) or not site:
                raise TypeError(f"baseline= as a dict maps site names (non-empty strings) to baselines; got the "
                                f"key {site!r}")
            if choice is None:
                continue
            try:
                resolve(choice)
            except (TypeError, ValueError) as e:
                raise type(e)(f"baseline= for site {site!r}: {e}") from None
        return per_site({site: choice for site, choice in baseline.items() if choice is not None})
    if callable(baseline):  # a plain function of the downstream costs: stateless
        return Baseline(lambda shapes, *args: None, lambda state, q, *args: (baseline(q), None), False,
                        getattr(baseline, "__name__", "custom"))
    raise TypeError(f"baseline= must be None, a name {sorted(_NAMED)}, an scg.baselines.Baseline, a dict of "
                    f"per-site choices or a function of the downstream costs; got {type(baseline).__name__} "
                    f"{baseline!r:.60}")
