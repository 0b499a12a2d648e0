"""Tests of scg.models.sbn, stateful baselines in scg.training, and the `scg sbn` command.

Small shapes throughout (a 6-pixel, 3-unit SBN for exact answers; a few hundred
synthetic binary images for the command), so the file runs in well under a minute.
"""

from __future__ import annotations

import gzip
import itertools
import json
import os
import pathlib
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import optax
import pytest
from helpers import assert_within_se, bonferroni_z, mc_mean_and_se

import scg
from scg import cli, training
from scg.training.checkpoint import CheckpointError
from scg.ir import LogProb
from scg.models import sbn

sys.path.insert(0, os.path.dirname(__file__))
from test_aevb import PNG_SIGNATURE, files_of, synthetic_images  # noqa: E402  (binary 0/1 images with structure)

X_DIM, HIDDEN, BATCH = 6, 3, 4


def tiny_params(seed: int = 0) -> dict:
    params = sbn.init_params(jax.random.key(seed), x_dim=X_DIM, hidden=HIDDEN, scale=0.5)
    return params


def tiny_batch(seed: int = 0, n: int = BATCH) -> jnp.ndarray:
    return jnp.asarray((np.random.default_rng(seed).random((n, X_DIM)) < 0.4).astype(np.float32))


def tiny_nvil(seed: int = 1, lr: float = 0.05) -> scg.baselines.Baseline:
    return sbn.nvil_baseline(jax.random.key(seed), x_dim=X_DIM, width=5, lr=lr)


def leaves(tree):
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]


def assert_trees_equal(a, b):
    la, lb = leaves(a), leaves(b)
    assert len(la) == len(lb) and jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(la, lb):
        assert x.dtype == y.dtype and np.array_equal(x, y)


# --------------------------------------------------------------------------- #
# The model and its compilation.
# --------------------------------------------------------------------------- #


def test_auto_integrates_the_bernoulli_kl_and_keeps_h_a_score_function_site():
    params, x = tiny_params(), tiny_batch()
    assert sbn.sizes(params) == sbn.Sizes(X_DIM, HIDDEN, ())
    naive = scg.compile(sbn.sbn, passes="none").graph_for(params, x)
    assert [s.name for s in naive.sites] == ["h"] and sum(isinstance(n, LogProb) for n in naive.nodes) == 3
    assert set(naive.downstream_costs["h"]) == {"kl", "nll"}

    graph, (cert,) = scg.compile(sbn.sbn).graph_and_certificates(params, x)
    (site,) = graph.sites
    assert site.name == "h" and not site.reparameterized and site.plates[0].name == "data"
    assert sum(isinstance(n, LogProb) for n in graph.nodes) == 1  # only log p(x | h) is left
    assert set(graph.downstream_costs["h"]) == {"nll"}  # the analytic KL no longer depends on h
    assert cert.rewritten == ("h",)
    status = {p.name: p.held for p in cert.preconditions}
    assert status["KL registered"] and status["p does not depend on z"] and status["enters costs linearly"]
    assert status["reparameterizable family"] is False
    assert "KL(BernoulliLogits‖BernoulliLogits)" in str(cert)
    # (cert.verify(params, x, key=...) holds here too, to 1e-7; the nvil tests below check the
    # rewritten estimator against the exact gradient of the original graph, faster)


def numpy_neg_elbo(params, x) -> float:
    """mean_i Σ_h q(h | x_i)·[log q(h | x_i) − log p(h) − log p(x_i | h)] over the 2**HIDDEN codes, in
    float64 numpy, independent of scg (and of scg.models.sbn's networks)."""
    p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)
    x = np.asarray(x, np.float64)
    log_bernoulli = lambda logits, v: v * logits - np.logaddexp(0.0, logits)
    h = x
    for layer in p["recognition"][:-1]:
        h = np.tanh(h @ layer["w"] + layer["b"])
    q_logits = h @ p["recognition"][-1]["w"] + p["recognition"][-1]["b"]  # (N, H)
    codes = np.asarray(list(itertools.product([0.0, 1.0], repeat=HIDDEN)))  # (M, H)
    log_q = log_bernoulli(q_logits[:, None, :], codes[None]).sum(-1)  # (N, M)
    log_prior = log_bernoulli(p["prior"]["logits"][None], codes).sum(-1)  # (M,)
    x_logits = codes @ p["generative"]["w"] + p["generative"]["b"]  # (M, D)
    log_lik = log_bernoulli(x_logits[None], x[:, None, :]).sum(-1)  # (N, M)
    return float(np.mean(np.sum(np.exp(log_q) * (log_q - log_prior[None] - log_lik), -1)))


def test_costs_are_the_per_example_negative_elbo_and_iwae_bounds_log_px():
    params, x = tiny_params(2), tiny_batch(3, n=5)
    # exact log p(x) by summing over the 2**3 values of h
    hs = jnp.asarray(list(itertools.product([0.0, 1.0], repeat=HIDDEN)))
    log_joint = (dist.Bernoulli(logits=params["prior"]["logits"][None]).log_prob(hs).sum(-1)[:, None]
                 + dist.Bernoulli(logits=sbn.generative_logits(params, hs)[:, None]).log_prob(x[None]).sum(-1))
    log_px = jax.nn.logsumexp(log_joint, axis=0)  # (5,)
    neg_elbo = float(scg.expectation(sbn.sbn, params, x))  # mean over the batch of −ELBO(x_i)
    # pinned against the independent float64 enumeration (catches a changed cost: a flipped KL, a
    # missing / batch, the prior's sign), to float32 rounding
    np.testing.assert_allclose(neg_elbo, numpy_neg_elbo(params, x), rtol=1e-5)
    assert neg_elbo >= -float(jnp.mean(log_px)) - 1e-5
    # the sampled loss (both pipelines) averages to the exact negative ELBO
    for passes in ("none", "auto"):
        losses = jax.vmap(lambda k: scg.compile(sbn.sbn, passes=passes).loss(params, x, key=k))(
            jax.random.split(jax.random.key(0), 4000))
        assert abs(float(jnp.mean(losses)) - neg_elbo) < 4 * float(jnp.std(losses)) / np.sqrt(4000) + 1e-5
    # IWAE: k = 1 averages to the ELBO (within 4 SE of the batch means over 300 repeats); k = 64 lies
    # between the ELBO and log p(x) on average: above the ELBO by more than 4 SE (measured: 57 SE, so
    # an IWAE that returned the ELBO fails) and not above log p(x) by more than 4 SE (it is 4 SE below)
    repeats = lambda k, n: np.stack([sbn.iwae_log_likelihood(params, x, jax.random.key(i), k, batch_size=5)
                                     for i in range(n)])
    iwae_1 = repeats(1, 300)
    assert_within_se(iwae_1.mean(1), -neg_elbo)
    mean_64, se = mc_mean_and_se(repeats(64, 100).mean(1))
    assert -neg_elbo + 4 * se < mean_64 < float(jnp.mean(log_px)) + 4 * se, (-neg_elbo, mean_64, se)
    padded = sbn.iwae_log_likelihood(params, x, jax.random.key(1), 8, batch_size=2)  # 2 + 2 + 1 (padded)
    assert padded.shape == (5,) and padded.dtype == np.float64 and np.all(np.isfinite(padded))


def test_init_params_shapes_and_data_mean():
    mean = np.linspace(0.0, 1.0, 784)
    params = sbn.init_params(jax.random.key(0), data_mean=mean, recognition_hidden=16)
    assert sbn.sizes(params) == sbn.Sizes(784, 200, (16,))
    assert params["generative"]["w"].shape == (200, 784) and params["recognition"][1]["w"].shape == (16, 200)
    c = np.asarray(params["generative"]["b"])
    assert c[0] < -6 and c[-1] > 6 and abs(c[392]) < 0.1  # the log-odds of the pixel means, clipped
    assert np.all(np.asarray(params["prior"]["logits"]) != 0)  # no logit at numpyro's kink at 0
    with pytest.raises(ValueError, match=r"data_mean must have shape \(784,\)"):
        sbn.init_params(jax.random.key(0), data_mean=mean[:10])
    x = synthetic_images(3)
    assert sbn.reconstruct(params, x).shape == (3, 784)
    assert sbn.sample_prior(params, jax.random.key(0), 4).shape == (4, 784)


# --------------------------------------------------------------------------- #
# NVIL's baseline: unbiased at any state, and it lowers the variance.
# --------------------------------------------------------------------------- #


def trained_baseline_state(objective, params, x, steps=150):
    state = objective.init_baseline_state(params, x)
    step = jax.jit(lambda s, k: objective.value_and_grad(params, x, key=k, baseline_state=s)[2])
    for i in range(steps):
        state = step(state, jax.random.fold_in(jax.random.key(11), i))
    return state


@pytest.mark.parametrize("passes", ["none", "auto"])
def test_nvil_gradient_is_unbiased_against_the_exact_expectation(passes):
    params, x = tiny_params(), tiny_batch()
    exact = jax.grad(lambda p: scg.expectation(sbn.sbn, p, x))(params)
    objective = scg.compile(sbn.sbn, passes=passes, baseline=tiny_nvil())
    state = trained_baseline_state(objective, params, x)  # fixed during the check
    assert float(jnp.abs(state["center"]["h"])) > 0 and not np.array_equal(
        leaves(state["params"])[0], leaves(objective.init_baseline_state(params, x)["params"])[0])

    n = 20_000
    draws = jax.jit(jax.vmap(objective.unjitted_grad(params, x, baseline_state=state)))(
        jax.random.split(jax.random.key(5), n))
    plain = jax.jit(jax.vmap(scg.compile(sbn.sbn, passes=passes).unjitted_grad(params, x)))(
        jax.random.split(jax.random.key(6), n))
    n_coords = sum(np.size(e) for e in leaves(exact))
    # two-sided Bonferroni: P(any |z| > bound) ≤ 1e-3 over the coordinates of the correct estimator
    bound = bonferroni_z(1e-3, n_coords)
    for g, e in zip(leaves(draws), leaves(exact)):
        g = g.astype(np.float64)  # float32 sums along axis 0 lose digits over 20,000 draws
        # a floor on the standard error for coordinates without noise (the analytic KL's prior gradient)
        se = np.maximum(g.std(0, ddof=1) / np.sqrt(n), 1e-5 * (1 + np.abs(e)))
        z = np.abs(g.mean(0) - e) / se
        assert np.all(z < bound), (z.max(), g.mean(0), e)
    # the score terms (recognition parameters) have far less variance with the trained baseline
    var = lambda tree: sum(float(np.var(np.asarray(v, np.float64), axis=0).sum()) for v in jax.tree_util.tree_leaves(tree))
    assert var(draws["recognition"]) < 0.5 * var(plain["recognition"])


# --------------------------------------------------------------------------- #
# Stateful baselines in the training loop.
# --------------------------------------------------------------------------- #


@pytest.fixture(scope="module")
def nvil_objective():
    return scg.compile(sbn.sbn, baseline=tiny_nvil())


def run_fit(objective, out_dir, *, epochs, resume=False, steps_per_dispatch=1, **kwargs):
    data = np.asarray(tiny_batch(7, n=24))
    return training.fit(objective, optax.adam(0.02), tiny_params(), training.EpochBatches(data, BATCH, seed=1),
                     epochs=epochs, key=jax.random.key(3), out_dir=out_dir, resume=resume, progress=False, log=None,
                     config={"model": "tiny sbn"}, steps_per_dispatch=steps_per_dispatch, **kwargs)


def test_baseline_state_is_carried_checkpointed_and_resumed_bit_for_bit(nvil_objective, tmp_path):
    straight = run_fit(nvil_objective, tmp_path / "straight", epochs=3)
    assert straight.step == 18 and set(straight.baseline_state) == {"params", "opt_state", "center"}
    initial = nvil_objective.init_baseline_state(tiny_params(), tiny_batch())
    assert not np.array_equal(leaves(straight.baseline_state)[0], leaves(initial)[0])  # it was trained
    assert np.all(np.isfinite(leaves(initial)[0]))  # the baseline's own copy was not donated away

    run_fit(nvil_objective, tmp_path / "split", epochs=1)
    resumed = run_fit(nvil_objective, tmp_path / "split", epochs=3, resume=True)
    assert_trees_equal(resumed.params, straight.params)
    assert_trees_equal(resumed.opt_state, straight.opt_state)
    assert_trees_equal(resumed.baseline_state, straight.baseline_state)
    strip = lambda ms: [{k: v for k, v in m.items() if k != "seconds"} for m in ms]
    assert strip(resumed.metrics) == strip(straight.metrics)

    # the checkpoint holds the baseline state, bit for bit, with optax's own state classes
    template = training.init_state(tiny_params(), optax.adam(0.02), jax.random.key(3), baseline_state=initial)
    loaded = training.load_state(tmp_path / "split" / training.CHECKPOINT_NAME, template)
    assert_trees_equal(loaded.baseline_state, straight.baseline_state)
    assert type(loaded.baseline_state["opt_state"][0]) is type(initial["opt_state"][0])
    # a stateless template refuses a stateful checkpoint, and the other way round
    with pytest.raises(CheckpointError, match=r"holds the state of a stateful baseline, but this run's baseline "
                                              "keeps none") as info:
        training.load_state(tmp_path / "split" / training.CHECKPOINT_NAME, template._replace(baseline_state=None))
    assert info.value.leaf == "baseline_state"
    training.save_state(tmp_path / "stateless", template._replace(baseline_state=scg.baselines.EmptyState()))
    with pytest.raises(CheckpointError, match=r"holds no baseline state, but this run's baseline keeps one"):
        training.load_state(tmp_path / "stateless", template)
    stateless = training.load_state(tmp_path / "stateless", template._replace(baseline_state=None))
    assert stateless.baseline_state == scg.baselines.EmptyState()
    assert_trees_equal(stateless.params, template.params)


def test_moving_average_state_round_trips_and_multi_step_matches(tmp_path):
    objective = scg.compile(sbn.sbn, baseline="moving_average")
    single = run_fit(objective, tmp_path, epochs=2)
    assert float(single.baseline_state["h"]) > 0  # the running mean of the downstream costs
    path = tmp_path / "state"
    training.save_state(path, single, {"a": 1})
    loaded = training.load_state(path, training.init_state(tiny_params(), optax.adam(0.02), jax.random.key(0),
                                                     baseline_state={"h": jnp.zeros(())}), {"a": 1})
    assert_trees_equal(loaded.baseline_state, single.baseline_state)
    assert_trees_equal(loaded.params, single.params)
    # several steps per dispatch (lax.scan) carry the state the same way: 6 steps as 4 + 2
    multi = run_fit(objective, None, epochs=2, steps_per_dispatch=4)
    for a, b in zip(leaves((single.params, single.baseline_state)), leaves((multi.params, multi.baseline_state))):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_fit_and_make_step_refuse_mismatched_baseline_state(tmp_path):
    with pytest.raises(ValueError, match="baseline_state was given, but the objective's baseline keeps no state"):
        run_fit(scg.compile(sbn.sbn), None, epochs=1, baseline_state={"h": jnp.zeros(())})
    objective = scg.compile(sbn.sbn, baseline="moving_average")
    # A given state is the starting point. With a zero learning rate the parameters, and so the mean
    # downstream costs Q̄_t of the 6 steps (24 examples in batches of 4), are the same whatever the
    # state; m_6 = d^6·m_0 + Σ_t (1 − d)·d^(5−t)·Q̄_t is then linear in m_0, and the runs from m_0 = 100
    # and m_0 = 0 differ by exactly 100·0.9^6 (float32 rounding aside).
    def frozen_fit(m0):
        return training.fit(objective, optax.sgd(0.0), tiny_params(),
                            training.EpochBatches(np.asarray(tiny_batch(7, n=24)), BATCH, seed=1), epochs=1,
                            key=jax.random.key(3), progress=False, log=None, baseline_state={"h": jnp.array(m0)})

    from_100, from_0 = frozen_fit(100.0), frozen_fit(0.0)
    assert from_100.step == 6
    np.testing.assert_allclose(float(from_100.baseline_state["h"]) - float(from_0.baseline_state["h"]),
                               100 * 0.9 ** 6, rtol=1e-5)

    # one make_step, pinned: its loss and gradient are the objective's at key fold_in(train_key, 0),
    # SGD moves the parameters by −0.1·gradient, and the moving average takes (1 − 0.9)·mean(Q) where
    # Q_i, h's downstream cost under auto, is example i's nll term only (the KL is analytic):
    # mean(Q) = (loss − KL) / batch with KL = Σ_i KL(q(h | x_i)‖p(h)) / batch in closed form.
    step = training.make_step(objective, optax.sgd(0.1))
    params, batch = tiny_params(), tiny_batch()
    loss, grads, state = objective.value_and_grad(params, batch, key=jax.random.fold_in(jax.random.key(0), 0),
                                                  baseline_state={"h": jnp.zeros(())})
    expected_params = jax.tree_util.tree_map(lambda p, g: p - 0.1 * g, params, grads)
    q1 = jax.nn.sigmoid(sbn.recognition_logits(params, batch))
    p1 = jax.nn.sigmoid(params["prior"]["logits"])[None]
    kl = jnp.sum(q1 * jnp.log(q1 / p1) + (1 - q1) * jnp.log((1 - q1) / (1 - p1))) / BATCH
    fresh = tiny_params()  # make_step donates its arguments' buffers
    out = step(fresh, optax.sgd(0.1).init(fresh), {"h": jnp.zeros(())}, jax.random.key(0), jnp.int32(0), batch)
    assert len(out) == 4
    np.testing.assert_allclose(out[3], loss, rtol=1e-6)
    chex.assert_trees_all_close(out[0], expected_params, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(out[2]["h"], state["h"], rtol=1e-6)
    np.testing.assert_allclose(out[2]["h"], 0.1 * (loss - kl) / BATCH, rtol=1e-4)


# --------------------------------------------------------------------------- #
# The command.
# --------------------------------------------------------------------------- #


def write_binarized_mnist(root: pathlib.Path, n_train: int = 300, n_valid: int = 50, n_test: int = 100) -> pathlib.Path:
    """A data dir holding binarized_mnist/*.amat.gz of synthetic 0/1 images (the .amat text layout)."""
    folder = root / "binarized_mnist"
    folder.mkdir(parents=True)
    for split, n, seed in (("train", n_train, 1), ("valid", n_valid, 2), ("test", n_test, 3)):
        rows = synthetic_images(n, seed).astype(np.uint8)
        text = "".join(" ".join(map(str, row)) + "\n" for row in rows)
        with gzip.open(folder / f"binarized_mnist_{split}.amat.gz", "wt") as f:
            f.write(text)
    return root


def sbn_args(data_dir, out, *extra):
    return ["sbn", "--data-dir", str(data_dir), "--out", str(out), "--batch-size", "50", "--hidden", "8",
            "--eval-batch-size", "50", "--no-progress", *extra]


def checkpoint_state(out, baseline_state):
    template = training.init_state(sbn.init_params(jax.random.key(0), hidden=8), optax.adam(1e-3), jax.random.key(0),
                                baseline_state=baseline_state)
    return training.load_state(out / training.CHECKPOINT_NAME, template)


def test_command_trains_writes_outputs_and_resumes_bit_for_bit(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("SCG_DATA_DIR", raising=False)
    data = write_binarized_mnist(tmp_path / "data")
    straight, split = tmp_path / "straight", tmp_path / "split"

    assert cli.main(sbn_args(data, straight, "--epochs", "2", "--eval-k", "3")) == 0
    printed = capsys.readouterr().out
    assert "baseline=nvil" in printed and "epoch 1/2  train_neg_elbo" in printed and "(IWAE, k=3)" in printed
    records = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    for r in records:
        assert {"epoch", "train_neg_elbo", "test_neg_elbo", "seconds"} <= set(r)
        assert np.isfinite(r["test_neg_elbo"]) and r["seconds"] > 0
    assert records[1]["test_neg_elbo"] < records[0]["test_neg_elbo"]
    for name in ("curve.png", "samples.png", "reconstructions.png"):
        assert (straight / name).read_bytes().startswith(PNG_SIGNATURE)
    final = json.loads((straight / "final.json").read_text())
    assert final["eval_k"] == 3 and final["test_neg_elbo"] == records[-1]["test_neg_elbo"]
    assert -final["test_iwae_log_likelihood"] < final["test_neg_elbo"] + 5.0

    assert cli.main(sbn_args(data, split, "--epochs", "1", "--eval-k", "0")) == 0
    assert cli.main(sbn_args(data, split, "--epochs", "2", "--eval-k", "0", "--resume")) == 0
    capsys.readouterr()
    nvil_state = sbn.nvil_baseline(jax.random.key(0)).init({"h": (50,)})
    a, b = checkpoint_state(straight, nvil_state), checkpoint_state(split, nvil_state)
    assert_trees_equal(a.params, b.params)
    assert_trees_equal(a.baseline_state, b.baseline_state)
    resumed = [json.loads(line) for line in (split / "metrics.jsonl").read_text().splitlines()]
    assert [r["test_neg_elbo"] for r in resumed] == [r["test_neg_elbo"] for r in records]

    # another baseline: refused with the reason, the checkpoint untouched
    saved = files_of(split / training.CHECKPOINT_NAME)
    assert cli.main(sbn_args(data, split, "--epochs", "3", "--baseline", "moving_average", "--resume")) == 1
    err = capsys.readouterr().err
    assert "baseline: checkpoint 'nvil' vs now 'moving_average'" in err and "resume it with --baseline nvil" in err
    assert files_of(split / training.CHECKPOINT_NAME) == saved


@pytest.mark.parametrize("extra", [("--baseline", "moving_average"), ("--baseline", "leave_one_out",
                                                                        "--num-samples", "2", "--passes", "none")])
def test_command_with_other_baselines(tmp_path, capsys, extra):
    data = write_binarized_mnist(tmp_path / "data", n_train=100, n_test=50)
    assert cli.main(sbn_args(data, tmp_path / "out", "--epochs", "1", "--eval-k", "0", *extra)) == 0
    record = json.loads((tmp_path / "out" / "metrics.jsonl").read_text())
    assert np.isfinite(record["test_neg_elbo"])


def test_command_usage(tmp_path, capsys):
    data = write_binarized_mnist(tmp_path / "data", n_train=60, n_test=50)
    assert cli.main(sbn_args(data, tmp_path / "out", "--baseline", "leave_one_out")) == 1
    assert "needs --num-samples 2 or more" in capsys.readouterr().err
    assert cli.main(["sbn", "--data-dir", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")]) == 1
    assert "binarized_mnist_train.amat, binarized_mnist_valid.amat, binarized_mnist_test.amat not found" in (
        capsys.readouterr().err)
    with pytest.raises(SystemExit):
        cli.main(["sbn", "--baseline", "vimco"])
    assert "invalid choice" in capsys.readouterr().err
