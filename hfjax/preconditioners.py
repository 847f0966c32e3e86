"""Preconditioners for :func:`hfjax.cg`: L-BFGS (a pytree state) and diagonal ones.

A preconditioner approximates :math:`(G + \\lambda I)^{-1}`. :func:`hfjax.cg` takes either a
callable ``r -> z`` or an :class:`LBFGSState`, whose initial matrix may be a callable too.

:mod:`hfjax` exports the L-BFGS state and :func:`lbfgs_init`, :func:`lbfgs_update`,
:func:`lbfgs_apply`; the rest (projections, pair storage without products, the memory
:func:`hfjax.cg` carries through a solve) is internal to the library and used from here.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from hfjax._tree import HIGHEST, accumulation_dtype, all_finite, as_accumulation


class LBFGSState(NamedTuple):
  """Memory of an L-BFGS approximation of an inverse curvature matrix.

  The pairs live in a ring buffer with a leading memory axis of size ``m``: slot
  ``next_index`` is written next, overwriting the oldest pair once ``m`` are stored. Beside
  the pairs the state keeps their inner products, which is what lets :func:`lbfgs_apply`
  use the compact representation: two passes over the memory per product instead of ``2m``
  dependent ones.

  Attributes:
    s_memory: steps :math:`s_j`, a pytree like the parameters with leaves ``(m, ...)``.
    y_memory: curvature images :math:`y_j = A s_j`, same layout.
    sy_products: :math:`s_i^\\top y_j` for slots ``i, j``, shape ``(m, m)``, kept where
      pair ``j`` was stored no earlier than pair ``i`` (the entries the compact form reads;
      the others may be stale). Empty slots have zero rows and columns, so the diagonal is
      positive exactly on stored pairs.
    yy_products: :math:`y_i^\\top D y_j` for all slots, shape ``(m, m)``, with :math:`D`
      the ``initial_diagonal`` (the identity when there is none).
    next_index: slot of the next pair, int32.
    num_pairs: pairs stored, at most ``m``, int32.
    initial_diagonal: optional :math:`H_0` diagonal (a pytree like the parameters) used in
      place of :math:`\\gamma I`; ``None`` for :math:`\\gamma I`.
  """

  s_memory: Any
  y_memory: Any
  sy_products: jax.Array
  yy_products: jax.Array
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
    sy_products=jnp.zeros((memory_size, memory_size), scalar_dtype),
    yy_products=jnp.zeros((memory_size, memory_size), scalar_dtype),
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
  return state.sy_products.shape[0]


def flatten_memory(state: LBFGSState) -> LBFGSState:
  """The same memory with each leaf stored as ``(m, size)`` instead of ``(m, *shape)``.

  Every L-BFGS function takes either layout. Inside a ``lax.while_loop`` that writes the
  memory and reads it in the same step (:func:`hfjax.cg` updating the preconditioner
  within the solve), the flat layout lets XLA update the memory in place: with a leaf of
  two or more dimensions it copies the whole memory every step instead.
  """
  flat = lambda memory: jax.tree.map(lambda x: x.reshape(x.shape[0], -1), memory)
  return state._replace(s_memory=flat(state.s_memory), y_memory=flat(state.y_memory))


def unflatten_memory(state: LBFGSState, like: Any) -> LBFGSState:
  """Undoes :func:`flatten_memory`: memory leaves ``(m, *shape)`` for the leaves of ``like``."""
  shaped = lambda memory: jax.tree.map(
    lambda x, v: x.reshape((x.shape[0],) + jnp.shape(v)), memory, like
  )
  return state._replace(s_memory=shaped(state.s_memory), y_memory=shaped(state.y_memory))


def _project(memory: Any, v: Any) -> jax.Array:
  """The inner products of every slot of ``memory`` with ``v``, shape ``(m,)``.

  One matrix-vector product per leaf: XLA's CPU backend reads the memory at full bandwidth
  for those, and several times slower for a product with a few stacked vectors.
  """

  def leaf(stored, x):
    axes = tuple(range(1, stored.ndim))
    x = x.reshape(stored.shape[1:]).astype(stored.dtype)
    return jnp.tensordot(stored, x, axes=(axes, tuple(range(x.ndim))), precision=HIGHEST)

  return functools.reduce(jnp.add, jax.tree.leaves(jax.tree.map(leaf, memory, v)))


def _inner_products(memory: Any, other: Any) -> jax.Array:
  """:math:`[\\langle a_i, b_j \\rangle]` over the slots of two stacked memories, ``(m, k)``."""
  return jax.vmap(lambda b: _project(memory, b), out_axes=1)(other)


def _combine(memory: Any, coefficients: jax.Array, like: Any) -> Any:
  """:math:`\\sum_j c_j` ``memory[j]``, shaped like ``like``."""
  return jax.tree.map(
    lambda stored, v: jnp.tensordot(
      coefficients.astype(stored.dtype), stored, 1, precision=HIGHEST
    ).reshape(jnp.shape(v)),
    memory,
    like,
  )


def _times_diagonal(state: LBFGSState, v: Any) -> Any:
  """:math:`D v`, with :math:`D` the state's ``initial_diagonal`` or the identity."""
  if state.initial_diagonal is None:
    return v
  return jax.tree.map(lambda d, x: d.reshape(jnp.shape(x)) * x, state.initial_diagonal, v)


class LBFGSProjections(NamedTuple):
  """The inner products of a vector :math:`v` with the stored pairs, slot by slot.

  Attributes:
    s_v: :math:`S^\\top v`, shape ``(m,)``.
    y_dv: :math:`Y^\\top D v`, shape ``(m,)``, :math:`D` the ``initial_diagonal`` or the
      identity; over a memory prepared for a callable :math:`H_0` (:func:`_with_initial`),
      :math:`(H_0 Y)^\\top v = Y^\\top H_0 v`.
  """

  s_v: jax.Array
  y_dv: jax.Array


def lbfgs_project(state: LBFGSState, v: Any) -> LBFGSProjections:
  """:math:`S^\\top v` and :math:`Y^\\top D v`: one pass over each half of the memory.

  :func:`lbfgs_apply` needs them; computing them apart lets a caller reuse them (see
  :func:`lbfgs_update_and_apply`).
  """
  q = optax.tree.cast_like(v, memory_like(v))
  return LBFGSProjections(
    s_v=_project(state.s_memory, q), y_dv=_project(state.y_memory, _times_diagonal(state, q))
  )


def _times_initial(initial: Callable[[Any], Any], v: Any) -> Any:
  """:math:`H_0 v` for a callable :math:`H_0`, in the dtypes of ``v``."""
  return optax.tree.cast_like(initial(v), v)


def _map_stored(fn: Callable[[Any], Any], state: LBFGSState, memory: Any) -> Any:
  """``fn`` of every slot of ``memory`` that holds a pair, zeros for an empty slot.

  One slot at a time, skipping empty ones: nothing to do for an empty memory, and no
  product of two stacked memories, which XLA's CPU backend runs slower than ``m``
  matrix-vector products.
  """

  def one(slot_and_stored):
    slot, stored = slot_and_stored
    empty = lambda x: jax.tree.map(
      lambda out: jnp.zeros(out.shape, out.dtype), jax.eval_shape(fn, x)
    )
    return jax.lax.cond(stored, fn, empty, slot)

  return jax.lax.map(one, (memory, jnp.diagonal(state.sy_products) > 0))


def _with_initial(state: LBFGSState, initial: Callable[[Any], Any], like: Any) -> LBFGSState:
  """The memory as the compact form reads it with a callable :math:`H_0`.

  :math:`H = H_0 + [S, H_0 Y]\\, W\\, [S, H_0 Y]^\\top` needs :math:`H_0 Y`, never
  :math:`Y` itself: the returned state holds :math:`H_0 y_j` in ``y_memory`` and
  :math:`y_i^\\top H_0 y_j` in ``yy_products``, at the cost of one :math:`H_0` product and
  one pass over the memory per stored pair. Its :func:`lbfgs_project` gives
  :math:`Y^\\top H_0 v`.
  """
  if state.initial_diagonal is not None:
    raise ValueError(
      "an L-BFGS state with an initial_diagonal takes no callable initial matrix as well; "
      "give one of them."
    )

  def times_initial(y):
    # Each y_j is shaped like ``like`` for ``initial``, whatever the memory's layout.
    shaped = jax.tree.map(lambda x, v: x.reshape(jnp.shape(v)), y, like)
    return jax.tree.map(lambda h, x: h.reshape(x.shape), _times_initial(initial, shaped), y)

  h0_y = _map_stored(times_initial, state, state.y_memory)
  yy = _map_stored(functools.partial(_project, state.y_memory), state, h0_y)
  return state._replace(y_memory=h0_y, yy_products=yy.T.astype(state.yy_products.dtype))


class _Pair(NamedTuple):
  """A pair offered to the memory, in the memory's dtypes, and where it went.

  ``h0_y`` is :math:`H_0 y` for a memory prepared for a callable :math:`H_0`, which stores it
  in place of ``y``; ``None`` otherwise.
  """

  s: Any
  y: Any
  h0_y: Any
  sy: jax.Array
  ydy: jax.Array
  accept: jax.Array
  slot: jax.Array


def _offer(state: LBFGSState, s: Any, y: Any, h0_y: Any = None) -> _Pair:
  """``(s, y)`` in the memory's dtypes, whether it is acceptable, and the slot it would take."""
  dtypes = jax.tree.map(lambda x: x.dtype, state.s_memory)
  s, y = jax.tree.map(jnp.asarray, s, dtypes), jax.tree.map(jnp.asarray, y, dtypes)
  if h0_y is None:
    dy = _times_diagonal(state, y)
  else:
    h0_y = dy = jax.tree.map(jnp.asarray, h0_y, dtypes)
  sy, ydy = optax.tree.vdot(s, y), optax.tree.vdot(y, dy)
  accept = jnp.isfinite(sy) & (sy > 0) & jnp.isfinite(ydy) & all_finite(s) & all_finite(y)
  return _Pair(s, y, h0_y, sy, ydy, accept, state.next_index)


def _write(memory: Any, pair: _Pair, value: Any) -> Any:
  """``value`` written into slot ``pair.slot`` of ``memory`` when the pair is accepted."""

  def write(stored, v):
    # A rejected pair goes to slot m, out of bounds, and is dropped: selecting between the
    # new and the old slot instead would read the old slot into a buffer of its own.
    target = jnp.where(pair.accept, pair.slot, stored.shape[0])
    return stored.at[target].set(v.reshape(stored.shape[1:]), mode="drop")

  return jax.tree.map(write, memory, value)


def _store(state: LBFGSState, pair: _Pair) -> LBFGSState:
  """Writes an accepted pair into its slot; the products are left as they are."""
  i, accept, m = pair.slot, pair.accept, memory_size(state)
  return state._replace(
    s_memory=_write(state.s_memory, pair, pair.s),
    y_memory=_write(state.y_memory, pair, pair.y if pair.h0_y is None else pair.h0_y),
    next_index=jnp.where(accept, (i + 1) % m, i).astype(jnp.int32),
    num_pairs=jnp.where(accept, jnp.minimum(state.num_pairs + 1, m), state.num_pairs).astype(
      jnp.int32
    ),
  )


def _set_products(state: LBFGSState, pair: _Pair, s_y: jax.Array, y_dy: jax.Array) -> LBFGSState:
  """Column ``pair.slot`` of the products (and that row of the symmetric ``yy_products``).

  ``s_y`` is :math:`S^\\top y` and ``y_dy`` is :math:`Y^\\top D y` over the memory as it
  was before the write; the pair's own entry comes from ``pair``.
  """
  i = pair.slot

  def column(products, values, own):
    values = values.astype(products.dtype).at[i].set(own.astype(products.dtype))
    return jnp.where(pair.accept, products.at[:, i].set(values), products), values

  sy_products, _ = column(state.sy_products, s_y, pair.sy)
  yy_products, values = column(state.yy_products, y_dy, pair.ydy)
  yy_products = jnp.where(pair.accept, yy_products.at[i, :].set(values), yy_products)
  return state._replace(sy_products=sy_products, yy_products=yy_products)


def lbfgs_update(state: LBFGSState, s: Any, y: Any) -> LBFGSState:
  """Stores the pair ``(s, y)``, unless :math:`s^\\top y \\le 0` or a value is not finite.

  A skipped pair leaves ``state`` unchanged, which keeps the approximation positive definite.
  Storing a pair also takes its inner products with the stored pairs (one pass over the
  memory), which :func:`lbfgs_apply` uses.

  Args:
    state: the memory.
    s: a step, pytree like the parameters.
    y: its curvature image :math:`A s`.

  Returns:
    The updated memory (the oldest pair is overwritten once the memory is full).
  """
  pair = _offer(state, s, y)
  products = lbfgs_project(state, pair.y)
  return _set_products(_store(state, pair), pair, products.s_v, products.y_dv)


def lbfgs_store_pair(state: LBFGSState, s: Any, y: Any) -> LBFGSState:
  """Stores ``(s, y)`` like :func:`lbfgs_update`, but without taking its inner products.

  For collecting many pairs at the cost of a write each (:func:`hfjax.cg` does, with a
  fixed preconditioner): the state is not ready for :func:`lbfgs_apply` until
  :func:`lbfgs_refresh_products` has run.
  """
  return _store(state, _offer(state, s, y))


def lbfgs_refresh_products(state: LBFGSState) -> LBFGSState:
  """Takes the inner products of all stored pairs afresh (after :func:`lbfgs_store_pair`)."""
  dy_memory = jax.vmap(functools.partial(_times_diagonal, state))(state.y_memory)
  return state._replace(
    sy_products=_inner_products(state.s_memory, state.y_memory).astype(state.sy_products.dtype),
    yy_products=_inner_products(state.y_memory, dy_memory).astype(state.yy_products.dtype),
  )


def _newest_gamma(state: LBFGSState) -> jax.Array:
  """:math:`\\gamma = s^\\top y / y^\\top y` of the newest pair; 1 while there is none."""
  newest = (state.next_index - 1) % memory_size(state)
  sy_newest, yy_newest = state.sy_products[newest, newest], state.yy_products[newest, newest]
  ok = (sy_newest > 0) & (yy_newest > 0)
  return jnp.where(ok, sy_newest / jnp.where(ok, yy_newest, 1.0), 1.0)


def _apply_projected(
  state: LBFGSState, v: Any, projections: LBFGSProjections, h0_v: Any = None
) -> Any:
  """:math:`H v` from :math:`S^\\top v` and :math:`Y^\\top D v` (see :func:`lbfgs_apply`).

  With ``h0_v`` (:math:`H_0 v` for a callable :math:`H_0`), ``state`` is a memory prepared
  by :func:`_with_initial` and there is no :math:`\\gamma` scaling.
  """
  s_v, y_dv = projections
  m = memory_size(state)
  # Oldest slot first; while the memory is not full, its empty slots come first.
  order = (state.next_index + jnp.arange(m)) % m
  sy = state.sy_products[order][:, order]
  sy_diagonal = jnp.diagonal(sy)
  valid = sy_diagonal > 0
  both = valid[:, None] & valid[None, :]
  # R = the upper triangle of S^T Y in time order; an empty slot gets a unit diagonal entry
  # and nothing else, so its coefficients come out zero.
  r = jnp.where(both, jnp.triu(sy), 0) + jnp.diag((~valid).astype(sy.dtype))
  if h0_v is None and state.initial_diagonal is None:
    scale = _newest_gamma(state)
  else:
    scale = jnp.ones((), sy.dtype)
  ydy = scale * jnp.where(both, state.yy_products[order][:, order], 0)
  a = jnp.where(valid, s_v[order].astype(sy.dtype), 0)
  c = scale * jnp.where(valid, y_dv[order].astype(sy.dtype), 0)
  minus_u2 = jax.scipy.linalg.solve_triangular(r, a, lower=False)
  t = jnp.where(valid, sy_diagonal, 0) * minus_u2 + jnp.matmul(ydy, minus_u2, precision=HIGHEST)
  u1 = jax.scipy.linalg.solve_triangular(r, t - c, lower=False, trans="T")
  # Back from time order to slots.
  u1 = jnp.zeros_like(u1).at[order].set(u1)
  u2 = jnp.zeros_like(minus_u2).at[order].set(-minus_u2)
  if h0_v is not None:
    # H v = H0 v + (H0 Y) u2 + S u1, with H0 Y stored in place of Y.
    h0_part = optax.tree.add(h0_v, _combine(state.y_memory, u2, v))
    return optax.tree.add(_combine(state.s_memory, u1, v), h0_part)
  # H v = H0 (v + Y u2) + S u1 with H0 = scale * D.
  h0_part = _times_diagonal(state, optax.tree.add(v, _combine(state.y_memory, u2, v)))
  return optax.tree.add_scale(_combine(state.s_memory, u1, v), scale, h0_part)


def _apply(state: LBFGSState, v: Any, initial: Callable[[Any], Any] | None = None) -> Any:
  """:math:`H v`; with ``initial``, ``state`` is already prepared by :func:`_with_initial`."""
  q = optax.tree.cast_like(v, memory_like(v))
  h0_q = None if initial is None else _times_initial(initial, q)
  return optax.tree.cast_like(_apply_projected(state, q, lbfgs_project(state, q), h0_q), v)


def _check_initial(initial: Any) -> None:
  if initial is not None and not callable(initial):
    raise TypeError(
      f"the initial matrix must be a callable v -> H0 v or None, got {type(initial).__name__}."
    )


def lbfgs_apply(state: LBFGSState, v: Any, *, initial: Callable[[Any], Any] | None = None) -> Any:
  """Applies the L-BFGS inverse approximation :math:`H v`.

  With pairs :math:`(s_j, y_j)`, :math:`\\rho_j = 1 / s_j^\\top y_j`, :math:`H` is the
  result of the BFGS inverse recursion

  .. math::

    H_{j+1} = (I - \\rho_j s_j y_j^\\top) H_j (I - \\rho_j y_j s_j^\\top)
      + \\rho_j s_j s_j^\\top

  over the stored pairs, oldest first (the matrix the two-loop recursion of Nocedal & Wright,
  Algorithm 7.4, applies), from :math:`H_0 = \\gamma I`, :math:`\\gamma = s^\\top y / y^\\top
  y` of the newest pair; or :math:`H_0 = D`, the state's ``initial_diagonal``; or the
  symmetric positive definite matrix ``initial`` applies. It is applied in the compact form
  of Byrd, Nocedal & Schnabel,

  .. math::

    H v = H_0 v + S u_1 + H_0 Y u_2, \\quad u_2 = -R^{-1} S^\\top v, \\quad
    u_1 = R^{-\\top} \\left((\\Delta + Y^\\top H_0 Y) R^{-1} S^\\top v - Y^\\top H_0 v\\right),

  with :math:`S, Y` the stored pairs as columns, :math:`R` the upper triangle of
  :math:`S^\\top Y` and :math:`\\Delta` its diagonal (both kept in the state): one pass over
  the memory for :math:`S^\\top v, Y^\\top H_0 v` and one for the sums, each a matrix
  product, where the two-loop recursion makes :math:`2m` dependent passes. An empty memory
  gives :math:`H_0 v` (the identity with neither a diagonal nor ``initial``).

  Args:
    state: the memory.
    v: a pytree like the parameters.
    initial: optional :math:`H_0` as a callable ``v -> H0 v`` (symmetric positive definite,
      e.g. a K-FAC inverse), used instead of :math:`\\gamma I`; not with an
      ``initial_diagonal``. It costs ``m + 1`` products with :math:`H_0` (for
      :math:`H_0 Y` and :math:`H_0 v`); :func:`hfjax.cg` forms :math:`H_0 Y` once per solve.

  Returns:
    :math:`H v`, with the structure and dtypes of ``v``.

  References:
    Nocedal, "Updating quasi-Newton matrices with limited storage", Math. Comp. 1980.
    Byrd, Nocedal & Schnabel, "Representations of quasi-Newton matrices and their use in
    limited memory methods", Math. Program. 1994.
  """
  _check_initial(initial)
  if initial is not None:
    state = _with_initial(state, initial, v)
  return _apply(state, v, initial)


def lbfgs_operator(
  state: LBFGSState, like: Any, initial: Callable[[Any], Any] | None = None
) -> Callable[[Any], Any]:
  """``v -> H v`` for many products with one memory (a fixed preconditioner in :func:`hfjax.cg`).

  The memory is laid out flat (:func:`flatten_memory`) and, with a callable ``initial``,
  prepared (:math:`H_0 Y`, :math:`Y^\\top H_0 Y`) once, here; each product then costs one
  :math:`H_0` product and two passes over the memory.
  """
  _check_initial(initial)
  memory = flatten_memory(state)
  if initial is not None:
    memory = _with_initial(memory, initial, like)
  return lambda v: _apply(memory, v, initial)


def _update_and_apply(
  state: LBFGSState,
  pair: _Pair,
  v: Any,
  previous: LBFGSProjections | None,
  h0_v: Any = None,
) -> tuple[LBFGSState, Any, LBFGSProjections]:
  """Stores ``pair`` with its inner products, then :math:`H v` (see
  :func:`lbfgs_update_and_apply`; ``v`` in the memory's dtypes)."""
  if previous is None:
    products = lbfgs_project(state, pair.y)
  updated = _store(state, pair)
  projections = lbfgs_project(updated, v)
  if previous is not None:
    # Slots other than the new pair's hold the same vectors before and after the write.
    products = LBFGSProjections(
      s_v=previous.s_v - projections.s_v, y_dv=previous.y_dv - projections.y_dv
    )
  updated = _set_products(updated, pair, products.s_v, products.y_dv)
  return updated, _apply_projected(updated, v, projections, h0_v), projections


def lbfgs_update_and_apply(
  state: LBFGSState, s: Any, y: Any, v: Any, previous: LBFGSProjections | None = None
) -> tuple[LBFGSState, Any, LBFGSProjections]:
  """:func:`lbfgs_update` with ``(s, y)``, then :func:`lbfgs_apply` to ``v``.

  With ``previous``, the :func:`lbfgs_project` of a vector :math:`u` with :math:`y = u - v`
  over ``state`` (in CG: the last residual, since :math:`r_{k+1} = r_k - \\alpha A p`), the
  pair's inner products come out of :math:`S^\\top u - S^\\top v` and
  :math:`Y^\\top D u - Y^\\top D v` and cost no pass over the memory: the update then costs
  what a fixed preconditioner does, two passes over the memory per step.

  Args:
    state: the memory.
    s: a step, pytree like the parameters.
    y: its curvature image :math:`A s`.
    v: the vector to apply the updated approximation to.
    previous: optional projections as above.

  Returns:
    The updated state, :math:`H v` (structure and dtypes of ``v``) and the projections of
    ``v`` over the updated memory (the ``previous`` of the next call).
  """
  pair = _offer(state, s, y)
  q = optax.tree.cast_like(v, pair.s)
  updated, hv, projections = _update_and_apply(state, pair, q, previous)
  return updated, optax.tree.cast_like(hv, v), projections


class LBFGSInSolve(NamedTuple):
  """An L-BFGS memory that takes in the pairs of a CG solve as it runs.

  Attributes:
    memory: the pairs, flat (:func:`flatten_memory`); with a callable :math:`H_0`, prepared
      by :func:`_with_initial` (``y_memory`` holds :math:`H_0 y_j`).
    projections: :func:`lbfgs_project` of the current residual over ``memory``.
    y_memory: with a callable :math:`H_0`, the :math:`y_j` themselves (what the returned
      state holds); ``None`` otherwise.
    h0_r: with a callable :math:`H_0`, :math:`H_0 r` of the current residual; ``None``
      otherwise.
  """

  memory: LBFGSState
  projections: LBFGSProjections
  y_memory: Any
  h0_r: Any


def lbfgs_in_solve_init(
  state: LBFGSState, r: Any, initial: Callable[[Any], Any] | None = None
) -> tuple[LBFGSInSolve, Any]:
  """The memory of a solve that adds each CG step's pair to ``state``, and :math:`H r_0`."""
  _check_initial(initial)
  memory, y_memory, h0_r = flatten_memory(state), None, None
  if initial is not None:
    y_memory = memory.y_memory
    memory = _with_initial(memory, initial, r)
    h0_r = _times_initial(initial, r)
  projections = lbfgs_project(memory, r)
  q = optax.tree.cast_like(r, memory_like(r))
  z = optax.tree.cast_like(_apply_projected(memory, q, projections, h0_r), r)
  return LBFGSInSolve(memory, projections, y_memory, h0_r), z


def lbfgs_in_solve_step(
  solve: LBFGSInSolve, s: Any, y: Any, r: Any, initial: Callable[[Any], Any] | None = None
) -> tuple[LBFGSInSolve, Any]:
  """Adds the pair ``(s, y)`` of a CG step, then :math:`H r` for the new residual ``r``.

  CG's pair has :math:`y = r_{k} - r_{k+1}`, so its inner products with the memory come
  from the residuals' projections (:func:`lbfgs_update_and_apply`) and, with a callable
  :math:`H_0`, :math:`H_0 y = H_0 r_k - H_0 r_{k+1}` from the :math:`H_0 r` that each step
  computes anyway: one :math:`H_0` product per step.
  """
  h0_r = None if initial is None else _times_initial(initial, r)
  h0_y = None if initial is None else optax.tree.sub(solve.h0_r, h0_r)
  pair = _offer(solve.memory, s, y, h0_y)
  q = optax.tree.cast_like(r, pair.s)
  memory, z, projections = _update_and_apply(solve.memory, pair, q, solve.projections, h0_r)
  y_memory = None if solve.y_memory is None else _write(solve.y_memory, pair, pair.y)
  return LBFGSInSolve(memory, projections, y_memory, h0_r), optax.tree.cast_like(z, r)


def lbfgs_in_solve_finish(solve: LBFGSInSolve, like: Any) -> LBFGSState:
  """The memory after the solve, laid out like ``like``, holding the pairs themselves."""
  memory = solve.memory
  if solve.y_memory is not None:
    # Back from H0 y to y: the next solve may start from another H0, or from gamma I.
    yy = _map_stored(functools.partial(_project, solve.y_memory), memory, solve.y_memory)
    yy = yy.T.astype(memory.yy_products.dtype)
    memory = memory._replace(y_memory=solve.y_memory, yy_products=yy)
  return unflatten_memory(memory, like)


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
