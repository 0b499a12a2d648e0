"""A sigmoid belief net (Neal, 1992) with one stochastic layer, trained as in NVIL (Mnih & Gregor, 2014).

The model, with data in rows (``x``: ``(batch, x_dim)`` of 0/1, binarized MNIST)::

    q(h | x) = Bernoulli(logits = r(x))          recognition: r(x) = x V + d, or an MLP
    p(h)     = Bernoulli(logits = b)              prior over the 200 hidden units
    p(x | h) = Bernoulli(logits = h W + c)        likelihood
    h ~ q(h | x)                                  site "h": (batch, hidden), discrete
    kl  = Σ [log q(h | x) − log p(h)] / batch     sampled, via scg.log_prob
    nll = −Σ log p(x | h) / batch                 via scg.log_prob

so ``kl + nll`` is the per-example negative ELBO averaged over the batch. ``h``
is discrete, so it has no pathwise gradient: its gradient is the score function
``∇log q(h | x) · (Q − b)``, with ``Q`` the downstream costs of example ``i``
only (the site and the costs sit in ``scg.plate("data", batch)``) and ``b`` an
optional baseline (``scg.baselines``; NVIL's is :func:`nvil_baseline`).

What the ``auto`` pipeline does here (``scg.compile(sbn)``): ``integrate_kl``
matches ``log q(h | x) − log p(h)`` (the site's own Bernoulli against a prior
that does not depend on ``h``, entering the cost linearly) and replaces it by
the analytic ``KL(Bernoulli(σ(r(x))) ‖ Bernoulli(σ(b)))``; the ``kl`` cost is
then no longer downstream of ``h``, so ``h``'s score multiplies ``nll`` alone.
``reparameterize`` refuses ``h`` (Bernoulli has no reparameterized sampler),
so ``h`` stays a score-function site. ``scg.compile(sbn, passes="none")`` keeps
the sampled KL: the learning signal is NVIL's ``log q(h|x) − log p(x, h)``.

:data:`sbn_no_plate` is the same model without the plate, so each example's
score multiplies every example's costs, Certigrad's estimator (benchmarks only).

Example::

    import jax, optax, scg
    from scg.models import sbn

    params = sbn.init_params(jax.random.key(0), data_mean=train.mean(0))   # 784-200
    baseline = sbn.nvil_baseline(jax.random.key(1))                         # 784-100-1 MLP on x
    objective = scg.compile(sbn.sbn, baseline=baseline)
    state = objective.init_baseline_state(params, x)
    loss, grads, state = objective.value_and_grad(params, x, key=jax.random.key(2), baseline_state=state)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import optax

import scg
from scg.models._evaluation import iwae_in_batches

__all__ = [
    "Sizes",
    "baseline_mlp",
    "init_baseline_mlp",
    "init_params",
    "iwae_log_likelihood",
    "nvil_baseline",
    "recognition_logits",
    "reconstruct",
    "sample_prior",
    "sbn",
    "sbn_no_plate",
    "sizes",
]


class Sizes(NamedTuple):
    """The architecture, read from the parameters (see :func:`sizes`)."""

    x_dim: int
    hidden: int
    recognition_hidden: tuple  # widths of the recognition MLP's deterministic layers; () = linear


# --------------------------------------------------------------------------- #
# Parameters.
# --------------------------------------------------------------------------- #


def _logit(p: Any) -> np.ndarray:
    p = np.clip(np.asarray(p, np.float64), 1e-3, 1 - 1e-3)
    return np.log(p) - np.log1p(-p)


def init_params(
    key: jax.Array,
    *,
    x_dim: int = 784,
    hidden: int = 200,
    recognition_hidden: int | Sequence[int] = (),
    data_mean: Any = None,
    scale: float = 0.01,
    dtype: Any = jnp.float32,
) -> dict:
    """Small random weights and biases; the likelihood's bias at the data's log-odds.

    Biases start at small random values, not at 0. That once avoided a wrong
    slope: numpyro's ``BernoulliLogits.log_prob`` has gradient ``x`` instead of
    ``x − 1/2`` at a logit of exactly 0 (JAX differentiates its softplus,
    written ``max(ℓ, 0) + log1p(exp(−|ℓ|))``, with slope 0 there, not 1/2).
    scg no longer depends on it: every site and every ``scg.log_prob`` is scored
    with :func:`scg.interpreter.log_density`, whose slope is ``x − σ(ℓ)`` at
    every logit, 0 included. The random start stays because saved checkpoints
    and pinned test values were made with it.

    Args:
      key: a JAX PRNG key; the same key gives the same parameters.
      x_dim: pixels per image (784 for MNIST).
      hidden: stochastic units ``h`` (200 in NVIL's SBN).
      recognition_hidden: widths of tanh layers before the recognition logits
        (an MLP ``q(h | x)``); ``()`` (default) is NVIL's linear ``x V + d``.
      data_mean: the training pixels' mean ``(x_dim,)``; the likelihood bias ``c``
        starts at its log-odds (clipped to ``[1e-3, 1 − 1e-3]``) plus the small
        noise, so the model begins at the pixel marginals. ``None``: just the noise.
      scale: the standard deviation of the ``N(0, scale²)`` initial weights and biases.
      dtype: the parameters' floating dtype.

    Returns:
      ``{"recognition": [layer, ...], "prior": {"logits": (hidden,)},
      "generative": {"w": (hidden, x_dim), "b": (x_dim,)}}``, a layer being
      ``{"w": (n_in, n_out), "b": (n_out,)}``; the last recognition layer maps
      to the ``hidden`` logits.
    """
    widths = (int(recognition_hidden),) if isinstance(recognition_hidden, (int, np.integer)) else tuple(
        int(w) for w in recognition_hidden)
    if x_dim < 1 or hidden < 1 or any(w < 1 for w in widths):
        raise ValueError(f"init_params: sizes must be positive; got x_dim={x_dim}, hidden={hidden}, "
                         f"recognition_hidden={recognition_hidden!r}.")
    sizes_in = (x_dim, *widths)
    sizes_out = (*widths, hidden)
    keys = iter(jax.random.split(key, 2 * len(sizes_in) + 3))
    normal = lambda shape: scale * jax.random.normal(next(keys), shape, dtype)
    recognition = [{"w": normal((a, b)), "b": normal((b,))} for a, b in zip(sizes_in, sizes_out)]
    c = normal((x_dim,))
    if data_mean is not None:
        if np.shape(data_mean) != (x_dim,):
            raise ValueError(f"init_params: data_mean must have shape ({x_dim},), got {np.shape(data_mean)}.")
        c = c + jnp.asarray(_logit(data_mean), dtype)
    return {
        "recognition": recognition,
        "prior": {"logits": normal((hidden,))},
        "generative": {"w": normal((hidden, x_dim)), "b": c},
    }


def sizes(params: dict) -> Sizes:
    """The architecture of ``params`` (as made by :func:`init_params`)."""
    layers = params["recognition"]
    return Sizes(x_dim=int(layers[0]["w"].shape[0]), hidden=int(params["prior"]["logits"].shape[0]),
                 recognition_hidden=tuple(int(layer["w"].shape[1]) for layer in layers[:-1]))


# --------------------------------------------------------------------------- #
# The networks (plain JAX; shared by the model, the evaluation and the plots).
# --------------------------------------------------------------------------- #


def _dense(layer: dict, h: jax.Array) -> jax.Array:
    return h @ layer["w"] + jnp.reshape(layer["b"], (1,) * (h.ndim - 1) + layer["b"].shape)


def recognition_logits(params: dict, x: jax.Array) -> jax.Array:
    """The logits of ``q(h | x)``: ``x V + d`` (or the MLP's), ``(..., hidden)``."""
    h = x
    for layer in params["recognition"][:-1]:
        h = jnp.tanh(_dense(layer, h))
    return _dense(params["recognition"][-1], h)


def _prior_logits(params: dict, ndim: int) -> jax.Array:
    logits = params["prior"]["logits"]
    return jnp.reshape(logits, (1,) * (ndim - 1) + logits.shape)


def generative_logits(params: dict, h: jax.Array) -> jax.Array:
    """The logits of ``p(x | h)``: ``h W + c``, ``(..., x_dim)``."""
    return _dense(params["generative"], h)


# --------------------------------------------------------------------------- #
# The model.
# --------------------------------------------------------------------------- #


def _body(params, x):
    batch = x.shape[0]
    q = dist.Bernoulli(logits=recognition_logits(params, x))
    h = scg.sample("h", q)
    prior = dist.Bernoulli(logits=_prior_logits(params, h.ndim))
    likelihood = dist.Bernoulli(logits=generative_logits(params, h))
    log_ratio = scg.log_prob(q, h) - scg.log_prob(prior, h)
    scg.cost("kl", jnp.sum(log_ratio, axis=-1) / batch)
    scg.cost("nll", -jnp.sum(scg.log_prob(likelihood, x), axis=-1) / batch)


@scg.model
def sbn(params, x):
    """The SBN on a batch ``x`` of shape ``(batch, x_dim)``; costs are per-batch means of −ELBO terms."""
    with scg.plate("data", x.shape[0]):
        _body(params, x)


@scg.model
def sbn_no_plate(params, x):
    """:func:`sbn` without the plate: each example's score multiplies all costs (Certigrad's estimator)."""
    _body(params, x)


# --------------------------------------------------------------------------- #
# NVIL's input-dependent baseline.
# --------------------------------------------------------------------------- #


def init_baseline_mlp(key: jax.Array, x_dim: int = 784, width: int = 100, dtype: Any = jnp.float32) -> dict:
    """Parameters of the baseline MLP ``x_dim → width (tanh) → 1``: small weights, zero biases."""
    k1, k2 = jax.random.split(key)
    return {"w1": jax.random.normal(k1, (x_dim, width), dtype) / math.sqrt(x_dim), "b1": jnp.zeros((width,), dtype),
            "w2": jnp.zeros((width, 1), dtype), "b2": jnp.zeros((1,), dtype)}


def baseline_mlp(psi: dict, x: jax.Array) -> jax.Array:
    """The baseline ``f_ψ(x)``: one value per example, ``(batch,)``."""
    hidden = jnp.tanh(x @ psi["w1"] + psi["b1"][None])
    return (hidden @ psi["w2"] + psi["b2"][None])[:, 0]


def nvil_baseline(key: jax.Array, *, x_dim: int = 784, width: int = 100, lr: float = 3e-3,
                  decay: float = 0.9) -> scg.baselines.Baseline:
    """NVIL's input-dependent baseline: ``scg.baselines.learned`` with a ``x_dim → width → 1`` MLP.

    ``b(x) = f_ψ(x) + c`` with ``c`` the running mean of the residual (NVIL's
    centering, ``decay``); ``ψ`` is fitted by Adam(``lr``) to the downstream
    costs of ``h`` inside every estimate. Unbiased: ``b`` depends on ``x`` and
    on ``ψ``, never on the sampled ``h``.
    """
    return scg.baselines.learned(baseline_mlp, init_baseline_mlp(key, x_dim, width), optax.adam(lr), decay=decay)


# --------------------------------------------------------------------------- #
# Using a trained model.
# --------------------------------------------------------------------------- #


def _bernoulli_log_prob(logits: jax.Array, x: jax.Array) -> jax.Array:
    """``Σ log Bernoulli(x; σ(ℓ))`` over the last axis, ``x·ℓ − softplus(ℓ)``, stable in ``ℓ``."""
    return jnp.sum(x * logits - jax.nn.softplus(logits), axis=-1)


@jax.jit
def reconstruct(params: dict, x: jax.Array) -> jax.Array:
    """``E[x | h]`` at ``h = 1[q(h | x) > 1/2]``: pixel probabilities shaped like ``x``."""
    h = (recognition_logits(params, x) > 0).astype(x.dtype)
    return jax.nn.sigmoid(generative_logits(params, h))


def sample_prior(params: dict, key: jax.Array, n: int) -> jax.Array:
    """Pixel probabilities ``σ(h W + c)`` of ``n`` draws ``h ~ p(h)``: ``(n, x_dim)``."""
    logits = params["prior"]["logits"]
    probs = jnp.broadcast_to(jax.nn.sigmoid(logits)[None], (n, logits.shape[0]))
    h = jax.random.bernoulli(key, probs).astype(logits.dtype)
    return jax.nn.sigmoid(generative_logits(params, h))


def _iwae_batch(params: dict, x: jax.Array, key: jax.Array, k: int) -> jax.Array:
    q_logits = recognition_logits(params, x)  # (B, H): the recognition net runs once per example
    prior = _prior_logits(params, 2)

    def log_weight(key: jax.Array) -> jax.Array:  # one sample h_i per example: (B,)
        h = jax.random.bernoulli(key, jax.nn.sigmoid(q_logits)).astype(x.dtype)
        log_joint = _bernoulli_log_prob(generative_logits(params, h), x) + _bernoulli_log_prob(prior, h)
        return log_joint - _bernoulli_log_prob(q_logits, h)

    log_w = jax.lax.map(log_weight, jax.random.split(key, k))  # (k, B), one sample set at a time
    return jax.nn.logsumexp(log_w, axis=0) - math.log(k)


_iwae_jit = jax.jit(_iwae_batch, static_argnames="k")


def iwae_log_likelihood(params: dict, x: Any, key: jax.Array, k: int, *, batch_size: int = 500) -> np.ndarray:
    """The importance-weighted estimate of ``log p(x)`` per example (Burda et al., 2016).

    .. math::

        \\log \\frac{1}{k} \\sum_{i=1}^{k} \\frac{p(x \\mid h_i)\\, p(h_i)}{q(h_i \\mid x)}, \\qquad h_i \\sim q(h \\mid x),

    with ``logsumexp``; the examples in batches of ``batch_size`` (the last one
    padded, so one compilation serves all). Its expectation is a lower bound on
    ``log p(x)`` that tightens as ``k`` grows; ``k = 1`` is the sampled ELBO.

    Args:
      params: the model's parameters.
      x: ``(N, x_dim)`` binary examples.
      key: a JAX PRNG key (batch ``j`` uses ``fold_in(key, j)``).
      k: importance samples per example.
      batch_size: examples per compiled call.

    Returns:
      ``(N,)`` float64 numpy array of per-example estimates, in nats.
    """
    return iwae_in_batches(_iwae_jit, params, x, key, k, batch_size)
