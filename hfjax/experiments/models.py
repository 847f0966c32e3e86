"""Models and matching losses for the Hessian-free benchmarks.

The models are Flax linen modules that return pre-activation outputs (logits), and every loss
here applies the output non-linearity itself. Each pair is a *matching* loss, so the
Gauss-Newton matrix :math:`J^\\top H_L J` is positive semidefinite:

- :class:`DeepAutoencoder` with :func:`sigmoid_cross_entropy` (logistic outputs),
- :class:`MLPClassifier` with :func:`softmax_cross_entropy` (softmax outputs),
- any linear-output model with :func:`squared_error`.

Every loss has the signature ``loss_fn(outputs, targets) -> scalar`` that
:func:`hfjax.gauss_newton_matvec` and :func:`hfjax.hessian_free` take: summed over the
features of an example, averaged over the leading (batch) axis. :func:`make_apply_fn` turns a
module into the matching ``apply_fn(params, inputs)``.

Example:

  >>> import jax, jax.numpy as jnp
  >>> from hfjax.experiments import models
  >>> model = models.DeepAutoencoder(models.CURVES_ENCODER)
  >>> params = model.init(jax.random.key(0), jnp.zeros((1, 784)))["params"]
  >>> apply_fn = models.make_apply_fn(model)
  >>> x = jnp.full((2, 784), 0.5)
  >>> float(models.sigmoid_cross_entropy(apply_fn(params, x), x)) > 0
  True
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn
from flax import nnx

Initializer = Callable[..., jax.Array]

# Layer sizes of the encoders in Hinton & Salakhutdinov (2006) and Martens (2010); the
# decoders mirror them.
CURVES_ENCODER = (400, 200, 100, 50, 25, 6)
MNIST_ENCODER = (1000, 500, 250, 30)

_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
  "sigmoid": nn.sigmoid,
  "tanh": jnp.tanh,
  "relu": nn.relu,
}


@functools.partial(jax.jit, static_argnums=(2, 3, 4, 5))
def _sparse_kernel(
  key: jax.Array, scale: float, fan_in: int, fan_out: int, dtype: Any, num_nonzero: int
) -> jax.Array:
  # Compiling the random number generator is most of the cost of initialising a model, so
  # this is jitted (one compilation per layer shape, not one per operation, when the model is
  # initialised outside jit) and makes a single draw: its first `fan_in` rows rank the rows
  # of each column, the other `num_nonzero` rows are the weights.
  draws = jax.random.normal(
    key, (fan_in + num_nonzero, fan_out), jnp.promote_types(dtype, jnp.float32)
  )
  # Ranking i.i.d. continuous draws gives each column an independent random permutation of its
  # rows. The double argsort makes the ranks distinct, so exactly `num_nonzero` survive even
  # when draws tie; drawing in at least float32 keeps ties (a bias to low rows) rare.
  rank = jnp.argsort(jnp.argsort(draws[:fan_in], axis=0), axis=0)
  weights = jnp.take_along_axis(draws[fan_in:], jnp.minimum(rank, num_nonzero - 1), axis=0)
  return jnp.where(rank < num_nonzero, scale * weights, 0.0).astype(dtype)


def sparse_init(num_nonzero: int = 15, scale: float = 1.0) -> Initializer:
  """Martens' sparse initialisation: a few large incoming weights per unit, the rest zero.

  Each output unit (column of a ``(fan_in, fan_out)`` kernel) gets exactly
  ``min(num_nonzero, fan_in)`` non-zero incoming weights, at distinct rows chosen uniformly at
  random and drawn from :math:`N(0, \\text{scale}^2)`. Unlike dense initialisations scaled by
  :math:`1/\\sqrt{\\text{fan\\_in}}`, the units start out different from each other and their
  total input does not shrink with the width of the layer below, which lets deep sigmoid
  networks train without pre-training. For kernels of more than two dimensions (convolutions)
  every axis but the last counts as fan-in.

  Args:
    num_nonzero: Number of non-zero incoming weights per unit (15 in the paper).
    scale: Standard deviation of the non-zero weights.

  Returns:
    An initializer ``init(key, shape, dtype=jnp.float32) -> jax.Array`` usable as a Flax
    ``kernel_init``.

  Raises:
    ValueError: If ``num_nonzero`` is below 1 or ``scale`` is negative (eagerly), or, when
      called, if ``shape`` has fewer than two dimensions.

  References:
    Martens, `Deep learning via Hessian-free optimization
    <https://www.cs.toronto.edu/~jmartens/docs/Deep_HessianFree.pdf>`_, ICML 2010.
  """
  if num_nonzero < 1:
    raise ValueError(f"num_nonzero must be >= 1; got {num_nonzero}.")
  if scale < 0:
    raise ValueError(f"scale must be >= 0; got {scale}.")

  def init(key: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32) -> jax.Array:
    shape = tuple(shape)
    if len(shape) < 2:
      raise ValueError(f"sparse_init needs a kernel of at least 2 dimensions; got {shape}.")
    fan_in = math.prod(shape[:-1])
    count = min(num_nonzero, fan_in)
    kernel = _sparse_kernel(key, scale, fan_in, shape[-1], jnp.dtype(dtype), count)
    return kernel.reshape(shape)

  return init


class DeepAutoencoder(nn.Module):
  """The deep autoencoder of Hinton & Salakhutdinov (2006), as trained by Martens (2010).

  Encoder ``d -> encoder_sizes[0] -> ... -> encoder_sizes[-1]`` and the mirrored decoder
  back to ``d``, the input size, read from the inputs. Hidden units are logistic, the code
  layer is linear, and the output layer returns logits: pair it with
  :func:`sigmoid_cross_entropy` for training and :func:`reconstruction_error` for reporting.
  Kernels use :func:`sparse_init`, biases start at zero.

  Layers are named ``encoder_0 ... encoder_{k-1}`` (the last is the code layer) and
  ``decoder_0 ... decoder_{k-1}`` (the last is the output layer), ``k = len(encoder_sizes)``.

  Attributes:
    encoder_sizes: Widths of the encoder layers, the last being the code size, e.g.
      :data:`CURVES_ENCODER` or :data:`MNIST_ENCODER`.
    kernel_init: Initializer of every kernel.
  """

  encoder_sizes: Sequence[int]
  kernel_init: Initializer = sparse_init()

  @nn.compact
  def __call__(self, inputs: jax.Array) -> jax.Array:
    """Returns the reconstruction logits, of the shape of ``inputs`` ``(..., d)``."""
    if not self.encoder_sizes:
      raise ValueError("encoder_sizes must name at least the code layer.")
    decoder_sizes = (*reversed(self.encoder_sizes[:-1]), inputs.shape[-1])
    x = inputs
    for i, size in enumerate(self.encoder_sizes):
      x = nn.Dense(size, kernel_init=self.kernel_init, name=f"encoder_{i}")(x)
      if i < len(self.encoder_sizes) - 1:
        x = nn.sigmoid(x)
    for i, size in enumerate(decoder_sizes):
      x = nn.Dense(size, kernel_init=self.kernel_init, name=f"decoder_{i}")(x)
      if i < len(decoder_sizes) - 1:
        x = nn.sigmoid(x)
    return x


class MLPClassifier(nn.Module):
  """A feed-forward classifier returning logits, like the paper's acoustic-model DNNs.

  Pair it with :func:`softmax_cross_entropy` for training and :func:`accuracy` for reporting.

  Attributes:
    hidden_sizes: Widths of the hidden layers.
    num_classes: Number of classes (width of the output layer).
    activation: Hidden non-linearity: ``"sigmoid"`` (the paper's, and the default),
      ``"tanh"``, ``"relu"``, or any callable.
    kernel_init: Initializer of every kernel (:func:`sparse_init` by default, as in Martens'
      Hessian-free experiments).
  """

  hidden_sizes: Sequence[int]
  num_classes: int
  activation: str | Callable[[jax.Array], jax.Array] = "sigmoid"
  kernel_init: Initializer = sparse_init()

  @nn.compact
  def __call__(self, inputs: jax.Array) -> jax.Array:
    """Returns logits of shape ``(..., num_classes)``."""
    if callable(self.activation):
      activation = self.activation
    elif self.activation in _ACTIVATIONS:
      activation = _ACTIVATIONS[self.activation]
    else:
      raise ValueError(
        f"Unknown activation {self.activation!r}; use a callable or one of "
        f"{', '.join(_ACTIVATIONS)}."
      )
    x = inputs
    for i, size in enumerate(self.hidden_sizes):
      x = activation(nn.Dense(size, kernel_init=self.kernel_init, name=f"hidden_{i}")(x))
    return nn.Dense(self.num_classes, kernel_init=self.kernel_init, name="output")(x)


def make_apply_fn(module: nn.Module | nnx.Module) -> Callable[[Any, Any], Any]:
  """Returns ``apply_fn(params, inputs) -> outputs`` for a Flax module.

  For a linen module, ``params`` is the plain parameter dict, ``variables["params"]`` from
  ``module.init``. For an NNX module, ``params`` is ``nnx.state(module, nnx.Param)``; any
  other state of the module (batch statistics, RNG counters) is frozen at its current value.

  Args:
    module: A ``flax.linen.Module`` or a ``flax.nnx.Module``.

  Returns:
    A pure function of ``(params, inputs)``, as :func:`hfjax.gauss_newton_matvec` and
    :func:`hfjax.hessian_free` take.

  Example (NNX):

    >>> from flax import nnx
    >>> layer = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    >>> apply_fn = make_apply_fn(layer)
    >>> apply_fn(nnx.state(layer, nnx.Param), jnp.ones((4, 3))).shape
    (4, 2)
  """
  if isinstance(module, nnx.Module):
    graphdef, _, rest = nnx.split(module, nnx.Param, ...)

    def apply_nnx(params: Any, inputs: Any) -> Any:
      return nnx.merge(graphdef, params, rest)(inputs)

    return apply_nnx

  def apply_linen(params: Any, inputs: Any) -> Any:
    return module.apply({"params": params}, inputs)

  return apply_linen


def _batch_mean_of_sums(values: jax.Array) -> jax.Array:
  # Sum over every feature axis, mean over the leading batch axis.
  return jnp.sum(values) / values.shape[0]


def sigmoid_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Binary cross-entropy of ``sigmoid(logits)`` against ``targets`` in :math:`[0, 1]`.

  .. math::

    L = \\frac{1}{B} \\sum_{b, j} -t_{bj} \\log \\sigma(z_{bj})
        - (1 - t_{bj}) \\log (1 - \\sigma(z_{bj}))

  Targets may be intensities rather than bits (the autoencoders' pixels), in which case the
  minimum is the targets' entropy, not zero.

  Args:
    logits: Outputs of shape ``(batch, ...)``.
    targets: Targets of the same shape.

  Returns:
    The scalar loss, summed over features and averaged over the batch.
  """
  # softplus(z) - t z is the same function as -t log(sigmoid(z)) - (1 - t) log(1 - sigmoid(z))
  # (optax.sigmoid_binary_cross_entropy) in one softplus instead of two log-sigmoids, which
  # leaves fewer batch-sized residuals in a Gauss-Newton product: a CG solve on the MNIST
  # autoencoder with a batch of 1000 holds 1.2 parameter vectors less.
  return _batch_mean_of_sums(jax.nn.softplus(logits) - targets * logits)


def softmax_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Cross-entropy of ``softmax(logits)`` against integer ``labels``, averaged over the batch.

  Args:
    logits: Outputs of shape ``(batch, num_classes)``.
    labels: Integer class labels of shape ``(batch,)``.

  Returns:
    The scalar loss.
  """
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))


def squared_error(outputs: jax.Array, targets: jax.Array) -> jax.Array:
  """Half the squared error, summed over features and averaged over the batch.

  .. math::

    L = \\frac{1}{B} \\sum_{b, j} \\tfrac{1}{2} (y_{bj} - t_{bj})^2

  The matching loss of a linear output layer; the one half makes its Hessian the identity
  (divided by the batch size).

  Args:
    outputs: Outputs of shape ``(batch, ...)``.
    targets: Targets of the same shape.

  Returns:
    The scalar loss.
  """
  return _batch_mean_of_sums(0.5 * jnp.square(outputs - targets))


def reconstruction_error(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Squared error of ``sigmoid(logits)`` per example, the autoencoders' reported error.

  .. math::

    E = \\frac{1}{B} \\sum_{b, j} (\\sigma(z_{bj}) - t_{bj})^2

  This is the number Hinton & Salakhutdinov (2006) and Martens (2010) report for the CURVES
  and MNIST autoencoders; it is a metric, not the training loss.

  Args:
    logits: Outputs of a :class:`DeepAutoencoder`, shape ``(batch, ...)``.
    targets: Targets of the same shape.

  Returns:
    The scalar error.
  """
  return _batch_mean_of_sums(jnp.square(jax.nn.sigmoid(logits) - targets))


def accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Fraction of examples whose largest logit is at the label.

  Args:
    logits: Outputs of shape ``(batch, num_classes)``.
    labels: Integer class labels of shape ``(batch,)``.

  Returns:
    The scalar accuracy in :math:`[0, 1]`.
  """
  return jnp.mean(jnp.argmax(logits, axis=-1) == labels)
