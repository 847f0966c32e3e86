"""hfjax against Adam and kfac-jax at equal wall time on the MNIST-sized deep autoencoder.

Run as ``python -m benchmarks.compare_optimizers --seconds 150`` (add ``--seconds 600`` for the
long column; ``bash benchmarks/kfac_jax_setup.sh`` once first to include kfac-jax). In one run,
one method after another:

* ``adam``: ``optax.adam`` at each of ``--adam_lrs`` on minibatches of ``--adam_batch``;
* ``hf``: :func:`hfjax.hessian_free` with the ``--hf_*`` options (flags left unset keep the
  library's defaults; ``--hf_options='{"preconditioner": "kfac"}'`` passes any keyword, and a
  dict for ``damping`` or ``line_search`` becomes its config), a gradient batch of
  ``--hf_gradient_batch`` (0: the whole training set) and a curvature batch of
  ``--hf_curvature_batch`` (the first examples of the gradient batch, as
  :meth:`hfjax.BatchSampler.sample_pair` draws them);
* ``kfac_jax``: kfac-jax 0.0.8 in its own virtualenv (``.venv-kfac``), launched as
  ``benchmarks.peer_kfac_jax``, which imports the protocol below; skipped, with a note, when
  that virtualenv is missing.

The protocol is the same for every method. The problem is the 784-1000-500-250-30 (mirrored)
:class:`hfjax.experiments.models.DeepAutoencoder` with its sparse initialisation from
``--seed``, trained with :func:`hfjax.experiments.models.sigmoid_cross_entropy` (summed over
pixels, averaged over the batch) on ``--num_train`` generated CURVES images; every method starts
from the same parameters (the table's notes say so, by fingerprint). Training data stays on the
device; each step draws example indices on the host (:class:`hfjax.BatchSampler`) and gathers
them inside its jitted program. Every program is compiled before the clock starts; the clock
runs only while a step runs (each step ends in ``jax.block_until_ready``), and any compilation
it still meets is subtracted and counted. At ``0`` and at the first step boundary after each
``--eval_every`` seconds and each of ``--report_seconds`` the loss on the first ``--eval_size``
training images is evaluated, off the clock. A method stops at the first step boundary after
``--seconds``, so a method with long steps may run up to one step longer than the others.

The table gives, for each of ``--report_seconds`` (capped by ``--seconds``), the evaluation
loss at that time, the steps taken by then and the loss divided by the best peer's (Adam at
any learning rate, or kfac-jax); ``--out`` writes every record as JSON.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import pathlib
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags

import hfjax
from hfjax.experiments import datasets, models

REPO = pathlib.Path(__file__).resolve().parent.parent
METHODS = ("adam", "hf", "kfac_jax")
PEERS = ("adam", "kfac_jax")
FLAGS = flags.FLAGS


def define_flags() -> None:
  """Defines the command-line flags, shared with ``benchmarks.peer_kfac_jax``.

  Called before ``app.run`` by each script rather than on import, so that importing this
  module (the peer, the tests) defines no flags that could clash with another module's.
  """
  flags.DEFINE_float("seconds", 150.0, "Wall time of training per method, in seconds.")
  flags.DEFINE_list(
    "report_seconds", ["150", "600"], "Times of the table's columns (capped by --seconds)."
  )
  flags.DEFINE_float("eval_every", 10.0, "Seconds of training between evaluations.")
  flags.DEFINE_integer("eval_size", 10000, "Evaluate on the first this many training images.")
  flags.DEFINE_integer("num_train", 20000, "Generated CURVES training images.")
  flags.DEFINE_integer("data_seed", 0, "Seed of the CURVES images.")
  flags.DEFINE_integer("seed", 0, "Seed of the initialisation and the minibatch order.")
  flags.DEFINE_list(
    "encoder",
    [str(size) for size in models.MNIST_ENCODER],
    "Encoder widths of the autoencoder (the decoder mirrors them).",
  )
  flags.DEFINE_list("methods", list(METHODS), f"Methods to run, in order: {METHODS}.")
  flags.DEFINE_string(
    "out", "", "Where to write the results: a JSON file (here), JSON lines (peer_kfac_jax)."
  )

  flags.DEFINE_list("adam_lrs", ["1e-4", "1e-3", "1e-2"], "Adam learning rates.")
  flags.DEFINE_integer("adam_batch", 128, "Adam minibatch size.")

  flags.DEFINE_string(
    "hf_preconditioner", None, "hessian_free's preconditioner (unset: the library default)."
  )
  flags.DEFINE_float(
    "hf_initial_damping", None, "hessian_free's initial_damping (unset: the library default)."
  )
  flags.DEFINE_integer(
    "hf_max_cg_steps", None, "hessian_free's max_cg_steps (unset: the library default)."
  )
  flags.DEFINE_integer(
    "hf_gradient_batch", 0, "HF gradient batch size; 0 for the whole training set."
  )
  flags.DEFINE_integer("hf_curvature_batch", 1000, "HF curvature batch size.")
  flags.DEFINE_integer(
    "hf_validation_batch",
    0,
    "HF validation batch size: a separate draw for CG backtracking and rho; 0 for none "
    "(the curvature batch serves).",
  )
  flags.DEFINE_string(
    "hf_options", "{}", "JSON object of further keyword arguments to hfjax.hessian_free."
  )

  flags.DEFINE_string(
    "kfac_python",
    str(REPO / ".venv-kfac" / "bin" / "python"),
    "Python of the kfac-jax virtualenv (benchmarks/kfac_jax_setup.sh builds it).",
  )
  flags.DEFINE_integer("kfac_batch", 1000, "kfac-jax minibatch size.")
  flags.DEFINE_float("kfac_initial_damping", 1.0, "kfac-jax initial damping.")
  flags.DEFINE_string(
    "kfac_options", "{}", "JSON object of further keyword arguments to kfac_jax.Optimizer."
  )


class Problem(NamedTuple):
  """The data, model and starting point every method shares.

  Attributes:
    apply_fn: ``apply_fn(params, inputs) -> logits`` of the autoencoder.
    params: the initial parameters (sparse initialisation from the seed).
    train: the training images on the device, ``(num_train, 784)``; targets are the inputs.
    eval_inputs: the evaluation images, the first ``eval_size`` training images.
    fingerprint: a hash of the data and the initial parameters, equal across methods and
      virtualenvs when they train on the same problem.
  """

  apply_fn: Callable[[Any, jax.Array], jax.Array]
  params: Any
  train: jax.Array
  eval_inputs: jax.Array
  fingerprint: str


def load_problem(
  *, num_train: int, data_seed: int, eval_size: int, seed: int, encoder: Sequence[int]
) -> Problem:
  """Generates the CURVES images and initialises the autoencoder."""
  if not 1 <= eval_size <= num_train:
    raise ValueError(f"eval_size must be in [1, num_train={num_train}]; got {eval_size}.")
  images = datasets.curves(num_train=num_train, num_test=0, seed=data_seed).x_train
  model = models.DeepAutoencoder(tuple(encoder))
  params = model.init(jax.random.key(seed), jnp.zeros((1, images.shape[1])))["params"]
  digest = hashlib.sha256(images.tobytes())
  for leaf in jax.tree.leaves(params):
    digest.update(np.asarray(leaf).tobytes())
  train = jnp.asarray(images)
  return Problem(
    models.make_apply_fn(model), params, train, train[:eval_size], digest.hexdigest()[:12]
  )


def batch_loss(problem: Problem) -> Callable[[Any, jax.Array], jax.Array]:
  """``loss(params, images)``: the autoencoder's loss on a batch of images (their own targets)."""

  def loss(params: Any, images: jax.Array) -> jax.Array:
    return models.sigmoid_cross_entropy(problem.apply_fn(params, images), images)

  return loss


def make_evaluate(problem: Problem) -> Callable[[Any], float]:
  """The evaluation loss of some parameters, compiled once here."""
  loss = batch_loss(problem)
  compiled = jax.jit(loss).lower(problem.params, problem.eval_inputs).compile()
  return lambda params: float(compiled(params, problem.eval_inputs))


def eval_times(seconds: float, eval_every: float, report_seconds: Sequence[float]) -> list[float]:
  """Training times after which to evaluate: every ``eval_every`` and each report time."""
  if not seconds > 0 or not eval_every > 0:
    raise ValueError(f"seconds and eval_every must be > 0; got {seconds} and {eval_every}.")
  times = {eval_every * k for k in range(1, math.ceil(seconds / eval_every))}
  times |= {t for t in report_seconds if 0 < t < seconds}
  return sorted(times | {seconds})


class _CompileClock:
  """Seconds JAX spends tracing, lowering and compiling, and the number of compilations."""

  def __init__(self):
    self.seconds = 0.0
    self.compiles = 0
    jax.monitoring.register_event_duration_secs_listener(self._record)

  def _record(self, event: str, duration: float, **_: Any) -> None:
    if event.startswith("/jax/core/compile/"):
      self.seconds += duration
      self.compiles += event.endswith("backend_compile_duration")


_compile_clock: _CompileClock | None = None


def _clock() -> _CompileClock:
  global _compile_clock
  if _compile_clock is None:
    _compile_clock = _CompileClock()
  return _compile_clock


def run_timed(
  method: str,
  step: Callable[[Any], Any],
  carry: Any,
  *,
  params_of: Callable[[Any], Any],
  evaluate: Callable[[Any], float],
  times: Sequence[float],
  diagnostics: Callable[[Any], dict[str, Any]] = lambda carry: {},
  log: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True),
) -> list[dict[str, Any]]:
  """Runs ``carry = step(carry)`` until ``times[-1]`` seconds of training, evaluating on the way.

  Only the steps are timed: each ends in ``jax.block_until_ready``, and compilation met inside
  one (there should be none: compile before calling this) is subtracted and counted in the
  records' ``compiles``. An evaluation happens at 0 and at the first step boundary at or after
  each of ``times``, the last of which ends the run.

  Args:
    method: the name written into every record.
    step: one training step, ``carry -> carry`` (drawing its own minibatch).
    carry: the starting carry (parameters, optimizer state, ...).
    params_of: the parameters in a carry.
    evaluate: the evaluation loss of parameters.
    times: ascending training times in seconds at which to evaluate.
    diagnostics: further fields for a record, read from the carry at evaluation.
    log: where each record is logged as it is made.

  Returns:
    Records ``{method, seconds, steps, eval_loss, compiles, ...diagnostics}``.
  """
  clock = _clock()
  compiles_before = clock.compiles
  elapsed, steps, pending = 0.0, 0, list(times)
  records = []

  def record() -> None:
    entry = {"method": method, "seconds": round(elapsed, 3), "steps": steps}
    entry["eval_loss"] = evaluate(params_of(carry))
    entry["compiles"] = clock.compiles - compiles_before
    entry.update(diagnostics(carry))
    records.append(entry)
    log(json.dumps(entry))

  record()
  while pending:
    compile_seconds = clock.seconds
    start = time.perf_counter()
    carry = jax.block_until_ready(step(carry))
    elapsed += time.perf_counter() - start - (clock.seconds - compile_seconds)
    steps += 1
    if elapsed >= pending[0]:
      while pending and elapsed >= pending[0]:
        pending.pop(0)
      record()
  return records


def index_sampler(problem: Problem, seed: int) -> hfjax.BatchSampler:
  """Draws training-example indices; every method samples its minibatches with one."""
  return hfjax.BatchSampler(np.arange(problem.train.shape[0], dtype=np.int32), seed=seed)


def run_adam(
  problem: Problem, learning_rate: float, *, batch_size: int, seed: int, times: Sequence[float]
) -> list[dict[str, Any]]:
  """Trains with ``optax.adam(learning_rate)`` on minibatches of ``batch_size``."""
  tx = optax.adam(learning_rate)
  value_and_grad = jax.value_and_grad(batch_loss(problem))

  def train_step(params, opt_state, indices):
    _, grads = value_and_grad(params, problem.train[indices])
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  sampler = index_sampler(problem, seed)
  params = jax.tree.map(jnp.copy, problem.params)
  carry = (params, tx.init(params))
  compiled = (
    jax.jit(train_step, donate_argnums=(0, 1)).lower(*carry, sampler.sample(batch_size)).compile()
  )
  return run_timed(
    f"adam lr={learning_rate:g}",
    lambda carry: compiled(*carry, sampler.sample(batch_size)),
    carry,
    params_of=lambda carry: carry[0],
    evaluate=make_evaluate(problem),
    times=times,
  )


def json_object(flag: str, text: str) -> dict[str, Any]:
  """The JSON object given to ``--flag``, as a dict."""
  options = json.loads(text)
  if not isinstance(options, dict):
    raise ValueError(f"--{flag} must be a JSON object of keyword arguments; got {text!r}.")
  return options


def hf_options(
  options_json: str,
  *,
  preconditioner: str | None = None,
  initial_damping: float | None = None,
  max_cg_steps: int | None = None,
) -> dict[str, Any]:
  """Keyword arguments for :func:`hfjax.hessian_free` from the flags that are set.

  A dict given for ``damping``, ``line_search`` or ``kfac`` becomes the matching
  :class:`hfjax.DampingConfig`, :class:`hfjax.LineSearchConfig` or :class:`hfjax.KFACConfig`.

  Raises:
    ValueError: If the JSON is not an object, or names an option that a flag also sets.
  """
  options = json_object("hf_options", options_json)
  flagged = {
    "preconditioner": preconditioner,
    "initial_damping": initial_damping,
    "max_cg_steps": max_cg_steps,
  }
  for key, value in flagged.items():
    if value is None:
      continue
    if key in options:
      raise ValueError(f"{key} is set both by --hf_{key} and in --hf_options; set it once.")
    options[key] = value
  configs = (
    ("damping", hfjax.DampingConfig),
    ("line_search", hfjax.LineSearchConfig),
    ("kfac", hfjax.KFACConfig),
  )
  for key, config in configs:
    if isinstance(options.get(key), dict):
      options[key] = config(**options[key])
  return options


def hf_step(problem: Problem, tx: optax.GradientTransformation) -> Callable[..., Any]:
  """One HF outer step on batches given by indices into ``problem.train``.

  ``step(params, state, indices, curvature_indices[, validation_indices]) -> (params,
  state)``: the gradient on ``indices``, the Gauss-Newton products on
  ``curvature_indices``, and, when given, ``validation_indices`` as the held-out
  ``validation_batch``; the images are their own targets.
  """
  value_and_grad = jax.value_and_grad(batch_loss(problem))

  def step(params, state, indices, curvature_indices, *validation):
    images = problem.train[indices]
    # A curvature batch as large as the gradient batch is the same examples
    # (BatchSampler.sample_pair): it is not passed, as a user would not, so that CG
    # backtracking's loss at the chosen iterate is also the step's loss on the gradient batch
    # (one forward pass less per step).
    curvature_batch = None
    if curvature_indices.shape != indices.shape:
      curvature_images = problem.train[curvature_indices]
      curvature_batch = (curvature_images, curvature_images)
    loss, grads = value_and_grad(params, images)
    held_out = {}
    if validation:
      validation_images = problem.train[validation[0]]
      held_out["validation_batch"] = (validation_images, validation_images)
    updates, state = tx.update(
      grads,
      state,
      params,
      batch=(images, images),
      curvature_batch=curvature_batch,
      loss=loss,
      **held_out,
    )
    return optax.apply_updates(params, updates), state

  return step


def run_hf(
  problem: Problem,
  options: dict[str, Any],
  *,
  gradient_batch: int,
  curvature_batch: int,
  seed: int,
  times: Sequence[float],
  validation_batch: int = 0,
) -> list[dict[str, Any]]:
  """Trains with :func:`hfjax.hessian_free`; one jitted program per outer step."""
  num_train = problem.train.shape[0]
  gradient_batch = gradient_batch or num_train
  tx = hfjax.hessian_free(problem.apply_fn, models.sigmoid_cross_entropy, **options)
  step = hf_step(problem, tx)

  def train_step(params, state, total_cg_steps, *indices):
    params, state = step(params, state, *indices)
    return params, state, total_cg_steps + optax.tree.get(state, "cg_steps")

  sampler = index_sampler(problem, seed)
  params = jax.tree.map(jnp.copy, problem.params)
  carry = (params, tx.init(params), jnp.zeros((), jnp.int32))

  def draw():
    indices = sampler.sample_pair(gradient_batch, curvature_batch)
    return indices + ((sampler.sample(validation_batch),) if validation_batch else ())

  example = draw()
  compiled = jax.jit(train_step, donate_argnums=(0, 1)).lower(*carry, *example).compile()

  def diagnostics(carry):
    _, state, total_cg_steps = carry
    return {
      "damping": float(optax.tree.get(state, "damping")),
      "rho": float(optax.tree.get(state, "rho")),
      "cg_steps": int(optax.tree.get(state, "cg_steps")),
      "total_cg_steps": int(total_cg_steps),
    }

  return run_timed(
    "hf",
    lambda carry: compiled(*carry, *draw()),
    carry,
    params_of=lambda carry: carry[0],
    evaluate=make_evaluate(problem),
    times=times,
    diagnostics=diagnostics,
  )


def problem_flags() -> list[str]:
  """The flags that define the problem and the protocol, to hand to the peer process."""
  return [
    f"--seconds={FLAGS.seconds}",
    f"--report_seconds={','.join(FLAGS.report_seconds)}",
    f"--eval_every={FLAGS.eval_every}",
    f"--eval_size={FLAGS.eval_size}",
    f"--num_train={FLAGS.num_train}",
    f"--data_seed={FLAGS.data_seed}",
    f"--seed={FLAGS.seed}",
    f"--encoder={','.join(FLAGS.encoder)}",
    f"--kfac_batch={FLAGS.kfac_batch}",
    f"--kfac_initial_damping={FLAGS.kfac_initial_damping}",
    f"--kfac_options={FLAGS.kfac_options}",
  ]


def run_kfac_jax(python: str, peer_flags: Sequence[str]) -> tuple[list[dict[str, Any]], str]:
  """Runs ``benchmarks.peer_kfac_jax`` in the kfac-jax virtualenv; returns its records and a
  note (empty when it ran)."""
  if not os.path.exists(python):
    return [], (
      f"kfac_jax skipped: no {python}; run `bash benchmarks/kfac_jax_setup.sh` to build it."
    )
  with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, "kfac_jax.jsonl")
    command = [python, "-m", "benchmarks.peer_kfac_jax", *peer_flags, f"--out={out}"]
    result = subprocess.run(command, cwd=REPO, stdout=subprocess.DEVNULL, check=False)
    if result.returncode != 0:
      return [], f"kfac_jax failed (exit {result.returncode}); its log is above."
    with open(out) as f:
      return [json.loads(line) for line in f if line.strip()], ""


def record_at(records: Sequence[dict[str, Any]], seconds: float) -> dict[str, Any] | None:
  """The first record at or after ``seconds`` of training (``None`` if the run ended before)."""
  return next((r for r in records if r["seconds"] >= seconds), None)


def summarize(
  results: dict[str, list[dict[str, Any]]], report_seconds: Sequence[float]
) -> list[dict[str, Any]]:
  """One row per method: loss, steps and ratio to the best peer at each report time.

  The best peer at a time is the lowest loss there among the methods named ``adam ...`` or
  ``kfac_jax``; the ratio is a method's loss over it (``None`` where either is missing).
  """
  rows = []
  for method, records in results.items():
    row = {"method": method}
    for t in report_seconds:
      entry = record_at(records, t)
      row[t] = None if entry is None else (entry["eval_loss"], entry["steps"], entry["seconds"])
    rows.append(row)
  for t in report_seconds:
    peers = [r[t][0] for r in rows if r[t] is not None and r["method"].startswith(PEERS)]
    best = min(peers, default=None)
    for row in rows:
      row[("ratio", t)] = None if best is None or row[t] is None else row[t][0] / best
  return rows


def markdown_table(rows: Sequence[dict[str, Any]], report_seconds: Sequence[float]) -> str:
  """The summary as a markdown table; a loss evaluated more than 2% after its time says when."""
  header = ["method"]
  for t in report_seconds:
    header += [f"loss at {t:g} s", f"steps by {t:g} s", f"/ best peer at {t:g} s"]
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for row in rows:
    cells = [row["method"]]
    for t in report_seconds:
      if row[t] is None:
        cells += ["-", "-", "-"]
      else:
        loss, steps, seconds = row[t]
        ratio = row[("ratio", t)]
        # A step that ends well past the time (HF's outer steps are long) is shown as such.
        late = f" ({seconds:.3g} s)" if seconds > 1.02 * t else ""
        cells += [f"{loss:.2f}{late}", f"{steps:,}", "-" if ratio is None else f"{ratio:.2f}"]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def check_same_start(results: dict[str, list[dict[str, Any]]]) -> str:
  """A note saying whether every method started from the same evaluation loss."""
  starts = {m: r[0]["eval_loss"] for m, r in results.items() if r}
  if not starts:
    return "no method ran."
  low, high = min(starts.values()), max(starts.values())
  if high - low > 1e-4 * abs(low):
    return f"methods started from different losses: {starts}."
  return f"every method started from eval loss {low:.4f}."


def report_times(seconds: float, report_seconds: Sequence[str]) -> list[float]:
  """The report times, capped by ``seconds`` (which is then one of them)."""
  times = sorted({min(float(t), seconds) for t in report_seconds})
  if not times or times[0] <= 0:
    raise ValueError(f"--report_seconds must be > 0; got {report_seconds}.")
  return times


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  unknown = set(FLAGS.methods) - set(METHODS)
  if unknown:
    raise ValueError(f"unknown methods {sorted(unknown)}; choose from {METHODS}.")
  seconds = FLAGS.seconds
  reports = report_times(seconds, FLAGS.report_seconds)
  times = eval_times(seconds, FLAGS.eval_every, reports)
  options = hf_options(
    FLAGS.hf_options,
    preconditioner=FLAGS.hf_preconditioner,
    initial_damping=FLAGS.hf_initial_damping,
    max_cg_steps=FLAGS.hf_max_cg_steps,
  )
  problem = load_problem(
    num_train=FLAGS.num_train,
    data_seed=FLAGS.data_seed,
    eval_size=FLAGS.eval_size,
    seed=FLAGS.seed,
    encoder=[int(size) for size in FLAGS.encoder],
  )
  results: dict[str, list[dict[str, Any]]] = {}
  notes = []
  for method in FLAGS.methods:
    if method == "adam":
      for lr in FLAGS.adam_lrs:
        records = run_adam(
          problem, float(lr), batch_size=FLAGS.adam_batch, seed=FLAGS.seed, times=times
        )
        results[records[0]["method"]] = records
    elif method == "hf":
      results["hf"] = run_hf(
        problem,
        options,
        gradient_batch=FLAGS.hf_gradient_batch,
        curvature_batch=FLAGS.hf_curvature_batch,
        validation_batch=FLAGS.hf_validation_batch,
        seed=FLAGS.seed,
        times=times,
      )
    else:
      records, note = run_kfac_jax(FLAGS.kfac_python, problem_flags())
      if records:
        results["kfac_jax"] = records
        if records[0]["fingerprint"] != problem.fingerprint:
          notes.append(f"kfac_jax trained on another problem ({records[0]['fingerprint']}).")
      if note:
        notes.append(note)
  notes.append(check_same_start(results))
  rows = summarize(results, reports)
  for t in reports:
    adam = [row for row in rows if row["method"].startswith("adam") and row[t] is not None]
    if adam:
      notes.append(f"best Adam at {t:g} s: {min(adam, key=lambda row: row[t][0])['method']}.")
  print(markdown_table(rows, reports))
  print()
  print(f"hf options: {options}; problem {problem.fingerprint}.")
  for note in notes:
    print(f"Note: {note}")
  if FLAGS.out:
    summary = {
      "flags": {f.name: f.value for f in FLAGS.get_flags_for_module(__name__)},
      "hf_options": {k: repr(v) for k, v in options.items()},
      "report_seconds": reports,
      "notes": notes,
      "results": results,
    }
    with open(FLAGS.out, "w") as f:
      json.dump(summary, f, indent=1)


if __name__ == "__main__":
  define_flags()
  app.run(main)
