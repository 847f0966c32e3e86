"""Flexible preconditioned conjugate gradients in one ``lax.while_loop``."""

from __future__ import annotations

import enum
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from hfjax._tree import as_accumulation
from hfjax.preconditioners import (
  LBFGSProjections,
  LBFGSState,
  flatten_memory,
  lbfgs_apply,
  lbfgs_init,
  lbfgs_project,
  lbfgs_refresh_products,
  lbfgs_store_pair,
  lbfgs_update_and_apply,
  memory_size,
  unflatten_memory,
)

Preconditioner = Callable[[Any], Any] | LBFGSState | None


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


class CGResult(NamedTuple):
  """The outcome of :func:`cg`.

  Attributes:
    x: the last good iterate (never NaN: a failing step is not taken).
    num_steps: CG steps taken, int32.
    value: the quadratic model :math:`\\phi(x) = \\frac12 x^\\top A x - b^\\top x` at ``x``.
    stop_reason: a :class:`CGStopReason` value, int32.
    residual_norm: :math:`\\|b - A x\\|` (the recursively updated residual).
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


class _Carry(NamedTuple):
  x: Any
  r: Any
  p: Any
  rz: jax.Array
  step: jax.Array
  stop: jax.Array
  residual_norm: jax.Array
  values: jax.Array
  precond: LBFGSState | None
  projections: LBFGSProjections | None  # of r, when L-BFGS is updated within the solve
  pairs: LBFGSState | None
  iterates: Any
  iterate_steps: jax.Array
  iterate_values: jax.Array
  num_recorded: jax.Array


def _record(carry: _Carry, x, step, value, should) -> _Carry:
  """Writes ``x`` into the next slot of the iterate ring buffer when ``should``."""
  slots = carry.iterate_steps.shape[0]
  i = carry.num_recorded % slots

  def write(buffer, v):
    return buffer.at[i].set(jnp.where(should, v, buffer[i]))

  return carry._replace(
    iterates=jax.tree.map(write, carry.iterates, x),
    iterate_steps=write(carry.iterate_steps, step),
    iterate_values=write(carry.iterate_values, value),
    num_recorded=carry.num_recorded + should.astype(jnp.int32),
  )


def cg(
  matvec: Callable[[Any], Any],
  b: Any,
  *,
  x0: Any = None,
  preconditioner: Preconditioner = None,
  max_steps: int = 250,
  tol: float = 5e-4,
  residual_tol: float = 0.0,
  beta: str = "flexible",
  update_preconditioner: bool = True,
  num_recorded: int | None = None,
  record_base: float = 1.3,
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
  ``tol``); a residual with :math:`\\|r\\| \\le` ``residual_tol`` :math:`\\|b\\|`; or a guard:
  :math:`p^\\top A p \\le 0`, :math:`z^\\top r \\le 0`, or a non-finite value, in which case
  the step that would have failed is not taken and ``x`` is the last good iterate.

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
    residual_tol: relative residual tolerance; 0 stops only on an exactly zero residual.
    beta: ``"flexible"`` (Polak-Ribiere) or ``"standard"`` (Fletcher-Reeves form).
    update_preconditioner: with an :class:`hfjax.LBFGSState`: ``True`` adds each step's
      pair :math:`s = \\alpha p`, :math:`y = \\alpha A p` to it as the solve runs (Sainath et
      al.); ``False`` keeps it fixed and collects the pairs in a fresh memory of the same
      size for the next solve (Morales & Nocedal).
    num_recorded: slots for recorded iterates; ``None`` keeps all of them. Fewer slots keep
      the newest ones (those backtracking looks at first) and save memory.
    record_base: the base of the recording schedule (1.3 in Martens 2010).

  Returns:
    A :class:`CGResult`.

  Example:

    >>> import jax.numpy as jnp, hfjax
    >>> A = jnp.array([[4.0, 1.0], [1.0, 3.0]])
    >>> result = hfjax.cg(lambda v: A @ v, jnp.array([1.0, 2.0]), residual_tol=1e-6)
    >>> result.x, int(result.num_steps)
    (Array([0.09090909, 0.6363636 ], dtype=float32), 2)

  References:
    Martens, "Deep learning via Hessian-free optimization", ICML 2010. Notay, "Flexible
    conjugate gradients", SIAM J. Sci. Comput. 2000. Golub & Ye, "Inexact preconditioned
    conjugate gradient method with inner-outer iteration", SIAM J. Sci. Comput. 1999.
    Morales & Nocedal, "Automatic preconditioning by limited memory quasi-Newton updating",
    SIAM J. Optim. 2000.
  """
  if int(max_steps) != max_steps or max_steps < 1:
    raise ValueError(f"max_steps must be an integer >= 1, got {max_steps!r}.")
  if tol < 0 or residual_tol < 0:
    raise ValueError(f"tol and residual_tol must be >= 0, got {tol} and {residual_tol}.")
  if beta not in ("flexible", "standard"):
    raise ValueError(f"beta must be 'flexible' or 'standard', got {beta!r}.")
  if num_recorded is not None and num_recorded < 1:
    raise ValueError(f"num_recorded must be >= 1 or None, got {num_recorded!r}.")
  if not jax.tree.leaves(b):
    raise ValueError("b is empty: it holds no arrays.")

  b = as_accumulation(b)
  dtype = jnp.result_type(*jax.tree.leaves(b))
  apply_a = lambda v: optax.tree.cast_like(matvec(v), b)
  is_lbfgs = isinstance(preconditioner, LBFGSState)
  if is_lbfgs:
    precond_state = flatten_memory(preconditioner)
  elif preconditioner is None or callable(preconditioner):
    precond_state = None
  else:
    raise TypeError(
      "preconditioner must be None, a callable r -> z or an hfjax.LBFGSState; got "
      f"{type(preconditioner).__name__}."
    )

  def precondition(state, r, projections=None):
    if is_lbfgs:
      return lbfgs_apply(state, r, projections)
    if preconditioner is None:
      return r
    return optax.tree.cast_like(preconditioner(r), r)

  schedule = martens_record_steps(max_steps, record_base)
  record_mask = np.zeros(max_steps + 1, dtype=bool)
  record_mask[schedule] = True
  slots = len(schedule) + 1 if num_recorded is None else min(num_recorded, len(schedule) + 1)

  b_norm = jnp.sqrt(optax.tree.vdot(b, b))
  if x0 is None:
    x = optax.tree.zeros_like(b)
    r = b
  else:
    x = optax.tree.cast_like(x0, b)
    r = optax.tree.sub(b, apply_a(x))
  within = is_lbfgs and update_preconditioner
  projections = lbfgs_project(precond_state, r) if within else None
  z = precondition(precond_state, r, projections)
  rz = optax.tree.vdot(r, z)
  rr = optax.tree.vdot(r, r)
  value0 = -0.5 * optax.tree.vdot(x, optax.tree.add(b, r))
  stop = jnp.where(
    rr <= (residual_tol * b_norm) ** 2,
    CGStopReason.RESIDUAL,
    jnp.where(
      ~jnp.isfinite(rz) | ~jnp.isfinite(value0),
      CGStopReason.NON_FINITE,
      jnp.where(rz <= 0, CGStopReason.PRECONDITIONER_BREAKDOWN, 0),
    ),
  ).astype(jnp.int32)
  collect = is_lbfgs and not update_preconditioner
  carry = _Carry(
    x=x,
    r=r,
    p=z,
    rz=rz,
    step=jnp.zeros((), jnp.int32),
    stop=stop,
    residual_norm=jnp.sqrt(rr),
    values=jnp.zeros(max_steps + 1, dtype).at[0].set(jnp.where(jnp.isfinite(value0), value0, 0)),
    precond=precond_state,
    projections=projections,
    pairs=flatten_memory(lbfgs_init(b, memory_size(preconditioner))) if collect else None,
    iterates=jax.tree.map(lambda v: jnp.zeros((slots,) + v.shape, v.dtype), b),
    iterate_steps=jnp.full((slots,), -1, jnp.int32),
    iterate_values=jnp.full((slots,), jnp.inf, dtype),
    num_recorded=jnp.zeros((), jnp.int32),
  )
  record_mask = jnp.asarray(record_mask)

  def cond_fn(c: _Carry):
    return c.stop == 0

  def body_fn(c: _Carry) -> _Carry:
    ap = apply_a(c.p)
    pap = optax.tree.vdot(c.p, ap)
    alpha = c.rz / pap
    ok = jnp.isfinite(pap) & (pap > 0) & jnp.isfinite(alpha)
    alpha = jnp.where(ok, alpha, 0.0)
    x = optax.tree.add_scale(c.x, alpha, c.p)
    r = optax.tree.add_scale(c.r, -alpha, ap)
    s, y = optax.tree.scale(alpha, c.p), optax.tree.scale(alpha, ap)
    precond, projections, pairs = c.precond, c.projections, c.pairs
    if within:
      # y = c.r - r, so the pair's inner products come from the residuals' projections.
      precond, z, projections = lbfgs_update_and_apply(precond, s, y, r, previous=projections)
    else:
      z = precondition(precond, r)
    if collect:
      # The pairs' inner products are taken once, after the solve.
      pairs = lbfgs_store_pair(pairs, s, y)
    rz = optax.tree.vdot(r, z)
    rr = optax.tree.vdot(r, r)
    if beta == "flexible":
      # r - c.r = -alpha A p: no need to keep the old residual alive next to the new one.
      beta_k = -alpha * optax.tree.vdot(z, ap) / c.rz
    else:
      beta_k = rz / c.rz
    p = optax.tree.add_scale(z, beta_k, c.p)

    step = c.step + 1
    value = -0.5 * optax.tree.vdot(x, optax.tree.add(b, r))
    value = jnp.where(ok, value, c.values[c.step])
    values = c.values.at[step].set(value)
    gap = jnp.maximum(10, jnp.ceil(0.1 * step).astype(jnp.int32))
    previous = values[jnp.maximum(step - gap, 0)]
    stalled = (tol > 0) & (step > gap) & (value < 0) & ((value - previous) / value < gap * tol)

    stop = jnp.select(
      [
        ~jnp.isfinite(pap),
        ~ok,
        rr <= (residual_tol * b_norm) ** 2,
        ~jnp.isfinite(rz) | ~jnp.isfinite(beta_k),
        rz <= 0,
        stalled,
        step >= max_steps,
      ],
      [
        CGStopReason.NON_FINITE,
        CGStopReason.NEGATIVE_CURVATURE,
        CGStopReason.RESIDUAL,
        CGStopReason.NON_FINITE,
        CGStopReason.PRECONDITIONER_BREAKDOWN,
        CGStopReason.PROGRESS,
        CGStopReason.MAX_STEPS,
      ],
      0,
    ).astype(jnp.int32)
    # A failed step is not taken: the iterate, residual and step count stay where they were.
    new = c._replace(
      x=x,
      r=r,
      p=p,
      rz=rz,
      step=jnp.where(ok, step, c.step),
      stop=stop,
      residual_norm=jnp.where(ok, jnp.sqrt(rr), c.residual_norm),
      values=values,
      precond=precond,
      projections=projections,
      pairs=pairs,
    )
    new = _record(new, x, step, value, ok & record_mask[step])
    return optax.tree.cast_like(new, c)

  final = jax.lax.while_loop(cond_fn, body_fn, carry)
  last = jnp.maximum(final.num_recorded - 1, 0) % slots
  already = (final.num_recorded > 0) & (final.iterate_steps[last] == final.step)
  value = final.values[final.step]
  final = _record(final, final.x, final.step, value, ~already)
  if collect:
    precond_out = unflatten_memory(lbfgs_refresh_products(final.pairs), b)
  elif is_lbfgs:
    precond_out = unflatten_memory(final.precond, b)
  else:
    precond_out = None
  return CGResult(
    x=final.x,
    num_steps=final.step,
    value=value,
    stop_reason=final.stop,
    residual_norm=final.residual_norm,
    iterates=final.iterates,
    iterate_steps=final.iterate_steps,
    iterate_values=final.iterate_values,
    preconditioner_state=precond_out,
  )
