"""hfjax.cg against SciPy, dense solves and plain-loop (P)CG references.

Compiling one CG loop costs seconds on CPU, so most tests share a few jitted solvers: small
systems are embedded block-diagonally in an ``N x N`` system (identity block, zero right-hand
side there), on which CG never leaves the first block and takes the same steps.
"""

import functools
import math
from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
import scipy.sparse.linalg
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.flatten_util import ravel_pytree
from references import dense_bfgs_inverse

import hfjax
from hfjax import CGStopReason

N = 12
CONVERGE = {"max_steps": 100, "residual_tol": 1e-10}


def random_spd(n, cond, rng):
  q, _ = np.linalg.qr(rng.standard_normal((n, n)))
  a = (q * np.linspace(1.0, cond, n)) @ q.T
  return (a + a.T) / 2


def embed(a, b, size=N):
  """Pads ``a`` with an identity block and ``b`` with zeros to ``size``."""
  n = len(b)
  big = np.eye(size)
  big[:n, :n] = a
  return big, np.concatenate([b, np.zeros(size - n)])


def phi(a, b, x):
  return 0.5 * x @ a @ x - b @ x


def pcg_reference(a, b, steps, x0=None, m=None):
  """Iterates ``x_0 .. x_steps`` of textbook PCG (``z = M r``, Fletcher-Reeves beta)."""
  m = np.eye(len(b)) if m is None else m
  x = np.zeros_like(b) if x0 is None else np.array(x0, dtype=float)
  r = b - a @ x
  z = m @ r
  p = z.copy()
  rz = r @ z
  iterates = [x.copy()]
  for _ in range(steps):
    ap = a @ p
    alpha = rz / (p @ ap)
    x = x + alpha * p
    r = r - alpha * ap
    z = m @ r
    rz, rz_old = r @ z, rz
    p = z + (rz / rz_old) * p
    iterates.append(x.copy())
  return np.array(iterates)


@functools.partial(
  jax.jit,
  static_argnames=("max_steps", "tol", "residual_tol", "residual_floor", "beta", "num_recorded"),
)
def dense_cg(
  a,
  b,
  x0=None,
  m=None,
  *,
  max_steps,
  tol=0.0,
  residual_tol=0.0,
  residual_floor=None,
  beta="flexible",
  num_recorded=None,
):
  """``hfjax.cg`` on the matrix ``a``, preconditioned by the matrix ``m`` when given."""
  return hfjax.cg(
    lambda v: a @ v,
    b,
    x0=x0,
    preconditioner=None if m is None else (lambda r: m @ r),
    max_steps=max_steps,
    tol=tol,
    residual_tol=residual_tol,
    residual_floor=residual_floor,
    beta=beta,
    num_recorded=num_recorded,
  )


@functools.partial(jax.jit, static_argnames=("update", "residual_tol"))
def lbfgs_cg(a, b, state, x0=None, *, update, residual_tol):
  return hfjax.cg(
    lambda v: a @ v,
    b,
    x0=x0,
    preconditioner=state,
    update_preconditioner=update,
    max_steps=250,
    tol=0.0,
    residual_tol=residual_tol,
  )


def check_recorded(result, expected_steps, reference_iterates, a, b, n):
  """The recorded steps are ``expected_steps`` (in order, then empty slots), with the iterates
  of ``reference_iterates`` and their quadratic-model values."""
  steps = np.asarray(result.iterate_steps)
  k = len(expected_steps)
  np.testing.assert_array_equal(steps[:k], expected_steps)
  np.testing.assert_array_equal(steps[k:], -1)
  assert np.all(np.isinf(np.asarray(result.iterate_values)[k:]))
  iterates = np.asarray(result.iterates)[:k, :n]
  np.testing.assert_allclose(
    iterates, reference_iterates[expected_steps][:, :n], rtol=1e-9, atol=1e-11
  )
  values = [phi(a, b, x) for x in iterates]
  np.testing.assert_allclose(np.asarray(result.iterate_values)[:k], values, rtol=1e-9, atol=1e-12)


# --- SciPy and dense solves ---------------------------------------------------------------


@pytest.mark.parametrize("warm_start", [False, True])
def test_matches_scipy_step_for_step(x64, warm_start):
  rng = np.random.default_rng(10 + warm_start)
  a = random_spd(N, 50.0, rng)
  b = rng.standard_normal(N)
  x0 = rng.standard_normal(N) if warm_start else np.zeros(N)
  got = dense_cg(jnp.asarray(a), jnp.asarray(b), jnp.asarray(x0), max_steps=3)
  assert int(got.num_steps) == 3
  assert int(got.stop_reason) == CGStopReason.MAX_STEPS
  # Steps 1, 2 and 3 are all recorded (the final step is one of them, so the extra slot for
  # it stays empty): compare each with SciPy stopped after that many steps.
  np.testing.assert_array_equal(got.iterate_steps, [1, 2, 3, -1])
  for slot, steps in enumerate([1, 2, 3]):
    want, info = scipy.sparse.linalg.cg(a, b, x0=x0.copy(), rtol=0.0, atol=0.0, maxiter=steps)
    assert info == steps
    np.testing.assert_allclose(got.iterates[slot], want, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(got.iterate_values[slot], phi(a, b, want), rtol=1e-10)
  np.testing.assert_allclose(got.x, want, rtol=1e-10, atol=1e-12)
  np.testing.assert_allclose(got.value, phi(a, b, want), rtol=1e-10)
  np.testing.assert_allclose(got.residual_norm, np.linalg.norm(b - a @ want), rtol=1e-7)


def test_converges_to_dense_solution(x64):
  rng = np.random.default_rng(0)
  a = random_spd(N, 100.0, rng)
  b = rng.standard_normal(N)
  got = dense_cg(jnp.asarray(a), jnp.asarray(b), **CONVERGE)
  assert int(got.stop_reason) == CGStopReason.RESIDUAL
  assert 1 <= int(got.num_steps) < CONVERGE["max_steps"]
  np.testing.assert_allclose(got.x, np.linalg.solve(a, b), rtol=1e-8, atol=1e-10)
  assert float(got.residual_norm) <= 1e-10 * np.linalg.norm(b)
  np.testing.assert_allclose(got.value, -0.5 * b @ np.linalg.solve(a, b), rtol=1e-10)


@settings(max_examples=20, deadline=None)
@given(
  n=st.integers(2, N),
  log10_cond=st.floats(0.0, 2.5),
  seed=st.integers(0, 2**32 - 1),
)
def test_property_converges_on_random_spd_systems(n, log10_cond, seed):
  rng = np.random.default_rng(seed)
  small = random_spd(n, 10.0**log10_cond, rng)
  a, b = embed(small, rng.standard_normal(n))
  with jax.enable_x64(True):
    got = dense_cg(jnp.asarray(a), jnp.asarray(b), **CONVERGE)
  assert int(got.stop_reason) == CGStopReason.RESIDUAL
  want = np.linalg.solve(a, b)
  assert np.linalg.norm(np.asarray(got.x) - want) <= 1e-7 * np.linalg.norm(want)
  np.testing.assert_array_equal(np.asarray(got.x)[n:], 0.0)


def test_pytree_right_hand_side(x64):
  rng = np.random.default_rng(1)
  b = {"u": jnp.asarray(rng.standard_normal(3)), "w": (jnp.asarray(rng.standard_normal((2, 2))),)}
  flat_b, unravel = ravel_pytree(b)
  a = random_spd(flat_b.size, 20.0, rng)
  matvec = lambda v: unravel(jnp.asarray(a) @ ravel_pytree(v)[0])
  got = jax.jit(lambda b: hfjax.cg(matvec, b, residual_tol=1e-10, tol=0.0))(b)
  assert jax.tree.structure(got.x) == jax.tree.structure(b)
  assert jax.tree.map(jnp.shape, got.x) == jax.tree.map(jnp.shape, b)
  np.testing.assert_allclose(ravel_pytree(got.x)[0], np.linalg.solve(a, flat_b), rtol=1e-8)
  # Recorded iterates carry a leading slot axis on every leaf.
  slots = got.iterate_steps.shape[0]
  assert jax.tree.map(jnp.shape, got.iterates) == jax.tree.map(lambda v: (slots,) + v.shape, b)


def test_zero_right_hand_side_returns_zero(x64):
  a = random_spd(N, 10.0, np.random.default_rng(2))
  got = dense_cg(jnp.asarray(a), jnp.zeros(N), jnp.zeros(N), max_steps=3)
  assert int(got.stop_reason) == CGStopReason.RESIDUAL
  assert int(got.num_steps) == 0
  np.testing.assert_array_equal(got.x, 0.0)
  assert float(got.value) == 0.0


# --- Searching along the warm start (augment_x0) -----------------------------------------


@functools.partial(jax.jit, static_argnames=("max_steps",))
def augmented_cg(a, b, x0, m, *, max_steps):
  return hfjax.cg(
    lambda v: a @ v,
    b,
    x0=x0,
    preconditioner=lambda r: m @ r,
    max_steps=max_steps,
    tol=0.0,
    augment_x0=True,
  )


def subspace_minimiser(a, b, basis):
  """The minimiser of ``phi`` over the span of ``basis``'s columns, by a dense solve."""
  q, _ = np.linalg.qr(basis)
  return q @ np.linalg.solve(q.T @ a @ q, q.T @ b)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_augmented_iterates_minimise_phi_over_warm_start_plus_projected_krylov_space(x64, seed):
  # With P = I - u (u^T A u)^-1 (A u)^T, the A-orthogonal projector off u, step k's iterate
  # minimises phi over span{u} + K_k(P M A, P M r_0), r_0 = b - c A u.
  rng = np.random.default_rng(seed)
  n, steps = 9, 5
  a, b, u = random_spd(n, 30.0, rng), rng.standard_normal(n), rng.standard_normal(n)
  m = np.diag(rng.uniform(0.5, 2.0, n))
  got = augmented_cg(*map(jnp.asarray, (a, b, u, m)), max_steps=steps)
  assert int(got.num_steps) == steps
  c = (b @ u) / (u @ a @ u)
  projector = np.eye(n) - np.outer(u, a @ u) / (u @ a @ u)
  krylov = [projector @ m @ (b - c * a @ u)]
  for _ in range(steps - 1):
    krylov.append(projector @ m @ a @ krylov[-1])
  np.testing.assert_array_equal(got.iterate_steps[:steps], np.arange(1, steps + 1))
  for k in range(1, steps + 1):
    want = subspace_minimiser(a, b, np.column_stack([u, *krylov[:k]]))
    np.testing.assert_allclose(got.iterates[k - 1], want, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(got.iterate_values[k - 1], phi(a, b, want), rtol=1e-9)


def test_augmented_search_does_not_depend_on_the_warm_starts_scale_or_sign(x64):
  rng = np.random.default_rng(3)
  a, b, u = random_spd(8, 20.0, rng), rng.standard_normal(8), rng.standard_normal(8)
  m = np.eye(8)
  runs = [augmented_cg(*map(jnp.asarray, (a, b, s * u, m)), max_steps=3) for s in (1.0, -7.0)]
  np.testing.assert_allclose(runs[0].iterates, runs[1].iterates, rtol=1e-9, atol=1e-12)
  # One step is the best combination of u and M r_0: K-FAC's adaptive momentum.
  c = (b @ u) / (u @ a @ u)
  want = subspace_minimiser(a, b, np.column_stack([u, b - c * a @ u]))
  np.testing.assert_allclose(runs[0].iterates[0], want, rtol=1e-9)
  # ... which is never worse than the plain warm-started step.
  plain = dense_cg(jnp.asarray(a), jnp.asarray(b), jnp.asarray(u), max_steps=1)
  assert float(runs[0].iterate_values[0]) <= float(plain.value) + 1e-12


@pytest.mark.parametrize("u", ["zero", "nan", "no curvature"])
def test_unusable_warm_start_is_dropped_and_the_solve_is_plain_cg_from_zero(x64, u):
  rng = np.random.default_rng(4)
  a, b = random_spd(6, 10.0, rng), rng.standard_normal(6)
  if u == "no curvature":  # A is singular along e_0, and u = e_0.
    a[0, :] = a[:, 0] = 0.0
    b[0] = 0.0
  x0 = {"zero": np.zeros(6), "nan": np.full(6, np.nan), "no curvature": np.eye(6)[0]}[u]
  got = augmented_cg(*map(jnp.asarray, (a, b, x0, np.eye(6))), max_steps=4)
  want = pcg_reference(a, b, 4)
  np.testing.assert_allclose(got.iterates[:4], want[1:], rtol=1e-8, atol=1e-12)
  assert np.all(np.isfinite(got.x))


# --- Preconditioners ------------------------------------------------------------------------


def badly_scaled_spd(rng):
  """An SPD matrix with rows and columns scaled over two orders of magnitude."""
  d = np.geomspace(0.1, 10.0, N)
  rng.shuffle(d)
  return d[:, None] * random_spd(N, 30.0, rng) * d[None, :]


def test_exact_preconditioner_converges_in_one_step(x64):
  rng = np.random.default_rng(3)
  a = badly_scaled_spd(rng)
  b = rng.standard_normal(N)
  got = dense_cg(jnp.asarray(a), jnp.asarray(b), None, jnp.asarray(np.linalg.inv(a)), **CONVERGE)
  assert int(got.num_steps) == 1
  assert int(got.stop_reason) == CGStopReason.RESIDUAL
  np.testing.assert_allclose(got.x, np.linalg.solve(a, b), rtol=1e-8)


@pytest.mark.parametrize("beta", ["standard", "flexible"])
def test_jacobi_preconditioner_matches_plain_loop_pcg(x64, beta):
  # With a fixed preconditioner the flexible (Polak-Ribiere) beta equals the standard one in
  # exact arithmetic, so both must follow textbook PCG step for step.
  rng = np.random.default_rng(4)
  a = badly_scaled_spd(rng)
  b = rng.standard_normal(N)
  m = np.diag(1.0 / np.diag(a))
  got = dense_cg(jnp.asarray(a), jnp.asarray(b), None, jnp.asarray(m), **CONVERGE, beta=beta)
  assert int(got.stop_reason) == CGStopReason.RESIDUAL
  steps = int(got.num_steps)
  reference = pcg_reference(a, b, steps, m=m)
  schedule = [int(s) for s in hfjax.martens_record_steps(CONVERGE["max_steps"])]
  expected = [s for s in schedule if s < steps] + [steps]
  check_recorded(got, expected, reference, a, b, N)
  want, _ = scipy.sparse.linalg.cg(a, b, M=m, rtol=0.0, atol=0.0, maxiter=steps)
  np.testing.assert_allclose(got.x, want, rtol=1e-9, atol=1e-11)
  np.testing.assert_allclose(got.x, np.linalg.solve(a, b), rtol=1e-8, atol=1e-10)
  # Jacobi helps on this badly scaled system.
  plain = dense_cg(jnp.asarray(a), jnp.asarray(b), **CONVERGE)
  assert int(plain.stop_reason) == CGStopReason.RESIDUAL
  assert steps < int(plain.num_steps)


def test_flexible_and_standard_beta_agree_for_fixed_preconditioner(x64):
  rng = np.random.default_rng(5)
  a = badly_scaled_spd(rng)
  b = rng.standard_normal(N)
  m = jnp.asarray(np.diag(1.0 / np.diag(a)))
  runs = [
    dense_cg(jnp.asarray(a), jnp.asarray(b), None, m, **CONVERGE, beta=beta)
    for beta in ("flexible", "standard")
  ]
  assert int(runs[0].num_steps) == int(runs[1].num_steps)
  np.testing.assert_array_equal(runs[0].iterate_steps, runs[1].iterate_steps)
  np.testing.assert_allclose(runs[0].x, runs[1].x, rtol=1e-9, atol=1e-11)
  np.testing.assert_allclose(runs[0].iterates, runs[1].iterates, rtol=1e-9, atol=1e-11)


def test_lbfgs_preconditioner_updated_within_solve_converges(x64):
  rng = np.random.default_rng(6)
  a = random_spd(N, 1e3, rng)
  b = rng.standard_normal(N)
  memory = 5
  state = hfjax.lbfgs_init(jnp.zeros(N), memory)
  got = lbfgs_cg(
    jnp.asarray(a), jnp.asarray(b), state, jnp.zeros(N), update=True, residual_tol=1e-10
  )
  assert int(got.stop_reason) == CGStopReason.RESIDUAL
  np.testing.assert_allclose(got.x, np.linalg.solve(a, b), rtol=1e-7, atol=1e-9)
  # Every step adds its pair s = alpha p, y = alpha A p (s^T y > 0 on an SPD system).
  assert int(got.preconditioner_state.num_pairs) == min(memory, int(got.num_steps))


def plain_lbfgs_pcg(a, b, pairs, memory, steps, *, update, initial_matrix=None):
  """Flexible PCG in a NumPy loop with the dense BFGS inverse of the pairs as preconditioner:
  rebuilt after every step from the pairs so far (``update``), or kept fixed; from
  ``initial_matrix`` as H0 when given, else gamma I. Returns the iterates and the new pairs."""
  n = len(b)
  pairs, new_pairs = list(pairs), []
  inverse = lambda held: dense_bfgs_inverse(held, n, memory, initial_matrix=initial_matrix)
  h = inverse(pairs)
  x, r = np.zeros(n), b.copy()
  z = h @ r
  p, rz = z.copy(), r @ z
  iterates = [x]
  for _ in range(steps):
    ap = a @ p
    alpha = rz / (p @ ap)
    x, r_new = x + alpha * p, r - alpha * ap
    iterates.append(x)
    new_pairs.append((alpha * p, alpha * ap))
    if update:
      h = inverse(pairs + new_pairs)
    z = h @ r_new
    beta = z @ (r_new - r) / rz
    p, r, rz = z + beta * p, r_new, r_new @ z
  return np.array(iterates), new_pairs


@pytest.mark.parametrize("initial", [False, True])
@pytest.mark.parametrize("update", [True, False])
def test_lbfgs_pcg_matches_plain_loop_with_dense_bfgs(x64, update, initial):
  # Memory 3 and 7 steps: the ring buffer wraps twice within the solve. With ``initial``, a
  # dense SPD H0 replaces gamma I (``initial_preconditioner``).
  rng = np.random.default_rng(8)
  n, memory, steps = N, 3, 7
  a, b = random_spd(n, 1e3, rng), rng.standard_normal(n)
  old_pairs = [(s, random_spd(n, 10.0, rng) @ s) for s in rng.standard_normal((2, n))]
  h0 = random_spd(n, 10.0, rng) / 10.0 if initial else None
  state = hfjax.lbfgs_init(jnp.zeros(n), memory)
  for s, y in old_pairs:
    state = hfjax.lbfgs_update(state, jnp.asarray(s), jnp.asarray(y))
  got = jax.jit(
    lambda a, b, state, h0: hfjax.cg(
      lambda v: a @ v,
      b,
      preconditioner=state,
      update_preconditioner=update,
      initial_preconditioner=None if h0 is None else (lambda v: h0 @ v),
      max_steps=steps,
      tol=0.0,
    )
  )(jnp.asarray(a), jnp.asarray(b), state, None if h0 is None else jnp.asarray(h0))
  iterates, new_pairs = plain_lbfgs_pcg(
    a, b, old_pairs, memory, steps, update=update, initial_matrix=h0
  )
  want_x = iterates[-1]
  assert int(got.num_steps) == steps
  np.testing.assert_allclose(got.x, want_x, rtol=1e-8, atol=1e-10)
  # Step for step: every recorded iterate (steps 1, 2, 3, 4, 5 and 7) is the loop's.
  recorded = np.asarray(got.iterate_steps)
  np.testing.assert_array_equal(recorded[recorded >= 0], [1, 2, 3, 4, 5, 7])
  np.testing.assert_allclose(
    np.asarray(got.iterates)[recorded >= 0],
    iterates[recorded[recorded >= 0]],
    rtol=1e-8,
    atol=1e-10,
  )
  # Within the solve the memory ends with the newest pairs of all; with a fixed
  # preconditioner it holds the solve's own pairs, collected in a fresh memory. It holds the
  # pairs themselves (gamma I unless told otherwise), whatever H0 the solve used.
  held = old_pairs + new_pairs if update else new_pairs
  np.testing.assert_allclose(
    jax.vmap(lambda e: hfjax.lbfgs_apply(got.preconditioner_state, e))(jnp.eye(n)),
    dense_bfgs_inverse(held, n, memory),
    rtol=1e-8,
    atol=1e-10,
  )
  if initial:
    np.testing.assert_allclose(
      jax.vmap(lambda e: hfjax.lbfgs_apply(got.preconditioner_state, e, initial=lambda v: h0 @ v))(
        jnp.eye(n)
      ),
      dense_bfgs_inverse(held, n, memory, initial_matrix=h0),
      rtol=1e-8,
      atol=1e-10,
    )


def test_collected_lbfgs_pairs_speed_up_a_sequence_of_nearby_systems(x64):
  rng = np.random.default_rng(7)
  n, memory, residual_tol = 40, 20, 1e-6
  base = random_spd(n, 1e3, rng)
  empty = hfjax.lbfgs_init(jnp.zeros(n), memory)
  first = lbfgs_cg(
    jnp.asarray(base),
    jnp.asarray(rng.standard_normal(n)),
    empty,
    update=False,
    residual_tol=residual_tol,
  )
  pairs = first.preconditioner_state
  assert int(pairs.num_pairs) == memory
  plain_steps, preconditioned_steps = [], []
  for _ in range(4):
    noise = 1e-2 * rng.standard_normal((n, n))
    a = jnp.asarray(base + (noise + noise.T) / 2)
    b = jnp.asarray(rng.standard_normal(n))
    # An empty memory is the identity, so this is plain CG (and shares the compiled solver).
    plain = lbfgs_cg(a, b, empty, update=False, residual_tol=residual_tol)
    preconditioned = lbfgs_cg(a, b, pairs, update=False, residual_tol=residual_tol)
    for result in (plain, preconditioned):
      assert int(result.stop_reason) == CGStopReason.RESIDUAL
      np.testing.assert_allclose(result.x, np.linalg.solve(a, b), rtol=1e-3, atol=1e-5)
    plain_steps.append(int(plain.num_steps))
    preconditioned_steps.append(int(preconditioned.num_steps))
  assert np.mean(preconditioned_steps) < 0.85 * np.mean(plain_steps), (
    preconditioned_steps,
    plain_steps,
  )


# --- Recorded iterates and Martens' rules -------------------------------------------------


def test_martens_record_steps_closed_form():
  for max_steps in (1, 2, 20, 250):
    exact = {math.ceil(Fraction(13, 10) ** j) for j in range(40)}
    want = sorted(s for s in exact if s <= max_steps)
    np.testing.assert_array_equal(hfjax.martens_record_steps(max_steps), want)
  np.testing.assert_array_equal(hfjax.martens_record_steps(20, base=2.0), [1, 2, 4, 8, 16])


def test_fewer_recording_slots_keep_the_newest_iterates(x64):
  rng = np.random.default_rng(8)
  n, slots = 40, 3
  a = random_spd(n, 1e3, rng)
  b = rng.standard_normal(n)
  got = dense_cg(jnp.asarray(a), jnp.asarray(b), max_steps=250, tol=5e-4, num_recorded=slots)
  steps = int(got.num_steps)
  assert int(got.stop_reason) == CGStopReason.PROGRESS
  schedule = [int(s) for s in hfjax.martens_record_steps(250)]
  recorded = [s for s in schedule if s < steps] + [steps]
  assert len(recorded) > slots
  reference = pcg_reference(a, b, steps)
  # A ring buffer: the newest recorded steps survive, in whatever slots they landed.
  order = np.argsort(np.asarray(got.iterate_steps))
  np.testing.assert_array_equal(np.asarray(got.iterate_steps)[order], recorded[-slots:])
  iterates = np.asarray(got.iterates)[order]
  np.testing.assert_allclose(iterates, reference[recorded[-slots:]], rtol=1e-9, atol=1e-11)
  values = np.asarray(got.iterate_values)[order]
  np.testing.assert_allclose(values, [phi(a, b, x) for x in iterates], rtol=1e-9)
  np.testing.assert_allclose(got.x, reference[steps], rtol=1e-9, atol=1e-11)


def test_recorded_iterates_end_with_a_final_step_off_the_schedule(x64):
  rng = np.random.default_rng(9)
  n = 6
  a, b = embed(random_spd(n, 10.0, rng), rng.standard_normal(n))
  got = dense_cg(jnp.asarray(a), jnp.asarray(b), **CONVERGE)
  final = int(got.num_steps)
  schedule = [int(s) for s in hfjax.martens_record_steps(CONVERGE["max_steps"])]
  assert final not in schedule, final
  expected = [s for s in schedule if s < final] + [final]
  reference = pcg_reference(a, b, final)
  check_recorded(got, expected, reference, a, b, N)


def martens_stop_reference(a, b, x0, max_steps, eps):
  """Plain CG with Martens' (2010) relative-progress rule; returns (stop step, iterate)."""
  x = x0.copy()
  r = b - a @ x
  p = r.copy()
  rr = r @ r
  values = [phi(a, b, x)]
  margins = []
  for i in range(1, max_steps + 1):
    ap = a @ p
    alpha = rr / (p @ ap)
    x = x + alpha * p
    r = r - alpha * ap
    rr, rr_old = r @ r, rr
    p = r + (rr / rr_old) * p
    values.append(phi(a, b, x))
    k = max(10, math.ceil(0.1 * i))
    if i > k and values[i] < 0:
      ratio = (values[i] - values[i - k]) / values[i]
      margins.append(abs(ratio - k * eps) / (k * eps))
      if ratio < k * eps:
        return i, x, min(margins)
  raise AssertionError("the reference never stopped")


@pytest.mark.parametrize("warm_start", [False, True])
def test_martens_progress_rule_matches_reference(x64, warm_start):
  rng = np.random.default_rng(11)
  n, eps = 40, 5e-4
  a = random_spd(n, 1e3, rng)
  b = rng.standard_normal(n)
  x0 = 0.1 * rng.standard_normal(n) if warm_start else np.zeros(n)
  stop, x, margin = martens_stop_reference(a, b, x0, 250, eps)
  assert margin > 1e-3  # the rule is not decided by rounding
  got = dense_cg(jnp.asarray(a), jnp.asarray(b), jnp.asarray(x0), max_steps=250, tol=eps)
  assert int(got.stop_reason) == CGStopReason.PROGRESS
  assert int(got.num_steps) == stop
  np.testing.assert_allclose(got.x, x, rtol=1e-9, atol=1e-11)
  np.testing.assert_allclose(got.value, phi(a, b, x), rtol=1e-9)
  # The recorded iterates are those at the schedule's steps, then the final one.
  schedule = [int(s) for s in hfjax.martens_record_steps(250)]
  assert stop not in schedule
  reference = pcg_reference(a, b, stop, x0=x0)
  check_recorded(got, [s for s in schedule if s < stop] + [stop], reference, a, b, n)


def test_tol_zero_disables_the_progress_rule():
  # Documented: "tol: ... 0 disables the rule". After CG has converged in float32, the
  # quadratic model stalls at rounding level; with tol=0 only the residual or the step cap
  # may stop the solve.
  stops = []
  for seed in range(5):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((N, N))
    a = jnp.asarray(q @ q.T + N * np.eye(N), jnp.float32)
    b = jnp.asarray(rng.standard_normal(N), jnp.float32)
    got = dense_cg(a, b, max_steps=60, tol=0.0)
    stops.append((int(got.stop_reason), int(got.num_steps)))
  assert all(reason != CGStopReason.PROGRESS for reason, _ in stops), stops


# --- Stopping on round-off -----------------------------------------------------------------

# The documented default floor, in units of the solve dtype's epsilon.
FLOOR_ULPS = 16


def relative_true_residual(a, b, x):
  """``||b - A x|| / ||b||`` in float64, for the system as it was solved (rounded a and b)."""
  a, b, x = (
    np.asarray(jnp.asarray(v, jnp.float32) if v.dtype == jnp.bfloat16 else v, np.float64)
    for v in (a, b, x)
  )
  return np.linalg.norm(b - a @ x) / np.linalg.norm(b)


@jax.jit
def exact_lbfgs_cg(a, b, x0, m):
  """``hfjax.cg`` with an empty L-BFGS memory whose initial matrix is ``m``."""
  return hfjax.cg(
    lambda v: a @ v,
    b,
    x0=x0,
    preconditioner=hfjax.lbfgs_init(b, 5),
    initial_preconditioner=lambda v: m @ v,
    max_steps=50,
    tol=0.0,
  )


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("how", ["callable", "lbfgs_initial"])
def test_exact_preconditioner_stops_on_roundoff_after_one_step(dtype, how):
  # No tolerance is given (tol=0, residual_tol=0): only the round-off floor may stop the
  # solve, and with M = A^-1 the first step already solves the system, from a cold or a
  # warm start.
  rng = np.random.default_rng(20)
  a_np = random_spd(N, 10.0, rng)
  b_np, x0_np = rng.standard_normal(N), rng.standard_normal(N)
  solve = exact_lbfgs_cg if how == "lbfgs_initial" else functools.partial(dense_cg, max_steps=50)
  with jax.enable_x64(dtype == "float64"):
    a, b, m = (jnp.asarray(v, dtype) for v in (a_np, b_np, np.linalg.inv(a_np)))
    runs = [solve(a, b, jnp.asarray(x0, dtype), m) for x0 in (np.zeros(N), x0_np)]
    eps = float(jnp.finfo(dtype).eps)
  want = np.linalg.solve(np.asarray(a, np.float64), np.asarray(b, np.float64))
  for got in runs:
    assert int(got.stop_reason) == CGStopReason.ROUNDOFF, int(got.num_steps)
    assert int(got.num_steps) == 1
    assert 0 < float(got.residual_norm) <= FLOOR_ULPS * eps * np.linalg.norm(np.asarray(b))
    assert relative_true_residual(a, b, got.x) <= FLOOR_ULPS * eps
    np.testing.assert_allclose(got.x, want, rtol=0, atol=10 * FLOOR_ULPS * eps * np.abs(want).max())


@functools.partial(jax.jit, static_argnames=("kind", "max_steps"))
def untoleranced_cg(a, b, state, *, kind, max_steps):
  """``hfjax.cg`` with no tolerance (tol=0, residual_tol=0): plain, Jacobi, or an L-BFGS
  preconditioner updated within the solve or fixed (the pairs of an earlier solve)."""
  preconditioner = {
    "none": None,
    "jacobi": lambda r: r / jnp.diag(a),
    "lbfgs_within": state,
    "lbfgs_fixed": state,
  }[kind]
  return hfjax.cg(
    lambda v: a @ v,
    b,
    preconditioner=preconditioner,
    update_preconditioner=kind != "lbfgs_fixed",
    max_steps=max_steps,
    tol=0.0,
  )


@pytest.mark.parametrize(
  ("kind", "dtype", "solve_dtype"),
  [
    ("none", "float32", "float32"),
    ("none", "float64", "float64"),
    ("none", "bfloat16", "float32"),
    ("jacobi", "float32", "float32"),
    ("jacobi", "float64", "float64"),
    ("lbfgs_within", "float32", "float32"),
    ("lbfgs_within", "float64", "float64"),
    ("lbfgs_fixed", "float32", "float32"),
  ],
)
def test_well_conditioned_system_stops_on_roundoff_within_its_dimension(dtype, solve_dtype, kind):
  # Cond 10 (rows and columns scaled over two orders of magnitude for Jacobi to undo): CG
  # reaches round-off in about 25 of the n = 40 steps; without the floor it ran on to the
  # cap (3n). Half-precision b is solved in float32, so the floor is float32's.
  rng = np.random.default_rng(21)
  n = 40
  a_np = random_spd(n, 10.0, rng)
  if kind == "jacobi":
    d = np.geomspace(0.1, 10.0, n)
    a_np = d[:, None] * a_np * d[None, :]
  b_np = rng.standard_normal(n)
  with jax.enable_x64(dtype == "float64"):
    a, b = jnp.asarray(a_np, solve_dtype), jnp.asarray(b_np, dtype)
    state = hfjax.lbfgs_init(b, 5)
    if kind == "lbfgs_fixed":
      # Pairs of a solve with another right-hand side of the same matrix.
      other = jnp.asarray(rng.standard_normal(n), dtype)
      state = untoleranced_cg(a, other, state, kind="lbfgs_within", max_steps=3 * n)
      state = state.preconditioner_state
    got = untoleranced_cg(a, b, state, kind=kind, max_steps=3 * n)
    eps = float(jnp.finfo(solve_dtype).eps)
  assert int(got.stop_reason) == CGStopReason.ROUNDOFF
  assert int(got.num_steps) <= n
  b_norm = np.linalg.norm(np.asarray(b, np.float64))
  assert float(got.residual_norm) <= FLOOR_ULPS * eps * b_norm
  # Stopping there loses nothing: the true residual is at round-off too.
  assert relative_true_residual(a, b, got.x) <= 4 * FLOOR_ULPS * eps
  want = scipy.linalg.solve(np.asarray(a, np.float64), np.asarray(b, np.float64), assume_a="pos")
  cond = np.linalg.cond(np.asarray(a, np.float64))
  assert np.linalg.norm(np.asarray(got.x, np.float64) - want) <= (
    4 * FLOOR_ULPS * eps * cond * np.linalg.norm(want)
  )


def test_residual_floor_stops_at_the_first_residual_below_it(x64):
  # An explicit floor: the solve stops at the first step whose residual is below
  # residual_floor * ||b||, the step textbook CG in NumPy reaches it; 0 turns the floor off,
  # so nothing but the cap stops a solve without tolerances (the behaviour before the floor).
  rng = np.random.default_rng(22)
  n = 40
  a, b = random_spd(n, 1e3, rng), rng.standard_normal(n)
  iterates = pcg_reference(a, b, 3 * n)
  residuals = np.linalg.norm(b - iterates @ a, axis=1) / np.linalg.norm(b)
  for floor in (1e-3, 1e-8):
    want = int(np.argmax(residuals <= floor))
    # Not decided by rounding: no residual up to there lies within 1% of the floor.
    assert np.all(np.abs(residuals[: want + 1] / floor - 1) > 1e-2), residuals[: want + 1] / floor
    got = dense_cg(jnp.asarray(a), jnp.asarray(b), max_steps=3 * n, residual_floor=floor)
    assert int(got.stop_reason) == CGStopReason.ROUNDOFF
    assert int(got.num_steps) == want
    np.testing.assert_allclose(got.x, iterates[want], rtol=1e-8, atol=1e-10)
  off = dense_cg(jnp.asarray(a), jnp.asarray(b), max_steps=3 * n, residual_floor=0.0)
  assert int(off.stop_reason) == CGStopReason.MAX_STEPS
  assert int(off.num_steps) == 3 * n
  # When the residual meets both at once, the caller's tolerance is the reason given.
  met = dense_cg(
    jnp.asarray(a), jnp.asarray(b), max_steps=3 * n, residual_tol=1e-3, residual_floor=1e-3
  )
  assert int(met.stop_reason) == CGStopReason.RESIDUAL
  assert int(met.num_steps) == int(np.argmax(residuals <= 1e-3))


# --- Guards ---------------------------------------------------------------------------------


def test_indefinite_matrix_stops_with_negative_curvature(x64):
  # A = diag(1, -1), b = (2, 1): step 1 has p^T A p = 3 > 0 and reaches x1 = (10/3, 5/3);
  # the next direction p1 = (20/9, 40/9) has p^T A p = -400/27 < 0.
  a, b = embed(np.diag([1.0, -1.0]), np.array([2.0, 1.0]))
  got = dense_cg(jnp.asarray(a), jnp.asarray(b), **CONVERGE)
  assert int(got.stop_reason) == CGStopReason.NEGATIVE_CURVATURE
  assert int(got.num_steps) == 1
  x1 = np.zeros(N)
  x1[:2] = [10 / 3, 5 / 3]
  np.testing.assert_allclose(got.x, x1, rtol=1e-12)
  np.testing.assert_allclose(got.value, phi(a, b, x1), rtol=1e-12)
  assert np.isfinite(np.asarray(got.iterate_values)[np.asarray(got.iterate_steps) >= 0]).all()


@jax.jit
def cg_failing_after(a, b, k):
  # With a tridiagonal A and b = e_0, the direction of step i + 1 has support {0, ..., i},
  # so entry k is exactly zero in the first k directions and nonzero in the next one.
  matvec = lambda v: jnp.where(v[k] != 0, jnp.nan, a @ v)
  return hfjax.cg(matvec, b, max_steps=50, tol=0.0)


@pytest.mark.parametrize("k", [0, 3])
def test_non_finite_matvec_keeps_the_last_good_iterate(x64, k):
  rng = np.random.default_rng(12)
  diag = rng.uniform(2.0, 3.0, N)
  off = rng.uniform(0.2, 0.8, N - 1)
  a = np.diag(diag) + np.diag(off, 1) + np.diag(off, -1)
  b = np.eye(N)[0]
  got = cg_failing_after(jnp.asarray(a), jnp.asarray(b), k)
  assert int(got.stop_reason) == CGStopReason.NON_FINITE
  assert int(got.num_steps) == k
  assert np.isfinite(np.asarray(got.x)).all()
  np.testing.assert_allclose(got.x, pcg_reference(a, b, k)[k], rtol=1e-12, atol=1e-14)
  assert np.isfinite(float(got.value)) and np.isfinite(float(got.residual_norm))
  recorded = np.asarray(got.iterate_steps)
  assert recorded.max() == k and np.isfinite(np.asarray(got.iterates)).all()


# --- Dtypes and argument errors -----------------------------------------------------------


@pytest.mark.parametrize(
  ("dtype", "solve_dtype"),
  [("float32", "float32"), ("float64", "float64"), ("bfloat16", "float32")],
)
def test_result_dtypes_are_stable_under_jit(dtype, solve_dtype):
  # The L-BFGS memory rides in the loop carry, where dtype drift would fail to trace.
  rng = np.random.default_rng(13)
  a_np = random_spd(N, 10.0, rng)
  b_np = rng.standard_normal(N)
  with jax.enable_x64(dtype == "float64"):
    b = jnp.asarray(b_np, dtype)
    state = hfjax.lbfgs_init(b, 5)
    got = lbfgs_cg(
      jnp.asarray(a_np, solve_dtype),
      b,
      state,
      jnp.zeros_like(b),
      update=True,
      residual_tol=1e-10 if dtype == "float64" else 1e-4,
    )
    for leaf in (got.x, got.value, got.residual_norm, got.iterates, got.iterate_values):
      assert leaf.dtype == jnp.dtype(solve_dtype)
    for leaf in (got.num_steps, got.stop_reason, got.iterate_steps):
      assert leaf.dtype == jnp.int32
    assert jax.tree.map(lambda v: v.dtype, got.preconditioner_state) == jax.tree.map(
      lambda v: v.dtype, state
    )
  assert int(got.stop_reason) == CGStopReason.RESIDUAL
  want = np.linalg.solve(a_np, np.asarray(b.astype(jnp.float32), np.float64))
  np.testing.assert_allclose(np.asarray(got.x, np.float64), want, rtol=1e-3, atol=1e-3)


def _matvec(v):
  return 2.0 * v


_EMPTY_LBFGS = hfjax.lbfgs_init(jnp.zeros(3), 2)
_EMPTY_LBFGS_DIAGONAL = hfjax.lbfgs_init(jnp.zeros(3), 2, initial_diagonal=jnp.ones(3))


@pytest.mark.parametrize(
  ("kwargs", "error", "match"),
  [
    ({"max_steps": 0}, ValueError, "max_steps"),
    ({"max_steps": 2.5}, ValueError, "max_steps"),
    ({"tol": -1.0}, ValueError, "tol"),
    ({"residual_tol": -1.0}, ValueError, "tol"),
    ({"residual_floor": -1e-6}, ValueError, "residual_floor"),
    ({"residual_floor": float("nan")}, ValueError, "residual_floor"),
    ({"beta": "hestenes"}, ValueError, "beta"),
    ({"num_recorded": 0}, ValueError, "num_recorded"),
    ({"preconditioner": "lbfgs"}, TypeError, "preconditioner"),
    ({"preconditioner": 3.0}, TypeError, "preconditioner"),
    ({"initial_preconditioner": _matvec}, TypeError, "initial_preconditioner"),
    (
      {"preconditioner": lambda r: r, "initial_preconditioner": _matvec},
      TypeError,
      "initial_preconditioner",
    ),
    ({"preconditioner": _EMPTY_LBFGS, "initial_preconditioner": 2.0}, TypeError, "initial"),
    (
      {"preconditioner": _EMPTY_LBFGS_DIAGONAL, "initial_preconditioner": _matvec},
      ValueError,
      "initial_diagonal",
    ),
  ],
)
def test_bad_arguments_raise_at_trace_time(kwargs, error, match):
  b = jnp.ones(3)
  with pytest.raises(error, match=match):
    hfjax.cg(_matvec, b, **kwargs)
  with pytest.raises(error, match=match):
    jax.jit(lambda b: hfjax.cg(_matvec, b, **kwargs).x)(b)


def test_empty_right_hand_side_raises():
  with pytest.raises(ValueError, match="empty"):
    hfjax.cg(_matvec, {})
