"""Tests of scg.training.checkpoint: bit-exact round trips, template checks, corruption, atomicity."""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from scg.training.checkpoint import FORMAT_VERSION, CheckpointError, atomic_write, load_checkpoint, save_checkpoint


def make_tree(seed: int = 0) -> dict:
    """Params, an optax adam state after one step, keys and metrics: a training-run checkpoint."""
    rng = np.random.default_rng(seed)
    params = {
        "encoder": {"w": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32), "b": jnp.zeros(3, jnp.float32)},
        "decoder": {"w": jnp.asarray(rng.normal(size=(3, 4)), jnp.bfloat16)},
        "count": np.arange(5, dtype=np.int64),
    }
    optimizer = optax.adam(1e-3)
    opt_state = optimizer.init(params)
    grads = jax.tree_util.tree_map(lambda p: (p * 0.5).astype(p.dtype), params)
    _, opt_state = optimizer.update(grads, opt_state, params)
    return {
        "params": params,
        "opt_state": opt_state,
        "key": jax.random.fold_in(jax.random.key(seed), 3),
        "keys": jax.random.split(jax.random.key(seed + 1, impl="rbg"), 2),
        "raw_key": jax.random.PRNGKey(seed),
        "step": 12,
        "nan": np.float32(np.nan),
        "metrics": [
            {"epoch": 1, "seconds": 1.25, "train_neg_elbo": 0.1 + 0.2, "test_neg_elbo": float("inf"), "tag": "a"},
            {"epoch": 2, "seconds": 2.5, "train_neg_elbo": 101.5, "test_neg_elbo": None, "tag": "b"},
        ],
        "config": {"batch": (100, "adam"), "flag": True},
    }


def assert_bitwise_equal(actual, expected) -> None:
    """Same tree structure (types included) and every leaf equal bit for bit."""
    actual_leaves, actual_def = jax.tree_util.tree_flatten_with_path(actual)
    expected_leaves, expected_def = jax.tree_util.tree_flatten_with_path(expected)
    assert actual_def == expected_def
    for (path, a), (_, e) in zip(actual_leaves, expected_leaves):
        where = jax.tree_util.keystr(path)
        assert type(a) is type(e) or (isinstance(a, jax.Array) and isinstance(e, jax.Array)), where
        if isinstance(e, jax.Array) and jax.dtypes.issubdtype(e.dtype, jax.dtypes.prng_key):
            assert jax.random.key_impl(a) == jax.random.key_impl(e), where
            a, e = jax.random.key_data(a), jax.random.key_data(e)
        if isinstance(e, (jax.Array, np.ndarray, np.generic)):
            a, e = np.asarray(a), np.asarray(e)
            assert a.dtype == e.dtype and a.shape == e.shape, where
            assert a.tobytes() == e.tobytes(), where
        elif isinstance(e, float):
            assert repr(a) == repr(e), where
        else:
            assert a == e, where


def test_round_trip_with_template_is_bit_exact_and_restores_types(tmp_path):
    tree = make_tree()
    path = tmp_path / "ckpt.npz"
    save_checkpoint(path, tree)
    restored = load_checkpoint(path, like=make_tree(seed=1))  # same structure, other values
    assert_bitwise_equal(restored, tree)
    assert type(restored["opt_state"][0]) is type(tree["opt_state"][0])  # optax ScaleByAdamState
    assert restored["params"]["decoder"]["w"].dtype == jnp.bfloat16


def test_round_trip_without_template(tmp_path):
    tree = make_tree()
    path = tmp_path / "ckpt.npz"
    save_checkpoint(path, tree)
    restored = load_checkpoint(path)
    adam = restored["opt_state"][0]
    assert type(adam).__name__ == "ScaleByAdamState" and adam._fields == ("count", "mu", "nu")
    assert_bitwise_equal(restored["params"], tree["params"])
    assert_bitwise_equal(restored["metrics"], tree["metrics"])
    assert_bitwise_equal(list(jax.tree_util.tree_leaves(restored["opt_state"])),
                         list(jax.tree_util.tree_leaves(tree["opt_state"])))
    assert_bitwise_equal(restored["key"], tree["key"])
    assert restored["config"] == {"batch": (100, "adam"), "flag": True}
    assert isinstance(restored["nan"], np.float32) and np.isnan(restored["nan"])


def test_template_from_eval_shape(tmp_path):
    params = {"w": jnp.arange(6.0).reshape(2, 3), "key": jax.random.key(0)}
    save_checkpoint(tmp_path / "c.npz", params)
    template = jax.eval_shape(lambda: params)
    assert_bitwise_equal(load_checkpoint(tmp_path / "c.npz", like=template), params)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Linear:
    weight: jax.Array
    bias: jax.Array


def test_custom_pytree_node_needs_template(tmp_path):
    tree = {"layer": Linear(jnp.ones((2, 2)), jnp.zeros(2))}
    save_checkpoint(tmp_path / "c.npz", tree)
    assert_bitwise_equal(load_checkpoint(tmp_path / "c.npz", like=tree), tree)
    with pytest.raises(CheckpointError, match=r"Linear pytree node at 'layer'.*pass like="):
        load_checkpoint(tmp_path / "c.npz")


@pytest.mark.parametrize(
    "change, leaf, detail",
    [
        (lambda t: t["params"]["encoder"].update(w=jnp.zeros((4, 4))), "params/encoder/w", r"shape \(4, 3\)"),
        (lambda t: t["params"]["encoder"].update(b=jnp.zeros(3, jnp.int32)), "params/encoder/b", "dtype float32"),
        (lambda t: t["params"].update(extra=jnp.zeros(1)), "params/extra", r"lacks keys \['extra'\]"),
        (lambda t: t.update(key=jax.random.key(0, impl="rbg")), "key", r"PRNG key \(threefry2x32\)"),
        (lambda t: t.update(step=12.0), "step", "int"),
        (lambda t: t["metrics"].pop(), "metrics", "list of length 2"),
    ],
)
def test_template_mismatch_names_the_leaf(tmp_path, change, leaf, detail):
    path = tmp_path / "ckpt.npz"
    save_checkpoint(path, make_tree())
    template = make_tree()
    change(template)
    with pytest.raises(CheckpointError, match=rf"ckpt\.npz.*does not match the template.*'{leaf}'.*{detail}") as caught:
        load_checkpoint(path, like=template)
    assert caught.value.leaf == leaf
    assert "--out" in str(caught.value)


def test_namedtuple_template_mismatch(tmp_path):
    path = tmp_path / "ckpt.npz"
    params = {"w": jnp.ones(3)}
    save_checkpoint(path, {"opt": optax.adam(1e-3).init(params)})
    other_state = (optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32)), optax.EmptyState())
    with pytest.raises(CheckpointError, match=r"leaf 'opt/0'.*ScaleByAdamState with 3 children.*ScaleByScheduleState"):
        load_checkpoint(path, like={"opt": other_state})


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda b: b[: len(b) // 2], id="truncated"),
        pytest.param(lambda b: b[:200] + bytes([b[200] ^ 0xFF]) + b[201:], id="flipped-byte"),
        pytest.param(lambda b: b"", id="empty"),
        pytest.param(lambda b: b"not a checkpoint at all", id="garbage"),
    ],
)
def test_corrupted_file_is_reported(tmp_path, damage):
    path = tmp_path / "ckpt.npz"
    save_checkpoint(path, {"w": np.arange(200, dtype=np.float64)})
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(CheckpointError, match=r"ckpt\.npz.* is corrupted.*Delete the file.*choose another --out"):
        load_checkpoint(path)


def test_npz_that_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "other.npz"
    np.savez(path, x=np.zeros(2))
    with pytest.raises(CheckpointError, match=r"other\.npz.*not an scg checkpoint.*no '__scg_checkpoint__'"):
        load_checkpoint(path)


def test_newer_format_version_is_refused(tmp_path):
    path = tmp_path / "future.npz"
    header = {"format": "scg.training.checkpoint", "version": FORMAT_VERSION + 1, "tree": {"t": "none"}}
    with open(path, "wb") as f:
        np.savez(f, __scg_checkpoint__=np.frombuffer(json.dumps(header).encode(), np.uint8))
    with pytest.raises(CheckpointError, match=rf"format version {FORMAT_VERSION + 1}.*Upgrade scg"):
        load_checkpoint(path)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no checkpoint at .*absent\.npz"):
        load_checkpoint(tmp_path / "absent.npz")


def test_unsupported_leaf_names_path_and_writes_nothing(tmp_path):
    with pytest.raises(CheckpointError, match=r"cannot save the leaf 'metrics/0/when' of type builtins\.object"):
        save_checkpoint(tmp_path / "c.npz", {"metrics": [{"when": object()}]})
    with pytest.raises(CheckpointError, match=r"dict at 'params'.*key 3 is a int.*string keys"):
        save_checkpoint(tmp_path / "c.npz", {"params": {3: np.zeros(1)}})
    with pytest.raises(CheckpointError, match=r"leaf 'x'.*dtype object"):
        save_checkpoint(tmp_path / "c.npz", {"x": np.array([None, 1], dtype=object)})
    assert os.listdir(tmp_path) == []


def _fail(*args, **kwargs):
    raise OSError("disk full (simulated)")


def _write_half_then_fail(file, *args, **kwargs):
    file.write(b"PK\x03\x04 partial archive")
    raise OSError("disk full (simulated)")


@pytest.mark.parametrize("target, replacement", [("os.replace", _fail), ("np.savez", _write_half_then_fail)])
def test_failed_write_keeps_previous_checkpoint(tmp_path, monkeypatch, target, replacement):
    path = tmp_path / "ckpt.npz"
    good = make_tree()
    save_checkpoint(path, good)
    module, name = target.split(".")
    monkeypatch.setattr({"os": os, "np": np}[module], name, replacement)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, make_tree(seed=5))
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["ckpt.npz"]  # no temporary file left behind
    assert_bitwise_equal(load_checkpoint(path, like=good), good)


def test_overwrite_replaces_and_keeps_mode(tmp_path):
    path = tmp_path / "sub" / "ckpt.npz"
    save_checkpoint(path, {"x": np.zeros(1)})
    os.chmod(path, 0o640)
    save_checkpoint(path, {"x": np.ones(1)})
    assert load_checkpoint(path)["x"].tolist() == [1.0]
    assert os.stat(path).st_mode & 0o777 == 0o640


def test_atomic_write_interrupted_block(tmp_path):
    path = tmp_path / "note.txt"
    path.write_bytes(b"old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_write(path) as f:
            f.write(b"new but incomplete")
            raise KeyboardInterrupt
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["note.txt"]
