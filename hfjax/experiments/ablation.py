r"""The ablation of Sainath et al. (2013): which HF acceleration buys what.

Usage::

  OPENBLAS_NUM_THREADS=1 python -m hfjax.experiments.ablation --config configs/ablation.py \
    [--workdir runs/ablation]

``OPENBLAS_NUM_THREADS=1``: XLA's CPU Cholesky, which K-FAC's inverses use, calls SciPy's
OpenBLAS, whose spinning threads on a loaded CPU made a K-FAC step on CURVES 1.1-7 s instead of
0.8-1.0 s (plain HF: 0.2-0.5 s either way; load 6 on 2 cores), see ``benchmarks/bench_kfac.py``.

For every task (the CURVES autoencoder, the digits classifier, and MNIST when
``--config.mnist_path`` is given) and every seed, it trains:

- ``hf``: the baseline HF of Kingsbury et al. (2012): no preconditioner, a large fixed
  gradient sample and a small fixed curvature sample;
- the baseline plus one change: Martens' diagonal preconditioner (``hf_martens``), the
  Jacobi preconditioner (``hf_jacobi``), L-BFGS built within each solve (``hf_lbfgs``) or
  from the previous solve (``hf_lbfgs_previous``), geometrically growing samples
  (``hf_geometric``), the variance test for the gradient sample (``hf_variance``);
- the paper's method, L-BFGS within the solve with growing samples (``hf_lbfgs_geometric``);
- the same accelerations with K-FAC underneath (Martens & Grosse 2015,
  ``preconditioner="kfac"``): K-FAC alone (``hf_kfac``), K-FAC as L-BFGS's initial matrix
  with pairs from within the solve (``hf_kfac_lbfgs``), K-FAC with geometric sampling
  (``hf_kfac_geometric``) and both (``hf_kfac_lbfgs_geometric``), on unflattened parameters
  (K-FAC finds its layers as 2-D parameter leaves);
- Optax peers: Adam at three learning rates, SGD with momentum, and L-BFGS on a fixed batch.

Every run of a task gets the same budget of examples processed (see
:mod:`hfjax.experiments.train`), and the runs are interleaved (seed by seed, every method
once per round) so that a slow spell of a shared machine hits them all alike. Time and
examples to the target training loss are read from each run's evaluation records; the
target is the task's ``target_loss``, or, when that is unset, the highest final training loss
of the baseline's seeds (the loss every baseline seed reaches within the budget). The report
says, from these numbers, what each acceleration pays over the variant beneath it, with no
preconditioner and with K-FAC underneath.

The methods and the configs are in :mod:`hfjax.experiments.ablation_config`, the report's
tables and checked goals in :mod:`hfjax.experiments.report`, the flags in
:mod:`hfjax.experiments.main`. It writes ``<workdir>/RESULTS.md`` (one table per
task, mean ± standard deviation over the seeds, and the goals checked on the numbers),
``<workdir>/<task>_{train,test}_loss.png``, and each run's own outputs under
``<workdir>/<task>/<method>/seed<k>/``. A run whose ``summary.json`` exists for the same
config is not repeated, so an interrupted ablation continues where it stopped.
"""

from __future__ import annotations

import pathlib
import time

import ml_collections
from absl import app, flags

from hfjax.experiments import plotting, report, train

# The names this module has always offered, now defined where they belong.
from hfjax.experiments.ablation_config import BASELINE as BASELINE
from hfjax.experiments.ablation_config import HF_VARIANTS as HF_VARIANTS
from hfjax.experiments.ablation_config import PAPER as PAPER
from hfjax.experiments.ablation_config import PEERS as PEERS
from hfjax.experiments.ablation_config import VARIANTS as VARIANTS
from hfjax.experiments.ablation_config import Method as Method
from hfjax.experiments.ablation_config import ablation_config as ablation_config
from hfjax.experiments.ablation_config import methods as methods
from hfjax.experiments.ablation_config import run_config as run_config
from hfjax.experiments.ablation_config import task_config as task_config
from hfjax.experiments.config import sibling_config as sibling_config
from hfjax.experiments.report import goals as goals
from hfjax.experiments.report import summarise as summarise


def _run(config: ml_collections.ConfigDict, directory: pathlib.Path) -> tuple[list[dict], bool]:
  """The run's records, and whether it was trained now (not found done with this config)."""
  stored = directory / "config.json"
  done = (directory / "summary.json").exists() and stored.exists()
  trained = not (done and stored.read_text() == config.to_json_best_effort(sort_keys=True))
  if trained:
    train.train_and_evaluate(config, directory)
    stored.write_text(config.to_json_best_effort(sort_keys=True))
  return train.read_metrics(directory), trained


def _task_names(config: ml_collections.ConfigDict) -> list[str]:
  names = [t.strip() for t in config.tasks.split(",") if t.strip()]
  if config.mnist_path:
    if "mnist" not in config:
      raise ValueError("config.mnist_path is set but the config has no mnist task.")
    config.mnist.base.dataset.path = config.mnist_path
    names.append("mnist")
  for name in names:
    if name not in config:
      raise ValueError(f"unknown task {name!r} in config.tasks.")
  return names


def _plot(name: str, task, rows, runs, workdir: pathlib.Path, num_seeds: int, target: float):
  for key, title in (("eval_train_loss", "training loss"), ("test_loss", "test loss")):
    plotting.plot_comparison(
      {m.label: runs[m.key] for m in rows},
      workdir / f"{name}_{key.replace('eval_', '')}.png",
      f"{name}: {title}, {num_seeds} seeds",
      key=key,
      target=target if key == "eval_train_loss" else None,
      log_y=task.log_plot,
    )


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
  task_names = _task_names(config)
  cache = str(workdir / "xla_cache") if config.compilation_cache else ""
  started = time.perf_counter()
  sections, trained = [], 0
  for name in task_names:
    task = config[name]
    rows = methods(task, selected)
    runs: report.Runs = {m.key: [] for m in rows}
    for seed in config.seeds:
      for method in rows:
        directory = workdir / name / method.key / f"seed{seed}"
        records, now = _run(run_config(task, method, seed, cache), directory)
        runs[method.key].append(records)
        trained += now
    table, target = report.summarise(name, rows, runs, task.target_loss)
    _plot(name, task, rows, runs, workdir, len(config.seeds), target)
    description = report.describe(task, config.seeds, target, rows)
    lines = [*report.goals(runs, rows, target), *report.accelerations(runs, rows, target)]
    verdicts = [f"- {line}" for line in lines]
    sections.append("\n".join([f"### {name}", "", description, "", table, "", *verdicts, ""]))
  elapsed = time.perf_counter() - started
  text = "\n".join(
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
  (workdir / "RESULTS.md").write_text(text)
  return text


if __name__ == "__main__":
  # The documented command is `python -m hfjax.experiments.ablation`; its flags live in main.
  from hfjax.experiments import main

  flags.adopt_module_key_flags(main)  # so that --help lists them
  app.run(main.ablation_main)
