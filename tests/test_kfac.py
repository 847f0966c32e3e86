"""K-FAC factors, damped inverse and preconditioner against closed forms and dense references."""

import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

import hfjax
from hfjax import kfac, layers
from hfjax.experiments import models

# Jitted once: eager evaluation compiles every operation on its own and is many times slower.
factors_of = jax.jit(kfac.kfac_factors, static_argnums=(0, 1), static_argnames=("layout", "loss"))
inverse_of = jax.jit(kfac.kfac_inverse)


def mlp_params(key, d_in=3, hidden=5, d_out=4, dtype=jnp.float32):
  k1, k2, k3, k4 = jax.random.split(key, 4)
  return {
    "dense1": {
      "kernel": jax.random.normal(k1, (d_in, hidden), dtype),
      "bias": 0.5 * jax.random.normal(k2, (hidden,), dtype),
    },
    "dense2": {
      "kernel": jax.random.normal(k3, (hidden, d_out), dtype),
      "bias": 0.5 * jax.random.normal(k4, (d_out,), dtype),
    },
  }


def mlp_hidden(params, x):
  """The first layer's pre-activation."""
  return x @ params["dense1"]["kernel"] + params["dense1"]["bias"]


def mlp_head(params, pre):
  """The outputs as a function of the first layer's pre-activation."""
  return jnp.tanh(pre) @ params["dense2"]["kernel"] + params["dense2"]["bias"]


def mlp_apply(params, x):
  return mlp_head(params, mlp_hidden(params, x))


def mean_l2_loss(outputs, targets):
  return optax.l2_loss(outputs, targets).mean()


# --- Loss detection -------------------------------------------------------------------------


@pytest.mark.parametrize(
  "loss_fn, targets, kind, scale",
  [
    (models.sigmoid_cross_entropy, np.full((4, 5), 0.3), "sigmoid_cross_entropy", 1.0),
    (models.softmax_cross_entropy, np.zeros(4, np.int32), "softmax_cross_entropy", 1.0),
    (
      lambda o, t: optax.softmax_cross_entropy(o, t).mean(),
      np.eye(5)[:4],
      "softmax_cross_entropy",
      1.0,
    ),
    (models.squared_error, np.zeros((4, 5)), "squared_error", 1.0),
    (mean_l2_loss, np.zeros((4, 5)), "squared_error", 1 / 5),
    (
      lambda o, t: optax.squared_error(o, t).sum(-1).mean(),
      np.zeros((4, 5)),
      "squared_error",
      2.0,
    ),
    (
      lambda o, t: optax.sigmoid_binary_cross_entropy(o, t).mean(),
      np.zeros((4, 5)),
      "sigmoid_cross_entropy",
      1 / 5,
    ),
  ],
  ids=["sigmoid", "softmax-int", "softmax-onehot", "squared", "l2-mean", "sq-sum-mean", "bce-mean"],
)
def test_detects_kind_and_scale(loss_fn, targets, kind, scale):
  outputs = jax.ShapeDtypeStruct((4, 5), jnp.float32)
  found = kfac.detect_output_loss(loss_fn, outputs, jnp.asarray(targets))
  assert found.kind == kind
  np.testing.assert_allclose(found.scale, scale, rtol=1e-5)


def test_detection_works_while_tracing():
  @jax.jit
  def scale(outputs, targets):
    return jnp.asarray(kfac.detect_output_loss(mean_l2_loss, outputs, targets).scale)

  np.testing.assert_allclose(scale(jnp.ones((4, 5)), jnp.zeros((4, 5))), 0.2, rtol=1e-5)


def test_loss_probe_runs_under_a_transfer_guard():
  # The probe evaluates loss_fn on host values while tracing: allowed even when the user's
  # loop disallows transfers (on CPU the host-to-device direction fires).
  params = {"b": jnp.zeros(2), "w": jnp.ones((3, 2))}
  apply_fn = lambda p, x: x @ p["w"] + p["b"]
  batch = (jnp.eye(3), jnp.zeros((3, 2)))
  key = jax.random.key(0)
  build = jax.jit(lambda p, b, k: kfac.kfac_factors(apply_fn, models.squared_error, p, b, k))
  with jax.transfer_guard("disallow"):
    factors = build(params, batch, key)
    with pytest.raises(Exception, match="[Dd]isallowed"):
      jnp.asarray(np.ones(3))  # the guard is on
  np.testing.assert_allclose(factors.a_factors[0][:3, :3], np.eye(3) / 3, rtol=1e-6)


@pytest.mark.parametrize(
  "loss_fn, match",
  [
    (lambda o, t: optax.hinge_loss(o, t).mean(), "zero Hessian"),
    (lambda o, t: jnp.abs(o - t).sum(-1).mean(), "zero Hessian"),
    (lambda o, t: ((o - t) ** 4).sum(-1).mean(), "not that of a matching loss"),
    (lambda o, t: -jnp.sum(o**2) / o.shape[0], "not positive"),
    (lambda o, t: ((o - t) ** 2).sum(), "not a mean over the batch"),
  ],
  ids=["hinge", "abs", "quartic", "concave", "batch-sum"],
)
def test_non_matching_losses_raise(loss_fn, match):
  with pytest.raises(ValueError, match=match):
    kfac.detect_output_loss(loss_fn, jnp.ones((4, 5)), jnp.zeros((4, 5)))


def test_explicit_kind_fits_scale_and_warns_on_mismatch():
  quartic = lambda o, t: ((o - t) ** 4).sum(-1).mean()
  with pytest.warns(UserWarning, match="least-squares scale"):
    found = kfac.detect_output_loss(quartic, jnp.ones((4, 5)), jnp.zeros((4, 5)), "squared_error")
  assert found.kind == "squared_error" and found.scale > 0
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    found = kfac.detect_output_loss(
      mean_l2_loss, jnp.ones((4, 5)), jnp.zeros((4, 5)), "squared_error"
    )
  np.testing.assert_allclose(found.scale, 0.2, rtol=1e-5)
  with pytest.raises(ValueError, match="loss must be"):
    kfac.detect_output_loss(mean_l2_loss, jnp.ones((4, 5)), jnp.zeros((4, 5)), "hinge")


# --- Sampled factors against their expectations ----------------------------------------------


def exact_factors(params, x, targets, loss_fn):
  """E[G] = mean_n J_n^T H_n J_n per layer, with H_n the loss Hessian of example n alone."""

  def per_example(x_n, t_n):
    pre = mlp_hidden(params, x_n[None])[0]
    out = mlp_head(params, pre[None])[0]
    hess = jax.hessian(lambda o: loss_fn(o[None], t_n[None]))(out)
    jac = jax.jacobian(lambda p: mlp_head(params, p[None])[0])(pre)
    return jac.T @ hess @ jac, hess, jac

  g1, g2, jac = jax.vmap(per_example)(x, targets)
  return g1.mean(0), g2.mean(0), jac


CASES = {
  "sigmoid": (models.sigmoid_cross_entropy, lambda n: np.full((n, 4), 0.3, np.float32)),
  "softmax": (models.softmax_cross_entropy, lambda n: np.tile(np.int32([0, 1]), n // 2)),
  "l2-mean": (mean_l2_loss, lambda n: np.zeros((n, 4), np.float32)),
  "bce-mean": (
    lambda o, t: optax.sigmoid_binary_cross_entropy(o, t).mean(),
    lambda n: np.zeros((n, 4), np.float32),
  ),
}


@pytest.mark.parametrize("case", CASES)
def test_sampled_factors_match_their_expectation(case):
  loss_fn, make_targets = CASES[case]
  n = 20000
  params = mlp_params(jax.random.key(0))
  # Two distinct examples, each repeated: the factors average over examples, the sampling
  # error shrinks like 1/sqrt(n).
  distinct = np.array([[0.5, -1.0, 0.3], [-0.7, 0.2, 1.1]], np.float32)
  x = jnp.asarray(np.tile(distinct, (n // 2, 1)))
  targets = jnp.asarray(make_targets(n))
  factors = factors_of(mlp_apply, loss_fn, params, (x, targets), jax.random.key(1))
  want_g1, want_g2, jac = exact_factors(params, x[:2], targets[:2], loss_fn)
  # Both distinct examples appear equally often, so the exact mean is over the first two.

  # Standard errors of the row means, from an independent draw of the same distribution.
  output_loss = kfac.detect_output_loss(loss_fn, jax.ShapeDtypeStruct((n, 4), jnp.float32), targets)
  u = kfac.sample_output_cotangents(output_loss, mlp_apply(params, x), jax.random.key(2))
  g1 = jnp.einsum("no,noh->nh", u, jnp.tile(jac, (n // 2, 1, 1)))
  for got, want, g in [(factors.g_factors[0], want_g1, g1), (factors.g_factors[1], want_g2, u)]:
    products = g[:, :, None] * g[:, None, :]
    se = np.std(products, axis=0) / np.sqrt(n)
    assert np.all(np.abs(got - want) <= 5 * se + 1e-6), (case, np.max(np.abs(got - want) / se))

  # A is not sampled: exact means of [a, 1][a, 1]^T.
  for got, a in [
    (factors.a_factors[0], x),
    (factors.a_factors[1], jnp.tanh(mlp_hidden(params, x))),
  ]:
    a1 = np.concatenate([np.asarray(a, np.float64), np.ones((n, 1))], 1)
    np.testing.assert_allclose(got, a1.T @ a1 / n, rtol=1e-5, atol=1e-6)
  assert int(factors.count) == 1


def linear_apply(params, x):
  return x @ params["kernel"] + params["bias"]


def linear_apply_transposed(params, x):
  return x @ params["kernel"].T + params["bias"]


def linear_problem(transposed, steps=None, n=50, d_in=4, d_out=3):
  """A linear layer on ``n`` examples, each a row or (with ``steps``) a sequence of rows."""
  rng = np.random.default_rng(3)
  rows = (n,) if steps is None else (n, steps)
  # Correlated, badly scaled inputs: an ill-conditioned A.
  x = (
    rng.standard_normal(rows + (d_in,))
    @ np.diag([5.0, 1.0, 0.3, 0.05])
    @ rng.standard_normal((d_in, d_in))
  )
  shape = (d_out, d_in) if transposed else (d_in, d_out)
  params = {"kernel": jnp.asarray(rng.standard_normal(shape)), "bias": jnp.zeros(d_out)}
  batch = (jnp.asarray(x), jnp.asarray(rng.standard_normal(rows + (d_out,))))
  return (linear_apply_transposed if transposed else linear_apply), params, batch


def stacked(params, transposed):
  """The row-major vec of [W; b] with W as (d_in, d_out)."""
  kernel = np.asarray(params["kernel"])
  kernel = kernel.T if transposed else kernel
  return np.concatenate([kernel, np.asarray(params["bias"])[None]], 0).ravel()


def unstacked(vec, params, transposed):
  d_out = params["bias"].shape[0]
  matrix = vec.reshape(-1, d_out)
  kernel = matrix[:-1].T if transposed else matrix[:-1]
  return {"kernel": jnp.asarray(kernel), "bias": jnp.asarray(matrix[-1])}


def materialise(matvec, params, transposed):
  """The matrix of ``matvec`` in the [W; b] row-major order."""
  size = stacked(params, transposed).size
  columns = [stacked(matvec(unstacked(e, params, transposed)), transposed) for e in np.eye(size)]
  return np.stack(columns, 1)


@pytest.mark.parametrize("transposed, steps", [(False, None), (True, None), (False, 5)])
def test_kronecker_block_is_the_gauss_newton_block_of_a_linear_layer(x64, transposed, steps):
  # Linear layer + squared error: the Gauss-Newton block is exactly A (x) E[G], with
  # E[G] = (rows per example) c I; A averages over all rows, G sums them per example.
  apply_fn, params, batch = linear_problem(transposed, steps, n=400)
  layout = layers.find_dense_layers(apply_fn, params, batch[0])
  assert layout.layers[0].kernel_in_axis == (1 if transposed else 0)
  factors = factors_of(apply_fn, mean_l2_loss, params, batch, jax.random.key(0))
  rows = steps or 1
  c = 1 / (3 * rows)  # optax.l2_loss(...).mean() over the rows * 3 outputs of an example.
  matvec, _ = hfjax.gauss_newton_matvec(apply_fn, mean_l2_loss, params, batch)
  want = materialise(jax.jit(matvec), params, transposed)
  got = np.kron(factors.a_factors[0], rows * c * np.eye(3))
  np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
  # The sampled G within five standard errors of E[G]; the errors from another draw of the
  # per-example sums S_n = sum over the example's rows of u u^T, whose mean over n is G.
  u = kfac.sample_output_cotangents(
    kfac.OutputLoss("squared_error", c), batch[1], jax.random.key(1)
  )
  u = np.asarray(u).reshape(u.shape[0], rows, 3)
  sums = np.einsum("nti,ntj->nij", u, u)
  se = sums.std(0) / np.sqrt(len(sums))
  np.testing.assert_array_less(np.abs(factors.g_factors[0] - rows * c * np.eye(3)), 5 * se)


# --- Damped inverse -------------------------------------------------------------------------


def random_spd(n, rng, scale=1.0):
  q = rng.standard_normal((n, n))
  return scale * (q @ q.T / n + 0.1 * np.eye(n))


def hand_layout():
  """Leaves (sorted dict keys): a/bias 0, a/kernel 1, b/kernel 2, scale 3."""
  return layers.LayerLayout(
    layers=(
      layers.DenseLayer(kernel=1, bias=0, kernel_in_axis=0, path="['a']['kernel']"),
      layers.DenseLayer(kernel=2, bias=None, kernel_in_axis=1, path="['b']['kernel']"),
    ),
    unmatched=(3,),
    reasons=("['scale']: hand-made",),
  )


def hand_vector(rng):
  return {
    "a": {"bias": rng.standard_normal(3), "kernel": rng.standard_normal((4, 3))},
    "b": {"kernel": rng.standard_normal((2, 3))},  # (d_out, d_in), kernel_in_axis=1
    "scale": rng.standard_normal(5),
  }


@pytest.mark.parametrize("tikhonov", kfac.TIKHONOV_KINDS)
@pytest.mark.parametrize("damping", [0.0, 1e-3, 0.5])
def test_apply_matches_dense_solve_with_the_damped_kronecker_matrix(x64, damping, tikhonov):
  rng = np.random.default_rng(4)
  # G of the first layer 100x larger than A: pi far from 1.
  a0, g0 = random_spd(5, rng), random_spd(3, rng, 100.0)
  a1, g1 = random_spd(3, rng), random_spd(2, rng, 0.01)
  diagonal = np.abs(rng.standard_normal(5))
  factors = kfac.KFACFactors(
    a_factors=(jnp.asarray(a0), jnp.asarray(a1)),
    g_factors=(jnp.asarray(g0), jnp.asarray(g1)),
    diagonal=(jnp.asarray(diagonal),),
    count=jnp.ones((), jnp.int32),
  )
  v = jax.tree.map(jnp.asarray, hand_vector(rng))
  layout = hand_layout()
  precondition = lambda f, v: kfac.kfac_preconditioner(f, damping, layout, tikhonov=tikhonov)(v)
  z = jax.jit(precondition)(factors, v)

  def damped_solve(a, g, rhs):
    if tikhonov == "exact":  # (A (x) G + lambda I)^-1
      return np.linalg.solve(np.kron(a, g) + damping * np.eye(len(a) * len(g)), rhs)
    pi = np.sqrt((np.trace(a) / len(a)) / (np.trace(g) / len(g)))
    root = np.sqrt(damping)
    matrix = np.kron(a + pi * root * np.eye(len(a)), g + root / pi * np.eye(len(g)))
    return np.linalg.solve(matrix, rhs)

  rtol = {"factored": 1e-9, "exact": 1e-8}[tikhonov]  # eigh is a little less accurate
  want0 = damped_solve(a0, g0, np.concatenate([v["a"]["kernel"], v["a"]["bias"][None]]).ravel())
  got0 = np.concatenate([z["a"]["kernel"], z["a"]["bias"][None]]).ravel()
  np.testing.assert_allclose(got0, want0, rtol=rtol)
  want1 = damped_solve(a1, g1, np.asarray(v["b"]["kernel"]).T.ravel())
  np.testing.assert_allclose(np.asarray(z["b"]["kernel"]).T.ravel(), want1, rtol=rtol)
  np.testing.assert_allclose(z["scale"], v["scale"] / (diagonal + damping), rtol=1e-12)


def test_exact_tikhonov_stays_finite_without_curvature_and_checks_its_options():
  factors = kfac.KFACFactors(
    a_factors=(jnp.ones((5, 5)), jnp.eye(3)),
    g_factors=(jnp.zeros((3, 3)), jnp.eye(2)),
    diagonal=(jnp.zeros(5),),
    count=jnp.ones((), jnp.int32),
  )
  v = jax.tree.map(jnp.asarray, hand_vector(np.random.default_rng(1)))
  for damping in (0.0, 1e-2):
    z = kfac.kfac_preconditioner(factors, damping, hand_layout(), tikhonov="exact")(v)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(z))
  # G = 0: the block is lambda I, so the kernel is divided by lambda.
  z = kfac.kfac_preconditioner(factors, 1e-2, hand_layout(), tikhonov="exact")(v)
  np.testing.assert_allclose(z["a"]["kernel"], v["a"]["kernel"] / 1e-2, rtol=1e-4)
  with pytest.raises(ValueError, match="tikhonov"):
    kfac.kfac_inverse(factors, 1.0, tikhonov="eigen")
  with pytest.raises(ValueError, match="needs the damping"):
    kfac.kfac_state_preconditioner(
      kfac.kfac_state_init(hand_vector(np.random.default_rng(0))), hand_layout(), tikhonov="exact"
    )


def test_inverse_stays_finite_without_curvature():
  # A dead layer (G = 0) and a singular A without damping: pi falls back to 1 and the
  # Cholesky failure to the inverse diagonal, never NaN.
  factors = kfac.KFACFactors(
    a_factors=(jnp.ones((5, 5)), jnp.eye(3)),
    g_factors=(jnp.zeros((3, 3)), jnp.eye(2)),
    diagonal=(jnp.zeros(5),),
    count=jnp.ones((), jnp.int32),
  )
  inverse = inverse_of(factors, 1e-2)
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(inverse))
  np.testing.assert_allclose(inverse.g_inverses[0], np.eye(3) / 0.1, rtol=1e-5)
  singular = inverse_of(factors, 0.0)
  np.testing.assert_allclose(singular.a_inverses[0], np.eye(5), rtol=1e-6)
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(singular))


def test_apply_rejects_a_layout_that_does_not_cover_the_vector():
  factors = kfac.kfac_init(hand_vector(np.random.default_rng(0)), hand_layout())
  inverse = inverse_of(factors, 1.0)
  v = hand_vector(np.random.default_rng(0))
  v["extra"] = np.ones(2)
  with pytest.raises(ValueError, match="exactly one layer"):
    kfac.kfac_apply(inverse, v, hand_layout())


# --- The preconditioner in CG -----------------------------------------------------------------


@pytest.mark.parametrize("tikhonov, damping", [("factored", 0.0), ("exact", 0.0), ("exact", 0.3)])
@pytest.mark.parametrize("transposed", [False, True])
def test_cg_with_exact_kronecker_factors_converges_in_one_step(x64, transposed, tikhonov, damping):
  apply_fn, params, batch = linear_problem(transposed)
  layout = layers.find_dense_layers(apply_fn, params, batch[0])
  factors = factors_of(apply_fn, mean_l2_loss, params, batch, jax.random.key(0))
  # The expectation of G for squared error is c I exactly; with it, A (x) G is the
  # Gauss-Newton matrix itself and the undamped K-FAC inverse is its inverse; the exactly
  # damped one is the inverse of the damped matrix too (factored damping's cross terms make
  # it only an approximation of that).
  factors = factors._replace(g_factors=(jnp.eye(3) / 3,))
  matvec, _ = hfjax.gauss_newton_matvec(apply_fn, mean_l2_loss, params, batch)
  damped = lambda v: jax.tree.map(lambda gv, x: gv + damping * x, matvec(v), v)
  b = jax.tree.map(lambda p: jnp.asarray(np.random.default_rng(5).standard_normal(p.shape)), params)
  solve = lambda pre: hfjax.cg(
    damped, b, preconditioner=pre, residual_tol=1e-10, tol=0.0, max_steps=50
  )
  result = solve(kfac.kfac_preconditioner(factors, damping, layout, tikhonov=tikhonov))
  assert int(result.num_steps) == 1
  dense = materialise(jax.jit(matvec), params, transposed)
  want = np.linalg.solve(dense + damping * np.eye(len(dense)), stacked(b, transposed))
  np.testing.assert_allclose(stacked(result.x, transposed), want, rtol=1e-8)
  assert int(solve(None).num_steps) >= 5
  if damping:
    factored = kfac.kfac_preconditioner(factors, damping, layout, tikhonov="factored")
    assert int(solve(factored).num_steps) >= 2


# --- Moving average, jit, dtypes, fallbacks ---------------------------------------------------


@pytest.mark.parametrize("decay", [0.0, 0.9])
def test_moving_average_matches_a_loop(decay):
  rng = np.random.default_rng(6)
  layout = hand_layout()
  like = hand_vector(rng)
  estimates = [
    kfac.KFACFactors(
      a_factors=(jnp.asarray(random_spd(5, rng)), jnp.asarray(random_spd(3, rng))),
      g_factors=(jnp.asarray(random_spd(3, rng)), jnp.asarray(random_spd(2, rng))),
      diagonal=(jnp.asarray(rng.random(5)),),
      count=jnp.ones((), jnp.int32),
    )
    for _ in range(4)
  ]
  update = jax.jit(kfac.kfac_update_factors)
  state = kfac.kfac_init(jax.tree.map(jnp.asarray, like), layout)
  want = None
  for new in estimates:
    state = update(state, new, decay)
    new_np = jax.tree.map(np.asarray, new._replace(count=None))
    if want is None:
      want = new_np
    else:
      want = jax.tree.map(lambda o, n: decay * o + (1 - decay) * n, want, new_np)
  for got, w in zip(
    jax.tree.leaves(state._replace(count=None)), jax.tree.leaves(want), strict=True
  ):
    np.testing.assert_allclose(got, w, rtol=1e-6, atol=1e-6)
  assert int(state.count) == 4
  with pytest.raises(ValueError, match="decay"):
    kfac.kfac_update_factors(state, estimates[0], 1.5)


class NormedMLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.tanh(nn.LayerNorm()(nn.Dense(6)(x)))
    return nn.Dense(4)(x)


def test_jitted_build_and_apply_matches_eager_and_warns_about_fallbacks():
  model = NormedMLP()
  x = jax.random.normal(jax.random.key(0), (32, 3))
  params = model.init(jax.random.key(1), x)["params"]
  apply_fn = models.make_apply_fn(model)
  batch = (x, jnp.arange(32) % 4)

  def build_and_apply(params, batch, key, v):
    factors = kfac.kfac_factors(apply_fn, models.softmax_cross_entropy, params, batch, key)
    layout = layers.find_dense_layers(apply_fn, params, batch[0])
    return kfac.kfac_apply(kfac.kfac_inverse(factors, 1e-2), v, layout)

  v = jax.tree.map(lambda p: jnp.ones_like(p), params)
  with pytest.warns(UserWarning, match=r"\['LayerNorm_0'\]\['scale'\]"):
    jitted = jax.jit(build_and_apply)(params, batch, jax.random.key(2), v)
  # Step by step: only the factors jitted, the inverse and its application eager.
  with pytest.warns(UserWarning, match="diagonal"):
    factors = factors_of(apply_fn, models.softmax_cross_entropy, params, batch, jax.random.key(2))
  layout = layers.find_dense_layers(apply_fn, params, x)
  steps = kfac.kfac_apply(inverse_of(factors, 1e-2), v, layout)
  close = lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-5)
  jax.tree.map(close, jitted, steps)
  assert jax.tree.structure(jitted) == jax.tree.structure(params)


def test_unmatched_diagonal_matches_the_gauss_newton_diagonal(x64):
  # An elementwise input scale s falls back to the diagonal; with squared error its
  # Monte-Carlo estimate, a mean of |j_n|^2 chi^2_1 over two distinct examples, has a
  # relative standard deviation of at most 2 / sqrt(n) per entry.
  n = 20000
  rng = np.random.default_rng(7)
  params = {"s": jnp.asarray(rng.standard_normal(3)), "w": jnp.asarray(rng.standard_normal((3, 2)))}
  apply_fn = lambda p, x: (x * p["s"]) @ p["w"]
  distinct = rng.standard_normal((2, 3))
  x = jnp.asarray(np.tile(distinct, (n // 2, 1)))
  batch = (x, jnp.zeros((n, 2)))
  with pytest.warns(UserWarning, match=r"\['s'\]"):
    factors = factors_of(apply_fn, models.squared_error, params, batch, jax.random.key(0))
  matvec, _ = hfjax.gauss_newton_matvec(apply_fn, models.squared_error, params, batch)
  want = np.array([matvec({"s": jnp.eye(3)[i], "w": jnp.zeros((3, 2))})["s"][i] for i in range(3)])
  np.testing.assert_allclose(factors.diagonal[0], want, rtol=5 * 2 / np.sqrt(n))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_factors_accumulate_in_float32_and_apply_keeps_dtypes(dtype):
  params = mlp_params(jax.random.key(0), dtype=dtype)
  x = jax.random.normal(jax.random.key(1), (16, 3), dtype)
  batch = (x, jnp.zeros((16, 4), dtype))
  factors = factors_of(mlp_apply, models.squared_error, params, batch, jax.random.key(2))
  assert all(f.dtype == jnp.float32 for f in jax.tree.leaves(factors._replace(count=None)))
  layout = layers.find_dense_layers(mlp_apply, params, x)
  z = kfac.kfac_apply(inverse_of(factors, 1e-2), params, layout)
  assert jax.tree.map(lambda a: a.dtype, z) == jax.tree.map(lambda a: a.dtype, params)
  assert all(bool(jnp.all(jnp.isfinite(a.astype(jnp.float32)))) for a in jax.tree.leaves(z))


def test_float64_factors_under_x64(x64):
  params = mlp_params(jax.random.key(0), dtype=jnp.float64)
  x = jax.random.normal(jax.random.key(1), (16, 3), jnp.float64)
  factors = factors_of(
    mlp_apply, models.squared_error, params, (x, jnp.zeros((16, 4))), jax.random.key(2)
  )
  assert all(f.dtype == jnp.float64 for f in jax.tree.leaves(factors._replace(count=None)))


def test_models_without_dense_layers_get_the_diagonal_and_tree_outputs_raise():
  params = {"s": jnp.ones(3)}
  # J_n = diag(x_n) and H_n = I, so the Gauss-Newton diagonal is mean_n x_n^2 = 1; the
  # Monte-Carlo estimate from 4096 Gaussian cotangents has standard error sqrt(2 / 4096).
  batch = (jnp.ones((4096, 3)), jnp.zeros((4096, 3)))
  with pytest.warns(UserWarning, match="no dense layer"):
    factors = kfac.kfac_factors(
      lambda p, x: x * p["s"], models.squared_error, params, batch, jax.random.key(0)
    )
  assert factors.a_factors == () and factors.g_factors == ()
  np.testing.assert_allclose(factors.diagonal[0], np.ones(3), atol=5 * np.sqrt(2 / 4096))
  batch = (jnp.ones((4, 3)), jnp.zeros((4, 3)))
  params = {"w": jnp.ones((3, 3))}
  tree_apply = lambda p, x: {"y": x @ p["w"]}
  with pytest.raises(TypeError, match="single array"):
    kfac.kfac_factors(
      tree_apply, lambda o, t: models.squared_error(o["y"], t), params, batch, jax.random.key(0)
    )


# --- Running state laid out by leaf -------------------------------------------------------


def _mixed_model():
  """A dense layer, a transposed dense layer without bias, and an unmatched scale."""

  def apply_fn(p, x):
    h = jnp.tanh(x @ p["w1"] + p["b1"]) * p["scale"]
    return h @ p["w2"].T

  params = {
    "w1": jax.random.normal(jax.random.key(0), (5, 4)),
    "b1": jnp.zeros(4),
    "scale": jnp.ones(4),
    "w2": jax.random.normal(jax.random.key(1), (3, 4)),
  }
  return apply_fn, params


@pytest.mark.parametrize("tikhonov", kfac.TIKHONOV_KINDS)
def test_state_preconditioner_matches_averaged_factors(tikhonov):
  apply_fn, params = _mixed_model()
  loss_fn = lambda out, y: 0.5 * jnp.mean(jnp.sum((out - y) ** 2, axis=-1))
  x = jax.random.normal(jax.random.key(2), (64, 5))
  y = jax.random.normal(jax.random.key(3), (64, 3))
  layout = layers.find_dense_layers(apply_fn, params, x)
  with pytest.warns(UserWarning, match="scale"):
    first = kfac.kfac_factors(apply_fn, loss_fn, params, (x, y), jax.random.key(4), layout=layout)
    second = kfac.kfac_factors(apply_fn, loss_fn, params, (x, y), jax.random.key(5), layout=layout)
  state = kfac.kfac_state_init(params)
  for new in (first, second):
    state = kfac.kfac_state_update(state, new, 0.3, layout, decay=0.8, tikhonov=tikhonov)
  assert int(state.num_estimates) == 2
  # Reference: the layout-form moving average, then its preconditioner.
  averaged = kfac.kfac_update_factors(
    kfac.kfac_update_factors(kfac.kfac_init(params, layout), first, 0.8), second, 0.8
  )
  v = jax.tree.map(lambda p: jax.random.normal(jax.random.key(6), p.shape), params)
  # Refreshed at 0.3; the exact form re-damps its eigenbases at any later damping.
  for damping in (0.3,) if tikhonov == "factored" else (0.3, 0.05):
    expected = kfac.kfac_preconditioner(averaged, damping, layout, tikhonov=tikhonov)
    got = kfac.kfac_state_preconditioner(state, layout, damping, tikhonov=tikhonov)
    tol = {"factored": (1e-5, 1e-6), "exact": (1e-4, 1e-5)}[tikhonov]
    chex.assert_trees_all_close(got(v), expected(v), rtol=tol[0], atol=tol[1])
  # Averaged without inverting, then inverted later at another damping: the inverses wait
  # for kfac_state_invert, which gives the preconditioner of the averaged factors.
  lazy = kfac.kfac_state_init(params)
  for new in (first, second):
    lazy = kfac.kfac_state_update(
      lazy, new, 0.3, layout, decay=0.8, tikhonov=tikhonov, invert=False
    )
  chex.assert_trees_all_equal(lazy.factors, state.factors)
  chex.assert_trees_all_equal(lazy.inverse_factors, kfac.kfac_state_init(params).inverse_factors)
  lazy = kfac.kfac_state_invert(lazy, 0.05, layout, tikhonov=tikhonov)
  expected = kfac.kfac_preconditioner(averaged, 0.05, layout, tikhonov=tikhonov)
  got = kfac.kfac_state_preconditioner(lazy, layout, 0.05, tikhonov=tikhonov)
  chex.assert_trees_all_close(got(v), expected(v), rtol=tol[0], atol=tol[1])


def test_several_samples_average_single_sample_estimates():
  # Plain-loop reference: G and the diagonal with S samples are the mean of the S
  # one-sample estimates drawn with the split keys; A does not depend on the samples.
  apply_fn, params = _mixed_model()
  loss_fn = lambda out, y: 0.5 * jnp.mean(jnp.sum((out - y) ** 2, axis=-1))
  x = jax.random.normal(jax.random.key(2), (16, 5))
  batch = (x, jnp.zeros((16, 3)))
  layout = layers.find_dense_layers(apply_fn, params, x)
  key = jax.random.key(9)
  with pytest.warns(UserWarning, match="scale"):
    several = kfac.kfac_factors(apply_fn, loss_fn, params, batch, key, layout=layout, num_samples=3)
    singles = [
      kfac.kfac_factors(apply_fn, loss_fn, params, batch, k, layout=layout)
      for k in jax.random.split(key, 3)
    ]
  mean = lambda *xs: sum(xs) / len(xs)
  close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  jax.tree.map(close, several.g_factors, jax.tree.map(mean, *[f.g_factors for f in singles]))
  jax.tree.map(close, several.diagonal, jax.tree.map(mean, *[f.diagonal for f in singles]))
  jax.tree.map(close, several.a_factors, singles[0].a_factors)
  with pytest.raises(ValueError, match="num_samples"):
    kfac.kfac_factors(apply_fn, loss_fn, params, batch, key, layout=layout, num_samples=0)


def test_state_update_ignores_non_finite_estimates():
  apply_fn, params = _mixed_model()
  x = jnp.ones((8, 5))
  layout = layers.find_dense_layers(apply_fn, params, x)
  state = kfac.kfac_state_init(params)
  bad = kfac.kfac_init(params, layout)
  bad = bad._replace(
    a_factors=tuple(a + jnp.nan for a in bad.a_factors), count=jnp.ones((), jnp.int32)
  )
  after = kfac.kfac_state_update(state, bad, 1.0, layout)
  chex.assert_trees_all_equal(after, state)
