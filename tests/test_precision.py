"""Dtypes: float32 by default, float64 under x64, bfloat16 params with float32 accumulation.

The carried state must come out of ``update`` with exactly the dtypes (and shapes) it went in
with, or a jitted training loop would recompile on the second step (or fail under x64).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

import hfjax


def apply_fn(params, inputs):
  hidden = jnp.tanh(inputs.astype(params["w1"].dtype) @ params["w1"] + params["b1"])
  return hidden @ params["w2"] + params["b2"]


def loss_fn(outputs, targets):
  return 0.5 * jnp.mean(jnp.sum((outputs.astype(jnp.float32) - targets) ** 2, axis=-1))


def _params(dtype):
  k1, k2 = jax.random.split(jax.random.key(0))
  params = {
    "w1": 0.5 * jax.random.normal(k1, (4, 8)),
    "b1": jnp.zeros(8),
    "w2": 0.5 * jax.random.normal(k2, (8, 2)),
    "b2": jnp.zeros(2),
  }
  return jax.tree.map(lambda x: x.astype(dtype), params)


def _batch(seed, dtype=jnp.float32):
  x = jax.random.normal(jax.random.key(seed), (32, 4), dtype)
  return x, jnp.stack([jnp.sin(x[:, 0]), x[:, 1] * x[:, 2]], axis=-1)


def _tx():
  return hfjax.hessian_free(
    apply_fn, loss_fn, preconditioner="lbfgs", lbfgs_pairs="previous", max_cg_steps=20
  )


def _step_fn(tx):
  def step(params, state, batch):
    loss, grads = jax.value_and_grad(lambda p: loss_fn(apply_fn(p, batch[0]), batch[1]))(params)
    updates, state = tx.update(grads, state, params, batch=batch, loss=loss)
    return optax.apply_updates(params, updates), state, updates

  return step


def _vector_dtypes(state):
  """Dtypes of the parameter-shaped parts of the state: warm start and L-BFGS memory."""
  return {
    jnp.dtype(x.dtype)
    for x in jax.tree.leaves((state.warm_start, state.lbfgs.s_memory, state.lbfgs.y_memory))
  } | {jnp.dtype(state.lbfgs.sy_products.dtype)}


def _avals(tree):
  return jax.tree.map(lambda x: (x.shape, x.dtype), tree)


def _check_update_types(tx, params, state, batch, vector_dtype, param_dtype):
  params_out, state_out, updates = jax.eval_shape(_step_fn(tx), params, state, batch)
  assert _avals(state_out) == _avals(state)  # the carried state never drifts
  assert _avals(params_out) == _avals(params)
  assert {jnp.dtype(u.dtype) for u in jax.tree.leaves(updates)} == {jnp.dtype(param_dtype)}
  assert _vector_dtypes(state_out) == {jnp.dtype(vector_dtype)}
  # Scalars of the state (damping, diagnostics) are float32 whatever the params.
  assert state_out.damping.dtype == jnp.float32


def _train(tx, params, batches):
  step = jax.jit(_step_fn(tx))
  state = tx.init(params)
  losses = []
  for batch in batches:
    params, state, updates = step(params, state, batch)
    info = state.info
    losses.append((float(info.loss_before), float(info.loss_after), bool(info.accepted)))
  assert step._cache_size() == 1
  return params, state, updates, losses


def test_float32_by_default():
  params = _params(jnp.float32)
  tx = _tx()
  state = jax.eval_shape(tx.init, params)
  _check_update_types(tx, params, state, _batch(1), jnp.float32, jnp.float32)


def test_float64_under_x64():
  with jax.enable_x64(True):
    params = _params(jnp.float64)
    tx = _tx()
    state = tx.init(params)
    batch = _batch(1, jnp.float64)
    assert batch[1].dtype == jnp.float64
    _check_update_types(tx, params, state, batch, jnp.float64, jnp.float64)
    params, state, updates, losses = _train(tx, params, [_batch(s, jnp.float64) for s in (1, 2, 3)])
    assert {x.dtype for x in jax.tree.leaves((params, updates))} == {jnp.dtype(jnp.float64)}
    assert _vector_dtypes(state) == {jnp.dtype(jnp.float64)}
  assert losses[-1][1] < losses[0][0]
  assert all(accepted for _, _, accepted in losses)
  assert int(state.lbfgs.num_pairs) > 0


def test_bfloat16_params_accumulate_in_float32():
  params = _params(jnp.bfloat16)
  tx = _tx()
  state = tx.init(params)
  _check_update_types(tx, params, state, _batch(1), jnp.float32, jnp.bfloat16)

  # CG itself solves a bfloat16 right-hand side in float32 (iterates and memory included).
  b = jax.tree.map(lambda p: jnp.ones_like(p), params)
  result = jax.eval_shape(
    lambda b: hfjax.cg(lambda v: v, b, preconditioner=hfjax.lbfgs_init(b, 3), max_steps=5), b
  )
  floats = jax.tree.leaves((result.x, result.iterates, result.preconditioner_state))
  assert {jnp.dtype(x.dtype) for x in floats if jnp.issubdtype(x.dtype, jnp.floating)} == {
    jnp.dtype(jnp.float32)
  }

  batches = [_batch(s) for s in range(1, 7)]
  new_params, state, updates, losses = _train(tx, params, batches)
  assert {x.dtype for x in jax.tree.leaves((new_params, updates))} == {jnp.dtype(jnp.bfloat16)}
  assert _vector_dtypes(state) == {jnp.dtype(jnp.float32)}
  assert sum(accepted for _, _, accepted in losses) >= len(batches) // 2
  full = (jnp.concatenate([b[0] for b in batches]), jnp.concatenate([b[1] for b in batches]))
  before = loss_fn(apply_fn(params, full[0]), full[1])
  after = loss_fn(apply_fn(new_params, full[0]), full[1])
  assert float(after) < 0.8 * float(before), losses
  assert np.all(np.isfinite(np.asarray(losses)))
