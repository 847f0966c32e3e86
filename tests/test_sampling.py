"""Tests for hfjax's sample-size schedules and BatchSampler, against plain Python/NumPy."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import hfjax
from hfjax import sampling


def _reference_round_up(target, start, maximum, ratio):
  """The smallest grid size start * ratio**k >= target, capped at maximum."""
  if target >= maximum:
    return maximum
  k = 0
  while start * ratio**k < target:
    k += 1
  return min(maximum, round(start * ratio**k))


# Geometric schedule


@pytest.mark.parametrize(
  "start, maximum, factor, ratio",
  [(10, 5000, 1.3, 2.0), (7, 1000, 1.1, 1.5), (1, 60000, 1.5, 3.0), (64, 64, 1.2, 2.0)],
)
def test_geometric_sizes_match_plain_python(start, maximum, factor, ratio):
  schedule = hfjax.geometric_schedule(start, maximum, factor=factor, grid_ratio=ratio)
  fixed = hfjax.fixed_schedule(5)
  state = sampling.sampling_init(schedule, fixed)
  target, sizes = float(start), []
  for _ in range(80):
    expected = _reference_round_up(target, start, maximum, ratio)
    assert int(state.gradient_sample_size) == expected, (target, sizes)
    assert int(state.curvature_sample_size) == 5
    sizes.append(expected)
    state = sampling.sampling_update(state, schedule, fixed)
    target = min(target * factor, maximum)
  assert sizes[-1] == maximum
  assert sizes == sorted(sizes)
  # Every grid size is visited once (the growth per step is below the grid ratio), and the
  # grid has O(log(maximum / start)) sizes: one compilation each.
  assert sorted(set(sizes)) == schedule.grid()
  assert len(schedule.grid()) <= math.ceil(math.log(maximum / start) / math.log(ratio)) + 1


_HOST_SCHEDULES = [
  hfjax.geometric_schedule(10, 5000, factor=1.3),
  hfjax.geometric_schedule(7, 1000, factor=1.1, grid_ratio=1.5),
  hfjax.geometric_schedule(1, 60000, factor=1.5, grid_ratio=3.0),
  hfjax.geometric_schedule(16, 1024, factor=2.0),  # targets land exactly on grid points
  hfjax.geometric_schedule(100, 101, factor=1.001, grid_ratio=1.01),
  hfjax.geometric_schedule(100, 103, factor=1.001, grid_ratio=1.002),  # sizes round alike
  hfjax.fixed_schedule(5),
]


@pytest.mark.parametrize("schedule", _HOST_SCHEDULES, ids=lambda s: f"{s.start}-{s.maximum}")
def test_host_round_up_is_the_device_rounding(schedule):
  """round_up on the host gives the step's sizes bit for bit, at and beside every threshold
  (float32 neighbours), and plain Python's rounding away from them."""
  thresholds, _ = sampling._grid_table(schedule)
  points = [schedule.start * schedule.grid_ratio**k for k in range(len(thresholds) + 2)]
  edges = np.concatenate([thresholds, np.float32(points)])
  targets = np.concatenate(
    [
      edges,
      np.nextafter(edges, np.float32(np.inf)),
      np.nextafter(edges, np.float32(0)),
      np.geomspace(0.5, 2 * schedule.maximum, 500).astype(np.float32),
    ]
  )
  device = jax.jit(sampling._round_up, static_argnums=1)(targets, schedule)
  host = [schedule.round_up(t) for t in targets]
  np.testing.assert_array_equal(np.asarray(device), host)
  start, maximum, ratio = schedule.start, schedule.maximum, schedule.grid_ratio
  for t, size in zip(targets, host, strict=True):
    if np.all(np.abs(np.float64(t) / np.array(points) - 1) > 1e-5):
      assert size == _reference_round_up(float(t), start, maximum, ratio), t
  assert sorted(set(host)) == schedule.grid()


@pytest.mark.parametrize("schedule", _HOST_SCHEDULES[:4], ids=lambda s: f"{s.start}-{s.maximum}")
def test_host_follows_the_state_without_reading_it(schedule):
  """grow and round_up on the host reproduce sampling_update's sizes for 300 steps."""
  curvature = hfjax.fixed_schedule(3)
  update = jax.jit(lambda state: sampling.sampling_update(state, schedule, curvature))
  state = sampling.sampling_init(schedule, curvature)
  target = np.float32(schedule.start)
  states = [state]
  for _ in range(300):
    states.append(update(states[-1]))
  for state in jax.device_get(states):
    assert state.gradient_target == target
    assert state.gradient_sample_size == schedule.round_up(target)
    target = schedule.grow(target)
  assert schedule.round_up(target) == schedule.maximum
  with pytest.raises(ValueError, match="variance-test schedule grows from the step"):
    hfjax.variance_test_schedule(4, 8).grow(4.0)


def test_fixed_schedule_never_changes():
  schedule = hfjax.fixed_schedule(12)
  assert schedule.grid() == [12]
  state = sampling.sampling_init(schedule, schedule)
  for _ in range(3):
    state = sampling.sampling_update(state, schedule, schedule)
  assert (int(state.gradient_sample_size), int(state.curvature_sample_size)) == (12, 12)


# Through hessian_free


def _linear_apply(params, inputs):
  return inputs @ params["w"] + params["b"]


def _logistic_loss(logits, targets):
  return jnp.mean(jax.nn.softplus(logits) - targets * logits)


def _logistic_data(n, d=3, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, d)).astype(np.float32)
  p = 1 / (1 + np.exp(-(x @ np.array([2.0, -1.0, 0.5]) + 0.2)))
  y = (rng.uniform(size=n) < p).astype(np.float32)
  return x, y


def _zeros(d=3):
  return {"b": jnp.zeros(()), "w": jnp.zeros((d,))}


def _loss_and_grad():
  return jax.jit(jax.value_and_grad(lambda p, b: _logistic_loss(_linear_apply(p, b[0]), b[1])))


def test_schedules_drive_hessian_free_in_a_chain():
  """Sizes read with sample_sizes from a chain state follow both schedules step by step."""
  gradient = hfjax.geometric_schedule(16, 32, factor=1.5)
  curvature = hfjax.geometric_schedule(4, 8, factor=2.0)
  hf = hfjax.hessian_free(
    _linear_apply,
    _logistic_loss,
    preconditioner="none",
    initial_damping=1e-2,
    gradient_schedule=gradient,
    curvature_schedule=curvature,
  )
  tx = optax.chain(optax.clip_by_global_norm(10.0), hf)
  update = jax.jit(tx.update)
  loss_and_grad = _loss_and_grad()
  sampler = hfjax.BatchSampler(_logistic_data(256), seed=0)
  params = _zeros()
  state = tx.init(params)
  g_target, c_target, used = 16.0, 4.0, []
  for _ in range(3):
    sizes = hfjax.sample_sizes(state)
    assert sizes == (
      _reference_round_up(g_target, 16, 32, 2.0),
      _reference_round_up(c_target, 4, 8, 2.0),
    )
    batch, curvature_batch = sampler.sample_pair(*sizes)
    _, grads = loss_and_grad(params, batch)
    updates, state = update(grads, state, params, batch=batch, curvature_batch=curvature_batch)
    params = optax.apply_updates(params, updates)
    info = state[1].info
    assert (int(info.gradient_batch_size), int(info.curvature_batch_size)) == sizes
    assert bool(info.accepted)
    used.append(sizes)
    g_target, c_target = min(1.5 * g_target, 32), min(2 * c_target, 8)
  assert used == [(16, 4), (32, 8), (32, 8)]


def test_held_out_schedule_grows_only_on_uphill_steps():
  schedule = hfjax.held_out_schedule(100, 1000, factor=1.5)
  fixed = hfjax.fixed_schedule(5)
  update = jax.jit(lambda state, up: sampling.sampling_update(state, schedule, fixed, uphill=up))
  state = sampling.sampling_init(schedule, fixed)
  ups = [False, True, False, True, True, False, True, True, True, True, False]
  target = np.float32(100)
  for up in ups:
    state = update(state, jnp.asarray(up))
    if up:
      target = np.minimum(target * np.float32(1.5), np.float32(1000))
    assert float(state.gradient_target) == target
    assert int(state.gradient_sample_size) == _reference_round_up(target, 100, 1000, 2.0)
    assert int(state.curvature_sample_size) == 5
  assert int(state.gradient_sample_size) == 1000  # capped
  with pytest.raises(ValueError, match="sample_sizes"):
    schedule.grow(100.0)


def test_variance_test_matches_numpy_byrd_test():
  """Byrd et al.: grow when ||Var_i g_i||_1 / |S| > theta^2 ||g_S||^2, to the rounded
  ||Var||_1 / (theta^2 ||g_S||^2); computed here from per-example gradients in NumPy."""
  start, maximum, theta = 32, 1024, 1.5
  schedule = hfjax.variance_test_schedule(start, maximum, theta=theta)
  tx = hfjax.hessian_free(
    _linear_apply,
    _logistic_loss,
    preconditioner="none",
    initial_damping=1e-2,
    gradient_schedule=schedule,
    chunk_size=64,
  )
  update = jax.jit(tx.update)
  loss_and_grad = _loss_and_grad()
  x, y = _logistic_data(maximum, seed=1)
  params = _zeros()
  state = tx.init(params)
  grew = stayed = 0
  for _ in range(3):  # two steps that keep 32 examples, then a growth to 256
    size, _ = hfjax.sample_sizes(state)
    batch = (x[:size], y[:size])
    _, grads = loss_and_grad(params, batch)

    # Per-example gradients of the logistic loss, in float64.
    xs, ys = batch[0].astype(np.float64), batch[1].astype(np.float64)
    w, b = np.asarray(params["w"], np.float64), float(params["b"])
    residual = 1 / (1 + np.exp(-(xs @ w + b))) - ys
    per_example = np.c_[residual, residual[:, None] * xs]
    variance_l1 = per_example.var(axis=0, ddof=1).sum()
    grad_sq = np.sum(per_example.mean(axis=0) ** 2)
    lhs, rhs = variance_l1 / size, theta**2 * grad_sq
    assert abs(lhs - rhs) > 1e-3 * rhs  # the decision is not left to rounding
    if lhs > rhs:
      wanted = variance_l1 / (theta**2 * grad_sq)
      expected = _reference_round_up(wanted, start, maximum, 2.0)
      grew += expected > size
    else:
      expected = size
      stayed += 1

    updates, state = update(grads, state, params, batch=batch)
    params = optax.apply_updates(params, updates)
    assert int(state.info.gradient_batch_size) == size
    assert hfjax.sample_sizes(state)[0] == expected
  assert grew and stayed, (grew, stayed)


# Reading sizes


def test_sample_sizes_from_bare_and_chain_state():
  tx = hfjax.hessian_free(
    _linear_apply,
    _logistic_loss,
    gradient_schedule=hfjax.geometric_schedule(100, 1000),
    curvature_schedule=hfjax.fixed_schedule(10),
  )
  params = _zeros()
  assert hfjax.sample_sizes(tx.init(params)) == (100, 10)
  chain = optax.chain(optax.add_decayed_weights(1e-4), tx)
  assert hfjax.sample_sizes(chain.init(params)) == (100, 10)
  with pytest.raises(ValueError, match="sampling"):
    hfjax.sample_sizes(optax.adam(1e-3).init(params))
  # Without schedules the caller picks the sizes, and the state says it tracks none.
  untracked = hfjax.hessian_free(_linear_apply, _logistic_loss).init(params)
  assert untracked.sampling is None
  with pytest.raises(ValueError, match="gradient_schedule and curvature_schedule"):
    hfjax.sample_sizes(untracked)


# BatchSampler


def _index_sampler(n=10, seed=0):
  return hfjax.BatchSampler((np.arange(n), np.arange(n) * 10), seed=seed)


def test_batch_sampler_is_without_replacement_within_an_epoch():
  sampler = _index_sampler(10)
  first = [sampler.sample(size) for size in (4, 3, 3)]
  inputs = np.concatenate([i for i, _ in first])
  np.testing.assert_array_equal(np.sort(inputs), np.arange(10))
  for i, t in first:
    np.testing.assert_array_equal(t, i * 10)  # inputs and targets stay paired
  assert sampler.epoch == 0
  # A batch that crosses into the next epoch ends the old one and starts a new permutation.
  second = [sampler.sample(size) for size in (6, 6)]
  assert sampler.epoch == 2
  inputs = np.concatenate([second[0][0], second[1][0][:4]])
  np.testing.assert_array_equal(np.sort(inputs), np.arange(10))
  counts = np.bincount(np.concatenate([i for i, _ in second]), minlength=10)
  assert counts.max() <= 2 and counts.sum() == 12


def test_batch_sampler_is_deterministic_per_seed():
  same, other = _index_sampler(50, seed=5), _index_sampler(50, seed=6)
  sampler = _index_sampler(50, seed=5)
  for size in (7, 30, 40):  # the last batch crosses into the second epoch
    a = sampler.sample(size)[0]
    np.testing.assert_array_equal(a, same.sample(size)[0])
    assert not np.array_equal(a, other.sample(size)[0])


def test_sample_pair_curvature_is_a_prefix():
  sampler = _index_sampler(40)
  batch, curvature = sampler.sample_pair(16, 5)
  for full, prefix in zip(batch, curvature, strict=True):
    np.testing.assert_array_equal(prefix, full[:5])
  assert len(batch[0]) == 16
  # A curvature batch larger than the gradient batch is a separate draw.
  batch, curvature = sampler.sample_pair(4, 8)
  assert len(batch[0]) == 4 and len(curvature[0]) == 8
  assert not set(batch[0]) & set(curvature[0])  # still within the same epoch


def test_batch_sampler_errors():
  sampler = _index_sampler(10)
  for size in (0, 11):
    with pytest.raises(ValueError, match="batch size"):
      sampler.sample(size)
  with pytest.raises(ValueError, match="disagree"):
    hfjax.BatchSampler((np.zeros(5), np.zeros(6)))
  with pytest.raises(ValueError, match="at least one"):
    hfjax.BatchSampler(())


@pytest.mark.parametrize(
  "make",
  [
    lambda: hfjax.geometric_schedule(0, 10),
    lambda: hfjax.geometric_schedule(2.5, 10),
    lambda: hfjax.geometric_schedule(20, 10),
    lambda: hfjax.geometric_schedule(10, 100, factor=0.9),
    lambda: hfjax.geometric_schedule(10, 100, grid_ratio=1.0),
    lambda: hfjax.variance_test_schedule(10, 100, theta=0.0),
    lambda: hfjax.variance_test_schedule(10, 100, grid_ratio=0.5),
    lambda: hfjax.variance_test_schedule(10, 5),
    lambda: hfjax.fixed_schedule(0),
    lambda: hfjax.held_out_schedule(10, 100, factor=1.0),
    lambda: hfjax.held_out_schedule(10, 100, grid_ratio=1.0),
    lambda: hfjax.held_out_schedule(10, 5),
  ],
)
def test_invalid_schedule_arguments_raise(make):
  with pytest.raises(ValueError):
    make()
