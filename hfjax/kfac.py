"""Kronecker-factored (K-FAC) block preconditioner for :func:`hfjax.cg`.

Per dense layer ``y = a W (+ b)`` (found by :func:`hfjax.layers.find_dense_layers`), the
Gauss-Newton block of the batch-mean loss is approximated by a Kronecker product

.. math::

  G_W \\approx A \\otimes G, \\qquad
  A = \\frac1R \\sum_{r} \\bar a_r \\bar a_r^\\top, \\qquad
  G = \\frac1N \\sum_{r} g_r g_r^\\top,

with :math:`\\bar a = [a, 1]` (the homogeneous coordinate only when the layer has a bias, so
the bias is the last row of the stacked matrix ``[W; b]``), :math:`R` the rows (all batch
axes flattened), :math:`N` the examples, and :math:`g` the cotangent of the layer's output
for output cotangents :math:`u` *sampled* per example with :math:`\\mathbb{E}[u u^\\top] =
H_\\ell`, the Hessian of that example's loss in the model outputs. Leaves in no dense layer
get a diagonal instead. The damped inverse is applied to a residual :math:`V` of a layer as
:math:`(A + \\pi\\sqrt\\lambda I)^{-1} V (G + \\sqrt\\lambda/\\pi I)^{-1}`.

Why sampled cotangents give the Gauss-Newton block. For a matching loss (sigmoid with binary
cross-entropy, softmax with cross-entropy, a linear output with squared error) the loss is
the negative log-likelihood of an exponential family in its natural parameters :math:`z`, so
:math:`\\nabla_z \\ell(z, t) = c (\\mathbb{E}_{p(\\cdot|z)}[t] - t)` and its covariance under
targets :math:`t \\sim p(\\cdot \\mid z)` drawn from the model's own predictive distribution is
:math:`c^2 \\operatorname{Cov}[t] = c\\, \\nabla_z^2 \\ell = H_\\ell` (for scaled losses the
scale is folded into :math:`u`). :func:`sample_output_cotangents` draws exactly such a
:math:`u` (``sqrt(c) (t - E t)``), so with :math:`g = J^\\top u` for the layer Jacobian
:math:`J`,

.. math::

  \\mathbb{E}[J^\\top u u^\\top J] = J^\\top \\mathbb{E}[u u^\\top] J = J^\\top H_\\ell J,

the layer's Gauss-Newton block, without forming :math:`H_\\ell` or any Jacobian: one forward
and one backward pass over the curvature batch give every layer's statistics. The Kronecker
factorisation itself assumes activations and cotangents independent (exact for a single
linear layer with squared error).

Example:

  >>> import jax, jax.numpy as jnp
  >>> from hfjax import kfac, layers
  >>> params = {"b": jnp.zeros(2), "w": jnp.ones((3, 2))}
  >>> apply_fn = lambda p, x: x @ p["w"] + p["b"]
  >>> loss_fn = lambda out, y: 0.5 * jnp.mean(jnp.sum((out - y) ** 2, -1))
  >>> batch = (jnp.eye(3), jnp.zeros((3, 2)))
  >>> kfac.detect_output_loss(loss_fn, apply_fn(params, batch[0]), batch[1])
  OutputLoss(kind='squared_error', scale=1.0)
  >>> layout = layers.find_dense_layers(apply_fn, params, batch[0])
  >>> factors = kfac.kfac_factors(apply_fn, loss_fn, params, batch, jax.random.key(0))
  >>> [a.shape for a in factors.a_factors], [g.shape for g in factors.g_factors]
  ([(4, 4)], [(2, 2)])
  >>> precondition = kfac.kfac_preconditioner(factors, 1e-2, layout)
  >>> jax.tree.map(jnp.shape, precondition(params))
  {'b': (2,), 'w': (3, 2)}

References:
  Martens & Grosse, "Optimizing neural networks with Kronecker-factored approximate
  curvature", ICML 2015. Grosse & Martens, "A Kronecker-factored approximate Fisher matrix
  for convolution layers", ICML 2016 (rows of shared weights). Martens, "New insights and
  perspectives on the natural gradient method", JMLR 2020 (matching losses).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from hfjax import layers as layers_lib
from hfjax._tree import HIGHEST, accumulation_dtype, all_finite
from hfjax.curvature import (
  ApplyFn,
  LossFn,
  batch_size,
  check_params,
  per_example_sum,
  split_batch,
)

LOSS_KINDS = ("sigmoid_cross_entropy", "softmax_cross_entropy", "squared_error")
TIKHONOV_KINDS = ("factored", "exact")

# Relative error within which the probed Hessian of loss_fn must match a kind's.
_FIT_TOLERANCE = 1e-4
_NUM_PROBES = 3


class OutputLoss(NamedTuple):
  """The output-space curvature of a matching loss, per example.

  The Hessian of one example's loss in its outputs :math:`z` is ``scale`` times

  - ``"sigmoid_cross_entropy"``: :math:`\\operatorname{diag}(\\sigma'(z))`,
  - ``"softmax_cross_entropy"``: :math:`\\operatorname{diag}(p) - p p^\\top`,
    :math:`p` the softmax over the last axis,
  - ``"squared_error"``: :math:`I`.

  Attributes:
    kind: one of ``"sigmoid_cross_entropy"``, ``"softmax_cross_entropy"``,
      ``"squared_error"``.
    scale: :math:`c > 0`, e.g. 1 for a loss summed over features and averaged over the
      batch, :math:`1/d` for a plain ``.mean()`` over ``d`` features, 2 for an unhalved
      squared error.
  """

  kind: str
  scale: float


class KFACFactors(NamedTuple):
  """Kronecker factors of the Gauss-Newton blocks of a model's dense layers.

  Attributes:
    a_factors: per layer of the layout, :math:`A = \\frac1R \\sum_r \\bar a_r \\bar
      a_r^\\top`, shape ``(d_in + has_bias, d_in + has_bias)``.
    g_factors: per layer, :math:`G = \\frac1N \\sum_r g_r g_r^\\top`, ``(d_out, d_out)``.
    diagonal: per unmatched leaf of the layout, an estimate of its Gauss-Newton diagonal,
      shaped like the leaf.
    count: estimates averaged into these factors, int32 (0: none yet, see
      :func:`kfac_init`).
  """

  a_factors: tuple[jax.Array, ...]
  g_factors: tuple[jax.Array, ...]
  diagonal: tuple[jax.Array, ...]
  count: jax.Array


class KFACInverse(NamedTuple):
  """Damped inverses of :class:`KFACFactors`, ready for :func:`kfac_apply`.

  Attributes:
    a_inverses: per layer, :math:`(A + \\pi \\sqrt\\lambda I)^{-1}`.
    g_inverses: per layer, :math:`(G + \\sqrt\\lambda / \\pi I)^{-1}`.
    diagonal_inverses: per unmatched leaf, :math:`(\\max(d, 0) + \\lambda)^{-\\alpha}`.
  """

  a_inverses: tuple[jax.Array, ...]
  g_inverses: tuple[jax.Array, ...]
  diagonal_inverses: tuple[jax.Array, ...]


class KFACEigenInverse(NamedTuple):
  """Exactly damped inverses of :class:`KFACFactors` in the factors' eigenbases.

  With :math:`A = Q_A \\operatorname{diag}(s_A) Q_A^\\top` and :math:`G = Q_G
  \\operatorname{diag}(s_G) Q_G^\\top`, :math:`(A \\otimes G + \\lambda I)^{-1}` is
  :math:`(Q_A \\otimes Q_G) \\operatorname{diag}(1 / (s_A \\otimes s_G + \\lambda))
  (Q_A \\otimes Q_G)^\\top`, applied to a layer's :math:`V` as :math:`Q_A (S \\circ (Q_A^\\top V
  Q_G)) Q_G^\\top` (the exact Tikhonov
  damping that the factored one of :class:`KFACInverse` approximates).

  Attributes:
    a_vectors: per layer, :math:`Q_A`.
    g_vectors: per layer, :math:`Q_G`.
    scales: per layer, :math:`S_{ij} = 1 / (s_{A,i} s_{G,j} + \\lambda)`, shaped like the
      stacked ``[W; b]``.
    diagonal_inverses: per unmatched leaf, as in :class:`KFACInverse`.
  """

  a_vectors: tuple[jax.Array, ...]
  g_vectors: tuple[jax.Array, ...]
  scales: tuple[jax.Array, ...]
  diagonal_inverses: tuple[jax.Array, ...]


# --- The loss in output space ---------------------------------------------------------------


def _kind_hessian(kind: str, z: Any, v: Any, xp: Any = jnp) -> Any:
  """:math:`K(z) v`, the unit-scale output Hessian of ``kind`` times ``v``."""
  if kind == "squared_error":
    return v
  if kind == "sigmoid_cross_entropy":
    s = 1 / (1 + xp.exp(-z))
    return s * (1 - s) * v
  p = xp.exp(z - z.max(axis=-1, keepdims=True))
  p = p / p.sum(axis=-1, keepdims=True)
  return p * v - p * (p * v).sum(axis=-1, keepdims=True)


def _probe_targets(targets: Any, size: int) -> Any:
  """Concrete targets for ``size`` examples, of the dtypes and per-example shapes of ``targets``.

  Integer and boolean targets are zeros (class 0). Floating ones are ``1 / K`` over a last
  axis of size ``K``: a valid distribution, so a cross-entropy against one-hot or soft
  labels has its usual Hessian (with zero targets it would be zero).
  """

  def leaf(t):
    shape, dtype = (size,) + tuple(jnp.shape(t)[1:]), jnp.result_type(t)
    if not jnp.issubdtype(dtype, jnp.inexact):
      return np.zeros(shape, dtype)
    fill = 1 / shape[-1] if len(shape) > 1 else 0.5
    return np.full(shape, fill, accumulation_dtype(dtype))

  return jax.tree.map(leaf, targets)


@functools.partial(jax.jit, static_argnums=0)
def _probe_products(loss_fn: LossFn, args: list) -> list:
  """``H v`` for each ``(z, vs, targets)`` of ``args``, ``H`` the Hessian of ``loss_fn`` at ``z``.

  Jitted, and cached per ``loss_fn`` and shapes: evaluated op by op the probe took about 20
  times longer, most of it compiling each operation.
  """

  def products(z, vs, t):
    grad = jax.grad(lambda o: jnp.asarray(loss_fn(o, t)).astype(z.dtype))
    return jax.vmap(lambda v: jax.jvp(grad, (z,), (v,))[1])(vs)

  return [products(*a) for a in args]


class _Probe(NamedTuple):
  """Probe logits ``z``, vectors ``v`` (leading probe axis) and products ``H v``, float64."""

  z: np.ndarray
  vs: np.ndarray
  hvs: np.ndarray


def _probe(loss_fn: LossFn, outputs: Any, targets: Any) -> tuple[_Probe, _Probe]:
  """``loss_fn``'s output Hessian on random concrete logits of one and of two examples.

  Evaluated on NumPy values under :func:`jax.ensure_compile_time_eval`, so the results are
  concrete also while tracing.
  """
  dtype = accumulation_dtype(outputs.dtype)
  rng = np.random.default_rng(0)
  args = []
  for size in (1, 2):
    shape = (size,) + tuple(outputs.shape[1:])
    z = (2 * rng.standard_normal(shape)).astype(dtype)
    vs = rng.standard_normal((_NUM_PROBES,) + shape).astype(dtype)
    args.append((z, vs, _probe_targets(targets, size)))

  try:
    hash(loss_fn)
    hvps = functools.partial(_probe_products, loss_fn)
  except TypeError:  # an unhashable loss_fn is traced afresh each time
    hvps = jax.jit(lambda args: _probe_products.__wrapped__(loss_fn, args))
  try:
    # The probe runs on host values at trace time, so even under a user's
    # jax.transfer_guard("disallow") around a training loop it is an allowed transfer.
    with jax.ensure_compile_time_eval(), jax.transfer_guard("allow"):
      hvs = jax.device_get(hvps(args))
  except Exception as err:  # noqa: BLE001 - any failure means the loss cannot be probed
    raise ValueError(
      f"could not evaluate loss_fn on probe outputs of per-example shape "
      f"{tuple(outputs.shape[1:])} to find its output Hessian ({type(err).__name__}: {err}); "
      f"pass loss=... (one of {LOSS_KINDS}) or an OutputLoss explicitly."
    ) from err
  as64 = lambda x: np.asarray(x, np.float64)
  one, two = (_Probe(as64(z), as64(vs), as64(h)) for (z, vs, _), h in zip(args, hvs, strict=True))
  return one, two


def _fit(kind: str, probe: _Probe) -> tuple[float, float]:
  """Least-squares scale ``c`` of ``H v ~ c K(z) v`` and its relative error."""
  z, vs, hvs = probe
  kv = np.stack([_kind_hessian(kind, z, v, np) for v in vs])
  kk, hh = float(np.vdot(kv, kv)), float(np.vdot(hvs, hvs))
  if kk == 0 or hh == 0:
    return 0.0, np.inf
  c = float(np.vdot(hvs, kv)) / kk
  return c, float(np.linalg.norm(hvs - c * kv) / np.sqrt(hh))


def _candidates(outputs: Any) -> tuple[str, ...]:
  # A softmax needs a class axis apart from the batch axis, and two classes at least.
  if len(outputs.shape) >= 2 and outputs.shape[-1] >= 2:
    return LOSS_KINDS
  return ("sigmoid_cross_entropy", "squared_error")


def detect_output_loss(
  loss_fn: LossFn, outputs: Any, targets: Any, loss: str | OutputLoss = "auto"
) -> OutputLoss:
  """Finds the kind and scale of ``loss_fn``'s output Hessian by probing it.

  ``loss_fn`` is evaluated (eagerly, also while tracing) on concrete random logits for a
  batch of one example with the per-example shape and dtype of ``outputs``, and a few
  Hessian-vector products in output space are compared with each kind's
  :math:`c K(z) v` (see :class:`OutputLoss`); ``c`` is fitted by least squares. A kind
  matches at a relative error below ``1e-4``. A batch of two then checks that the loss is a
  mean over examples (its Hessian scale halves and examples do not interact).

  Args:
    loss_fn: ``loss_fn(outputs, targets) -> scalar``, the batch mean.
    outputs: the model outputs (an array, tracer or ``jax.ShapeDtypeStruct``; only the
      shape and dtype are used), with a leading batch axis.
    targets: the targets (any pytree; only shapes and dtypes are used).
    loss: ``"auto"`` to detect the kind; a kind name to fit only the scale (a mismatch then
      warns instead of raising, for losses that are knowingly not matching); an
      :class:`OutputLoss` is returned as it is.

  Returns:
    The :class:`OutputLoss`.

  Raises:
    ValueError: if no kind matches (``"auto"``), the loss is not a batch mean, or its
      curvature is not positive.
  """
  if isinstance(loss, OutputLoss):
    if loss.kind not in LOSS_KINDS or not float(loss.scale) > 0:
      raise ValueError(f"OutputLoss needs a kind in {LOSS_KINDS} and a scale > 0; got {loss}.")
    return loss
  if loss != "auto" and loss not in LOSS_KINDS:
    raise ValueError(f"loss must be 'auto', one of {LOSS_KINDS} or an OutputLoss; got {loss!r}.")
  if len(getattr(outputs, "shape", ())) < 1:
    raise ValueError("the model outputs need a leading batch axis for K-FAC.")
  probe, probe_two = _probe(loss_fn, outputs, targets)
  if not np.any(probe.hvs):
    raise ValueError(
      "loss_fn has a zero Hessian in the outputs (piecewise linear, like a hinge or absolute "
      "loss), so it gives K-FAC no curvature; use another preconditioner."
    )
  kinds = _candidates(outputs) if loss == "auto" else (loss,)
  fits = {kind: _fit(kind, probe) for kind in kinds}
  halves = {kind: _fit(kind, probe_two) for kind in kinds}

  def mismatch(kind: str) -> float:
    # One example cannot tell the kinds apart when it has a single output (every kind fits a
    # positive number), so the two-example probe, at other outputs, must agree too.
    (one, one_error), (two, two_error) = fits[kind], halves[kind]
    return max(one_error, two_error, abs(2 * two - one) / max(abs(one), 1e-30))

  kind = min(kinds, key=mismatch)
  scale, error = fits[kind]
  if not scale > 0:
    raise ValueError(
      f"loss_fn's Hessian in the outputs is not positive (fitted scale {scale:.3g} for "
      f"{kind}): it is not a matching loss; use another preconditioner."
    )
  if error >= _FIT_TOLERANCE:
    found = ", ".join(f"{k}: {e:.2g}" for k, (_, e) in fits.items())
    message = (
      f"loss_fn's Hessian in the outputs is not that of a matching loss (relative errors "
      f"{found}; at most {_FIT_TOLERANCE:g} needed)."
    )
    if loss == "auto":
      raise ValueError(
        f"{message} Pass loss=... (one of {LOSS_KINDS}) explicitly to use that kind's "
        "curvature anyway, or use another preconditioner."
      )
    warnings.warn(f"{message} Using {kind} with the least-squares scale {scale:.4g}.", stacklevel=2)
    return OutputLoss(kind, scale)
  half, half_error = halves[kind]
  if half_error >= _FIT_TOLERANCE or abs(2 * half - scale) > _FIT_TOLERANCE * scale:
    raise ValueError(
      f"loss_fn is not a mean over the batch of per-example {kind} losses: its output "
      f"Hessian scale is {scale:.4g} for one example and {half:.4g} (relative error "
      f"{half_error:.2g}) for two, where {scale / 2:.4g} is expected. K-FAC needs "
      "loss_fn(outputs, targets) to average over the leading axis."
    )
  return OutputLoss(kind, scale)


def sample_output_cotangents(output_loss: OutputLoss, outputs: jax.Array, key: jax.Array):
  """Output cotangents :math:`u` with :math:`\\mathbb{E}[u u^\\top] = H_\\ell` per example.

  ``sqrt(c) (t - E[t])`` for targets :math:`t` drawn from the model's predictive
  distribution: Bernoulli(:math:`\\sigma(z)`) per output, a one-hot class drawn from
  softmax(:math:`z`) over the last axis, or :math:`N(0, I)` noise for squared error (whose
  :math:`u` is then ``sqrt(c)`` times standard normal).

  Args:
    output_loss: from :func:`detect_output_loss`.
    outputs: the model outputs (logits) ``z``.
    key: PRNG key.

  Returns:
    ``u``, shaped and typed like ``outputs``.
  """
  dtype = accumulation_dtype(outputs.dtype)
  z = outputs.astype(dtype)
  if output_loss.kind == "sigmoid_cross_entropy":
    p = jax.nn.sigmoid(z)
    u = jax.random.bernoulli(key, p).astype(dtype) - p
  elif output_loss.kind == "softmax_cross_entropy":
    p = jax.nn.softmax(z, axis=-1)
    u = jax.nn.one_hot(jax.random.categorical(key, z, axis=-1), z.shape[-1], dtype=dtype) - p
  else:
    u = jax.random.normal(key, z.shape, dtype)
  return (np.sqrt(output_loss.scale) * u).astype(outputs.dtype)


# --- Factors ------------------------------------------------------------------------------


def _layer_dims(layer: layers_lib.DenseLayer, leaves: list) -> tuple[int, int, Any]:
  """``(dim A, dim G, factor dtype)`` of a dense layer."""
  shape = jnp.shape(leaves[layer.kernel])
  dtypes = [jnp.result_type(leaves[layer.kernel])]
  if layer.bias is not None:
    dtypes.append(jnp.result_type(leaves[layer.bias]))
  dtype = accumulation_dtype(jnp.result_type(*dtypes))
  return (
    shape[layer.kernel_in_axis] + (layer.bias is not None),
    shape[1 - layer.kernel_in_axis],
    dtype,
  )


def kfac_init(params: optax.Params, layout: layers_lib.LayerLayout) -> KFACFactors:
  """Zero factors for ``layout`` with ``count == 0``: the state before the first estimate.

  :func:`kfac_update_factors` replaces them with the first estimate it is given.
  """
  leaves = jax.tree.leaves(params)
  a_factors, g_factors = [], []
  for layer in layout.layers:
    dim_a, dim_g, dtype = _layer_dims(layer, leaves)
    a_factors.append(jnp.zeros((dim_a, dim_a), dtype))
    g_factors.append(jnp.zeros((dim_g, dim_g), dtype))
  diagonal = tuple(
    jnp.zeros(jnp.shape(leaves[i]), accumulation_dtype(jnp.result_type(leaves[i])))
    for i in layout.unmatched
  )
  return KFACFactors(tuple(a_factors), tuple(g_factors), diagonal, jnp.zeros((), jnp.int32))


def _layer_factors(
  a: jax.Array, g: jax.Array, has_bias: bool, num_examples: int, dtype: Any
) -> tuple[jax.Array, jax.Array]:
  """:math:`A` (mean over rows of :math:`\\bar a \\bar a^\\top`) and :math:`G` (sum over N)."""
  a = a.reshape(-1, a.shape[-1]).astype(dtype)
  g = g.reshape(-1, g.shape[-1]).astype(dtype)
  if has_bias:
    a = jnp.concatenate([a, jnp.ones((a.shape[0], 1), dtype)], axis=1)
  a_factor = jnp.matmul(a.T, a, precision=HIGHEST) / a.shape[0]
  g_factor = jnp.matmul(g.T, g, precision=HIGHEST) / num_examples
  return a_factor, g_factor


def _unmatched_diagonal(
  apply_fn: ApplyFn,
  params: Any,
  inputs: Any,
  u: jax.Array,
  unmatched: tuple[int, ...],
  chunk_size: int | None,
) -> tuple[jax.Array, ...]:
  """Monte-Carlo Gauss-Newton diagonal of the ``unmatched`` leaves.

  :math:`\\frac1N \\sum_n (J_n^\\top u_n)^2` with the same sampled :math:`u` as the factors:
  since :math:`\\mathbb{E}[u_n u_n^\\top] = H_n`, its expectation is
  :math:`\\operatorname{diag}(\\frac1N \\sum_n J_n^\\top H_n J_n)`. Per-example gradients are
  taken for these leaves only, ``chunk_size`` examples at a time.
  """
  leaves, treedef = jax.tree.flatten(params)

  def squared_gradient(free, item):
    x, u_n = item

    def sampled_loss(free_leaves):
      full = list(leaves)
      for i, leaf in zip(unmatched, free_leaves, strict=True):
        full[i] = leaf
      out = apply_fn(jax.tree.unflatten(treedef, full), jax.tree.map(lambda leaf: leaf[None], x))
      return jnp.sum(out * u_n[None].astype(out.dtype))

    grads = jax.grad(sampled_loss)(free)
    return tuple(jnp.square(gr.astype(accumulation_dtype(gr.dtype))) for gr in grads)

  free = tuple(leaves[i] for i in unmatched)
  total = per_example_sum(squared_gradient, free, (inputs, u), chunk_size=chunk_size)
  n = u.shape[0]
  return tuple(t / n for t in total)


def _warn_unmatched(layout: layers_lib.LayerLayout) -> None:
  which = "some parameters" if layout.layers else "any parameter (no dense layer in apply_fn)"
  warnings.warn(
    f"K-FAC found no dense layer for {which}; they get a diagonal (Monte-Carlo "
    "Gauss-Newton) preconditioner instead: " + "; ".join(layout.reasons),
    stacklevel=3,
  )


def kfac_factors(
  apply_fn: ApplyFn,
  loss_fn: LossFn,
  params: optax.Params,
  batch: Any,
  key: jax.Array,
  *,
  layout: layers_lib.LayerLayout | None = None,
  loss: str | OutputLoss = "auto",
  chunk_size: int | None = 256,
  num_samples: int = 1,
) -> KFACFactors:
  """Estimates the K-FAC factors of every dense layer on a curvature batch.

  One forward pass and one backward pass of sampled output cotangents
  (:func:`sample_output_cotangents`) per sample give each layer's :math:`A` and :math:`G`
  (see the module docstring; with several samples, :math:`G` and the diagonal are their
  mean over the samples); leaves in no dense layer get the Monte-Carlo Gauss-Newton diagonal
  :math:`\\frac1N \\sum_n (J_n^\\top u_n)^2` from the same cotangents (per-example
  gradients of those leaves only, computed only when there are any). Jittable; the loss is
  probed at trace time.

  Args:
    apply_fn: ``apply_fn(params, inputs) -> outputs``, a single array output.
    loss_fn: ``loss_fn(outputs, targets) -> scalar``, the batch mean of a matching loss.
    params: the parameters.
    batch: ``(inputs, targets)``, the curvature batch.
    key: PRNG key for the sampled cotangents.
    layout: from :func:`hfjax.layers.find_dense_layers`; found here when ``None``.
    loss: ``"auto"``, a kind name or an :class:`OutputLoss` (see :func:`detect_output_loss`).
    chunk_size: examples whose per-example gradients are held at once for the diagonal.
    num_samples: sampled cotangents per example (``key`` is split into that many when more
      than one); each costs one more backward pass and lowers the variance of :math:`G`.

  Returns:
    :class:`KFACFactors` with ``count == 1``, in the accumulation dtype of the parameters.

  Raises:
    ValueError: if the loss does not match a kind.
    TypeError: if the outputs are not a single array.

  Warns:
    UserWarning: naming the leaves that fall back to the diagonal, and why (all of them when
    ``apply_fn`` has no dense layer: the preconditioner is then a diagonal, never the
    identity).
  """
  check_params(params)
  if isinstance(num_samples, bool) or int(num_samples) != num_samples or num_samples < 1:
    raise ValueError(f"num_samples must be an integer >= 1, got {num_samples!r}.")
  num_samples = int(num_samples)
  num_examples = batch_size(batch)
  inputs, targets = split_batch(batch)
  if layout is None:
    layout = layers_lib.find_dense_layers(apply_fn, params, inputs)
  outputs, activations, backward = layers_lib.layer_statistics(apply_fn, params, inputs, layout)
  if not isinstance(outputs, jax.Array):
    raise TypeError(
      "K-FAC needs apply_fn to return a single array; got a pytree with "
      f"{len(jax.tree.leaves(outputs))} leaves ({jax.tree.structure(outputs)})."
    )
  output_loss = detect_output_loss(loss_fn, outputs, targets, loss)
  keys = [key] if num_samples == 1 else list(jax.random.split(key, num_samples))
  us = [sample_output_cotangents(output_loss, outputs, k) for k in keys]
  # Each sample's rows stacked: G = sum over samples and rows of g g^T / (N * samples).
  cotangents = [jnp.concatenate(gs) for gs in zip(*map(backward, us), strict=True)]
  leaves = jax.tree.leaves(params)
  a_factors, g_factors = [], []
  for layer, a, g in zip(layout.layers, activations, cotangents, strict=True):
    _, _, dtype = _layer_dims(layer, leaves)
    a_factor, g_factor = _layer_factors(
      a, g, layer.bias is not None, num_examples * num_samples, dtype
    )
    a_factors.append(a_factor)
    g_factors.append(g_factor)
  diagonal = ()
  if layout.unmatched:
    _warn_unmatched(layout)
    per_sample = [
      _unmatched_diagonal(apply_fn, params, inputs, u, layout.unmatched, chunk_size) for u in us
    ]
    diagonal = tuple(sum(ds) / num_samples for ds in zip(*per_sample, strict=True))
  return KFACFactors(tuple(a_factors), tuple(g_factors), diagonal, jnp.ones((), jnp.int32))


def kfac_update_factors(
  old: KFACFactors, new: KFACFactors, decay: float | jax.Array
) -> KFACFactors:
  """Exponential moving average ``decay * old + (1 - decay) * new`` of K-FAC factors.

  While ``old`` holds no estimate (``count == 0``, as from :func:`kfac_init`) ``new``
  replaces it, so the average starts without a bias towards zero; ``decay = 0`` always
  replaces.

  Args:
    old: the running factors.
    new: a fresh estimate (:func:`kfac_factors`).
    decay: weight of the old factors, in ``[0, 1]``.

  Returns:
    The averaged factors, with ``count = old.count + new.count``.
  """
  if isinstance(decay, (int, float)) and not 0 <= decay <= 1:
    raise ValueError(f"decay must be in [0, 1], got {decay}.")
  if jax.tree.structure(old) != jax.tree.structure(new):
    raise ValueError("old and new K-FAC factors have different layouts.")
  empty = old.count == 0

  def average(o, n):
    d = jnp.asarray(decay, o.dtype)
    return jnp.where(empty, n, d * o + (1 - d) * n).astype(o.dtype)

  mixed = jax.tree.map(average, old._replace(count=None), new._replace(count=None))
  return mixed._replace(count=(old.count + new.count).astype(jnp.int32))


# --- Damped inverse and its application --------------------------------------------------


def _spd_inverse(matrix: jax.Array) -> jax.Array:
  """Inverse of a symmetric positive definite matrix through its Cholesky factor.

  :math:`M^{-1} = L^{-\\top} L^{-1}`, explicit so that applying it is a matrix product. On a
  2-core CPU for ``n = 1000`` (``benchmarks/bench_kfac.py``) this took 32 ms, against 37 ms
  for ``jnp.linalg.inv`` and 115 ms for an ``eigh``; it also fails detectably on a matrix
  that is not positive definite. When the
  factorisation fails (a matrix not numerically positive definite, e.g. without damping)
  the inverse of the diagonal is used instead, so a preconditioner never turns NaN.
  """
  eye = jnp.eye(matrix.shape[0], dtype=matrix.dtype)
  lower = jnp.linalg.cholesky(matrix)
  lower_inv = jax.scipy.linalg.solve_triangular(lower, eye, lower=True)
  inverse = jnp.matmul(lower_inv.T, lower_inv, precision=HIGHEST)
  diagonal = jnp.diagonal(matrix)
  fallback = jnp.diag(jnp.where(diagonal > 0, 1 / jnp.where(diagonal > 0, diagonal, 1), 1))
  return jnp.where(all_finite(inverse), inverse, fallback)


def _split_damping(a: jax.Array, g: jax.Array, damping: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Factored Tikhonov damping: :math:`\\pi \\sqrt\\lambda` added to A,
  :math:`\\sqrt\\lambda / \\pi` to G."""
  mean_a = jnp.trace(a) / a.shape[0]
  mean_g = jnp.trace(g) / g.shape[0]
  ok = (mean_a > 0) & (mean_g > 0) & jnp.isfinite(mean_a) & jnp.isfinite(mean_g)
  pi = jnp.where(ok, jnp.sqrt(jnp.where(ok, mean_a / jnp.where(ok, mean_g, 1), 1)), 1)
  root = jnp.sqrt(damping.astype(a.dtype))
  return pi * root, root / pi


def _diagonal_inverses(diagonals: tuple, damping: float | jax.Array, exponent: float) -> tuple:
  """Per unmatched leaf, :math:`(\\max(d, 0) + \\lambda)^{-\\alpha}`, and 1 where that is
  :math:`0^{-\\alpha}`."""
  damping = jnp.asarray(damping)
  inverses = []
  for d in diagonals:
    damped = jnp.maximum(d, 0) + damping.astype(d.dtype)
    inverses.append(jnp.where(damped > 0, jnp.where(damped > 0, damped, 1) ** (-exponent), 1))
  return tuple(inverses)


def _symmetric_eigh(matrix: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``(values, vectors)`` of a symmetric PSD matrix, values clipped at 0 (round-off).

  When ``eigh`` fails (non-finite output) the diagonal is used in the standard basis, so a
  preconditioner never turns NaN.
  """
  values, vectors = jnp.linalg.eigh(matrix)
  ok = all_finite((values, vectors))
  values = jnp.where(ok, values, jnp.diagonal(matrix))
  vectors = jnp.where(ok, vectors, jnp.eye(matrix.shape[0], dtype=matrix.dtype))
  return jnp.maximum(values, 0), vectors


def _exact_scales(a_values: jax.Array, g_values: jax.Array, damping: jax.Array) -> jax.Array:
  """:math:`1 / (s_A \\otimes s_G + \\lambda)`, and 1 where that is :math:`0^{-1}`."""
  damped = jnp.outer(a_values, g_values) + damping.astype(a_values.dtype)
  return jnp.where(damped > 0, 1 / jnp.where(damped > 0, damped, 1), 1)


def _eigen_inverse(
  eigenbases: tuple[tuple, tuple, tuple, tuple],
  diagonal: tuple,
  damping: jax.Array,
  diagonal_exponent: float,
) -> KFACEigenInverse:
  """The :class:`KFACEigenInverse` of ``(a_values, a_vectors, g_values, g_vectors)``."""
  a_values, a_vectors, g_values, g_vectors = eigenbases
  scales = tuple(_exact_scales(sa, sg, damping) for sa, sg in zip(a_values, g_values, strict=True))
  diagonal_inverses = _diagonal_inverses(diagonal, damping, diagonal_exponent)
  return KFACEigenInverse(tuple(a_vectors), tuple(g_vectors), scales, diagonal_inverses)


def _eigenbases(factors: KFACFactors) -> tuple[tuple, tuple, tuple, tuple]:
  """``(a_values, a_vectors, g_values, g_vectors)``, one entry per layer."""
  a = [_symmetric_eigh(m) for m in factors.a_factors]
  g = [_symmetric_eigh(m) for m in factors.g_factors]
  return (
    tuple(v for v, _ in a),
    tuple(q for _, q in a),
    tuple(v for v, _ in g),
    tuple(q for _, q in g),
  )


def _check_tikhonov(tikhonov: str) -> None:
  if tikhonov not in TIKHONOV_KINDS:
    raise ValueError(f"tikhonov must be one of {TIKHONOV_KINDS}, got {tikhonov!r}.")


def kfac_inverse(
  factors: KFACFactors,
  damping: float | jax.Array,
  *,
  diagonal_exponent: float = 1.0,
  tikhonov: str = "factored",
) -> KFACInverse | KFACEigenInverse:
  """The damped inverse blocks of the K-FAC approximation of :math:`(G + \\lambda I)^{-1}`.

  With ``tikhonov="factored"``, per layer, factored Tikhonov damping (Martens & Grosse 2015,
  section 6.3):

  .. math::

    (A + \\pi \\sqrt\\lambda I)^{-1} \\otimes (G + \\tfrac{\\sqrt\\lambda}{\\pi} I)^{-1},
    \\qquad \\pi^2 = \\frac{\\operatorname{tr} A / \\dim A}{\\operatorname{tr} G / \\dim G}

  (:math:`\\pi = 1` when a trace is zero), whose expansion is :math:`A \\otimes G + \\lambda I`
  plus the cross terms :math:`\\pi\\sqrt\\lambda\\, I \\otimes G + \\tfrac{\\sqrt\\lambda}{\\pi}
  A \\otimes I`, balanced by :math:`\\pi`: two Cholesky inverses per layer, two matrix
  products per application. With ``tikhonov="exact"``, :math:`(A \\otimes G + \\lambda
  I)^{-1}` itself through the eigendecompositions of A and G (:class:`KFACEigenInverse`):
  an ``eigh`` per factor (about 3.5x a Cholesky on a CPU), four matrix products per
  application, and no cross terms, so CG needs fewer steps (``bench_preconditioners``), and
  a new damping needs no new factorisation. Unmatched leaves get :math:`(\\max(d, 0) +
  \\lambda)^{-\\alpha}`. Compute it once per change of factors or damping.

  Args:
    factors: from :func:`kfac_factors` or :func:`kfac_update_factors`.
    damping: :math:`\\lambda \\ge 0` (0 inverts the factors themselves).
    diagonal_exponent: :math:`\\alpha` for the unmatched leaves. 1 keeps them consistent
      with the blocks, and the preconditioned CG unchanged when the loss and the damping are
      scaled alike. Martens' (2010) 0.75 gave a lower CG objective after 5-20 steps on an
      MLP with LayerNorm, but by an amount that changed with the scale of the loss (large
      for 0.01 x the loss, none for 100 x), so it is not the default.
    tikhonov: ``"factored"`` or ``"exact"``, how the damping enters the blocks.

  Returns:
    A :class:`KFACInverse` (factored) or :class:`KFACEigenInverse` (exact).
  """
  if isinstance(damping, (int, float)) and not damping >= 0:
    raise ValueError(f"damping must be >= 0, got {damping}.")
  _check_tikhonov(tikhonov)
  damping = jnp.asarray(damping)
  if tikhonov == "exact":
    return _eigen_inverse(_eigenbases(factors), factors.diagonal, damping, diagonal_exponent)
  a_inverses, g_inverses = [], []
  for a, g in zip(factors.a_factors, factors.g_factors, strict=True):
    damp_a, damp_g = _split_damping(a, g, damping)
    a_inverses.append(_spd_inverse(a + damp_a * jnp.eye(a.shape[0], dtype=a.dtype)))
    g_inverses.append(_spd_inverse(g + damp_g * jnp.eye(g.shape[0], dtype=g.dtype)))
  diagonal_inverses = _diagonal_inverses(factors.diagonal, damping, diagonal_exponent)
  return KFACInverse(tuple(a_inverses), tuple(g_inverses), diagonal_inverses)


def _check_layout(inverse: Any, layout: layers_lib.LayerLayout, leaves: list) -> None:
  covered = [layer.kernel for layer in layout.layers]
  covered += [layer.bias for layer in layout.layers if layer.bias is not None]
  covered += list(layout.unmatched)
  if sorted(covered) != list(range(len(leaves))):
    raise ValueError(
      f"layout covers leaves {sorted(covered)}, but the vector has {len(leaves)} leaves; "
      "each leaf must be in exactly one layer or in layout.unmatched."
    )
  num_layers = len(inverse[0])  # a_inverses or a_vectors
  if num_layers != len(layout.layers) or len(inverse.diagonal_inverses) != len(layout.unmatched):
    raise ValueError(
      f"the K-FAC inverse has {num_layers} layers and "
      f"{len(inverse.diagonal_inverses)} diagonal leaves; the layout has "
      f"{len(layout.layers)} and {len(layout.unmatched)}."
    )


def _block_solver(inverse: KFACInverse | KFACEigenInverse) -> Callable[[int, jax.Array], Any]:
  """``solve(i, V)``: layer ``i``'s damped inverse applied to its stacked ``[W; b]``."""
  dot = functools.partial(jnp.matmul, precision=HIGHEST)
  if isinstance(inverse, KFACEigenInverse):

    def solve(i, v):
      q_a, q_g = inverse.a_vectors[i], inverse.g_vectors[i]
      return dot(dot(q_a, inverse.scales[i] * dot(dot(q_a.T, v), q_g)), q_g.T)

    return solve
  return lambda i, v: dot(dot(inverse.a_inverses[i], v), inverse.g_inverses[i])


def kfac_apply(
  inverse: KFACInverse | KFACEigenInverse, v: Any, layout: layers_lib.LayerLayout
) -> Any:
  """Applies the K-FAC inverse approximation to a pytree ``v`` like the parameters.

  Per layer, the kernel (transposed to ``(d_in, d_out)`` when ``kernel_in_axis == 1``) with
  the bias stacked under it as a last row gives :math:`V`, and the result is
  :math:`A^{-1} V G^{-1}`, i.e. :math:`(A^{-1} \\otimes G^{-1}) \\operatorname{vec}(V)` for
  the row-major ``vec`` (or its exactly damped form, :class:`KFACEigenInverse`); leaves in
  no layer are scaled by their diagonal inverse.

  Args:
    inverse: from :func:`kfac_inverse`.
    v: a pytree like the parameters.
    layout: the layout the factors were estimated with.

  Returns:
    The preconditioned vector, with the structure and dtypes of ``v``.
  """
  leaves, treedef = jax.tree.flatten(v)
  _check_layout(inverse, layout, leaves)
  out = list(leaves)
  solve = _block_solver(inverse)
  for i, layer in enumerate(layout.layers):
    dtype = inverse[0][i].dtype
    kernel = leaves[layer.kernel].astype(dtype)
    if layer.kernel_in_axis == 1:
      kernel = kernel.T
    stacked = kernel
    if layer.bias is not None:
      bias = leaves[layer.bias].astype(dtype).reshape(1, -1)
      stacked = jnp.concatenate([kernel, bias], axis=0)
    z = solve(i, stacked)
    d_in = kernel.shape[0]
    new_kernel = z[:d_in].T if layer.kernel_in_axis == 1 else z[:d_in]
    out[layer.kernel] = new_kernel
    if layer.bias is not None:
      out[layer.bias] = z[d_in].reshape(jnp.shape(leaves[layer.bias]))
  for i, d_inv in zip(layout.unmatched, inverse.diagonal_inverses, strict=True):
    out[i] = d_inv * leaves[i]
  return optax.tree.cast_like(jax.tree.unflatten(treedef, out), v)


def kfac_preconditioner(
  factors: KFACFactors,
  damping: float | jax.Array,
  layout: layers_lib.LayerLayout,
  *,
  diagonal_exponent: float = 1.0,
  tikhonov: str = "factored",
) -> Callable[[Any], Any]:
  """The K-FAC preconditioner as a callable ``r -> z`` for :func:`hfjax.cg`.

  The inverse (:func:`kfac_inverse`, with its ``tikhonov``) is computed once, here; each
  call is :func:`kfac_apply`.
  """
  inverse = kfac_inverse(factors, damping, diagonal_exponent=diagonal_exponent, tikhonov=tikhonov)
  return functools.partial(kfac_apply, inverse, layout=layout)


# --- Running state, laid out by parameter leaf ------------------------------------------------


class KFACState(NamedTuple):
  """K-FAC factors and their damped inverses kept between solves, laid out by parameter leaf.

  An optimizer's ``init`` sees only the parameters, not the inputs that
  :func:`hfjax.layers.find_dense_layers` traces, so the state does not depend on the layout:
  each 2-D leaf of shape ``(m, n)`` owns one square slot per axis, ``(m + 1, m + 1)`` and
  ``(n + 1, n + 1)`` (room for the homogeneous coordinate of a bias), and every leaf owns a
  diagonal shaped like itself. A layer's :math:`A` fills the slot of its kernel's input axis
  and :math:`G` the other one (top-left corner; the rest stays zero); a leaf in no layer uses
  its diagonal.

  Attributes:
    factors: per leaf, ``(slot of axis 0, slot of axis 1)`` for a 2-D leaf, ``()`` otherwise.
    diagonal: per leaf, its Gauss-Newton diagonal estimate (used for unmatched leaves).
    inverse_factors: like ``factors``: with ``tikhonov="factored"`` the damped inverses of
      the last refresh, with ``"exact"`` the factors' eigenvectors.
    inverse_diagonal: like ``diagonal``, the damped inverse of the last refresh.
    eigenvalues: per leaf, one vector per slot of ``factors`` (length of the slot's side):
      the factors' eigenvalues with ``tikhonov="exact"``, zero otherwise.
    num_estimates: estimates averaged into ``factors``, int32 (0 before the first); not
      ``count``, so that ``optax.tree.get(state, "count")`` keeps finding the step count.
  """

  factors: tuple
  diagonal: tuple
  inverse_factors: tuple
  inverse_diagonal: tuple
  eigenvalues: tuple
  num_estimates: jax.Array


def kfac_state_init(params: optax.Params) -> KFACState:
  """Zero :class:`KFACState` for ``params`` (no estimate yet)."""

  def slots(leaf):
    if jnp.ndim(leaf) != 2:
      return ()
    dtype = accumulation_dtype(jnp.result_type(leaf))
    return tuple(jnp.zeros((d + 1, d + 1), dtype) for d in jnp.shape(leaf))

  leaves = jax.tree.leaves(params)
  factors = tuple(slots(leaf) for leaf in leaves)
  diagonal = tuple(
    jnp.zeros(jnp.shape(leaf), accumulation_dtype(jnp.result_type(leaf))) for leaf in leaves
  )
  return KFACState(
    factors=factors,
    diagonal=diagonal,
    inverse_factors=jax.tree.map(jnp.zeros_like, factors),
    inverse_diagonal=jax.tree.map(jnp.zeros_like, diagonal),
    eigenvalues=jax.tree.map(lambda slot: jnp.zeros(slot.shape[:1], slot.dtype), factors),
    num_estimates=jnp.zeros((), jnp.int32),
  )


def _slot_axes(layer: layers_lib.DenseLayer) -> tuple[int, int]:
  """The kernel axes whose slots hold :math:`A` and :math:`G`."""
  return layer.kernel_in_axis, 1 - layer.kernel_in_axis


def _block_dims(layer: layers_lib.DenseLayer, slots: tuple) -> tuple[int, int]:
  """The sides of a layer's :math:`A` and :math:`G` within its kernel's slots."""
  axis_a, axis_g = _slot_axes(layer)
  return slots[axis_a].shape[0] - (layer.bias is None), slots[axis_g].shape[0] - 1


def _gather(slots_by_leaf: tuple, layout: layers_lib.LayerLayout) -> tuple[tuple, tuple]:
  """Per-layer ``(A-side blocks, G-side blocks)`` read from leaf slots (matrices or vectors:
  each slot's top-left corner)."""
  a_blocks, g_blocks = [], []
  for layer in layout.layers:
    axis_a, axis_g = _slot_axes(layer)
    slots = slots_by_leaf[layer.kernel]
    dim_a, dim_g = _block_dims(layer, slots)
    a_blocks.append(slots[axis_a][(slice(dim_a),) * slots[axis_a].ndim])
    g_blocks.append(slots[axis_g][(slice(dim_g),) * slots[axis_g].ndim])
  return tuple(a_blocks), tuple(g_blocks)


def _gather_diagonal(diagonal: tuple, layout: layers_lib.LayerLayout) -> tuple:
  return tuple(diagonal[i] for i in layout.unmatched)


def _scatter(
  like: tuple, a_blocks: tuple, g_blocks: tuple, layout: layers_lib.LayerLayout
) -> tuple:
  """Leaf slots like ``like`` holding per-layer blocks; the inverse of :func:`_gather`."""
  slots_by_leaf = [list(slots) for slots in like]
  for layer, a, g in zip(layout.layers, a_blocks, g_blocks, strict=True):
    slots = slots_by_leaf[layer.kernel]
    for axis, block in zip(_slot_axes(layer), (a, g), strict=True):
      corner = (slice(block.shape[0]),) * block.ndim
      slots[axis] = jnp.zeros_like(slots[axis]).at[corner].set(block.astype(slots[axis].dtype))
  return tuple(tuple(slots) for slots in slots_by_leaf)


def _scatter_diagonal(like: tuple, diagonals: tuple, layout: layers_lib.LayerLayout) -> tuple:
  diagonal = list(like)
  for i, d in zip(layout.unmatched, diagonals, strict=True):
    diagonal[i] = d.astype(like[i].dtype)
  return tuple(diagonal)


def kfac_state_update(
  state: KFACState,
  new: KFACFactors,
  damping: float | jax.Array,
  layout: layers_lib.LayerLayout,
  *,
  decay: float = 0.0,
  diagonal_exponent: float = 1.0,
  tikhonov: str = "factored",
  invert: bool = True,
) -> KFACState:
  """Averages a fresh estimate into ``state`` and refreshes what its preconditioner needs.

  The factors become ``decay * old + (1 - decay) * new`` (``new`` alone for the first
  estimate, see :func:`kfac_update_factors`); a non-finite estimate leaves the state as it
  was, inverses included, so one bad batch never spoils the running factors. Then, unless
  ``invert=False``, :func:`kfac_state_invert` refreshes the inverses from the averaged
  factors.
  """
  _check_tikhonov(tikhonov)
  a_old, g_old = _gather(state.factors, layout)
  d_old = _gather_diagonal(state.diagonal, layout)
  old = KFACFactors(a_old, g_old, d_old, state.num_estimates)
  averaged = kfac_update_factors(old, new, decay)
  updated = state._replace(
    factors=_scatter(state.factors, averaged.a_factors, averaged.g_factors, layout),
    diagonal=_scatter_diagonal(state.diagonal, averaged.diagonal, layout),
    num_estimates=averaged.count,
  )
  if invert:
    updated = kfac_state_invert(
      updated, damping, layout, diagonal_exponent=diagonal_exponent, tikhonov=tikhonov
    )
  return optax.tree.where(all_finite(new), updated, state)


def kfac_state_invert(
  state: KFACState,
  damping: float | jax.Array,
  layout: layers_lib.LayerLayout,
  *,
  diagonal_exponent: float = 1.0,
  tikhonov: str = "factored",
) -> KFACState:
  """``state`` with what its preconditioner needs rebuilt from its factors as they are.

  With ``tikhonov="factored"``, their inverses damped by ``damping``; with ``"exact"``,
  their eigendecompositions (the damping enters only in :func:`kfac_state_preconditioner`,
  so it may change every step while the decompositions are refreshed every few). Separate
  from :func:`kfac_state_update` so that the factors can be averaged every step and the
  inverses, whose cost grows with the cube of the layer widths, refreshed every few.
  """
  _check_tikhonov(tikhonov)
  a_blocks, g_blocks = _gather(state.factors, layout)
  diagonal = _gather_diagonal(state.diagonal, layout)
  factors = KFACFactors(a_blocks, g_blocks, diagonal, state.num_estimates)
  if tikhonov == "exact":
    a_values, a_vectors, g_values, g_vectors = _eigenbases(factors)
    inverse_factors = _scatter(state.inverse_factors, a_vectors, g_vectors, layout)
    eigenvalues = _scatter(state.eigenvalues, a_values, g_values, layout)
    diagonal_inverses = _diagonal_inverses(diagonal, damping, diagonal_exponent)
  else:
    inverse = kfac_inverse(factors, damping, diagonal_exponent=diagonal_exponent)
    inverse_factors = _scatter(
      state.inverse_factors, inverse.a_inverses, inverse.g_inverses, layout
    )
    eigenvalues = state.eigenvalues
    diagonal_inverses = inverse.diagonal_inverses
  inverse_diagonal = _scatter_diagonal(state.inverse_diagonal, diagonal_inverses, layout)
  return state._replace(
    inverse_factors=inverse_factors, inverse_diagonal=inverse_diagonal, eigenvalues=eigenvalues
  )


def kfac_state_preconditioner(
  state: KFACState,
  layout: layers_lib.LayerLayout,
  damping: float | jax.Array | None = None,
  *,
  diagonal_exponent: float = 1.0,
  tikhonov: str = "factored",
) -> Callable[[Any], Any]:
  """The preconditioner ``r -> z`` of ``state`` (see :func:`kfac_apply`).

  Args:
    state: refreshed by :func:`kfac_state_update` with the same ``tikhonov``.
    layout: the layout the factors were estimated with.
    damping: :math:`\\lambda` for ``tikhonov="exact"`` (required there), which damps the
      stored eigendecompositions now; the factored inverses carry the damping of their
      refresh, so ``"factored"`` ignores it.
    diagonal_exponent: as in :func:`kfac_inverse`, for ``"exact"``.
    tikhonov: ``"factored"`` or ``"exact"``, as the state was refreshed.
  """
  _check_tikhonov(tikhonov)
  if tikhonov == "factored":
    a_inv, g_inv = _gather(state.inverse_factors, layout)
    d_inv = _gather_diagonal(state.inverse_diagonal, layout)
    return functools.partial(kfac_apply, KFACInverse(a_inv, g_inv, d_inv), layout=layout)
  if damping is None:
    raise ValueError('kfac_state_preconditioner(tikhonov="exact") needs the damping.')
  a_vectors, g_vectors = _gather(state.inverse_factors, layout)
  a_values, g_values = _gather(state.eigenvalues, layout)
  inverse = _eigen_inverse(
    (a_values, a_vectors, g_values, g_vectors),
    _gather_diagonal(state.diagonal, layout),
    jnp.asarray(damping),
    diagonal_exponent,
  )
  return functools.partial(kfac_apply, inverse, layout=layout)
