r"""Trains a benchmark model with Hessian-free optimization or an Optax peer.

Usage::

  python -m hfjax.experiments.train --config configs/curves_autoencoder.py \
    [--config.optimizer.memory_size=20 ...] [--workdir runs/curves] [--resume]

The config (``configs/*.py``, each with ``get_config()``) names the data set, the model and
the optimizer (``"hf"``, ``"adam"``, ``"sgd"`` or ``"lbfgs"``);
:func:`hfjax.experiments.config.default_config` lists every key with its default. The flags
are parsed in :mod:`hfjax.experiments.main`, the task is built in
:mod:`hfjax.experiments.task` and the optimizer's step in :mod:`hfjax.experiments.optimizers`;
this module holds the loop, :func:`train_and_evaluate`. The run writes to the workdir:

- ``metrics.jsonl``: one JSON record per step (and one for the initial evaluation, step 0);
  with ``log_every=k`` the records of ``k`` steps are written together, when their
  diagnostics are read back from the device in one transfer (also at every evaluation,
  checkpoint and the end); between reads the loop makes no device-to-host transfer (it runs
  under ``jax.transfer_guard_device_to_host("disallow")``), so an accelerator takes the steps
  back to back; the one exception is a variance-test gradient schedule, whose next sizes the
  step decides from its gradients and the loop reads after every step. Stops that depend on
  the diagnostics (``budget_examples``, ``max_consecutive_rejections``) or on the measured
  time (``budget_seconds``) are checked at reads, so a run may take up to ``log_every - 1``
  steps past them;
- ``summary.json``: the final numbers, also printed;
- ``loss.png``: training and test loss against wall time and against examples processed;
- ``checkpoints/``: with ``checkpoint_every > 0``, and always on Ctrl-C (``--resume`` goes on
  from the newest one).

Crash safety: a run killed at any moment (SIGKILL, a power cut) and restarted with
``--resume`` ends with the same per-step training losses, bit for bit, as one that never
stopped, redoing at most ``checkpoint_every`` steps. Orbax writes each checkpoint into a
temporary directory and renames it when complete, and only complete ones are restored; the
records of a step reach ``metrics.jsonl`` (whole lines, flushed to disk) before its
checkpoint is written, and on ``--resume`` the records after the restored step, and a torn
last line, are dropped before training goes on. ``summary.json`` and ``loss.png`` are
written to a temporary file and renamed. ``--resume`` with no checkpoint yet (killed before
the first one) starts from step 0, saying so on stderr, so that a job can always be relaunched
with the same command line.

Definitions used in the records:

- ``wall_time``: seconds spent training, excluding evaluation and XLA compilation (each new
  batch shape is compiled ahead of time and its cost is summed in ``compile_time``), but
  including drawing the batches. Steps are dispatched without waiting and their diagnostics
  read back every ``log_every`` steps (see below), so the time of a group of steps is known
  only at its read: it is measured there, from the end of the previous read, and shared out
  evenly among the group's steps. The last record of a group carries the exact total; with
  ``log_every=1`` every record does.
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

import collections
import json
import os
import pathlib
import signal
import sys
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import app, flags
from jax.experimental import multihost_utils
from jax.flatten_util import ravel_pytree

import hfjax
from hfjax.experiments import config as config_lib
from hfjax.experiments import optimizers, plotting
from hfjax.experiments import task as task_lib

# The names this module has always offered, now defined where they belong.
from hfjax.experiments.config import MODELS as MODELS
from hfjax.experiments.config import OPTIMIZERS as OPTIMIZERS
from hfjax.experiments.config import SCHEDULES as SCHEDULES
from hfjax.experiments.config import default_config as default_config
from hfjax.experiments.optimizers import HF_INFO as HF_INFO
from hfjax.experiments.optimizers import build_optimizer as build_optimizer
from hfjax.experiments.task import Task as Task
from hfjax.experiments.task import load_task as load_task


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


def _placement(config: ml_collections.ConfigDict):
  """``(place_batch, place_tree)``: identity on one device, data-parallel with a mesh.

  With several processes the mesh holds every device of every process (``mesh_shape``
  defaults to all of them on ``"data"``). Every process draws the same global batch (the
  sampler has the same seed everywhere) and places only its own share of the examples on its
  own devices (:func:`hfjax.sharding.shard_local_batch`).
  """
  if not config.mesh_shape and jax.process_count() == 1:
    identity = lambda tree: tree
    return identity, identity
  from hfjax import sharding

  mesh = sharding.make_mesh(tuple(config.mesh_shape) if config.mesh_shape else None)
  share, shares = sharding.local_share(mesh)

  def place_batch(batch):
    def mine(leaf):
      size = len(leaf) // shares
      return leaf[share * size : (share + 1) * size]

    return sharding.shard_local_batch(jax.tree.map(mine, batch), mesh)

  return place_batch, lambda tree: sharding.replicate(tree, mesh)


def _enable_compilation_cache(directory: str) -> None:
  if directory:
    path = pathlib.Path(directory).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


# Test hook (tests/test_crash_safety.py): HFJAX_CRASH_AT="<point>:<n>" kills this process with
# SIGKILL the n-th time it reaches <point>, one of "step" (a step taken, its record not yet
# written), "evaluation" (halfway through an evaluation) or "records" (records written, the
# checkpoint not yet). An outside kill cannot aim at these moments reliably.
_CRASH_AT = os.environ.get("HFJAX_CRASH_AT", "")
_reached = collections.Counter()


def _crash_point(point: str) -> None:
  if _CRASH_AT:
    _reached[point] += 1
    if _CRASH_AT == f"{point}:{_reached[point]}":
      os.kill(os.getpid(), signal.SIGKILL)


def _read_metrics(path: pathlib.Path, up_to_step: int | None = None) -> list[dict]:
  if not path.exists():
    return []
  text = path.read_text()
  # A line without its newline is the torn tail of a write that was killed.
  lines = text.splitlines()[: text.count("\n")]
  records = [json.loads(line) for line in lines if line.strip()]
  return [r for r in records if up_to_step is None or r["step"] <= up_to_step]


def read_metrics(workdir: str | pathlib.Path) -> list[dict]:
  """The records of ``<workdir>/metrics.jsonl`` (a torn last line, from a kill, is left out)."""
  return _read_metrics(pathlib.Path(workdir) / "metrics.jsonl")


def _write_atomically(path: pathlib.Path, write: Any) -> None:
  """``write(tmp)`` to a temporary file beside ``path``, then renamed: never half a file."""
  tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")  # the suffix tells matplotlib PNG
  write(tmp)
  with tmp.open("rb+") as file:
    os.fsync(file.fileno())
  os.replace(tmp, path)


class _Metrics:
  """``metrics.jsonl``, written by process 0 only; every process keeps the records.

  Args:
    path: the file.
    resume_step: the step resumed from: the records after it (redone) and a torn last line
      are dropped; ``None``: a new run, the file starts empty.
  """

  def __init__(self, path: pathlib.Path, resume_step: int | None):
    self.writer = jax.process_index() == 0
    self.records = [] if resume_step is None else _read_metrics(path, up_to_step=resume_step)
    self._file = None
    if not self.writer:
      return
    if resume_step is None:
      path.unlink(missing_ok=True)
    else:
      kept = "".join(json.dumps(r) + "\n" for r in self.records)
      _write_atomically(path, lambda tmp: tmp.write_text(kept))
    self._file = path.open("a")

  def write(self, records: list[dict]) -> None:
    """Appends whole records, one line each; a kill can tear only the unterminated last one."""
    self.records.extend(records)
    if self._file is not None:
      self._file.write("".join(json.dumps(r) + "\n" for r in records))
      self._file.flush()

  def sync(self) -> None:
    """Puts the records written so far on disk."""
    if self._file is not None:
      os.fsync(self._file.fileno())

  def __enter__(self) -> _Metrics:
    return self

  def __exit__(self, *exc: Any) -> None:
    if self._file is not None:
      self._file.close()


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


def _read_due(config: ml_collections.ConfigDict, step: int, wall: float) -> bool:
  """Whether the diagnostics are read after ``step`` (evaluations are read points too)."""
  return (
    step % config.log_every == 0
    or step >= config.num_steps
    or bool(config.checkpoint_every and step % config.checkpoint_every == 0)
    or bool(config.budget_seconds and wall >= config.budget_seconds)
  )


def _no_device_reads():
  """The guard around the steps between reads: no device-to-host transfer there."""
  return jax.transfer_guard_device_to_host("disallow")


class _Group:
  """The steps taken since the last read: their pending records and their training time."""

  def __init__(self, compiled: optimizers.AheadOfTime, step: int, wall: float, examples: int):
    self._compiled = compiled
    self.step, self.wall, self.examples = step, wall, examples  # at the last step read
    self.pending: list[optimizers.Pending] = []
    self.last: list[dict] = []
    self.restart()

  def restart(self) -> None:
    """Starts timing the next steps."""
    self._start, self._compile = time.perf_counter(), self._compiled.compile_time

  def elapsed(self) -> float:
    """Seconds of training since :meth:`restart`, compilation excluded."""
    return time.perf_counter() - self._start - (self._compiled.compile_time - self._compile)

  def estimate(self) -> float:
    """The wall time now, for decisions between reads; with several processes, the time at
    the last read, which every process knows alike (so they decide alike)."""
    return self.wall + self.elapsed() if jax.process_count() == 1 else self.wall

  def read(self) -> list[dict]:
    """The pending steps' records, in one transfer; the group's time is shared out evenly
    (process 0's time with several processes, so that they agree on the budget)."""
    records = optimizers.read_records(self.pending)
    elapsed = self.elapsed()
    if jax.process_count() > 1:
      elapsed = float(multihost_utils.broadcast_one_to_all(np.float64(elapsed)))
    share = elapsed / len(records)
    step, wall, examples = self.step, self.wall, self.examples
    for i, record in enumerate(records):
      step, wall, examples = step + 1, wall + share, examples + record.pop("examples")
      records[i] = {"step": step, "wall_time": wall, "examples_processed": examples, **record}
    self.step, self.wall, self.examples = step, wall, examples
    self.pending, self.last = [], records
    return records


def _eval_due(config: ml_collections.ConfigDict, step: int, wall: float, last_eval: float) -> bool:
  if config.eval_every and step % config.eval_every == 0:
    return True
  return bool(config.eval_every_seconds and wall - last_eval >= config.eval_every_seconds)


def _save(workdir: pathlib.Path, step: int, task: Task, params, opt_state, extra: dict) -> None:
  try:
    from hfjax import checkpoint
  except ImportError as err:  # orbax-checkpoint is an optional dependency
    print(f"warning: no checkpoint saved ({err}).", file=sys.stderr)
    return
  checkpoint.save_checkpoint(
    workdir / "checkpoints", step, task.unravel(params), opt_state, extra=extra
  )


def _restore(workdir: pathlib.Path, config, task: Task, params, opt_state, sampler):
  """``(step, params, opt_state, extra)`` of the newest checkpoint; the sampler resumes too.

  ``None`` when there is no checkpoint yet: the run starts from step 0.
  """
  from hfjax import checkpoint

  directory = workdir / "checkpoints"
  if checkpoint.latest_step(directory) is None:
    print(f"--resume: no checkpoint in {str(directory)!r}; starting from step 0.", file=sys.stderr)
    return None
  step, restored, opt_state, extra = checkpoint.restore_checkpoint(
    directory, task.unravel(params), opt_state
  )
  params = ravel_pytree(restored)[0] if config.flatten_params else restored
  sampler.load_state_dict(extra["sampler"])
  return step, params, opt_state, extra


def _summary(config, records: list[dict], step: int, stop: str, wall, compile_time, examples):
  last = records[-1]
  target = config.target_loss
  reached = None if target is None else first_below(records, target)
  return {
    "dataset": config.dataset.name,
    "model": config.model.kind,
    "optimizer": config.optimizer.name,
    "steps": step,
    "stopped_by": stop,
    "wall_time": wall,
    "compile_time": compile_time,
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


def train_and_evaluate(
  config: ml_collections.ConfigDict, workdir: str | pathlib.Path, *, resume: bool = False
) -> dict:
  """Runs one training job and writes metrics, summary, plot and checkpoints to ``workdir``.

  With several JAX processes every process calls this with the same arguments; process 0
  writes the files.

  Returns:
    The summary (also in ``<workdir>/summary.json``).

  Raises:
    ValueError, TypeError, FileNotFoundError: for a bad config or missing data.
    KeyboardInterrupt: after saving a checkpoint, when interrupted.
  """
  config_lib.check_config(config)
  if config.float64:
    jax.config.update("jax_enable_x64", True)
  _enable_compilation_cache(config.compilation_cache_dir)
  workdir = pathlib.Path(workdir)
  task = task_lib.load_task(config)
  data = task.data
  sampler = hfjax.BatchSampler((data.x_train, data.y_train), seed=config.seed)
  optimizer = optimizers.build_optimizer(config, task, sampler)
  opt_state, run, compiled = optimizer.state, optimizer.run, optimizer.compiled
  place_batch, place_tree = _placement(config)
  params = task.params
  evaluate = _Evaluator(task)
  eval_x, eval_y = data.x_train, data.y_train
  if config.eval_train_examples:
    eval_x, eval_y = eval_x[: config.eval_train_examples], eval_y[: config.eval_train_examples]

  step, wall, examples = 0, 0.0, 0
  previous_compile = 0.0
  workdir.mkdir(parents=True, exist_ok=True)
  restored = resume and _restore(workdir, config, task, params, opt_state, sampler)
  if restored:
    step, params, opt_state, extra = restored
    wall, examples = float(extra["wall_time"]), int(extra["examples_processed"])
    previous_compile = float(extra.get("compile_time", 0.0))
  log = _Metrics(workdir / "metrics.jsonl", step if restored else None)
  optimizer.sync(opt_state)
  params, opt_state = place_tree(params), place_tree(opt_state)

  stop = None
  last_eval_wall = wall

  def evaluation(record: dict, params) -> None:
    nonlocal last_eval_wall
    record["eval_train_loss"], record["train_error"] = evaluate(params, eval_x, eval_y)
    _crash_point("evaluation")
    record["test_loss"], record["test_error"] = evaluate(params, data.x_test, data.y_test)
    last_eval_wall = record["wall_time"]

  def save() -> None:
    log.sync()  # the checkpoint's records are on disk before it
    extra = {
      "wall_time": wall,
      "examples_processed": examples,
      "compile_time": previous_compile + compiled.compile_time,
      "sampler": sampler.state_dict(),
    }
    _save(workdir, step, task, params, opt_state, extra)

  bar = _progress(config.num_steps, config.progress and log.writer and sys.stderr.isatty())
  bar.update(step)
  group = _Group(compiled, step, wall, examples)
  with log:
    if step == 0:
      first = {"step": 0, "wall_time": 0.0, "examples_processed": 0}
      evaluation(first, params)
      log.write([first])
    group.restart()  # the initial evaluation is not training time
    unwritten: list[dict] = []
    try:
      while stop is None and step < config.num_steps:
        # Steps go to the device back to back; nothing comes back until the read.
        with _no_device_reads():
          read_due = eval_due = False
          while not (read_due or eval_due):
            params, opt_state, pending = run(params, opt_state, place_batch)
            group.pending.append(pending)
            step += 1
            _crash_point("step")
            estimate = group.estimate()
            eval_due = _eval_due(config, step, estimate, last_eval_wall)
            read_due = _read_due(config, step, estimate)
        unwritten = group.read()
        wall, examples = group.wall, group.examples
        for record in unwritten:
          stop = stop or _stop_reason(
            config, record["step"], record["wall_time"], record["examples_processed"], record
          )
        if eval_due or _eval_due(config, step, wall, last_eval_wall) or stop is not None:
          evaluation(unwritten[-1], params)
        log.write(unwritten)
        unwritten = []
        _crash_point("records")
        if config.checkpoint_every and step % config.checkpoint_every == 0:
          save()
        bar.set_postfix(_postfix(group.last[-1]), refresh=False)
        bar.update(len(group.last))
        group.restart()  # evaluation and checkpoints are not training time
    except KeyboardInterrupt:
      bar.close()
      # Every step taken gets its record before the checkpoint that includes it.
      if group.pending:
        unwritten += group.read()
        wall, examples = group.wall, group.examples
      log.write(unwritten)
      save()
      raise
    bar.close()
    stop = stop or "num_steps"
    if config.checkpoint_every and step % config.checkpoint_every != 0:
      save()

  compile_time = previous_compile + compiled.compile_time
  summary = _summary(config, log.records, step, stop, wall, compile_time, examples)
  if log.writer:
    text = json.dumps(summary, indent=2) + "\n"
    _write_atomically(workdir / "summary.json", lambda path: path.write_text(text))
  if config.plot and log.writer:
    title = f"{config.dataset.name} {config.model.kind}, {config.optimizer.name}"
    plot = lambda path: plotting.plot_run(log.records, path, title, log_y=True)
    _write_atomically(workdir / "loss.png", plot)
  return summary


if __name__ == "__main__":
  # The documented command is `python -m hfjax.experiments.train`; its flags live in main.
  from hfjax.experiments import main

  flags.adopt_module_key_flags(main)  # so that --help lists them
  app.run(main.main)
