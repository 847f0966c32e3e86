"""Curvature products and diagonal estimates against materialised matrices and plain loops.

References are built over a ``ravel_pytree`` flattening: ``J`` by ``jax.jacfwd``, ``H_L`` and
the full Hessian by ``jax.hessian``, always in float64 (float32 results are compared with them
at a loose tolerance).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import nnx
from jax.flatten_util import ravel_pytree

import hfjax

NUM_EXAMPLES, NUM_INPUTS, NUM_HIDDEN, NUM_OUTPUTS = 4, 3, 4, 3


# --- Models and losses ----------------------------------------------------------------------


def dict_model(rng):
  """A two-layer MLP whose params are a nested dict with a tuple and a scalar leaf."""
  params = {
    "hidden": ({"w": rng.normal(size=(NUM_INPUTS, NUM_HIDDEN)), "b": rng.normal(size=NUM_HIDDEN)},),
    "out": {"w": rng.normal(size=(NUM_HIDDEN, NUM_OUTPUTS)), "b": rng.normal(size=NUM_OUTPUTS)},
    "scale": np.asarray(1.3),
  }

  def apply_fn(p, x):
    layer = p["hidden"][0]
    h = jnp.tanh(x @ layer["w"] + layer["b"])
    return (h @ p["out"]["w"] + p["out"]["b"]) * p["scale"]

  return apply_fn, jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)


class LinenMLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(NUM_OUTPUTS)(nn.tanh(nn.Dense(NUM_HIDDEN)(x)))


def linen_model(rng):
  model = LinenMLP()
  x = jnp.zeros((1, NUM_INPUTS))
  params = model.init(jax.random.key(int(rng.integers(2**31))), x)["params"]
  return (lambda p, x: model.apply({"params": p}, x)), params


class NNXMLP(nnx.Module):
  def __init__(self, rngs):
    self.hidden = nnx.Linear(NUM_INPUTS, NUM_HIDDEN, rngs=rngs)
    self.norm = nnx.BatchNorm(NUM_HIDDEN, use_running_average=True, rngs=rngs)
    self.out = nnx.Linear(NUM_HIDDEN, NUM_OUTPUTS, rngs=rngs)

  def __call__(self, x):
    return self.out(jnp.tanh(self.norm(self.hidden(x))))


def nnx_model(rng):
  model = NNXMLP(nnx.Rngs(int(rng.integers(2**31))))
  # The batch statistics stay out of the optimised parameters.
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  assert jax.tree.leaves(rest)
  return (lambda p, x: nnx.merge(graphdef, p, rest)(x)), params


MODELS = {"dict": dict_model, "linen": linen_model, "nnx": nnx_model}


def softmax_cross_entropy(outputs, labels):
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(outputs, labels))


def sigmoid_cross_entropy(outputs, targets):
  return jnp.mean(optax.sigmoid_binary_cross_entropy(outputs, targets))


def squared_error(outputs, targets):
  return 0.5 * jnp.mean(jnp.sum((outputs - targets) ** 2, axis=-1))


def softmax_targets(rng, n, k):
  return jnp.asarray(rng.integers(0, k, size=n), jnp.int32)


def sigmoid_targets(rng, n, k):
  return jnp.asarray(rng.integers(0, 2, size=(n, k)), jnp.float32)


def squared_targets(rng, n, k):
  return jnp.asarray(rng.normal(size=(n, k)), jnp.float32)


LOSSES = {
  "softmax_ce": (softmax_cross_entropy, softmax_targets),
  "sigmoid_ce": (sigmoid_cross_entropy, sigmoid_targets),
  "squared_error": (squared_error, squared_targets),
}


def cast_floats(tree, dtype):
  def cast(x):
    x = jnp.asarray(x)
    return x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x

  return jax.tree.map(cast, tree)


def problem(model, loss, seed=0):
  """``(apply_fn, loss_fn, params, batch)`` in float32."""
  rng = np.random.default_rng(seed)
  apply_fn, params = MODELS[model](rng)
  loss_fn, make_targets = LOSSES[loss]
  inputs = jnp.asarray(rng.normal(size=(NUM_EXAMPLES, NUM_INPUTS)), jnp.float32)
  return apply_fn, loss_fn, params, (inputs, make_targets(rng, NUM_EXAMPLES, NUM_OUTPUTS))


# --- Dense references -----------------------------------------------------------------------


def dense_gauss_newton_and_hessian(apply_fn, loss_fn, params, batch):
  """``J^T H_L J`` and the full Hessian of ``loss_fn(apply_fn(params, inputs), targets)`` over
  the raveled params, computed in float64."""

  @jax.jit
  def dense(params, inputs, targets):
    flat, unravel = ravel_pytree(params)
    flat_out, unravel_out = ravel_pytree(apply_fn(params, inputs))
    jac = jax.jacfwd(lambda w: ravel_pytree(apply_fn(unravel(w), inputs))[0])(flat)
    loss_hessian = jax.hessian(lambda o: loss_fn(unravel_out(o), targets))(flat_out)
    hessian = jax.hessian(lambda w: loss_fn(apply_fn(unravel(w), inputs), targets))(flat)
    return jac.T @ loss_hessian @ jac, hessian

  with jax.enable_x64(True):
    params, (inputs, targets) = cast_floats((params, batch), jnp.float64)
    return tuple(np.asarray(m) for m in dense(params, inputs, targets))


def materialised_products(apply_fn, loss_fn, params, batch):
  """Both products of hfjax, materialised in one compiled program, with their outputs and
  their values on a vector of ones (to check structure, shapes and dtypes)."""

  @jax.jit
  def run(params, batch):
    results = []
    flat, unravel = ravel_pytree(params)
    eye = jnp.eye(flat.size, dtype=flat.dtype)
    for build in (hfjax.gauss_newton_matvec, hfjax.hessian_matvec):
      matvec, outputs = build(apply_fn, loss_fn, params, batch)
      probe = matvec(jax.tree.map(jnp.ones_like, params))
      rows = jax.vmap(lambda e, matvec=matvec: ravel_pytree(matvec(unravel(e)))[0])(eye)
      results.append((rows.T, outputs, probe))
    return results

  return run(params, batch)


def assert_like_params(tree, params):
  assert jax.tree.structure(tree) == jax.tree.structure(params)
  for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(params), strict=True):
    assert a.shape == b.shape and a.dtype == b.dtype


def tolerances(dtype, matrix):
  scale = np.abs(matrix).max()
  return (1e-10, 1e-12 * scale) if dtype == jnp.float64 else (2e-4, 2e-5 * scale)


# --- Gauss-Newton and Hessian products ------------------------------------------------------


# Every model with every loss in float64; each model and each loss once in float32 too.
FLOAT32_CASES = {("dict", "softmax_ce"), ("linen", "sigmoid_ce"), ("nnx", "squared_error")}


@pytest.mark.parametrize("loss", list(LOSSES))
@pytest.mark.parametrize("model", list(MODELS))
def test_products_match_materialised_matrices(model, loss):
  apply_fn, loss_fn, params, batch = problem(model, loss)
  want_g, want_h = dense_gauss_newton_and_hessian(apply_fn, loss_fn, params, batch)
  # Matching losses and nonlinear models: the Hessian is not G, so the two are told apart.
  assert np.abs(want_h - want_g).max() > 1e-3 * np.abs(want_h).max()
  dtypes = [jnp.float64] + ([jnp.float32] if (model, loss) in FLOAT32_CASES else [])
  for dtype in dtypes:
    with jax.enable_x64(dtype == jnp.float64):
      params_d, batch_d = cast_floats((params, batch), dtype)
      (got_g, outputs, g_probe), (got_h, h_outputs, h_probe) = materialised_products(
        apply_fn, loss_fn, params_d, batch_d
      )
      np.testing.assert_allclose(outputs, apply_fn(params_d, batch_d[0]), rtol=1e-6)
      np.testing.assert_allclose(h_outputs, outputs, rtol=1e-6)
      assert_like_params(g_probe, params_d)
      assert_like_params(h_probe, params_d)
    got_g, got_h = np.asarray(got_g, np.float64), np.asarray(got_h, np.float64)
    rtol, atol = tolerances(dtype, want_h)
    np.testing.assert_allclose(got_h, want_h, rtol=rtol, atol=atol)
    rtol, atol = tolerances(dtype, want_g)
    np.testing.assert_allclose(got_g, want_g, rtol=rtol, atol=atol)
    # G is symmetric positive semidefinite.
    np.testing.assert_allclose(got_g, got_g.T, rtol=rtol, atol=atol)
    assert np.linalg.eigvalsh((got_g + got_g.T) / 2).min() >= -atol


def test_gauss_newton_matvec_is_symmetric(x64):
  apply_fn, loss_fn, params, batch = problem("dict", "sigmoid_ce", seed=1)
  params, batch = cast_floats((params, batch), jnp.float64)
  flat, unravel = ravel_pytree(params)
  rng = np.random.default_rng(2)
  u, v = (unravel(jnp.asarray(rng.normal(size=flat.size))) for _ in range(2))

  @jax.jit
  def forms(u, v):
    matvec, _ = hfjax.gauss_newton_matvec(apply_fn, loss_fn, params, batch)
    gu, gv = matvec(u), matvec(v)
    return optax.tree.vdot(u, gv), optax.tree.vdot(v, gu), optax.tree.vdot(u, gu)

  u_gv, v_gu, u_gu = forms(u, v)
  np.testing.assert_allclose(u_gv, v_gu, rtol=1e-12)
  assert float(u_gu) > 0


def test_linear_softmax_model_closed_form(x64):
  # For f(W) = x W, G = H = (1/n) sum_i (x_i x_i^T) kron (diag(p_i) - p_i p_i^T).
  rng = np.random.default_rng(3)
  x = rng.normal(size=(5, 3))
  w = rng.normal(size=(3, 4))
  labels = jnp.asarray(rng.integers(0, 4, size=5))
  apply_fn = lambda w, x: x @ w
  batch = (jnp.asarray(x), labels)
  p = np.exp(x @ w)
  p /= p.sum(axis=1, keepdims=True)
  want = sum(
    np.kron(np.outer(xi, xi), np.diag(pi) - np.outer(pi, pi)) for xi, pi in zip(x, p, strict=True)
  )
  want /= len(x)
  for got, _, _ in materialised_products(apply_fn, softmax_cross_entropy, jnp.asarray(w), batch):
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-14)


def test_pytree_outputs_and_targets(x64):
  rng = np.random.default_rng(4)
  params = {
    "w": jnp.asarray(rng.normal(size=(3, 4))),
    "heads": {
      "logits": jnp.asarray(rng.normal(size=(4, 3))),
      "value": jnp.asarray(rng.normal(size=(4, 2))),
    },
  }

  def apply_fn(p, inputs):
    h = jnp.tanh(inputs["x"] @ p["w"])
    return {"logits": h @ p["heads"]["logits"], "value": h @ p["heads"]["value"]}

  def loss_fn(outputs, targets):
    return softmax_cross_entropy(outputs["logits"], targets["label"]) + squared_error(
      outputs["value"], targets["value"]
    )

  n = 5
  batch = (
    {"x": jnp.asarray(rng.normal(size=(n, 3)))},
    {
      "label": jnp.asarray(rng.integers(0, 3, size=n)),
      "value": jnp.asarray(rng.normal(size=(n, 2))),
    },
  )
  want_g, want_h = dense_gauss_newton_and_hessian(apply_fn, loss_fn, params, batch)
  (got_g, outputs, _), (got_h, _, _) = materialised_products(apply_fn, loss_fn, params, batch)
  assert jax.tree.structure(outputs) == jax.tree.structure({"logits": 0, "value": 0})
  np.testing.assert_allclose(got_g, want_g, rtol=1e-10, atol=1e-13)
  np.testing.assert_allclose(got_h, want_h, rtol=1e-10, atol=1e-13)


def test_products_keep_mixed_param_dtypes():
  apply_fn, loss_fn, params, batch = problem("dict", "squared_error", seed=5)
  params["out"]["w"] = params["out"]["w"].astype(jnp.bfloat16)
  want_g, want_h = dense_gauss_newton_and_hessian(apply_fn, loss_fn, params, batch)
  for (got, _, probe), want in zip(
    materialised_products(apply_fn, loss_fn, params, batch), (want_g, want_h), strict=True
  ):
    assert_like_params(probe, params)
    got = np.asarray(got, np.float64)
    np.testing.assert_allclose(got, want, rtol=2e-2, atol=2e-2 * np.abs(want).max())


def test_eager_products_match_jitted_ones():
  apply_fn, loss_fn, params, batch = problem("linen", "softmax_ce", seed=7)

  @jax.jit
  def both(params, batch, v):
    gn, _ = hfjax.gauss_newton_matvec(apply_fn, loss_fn, params, batch)
    h, _ = hfjax.hessian_matvec(apply_fn, loss_fn, params, batch)
    return gn(v), h(v)

  v = jax.tree.map(jnp.ones_like, params)
  got_g, got_h = both(params, batch, v)
  want_g, want_h = (
    build(apply_fn, loss_fn, params, batch)[0](v)
    for build in (hfjax.gauss_newton_matvec, hfjax.hessian_matvec)
  )
  for got, want in ((got_g, want_g), (got_h, want_h)):
    assert_like_params(got, params)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


# --- Errors at trace time -------------------------------------------------------------------


def _simple():
  params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
  apply_fn = lambda p, x: x @ p["w"] + p["b"]
  batch = (jnp.ones((4, 3)), jnp.zeros((4, 2)))
  return apply_fn, squared_error, params, batch


def _build_case(case):
  apply_fn, loss_fn, params, batch = _simple()
  v = jax.tree.map(jnp.ones_like, params)
  if case == "v structure":
    v = {"w": v["w"]}
  elif case == "v leaf shape":
    v = {"w": jnp.ones((2, 3)), "b": v["b"]}
  elif case == "non-scalar loss":
    loss_fn = lambda out, y: jnp.sum((out - y) ** 2, axis=-1)
  elif case == "outputs do not fit targets":
    batch = (batch[0], jnp.zeros((4, 5)))
  elif case == "batch not a pair":
    batch = (batch[0],)
  elif case == "batch of three":
    batch = (batch[0], batch[1], batch[1])
  elif case == "batch not a tuple":
    batch = batch[0]
  elif case == "empty batch":
    batch = ({}, {})
  elif case == "zero examples":
    batch = (batch[0][:0], batch[1][:0])
  elif case == "mismatched batch sizes":
    batch = (batch[0], jnp.zeros((5, 2)))
  elif case == "integer params":
    params = {"w": jnp.ones((3, 2), jnp.int32), "b": jnp.zeros(2)}
  elif case == "empty params":
    params = {}
  return apply_fn, loss_fn, params, batch, v


ERROR_CASES = [
  ("v structure", ValueError, "structure"),
  ("v leaf shape", ValueError, r"shape \(2, 3\)"),
  ("non-scalar loss", ValueError, "scalar"),
  ("outputs do not fit targets", ValueError, "do not fit"),
  ("batch not a pair", TypeError, "pair"),
  ("batch of three", TypeError, "pair"),
  ("batch not a tuple", TypeError, "pair"),
  ("empty batch", ValueError, "empty"),
  ("zero examples", ValueError, "empty"),
  ("mismatched batch sizes", ValueError, "disagree"),
  ("integer params", TypeError, "floating"),
  ("empty params", ValueError, "params is empty"),
]


@pytest.mark.parametrize("build", [hfjax.gauss_newton_matvec, hfjax.hessian_matvec])
@pytest.mark.parametrize(("case", "error", "match"), ERROR_CASES, ids=[c[0] for c in ERROR_CASES])
def test_errors_name_the_problem(build, case, error, match):
  apply_fn, loss_fn, params, batch, v = _build_case(case)
  with pytest.raises(error, match=match):
    build(apply_fn, loss_fn, params, batch)[0](v)
  with pytest.raises(error, match=match):
    jax.jit(lambda params, batch, v: build(apply_fn, loss_fn, params, batch)[0](v))(
      params, batch, v
    )


@pytest.mark.parametrize(
  "estimate",
  [
    lambda *args: hfjax.squared_gradient_sum(*args),
    lambda *args: hfjax.gauss_newton_diagonal_estimate(*args, jax.random.key(0)),
  ],
  ids=["squared_gradient_sum", "gauss_newton_diagonal_estimate"],
)
@pytest.mark.parametrize(
  ("case", "error", "match"),
  [c for c in ERROR_CASES if not c[0].startswith("v ")],
  ids=[c[0] for c in ERROR_CASES if not c[0].startswith("v ")],
)
def test_diagonal_estimates_name_the_problem(estimate, case, error, match):
  apply_fn, loss_fn, params, batch, _ = _build_case(case)
  with pytest.raises(error, match=match):
    estimate(apply_fn, loss_fn, params, batch)


def test_num_samples_must_be_positive():
  apply_fn, loss_fn, params, batch = _simple()
  with pytest.raises(ValueError, match="num_samples"):
    hfjax.gauss_newton_diagonal_estimate(
      apply_fn, loss_fn, params, batch, jax.random.key(0), num_samples=0
    )


# --- Per-example sums and diagonal estimates ------------------------------------------------


CHUNK_SIZES = [None, 1, 3]  # n = 7: 3 leaves a partial chunk


def test_per_example_sum_matches_a_loop(x64):
  rng = np.random.default_rng(8)
  n = 7
  batch = {
    "x": jnp.asarray(rng.normal(size=(n, 3))),
    "y": ({"z": jnp.asarray(rng.normal(size=(n, 2)))},),
  }
  params = {"s": jnp.asarray(1.5)}

  def per_example_fn(params, example):
    assert example["x"].shape == (3,) and example["y"][0]["z"].shape == (2,)
    x, z = example["x"], example["y"][0]["z"]
    return {"outer": params["s"] * jnp.outer(x, z), "total": (jnp.sum(x) * jnp.sum(z),)}

  want = {"outer": 0.0, "total": (0.0,)}
  for i in range(n):
    example = jax.tree.map(lambda a, i=i: a[i], batch)
    want = jax.tree.map(lambda acc, v: acc + np.asarray(v), want, per_example_fn(params, example))
  for chunk_size in (None, 1, 2, 3, 7, 100):
    got = hfjax.per_example_sum(per_example_fn, params, batch, chunk_size=chunk_size)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
      np.testing.assert_allclose(a, b, rtol=1e-12, err_msg=f"chunk_size={chunk_size}")


def test_per_example_sum_rejects_mismatched_leading_axes():
  batch = {"x": jnp.ones((3, 2)), "y": jnp.ones((4,))}
  with pytest.raises(ValueError, match="disagree"):
    hfjax.per_example_sum(lambda p, e: e["x"], None, batch)


def test_squared_gradient_sum_matches_per_example_loop(x64):
  loss = "softmax_ce"
  apply_fn, loss_fn, params, _ = problem("dict", loss, seed=9)
  rng = np.random.default_rng(10)
  n = 7
  inputs = jnp.asarray(rng.normal(size=(n, NUM_INPUTS)))
  batch = cast_floats((inputs, LOSSES[loss][1](rng, n, NUM_OUTPUTS)), jnp.float64)
  params = cast_floats(params, jnp.float64)
  grad_one = jax.jit(jax.grad(lambda p, x, y: loss_fn(apply_fn(p, x), y)))
  grads = [grad_one(params, batch[0][i : i + 1], batch[1][i : i + 1]) for i in range(n)]
  want_sum = jax.tree.map(lambda *g: np.sum(g, axis=0), *grads)
  want_sq = jax.tree.map(lambda *g: np.sum(np.square(g), axis=0), *grads)
  # The mean of the per-example gradients is the gradient of the batch-mean loss.
  batch_grad = jax.grad(lambda p: loss_fn(apply_fn(p, batch[0]), batch[1]))(params)
  for a, b in zip(jax.tree.leaves(want_sum), jax.tree.leaves(batch_grad), strict=True):
    np.testing.assert_allclose(a / n, b, rtol=1e-10, atol=1e-14)
  statistics = jax.jit(
    functools.partial(hfjax.squared_gradient_sum, apply_fn, loss_fn),
    static_argnames="chunk_size",
  )
  for chunk_size in CHUNK_SIZES:
    got_sum, got_sq = statistics(params, batch, chunk_size=chunk_size)
    assert_like_params(got_sum, params)
    assert_like_params(got_sq, params)
    for got, want in ((got_sum, want_sum), (got_sq, want_sq)):
      for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-14, err_msg=f"chunk={chunk_size}")


def test_diagonal_estimate_is_exact_for_one_output_per_example(x64):
  # With one output per example v_i = +-1, so (J_i^T H_i v_i)(J_i^T v_i) = H_i J_i^2 exactly.
  rng = np.random.default_rng(11)
  params = {"w": jnp.asarray(rng.normal(size=(3, 4))), "v": jnp.asarray(rng.normal(size=(4, 1)))}
  apply_fn = lambda p, x: jnp.tanh(x @ p["w"]) @ p["v"]
  batch = (
    jnp.asarray(rng.normal(size=(6, 3))),
    jnp.asarray(rng.integers(0, 2, (6, 1)), jnp.float64),
  )
  want = np.diag(dense_gauss_newton_and_hessian(apply_fn, sigmoid_cross_entropy, params, batch)[0])
  estimate = jax.jit(
    lambda key: hfjax.gauss_newton_diagonal_estimate(
      apply_fn, sigmoid_cross_entropy, params, batch, key, num_samples=3, chunk_size=4
    )
  )
  for seed in (0, 1):
    got = estimate(jax.random.key(seed))
    assert_like_params(got, params)
    np.testing.assert_allclose(ravel_pytree(got)[0], want, rtol=1e-10, atol=1e-14)


def test_diagonal_estimate_is_unbiased_and_independent_of_chunking(x64):
  apply_fn, loss_fn, params, batch = problem("dict", "softmax_ce", seed=12)
  params, batch = cast_floats((params, batch), jnp.float64)
  want = np.diag(dense_gauss_newton_and_hessian(apply_fn, loss_fn, params, batch)[0])

  @functools.partial(jax.jit, static_argnames="chunk_size")
  def estimate(key, chunk_size):
    return ravel_pytree(
      hfjax.gauss_newton_diagonal_estimate(
        apply_fn, loss_fn, params, batch, key, num_samples=64, chunk_size=chunk_size
      )
    )[0]

  # 4 examples in chunks of 3: the second chunk is padded.
  keys = jax.random.split(jax.random.key(0), 32)
  samples = np.stack([estimate(key, 3) for key in keys])
  mean = samples.mean(axis=0)
  standard_error = samples.std(axis=0, ddof=1) / np.sqrt(len(keys))
  # The estimator is random (most entries vary between keys) ...
  assert np.mean(standard_error > 1e-6 * np.abs(want).max()) > 0.5
  # ... its mean is the diagonal of G within a few standard errors ...
  np.testing.assert_array_less(np.abs(mean - want), 5 * standard_error + 1e-12)
  # ... and for a fixed key the chunking does not change it.
  np.testing.assert_allclose(estimate(keys[0], None), samples[0], rtol=1e-12, atol=1e-15)
