"""A moving-average baseline per step index of a loop (``scg.baselines.moving_average``).

The loop below has independent Bernoulli steps ``b_t ~ Bernoulli(σ(w + x_t))`` with the
cost ``(b_t − x_t)² + offset_t``; nothing flows through the carry, so step ``t``'s score
meets ``Q_t``, its own cost, whose mean and variance are known in closed form:

    E[Q_t] = p_t (1 − x_t)² + (1 − p_t) x_t² + offset_t,   Var[Q_t] = p_t (1 − p_t) (1 − 2 x_t)².

The offsets differ by step (0, 10, 20): one scalar baseline cannot remove them all.
"""
import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import pytest

import scg
from scg_tests.helpers import assert_within_se

X = jnp.array([-0.5, 0.2, 0.9])
OFFSETS = jnp.array([0.0, 10.0, 20.0])
PARAMS = {"w": jnp.array(0.3)}
DECAY = 0.9


@scg.model
def steps(params, x, offsets):
    def step(carry, inputs):
        x_t, offset_t = inputs
        b = scg.sample("b", dist.Bernoulli(logits=params["w"] + x_t))
        scg.cost("err", (b - x_t) ** 2 + offset_t)
        return carry, None

    jax.lax.scan(step, jnp.zeros(()), (x, offsets))


def exact_moments():
    p = jax.nn.sigmoid(PARAMS["w"] + X)
    mean = p * (1 - X) ** 2 + (1 - p) * X ** 2 + OFFSETS
    var = p * (1 - p) * (1 - 2 * X) ** 2
    return np.asarray(mean, np.float64), np.asarray(var, np.float64)


def loop_name(objective):
    (name,) = objective.init_baseline_state(PARAMS, X, OFFSETS)
    return name


def test_the_state_holds_one_average_per_step_and_learns_each_steps_mean(key):
    objective = scg.compile(steps, passes=[], baseline=scg.baselines.moving_average(DECAY))
    state = objective.init_baseline_state(PARAMS, X, OFFSETS)
    name = loop_name(objective)
    assert state[name].shape == (3,)
    scalar = scg.compile(steps, passes=[], baseline=scg.baselines.moving_average(DECAY, per_step=False))
    assert scalar.init_baseline_state(PARAMS, X, OFFSETS)[name].shape == ()

    n, k = 60, 4
    for key_i in jax.random.split(key, n):
        _, _, state = objective.value_and_grad(PARAMS, X, OFFSETS, key=key_i, num_samples=k, baseline_state=state)
    # m_n = (1 − d) Σ_{i<n} d^i Q̄_{n−i}: mean E[Q](1 − dⁿ), variance (1 − d)² (1 − d²ⁿ)/(1 − d²) · Var[Q]/K
    mean, var = exact_moments()
    expected = mean * (1 - DECAY ** n)
    sd = np.sqrt((1 - DECAY) ** 2 * (1 - DECAY ** (2 * n)) / (1 - DECAY ** 2) * var / k)
    z = np.abs(np.asarray(state[name]) - expected) / sd
    assert np.all(z < 5), (state[name], expected, sd)
    # a scalar state could not be within 5 sd of all three: the steps' means are 10 apart, sd < 0.2
    assert np.all(np.diff(np.asarray(state[name])) > 5)


def test_a_per_step_baseline_is_unbiased_and_removes_the_offsets_a_scalar_one_cannot(key):
    per_step = scg.compile(steps, passes=[], baseline=scg.baselines.moving_average(DECAY))
    scalar = scg.compile(steps, passes=[], baseline=scg.baselines.moving_average(DECAY, per_step=False))
    name = loop_name(per_step)
    mean, _ = exact_moments()
    # each baseline at its best fixed value: the step means, or their overall mean
    state_steps = {name: jnp.asarray(mean, jnp.float32)}
    state_scalar = {name: jnp.asarray(mean.mean(), jnp.float32)}
    n = 2000
    keys = jax.random.split(key, n)
    draw = lambda objective, state: jax.vmap(  # noqa: E731
        lambda k: objective.grad(PARAMS, X, OFFSETS, key=k, baseline_state=state)[0]["w"])(keys)
    g_steps, g_scalar = draw(per_step, state_steps), draw(scalar, state_scalar)
    exact = jax.grad(lambda p: scg.expectation(steps, p, X, OFFSETS))(PARAMS)["w"]
    assert_within_se(np.asarray(g_steps), float(exact), k=5)
    assert_within_se(np.asarray(g_scalar), float(exact), k=5)
    # the scalar baseline leaves residuals of ±10 at steps 0 and 2: variance ≈ 100·(Var ∂log p_0 +
    # Var ∂log p_2) ≈ 45 against < 1 per step; 2,000-draw sample variances of equal truth differ by a
    # factor 10 with probability far below 1e-12 (F quantile)
    assert float(jnp.var(g_scalar)) > 10 * float(jnp.var(g_steps)), (jnp.var(g_scalar), jnp.var(g_steps))


@pytest.mark.parametrize("per_step", [True, False])
def test_the_name_says_which_state_it_keeps(per_step):
    name = scg.baselines.moving_average(0.5, per_step=per_step).name
    assert name == ("moving_average(0.5)" if per_step else "moving_average(0.5, per_step=False)")


# --- per-site choices name sites, also inside loops ---------------------------------------------------


@scg.model
def two_site_steps(params, x, offsets):
    def step(carry, inputs):
        x_t, offset_t = inputs
        b = scg.sample("b", dist.Bernoulli(logits=params["w"] + x_t))
        c = scg.sample("c", dist.Bernoulli(logits=params["w"] - x_t))
        scg.cost("err", (b - x_t) ** 2 + c + offset_t)
        return carry, None

    jax.lax.scan(step, jnp.zeros(()), (x, offsets))


def test_a_per_site_choice_naming_a_site_inside_a_loop_acts_on_the_loops_scores(key):
    # before: {"b": ...} matched no score (the loop's per-step scores are keyed by the loop) and was
    # silently dropped; now it is the loop's baseline, draw for draw the same as a global one
    by_site = scg.compile(steps, passes=[], baseline={"b": "leave_one_out"})
    everywhere = scg.compile(steps, passes=[], baseline="leave_one_out")
    plain = scg.compile(steps, passes=[])
    for k in jax.random.split(key, 3):
        g1 = by_site.grad(PARAMS, X, OFFSETS, key=k, num_samples=4)["w"]
        g2 = everywhere.grad(PARAMS, X, OFFSETS, key=k, num_samples=4)["w"]
        g0 = plain.grad(PARAMS, X, OFFSETS, key=k, num_samples=4)["w"]
        np.testing.assert_allclose(g1, g2, rtol=1e-6)
        assert not np.allclose(g1, g0)  # the offsets (0, 10, 20) make the unbaselined draw differ
    state = scg.compile(steps, passes=[], baseline={"b": "moving_average"}).init_baseline_state(PARAMS, X, OFFSETS)
    (loop,) = state
    assert state[loop][loop].shape == (3,)  # the named site's loop keeps one average per step


def test_a_per_site_choice_is_refused_for_an_unknown_site_and_for_two_baselines_in_one_loop(key):
    with pytest.raises(ValueError, match=r"baseline= names 'nope', which is not a site of this model; its sites "
                                         r"are 'b', 'c'"):
        scg.compile(two_site_steps, passes=[], baseline={"nope": "leave_one_out"}).grad(
            PARAMS, X, OFFSETS, key=key, num_samples=2)
    with pytest.raises(ValueError, match=r"baseline= gives sites 'b' and 'c' different baselines \(leave_one_out "
                                         r"and moving_average\(0.9\)\), but both are scored inside the loop"):
        scg.compile(two_site_steps, passes=[], baseline={"b": "leave_one_out", "c": "moving_average"}).grad(
            PARAMS, X, OFFSETS, key=key, num_samples=2, baseline_state={})
    same = scg.compile(two_site_steps, passes=[], baseline={"b": "leave_one_out", "c": "leave_one_out"})
    np.testing.assert_allclose(same.grad(PARAMS, X, OFFSETS, key=key, num_samples=4)["w"],
                               scg.compile(two_site_steps, passes=[], baseline="leave_one_out").grad(
                                   PARAMS, X, OFFSETS, key=key, num_samples=4)["w"], rtol=1e-6)


def test_a_learned_baseline_predicts_a_loops_steps_under_the_name_of_its_site(key):
    # apply_fn returns one baseline per step under the loop's site name "b"; unbiased whatever ψ is
    baseline = scg.baselines.learned(lambda psi, x, offsets: {"b": psi["per_step"] + 0.0 * x},
                                     {"per_step": jnp.asarray(exact_moments()[0], jnp.float32)})
    objective = scg.compile(steps, passes=[], baseline=baseline)
    state = objective.init_baseline_state(PARAMS, X, OFFSETS)
    keys = jax.random.split(key, 2000)
    draws = jax.vmap(lambda k: objective.grad(PARAMS, X, OFFSETS, key=k, baseline_state=state)[0]["w"])(keys)
    exact = jax.grad(lambda p: scg.expectation(steps, p, X, OFFSETS))(PARAMS)["w"]
    assert_within_se(np.asarray(draws), float(exact), k=5)
    plain = jax.vmap(lambda k: scg.compile(steps, passes=[]).grad(PARAMS, X, OFFSETS, key=k)["w"])(keys)
    assert float(jnp.var(plain)) > 10 * float(jnp.var(draws))  # the offsets removed, step by step
    wrong = scg.baselines.learned(lambda psi, x, offsets: {"z": psi["c"]}, {"c": jnp.zeros(3)})
    with pytest.raises(ValueError, match=r"learned baseline: apply_fn returned a dict with keys \['z'\], but none "
                                         r"for the score 'scan@.*'; add a prediction under 'scan@.*' or 'b'"):
        obj = scg.compile(steps, passes=[], baseline=wrong)
        obj.grad(PARAMS, X, OFFSETS, key=key, baseline_state=obj.init_baseline_state(PARAMS, X, OFFSETS))
