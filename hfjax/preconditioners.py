"""Preconditioners for :func:`hfjax.cg`: L-BFGS (a pytree state) and diagonal ones.

A preconditioner approximates :math:`(G + \\lambda I)^{-1}`. :func:`hfjax.cg` takes either a
callable ``r -> z`` or an :class:`LBFGSState`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax


def accumulation_dtype(dtype: Any) -> jnp.dtype:
  """The dtype that sums, dot products and stored vectors of ``dtype`` values use.

  Half-precision values (float16, bfloat16) accumulate in float32; wider floats keep their
  own precision.
  """
  return jnp.promote_types(dtype, jnp.float32)


def as_accumulation(tree: Any) -> Any:
  """Casts every leaf of ``tree`` to its :func:`accumulation_dtype`."""
  return jax.tree.map(lambda x: jnp.asarray(x, accumulation_dtype(jnp.result_type(x))), tree)


class LBFGSState(NamedTuple):
  """Memory of an L-BFGS approximation of an inverse curvature matrix.

  The pairs live in a ring buffer with a leading memory axis of size ``m``: slot
  ``next_index`` is written next, overwriting the oldest pair once ``m`` are stored.

  Attributes:
    s_memory: steps :math:`s_j`, a pytree like the parameters with leaves ``(m, ...)``.
    y_memory: curvature images :math:`y_j = A s_j`, same layout.
    sy_memory: :math:`s_j^\\top y_j`, shape ``(m,)``; zero for an empty slot.
    yy_memory: :math:`y_j^\\top y_j`, shape ``(m,)``, for :math:`\\gamma`. Keeping it saves
      reading a slot that was just written, which would make XLA copy the whole memory
      inside a CG loop.
    next_index: slot of the next pair, int32.
    num_pairs: pairs stored, at most ``m``, int32.
    initial_diagonal: optional :math:`H_0` diagonal (a pytree like the parameters) used in
      place of :math:`\\gamma I`; ``None`` for :math:`\\gamma I`.
  """

  s_memory: Any
  y_memory: Any
  sy_memory: jax.Array
  yy_memory: jax.Array
  next_index: jax.Array
  num_pairs: jax.Array
  initial_diagonal: Any = None


def lbfgs_init(
  params: optax.Params, memory_size: int, *, initial_diagonal: Any = None
) -> LBFGSState:
  """An empty L-BFGS memory for vectors shaped like ``params``.

  Args:
    params: a pytree that fixes the vector layout; half-precision leaves are stored in float32.
    memory_size: the number ``m`` of pairs kept, at least 1.
    initial_diagonal: optional diagonal :math:`H_0` (pytree like ``params``, positive), e.g.
      the inverse of Martens' diagonal preconditioner, used instead of :math:`\\gamma I`.

  Returns:
    An :class:`LBFGSState` with no pairs; :func:`lbfgs_apply` is then :math:`H_0`.
  """
  if int(memory_size) != memory_size or memory_size < 1:
    raise ValueError(f"memory_size must be an integer >= 1, got {memory_size!r}.")
  dtype_of = lambda x: accumulation_dtype(jnp.result_type(x))
  memory = lambda: jax.tree.map(
    lambda x: jnp.zeros((memory_size,) + jnp.shape(x), dtype_of(x)), params
  )
  leaves = jax.tree.leaves(params)
  scalar_dtype = jnp.result_type(*[dtype_of(x) for x in leaves]) if leaves else jnp.float32
  if initial_diagonal is not None:
    initial_diagonal = optax.tree.cast_like(as_accumulation(initial_diagonal), memory_like(params))
  return LBFGSState(
    s_memory=memory(),
    y_memory=memory(),
    sy_memory=jnp.zeros((memory_size,), scalar_dtype),
    yy_memory=jnp.zeros((memory_size,), scalar_dtype),
    next_index=jnp.zeros((), jnp.int32),
    num_pairs=jnp.zeros((), jnp.int32),
    initial_diagonal=initial_diagonal,
  )


def memory_like(params: Any) -> Any:
  """Zeros shaped like ``params`` in the dtypes the L-BFGS memory stores them in."""
  return jax.tree.map(
    lambda x: jnp.zeros(jnp.shape(x), accumulation_dtype(jnp.result_type(x))), params
  )


def memory_size(state: LBFGSState) -> int:
  """The number of slots ``m`` of an L-BFGS memory (a static Python int)."""
  return state.sy_memory.shape[0]


def all_finite(tree: Any) -> jax.Array:
  """Whether every value of every leaf of ``tree`` is finite (``True`` for no leaves)."""
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def lbfgs_update(state: LBFGSState, s: Any, y: Any) -> LBFGSState:
  """Stores the pair ``(s, y)``, unless :math:`s^\\top y \\le 0` or a value is not finite.

  A skipped pair leaves ``state`` unchanged, which keeps the approximation positive definite.

  Args:
    state: the memory.
    s: a step, pytree like the parameters.
    y: its curvature image :math:`A s`.

  Returns:
    The updated memory (the oldest pair is overwritten once the memory is full).
  """
  slot = jax.tree.map(lambda x: x[0], state.s_memory)
  s, y = optax.tree.cast_like(s, slot), optax.tree.cast_like(y, slot)
  sy = optax.tree.vdot(s, y).astype(state.sy_memory.dtype)
  yy = optax.tree.vdot(y, y).astype(state.sy_memory.dtype)
  accept = jnp.isfinite(sy) & (sy > 0) & jnp.isfinite(yy) & all_finite(s) & all_finite(y)
  i = state.next_index
  m = memory_size(state)

  def write(memory, value):
    return memory.at[i].set(jnp.where(accept, value, memory[i]))

  return state._replace(
    s_memory=jax.tree.map(write, state.s_memory, s),
    y_memory=jax.tree.map(write, state.y_memory, y),
    sy_memory=write(state.sy_memory, sy),
    yy_memory=write(state.yy_memory, yy),
    next_index=jnp.where(accept, (i + 1) % m, i).astype(jnp.int32),
    num_pairs=jnp.where(accept, jnp.minimum(state.num_pairs + 1, m), state.num_pairs).astype(
      jnp.int32
    ),
  )


def lbfgs_apply(state: LBFGSState, v: Any) -> Any:
  """Applies the L-BFGS inverse approximation :math:`H v` by the two-loop recursion.

  With pairs :math:`(s_j, y_j)`, :math:`\\rho_j = 1 / s_j^\\top y_j`, the recursion applies

  .. math::

    H_{j+1} = (I - \\rho_j s_j y_j^\\top) H_j (I - \\rho_j y_j s_j^\\top)
      + \\rho_j s_j s_j^\\top

  from :math:`H_0 = \\gamma I`, :math:`\\gamma = s^\\top y / y^\\top y` of the newest pair
  (or the state's ``initial_diagonal``), without forming a matrix (Nocedal & Wright,
  Algorithm 7.4). An empty memory gives :math:`H_0 v` (the identity with no diagonal).

  Args:
    state: the memory.
    v: a pytree like the parameters.

  Returns:
    :math:`H v`, with the structure and dtypes of ``v``.

  References:
    Nocedal, "Updating quasi-Newton matrices with limited storage", Math. Comp. 1980.
  """
  m = memory_size(state)
  q0 = optax.tree.cast_like(v, memory_like(v))
  # Newest to oldest: slots next_index-1, next_index-2, ... Empty slots have sy = 0 and
  # contribute nothing (their coefficients are zero).
  order = (state.next_index - 1 - jnp.arange(m)) % m
  safe_sy = jnp.where(state.sy_memory > 0, state.sy_memory, 1.0)
  rho = jnp.where(state.sy_memory > 0, 1.0 / safe_sy, 0.0)

  def take(memory, j):
    return jax.tree.map(lambda x: x[j], memory)

  def first_loop(q, j):
    alpha = rho[j] * optax.tree.vdot(take(state.s_memory, j), q)
    return optax.tree.add_scale(q, -alpha, take(state.y_memory, j)), alpha

  q, alphas = jax.lax.scan(first_loop, q0, order)

  if state.initial_diagonal is not None:
    r = jax.tree.map(jnp.multiply, state.initial_diagonal, q)
  else:
    newest = order[0]
    yy = state.yy_memory[newest]
    gamma = jnp.where(
      (state.num_pairs > 0) & (yy > 0), state.sy_memory[newest] / jnp.where(yy > 0, yy, 1.0), 1.0
    )
    r = optax.tree.scale(gamma.astype(state.sy_memory.dtype), q)

  def second_loop(r, xs):
    j, alpha = xs
    beta = rho[j] * optax.tree.vdot(take(state.y_memory, j), r)
    return optax.tree.add_scale(r, alpha - beta, take(state.s_memory, j)), None

  r, _ = jax.lax.scan(second_loop, r, (order[::-1], alphas[::-1]))
  return optax.tree.cast_like(r, v)


def diagonal_preconditioner(diagonal: Any, damping: float | jax.Array, exponent: float = 0.75):
  """The diagonal preconditioner :math:`z = r / (\\max(d, 0) + \\lambda)^{\\alpha}`.

  With ``diagonal`` :math:`d = \\frac1n \\sum_i g_i^2` (:func:`hfjax.squared_gradient_sum`)
  it is Martens' (2010) preconditioner; with the Rademacher estimate of
  :math:`\\operatorname{diag}(J^\\top H_L J)` (:func:`hfjax.gauss_newton_diagonal_estimate`)
  it is Chapelle & Erhan's (2011) Jacobi preconditioner.

  Args:
    diagonal: pytree like the parameters.
    damping: the Levenberg-Marquardt :math:`\\lambda` (> 0 keeps it invertible).
    exponent: :math:`\\alpha`, 0.75 in both papers.

  Returns:
    A callable ``r -> z`` with the structure and dtypes of ``r``.
  """
  inverse = jax.tree.map(
    lambda d: (jnp.maximum(d, 0) + damping) ** (-exponent), as_accumulation(diagonal)
  )

  def apply(r):
    return optax.tree.cast_like(jax.tree.map(jnp.multiply, inverse, r), r)

  return apply
