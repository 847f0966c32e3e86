"""A small two-layer regression problem shared by the end-to-end optimizer tests."""

import jax
import jax.numpy as jnp
import numpy as np
import optax


def apply_fn(params, inputs):
  return jnp.tanh(inputs @ params["w1"] + params["b1"]) @ params["w2"] + params["b2"]


def loss_fn(outputs, targets):
  return 0.5 * jnp.mean(jnp.sum((outputs - targets) ** 2, axis=-1))


def init_params(seed=0):
  k1, k2 = jax.random.split(jax.random.key(seed))
  return {
    "w1": 0.5 * jax.random.normal(k1, (4, 8)),
    "b1": jnp.zeros(8),
    "w2": 0.5 * jax.random.normal(k2, (8, 2)),
    "b2": jnp.zeros(2),
  }


def regression_data(num_examples):
  x = np.random.default_rng(0).normal(size=(num_examples, 4)).astype(np.float32)
  return x, np.stack([np.sin(x[:, 0]), x[:, 1] * x[:, 2]], axis=-1)


def make_step(tx, apply_fn=apply_fn, loss_fn=loss_fn):
  """A jitted training step: value_and_grad, ``tx.update`` with both batches, apply."""

  @jax.jit
  def step(params, state, batch, curvature_batch):
    loss, grads = jax.value_and_grad(lambda p: loss_fn(apply_fn(p, batch[0]), batch[1]))(params)
    updates, state = tx.update(
      grads, state, params, batch=batch, curvature_batch=curvature_batch, loss=loss
    )
    return optax.apply_updates(params, updates), state

  return step
