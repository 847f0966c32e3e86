"""``hfjax.precision.reduced_precision_dots`` and ``curvature_matmul_dtype`` against oracles.

The oracle for a rounded dot is the same dot computed at full precision on operands rounded
by hand: rounding to bfloat16 and accumulating in float32 is exact per product, so the two
agree to float32 summation error. Operands that bfloat16 represents exactly (small integers)
give the full-precision result exactly.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import hfjax
from hfjax import precision

BF16 = jnp.bfloat16


def _rounded(x):
  return x.astype(BF16).astype(jnp.float32)


def _random(key, shape):
  return jax.random.normal(jax.random.key(key), shape)


def test_a_dot_equals_the_full_precision_dot_of_rounded_operands():
  a, b = _random(0, (7, 5)), _random(1, (5, 3))
  got = precision.reduced_precision_dots(lambda a, b: a @ b)(a, b)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, _rounded(a) @ _rounded(b), rtol=1e-6, atol=1e-6)
  # ...and it is not the full-precision product, which rounding does change.
  assert np.abs(np.asarray(got - a @ b)).max() > 1e-4


def test_operands_that_bfloat16_represents_give_the_exact_product():
  a = jnp.arange(-6.0, 6.0).reshape(3, 4)
  b = jnp.arange(8.0).reshape(4, 2) - 3
  got = precision.reduced_precision_dots(lambda a, b: jnp.einsum("ij,jk->ik", a, b))(a, b)
  np.testing.assert_array_equal(got, a @ b)


def test_dots_in_nested_jits_are_rounded_and_everything_else_is_not():
  @jax.jit
  def inner(w, x):
    return jnp.tanh(x @ w)

  def fun(params, x):
    return {"out": inner(params["w"], x) * params["scale"], "sum": jnp.sum(x) / 3}

  params = {"w": _random(0, (4, 6)), "scale": jnp.float32(1 / 3)}
  x = _random(1, (5, 4))
  got = precision.reduced_precision_dots(fun)(params, x)
  expected_out = jnp.tanh(_rounded(x) @ _rounded(params["w"])) * params["scale"]
  np.testing.assert_allclose(got["out"], expected_out, rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(got["sum"], jnp.sum(x) / 3)  # no dot: untouched


def test_dots_inside_control_flow_and_of_narrow_or_integer_operands_run_as_traced():
  w, x = _random(0, (4, 4)), _random(1, (3, 4))

  def in_scan(w, x):
    return jax.lax.scan(lambda h, _: (h @ w, None), x, None, length=2)[0]

  np.testing.assert_array_equal(precision.reduced_precision_dots(in_scan)(w, x), in_scan(w, x))
  xb, wb = x.astype(BF16), w.astype(BF16)
  np.testing.assert_array_equal(
    precision.reduced_precision_dots(lambda a, b: a @ b)(xb, wb), xb @ wb
  )
  ints = jnp.arange(12, dtype=jnp.int32).reshape(3, 4)
  np.testing.assert_array_equal(
    precision.reduced_precision_dots(lambda a: a @ a.T)(ints), ints @ ints.T
  )


def test_a_non_floating_dtype_is_refused():
  with pytest.raises(ValueError, match="floating dtype"):
    precision.reduced_precision_dots(lambda a: a, jnp.int8)


# --- The Gauss-Newton product of hessian_free --------------------------------------------------


def _mlp():
  k = jax.random.split(jax.random.key(3), 3)
  params = {
    "w1": jax.random.normal(k[0], (6, 16)) / 2,
    "b1": jnp.zeros(16),
    "w2": jax.random.normal(k[1], (16, 4)) / 4,
  }
  x = jax.random.normal(k[2], (32, 6))
  y = jnp.sin(x[:, :4])

  def apply_fn(p, x):
    return jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"]

  def loss_fn(out, y):
    return 0.5 * jnp.mean(jnp.sum((out - y) ** 2, -1))

  return apply_fn, loss_fn, params, (x, y)


def test_rounded_gauss_newton_product_is_the_product_within_bfloat16_round_off():
  apply_fn, loss_fn, params, batch = _mlp()
  flat, unravel = ravel_pytree(params)
  full, _ = hfjax.gauss_newton_matvec(apply_fn, loss_fn, params, batch)
  rounded = precision.reduced_precision_dots(full)
  matrix = jax.vmap(lambda e: ravel_pytree(full(unravel(e)))[0])(jnp.eye(flat.size))
  v = _random(4, flat.shape)
  got = ravel_pytree(jax.jit(rounded)(unravel(v)))[0]
  error = np.linalg.norm(got - matrix @ v) / np.linalg.norm(matrix @ v)
  # Each operand carries 2**-9 of relative error; a few roundings in a row stay within 1%.
  assert 1e-5 < error < 1e-2


def test_hessian_free_with_bfloat16_curvature_products_takes_nearly_the_same_step():
  apply_fn, loss_fn, params, batch = _mlp()
  grads = jax.grad(lambda p: loss_fn(apply_fn(p, batch[0]), batch[1]))(params)
  steps = {}
  for dtype in (None, "bfloat16"):
    tx = hfjax.hessian_free(
      apply_fn,
      loss_fn,
      preconditioner="none",
      initial_damping=0.1,
      max_cg_steps=8,
      curvature_matmul_dtype=dtype,
    )
    update = jax.jit(functools.partial(tx.update, batch=batch))
    steps[dtype], state = update(grads, tx.init(params), params)
    dtypes = lambda tree: jax.tree.map(lambda x: x.dtype, tree)
    assert dtypes(state) == dtypes(tx.init(params))
  full, rounded = (ravel_pytree(steps[d])[0] for d in (None, "bfloat16"))
  assert np.linalg.norm(rounded - full) < 2e-2 * np.linalg.norm(full)


@pytest.mark.parametrize("dtype", ["int8", "no such dtype", jnp.int32])
def test_hessian_free_refuses_a_curvature_matmul_dtype_that_is_not_floating(dtype):
  apply_fn, loss_fn, _, _ = _mlp()
  with pytest.raises(ValueError, match="curvature_matmul_dtype"):
    hfjax.hessian_free(apply_fn, loss_fn, curvature_matmul_dtype=dtype)
