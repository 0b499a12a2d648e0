"""Train Certigrad's AEVB (a VAE, 784-1000-1000-30) on MNIST with scg's library pieces.

    python examples/aevb_mnist.py --epochs 3 --data-dir /path/with/mnist

The command `scg aevb` does the same with checkpoints, resuming and plots; this
script shows the parts: the model, `scg.compile` (analytic KL + reparameterized
z, certified), and the generic training loop `scg.training.fit`.
"""

import argparse

import jax
import numpy as np
import optax

import scg
from scg import training
from scg.datasets import load_mnist
from scg.models import aevb


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--data-dir", default=None, help="folder holding mnist/ (default $SCG_DATA_DIR)")
    args = parser.parse_args()

    mnist = load_mnist(args.data_dir)
    init_key, run_key, iwae_key = jax.random.split(jax.random.key(0), 3)
    params = aevb.init_params(init_key)  # Xavier-uniform, no biases

    objective = scg.compile(aevb.aevb)  # passes="auto": integrate_kl, then reparameterize
    for certificate in objective.certificates_for(params, mnist.train_images[:250]):
        print(certificate, "\n")

    def evaluate(params, key):
        return {"test_neg_elbo": training.evaluate_loss(objective, params, mnist.test_images, key=key)}

    state = training.fit(objective, optax.adam(1e-3, b1=0.9, b2=0.999, eps=1e-8), params,
                      training.EpochBatches(mnist.train_images, 250, seed=0), epochs=args.epochs, key=run_key,
                      evaluate=evaluate, train_metric="train_neg_elbo")
    log_px = aevb.iwae_log_likelihood(state.params, mnist.test_images, iwae_key, k=100)
    print(f"test log-likelihood (IWAE, k=100): {np.mean(log_px):.2f} nats")


if __name__ == "__main__":
    main()
