"""Each phase of hfjax.hessian_free's update alone, against plain-Python references."""

import math
import typing

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.stats

import hfjax
from hfjax import optimizer

# Levenberg-Marquardt damping


def _martens_rule(rho, damping, config):
  """Martens (2010), section 4.1, with the bounds, in float32 like the state."""
  damping = np.float32(damping)
  if rho < config.low:
    damping = damping * np.float32(config.increase)
  elif rho > config.high:
    damping = damping * np.float32(config.decrease)
  return min(max(damping, np.float32(config.minimum)), np.float32(config.maximum))


DAMPING_RULES = {
  "default": hfjax.DampingConfig(),
  "custom": hfjax.DampingConfig(
    increase=3.0, decrease=0.5, low=0.3, high=0.6, minimum=0.2, maximum=2.0
  ),
  "one_band": hfjax.DampingConfig(low=0.5, high=0.5),
}


@pytest.mark.parametrize("rule", list(DAMPING_RULES))
def test_damping_rule_matches_martens_over_a_grid(rule):
  config = DAMPING_RULES[rule]
  edges = [config.low, config.high]
  rhos = [-np.inf, -5.0, 0.0, 0.1, 0.5, 0.7, 0.9, 1.0, 3.0]
  rhos += [float(np.nextafter(np.float32(e), np.float32(d))) for e in edges for d in (-1, 2)]
  rhos += edges
  dampings = [1e-12, 1e-8, 1e-3, 0.19, 0.2, 1.0, 1.9, 2.0, 45.0, 1e8, 3e8]
  grid_rho, grid_damping = (np.asarray(a, np.float32) for a in np.meshgrid(rhos, dampings))
  new = optimizer._adapt_damping(config, jnp.asarray(grid_damping), jnp.asarray(grid_rho))
  expected = [
    _martens_rule(r, d, config) for r, d in zip(grid_rho.ravel(), grid_damping.ravel(), strict=True)
  ]
  assert new.dtype == jnp.float32
  np.testing.assert_array_equal(np.ravel(new), np.asarray(expected, np.float32))


def test_damping_rule_reads_a_rejected_step_as_an_increase():
  config = hfjax.DampingConfig()
  new = optimizer._adapt_damping(config, jnp.float32(2.0), jnp.float32(-jnp.inf))
  assert float(new) == np.float32(2.0) * np.float32(config.increase)


# CG backtracking


def _fake_result(steps, losses, values=None):
  """A CGResult whose slot i holds the iterate [i]; ``losses[i]`` is its validation loss."""
  slots = len(steps)
  values = np.linspace(-1.0, -2.0, slots) if values is None else values
  result = hfjax.CGResult(
    x=jnp.zeros(1),
    num_steps=jnp.int32(max(steps)),
    value=jnp.float32(0.0),
    stop_reason=jnp.int32(hfjax.CGStopReason.MAX_STEPS),
    residual_norm=jnp.float32(0.0),
    iterates=jnp.arange(slots, dtype=jnp.float32)[:, None],
    iterate_steps=jnp.asarray(steps, jnp.int32),
    iterate_values=jnp.asarray(values, jnp.float32),
    preconditioner_state=None,
  )
  table = jnp.asarray(losses, jnp.float32)
  calls = []

  def validation_loss(iterate):
    jax.debug.callback(lambda: calls.append(1))
    return table[iterate[0].astype(jnp.int32)]

  return result, validation_loss, calls


# Each case: CG step per slot (-1: empty), validation loss per slot, then the slot the walk
# must choose and the losses it must evaluate. The walk starts at the newest iterate and
# stops at the first one that is not better than the best so far.
WALKS = {
  "stops_at_first_increase": ([1, 2, 3, 4, 6], [1.0, 3.5, 3.0, 4.0, 5.0], 2, 4),
  "newest_is_best": ([1, 2, 3, 4, 6], [1.0, 2.0, 3.0, 4.0, 0.5], 4, 2),
  "falls_to_the_oldest": ([1, 2, 3, 4, 6], [1.0, 2.0, 3.0, 4.0, 5.0], 0, 5),
  "equal_loss_stops": ([1, 2, 3, 4, 6], [1.0, 2.0, 3.0, 3.0, 5.0], 3, 3),
  "ring_buffer_order": ([11, 14, 6, 8], [0.8, 1.0, 0.5, 1.5], 0, 3),
  "non_finite_newest": ([1, 2, 3], [2.0, 1.0, np.nan], 1, 3),
  "non_finite_never_wins": ([1, 2, 3], [1.0, np.inf, 2.0], 2, 2),
  "empty_slots_never_win": ([1, 2, 3, -1, -1], [3.0, 2.0, 2.5, 0.0, 0.0], 1, 3),
  # All recorded iterates improve: the walk reads one empty slot before it stops.
  "walks_into_an_empty_slot": ([1, 2, 3, -1, -1], [1.0, 2.0, 3.0, 0.0, 0.0], 0, 4),
}


@pytest.mark.parametrize("case", list(WALKS))
def test_backtracking_walk_picks_the_best_and_counts_evaluations(case):
  steps, losses, chosen_slot, evaluations = WALKS[case]
  values = -np.arange(1.0, len(steps) + 1)
  result, validation_loss, calls = _fake_result(steps, losses, values)
  walk = jax.jit(lambda r: optimizer._backtrack(r, validation_loss, jnp.float32))(result)
  jax.effects_barrier()

  assert int(walk.evaluations) == evaluations == len(calls)
  np.testing.assert_array_equal(walk.direction, [chosen_slot])
  assert int(walk.cg_step) == steps[chosen_slot]
  assert float(walk.model_value) == values[chosen_slot]
  assert float(walk.validation_loss) == np.float32(losses[chosen_slot])


def test_backtracking_walk_keeps_the_loss_dtype():
  with jax.enable_x64(True):
    result, validation_loss, _ = _fake_result([1, 2], [2.0, 1.0])
    walk = optimizer._backtrack(
      result, lambda x: validation_loss(x).astype(jnp.float64), jnp.float64
    )
    assert walk.model_value.dtype == walk.validation_loss.dtype == jnp.float64


# Armijo line search


def _plain_line_search(config, loss_at, f0, f1, slope):
  """The search as a plain loop in float32: (tries, t, f, sufficient)."""
  f0, slope = np.float32(f0), np.float32(slope)

  def sufficient(t, f):
    return bool(f <= f0 + np.float32(config.armijo) * t * slope and f < f0)

  tries, t, f = 1, np.float32(1.0), np.float32(f1)
  while not sufficient(t, f) and tries < config.max_steps:
    t = np.float32(t * np.float32(config.shrink))
    f = np.float32(loss_at(t))
    f = f if np.isfinite(f) else np.float32(np.inf)
    tries += 1
  return tries, t, f, sufficient(t, f)


def _quadratic(f0, slope, curvature):
  return lambda t: f0 + slope * t + 0.5 * curvature * t * t


SEARCHES = {
  "unit_step_accepted": (hfjax.LineSearchConfig(), _quadratic(1.0, -1.0, 1.0), -1.0),
  "shrinks_on_a_steep_quadratic": (hfjax.LineSearchConfig(), _quadratic(1.0, -1.0, 9.0), -1.0),
  "strict_armijo": (
    hfjax.LineSearchConfig(armijo=0.9, shrink=0.5),
    _quadratic(1.0, -2.0, 2.0),
    -2.0,
  ),
  "never_decreases": (hfjax.LineSearchConfig(max_steps=7), lambda t: 1.0 + t, -1.0),
  "zero_slope_takes_a_decrease": (hfjax.LineSearchConfig(), _quadratic(1.0, 0.0, -1.0), 0.0),
  "flat_is_no_decrease": (hfjax.LineSearchConfig(max_steps=5), lambda t: 1.0, 0.0),
  "nan_at_long_steps": (
    hfjax.LineSearchConfig(shrink=0.5),
    lambda t: np.nan if t > 0.3 else 1.0 - t,
    -1.0,
  ),
}


@pytest.mark.parametrize("case", list(SEARCHES))
def test_line_search_matches_a_plain_loop(case):
  config, loss, slope = SEARCHES[case]
  f0, f1 = np.float32(loss(0.0)), np.float32(loss(1.0))
  f1 = f1 if np.isfinite(f1) else np.float32(np.inf)  # the walk hands over finite_or(f, inf)

  def loss_at(t):
    return jax.pure_callback(
      lambda t: np.float32(loss(np.float32(t))), jax.ShapeDtypeStruct((), jnp.float32), t
    )

  search, sufficient = jax.jit(
    lambda f0, f1, slope: optimizer._line_search(config, loss_at, f0, f1, slope)
  )(jnp.float32(f0), jnp.float32(f1), jnp.float32(slope))
  tries, t, f, expected_sufficient = _plain_line_search(config, loss, f0, f1, slope)
  assert int(search.tries) == tries
  assert float(search.step_size) == t
  assert float(search.loss) == f
  assert bool(sufficient) == expected_sufficient


@pytest.mark.parametrize("curvature", [3.0, 9.0, 40.0, 100.0])
def test_line_search_step_on_a_quadratic_is_the_closed_form(curvature):
  """On f(t) = f0 + s t + a t^2 / 2 Armijo holds exactly for t <= 2 (c - 1) s / a, so the
  search stops at the first power of the shrink factor below that."""
  config = hfjax.LineSearchConfig()
  f0, slope = 1.0, -1.0
  loss = _quadratic(f0, slope, curvature)
  longest = 2 * (config.armijo - 1) * slope / curvature
  k = max(0, math.ceil(math.log(longest) / math.log(config.shrink)))
  assert abs(config.shrink**k / longest - 1) > 1e-3  # not decided by rounding

  search, sufficient = optimizer._line_search(
    config,
    lambda t: jnp.float32(f0) + slope * t + 0.5 * curvature * t * t,
    jnp.float32(f0),
    jnp.float32(loss(1.0)),
    jnp.float32(slope),
  )
  assert bool(sufficient)
  assert int(search.tries) == k + 1
  np.testing.assert_allclose(float(search.step_size), config.shrink**k, rtol=1e-6)


# Options


def test_every_preconditioner_name_has_a_builder():
  assert set(typing.get_args(optimizer.PreconditionerName)) == set(optimizer._PRECONDITIONERS)
  assert optimizer.PRECONDITIONERS == typing.get_args(optimizer.PreconditionerName)
  assert optimizer.LBFGS_PAIRS == typing.get_args(optimizer.LBFGSPairs)


@pytest.mark.parametrize("preconditioner", optimizer.PRECONDITIONERS)
@pytest.mark.parametrize("lbfgs_pairs", optimizer.LBFGS_PAIRS)
def test_state_slots_of_each_preconditioner(preconditioner, lbfgs_pairs):
  tx = hfjax.hessian_free(
    lambda w, x: x @ w,
    lambda out, y: jnp.mean((out - y) ** 2),
    preconditioner=preconditioner,
    lbfgs_pairs=lbfgs_pairs,
    memory_size=3,
  )
  state = tx.init(jnp.zeros(4))
  keeps_pairs = preconditioner in ("lbfgs", "kfac+lbfgs") and lbfgs_pairs == "previous"
  assert (state.lbfgs is not None) == keeps_pairs
  if keeps_pairs:
    assert state.lbfgs.s_memory.shape == (3, 4)
  if preconditioner.startswith("kfac"):
    assert isinstance(state.preconditioner, hfjax.kfac.KFACState)
    assert int(state.preconditioner.num_estimates) == 0
  else:
    assert state.preconditioner is None


def _kfac_steps(preconditioner: str, kfac_config: hfjax.KFACConfig, num_steps: int):
  """Runs HF with K-FAC on ``tanh(x w + b) v`` with squared error (leaf 2, ``w``, is the
  first layer's kernel); yields, per step, the damping it started from and the new state."""

  def apply_fn(p, x):
    return jnp.tanh(x @ p["w"] + p["b"]) @ p["v"]

  params = {
    "w": jax.random.normal(jax.random.key(0), (3, 4)),
    "b": jnp.zeros(4),
    "v": jax.random.normal(jax.random.key(1), (4, 2)),
  }
  loss_fn = lambda out, y: 0.5 * jnp.mean(jnp.sum((out - y) ** 2, axis=-1))
  x = jax.random.normal(jax.random.key(2), (32, 3))
  y = jax.random.normal(jax.random.key(3), (32, 2))
  tx = hfjax.hessian_free(
    apply_fn, loss_fn, preconditioner=preconditioner, kfac=kfac_config, initial_damping=1.0
  )
  state = tx.init(params)
  step = jax.jit(lambda g, s, p: tx.update(g, s, p, batch=(x, y)))
  for _ in range(num_steps):
    damping = float(state.damping)
    grads = jax.grad(lambda p: loss_fn(apply_fn(p, x), y))(params)
    updates, state = step(grads, state, params)
    params = optax.apply_updates(params, updates)
    assert all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree.leaves(params))
    yield damping, state


@pytest.mark.parametrize(
  "preconditioner, tikhonov",
  [("kfac", "factored"), ("kfac+lbfgs", "factored"), ("kfac", "exact"), ("kfac+lbfgs", "exact")],
)
def test_kfac_factors_refresh_every_k_steps(preconditioner, tikhonov):
  config = hfjax.KFACConfig(update_every=3, decay=0.5, tikhonov=tikhonov)
  counts, slots = [], []
  for _, state in _kfac_steps(preconditioner, config, 7):
    counts.append(int(state.preconditioner.num_estimates))
    slots.append(np.asarray(state.preconditioner.factors[2][1]))  # G of the first layer
  # Refreshed at steps 0, 3 and 6 only; between refreshes the factors stay put.
  assert counts == [1, 1, 1, 2, 2, 2, 3]
  if tikhonov == "exact":  # the state holds the eigendecomposition of the averaged G
    g = slots[-1][:4, :4]
    values = np.asarray(state.preconditioner.eigenvalues[2][1])[:4]
    vectors = np.asarray(state.preconditioner.inverse_factors[2][1])[:4, :4]
    np.testing.assert_allclose(values, np.linalg.eigvalsh(g), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(vectors @ np.diag(values) @ vectors.T, g, rtol=1e-4, atol=1e-6)
  np.testing.assert_array_equal(slots[0], slots[2])
  assert not np.array_equal(slots[2], slots[3])


@pytest.mark.parametrize("preconditioner", ["kfac", "kfac+lbfgs"])
def test_kfac_inverses_refresh_every_k_steps_while_factors_average_every_step(preconditioner):
  config = hfjax.KFACConfig(decay=0.5, inverse_every=3)
  counts, g_inverses = [], []
  for k, (damping, state) in enumerate(_kfac_steps(preconditioner, config, 7)):
    running = state.preconditioner
    counts.append(int(running.num_estimates))
    g_inverses.append(np.asarray(running.inverse_factors[2][1])[:4, :4])  # G of layer "w"
    if k % 3 == 0:
      # Oracle: the factored-Tikhonov inverse of this step's averaged factors and damping.
      a = np.asarray(running.factors[2][0], np.float64)  # 3 inputs + the bias coordinate
      g = np.asarray(running.factors[2][1], np.float64)[:4, :4]
      pi = np.sqrt((np.trace(a) / 4) / (np.trace(g) / 4))
      expected = np.linalg.inv(g + np.sqrt(damping) / pi * np.eye(4))
      np.testing.assert_allclose(g_inverses[-1], expected, rtol=2e-4, atol=1e-5)
  # The factors take an estimate every step; the inverses change at steps 0, 3 and 6 only.
  assert counts == [1, 2, 3, 4, 5, 6, 7]
  for k in (1, 2, 4, 5):
    np.testing.assert_array_equal(g_inverses[k], g_inverses[k - 1])
  for k in (3, 6):
    assert not np.allclose(g_inverses[k], g_inverses[k - 1])


def test_kfac_inverse_every_must_be_a_positive_int():
  with pytest.raises(ValueError, match="kfac.inverse_every"):
    hfjax.hessian_free(
      lambda w, x: x @ w,
      lambda o, y: jnp.mean((o - y) ** 2),
      kfac=hfjax.KFACConfig(inverse_every=0),
    )


@pytest.mark.parametrize("seed", range(6))
def test_significance_is_a_one_sample_t_test_on_the_per_example_change(seed):
  rng = np.random.default_rng(seed)
  before = rng.normal(size=40)
  after = before + rng.normal(loc=0.3 * (seed - 2.5) / 2.5, scale=1.0, size=40)
  t = scipy.stats.ttest_1samp(after - before, 0.0).statistic
  for z in (0.5, 1.0, 2.0, 3.0):
    if abs(abs(t) - z) < 1e-4:
      continue  # too close to call in float32
    config = hfjax.DampingConfig(significance=z)
    got = optimizer._significant(config, jnp.float32(before), jnp.float32(after))
    assert bool(got) == (abs(t) > z), (t, z)


def _one_weight_problem():
  """``out = x w`` with squared error: from w = 0, the gradient batch (all y = 1) has
  g = -1 and G = 1, so the step is d = 1 / (1 + lambda) and the undamped model value
  q = -d + d^2 / 2."""
  apply_fn = lambda w, x: x * w[0]
  loss_fn = lambda out, y: 0.5 * jnp.mean((out - y) ** 2)
  batch = (jnp.ones(4), jnp.ones(4))
  return apply_fn, loss_fn, batch


@pytest.mark.parametrize("significance", [0.0, 2.0])
@pytest.mark.parametrize("validation", ["split", "agreeing"])
def test_an_insignificant_held_out_change_keeps_the_damping(significance, validation):
  apply_fn, loss_fn, batch = _one_weight_problem()
  # "split": half the held-out examples gain 1/2 and half lose 1/2, so the mean change is
  # ~0 (rho ~ 0) with a standard error of ~0.19; "agreeing": every example gains 1/2
  # (rho ~ 1, no spread).
  targets = jnp.tile(jnp.array([1.0, 0.0]), 4) if validation == "split" else jnp.ones(8)
  initial = 1e-3
  config = hfjax.DampingConfig(significance=significance)
  tx = hfjax.hessian_free(
    apply_fn, loss_fn, preconditioner="none", initial_damping=initial, damping=config
  )
  w = jnp.zeros(1)
  grads = jax.grad(lambda w: loss_fn(apply_fn(w, batch[0]), batch[1]))(w)
  updates, state = tx.update(
    grads, tx.init(w), w, batch=batch, validation_batch=(jnp.ones(8), targets)
  )
  d = 1.0 / (1.0 + initial)
  np.testing.assert_allclose(np.asarray(updates), [d], rtol=1e-5)
  changes = 0.5 * (d - targets) ** 2 - 0.5 * targets**2
  np.testing.assert_allclose(
    float(state.info.rho), np.mean(changes) / (-d + d * d / 2), rtol=1e-3, atol=1e-6
  )
  if validation == "agreeing":
    expected, significant = initial * config.decrease, True  # rho ~ 1 > high
  elif significance == 0:
    expected, significant = initial * config.increase, True  # rho ~ 0 < low
  else:
    expected, significant = initial, False
  np.testing.assert_allclose(float(state.damping), expected, rtol=1e-6)
  assert bool(state.info.rho_significant) == significant


@pytest.mark.parametrize("validation", ["rising", "split", "falling"])
def test_held_out_schedule_grows_the_sample_after_a_significant_rise(validation):
  apply_fn, loss_fn, batch = _one_weight_problem()
  # From w = 0 the step is d ~ 1: with held-out targets 0 every example's loss rises by
  # d^2 / 2 (a significant rise), "split" as above (no significant change), targets 1 every
  # loss falls by about 1/2.
  targets = {
    "rising": jnp.zeros(8),
    "split": jnp.tile(jnp.array([1.0, 0.0]), 4),
    "falling": jnp.ones(8),
  }[validation]
  tx = hfjax.hessian_free(
    apply_fn,
    loss_fn,
    preconditioner="none",
    initial_damping=1e-3,
    gradient_schedule=hfjax.held_out_schedule(4, 64, factor=2.0),
    curvature_schedule=hfjax.held_out_schedule(4, 64, factor=3.0),
  )
  w = jnp.zeros(1)
  grads = jax.grad(lambda w: loss_fn(apply_fn(w, batch[0]), batch[1]))(w)
  _, state = tx.update(grads, tx.init(w), w, batch=batch, validation_batch=(jnp.ones(8), targets))
  grown = validation == "rising"
  assert hfjax.sample_sizes(state) == ((8, 16) if grown else (4, 4))
  assert bool(state.info.rho_significant) == (validation != "split")
  assert (float(state.info.rho) < 0) == grown


def test_held_out_schedule_needs_a_validation_batch_and_the_test():
  apply_fn, loss_fn, batch = _one_weight_problem()
  schedule = hfjax.held_out_schedule(4, 64)
  for damping in (hfjax.DampingConfig(significance=0.0), hfjax.DampingConfig(ratio="gradient")):
    with pytest.raises(ValueError, match="significance"):
      hfjax.hessian_free(apply_fn, loss_fn, gradient_schedule=schedule, damping=damping)
  tx = hfjax.hessian_free(apply_fn, loss_fn, preconditioner="none", curvature_schedule=schedule)
  w = jnp.zeros(1)
  with pytest.raises(ValueError, match="validation_batch"):
    tx.update(jnp.ones(1), tx.init(w), w, batch=batch)


@pytest.mark.parametrize("held_out", [False, True])
def test_auto_ratio_is_martens_with_a_validation_batch_else_gradient(held_out):
  apply_fn = lambda p, x: jnp.tanh(x @ p["w"]) @ p["v"]
  loss_fn = lambda out, y: 0.5 * jnp.mean(jnp.sum((out - y) ** 2, axis=-1))
  params = {
    "w": jax.random.normal(jax.random.key(0), (3, 4)),
    "v": jax.random.normal(jax.random.key(1), (4, 2)),
  }
  x = jax.random.normal(jax.random.key(2), (48, 3))
  y = jax.random.normal(jax.random.key(3), (48, 2))
  grads = jax.grad(lambda p: loss_fn(apply_fn(p, x[:32]), y[:32]))(params)
  extra = {"validation_batch": (x[32:], y[32:])} if held_out else {}

  def rho(ratio):
    tx = hfjax.hessian_free(
      apply_fn, loss_fn, preconditioner="none", damping=hfjax.DampingConfig(ratio=ratio)
    )
    _, state = tx.update(grads, tx.init(params), params, batch=(x[:32], y[:32]), **extra)
    return float(state.info.rho)

  expected = rho("martens" if held_out else "gradient")
  assert rho("auto") == expected
  assert rho("gradient") != rho("martens")
