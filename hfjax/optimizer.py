"""``hfjax.hessian_free``: Hessian-free optimization as an Optax transformation."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from hfjax import curvature, sampling
from hfjax._tree import all_finite, as_accumulation, finite_or
from hfjax.preconditioners import LBFGSState, diagonal_preconditioner, lbfgs_init
from hfjax.solvers import CGStopReason, cg

PRECONDITIONERS = ("none", "martens", "jacobi", "lbfgs")
LBFGS_PAIRS = ("within", "previous")


class DampingConfig(NamedTuple):
  """Levenberg-Marquardt damping rule (Martens 2010, section 4.1).

  After each step, with the reduction ratio :math:`\\rho`:
  :math:`\\rho <` ``low`` multiplies :math:`\\lambda` by ``increase``,
  :math:`\\rho >` ``high`` multiplies it by ``decrease``; a rejected step counts as
  :math:`\\rho = -\\infty`. :math:`\\lambda` is kept in ``[minimum, maximum]``.
  """

  increase: float = 1.5
  decrease: float = 2.0 / 3.0
  low: float = 0.25
  high: float = 0.75
  minimum: float = 1e-8
  maximum: float = 1e8


class LineSearchConfig(NamedTuple):
  """Armijo backtracking line search on the step chosen by CG backtracking.

  Tries :math:`t = 1, s, s^2, \\dots` (``shrink`` = s) for at most ``max_steps`` trials and
  accepts the first with :math:`f(\\theta + t d) \\le f(\\theta) + c\\, t\\, g^\\top d`
  (``c`` = ``armijo``) and :math:`f(\\theta + t d) < f(\\theta)`.
  """

  armijo: float = 1e-2
  shrink: float = 0.8
  max_steps: int = 20


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
    backtracking_evaluations: losses evaluated by CG backtracking (recorded iterates
      walked on ``validation_batch``, plus one on ``batch`` when that is another batch).
    line_search_evaluations: losses evaluated by the line search beyond ``t = 1``.
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


class HessianFreeState(NamedTuple):
  """State of :func:`hessian_free`.

  Attributes:
    count: outer steps taken, int32.
    damping: the Levenberg-Marquardt :math:`\\lambda`.
    warm_start: the last CG solution; the next solve starts from ``warm_start_decay`` times it.
    lbfgs: L-BFGS pairs from the previous solve (``lbfgs_pairs="previous"``), else ``None``.
    key: PRNG key (for the Jacobi preconditioner's Rademacher vectors).
    sampling: sample sizes for the next step (:class:`hfjax.SamplingState`); ``None`` when
      neither ``gradient_schedule`` nor ``curvature_schedule`` was given.
    info: diagnostics of the last step (:class:`HessianFreeInfo`).
  """

  count: jax.Array
  damping: jax.Array
  warm_start: Any
  lbfgs: LBFGSState | None
  key: jax.Array
  sampling: sampling.SamplingState | None
  info: HessianFreeInfo


def _positive(name: str, value: float) -> None:
  if not value > 0:
    raise ValueError(f"{name} must be > 0, got {value!r}.")


def _positive_int(name: str, value: int) -> None:
  if int(value) != value or value < 1:
    raise ValueError(f"{name} must be an integer >= 1, got {value!r}.")


def _validate(**options) -> None:
  if options["preconditioner"] not in PRECONDITIONERS:
    raise ValueError(
      f"unknown preconditioner {options['preconditioner']!r}; choose one of {PRECONDITIONERS}."
    )
  if options["lbfgs_pairs"] not in LBFGS_PAIRS:
    raise ValueError(
      f"unknown lbfgs_pairs {options['lbfgs_pairs']!r}; choose one of {LBFGS_PAIRS}."
    )
  _positive_int("memory_size", options["memory_size"])
  _positive_int("max_cg_steps", options["max_cg_steps"])
  _positive("initial_damping", options["initial_damping"])
  if options["cg_tol"] < 0:
    raise ValueError(f"cg_tol must be >= 0, got {options['cg_tol']!r}.")
  if not 0 <= options["warm_start_decay"] <= 1:
    raise ValueError(f"warm_start_decay must be in [0, 1], got {options['warm_start_decay']!r}.")
  if options["num_recorded_iterates"] is not None:
    _positive_int("num_recorded_iterates", options["num_recorded_iterates"])
  damping: DampingConfig = options["damping"]
  if not isinstance(damping, DampingConfig):
    raise TypeError(f"damping must be an hfjax.DampingConfig, got {type(damping).__name__}.")
  if not (damping.increase > 1 and 0 < damping.decrease < 1):
    raise ValueError(f"damping needs increase > 1 and 0 < decrease < 1, got {damping}.")
  if not 0 < damping.minimum <= damping.maximum:
    raise ValueError(f"damping needs 0 < minimum <= maximum, got {damping}.")
  if not damping.low <= damping.high:
    raise ValueError(f"damping needs low <= high, got {damping}.")
  search: LineSearchConfig = options["line_search"]
  if not isinstance(search, LineSearchConfig):
    raise TypeError(f"line_search must be an hfjax.LineSearchConfig, got {type(search).__name__}.")
  if not (0 <= search.armijo < 1 and 0 < search.shrink < 1):
    raise ValueError(f"line_search needs 0 <= armijo < 1 and 0 < shrink < 1, got {search}.")
  _positive_int("line_search.max_steps", search.max_steps)
  for name in ("gradient_schedule", "curvature_schedule"):
    if not isinstance(options[name], sampling.SampleSchedule):
      raise TypeError(f"{name} must be an hfjax.SampleSchedule, got {options[name]!r}.")
  if options["curvature_schedule"].kind == "variance":
    raise ValueError(
      "curvature_schedule cannot be a variance test: the variance test schedules the "
      "gradient sample only (pass it as gradient_schedule)."
    )
  _positive_int("chunk_size", options["chunk_size"])


def hessian_free(
  apply_fn: curvature.ApplyFn,
  loss_fn: curvature.LossFn,
  *,
  preconditioner: str = "lbfgs",
  memory_size: int = 10,
  lbfgs_pairs: str = "within",
  max_cg_steps: int = 250,
  cg_tol: float = 5e-4,
  initial_damping: float = 45.0,
  damping: DampingConfig | None = None,
  line_search: LineSearchConfig | None = None,
  warm_start_decay: float = 0.95,
  num_recorded_iterates: int | None = None,
  gradient_schedule: sampling.SampleSchedule | None = None,
  curvature_schedule: sampling.SampleSchedule | None = None,
  chunk_size: int = 256,
  seed: int = 0,
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
      ``"jacobi"`` (Chapelle & Erhan's estimate of :math:`\\operatorname{diag}(G)`) or
      ``"lbfgs"``.
    memory_size: L-BFGS pairs kept.
    lbfgs_pairs: ``"within"`` or ``"previous"`` (see above).
    max_cg_steps: CG step cap (250 in Martens 2010).
    cg_tol: :math:`\\epsilon` of Martens' CG stopping rule (5e-4).
    initial_damping: the first :math:`\\lambda` (45 in Martens' code).
    damping: the damping rule; ``None`` for the :class:`DampingConfig` defaults.
    line_search: the Armijo line search; ``None`` for the :class:`LineSearchConfig` defaults.
    warm_start_decay: the next CG starts from this times the last solution (0.95).
    num_recorded_iterates: CG iterates kept for backtracking; ``None`` keeps all
      :math:`\\lceil 1.3^j \\rceil` ones. Fewer saves memory on large models.
    gradient_schedule: sizes for the gradient batch (:func:`hfjax.geometric_schedule`,
      :func:`hfjax.variance_test_schedule`, :func:`hfjax.fixed_schedule`); read them with
      :func:`hfjax.sample_sizes`. ``None``: the caller decides, and sizes are not tracked.
    curvature_schedule: sizes for the curvature batch; ``None`` as above.
    chunk_size: examples per chunk for per-example statistics (Martens' diagonal, the
      variance test).
    seed: seed of the Jacobi estimator's random vectors.

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
  damping = DampingConfig() if damping is None else damping
  line_search = LineSearchConfig() if line_search is None else line_search
  tracked = gradient_schedule is not None or curvature_schedule is not None
  gradient_schedule = gradient_schedule or sampling.SampleSchedule("fixed", 1, 1)
  curvature_schedule = curvature_schedule or sampling.SampleSchedule("fixed", 1, 1)
  _validate(
    preconditioner=preconditioner,
    lbfgs_pairs=lbfgs_pairs,
    memory_size=memory_size,
    max_cg_steps=max_cg_steps,
    initial_damping=initial_damping,
    cg_tol=cg_tol,
    warm_start_decay=warm_start_decay,
    num_recorded_iterates=num_recorded_iterates,
    damping=damping,
    line_search=line_search,
    gradient_schedule=gradient_schedule,
    curvature_schedule=curvature_schedule,
    chunk_size=chunk_size,
  )
  keep_pairs = preconditioner == "lbfgs" and lbfgs_pairs == "previous"
  variance_test = gradient_schedule.kind == "variance"

  def init_fn(params: optax.Params) -> HessianFreeState:
    curvature.check_params(params)
    vector = as_accumulation(optax.tree.zeros_like(params))
    # A fresh buffer per field: leaves sharing one buffer could not be donated to a jitted step.
    scalar = lambda: jnp.zeros((), jnp.float32)
    count = lambda: jnp.zeros((), jnp.int32)
    info = HessianFreeInfo(
      rho=scalar(),
      cg_steps=count(),
      cg_stop_reason=count(),
      chosen_iterate=count(),
      line_search_step=scalar(),
      loss_before=scalar(),
      loss_after=scalar(),
      accepted=jnp.array(False),
      non_finite=jnp.array(False),
      consecutive_rejections=count(),
      total_rejections=count(),
      lbfgs_pairs=count(),
      gradient_batch_size=count(),
      curvature_batch_size=count(),
      backtracking_evaluations=count(),
      line_search_evaluations=count(),
    )
    return HessianFreeState(
      count=count(),
      damping=jnp.asarray(initial_damping, jnp.float32),
      warm_start=vector,
      lbfgs=lbfgs_init(params, memory_size) if keep_pairs else None,
      key=jax.random.key(seed),
      sampling=sampling.sampling_init(gradient_schedule, curvature_schedule) if tracked else None,
      info=info,
    )

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
    if params is None:
      raise ValueError("hessian_free needs params: call update(grads, state, params, batch=...).")
    if batch is None:
      raise ValueError(
        "hessian_free needs the gradient batch: update(..., batch=(inputs, targets))."
      )
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
    grads = as_accumulation(updates)
    if jax.tree.structure(grads) != jax.tree.structure(params):
      raise ValueError("updates (the gradients) must have the tree structure of params.")

    # Losses are compared in the parameters' accumulation precision: float64 problems must
    # see improvements below float32 resolution.
    loss_dtype = jnp.result_type(*jax.tree.leaves(grads))

    def batch_loss(step, data):
      inputs, targets = curvature.split_batch(data)
      moved = optax.apply_updates(params, optax.tree.cast_like(step, params))
      return jnp.asarray(loss_fn(apply_fn(moved, inputs), targets), loss_dtype)

    # Linearising first also checks, with a clear error, that the model outputs fit the
    # targets and that loss_fn returns a scalar, before anything else touches the loss.
    gn_matvec, _ = curvature.gauss_newton_matvec(apply_fn, loss_fn, params, curvature_batch)
    zero_step = optax.tree.zeros_like(grads)
    f0 = batch_loss(zero_step, batch) if loss is None else jnp.asarray(loss, loss_dtype)
    inputs_ok = all_finite(grads) & jnp.isfinite(f0)
    grads = optax.tree.where(inputs_ok, grads, zero_step)
    lam = state.damping

    def damped_matvec(v):
      gv = as_accumulation(gn_matvec(optax.tree.cast_like(v, params)))
      return optax.tree.add_scale(optax.tree.cast_like(gv, v), lam, v)

    key, jacobi_key = jax.random.split(state.key)
    update_preconditioner = True
    if preconditioner == "none":
      precond = None
    elif preconditioner == "martens":
      _, sum_g2 = curvature.squared_gradient_sum(
        apply_fn, loss_fn, params, curvature_batch, chunk_size=chunk_size
      )
      diag = jax.tree.map(lambda s: s / n_curv, sum_g2)
      precond = diagonal_preconditioner(diag, lam)
    elif preconditioner == "jacobi":
      diag = curvature.gauss_newton_diagonal_estimate(
        apply_fn, loss_fn, params, curvature_batch, jacobi_key, chunk_size=chunk_size
      )
      precond = diagonal_preconditioner(diag, lam)
    elif keep_pairs:
      precond, update_preconditioner = state.lbfgs, False
    else:
      precond = lbfgs_init(params, memory_size)

    x0 = optax.tree.scale(jnp.where(inputs_ok, warm_start_decay, 0.0), state.warm_start)
    result = cg(
      damped_matvec,
      optax.tree.scale(-1.0, grads),
      x0=x0,
      preconditioner=precond,
      max_steps=max_cg_steps,
      tol=cg_tol,
      update_preconditioner=update_preconditioner,
      num_recorded=num_recorded_iterates,
    )
    curvature_ok = result.stop_reason != CGStopReason.NON_FINITE

    # CG backtracking (Martens 2010, section 4.6): walk the recorded iterates from the last
    # one backwards while the validation loss keeps falling, and keep the best.
    order = jnp.argsort(-result.iterate_steps)
    slots = order.shape[0]

    def iterate(j):
      return jax.tree.map(lambda buf: buf[order[j]], result.iterates)

    def back_cond(carry):
      j, _, _, going = carry
      return going & (j < slots)

    def back_body(carry):
      j, best_j, best_f, _ = carry
      valid = result.iterate_steps[order[j]] >= 0
      f = finite_or(batch_loss(iterate(j), validation_batch), jnp.inf)
      better = valid & (f < best_f)
      return (
        j + 1,
        jnp.where(better, j, best_j),
        jnp.where(better, f, best_f),
        better | (j == 0),
      )

    walked, best_j, best_val_f, _ = jax.lax.while_loop(
      back_cond,
      back_body,
      (jnp.int32(0), jnp.int32(0), jnp.asarray(jnp.inf, loss_dtype), jnp.array(True)),
    )
    direction = iterate(best_j)
    model_value = result.iterate_values[order[best_j]].astype(loss_dtype)
    chosen_step = result.iterate_steps[order[best_j]]

    if validation_batch is batch:
      f1 = best_val_f
    else:
      f1 = finite_or(batch_loss(direction, batch), jnp.inf)
    rho = jnp.where(model_value < 0, (f1 - f0) / model_value, -jnp.inf)

    # Armijo line search on the chosen iterate; t = 1 is already evaluated.
    slope = jnp.minimum(optax.tree.vdot(grads, direction), 0.0)

    def sufficient(t, f):
      return (f <= f0 + line_search.armijo * t * slope) & (f < f0)

    def search_cond(carry):
      i, t, f = carry
      return ~sufficient(t, f) & (i < line_search.max_steps)

    def search_body(carry):
      i, t, _ = carry
      t = t * line_search.shrink
      return i + 1, t, finite_or(batch_loss(optax.tree.scale(t, direction), batch), jnp.inf)

    tries, t, f_new = jax.lax.while_loop(
      search_cond, search_body, (jnp.int32(1), jnp.float32(1.0), f1)
    )
    accepted = inputs_ok & curvature_ok & sufficient(t, f_new) & all_finite(direction)

    rho = jnp.where(accepted, rho, -jnp.inf)
    factor = jnp.where(
      rho < damping.low, damping.increase, jnp.where(rho > damping.high, damping.decrease, 1.0)
    )
    new_damping = jnp.clip(lam * factor, damping.minimum, damping.maximum)
    step = optax.tree.where(accepted, optax.tree.scale(t, direction), zero_step)
    warm_start = optax.tree.where(accepted & all_finite(result.x), result.x, zero_step)

    lbfgs = state.lbfgs
    lbfgs_pairs_held = jnp.zeros((), jnp.int32)
    if result.preconditioner_state is not None:
      lbfgs_pairs_held = result.preconditioner_state.num_pairs
    if keep_pairs:
      new_pairs = result.preconditioner_state
      use_new = inputs_ok & curvature_ok & (new_pairs.num_pairs > 0)
      lbfgs = optax.tree.where(use_new, new_pairs, state.lbfgs)
      lbfgs_pairs_held = lbfgs.num_pairs

    variance_l1 = grad_sq_norm = None
    if variance_test:
      sum_g, sum_g2 = curvature.squared_gradient_sum(
        apply_fn, loss_fn, params, batch, chunk_size=chunk_size
      )
      variance_l1 = sampling.gradient_variance_l1(sum_g, sum_g2, n_batch)
      grad_sq_norm = optax.tree.vdot(grads, grads).astype(jnp.float32)
      variance_l1 = jnp.where(inputs_ok & jnp.isfinite(variance_l1), variance_l1, 0.0)
    next_sampling = state.sampling
    if tracked:
      next_sampling = sampling.sampling_update(
        state.sampling,
        gradient_schedule,
        curvature_schedule,
        variance_l1=variance_l1,
        grad_sq_norm=grad_sq_norm,
      )

    previous = state.info
    loss_before = jnp.where(jnp.isfinite(f0), f0, previous.loss_after)
    consecutive = jnp.where(accepted, 0, previous.consecutive_rejections + 1)
    info = HessianFreeInfo(
      rho=jnp.where(jnp.isfinite(rho), rho, 0.0).astype(jnp.float32),
      cg_steps=result.num_steps,
      cg_stop_reason=result.stop_reason,
      chosen_iterate=chosen_step,
      line_search_step=jnp.where(accepted, t, 0.0).astype(jnp.float32),
      loss_before=loss_before,
      loss_after=jnp.where(accepted, f_new, loss_before),
      accepted=accepted,
      non_finite=~(inputs_ok & curvature_ok),
      consecutive_rejections=consecutive.astype(jnp.int32),
      total_rejections=(previous.total_rejections + (~accepted).astype(jnp.int32)),
      lbfgs_pairs=lbfgs_pairs_held,
      gradient_batch_size=jnp.asarray(n_batch, jnp.int32),
      curvature_batch_size=jnp.asarray(n_curv, jnp.int32),
      backtracking_evaluations=(walked + (validation_batch is not batch)).astype(jnp.int32),
      line_search_evaluations=(tries - 1).astype(jnp.int32),
    )
    new_state = HessianFreeState(
      count=optax.safe_increment(state.count),
      damping=new_damping.astype(jnp.float32),
      warm_start=warm_start,
      lbfgs=lbfgs,
      key=key,
      sampling=next_sampling,
      info=info,
    )
    # Keep the carried dtypes exactly as init made them (no retracing, no x64 drift); PRNG
    # keys have no dtype to cast.
    new_state = optax.tree.cast_like(new_state._replace(key=None), state._replace(key=None))
    new_state = new_state._replace(key=key)
    return optax.tree.cast_like(step, params), new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
