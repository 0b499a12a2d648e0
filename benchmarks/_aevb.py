"""Certigrad's AEVB (x -> h -> h -> z -> h -> h -> x) in five systems, each run as a worker process.

The math, identical in every system (data in rows, no biases, as Certigrad)::

    h = softplus(softplus(x W_enc0) W_enc1);  mu = h W_mu;  logvar = h W_logvar;  sigma = exp(logvar / 2)
    z = mu + sigma * eps,  eps ~ N(0, I)                    (reparameterized)
    kl  = sum(mu^2 + sigma^2 - 1 - logvar) / (2 B)          (analytic KL(q || N(0, I)))
    l   = softplus(softplus(z W_dec0) W_dec1) W_out         (Bernoulli logits)
    nll = sum(softplus(l) - x l) / B                        (Bernoulli -log p(x | z), x in [0, 1])
    loss = kl + nll                                         (negative ELBO per example)

followed by one Adam step (learning rate 1e-3, betas 0.9/0.999, eps 1e-8).

Systems (``--worker NAME``):

* ``scg``: the naive model :func:`scg.models.aevb.aevb` (sampled KL, ``z`` an
  ordinary site) compiled with ``passes="auto"`` (which certifies and applies
  ``integrate_kl`` and ``reparameterize``), stepped by :func:`scg.training.make_step`;
* ``jax``: the math above hand-written in jitted JAX + optax (the reference);
* ``tensorflow`` / ``tensorflow_xla``: TF2 ``tf.function`` (``jit_compile=False`` /
  ``True``) with Keras' Adam (which adds eps to ``sqrt(v)`` of the bias-corrected
  step, an immaterial difference at eps = 1e-8);
* ``numpyro`` / ``numpyro_meanfield``: model + guide under NumPyro's ``SVI`` with
  optax's Adam and ``Trace_ELBO`` (KL *sampled*, as NumPyro users get by
  default) / ``TraceMeanField_ELBO`` (KL analytic), each site scaled by 1/B so
  the loss is the per-example negative ELBO. The Bernoulli likelihood is built
  with ``validate_args=False``: NumPyro's default support check would score the
  fractional MNIST intensities as impossible (-inf).

All start from the same weights (an ``.npz`` written once with numpy:
Xavier-uniform from a seed) and see the same batches in the same order.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from typing import Any, Callable

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _harness  # noqa: E402

SYSTEMS = ("scg", "jax", "tensorflow", "tensorflow_xla", "numpyro", "numpyro_meanfield")
LAYERS = ("enc0", "enc1", "mu", "logvar", "dec0", "dec1", "out")
LR, B1, B2, EPS = 1e-3, 0.9, 0.999, 1e-8


# --------------------------------------------------------------------------- #
# Shared inputs: weights, batches, FLOP count.
# --------------------------------------------------------------------------- #


def layer_shapes(x_dim: int = 784, hidden: int = 1000, latent: int = 30) -> dict:
    return {"enc0": (x_dim, hidden), "enc1": (hidden, hidden), "mu": (hidden, latent), "logvar": (hidden, latent),
            "dec0": (latent, hidden), "dec1": (hidden, hidden), "out": (hidden, x_dim)}


def xavier_init(seed: int, x_dim: int = 784, hidden: int = 1000, latent: int = 30) -> dict:
    """Glorot/Xavier-uniform weights, ``U(±sqrt(6 / (fan_in + fan_out)))``, float32, from numpy."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, (n_in, n_out) in layer_shapes(x_dim, hidden, latent).items():
        limit = math.sqrt(6.0 / (n_in + n_out))
        out[name] = rng.uniform(-limit, limit, size=(n_in, n_out)).astype(np.float32)
    return out


def step_flops(batch: int, x_dim: int = 784, hidden: int = 1000, latent: int = 30) -> dict:
    """FLOPs of the matmuls of one training step (2 per multiply-add).

    Forward: every layer's ``B x n_in x n_out`` product. Backward: every
    layer's weight gradient (same size), and the gradient with respect to every
    layer's *input* except the first layer's (that input is the data ``x``).
    """
    sizes = [a * b for a, b in layer_shapes(x_dim, hidden, latent).values()]
    forward = 2 * batch * sum(sizes)
    weight_grads = forward
    input_grads = 2 * batch * (sum(sizes) - x_dim * hidden)
    return {"forward": forward, "weight_grads": weight_grads, "input_grads": input_grads,
            "total": forward + weight_grads + input_grads,
            "total_if_dx_computed": forward + weight_grads + input_grads + 2 * batch * x_dim * hidden}


def default_data_dir() -> str | None:
    """``$SCG_DATA_DIR``, else the project's ``shared/data`` beside the repository if it holds ``mnist/``."""
    if os.environ.get("SCG_DATA_DIR"):
        return os.environ["SCG_DATA_DIR"]
    shared = os.path.join(os.path.dirname(_harness.REPO_ROOT), "shared", "data")
    return shared if os.path.isdir(os.path.join(shared, "mnist")) else None


def load_images(data_dir: str | None, *, synthetic_n: int = 60_000, seed: int = 0) -> tuple[np.ndarray, np.ndarray, str]:
    """``(train, test, description)``: MNIST from ``data_dir`` (default :func:`default_data_dir`), else synthetic.

    Never downloads: without the files the benchmark runs on uniform-random
    images and says so.
    """
    from scg.datasets import load_mnist
    from scg.datasets.errors import DataError

    data_dir = data_dir or default_data_dir()
    if data_dir:
        try:
            m = load_mnist(data_dir, download=False)
            return (np.asarray(m.train_images, np.float32), np.asarray(m.test_images, np.float32),
                    f"MNIST from {os.path.join(data_dir, 'mnist')} (60,000 train images, pixel intensities in [0, 1])")
        except (DataError, OSError) as err:
            reason = str(err).splitlines()[0]
        else:  # pragma: no cover
            reason = ""
    else:
        reason = "no --data-dir, SCG_DATA_DIR unset and no shared/data/mnist beside the repository"
    rng = np.random.default_rng(seed)
    train = rng.random((synthetic_n, 784), dtype=np.float32)
    test = rng.random((10_000, 784), dtype=np.float32)
    return train, test, f"SYNTHETIC uniform-random images ({reason})"


def write_inputs(folder: str, images: np.ndarray, *, batch: int, n_batches: int, hidden: int = 1000,
                 latent: int = 30, seed: int = 0, shuffle: bool = True) -> tuple[str, str]:
    """Writes ``init.npz`` (weights) and ``batches.npz`` (``(n_batches, batch, 784)``) into ``folder``."""
    os.makedirs(folder, exist_ok=True)
    init_path = os.path.join(folder, f"init_h{hidden}_l{latent}_s{seed}.npz")
    if not os.path.exists(init_path):
        np.savez(init_path, **xavier_init(seed, images.shape[1], hidden, latent))
    n = batch * n_batches
    order = np.random.default_rng(seed).permutation(images.shape[0]) if shuffle else np.arange(images.shape[0])
    idx = np.resize(order, n)  # repeats the permutation when more examples are asked for than exist
    batches_path = os.path.join(folder, f"batches_b{batch}_n{n_batches}_s{seed}.npz")
    if not os.path.exists(batches_path):
        np.savez(batches_path, x=images[idx].reshape(n_batches, batch, images.shape[1]))
    return init_path, batches_path


# --------------------------------------------------------------------------- #
# The systems. Each builder returns (step(i) -> loss, final_params() -> {name: ndarray}, extra info).
# --------------------------------------------------------------------------- #


def _jax_loss(params: dict, x, key):
    """The hand-written negative ELBO (analytic KL, one reparameterized sample); also the common evaluator."""
    import jax
    import jax.numpy as jnp

    b = x.shape[0]
    sp = jax.nn.softplus
    h = sp(sp(x @ params["enc0"]) @ params["enc1"])
    mu, logvar = h @ params["mu"], h @ params["logvar"]
    sigma = jnp.exp(0.5 * logvar)
    z = mu + sigma * jax.random.normal(key, mu.shape, mu.dtype)
    kl = 0.5 * jnp.sum(jnp.square(mu) + jnp.square(sigma) - 1.0 - logvar) / b
    logits = sp(sp(z @ params["dec0"]) @ params["dec1"]) @ params["out"]
    nll = jnp.sum(sp(logits) - x * logits) / b
    return kl + nll


def jax_step() -> tuple[Callable, Callable]:
    """The hand-written jitted step and ``init_state(weights) -> (params, opt_state)``."""
    import jax
    import jax.numpy as jnp
    import optax

    optimizer = optax.adam(LR, b1=B1, b2=B2, eps=EPS)

    def train_step(params, opt_state, train_key, step, x):
        key = jax.random.fold_in(train_key, step)
        loss, grads = jax.value_and_grad(_jax_loss)(params, x, key)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    def init_state(weights: dict) -> tuple:
        params = {k: jnp.asarray(v) for k, v in weights.items()}
        return params, optimizer.init(params)

    return jax.jit(train_step, donate_argnums=(0, 1)), init_state


def scg_params(weights: dict) -> dict:
    """The common weights in :func:`scg.models.aevb.init_params`' layout."""
    import jax.numpy as jnp

    w = {k: jnp.asarray(v) for k, v in weights.items()}
    return {"encoder": [{"w": w["enc0"]}, {"w": w["enc1"]}], "mu": {"w": w["mu"]}, "logvar": {"w": w["logvar"]},
            "decoder": [{"w": w["dec0"]}, {"w": w["dec1"]}], "out": {"w": w["out"]}}


def scg_weights(params: dict) -> dict:
    """The inverse of :func:`scg_params`, as numpy arrays."""
    p = params
    return {k: np.asarray(v) for k, v in {
        "enc0": p["encoder"][0]["w"], "enc1": p["encoder"][1]["w"], "mu": p["mu"]["w"], "logvar": p["logvar"]["w"],
        "dec0": p["decoder"][0]["w"], "dec1": p["decoder"][1]["w"], "out": p["out"]["w"]}.items()}


def scg_step(passes: Any = "auto") -> tuple[Any, Callable, Any]:
    """``(objective, step, optimizer)``: the naive model compiled with ``passes``, stepped by scg.training."""
    import optax

    import scg
    import scg.training
    from scg.models import aevb

    objective = scg.compile(aevb.aevb, passes=passes)
    optimizer = optax.adam(LR, b1=B1, b2=B2, eps=EPS)
    return objective, scg.training.make_step(objective, optimizer), optimizer


def build_jax(init: dict, xs: np.ndarray, seed: int) -> tuple:
    import jax
    import jax.numpy as jnp

    step_fn, init_state = jax_step()
    state = dict(zip(("params", "opt"), init_state(init)))
    batches = [jnp.asarray(x) for x in xs]
    key = jax.random.key(seed)

    def step(i: int) -> float:
        state["params"], state["opt"], loss = step_fn(state["params"], state["opt"], key, i, batches[i % len(batches)])
        return float(loss)

    return step, lambda: {k: np.asarray(v) for k, v in state["params"].items()}, {}


def build_scg(init: dict, xs: np.ndarray, seed: int) -> tuple:
    import jax
    import jax.numpy as jnp

    from scg.estimators import score_sites

    params = scg_params(init)
    batches = [jnp.asarray(x) for x in xs]
    objective, step_fn, optimizer = scg_step("auto")
    t0 = time.perf_counter()
    graph, certificates = objective.graph_and_certificates(params, batches[0])  # trace + passes (cached)
    trace_passes_s = time.perf_counter() - t0
    state = {"params": params, "opt": optimizer.init(params),
             "baseline": objective.init_baseline_state(params, batches[0])}  # EmptyState(): auto leaves no score
    key = jax.random.key(seed)

    def step(i: int) -> float:
        state["params"], state["opt"], state["baseline"], loss = step_fn(
            state["params"], state["opt"], state["baseline"], key, i, batches[i % len(batches)])
        return float(loss)

    extra = {"trace_passes_s": trace_passes_s,
             "rewrites": {c.pass_name: list(c.rewritten) for c in certificates},
             "score_function_sites": [s.name for s in score_sites(graph)]}
    return step, lambda: scg_weights(state["params"]), extra


def build_tensorflow(init: dict, xs: np.ndarray, seed: int, *, xla: bool) -> tuple:
    _harness.quiet_tensorflow_env()
    import tensorflow as tf

    variables = {k: tf.Variable(v, name=k) for k, v in init.items()}
    var_list = [variables[k] for k in LAYERS]
    optimizer = tf.keras.optimizers.Adam(learning_rate=LR, beta_1=B1, beta_2=B2, epsilon=EPS)
    optimizer.build(var_list)
    sp = tf.math.softplus

    def loss_fn(x, seed_pair):
        b = tf.cast(tf.shape(x)[0], tf.float32)
        h = sp(sp(x @ variables["enc0"]) @ variables["enc1"])
        mu, logvar = h @ variables["mu"], h @ variables["logvar"]
        sigma = tf.exp(0.5 * logvar)
        z = mu + sigma * tf.random.stateless_normal(tf.shape(mu), seed=seed_pair, dtype=tf.float32)
        kl = 0.5 * tf.reduce_sum(tf.square(mu) + tf.square(sigma) - 1.0 - logvar) / b
        logits = sp(sp(z @ variables["dec0"]) @ variables["dec1"]) @ variables["out"]
        nll = tf.reduce_sum(sp(logits) - x * logits) / b
        return kl + nll

    @tf.function(jit_compile=xla)
    def train_step(x, seed_pair):
        with tf.GradientTape() as tape:
            loss = loss_fn(x, seed_pair)
        grads = tape.gradient(loss, var_list)
        optimizer.apply_gradients(zip(grads, var_list))
        return loss

    batches = [tf.constant(x) for x in xs]

    def step(i: int) -> float:
        return float(train_step(batches[i % len(batches)], tf.constant([seed, i], tf.int64)).numpy())

    extra = {"tf_threads": {"intra_op": tf.config.threading.get_intra_op_parallelism_threads(),
                            "inter_op": tf.config.threading.get_inter_op_parallelism_threads()}}
    return step, lambda: {k: v.numpy() for k, v in variables.items()}, extra


def build_numpyro(init: dict, xs: np.ndarray, seed: int, *, mean_field: bool) -> tuple:
    import jax
    import jax.numpy as jnp
    import numpyro
    import numpyro.distributions as dist
    import optax
    from numpyro.infer import SVI, Trace_ELBO, TraceMeanField_ELBO

    sp = jax.nn.softplus

    def model(x):
        b, latent = x.shape[0], init["mu"].shape[1]
        w = {k: numpyro.param(k, jnp.asarray(init[k])) for k in ("dec0", "dec1", "out")}
        with numpyro.plate("data", b), numpyro.handlers.scale(scale=1.0 / b):
            z = numpyro.sample("z", dist.Normal(jnp.zeros(latent), 1.0).to_event(1))
            logits = sp(sp(z @ w["dec0"]) @ w["dec1"]) @ w["out"]
            # the intensities are not binary: switch off NumPyro's support check (on by default,
            # it turns log p of a fractional x into -inf); the log density is then the same
            # softplus(l) - x l as in the other systems
            likelihood = dist.Bernoulli(logits=logits, validate_args=False).to_event(1)
            numpyro.sample("x", likelihood, obs=x)

    def guide(x):
        b = x.shape[0]
        w = {k: numpyro.param(k, jnp.asarray(init[k])) for k in ("enc0", "enc1", "mu", "logvar")}
        h = sp(sp(x @ w["enc0"]) @ w["enc1"])
        mu, logvar = h @ w["mu"], h @ w["logvar"]
        with numpyro.plate("data", b), numpyro.handlers.scale(scale=1.0 / b):
            numpyro.sample("z", dist.Normal(mu, jnp.exp(0.5 * logvar)).to_event(1))

    elbo = TraceMeanField_ELBO() if mean_field else Trace_ELBO()
    svi = SVI(model, guide, optax.adam(LR, b1=B1, b2=B2, eps=EPS), elbo)
    batches = [jnp.asarray(x) for x in xs]
    update = jax.jit(svi.update)
    state = {"svi": svi.init(jax.random.key(seed), batches[0])}

    def step(i: int) -> float:
        state["svi"], loss = update(state["svi"], batches[i % len(batches)])
        return float(loss)

    return step, lambda: {k: np.asarray(v) for k, v in svi.get_params(state["svi"]).items()}, \
        {"elbo": type(elbo).__name__}


BUILDERS: dict[str, Callable[..., tuple]] = {
    "scg": build_scg,
    "jax": build_jax,
    "tensorflow": lambda *a: build_tensorflow(*a, xla=False),
    "tensorflow_xla": lambda *a: build_tensorflow(*a, xla=True),
    "numpyro": lambda *a: build_numpyro(*a, mean_field=False),
    "numpyro_meanfield": lambda *a: build_numpyro(*a, mean_field=True),
}


def tensorflow_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorflow") is not None


def worker_args(init_path: str, batches_path: str, *, warmup: int, steps: int, seed: int = 0,
                save_params: str | None = None, record_times: bool = False) -> list[str]:
    """The command-line arguments of a worker run (see :func:`run_aevb`)."""
    args = ["--init", init_path, "--batches", batches_path, "--warmup", warmup, "--steps", steps, "--seed", seed]
    if save_params:
        args += ["--save-params", save_params]
    if record_times:
        args += ["--record-times"]
    return [str(a) for a in args]


def run_aevb(system: str, args: list[str], *, timeout: float = 900.0) -> dict:
    """Runs one AEVB worker process (reports TensorFlow as skipped when it is not installed)."""
    if system.startswith("tensorflow") and not tensorflow_available():
        return {"skipped": f"TensorFlow is not installed; install it with: {_harness.TF_INSTALL}"}
    return _harness.run_worker("_aevb.py", system, args, timeout=timeout)


def worker_main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="One AEVB benchmark worker (started by the drivers).")
    p.add_argument("--worker", choices=SYSTEMS, required=True)
    p.add_argument("--init", required=True)
    p.add_argument("--batches", required=True)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-params")
    p.add_argument("--record-times", action="store_true", help="return every step's wall time")
    a = p.parse_args(argv)
    with np.load(a.init) as f:
        init = {k: f[k] for k in LAYERS}
    with np.load(a.batches) as f:
        xs = f["x"]
    t0 = time.perf_counter()
    step, final_params, extra = BUILDERS[a.worker](init, xs, a.seed)
    build_s = time.perf_counter() - t0
    times = _harness.time_steps(step, warmup=a.warmup, steps=a.steps)
    result = {"system": a.worker, "batch": int(xs.shape[1]), "hidden": int(init["enc1"].shape[0]),
              "build_s": build_s, **times.summary(), **extra}
    if "trace_passes_s" in result:  # scg: the trace and passes ran in build; count them in the compile time
        result["compile_s"] += result["trace_passes_s"]
    if a.record_times:
        result["step_s"] = times.step_s
    if a.save_params:
        np.savez(a.save_params, **final_params())
    _harness.emit(result)


if __name__ == "__main__":
    worker_main()
