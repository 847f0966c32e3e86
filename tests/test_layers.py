"""Dense-layer discovery and capture (hfjax.layers) against hand-written models and jax.grad.

Two oracles for the captured statistics: a hand-written MLP whose pre-activations carry an
explicit added zero (the cotangent ``g`` is then ``jax.grad`` with respect to that zero), and,
for any model, the true parameter gradient of ``<u, apply_fn(params, x)>``, which must equal
``a^T g`` for each kernel and the sum of ``g`` for each bias.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import nnx

from hfjax import layers
from hfjax.experiments import models


def leaf_index(params, path):
  """The index in ``jax.tree.leaves(params)`` of the leaf whose keystr is ``path``."""
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  return paths.index(path)


def random_like(tree, seed=0):
  keys = jax.random.split(jax.random.key(seed), len(jax.tree.leaves(tree)))
  leaves = [
    jax.random.normal(k, jnp.shape(x), jnp.result_type(x))
    for k, x in zip(keys, jax.tree.leaves(tree), strict=True)
  ]
  return jax.tree.unflatten(jax.tree.structure(tree), leaves)


@functools.partial(jax.jit, static_argnums=(0, 3))
def statistics_and_gradients(apply_fn, params, inputs, layout):
  """layer_statistics with a random output cotangent u, and the true gradients for u."""
  outputs, activations, backward = layers.layer_statistics(apply_fn, params, inputs, layout)
  u = random_like(outputs, seed=1)
  grads = jax.grad(lambda p: optax.tree.vdot(u, apply_fn(p, inputs)))(params)
  return outputs, apply_fn(params, inputs), activations, backward(u), jax.tree.leaves(grads)


def assert_statistics(apply_fn, params, inputs, layout, rtol=1e-5, atol=1e-5):
  """Outputs equal apply_fn's, and a^T g / sum g equal the true kernel / bias gradients."""
  outputs, expected, activations, cotangents, grads = statistics_and_gradients(
    apply_fn, params, inputs, layout
  )
  close = functools.partial(np.testing.assert_allclose, rtol=rtol, atol=atol)
  jax.tree.map(close, outputs, expected)
  assert len(activations) == len(cotangents) == len(layout.layers)
  leaves = jax.tree.leaves(params)
  for layer, a, g in zip(layout.layers, activations, cotangents, strict=True):
    kernel = leaves[layer.kernel]
    d_in, d_out = kernel.shape[layer.kernel_in_axis], kernel.shape[1 - layer.kernel_in_axis]
    assert a.shape[-1] == d_in and g.shape[-1] == d_out and a.shape[:-1] == g.shape[:-1]
    a2 = np.asarray(a, np.float64).reshape(-1, d_in)
    g2 = np.asarray(g, np.float64).reshape(-1, d_out)
    kernel_grad = a2.T @ g2 if layer.kernel_in_axis == 0 else g2.T @ a2
    close(kernel_grad, grads[layer.kernel])
    if layer.bias is not None:
      close(g2.sum(0), grads[layer.bias])
  return outputs, activations, cotangents


def linen_layout(module, inputs):
  """A linen module's params (initialised on ``inputs``), its apply_fn and its layout."""
  params = module.init(jax.random.key(1), inputs)["params"]
  apply_fn = models.make_apply_fn(module)
  return params, apply_fn, layers.find_dense_layers(apply_fn, params, inputs)


def assert_unmatched(layout, params, reasons):
  """The unmatched leaves of ``layout`` are those at the paths of ``reasons``, for these."""
  expected = sorted((leaf_index(params, path), f"{path}: {why}") for path, why in reasons.items())
  assert list(zip(layout.unmatched, layout.reasons, strict=True)) == expected


# A plain pytree MLP, and the same MLP with explicit pre-activation perturbations.


def init_mlp(sizes, seed=0, dtype=jnp.float32):
  keys = jax.random.split(jax.random.key(seed), 2 * len(sizes))
  return [
    {
      "w": jax.random.normal(keys[2 * i], (m, n), dtype) / np.sqrt(m),
      "b": 0.1 * jax.random.normal(keys[2 * i + 1], (n,), dtype),
    }
    for i, (m, n) in enumerate(zip(sizes[:-1], sizes[1:], strict=True))
  ]


def mlp(params, x):
  for i, layer in enumerate(params):
    x = x @ layer["w"] + layer["b"]
    if i < len(params) - 1:
      x = jnp.tanh(x)
  return x


def mlp_with_perturbations(params, x, perturbations):
  """The MLP with a zero added to each pre-activation; returns outputs and layer inputs."""
  inputs = []
  for i, layer in enumerate(params):
    inputs.append(x)
    x = x @ layer["w"] + layer["b"] + perturbations[i]
    if i < len(params) - 1:
      x = jnp.tanh(x)
  return x, inputs


def test_plain_mlp_layout():
  params = init_mlp((5, 4, 3, 2))
  layout = layers.find_dense_layers(mlp, params, jnp.ones((6, 5)))
  # Leaves are [b0, w0, b1, w1, b2, w2] (dict keys sorted).
  assert layout == layers.LayerLayout(
    layers=(
      layers.DenseLayer(1, 0, 0, "[0]['w']"),
      layers.DenseLayer(3, 2, 0, "[1]['w']"),
      layers.DenseLayer(5, 4, 0, "[2]['w']"),
    ),
    unmatched=(),
    reasons=(),
  )
  assert hash(layout) == hash(layers.find_dense_layers(mlp, params, jnp.ones((6, 5))))


def test_plain_mlp_statistics_match_hand_computed_values(x64):
  params = init_mlp((5, 4, 3, 2), dtype=jnp.float64)
  x = jax.random.normal(jax.random.key(3), (7, 5), jnp.float64)
  u = jax.random.normal(jax.random.key(4), (7, 2), jnp.float64)
  layout = layers.find_dense_layers(mlp, params, x)

  @jax.jit
  def captured_and_expected(params, x, u):
    outputs, activations, backward = layers.layer_statistics(mlp, params, x, layout)
    zeros = [jnp.zeros((7, 4)), jnp.zeros((7, 3)), jnp.zeros((7, 2))]
    expected = mlp_with_perturbations(params, x, zeros)
    loss = lambda e: jnp.vdot(u, mlp_with_perturbations(params, x, e)[0])
    return (outputs, activations, backward(u)), (expected[0], expected[1], jax.grad(loss)(zeros))

  (outputs, activations, cotangents), expected = captured_and_expected(params, x, u)
  np.testing.assert_allclose(outputs, expected[0], rtol=1e-13)
  for a, expected_a in zip(activations, expected[1], strict=True):
    np.testing.assert_allclose(a, expected_a, rtol=1e-13)
  for g, expected_g in zip(cotangents, expected[2], strict=True):
    np.testing.assert_allclose(g, expected_g, rtol=1e-12, atol=1e-14)
  # The last layer is linear: its cotangent is u itself.
  np.testing.assert_array_equal(cotangents[-1], u)
  assert_statistics(mlp, params, x, layout, rtol=1e-10, atol=1e-12)


def test_statistics_under_jit_with_layout_as_static_data():
  params = init_mlp((5, 4, 2))
  x = jax.random.normal(jax.random.key(0), (3, 5))
  u = jax.random.normal(jax.random.key(1), (3, 2))
  layout = layers.find_dense_layers(mlp, params, x)

  @functools.partial(jax.jit, static_argnames="layout")
  def statistics(params, x, u, layout):
    outputs, activations, backward = layers.layer_statistics(mlp, params, x, layout)
    return outputs, activations, backward(u)

  eager = layers.layer_statistics(mlp, params, x, layout)
  jitted = statistics(params, x, u, layout=layout)
  close = functools.partial(np.testing.assert_allclose, rtol=1e-6, atol=1e-6)
  jax.tree.map(close, jitted, (eager[0], eager[1], eager[2](u)))


def test_find_dense_layers_on_abstract_values_and_tracers():
  params = init_mlp((5, 4, 2))
  x = jnp.ones((3, 5))
  layout = layers.find_dense_layers(mlp, params, x)
  shapes = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype), (params, x))
  assert layers.find_dense_layers(mlp, *shapes) == layout
  # A different batch size gives the same layout.
  assert layers.find_dense_layers(mlp, params, jnp.ones((9, 5))) == layout
  found = []

  @jax.jit
  def traced(params, x):
    found.append(layers.find_dense_layers(mlp, params, x))
    outputs, _, backward = layers.layer_statistics(mlp, params, x, found[-1])
    return backward(outputs)

  traced(params, x)
  assert found == [layout]


# Flax linen and NNX models.


class LinenMLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(6, name="first")(x))
    x = nn.Dense(4, use_bias=False, name="second")(x)
    return nn.Dense(3, name="third")(jnp.tanh(x))


def test_linen_mlp():
  model = LinenMLP()
  x = jax.random.normal(jax.random.key(0), (5, 7))
  params, apply_fn, layout = linen_layout(model, x)
  index = functools.partial(leaf_index, params)
  assert layout.layers == (
    layers.DenseLayer(
      index("['first']['kernel']"), index("['first']['bias']"), 0, "['first']['kernel']"
    ),
    layers.DenseLayer(index("['second']['kernel']"), None, 0, "['second']['kernel']"),
    layers.DenseLayer(
      index("['third']['kernel']"), index("['third']['bias']"), 0, "['third']['kernel']"
    ),
  )
  assert layout.unmatched == ()
  assert_statistics(apply_fn, params, x, layout)


@pytest.mark.parametrize(
  "model, names, inputs",
  [
    (
      models.DeepAutoencoder((8, 4, 2)),
      ["encoder_0", "encoder_1", "encoder_2", "decoder_0", "decoder_1", "decoder_2"],
      jax.random.uniform(jax.random.key(0), (6, 10)),
    ),
    (
      models.MLPClassifier((8, 5), num_classes=3, activation="relu"),
      ["hidden_0", "hidden_1", "output"],
      jax.random.normal(jax.random.key(0), (6, 10)),
    ),
  ],
)
def test_project_models(model, names, inputs):
  params, apply_fn, layout = linen_layout(model, inputs)
  index = functools.partial(leaf_index, params)
  assert layout.layers == tuple(
    layers.DenseLayer(
      index(f"['{n}']['kernel']"), index(f"['{n}']['bias']"), 0, f"['{n}']['kernel']"
    )
    for n in names
  )
  assert layout.unmatched == () and layout.reasons == ()
  assert_statistics(apply_fn, params, inputs, layout)


class NNXNet(nnx.Module):
  def __init__(self, rngs):
    self.hidden = nnx.Linear(5, 6, rngs=rngs)
    self.norm = nnx.LayerNorm(6, rngs=rngs)
    self.out = nnx.Linear(6, 2, use_bias=False, rngs=rngs)

  def __call__(self, x):
    return self.out(nnx.gelu(self.norm(self.hidden(x))))


def test_nnx_model_through_split_and_merge():
  model = NNXNet(nnx.Rngs(0))
  params = nnx.state(model, nnx.Param)
  apply_fn = models.make_apply_fn(model)
  x = jax.random.normal(jax.random.key(0), (4, 5))
  layout = layers.find_dense_layers(apply_fn, params, x)
  index = functools.partial(leaf_index, params)
  assert layout.layers == (
    layers.DenseLayer(
      index("['hidden']['kernel'].value"),
      index("['hidden']['bias'].value"),
      0,
      "['hidden']['kernel'].value",
    ),
    layers.DenseLayer(index("['out']['kernel'].value"), None, 0, "['out']['kernel'].value"),
  )
  # LayerNorm's scale multiplies and its bias is added to a normalised value, not to a dot.
  assert_unmatched(
    layout,
    params,
    {
      "['norm']['bias'].value": "not in a dense layer: used by add",
      "['norm']['scale'].value": "not in a dense layer: used by mul",
    },
  )
  assert_statistics(apply_fn, params, x, layout)


def test_sequence_inputs_through_dense():
  model = nn.Sequential([nn.Dense(6), nn.tanh, nn.Dense(3)])
  x = jax.random.normal(jax.random.key(0), (4, 5, 7))  # (N, T, d)
  params, apply_fn, layout = linen_layout(model, x)
  assert [(layer.path, layer.bias is not None) for layer in layout.layers] == [
    ("['layers_0']['kernel']", True),
    ("['layers_2']['kernel']", True),
  ]
  _, activations, cotangents = assert_statistics(apply_fn, params, x, layout)
  assert [a.shape for a in activations] == [(4, 5, 7), (4, 5, 6)]
  assert [g.shape for g in cotangents] == [(4, 5, 6), (4, 5, 3)]
  np.testing.assert_array_equal(activations[0], x)


def test_half_precision_dense_casts_are_seen_through():
  model = nn.Sequential([nn.Dense(6, dtype=jnp.bfloat16), nn.relu, nn.Dense(3)])
  x = jax.random.normal(jax.random.key(0), (4, 5))
  params, apply_fn, layout = linen_layout(model, x)
  assert [layer.bias is not None for layer in layout.layers] == [True, True]
  outputs, activations, backward = layers.layer_statistics(apply_fn, params, x, layout)
  np.testing.assert_array_equal(outputs, apply_fn(params, x))
  assert activations[0].dtype == jnp.bfloat16 and backward(outputs)[0].dtype == jnp.bfloat16


# Other ways to write a dense layer.


def transposed_apply(params, x):
  h = jnp.tanh(x @ params["a"].T + params["a_bias"])
  h = jnp.tanh(jnp.einsum("bi,oi->bo", h, params["b"]))
  # The kernel as the lhs: the output is (d_out, batch) and the bias broadcasts along rows.
  z = jax.lax.dot_general(params["c"], h, (((1,), (1,)), ((), ())))
  return (z + params["c_bias"][:, None]).T


def test_transposed_and_lhs_kernels():
  keys = jax.random.split(jax.random.key(0), 5)
  params = {
    "a": jax.random.normal(keys[0], (6, 5)),
    "a_bias": jax.random.normal(keys[1], (6,)),
    "b": jax.random.normal(keys[2], (4, 6)),
    "c": jax.random.normal(keys[3], (3, 4)),
    "c_bias": jax.random.normal(keys[4], (3,)),
  }
  x = jax.random.normal(jax.random.key(1), (7, 5))
  layout = layers.find_dense_layers(transposed_apply, params, x)
  # Leaves: a, a_bias, b, c, c_bias.
  assert layout.layers == (
    layers.DenseLayer(0, 1, 1, "['a']"),
    layers.DenseLayer(2, None, 1, "['b']"),
    layers.DenseLayer(3, 4, 1, "['c']"),
  )
  _, _, cotangents = assert_statistics(transposed_apply, params, x, layout)
  assert [g.shape for g in cotangents] == [(7, 6), (7, 4), (7, 3)]


def test_single_example_matrix_vector_layer():
  params = {"w": jnp.arange(12.0).reshape(4, 3) / 10, "b": jnp.arange(4.0)}
  apply_fn = lambda p, x: jnp.sin(p["w"] @ x + p["b"])
  x = jnp.array([0.5, -1.0, 2.0])
  layout = layers.find_dense_layers(apply_fn, params, x)
  assert layout.layers == (layers.DenseLayer(1, 0, 1, "['w']"),)
  _, (a,), (g,) = assert_statistics(apply_fn, params, x, layout)
  np.testing.assert_array_equal(a, x)
  u = random_like(jnp.zeros(4), seed=1)
  np.testing.assert_allclose(g, u * jnp.cos(params["w"] @ x + params["b"]), rtol=1e-6)


@jax.jit
def jitted_dense(x, w, b):
  return x @ w + b


@jax.custom_vjp
def custom_dense(x, w):
  return x @ w


custom_dense.defvjp(lambda x, w: (x @ w, (x, w)), lambda res, g: (g @ res[1].T, res[0].T @ g))


@jax.custom_jvp
def tanh_dense(x, w, b):
  return jnp.tanh(x @ w + b)


@tanh_dense.defjvp
def _tanh_dense_jvp(primals, tangents):
  (x, w, b), (dx, dw, db) = primals, tangents
  y = tanh_dense(x, w, b)
  return y, (1 - y**2) * (dx @ w + x @ dw + db)


def nested_apply(params, x):
  # The same jitted function twice (one jaxpr, two call sites), a layer inside a checkpoint
  # whose bias is added outside it, one inside a custom_jvp and one inside a custom_vjp.
  h = jnp.tanh(jitted_dense(x, params[0]["w"], params[0]["b"]))
  h = jnp.tanh(jitted_dense(h, params[1]["w"], params[1]["b"]))
  h = jnp.tanh(jax.checkpoint(lambda h: h @ params[2]["w"])(h) + params[2]["b"])
  h = tanh_dense(h, params[3]["w"], params[3]["b"])
  return jax.jit(lambda h: custom_dense(h, params[4]["w"]) + params[4]["b"])(h)


def test_layers_inside_jit_checkpoint_and_custom_derivatives():
  params = init_mlp((4, 4, 4, 4, 3, 2))
  x = jax.random.normal(jax.random.key(0), (5, 4))
  layout = layers.find_dense_layers(nested_apply, params, x)
  assert layout == layers.find_dense_layers(mlp, params, x)
  assert len(layout.layers) == 5 and all(layer.bias is not None for layer in layout.layers)
  assert_statistics(nested_apply, params, x, layout)
  # Capture is independent of how the model is written.
  _, _, plain_a, plain_g, _ = statistics_and_gradients(mlp, params, x, layout)
  _, _, nested_a, nested_g, _ = statistics_and_gradients(nested_apply, params, x, layout)
  for got, expected in zip(nested_a + nested_g, plain_a + plain_g, strict=True):
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_a_subset_of_the_layers():
  params = init_mlp((5, 4, 3, 2))
  x = jax.random.normal(jax.random.key(0), (6, 5))
  layout = layers.find_dense_layers(mlp, params, x)
  _, _, all_a, all_g, _ = statistics_and_gradients(mlp, params, x, layout)
  subset = layout._replace(layers=layout.layers[2:0:-1])
  _, _, some_a, some_g, _ = statistics_and_gradients(mlp, params, x, subset)
  for got, expected in zip(some_a + some_g, all_a[2:0:-1] + all_g[2:0:-1], strict=True):
    np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_pytree_outputs_and_a_model_without_dense_layers():
  params = init_mlp((3, 4, 2))
  x = jax.random.normal(jax.random.key(0), (5, 3))

  def two_outputs(p, x):
    hidden = jnp.tanh(x @ p[0]["w"] + p[0]["b"])
    return {"hidden": hidden, "out": hidden @ p[1]["w"] + p[1]["b"]}

  layout = layers.find_dense_layers(two_outputs, params, x)
  # The first layer's pre-activation feeds both outputs; its cotangent sums both paths.
  assert len(layout.layers) == 2 and layout.unmatched == ()
  assert_statistics(two_outputs, params, x, layout)
  elementwise = lambda p, x: jnp.sin(x * p["scale"])
  params = {"scale": jnp.arange(3.0)}
  layout = layers.find_dense_layers(elementwise, params, x)
  assert layout.layers == () and layout.unmatched == (0,)
  outputs, activations, backward = layers.layer_statistics(elementwise, params, x, layout)
  np.testing.assert_array_equal(outputs, elementwise(params, x))
  assert activations == () and backward(outputs) == ()


# What falls back to the diagonal, and why.


def test_tied_weights_autoencoder():
  keys = jax.random.split(jax.random.key(0), 4)
  params = {
    "w": jax.random.normal(keys[0], (6, 3)),
    "enc_bias": jax.random.normal(keys[1], (3,)),
    "dec_bias": jax.random.normal(keys[2], (6,)),
    "head": {"w": jax.random.normal(keys[3], (6, 2))},
  }

  def apply_fn(p, x):
    code = nn.sigmoid(x @ p["w"] + p["enc_bias"])
    return nn.sigmoid(code @ p["w"].T + p["dec_bias"]) @ p["head"]["w"]

  x = jax.random.normal(jax.random.key(1), (4, 6))
  layout = layers.find_dense_layers(apply_fn, params, x)
  # Leaves: dec_bias, enc_bias, head.w, w.
  assert layout.layers == (layers.DenseLayer(2, None, 0, "['head']['w']"),)
  assert_unmatched(
    layout,
    params,
    {
      "['dec_bias']": "the bias of ['w'], whose kernel is unmatched",
      "['enc_bias']": "the bias of ['w'], whose kernel is unmatched",
      "['w']": "shared by 2 dense layers (tied weights: the curvature block is a sum of "
      "Kronecker products, one per use, not one Kronecker product)",
    },
  )
  assert_statistics(apply_fn, params, x, layout)


class ConvNet(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(4, (3, 3), name="conv")(x))
    return nn.Dense(3, name="head")(x.reshape(x.shape[0], -1))


def test_convolution_kernel_falls_back_and_dense_head_is_matched():
  model = ConvNet()
  x = jax.random.normal(jax.random.key(0), (2, 5, 5, 3))
  params, apply_fn, layout = linen_layout(model, x)
  index = functools.partial(leaf_index, params)
  assert layout.layers == (
    layers.DenseLayer(
      index("['head']['kernel']"), index("['head']['bias']"), 0, "['head']['kernel']"
    ),
  )
  assert_unmatched(
    layout,
    params,
    {
      "['conv']['bias']": "not in a dense layer: used by add",
      "['conv']['kernel']": "not in a dense layer: used by conv_general_dilated",
    },
  )
  assert_statistics(apply_fn, params, x, layout)


def test_reasons_for_other_parameters():
  keys = iter(jax.random.split(jax.random.key(0), 11))
  normal = lambda shape: jax.random.normal(next(keys), shape)
  params = {
    "embedding": normal((5, 3)),  # gather
    "w1": normal((3, 4)),  # a dense kernel also in a penalty
    "w2": normal((4, 4)),  # its output is used before its bias add
    "b2": normal((4,)),
    "scale": normal((4,)),
    "w3": normal((4, 2)),
    "b3": normal((2,)),
    "columns": normal((2, 3)),  # contracts the input's first axis
    "offset": normal(()),
    "unused": normal((2,)),
    "recurrent": normal((2, 2)),  # a kernel inside a scan body
  }

  def apply_fn(p, ids):
    x = p["embedding"][ids]
    z2 = (x @ p["w1"]) @ p["w2"]
    h = jnp.tanh(z2 + p["b2"]) * p["scale"] + z2
    out = h @ p["w3"] + p["b3"]
    loop = jax.lax.scan(lambda c, _: (jnp.tanh(c @ p["recurrent"]), None), out, None, 3)[0]
    return loop + jnp.sum(p["w1"] ** 2) + jnp.sum(p["columns"] @ x.T) + p["offset"]

  ids = jnp.array([0, 3, 4, 1])
  layout = layers.find_dense_layers(apply_fn, params, ids)
  index = functools.partial(leaf_index, params)
  assert layout.layers == (
    layers.DenseLayer(index("['w2']"), None, 0, "['w2']"),
    layers.DenseLayer(index("['w3']"), index("['b3']"), 0, "['w3']"),
  )
  assert_unmatched(
    layout,
    params,
    {
      "['embedding']": "not in a dense layer: used by gather",
      "['w1']": "the kernel of a dense layer but also used by integer_pow, so its curvature "
      "block is not one Kronecker product",
      "['b2']": "the bias of ['w2'], whose output is also used by add, so the bias gradient "
      "is not the sum of that layer's output cotangent",
      "['scale']": "not in a dense layer: used by mul",
      "['columns']": "not in a dense layer: used by dot_general contracting kernel axes (1,) "
      "with axes (0,) of a 2-D input (a dense layer contracts one kernel axis with the "
      "input's last axis)",
      "['offset']": "not in a dense layer: used by add",
      "['unused']": "not used by apply_fn",
      "['recurrent']": "not in a dense layer: used by scan",
    },
  )
  assert_statistics(apply_fn, params, ids, layout)


def test_length_one_parameter_is_a_bias_only_of_a_one_unit_layer():
  params = {"w": jnp.ones((3, 4)), "c": jnp.ones(1), "v": jnp.ones((4, 1)), "d": jnp.ones(1)}
  apply_fn = lambda p, x: jnp.tanh(x @ p["w"] + p["c"]) @ p["v"] + p["d"]
  layout = layers.find_dense_layers(apply_fn, params, jnp.ones((2, 3)))
  # Leaves: c, d, v, w.
  assert layout.layers == (
    layers.DenseLayer(3, None, 0, "['w']"),
    layers.DenseLayer(2, 1, 0, "['v']"),
  )
  assert_unmatched(layout, params, {"['c']": "not in a dense layer: used by add"})


# Bad input.


def test_bad_input():
  params = init_mlp((3, 2))
  x = jnp.ones((2, 3))
  with pytest.raises(TypeError, match="apply_fn must be callable"):
    layers.find_dense_layers("mlp", params, x)
  with pytest.raises(TypeError, match="layout must be a LayerLayout"):
    layers.layer_statistics(mlp, params, x, ((1, 0, 0, "w"),))
  wrong = layers.LayerLayout((layers.DenseLayer(1, None, 0, "[0]['w']"),), (0,), ("b",))
  with pytest.raises(ValueError, match="not a dense layer of apply_fn"):
    layers.layer_statistics(mlp, params, x, wrong)
  other = layers.find_dense_layers(lambda p, x: x @ p["a"].T, {"a": jnp.ones((2, 3))}, x)
  with pytest.raises(ValueError, match="recompute it with find_dense_layers"):
    layers.layer_statistics(mlp, params, x, other)
