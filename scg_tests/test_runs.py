"""Run folders are never destroyed by a typo (issue 11): refusals without --resume/--overwrite, leftovers
cleaned at the start, no stale final.json, OSErrors in one line, settings named on a refused resume,
and the NaN guard naming the site whose distribution parameters became invalid."""

from __future__ import annotations

import errno
import json
import os
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import optax
import pytest

import scg
from scg import cli, training

sys.path.insert(0, os.path.dirname(__file__))
from test_aevb import write_synthetic_mnist  # noqa: E402


@scg.model
def toy(params, x):
    z = scg.sample("z", dist.Normal(params["mu"], jnp.exp(params["log_s"])))
    scg.cost("fit", jnp.mean(jnp.sum(jnp.square(x - z[None, :]), axis=-1)))


def toy_params():
    return {"mu": jnp.zeros(3), "log_s": jnp.zeros(3)}


DATA = np.random.default_rng(0).normal(2.0, 0.5, size=(24, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def objective():
    return scg.compile(toy)


def run(objective, out, *, epochs=1, **kwargs):
    return training.fit(objective, optax.adam(0.05), toy_params(), training.EpochBatches(DATA, 8, seed=0),
                        epochs=epochs, key=jax.random.key(0), out_dir=out, progress=False, log=None, **kwargs)


def listing(folder: pathlib.Path) -> dict:
    return {os.fspath(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------- #
# fit
# --------------------------------------------------------------------------- #


def test_fit_refuses_a_folder_holding_a_run_unless_resume_or_overwrite(objective, tmp_path):
    first = run(objective, tmp_path)
    before = listing(tmp_path)
    with pytest.raises(training.RunExistsError, match=r"already holds a run \(checkpoint, metrics.jsonl\): pass "
                                                      r"resume=True to continue it, or overwrite=True") as info:
        run(objective, tmp_path, epochs=2)
    assert info.value.found == ("checkpoint", "metrics.jsonl") and isinstance(info.value, FileExistsError)
    assert listing(tmp_path) == before  # untouched
    (tmp_path / training.FINAL_NAME).write_text('{"epoch": 1}')
    with pytest.raises(training.RunExistsError, match=r"\(checkpoint, metrics.jsonl, final.json\)"):
        run(objective, tmp_path)
    with pytest.raises(ValueError, match="resume=True continues .* overwrite=True deletes it; pass one"):
        run(objective, tmp_path, resume=True, overwrite=True)

    # overwrite: a new run from scratch, nothing of the old one left
    again = run(objective, tmp_path, epochs=2, overwrite=True)
    assert again.metrics[0]["train_loss"] == first.metrics[0]["train_loss"]  # the same seed, from scratch
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint", "metrics.jsonl"]
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2
    # a folder with other files only (plots, notes) is not a run
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    run(objective, other)
    assert (other / "notes.txt").read_text() == "mine"
    # a file where the folder should be
    with pytest.raises(NotADirectoryError, match="is a file, not a folder"):
        run(objective, tmp_path / "metrics.jsonl")


def test_leftovers_are_removed_at_the_start_and_final_json_is_never_stale(objective, tmp_path):
    run(objective, tmp_path)
    (tmp_path / "checkpoint" / "2.orbax-checkpoint-tmp-1234").mkdir()
    (tmp_path / "checkpoint" / "2.orbax-checkpoint-tmp-1234" / "junk").write_bytes(b"x" * 10)
    (tmp_path / ".metrics.abc123.jsonl.tmp").write_text("half a line")
    (tmp_path / ".final.xyz.json.tmp").write_text("{")
    (tmp_path / training.FINAL_NAME).write_text(json.dumps({"epoch": 1}))
    # nothing to train: the results of epoch 1 stay valid, the leftovers go
    run(objective, tmp_path, resume=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint", "final.json", "metrics.jsonl"]
    assert [p.name for p in (tmp_path / "checkpoint").iterdir()] == ["1"]
    # training on: final.json (of epoch 1) is removed before epoch 2 starts, not after
    seen = []
    run(objective, tmp_path, epochs=2, resume=True,
        on_epoch_end=lambda state: seen.append((state.epoch, (tmp_path / training.FINAL_NAME).exists())))
    assert seen == [(2, False)]


def test_overwrite_of_a_crashed_run_leaves_nothing_stale(objective, tmp_path):
    run(objective, tmp_path, epochs=2)
    (tmp_path / training.FINAL_NAME).write_text(json.dumps({"epoch": 2}))
    poisoned = DATA.copy()
    poisoned[:] = np.nan
    with pytest.raises(training.NonFiniteLossError):
        training.fit(objective, optax.adam(0.05), toy_params(), training.EpochBatches(poisoned, 8, seed=0), epochs=1,
                     key=jax.random.key(0), out_dir=tmp_path, overwrite=True, progress=False, log=None)
    # the old run is gone (overwrite), and no final.json claims results
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]
    assert (tmp_path / "metrics.jsonl").read_text() == ""


@scg.model
def positive_scale(params, x):
    """``scale`` is a raw parameter: a large step makes it negative, an invalid Normal."""
    z = scg.sample("noise", dist.Normal(params["mu"], params["scale"]))
    scg.cost("fit", jnp.mean(jnp.square(x - z)) + 10.0 * jnp.sum(params["scale"]))


def test_nan_guard_names_the_site_whose_parameters_became_invalid(tmp_path):
    objective = scg.compile(positive_scale)
    params = {"mu": jnp.zeros(()), "scale": jnp.ones(())}
    data = np.zeros((16,), np.float32)
    with pytest.raises(training.NonFiniteLossError, match=r"loss is nan at global step 2 \(epoch 1\)\. Replaying "
                                                          r"the step: invalid distribution parameters: site 'noise': "
                                                          r"parameter 'scale' of Normal") as info:
        training.fit(objective, optax.sgd(1.0), params, training.EpochBatches(data, 4, seed=0), epochs=1,
                     key=jax.random.key(0), out_dir=tmp_path, progress=False, log=None)
    assert info.value.site == "noise" and (info.value.step, info.value.epoch) == (2, 1)
    assert "No checkpoint had been written yet" in str(info.value)
    # non-finite parameters are named by leaf
    with pytest.raises(training.NonFiniteLossError, match=r"the parameter \['scale'\] was already NaN"):
        training.fit(objective, optax.sgd(1.0), {"mu": jnp.zeros(()), "scale": jnp.array(jnp.nan)},
                     training.EpochBatches(data, 4, seed=0), epochs=1, key=jax.random.key(0), progress=False,
                     log=None)


# --------------------------------------------------------------------------- #
# The command
# --------------------------------------------------------------------------- #


def cli_args(data_dir, out, *extra):
    return ["aevb", "--data-dir", str(data_dir), "--out", str(out), "--batch-size", "50", "--hidden", "16",
            "--latent", "3", "--eval-batch-size", "50", "--eval-k", "0", "--no-progress", *extra]


@pytest.fixture(scope="module")
def mnist(tmp_path_factory):
    return write_synthetic_mnist(tmp_path_factory.mktemp("data"), n_train=100, n_test=50)


def error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err  # one line, no traceback
    return err[0]


def test_command_refuses_an_out_holding_a_run_and_overwrite_starts_afresh(mnist, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(cli_args(mnist, out, "--epochs", "1")) == 0
    capsys.readouterr()
    before = listing(out)
    assert cli.main(cli_args(mnist, out, "--epochs", "2")) == 1
    assert error_line(capsys) == (f"scg aevb: error: --out {out} already holds a run (checkpoint, metrics.jsonl, "
                                  "final.json): add --resume to continue it, or --overwrite to delete it and start "
                                  "afresh (or choose another --out)")
    assert listing(out) == before
    assert cli.main(cli_args(mnist, out, "--resume", "--overwrite")) == 1
    assert "pass one of them" in error_line(capsys)

    assert cli.main(cli_args(mnist, out, "--epochs", "1", "--overwrite", "--seed", "3")) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 1 and json.loads((out / "final.json").read_text())["epoch"] == 1
    # a different architecture on resume: the setting and the flag that resumes it
    assert cli.main(cli_args(mnist, out, "--epochs", "2", "--seed", "3", "--hidden", "20", "--resume")) == 1
    line = error_line(capsys)
    assert "hidden: checkpoint 16 vs now 20" in line and "resume it with --hidden 16" in line, line
    assert "Delete" not in line
    # resumed properly: final.json rewritten for epoch 2
    capsys.readouterr()
    assert cli.main(cli_args(mnist, out, "--epochs", "2", "--seed", "3", "--resume")) == 0
    assert json.loads((out / "final.json").read_text())["epoch"] == 2


def test_command_reports_oserrors_at_out_in_one_line(mnist, tmp_path, capsys, monkeypatch):
    file = tmp_path / "a_file"
    file.write_text("not a folder")
    assert cli.main(cli_args(mnist, file, "--epochs", "1")) == 1
    assert error_line(capsys) == f"scg aevb: error: --out {file} is a file, not a folder; choose another --out"
    assert cli.main(cli_args(mnist, file / "below", "--epochs", "1")) == 1
    assert error_line(capsys).startswith("scg aevb: error: ")

    # a read-only folder and a full disk (simulated: the tests may run as root, who may write anywhere)
    import tempfile

    for code, why in ((errno.EACCES, "Permission denied"), (errno.ENOSPC, "No space left on device")):
        def refuse(*args, dir=None, **kwargs):
            raise OSError(code, why, os.path.join(dir or ".", "tmpfile"))

        monkeypatch.setattr(tempfile, "mkstemp", refuse)
        out = tmp_path / f"out{code}"
        assert cli.main(cli_args(mnist, out, "--epochs", "1")) == 1
        assert error_line(capsys) == (f"scg aevb: error: {why}: {out / 'tmpfile'}; --out {out} must be a writable "
                                      "folder with free space")
        monkeypatch.undo()

    # the checkpoint's write fails (tensorstore reports a full disk as ValueError): one line, the run's
    # earlier checkpoint kept
    out = tmp_path / "full"
    assert cli.main(cli_args(mnist, out, "--epochs", "1")) == 0
    capsys.readouterr()
    import orbax.checkpoint as ocp

    def full(self, *args, **kwargs):
        raise ValueError("Error writing local file \"/x/y\": [OS error: No space left on device]\nmore detail")

    monkeypatch.setattr(ocp.Checkpointer, "save", full)
    assert cli.main(cli_args(mnist, out, "--epochs", "2", "--resume")) == 1
    line = error_line(capsys)
    assert "cannot write the checkpoint" in line and "No space left on device" in line
    assert "the previous save is kept" in line
    monkeypatch.undo()
    from scg.training.checkpoint import load_metadata

    assert load_metadata(out / "checkpoint")["epoch"] == 1
    assert [p.name for p in (out / "checkpoint").iterdir()] == ["1"]


def test_a_relative_out_dir_saves_and_resumes(objective, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # orbax wants absolute paths; the loop makes them so
    run(objective, "relative/run")
    assert run(objective, "relative/run", epochs=2, resume=True).epoch == 2
    assert [p.name for p in (tmp_path / "relative" / "run" / "checkpoint").iterdir()] == ["2"]
