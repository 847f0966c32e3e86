"""Faults: non-finite batches, losses, gradients and curvature products, CG breakdown, and
L-BFGS pairs that must be refused. Nothing may leave a NaN or Inf in params or state."""

from __future__ import annotations

import functools

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from toy import init_params, loss_fn, make_step

import hfjax

DAMPING = hfjax.DampingConfig()
BATCH = 32


def apply_fn(params, inputs):
  return jax.nn.softplus(inputs @ params["w1"] + params["b1"]) @ params["w2"] + params["b2"]


def _batch(seed):
  x = jax.random.normal(jax.random.key(seed), (BATCH, 4))
  return x, jnp.stack([jnp.sin(x[:, 0]), x[:, 1] * x[:, 2]], axis=-1)


TX = hfjax.hessian_free(
  apply_fn, loss_fn, preconditioner="lbfgs", lbfgs_pairs="previous", max_cg_steps=20
)


step = make_step(TX, apply_fn=apply_fn)


@functools.cache
def _trained():
  """Params and state after two good steps: warm start and L-BFGS memory are non-zero."""
  params = init_params()
  state = TX.init(params)
  for seed in (1, 2):
    batch = _batch(seed)
    params, state = step(params, state, batch, batch)
  assert bool(state.info.accepted) and int(state.lbfgs.num_pairs) > 0
  return params, state


def _assert_finite_tree(tree):
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
      continue
    assert np.all(np.isfinite(np.asarray(leaf))), jax.tree_util.keystr(path)


def _assert_lbfgs_pairs_valid(lbfgs):
  held = int(lbfgs.num_pairs)
  sy = np.diagonal(np.asarray(lbfgs.sy_products))
  assert np.all(sy[:held] > 0) and np.all(sy[held:] == 0)
  _assert_finite_tree(lbfgs)


def _bad(kind):
  """A (batch, curvature_batch) pair with a fault of the given kind."""
  x, y = _batch(3)
  if kind == "nan_inputs":
    bad = (x.at[5, 1].set(jnp.nan), y)
  elif kind == "inf_inputs":
    bad = (x.at[0, 0].set(jnp.inf), y)
  elif kind == "nan_targets":
    bad = (x, y.at[7, 0].set(jnp.nan))
  elif kind == "overflow_inputs":  # float32 overflows to inf in the squared error
    bad = (x.at[2].set(1e30), y)
  elif kind in ("nan_curvature", "inf_curvature"):  # loss and gradient fine, G v is not
    value = jnp.nan if kind == "nan_curvature" else jnp.inf
    return (x, y), (x.at[3, 2].set(value), y)
  else:
    raise AssertionError(kind)
  return bad, bad


KINDS = [
  "nan_inputs",
  "inf_inputs",
  "nan_targets",
  "overflow_inputs",
  "nan_curvature",
  "inf_curvature",
]


def test_non_finite_step_is_rejected_and_raises_damping():
  params, state = _trained()
  for kind in KINDS:
    batch, curvature_batch = _bad(kind)
    new_params, new_state = step(params, state, batch, curvature_batch)
    info = new_state.info
    assert not bool(info.accepted), kind
    assert bool(info.non_finite), kind
    jax.tree.map(np.testing.assert_array_equal, new_params, params)
    np.testing.assert_array_equal(new_state.damping, np.float32(state.damping) * DAMPING.increase)
    assert int(info.consecutive_rejections) == 1 and int(info.total_rejections) == 1, kind
    _assert_finite_tree(new_params)
    _assert_finite_tree(new_state)
    # The warm start is reset and the L-BFGS memory of the last good solve is kept.
    assert all(not np.any(np.asarray(w)) for w in jax.tree.leaves(new_state.warm_start)), kind
    jax.tree.map(np.testing.assert_array_equal, new_state.lbfgs, state.lbfgs)
    _assert_lbfgs_pairs_valid(new_state.lbfgs)


def test_repeated_failures_are_counted_and_recovered_from():
  params, state = _trained()
  damping = np.float32(state.damping)
  for i, kind in enumerate(["nan_inputs", "overflow_inputs", "nan_curvature"], start=1):
    params, state = step(params, state, *_bad(kind))
    damping = damping * np.float32(DAMPING.increase)
    assert int(state.info.consecutive_rejections) == i
    assert int(state.info.total_rejections) == i
    np.testing.assert_array_equal(state.damping, damping)
  good = _batch(4)
  params, state = step(params, state, good, good)
  assert bool(state.info.accepted)
  assert int(state.info.consecutive_rejections) == 0
  assert int(state.info.total_rejections) == 3
  assert float(state.info.loss_after) < float(state.info.loss_before)
  _assert_finite_tree((params, state))
  _assert_lbfgs_pairs_valid(state.lbfgs)


# ----------------------------------------------------------------------------------------
# CG breakdown: the last good iterate comes back.


def _spd(n, seed=0):
  a = np.random.default_rng(seed).normal(size=(n, n))
  return jnp.asarray(a @ a.T + n * np.eye(n), jnp.float32)


def test_cg_negative_curvature_returns_last_good_iterate():
  # Indefinite: p^T A p turns negative after a few steps.
  a = jnp.diag(jnp.array([1.0, 2.0, 3.0, 4.0, -0.5]))
  b = jnp.ones(5)
  result = hfjax.cg(lambda v: a @ v, b, max_steps=10, tol=0.0)
  assert int(result.stop_reason) == hfjax.CGStopReason.NEGATIVE_CURVATURE
  k = int(result.num_steps)
  assert 1 <= k < 5
  truncated = hfjax.cg(lambda v: a @ v, b, max_steps=k, tol=0.0)
  np.testing.assert_array_equal(result.x, truncated.x)
  assert np.all(np.isfinite(result.x)) and np.isfinite(result.value)


def test_cg_nan_matvec_returns_last_good_iterate():
  a, b = _spd(6), jnp.arange(1.0, 7.0)
  # A matvec that fails on every direction but the first (p_0 = b).
  matvec = lambda v: jnp.where(jnp.all(v == b), a @ v, jnp.nan)
  result = hfjax.cg(matvec, b, max_steps=10, tol=0.0)
  assert int(result.stop_reason) == hfjax.CGStopReason.NON_FINITE
  assert int(result.num_steps) == 1
  one_step = hfjax.cg(lambda v: a @ v, b, max_steps=1, tol=0.0)
  np.testing.assert_array_equal(result.x, one_step.x)
  assert np.all(np.isfinite(result.iterates)) and np.all(np.isfinite(result.residual_norm))


def test_cg_nan_matvec_at_warm_start_returns_warm_start():
  b, x0 = jnp.ones(4), jnp.full(4, 0.5)
  result = hfjax.cg(lambda v: v * jnp.nan, b, x0=x0, max_steps=5)
  assert int(result.stop_reason) == hfjax.CGStopReason.NON_FINITE
  assert int(result.num_steps) == 0
  np.testing.assert_array_equal(result.x, x0)


def test_cg_indefinite_preconditioner_stops_before_any_step():
  a, b = _spd(4), jnp.ones(4)
  result = hfjax.cg(lambda v: a @ v, b, preconditioner=lambda r: -r, max_steps=5)
  assert int(result.stop_reason) == hfjax.CGStopReason.PRECONDITIONER_BREAKDOWN
  assert int(result.num_steps) == 0
  np.testing.assert_array_equal(result.x, jnp.zeros(4))


# ----------------------------------------------------------------------------------------
# L-BFGS memory: only pairs with s^T y > 0 and finite values.


def _pair(s, y):
  return {"a": jnp.asarray(s[:2], jnp.float32), "b": jnp.asarray(s[2:], jnp.float32)}, {
    "a": jnp.asarray(y[:2], jnp.float32),
    "b": jnp.asarray(y[2:], jnp.float32),
  }


@pytest.mark.parametrize(
  "s, y",
  [
    ([1.0, 0.0, 0.0], [-1.0, 0.0, 0.0]),  # s^T y < 0
    ([1.0, 0.0, 0.0], [0.0, 1.0, 0.0]),  # s^T y = 0
    ([0.0, 0.0, 0.0], [0.0, 0.0, 0.0]),  # empty pair
    ([np.nan, 1.0, 0.0], [1.0, 1.0, 0.0]),
    ([1.0, 1.0, 0.0], [1.0, 1.0, np.inf]),
    ([1.0, 1.0, 1.0], [np.inf, 1.0, 1.0]),  # s^T y = inf
    ([1e30, 1e30, 0.0], [1e30, 1e30, 0.0]),  # s^T y overflows float32
  ],
)
def test_lbfgs_refuses_bad_pairs(s, y):
  state = hfjax.lbfgs_init({"a": jnp.zeros(2), "b": jnp.zeros(1)}, 3)
  state = hfjax.lbfgs_update(state, *_pair([1.0, 2.0, 3.0], [1.0, 1.0, 1.0]))
  assert int(state.num_pairs) == 1
  after = hfjax.lbfgs_update(state, *_pair(s, y))
  jax.tree.map(np.testing.assert_array_equal, after, state)


@settings(max_examples=20, deadline=None)
@given(
  st.lists(
    st.tuples(
      st.lists(
        st.sampled_from([-2.0, -0.5, 0.0, 0.5, 3.0, np.nan, np.inf]), min_size=3, max_size=3
      ),
      st.lists(st.sampled_from([-1.0, 0.0, 1.0, 2.0, np.nan, -np.inf]), min_size=3, max_size=3),
    ),
    min_size=1,
    max_size=8,
  )
)
def test_lbfgs_memory_only_holds_valid_pairs(pairs):
  state = hfjax.lbfgs_init({"a": jnp.zeros(2), "b": jnp.zeros(1)}, 3)
  accepted = 0
  for s, y in pairs:
    with np.errstate(invalid="ignore", over="ignore"):
      sy = float(np.dot(np.float32(s), np.float32(y)))
    accepted += bool(np.isfinite(sy) and sy > 0 and np.all(np.isfinite(s + y)))
    state = _update(state, *_pair(s, y))
  assert int(state.num_pairs) == min(accepted, 3)
  _assert_lbfgs_pairs_valid(state)
  v = {"a": jnp.ones(2), "b": jnp.ones(1)}
  _assert_finite_tree(_apply(state, v))


_update = jax.jit(hfjax.lbfgs_update)
_apply = jax.jit(hfjax.lbfgs_apply)
