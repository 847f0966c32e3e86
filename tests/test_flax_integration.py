"""hessian_free in Flax training loops: Linen (apply with a params dict) and NNX (nnx.Optimizer)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from flax import nnx

import hfjax


def _regression_data(n=128, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.uniform(-2, 2, size=(n, 2)).astype(np.float32)
  y = (np.sin(x[:, :1]) * np.cos(x[:, 1:]) + 0.05 * rng.normal(size=(n, 1))).astype(np.float32)
  return x, y


def _squared_error(outputs, targets):
  return 0.5 * jnp.mean(jnp.sum((outputs - targets) ** 2, axis=-1))


class LinenMLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(1)(jnp.tanh(nn.Dense(16)(x)))


def test_linen_training_loop():
  x, y = _regression_data()
  model = LinenMLP()
  params = model.init(jax.random.key(0), x)["params"]
  apply_fn = lambda p, inputs: model.apply({"params": p}, inputs)
  tx = hfjax.hessian_free(apply_fn, _squared_error, initial_damping=1.0)
  state = tx.init(params)

  @jax.jit
  def train_step(params, state, batch):
    loss, grads = jax.value_and_grad(lambda p: _squared_error(apply_fn(p, batch[0]), batch[1]))(
      params
    )
    updates, state = tx.update(grads, state, params, batch=batch, loss=loss)
    return optax.apply_updates(params, updates), state, loss

  losses = []
  for _ in range(6):
    params, state, loss = train_step(params, state, (x, y))
    losses.append(float(loss))
  final = float(_squared_error(apply_fn(params, x), y))
  np.testing.assert_allclose(final, float(state.info.loss_after), rtol=1e-5)
  assert all(b < a for a, b in zip(losses, losses[1:], strict=False)), losses
  assert final < 0.3 * losses[0], (losses, final)
  assert jax.tree.structure(params) == jax.tree.structure(
    model.init(jax.random.key(1), x)["params"]
  )


class NNXMLP(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.hidden = nnx.Linear(2, 16, rngs=rngs)
    self.out = nnx.Linear(16, 1, rngs=rngs)
    self.calls = nnx.Variable(jnp.zeros((), jnp.int32))  # a non-parameter variable

  def __call__(self, x):
    return self.out(jnp.tanh(self.hidden(x)))


def test_nnx_optimizer_training_loop():
  x, y = _regression_data(seed=1)
  model = NNXMLP(nnx.Rngs(0))
  graphdef, _, rest = nnx.split(model, nnx.Param, ...)

  def apply_fn(params, inputs):
    # Rebuild the module from the static graph and the params hessian_free passes in.
    return nnx.merge(graphdef, params, rest)(inputs)

  tx = hfjax.hessian_free(apply_fn, _squared_error, initial_damping=1.0)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  @nnx.jit
  def train_step(model, optimizer, batch):
    def loss_fn(model):
      return _squared_error(model(batch[0]), batch[1])

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads, batch=batch, loss=loss)
    return loss

  losses = [float(train_step(model, optimizer, (x, y))) for _ in range(6)]
  final = float(_squared_error(model(x), y))
  assert all(b < a for a, b in zip(losses, losses[1:], strict=False)), losses
  assert final < 0.3 * losses[0], (losses, final)
  assert int(optimizer.step[...]) == 6
  opt_state = nnx.as_pure(optimizer.opt_state)
  assert int(optax.tree.get(opt_state, "count")) == 6
  assert bool(optax.tree.get(opt_state, "accepted"))
  np.testing.assert_allclose(float(optax.tree.get(opt_state, "loss_after")), final, rtol=1e-5)
