"""Tree and dtype helpers shared by the solver, the preconditioners and the optimizer."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

HIGHEST = jax.lax.Precision.HIGHEST


def accumulation_dtype(dtype: Any) -> jnp.dtype:
  """The dtype that sums, dot products and stored vectors of ``dtype`` values use.

  Half-precision values (float16, bfloat16) accumulate in float32; wider floats keep their
  own precision.
  """
  return jnp.promote_types(dtype, jnp.float32)


def as_accumulation(tree: Any) -> Any:
  """Casts every leaf of ``tree`` to its :func:`accumulation_dtype`."""
  return jax.tree.map(lambda x: jnp.asarray(x, accumulation_dtype(jnp.result_type(x))), tree)


def all_finite(tree: Any) -> jax.Array:
  """Whether every value of every leaf of ``tree`` is finite (``True`` for no leaves)."""
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def finite_or(value: jax.Array, fallback: Any) -> jax.Array:
  """``value`` where it is finite, else ``fallback``."""
  return jnp.where(jnp.isfinite(value), value, fallback)
