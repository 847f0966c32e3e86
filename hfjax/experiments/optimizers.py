"""The optimizers a config names, each built as one compiled training step.

:func:`build_optimizer` returns an :class:`Optimizer`: ``run(params, state, place)`` draws
its batches, dispatches one step and returns ``(params, state, pending)`` without waiting for
the device; :func:`read_records` turns a list of pending steps into their records in one
device-to-host transfer. A record holds the step's training loss, its examples processed
(``"examples"``, defined in :mod:`hfjax.experiments.train`) and, for HF, its diagnostics.

Drawing the next batch needs no value from the device: the host follows the sample sizes of
fixed and geometric schedules and the step count itself (:class:`HostSchedule`), reading them
from a state only at the start and after a restore. A variance-test schedule decides its next
size on the device, from the step's gradients, so it reads the two sizes (two int32) after
every step: the one transfer between reads that is left, and only with that schedule.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import ml_collections
import numpy as np
import optax

import hfjax
from hfjax.experiments import config as config_lib
from hfjax.experiments.config import require
from hfjax.experiments.task import Task, batch_loss

# Diagnostics of an HF step copied into its record (train_loss is loss_before).
HF_INFO = (
  "loss_before",
  "damping",
  "rho",
  "cg_steps",
  "chosen_iterate",
  "line_search_step",
  "accepted",
  "consecutive_rejections",
  "gradient_batch_size",
  "curvature_batch_size",
  "backtracking_evaluations",
  "line_search_evaluations",
)
# Passes of each preconditioner per curvature example: Martens' diagonal needs one gradient
# per example, the Jacobi estimate one more forward-mode pass; a K-FAC refresh is one batched
# forward and one backward pass of sampled cotangents (counted on the steps that refresh).
_PRECONDITIONER_PASSES = {"martens": 2, "jacobi": 3, "kfac": 2, "kfac+lbfgs": 2}


class Pending(NamedTuple):
  """One dispatched step whose record waits for its diagnostics to be read.

  Attributes:
    device: the step's diagnostics, a small pytree of device scalars.
    finish: ``finish(values) -> record`` from the same pytree read back as NumPy values.
  """

  device: Any
  finish: Callable[[Any], dict]


def read_records(pending: list[Pending]) -> list[dict]:
  """The records of ``pending`` steps, their diagnostics read in one ``jax.device_get``."""
  values = jax.device_get([p.device for p in pending])
  return [
    p.finish(jax.tree.map(lambda v: v.item(), v)) for p, v in zip(pending, values, strict=True)
  ]


class Optimizer(NamedTuple):
  """A config's optimizer as the training loop drives it.

  Attributes:
    state: the initial optimizer state.
    run: ``run(params, state, place) -> (params, state, pending)``, a :class:`Pending`.
    sync: ``sync(state)``: what the host follows between reads (sample sizes, step count),
      read from ``state``; call it before the first step and after restoring a state.
    compiled: the step, compiled ahead of time; ``compiled.compile_time`` is the seconds
      spent compiling so far.
  """

  state: Any
  run: Callable[..., tuple[Any, Any, Pending]]
  sync: Callable[[Any], None]
  compiled: AheadOfTime


class AheadOfTime:
  """A jitted function compiled ahead of time for each new set of argument shapes, so that
  compilation can be timed apart from training."""

  def __init__(self, fn: Callable[..., Any]):
    self._jit = jax.jit(fn)
    self._compiled: dict[Any, Any] = {}
    self.compile_time = 0.0

  def __call__(self, *args):
    key = tuple((np.shape(a), str(getattr(a, "dtype", type(a)))) for a in jax.tree.leaves(args))
    if key not in self._compiled:
      start = time.perf_counter()
      self._compiled[key] = self._jit.lower(*args).compile()
      self.compile_time += time.perf_counter() - start
    return self._compiled[key](*args)


def num_examples(value: int, num_train: int, key: str) -> int:
  """A size from the config (``config.<key>``); 0 means the whole training set."""
  require(
    int(value) == value and 0 <= value <= num_train,
    f"config.{key}={value!r} must be an integer in [0, {num_train}] (0: all "
    f"{num_train} training examples).",
  )
  return num_train if value == 0 else int(value)


def sample_schedule(
  cfg: ml_collections.ConfigDict, num_train: int, key: str
) -> hfjax.SampleSchedule:
  """The :class:`hfjax.SampleSchedule` of a :func:`~hfjax.experiments.config.schedule_config`."""
  kinds = config_lib.SCHEDULES
  require(cfg.kind in kinds, f"config.{key}.kind={cfg.kind!r}; choose one of {kinds}.")
  start = num_examples(cfg.start, num_train, f"{key}.start")
  if cfg.kind == "fixed":
    return hfjax.fixed_schedule(start)
  maximum = num_examples(cfg.maximum, num_train, f"{key}.maximum")
  require(maximum >= start, f"config.{key}.maximum={maximum} is below its start={start}.")
  if cfg.kind == "geometric":
    return hfjax.geometric_schedule(start, maximum, cfg.factor, cfg.grid_ratio)
  return hfjax.variance_test_schedule(start, maximum, cfg.theta, cfg.grid_ratio)


class HostSchedule:
  """The next sample sizes and step count of an HF run, followed on the host.

  The step updates the sizes of a fixed or geometric schedule on the device (float32 targets
  grown by ``factor``, rounded up to the grid); the host repeats the same float32 arithmetic
  (:meth:`hfjax.SampleSchedule.grow` and :meth:`~hfjax.SampleSchedule.round_up`, equal to the
  step's bit for bit), so that drawing a batch needs no read of the state. A variance-test
  schedule grows from the step's gradients: its sizes are read from the state after each step.
  """

  def __init__(self, gradient: hfjax.SampleSchedule, curvature: hfjax.SampleSchedule):
    self._schedules = (gradient, curvature)
    self.reads_state = gradient.kind == "variance"
    self.sync(None)

  def sync(self, state: Any) -> None:
    """Takes the targets and count of ``state`` (a read); ``None``: those of a new state."""
    if state is None:
      self._targets = [np.float32(s.start) for s in self._schedules]
      self.count = 0
      return
    names = ("gradient_target", "curvature_target")
    self._targets = [np.float32(optax.tree.get(state, name)) for name in names]
    self.count = int(optax.tree.get(state, "count"))

  def sizes(self, state: Any) -> tuple[int, int]:
    """``(gradient_size, curvature_size)`` of the next step."""
    if self.reads_state:
      with jax.transfer_guard_device_to_host("allow"):
        return hfjax.sample_sizes(state)
    pairs = zip(self._schedules, self._targets, strict=True)
    return tuple(int(schedule.round_up(target)) for schedule, target in pairs)

  def advance(self) -> None:
    """Follows one step: the targets grow as the step grows them."""
    self.count += 1
    if not self.reads_state:
      pairs = zip(self._schedules, self._targets, strict=True)
      self._targets = [schedule.grow(target) for schedule, target in pairs]


def _hf_examples(
  info: Mapping[str, Any],
  preconditioner: str,
  variance_test: bool,
  *,
  built: bool = True,
) -> int:
  """Example-passes of one HF step, from its diagnostics (see :mod:`hfjax.experiments.train`).

  The trainer passes no validation batch, so CG backtracking walks the recorded iterates on
  the curvature sample and then evaluates the chosen one on the gradient sample
  (``backtracking_evaluations`` counts both, and the loss at the incoming parameters on the
  curvature sample that ``damping.ratio="martens"`` adds). When the two samples are one batch
  (passed once) the walk's loss is the chosen one's and is counted once, which the formula
  below gives too, as the two sizes are then equal; the line
  search's further trials are on the gradient sample too. ``built``: whether the
  preconditioner's passes were spent this step (K-FAC refreshes every ``kfac.update_every``
  steps).
  """
  n_g, n_c = int(info["gradient_batch_size"]), int(info["curvature_batch_size"])
  gradient = 2 * n_g
  products = n_c + 2 * n_c * (int(info["cg_steps"]) + 1)  # linearise, then warm start + steps
  walk = (int(info["backtracking_evaluations"]) - 1) * n_c
  chosen_and_search = (1 + int(info["line_search_evaluations"])) * n_g
  total = gradient + products + walk + chosen_and_search
  if built:
    total += _PRECONDITIONER_PASSES.get(preconditioner, 0) * n_c
  if variance_test:
    total += 2 * n_g
  return total


def _hessian_free(config: ml_collections.ConfigDict, task: Task, sampler: hfjax.BatchSampler):
  opt = config.optimizer
  num_train = sampler.num_examples
  gradient = sample_schedule(opt.gradient_schedule, num_train, "optimizer.gradient_schedule")
  curvature = sample_schedule(opt.curvature_schedule, num_train, "optimizer.curvature_schedule")
  require(
    curvature.start <= gradient.start and curvature.maximum <= gradient.maximum,
    "the curvature sample must not be larger than the gradient sample "
    f"(curvature start/maximum {curvature.start}/{curvature.maximum}, gradient "
    f"{gradient.start}/{gradient.maximum}).",
  )
  tx = hfjax.hessian_free(
    task.apply_fn,
    task.loss_fn,
    preconditioner=opt.preconditioner,
    memory_size=opt.memory_size,
    lbfgs_pairs=opt.lbfgs_pairs,
    max_cg_steps=opt.max_cg_steps,
    cg_tol=opt.cg_tol,
    initial_damping=opt.initial_damping,
    num_recorded_iterates=opt.num_recorded_iterates or None,
    warm_start_decay="adaptive" if opt.adaptive_warm_start else opt.warm_start_decay,
    damping=hfjax.DampingConfig(**opt.damping),
    kfac=hfjax.KFACConfig(**opt.kfac),
    gradient_schedule=gradient,
    curvature_schedule=curvature,
    seed=config.seed,
    curvature_matmul_dtype=opt.curvature_matmul_dtype or None,
  )
  loss = batch_loss(task)

  def step(params, state, batch, curvature_batch):
    value, grads = jax.value_and_grad(loss)(params, batch)
    updates, state = tx.update(
      grads, state, params, batch=batch, curvature_batch=curvature_batch, loss=value
    )
    return optax.apply_updates(params, updates), state

  compiled = AheadOfTime(step)
  variance_test = gradient.kind == "variance"
  # Only K-FAC's build can skip a step; every other preconditioner is built for each solve.
  build_every = opt.kfac.update_every if opt.preconditioner.startswith("kfac") else 1
  host = HostSchedule(gradient, curvature)

  def run(params, state, place):
    built = host.count % build_every == 0
    gradient_size, curvature_size = host.sizes(state)
    batch, curvature_batch = sampler.sample_pair(gradient_size, curvature_size)
    # The curvature batch is the first examples of the gradient batch: of the same size it is
    # that batch, passed once so that CG backtracking's loss at the chosen iterate is also the
    # step's gradient-batch loss (one forward pass less).
    same = curvature_size == gradient_size
    batch, curvature_batch = place(batch), None if same else place(curvature_batch)
    params, state = compiled(params, state, batch, curvature_batch)
    host.advance()

    def finish(info: dict) -> dict:
      record = dict(info)
      record["train_loss"] = record.pop("loss_before")
      record["examples"] = _hf_examples(record, opt.preconditioner, variance_test, built=built)
      return record

    return params, state, Pending({k: optax.tree.get(state, k) for k in HF_INFO}, finish)

  return Optimizer(tx.init(task.params), run, host.sync, compiled)


def _first_order(config: ml_collections.ConfigDict, task: Task, sampler: hfjax.BatchSampler):
  opt = config.optimizer
  require(opt.learning_rate > 0, f"config.optimizer.learning_rate={opt.learning_rate} must be > 0.")
  require(0 <= opt.momentum < 1, f"config.optimizer.momentum={opt.momentum} must be in [0, 1).")
  batch_size = num_examples(opt.batch_size, sampler.num_examples, "optimizer.batch_size")
  if opt.name == "adam":
    tx = optax.adam(opt.learning_rate)
  else:
    tx = optax.sgd(opt.learning_rate, momentum=opt.momentum or None, nesterov=opt.nesterov)
  loss = batch_loss(task)

  def step(params, state, batch):
    value, grads = jax.value_and_grad(loss)(params, batch)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, value

  compiled = AheadOfTime(step)

  def run(params, state, place):
    batch = place(sampler.sample(batch_size))
    params, state, value = compiled(params, state, batch)
    finish = lambda loss: {"train_loss": loss, "examples": 2 * batch_size}
    return params, state, Pending(value, finish)

  return Optimizer(tx.init(task.params), run, lambda state: None, compiled)


def _lbfgs(config: ml_collections.ConfigDict, task: Task, sampler: hfjax.BatchSampler):
  opt = config.optimizer
  batch_size = num_examples(opt.batch_size, sampler.num_examples, "optimizer.batch_size")
  tx = optax.lbfgs(memory_size=opt.memory_size)
  loss = batch_loss(task)
  # L-BFGS needs a deterministic objective: one fixed batch for the whole run.
  fixed_batch = sampler.sample(batch_size)

  def step(params, state, batch):
    objective = lambda p: loss(p, batch)
    value, grads = optax.value_and_grad_from_state(objective)(params, state=state)
    updates, state = tx.update(grads, state, params, value=value, grad=grads, value_fn=objective)
    return optax.apply_updates(params, updates), state, value

  compiled = AheadOfTime(step)
  first_step = True

  def run(params, state, place):
    nonlocal first_step
    params, state, value = compiled(params, state, place(fixed_batch))
    # The first step evaluates the objective itself; later ones reuse the line search's.
    first = first_step
    first_step = False

    def finish(info: tuple) -> dict:
      loss, trials = info
      return {"train_loss": loss, "examples": 2 * batch_size * (trials + first)}

    return params, state, Pending((value, optax.tree.get(state, "num_linesearch_steps")), finish)

  return Optimizer(tx.init(task.params), run, lambda state: None, compiled)


def build_optimizer(
  config: ml_collections.ConfigDict, task: Task, sampler: hfjax.BatchSampler
) -> Optimizer:
  """The config's :class:`Optimizer` (see the module docstring)."""
  builder = {"hf": _hessian_free, "adam": _first_order, "sgd": _first_order, "lbfgs": _lbfgs}
  return builder[config.optimizer.name](config, task, sampler)
