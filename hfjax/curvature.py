"""Curvature-vector products and diagonal curvature estimates.

Every function here takes the same four things: ``apply_fn(params, inputs) -> outputs``,
``loss_fn(outputs, targets) -> scalar`` (a mean over the batch), ``params`` and
``batch = (inputs, targets)``. Params, inputs, targets and outputs may be any pytrees.

The Gauss-Newton matrix of :math:`L(f(\\theta))` is

.. math::

  G = J^\\top H_L J, \\qquad J = \\partial f / \\partial \\theta, \\quad
  H_L = \\nabla^2_{f} L,

which is positive semidefinite whenever ``loss_fn`` is convex in the outputs (the matching
losses: sigmoid + binary cross-entropy, softmax + cross-entropy, linear + squared error).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

ApplyFn = Callable[[Any, Any], Any]
LossFn = Callable[[Any, Any], jax.Array]
Matvec = Callable[[Any], Any]


def split_batch(batch: Any) -> tuple[Any, Any]:
  """Returns ``(inputs, targets)`` from ``batch``, with an error that names a bad batch."""
  if not isinstance(batch, (tuple, list)) or len(batch) != 2:
    length = f" of length {len(batch)}" if hasattr(batch, "__len__") else ""
    raise TypeError(f"batch must be a pair (inputs, targets); got {type(batch).__name__}{length}.")
  return batch[0], batch[1]


def leading_size(tree: Any, what: str = "batch") -> int:
  """The common leading dimension of every leaf of ``tree``; raises if there is none."""
  leaves = jax.tree.leaves(tree)
  if not leaves:
    raise ValueError(f"{what} is empty: it holds no arrays.")
  if any(jnp.ndim(leaf) == 0 for leaf in leaves):
    raise ValueError(f"every leaf of {what} needs a leading batch axis; found a scalar.")
  sizes = sorted({jnp.shape(leaf)[0] for leaf in leaves})
  if len(sizes) != 1:
    raise ValueError(f"the leaves of {what} disagree on the batch size: {sizes}.")
  if sizes[0] == 0:
    raise ValueError(f"{what} is empty (batch size 0).")
  return sizes[0]


def batch_size(batch: Any) -> int:
  """The number of examples in ``batch = (inputs, targets)``, checked to be consistent."""
  inputs, _ = split_batch(batch)
  if not jax.tree.leaves(inputs):
    raise ValueError("batch inputs are empty: they hold no arrays.")
  return leading_size(batch, "batch=(inputs, targets)")


def check_params(params: Any) -> None:
  """Raises when ``params`` has no leaves or a leaf that is not floating point."""
  leaves = jax.tree.leaves(params)
  if not leaves:
    raise ValueError("params is empty: there is nothing to optimise.")
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    if not jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
      raise TypeError(
        f"params leaf {jax.tree_util.keystr(path)} has dtype {jnp.result_type(leaf)}; "
        "Hessian-free needs floating-point parameters."
      )


def check_problem(apply_fn: ApplyFn, loss_fn: LossFn, params: Any, batch: Any) -> None:
  """Checks params, the batch, and that ``loss_fn`` gives a scalar on the model's outputs.

  Runs on shapes only (``jax.eval_shape``), so it costs nothing at run time.
  """
  check_params(params)
  batch_size(batch)
  inputs, targets = split_batch(batch)
  _loss_of_outputs(loss_fn, jax.eval_shape(apply_fn, params, inputs), targets)


def _loss_of_outputs(loss_fn: LossFn, outputs: Any, targets: Any) -> Callable[[Any], jax.Array]:
  """``loss_fn`` as a function of the outputs, checked to give a scalar at trace time."""
  try:
    value = jax.eval_shape(loss_fn, outputs, targets)
  except (TypeError, ValueError) as err:
    shapes = jax.tree.map(jnp.shape, (outputs, targets))
    raise ValueError(
      f"loss_fn(outputs, targets) failed for (outputs, targets) shapes {shapes}: "
      f"the model outputs do not fit the targets ({err})."
    ) from err
  if not isinstance(value, jax.ShapeDtypeStruct) or value.shape != ():
    raise ValueError(
      "loss_fn must return a scalar (the batch mean); got "
      f"{getattr(value, 'shape', type(value).__name__)}."
    )
  return lambda out: loss_fn(out, targets)


def _check_like(v: Any, params: Any) -> None:
  """Raises when the vector ``v`` does not have the structure and shapes of ``params``."""
  v_def, p_def = jax.tree.structure(v), jax.tree.structure(params)
  if v_def != p_def:
    raise ValueError(f"vector has tree structure {v_def}, expected that of params: {p_def}.")
  for (path, a), b in zip(
    jax.tree_util.tree_leaves_with_path(v), jax.tree.leaves(params), strict=True
  ):
    if jnp.shape(a) != jnp.shape(b):
      raise ValueError(
        f"vector leaf {jax.tree_util.keystr(path)} has shape {jnp.shape(a)}, "
        f"params have {jnp.shape(b)}."
      )


def _linearized_model(apply_fn: ApplyFn, loss_fn: LossFn, params: Any, batch: Any):
  """Linearises the model and the loss gradient once; returns the pieces of ``J^T H_L J``."""
  check_params(params)
  batch_size(batch)
  inputs, targets = split_batch(batch)
  outputs, jvp_fn = jax.linearize(lambda p: apply_fn(p, inputs), params)
  loss_of_out = _loss_of_outputs(loss_fn, outputs, targets)
  # H_L is linearised once too: each matvec then costs one JVP, one small output-space
  # product and one VJP, with no re-tracing of the loss.
  _, loss_hvp = jax.linearize(jax.grad(loss_of_out), outputs)
  vjp_fn = jax.linear_transpose(jvp_fn, params)
  return outputs, jvp_fn, loss_hvp, vjp_fn


def gauss_newton_matvec(
  apply_fn: ApplyFn, loss_fn: LossFn, params: optax.Params, batch: Any
) -> tuple[Matvec, Any]:
  """Builds the Gauss-Newton matrix-vector product :math:`v \\mapsto J^\\top H_L J v`.

  The model is linearised once with :func:`jax.linearize` at ``params`` and transposed with
  :func:`jax.linear_transpose`; every call of the returned ``matvec`` reuses that
  linearisation, so it costs about one forward-mode and one reverse-mode pass of the
  linearised network.

  Args:
    apply_fn: ``apply_fn(params, inputs) -> outputs``.
    loss_fn: ``loss_fn(outputs, targets) -> scalar``, the batch mean.
    params: the point of linearisation, any pytree of floating arrays.
    batch: ``(inputs, targets)``.

  Returns:
    ``(matvec, outputs)``: ``matvec(v)`` has the structure, shapes and dtypes of ``params``;
    ``outputs`` is ``apply_fn(params, inputs)``.

  Example:

    >>> import jax.numpy as jnp, hfjax
    >>> apply_fn = lambda w, x: x @ w
    >>> loss_fn = lambda out, y: 0.5 * jnp.mean(jnp.sum((out - y) ** 2, -1))
    >>> x = jnp.eye(2); w = jnp.ones((2, 1))
    >>> matvec, _ = hfjax.gauss_newton_matvec(apply_fn, loss_fn, w, (x, x[:, :1]))
    >>> matvec(jnp.ones((2, 1))).ravel()
    Array([0.5, 0.5], dtype=float32)

  References:
    Schraudolph, "Fast curvature matrix-vector products for second-order gradient
    descent", Neural Computation 2002. Martens, "Deep learning via Hessian-free
    optimization", ICML 2010.
  """
  outputs, jvp_fn, loss_hvp, vjp_fn = _linearized_model(apply_fn, loss_fn, params, batch)

  def matvec(v):
    _check_like(v, params)
    (gv,) = vjp_fn(loss_hvp(jvp_fn(v)))
    return optax.tree.cast_like(gv, params)

  return matvec, outputs


def hessian_matvec(
  apply_fn: ApplyFn, loss_fn: LossFn, params: optax.Params, batch: Any
) -> tuple[Matvec, Any]:
  """Builds the exact Hessian-vector product of the batch loss (forward-over-reverse).

  Same arguments and return values as :func:`gauss_newton_matvec`; the Hessian is
  indefinite in general, so use it with CG only for convex problems or as a diagnostic.
  """
  check_params(params)
  batch_size(batch)
  inputs, targets = split_batch(batch)
  outputs = apply_fn(params, inputs)
  _loss_of_outputs(loss_fn, outputs, targets)

  def total_loss(p):
    return loss_fn(apply_fn(p, inputs), targets)

  _, hvp = jax.linearize(jax.grad(total_loss), params)

  def matvec(v):
    _check_like(v, params)
    return optax.tree.cast_like(hvp(v), params)

  return matvec, outputs


def per_example_sum(
  per_example_fn: Callable[[Any, Any], Any],
  params: Any,
  batch: Any,
  *,
  chunk_size: int | None = None,
) -> Any:
  """Sums ``per_example_fn(params, example)`` over the examples of ``batch``.

  Examples are processed ``chunk_size`` at a time (``vmap`` inside a ``scan``), so at most
  one chunk of per-example vectors exists at once, never one for the whole batch. The batch
  is padded to a whole number of chunks and the padding weighted out.

  Args:
    per_example_fn: takes ``params`` and one example (the leaves of ``batch`` without their
      leading axis) and returns a pytree of arrays.
    params: passed unchanged to ``per_example_fn``.
    batch: any pytree whose leaves share a leading batch axis.
    chunk_size: examples per chunk; ``None`` for the whole batch in one chunk.

  Returns:
    The sum over examples, a pytree like the output of ``per_example_fn``.
  """
  n = leading_size(batch)
  chunk = n if chunk_size is None else max(1, min(int(chunk_size), n))
  num_chunks = -(-n // chunk)
  pad = num_chunks * chunk - n

  def to_chunks(leaf):
    if pad:
      leaf = jnp.concatenate([leaf, jnp.repeat(leaf[:1], pad, axis=0)])
    # Strided chunks (example i goes to chunk i % num_chunks): with a batch sharded over
    # devices, every chunk then draws from every device and nothing is gathered.
    return leaf.reshape((chunk, num_chunks) + leaf.shape[1:]).swapaxes(0, 1)

  chunks = jax.tree.map(to_chunks, batch)
  weights = (jnp.arange(num_chunks * chunk) < n).reshape(chunk, num_chunks).T
  example = jax.tree.map(lambda leaf: leaf[0], batch)
  out_shape = jax.eval_shape(per_example_fn, params, example)

  def body(total, xs):
    example_chunk, w = xs
    values = jax.vmap(per_example_fn, in_axes=(None, 0))(params, example_chunk)
    summed = jax.tree.map(lambda v: jnp.tensordot(w.astype(v.dtype), v, axes=1), values)
    return optax.tree.add(total, summed), None

  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), out_shape)
  total, _ = jax.lax.scan(body, zeros, (chunks, weights))
  return total


def _example_loss(apply_fn: ApplyFn, loss_fn: LossFn):
  """The loss of one example, evaluated as a batch of one (so any batch-mean loss works)."""

  def loss(params, example):
    inputs, targets = jax.tree.map(lambda a: a[None], split_batch(example))
    return loss_fn(apply_fn(params, inputs), targets)

  return loss


def squared_gradient_sum(
  apply_fn: ApplyFn,
  loss_fn: LossFn,
  params: optax.Params,
  batch: Any,
  *,
  chunk_size: int | None = 256,
) -> tuple[Any, Any]:
  """Per-example gradient sums :math:`\\sum_i g_i` and :math:`\\sum_i g_i \\odot g_i`.

  :math:`g_i` is the gradient of ``loss_fn`` on example ``i`` alone. Martens' diagonal
  preconditioner uses :math:`\\frac1n \\sum_i g_i^2` (the diagonal of the empirical Fisher
  of the mean loss); Byrd et al.'s variance test uses both sums. Per-example gradients are
  formed ``chunk_size`` at a time (see :func:`per_example_sum`).

  Args:
    apply_fn: ``apply_fn(params, inputs) -> outputs``.
    loss_fn: ``loss_fn(outputs, targets) -> scalar``.
    params: parameters.
    batch: ``(inputs, targets)``.
    chunk_size: examples whose gradients are held at once; ``None`` for the whole batch.

  Returns:
    ``(sum_g, sum_g2)``, two pytrees like ``params``.
  """
  check_problem(apply_fn, loss_fn, params, batch)
  grad_one = jax.grad(_example_loss(apply_fn, loss_fn))

  def stats(p, example):
    g = grad_one(p, example)
    return g, jax.tree.map(jnp.square, g)

  return per_example_sum(stats, params, batch, chunk_size=chunk_size)


def gauss_newton_diagonal_estimate(
  apply_fn: ApplyFn,
  loss_fn: LossFn,
  params: optax.Params,
  batch: Any,
  key: jax.Array,
  *,
  num_samples: int = 1,
  chunk_size: int | None = 256,
) -> Any:
  """Unbiased Rademacher estimate of :math:`\\operatorname{diag}(J^\\top H_L J)`.

  For each example ``i`` and Rademacher vector :math:`v_i` in its output space,
  :math:`\\mathbb{E}[(J_i^\\top H_i v_i) \\odot (J_i^\\top v_i)] =
  \\operatorname{diag}(J_i^\\top H_i J_i)`, since :math:`\\mathbb{E}[v v^\\top] = I`. The
  estimate averages this over examples (matching the batch-mean loss) and samples. Unlike
  Chapelle & Erhan's :math:`(J^\\top S v)^2` with :math:`H = S S^\\top`, it needs no
  factor of :math:`H_L`, so it works for any ``loss_fn``; single entries can come out
  negative, which :func:`hfjax.diagonal_preconditioner` clips at zero.

  Args:
    apply_fn: ``apply_fn(params, inputs) -> outputs``.
    loss_fn: ``loss_fn(outputs, targets) -> scalar``.
    params: parameters.
    batch: ``(inputs, targets)``.
    key: PRNG key for the Rademacher vectors.
    num_samples: Rademacher vectors per example.
    chunk_size: examples whose products are held at once.

  Returns:
    A pytree like ``params``.

  References:
    Chapelle & Erhan, "Improved preconditioner for Hessian free optimization", NIPS
    Workshop on Deep Learning 2011. Bekas, Kokiopoulou & Saad, "An estimator for the
    diagonal of a matrix", 2007.
  """
  check_problem(apply_fn, loss_fn, params, batch)
  if num_samples < 1:
    raise ValueError(f"num_samples must be >= 1, got {num_samples}.")
  n = batch_size(batch)
  keys = jax.random.split(key, n)

  def estimate(p, item):
    example, k = item
    inputs, targets = jax.tree.map(lambda a: a[None], split_batch(example))
    outputs, jvp_fn = jax.linearize(lambda q: apply_fn(q, inputs), p)
    _, loss_hvp = jax.linearize(jax.grad(lambda o: loss_fn(o, targets)), outputs)
    vjp_fn = jax.linear_transpose(jvp_fn, p)

    def one_sample(sample_key):
      leaves, treedef = jax.tree.flatten(outputs)
      sample_keys = jax.random.split(sample_key, len(leaves))
      v = jax.tree.unflatten(
        treedef,
        [
          jax.random.rademacher(sk, leaf.shape, leaf.dtype)
          for sk, leaf in zip(sample_keys, leaves, strict=True)
        ],
      )
      (jhv,) = vjp_fn(loss_hvp(v))
      (jv,) = vjp_fn(v)
      return jax.tree.map(jnp.multiply, jhv, jv)

    samples = jax.vmap(one_sample)(jax.random.split(k, num_samples))
    return jax.tree.map(lambda s: jnp.mean(s, axis=0), samples)

  total = per_example_sum(estimate, params, (batch, keys), chunk_size=chunk_size)
  return jax.tree.map(lambda t: t / n, total)
