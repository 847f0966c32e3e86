"""Sample-size schedules for the gradient and curvature samples, and a batch sampler.

Sainath et al. (2013) grow the data used for the gradient and for the CG curvature products
over the outer steps instead of fixing it. A schedule here is a static description
(:class:`SampleSchedule`); its state (:class:`SamplingState`) lives in the optimizer state,
and the data pipeline reads the next sizes with :func:`sample_sizes` and draws arrays of
exactly those sizes (:class:`BatchSampler`), so a smaller sample really is less work.

Sizes are rounded up to a geometric grid ``start * grid_ratio**k`` (capped at ``maximum``),
so a run compiles the update for at most about ``log(maximum / start) / log(grid_ratio) + 2``
distinct batch shapes.

The host can follow a fixed or geometric schedule without reading the state
(:meth:`SampleSchedule.grow`, :meth:`SampleSchedule.round_up`): the step grows the float32
target by one multiplication and rounds it by comparisons with a static float32 table, which
give the same bits on every backend, so a training loop can draw the next batch while the
device is still busy with the last step.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax


class SampleSchedule(NamedTuple):
  """A static sample-size schedule; build one with :func:`fixed_schedule`,
  :func:`geometric_schedule`, :func:`variance_test_schedule` or :func:`held_out_schedule`.

  Attributes:
    kind: ``"fixed"``, ``"geometric"``, ``"variance"`` or ``"held_out"``.
    start: the first size.
    maximum: the largest size (e.g. the training-set size).
    factor: growth per outer step (geometric), or per uphill step (held out).
    theta: Byrd et al.'s :math:`\\theta` (variance test).
    grid_ratio: ratio between consecutive allowed sizes.
  """

  kind: str
  start: int
  maximum: int
  factor: float = 1.0
  theta: float = 0.0
  grid_ratio: float = 2.0

  def grid(self) -> list[int]:
    """Every size this schedule can produce, ascending."""
    return sorted(set(_grid_table(self)[1]))

  def round_up(self, target: float) -> int:
    """``target`` (the float32 target a state holds) rounded up to the grid, on the host.

    The same float32 comparisons as the step makes, so it agrees with the step's
    ``gradient_sample_size`` / ``curvature_sample_size`` bit for bit on any backend.
    """
    thresholds, sizes = _grid_table(self)
    return sizes[int(np.sum(np.float32(target) > thresholds))]

  def grow(self, target: float) -> np.float32:
    """The target of the next outer step after ``target``, on the host, in float32 as the
    step computes it; only fixed and geometric schedules grow without the step's gradients."""
    grows_from = {"variance": "variance-test", "held_out": "held-out"}
    if self.kind in grows_from:
      raise ValueError(
        f"a {grows_from[self.kind]} schedule grows from the step's measurements: read its "
        "sizes from the state (hfjax.sample_sizes)."
      )
    target = np.float32(target)
    if self.kind == "geometric":
      target = target * np.float32(self.factor)
    return np.minimum(target, np.float32(self.maximum))


def _check_sizes(start: int, maximum: int) -> None:
  if int(start) != start or start < 1:
    raise ValueError(f"sample size start must be an integer >= 1, got {start!r}.")
  if int(maximum) != maximum or maximum < start:
    raise ValueError(f"sample size maximum must be an integer >= start={start}, got {maximum!r}.")


def fixed_schedule(size: int) -> SampleSchedule:
  """The same sample size at every step."""
  _check_sizes(size, size)
  return SampleSchedule("fixed", int(size), int(size))


def geometric_schedule(
  start: int, maximum: int, factor: float = 1.2, grid_ratio: float = 2.0
) -> SampleSchedule:
  """Sizes that grow by ``factor`` per outer step, from ``start`` to ``maximum``.

  The unrounded target grows geometrically; the size drawn is the target rounded up to the
  grid ``start * grid_ratio**k``.
  """
  _check_sizes(start, maximum)
  if not factor >= 1.0:
    raise ValueError(f"geometric growth factor must be >= 1, got {factor!r}.")
  if not grid_ratio > 1.0:
    raise ValueError(f"grid_ratio must be > 1, got {grid_ratio!r}.")
  return SampleSchedule("geometric", int(start), int(maximum), float(factor), 0.0, grid_ratio)


def variance_test_schedule(
  start: int, maximum: int, theta: float = 0.5, grid_ratio: float = 2.0
) -> SampleSchedule:
  """Byrd, Chin, Nocedal & Wu's (2012) variance ("norm") test for the gradient sample.

  With per-example gradients :math:`g_i` on the current sample :math:`S`, the sample grows
  when

  .. math::

    \\frac{\\| \\operatorname{Var}_{i \\in S}(g_i) \\|_1}{|S|} > \\theta^2 \\|\\nabla J_S\\|^2,
    \\quad\\text{to}\\quad |S| = \\frac{\\| \\operatorname{Var}_{i \\in S}(g_i) \\|_1}
      {\\theta^2 \\|\\nabla J_S\\|^2}.

  Cost: the test needs the sum of squared per-example gradients over the gradient sample,
  about one extra backward pass per example, computed ``chunk_size`` examples at a time
  (:func:`hfjax.squared_gradient_sum`), so with the default chunking it roughly doubles
  the cost of the gradient for each outer step. It applies to the gradient sample only.

  References:
    Byrd, Chin, Nocedal & Wu, "Sample size selection in optimization methods for machine
    learning", Math. Program. 2012.
  """
  _check_sizes(start, maximum)
  if not theta > 0:
    raise ValueError(f"variance test theta must be > 0, got {theta!r}.")
  if not grid_ratio > 1.0:
    raise ValueError(f"grid_ratio must be > 1, got {grid_ratio!r}.")
  return SampleSchedule("variance", int(start), int(maximum), 1.0, float(theta), grid_ratio)


def held_out_schedule(
  start: int, maximum: int, factor: float = 2.0, grid_ratio: float = 2.0
) -> SampleSchedule:
  """Grows the sample by ``factor`` after each step that made the held-out loss rise.

  "Rise" is judged as :class:`hfjax.DampingConfig` judges :math:`\\rho`: the mean
  per-example change of the loss on ``validation_batch`` is positive by more than
  ``DampingConfig.significance`` standard errors. In the stochastic regime, once the
  damping dominates the curvature the step is about :math:`-g_S / \\lambda`, and whether it
  goes uphill on held-out data no longer depends on :math:`\\lambda`: the minibatch
  gradient's noise has outgrown its signal, which only a larger sample fixes (the same
  question as Byrd et al.'s variance test, answered from the losses the step already
  evaluates instead of per-example gradients). Needs a held-out ``validation_batch`` at
  every ``update`` and ``significance > 0``. It can drive the gradient and the curvature
  sample alike.
  """
  _check_sizes(start, maximum)
  if not factor > 1.0:
    raise ValueError(f"held-out growth factor must be > 1, got {factor!r}.")
  if not grid_ratio > 1.0:
    raise ValueError(f"grid_ratio must be > 1, got {grid_ratio!r}.")
  return SampleSchedule("held_out", int(start), int(maximum), float(factor), 0.0, grid_ratio)


@functools.cache
def _grid_table(schedule: SampleSchedule) -> tuple[np.ndarray, tuple[int, ...]]:
  """``(thresholds, sizes)``: a target ``t`` gets ``sizes[#{thresholds < t}]``.

  ``sizes[k]`` is ``round(start * grid_ratio**k)`` capped at ``maximum`` (the last one is
  ``maximum``); ``thresholds[k]``, in float32, is the grid point ``start * grid_ratio**k`` with a
  relative slack of about ``1e-6 log(grid_ratio)``, so that a target a rounding error above a
  grid point keeps that point's size.
  """
  if not schedule.grid_ratio > 1.0:
    raise ValueError(f"grid_ratio must be > 1, got {schedule.grid_ratio!r}.")
  thresholds, sizes, k = [], [], 0
  while True:
    point = schedule.start * schedule.grid_ratio**k
    sizes.append(min(schedule.maximum, round(point)))
    if sizes[-1] >= schedule.maximum:
      return np.array(thresholds, np.float32), tuple(sizes)
    thresholds.append(point * schedule.grid_ratio**1e-6)
    k += 1


def _round_up(target: jax.Array, schedule: SampleSchedule) -> jax.Array:
  """Device twin of :meth:`SampleSchedule.round_up`: comparisons only, exact everywhere."""
  thresholds, sizes = _grid_table(schedule)
  index = jnp.sum(target[..., None] > jnp.asarray(thresholds), axis=-1)
  return jnp.asarray(sizes, jnp.int32)[index]


class SamplingState(NamedTuple):
  """Sample sizes for the next outer step, kept in the optimizer state.

  Attributes:
    gradient_sample_size: examples to draw for the next gradient batch, int32.
    curvature_sample_size: examples for the next curvature batch, int32.
    gradient_target: unrounded target behind ``gradient_sample_size``, float32.
    curvature_target: unrounded target behind ``curvature_sample_size``, float32.
  """

  gradient_sample_size: jax.Array
  curvature_sample_size: jax.Array
  gradient_target: jax.Array
  curvature_target: jax.Array


def sampling_init(gradient: SampleSchedule, curvature: SampleSchedule) -> SamplingState:
  """The sizes of the first step."""
  return SamplingState(
    gradient_sample_size=jnp.asarray(gradient.start, jnp.int32),
    curvature_sample_size=jnp.asarray(curvature.start, jnp.int32),
    gradient_target=jnp.asarray(gradient.start, jnp.float32),
    curvature_target=jnp.asarray(curvature.start, jnp.float32),
  )


def _next_target(
  schedule: SampleSchedule,
  target: jax.Array,
  variance_l1: jax.Array,
  grad_sq_norm: jax.Array,
  uphill: jax.Array,
) -> jax.Array:
  if schedule.kind == "geometric":
    target = target * jnp.float32(schedule.factor)  # as SampleSchedule.grow, bit for bit
  elif schedule.kind == "held_out":
    target = jnp.where(uphill, target * jnp.float32(schedule.factor), target)
  elif schedule.kind == "variance":
    # Byrd et al.'s test, written without the division so that a zero gradient grows to the
    # maximum instead of producing inf/nan.
    theta2 = schedule.theta**2
    current = target
    wanted = variance_l1 / jnp.maximum(theta2 * grad_sq_norm, jnp.finfo(jnp.float32).tiny)
    grow = variance_l1 > theta2 * grad_sq_norm * current
    target = jnp.where(grow & jnp.isfinite(wanted), jnp.maximum(wanted, current), current)
  return jnp.minimum(target, schedule.maximum).astype(jnp.float32)


def sampling_update(
  state: SamplingState,
  gradient: SampleSchedule,
  curvature: SampleSchedule,
  *,
  variance_l1: jax.Array | None = None,
  grad_sq_norm: jax.Array | None = None,
  uphill: jax.Array | None = None,
) -> SamplingState:
  """Advances both schedules by one outer step.

  Args:
    state: the current sizes.
    gradient: the gradient-sample schedule.
    curvature: the curvature-sample schedule.
    variance_l1: :math:`\\|\\operatorname{Var}_i(g_i)\\|_1` on the last gradient sample
      (needed by a variance-test schedule).
    grad_sq_norm: :math:`\\|\\nabla J_S\\|^2` on that sample.
    uphill: whether the last step raised the held-out loss significantly (needed by a
      held-out schedule).

  Returns:
    The sizes for the next step.
  """
  zero = jnp.zeros((), jnp.float32)
  variance_l1 = zero if variance_l1 is None else variance_l1
  grad_sq_norm = zero if grad_sq_norm is None else grad_sq_norm
  uphill = jnp.array(False) if uphill is None else uphill
  g_target = _next_target(gradient, state.gradient_target, variance_l1, grad_sq_norm, uphill)
  c_target = _next_target(curvature, state.curvature_target, variance_l1, grad_sq_norm, uphill)
  return SamplingState(
    gradient_sample_size=_round_up(g_target, gradient),
    curvature_sample_size=_round_up(c_target, curvature),
    gradient_target=g_target,
    curvature_target=c_target,
  )


def gradient_variance_l1(sum_g: Any, sum_g2: Any, n: int) -> jax.Array:
  """:math:`\\|\\operatorname{Var}_i(g_i)\\|_1` (unbiased) from per-example gradient sums."""
  if n < 2:
    return jnp.zeros((), jnp.float32)
  mean_sq = jax.tree.map(lambda s, s2: (s2 - s * s / n) / (n - 1), sum_g, sum_g2)
  return optax.tree.sum(jax.tree.map(lambda v: jnp.maximum(v, 0), mean_sq)).astype(jnp.float32)


def sample_sizes(state: Any) -> tuple[int, int]:
  """``(gradient_size, curvature_size)`` for the next step, read from an optimizer state.

  Works on the state of :func:`hfjax.hessian_free` alone or inside an ``optax.chain``.
  This reads device values, so call it outside ``jax.jit`` in the data pipeline.
  """
  g = optax.tree.get(state, "gradient_sample_size")
  c = optax.tree.get(state, "curvature_sample_size")
  if g is None or c is None:
    raise ValueError(
      "state holds no sampling schedule: it is not a hessian_free state, or one made "
      "without gradient_schedule and curvature_schedule (the caller picks the sizes then)."
    )
  return int(g), int(c)


class BatchSampler:
  """Draws batches of any size from in-memory arrays, without replacement within an epoch.

  Args:
    data: a pytree of arrays sharing a leading example axis, e.g. ``(inputs, targets)``.
    seed: seed of the shuffling.

  Example:

    >>> import numpy as np, hfjax
    >>> sampler = hfjax.BatchSampler((np.arange(10.0), np.arange(10.0)), seed=0)
    >>> inputs, targets = sampler.sample(4)
    >>> inputs.shape
    (4,)
  """

  def __init__(self, data: Any, seed: int = 0):
    leaves = jax.tree.leaves(data)
    if not leaves:
      raise ValueError("BatchSampler needs at least one array.")
    sizes = {np.shape(leaf)[0] for leaf in leaves}
    if len(sizes) != 1:
      raise ValueError(f"arrays disagree on the number of examples: {sorted(sizes)}.")
    self.data = data
    self.num_examples = sizes.pop()
    self._rng = np.random.default_rng(seed)
    self._order = self._rng.permutation(self.num_examples)
    self._position = 0
    self.epoch = 0

  def _indices(self, size: int) -> np.ndarray:
    if not 1 <= size <= self.num_examples:
      raise ValueError(f"batch size must be in [1, {self.num_examples}], got {size}.")
    taken = []
    while size > 0:
      if self._position == self.num_examples:
        self._order = self._rng.permutation(self.num_examples)
        self._position = 0
        self.epoch += 1
      chunk = self._order[self._position : self._position + size]
      self._position += len(chunk)
      size -= len(chunk)
      taken.append(chunk)
    return np.concatenate(taken)

  def state_dict(self) -> dict[str, Any]:
    """The sampler's position as a JSON-serialisable dict (for checkpoints).

    It holds the shuffling generator's state, the current epoch's order, the position in it
    and the epoch, so that :meth:`load_state_dict` continues with exactly the same batches.
    """
    return {
      "num_examples": int(self.num_examples),
      "bit_generator": _jsonable(self._rng.bit_generator.state),
      "order": self._order.tolist(),
      "position": int(self._position),
      "epoch": int(self.epoch),
    }

  def load_state_dict(self, state: dict[str, Any]) -> BatchSampler:
    """Moves this sampler (built on the same data) to a position from :meth:`state_dict`."""
    if state["num_examples"] != self.num_examples:
      raise ValueError(
        f"the saved sampler drew from {state['num_examples']} examples, this one has "
        f"{self.num_examples}; restore it on the same data."
      )
    self._rng.bit_generator.state = state["bit_generator"]
    self._order = np.asarray(state["order"], dtype=self._order.dtype)
    self._position = int(state["position"])
    self.epoch = int(state["epoch"])
    return self

  def sample(self, size: int) -> Any:
    """The next ``size`` examples of the current epoch (crossing into the next if needed)."""
    idx = self._indices(int(size))
    return jax.tree.map(lambda a: np.asarray(a)[idx], self.data)

  def sample_pair(self, gradient_size: int, curvature_size: int) -> tuple[Any, Any]:
    """A gradient batch and a curvature batch: the curvature batch is the first
    ``curvature_size`` examples of the gradient batch when it fits, else a separate draw."""
    batch = self.sample(gradient_size)
    if curvature_size <= gradient_size:
      return batch, jax.tree.map(lambda a: a[:curvature_size], batch)
    return batch, self.sample(curvature_size)


def _jsonable(value: Any) -> Any:
  if isinstance(value, dict):
    return {k: _jsonable(v) for k, v in value.items()}
  if isinstance(value, (np.ndarray, np.generic)):
    return value.tolist()
  return value
