"""Matrix products on rounded operands: a function's dots in a lower precision.

A curvature-vector product only has to be accurate to the curvature model's own error: the
Gauss-Newton matrix of one minibatch, truncated CG and the damping are far cruder than the
float32 round-off of its matrix products. :func:`reduced_precision_dots` evaluates a
function with every floating ``dot_general`` computed on operands rounded to a narrower
dtype (``bfloat16``) and accumulated in the operands' own dtype, as mixed-precision training
computes its matrix products; everything else (the elementwise derivatives, the reductions,
the vectors CG keeps) stays as it is.

Where the hardware multiplies bfloat16 natively (CPUs with AVX512-BF16 or AMX, GPUs with
bfloat16 tensor cores) such a product costs much less than a float32 one; on this project's
CPU a Gauss-Newton product took 0.68 of the time (``benchmarks/RESULTS.md``). XLA's own
precision settings (``jax.default_matmul_precision``) do not reach CPU matrix products, hence
the explicit rounding. TPUs already multiply float32 in bfloat16 passes at the default
precision, so there it changes little.

Example:

  >>> import jax.numpy as jnp
  >>> from hfjax import precision
  >>> f = precision.reduced_precision_dots(lambda a, b: a @ b)
  >>> a = jnp.full((2, 3), 1 / 3)
  >>> f(a, jnp.ones((3, 1))).ravel()  # 1/3 rounded to bfloat16 is 0.333984375
  Array([1.0019531, 1.0019531], dtype=float32)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.extend as jex
import jax.numpy as jnp
from jax import lax

from hfjax.layers import _call_body

# Call-like equations whose body is evaluated in place (found as the layer matcher finds it),
# so that the dots inside are reached. Bodies with rules of their own (custom_jvp/custom_vjp,
# checkpoint) and control flow (while, scan, cond) run as traced, their dots at full
# precision.
_EVALUATED_CALLS = frozenset({"jit", "pjit", "closed_call", "core_call"})


def _rounds(operands: Sequence[Any], dtype: Any) -> bool:
  """Whether a dot of ``operands`` is computed on ``dtype``: both floating and wider."""
  return all(
    jnp.issubdtype(x.dtype, jnp.floating) and jnp.finfo(x.dtype).bits > jnp.finfo(dtype).bits
    for x in operands
  )


def _dot(eqn: jex.core.JaxprEqn, lhs: jax.Array, rhs: jax.Array, dtype: Any) -> jax.Array:
  out_dtype = eqn.outvars[0].aval.dtype
  return lax.dot_general(
    lhs.astype(dtype),
    rhs.astype(dtype),
    eqn.params["dimension_numbers"],
    preferred_element_type=out_dtype,
    out_sharding=eqn.params.get("out_sharding"),
  )


def _evaluate(jaxpr: jex.core.Jaxpr, consts: Sequence[Any], args: Sequence[Any], dtype) -> list:
  """Evaluates ``jaxpr`` like ``jax.core.eval_jaxpr``, its floating dots on ``dtype``."""
  env = dict(zip(jaxpr.constvars, consts, strict=True))
  env.update(zip(jaxpr.invars, args, strict=True))
  read = lambda v: v.val if isinstance(v, jex.core.Literal) else env[v]
  for eqn in jaxpr.eqns:
    invals = [read(v) for v in eqn.invars]
    name = eqn.primitive.name
    body = _call_body(eqn) if name in _EVALUATED_CALLS else None
    if name == "dot_general" and _rounds(invals, dtype):
      outvals = [_dot(eqn, *invals, dtype)]
    elif body is not None:
      outvals = _evaluate(*body, invals, dtype)
    else:
      with eqn.ctx.manager:
        out = eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(eqn.params))
      outvals = list(out) if eqn.primitive.multiple_results else [out]
    env.update(zip(eqn.outvars, outvals, strict=True))
  return [read(v) for v in jaxpr.outvars]


def reduced_precision_dots(fun: Callable[..., Any], dtype: Any = jnp.bfloat16) -> Callable:
  """``fun`` with its floating matrix products computed on operands rounded to ``dtype``.

  Each ``dot_general`` of ``fun``'s jaxpr whose operands are both floating and wider than
  ``dtype`` rounds them to ``dtype`` and accumulates in its own output dtype
  (``preferred_element_type``), so a float32 product keeps a float32 result with about three
  significant digits per operand. Dots inside ``jit`` bodies are reached; those inside
  control flow or inside functions with custom derivative rules run at full precision.
  Every other operation runs as traced. Meant for evaluating a function (a matrix-vector
  product, a preconditioner); jittable, and traced anew at each call.

  Args:
    fun: any jittable function of arrays and pytrees of arrays.
    dtype: the operands' dtype, a floating dtype such as ``jnp.bfloat16``.

  Returns:
    A function with ``fun``'s signature and output structure, shapes and dtypes.
  """
  if not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(f"dtype must be a floating dtype such as jnp.bfloat16, got {dtype!r}.")

  def wrapped(*args):
    closed, out_shape = jax.make_jaxpr(fun, return_shape=True)(*args)
    out = _evaluate(closed.jaxpr, closed.consts, jax.tree.leaves(args), dtype)
    return jax.tree.unflatten(jax.tree.structure(out_shape), out)

  return wrapped
