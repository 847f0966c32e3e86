"""Bad input is refused early, with an error that names the problem.

Updates are traced with ``jax.eval_shape``: the checks run at trace time, so nothing compiles.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

import hfjax


def apply_fn(params, inputs):
  return jnp.tanh(inputs @ params["w"])


def loss_fn(outputs, targets):
  return 0.5 * jnp.mean(jnp.sum((outputs - targets) ** 2, axis=-1))


PARAMS = {"w": jnp.zeros((3, 2))}
X, Y = jnp.ones((8, 3)), jnp.ones((8, 2))


def update(batch=(X, Y), params=PARAMS, *, tx=None, grads=None, **kwargs):
  """Traces one ``tx.update`` (shapes only)."""
  tx = tx or hfjax.hessian_free(apply_fn, loss_fn)
  grads = jax.tree.map(jnp.zeros_like, params) if grads is None else grads
  state = jax.eval_shape(tx.init, params)
  return jax.eval_shape(
    lambda g, s, p: tx.update(g, s, p, batch=batch, **kwargs), grads, state, params
  )


def make(**options):
  return lambda: hfjax.hessian_free(apply_fn, loss_fn, **options)


CASES = {
  # The batch.
  "batch_not_a_pair": (lambda: update(X), TypeError, r"batch must be a pair \(inputs, targets\)"),
  "batch_triple": (lambda: update((X, Y, Y)), TypeError, r"pair .* tuple of length 3"),
  "batch_dict": (lambda: update({"x": X, "y": Y}), TypeError, r"pair .* dict"),
  "batch_missing": (lambda: update(None), ValueError, r"needs the gradient batch"),
  "empty_batch": (lambda: update((X[:0], Y[:0])), ValueError, r"empty \(batch size 0\)"),
  "empty_inputs": (lambda: update(((), Y)), ValueError, r"inputs are empty"),
  "scalar_batch_leaf": (lambda: update((X, jnp.float32(1))), ValueError, r"leading batch axis"),
  "batch_sizes_disagree": (lambda: update((X, Y[:4])), ValueError, r"disagree .* \[4, 8\]"),
  "curvature_batch_larger": (
    lambda: update((X[:4], Y[:4]), curvature_batch=(X, Y)),
    ValueError,
    r"curvature batch \(8 examples\) is larger than the gradient batch \(4\)",
  ),
  # Model outputs and loss.
  "outputs_do_not_fit_targets_with_loss": (
    lambda: update((X, jnp.ones((8, 3))), loss=jnp.float32(0.0)),
    ValueError,
    r"model outputs do not fit the targets",
  ),
  "outputs_do_not_fit_targets": (
    lambda: update((X, jnp.ones((8, 3)))),
    ValueError,
    r"model outputs do not fit the targets",
  ),
  "loss_not_scalar": (
    lambda: update(tx=hfjax.hessian_free(apply_fn, lambda o, t: (o - t) ** 2)),
    ValueError,
    r"loss_fn must return a scalar",
  ),
  # Params and gradients.
  "integer_params": (
    lambda: hfjax.hessian_free(apply_fn, loss_fn).init({"w": jnp.zeros((3, 2), jnp.int32)}),
    TypeError,
    r"params leaf \['w'\] has dtype int32; .* floating-point",
  ),
  "bool_params_in_update": (
    lambda: update(params={"w": jnp.zeros((3, 2), bool)}),
    TypeError,
    r"dtype bool; .* floating-point",
  ),
  "empty_params": (
    lambda: hfjax.hessian_free(apply_fn, loss_fn).init({}),
    ValueError,
    r"params is empty",
  ),
  "params_missing": (
    lambda: hfjax.hessian_free(apply_fn, loss_fn).update(PARAMS, None, batch=(X, Y)),
    ValueError,
    r"needs params",
  ),
  "grads_structure": (
    lambda: update(grads={"v": jnp.zeros((3, 2))}),
    ValueError,
    r"tree structure of params",
  ),
  # Options.
  "negative_damping": (make(initial_damping=-1.0), ValueError, r"initial_damping must be > 0"),
  "nan_damping": (make(initial_damping=float("nan")), ValueError, r"initial_damping must be > 0"),
  "damping_rule_minimum": (
    make(damping=hfjax.DampingConfig(minimum=-1.0)),
    ValueError,
    r"0 < minimum <= maximum",
  ),
  "damping_rule_increase": (
    make(damping=hfjax.DampingConfig(increase=0.5)),
    ValueError,
    r"increase > 1",
  ),
  "damping_rule_type": (make(damping={"increase": 2.0}), TypeError, r"hfjax.DampingConfig"),
  "memory_size_zero": (make(memory_size=0), ValueError, r"memory_size must be an integer >= 1"),
  "memory_size_fraction": (make(memory_size=2.5), ValueError, r"memory_size must be an integer"),
  "max_cg_steps_zero": (make(max_cg_steps=0), ValueError, r"max_cg_steps must be an integer >= 1"),
  "max_cg_steps_negative": (make(max_cg_steps=-5), ValueError, r"max_cg_steps"),
  "num_recorded_iterates_zero": (make(num_recorded_iterates=0), ValueError, r"num_recorded"),
  "unknown_preconditioner": (
    make(preconditioner="shampoo"),
    ValueError,
    r"unknown preconditioner 'shampoo'; choose one of",
  ),
  "unknown_lbfgs_pairs": (make(lbfgs_pairs="next"), ValueError, r"unknown lbfgs_pairs 'next'"),
  "negative_cg_tol": (make(cg_tol=-1.0), ValueError, r"cg_tol must be >= 0"),
  "warm_start_decay": (make(warm_start_decay=1.5), ValueError, r"warm_start_decay"),
  "line_search_shrink": (
    make(line_search=hfjax.LineSearchConfig(shrink=1.0)),
    ValueError,
    r"0 < shrink < 1",
  ),
  "variance_curvature_schedule": (
    make(curvature_schedule=hfjax.variance_test_schedule(2, 8)),
    ValueError,
    r"gradient sample only",
  ),
  "schedule_type": (make(gradient_schedule=16), TypeError, r"hfjax.SampleSchedule"),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_bad_input_is_refused(case):
  call, error, pattern = CASES[case]
  with pytest.raises(error, match=pattern):
    call()


def test_good_input_passes_the_same_checks():
  updates, state = update()
  assert jax.tree.map(lambda u: u.shape, updates) == {"w": (3, 2)}
  assert state.damping.dtype == jnp.float32
