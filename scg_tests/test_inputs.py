"""Every bad input named (issue 11): a new user's wrong argument gets an scg error, ``ValueError`` or
``TypeError`` whose message names the argument, site or parameter and says what to do, never a raw
JAX error or silent behaviour."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import pytest

import scg
from scg.errors import check_key


@scg.model
def normal_kl(params, x):
    q = dist.Normal(params["mu"], 1.0)
    z = scg.sample("z", q)
    scg.cost("fit", (z - x) ** 2)
    scg.cost("kl", scg.log_prob(q, z) - scg.log_prob(dist.Normal(0.0, 1.0), z))


@scg.model
def coin(params, x):
    b = scg.sample("b", dist.Bernoulli(logits=params["w"]))
    scg.cost("err", (b - x) ** 2.0)


P, X = {"mu": jnp.array(0.5)}, jnp.array(1.0)
KEY_MESSAGE = r"key=.*jax\.random\.key\(seed\)"


# --- 1. key= -----------------------------------------------------------------------------------------

BAD_KEYS = [
    pytest.param(0, TypeError, r"key=0 is an int, not a JAX PRNG key", id="int"),
    pytest.param(None, TypeError, r"key=None", id="None"),
    pytest.param(jnp.zeros(2), TypeError, r"key= is an array of dtype float32 and shape \(2,\)", id="float-array"),
    pytest.param(np.zeros(2, np.int32), TypeError, r"key= is an array of dtype int32", id="int32-array"),
    pytest.param(np.zeros(3, np.uint32), TypeError, r"key= is an array of dtype uint32 and shape \(3,\)",
                 id="uint32[3]"),
    pytest.param(jax.random.split(jax.random.key(0), 3), ValueError, r"key= is a stack of 3 keys",
                 id="typed-stack"),
    pytest.param(jax.random.split(jax.random.PRNGKey(0), 3), ValueError, r"key= is a stack of 3 legacy keys",
                 id="legacy-stack"),
]
METHODS = ["loss", "grad", "value_and_grad", "value_and_grad_with_state", "surrogate"]


def _call(objective, method, key, **kw):
    if method == "value_and_grad_with_state":
        kw.setdefault("baseline_state", scg.baselines.EmptyState())
    return getattr(objective, method)(P, X, key=key, **kw)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("key, error, message", BAD_KEYS)
def test_bad_keys_are_named(method, key, error, message):
    # before: "JAX encountered invalid PRNG key data ..." / "fold_in accepts a single key ..."
    objective = scg.compile(normal_kl)
    with pytest.raises(error, match=f"Objective.{method}: {message}") as info:
        _call(objective, method, key)
    assert "jax.random.key(seed)" in str(info.value)


@pytest.mark.parametrize("method", METHODS)
def test_typed_and_legacy_keys_are_accepted_and_agree(method):
    objective = scg.compile(normal_kl)
    typed = _call(objective, method, jax.random.key(3))
    legacy = _call(objective, method, jax.random.PRNGKey(3))
    as_numpy = _call(objective, method, np.asarray(jax.random.PRNGKey(3)))
    jax.tree_util.tree_map(np.testing.assert_array_equal, typed, legacy)
    jax.tree_util.tree_map(np.testing.assert_array_equal, typed, as_numpy)


def test_keys_under_jit_and_vmap():
    objective = scg.compile(normal_kl)
    keys = jax.random.split(jax.random.key(0), 4)
    batched = jax.vmap(lambda k: objective.grad(P, X, key=k))(keys)
    assert batched["mu"].shape == (4,)
    jitted = jax.jit(lambda k: objective.loss(P, X, key=k))(jax.random.PRNGKey(1))
    assert np.isfinite(float(jitted))
    with pytest.raises(TypeError, match=r"Objective.unjitted_grad\(\.\.\.\)\(key\): key= is an array of dtype float32"):
        objective.unjitted_grad(P, X)(jnp.zeros(2))
    with pytest.raises(ValueError, match=r"Objective.grad: key= is a stack of 4 keys"):
        jax.jit(lambda k: objective.grad(P, X, key=k))(keys)


def test_check_key_directly():
    check_key(jax.random.key(0), "here")
    check_key(jax.random.PRNGKey(0), "here")
    with pytest.raises(TypeError, match=r"here: key='0' is a str"):
        check_key("0", "here")


def test_check_grad_names_a_bad_key():
    with pytest.raises(TypeError, match=r"scg.check_grad: key=0 is an int"):
        scg.check_grad(coin, {"w": jnp.array(0.0)}, X, key=0, num_samples=10)


def test_certificate_verify_names_a_bad_key():
    _, cert = scg.passes.integrate_kl(normal_kl.trace(P, X))
    with pytest.raises(TypeError, match=r"Certificate.verify: key=None"):
        cert.verify(P, X, key=None)


# --- 2. num_samples= ---------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [np.int64(3), np.int32(2), jnp.array(2), 5])
def test_integer_num_samples_are_accepted(n):
    grads = scg.compile(normal_kl).grad(P, X, key=jax.random.key(0), num_samples=n)
    assert np.isfinite(float(grads["mu"]))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("n, message", [
    (True, r"num_samples must be a positive int, got the bool True"),
    (np.bool_(True), r"num_samples must be a positive int, got the bool (np\.)?True_?"),
    (0, r"num_samples must be a positive int, got 0"),
    (-3, r"num_samples must be a positive int, got -3"),
    (2.0, r"num_samples must be a positive int, got 2\.0 \(float\)"),
    ("4", r"num_samples must be a positive int, got '4' \(str\)"),
    (None, r"num_samples must be a positive int, got None"),
])
def test_bad_num_samples(method, n, message):
    # before: True was accepted as one particle and np.int64(4) was refused
    with pytest.raises(ValueError, match=message):
        _call(scg.compile(normal_kl), method, jax.random.key(0), num_samples=n)


# --- 3. a pass returns (graph, certificate) ------------------------------------------------------------


def only_graph(graph):
    return graph


def graph_and_none(graph):
    return graph, None


@pytest.mark.parametrize("bad, got", [(only_graph, "a Graph"), (graph_and_none, r"a tuple of \(Graph, NoneType\)")])
def test_a_pass_must_return_graph_and_certificate(bad, got):
    # before: "cannot unpack non-iterable Graph object"
    message = f"pass '{bad.__name__}' returned {got}; a pass returns \\(graph, certificate\\)"
    with pytest.raises(TypeError, match=message):
        scg.compile(normal_kl, passes=[bad]).grad(P, X, key=jax.random.key(0))
    with pytest.raises(TypeError, match=message):
        scg.passes.chain(scg.passes.integrate_kl, bad)(normal_kl.trace(P, X))


def test_a_custom_pass_that_returns_both_works():
    def noop(graph):
        return graph, scg.passes.Certificate("noop", (), (), (), "(none)", before=graph, after=graph)

    grads = scg.compile(normal_kl, passes=[noop, "reparameterize"]).grad(P, X, key=jax.random.key(0))
    assert np.isfinite(float(grads["mu"]))


# --- 4. a pass made a no-op by the order says why --------------------------------------------------------


def test_integrate_kl_after_reparameterize_says_why():
    graph = normal_kl.trace(P, X)
    g1, _ = scg.passes.reparameterize(graph)
    _, cert = scg.passes.integrate_kl(g1)
    assert cert.rewritten == ()
    assert any("z.eps: skipped, it is the noise site an earlier reparameterize put in place of 'z'" in n
               and "Run integrate_kl before reparameterize" in n for n in cert.notes), cert.notes
    assert "note: z.eps: skipped" in str(cert)
    # the same, through a chain
    _, chained = scg.passes.chain(scg.passes.reparameterize, scg.passes.integrate_kl)(graph)
    assert any(n.startswith("integrate_kl: z.eps: skipped") for n in chained.notes), chained.notes


def test_a_pass_run_twice_says_why():
    graph = normal_kl.trace(P, X)
    g1, _ = scg.passes.reparameterize(graph)
    _, again = scg.passes.reparameterize(g1)
    assert again.rewritten == () and any("already rewritten" in n for n in again.notes), again.notes
    k1, _ = scg.passes.integrate_kl(graph)
    _, again = scg.passes.integrate_kl(k1)
    assert again.rewritten == ()
    assert any("z: skipped, its log-density terms were already integrated by an earlier integrate_kl" in n
               for n in again.notes), again.notes
    e1, _ = scg.passes.enumerate(coin.trace({"w": jnp.array(0.0)}, X))
    _, again = scg.passes.enumerate(e1)
    assert again.rewritten == () and again.notes == ("b: skipped, already enumerated by an earlier enumerate pass",)


@scg.model
def mixed(params, x):
    b = scg.sample("b", dist.Bernoulli(logits=params["w"]))
    z = scg.sample("z", dist.Normal(params["mu"], 1.0))
    scg.cost("c", (z * b - x) ** 2)


def test_enumerate_then_reparameterize_notes():
    graph = mixed.trace({"w": jnp.array(0.0), "mu": jnp.array(0.1)}, X)
    g1, cert_e = scg.passes.enumerate(graph)
    assert cert_e.rewritten == ("b",)
    assert cert_e.notes == ("z: skipped, Normal is continuous (no finite support to sum over)",)
    _, cert_r = scg.passes.reparameterize(g1)
    assert cert_r.rewritten == ("z",)
    assert cert_r.notes == ("b: skipped, already summed exactly (enumerated by an earlier enumerate pass)",)
    _, kl = scg.passes.integrate_kl(g1)
    assert "b: skipped, summed exactly by an earlier enumerate pass" in "\n".join(kl.notes)


# --- 5. params leaves ---------------------------------------------------------------------------------


@pytest.mark.parametrize("params, message", [
    ({"mu": jnp.array(0.5), "w": None}, r"parameter params\['w'\] is None"),
    ({"mu": jnp.array(0.5), "nested": {"a": [None]}}, r"parameter params\['nested'\]\['a'\]\[0\] is None"),
    ({"mu": "0.5"}, r"parameter params\['mu'\] is a str \('0.5'\)"),
    ({"mu": 1}, r"parameter params\['mu'\] is an int"),
    ({"mu": True}, r"parameter params\['mu'\] is a bool"),
    ({"mu": jnp.array(1, jnp.int32)}, r"parameter params\['mu'\] is dtype int32"),
    ({"mu": jnp.array(1j)}, r"parameter params\['mu'\] is dtype complex64"),
    (None, r"parameter params is None"),
])
def test_bad_parameter_leaves_are_named(params, message):
    # before: a None leaf vanished from the pytree, and the model traced without it
    with pytest.raises(scg.ModelError, match=message):
        normal_kl.trace(params, X)
    with pytest.raises(scg.ModelError, match=message):
        scg.compile(normal_kl).grad(params, X, key=jax.random.key(0))


# --- 6. calling a decorated model ----------------------------------------------------------------------


def test_calling_a_decorated_model_directly():
    # before: "... Decorate the function with @scg.model", wrong advice for a decorated model
    with pytest.raises(scg.ModelError, match=r"model 'normal_kl' was called directly; .*normal_kl.trace\(params, "
                       r"\*args\).*scg.compile\(normal_kl\).*scg.expectation\(normal_kl, params, \*args\)") as info:
        normal_kl(P, X)
    assert "Decorate the function" not in str(info.value)


def test_a_model_called_inside_another_model_inlines_its_sites():
    @scg.model
    def outer(params, x):
        normal_kl(params, x)
        scg.cost("extra", params["mu"] ** 2)

    graph = outer.trace(P, X)
    assert [s.name for s in graph.sites] == ["z"] and len(graph.costs) == 3


# --- 7. scg.compile's arguments --------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, error, message", [
    ({"model_or_graph": lambda p, x: 0.0}, TypeError,
     r"decorated with @scg.model or an scg.Graph as its first argument \(model_or_graph\), got function; "
     r"decorate it with @scg.model"),
    ({"model_or_graph": 3}, TypeError, r"first argument \(model_or_graph\), got int"),
    ({"passes": "reparametrize"}, ValueError, r"unknown pass 'reparametrize' in passes= \(item 0\); known passes"),
    ({"passes": ["auto", 7]}, TypeError, r"passes= item 1: a pass must be a function"),
    ({"passes": 5}, TypeError, r"passes= must be 'auto', None/'none'/\[\], a pass, or a list of passes"),
    ({"passes": {"auto": 1}}, TypeError, r"passes= must be .* got dict"),
    ({"baseline": "mean"}, ValueError, r"unknown baseline 'mean'; choose one of \['leave_one_out', 'moving_average'\] "
                                       r"for baseline="),
    ({"baseline": 5}, TypeError, r"baseline= must be None, a name"),
    ({"baseline": {"z": "median"}}, ValueError, r"baseline= for site 'z': unknown baseline 'median'"),
    ({"baseline": {1: "leave_one_out"}}, TypeError, r"baseline= as a dict maps site names"),
    ({"objective": "elbo2"}, ValueError, r"unknown objective 'elbo2'"),
    ({"order": 0}, ValueError, r"order= .* must be a positive int, got 0"),
    ({"order": 2.5}, ValueError, r"order= .* must be a positive int, got 2.5"),
])
def test_compile_arguments_are_named(kwargs, error, message):
    kwargs = {"model_or_graph": normal_kl, **kwargs}
    with pytest.raises(error, match=message):
        scg.compile(kwargs.pop("model_or_graph"), **kwargs)


def test_per_site_baseline_none_means_no_baseline():
    objective = scg.compile(coin, baseline={"b": None})
    grads = objective.grad({"w": jnp.array(0.0)}, X, key=jax.random.key(0), num_samples=2)
    assert np.isfinite(float(grads["w"]))


# --- 8. data arguments, cost shapes, a model without costs (found by test_fuzz_inputs.py) -------------------


@pytest.mark.parametrize("args, message", [
    (("abc",), r"model 'normal_kl': data argument x \(position 1 after params\) is str 'abc', not an array of "
               r"numbers; pass arrays \(or numbers\)"),
    (({"k": [1.0, object()]},), r"data argument x\['k'\]\[1\] \(position 1 after params\) is object"),
    ((np.array(["a", "b"]),), r"data argument x \(position 1 after params\) is an array of dtype <U1"),
    ((X, "b"), r"data argument args\[1\] \(position 2 after params\) is str 'b'"),
])
def test_bad_data_arguments_are_named(args, message):
    # before: model.trace(params, "abc") surfaced JAX's "Error interpreting argument to <function
    # Model.trace.<locals>.flat ...> as an abstract array"; trace and Objective share one check
    with pytest.raises(TypeError, match=message):
        normal_kl.trace(P, *args)
    with pytest.raises(TypeError, match=message.replace("model 'normal_kl'", "Objective.loss")):
        scg.compile(normal_kl).loss(P, *args, key=jax.random.key(0))


def test_a_cost_whose_shapes_do_not_broadcast_is_named():
    # before: "distribution parameters do not broadcast", though no distribution was involved
    @scg.model
    def m(params, x):
        z = scg.sample("z", dist.Normal(params["mu"] * jnp.ones(2), 1.0))
        scg.cost("fit", jnp.sum((z - x) ** 2))

    with pytest.raises(scg.ModelError, match=r"model 'm': the value of cost 'fit' has operands whose shapes do not "
                       r"broadcast \(`scg.cost\(\"fit\", jnp.sum\(\(z - x\) \*\* 2\)\)`\): JAX says: sub got "
                       r"incompatible shapes for broadcasting: \(2,\), \(3,\)\..*\(at test_inputs.py:\d+\)") as info:
        m.trace(P, jnp.ones(3))
    assert "distribution parameters" not in str(info.value) and info.value.site == "fit"
    with pytest.raises(scg.ModelError, match=r"cost 'fit' has operands .*rank_promotion='raise'.*ranks must match"):
        m.trace(P, jnp.ones((1, 2)))


def test_a_shape_error_in_model_code_names_the_line_not_a_distribution():
    @scg.model
    def m(params, x):
        z = scg.sample("z", dist.Normal(params["mu"], 1.0))
        h = jnp.ones(3) * x
        scg.cost("fit", jnp.sum(h * z))

    with pytest.raises(scg.ModelError, match=r"model 'm': array shapes in the model's code do not broadcast "
                       r"\(`h = jnp.ones\(3\) \* x`\): JAX says: mul got incompatible shapes") as info:
        m.trace(P, jnp.ones(4))
    assert "distribution parameters" not in str(info.value)


@pytest.mark.parametrize("make, message", [
    (lambda mu: dist.Normal(mu * jnp.zeros(3), jnp.ones(4)),
     r"model 'm': distribution parameters do not broadcast \(Normal\): Incompatible shapes"),
    (lambda mu: dist.Normal(mu * jnp.zeros(2), 1.0).expand((3,)),
     r"model 'm': \.expand\(\) cannot reach the batch shape it was given: Cannot broadcast distribution of "
     r"shape \(2,\) to shape \(3,\)"),
], ids=["parameters", "expand"])
def test_a_distribution_whose_shapes_do_not_fit_names_the_family_or_expand(make, message):
    @scg.model
    def m(params, x):
        z = scg.sample("z", make(params["mu"]))
        scg.cost("fit", jnp.sum(z))

    with pytest.raises(scg.ModelError, match=message + r".*\(at test_inputs.py:\d+\)"):
        m.trace(P, X)


def test_a_model_without_costs_is_refused():
    # before: it traced, and loss / grad / expectation returned 0 silently
    @scg.model
    def no_cost(params, x):
        scg.sample("z", dist.Normal(params["mu"], 1.0))

    message = (r"model 'no_cost' declares no cost \(it draws 'z'\): its loss would be 0 .* A model needs at least "
               r"one scg.cost.*e.g. scg.cost\('nll', -scg.log_prob\(dist.Normal\(z, 1.0\), x\)\)")
    with pytest.raises(scg.ModelError, match=message):
        no_cost.trace(P, X)
    with pytest.raises(scg.ModelError, match=message):
        scg.compile(no_cost).loss(P, X, key=jax.random.key(0))
    with pytest.raises(scg.ModelError, match=message):
        scg.expectation(no_cost, P, X)


def test_costs_only_in_a_scan_body_or_under_vmap_count():
    @scg.model
    def in_scan(params, xs):
        def step(carry, x):
            z = scg.sample("z", dist.Normal(carry, 1.0))
            scg.cost("fit", (z - x) ** 2)
            return z, None

        jax.lax.scan(step, params["mu"], xs)

    @scg.model
    def under_vmap(params, xs):
        def one(x):
            z = scg.sample("z", dist.Normal(params["mu"], 1.0))
            scg.cost("fit", (z - x) ** 2)

        jax.vmap(one)(xs)

    xs = jnp.array([0.0, 1.0, 2.0])
    assert in_scan.trace(P, xs).scans and not in_scan.trace(P, xs).costs
    np.testing.assert_allclose(scg.expectation(scg.unroll(in_scan.trace(P, xs)), P, xs),
                               scg.expectation(in_scan, P, xs), rtol=1e-5)
    assert [c.name for c in under_vmap.trace(P, xs).costs] == ["fit"]
    assert np.isfinite(float(scg.compile(under_vmap).loss(P, xs, key=jax.random.key(0))))
