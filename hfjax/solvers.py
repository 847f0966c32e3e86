"""Flexible preconditioned conjugate gradients in one ``lax.while_loop``.

How :func:`cg` differs from ``jax.scipy.sparse.linalg.cg`` and lineax's CG, and why:

- The direction update defaults to the flexible (Polak-Ribiere) :math:`\\beta`, so the
  preconditioner may change between steps: an L-BFGS memory can take in each step's pair.
- The preconditioner is one small interface (:class:`_Preconditioner`: init, update,
  finish), built once from what the caller passed, so the loop body never asks what kind
  it is; the L-BFGS memory rides in the loop carry.
- Iterates on Martens' schedule are recorded for CG backtracking, Martens' relative-progress
  rule can stop the solve, and a failing step (non-finite values, :math:`p^\\top A p \\le 0`,
  :math:`z^\\top r \\le 0`) is not taken; the result always says why the solve stopped.
- Whatever the tolerances, the solve stops once the residual reaches round-off
  (``residual_floor``): steps beyond it only fit noise, and feed an L-BFGS memory pairs made of
  rounding errors.
"""

from __future__ import annotations

import enum
import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from hfjax._tree import all_finite, as_accumulation, finite_or
from hfjax.preconditioners import (
  LBFGSState,
  flatten_memory,
  lbfgs_in_solve_finish,
  lbfgs_in_solve_init,
  lbfgs_in_solve_step,
  lbfgs_init,
  lbfgs_operator,
  lbfgs_refresh_products,
  lbfgs_store_pair,
  memory_size,
  unflatten_memory,
)

Preconditioner = Callable[[Any], Any] | LBFGSState | None

# The default residual_floor of cg, in units of the solve dtype's epsilon (see its docstring).
_ROUNDOFF_ULPS = 16


class CGStopReason(enum.IntEnum):
  """Why :func:`cg` stopped (the ``stop_reason`` field of :class:`CGResult`)."""

  MAX_STEPS = 1
  """The step cap ``max_steps`` was reached."""
  PROGRESS = 2
  """Martens' relative-progress rule on the quadratic model fired."""
  RESIDUAL = 3
  """The residual norm fell to ``residual_tol * ||b||`` (or exactly zero)."""
  NEGATIVE_CURVATURE = 4
  """A direction with :math:`p^\\top A p \\le 0`: ``A`` is not positive definite there."""
  NON_FINITE = 5
  """A matvec or preconditioner produced a NaN or Inf."""
  PRECONDITIONER_BREAKDOWN = 6
  """:math:`z^\\top r \\le 0`: the preconditioner is not positive definite."""
  ROUNDOFF = 7
  """The residual norm fell to round-off, ``residual_floor * ||b||``, before reaching
  ``residual_tol * ||b||``: further steps cannot make :math:`x` more accurate."""


class CGResult(NamedTuple):
  """The outcome of :func:`cg`.

  Attributes:
    x: the last good iterate (never NaN: a failing step is not taken).
    num_steps: CG steps taken, int32.
    value: the quadratic model :math:`\\phi(x) = \\frac12 x^\\top A x - b^\\top x` at ``x``.
    stop_reason: a :class:`CGStopReason` value, int32.
    residual_norm: :math:`\\|b - A x\\|` as CG updates it (:math:`r_{k+1} = r_k - \\alpha_k
      A p_k`); once it is near round-off the true residual of ``x`` stays above it.
    iterates: recorded iterates, a pytree like ``b`` with a leading axis of
      ``num_recorded`` slots (a ring buffer when fewer slots than recording steps).
    iterate_steps: the CG step of each recorded iterate, int32, -1 in an empty slot.
    iterate_values: :math:`\\phi` of each recorded iterate (``inf`` in an empty slot).
    preconditioner_state: the L-BFGS memory after the solve (updated within the solve), or
      the pairs collected during a solve with a fixed L-BFGS preconditioner; ``None``
      for a callable preconditioner or none.
  """

  x: Any
  num_steps: jax.Array
  value: jax.Array
  stop_reason: jax.Array
  residual_norm: jax.Array
  iterates: Any
  iterate_steps: jax.Array
  iterate_values: jax.Array
  preconditioner_state: LBFGSState | None


def martens_record_steps(max_steps: int, base: float = 1.3) -> np.ndarray:
  """The CG steps :math:`\\lceil b^j \\rceil \\le` ``max_steps`` whose iterates are recorded."""
  steps, j = set(), 0
  while (step := math.ceil(base**j - 1e-9)) <= max_steps:
    steps.add(step)
    j += 1
  return np.array(sorted(steps), dtype=np.int32)


class _Preconditioner(NamedTuple):
  """A preconditioner as the CG loop sees it, whatever the caller passed.

  Attributes:
    init: ``r0 -> (state, z0)``, with :math:`z_0 = M_0 r_0`.
    update: ``(state, s, y, r) -> (state, z)``: takes in the step's pair
      :math:`s = \\alpha p`, :math:`y = \\alpha A p`, then returns :math:`z = M r` for the new
      residual ``r``. One function rather than two because an L-BFGS memory updated within
      the solve takes the pair's inner products from those of the residuals.
    finish: ``state ->`` the ``preconditioner_state`` of the :class:`CGResult`.
  """

  init: Callable[[Any], tuple[Any, Any]]
  update: Callable[[Any, Any, Any, Any], tuple[Any, Any]]
  finish: Callable[[Any], LBFGSState | None]


def _operator(apply: Callable[[Any], Any]) -> _Preconditioner:
  """A fixed operator ``r -> z``: no state, the pairs are ignored."""
  return _Preconditioner(
    init=lambda r: ((), apply(r)),
    update=lambda state, s, y, r: (state, apply(r)),
    finish=lambda state: None,
  )


def _lbfgs_updated(state: LBFGSState, initial: Any, like: Any) -> _Preconditioner:
  """Sainath et al.: every step's pair joins the memory (flexible PCG copes with the change)."""
  return _Preconditioner(
    init=functools.partial(lbfgs_in_solve_init, state, initial=initial),
    update=functools.partial(lbfgs_in_solve_step, initial=initial),
    finish=functools.partial(lbfgs_in_solve_finish, like=like),
  )


def _lbfgs_fixed(state: LBFGSState, initial: Any, like: Any) -> _Preconditioner:
  """Morales & Nocedal: ``state`` stays fixed; the solve's pairs fill a fresh memory."""
  apply = lbfgs_operator(state, like, initial)
  fresh = flatten_memory(lbfgs_init(like, memory_size(state)))
  # The collected pairs' inner products are taken once, after the solve.
  return _Preconditioner(
    init=lambda r: (fresh, apply(r)),
    update=lambda pairs, s, y, r: (lbfgs_store_pair(pairs, s, y), apply(r)),
    finish=lambda pairs: unflatten_memory(lbfgs_refresh_products(pairs), like),
  )


def _make_preconditioner(
  preconditioner: Preconditioner, update: bool, initial: Any, like: Any
) -> _Preconditioner:
  """The :class:`_Preconditioner` for what the caller passed (see :func:`cg`)."""
  if isinstance(preconditioner, LBFGSState):
    build = _lbfgs_updated if update else _lbfgs_fixed
    return build(preconditioner, initial, like)
  if not (preconditioner is None or callable(preconditioner)):
    raise TypeError(
      "preconditioner must be None, a callable r -> z or an hfjax.LBFGSState; got "
      f"{type(preconditioner).__name__}."
    )
  if initial is not None:
    raise TypeError(
      "initial_preconditioner is the initial matrix of an L-BFGS preconditioner: it needs "
      f"an hfjax.LBFGSState as preconditioner, got {type(preconditioner).__name__}."
    )
  if preconditioner is None:
    return _operator(lambda r: r)
  return _operator(lambda r: optax.tree.cast_like(preconditioner(r), r))


class _Recorded(NamedTuple):
  """Iterates recorded for CG backtracking, in a ring buffer of ``slots``."""

  iterates: Any
  steps: jax.Array
  values: jax.Array
  count: jax.Array


def _record(recorded: _Recorded, x: Any, step: jax.Array, value: jax.Array, should) -> _Recorded:
  """Writes ``x`` into the next slot of the ring buffer when ``should``."""
  i = recorded.count % recorded.steps.shape[0]

  def write(buffer, v):
    return buffer.at[i].set(jnp.where(should, v, buffer[i]))

  return _Recorded(
    iterates=jax.tree.map(write, recorded.iterates, x),
    steps=write(recorded.steps, step),
    values=write(recorded.values, value),
    count=recorded.count + should.astype(jnp.int32),
  )


def _recording_plan(max_steps: int, base: float, num_recorded: int | None):
  """Which steps are recorded (a mask over ``0..max_steps``) and how many slots keep them."""
  schedule = martens_record_steps(max_steps, base)
  mask = np.zeros(max_steps + 1, dtype=bool)
  mask[schedule] = True
  slots = len(schedule) + 1 if num_recorded is None else min(num_recorded, len(schedule) + 1)
  return jnp.asarray(mask), slots


class _Carry(NamedTuple):
  x: Any
  r: Any
  p: Any
  rz: jax.Array
  step: jax.Array
  stop: jax.Array
  residual_norm: jax.Array
  values: jax.Array  # phi at steps 0..max_steps, for the progress rule
  precond: Any  # the _Preconditioner's state
  recorded: _Recorded
  search: Any  # _Search along x0 with augment_x0, else None


class _Search(NamedTuple):
  """The warm start :math:`u` that every direction is kept A-conjugate to (``augment_x0``)."""

  u: Any
  au: Any  # A u
  inverse_uau: jax.Array  # 1 / u^T A u; 0 when u^T A u is not positive, which turns it off

  def project(self, z: Any) -> Any:
    """:math:`z - (z^\\top A u / u^\\top A u)\\, u`, A-conjugate to :math:`u`."""
    return optax.tree.add_scale(z, -optax.tree.vdot(z, self.au) * self.inverse_uau, self.u)


def _model_value(x: Any, b: Any, r: Any) -> jax.Array:
  """:math:`\\phi(x) = \\frac12 x^\\top A x - b^\\top x = -\\frac12 x^\\top (b + r)`, as
  :math:`r = b - A x`."""
  return -0.5 * optax.tree.vdot(x, optax.tree.add(b, r))


class _ResidualStop(NamedTuple):
  """The residual norms at or below which the solve stops.

  Attributes:
    tol: ``residual_tol * ||b||``, the caller's tolerance.
    floor: ``residual_floor * ||b||``, round-off.
  """

  tol: jax.Array
  floor: jax.Array

  def reasons(self, residual_norm: jax.Array) -> dict[str, jax.Array]:
    """The ``converged`` and ``roundoff`` conditions of :func:`_stop_reason`."""
    return {"converged": residual_norm <= self.tol, "roundoff": residual_norm <= self.floor}


def _residual_stop(b: Any, residual_tol: float, residual_floor: float | None) -> _ResidualStop:
  """The :class:`_ResidualStop` of a solve for ``b`` (already in its solve dtype)."""
  if residual_floor is None:
    # The coarsest leaf sets the round-off of the whole residual.
    eps = max(float(jnp.finfo(leaf.dtype).eps) for leaf in jax.tree.leaves(b))
    residual_floor = _ROUNDOFF_ULPS * eps
  b_norm = jnp.sqrt(optax.tree.vdot(b, b))
  return _ResidualStop(tol=residual_tol * b_norm, floor=residual_floor * b_norm)


def _stop_reason(
  *,
  converged,
  roundoff,
  not_finite,
  breakdown,
  curvature_not_finite=False,
  negative_curvature=False,
  stalled=False,
  capped=False,
) -> jax.Array:
  """The first :class:`CGStopReason` that holds, in this order of priority; 0 to go on.

  The solve's start has no step, so neither curvature nor progress nor the cap applies.
  """
  reasons = [
    (curvature_not_finite, CGStopReason.NON_FINITE),
    (negative_curvature, CGStopReason.NEGATIVE_CURVATURE),
    (converged, CGStopReason.RESIDUAL),
    (roundoff, CGStopReason.ROUNDOFF),
    (not_finite, CGStopReason.NON_FINITE),
    (breakdown, CGStopReason.PRECONDITIONER_BREAKDOWN),
    (stalled, CGStopReason.PROGRESS),
    (capped, CGStopReason.MAX_STEPS),
  ]
  conditions = [jnp.asarray(condition) for condition, _ in reasons]
  return jnp.select(conditions, [reason for _, reason in reasons], 0).astype(jnp.int32)


def _stalled(values: jax.Array, step: jax.Array, value: jax.Array, tol: float) -> jax.Array:
  """Martens' relative-progress rule at ``step`` (see :func:`cg`)."""
  gap = jnp.maximum(10, jnp.ceil(0.1 * step).astype(jnp.int32))
  previous = values[jnp.maximum(step - gap, 0)]
  return (tol > 0) & (step > gap) & (value < 0) & ((value - previous) / value < gap * tol)


def _flexible_beta(alpha, z, ap, rz, rz_old):
  # z^T (r_new - r_old) with r_new - r_old = -alpha A p: the old residual need not stay alive.
  return -alpha * optax.tree.vdot(z, ap) / rz_old


def _standard_beta(alpha, z, ap, rz, rz_old):
  return rz / rz_old


_BETAS = {"flexible": _flexible_beta, "standard": _standard_beta}


def _start(b, x0, apply_a, precond, residual_stop, max_steps, slots, augment_x0) -> _Carry:
  """The carry before the first step: :math:`x_0`, :math:`r_0 = b - A x_0`,
  :math:`z_0 = M r_0`, and whether there is anything to do.

  With ``augment_x0`` the start is :math:`c\\, x_0` with :math:`c = b^\\top x_0 / x_0^\\top A
  x_0`, the minimiser of :math:`\\phi` along :math:`x_0` (so :math:`r_0 \\perp x_0`), from the
  same one matvec, and the first direction is :math:`z_0` made A-conjugate to :math:`x_0`."""
  search = None
  if x0 is None:
    x, r = optax.tree.zeros_like(b), b
  elif augment_x0:
    u = optax.tree.cast_like(x0, b)
    au = apply_a(u)
    uau = optax.tree.vdot(u, au)
    usable = jnp.isfinite(uau) & (uau > 0) & all_finite(au)
    inverse_uau = jnp.where(usable, 1.0 / jnp.where(usable, uau, 1.0), 0.0)
    scale = optax.tree.vdot(b, u) * inverse_uau
    scale = jnp.where(jnp.isfinite(scale), scale, 0.0)
    # An unusable u (zero, non-finite, or no curvature along it) starts from 0 without it.
    u, au = optax.tree.where(usable, (u, au), optax.tree.zeros_like((u, au)))
    search = _Search(u=u, au=au, inverse_uau=inverse_uau)
    x, r = optax.tree.scale(scale, u), optax.tree.add_scale(b, -scale, au)
  else:
    x = optax.tree.cast_like(x0, b)
    r = optax.tree.sub(b, apply_a(x))
  precond_state, z = precond.init(r)
  p = z if search is None else search.project(z)
  rz, residual_norm = optax.tree.vdot(r, z), jnp.sqrt(optax.tree.vdot(r, r))
  value = _model_value(x, b, r)
  dtype = jnp.result_type(*jax.tree.leaves(b))
  return _Carry(
    x=x,
    r=r,
    p=p,
    rz=rz,
    step=jnp.zeros((), jnp.int32),
    stop=_stop_reason(
      **residual_stop.reasons(residual_norm),
      not_finite=~jnp.isfinite(rz) | ~jnp.isfinite(value),
      breakdown=rz <= 0,
    ),
    residual_norm=residual_norm,
    values=jnp.zeros(max_steps + 1, dtype).at[0].set(finite_or(value, 0)),
    precond=precond_state,
    recorded=_Recorded(
      iterates=jax.tree.map(lambda v: jnp.zeros((slots,) + v.shape, v.dtype), b),
      steps=jnp.full((slots,), -1, jnp.int32),
      values=jnp.full((slots,), jnp.inf, dtype),
      count=jnp.zeros((), jnp.int32),
    ),
    search=search,
  )


def _finish(final: _Carry, precond: _Preconditioner) -> CGResult:
  """The result; the last iterate joins the recorded ones unless it is there already."""
  recorded = final.recorded
  last = jnp.maximum(recorded.count - 1, 0) % recorded.steps.shape[0]
  already = (recorded.count > 0) & (recorded.steps[last] == final.step)
  value = final.values[final.step]
  recorded = _record(recorded, final.x, final.step, value, ~already)
  return CGResult(
    x=final.x,
    num_steps=final.step,
    value=value,
    stop_reason=final.stop,
    residual_norm=final.residual_norm,
    iterates=recorded.iterates,
    iterate_steps=recorded.steps,
    iterate_values=recorded.values,
    preconditioner_state=precond.finish(final.precond),
  )


def _check_arguments(b, max_steps, tol, residual_tol, residual_floor, beta, num_recorded) -> None:
  if int(max_steps) != max_steps or max_steps < 1:
    raise ValueError(f"max_steps must be an integer >= 1, got {max_steps!r}.")
  if tol < 0 or residual_tol < 0:
    raise ValueError(f"tol and residual_tol must be >= 0, got {tol} and {residual_tol}.")
  if residual_floor is not None and not residual_floor >= 0:
    raise ValueError(f"residual_floor must be >= 0 or None, got {residual_floor!r}.")
  if beta not in _BETAS:
    raise ValueError(f"beta must be 'flexible' or 'standard', got {beta!r}.")
  if num_recorded is not None and num_recorded < 1:
    raise ValueError(f"num_recorded must be >= 1 or None, got {num_recorded!r}.")
  if not jax.tree.leaves(b):
    raise ValueError("b is empty: it holds no arrays.")


def cg(
  matvec: Callable[[Any], Any],
  b: Any,
  *,
  x0: Any = None,
  preconditioner: Preconditioner = None,
  max_steps: int = 250,
  tol: float = 5e-4,
  residual_tol: float = 0.0,
  residual_floor: float | None = None,
  beta: str = "flexible",
  update_preconditioner: bool = True,
  initial_preconditioner: Callable[[Any], Any] | None = None,
  num_recorded: int | None = None,
  record_base: float = 1.3,
  augment_x0: bool = False,
) -> CGResult:
  """Solves :math:`A x = b` for symmetric positive definite ``A`` by (flexible) PCG.

  Minimises the quadratic model :math:`\\phi(x) = \\frac12 x^\\top A x - b^\\top x`. With
  :math:`z_k = M_k r_k` the preconditioned residual, the direction update is

  .. math::

    \\beta_k = \\frac{z_{k+1}^\\top (r_{k+1} - r_k)}{z_k^\\top r_k} \\quad \\text{(flexible)},
    \\qquad \\beta_k = \\frac{z_{k+1}^\\top r_{k+1}}{z_k^\\top r_k} \\quad \\text{(standard)}.

  The flexible (Polak-Ribiere) form keeps CG well behaved when :math:`M_k` changes between
  steps, as an L-BFGS preconditioner updated within the solve does; for a fixed
  preconditioner both are the same in exact arithmetic.

  The solve stops at the first of: ``max_steps`` steps; Martens' relative-progress rule
  (at step :math:`i`, with :math:`k = \\max(10, \\lceil 0.1 i \\rceil)`, stop when
  :math:`i > k`, :math:`\\phi_i < 0` and :math:`(\\phi_i - \\phi_{i-k}) / \\phi_i < k \\cdot`
  ``tol``); a residual with :math:`\\|r\\| \\le` ``residual_tol`` :math:`\\|b\\|`; a residual at
  round-off, :math:`\\|r\\| \\le` ``residual_floor`` :math:`\\|b\\|`; or a guard:
  :math:`p^\\top A p \\le 0`, :math:`z^\\top r \\le 0`, or a non-finite value, in which case
  the step that would have failed is not taken and ``x`` is the last good iterate.

  The round-off floor is why a solve with ``tol=0`` and ``residual_tol=0`` still ends: an
  exact preconditioner converges in one step, a well-conditioned :math:`n \\times n` system
  within :math:`n`. Both residual tests use the plain norm :math:`\\|r\\|` of the recursively
  updated residual, whatever the preconditioner: rounding errors live in :math:`r` itself
  (the true residual :math:`b - A x` cannot be formed more accurately than
  :math:`\\epsilon \\|b\\|`), and the norm must not move when :math:`M_k` does. Near round-off
  the true residual stalls at its attainable accuracy, :math:`\\epsilon \\|b\\|` for a
  well-conditioned system and up to about :math:`\\epsilon \\kappa(A) \\|b\\|` otherwise,
  while the recursive one keeps falling: the floor holds either way, a few steps past the
  stall for an ill-conditioned system.

  Iterates at steps :math:`\\lceil 1.3^j \\rceil` (and the last one) are recorded with their
  :math:`\\phi` values for Martens' CG backtracking.

  Everything runs inside one ``lax.while_loop``; wrap the call in ``jax.jit`` (with
  ``matvec`` closed over) to compile it.

  Args:
    matvec: ``v -> A v`` on pytrees like ``b``.
    b: right-hand side, any pytree of floating arrays; half-precision leaves are solved in
      float32.
    x0: initial iterate (warm start); zeros when ``None`` (which also saves one matvec).
    preconditioner: ``None``, a callable ``r -> z`` approximating :math:`A^{-1} r`, or an
      :class:`hfjax.LBFGSState`.
    max_steps: step cap, at least 1.
    tol: Martens' :math:`\\epsilon` for the relative-progress rule; 0 disables the rule.
    residual_tol: relative residual tolerance :math:`\\|r\\| / \\|b\\|`; 0 leaves stopping on
      the residual to ``residual_floor``.
    residual_floor: the relative residual at which the solve stops on round-off
      (``CGStopReason.ROUNDOFF`` when ``residual_tol`` is not met yet). ``None`` is
      :math:`16 \\epsilon` of the solve dtype (:math:`1.9 \\cdot 10^{-6}` in float32, also for
      half-precision ``b``; :math:`3.6 \\cdot 10^{-15}` in float64): just above the attainable
      accuracy of a well-conditioned system, so the stop costs nothing in accuracy. With a
      ``matvec`` computed in half precision the true residual stalls far higher; pass, e.g.,
      ``16 * jnp.finfo(jnp.bfloat16).eps``. 0 disables it (stops only on an exactly zero
      residual).
    beta: ``"flexible"`` (Polak-Ribiere) or ``"standard"`` (Fletcher-Reeves form).
    update_preconditioner: with an :class:`hfjax.LBFGSState`: ``True`` adds each step's
      pair :math:`s = \\alpha p`, :math:`y = \\alpha A p` to it as the solve runs (Sainath et
      al.); ``False`` keeps it fixed and collects the pairs in a fresh memory of the same
      size for the next solve (Morales & Nocedal).
    initial_preconditioner: only with an :class:`hfjax.LBFGSState`: the initial matrix
      :math:`H_0` of the L-BFGS approximation as a callable ``v -> H0 v`` (symmetric
      positive definite and fixed within the solve, e.g. a K-FAC inverse), in place of
      :math:`\\gamma I`; ``None`` for :math:`\\gamma I`. Either pair policy works with it.
      It costs one product with :math:`H_0` per step, plus one per stored pair at the start
      (none for an empty memory); not with a state that has an ``initial_diagonal``. The
      returned memory holds the pairs themselves, so the next solve may use another
      :math:`H_0` (:func:`hfjax.lbfgs_apply` takes it as ``initial``).
    num_recorded: slots for recorded iterates; ``None`` keeps all of them. Fewer slots keep
      the newest ones (those backtracking looks at first) and save memory.
    record_base: the base of the recording schedule (1.3 in Martens 2010).
    augment_x0: search along ``x0`` as well (augmented CG; Saad, Yeung, Erhel &
      Guyomarc'h 2000): the solve starts from the multiple of ``x0`` that minimises
      :math:`\\phi` along it, and every direction is kept A-conjugate to ``x0``, so each
      iterate minimises :math:`\\phi` over :math:`\\operatorname{span}\\{x_0\\}` plus the
      preconditioned Krylov space, whatever the scale of the warm start. One step of it is
      K-FAC's adaptive momentum (Martens & Grosse 2015, section 7): the best combination
      of the previous step and the preconditioned gradient. It costs no extra matvec, two
      more vectors and one inner product per step. An ``x0`` of zero, or one along which
      :math:`A` has no positive curvature, is dropped: the solve then starts from 0.

  Returns:
    A :class:`CGResult`.

  Example:

    >>> import jax.numpy as jnp, hfjax
    >>> A = jnp.array([[4.0, 1.0], [1.0, 3.0]])
    >>> result = hfjax.cg(lambda v: A @ v, jnp.array([1.0, 2.0]), residual_tol=1e-6)
    >>> result.x, int(result.num_steps)
    (Array([0.09090909, 0.6363636 ], dtype=float32), 2)

    An L-BFGS preconditioner with a diagonal initial matrix, updated within the solve:

    >>> state = hfjax.lbfgs_init(jnp.zeros(2), memory_size=5)
    >>> h0 = lambda v: v / jnp.diag(A)
    >>> result = hfjax.cg(
    ...     lambda v: A @ v, jnp.array([1.0, 2.0]), preconditioner=state,
    ...     initial_preconditioner=h0, residual_tol=1e-6)
    >>> int(result.num_steps), int(result.preconditioner_state.num_pairs)
    (2, 2)

  References:
    Martens, "Deep learning via Hessian-free optimization", ICML 2010. Notay, "Flexible
    conjugate gradients", SIAM J. Sci. Comput. 2000. Golub & Ye, "Inexact preconditioned
    conjugate gradient method with inner-outer iteration", SIAM J. Sci. Comput. 1999.
    Morales & Nocedal, "Automatic preconditioning by limited memory quasi-Newton updating",
    SIAM J. Optim. 2000.
  """
  _check_arguments(b, max_steps, tol, residual_tol, residual_floor, beta, num_recorded)
  b = as_accumulation(b)
  apply_a = lambda v: optax.tree.cast_like(matvec(v), b)
  precond = _make_preconditioner(preconditioner, update_preconditioner, initial_preconditioner, b)
  next_beta = _BETAS[beta]
  record_mask, slots = _recording_plan(max_steps, record_base, num_recorded)
  residual_stop = _residual_stop(b, residual_tol, residual_floor)

  carry = _start(b, x0, apply_a, precond, residual_stop, max_steps, slots, augment_x0)

  def step(c: _Carry) -> _Carry:
    ap = apply_a(c.p)
    pap = optax.tree.vdot(c.p, ap)
    alpha = c.rz / pap
    ok = jnp.isfinite(pap) & (pap > 0) & jnp.isfinite(alpha)
    alpha = jnp.where(ok, alpha, 0.0)
    x = optax.tree.add_scale(c.x, alpha, c.p)
    r = optax.tree.add_scale(c.r, -alpha, ap)
    s, y = optax.tree.scale(alpha, c.p), optax.tree.scale(alpha, ap)
    precond_state, z = precond.update(c.precond, s, y, r)
    rz, residual_norm = optax.tree.vdot(r, z), jnp.sqrt(optax.tree.vdot(r, r))
    beta_k = next_beta(alpha, z, ap, rz, c.rz)
    i = c.step + 1
    value = jnp.where(ok, _model_value(x, b, r), c.values[c.step])
    values = c.values.at[i].set(value)
    stop = _stop_reason(
      curvature_not_finite=~jnp.isfinite(pap),
      negative_curvature=~ok,
      **residual_stop.reasons(residual_norm),
      not_finite=~jnp.isfinite(rz) | ~jnp.isfinite(beta_k),
      breakdown=rz <= 0,
      stalled=_stalled(values, i, value, tol),
      capped=i >= max_steps,
    )
    # A failed step is not taken: the iterate, residual and step count stay where they were.
    p = optax.tree.add_scale(z, beta_k, c.p)
    new = _Carry(
      x=x,
      r=r,
      p=p if c.search is None else c.search.project(p),
      rz=rz,
      step=jnp.where(ok, i, c.step),
      stop=stop,
      residual_norm=jnp.where(ok, residual_norm, c.residual_norm),
      values=values,
      precond=precond_state,
      recorded=_record(c.recorded, x, i, value, ok & record_mask[i]),
      search=c.search,
    )
    return optax.tree.cast_like(new, c)

  final = jax.lax.while_loop(lambda c: c.stop == 0, step, carry)
  return _finish(final, precond)
