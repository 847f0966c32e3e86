"""L-BFGS and diagonal preconditioners against dense NumPy references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree
from references import dense_bfgs_inverse

import hfjax
from hfjax.preconditioners import (
  flatten_memory,
  lbfgs_operator,
  lbfgs_project,
  lbfgs_refresh_products,
  lbfgs_store_pair,
  lbfgs_update_and_apply,
  unflatten_memory,
)

update = jax.jit(hfjax.lbfgs_update)


@jax.jit
def materialise(state, eye):
  """The matrix H of ``lbfgs_apply`` (row i is H e_i; H is symmetric)."""
  return jax.vmap(lambda e: hfjax.lbfgs_apply(state, e))(eye)


def random_spd(n, rng):
  q = rng.standard_normal((n, n))
  return q @ q.T / n + 0.5 * np.eye(n)


def random_pairs(count, n, rng):
  """Pairs with s^T y > 0: y = B s for a different SPD B each time."""
  pairs = []
  for _ in range(count):
    s = rng.standard_normal(n)
    pairs.append((s, random_spd(n, rng) @ s))
  return pairs


def bad_pairs(n, rng):
  """Pairs that must be skipped: s^T y < 0, s^T y = 0, and non-finite values."""
  s = rng.standard_normal(n)
  nan_s, inf_y = s.copy(), s.copy()
  nan_s[0] = np.nan
  inf_y[-1] = np.inf
  e0, e1 = np.eye(n)[0], np.eye(n)[1]
  return [(s, -s), (s, np.zeros(n)), (e0, e1), (nan_s, s), (s, inf_y), (np.zeros(n), s)]


def fill(state, pairs):
  for s, y in pairs:
    state = update(state, jnp.asarray(s), jnp.asarray(y))
  return state


def assert_states_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    assert x.dtype == y.dtype
    np.testing.assert_array_equal(x, y)


# --- L-BFGS ---------------------------------------------------------------------------------


@pytest.mark.parametrize("num_pairs", [0, 1, 3, 4, 6, 11])
def test_apply_matches_dense_bfgs_recursion(x64, num_pairs):
  # Memory 4: 6 and 11 pairs wrap the ring buffer (only the newest 4 count, oldest first).
  n, memory = 6, 4
  rng = np.random.default_rng(num_pairs)
  pairs = random_pairs(num_pairs, n, rng)
  state = fill(hfjax.lbfgs_init(jnp.zeros(n), memory), pairs)
  assert int(state.num_pairs) == min(num_pairs, memory)
  assert int(state.next_index) == num_pairs % memory
  want = dense_bfgs_inverse(pairs, n, memory)
  np.testing.assert_allclose(materialise(state, jnp.eye(n)), want, rtol=1e-10, atol=1e-12)
  if num_pairs == 0:
    np.testing.assert_array_equal(want, np.eye(n))


def test_bad_pairs_among_good_ones_are_ignored(x64):
  n, memory = 6, 4
  rng = np.random.default_rng(20)
  good = random_pairs(5, n, rng)
  bad = bad_pairs(n, rng)
  mixed = [good[0], bad[0], bad[1], good[1], good[2], bad[2], bad[3], good[3], bad[4], good[4]]
  mixed += [bad[5]]
  state = fill(hfjax.lbfgs_init(jnp.zeros(n), memory), mixed)
  assert int(state.num_pairs) == memory
  want = dense_bfgs_inverse(good, n, memory)
  np.testing.assert_allclose(materialise(state, jnp.eye(n)), want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("num_good", [0, 2])
def test_skipped_pairs_leave_the_state_unchanged(x64, num_good):
  n = 6
  rng = np.random.default_rng(21)
  state = fill(hfjax.lbfgs_init(jnp.zeros(n), 4), random_pairs(num_good, n, rng))
  for s, y in bad_pairs(n, rng):
    assert_states_equal(update(state, jnp.asarray(s), jnp.asarray(y)), state)


@pytest.mark.parametrize("num_pairs", [0, 2, 7])
def test_initial_diagonal_replaces_gamma_identity(x64, num_pairs):
  n, memory = 6, 4
  rng = np.random.default_rng(30 + num_pairs)
  diagonal = rng.uniform(0.2, 3.0, n)
  pairs = random_pairs(num_pairs, n, rng)
  state = hfjax.lbfgs_init(jnp.zeros(n), memory, initial_diagonal=jnp.asarray(diagonal))
  state = fill(state, pairs)
  want = dense_bfgs_inverse(pairs, n, memory, initial_diagonal=diagonal)
  np.testing.assert_allclose(materialise(state, jnp.eye(n)), want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("num_pairs", [0, 2, 7])
def test_callable_initial_matrix_replaces_gamma_identity(x64, num_pairs):
  # 7 pairs, two of them bad, in a memory of 4: the ring buffer wraps.
  n, memory = 6, 4
  rng = np.random.default_rng(130 + num_pairs)
  h0 = random_spd(n, rng)
  pairs = random_pairs(num_pairs, n, rng)
  if num_pairs:
    pairs[1:1] = bad_pairs(n, rng)[:2]
  state = fill(hfjax.lbfgs_init(jnp.zeros(n), memory), pairs)
  got = jax.jit(
    lambda state, h0: jax.vmap(lambda e: hfjax.lbfgs_apply(state, e, initial=lambda v: h0 @ v))(
      jnp.eye(n)
    )
  )(state, jnp.asarray(h0))
  want = dense_bfgs_inverse(pairs, n, memory, initial_matrix=h0)
  np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
  if num_pairs == 0:
    np.testing.assert_allclose(want, h0, rtol=1e-15)


def test_callable_initial_matrix_on_pytrees_and_prepared_once(x64):
  rng = np.random.default_rng(140)
  state, unravel, pairs, n, _ = _pytree_setup(5, 3, rng)
  h0 = random_spd(n, rng)
  initial = lambda v: unravel(jnp.asarray(h0) @ ravel_pytree(v)[0])
  v = unravel(jnp.asarray(rng.standard_normal(n)))
  want = dense_bfgs_inverse(pairs, n, 3, initial_matrix=h0) @ ravel_pytree(v)[0]
  got = hfjax.lbfgs_apply(state, v, initial=initial)
  assert jax.tree.map(jnp.shape, got) == jax.tree.map(jnp.shape, v)
  np.testing.assert_allclose(ravel_pytree(got)[0], want, rtol=1e-10, atol=1e-12)
  # The operator a fixed preconditioner uses: H0 Y prepared once, on the flat memory.
  operator = lbfgs_operator(state, v, initial)
  np.testing.assert_allclose(ravel_pytree(operator(v))[0], want, rtol=1e-10, atol=1e-12)


def test_callable_initial_matrix_argument_errors():
  state = hfjax.lbfgs_init(jnp.zeros(3), 2)
  with pytest.raises(TypeError, match="initial"):
    hfjax.lbfgs_apply(state, jnp.ones(3), initial=2.0)
  with_diagonal = hfjax.lbfgs_init(jnp.zeros(3), 2, initial_diagonal=jnp.ones(3))
  with pytest.raises(ValueError, match="initial_diagonal"):
    hfjax.lbfgs_apply(with_diagonal, jnp.ones(3), initial=lambda v: v)


def test_lbfgs_internals_stay_out_of_the_public_namespace():
  internals = {
    "LBFGSProjections",
    "lbfgs_project",
    "lbfgs_refresh_products",
    "lbfgs_store_pair",
    "lbfgs_update_and_apply",
  }
  assert not internals & set(hfjax.__all__)
  assert not [name for name in internals if hasattr(hfjax, name)]
  assert {"LBFGSState", "lbfgs_init", "lbfgs_update", "lbfgs_apply"} <= set(hfjax.__all__)


def test_pytree_vectors_match_flat_reference(x64):
  params = {"a": jnp.zeros(3), "b": (jnp.zeros((2, 2)), jnp.zeros(()))}
  flat, unravel = ravel_pytree(params)
  n, memory = flat.size, 3
  rng = np.random.default_rng(40)
  pairs = random_pairs(5, n, rng)
  state = hfjax.lbfgs_init(params, memory)
  assert jax.tree.map(jnp.shape, state.s_memory) == jax.tree.map(
    lambda x: (memory,) + x.shape, params
  )
  for s, y in pairs:
    state = update(state, unravel(jnp.asarray(s)), unravel(jnp.asarray(y)))
  want = dense_bfgs_inverse(pairs, n, memory)
  v = rng.standard_normal(n)
  got = hfjax.lbfgs_apply(state, unravel(jnp.asarray(v)))
  assert jax.tree.structure(got) == jax.tree.structure(params)
  assert jax.tree.map(jnp.shape, got) == jax.tree.map(jnp.shape, params)
  np.testing.assert_allclose(ravel_pytree(got)[0], want @ v, rtol=1e-10, atol=1e-12)


def test_inverse_is_symmetric_positive_definite_and_satisfies_the_secant_condition(x64):
  n, memory = 6, 4
  rng = np.random.default_rng(50)
  pairs = random_pairs(7, n, rng)
  state = fill(hfjax.lbfgs_init(jnp.zeros(n), memory), pairs)
  h = np.asarray(materialise(state, jnp.eye(n)))
  np.testing.assert_allclose(h, h.T, rtol=1e-10, atol=1e-12)
  assert np.linalg.eigvalsh(h).min() > 0
  s, y = pairs[-1]
  np.testing.assert_allclose(hfjax.lbfgs_apply(state, jnp.asarray(y)), s, rtol=1e-10)


def test_conjugate_pairs_of_a_quadratic_give_its_exact_inverse(x64):
  # BFGS with exact line searches on a quadratic terminates: n pairs s_i = alpha_i p_i,
  # y_i = A s_i from CG reproduce A^{-1}.
  n = 5
  rng = np.random.default_rng(60)
  a = random_spd(n, rng)
  b = rng.standard_normal(n)
  x, r = np.zeros(n), b.copy()
  p, pairs = r.copy(), []
  for _ in range(n):
    ap = a @ p
    alpha = (r @ r) / (p @ ap)
    pairs.append((alpha * p, alpha * ap))
    x, r_new = x + alpha * p, r - alpha * ap
    p, r = r_new + (r_new @ r_new) / (r @ r) * p, r_new
  state = fill(hfjax.lbfgs_init(jnp.zeros(n), n), pairs)
  np.testing.assert_allclose(materialise(state, jnp.eye(n)), np.linalg.inv(a), rtol=1e-8)


def _pytree_setup(n_pairs, memory, rng, diagonal=False):
  """A pytree layout, its unravel, pairs and an L-BFGS state holding them."""
  params = {"w": jnp.zeros((2, 3)), "b": jnp.zeros(2)}
  flat, unravel = ravel_pytree(params)
  n = flat.size
  d = rng.uniform(0.2, 3.0, n) if diagonal else None
  state = hfjax.lbfgs_init(
    params, memory, initial_diagonal=None if d is None else unravel(jnp.asarray(d))
  )
  pairs = random_pairs(n_pairs, n, rng)
  for s, y in pairs:
    state = update(state, unravel(jnp.asarray(s)), unravel(jnp.asarray(y)))
  return state, unravel, pairs, n, d


@pytest.mark.parametrize("with_previous", [False, True])
@pytest.mark.parametrize("num_pairs, diagonal", [(0, False), (2, False), (5, False), (5, True)])
def test_update_and_apply_matches_dense_recursion(x64, num_pairs, diagonal, with_previous):
  memory = 3
  rng = np.random.default_rng(80 + num_pairs)
  state, unravel, pairs, n, d = _pytree_setup(num_pairs, memory, rng, diagonal)
  (s, y), v = random_pairs(1, n, rng)[0], rng.standard_normal(n)
  previous = None
  if with_previous:  # projections of u with y = u - v, as a CG residual gives them
    previous = lbfgs_project(state, unravel(jnp.asarray(v + y)))
  new, z, projections = jax.jit(lbfgs_update_and_apply)(
    state, unravel(jnp.asarray(s)), unravel(jnp.asarray(y)), unravel(jnp.asarray(v)), previous
  )
  want = dense_bfgs_inverse(pairs + [(s, y)], n, memory, initial_diagonal=d)
  np.testing.assert_allclose(ravel_pytree(z)[0], want @ v, rtol=1e-10, atol=1e-12)
  # The state it returns is the one lbfgs_update gives, and the projections are v's over it.
  unravel_state = update(state, unravel(jnp.asarray(s)), unravel(jnp.asarray(y)))
  for x, w in zip(jax.tree.leaves(new), jax.tree.leaves(unravel_state), strict=True):
    np.testing.assert_allclose(x, w, rtol=1e-10, atol=1e-12)
  again = lbfgs_project(new, unravel(jnp.asarray(v)))
  np.testing.assert_allclose(projections.s_v, again.s_v, rtol=1e-10, atol=1e-12)
  np.testing.assert_allclose(projections.y_dv, again.y_dv, rtol=1e-10, atol=1e-12)


def test_update_and_apply_skips_a_bad_pair(x64):
  rng = np.random.default_rng(90)
  state, unravel, pairs, n, _ = _pytree_setup(2, 3, rng)
  v = unravel(jnp.asarray(rng.standard_normal(n)))
  for s, y in bad_pairs(n, rng):
    new, z, _ = lbfgs_update_and_apply(state, unravel(jnp.asarray(s)), unravel(jnp.asarray(y)), v)
    assert_states_equal(new, state)
    np.testing.assert_allclose(
      ravel_pytree(z)[0], ravel_pytree(hfjax.lbfgs_apply(state, v))[0], rtol=1e-12
    )


@pytest.mark.parametrize("diagonal", [False, True])
def test_stored_pairs_with_refreshed_products_match_updates(x64, diagonal):
  n, memory = 6, 4
  rng = np.random.default_rng(100)
  d = rng.uniform(0.2, 3.0, n) if diagonal else None
  pairs = random_pairs(7, n, rng) + bad_pairs(n, rng)[:2]
  empty = hfjax.lbfgs_init(jnp.zeros(n), memory, initial_diagonal=None if d is None else d)
  stored = empty
  for s, y in pairs:
    stored = jax.jit(lbfgs_store_pair)(stored, jnp.asarray(s), jnp.asarray(y))
  stored = lbfgs_refresh_products(stored)
  want = dense_bfgs_inverse(pairs, n, memory, initial_diagonal=d)
  np.testing.assert_allclose(materialise(stored, jnp.eye(n)), want, rtol=1e-10, atol=1e-12)
  updated = fill(empty, pairs)
  # Same pairs, same slots; the products agree wherever lbfgs_update keeps them.
  np.testing.assert_array_equal(stored.s_memory, updated.s_memory)
  np.testing.assert_allclose(stored.yy_products, updated.yy_products, rtol=1e-12)
  np.testing.assert_allclose(
    np.diagonal(stored.sy_products), np.diagonal(updated.sy_products), rtol=1e-12
  )


def test_flat_memory_layout_is_the_same_approximation(x64):
  rng = np.random.default_rng(110)
  state, unravel, pairs, n, _ = _pytree_setup(4, 3, rng)
  flat = flatten_memory(state)
  assert jax.tree.map(jnp.shape, flat.s_memory) == {"w": (3, 6), "b": (3, 2)}
  v = unravel(jnp.asarray(rng.standard_normal(n)))
  np.testing.assert_allclose(
    ravel_pytree(hfjax.lbfgs_apply(flat, v))[0],
    ravel_pytree(hfjax.lbfgs_apply(state, v))[0],
    rtol=1e-12,
  )
  s, y = random_pairs(1, n, rng)[0]
  s, y = unravel(jnp.asarray(s)), unravel(jnp.asarray(y))
  assert_states_equal(unflatten_memory(flat, v), state)
  back = unflatten_memory(hfjax.lbfgs_update(flat, s, y), v)
  want = hfjax.lbfgs_update(state, s, y)
  for x, w in zip(jax.tree.leaves(back), jax.tree.leaves(want), strict=True):
    np.testing.assert_allclose(x, w, rtol=1e-12)


@pytest.mark.parametrize(
  ("dtype", "memory_dtype"),
  [
    ("float16", "float32"),
    ("bfloat16", "float32"),
    ("float32", "float32"),
    ("float64", "float64"),
  ],
)
def test_state_dtypes_are_stable_under_jit(dtype, memory_dtype):
  rng = np.random.default_rng(70)
  with jax.enable_x64(dtype == "float64"):
    params = {"w": jnp.zeros((3, 2), dtype), "b": jnp.zeros(2, dtype)}
    state = hfjax.lbfgs_init(params, 3)
    for leaf in jax.tree.leaves((state.s_memory, state.y_memory, state.sy_products)):
      assert leaf.dtype == jnp.dtype(memory_dtype)
    assert state.next_index.dtype == jnp.int32 and state.num_pairs.dtype == jnp.int32
    dtypes = lambda tree: jax.tree.map(lambda x: (x.dtype, x.shape), tree)
    pairs = random_pairs(4, 8, rng)
    for s, y in pairs:
      unravel = ravel_pytree(params)[1]
      new = update(state, unravel(jnp.asarray(s, dtype)), unravel(jnp.asarray(y, dtype)))
      assert dtypes(new) == dtypes(state)
      state = new
    assert int(state.num_pairs) == 3
    v = unravel(jnp.asarray(rng.standard_normal(8), dtype))
    got = jax.jit(hfjax.lbfgs_apply)(state, v)
    assert dtypes(got) == dtypes(v)
    # Half-precision vectors are only rounded on the way in and out.
    rounded = [
      (np.asarray(jnp.asarray(s, dtype), float), np.asarray(jnp.asarray(y, dtype), float))
      for s, y in pairs
    ]
    want = dense_bfgs_inverse(rounded, 8, 3) @ np.asarray(ravel_pytree(v)[0], float)
    tol = {"float16": 1e-2, "bfloat16": 2e-2, "float32": 1e-5, "float64": 1e-12}[dtype]
    np.testing.assert_allclose(
      np.asarray(ravel_pytree(got)[0], float), want, rtol=tol, atol=tol * np.abs(want).max()
    )


@pytest.mark.parametrize("memory_size", [0, -1, 2.5])
def test_memory_size_must_be_a_positive_integer(memory_size):
  with pytest.raises(ValueError, match="memory_size"):
    hfjax.lbfgs_init(jnp.zeros(3), memory_size)


# --- Diagonal preconditioner ----------------------------------------------------------------


@pytest.mark.parametrize("exponent", [0.75, 0.5])
def test_diagonal_preconditioner_closed_form(x64, exponent):
  rng = np.random.default_rng(80)
  diagonal = {"w": rng.standard_normal((3, 2)), "b": (rng.standard_normal(4),)}
  r = jax.tree.map(lambda d: rng.standard_normal(d.shape), diagonal)
  damping = 0.3
  kwargs = {} if exponent == 0.75 else {"exponent": exponent}
  apply = hfjax.diagonal_preconditioner(jax.tree.map(jnp.asarray, diagonal), damping, **kwargs)
  got = jax.jit(apply)(jax.tree.map(jnp.asarray, r))
  want = jax.tree.map(lambda d, r: r / (np.maximum(d, 0.0) + damping) ** exponent, diagonal, r)
  assert jax.tree.structure(got) == jax.tree.structure(r)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_allclose(g, w, rtol=1e-12)
  # Negative estimates are clipped: such an entry is scaled by damping ** -exponent.
  assert (diagonal["w"] < 0).any()


def test_diagonal_preconditioner_keeps_the_dtype_of_r():
  diagonal = jnp.asarray([0.5, -1.0, 2.0], jnp.float32)
  r = jnp.asarray([1.0, 2.0, -3.0], jnp.bfloat16)
  got = hfjax.diagonal_preconditioner(diagonal, 0.1)(r)
  assert got.dtype == jnp.bfloat16
  want = np.array([1.0, 2.0, -3.0]) / (np.array([0.5, 0.0, 2.0]) + 0.1) ** 0.75
  np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=1e-2)
