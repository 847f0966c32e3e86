"""Checkpoint and resume: an interrupted run ends with the same bits as one that never stopped."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from toy import apply_fn, init_params, loss_fn, make_step, regression_data

import hfjax

pytest.importorskip("orbax.checkpoint")  # an optional dependency (hfjax[examples])

from hfjax.checkpoint import (  # noqa: E402
  latest_step,
  restore_checkpoint,
  save_checkpoint,
)

STEPS, INTERRUPT = 6, 3


# L-BFGS pairs carried from one solve to the next, and geometric sample-size schedules: the
# state holds the memory, the schedule targets and the PRNG key.
TX = hfjax.hessian_free(
  apply_fn,
  loss_fn,
  preconditioner="lbfgs",
  lbfgs_pairs="previous",
  memory_size=5,
  max_cg_steps=20,
  gradient_schedule=hfjax.geometric_schedule(16, 32, factor=1.5),
  curvature_schedule=hfjax.geometric_schedule(8, 16, factor=1.5),
)


step = make_step(TX)


def _advance(params, state, sampler, steps):
  for _ in range(steps):
    batch, curvature_batch = sampler.sample_pair(*hfjax.sample_sizes(state))
    params, state = step(params, state, batch, curvature_batch)
  return params, state


def _bits(tree):
  def raw(x):
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      x = jax.random.key_data(x)
    return (np.asarray(x).dtype, np.asarray(x).tobytes())

  return jax.tree.map(raw, tree)


def test_resumed_run_is_bitwise_identical(tmp_path):
  sampler = hfjax.BatchSampler(regression_data(48), seed=5)
  params = init_params(0)
  straight = _advance(params, TX.init(params), sampler, STEPS)
  straight_sampler = sampler.state_dict()
  state = straight[1]
  assert int(state.lbfgs.num_pairs) > 0 and int(state.info.total_rejections) < STEPS
  assert hfjax.sample_sizes(state) == (32, 16)
  assert sampler.epoch >= 2  # the run crossed epochs

  sampler = hfjax.BatchSampler(regression_data(48), seed=5)
  params, state = _advance(params, TX.init(params), sampler, INTERRUPT)
  save_checkpoint(
    tmp_path, INTERRUPT, params, state, extra={"sampler": sampler.state_dict(), "note": "x"}
  )
  del params, state, sampler

  # Fresh objects: other params, a fresh state and a sampler with another seed.
  fresh_params = init_params(1)
  fresh_sampler = hfjax.BatchSampler(regression_data(48), seed=123)
  assert latest_step(tmp_path) == INTERRUPT
  at, params, state, extra = restore_checkpoint(tmp_path, fresh_params, TX.init(fresh_params))
  assert at == INTERRUPT and extra["note"] == "x"
  assert isinstance(state, hfjax.HessianFreeState)
  fresh_sampler.load_state_dict(extra["sampler"])
  resumed = _advance(params, state, fresh_sampler, STEPS - INTERRUPT)

  assert _bits(resumed) == _bits(straight)
  assert fresh_sampler.state_dict() == straight_sampler


def test_whole_state_round_trips_exactly(tmp_path):
  params = {"w": jnp.arange(6.0).reshape(3, 2), "b": jnp.array([1.5, -2.0], jnp.bfloat16)}
  tx = hfjax.hessian_free(
    apply_fn, loss_fn, preconditioner="lbfgs", lbfgs_pairs="previous", memory_size=3
  )
  state = tx.init(params)
  state = state._replace(
    key=jax.random.split(state.key)[1],
    damping=jnp.float32(0.123456789),
    lbfgs=hfjax.lbfgs_update(
      state.lbfgs, jax.tree.map(jnp.ones_like, params), jax.tree.map(jnp.ones_like, params)
    ),
    info=state.info._replace(accepted=jnp.array(True), rho=jnp.float32(np.pi)),
  )
  save_checkpoint(tmp_path / "ckpt", 7, params, state, extra=None)
  # Restore into shapes only (no arrays), e.g. before initialising anything.
  like = jax.eval_shape(tx.init, params)
  at, new_params, new_state, extra = restore_checkpoint(tmp_path / "ckpt", params, like)
  assert (at, extra) == (7, None)
  assert jax.tree.structure(new_state) == jax.tree.structure(state)
  assert _bits((new_params, new_state)) == _bits((params, state))
  assert jax.random.key_impl(new_state.key) == jax.random.key_impl(state.key)


def test_other_key_implementations_round_trip(tmp_path):
  tree = {"key": jax.random.key(3, impl="rbg"), "keys": jax.random.split(jax.random.key(4), 3)}
  save_checkpoint(tmp_path, 0, {"w": jnp.ones(2)}, tree)
  like = {"key": jax.random.key(0, impl="rbg"), "keys": jax.random.split(jax.random.key(0), 3)}
  _, _, restored, _ = restore_checkpoint(tmp_path, {"w": jnp.zeros(2)}, like)
  assert _bits(restored) == _bits(tree)
  assert jax.random.key_impl(restored["key"]) == jax.random.key_impl(tree["key"])


def test_keeps_the_newest_and_restores_any_kept_step(tmp_path):
  assert latest_step(tmp_path / "missing") is None
  assert latest_step(tmp_path) is None
  with pytest.raises(FileNotFoundError, match="no checkpoint"):
    restore_checkpoint(tmp_path, {"w": jnp.zeros(2)}, {})
  for i in range(5):
    save_checkpoint(tmp_path, 10 * i, {"w": jnp.full(2, float(i))}, {}, extra={"i": i}, keep=3)
  assert latest_step(tmp_path) == 40
  at, params, _, extra = restore_checkpoint(tmp_path, {"w": jnp.zeros(2)}, {}, step=20)
  assert at == 20 and extra == {"i": 2}
  np.testing.assert_array_equal(params["w"], [2.0, 2.0])
  with pytest.raises(FileNotFoundError, match=r"saved steps: \[20, 30, 40\]"):
    restore_checkpoint(tmp_path, {"w": jnp.zeros(2)}, {}, step=0)


def test_sampler_state_is_json_and_checked(tmp_path):
  data = (np.arange(10.0), np.arange(10.0))
  sampler = hfjax.BatchSampler(data, seed=0)
  sampler.sample(7)
  sampler.sample(6)  # into the second epoch
  saved = sampler.state_dict()
  save_checkpoint(tmp_path, 1, {"w": jnp.zeros(1)}, {}, extra=saved)
  extra = restore_checkpoint(tmp_path, {"w": jnp.zeros(1)}, {})[3]
  restored = hfjax.BatchSampler(data, seed=9).load_state_dict(extra)
  assert restored.epoch == sampler.epoch == 1
  np.testing.assert_array_equal(restored.sample(8)[0], sampler.sample(8)[0])
  with pytest.raises(ValueError, match="same data"):
    hfjax.BatchSampler((np.arange(4.0),)).load_state_dict(saved)
