"""``hfjax.hessian_free``: Hessian-free optimization as an Optax transformation.

One outer step (``update_fn`` in :func:`hessian_free`) is an outline over the phases below,
each a module-level function that can be read and tested alone:

1. resolve the batches and the problem of the step (:func:`_resolve_batches`, :func:`_resolve`);
2. build the preconditioner (:func:`_build_preconditioner`: one entry per option in
   ``_PRECONDITIONERS``);
3. minimise the damped quadratic model with :func:`hfjax.cg` (:func:`_solve`);
4. CG backtracking over the recorded iterates (:func:`_backtrack`);
5. Armijo line search along the chosen iterate (:func:`_line_search`);
6. Levenberg-Marquardt damping (:func:`_adapt_damping`);
7. the L-BFGS pairs and sample sizes for the next step (:func:`_next_lbfgs`,
   :func:`_next_sampling`);
8. diagnostics (:func:`_diagnostics`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, Literal, NamedTuple, get_args

import jax
import jax.numpy as jnp
import optax

from hfjax import curvature, kfac, layers, precision, sampling
from hfjax._tree import all_finite, as_accumulation, finite_or
from hfjax.preconditioners import LBFGSState, diagonal_preconditioner, lbfgs_init
from hfjax.solvers import CGResult, CGStopReason, cg

PreconditionerName = Literal["none", "martens", "jacobi", "lbfgs", "kfac", "kfac+lbfgs"]
"""The ``preconditioner`` option of :func:`hessian_free` (see ``_PRECONDITIONERS``)."""

LBFGSPairs = Literal["within", "previous"]
"""Where the L-BFGS pairs come from: the solve itself (flexible PCG) or the previous solve."""

PRECONDITIONERS: tuple[str, ...] = get_args(PreconditionerName)
LBFGS_PAIRS: tuple[str, ...] = get_args(LBFGSPairs)


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
  if value not in choices:
    raise ValueError(f"unknown {name} {value!r}; choose one of {choices}.")


def _positive(name: str, value: float) -> None:
  if not value > 0:
    raise ValueError(f"{name} must be > 0, got {value!r}.")


def _positive_int(name: str, value: int) -> None:
  if int(value) != value or value < 1:
    raise ValueError(f"{name} must be an integer >= 1, got {value!r}.")


class DampingConfig(NamedTuple):
  """Levenberg-Marquardt damping rule (Martens 2010, section 4.1).

  After each step, with the reduction ratio :math:`\\rho`:
  :math:`\\rho <` ``low`` multiplies :math:`\\lambda` by ``increase``,
  :math:`\\rho >` ``high`` multiplies it by ``decrease``; a rejected step counts as
  :math:`\\rho = -\\infty`. :math:`\\lambda` is kept in ``[minimum, maximum]``.

  ``ratio`` says how :math:`\\rho` is measured. ``"martens"`` (as in Martens' code):
  :math:`(f_V(\\theta + d) - f_V(\\theta)) / (g^\\top d + \\frac12 d^\\top G d)` with
  :math:`f_V` the loss on the validation batch (the curvature batch unless another is
  given) and the *undamped* model in the denominator. ``"gradient"``: losses on the gradient
  batch over the damped model. ``"auto"`` (the default): ``"martens"`` when ``update`` gets
  a ``validation_batch``, else ``"gradient"``. Measured (``benchmarks/RESULTS.md``): with
  the gradient and curvature on one small minibatch, :math:`\\rho` on the batch the step was
  fitted to stays high while the step overfits it, the damping collapses and training
  diverges; on a held-out ``validation_batch`` it stays stable. With a full-batch gradient
  and no held-out batch, ``"gradient"`` trains the README's CURVES job to a loss of 113
  where ``"martens"`` reaches 126 in the same 60 steps.

  ``significance``: on a held-out ``validation_batch``, :math:`\\rho` moves :math:`\\lambda`
  only when the validation loss changed by more than this many standard errors of the
  mean per-example change (``loss_fn`` on batches of one); a smaller change says nothing
  about the model's fit and leaves :math:`\\lambda` as it is (a rejected step still raises
  it). Without it, once the steps' effect on held-out data falls below the sampling noise,
  :math:`\\rho` reads noise around 0, every negative draw raises :math:`\\lambda`, and
  :math:`\\lambda` climbs to ``maximum`` while training stalls (``benchmarks/RESULTS.md``).
  0 turns the test off.
  """

  increase: float = 1.5
  decrease: float = 2.0 / 3.0
  low: float = 0.25
  high: float = 0.75
  minimum: float = 1e-8
  maximum: float = 1e8
  ratio: Literal["auto", "gradient", "martens"] = "auto"
  significance: float = 2.0

  def _check(self) -> None:
    _check_choice("damping.ratio", self.ratio, ("auto", "gradient", "martens"))
    if not self.significance >= 0:
      raise ValueError(f"damping.significance must be >= 0, got {self.significance!r}.")
    if not (self.increase > 1 and 0 < self.decrease < 1):
      raise ValueError(f"damping needs increase > 1 and 0 < decrease < 1, got {self}.")
    if not 0 < self.minimum <= self.maximum:
      raise ValueError(f"damping needs 0 < minimum <= maximum, got {self}.")
    if not self.low <= self.high:
      raise ValueError(f"damping needs low <= high, got {self}.")


class LineSearchConfig(NamedTuple):
  """Armijo backtracking line search on the step chosen by CG backtracking.

  Tries :math:`t = 1, s, s^2, \\dots` (``shrink`` = s) for at most ``max_steps`` trials and
  accepts the first with :math:`f(\\theta + t d) \\le f(\\theta) + c\\, t\\, g^\\top d`
  (``c`` = ``armijo``) and :math:`f(\\theta + t d) < f(\\theta)`.
  """

  armijo: float = 1e-2
  shrink: float = 0.8
  max_steps: int = 20

  def _check(self) -> None:
    if not (0 <= self.armijo < 1 and 0 < self.shrink < 1):
      raise ValueError(f"line_search needs 0 <= armijo < 1 and 0 < shrink < 1, got {self}.")
    _positive_int("line_search.max_steps", self.max_steps)


class KFACConfig(NamedTuple):
  """The Kronecker-factored curvature of ``preconditioner="kfac"`` and ``"kfac+lbfgs"``.

  See :mod:`hfjax.kfac` for the model. Its factors are sampled on the curvature batch.

  Attributes:
    update_every: refresh the factors and their damped inverses every this many outer steps
      (each refresh uses the damping of its step); 1 rebuilds them for every solve.
    inverse_every: refresh the inverses (``tikhonov="exact"``: the eigendecompositions) every
      this many outer steps instead, from the factors as they stand, while the factors keep
      to ``update_every``; ``None`` inverts at each refresh of the factors. An inverse costs
      the cube of the layer widths whatever the batch (kfac-jax refreshes its inverses
      every 5 steps and its factors every step).
    decay: weight of the old factors in their exponential moving average; 0 replaces them
      at each refresh.
    loss: the output loss whose curvature the sampled cotangents follow: ``"auto"`` probes
      ``loss_fn`` (:func:`hfjax.kfac.detect_output_loss`), or one of
      ``hfjax.kfac.LOSS_KINDS``.
    tikhonov: how the damping enters the blocks (:func:`hfjax.kfac.kfac_inverse`):
      ``"factored"`` (Cholesky inverses damped at each refresh) or ``"exact"``
      (:math:`(A \\otimes G + \\lambda I)^{-1}` through eigendecompositions, damped with
      each step's :math:`\\lambda` even between refreshes).
    num_samples: sampled output cotangents per curvature example for :math:`G` (each one
      more backward pass over the curvature batch).
  """

  update_every: int = 1
  decay: float = 0.0
  loss: str = "auto"
  tikhonov: str = "factored"
  num_samples: int = 1
  inverse_every: int | None = None

  def _check(self) -> None:
    _positive_int("kfac.update_every", self.update_every)
    if self.inverse_every is not None:
      _positive_int("kfac.inverse_every", self.inverse_every)
    if not 0 <= self.decay < 1:
      raise ValueError(f"kfac.decay must be in [0, 1), got {self.decay!r}.")
    _check_choice("kfac.loss", self.loss, ("auto", *kfac.LOSS_KINDS))
    _check_choice("kfac.tikhonov", self.tikhonov, kfac.TIKHONOV_KINDS)
    _positive_int("kfac.num_samples", self.num_samples)


def _matmul_dtype(value: Any) -> jnp.dtype | None:
  """``curvature_matmul_dtype`` (``None``, a dtype or its name) as a floating dtype or
  ``None``, with a clear error for anything else."""
  if value is None:
    return None
  try:
    dtype = jnp.dtype(value)
  except TypeError:
    dtype = None
  if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(
      f"curvature_matmul_dtype must be None or a floating dtype such as jnp.bfloat16, got "
      f"{value!r}."
    )
  return dtype


def _config(name: str, value: Any, kind: type) -> Any:
  """``value`` checked as a ``kind``; ``None`` gives ``kind``'s defaults."""
  if value is None:
    return kind()
  if not isinstance(value, kind):
    raise TypeError(f"{name} must be an hfjax.{kind.__name__}, got {type(value).__name__}.")
  value._check()
  return value


def _schedule(name: str, value: Any) -> sampling.SampleSchedule:
  """``value`` checked as a schedule; ``None`` (the caller picks the sizes) gives a stand-in."""
  if value is None:
    return sampling.SampleSchedule("fixed", 1, 1)
  if not isinstance(value, sampling.SampleSchedule):
    raise TypeError(f"{name} must be an hfjax.SampleSchedule, got {value!r}.")
  return value


class HessianFreeInfo(NamedTuple):
  """Diagnostics of the last outer step (all finite, so the state stays finite).

  Attributes:
    rho: reduction ratio :math:`(f(\\theta + d) - f(\\theta)) / q(d)` of the step chosen by
      backtracking (0 when undefined).
    cg_steps: CG steps of the last solve.
    cg_stop_reason: a :class:`hfjax.CGStopReason` value.
    chosen_iterate: CG step of the iterate chosen by backtracking.
    line_search_step: the accepted step size :math:`t` (0 when rejected).
    loss_before: batch loss at the incoming parameters.
    loss_after: batch loss after the update (``loss_before`` when rejected).
    accepted: whether a step was taken.
    non_finite: whether a NaN/Inf was met (in the batch, loss, gradient or curvature).
    consecutive_rejections: rejected steps in a row.
    total_rejections: rejected steps over the run.
    lbfgs_pairs: L-BFGS pairs held after the solve.
    gradient_batch_size: examples in the gradient batch used.
    curvature_batch_size: examples in the curvature batch used.
    backtracking_evaluations: losses evaluated by CG backtracking and the reduction ratio
      (recorded iterates walked on ``validation_batch``, plus, when that is another batch
      than ``batch``, one on ``batch`` and, with ``DampingConfig(ratio="martens")``, one at
      the incoming parameters on ``validation_batch``, and one more at the chosen iterate
      for the ``DampingConfig.significance`` test on a held-out batch).
    line_search_evaluations: losses evaluated by the line search beyond ``t = 1``.
    rho_significant: whether :math:`\\rho` moved :math:`\\lambda`: the held-out loss
      changed by more than ``DampingConfig.significance`` standard errors (always true
      without a held-out ``validation_batch``).
  """

  rho: jax.Array
  cg_steps: jax.Array
  cg_stop_reason: jax.Array
  chosen_iterate: jax.Array
  line_search_step: jax.Array
  loss_before: jax.Array
  loss_after: jax.Array
  accepted: jax.Array
  non_finite: jax.Array
  consecutive_rejections: jax.Array
  total_rejections: jax.Array
  lbfgs_pairs: jax.Array
  gradient_batch_size: jax.Array
  curvature_batch_size: jax.Array
  backtracking_evaluations: jax.Array
  line_search_evaluations: jax.Array
  rho_significant: jax.Array


_FLOAT_INFO = ("rho", "line_search_step", "loss_before", "loss_after")
_BOOL_INFO = ("accepted", "non_finite", "rho_significant")


def _fresh_info() -> HessianFreeInfo:
  def zero(name):
    dtype = jnp.float32 if name in _FLOAT_INFO else bool if name in _BOOL_INFO else jnp.int32
    return jnp.zeros((), dtype)

  # A fresh buffer per field: leaves sharing one buffer could not be donated to a jitted step.
  return HessianFreeInfo(*map(zero, HessianFreeInfo._fields))


class HessianFreeState(NamedTuple):
  """State of :func:`hessian_free`.

  Attributes:
    count: outer steps taken, int32.
    damping: the Levenberg-Marquardt :math:`\\lambda`.
    warm_start: the last CG solution; the next solve starts from ``warm_start_decay`` times it
      (with ``"adaptive"``, from the multiple of it that minimises the model).
    lbfgs: L-BFGS pairs from the previous solve (``lbfgs_pairs="previous"``), else ``None``.
    key: PRNG key (for the Jacobi preconditioner's Rademacher vectors).
    sampling: sample sizes for the next step (:class:`hfjax.SamplingState`); ``None`` when
      neither ``gradient_schedule`` nor ``curvature_schedule`` was given.
    info: diagnostics of the last step (:class:`HessianFreeInfo`).
    preconditioner: the preconditioner's own state carried between steps: the running
      :class:`hfjax.kfac.KFACState` of ``"kfac"`` and ``"kfac+lbfgs"``; ``None`` for the
      others (``"lbfgs"`` keeps its pairs in ``lbfgs``).
  """

  count: jax.Array
  damping: jax.Array
  warm_start: Any
  lbfgs: LBFGSState | None
  key: jax.Array
  sampling: sampling.SamplingState | None
  info: HessianFreeInfo
  preconditioner: Any = None


class _Options(NamedTuple):
  """The static options of one :func:`hessian_free`, as its arguments document them."""

  apply_fn: curvature.ApplyFn
  loss_fn: curvature.LossFn
  preconditioner: str
  memory_size: int
  lbfgs_pairs: str
  max_cg_steps: int
  cg_tol: float
  initial_damping: float
  damping: DampingConfig
  line_search: LineSearchConfig
  kfac: KFACConfig
  warm_start_decay: float | Literal["adaptive"]
  num_recorded_iterates: int | None
  gradient_schedule: sampling.SampleSchedule
  curvature_schedule: sampling.SampleSchedule
  tracked: bool  # whether a schedule was given, so the state tracks sample sizes
  chunk_size: int
  seed: int
  curvature_matmul_dtype: Any

  def _check(self) -> None:
    _check_choice("preconditioner", self.preconditioner, tuple(_PRECONDITIONERS))
    _check_choice("lbfgs_pairs", self.lbfgs_pairs, LBFGS_PAIRS)
    _positive_int("memory_size", self.memory_size)
    _positive_int("max_cg_steps", self.max_cg_steps)
    _positive("initial_damping", self.initial_damping)
    if self.cg_tol < 0:
      raise ValueError(f"cg_tol must be >= 0, got {self.cg_tol!r}.")
    if not self.adaptive_warm_start and not (
      isinstance(self.warm_start_decay, (int, float)) and 0 <= self.warm_start_decay <= 1
    ):
      raise ValueError(
        f"warm_start_decay must be in [0, 1] or 'adaptive', got {self.warm_start_decay!r}."
      )
    if self.num_recorded_iterates is not None:
      _positive_int("num_recorded_iterates", self.num_recorded_iterates)
    if self.curvature_schedule.kind == "variance":
      raise ValueError(
        "curvature_schedule cannot be a variance test: the variance test schedules the "
        "gradient sample only (pass it as gradient_schedule)."
      )
    _positive_int("chunk_size", self.chunk_size)
    if self.held_out_growth and not (
      self.damping.significance > 0 and self.damping.ratio != "gradient"
    ):
      raise ValueError(
        "a held_out_schedule grows on the held-out significance test: it needs "
        "DampingConfig.significance > 0 and a held-out ratio ('auto' or 'martens'), got "
        f"{self.damping}."
      )

  @property
  def adaptive_warm_start(self) -> bool:
    return isinstance(self.warm_start_decay, str) and self.warm_start_decay == "adaptive"

  @property
  def held_out_growth(self) -> bool:
    return "held_out" in (self.gradient_schedule.kind, self.curvature_schedule.kind)

  @property
  def keep_pairs(self) -> bool:
    """Whether L-BFGS pairs are carried from one solve to the next (Morales & Nocedal)."""
    return _PRECONDITIONERS[self.preconditioner].lbfgs and self.lbfgs_pairs == "previous"

  @property
  def variance_test(self) -> bool:
    return self.gradient_schedule.kind == "variance"


# 1. The problem of one outer step.


class _Batches(NamedTuple):
  """The three batches of a step; later ones default to the one before (same object)."""

  gradient: Any
  curvature: Any
  validation: Any
  gradient_size: int
  curvature_size: int

  @property
  def held_out(self) -> bool:
    """Whether ``update`` got a validation batch of its own (static: object identity)."""
    return self.validation is not self.curvature


class _Problem(NamedTuple):
  """One outer step's inputs, checked and resolved.

  Attributes:
    params: the incoming parameters.
    grads: the incoming updates in their accumulation dtype, zeros unless ``inputs_ok``.
    batches: the step's batches.
    loss: ``loss(step, data)``: the loss at ``params + step`` on ``data``, in the dtype in
      which losses are compared.
    loss_before: :math:`f(\\theta)` on the gradient batch.
    inputs_ok: whether the gradient and ``loss_before`` are finite.
    damped_matvec: :math:`v \\mapsto (G + \\lambda I) v` on the curvature batch.
    damping: :math:`\\lambda`.
    key: a PRNG key for preconditioners that draw random vectors.
  """

  params: optax.Params
  grads: optax.Updates
  batches: _Batches
  loss: Callable[[Any, Any], jax.Array]
  loss_before: jax.Array
  inputs_ok: jax.Array
  damped_matvec: Callable[[Any], Any]
  damping: jax.Array
  key: jax.Array


def _resolve_batches(params, batch, curvature_batch, validation_batch) -> _Batches:
  if params is None:
    raise ValueError("hessian_free needs params: call update(grads, state, params, batch=...).")
  if batch is None:
    raise ValueError("hessian_free needs the gradient batch: update(..., batch=(inputs, targets)).")
  curvature.check_params(params)
  n_batch = curvature.batch_size(batch)
  curvature_batch = batch if curvature_batch is None else curvature_batch
  validation_batch = curvature_batch if validation_batch is None else validation_batch
  n_curv = curvature.batch_size(curvature_batch)
  curvature.batch_size(validation_batch)
  if n_curv > n_batch:
    raise ValueError(
      f"curvature batch ({n_curv} examples) is larger than the gradient batch ({n_batch}); "
      "the curvature sample should be a subsample."
    )
  return _Batches(batch, curvature_batch, validation_batch, n_batch, n_curv)


def _outputs_at(options: _Options, params: optax.Params, step: Any, data: Any) -> tuple[Any, Any]:
  """``(apply_fn(params + step, inputs), targets)`` of ``data``."""
  inputs, targets = curvature.split_batch(data)
  moved = optax.apply_updates(params, optax.tree.cast_like(step, params))
  return options.apply_fn(moved, inputs), targets


def _loss_at(options: _Options, params: optax.Params, dtype: jnp.dtype):
  def loss(step, data):
    return jnp.asarray(options.loss_fn(*_outputs_at(options, params, step, data)), dtype)

  return loss


def _damped(matvec, params: optax.Params, damping: jax.Array):
  def damped_matvec(v):
    gv = as_accumulation(matvec(optax.tree.cast_like(v, params)))
    return optax.tree.add_scale(optax.tree.cast_like(gv, v), damping, v)

  return damped_matvec


def _resolve(options, batches, updates, params, loss, damping, key) -> _Problem:
  grads = as_accumulation(updates)
  if jax.tree.structure(grads) != jax.tree.structure(params):
    raise ValueError("updates (the gradients) must have the tree structure of params.")
  # Losses are compared in the parameters' accumulation precision: float64 problems must
  # see improvements below float32 resolution.
  dtype = jnp.result_type(*jax.tree.leaves(grads))
  loss_at = _loss_at(options, params, dtype)
  # Linearising first also checks, with a clear error, that the model outputs fit the
  # targets and that loss_fn returns a scalar, before anything else touches the loss.
  gn_matvec, _ = curvature.gauss_newton_matvec(
    options.apply_fn, options.loss_fn, params, batches.curvature
  )
  zero_step = optax.tree.zeros_like(grads)
  f0 = loss_at(zero_step, batches.gradient) if loss is None else jnp.asarray(loss, dtype)
  inputs_ok = all_finite(grads) & jnp.isfinite(f0)
  grads = optax.tree.where(inputs_ok, grads, zero_step)
  if options.curvature_matmul_dtype is not None:
    gn_matvec = precision.reduced_precision_dots(gn_matvec, options.curvature_matmul_dtype)
  damped_matvec = _damped(gn_matvec, params, damping)
  return _Problem(params, grads, batches, loss_at, f0, inputs_ok, damped_matvec, damping, key)


# 2. Preconditioners: one builder per option, looked up in _PRECONDITIONERS.


class _Preconditioning(NamedTuple):
  """What a preconditioner option hands to :func:`hfjax.cg` for one solve.

  Attributes:
    preconditioner: ``cg``'s ``preconditioner``: a callable ``r -> z``, an
      :class:`hfjax.LBFGSState` or ``None``.
    update_within: whether ``cg`` adds the solve's own pairs to an L-BFGS preconditioner as
      it goes (flexible PCG); ``False`` keeps it fixed for the solve.
    state: the option's own state for the next step (``HessianFreeState.preconditioner``).
    initial: the initial matrix :math:`H_0` of an L-BFGS preconditioner as a callable
      (``cg``'s ``initial_preconditioner``); ``None`` for :math:`\\gamma I`.
  """

  preconditioner: Any
  update_within: bool = True
  state: Any = None
  initial: Callable[[Any], Any] | None = None


def _gradient_sums(options: _Options, params: optax.Params, data: Any) -> tuple[Any, Any]:
  """Sums over ``data`` of the per-example gradients and of their squares."""
  return curvature.squared_gradient_sum(
    options.apply_fn, options.loss_fn, params, data, chunk_size=options.chunk_size
  )


def _no_preconditioner(options, problem, state) -> _Preconditioning:
  del options, problem, state
  return _Preconditioning(None)


def _martens_diagonal(options, problem, state) -> _Preconditioning:
  """Martens' (2010) empirical-Fisher diagonal on the curvature batch."""
  del state
  _, sum_g2 = _gradient_sums(options, problem.params, problem.batches.curvature)
  diag = jax.tree.map(lambda s: s / problem.batches.curvature_size, sum_g2)
  return _Preconditioning(diagonal_preconditioner(diag, problem.damping))


def _jacobi_diagonal(options, problem, state) -> _Preconditioning:
  """Chapelle & Erhan's (2011) Rademacher estimate of the Gauss-Newton diagonal."""
  del state
  diag = curvature.gauss_newton_diagonal_estimate(
    options.apply_fn,
    options.loss_fn,
    problem.params,
    problem.batches.curvature,
    problem.key,
    chunk_size=options.chunk_size,
  )
  return _Preconditioning(diagonal_preconditioner(diag, problem.damping))


def _lbfgs(options, problem, state) -> _Preconditioning:
  """Sainath et al.'s (2013) L-BFGS from this solve's pairs, or Morales & Nocedal's (2000)
  from the previous solve's, fixed within this one."""
  if options.keep_pairs:
    return _Preconditioning(state.lbfgs, update_within=False)
  return _Preconditioning(lbfgs_init(problem.params, options.memory_size))


def _kfac_running(options, problem, state) -> tuple[kfac.KFACState, layers.LayerLayout]:
  """Martens & Grosse's (2015) Kronecker factors of :math:`G`, sampled on the curvature
  batch and averaged into ``state.preconditioner`` every ``options.kfac.update_every``
  steps (always while it holds no estimate), with their inverses damped by this step's
  :math:`\\lambda` at each refresh, or every ``options.kfac.inverse_every`` steps."""
  inputs, _ = curvature.split_batch(problem.batches.curvature)
  layout = layers.find_dense_layers(options.apply_fn, problem.params, inputs)
  config = options.kfac
  separate = config.inverse_every is not None
  invert_kwargs = {"layout": layout, "tikhonov": config.tikhonov}

  def refresh(running: kfac.KFACState) -> kfac.KFACState:
    new = kfac.kfac_factors(
      options.apply_fn,
      options.loss_fn,
      problem.params,
      problem.batches.curvature,
      problem.key,
      layout=layout,
      loss=config.loss,
      chunk_size=options.chunk_size,
      num_samples=config.num_samples,
    )
    return kfac.kfac_state_update(
      running, new, problem.damping, decay=config.decay, invert=not separate, **invert_kwargs
    )

  def invert(running: kfac.KFACState) -> kfac.KFACState:
    return kfac.kfac_state_invert(running, problem.damping, **invert_kwargs)

  first = state.preconditioner.num_estimates == 0

  def every(period: int, update, running: kfac.KFACState) -> kfac.KFACState:
    """``update(running)`` every ``period`` steps, and while there is no estimate yet."""
    if period == 1:
      return update(running)
    due = (state.count % period == 0) | first
    return jax.lax.cond(due, update, lambda r: r, running)

  running = every(config.update_every, refresh, state.preconditioner)
  if separate:
    running = every(config.inverse_every, invert, running)
  return running, layout


def _kfac_state_preconditioner(options, problem, running, layout) -> Callable[[Any], Any]:
  return kfac.kfac_state_preconditioner(
    running, layout, problem.damping, tikhonov=options.kfac.tikhonov
  )


def _kfac(options, problem, state) -> _Preconditioning:
  running, layout = _kfac_running(options, problem, state)
  precondition = _kfac_state_preconditioner(options, problem, running, layout)
  return _Preconditioning(precondition, state=running)


def _kfac_lbfgs(options, problem, state) -> _Preconditioning:
  """Sainath et al.'s L-BFGS refining the K-FAC inverse, its initial matrix."""
  running, layout = _kfac_running(options, problem, state)
  initial = _kfac_state_preconditioner(options, problem, running, layout)
  return _lbfgs(options, problem, state)._replace(initial=initial, state=running)


def _kfac_init(options, params) -> kfac.KFACState:
  del options
  return kfac.kfac_state_init(params)


def _no_state(options, params) -> None:
  del options, params


class _PreconditionerKind(NamedTuple):
  """One ``preconditioner`` option of :func:`hessian_free`.

  Attributes:
    build: ``build(options, problem, state) -> _Preconditioning`` for each solve, from the
      step's :class:`_Problem` and the incoming :class:`HessianFreeState`.
    init: ``init(options, params)``: the option's first ``HessianFreeState.preconditioner``.
    lbfgs: whether the option applies L-BFGS pairs, which ``lbfgs_pairs="previous"`` then
      carries between solves in ``HessianFreeState.lbfgs``.
  """

  build: Callable[[_Options, _Problem, HessianFreeState], _Preconditioning]
  init: Callable[[_Options, optax.Params], Any] = _no_state
  lbfgs: bool = False


_PRECONDITIONERS: dict[str, _PreconditionerKind] = {
  "none": _PreconditionerKind(_no_preconditioner),
  "martens": _PreconditionerKind(_martens_diagonal),
  "jacobi": _PreconditionerKind(_jacobi_diagonal),
  "lbfgs": _PreconditionerKind(_lbfgs, lbfgs=True),
  "kfac": _PreconditionerKind(_kfac, init=_kfac_init),
  "kfac+lbfgs": _PreconditionerKind(_kfac_lbfgs, init=_kfac_init, lbfgs=True),
}


def _build_preconditioner(options, problem, state) -> _Preconditioning:
  return _PRECONDITIONERS[options.preconditioner].build(options, problem, state)


# 3. The solve.


def _solve(options, problem, preconditioning, warm_start) -> CGResult:
  # A step whose gradient or loss is not finite solves for b = 0 from 0, so CG stops at once.
  decay = 1.0 if options.adaptive_warm_start else options.warm_start_decay
  x0 = optax.tree.scale(jnp.where(problem.inputs_ok, decay, 0.0), warm_start)
  return cg(
    problem.damped_matvec,
    optax.tree.scale(-1.0, problem.grads),
    x0=x0,
    preconditioner=preconditioning.preconditioner,
    max_steps=options.max_cg_steps,
    tol=options.cg_tol,
    update_preconditioner=preconditioning.update_within,
    initial_preconditioner=preconditioning.initial,
    num_recorded=options.num_recorded_iterates,
    augment_x0=options.adaptive_warm_start,
  )


# 4. CG backtracking (Martens 2010, section 4.6).


class _Walk(NamedTuple):
  """Carry of the backtracking walk over the recorded iterates, newest first."""

  index: jax.Array  # position of the next iterate to evaluate
  best: jax.Array  # position of the best iterate so far
  best_loss: jax.Array
  improving: jax.Array  # whether the last evaluated iterate was the best so far


class _Backtracked(NamedTuple):
  """The iterate chosen by :func:`_backtrack`.

  Attributes:
    direction: the chosen iterate.
    model_value: the quadratic model :math:`q` at it.
    cg_step: the CG step at which it was recorded.
    validation_loss: its loss on the validation batch.
    evaluations: losses evaluated by the walk.
  """

  direction: Any
  model_value: jax.Array
  cg_step: jax.Array
  validation_loss: jax.Array
  evaluations: jax.Array


# Losses within this many units of round-off of each other tie in the backtracking walk.
_TIE_ULPS = 32


def _backtrack(
  result: CGResult, validation_loss: Callable[[Any], jax.Array], dtype: Any
) -> _Backtracked:
  """Walks the recorded iterates from the newest backwards while ``validation_loss``
  keeps falling, and keeps the best (empty slots and non-finite losses never win).

  "Falling" means by more than ``_TIE_ULPS`` units of round-off of the best loss so far: once
  CG has converged, neighbouring iterates have losses equal up to rounding, and which of them
  a strict comparison keeps would depend on the summation order, so on the device layout (a
  data-parallel run then chose another iterate than one device in 3 of 5 mesh layouts). A
  tie keeps the newer iterate.
  """
  order = jnp.argsort(-result.iterate_steps)

  def iterate(j):
    return jax.tree.map(lambda buf: buf[order[j]], result.iterates)

  def keep_walking(walk: _Walk) -> jax.Array:
    return walk.improving & (walk.index < order.shape[0])

  def step(walk: _Walk) -> _Walk:
    recorded = result.iterate_steps[order[walk.index]] >= 0
    f = finite_or(validation_loss(iterate(walk.index)), jnp.inf)
    tie = _TIE_ULPS * jnp.finfo(walk.best_loss.dtype).eps * jnp.abs(walk.best_loss)
    better = recorded & (f < walk.best_loss - jnp.where(jnp.isfinite(tie), tie, 0))
    return _Walk(
      index=walk.index + 1,
      best=jnp.where(better, walk.index, walk.best),
      best_loss=jnp.where(better, f, walk.best_loss),
      improving=better | (walk.index == 0),
    )

  start = _Walk(jnp.int32(0), jnp.int32(0), jnp.asarray(jnp.inf, dtype), jnp.array(True))
  walk = jax.lax.while_loop(keep_walking, step, start)
  chosen = order[walk.best]
  return _Backtracked(
    direction=iterate(walk.best),
    model_value=result.iterate_values[chosen].astype(dtype),
    cg_step=result.iterate_steps[chosen],
    validation_loss=walk.best_loss,
    evaluations=walk.index,
  )


def _loss_after_step(problem: _Problem, chosen: _Backtracked) -> jax.Array:
  """:math:`f(\\theta + d)` on the gradient batch (the walk has it if that is its batch)."""
  if problem.batches.validation is problem.batches.gradient:
    return chosen.validation_loss
  return finite_or(problem.loss(chosen.direction, problem.batches.gradient), jnp.inf)


def _reduction_ratio(f0: jax.Array, f1: jax.Array, model_value: jax.Array) -> jax.Array:
  """:math:`\\rho = (f(\\theta + d) - f(\\theta)) / q(d)`; ``-inf`` unless :math:`q(d) < 0`."""
  return jnp.where(model_value < 0, (f1 - f0) / model_value, -jnp.inf)


def _example_losses(options, problem, step, data) -> tuple[jax.Array, jax.Array]:
  """The batch loss at ``params + step`` on ``data`` and each example's (``loss_fn`` on
  batches of one), from one forward pass."""
  outputs, targets = _outputs_at(options, problem.params, step, data)
  one = lambda tree: jax.tree.map(lambda x: x[None], tree)
  each = jax.vmap(lambda out, target: options.loss_fn(one(out), one(target)))(outputs, targets)
  dtype = problem.loss_before.dtype
  return jnp.asarray(options.loss_fn(outputs, targets), dtype), each.astype(dtype)


def _significant(config: DampingConfig, before: jax.Array, after: jax.Array) -> jax.Array:
  """Whether the mean of ``after - before`` is more than ``config.significance`` standard
  errors away from 0."""
  change = after - before
  n = change.shape[0]
  if n < 2:
    return jnp.array(True)
  error = jnp.std(change, ddof=1) / jnp.sqrt(jnp.asarray(n, change.dtype))
  return jnp.abs(jnp.mean(change)) > config.significance * error


def _step_ratio(
  options, problem, chosen: _Backtracked, f1: jax.Array
) -> tuple[jax.Array, jax.Array, _Backtracked]:
  """:math:`\\rho` of the chosen iterate by ``options.damping.ratio``.

  ``"gradient"``: losses on the gradient batch over the damped model. ``"martens"`` (as in
  Martens' code): losses on the validation batch (the curvature batch unless another is
  given) over the undamped model :math:`g^\\top d + \\frac12 d^\\top G d`. Returns
  :math:`\\rho`, whether it is significant (``DampingConfig.significance``, tested on a
  held-out validation batch only), and ``chosen`` with the losses it may evaluate added to
  its count.
  """
  batches = problem.batches
  config = options.damping
  rule = config.ratio
  if rule == "auto":
    rule = "martens" if batches.held_out else "gradient"
  significant = jnp.array(True)
  if rule == "gradient":
    return _reduction_ratio(problem.loss_before, f1, chosen.model_value), significant, chosen
  f0 = problem.loss_before
  zero_step = optax.tree.zeros_like(chosen.direction)
  if batches.held_out and config.significance > 0:
    f0, before = _example_losses(options, problem, zero_step, batches.validation)
    _, after = _example_losses(options, problem, chosen.direction, batches.validation)
    significant = _significant(config, before, after)
    chosen = chosen._replace(evaluations=chosen.evaluations + 2)
  elif batches.validation is not batches.gradient:
    f0 = problem.loss(zero_step, batches.validation)
    chosen = chosen._replace(evaluations=chosen.evaluations + 1)
  norm2 = optax.tree.vdot(chosen.direction, chosen.direction).astype(f0.dtype)
  undamped = chosen.model_value - 0.5 * problem.damping.astype(f0.dtype) * norm2
  return _reduction_ratio(f0, chosen.validation_loss, undamped), significant, chosen


# 5. Armijo line search along the chosen iterate.


class _Search(NamedTuple):
  """Carry of the line search: the newest trial step size and its loss."""

  tries: jax.Array  # losses evaluated, t = 1 included
  step_size: jax.Array
  loss: jax.Array


def _sufficient_decrease(config: LineSearchConfig, f0, slope, t, f) -> jax.Array:
  """Armijo's condition, and a strict decrease (a zero slope must not accept a flat step)."""
  return (f <= f0 + config.armijo * t * slope) & (f < f0)


def _line_search(
  config: LineSearchConfig, loss_at: Callable[[jax.Array], jax.Array], f0, f1, slope
) -> tuple[_Search, jax.Array]:
  """Shrinks :math:`t` from 1 (whose loss ``f1`` is known) until
  :func:`_sufficient_decrease` holds or ``config.max_steps`` losses were tried; returns the
  last trial and whether it is sufficient. ``loss_at(t)`` is :math:`f(\\theta + t d)`."""

  def keep_shrinking(search: _Search) -> jax.Array:
    enough = _sufficient_decrease(config, f0, slope, search.step_size, search.loss)
    return ~enough & (search.tries < config.max_steps)

  def shrink(search: _Search) -> _Search:
    t = search.step_size * config.shrink
    return _Search(search.tries + 1, t, finite_or(loss_at(t), jnp.inf))

  search = jax.lax.while_loop(keep_shrinking, shrink, _Search(jnp.int32(1), jnp.float32(1.0), f1))
  return search, _sufficient_decrease(config, f0, slope, search.step_size, search.loss)


# 6. Levenberg-Marquardt damping.


def _adapt_damping(
  config: DampingConfig, damping: jax.Array, rho: jax.Array, significant: Any = True
) -> jax.Array:
  """Martens' rule (:class:`DampingConfig`); pass ``rho = -inf`` for a rejected step, and
  ``significant = False`` for a :math:`\\rho` that says nothing (``damping`` is kept)."""
  factor = jnp.where(
    rho < config.low, config.increase, jnp.where(rho > config.high, config.decrease, 1.0)
  )
  factor = jnp.where(significant, factor, 1.0)
  return jnp.clip(damping * factor, config.minimum, config.maximum)


# 7. What the next step starts from.


def _next_lbfgs(options, state, result: CGResult, solved) -> tuple[LBFGSState | None, jax.Array]:
  """The L-BFGS pairs kept for the next solve, and the number of pairs held now."""
  pairs = result.preconditioner_state
  if not options.keep_pairs:
    return state.lbfgs, jnp.zeros((), jnp.int32) if pairs is None else pairs.num_pairs
  # A failed solve, or one that found no pairs, leaves the previous pairs in place.
  lbfgs = optax.tree.where(solved & (pairs.num_pairs > 0), pairs, state.lbfgs)
  return lbfgs, lbfgs.num_pairs


def _next_sampling(
  options, problem: _Problem, state, uphill: jax.Array
) -> sampling.SamplingState | None:
  """The next sample sizes; ``uphill``: the step raised the held-out loss significantly."""
  if not options.tracked:
    return state.sampling
  variance_l1 = grad_sq_norm = None
  if options.variance_test:
    sum_g, sum_g2 = _gradient_sums(options, problem.params, problem.batches.gradient)
    variance_l1 = sampling.gradient_variance_l1(sum_g, sum_g2, problem.batches.gradient_size)
    variance_l1 = jnp.where(problem.inputs_ok & jnp.isfinite(variance_l1), variance_l1, 0.0)
    grad_sq_norm = optax.tree.vdot(problem.grads, problem.grads).astype(jnp.float32)
  return sampling.sampling_update(
    state.sampling,
    options.gradient_schedule,
    options.curvature_schedule,
    variance_l1=variance_l1,
    grad_sq_norm=grad_sq_norm,
    uphill=uphill,
  )


# 8. Diagnostics and state.


def _diagnostics(
  problem, result, chosen, search, accepted, solved, rho, significant, lbfgs_pairs, previous
) -> HessianFreeInfo:
  batches = problem.batches
  loss_before = jnp.where(
    jnp.isfinite(problem.loss_before), problem.loss_before, previous.loss_after
  )
  consecutive = jnp.where(accepted, 0, previous.consecutive_rejections + 1)
  # rho needs one more loss when the walk ran on another batch than the gradient batch.
  extra_evaluation = batches.validation is not batches.gradient
  return HessianFreeInfo(
    rho=jnp.where(jnp.isfinite(rho), rho, 0.0).astype(jnp.float32),
    cg_steps=result.num_steps,
    cg_stop_reason=result.stop_reason,
    chosen_iterate=chosen.cg_step,
    line_search_step=jnp.where(accepted, search.step_size, 0.0).astype(jnp.float32),
    loss_before=loss_before,
    loss_after=jnp.where(accepted, search.loss, loss_before),
    accepted=accepted,
    non_finite=~solved,
    consecutive_rejections=consecutive.astype(jnp.int32),
    total_rejections=(previous.total_rejections + (~accepted).astype(jnp.int32)),
    lbfgs_pairs=lbfgs_pairs,
    gradient_batch_size=jnp.asarray(batches.gradient_size, jnp.int32),
    curvature_batch_size=jnp.asarray(batches.curvature_size, jnp.int32),
    backtracking_evaluations=(chosen.evaluations + extra_evaluation).astype(jnp.int32),
    line_search_evaluations=(search.tries - 1).astype(jnp.int32),
    rho_significant=significant,
  )


def _init(options: _Options, params: optax.Params) -> HessianFreeState:
  curvature.check_params(params)
  schedules = options.gradient_schedule, options.curvature_schedule
  return HessianFreeState(
    count=jnp.zeros((), jnp.int32),
    damping=jnp.asarray(options.initial_damping, jnp.float32),
    warm_start=as_accumulation(optax.tree.zeros_like(params)),
    lbfgs=lbfgs_init(params, options.memory_size) if options.keep_pairs else None,
    key=jax.random.key(options.seed),
    sampling=sampling.sampling_init(*schedules) if options.tracked else None,
    info=_fresh_info(),
    preconditioner=_PRECONDITIONERS[options.preconditioner].init(options, params),
  )


def _cast_like(new_state: HessianFreeState, state: HessianFreeState) -> HessianFreeState:
  """``new_state`` in the dtypes init made (no retracing, no x64 drift); PRNG keys have no
  dtype to cast."""
  cast = optax.tree.cast_like(new_state._replace(key=None), state._replace(key=None))
  return cast._replace(key=new_state.key)


def hessian_free(
  apply_fn: curvature.ApplyFn,
  loss_fn: curvature.LossFn,
  *,
  preconditioner: PreconditionerName = "kfac",
  memory_size: int = 10,
  lbfgs_pairs: LBFGSPairs = "within",
  max_cg_steps: int = 250,
  cg_tol: float = 5e-4,
  initial_damping: float = 45.0,
  damping: DampingConfig | None = None,
  line_search: LineSearchConfig | None = None,
  kfac: KFACConfig | None = None,
  warm_start_decay: float | Literal["adaptive"] = 0.95,
  num_recorded_iterates: int | None = None,
  gradient_schedule: sampling.SampleSchedule | None = None,
  curvature_schedule: sampling.SampleSchedule | None = None,
  chunk_size: int = 256,
  seed: int = 0,
  curvature_matmul_dtype: Any = None,
) -> optax.GradientTransformationExtraArgs:
  """Hessian-free optimization (truncated Gauss-Newton) as an Optax transformation.

  Each ``update`` is one outer iteration of Martens' (2010) method: it approximately
  minimises the damped quadratic model

  .. math::

    q(d) = g^\\top d + \\tfrac12 d^\\top (G + \\lambda I) d

  with preconditioned CG (:func:`hfjax.cg`), where :math:`g` are the incoming gradients and
  :math:`G` the Gauss-Newton matrix (:func:`hfjax.gauss_newton_matvec`) on the curvature
  batch; picks the best recorded CG iterate by the loss on the validation batch (CG
  backtracking); runs an Armijo line search on it; and adapts :math:`\\lambda` by the
  Levenberg-Marquardt rule (:class:`DampingConfig`). A step that lowers nothing, or that
  meets a NaN or Inf anywhere, is rejected: the update is zero, :math:`\\lambda` rises and
  the warm start is reset, so parameters and state stay finite.

  The L-BFGS preconditioner (Sainath et al. 2013) is built from the CG pairs
  :math:`s = \\alpha p`, :math:`y = \\alpha (G + \\lambda I) p`: within the solve
  (``lbfgs_pairs="within"``, with flexible PCG) or from the previous solve
  (``"previous"``, Morales & Nocedal 2000).

  The incoming ``updates`` are the gradient on ``batch`` (after whatever the chain did to
  them, e.g. clipping). The update jits as one program; compile it yourself with
  ``jax.jit``.

  Args:
    apply_fn: ``apply_fn(params, inputs) -> outputs``.
    loss_fn: ``loss_fn(outputs, targets) -> scalar`` batch mean (a matching loss keeps
      :math:`G` positive semidefinite).
    preconditioner: ``"none"``, ``"martens"`` (Martens' empirical-Fisher diagonal),
      ``"jacobi"`` (Chapelle & Erhan's estimate of :math:`\\operatorname{diag}(G)`),
      ``"lbfgs"``, ``"kfac"`` (Kronecker-factored blocks of :math:`G` per dense layer, found
      by tracing ``apply_fn``; :mod:`hfjax.kfac`) or ``"kfac+lbfgs"`` (the K-FAC inverse as
      the initial matrix of the L-BFGS preconditioner).
    memory_size: L-BFGS pairs kept.
    lbfgs_pairs: ``"within"`` or ``"previous"`` (see above).
    max_cg_steps: CG step cap (250 in Martens 2010).
    cg_tol: :math:`\\epsilon` of Martens' CG stopping rule (5e-4).
    initial_damping: the first :math:`\\lambda` (45 in Martens' code).
    damping: the damping rule; ``None`` for the :class:`DampingConfig` defaults.
    line_search: the Armijo line search; ``None`` for the :class:`LineSearchConfig` defaults.
    kfac: the K-FAC preconditioner's refresh period, moving average and output loss;
      ``None`` for the :class:`KFACConfig` defaults.
    warm_start_decay: the next CG starts from this times the last solution (0.95), or
      ``"adaptive"``: CG searches along the last solution as well (``hfjax.cg``'s
      ``augment_x0``), starting from the multiple of it that minimises the damped model and
      keeping every direction conjugate to it, so each iterate is the best combination of
      the last solution and the Krylov space. With a few CG steps per minibatch this is
      K-FAC's adaptive momentum (Martens & Grosse 2015) inside HF.
    num_recorded_iterates: CG iterates kept for backtracking; ``None`` keeps all
      :math:`\\lceil 1.3^j \\rceil` ones. Fewer saves memory on large models.
    gradient_schedule: sizes for the gradient batch (:func:`hfjax.geometric_schedule`,
      :func:`hfjax.variance_test_schedule`, :func:`hfjax.fixed_schedule`); read them with
      :func:`hfjax.sample_sizes`. ``None``: the caller decides, and sizes are not tracked.
    curvature_schedule: sizes for the curvature batch; ``None`` as above.
    chunk_size: examples per chunk for per-example statistics (Martens' diagonal, the
      variance test).
    seed: seed of the Jacobi estimator's random vectors.
    curvature_matmul_dtype: ``None``, or a narrower floating dtype (``jnp.bfloat16``, or
      its name) to which the operands of the matrix products inside every Gauss-Newton
      product are rounded, accumulating in the products' own dtype (float32 for a float32
      model; :func:`hfjax.precision.reduced_precision_dots`). CG's vectors, the gradient,
      the losses and :math:`\\rho` stay in full precision, so only the curvature model,
      already a one-batch estimate, carries the round-off. Where the hardware multiplies
      bfloat16 natively a product costs much less (see ``benchmarks/RESULTS.md``).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose ``update(grads, state, params, *,
    batch, curvature_batch=None, validation_batch=None, loss=None)`` returns the step to
    add with ``optax.apply_updates``. ``loss`` is the loss on ``batch`` at ``params`` if
    the caller has it (from ``jax.value_and_grad``), saving a forward pass.

  Example:

    >>> import jax, jax.numpy as jnp, optax, hfjax
    >>> apply_fn = lambda w, x: x @ w
    >>> loss_fn = lambda out, y: 0.5 * jnp.mean((out - y) ** 2)
    >>> x = jnp.arange(8.0).reshape(4, 2); y = x @ jnp.array([1.0, -2.0])
    >>> tx = hfjax.hessian_free(apply_fn, loss_fn, initial_damping=1e-6)
    >>> w = jnp.zeros(2); state = tx.init(w)
    >>> grads = jax.grad(lambda w: loss_fn(apply_fn(w, x), y))(w)
    >>> updates, state = tx.update(grads, state, w, batch=(x, y))
    >>> jnp.round(optax.apply_updates(w, updates), 2)
    Array([ 1., -2.], dtype=float32)

  References:
    Martens, "Deep learning via Hessian-free optimization", ICML 2010. Martens &
    Sutskever, "Training deep and recurrent networks with Hessian-free optimization",
    2012. Sainath et al., "Accelerating Hessian-free optimization for deep neural networks
    by implicit preconditioning and sampling", ASRU 2013.
  """
  options = _Options(
    apply_fn,
    loss_fn,
    preconditioner=preconditioner,
    memory_size=memory_size,
    lbfgs_pairs=lbfgs_pairs,
    max_cg_steps=max_cg_steps,
    cg_tol=cg_tol,
    initial_damping=initial_damping,
    damping=_config("damping", damping, DampingConfig),
    line_search=_config("line_search", line_search, LineSearchConfig),
    kfac=_config("kfac", kfac, KFACConfig),
    warm_start_decay=warm_start_decay,
    num_recorded_iterates=num_recorded_iterates,
    gradient_schedule=_schedule("gradient_schedule", gradient_schedule),
    curvature_schedule=_schedule("curvature_schedule", curvature_schedule),
    tracked=gradient_schedule is not None or curvature_schedule is not None,
    chunk_size=chunk_size,
    seed=seed,
    curvature_matmul_dtype=_matmul_dtype(curvature_matmul_dtype),
  )
  options._check()

  def update_fn(
    updates: optax.Updates,
    state: HessianFreeState,
    params: optax.Params | None = None,
    *,
    batch: Any = None,
    curvature_batch: Any = None,
    validation_batch: Any = None,
    loss: jax.Array | None = None,
    **extra_args: Any,
  ) -> tuple[optax.Updates, HessianFreeState]:
    del extra_args
    # 1. Check the batches and resolve the step's problem. A non-finite gradient or loss
    #    zeroes the gradient, so the step is rejected with everything still finite.
    batches = _resolve_batches(params, batch, curvature_batch, validation_batch)
    if options.held_out_growth and not batches.held_out:
      raise ValueError(
        "a held_out_schedule needs a held-out validation_batch at every update: "
        "update(..., validation_batch=(inputs, targets))."
      )
    key, preconditioner_key = jax.random.split(state.key)
    problem = _resolve(options, batches, updates, params, loss, state.damping, preconditioner_key)
    f0 = problem.loss_before

    # 2. Build this solve's preconditioner.
    preconditioning = _build_preconditioner(options, problem, state)

    # 3. Minimise the damped quadratic model with CG from the decayed warm start.
    result = _solve(options, problem, preconditioning, state.warm_start)
    solved = problem.inputs_ok & (result.stop_reason != CGStopReason.NON_FINITE)

    # 4. CG backtracking picks a recorded iterate by its validation loss.
    validation_loss = functools.partial(problem.loss, data=batches.validation)
    chosen = _backtrack(result, validation_loss, f0.dtype)
    f1 = _loss_after_step(problem, chosen)

    # 5. Armijo line search along the chosen iterate.
    slope = jnp.minimum(optax.tree.vdot(problem.grads, chosen.direction), 0.0)
    loss_at = lambda t: problem.loss(optax.tree.scale(t, chosen.direction), batches.gradient)
    search, sufficient = _line_search(options.line_search, loss_at, f0, f1, slope)
    accepted = solved & sufficient & all_finite(chosen.direction)

    # 6. Levenberg-Marquardt damping; a rejected step counts as rho = -inf.
    rho, significant, chosen = _step_ratio(options, problem, chosen, f1)
    # A significant rise of the held-out loss (rho < 0 over a descent model) grows a
    # held-out schedule's sample.
    uphill = accepted & significant & jnp.isfinite(rho) & (rho < 0)
    rho = jnp.where(accepted, rho, -jnp.inf)
    significant = significant | ~accepted
    damping = _adapt_damping(options.damping, problem.damping, rho, significant)

    # 7. What the next step starts from: warm start, L-BFGS pairs and sample sizes.
    zero_step = optax.tree.zeros_like(problem.grads)
    warm_start = optax.tree.where(accepted & all_finite(result.x), result.x, zero_step)
    lbfgs, lbfgs_pairs = _next_lbfgs(options, state, result, solved)
    next_sampling = _next_sampling(options, problem, state, uphill)

    # 8. Diagnostics, and the new state in the dtypes init made.
    info = _diagnostics(
      problem, result, chosen, search, accepted, solved, rho, significant, lbfgs_pairs, state.info
    )
    new_state = HessianFreeState(
      count=optax.safe_increment(state.count),
      damping=damping.astype(jnp.float32),
      warm_start=warm_start,
      lbfgs=lbfgs,
      key=key,
      sampling=next_sampling,
      info=info,
      preconditioner=preconditioning.state,
    )
    step = optax.tree.where(
      accepted, optax.tree.scale(search.step_size, chosen.direction), zero_step
    )
    return optax.tree.cast_like(step, params), _cast_like(new_state, state)

  return optax.GradientTransformationExtraArgs(functools.partial(_init, options), update_fn)
