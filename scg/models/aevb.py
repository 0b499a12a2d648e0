"""Certigrad's naive AEVB (the variational autoencoder of Kingma & Welling, 2014) as an scg model.

The model, with data in rows (``x``: ``(batch, x_dim)``, pixel intensities in
``[0, 1]``, not binarized)::

    h  = softplus(softplus(x W₁) W₂)                       encoder, no biases by default
    μ  = h W_μ,   σ = sqrt(exp(h W_logσ²))
    z ~ N(μ, σ)                                             site "z": (batch, latent)
    kl  = Σ [log N(z; μ, σ) − log N(z; 0, 1)] / batch       the sampled KL, via scg.log_prob
    ℓ  = softplus(softplus(z V₁) V₂) V_out                  decoder logits; p = sigmoid(ℓ)
    nll = Σ [softplus(ℓ) − x ℓ] / batch                     Bernoulli −log p(x | z), stable in ℓ

It is written the naive way, as in Certigrad (Selsam, Liang & Dill, ICML 2017):
the KL is *sampled*, and ``z`` is an ordinary site. ``scg.compile(aevb)`` (the
``auto`` pipeline) certifies and applies the two rewrites that make the usual
VAE estimator: ``integrate_kl`` replaces the sampled KL by ``KL(N(μ,σ)‖N(0,1))``
and ``reparameterize`` turns ``z`` into ``z.eps ~ N(0, 1)``, ``z = μ + σ·z.eps``.
``scg.compile(aevb, passes="none")`` keeps the naive score-function graph.

Sites and costs sit in ``scg.plate("data", batch)``: examples are independent
given the parameters, so the naive estimator multiplies example ``i``'s score
only by example ``i``'s costs (the totals, and so the loss, are unchanged).

Sizes are read from the parameters' shapes, so one model serves the real
configuration (784 → 1000 → 1000 → 30) and the shrunken ones the tests use.

Example::

    import jax, optax, scg
    from scg.models import aevb

    params = aevb.init_params(jax.random.key(0))            # 784-1000-1000-30, no biases
    objective = scg.compile(aevb.aevb)                       # analytic KL, reparameterized z
    loss, grads = objective.value_and_grad(params, x, key=jax.random.key(1))
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist

import scg
from scg.models._evaluation import iwae_in_batches

__all__ = [
    "Sizes",
    "aevb",
    "bernoulli_nll",
    "decode",
    "decode_logits",
    "encode",
    "init_params",
    "iwae_log_likelihood",
    "reconstruct",
    "sample_prior",
    "sizes",
]


class Sizes(NamedTuple):
    """The architecture, read from the parameters (see :func:`sizes`)."""

    x_dim: int
    hidden: tuple
    latent: int
    biases: bool


# --------------------------------------------------------------------------- #
# Parameters.
# --------------------------------------------------------------------------- #


def _layer(key: jax.Array, n_in: int, n_out: int, biases: bool, dtype: Any) -> dict:
    layer = {"w": jax.nn.initializers.glorot_uniform()(key, (n_in, n_out), dtype)}
    if biases:
        layer["b"] = jnp.zeros((n_out,), dtype)
    return layer


def init_params(
    key: jax.Array,
    *,
    x_dim: int = 784,
    hidden: int | Sequence[int] = 1000,
    latent: int = 30,
    biases: bool = False,
    dtype: Any = jnp.float32,
) -> dict:
    """Xavier-uniform (Glorot & Bengio, 2010) weights for the encoder and decoder.

    Args:
      key: a JAX PRNG key; the same key gives the same parameters.
      x_dim: pixels per image (784 for MNIST).
      hidden: the width of each of the two hidden layers, or a sequence of
        widths for the encoder's hidden layers (the decoder mirrors them).
      latent: the dimension of ``z``.
      biases: add a bias (initialized to zero) to every layer; Certigrad has none.
      dtype: the parameters' floating dtype.

    Returns:
      ``{"encoder": [layer, ...], "mu": layer, "logvar": layer, "decoder": [layer,
      ...], "out": layer}`` where a layer is ``{"w": (n_in, n_out)}`` (plus
      ``"b": (n_out,)`` with ``biases``).
    """
    widths = (int(hidden),) * 2 if isinstance(hidden, (int, np.integer)) else tuple(int(h) for h in hidden)
    if not widths or any(w < 1 for w in widths) or x_dim < 1 or latent < 1:
        raise ValueError(
            f"init_params: sizes must be positive, with at least one hidden layer; got x_dim={x_dim}, "
            f"hidden={hidden!r}, latent={latent}."
        )
    encoder_sizes = (x_dim, *widths)
    decoder_sizes = (latent, *widths[::-1])
    keys = iter(jax.random.split(key, 2 * len(widths) + 3))
    return {
        "encoder": [_layer(next(keys), a, b, biases, dtype) for a, b in zip(encoder_sizes, encoder_sizes[1:])],
        "mu": _layer(next(keys), widths[-1], latent, biases, dtype),
        "logvar": _layer(next(keys), widths[-1], latent, biases, dtype),
        "decoder": [_layer(next(keys), a, b, biases, dtype) for a, b in zip(decoder_sizes, decoder_sizes[1:])],
        "out": _layer(next(keys), widths[0], x_dim, biases, dtype),
    }


def sizes(params: dict) -> Sizes:
    """The architecture of ``params`` (as made by :func:`init_params`)."""
    return Sizes(
        x_dim=int(params["encoder"][0]["w"].shape[0]),
        hidden=tuple(int(layer["w"].shape[1]) for layer in params["encoder"]),
        latent=int(params["mu"]["w"].shape[1]),
        biases="b" in params["mu"],
    )


# --------------------------------------------------------------------------- #
# The networks (plain JAX; shared by the model, the evaluation and the plots).
# --------------------------------------------------------------------------- #


def _dense(layer: dict, h: jax.Array) -> jax.Array:
    out = h @ layer["w"]
    if "b" in layer:
        out = out + jnp.reshape(layer["b"], (1,) * (out.ndim - 1) + layer["b"].shape)
    return out


def encode(params: dict, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(μ, σ)`` of ``q(z | x)``, each ``(..., latent)``, with ``σ = sqrt(exp(h W_logσ²))``."""
    h = x
    for layer in params["encoder"]:
        h = jax.nn.softplus(_dense(layer, h))
    mu = _dense(params["mu"], h)
    sigma = jnp.sqrt(jnp.exp(_dense(params["logvar"], h)))
    return mu, sigma


def decode_logits(params: dict, z: jax.Array) -> jax.Array:
    """The decoder's logits ``ℓ`` (``(..., x_dim)``); pixel probabilities are ``sigmoid(ℓ)``."""
    h = z
    for layer in params["decoder"]:
        h = jax.nn.softplus(_dense(layer, h))
    return _dense(params["out"], h)


def decode(params: dict, z: jax.Array) -> jax.Array:
    """Pixel probabilities ``sigmoid(ℓ)`` (the Bernoulli means) for latent codes ``z``."""
    return jax.nn.sigmoid(decode_logits(params, z))


def bernoulli_nll(logits: jax.Array, x: jax.Array) -> jax.Array:
    """``−log p(x | ℓ)`` summed over the last axis: ``Σ softplus(ℓ) − x·ℓ``.

    Equal to ``−Σ [x log σ(ℓ) + (1 − x) log(1 − σ(ℓ))]`` for ``x`` in ``[0, 1]``
    (also fractional intensities), without overflow or ``log 0`` for large ``|ℓ|``.
    Made of differentiable primitives only, so ``reparameterize`` certifies paths through it.
    """
    return jnp.sum(jax.nn.softplus(logits) - x * logits, axis=-1)


# --------------------------------------------------------------------------- #
# The model.
# --------------------------------------------------------------------------- #


@scg.model
def aevb(params, x):
    """Certigrad's naive AEVB on a batch ``x`` of shape ``(batch, x_dim)``; costs are per-batch means."""
    batch = x.shape[0]
    with scg.plate("data", batch):
        mu, sigma = encode(params, x)
        q = dist.Normal(mu, sigma)
        z = scg.sample("z", q)
        log_ratio = scg.log_prob(q, z) - scg.log_prob(dist.Normal(0.0, 1.0), z)
        scg.cost("kl", jnp.sum(log_ratio, axis=-1) / batch)
        scg.cost("nll", bernoulli_nll(decode_logits(params, z), x) / batch)


# --------------------------------------------------------------------------- #
# Using a trained model.
# --------------------------------------------------------------------------- #


@jax.jit
def reconstruct(params: dict, x: jax.Array) -> jax.Array:
    """Decoder means at the encoder means: ``sigmoid(ℓ(μ(x)))``, shaped like ``x``."""
    mu, _ = encode(params, x)
    return decode(params, mu)


def sample_prior(params: dict, key: jax.Array, n: int) -> jax.Array:
    """Decoder means ``sigmoid(ℓ(z))`` of ``n`` codes ``z ~ N(0, I)``: ``(n, x_dim)``."""
    z = jax.random.normal(key, (n, sizes(params).latent), params["mu"]["w"].dtype)
    return jax.jit(decode)(params, z)


def _log_normal(z: jax.Array, mu: Any, sigma: Any) -> jax.Array:
    """``Σ log N(z; μ, σ)`` over the last axis."""
    return jnp.sum(-0.5 * jnp.square((z - mu) / sigma) - jnp.log(sigma) - 0.5 * math.log(2 * math.pi), axis=-1)


def _iwae_batch(params: dict, x: jax.Array, key: jax.Array, k: int) -> jax.Array:
    mu, sigma = encode(params, x)  # (B, L): the encoder runs once per example

    def log_weight(key: jax.Array) -> jax.Array:  # one sample z_i per example: (B,)
        z = mu + sigma * jax.random.normal(key, mu.shape, mu.dtype)
        log_joint = -bernoulli_nll(decode_logits(params, z), x) + _log_normal(z, 0.0, 1.0)
        return log_joint - _log_normal(z, mu, sigma)

    log_w = jax.vmap(log_weight)(jax.random.split(key, k))  # (k, B)
    return jax.nn.logsumexp(log_w, axis=0) - math.log(k)


_iwae_jit = jax.jit(_iwae_batch, static_argnames="k")


def iwae_log_likelihood(
    params: dict, x: Any, key: jax.Array, k: int, *, batch_size: int = 100
) -> np.ndarray:
    """The importance-weighted estimate of ``log p(x)`` per example (Burda et al., 2016).

    .. math::

        \\log \\frac{1}{k} \\sum_{i=1}^{k} \\frac{p(x, z_i)}{q(z_i \\mid x)}, \\qquad z_i \\sim q(z \\mid x),

    computed with ``logsumexp``, the ``k`` samples vectorized with ``vmap``, the
    examples in batches of ``batch_size`` (the last one padded, so one
    compilation serves all). Its expectation is a lower bound on ``log p(x)``
    that tightens as ``k`` grows; ``k = 1`` is the (sampled) ELBO.

    Args:
      params: the model's parameters.
      x: ``(N, x_dim)`` examples.
      key: a JAX PRNG key (batch ``j`` uses ``fold_in(key, j)``).
      k: importance samples per example.
      batch_size: examples per compiled call (memory grows with ``k · batch_size``).

    Returns:
      ``(N,)`` float64 numpy array of per-example estimates, in nats.
    """
    return iwae_in_batches(_iwae_jit, params, x, key, k, batch_size)
