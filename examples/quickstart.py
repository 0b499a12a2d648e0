"""A first scg session: a model with a discrete and a continuous latent, its IR, the
certified passes, the compiled gradient, and the check against the exact gradient.

Run: python examples/quickstart.py
"""
import jax
import jax.numpy as jnp
import numpyro.distributions as dist

import scg


@scg.model
def model(params, x):
    # a switch b chooses which of two means the continuous latent z is centred on
    b = scg.sample("b", dist.Bernoulli(logits=params["switch"]))
    q = dist.Normal(jnp.where(b == 1, params["mu1"], params["mu0"]), jnp.exp(params["log_s"]))
    z = scg.sample("z", q)
    scg.cost("fit", jnp.sum((z - x) ** 2))
    # a sampled KL(q || N(0, 1)), written with scg.log_prob so passes can see it
    scg.cost("kl", jnp.sum(scg.log_prob(q, z) - scg.log_prob(dist.Normal(0.0, 1.0), z)))


def main():
    params = {"switch": jnp.array(0.2), "mu0": jnp.array(-0.5), "mu1": jnp.array(1.0), "log_s": jnp.array(-0.3)}
    x = jnp.array([0.8, 1.2])
    key = jax.random.key(0)

    graph = model.trace(params, x)
    print(graph, "\n")
    print("downstream costs of each site:", graph.downstream_costs, "\n")

    rewritten, cert = scg.passes.auto(graph)
    print(cert, "\n")
    print(rewritten, "\n")
    print(cert.verify(params, x, key=key), "\n")

    objective = scg.compile(model)  # passes="auto"
    loss, grads = objective.value_and_grad(params, x, key=key, num_samples=8)
    print(f"loss sample: {float(loss):.4f}")
    print("gradient estimate:", {k: round(float(v), 4) for k, v in grads.items()})
    print("exact E[loss]:", round(float(scg.expectation(model, params, x)), 4), "\n")

    print(scg.check_grad(model, params, x, key=key, num_samples=10_000))


if __name__ == "__main__":
    main()
