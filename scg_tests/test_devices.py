"""Data parallelism (scg.training.devices, fit(mesh=), the CLI's device flags) on forced CPU devices.

Several CPU devices exist only if JAX is told before it starts (``jax_num_cpu_devices``), so each
test runs this file as a script in a subprocess (``python test_devices.py WORKER ...``, see the bottom)
that prints one JSON line; two processes talk over ``jax.distributed`` with gloo CPU collectives on a
free localhost port. The models are tiny (compiles of a few seconds); the machine's two cores are
shared by the forced devices, so nothing here measures speed.
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest

HERE = pathlib.Path(__file__).resolve()
ROOT = HERE.parent.parent
TIMEOUT = 120  # seconds per subprocess; a hung collective fails the test instead of the suite


# --------------------------------------------------------------------------- #
# Running workers.
# --------------------------------------------------------------------------- #


def _env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]), **extra)
    return env


def run_worker(*args: str, timeout: float = TIMEOUT) -> dict:
    """Runs ``python test_devices.py *args``; returns the JSON of its last stdout line."""
    proc = subprocess.run([sys.executable, str(HERE), *map(str, args)], env=_env(), capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)
    assert proc.returncode == 0, f"worker {args} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def run_processes(commands: list[list[str]], timeout: float = TIMEOUT) -> list[subprocess.CompletedProcess]:
    """Starts every command at once (the processes of one distributed run); kills all on a timeout."""
    procs = [subprocess.Popen(c, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
             for c in commands]
    results = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=timeout)
            results.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    except subprocess.TimeoutExpired:
        for proc in procs:
            proc.kill()
        for proc in procs:
            proc.communicate()
        pytest.fail(f"the distributed run did not finish in {timeout} s: {commands}")
    return results


def assert_ok(results: list[subprocess.CompletedProcess]) -> None:
    for r in results:
        assert r.returncode == 0, f"{r.args} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}"


def strip_seconds(records):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in records]


def assert_records_close(a, b, rtol=1e-5):
    a, b = strip_seconds(a), strip_seconds(b)
    assert [sorted(r) for r in a] == [sorted(r) for r in b]
    for ra, rb in zip(a, b):
        for k in ra:
            np.testing.assert_allclose(ra[k], rb[k], rtol=rtol, err_msg=k)


# --------------------------------------------------------------------------- #
# Tests.
# --------------------------------------------------------------------------- #


@pytest.fixture(scope="module")
def four_devices(tmp_path_factory) -> dict:
    """One worker with 4 CPU devices runs both checks below (one start-up and one trace of the model)."""
    return run_worker("four", tmp_path_factory.mktemp("four"))


def test_sharded_gradients_and_samples_equal_the_single_device_ones(four_devices):
    result = four_devices["grads"]
    assert result["devices"] == 4 and result["threefry_partitionable"] is True
    assert result["samples_equal"], "jax.random draws differ under sharding"
    for name, r in result["cases"].items():
        # the same key: the same samples, so the same loss and gradient up to the order of sums
        assert abs(r["loss_1"] - r["loss_4"]) <= 1e-5 * max(1.0, abs(r["loss_1"])), (name, r)
        assert r["max_rel_grad_diff"] < 1e-5, (name, r)
        assert r["batch_sharding"] == "P('data',)" and r["param_sharding"] == "P()", r


def test_fit_on_four_devices_follows_the_one_device_run_and_resumes_on_one_and_two(four_devices):
    result = four_devices["fit"]
    one, four = result["one"], result["four"]
    assert len(one) == len(four) == 2
    assert_records_close(four, one)  # the same trajectory up to the order of floating-point sums
    # the 4-device checkpoint of epoch 1, resumed on 1 and on 2 devices, ends where the straight runs do
    assert_records_close(result["resumed_on_one"], one)
    assert_records_close(result["resumed_on_two"], one)
    assert result["max_param_diff_resumed_on_one"] < 1e-5
    assert result["multi_step"] and result["uneven_error"].startswith(
        "fit: the batch size (14) must be divisible by the number of devices (4)")


def _distributed_fit(tmp_path, *, processes: int, devices: int, out: pathlib.Path) -> list[dict]:
    port = free_port()
    results = run_processes([[sys.executable, str(HERE), "dist", str(port), str(processes), str(i), str(devices),
                              str(out)] for i in range(processes)])
    assert_ok(results)
    return [json.loads(r.stdout.strip().splitlines()[-1]) for r in results]


def test_two_processes_over_jax_distributed_match_one_process(tmp_path):
    # 2 processes x 1 CPU device, gloo collectives: one epoch of a tiny AEVB, then checkpoint
    outputs = _distributed_fit(tmp_path, processes=2, devices=1, out=tmp_path / "dist")
    assert [o["process"] for o in outputs] == [0, 1] and all(o["processes"] == 2 for o in outputs)
    assert outputs[0]["rows"] == [0, 6] and outputs[1]["rows"] == [6, 12]  # each sends only its rows
    # only process 0 wrote metrics; every process took part in the checkpoint
    records = [json.loads(line) for line in (tmp_path / "dist" / "metrics.jsonl").read_text().splitlines()]
    assert strip_seconds(records) == strip_seconds(outputs[0]["metrics"])
    assert_records_close(outputs[1]["metrics"], outputs[0]["metrics"])
    # the single-process run (here, on this process's one device), and the 2-process checkpoint resumed
    straight = _fit(None, epochs=2)
    assert_records_close(outputs[0]["metrics"], straight.metrics[:1])
    assert_records_close(_fit(None, tmp_path / "dist", epochs=2, resume=True).metrics, straight.metrics)


@pytest.mark.slow
def test_two_processes_of_two_devices_and_the_command(tmp_path):
    outputs = _distributed_fit(tmp_path, processes=2, devices=2, out=tmp_path / "dist")
    assert outputs[0]["rows"] == [0, 6] and outputs[1]["rows"] == [6, 12]
    assert_records_close(outputs[0]["metrics"], _fit(None, epochs=1).metrics)

    # the command on 2 processes x 2 devices, resumed on 4 devices in one process
    data = tmp_path / "data"
    run_worker("mnist", data)
    port = free_port()
    common = ["-m", "scg.cli", "aevb", "--data-dir", str(data), "--batch-size", "40", "--hidden", "16",
              "--latent", "3", "--eval-batch-size", "50", "--eval-k", "2", "--no-progress", "--devices", "2"]
    results = run_processes([[sys.executable, *common, "--out", str(tmp_path / "cmd"), "--epochs", "1",
                              "--coordinator", f"localhost:{port}", "--num-processes", "2", "--process-id", str(i)]
                             for i in range(2)])
    assert_ok(results)
    ours = lambda text: [line for line in text.splitlines() if not line.startswith("[Gloo]")]  # gloo's own
    assert "2 processes x 2 cpu devices" in results[0].stdout and ours(results[1].stdout) == []
    final = json.loads((tmp_path / "cmd" / "final.json").read_text())
    assert final["processes"] == 2 and final["devices"] == 4
    proc = subprocess.run([sys.executable, *common[:-2], "--devices", "4", "--out", str(tmp_path / "cmd"),
                           "--epochs", "2", "--resume"], env=_env(), capture_output=True, text=True, timeout=TIMEOUT,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "epoch 2/2" in proc.stdout and json.loads((tmp_path / "cmd" / "final.json").read_text())["epoch"] == 2


def test_command_refuses_a_batch_size_the_devices_do_not_divide(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "scg.cli", "aevb", "--data-dir", str(tmp_path), "--out",
                           str(tmp_path / "out"), "--batch-size", "30", "--devices", "4"],
                          env=_env(), capture_output=True, text=True, timeout=TIMEOUT, cwd=ROOT)
    assert proc.returncode == 1
    assert proc.stderr.strip() == ("scg aevb: error: --batch-size 30 is not divisible by the 4 devices (4 cpu "
                                   "devices): each device takes an equal share of every batch; use a multiple of "
                                   "4, e.g. --batch-size 28")


def test_command_refuses_incomplete_or_conflicting_process_flags(tmp_path, capsys):
    from scg import cli

    base = ["aevb", "--data-dir", str(tmp_path), "--out", str(tmp_path / "out")]
    cases = [(["--coordinator", "localhost:1", "--num-processes", "2"], "needs --coordinator HOST:PORT, "
              "--num-processes N and --process-id I"),
             (["--distributed", "auto", "--process-id", "0"], "--distributed auto reads the cluster's settings; "
              "drop --process-id"),
             (["--coordinator", "localhost:1", "--num-processes", "2", "--process-id", "2"],
              "--process-id must be below --num-processes (2)")]
    for extra, message in cases:
        assert cli.main(base + extra) == 1
        assert message in capsys.readouterr().err
    # no launcher's settings to read: one line, no traceback (in a subprocess: it configures JAX)
    proc = subprocess.run([sys.executable, "-m", "scg.cli", *base, "--distributed", "auto"], env=_env(),
                          capture_output=True, text=True, timeout=TIMEOUT, cwd=ROOT)
    assert proc.returncode == 1 and proc.stderr.strip().splitlines() == [
        "scg aevb: error: cannot read the cluster's settings: coordinator_address should be defined."]


# --------------------------------------------------------------------------- #
# The workers (run as a script: they set up JAX's devices before it starts).
# --------------------------------------------------------------------------- #

N, X_DIM, BATCH = 48, 12, 12  # 4 steps per epoch


def _setup(cpu_devices: int) -> None:
    import jax

    jax.config.update("jax_num_cpu_devices", cpu_devices)
    jax.config.update("jax_numpy_rank_promotion", "raise")


def _tiny():
    import jax

    from scg.models import aevb

    params = aevb.init_params(jax.random.key(0), x_dim=X_DIM, hidden=8, latent=2)
    data = np.random.default_rng(0).uniform(size=(N, X_DIM)).astype(np.float32)
    return params, data


@functools.lru_cache(maxsize=None)
def _objective():
    import scg
    from scg.models import aevb

    return scg.compile(aevb.aevb)  # shared by the runs of a process: one trace


def _fit(mesh, out=None, *, epochs, resume=False, steps_per_dispatch=1, batch=BATCH):
    """A tiny AEVB (12-8-8-2) on 48 random images, batch 12: 4 steps per epoch; evaluates on 24."""
    import jax
    import optax

    from scg import training

    params, data = _tiny()
    objective = _objective()
    evaluate = lambda p, key: {"test": training.evaluate_loss(objective, p, data[:24], key=key, batch_size=24)}
    return training.fit(objective, optax.adam(1e-2), params, training.EpochBatches(data, batch, seed=1),
                        epochs=epochs, key=jax.random.key(2), out_dir=out, resume=resume, progress=False,
                        log=None, evaluate=evaluate, config={"model": "tiny"}, mesh=mesh,
                        steps_per_dispatch=steps_per_dispatch)


def _flat(tree) -> list[float]:
    import jax

    from scg.training import devices

    return [float(v) for leaf in jax.tree_util.tree_leaves(devices.local_copy(tree)) for v in np.ravel(leaf)]


def worker_grads() -> dict:
    _setup(4)
    import jax
    import jax.numpy as jnp

    import scg
    from scg.models import aevb, sbn
    from scg.training import devices

    mesh = devices.data_mesh()
    rep, data = devices.replicated(mesh), devices.batch_sharding(mesh)
    key = jax.random.key(3)
    z1 = jax.random.normal(key, (16, 3))
    z4 = jax.jit(lambda k: jax.random.normal(k, (16, 3)), out_shardings=data)(key)
    cases = {}
    x = np.random.default_rng(0).uniform(size=(16, X_DIM)).astype(np.float32)
    xb = (x > 0.5).astype(np.float32)
    nvil = sbn.nvil_baseline(jax.random.key(4), x_dim=X_DIM, width=4)
    setups = {
        "aevb_auto": (scg.compile(aevb.aevb), aevb.init_params(jax.random.key(0), x_dim=X_DIM, hidden=8, latent=2), x),
        "aevb_naive": (scg.compile(aevb.aevb, passes="none"),
                       aevb.init_params(jax.random.key(0), x_dim=X_DIM, hidden=8, latent=2), x),
        "sbn_nvil": (scg.compile(sbn.sbn, baseline=nvil), sbn.init_params(jax.random.key(1), x_dim=X_DIM, hidden=5),
                     xb),
    }
    for name, (objective, params, batch) in setups.items():
        state = objective.init_baseline_state(params, jnp.asarray(batch))

        def vg(p, b, k, s, objective=objective):
            return objective.value_and_grad_with_state(p, b, key=k, num_samples=2, baseline_state=s)

        l1, g1, s1 = vg(params, jnp.asarray(batch), key, state)
        sharded = jax.jit(vg, in_shardings=(rep, data, rep, rep), out_shardings=rep)
        b4 = devices.put_batch([batch], mesh, batch.shape[0])[0]
        l4, g4, s4 = sharded(devices.put_replicated(params, mesh), b4, devices.put_replicated(key, mesh),
                             devices.put_replicated(state, mesh))
        rel = max(float(jnp.max(jnp.abs(a - np.asarray(b))) / (jnp.max(jnp.abs(a)) + 1e-12))
                  for a, b in zip(jax.tree_util.tree_leaves((g1, s1)), jax.tree_util.tree_leaves((g4, s4))))
        cases[name] = {"loss_1": float(l1), "loss_4": float(l4), "max_rel_grad_diff": rel,
                       "batch_sharding": repr(b4.sharding.spec),
                       "param_sharding": repr(jax.tree_util.tree_leaves(g4)[0].sharding.spec)}
    return {"devices": len(jax.devices()), "threefry_partitionable": bool(jax.config.jax_threefry_partitionable),
            "samples_equal": bool(jnp.all(z1 == z4)), "cases": cases}


def worker_fit(tmp: str) -> dict:
    import jax

    from scg.training import devices

    tmp = pathlib.Path(tmp)
    four, two = devices.data_mesh(), devices.data_mesh(devices=jax.devices()[:2])
    one = _fit(None, epochs=2)
    straight4 = _fit(four, epochs=2)
    _fit(four, tmp / "four", epochs=1)
    resumed1 = _fit(None, tmp / "four", epochs=2, resume=True)
    _fit(four, tmp / "four2", epochs=1)
    resumed2 = _fit(two, tmp / "four2", epochs=2, resume=True)
    multi = _fit(four, epochs=2, steps_per_dispatch=3)  # 4 steps per epoch: 3 + 1
    try:
        _fit(four, epochs=1, batch=BATCH + 2)
        uneven = ""
    except ValueError as err:
        uneven = str(err)
    multi_ok = np.allclose(_flat(multi.params), _flat(straight4.params), rtol=1e-4, atol=1e-6)
    return {"one": list(one.metrics), "four": list(straight4.metrics), "resumed_on_one": list(resumed1.metrics),
            "resumed_on_two": list(resumed2.metrics),
            "max_param_diff_resumed_on_one": float(np.max(np.abs(np.subtract(_flat(one.params),
                                                                              _flat(resumed1.params))))),
            "multi_step": bool(multi_ok), "uneven_error": uneven}


def worker_four(tmp: str) -> dict:
    return {"grads": worker_grads(), "fit": worker_fit(tmp)}


def worker_dist(port: str, processes: str, process_id: str, per_process: str, out: str) -> dict:
    from scg.training import devices

    devices.initialize(coordinator=f"localhost:{port}", num_processes=int(processes), process_id=int(process_id),
                       cpu_devices=int(per_process))
    import jax

    jax.config.update("jax_numpy_rank_promotion", "raise")
    mesh = devices.data_mesh()
    state = _fit(mesh, pathlib.Path(out), epochs=1)
    return {"process": jax.process_index(), "processes": jax.process_count(), "devices": mesh.size,
            "rows": list(devices.batch_rows(mesh, BATCH)), "metrics": list(state.metrics)}


def worker_mnist(root: str) -> dict:
    """Writes a small synthetic MNIST (idx files) under ``root/mnist``."""
    import gzip
    import struct

    folder = pathlib.Path(root) / "mnist"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 200), ("t10k", 100)):
        images = (rng.uniform(size=(n, 28, 28)) * 255).astype(np.uint8)
        labels = rng.integers(0, 10, size=n).astype(np.uint8)
        with gzip.open(folder / f"{prefix}-images-idx3-ubyte.gz", "wb") as f:
            f.write(struct.pack(">IIII", 2051, n, 28, 28) + images.tobytes())
        with gzip.open(folder / f"{prefix}-labels-idx1-ubyte.gz", "wb") as f:
            f.write(struct.pack(">II", 2049, n) + labels.tobytes())
    return {"root": str(root)}


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    name, *rest = sys.argv[1:]
    print(json.dumps(globals()[f"worker_{name}"](*rest)), flush=True)
