"""Tests of scg.training: the generic loop on a toy model (fast compiles): bit-for-bit resume,
checkpoint round trips and refusals, the NaN guard, multi-step dispatch."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import optax
import pytest

import scg
from scg import training
from scg.training.checkpoint import CheckpointError


@scg.model
def toy(params, x):
    """A Gaussian location model: one score-function-free, reparameterizable site."""
    z = scg.sample("z", dist.Normal(params["mu"], jnp.exp(params["log_s"])))
    scg.cost("fit", jnp.mean(jnp.sum(jnp.square(x - z[None, :]), axis=-1)))


DIM = 3


def toy_params():
    return {"mu": jnp.zeros(DIM), "log_s": jnp.zeros(DIM)}


def toy_data(n=40, seed=0):
    return np.random.default_rng(seed).normal(2.0, 0.5, size=(n, DIM)).astype(np.float32)


@pytest.fixture(scope="module")
def objective():
    return scg.compile(toy)  # shared: one trace, one compile per method for the module


def run(objective, out_dir, *, epochs, resume=False, data=None, lr=0.05, **kwargs):
    data = toy_data() if data is None else data
    return training.fit(objective, optax.adam(lr), toy_params(), training.EpochBatches(data, 8, seed=3),
                     epochs=epochs, key=jax.random.key(7), out_dir=out_dir, resume=resume, progress=False,
                     log=None, config={"model": "toy", "lr": lr}, **kwargs)


def leaves(tree):
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]


def assert_trees_equal(a, b):
    la, lb = leaves(a), leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        assert x.dtype == y.dtype and np.array_equal(x, y)


def test_fit_lowers_loss_and_writes_metrics(objective, tmp_path):
    state = run(objective, tmp_path, epochs=3)
    assert (state.epoch, state.step) == (3, 15)
    losses = [m["train_loss"] for m in state.metrics]
    assert losses[-1] < losses[0]
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines == list(state.metrics)
    assert [m["epoch"] for m in lines] == [1, 2, 3] and all(m["seconds"] > 0 for m in lines)


def test_resume_is_bit_for_bit(objective, tmp_path):
    straight = run(objective, tmp_path / "straight", epochs=2)
    run(objective, tmp_path / "split", epochs=1)
    resumed = run(objective, tmp_path / "split", epochs=2, resume=True)
    assert (resumed.epoch, resumed.step) == (2, straight.step)
    assert_trees_equal(straight.params, resumed.params)
    assert_trees_equal(straight.opt_state, resumed.opt_state)
    strip = lambda ms: [{k: v for k, v in m.items() if k != "seconds"} for m in ms]
    assert strip(resumed.metrics) == strip(straight.metrics)
    lines = [json.loads(line) for line in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert strip(lines) == strip(straight.metrics)
    # the checkpoint holds the same state
    loaded = training.load_state(tmp_path / "split" / training.CHECKPOINT_NAME,
                              training.init_state(toy_params(), optax.adam(0.05), jax.random.key(7)))
    assert_trees_equal(loaded.params, straight.params)
    assert loaded.epoch == 2 and loaded.metrics == resumed.metrics


def test_resume_past_the_last_epoch_trains_nothing(objective, tmp_path):
    first = run(objective, tmp_path, epochs=1)
    again = run(objective, tmp_path, epochs=1, resume=True)
    assert again.epoch == 1 and again.metrics == first.metrics
    assert_trees_equal(again.params, first.params)


def test_state_round_trip_and_refusals(tmp_path):
    optimizer = optax.adam(1e-3)
    state = training.init_state(toy_params(), optimizer, jax.random.key(1))
    state = state._replace(epoch=1, step=5, metrics=({"epoch": 1, "train_loss": 0.5, "seconds": 1.0},))
    path = tmp_path / "ckpt"
    training.save_state(path, state, {"lr": 1e-3})
    loaded = training.load_state(path, training.init_state(toy_params(), optimizer, jax.random.key(0)), {"lr": 1e-3})
    assert_trees_equal(loaded.params, state.params)
    assert_trees_equal(loaded.opt_state, state.opt_state)
    assert np.array_equal(jax.random.key_data(loaded.key), jax.random.key_data(state.key))
    assert (loaded.epoch, loaded.step, loaded.metrics) == (1, 5, state.metrics)

    # another architecture: named leaf
    other = training.init_state({"mu": jnp.zeros(DIM + 1), "log_s": jnp.zeros(DIM)}, optimizer, jax.random.key(0))
    with pytest.raises(CheckpointError, match=r"does not match the template.*params/mu") as info:
        training.load_state(path, other)
    assert info.value.leaf == "params/mu"
    # other settings: named setting
    with pytest.raises(CheckpointError, match=r"other settings \(lr: checkpoint 0.001 vs now 0.01\)"):
        training.load_state(path, loaded, {"lr": 1e-2})
    # corrupted files
    for file in (f for f in path.rglob("*") if f.is_file()):
        file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="ckpt' is corrupted or truncated"):
        training.load_state(path, loaded)


def test_resume_refuses_missing_and_mismatched_checkpoints(objective, tmp_path):
    with pytest.raises(FileNotFoundError, match="cannot resume: there is no checkpoint"):
        run(objective, tmp_path, epochs=1, resume=True)
    run(objective, tmp_path, epochs=1)
    with pytest.raises(CheckpointError, match=r"lr: checkpoint 0.05 vs now 0.1"):
        run(objective, tmp_path, epochs=2, resume=True, lr=0.1)


class ListBatches:
    """Explicit per-epoch batch lists (a ``batches`` callable other than EpochBatches)."""

    def __init__(self, per_epoch):
        self.per_epoch = per_epoch

    def __len__(self):
        return len(self.per_epoch[0])

    def __call__(self, epoch):
        return iter(self.per_epoch[epoch])


def test_nan_guard_names_the_step_and_keeps_the_last_checkpoint(objective, tmp_path):
    data = toy_data(24)
    clean = [data[i : i + 8] for i in (0, 8, 16)]
    poisoned = [b.copy() for b in clean]
    poisoned[1][3, 0] = np.nan  # the 2nd batch of the 2nd epoch: global step 3 + 2 = 5
    batches = ListBatches([clean, poisoned, clean])
    fit = lambda epochs, out: training.fit(objective, optax.adam(0.05), toy_params(), batches, epochs=epochs,
                                        key=jax.random.key(7), out_dir=out, progress=False, log=None)
    good = fit(1, tmp_path / "good")
    with pytest.raises(training.NonFiniteLossError, match=r"loss is nan at global step 5 \(epoch 2\)") as info:
        fit(3, tmp_path / "run")
    assert (info.value.step, info.value.epoch) == (5, 2)
    assert "kept as it was" in str(info.value) and info.value.checkpoint.endswith(training.CHECKPOINT_NAME)
    kept = training.load_state(tmp_path / "run" / training.CHECKPOINT_NAME,
                            training.init_state(toy_params(), optax.adam(0.05), jax.random.key(7)))
    assert kept.epoch == 1
    assert_trees_equal(kept.params, good.params)
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 1

    with pytest.raises(training.NonFiniteLossError, match="global step 2 .epoch 1.*No checkpoint had been written"):
        training.fit(objective, optax.adam(0.05), toy_params(), ListBatches([poisoned]), epochs=1,
                  key=jax.random.key(7), progress=False, log=None)


def test_failed_checkpoint_write_keeps_the_previous_one(objective, tmp_path, monkeypatch):
    first = run(objective, tmp_path, epochs=1)
    template = training.init_state(toy_params(), optax.adam(0.05), jax.random.key(7))

    def broken_rename(*args, **kwargs):  # orbax's final rename of the complete temporary directory
        raise OSError("disk full")

    monkeypatch.setattr(os, "rename", broken_rename)
    with pytest.raises(OSError, match="disk full"):
        run(objective, tmp_path, epochs=2, resume=True)
    monkeypatch.undo()
    kept = training.load_state(tmp_path / training.CHECKPOINT_NAME, template)
    assert kept.epoch == 1 and kept.metrics == first.metrics
    assert_trees_equal(kept.params, first.params)
    assert_trees_equal(kept.opt_state, first.opt_state)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint", "metrics.jsonl"]
    assert run(objective, tmp_path, epochs=2, resume=True).epoch == 2
    assert [p.name for p in (tmp_path / training.CHECKPOINT_NAME).iterdir()] == ["2"]  # the leftover is gone


def test_steps_per_dispatch_matches_single_steps(objective, tmp_path):
    # 40 examples, batch 8: 5 steps per epoch, dispatched as 2 + 2 + 1
    single = run(objective, None, epochs=2)
    multi = run(objective, None, epochs=2, steps_per_dispatch=2)
    assert multi.step == single.step == 10
    for a, b in zip(leaves(single.params), leaves(multi.params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose([m["train_loss"] for m in multi.metrics],
                               [m["train_loss"] for m in single.metrics], rtol=1e-5)


def test_fit_keeps_the_callers_params_and_calls_back(objective):
    params = toy_params()
    seen = []
    state = training.fit(objective, optax.sgd(0.1), params, training.EpochBatches(toy_data(), 8, seed=0), epochs=2,
                      key=jax.random.key(0), progress=False, log=seen.append,
                      evaluate=lambda p, key: {"mu0": float(p["mu"][0])},
                      on_epoch_end=lambda s: seen.append(s.epoch))
    assert np.array_equal(np.asarray(params["mu"]), np.zeros(DIM))  # not donated away
    assert seen[1] == 1 and seen[3] == 2 and seen[0].startswith("epoch 1/2  train_loss ")
    assert state.metrics[-1]["mu0"] == pytest.approx(float(state.params["mu"][0]))


def test_evaluate_loss_weights_a_partial_batch(objective):
    params = {"mu": jnp.full(DIM, 2.0), "log_s": jnp.full(DIM, -30.0)}  # z is (nearly) deterministic
    data = toy_data(10)
    mean = training.evaluate_loss(objective, params, data, key=jax.random.key(0), batch_size=4)  # 4 + 4 + 2
    expected = np.mean(np.sum(np.square(data - 2.0), axis=-1))
    assert mean == pytest.approx(expected, rel=1e-5)


def test_make_step_on_a_mesh_is_one_jitted_step_with_explicit_shardings(objective):
    # this process has one device: a one-device mesh, where the sharded step equals the plain one bit
    # for bit (several devices: scg_tests/test_devices.py)
    from scg.training import devices

    mesh = devices.data_mesh()
    optimizer = optax.adam(0.05)
    batch = jnp.asarray(toy_data(8))
    plain = training.make_step(objective, optimizer)
    sharded = training.make_step(objective, optimizer, mesh=mesh)
    fresh = lambda: (toy_params(), optimizer.init(toy_params()), scg.baselines.EmptyState())
    a = plain(*fresh(), jax.random.key(0), jnp.int32(3), batch)
    b = sharded(*devices.put_replicated(fresh(), mesh), devices.put_replicated(jax.random.key(0), mesh),
                np.int32(3), *devices.put_batch([np.asarray(batch)], mesh, 8))
    assert_trees_equal(a, b)
    lowered = sharded.jitted.lower(*devices.put_replicated(fresh(), mesh),
                                   devices.put_replicated(jax.random.key(0), mesh), np.int32(3),
                                   devices.put_batch([np.asarray(batch)], mesh, 8))
    text = lowered.as_text()
    assert "sdy.sharding" in text or "mhlo.sharding" in text  # explicit shardings (Shardy or GSPMD)
    assert "tf.aliasing_output" in text  # the donated params and optimizer state
