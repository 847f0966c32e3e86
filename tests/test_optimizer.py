"""Tests for hfjax.hessian_free: numerical oracles from NumPy, SciPy and plain loops."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree
from scipy import optimize

import hfjax

# Problems


def _linear_apply(params, inputs):
  return inputs @ params["w"] + params["b"]


def _squared_error(outputs, targets):
  return 0.5 * jnp.mean((outputs - targets) ** 2)


def _least_squares_data(seed=0, n=64, d=5):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, d)).astype(np.float32)
  y = (x @ rng.normal(size=d) + 0.5 + 0.1 * rng.normal(size=n)).astype(np.float32)
  return x, y


def _zeros(d, dtype=jnp.float32):
  return {"b": jnp.zeros((), dtype), "w": jnp.zeros((d,), dtype)}


L2 = 1e-2


def _logistic_apply(params, inputs):
  # The weights are an output too, so that loss_fn can hold the L2 term (its Gauss-Newton
  # block L2 * I is exact).
  return {"logits": inputs @ params["w"] + params["b"], "w": params["w"]}


def _logistic_loss(outputs, targets):
  logits = outputs["logits"]
  data = jnp.mean(jax.nn.softplus(logits) - targets * logits)
  return data + 0.5 * L2 * jnp.sum(outputs["w"] ** 2)


def _logistic_data(seed=1, n=200, d=4):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, d)).astype(np.float32)
  p = 1 / (1 + np.exp(-(x @ np.array([1.5, -1.0, 0.5, 2.0]) - 0.3)))
  y = (rng.uniform(size=n) < p).astype(np.float32)
  return x, y


def _scipy_logistic_optimum(x, y):
  x, y = x.astype(np.float64), y.astype(np.float64)

  def fun(theta):
    z = x @ theta[1:] + theta[0]
    value = np.mean(np.logaddexp(0, z) - y * z) + 0.5 * L2 * theta[1:] @ theta[1:]
    residual = 1 / (1 + np.exp(-z)) - y
    grad = np.concatenate([[residual.mean()], x.T @ residual / len(y) + L2 * theta[1:]])
    return value, grad

  result = optimize.minimize(
    fun, np.zeros(x.shape[1] + 1), jac=True, method="BFGS", options={"gtol": 1e-12}
  )
  assert np.max(np.abs(fun(result.x)[1])) < 1e-9
  return result.x


PROBLEMS = {
  "least_squares": (_linear_apply, _squared_error, _least_squares_data),
  "logistic": (_logistic_apply, _logistic_loss, _logistic_data),
}

# Helpers


def _loss_and_grad(apply_fn, loss_fn):
  return jax.jit(jax.value_and_grad(lambda p, batch: loss_fn(apply_fn(p, batch[0]), batch[1])))


@functools.cache
def _optimizer(problem, **options):
  """``(tx, jitted update, jitted value_and_grad)``, cached so tests share compilations."""
  apply_fn, loss_fn, _ = PROBLEMS[problem]
  tx = hfjax.hessian_free(apply_fn, loss_fn, **options)
  return tx, jax.jit(tx.update), _loss_and_grad(apply_fn, loss_fn)


def _canonical(problem="least_squares", preconditioner="lbfgs", lbfgs_pairs="within"):
  """The optimizer most tests share (one compilation per worker and configuration)."""
  return _optimizer(
    problem, preconditioner=preconditioner, lbfgs_pairs=lbfgs_pairs, initial_damping=1e-3
  )


def _with_damping(state, damping):
  return state._replace(damping=jnp.asarray(damping, state.damping.dtype))


def _train(problem, params, batch, num_steps, damping=None, **options):
  tx, update, loss_and_grad = _canonical(problem, **options)
  state = tx.init(params)
  if damping is not None:
    state = _with_damping(state, damping)
  for _ in range(num_steps):
    _, grads = loss_and_grad(params, batch)
    updates, state = update(grads, state, params, batch=batch)
    params = optax.apply_updates(params, updates)
  return params, state


def _numeric_leaves(tree):
  return [x for x in jax.tree.leaves(tree) if not jnp.issubdtype(x.dtype, jax.dtypes.prng_key)]


def _assert_state_finite(state):
  for leaf in _numeric_leaves(state):
    assert bool(jnp.all(jnp.isfinite(leaf))), state


def _dtypes(tree):
  return jax.tree.map(lambda x: x.dtype, tree)


# Every preconditioner; lbfgs_pairs only changes the L-BFGS one (the others ignore it).
CONFIGS = [("none", "within"), ("martens", "within"), ("jacobi", "within")] + [
  ("lbfgs", pairs) for pairs in ("within", "previous")
]

# Convergence to the optimum


@pytest.mark.parametrize("preconditioner, lbfgs_pairs", CONFIGS)
def test_least_squares_reaches_lstsq(preconditioner, lbfgs_pairs):
  x, y = _least_squares_data()
  params, state = _train(
    "least_squares", _zeros(5), (x, y), 6, preconditioner=preconditioner, lbfgs_pairs=lbfgs_pairs
  )
  expected = np.linalg.lstsq(np.c_[np.ones(len(x)), x].astype(np.float64), y, rcond=None)[0]
  np.testing.assert_allclose(ravel_pytree(params)[0], expected, rtol=1e-4, atol=1e-5)
  _assert_state_finite(state)


@pytest.mark.parametrize("preconditioner, lbfgs_pairs", CONFIGS)
def test_logistic_regression_reaches_scipy_optimum(x64, preconditioner, lbfgs_pairs):
  # In float64: near the optimum, float32 losses of neighbouring steps differ in the last bit
  # only, so where a float32 run stops accepting steps is down to rounding (on data seeds
  # 1-12, 10 of 48 float32 runs missed rtol 1e-4; none in float64).
  x, y = (a.astype(np.float64) for a in _logistic_data())
  params, state = _train(
    "logistic",
    _zeros(4, jnp.float64),
    (x, y),
    12,
    preconditioner=preconditioner,
    lbfgs_pairs=lbfgs_pairs,
  )
  expected = _scipy_logistic_optimum(x, y)
  np.testing.assert_allclose(ravel_pytree(params)[0], expected, rtol=1e-4, atol=1e-5)
  _assert_state_finite(state)
  if preconditioner == "lbfgs":
    assert int(state.info.lbfgs_pairs) > 0


# One step is a damped CG solve


def test_first_step_is_damped_newton_step():
  """preconditioner="none": the step solves (G + lambda I) d = -g (the warm start is zero)."""
  x, y = _least_squares_data(seed=2, d=6)
  damping = 0.1
  tx, update, loss_and_grad = _canonical("least_squares", "none")
  params = {"b": jnp.asarray(0.3), "w": jnp.linspace(-1.0, 1.0, 6)}
  _, grads = loss_and_grad(params, (x, y))
  state = _with_damping(tx.init(params), damping)
  updates, state = update(grads, state, params, batch=(x, y))

  design = np.c_[np.ones(len(x)), x].astype(np.float64)  # ravel order: b, w
  gauss_newton = design.T @ design / len(x)
  g = np.asarray(ravel_pytree(grads)[0], np.float64)
  expected = np.linalg.solve(gauss_newton + damping * np.eye(7), -g)
  np.testing.assert_allclose(ravel_pytree(updates)[0], expected, rtol=1e-4, atol=1e-6)
  assert bool(state.info.accepted)
  assert float(state.info.line_search_step) == 1.0
  # The next solve starts from (a decayed copy of) this one.
  np.testing.assert_allclose(ravel_pytree(state.warm_start)[0], expected, rtol=1e-4, atol=1e-6)


def test_adaptive_warm_start_step_is_the_best_combination_of_last_solution_and_gradient():
  """warm_start_decay="adaptive" with one CG step: the solution minimises the damped model
  over span{u, r_0}, u the last solution and r_0 = -g - c (G + lambda I) u at the best c."""
  x, y = _least_squares_data(seed=3, d=6)
  damping = 0.1
  tx, update, loss_and_grad = _optimizer(
    "least_squares", preconditioner="none", max_cg_steps=1, warm_start_decay="adaptive"
  )
  params = {"b": jnp.asarray(0.3), "w": jnp.linspace(-1.0, 1.0, 6)}
  last = {"b": jnp.asarray(-0.4), "w": jnp.asarray(np.random.default_rng(3).normal(size=6))}
  _, grads = loss_and_grad(params, (x, y))
  state = _with_damping(tx.init(params), damping)._replace(warm_start=last)
  _, state = update(grads, state, params, batch=(x, y))

  design = np.c_[np.ones(len(x)), x].astype(np.float64)  # ravel order: b, w
  a = design.T @ design / len(x) + damping * np.eye(7)
  g = np.asarray(ravel_pytree(grads)[0], np.float64)
  u = np.asarray(ravel_pytree(last)[0], np.float64)
  c = -(g @ u) / (u @ a @ u)
  basis, _ = np.linalg.qr(np.column_stack([u, -g - c * a @ u]))
  expected = basis @ np.linalg.solve(basis.T @ a @ basis, -basis.T @ g)
  np.testing.assert_allclose(ravel_pytree(state.warm_start)[0], expected, rtol=1e-4, atol=1e-6)
  assert int(state.info.cg_steps) == 1


# CG backtracking


def test_backtracking_picks_the_walk_back_iterate():
  n, d, damping, steps = 80, 20, 1e-4, 12
  rng = np.random.default_rng(3)
  x = (rng.normal(size=(n, d)) * np.logspace(0, 1, d)).astype(np.float32)
  y = (x @ rng.normal(size=d) + rng.normal(size=n)).astype(np.float32)
  design = np.c_[np.ones(n), x].astype(np.float64)  # ravel order: b, w
  tx, update, loss_and_grad = _optimizer(
    "least_squares", preconditioner="none", initial_damping=damping, max_cg_steps=steps, cg_tol=0.0
  )
  params = _zeros(d)
  _, grads = loss_and_grad(params, (x, y))

  # Reference: hfjax.cg on the same damped system from the same (zero) start.
  matrix = jnp.asarray(design.T @ design / n + damping * np.eye(d + 1), jnp.float32)
  g = ravel_pytree(grads)[0]
  solve = jax.jit(lambda b: hfjax.cg(lambda v: matrix @ v, b, x0=0 * b, max_steps=steps, tol=0.0))
  result = solve(-g)
  assert int(result.num_steps) == steps
  recorded = sorted(
    (int(s), np.asarray(result.iterates[i], np.float64), float(result.iterate_values[i]))
    for i, s in enumerate(result.iterate_steps)
    if s >= 0
  )
  # Validation targets fitted exactly by the step-5 iterate: by A-conjugacy of the CG
  # directions the validation loss then grows along the later iterates.
  validation = (x, (design @ dict((s, v) for s, v, _ in recorded)[5]).astype(np.float32))
  updates, state = update(grads, tx.init(params), params, batch=(x, y), validation_batch=validation)

  def validation_loss(step):
    return 0.5 * np.mean((design @ step - validation[1]) ** 2)

  # Martens' walk: from the last iterate back while the validation loss keeps falling.
  chosen = len(recorded) - 1
  best = validation_loss(recorded[chosen][1])
  while chosen > 0:
    candidate = validation_loss(recorded[chosen - 1][1])
    assert abs(best - candidate) > 1e-4 * best  # the walk is not decided by rounding
    if not candidate < best:
      break
    chosen, best = chosen - 1, candidate
  step, expected_update, model_value = recorded[chosen]
  assert step < steps, "the construction should make an earlier iterate win"

  assert int(state.info.cg_steps) == steps
  assert int(state.info.chosen_iterate) == step
  assert float(state.info.line_search_step) == 1.0
  np.testing.assert_allclose(ravel_pytree(updates)[0], expected_update, rtol=1e-4, atol=1e-6)
  # rho and the loss after are measured on the gradient batch, for the chosen iterate.
  f0 = 0.5 * np.mean(y.astype(np.float64) ** 2)
  f1 = 0.5 * np.mean((design @ expected_update - y) ** 2)
  np.testing.assert_allclose(float(state.info.loss_after), f1, rtol=1e-5)
  np.testing.assert_allclose(float(state.info.rho), (f1 - f0) / model_value, rtol=1e-4)


# Levenberg-Marquardt damping

CUSTOM_DAMPING = hfjax.DampingConfig(
  increase=3.0, decrease=0.5, low=0.3, high=0.6, minimum=0.2, maximum=2.0
)


def _damping_optimizer(custom):
  if not custom:
    return _canonical("least_squares", "none")
  return _optimizer(
    "least_squares", preconditioner="none", initial_damping=1e-3, damping=CUSTOM_DAMPING
  )


@pytest.mark.parametrize("custom", [False, True])
def test_damping_follows_reduction_ratio(custom):
  """On a quadratic rho is ~1 and the damping falls; lowering the f(theta) passed as
  ``loss=`` shifts rho by a known amount, into the middle band and below ``low``."""
  config = CUSTOM_DAMPING if custom else hfjax.DampingConfig()
  tx, update, loss_and_grad = _damping_optimizer(custom)
  x, y = _least_squares_data(seed=4)
  params = _zeros(5)
  damping = 0.5
  state = _with_damping(tx.init(params), damping)
  loss, grads = loss_and_grad(params, (x, y))

  _, good = update(grads, state, params, batch=(x, y), loss=loss)
  rho = float(good.info.rho)
  assert bool(good.info.accepted) and rho > config.high
  np.testing.assert_allclose(float(good.damping), damping * config.decrease, rtol=1e-6)
  f0, f1 = float(good.info.loss_before), float(good.info.loss_after)
  model_reduction = (f1 - f0) / rho  # q(d) < 0

  for target, factor in [((config.low + config.high) / 2, 1.0), (config.low / 3, config.increase)]:
    told = loss - (rho - target) * abs(model_reduction)
    _, new = update(grads, state, params, batch=(x, y), loss=told)
    assert bool(new.info.accepted)
    np.testing.assert_allclose(float(new.info.rho), target, atol=1e-3)
    np.testing.assert_allclose(float(new.damping), damping * factor, rtol=1e-6)


def test_damping_is_clipped_to_its_range():
  tx, update, loss_and_grad = _damping_optimizer(custom=True)
  x, y = _least_squares_data(seed=4)
  params = _zeros(5)
  loss, grads = loss_and_grad(params, (x, y))
  _, good = update(grads, _with_damping(tx.init(params), 0.3), params, batch=(x, y), loss=loss)
  assert bool(good.info.accepted)
  assert float(good.damping) == pytest.approx(CUSTOM_DAMPING.minimum)
  ascent = optax.tree.scale(-1.0, grads)
  _, bad = update(ascent, _with_damping(tx.init(params), 1.0), params, batch=(x, y), loss=loss)
  assert not bool(bad.info.accepted)
  assert float(bad.damping) == pytest.approx(CUSTOM_DAMPING.maximum)


# Rejected steps and non-finite values


def _after_one_step():
  """Params and state after one good step (so the warm start is not zero), and the batch."""
  x, y = _least_squares_data(seed=5)
  params, state = _train("least_squares", _zeros(5), (x, y), 1, damping=1.0)
  assert bool(state.info.accepted)
  assert float(optax.tree.norm(state.warm_start)) > 0
  return params, state, (x, y)


def _assert_rejected(updates, state, previous):
  for leaf in jax.tree.leaves(updates):
    np.testing.assert_array_equal(leaf, np.zeros_like(leaf))
  assert not bool(state.info.accepted)
  assert float(state.info.line_search_step) == 0.0
  increase = hfjax.DampingConfig().increase
  np.testing.assert_allclose(float(state.damping), float(previous.damping) * increase, rtol=1e-6)
  for leaf in jax.tree.leaves(state.warm_start):
    np.testing.assert_array_equal(leaf, np.zeros_like(leaf))
  assert int(state.info.consecutive_rejections) == int(previous.info.consecutive_rejections) + 1
  assert int(state.info.total_rejections) == int(previous.info.total_rejections) + 1
  assert float(state.info.loss_after) == float(state.info.loss_before)
  _assert_state_finite(state)
  assert _dtypes(state) == _dtypes(previous)


def test_ascent_direction_is_rejected():
  params, state, batch = _after_one_step()
  _, update, loss_and_grad = _canonical()
  loss, grads = loss_and_grad(params, batch)
  # CG then solves for an ascent direction: no step size lowers the loss.
  updates, new = update(optax.tree.scale(-1.0, grads), state, params, batch=batch)
  _assert_rejected(updates, new, state)
  assert not bool(new.info.non_finite)
  assert float(new.info.loss_before) == pytest.approx(float(loss), rel=1e-6)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
@pytest.mark.parametrize("where", ["inputs", "targets", "grads", "curvature_batch"])
def test_non_finite_step_is_rejected_and_training_goes_on(where, bad):
  params, state, (x, y) = _after_one_step()
  _, update, loss_and_grad = _canonical()
  poisoned_x, poisoned_y = x.copy(), y.copy()
  if where == "inputs":
    poisoned_x[3, 1] = bad
  elif where == "targets":
    poisoned_y[7] = bad
  batch = (poisoned_x, poisoned_y)
  _, grads = loss_and_grad(params, batch)
  kwargs = {}
  if where == "grads":
    grads = {"b": grads["b"], "w": grads["w"].at[2].set(bad)}
  elif where == "curvature_batch":
    # A clean gradient batch and a poisoned curvature sample: CG meets the NaN/Inf.
    curvature_x = x[:32].copy()
    curvature_x[0, 0] = bad
    kwargs["curvature_batch"] = (curvature_x, y[:32])
  if where != "curvature_batch":
    assert not bool(jnp.all(jnp.isfinite(ravel_pytree(grads)[0])))
  updates, rejected = update(grads, state, params, batch=batch, **kwargs)
  _assert_rejected(updates, rejected, state)
  assert bool(rejected.info.non_finite)
  params = optax.apply_updates(params, updates)
  for leaf in jax.tree.leaves(params):
    assert bool(jnp.all(jnp.isfinite(leaf)))

  loss, grads = loss_and_grad(params, (x, y))
  updates, good = update(grads, rejected, params, batch=(x, y))
  assert bool(good.info.accepted) and not bool(good.info.non_finite)
  assert float(good.info.loss_after) < float(loss)
  assert int(good.info.consecutive_rejections) == 0
  _assert_state_finite(good)


# A small deep autoencoder


def _autoencoder_apply(params, inputs):
  h = inputs
  for i, layer in enumerate(params):
    h = h @ layer["w"] + layer["b"]
    if i < len(params) - 1:
      h = jax.nn.sigmoid(h)
  return h


def _sigmoid_cross_entropy(logits, targets):
  return jnp.mean(jnp.sum(jax.nn.softplus(logits) - targets * logits, axis=-1))


def test_autoencoder_loss_falls_steadily():
  rng = np.random.default_rng(6)
  # CURVES-like: smooth images of a 3-dimensional latent, pixel values in (0, 1).
  latent = rng.normal(size=(256, 3)) @ rng.normal(size=(3, 16))
  data = np.clip(1 / (1 + np.exp(-latent)), 0.02, 0.98).astype(np.float32)
  sizes = [16, 8, 4, 8, 16]
  keys = jax.random.split(jax.random.key(0), len(sizes) - 1)
  params = [
    {"w": jax.random.normal(k, (a, b)) / np.sqrt(a), "b": jnp.zeros(b)}
    for k, a, b in zip(keys, sizes[:-1], sizes[1:], strict=True)
  ]
  # No preconditioner: the L-BFGS one helps as much here but costs twice the compile time.
  tx = hfjax.hessian_free(
    _autoencoder_apply, _sigmoid_cross_entropy, preconditioner="none", initial_damping=0.1
  )
  loss_and_grad = _loss_and_grad(_autoencoder_apply, _sigmoid_cross_entropy)

  @jax.jit
  def step(params, state, batch):
    loss, grads = loss_and_grad(params, batch)
    updates, state = tx.update(grads, state, params, batch=batch, loss=loss)
    return optax.apply_updates(params, updates), state

  state = tx.init(params)
  losses = [float(loss_and_grad(params, (data, data))[0])]
  for _ in range(10):
    params, state = step(params, state, (data, data))
    assert bool(state.info.accepted)
    losses.append(float(loss_and_grad(params, (data, data))[0]))
    np.testing.assert_allclose(losses[-1], float(state.info.loss_after), rtol=1e-5)
  assert all(b < a for a, b in zip(losses, losses[1:], strict=False)), losses
  # The floor is the entropy of the pixels: most of the gap above it must be gone.
  floor = float(_sigmoid_cross_entropy(jnp.log(data / (1 - data)), data))
  assert losses[-1] - floor < 0.25 * (losses[0] - floor), (losses, floor)


# Compilation and state


def test_one_compilation_per_batch_shape():
  traces = []
  tx = hfjax.hessian_free(_linear_apply, _squared_error, preconditioner="none")
  loss_and_grad = _loss_and_grad(_linear_apply, _squared_error)

  @jax.jit
  def step(params, state, batch):
    traces.append(jax.tree.map(jnp.shape, batch))
    _, grads = loss_and_grad(params, batch)
    updates, state = tx.update(grads, state, params, batch=batch)
    return optax.apply_updates(params, updates), state

  x, y = _least_squares_data(n=96)
  params = _zeros(5)
  state = tx.init(params)
  for i in range(8):
    size = 32 if i % 2 else 64
    params, state = step(params, state, (x[:size], y[:size]))
  assert len(traces) == 2
  assert step._cache_size() == 2
  assert int(state.count) == 8


NAMES = (
  "damping",
  "rho",
  "cg_steps",
  "loss_before",
  "loss_after",
  "accepted",
  "chosen_iterate",
  "line_search_step",
  "gradient_batch_size",
  "curvature_batch_size",
  "lbfgs_pairs",
  "cg_stop_reason",
)


def test_tree_get_finds_diagnostics_alone_and_in_chain():
  x, y = _least_squares_data()
  _, state = _train("least_squares", _zeros(5), (x, y), 1, damping=1.0)
  chained = (optax.EmptyState(), state)
  for name in NAMES:
    value = optax.tree.get(state, name)
    assert value is not None, name
    assert jnp.shape(value) == (), name
    assert optax.tree.get(chained, name) is value
  assert float(optax.tree.get(state, "damping")) == float(state.damping)
  # Made without sampling schedules, the state tracks no sizes for the next step.
  assert optax.tree.get(state, "gradient_sample_size") is None
  assert bool(optax.tree.get(state, "accepted"))
  assert int(optax.tree.get(state, "cg_steps")) >= 1
  assert int(optax.tree.get(state, "cg_stop_reason")) in set(hfjax.CGStopReason)
  assert int(optax.tree.get(state, "lbfgs_pairs")) > 0  # the default preconditioner
  loss_before = float(optax.tree.get(state, "loss_before"))
  assert loss_before == pytest.approx(float(_squared_error(0 * y, y)), rel=1e-6)
  assert float(optax.tree.get(state, "loss_after")) < loss_before


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_state_dtypes_stable_across_steps(dtype):
  x, y = _least_squares_data()
  params = _zeros(5, jnp.dtype(dtype))
  tx, update, loss_and_grad = _canonical()
  state = tx.init(params)
  init_dtypes = _dtypes(state)
  for _ in range(3):
    _, grads = loss_and_grad(params, (x, y))
    updates, state = update(grads, state, params, batch=(x, y))
    assert _dtypes(updates) == _dtypes(params)
    params = optax.apply_updates(params, updates)
    assert _dtypes(state) == init_dtypes
    assert _dtypes(params) == jax.tree.map(lambda _: jnp.dtype(dtype), params)
  assert float(state.info.loss_after) < float(_squared_error(0 * y, y))


def _float64_problem():
  x, y = _least_squares_data()
  x, y = x.astype(np.float64), y.astype(np.float64)
  return (x, y), np.linalg.lstsq(np.c_[np.ones(len(x)), x], y, rcond=None)[0]


def test_float64_under_x64():
  with jax.enable_x64(True):
    batch, expected = _float64_problem()
    tx, update, loss_and_grad = _canonical()
    params = _zeros(5, jnp.float64)
    state = tx.init(params)
    init_dtypes = _dtypes(state)
    for leaf in jax.tree.leaves(state.warm_start):
      assert leaf.dtype == jnp.float64
    state = _with_damping(state, 1e-9)
    for _ in range(2):
      _, grads = loss_and_grad(params, batch)
      updates, state = update(grads, state, params, batch=batch)
      assert _dtypes(updates) == _dtypes(params)
      params = optax.apply_updates(params, updates)
      assert _dtypes(state) == init_dtypes
    np.testing.assert_allclose(ravel_pytree(params)[0], expected, rtol=1e-8, atol=1e-9)


def test_float64_refines_below_float32_resolution():
  """From a start whose loss equals the optimum's in float32, a float64 problem still
  improves: the acceptance tests must compare losses in the parameters' precision."""
  with jax.enable_x64(True):
    batch, expected = _float64_problem()
    start = expected + 1e-6 * np.linspace(-1.0, 1.0, 6)
    params = {"b": jnp.asarray(start[0]), "w": jnp.asarray(start[1:])}
    tx, update, loss_and_grad = _canonical()
    loss, grads = loss_and_grad(params, batch)
    optimum_loss = 0.5 * np.mean(
      (np.c_[np.ones(len(batch[1])), batch[0]] @ expected - batch[1]) ** 2
    )
    assert np.float32(float(loss)) == np.float32(optimum_loss)
    updates, state = update(grads, _with_damping(tx.init(params), 1e-9), params, batch=batch)
    assert bool(state.info.accepted)
    moved = ravel_pytree(optax.apply_updates(params, updates))[0]
    np.testing.assert_allclose(moved, expected, rtol=1e-10, atol=1e-11)


# Chaining with Optax


def _chain_case():
  x, y = _least_squares_data(seed=7)
  params = {"b": jnp.asarray(3.0), "w": jnp.full((5,), 2.0)}
  _, grads = _loss_and_grad(_linear_apply, _squared_error)(params, (x, y))
  assert float(optax.tree.norm(grads)) > 2.0  # so that clipping to norm 1 changes them
  return params, grads, (x, y)


def test_chain_with_clipping_feeds_clipped_gradients():
  params, grads, batch = _chain_case()
  chain = optax.chain(
    optax.clip_by_global_norm(1.0),
    hfjax.hessian_free(_linear_apply, _squared_error, preconditioner="none", initial_damping=1e-3),
  )
  updates, state = jax.jit(chain.update)(grads, chain.init(params), params, batch=batch)

  tx, update, _ = _canonical("least_squares", "none")
  clipped = optax.tree.scale(1.0 / float(optax.tree.norm(grads)), grads)
  expected, alone = update(clipped, tx.init(params), params, batch=batch)
  unclipped, _ = update(grads, tx.init(params), params, batch=batch)
  chex.assert_trees_all_close(updates, expected, rtol=1e-5, atol=1e-7)
  assert float(optax.tree.norm(optax.tree.sub(unclipped, expected))) > 1e-2
  assert float(optax.tree.get(state, "damping")) == float(alone.damping)


def test_chain_with_weight_decay():
  params, grads, batch = _chain_case()
  chain = optax.chain(
    optax.add_decayed_weights(0.1),
    hfjax.hessian_free(_linear_apply, _squared_error, preconditioner="none", initial_damping=1e-3),
  )
  updates, _ = jax.jit(chain.update)(grads, chain.init(params), params, batch=batch)
  tx, update, _ = _canonical("least_squares", "none")
  decayed = optax.tree.add_scale(grads, 0.1, params)
  expected, _ = update(decayed, tx.init(params), params, batch=batch)
  plain, _ = update(grads, tx.init(params), params, batch=batch)
  chex.assert_trees_all_close(updates, expected, rtol=1e-5, atol=1e-7)
  assert float(optax.tree.norm(optax.tree.sub(plain, expected))) > 1e-2


# Validation


@pytest.mark.parametrize(
  "option, value, error",
  [
    ("preconditioner", "foo", ValueError),
    ("lbfgs_pairs", "next", ValueError),
    ("memory_size", 0, ValueError),
    ("memory_size", 2.5, ValueError),
    ("max_cg_steps", 0, ValueError),
    ("cg_tol", -1e-3, ValueError),
    ("initial_damping", -1.0, ValueError),
    ("initial_damping", 0.0, ValueError),
    ("initial_damping", float("nan"), ValueError),
    ("warm_start_decay", 2.0, ValueError),
    ("warm_start_decay", -0.1, ValueError),
    ("warm_start_decay", "momentum", ValueError),
    ("num_recorded_iterates", 0, ValueError),
    ("chunk_size", 0, ValueError),
    ("damping", {"increase": 1.5}, TypeError),
    ("damping", hfjax.DampingConfig(increase=0.9), ValueError),
    ("damping", hfjax.DampingConfig(decrease=1.1), ValueError),
    ("damping", hfjax.DampingConfig(minimum=0.0), ValueError),
    ("damping", hfjax.DampingConfig(minimum=2.0, maximum=1.0), ValueError),
    ("damping", hfjax.DampingConfig(low=0.8, high=0.2), ValueError),
    ("line_search", 0.5, TypeError),
    ("line_search", hfjax.LineSearchConfig(shrink=1.2), ValueError),
    ("line_search", hfjax.LineSearchConfig(armijo=1.0), ValueError),
    ("line_search", hfjax.LineSearchConfig(max_steps=0), ValueError),
    ("gradient_schedule", 64, TypeError),
    ("curvature_schedule", hfjax.variance_test_schedule(8, 64), ValueError),
  ],
)
def test_constructor_rejects_bad_option(option, value, error):
  with pytest.raises(error, match=option):
    hfjax.hessian_free(_linear_apply, _squared_error, **{option: value})


def test_update_errors():
  x, y = _least_squares_data()
  tx = hfjax.hessian_free(_linear_apply, _squared_error)
  params = _zeros(5)
  state = tx.init(params)
  grads = optax.tree.zeros_like(params)
  with pytest.raises(ValueError, match="params"):
    tx.update(grads, state, batch=(x, y))
  with pytest.raises(ValueError, match="batch"):
    tx.update(grads, state, params)
  with pytest.raises(TypeError, match="pair"):
    tx.update(grads, state, params, batch=(x, y, y))
  with pytest.raises(TypeError, match="pair"):
    tx.update(grads, state, params, batch=x)
  with pytest.raises(ValueError, match="curvature batch"):
    tx.update(grads, state, params, batch=(x[:8], y[:8]), curvature_batch=(x[:16], y[:16]))
  with pytest.raises(ValueError, match="disagree"):
    tx.update(grads, state, params, batch=(x, y[:8]))
  with pytest.raises(ValueError, match="tree structure"):
    tx.update({"w": grads["w"]}, state, params, batch=(x, y))
  int_params = {"b": jnp.zeros((), jnp.int32), "w": jnp.zeros((5,), jnp.int32)}
  with pytest.raises(TypeError, match="floating"):
    tx.update(grads, state, int_params, batch=(x, y))
  with pytest.raises(TypeError, match="floating"):
    tx.init(int_params)
  with pytest.raises(ValueError, match="empty"):
    tx.init({})


def test_fresh_state_can_be_donated():
  """Every leaf of a fresh state is its own buffer, so a donating jitted step accepts it."""
  x, y = _least_squares_data(seed=3)
  tx = hfjax.hessian_free(_linear_apply, _squared_error, initial_damping=1e-3, max_cg_steps=5)
  params = {"b": jnp.asarray(0.0), "w": jnp.zeros(5)}

  def step(params, state):
    _, grads = _loss_and_grad(_linear_apply, _squared_error)(params, (x, y))
    updates, state = tx.update(grads, state, params, batch=(x, y))
    return optax.apply_updates(params, updates), state

  donated = jax.jit(step, donate_argnums=(0, 1))
  new_params, state = donated(params, tx.init(params))
  expected, _ = jax.jit(step)({"b": jnp.asarray(0.0), "w": jnp.zeros(5)}, tx.init(params))
  chex.assert_trees_all_close(new_params, expected)
  assert int(state.count) == 1


@pytest.mark.parametrize(
  "options",
  [
    {},
    {"line_search": hfjax.LineSearchConfig(armijo=0.9)},  # forces the line search to shrink
    {"validation": True},
    {"with_loss": True, "max_cg_steps": 3},
  ],
)
def test_loss_evaluation_counters_match_counted_forward_passes(options):
  # Every forward pass of the model inside the jitted update is counted on the host: one for
  # the linearisation, one for f(theta) unless loss= is given, and one per loss evaluation of
  # backtracking and the line search, which the counters must account for exactly.
  options = dict(options)
  validation, with_loss = options.pop("validation", False), options.pop("with_loss", False)
  calls = []

  def counting_apply(params, inputs):
    jax.debug.callback(lambda: calls.append(1))
    return _linear_apply(params, inputs)

  x, y = _least_squares_data()
  tx = hfjax.hessian_free(
    counting_apply,
    _squared_error,
    preconditioner="none",
    initial_damping=0.01,
    **{"max_cg_steps": 8, **options},
  )
  update = jax.jit(
    lambda g, s, p, b, c, v, f: tx.update(
      g, s, p, batch=b, curvature_batch=c, validation_batch=v, loss=f
    )
  )
  params = _zeros(5)
  state = tx.init(params)
  seen = set()
  for _ in range(5):
    loss, grads = jax.value_and_grad(lambda p: _squared_error(_linear_apply(p, x), y))(params)
    calls.clear()
    updates, state = update(
      grads,
      state,
      params,
      (x, y),
      (x[:32], y[:32]),
      (x[32:], y[32:]) if validation else None,
      loss if with_loss else None,
    )
    jax.effects_barrier()
    info = state.info
    evaluations = int(info.backtracking_evaluations) + int(info.line_search_evaluations)
    assert len(calls) == 1 + (not with_loss) + evaluations
    assert 1 <= int(info.backtracking_evaluations)
    seen.add((int(info.backtracking_evaluations), int(info.line_search_evaluations)))
    params = optax.apply_updates(params, updates)
  if "line_search" in options:
    assert any(searched > 0 for _, searched in seen)
