"""Tests for hfjax.experiments.models."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hfjax.experiments import models


def _sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


def _dense(params, x):
  return x @ np.asarray(params["kernel"], np.float64) + np.asarray(params["bias"], np.float64)


# sparse_init


# The full-size layers are checked through the CURVES autoencoder below.
@pytest.mark.parametrize(
  "shape, num_nonzero",
  [((40, 20), 15), ((6, 25), 15), ((15, 3), 15), ((100, 30), 4), ((3, 3, 4, 8), 15)],
)
def test_sparse_init_exact_incoming_count(shape, num_nonzero):
  kernel = models.sparse_init(num_nonzero)(jax.random.key(0), shape)
  assert kernel.shape == shape and kernel.dtype == jnp.float32
  fan_in = int(np.prod(shape[:-1]))
  incoming = np.count_nonzero(np.asarray(kernel).reshape(fan_in, shape[-1]), axis=0)
  np.testing.assert_array_equal(incoming, min(num_nonzero, fan_in))


def test_sparse_init_positions_and_values_are_random():
  init = models.sparse_init(15, scale=2.0)
  first = np.asarray(init(jax.random.key(0), (300, 200)))
  second = np.asarray(init(jax.random.key(1), (300, 200)))
  np.testing.assert_array_equal(first, np.asarray(init(jax.random.key(0), (300, 200))))
  # Each column picks its own rows, and different keys pick different ones.
  assert len({tuple(np.flatnonzero(column)) for column in first.T}) == 200
  assert not np.array_equal(first != 0, second != 0)
  # Rows are picked uniformly, not favouring the first ones: half the 3000 non-zeros (give or
  # take 27, one standard deviation) fall in the first half of the rows.
  assert abs(np.count_nonzero(first[:150]) - 1500) < 150
  values = first[first != 0]
  assert abs(values.mean()) < 0.2
  assert values.std() == pytest.approx(2.0, rel=0.05)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_sparse_init_dtype(dtype):
  kernel = models.sparse_init()(jax.random.key(0), (40, 7), dtype)
  assert kernel.dtype == dtype
  np.testing.assert_array_equal(np.count_nonzero(np.asarray(kernel, np.float32), axis=0), 15)


def test_sparse_init_float64():
  with jax.enable_x64(True):
    kernel = models.sparse_init()(jax.random.key(0), (40, 7), jnp.float64)
    assert kernel.dtype == jnp.float64
    np.testing.assert_array_equal(np.count_nonzero(np.asarray(kernel), axis=0), 15)


def test_sparse_init_errors():
  with pytest.raises(ValueError, match="num_nonzero"):
    models.sparse_init(0)
  with pytest.raises(ValueError, match="scale"):
    models.sparse_init(scale=-1.0)
  with pytest.raises(ValueError, match="2 dimensions"):
    models.sparse_init()(jax.random.key(0), (10,))


# DeepAutoencoder


@pytest.mark.parametrize(
  "encoder_sizes, input_size",
  [(models.CURVES_ENCODER, 784), (models.MNIST_ENCODER, 784), ((20, 5), 64)],
)
def test_autoencoder_layers_are_mirrored_and_sparse(encoder_sizes, input_size):
  model = models.DeepAutoencoder(encoder_sizes)
  params = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, input_size)))["params"]
  depth = len(encoder_sizes)
  assert set(params) == {f"{part}_{i}" for part in ("encoder", "decoder") for i in range(depth)}
  widths = [input_size, *encoder_sizes, *reversed(encoder_sizes[:-1]), input_size]
  names = [f"encoder_{i}" for i in range(depth)] + [f"decoder_{i}" for i in range(depth)]
  for name, fan_in, fan_out in zip(names, widths[:-1], widths[1:], strict=True):
    assert params[name]["kernel"].shape == (fan_in, fan_out)
    assert params[name]["bias"].shape == (fan_out,)


# Model tests share one initialisation per architecture: compiling the random number
# generator for each layer dominates their run time.


@pytest.fixture(scope="module")
def autoencoder():
  # Widths 24-20-4-20-24: layers with more and with fewer than 15 inputs.
  model = models.DeepAutoencoder((20, 4))
  params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 24)))["params"]
  return model, params


def test_autoencoder_init_counts_and_zero_biases(autoencoder):
  _, params = autoencoder
  assert len(params) == 4
  for layer in params.values():
    kernel = np.asarray(layer["kernel"])
    np.testing.assert_array_equal(np.count_nonzero(kernel, axis=0), min(15, kernel.shape[0]))
    np.testing.assert_array_equal(np.asarray(layer["bias"]), 0.0)


def test_autoencoder_forward_matches_numpy(autoencoder):
  model, params = autoencoder
  x = np.random.default_rng(0).uniform(size=(5, 24)).astype(np.float32)
  # Non-zero biases so that they are checked too.
  params = jax.tree.map(lambda p: np.asarray(p) + np.float32(0.1), params)
  h = _sigmoid(_dense(params["encoder_0"], np.asarray(x, np.float64)))
  code = _dense(params["encoder_1"], h)  # the code layer is linear
  logits = _dense(params["decoder_1"], _sigmoid(_dense(params["decoder_0"], code)))
  outputs = jax.jit(models.make_apply_fn(model))(params, x)
  assert outputs.shape == x.shape
  np.testing.assert_allclose(outputs, logits, rtol=1e-5, atol=1e-5)


def test_autoencoder_rejects_empty_sizes():
  with pytest.raises(ValueError, match="encoder_sizes"):
    models.DeepAutoencoder(()).init(jax.random.key(0), jnp.zeros((1, 4)))


# MLPClassifier


@pytest.fixture(scope="module")
def mlp_params():
  # Parameters depend on the layer sizes only, so every activation can share them.
  model = models.MLPClassifier((16, 6), num_classes=3)
  return jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 20)))["params"]


@pytest.mark.parametrize(
  "activation, reference",
  [
    ("sigmoid", _sigmoid),
    ("tanh", np.tanh),
    ("relu", lambda x: np.maximum(x, 0.0)),
    (jax.nn.softplus, lambda x: np.log1p(np.exp(x))),
  ],
)
def test_mlp_forward_matches_numpy(mlp_params, activation, reference):
  model = models.MLPClassifier((16, 6), num_classes=3, activation=activation)
  x = np.random.default_rng(0).normal(size=(4, 20)).astype(np.float32)
  h = np.asarray(x, np.float64)
  for name in ("hidden_0", "hidden_1"):
    h = reference(_dense(mlp_params[name], h))
  logits = _dense(mlp_params["output"], h)
  outputs = jax.jit(models.make_apply_fn(model))(mlp_params, x)
  assert outputs.shape == (4, 3)
  np.testing.assert_allclose(outputs, logits, rtol=1e-5, atol=1e-5)


def test_mlp_sparse_init(mlp_params):
  assert set(mlp_params) == {"hidden_0", "hidden_1", "output"}
  for name, incoming in (("hidden_0", 15), ("hidden_1", 15), ("output", 6)):
    kernel = np.asarray(mlp_params[name]["kernel"])
    np.testing.assert_array_equal(np.count_nonzero(kernel, axis=0), incoming)
    np.testing.assert_array_equal(np.asarray(mlp_params[name]["bias"]), 0.0)


def test_mlp_unknown_activation():
  with pytest.raises(ValueError, match="'gelu'.*sigmoid, tanh, relu"):
    models.MLPClassifier((3,), 2, activation="gelu").init(jax.random.key(0), jnp.zeros((1, 4)))


# make_apply_fn


def test_make_apply_fn_linen_takes_plain_params(mlp_params):
  model = models.MLPClassifier((16, 6), num_classes=3)
  x = jnp.ones((2, 20))
  apply_fn = jax.jit(models.make_apply_fn(model))
  expected = jax.jit(model.apply)({"params": mlp_params}, x)
  np.testing.assert_allclose(apply_fn(mlp_params, x), expected)


def test_make_apply_fn_nnx():
  layer = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
  params = nnx.state(layer, nnx.Param)
  x = jnp.arange(12.0).reshape(4, 3)
  apply_fn = models.make_apply_fn(layer)
  np.testing.assert_allclose(jax.jit(apply_fn)(params, x), layer(x), rtol=1e-6)
  # Params are an input, not captured: other values give other outputs, and they linearise.
  doubled = jax.tree.map(lambda p: 2 * p, params)
  np.testing.assert_allclose(apply_fn(doubled, x), 2 * layer(x), rtol=1e-6)
  _, jvp = jax.linearize(lambda p: apply_fn(p, x), params)
  np.testing.assert_allclose(jvp(params), layer(x), rtol=1e-6)


# Losses


def _random(shape, seed):
  return np.random.default_rng(seed).normal(size=shape)


@pytest.mark.parametrize("shape", [(6, 10), (4, 3, 5)])
def test_sigmoid_cross_entropy_matches_numpy(x64, shape):
  logits = 3 * _random(shape, 0)
  targets = np.random.default_rng(1).uniform(size=shape)
  p = _sigmoid(logits)
  expected = -np.sum(targets * np.log(p) + (1 - targets) * np.log(1 - p)) / shape[0]
  loss = models.sigmoid_cross_entropy(jnp.asarray(logits), jnp.asarray(targets))
  assert loss.shape == () and loss.dtype == jnp.float64
  np.testing.assert_allclose(loss, expected, rtol=1e-12)


def test_softmax_cross_entropy_matches_numpy(x64):
  logits = 3 * _random((7, 4), 0)
  labels = np.array([0, 3, 1, 1, 2, 0, 3])
  shifted = logits - logits.max(axis=1, keepdims=True)
  log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
  expected = -np.mean(log_probs[np.arange(7), labels])
  loss = models.softmax_cross_entropy(jnp.asarray(logits), jnp.asarray(labels))
  assert loss.shape == ()
  np.testing.assert_allclose(loss, expected, rtol=1e-12)


@pytest.mark.parametrize("shape", [(6, 10), (4, 3, 5)])
def test_squared_error_and_reconstruction_error_match_numpy(x64, shape):
  outputs, targets = _random(shape, 0), np.random.default_rng(1).uniform(size=shape)
  squared = models.squared_error(jnp.asarray(outputs), jnp.asarray(targets))
  np.testing.assert_allclose(squared, 0.5 * np.sum((outputs - targets) ** 2) / shape[0])
  reconstruction = models.reconstruction_error(jnp.asarray(outputs), jnp.asarray(targets))
  expected = np.sum((_sigmoid(outputs) - targets) ** 2) / shape[0]
  np.testing.assert_allclose(reconstruction, expected, rtol=1e-12)


def test_losses_are_jittable_and_differentiable():
  logits = jnp.asarray(_random((5, 8), 0), jnp.float32)
  targets = jnp.asarray(np.random.default_rng(1).uniform(size=(5, 8)), jnp.float32)
  grad = jax.jit(jax.grad(models.sigmoid_cross_entropy))(logits, targets)
  # The matching-loss gradient: (sigmoid(z) - t) / batch.
  np.testing.assert_allclose(grad, (jax.nn.sigmoid(logits) - targets) / 5, rtol=1e-5, atol=1e-7)


def test_accuracy_against_hand_count():
  logits = jnp.array(
    [
      [0.1, 2.0, -1.0],  # predicts 1
      [3.0, 0.0, 0.0],  # predicts 0
      [0.0, 0.0, 5.0],  # predicts 2
      [1.0, 1.5, 0.5],  # predicts 1
      [-2.0, -1.0, -3.0],  # predicts 1
    ]
  )
  labels = jnp.array([1, 2, 2, 0, 1])
  np.testing.assert_allclose(models.accuracy(logits, labels), 3 / 5)
