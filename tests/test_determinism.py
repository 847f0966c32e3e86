"""Same seed, same bits; and one compilation per distinct batch shape.

Both runs use the same compiled program, so what is checked is everything around it: the
parameter init, the optimizer's PRNG key (the Jacobi preconditioner draws Rademacher vectors
with it), the batch sampler and the schedule, and the runtime itself.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from toy import apply_fn, init_params, loss_fn, regression_data

import hfjax

STEPS = 20
TRACES = []


# Gradient batches of 16 then 32 examples, curvature batches of 8 then 16: two shapes.
TX = hfjax.hessian_free(
  apply_fn,
  loss_fn,
  preconditioner="jacobi",
  max_cg_steps=20,
  gradient_schedule=hfjax.geometric_schedule(16, 32, factor=1.5),
  curvature_schedule=hfjax.geometric_schedule(8, 16, factor=1.5),
  seed=7,
)


@jax.jit
def step(params, state, batch, curvature_batch):
  TRACES.append(jax.tree.map(jnp.shape, (batch, curvature_batch)))
  loss, grads = jax.value_and_grad(lambda p: loss_fn(apply_fn(p, batch[0]), batch[1]))(params)
  updates, state = TX.update(
    grads, state, params, batch=batch, curvature_batch=curvature_batch, loss=loss
  )
  return optax.apply_updates(params, updates), state


def _run(seed):
  params = init_params(seed)
  state = TX.init(params)
  sampler = hfjax.BatchSampler(regression_data(96), seed=seed)
  shapes, history = set(), []
  for _ in range(STEPS):
    gradient_size, curvature_size = hfjax.sample_sizes(state)
    batch, curvature_batch = sampler.sample_pair(gradient_size, curvature_size)
    shapes.add((gradient_size, curvature_size))
    params, state = step(params, state, batch, curvature_batch)
    history.append(float(state.info.loss_after))
  return params, state, shapes, history


def _bits(tree):
  def raw(x):
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      x = jax.random.key_data(x)
    return np.asarray(x).tobytes()

  return jax.tree.map(raw, tree)


def test_same_seed_same_bits_and_one_compilation_per_shape():
  first = _run(seed=3)
  params, state, shapes, history = first
  assert shapes == {(16, 8), (32, 16)}
  assert len(TRACES) == len(shapes) == step._cache_size()
  assert history[-1] < history[0]
  assert int(state.info.total_rejections) < STEPS // 2

  second = _run(seed=3)
  assert len(TRACES) == len(shapes)  # nothing new to compile
  assert second[3] == history
  assert _bits(second[:2]) == _bits(first[:2])
