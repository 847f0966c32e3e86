r"""Trains a benchmark model with Hessian-free optimization or an Optax peer.

Usage::

  python -m hfjax.experiments.train --config configs/curves_autoencoder.py \
    [--config.optimizer.memory_size=20 ...] [--workdir runs/curves] [--resume]

The config (``configs/*.py``, each with ``get_config()``) names the data set, the model and
the optimizer (``"hf"``, ``"adam"``, ``"sgd"`` or ``"lbfgs"``); :func:`default_config` lists
every key with its default. The run writes to the workdir:

- ``metrics.jsonl``: one JSON record per step (and one for the initial evaluation, step 0);
- ``summary.json``: the final numbers, also printed;
- ``loss.png``: training and test loss against wall time and against examples processed;
- ``checkpoints/``: with ``checkpoint_every > 0``, and always on Ctrl-C (``--resume`` goes on
  from the newest one).

Definitions used in the records:

- ``wall_time``: seconds spent training, excluding evaluation and XLA compilation (each new
  batch shape is compiled ahead of time and its cost is summed in ``compile_time``), but
  including drawing the batches.
- ``examples_processed``: example-passes, i.e. the number of examples that went through a
  forward pass plus the number that went through a backward (or forward-mode) pass. A
  gradient costs 2 per example (forward and backward), a loss evaluation 1, the
  linearisation for the Gauss-Newton products 1 per curvature example, and every
  Gauss-Newton product 2 per curvature example (a forward-mode and a reverse-mode pass).
  For HF this counts the gradient sample, the CG products on the curvature sample (one
  extra for the warm start's residual), the CG-backtracking evaluations on the curvature
  sample, the loss of the chosen step and the line-search trials on the gradient sample,
  and the per-example passes of the Martens (2 per example) and Jacobi (3 per example)
  preconditioners and of the variance test (2 per example); the backtracking and
  line-search counts are read back from the step's diagnostics. For Optax's L-BFGS every
  zoom line-search trial is a value and a gradient (2 per example). The count measures
  work, not time: the per-example passes materialise one gradient per example, which costs
  far more time per pass than a batched gradient does.
- ``train_loss``: the loss of the step's (gradient) batch at the incoming parameters.
- ``eval_train_loss`` / ``test_loss``: at evaluation steps, the loss on the first
  ``eval_train_examples`` training examples and on the test set; ``train_error`` /
  ``test_error`` are the reconstruction error (autoencoders) or the error rate (classifiers).
"""

from __future__ import annotations

import json
import math
import pathlib
import sys
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import app, flags, logging
from jax.flatten_util import ravel_pytree
from ml_collections import config_flags

import hfjax
from hfjax.experiments import datasets, models, plotting

OPTIMIZERS = ("hf", "adam", "sgd", "lbfgs")
MODELS = ("autoencoder", "classifier")
SCHEDULES = ("fixed", "geometric", "variance")


class Task(NamedTuple):
  """A data set with a model, its matching loss and its reported error."""

  data: datasets.Dataset
  apply_fn: Callable[[Any, Any], Any]
  loss_fn: Callable[[Any, Any], jax.Array]
  error_fn: Callable[[Any, Any], jax.Array]
  params: Any
  unravel: Callable[[Any], Any]


# ----------------------------------------------------------------------------- config


def _schedule_config(kind: str = "fixed", start: int = 0, maximum: int = 0, **kwargs):
  return ml_collections.ConfigDict(
    {
      "kind": kind,
      "start": start,
      "maximum": maximum,
      "factor": 1.2,
      "theta": 0.5,
      "grid_ratio": 2.0,
      **kwargs,
    }
  )


def default_config() -> ml_collections.ConfigDict:
  """Every key the script reads, with its default; ``configs/*.py`` start from this.

  Sizes of samples and batches count examples, and 0 means the whole training set.
  """
  config = ml_collections.ConfigDict()
  # Loader name and its keyword arguments (hfjax.experiments.datasets.load).
  config.dataset = ml_collections.ConfigDict(
    {"name": "curves", "num_train": 20000, "num_test": 10000}
  )
  config.model = ml_collections.ConfigDict(
    {
      "kind": "autoencoder",  # "autoencoder" (sigmoid cross-entropy) or "classifier" (softmax)
      "encoder_sizes": models.CURVES_ENCODER,  # autoencoder: encoder widths, code last
      "hidden_sizes": (100,),  # classifier: hidden widths
      "activation": "sigmoid",  # classifier hidden units
      "init_nonzero": 15,  # Martens' sparse initialisation
      "init_scale": 1.0,
    }
  )
  opt = config.optimizer = ml_collections.ConfigDict()
  opt.name = "hf"  # "hf", "adam", "sgd" or "lbfgs"
  # Hessian-free (hfjax.hessian_free).
  opt.preconditioner = "lbfgs"  # "none", "martens", "jacobi" or "lbfgs"
  opt.memory_size = 10  # L-BFGS pairs (also optax.lbfgs's memory)
  opt.lbfgs_pairs = "within"  # "within" the solve or from the "previous" solve
  opt.max_cg_steps = 250
  opt.initial_damping = 45.0
  opt.cg_tol = 5e-4
  opt.num_recorded_iterates = 0  # CG iterates kept for backtracking; 0: all
  # Sample-size schedules: kind "fixed" (start), "geometric" (start * factor**k up to
  # maximum) or "variance" (Byrd et al.'s test with theta; gradient only).
  opt.gradient_schedule = _schedule_config()
  opt.curvature_schedule = _schedule_config(start=200)
  # Optax peers.
  opt.learning_rate = 1e-3
  opt.momentum = 0.9  # sgd
  opt.nesterov = False  # sgd
  opt.batch_size = 256  # adam and sgd minibatch; lbfgs uses one fixed batch of this size
  # Length of the run: stops at the first of these (0: no limit).
  config.num_steps = 50
  config.budget_seconds = 0.0  # training wall time, evaluation and compilation excluded
  config.budget_examples = 0  # examples processed (see the module docstring)
  config.max_consecutive_rejections = 20  # HF: stop when the damping cannot rescue a step
  config.target_loss = ml_collections.config_dict.placeholder(float)  # for time-to-target
  # Evaluation: every eval_every steps and every eval_every_seconds of training (0: off).
  config.eval_every = 5
  config.eval_every_seconds = 0.0
  config.eval_train_examples = 10000  # training-loss subset; 0: all
  config.seed = 0
  config.float64 = False
  config.flatten_params = True
  config.mesh_shape = ml_collections.config_dict.placeholder(tuple)  # e.g. (8,); None: one device
  config.checkpoint_every = 0  # steps; 0: only on Ctrl-C
  config.compilation_cache_dir = ""  # persistent XLA cache, e.g. ~/.cache/hfjax_xla
  config.progress = True  # tqdm bar (on a terminal)
  config.plot = True  # <workdir>/loss.png
  return config


def _require(condition: bool, message: str) -> None:
  if not condition:
    raise ValueError(message)


def _num_examples(value: int, num_train: int, key: str) -> int:
  """Sizes in the config: 0 means the whole training set."""
  _require(
    int(value) == value and 0 <= value <= num_train,
    f"config.{key}={value!r} must be an integer in [0, {num_train}] (0: all "
    f"{num_train} training examples).",
  )
  return num_train if value == 0 else int(value)


def _schedule(cfg: ml_collections.ConfigDict, num_train: int, key: str) -> hfjax.SampleSchedule:
  _require(cfg.kind in SCHEDULES, f"config.{key}.kind={cfg.kind!r}; choose one of {SCHEDULES}.")
  start = _num_examples(cfg.start, num_train, f"{key}.start")
  if cfg.kind == "fixed":
    return hfjax.fixed_schedule(start)
  maximum = _num_examples(cfg.maximum, num_train, f"{key}.maximum")
  _require(maximum >= start, f"config.{key}.maximum={maximum} is below its start={start}.")
  if cfg.kind == "geometric":
    return hfjax.geometric_schedule(start, maximum, cfg.factor, cfg.grid_ratio)
  return hfjax.variance_test_schedule(start, maximum, cfg.theta, cfg.grid_ratio)


def _check_run_config(config: ml_collections.ConfigDict) -> None:
  _require(config.num_steps >= 1, f"config.num_steps={config.num_steps} must be >= 1.")
  for key in ("eval_every", "checkpoint_every", "budget_seconds", "budget_examples"):
    _require(config[key] >= 0, f"config.{key}={config[key]} must be >= 0 (0: off).")
  _require(config.eval_every_seconds >= 0, "config.eval_every_seconds must be >= 0 (0: off).")
  _require(
    config.optimizer.name in OPTIMIZERS,
    (f"config.optimizer.name={config.optimizer.name!r}; choose one of {OPTIMIZERS}."),
  )
  _require(
    config.model.kind in MODELS, f"config.model.kind={config.model.kind!r}; choose one of {MODELS}."
  )


# ----------------------------------------------------------------------------- task


def load_task(config: ml_collections.ConfigDict) -> Task:
  """The data set, model, loss and initial parameters named by the config."""
  kwargs = {k: v for k, v in config.dataset.items() if k != "name"}
  if config.dataset.name == "mnist":
    _require(
      kwargs.get("path") is not None,
      "the mnist dataset needs a path: pass --config.dataset.path=/path/to/mnist.npz "
      "(or a directory of the IDX files).",
    )
  data = datasets.load(config.dataset.name, **kwargs)
  dtype = np.float64 if config.float64 else np.float32
  if data.x_train.dtype != dtype:
    cast = {k: getattr(data, k) for k in ("x_train", "y_train", "x_test", "y_test")}
    cast = {k: v.astype(dtype) if v.dtype.kind == "f" else v for k, v in cast.items()}
    data = data._replace(**cast)
  _require(len(data.x_train) > 0 and len(data.x_test) > 0, "the dataset has no train or test data.")

  kernel_init = models.sparse_init(config.model.init_nonzero, config.model.init_scale)
  if config.model.kind == "autoencoder":
    _require(
      data.y_train.ndim == 2,
      f"dataset {config.dataset.name!r} has labels, not images to reconstruct "
      "(set config.dataset.autoencoder=True).",
    )
    module = models.DeepAutoencoder(tuple(config.model.encoder_sizes), kernel_init=kernel_init)
    loss_fn, error_fn = models.sigmoid_cross_entropy, models.reconstruction_error
  else:
    _require(data.y_train.ndim == 1, f"dataset {config.dataset.name!r} has no class labels.")
    num_classes = int(max(data.y_train.max(), data.y_test.max())) + 1
    module = models.MLPClassifier(
      tuple(config.model.hidden_sizes),
      num_classes,
      activation=config.model.activation,
      kernel_init=kernel_init,
    )
    loss_fn = models.softmax_cross_entropy
    error_fn = lambda logits, labels: jnp.mean(jnp.argmax(logits, axis=-1) != labels)
  params = module.init(jax.random.key(config.seed), jnp.zeros((1, data.x_train.shape[1]), dtype))
  params = jax.tree.map(lambda p: p.astype(dtype), params["params"])
  module_apply = models.make_apply_fn(module)
  if config.flatten_params:
    # One flat parameter vector instead of a pytree: the CG loop's vector arithmetic is then
    # one op per step instead of one per leaf, and XLA compiles the HF step of the CURVES
    # autoencoder (24 leaves) 3-4x faster on CPU. The mathematics is the same.
    flat, unravel = ravel_pytree(params)
    return Task(data, lambda p, x: module_apply(unravel(p), x), loss_fn, error_fn, flat, unravel)
  return Task(data, module_apply, loss_fn, error_fn, params, lambda p: p)


def _batch_loss(task: Task) -> Callable[[Any, Any], jax.Array]:
  def loss(params, batch):
    inputs, targets = batch
    return task.loss_fn(task.apply_fn(params, inputs), targets)

  return loss


class _Evaluator:
  """Loss and error over a whole split, in chunks (at most two compiled shapes)."""

  def __init__(self, task: Task, chunk: int = 2048):
    def sums(params, inputs, targets, weight):
      outputs = task.apply_fn(params, inputs)
      return weight * task.loss_fn(outputs, targets), weight * task.error_fn(outputs, targets)

    self._sums = jax.jit(sums)
    self._chunk = chunk

  def __call__(self, params: Any, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    loss = error = 0.0
    for start in range(0, len(x), self._chunk):
      xs, ys = x[start : start + self._chunk], y[start : start + self._chunk]
      chunk_loss, chunk_error = self._sums(params, xs, ys, len(xs) / len(x))
      loss, error = loss + float(chunk_loss), error + float(chunk_error)
    return loss, error


class _AheadOfTime:
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


# ----------------------------------------------------------------------------- optimizers


def _hf_examples(info: dict, record_steps: np.ndarray, num_recorded: int, options: dict) -> int:
  """Example-passes of one HF step, from its diagnostics (see the module docstring)."""
  n_g, n_c = int(info["gradient_batch_size"]), int(info["curvature_batch_size"])
  cg_steps, chosen = int(info["cg_steps"]), int(info["chosen_iterate"])
  recorded = sorted({int(s) for s in record_steps if s <= cg_steps} | {cg_steps}, reverse=True)
  if num_recorded:
    recorded = recorded[:num_recorded]
  position = recorded.index(chosen) if chosen in recorded else 0
  backtracking = min(position + 2, len(recorded))
  if info["accepted"]:
    shrink = options["line_search_shrink"]
    trials = round(math.log(max(info["line_search_step"], 1e-30)) / math.log(shrink))
  else:
    trials = options["line_search_max_steps"] - 1
  total = 2 * n_g + n_c + 2 * n_c * (cg_steps + 1) + backtracking * n_c + (1 + trials) * n_g
  total += {"martens": 2 * n_c, "jacobi": 3 * n_c}.get(options["preconditioner"], 0)
  if options["variance_test"]:
    total += 2 * n_g
  return total


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
)


def _hessian_free(config: ml_collections.ConfigDict, task: Task, sampler: hfjax.BatchSampler):
  opt = config.optimizer
  num_train = sampler.num_examples
  gradient = _schedule(opt.gradient_schedule, num_train, "optimizer.gradient_schedule")
  curvature = _schedule(opt.curvature_schedule, num_train, "optimizer.curvature_schedule")
  _require(
    curvature.start <= gradient.start and curvature.maximum <= gradient.maximum,
    "the curvature sample must not be larger than the gradient sample "
    f"(curvature start/maximum {curvature.start}/{curvature.maximum}, gradient "
    f"{gradient.start}/{gradient.maximum}).",
  )
  line_search = hfjax.LineSearchConfig()
  tx = hfjax.hessian_free(
    task.apply_fn,
    task.loss_fn,
    preconditioner=opt.preconditioner,
    memory_size=opt.memory_size,
    lbfgs_pairs=opt.lbfgs_pairs,
    max_cg_steps=opt.max_cg_steps,
    cg_tol=opt.cg_tol,
    initial_damping=opt.initial_damping,
    line_search=line_search,
    num_recorded_iterates=opt.num_recorded_iterates or None,
    gradient_schedule=gradient,
    curvature_schedule=curvature,
    seed=config.seed,
  )
  loss = _batch_loss(task)

  def step(params, state, batch, curvature_batch):
    value, grads = jax.value_and_grad(loss)(params, batch)
    updates, state = tx.update(
      grads, state, params, batch=batch, curvature_batch=curvature_batch, loss=value
    )
    return optax.apply_updates(params, updates), state

  compiled = _AheadOfTime(step)
  record_steps = hfjax.martens_record_steps(opt.max_cg_steps)
  options = {
    "preconditioner": opt.preconditioner,
    "variance_test": gradient.kind == "variance",
    "line_search_shrink": line_search.shrink,
    "line_search_max_steps": line_search.max_steps,
  }

  def run(params, state, place):
    sizes = hfjax.sample_sizes(state)
    batch, curvature_batch = place(sampler.sample_pair(*sizes))
    params, state = compiled(params, state, batch, curvature_batch)
    info = jax.device_get({k: optax.tree.get(state, k) for k in HF_INFO})
    record = {k: v.item() for k, v in info.items()}
    record["train_loss"] = record.pop("loss_before")
    record["examples"] = _hf_examples(record, record_steps, opt.num_recorded_iterates, options)
    return params, state, record

  return tx.init(task.params), run, compiled


def _first_order(config: ml_collections.ConfigDict, task: Task, sampler: hfjax.BatchSampler):
  opt = config.optimizer
  _require(
    opt.learning_rate > 0, f"config.optimizer.learning_rate={opt.learning_rate} must be > 0."
  )
  _require(0 <= opt.momentum < 1, f"config.optimizer.momentum={opt.momentum} must be in [0, 1).")
  batch_size = _num_examples(opt.batch_size, sampler.num_examples, "optimizer.batch_size")
  if opt.name == "adam":
    tx = optax.adam(opt.learning_rate)
  else:
    tx = optax.sgd(opt.learning_rate, momentum=opt.momentum or None, nesterov=opt.nesterov)
  loss = _batch_loss(task)

  def step(params, state, batch):
    value, grads = jax.value_and_grad(loss)(params, batch)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, value

  compiled = _AheadOfTime(step)

  def run(params, state, place):
    batch = place(sampler.sample(batch_size))
    params, state, value = compiled(params, state, batch)
    return params, state, {"train_loss": float(value), "examples": 2 * batch_size}

  return tx.init(task.params), run, compiled


def _lbfgs(config: ml_collections.ConfigDict, task: Task, sampler: hfjax.BatchSampler):
  opt = config.optimizer
  batch_size = _num_examples(opt.batch_size, sampler.num_examples, "optimizer.batch_size")
  tx = optax.lbfgs(memory_size=opt.memory_size)
  loss = _batch_loss(task)
  # L-BFGS needs a deterministic objective: one fixed batch for the whole run.
  fixed_batch = sampler.sample(batch_size)

  def step(params, state, batch):
    objective = lambda p: loss(p, batch)
    value, grads = optax.value_and_grad_from_state(objective)(params, state=state)
    updates, state = tx.update(grads, state, params, value=value, grad=grads, value_fn=objective)
    return optax.apply_updates(params, updates), state, value

  compiled = _AheadOfTime(step)
  first_step = True

  def run(params, state, place):
    nonlocal first_step
    params, state, value = compiled(params, state, place(fixed_batch))
    trials = int(optax.tree.get(state, "num_linesearch_steps"))
    # The first step evaluates the objective itself; later ones reuse the line search's.
    passes = trials + first_step
    first_step = False
    return params, state, {"train_loss": float(value), "examples": 2 * batch_size * passes}

  return tx.init(task.params), run, compiled


def build_optimizer(config: ml_collections.ConfigDict, task: Task, sampler: hfjax.BatchSampler):
  """``(opt_state, run, compiled)``: ``run(params, state, place) -> (params, state, record)``."""
  builder = {"hf": _hessian_free, "adam": _first_order, "sgd": _first_order, "lbfgs": _lbfgs}
  return builder[config.optimizer.name](config, task, sampler)


# ----------------------------------------------------------------------------- the run


def _placement(config: ml_collections.ConfigDict):
  """``(place_batch, place_tree)``: identity on one device, data-parallel with a mesh."""
  if not config.mesh_shape:
    identity = lambda tree: tree
    return identity, identity
  from hfjax import sharding

  mesh = sharding.make_mesh(tuple(config.mesh_shape))
  return (lambda batch: sharding.shard_batch(batch, mesh)), (
    lambda tree: sharding.replicate(tree, mesh)
  )


def _enable_compilation_cache(directory: str) -> None:
  if directory:
    path = pathlib.Path(directory).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def _read_metrics(path: pathlib.Path, up_to_step: int | None = None) -> list[dict]:
  if not path.exists():
    return []
  records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
  return [r for r in records if up_to_step is None or r["step"] <= up_to_step]


def read_metrics(workdir: str | pathlib.Path) -> list[dict]:
  """The records of ``<workdir>/metrics.jsonl``."""
  return _read_metrics(pathlib.Path(workdir) / "metrics.jsonl")


def first_below(records: list[dict], target: float) -> dict | None:
  """The first evaluation record whose training loss is at or below ``target``."""
  for record in records:
    loss = record.get("eval_train_loss")
    if loss is not None and loss <= target:
      return record
  return None


def _progress(total: int, enabled: bool):
  from tqdm import tqdm

  return tqdm(total=total, disable=not enabled, dynamic_ncols=True, leave=True)


def _postfix(record: dict) -> dict:
  shown = {"loss": f"{record['train_loss']:.4g}"}
  if "damping" in record:
    shown.update(
      damping=f"{record['damping']:.3g}",
      cg=record["cg_steps"],
      samples=f"{record['gradient_batch_size']}/{record['curvature_batch_size']}",
    )
  if record.get("test_loss") is not None:
    shown["test"] = f"{record['test_loss']:.4g}"
  return shown


def _stop_reason(config, step: int, wall: float, examples: int, record: dict) -> str | None:
  if step >= config.num_steps:
    return "num_steps"
  if config.budget_seconds and wall >= config.budget_seconds:
    return "budget_seconds"
  if config.budget_examples and examples >= config.budget_examples:
    return "budget_examples"
  rejections = record.get("consecutive_rejections", 0)
  if config.max_consecutive_rejections and rejections >= config.max_consecutive_rejections:
    return "consecutive_rejections"
  return None


def _save(workdir: pathlib.Path, step: int, task: Task, params, opt_state, extra: dict) -> None:
  try:
    from hfjax import checkpoint
  except ImportError as err:  # orbax-checkpoint is an optional dependency
    print(f"warning: no checkpoint saved ({err}).", file=sys.stderr)
    return
  checkpoint.save_checkpoint(
    workdir / "checkpoints", step, task.unravel(params), opt_state, extra=extra
  )


def train_and_evaluate(
  config: ml_collections.ConfigDict, workdir: str | pathlib.Path, *, resume: bool = False
) -> dict:
  """Runs one training job and writes metrics, summary, plot and checkpoints to ``workdir``.

  Returns:
    The summary (also in ``<workdir>/summary.json``).

  Raises:
    ValueError, TypeError, FileNotFoundError: for a bad config or missing data.
    KeyboardInterrupt: after saving a checkpoint, when interrupted.
  """
  _check_run_config(config)
  if config.float64:
    jax.config.update("jax_enable_x64", True)
  _enable_compilation_cache(config.compilation_cache_dir)
  workdir = pathlib.Path(workdir)
  task = load_task(config)
  data = task.data
  sampler = hfjax.BatchSampler((data.x_train, data.y_train), seed=config.seed)
  opt_state, run, compiled = build_optimizer(config, task, sampler)
  place_batch, place_tree = _placement(config)
  params = task.params
  evaluate = _Evaluator(task)
  eval_x, eval_y = data.x_train, data.y_train
  if config.eval_train_examples:
    eval_x, eval_y = eval_x[: config.eval_train_examples], eval_y[: config.eval_train_examples]

  step, wall, examples = 0, 0.0, 0
  previous_compile = 0.0
  metrics_path = workdir / "metrics.jsonl"
  workdir.mkdir(parents=True, exist_ok=True)
  if resume:
    from hfjax import checkpoint

    directory = workdir / "checkpoints"
    if checkpoint.latest_step(directory) is None:
      raise FileNotFoundError(f"--resume: no checkpoint in {str(directory)!r}.")
    step, restored, opt_state, extra = checkpoint.restore_checkpoint(
      directory, task.unravel(params), opt_state
    )
    params = ravel_pytree(restored)[0] if config.flatten_params else restored
    wall, examples = float(extra["wall_time"]), int(extra["examples_processed"])
    previous_compile = float(extra.get("compile_time", 0.0))
    sampler.load_state_dict(extra["sampler"])
    kept = _read_metrics(metrics_path, up_to_step=step)
    metrics_path.write_text("".join(json.dumps(r) + "\n" for r in kept))
  elif metrics_path.exists():
    metrics_path.unlink()
  params, opt_state = place_tree(params), place_tree(opt_state)

  stop = None
  last_eval_wall = wall

  def evaluation(record: dict, params) -> None:
    nonlocal last_eval_wall
    record["eval_train_loss"], record["train_error"] = evaluate(params, eval_x, eval_y)
    record["test_loss"], record["test_error"] = evaluate(params, data.x_test, data.y_test)
    last_eval_wall = record["wall_time"]

  def save() -> None:
    extra = {
      "wall_time": wall,
      "examples_processed": examples,
      "compile_time": previous_compile + compiled.compile_time,
      "sampler": sampler.state_dict(),
    }
    _save(workdir, step, task, params, opt_state, extra)

  bar = _progress(config.num_steps, config.progress and sys.stderr.isatty())
  bar.update(step)
  with metrics_path.open("a") as log:
    if step == 0:
      first = {"step": 0, "wall_time": 0.0, "examples_processed": 0}
      evaluation(first, params)
      log.write(json.dumps(first) + "\n")
    try:
      while stop is None and step < config.num_steps:
        compile_before = compiled.compile_time
        start = time.perf_counter()
        new_params, new_state, record = run(params, opt_state, place_batch)
        new_wall = wall + time.perf_counter() - start - (compiled.compile_time - compile_before)
        record = {
          "step": step + 1,
          "wall_time": new_wall,
          "examples_processed": examples + record.pop("examples"),
          **record,
        }
        stop = _stop_reason(config, step + 1, new_wall, record["examples_processed"], record)
        due = config.eval_every and (step + 1) % config.eval_every == 0
        due = due or (
          config.eval_every_seconds and new_wall - last_eval_wall >= config.eval_every_seconds
        )
        if due or stop is not None:
          evaluation(record, new_params)
        log.write(json.dumps(record) + "\n")
        log.flush()
        # The step counts once its record is written; an interrupt before this point leaves
        # the previous step as the one to save and resume from.
        params, opt_state, step = new_params, new_state, step + 1
        wall, examples = new_wall, record["examples_processed"]
        if config.checkpoint_every and step % config.checkpoint_every == 0:
          save()
        bar.set_postfix(_postfix(record), refresh=False)
        bar.update(1)
    except KeyboardInterrupt:
      bar.close()
      save()
      raise
  bar.close()
  stop = stop or "num_steps"
  if config.checkpoint_every and step % config.checkpoint_every != 0:
    save()

  records = _read_metrics(metrics_path)
  last = records[-1]
  target = config.target_loss
  reached = None if target is None else first_below(records, target)
  summary = {
    "dataset": config.dataset.name,
    "model": config.model.kind,
    "optimizer": config.optimizer.name,
    "steps": step,
    "stopped_by": stop,
    "wall_time": wall,
    "compile_time": previous_compile + compiled.compile_time,
    "examples_processed": examples,
    "final_train_loss": last["eval_train_loss"],
    "final_test_loss": last["test_loss"],
    "final_train_error": last["train_error"],
    "final_test_error": last["test_error"],
    "total_cg_steps": sum(r.get("cg_steps", 0) for r in records),
    "rejected_steps": sum(not r.get("accepted", True) for r in records),
    "target_loss": target,
    "steps_to_target": reached and reached["step"],
    "time_to_target": reached and reached["wall_time"],
    "examples_to_target": reached and reached["examples_processed"],
  }
  (workdir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
  if config.plot:
    title = f"{config.dataset.name} {config.model.kind}, {config.optimizer.name}"
    plotting.plot_run(records, workdir / "loss.png", title, log_y=True)
  return summary


def _format_summary(summary: dict, workdir: pathlib.Path) -> str:
  lines = [f"{key}: {value}" for key, value in summary.items()]
  return "\n".join(["summary:", *("  " + line for line in lines), f"written to {workdir}/"])


def define_flags() -> None:
  """Defines ``--config`` (a ``configs/*.py`` file), ``--workdir`` and ``--resume``.

  Called by the entry point, not at import, so that config files can import this module.
  """
  if "config" in flags.FLAGS:
    return
  config_flags.DEFINE_config_file(
    "config", None, "Path to a configs/*.py file with get_config().", lock_config=True
  )
  flags.DEFINE_string("workdir", None, "Output directory (default: runs/<config name>).")
  flags.DEFINE_bool("resume", False, "Continue from the newest checkpoint in the workdir.")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # JAX's start-up notes are noise here
  config = flags.FLAGS.config
  if config is None:
    raise app.UsageError("--config is required, e.g. --config configs/curves_autoencoder.py")
  name = pathlib.Path(config_flags.get_config_filename(flags.FLAGS["config"])).stem
  workdir = flags.FLAGS.workdir or f"runs/{name}"
  try:
    summary = train_and_evaluate(config, workdir, resume=flags.FLAGS.resume)
  except (ValueError, TypeError, FileNotFoundError) as err:
    raise SystemExit(f"error: {err}") from None
  except KeyboardInterrupt:
    raise SystemExit(
      f"interrupted; checkpoint saved in {workdir}/checkpoints (continue with --resume)"
    ) from None
  print(_format_summary(summary, pathlib.Path(workdir)))


if __name__ == "__main__":
  define_flags()
  app.run(main)
