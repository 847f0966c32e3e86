r"""The ablation of Sainath et al. (2013): which HF acceleration buys what.

Usage::

  python -m hfjax.experiments.ablation --config configs/ablation.py [--workdir runs/ablation]

For every task (the CURVES autoencoder, the digits classifier, and MNIST when
``--config.mnist_path`` is given) and every seed, it trains:

- ``hf``: the baseline HF of Kingsbury et al. (2012): no preconditioner, a large fixed
  gradient sample and a small fixed curvature sample;
- the baseline plus one change: Martens' diagonal preconditioner (``hf_martens``), the
  Jacobi preconditioner (``hf_jacobi``), L-BFGS built within each solve (``hf_lbfgs``) or
  from the previous solve (``hf_lbfgs_previous``), geometrically growing samples
  (``hf_geometric``), the variance test for the gradient sample (``hf_variance``);
- the paper's method, L-BFGS within the solve with growing samples (``hf_lbfgs_geometric``);
- Optax peers: Adam at three learning rates, SGD with momentum, and L-BFGS on a fixed batch.

Every run of a task gets the same budget of examples processed (see
:mod:`hfjax.experiments.train`), and the runs are interleaved (seed by seed, every method
once per round) so that a slow spell of a shared machine hits them all alike. Time and
examples to the target training loss are read from each run's evaluation records; the
target is the task's ``target_loss``, or, when that is unset, the highest final training loss
of the baseline's seeds (the loss every baseline seed reaches within the budget).

It writes ``<workdir>/RESULTS.md`` (one table per task, mean ± standard deviation over the
seeds), ``<workdir>/<task>_{train,test}_loss.png``, and each run's own outputs under
``<workdir>/<task>/<method>/seed<k>/``. A run whose ``summary.json`` exists for the same
config is not repeated, so an interrupted ablation continues where it stopped.
"""

from __future__ import annotations

import importlib.util
import pathlib
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import NamedTuple

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from hfjax.experiments import plotting, train

HF_VARIANTS: dict[str, tuple[str, Callable[[ml_collections.ConfigDict], dict]]] = {}


def _hf_variant(key: str, label: str):
  def register(fn):
    HF_VARIANTS[key] = (label, fn)
    return fn

  return register


def _schedule(kind: str, start: int, **fields) -> dict:
  # Every field set, so that the base config's schedules never leak into a method's runs.
  return {
    "kind": kind,
    "start": start,
    "maximum": 0,
    "factor": 1.0,
    "theta": 0.5,
    "grid_ratio": 2.0,
    **fields,
  }


def _fixed(task: ml_collections.ConfigDict) -> dict:
  return {
    "gradient_schedule": _schedule("fixed", task.gradient_sample),
    "curvature_schedule": _schedule("fixed", task.curvature_sample),
  }


def _growing(task: ml_collections.ConfigDict, gradient_kind: str) -> dict:
  grow = task.sampling
  shared = {"factor": grow.factor, "grid_ratio": grow.grid_ratio}
  return {
    "gradient_schedule": _schedule(
      gradient_kind,
      grow.gradient_start,
      maximum=task.gradient_sample,
      theta=grow.theta,
      **shared,
    ),
    "curvature_schedule": _schedule(
      "geometric", grow.curvature_start, maximum=task.curvature_sample, **shared
    ),
  }


@_hf_variant("hf", "HF baseline (no preconditioner, fixed samples)")
def _baseline(task):
  return {"preconditioner": "none", **_fixed(task)}


@_hf_variant("hf_martens", "+ Martens diagonal")
def _martens(task):
  return {"preconditioner": "martens", **_fixed(task)}


@_hf_variant("hf_jacobi", "+ Jacobi")
def _jacobi(task):
  return {"preconditioner": "jacobi", **_fixed(task)}


@_hf_variant("hf_lbfgs", "+ L-BFGS within the solve")
def _lbfgs_within(task):
  return {"preconditioner": "lbfgs", "lbfgs_pairs": "within", **_fixed(task)}


@_hf_variant("hf_lbfgs_previous", "+ L-BFGS from the previous solve")
def _lbfgs_previous(task):
  return {"preconditioner": "lbfgs", "lbfgs_pairs": "previous", **_fixed(task)}


@_hf_variant("hf_geometric", "+ geometric sampling")
def _geometric(task):
  return {"preconditioner": "none", **_growing(task, "geometric")}


@_hf_variant("hf_variance", "+ variance-test sampling")
def _variance(task):
  return {"preconditioner": "none", **_growing(task, "variance")}


@_hf_variant("hf_lbfgs_geometric", "+ L-BFGS + geometric sampling (Sainath et al.)")
def _paper(task):
  return {"preconditioner": "lbfgs", "lbfgs_pairs": "within", **_growing(task, "geometric")}


PEERS = ("adam", "sgd", "lbfgs")
VARIANTS = (*HF_VARIANTS, *PEERS)
BASELINE = "hf"
PAPER = "hf_lbfgs_geometric"


def task_config(base: ml_collections.ConfigDict, **settings) -> ml_collections.ConfigDict:
  """One task of an ablation config: a training config and the sizes the methods differ in.

  Args:
    base: the training config of every run (``hfjax.experiments.train.default_config()``
      with the task's data set and model, and the budget).
    **settings: overrides of the defaults below.

  Returns:
    A ``ConfigDict`` with ``base`` and:
    ``gradient_sample`` / ``curvature_sample``: the baseline's fixed samples and the maxima
    of the growing ones (0: the whole training set);
    ``sampling``: ``gradient_start``, ``curvature_start``, ``factor`` per step, ``theta`` of
    the variance test and ``grid_ratio`` (every size on the grid compiles once);
    ``adam_learning_rates``, ``sgd_learning_rate``, ``sgd_momentum``, ``batch_size``
    (Adam, SGD) and ``lbfgs_batch_size`` (Optax L-BFGS's fixed batch);
    ``peer_eval_every_seconds``; ``target_loss`` (``None``: the baseline's); ``log_plot``.
  """
  task = ml_collections.ConfigDict()
  task.base = base
  task.gradient_sample = 0
  task.curvature_sample = 200
  task.sampling = ml_collections.ConfigDict(
    {"gradient_start": 250, "curvature_start": 25, "factor": 1.2, "theta": 0.5, "grid_ratio": 2.0}
  )
  task.adam_learning_rates = (1e-4, 1e-3, 1e-2)
  task.sgd_learning_rate = 0.1
  task.sgd_momentum = 0.9
  task.batch_size = 100
  task.lbfgs_batch_size = 0
  task.peer_eval_every_seconds = 1.0
  task.target_loss = ml_collections.config_dict.placeholder(float)
  task.log_plot = True
  task.update(settings)
  return task


def sibling_config(config_file: str, name: str) -> ml_collections.ConfigDict:
  """``get_config()`` of ``<name>.py`` in the folder of ``config_file``.

  Config files are not a package, so an ablation config loads the training configs it
  builds on by path: ``sibling_config(__file__, "curves_autoencoder")``.
  """
  path = pathlib.Path(config_file).with_name(f"{name}.py")
  spec = importlib.util.spec_from_file_location(f"hfjax_config_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def ablation_config(**tasks: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """An ablation config over the given tasks (each from :func:`task_config`).

  The run-wide keys: ``seeds``; ``variants``, a comma-separated subset of
  :data:`VARIANTS`; ``tasks``, the task names to run (the keyword names, in order);
  ``mnist_path``, which adds a task named ``mnist`` when set (it must be among ``tasks``'
  keywords); ``compilation_cache``, a persistent XLA cache in ``<workdir>/xla_cache``.
  """
  config = ml_collections.ConfigDict()
  config.seeds = (0, 1, 2)
  config.variants = ",".join(VARIANTS)
  config.tasks = ",".join(name for name in tasks if name != "mnist")
  config.mnist_path = ml_collections.config_dict.placeholder(str)
  config.compilation_cache = True
  config.update(tasks)
  return config


class Method(NamedTuple):
  """One row of a table: a name, a label, the optimizer settings and ``"hf"`` or ``"optax"``."""

  key: str
  label: str
  optimizer: dict
  family: str


def methods(task: ml_collections.ConfigDict, selected: Sequence[str]) -> list[Method]:
  """The runs of one task, in table order, for the selected variant names."""
  unknown = set(selected) - set(HF_VARIANTS) - set(PEERS)
  if unknown:
    raise ValueError(f"unknown variants {sorted(unknown)}; choose from {[*HF_VARIANTS, *PEERS]}.")
  rows = []
  for key, (label, options) in HF_VARIANTS.items():
    if key in selected:
      rows.append(Method(key, label, {"name": "hf", **options(task)}, "hf"))
  if "adam" in selected:
    for lr in task.adam_learning_rates:
      optimizer = {"name": "adam", "learning_rate": lr, "batch_size": task.batch_size}
      rows.append(Method(f"adam_{lr:g}", f"Adam (lr {lr:g})", optimizer, "optax"))
  if "sgd" in selected:
    optimizer = {
      "name": "sgd",
      "learning_rate": task.sgd_learning_rate,
      "momentum": task.sgd_momentum,
      "batch_size": task.batch_size,
    }
    label = f"SGD (lr {task.sgd_learning_rate:g}, momentum {task.sgd_momentum:g})"
    rows.append(Method("sgd", label, optimizer, "optax"))
  if "lbfgs" in selected:
    optimizer = {"name": "lbfgs", "batch_size": task.lbfgs_batch_size}
    rows.append(Method("lbfgs", "Optax L-BFGS (fixed batch)", optimizer, "optax"))
  return rows


def run_config(task: ml_collections.ConfigDict, method: Method, seed: int, cache: str):
  """The training config of one run."""
  config = ml_collections.ConfigDict(task.base.to_dict())
  config.optimizer.update_from_flattened_dict(_flatten(method.optimizer))
  config.seed = seed
  config.progress = False
  config.plot = False
  config.compilation_cache_dir = cache
  if method.family == "optax":
    # Many cheap steps: the examples budget ends the run, and evaluation goes by the clock.
    config.num_steps = 10**9
    config.eval_every = 0
    config.eval_every_seconds = task.peer_eval_every_seconds
  return config


def _flatten(tree: dict, prefix: str = "") -> dict:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(_flatten(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = value
  return flat


def _run(config: ml_collections.ConfigDict, directory: pathlib.Path) -> tuple[list[dict], bool]:
  """The run's records, and whether it was trained now (not found done with this config)."""
  stored = directory / "config.json"
  done = (directory / "summary.json").exists() and stored.exists()
  trained = not (done and stored.read_text() == config.to_json_best_effort(sort_keys=True))
  if trained:
    train.train_and_evaluate(config, directory)
    stored.write_text(config.to_json_best_effort(sort_keys=True))
  return train.read_metrics(directory), trained


def _mean_std(values: Sequence[float], digits: int = 3) -> str:
  if not values:
    return "—"
  mean = statistics.fmean(values)
  spread = statistics.stdev(values) if len(values) > 1 else 0.0
  return f"{mean:.{digits}g} ± {spread:.2g}"


def summarise(
  task_name: str,
  rows: Sequence[Method],
  runs: dict[str, list[list[dict]]],
  target: float | None,
) -> tuple[str, float]:
  """The markdown table of one task and the target it used."""
  if target is None:
    if BASELINE not in runs:
      raise ValueError(f"{task_name}: set target_loss, or include the {BASELINE!r} baseline.")
    target = max(seed[-1]["eval_train_loss"] for seed in runs[BASELINE])
  reached = {
    key: [hit for hit in (train.first_below(r, target) for r in seeds) if hit is not None]
    for key, seeds in runs.items()
  }
  base_time = base_examples = None
  if reached.get(BASELINE):
    base_time = statistics.fmean(h["wall_time"] for h in reached[BASELINE])
    base_examples = statistics.fmean(h["examples_processed"] for h in reached[BASELINE])
  lines = [
    "| method | reached | time to target (s) | examples to target (M) | speed-up (time / "
    "examples) | total CG steps | final train loss | final test loss |",
    "|---|---|---|---|---|---|---|---|",
  ]
  for method in rows:
    seeds, hits = runs[method.key], reached[method.key]
    times = [h["wall_time"] for h in hits]
    examples = [h["examples_processed"] / 1e6 for h in hits]
    speedup = "—"
    if hits and base_time and base_examples:
      speedup = (
        f"{base_time / statistics.fmean(times):.2f}x / "
        f"{base_examples / 1e6 / statistics.fmean(examples):.2f}x"
      )
    cg = [sum(r.get("cg_steps", 0) for r in seed) for seed in seeds]
    lines.append(
      "| "
      + " | ".join(
        [
          method.label,
          f"{len(hits)}/{len(seeds)}",
          _mean_std(times),
          _mean_std(examples),
          speedup,
          _mean_std(cg, 4) if method.family == "hf" else "—",
          _mean_std([seed[-1]["eval_train_loss"] for seed in seeds], 4),
          _mean_std([seed[-1]["test_loss"] for seed in seeds], 4),
        ]
      )
      + " |"
    )
  return "\n".join(lines), target


def goals(runs: dict[str, list[list[dict]]], rows: Sequence[Method], target: float) -> list[str]:
  """The two claims under test, checked on one task's runs, in words.

  A method reaches the target only if every seed does; its time is then the mean over seeds.
  """
  labels = {m.key: m.label.removeprefix("+ ") for m in rows}

  def hits(key):
    return [train.first_below(r, target) for r in runs[key]]

  def mean_time(key):
    found = hits(key)
    if any(h is None for h in found):
      return None
    return statistics.fmean(h["wall_time"] for h in found)

  def reached(key):
    return f"{sum(h is not None for h in hits(key))}/{len(runs[key])} seeds"

  def final(key):
    return statistics.fmean(seed[-1]["eval_train_loss"] for seed in runs[key])

  notes = []
  if BASELINE in runs and PAPER in runs:
    base, paper = mean_time(BASELINE), mean_time(PAPER)
    no_worse = final(PAPER) <= final(BASELINE) * 1.01
    finals = (
      f"final training loss {final(PAPER):.4g} vs {final(BASELINE):.4g} "
      f"({'no worse' if no_worse else 'worse'})"
    )
    if base is None or paper is None:
      notes.append(
        f"L-BFGS + sampling vs baseline HF (goal: >= 1.5x faster, no worse final loss): the "
        f"target is reached by L-BFGS + sampling in {reached(PAPER)}, by the baseline in "
        f"{reached(BASELINE)}; {finals}: goal missed."
      )
    else:
      ratio = base / paper
      met = ratio >= 1.5 and no_worse
      notes.append(
        f"L-BFGS + sampling reaches the target {ratio:.2f}x faster than baseline HF "
        f"(goal >= 1.5x), {finals}: goal {'met' if met else 'missed'}."
      )
  hf_times = {m.key: mean_time(m.key) for m in rows if m.family == "hf"}
  peer_times = {m.key: mean_time(m.key) for m in rows if m.family == "optax"}
  hf_best = min(((t, k) for k, t in hf_times.items() if t is not None), default=None)
  peer_best = min(((t, k) for k, t in peer_times.items() if t is not None), default=None)
  if peer_times and hf_best is None:
    notes.append("No HF variant reaches the target in every seed: the HF-vs-Optax goal is missed.")
  elif hf_best and peer_times:
    hf_text = f"fastest HF ({labels[hf_best[1]]}, {hf_best[0]:.3g} s)"
    if peer_best is None:
      notes.append(f"The {hf_text} reaches the target; no Optax peer does in every seed: goal met.")
    else:
      met = hf_best[0] < peer_best[0]
      notes.append(
        f"The {hf_text} vs the fastest Optax peer ({labels[peer_best[1]]}, "
        f"{peer_best[0]:.3g} s): goal {'met' if met else 'missed'}."
      )
  return notes


def run_ablation(
  config: ml_collections.ConfigDict,
  workdir: str | pathlib.Path,
  command: str = "python -m hfjax.experiments.ablation --config configs/ablation.py",
) -> str:
  """Runs every selected method of every task and seed; returns the markdown report.

  ``command`` is the command line the report names as its source.
  """
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  selected = [v.strip() for v in config.variants.split(",") if v.strip()]
  if len(config.seeds) < 1:
    raise ValueError("config.seeds must name at least one seed.")
  task_names = [t.strip() for t in config.tasks.split(",") if t.strip()]
  if config.mnist_path:
    if "mnist" not in config:
      raise ValueError("config.mnist_path is set but the config has no mnist task.")
    config.mnist.base.dataset.path = config.mnist_path
    task_names.append("mnist")
  for name in task_names:
    if name not in config:
      raise ValueError(f"unknown task {name!r} in config.tasks.")
  cache = str(workdir / "xla_cache") if config.compilation_cache else ""
  started = time.perf_counter()
  sections, trained = [], 0
  for name in task_names:
    task = config[name]
    rows = methods(task, selected)
    runs: dict[str, list[list[dict]]] = {m.key: [] for m in rows}
    for seed in config.seeds:
      for method in rows:
        directory = workdir / name / method.key / f"seed{seed}"
        records, now = _run(run_config(task, method, seed, cache), directory)
        runs[method.key].append(records)
        trained += now
    table, target = summarise(name, rows, runs, task.target_loss)
    for key, title in (("eval_train_loss", "training loss"), ("test_loss", "test loss")):
      plotting.plot_comparison(
        {m.label: runs[m.key] for m in rows},
        workdir / f"{name}_{key.replace('eval_', '')}.png",
        f"{name}: {title}, {len(config.seeds)} seeds",
        key=key,
        target=target if key == "eval_train_loss" else None,
        log_y=task.log_plot,
      )
    notes = goals(runs, rows, target)
    sections.append(
      "\n".join(
        [f"### {name}", "", _describe(task, config.seeds, target), "", table, ""]
        + [f"- {note}" for note in notes]
        + [""]
      )
    )
  elapsed = time.perf_counter() - started
  report = "\n".join(
    [
      "## Ablation",
      "",
      f"`{command}`: {trained} runs trained in {elapsed / 60:.1f} min (compilation and evaluation "
      "included), the others read back from the workdir. Times in the tables are training "
      "wall time, evaluation and compilation excluded; examples processed count forward and "
      "backward passes per example (`hfjax/experiments/train.py`). Mean ± standard "
      "deviation over the seeds that reached the target (time and examples) or over all "
      "seeds (CG steps, losses); speed-ups divide the baseline's mean by the method's.",
      "",
      *sections,
    ]
  )
  (workdir / "RESULTS.md").write_text(report)
  return report


def _describe(task: ml_collections.ConfigDict, seeds: Sequence[int], target: float) -> str:
  base = task.base
  data = ", ".join(f"{k}={v}" for k, v in base.dataset.items() if k != "name")
  budget = f"{base.budget_examples / 1e6:g}M examples processed"
  if base.budget_seconds:
    budget += f" or {base.budget_seconds:g} s of training, whichever comes first"
  grow = task.sampling
  return (
    f"{base.dataset.name} ({data}), {base.model.kind} {_model_shape(base)}. Budget per run: "
    f"{budget} (HF at most {base.num_steps} steps). Target training "
    f"loss {target:.4g}. Seeds {tuple(seeds)}. HF samples: gradient "
    f"{task.gradient_sample or 'all'}, curvature {task.curvature_sample}; growing ones "
    f"start at {grow.gradient_start}/{grow.curvature_start} and grow {grow.factor}x per "
    f"step. Adam and SGD minibatch {task.batch_size}."
  )


def _model_shape(base: ml_collections.ConfigDict) -> str:
  if base.model.kind == "autoencoder":
    sizes = tuple(base.model.encoder_sizes)
    return "-".join(str(s) for s in (*sizes, *reversed(sizes[:-1]))) + " (mirrored)"
  return "hidden " + "-".join(str(s) for s in base.model.hidden_sizes)


def define_flags() -> None:
  """Defines ``--config`` and ``--workdir`` (at the entry point, not at import)."""
  if "config" in flags.FLAGS:
    return
  config_flags.DEFINE_config_file("config", None, "configs/ablation.py", lock_config=True)
  flags.DEFINE_string("workdir", "runs/ablation", "Output directory.")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # JAX's start-up notes are noise here
  if flags.FLAGS.config is None:
    raise app.UsageError("--config is required, e.g. --config configs/ablation.py")
  try:
    command = " ".join(["python -m hfjax.experiments.ablation", *sys.argv[1:]])
    report = run_ablation(flags.FLAGS.config, flags.FLAGS.workdir, command)
  except (ValueError, TypeError, FileNotFoundError) as err:
    raise SystemExit(f"error: {err}") from None
  print(report)


if __name__ == "__main__":
  define_flags()
  app.run(main)
