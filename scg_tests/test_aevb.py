"""Tests of scg.models.aevb and the `scg aevb` command, on small synthetic images.

The slow test (``pytest -m slow``) trains the real configuration on MNIST from
$SCG_DATA_DIR for one epoch.
"""

from __future__ import annotations

import json
import os
import pathlib
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import scg
from scg import cli, training
from scg.ir import LogProb
from scg.models import aevb

sys.path.insert(0, os.path.dirname(__file__))
from test_data import write_mnist  # noqa: E402  (the IDX writer of the loader tests)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SMALL = {"hidden": 32, "latent": 4}


def synthetic_images(n: int, seed: int = 0) -> np.ndarray:
    """``(n, 784)`` float32 images in [0, 1]: four random prototypes with 5% of pixels flipped,
    so there is structure for the autoencoder to learn."""
    rng = np.random.default_rng(seed)
    prototypes = (rng.random((4, 784)) < 0.3).astype(np.float32)
    flips = (rng.random((n, 784)) < 0.05).astype(np.float32)
    return np.abs(prototypes[rng.integers(0, 4, n)] - flips)


def write_synthetic_mnist(root: pathlib.Path, n_train: int = 300, n_test: int = 100) -> pathlib.Path:
    """A data dir holding mnist/ IDX files of synthetic 28x28 images."""
    to_idx = lambda x: np.round(x * 255).astype(np.uint8).reshape(-1, 28, 28)
    write_mnist(root / "mnist", {
        "train-images-idx3-ubyte": to_idx(synthetic_images(n_train, 1)),
        "train-labels-idx1-ubyte": np.zeros(n_train, np.uint8),
        "t10k-images-idx3-ubyte": to_idx(synthetic_images(n_test, 2)),
        "t10k-labels-idx1-ubyte": np.zeros(n_test, np.uint8),
    })
    return root


def count_log_probs(graph) -> int:
    return sum(isinstance(n, LogProb) for n in graph.nodes)


# --------------------------------------------------------------------------- #
# The model and its compilation.
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("biases", [False, True])
def test_auto_pipeline_integrates_the_kl_and_reparameterizes_z(biases):
    params = aevb.init_params(jax.random.key(0), x_dim=12, hidden=(6, 5), latent=3, biases=biases)
    assert aevb.sizes(params) == aevb.Sizes(12, (6, 5), 3, biases)
    assert params["decoder"][0]["w"].shape == (3, 5) and params["out"]["w"].shape == (6, 12)
    assert ("b" in params["mu"]) is biases
    x = jnp.asarray(synthetic_images(4)[:, :12])

    naive = scg.compile(aevb.aevb, passes="none").graph_for(params, x)
    assert [s.name for s in naive.sites] == ["z"] and count_log_probs(naive) == 2

    graph, certificates = scg.compile(aevb.aevb).graph_and_certificates(params, x)
    assert [s.name for s in graph.sites] == ["z.eps"]
    assert count_log_probs(graph) == 0
    (cert,) = certificates
    assert "integrate_kl" in cert.pass_name and "reparameterize" in cert.pass_name
    assert set(cert.rewritten) == {"z"}
    held = {p.name for p in cert.preconditions if p.held}
    assert {"p does not depend on z", "KL registered", "reparameterizable family",
            "differentiable paths to costs"} <= held
    assert all(p.held for p in cert.preconditions)
    assert "KL(Normal‖Normal)" in str(cert)


# Plain-JAX references, independent of scg and of scg.models.aevb's networks (bias-free layers).


def plain_encode_and_kl(params, x):
    """``(μ, σ, KL_i)`` with the analytic ``KL_i = KL(N(μ, σ)‖N(0, 1)) = Σ ½(μ² + σ² − 1) − log σ``."""
    h = x
    for layer in params["encoder"]:
        h = jax.nn.softplus(h @ layer["w"])
    mu, sigma = h @ params["mu"]["w"], jnp.sqrt(jnp.exp(h @ params["logvar"]["w"]))
    return mu, sigma, jnp.sum(0.5 * (mu ** 2 + sigma ** 2 - 1.0) - jnp.log(sigma), -1)


def plain_nll(params, z, x):
    """``−log p(x | z) = Σ softplus(ℓ) − x ℓ`` for codes ``z`` of shape ``(..., latent)``, ``x`` broadcast."""
    h = z
    for layer in params["decoder"]:
        h = jax.nn.softplus(h @ layer["w"])
    logits = h @ params["out"]["w"]
    return jnp.sum(jax.nn.softplus(logits) - x * logits, -1)


def reference_expected_loss(params, x, order):
    """E[kl + nll] per example averaged over the batch (the model's costs are batch means): the
    analytic KL, and the nll by Gauss–Hermite of ``order`` points per latent coordinate, example by
    example. Per-example sums of 2-d grids equal scg.expectation's joint 4-d grid at the same order
    (the costs are sums over examples), so the two agree to rounding."""
    mu, sigma, kl = plain_encode_and_kl(params, x)
    batch, latent = mu.shape
    nodes, weights = np.polynomial.hermite.hermgauss(order)
    grid = np.stack(np.meshgrid(*[nodes] * latent, indexing="ij"), -1).reshape(-1, latent)
    w = np.prod(np.stack(np.meshgrid(*[weights] * latent, indexing="ij"), -1).reshape(-1, latent), -1) / np.pi ** (
        latent / 2)
    z = mu[:, None, :] + np.sqrt(2.0) * sigma[:, None, :] * grid[None]  # (batch, points, latent)
    return jnp.sum(kl) / batch + jnp.sum(plain_nll(params, z, x[:, None, :]) @ w) / batch


def test_auto_gradient_matches_the_naive_one_in_expectation():
    # 2 examples x 2 latent dimensions: the exact expectation is a 4-d Gauss-Hermite sum
    params = aevb.init_params(jax.random.key(0), x_dim=6, hidden=4, latent=2)
    x = jnp.asarray(synthetic_images(2, 3)[:, :6])
    auto = scg.check_grad(aevb.aevb, params, x, key=jax.random.key(1), num_samples=1000, order=6)
    naive = scg.check_grad(aevb.aevb, params, x, key=jax.random.key(2), num_samples=10_000, passes="none",
                           order=6)
    assert auto.ok, str(auto)
    assert naive.ok, str(naive)
    # the same truth, and the pathwise estimator is far less noisy
    chex.assert_trees_all_equal(auto.exact, naive.exact)
    # ... and the truth itself, value and gradient, against the independent computation: catches a
    # model whose costs changed under both pipelines alike (a flipped KL sign changes E by 2·KL/batch
    # = 2.4, a missing / batch doubles it). The plain reference is converged at order 24 (orders 12 and
    # 24 agree to 1e-6); scg's reference at order=6 integrates at order 6 or, where it refines, finer,
    # so it lies within the order-6 quadrature error |ref₆ − ref₂₄| (3e-4 here) of the converged value,
    # plus float32 rounding (2e-5 relative).
    # the three computed in one compiled program (eagerly, every primitive compiles on its own shapes)
    converged, coarse, value = jax.jit(lambda p: (
        jax.value_and_grad(lambda q: reference_expected_loss(q, x, order=24))(p),
        jax.value_and_grad(lambda q: reference_expected_loss(q, x, order=6))(p),
        scg.expectation(aevb.aevb, p, x, order=6)))(params)
    checked = (value, auto.exact)
    for got, ref, ref_6 in zip(*(jax.tree_util.tree_leaves(t) for t in (checked, converged, coarse))):
        ref, ref_6 = np.asarray(ref, np.float64), np.asarray(ref_6, np.float64)
        tolerance = np.abs(ref_6 - ref) + 2e-5 * np.abs(ref) + 1e-6
        assert np.all(np.abs(np.asarray(got) - ref) <= tolerance), (got, ref, tolerance)
    assert np.median(np.asarray(naive.stderr["mu"]["w"]) * np.sqrt(10)) > 3 * np.median(
        np.asarray(auto.stderr["mu"]["w"]))


def test_costs_and_iwae_agree_with_a_direct_computation():
    params = aevb.init_params(jax.random.key(3), x_dim=784, **SMALL)
    x = synthetic_images(7, 4)
    mu, sigma = aevb.encode(params, x)
    assert mu.shape == (7, 4) and np.all(np.asarray(sigma) > 0)
    # the sampled KL (naive graph) and the analytic one (auto) have the same expectation: the negative
    # ELBO, computed here in plain JAX from S = 2000 samples per example. Per sample s, the batch-mean
    # losses are auto_s = mean_i(KL_i + nll_si) and naive_s = mean_i(log q(z_si) − log N(z_si; 0, 1) + nll_si);
    # their spread gives the standard errors of the library's estimates (200 and 2000 particles) and of
    # the reference (S samples); each estimate must be within 4 combined SE of the reference.
    auto_loss = training.evaluate_loss(scg.compile(aevb.aevb), params, x, key=jax.random.key(0), num_samples=200)
    naive = scg.compile(aevb.aevb, passes="none")
    naive_loss = training.evaluate_loss(naive, params, x, key=jax.random.key(1), num_samples=2000)
    m, s, kl = plain_encode_and_kl(params, jnp.asarray(x))
    eps = jax.random.normal(jax.random.key(7), (2000, *m.shape))
    z = m[None] + s[None] * eps
    nll = plain_nll(params, z, jnp.asarray(x)[None])
    sampled_kl = jnp.sum(-0.5 * eps ** 2 - jnp.log(s)[None] + 0.5 * z ** 2, -1)  # the normalizers cancel
    auto_draws = np.asarray(jnp.mean(kl[None] + nll, 1), np.float64)
    naive_draws = np.asarray(jnp.mean(sampled_kl + nll, 1), np.float64)
    reference, ref_var = auto_draws.mean(), auto_draws.var(ddof=1) / auto_draws.size
    assert abs(auto_loss - reference) < 4 * np.sqrt(auto_draws.var(ddof=1) / 200 + ref_var), (auto_loss, reference)
    assert abs(naive_loss - reference) < 4 * np.sqrt(naive_draws.var(ddof=1) / 2000 + ref_var), (naive_loss, reference)

    k = 5
    key = jax.random.key(9)
    log_px = aevb.iwae_log_likelihood(params, x, key, k, batch_size=3)  # 3 + 3 + 1 (padded)
    assert log_px.shape == (7,) and np.all(np.isfinite(log_px))
    # direct: batch j of 3 examples uses fold_in(key, j), samples split(key, k)
    for j, start in enumerate(range(0, 7, 3)):
        xb = x[start : start + 3]
        pad = np.concatenate([xb, np.repeat(xb[:1], 3 - len(xb), axis=0)])
        m, s = aevb.encode(params, pad)
        log_w = []
        for kk in jax.random.split(jax.random.fold_in(key, j), k):
            z = m + s * jax.random.normal(kk, m.shape)
            log_p = -aevb.bernoulli_nll(aevb.decode_logits(params, z), pad) + jnp.sum(
                jax.scipy.stats.norm.logpdf(z), -1)
            log_w.append(np.asarray(log_p - jnp.sum(jax.scipy.stats.norm.logpdf(z, m, s), -1), np.float64))
        direct = np.logaddexp.reduce(np.stack(log_w), axis=0) - np.log(k)
        np.testing.assert_allclose(log_px[start : start + 3], direct[: len(xb)], rtol=1e-5)
    # log p(x) >= E[IWAE_k] >= ELBO, and here the gap E[IWAE_5] − ELBO is 1.6 nats: R = 20 repeated
    # estimates (a new key each) resolve it to ~10 standard errors. Assert gap > 4·SE(gap), with
    # SE(gap)² = SE(IWAE mean)² + Var(reference)/S: catches an IWAE that returns the ELBO (gap 0).
    repeats = np.stack([aevb.iwae_log_likelihood(params, x, jax.random.fold_in(key, 100 + r), k, batch_size=7)
                        for r in range(20)]).mean(1)
    gap = repeats.mean() - (-reference)
    se_gap = np.sqrt(repeats.var(ddof=1) / repeats.size + ref_var)
    assert gap > 4 * se_gap, (gap, se_gap)


def test_one_epoch_of_a_small_aevb_lowers_the_loss():
    params = aevb.init_params(jax.random.key(0), x_dim=784, **SMALL)
    images = synthetic_images(400)
    objective = scg.compile(aevb.aevb)
    before = training.evaluate_loss(objective, params, images, key=jax.random.key(5), batch_size=100)
    # `before` pinned against plain JAX: the mean over the N = 400 images of KL_i + nll_i(z_i), one
    # sample z_i each (the KL is analytic under auto). The reference averages S = 32 samples per image.
    # Var(before) = Σ_i Var(nll_i) / N², Var(reference) = Σ_i Var(nll_i) / (S N²), Var(nll_i) estimated
    # from the reference's samples; assert |before − reference| < 4·sqrt(Var(before) + Var(reference)).
    mu, sigma, kl = plain_encode_and_kl(params, jnp.asarray(images))
    eps = jax.random.normal(jax.random.key(6), (32, *mu.shape))
    nll = np.asarray(plain_nll(params, mu[None] + sigma[None] * eps, jnp.asarray(images)[None]), np.float64)  # (S, N)
    reference = float(np.mean(kl)) + nll.mean()
    n, var_nll = nll.shape[1], nll.var(0, ddof=1)
    se = np.sqrt(np.sum(var_nll) / n ** 2 * (1 + 1 / nll.shape[0]))
    assert abs(before - reference) < 4 * se, (before, reference, se)
    state = training.fit(objective, optax.adam(3e-3), params, training.EpochBatches(images, 20, seed=0), epochs=1,
                      key=jax.random.key(1), progress=False, log=None, train_metric="train_neg_elbo")
    after = training.evaluate_loss(objective, state.params, images, key=jax.random.key(5), batch_size=100)
    assert state.step == 20 and np.isfinite(state.metrics[0]["train_neg_elbo"])
    assert after < before - 50, (before, after)


# --------------------------------------------------------------------------- #
# The command.
# --------------------------------------------------------------------------- #


def cli_args(data_dir, out, *extra):
    return ["aevb", "--data-dir", str(data_dir), "--out", str(out), "--batch-size", "50", "--hidden", "32",
            "--latent", "4", "--eval-batch-size", "50", "--no-progress", *extra]


def files_of(folder: pathlib.Path) -> dict:
    """Every file under ``folder`` (a checkpoint directory) and its bytes."""
    return {os.fspath(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def checkpoint_params(out):
    return training.load_state(out / training.CHECKPOINT_NAME, training.init_state(
        aevb.init_params(jax.random.key(0), x_dim=784, **SMALL), optax.adam(1e-3), jax.random.key(0))).params


def test_command_trains_writes_outputs_and_resumes_bit_for_bit(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("SCG_DATA_DIR", raising=False)
    data = write_synthetic_mnist(tmp_path / "data")
    straight, split = tmp_path / "straight", tmp_path / "split"

    assert cli.main(cli_args(data, straight, "--epochs", "2", "--eval-k", "3")) == 0
    printed = capsys.readouterr().out
    assert "epoch 1/2  train_neg_elbo" in printed and "epoch 2/2" in printed
    assert "(IWAE, k=3)" in printed
    records = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    for r in records:
        assert {"epoch", "train_neg_elbo", "test_neg_elbo", "seconds"} <= set(r)
        assert np.isfinite(r["test_neg_elbo"]) and r["seconds"] > 0
    for name in ("curve.png", "reconstructions.png", "samples.png"):
        assert (straight / name).read_bytes().startswith(PNG_SIGNATURE)
    final = json.loads((straight / "final.json").read_text())
    assert final["eval_k"] == 3 and np.isfinite(final["test_iwae_log_likelihood"])
    assert final["test_neg_elbo"] == records[-1]["test_neg_elbo"]

    assert cli.main(cli_args(data, split, "--epochs", "1", "--eval-k", "0")) == 0
    assert cli.main(cli_args(data, split, "--epochs", "2", "--eval-k", "0", "--resume")) == 0
    capsys.readouterr()
    for a, b in zip(jax.tree_util.tree_leaves(checkpoint_params(straight)),
                    jax.tree_util.tree_leaves(checkpoint_params(split))):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    resumed = [json.loads(line) for line in (split / "metrics.jsonl").read_text().splitlines()]
    assert [r["test_neg_elbo"] for r in resumed] == [r["test_neg_elbo"] for r in records]

    # another architecture or setting: refused with the reason, the checkpoint untouched
    saved = files_of(split / training.CHECKPOINT_NAME)
    assert saved and cli.main(cli_args(data, split, "--epochs", "3", "--latent", "5", "--resume")) == 1
    err = capsys.readouterr().err  # the setting by name, and the flags that resume it
    assert "latent: checkpoint 4 vs now 5" in err and "resume it with --latent 4" in err and "--overwrite" in err
    assert cli.main(cli_args(data, split, "--epochs", "3", "--seed", "1", "--resume")) == 1
    assert "seed: checkpoint 0 vs now 1" in capsys.readouterr().err
    assert files_of(split / training.CHECKPOINT_NAME) == saved
    # a corrupted checkpoint: a clear error, no traceback
    for name, content in saved.items():
        (split / training.CHECKPOINT_NAME / name).write_bytes(content[: len(content) // 2])
    assert cli.main(cli_args(data, split, "--epochs", "3", "--resume")) == 1
    assert "is corrupted or truncated" in capsys.readouterr().err


def test_command_usage(capsys):
    assert cli.main([]) == 2
    assert "aevb" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["aevb", "--passes", "some"])
    assert "invalid choice" in capsys.readouterr().err


@pytest.mark.slow
def test_one_epoch_on_mnist_reaches_195_nats(tmp_path, capsys):
    if not os.environ.get("SCG_DATA_DIR"):
        pytest.skip("set SCG_DATA_DIR to a folder holding mnist/")
    assert cli.main(["aevb", "--epochs", "1", "--out", str(tmp_path), "--eval-k", "10", "--no-progress"]) == 0
    final = json.loads((tmp_path / "final.json").read_text())
    assert final["test_neg_elbo"] <= 195.0, capsys.readouterr().out
    assert -final["test_iwae_log_likelihood"] <= final["test_neg_elbo"] + 0.5
