"""Cart-pole dynamics in JAX: the classic Barto-Sutton-Anderson (1983) equations.

The state is ``s = (x, x_dot, theta, theta_dot)``: the cart's position (m) and
velocity, the pole's angle from upright (rad) and angular velocity. An action
``a ∈ {0, 1}`` pushes the cart left or right with a force of 10 N; one explicit
Euler step advances time by ``TAU = 0.02`` s (the equations and constants of
OpenAI Gym's ``CartPole-v1``). An episode fails when the pole leaves ±12° or the
cart leaves ±2.4 m.

Everything here is a pure function of arrays, so it traces into ``jax.lax.scan``
bodies (and into scg models) and is smooth in the state between failures.
"""
from __future__ import annotations

import jax.numpy as jnp

GRAVITY = 9.8
MASS_CART = 1.0
MASS_POLE = 0.1
TOTAL_MASS = MASS_CART + MASS_POLE
HALF_LENGTH = 0.5  # half the pole's length
POLE_MASS_LENGTH = MASS_POLE * HALF_LENGTH
FORCE_MAG = 10.0
TAU = 0.02  # seconds per Euler step
THETA_LIMIT = 12.0 * 2.0 * jnp.pi / 360.0  # ±12 degrees
X_LIMIT = 2.4  # ±2.4 m
INIT_RANGE = 0.05  # each coordinate of the initial state ~ Uniform(-0.05, 0.05)


def step(state: jnp.ndarray, action: jnp.ndarray) -> jnp.ndarray:
    """One Euler step of length ``TAU`` from ``state`` (shape ``(4,)``) under ``action`` (0: left, 1: right)."""
    x, x_dot, theta, theta_dot = state[0], state[1], state[2], state[3]
    force = jnp.where(action == 1, FORCE_MAG, -FORCE_MAG)
    cos, sin = jnp.cos(theta), jnp.sin(theta)
    temp = (force + POLE_MASS_LENGTH * theta_dot ** 2 * sin) / TOTAL_MASS
    theta_acc = (GRAVITY * sin - cos * temp) / (HALF_LENGTH * (4.0 / 3.0 - MASS_POLE * cos ** 2 / TOTAL_MASS))
    x_acc = temp - POLE_MASS_LENGTH * theta_acc * cos / TOTAL_MASS
    return jnp.stack([x + TAU * x_dot, x_dot + TAU * x_acc, theta + TAU * theta_dot, theta_dot + TAU * theta_acc])


def failed(state: jnp.ndarray) -> jnp.ndarray:
    """Whether the pole has fallen past ±12° or the cart has left ±2.4 m (a bool scalar)."""
    return (jnp.abs(state[0]) > X_LIMIT) | (jnp.abs(state[2]) > THETA_LIMIT)
