"""Tests of scg.training.checkpoint (orbax): bit-exact round trips, template checks, corruption, atomicity."""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

# after a failed orbax restore, tensorstore's callbacks can arrive once orbax's event loop has closed
# ("Event loop is closed", raised in a callback nobody awaits): harmless, and not what these tests check
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

from scg.training.checkpoint import (FORMAT_VERSION, CheckpointError, atomic_write, load_checkpoint, load_metadata,
                                     save_checkpoint)


def make_tree(seed: int = 0, steps: int = 2) -> dict:
    """Params, an optax adam state after ``steps`` steps, and keys: what a training run saves."""
    rng = np.random.default_rng(seed)
    params = {
        "encoder": {"w": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32), "b": jnp.zeros(3, jnp.float32)},
        "decoder": {"w": jnp.asarray(rng.normal(size=(3, 4)), jnp.bfloat16)},
    }
    optimizer = optax.chain(optax.clip(1.0), optax.adam(1e-2))
    opt_state = optimizer.init(params)
    for _ in range(steps):
        grads = jax.tree_util.tree_map(lambda p: (p * 0.5 + 0.25).astype(p.dtype), params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
    return {
        "params": params,
        "opt_state": opt_state,
        "key": jax.random.fold_in(jax.random.key(seed), 3),
        "keys": jax.random.split(jax.random.key(seed + 1, impl="rbg"), 2),
        "raw_key": jax.random.PRNGKey(seed),
        "counts": np.arange(5, dtype=np.int64) + seed,  # numpy, and a dtype JAX (without x64) lacks
        "nothing": None,
    }


def assert_bitwise_equal(actual, expected) -> None:
    """Same tree structure (container types included) and every leaf equal bit for bit."""
    actual_leaves, actual_def = jax.tree_util.tree_flatten_with_path(actual)
    expected_leaves, expected_def = jax.tree_util.tree_flatten_with_path(expected)
    assert actual_def == expected_def
    for (path, a), (_, e) in zip(actual_leaves, expected_leaves):
        where = jax.tree_util.keystr(path)
        assert type(a) is type(e) or (isinstance(a, jax.Array) and isinstance(e, jax.Array)), where
        if jax.dtypes.issubdtype(e.dtype, jax.dtypes.prng_key):
            assert jax.random.key_impl(a) == jax.random.key_impl(e), where
            a, e = jax.random.key_data(a), jax.random.key_data(e)
        a, e = np.asarray(a), np.asarray(e)
        assert a.dtype == e.dtype and a.shape == e.shape, where
        assert a.tobytes() == e.tobytes(), where


def test_round_trip_is_bit_exact_and_restores_the_templates_types(tmp_path):
    tree, template = make_tree(seed=0), make_tree(seed=1, steps=0)
    # the saved state really differs from the template: a load that returned the template would fail
    adam, fresh = tree["opt_state"][1][0], template["opt_state"][1][0]
    assert int(adam.count) == 2 and int(fresh.count) == 0
    assert not np.array_equal(adam.mu["encoder"]["w"], fresh.mu["encoder"]["w"])
    save_checkpoint(tmp_path / "ckpt", tree)
    restored = load_checkpoint(tmp_path / "ckpt", like=template)
    assert_bitwise_equal(restored, tree)
    assert type(restored["opt_state"][1][0]) is optax.ScaleByAdamState
    assert restored["params"]["decoder"]["w"].dtype == jnp.bfloat16
    assert str(jax.random.key_impl(restored["keys"])) == "rbg"
    assert isinstance(restored["counts"], np.ndarray) and restored["counts"].dtype == np.int64
    # the restored state continues exactly as the original
    optimizer = optax.chain(optax.clip(1.0), optax.adam(1e-2))
    grads = jax.tree_util.tree_map(jnp.ones_like, tree["params"])
    assert_bitwise_equal(optimizer.update(grads, restored["opt_state"], restored["params"]),
                         optimizer.update(grads, tree["opt_state"], tree["params"]))


def test_template_from_eval_shape(tmp_path):
    tree = {"w": jnp.arange(6.0).reshape(2, 3), "key": jax.random.key(5), "rbg": jax.random.key(1, impl="rbg")}
    save_checkpoint(tmp_path / "c", tree)
    assert_bitwise_equal(load_checkpoint(tmp_path / "c", like=jax.eval_shape(lambda: tree)), tree)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Linear:
    weight: jax.Array
    bias: jax.Array


def test_custom_pytree_node(tmp_path):
    tree = {"layer": Linear(jnp.ones((2, 2)), jnp.arange(2.0))}
    save_checkpoint(tmp_path / "c", tree)
    restored = load_checkpoint(tmp_path / "c", like={"layer": Linear(jnp.zeros((2, 2)), jnp.zeros(2))})
    assert_bitwise_equal(restored, tree)


def test_metadata_round_trips_exactly(tmp_path):
    metadata = {"epoch": 3, "metrics": [{"loss": 0.1 + 0.2, "best": None, "seconds": 1e-300}],
                "config": {"lr": 1e-3, "name": "ünïcode", "flag": True, "sizes": [1, 2]}}
    save_checkpoint(tmp_path / "c", {"w": jnp.ones(2)}, metadata)
    assert load_metadata(tmp_path / "c") == metadata
    assert repr(load_metadata(tmp_path / "c")["metrics"][0]["loss"]) == repr(0.1 + 0.2)
    save_checkpoint(tmp_path / "empty", {}, {"only": "metadata"})  # no arrays at all
    assert load_checkpoint(tmp_path / "empty", like={}) == {}
    assert load_metadata(tmp_path / "empty") == {"only": "metadata"}


@pytest.mark.parametrize(
    "change, leaf, detail",
    [
        (lambda t: t["params"]["encoder"].update(w=jnp.zeros((4, 4))), "params/encoder/w",
         r"holds an array \(dtype float32, shape \(4, 3\)\), the template an array \(dtype float32, shape \(4, 4\)\)"),
        (lambda t: t["params"]["encoder"].update(b=jnp.zeros(3, jnp.int32)), "params/encoder/b",
         r"dtype float32.*the template an array \(dtype int32"),
        (lambda t: t["params"].update(extra=jnp.zeros(1)), "params/extra", r"holds nothing, the template an array"),
        (lambda t: t["params"].pop("decoder"), "params/decoder/w",
         r"holds an array \(dtype bfloat16.*template nothing"),
        (lambda t: t.update(key=jax.random.key(0, impl="rbg")), "key",
         r"holds a threefry2x32 PRNG key \(data uint32, shape \(2,\)\), the template a rbg PRNG key"),
        (lambda t: t.update(keys=jax.random.split(jax.random.key(0, impl="unsafe_rbg"), 2)), "keys",
         r"rbg PRNG key \(data uint32, shape \(2, 4\)\), the template a unsafe_rbg PRNG key"),
        (lambda t: t.update(raw_key=jax.random.key(0)), "raw_key", r"holds an array.*the template a threefry2x32"),
        (lambda t: t.update(opt_state=optax.adam(1e-2).init(t["params"])), "opt_state/0/count",
         r"holds nothing, the template an array \(dtype int32, shape \(\)\)"),
    ],
)
def test_template_mismatch_names_the_leaf(tmp_path, change, leaf, detail):
    path = tmp_path / "ckpt"
    save_checkpoint(path, make_tree())
    template = make_tree(seed=1)
    change(template)
    with pytest.raises(CheckpointError, match=rf"checkpoint '.*ckpt' does not match the template.*'{leaf}'.*{detail}") \
            as caught:
        load_checkpoint(path, like=template)
    assert caught.value.leaf == leaf and caught.value.path == os.fspath(path)
    assert "--out" in str(caught.value)


def _files(root: pathlib.Path, part: str) -> list[pathlib.Path]:
    return [p for p in sorted(root.rglob("*")) if p.is_file() and part in p.relative_to(root).parts]


def _flip_a_byte(file: pathlib.Path) -> None:
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    file.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda root: [p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2])
                                   for p in _files(root, "arrays")], id="truncated-arrays"),
        pytest.param(lambda root: [p.unlink() for p in _files(root, "d")], id="array-data-deleted"),
        pytest.param(lambda root: _flip_a_byte(max(_files(root, "d"), key=lambda p: p.stat().st_size)),
                     id="flipped-byte-in-data"),
        pytest.param(lambda root: [p.write_text("{not json") for p in _files(root, "scg")], id="garbled-json"),
        pytest.param(lambda root: [p.write_bytes(b"") for p in root.rglob("*") if p.is_file()], id="all-emptied"),
        pytest.param(lambda root: (root / "1").rename(root / "notes"), id="no-complete-save"),
    ],
)
def test_corrupted_checkpoint_is_reported(tmp_path, damage):
    path = tmp_path / "ckpt"
    save_checkpoint(path, {"w": np.arange(2000, dtype=np.float64), "v": jnp.ones(3)})
    damage(path)
    with pytest.raises(CheckpointError, match=r"checkpoint '.*ckpt' is corrupted.*Delete it.*choose another --out") \
            as caught:
        load_checkpoint(path, like={"w": np.zeros(2000), "v": jnp.zeros(3)})
    assert caught.value.path == os.fspath(path)


def test_folder_that_is_not_a_checkpoint_and_newer_versions(tmp_path):
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "readme.txt").write_text("hi")
    with pytest.raises(CheckpointError, match=r"other' is corrupted.*not an scg checkpoint.*no complete save"):
        load_metadata(tmp_path / "other")
    save_checkpoint(tmp_path / "future", {"w": jnp.ones(1)})
    header = tmp_path / "future" / "1" / "scg" / "metadata"
    info = json.loads(header.read_text())
    header.write_text(json.dumps({**info, "version": FORMAT_VERSION + 1}))
    with pytest.raises(CheckpointError, match=rf"future'.*{FORMAT_VERSION + 1}; this scg reads version 2"):
        load_checkpoint(tmp_path / "future", like={"w": jnp.ones(1)})


def test_missing_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no checkpoint at .*absent.*does not exist"):
        load_checkpoint(tmp_path / "absent", like={})


def test_unsupported_leaf_or_metadata_names_the_problem_and_writes_nothing(tmp_path):
    with pytest.raises(CheckpointError, match=r"cannot save the leaf 'metrics/0/when' of type object") as caught:
        save_checkpoint(tmp_path / "c", {"metrics": [{"when": object()}]})
    assert caught.value.leaf == "metrics/0/when"
    with pytest.raises(CheckpointError, match=r"leaf 'step' of type int.*pass other values as metadata"):
        save_checkpoint(tmp_path / "c", {"step": 12})
    with pytest.raises(TypeError, match="not JSON serializable"):
        save_checkpoint(tmp_path / "c", {"w": jnp.ones(1)}, {"when": object()})
    assert os.listdir(tmp_path) == []


def test_each_save_replaces_the_previous_one(tmp_path):
    path = tmp_path / "ckpt"
    for seed in range(3):
        save_checkpoint(path, make_tree(seed), {"seed": seed})
    assert os.listdir(path) == ["3"]  # one complete save; the older ones are removed
    assert_bitwise_equal(load_checkpoint(path, like=make_tree(seed=5)), make_tree(seed=2))
    assert load_metadata(path) == {"seed": 2}


def test_interrupted_save_keeps_the_previous_checkpoint_and_is_cleaned_up(tmp_path, monkeypatch):
    path = tmp_path / "ckpt"
    good = make_tree()
    save_checkpoint(path, good, {"n": 1})

    def interrupted(*args, **kwargs):  # orbax's final rename of the complete temporary directory
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(os, "rename", interrupted)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, make_tree(seed=5), {"n": 2})
    monkeypatch.undo()
    assert sorted(os.listdir(path)) == ["1", "2.orbax-checkpoint-tmp"]  # orbax's leftover
    (path / "7.orbax-checkpoint-tmp-1234").mkdir()  # another one, as other orbax versions name them
    assert_bitwise_equal(load_checkpoint(path, like=make_tree(seed=3)), good)
    assert load_metadata(path) == {"n": 1}
    save_checkpoint(path, make_tree(seed=6), {"n": 3})
    assert os.listdir(path) == ["2"]  # leftovers removed
    assert_bitwise_equal(load_checkpoint(path, like=good), make_tree(seed=6))


def test_atomic_write_replaces_or_keeps(tmp_path):
    path = tmp_path / "note.txt"
    path.write_bytes(b"old")
    os.chmod(path, 0o640)
    with pytest.raises(KeyboardInterrupt):
        with atomic_write(path) as f:
            f.write(b"new but incomplete")
            raise KeyboardInterrupt
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["note.txt"]
    with atomic_write(path) as f:
        f.write(b"new")
    assert path.read_bytes() == b"new" and os.stat(path).st_mode & 0o777 == 0o640
    with atomic_write(tmp_path / "sub" / "x.json") as f:
        f.write(b"{}")
    assert (tmp_path / "sub" / "x.json").read_bytes() == b"{}"
