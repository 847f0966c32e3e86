"""The ablation's config: its tasks, its run-wide keys and its methods.

A method is a set of optimizer settings laid over a task's training config: the HF variants
of Sainath et al. (2013), their two accelerations again with K-FAC underneath, and the Optax
peers. Config files (``configs/ablation.py``) build on
this module; :mod:`hfjax.experiments.ablation` runs what it describes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import ml_collections

from hfjax.experiments import config as config_lib


class HFVariant(NamedTuple):
  """An HF variant: its table label, its optimizer settings for a task, and the settings of
  its training config outside ``optimizer`` (``None``: the task's)."""

  label: str
  optimizer: Callable[[ml_collections.ConfigDict], dict]
  run: dict | None = None


HF_VARIANTS: dict[str, HFVariant] = {}


def _hf_variant(key: str, label: str, **run):
  def register(fn):
    HF_VARIANTS[key] = HFVariant(label, fn, run or None)
    return fn

  return register


def _schedule(*args, **kwargs) -> dict:
  # Plain dicts: a method's settings are laid over the base config field by field.
  return config_lib.schedule_config(*args, **kwargs).to_dict()


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
      gradient_kind, grow.gradient_start, task.gradient_sample, theta=grow.theta, **shared
    ),
    "curvature_schedule": _schedule(
      "geometric", grow.curvature_start, task.curvature_sample, **shared
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


# K-FAC finds its layers as 2-D parameter leaves, which one flat parameter vector hides
# (``flatten_params``); these runs keep the pytree and pay its per-leaf vector arithmetic.
_KFAC_RUN = {"flatten_params": False}


@_hf_variant("hf_kfac", "+ K-FAC", **_KFAC_RUN)
def _kfac(task):
  return {"preconditioner": "kfac", **_fixed(task)}


@_hf_variant("hf_kfac_lbfgs", "+ K-FAC + L-BFGS within the solve (K-FAC as H0)", **_KFAC_RUN)
def _kfac_lbfgs(task):
  return {"preconditioner": "kfac+lbfgs", "lbfgs_pairs": "within", **_fixed(task)}


@_hf_variant("hf_kfac_geometric", "+ K-FAC + geometric sampling", **_KFAC_RUN)
def _kfac_geometric(task):
  return {"preconditioner": "kfac", **_growing(task, "geometric")}


@_hf_variant("hf_kfac_lbfgs_geometric", "+ K-FAC + L-BFGS + geometric sampling", **_KFAC_RUN)
def _kfac_paper(task):
  return {"preconditioner": "kfac+lbfgs", "lbfgs_pairs": "within", **_growing(task, "geometric")}


PEERS = ("adam", "sgd", "lbfgs")
VARIANTS = (*HF_VARIANTS, *PEERS)
BASELINE = "hf"
PAPER = "hf_lbfgs_geometric"
KFAC = "hf_kfac"


class Accelerations(NamedTuple):
  """The paper's two accelerations over one HF variant underneath them, by method key.

  Attributes:
    underneath: what the variants share, in words.
    base: the variant alone (fixed samples, no L-BFGS).
    lbfgs: with L-BFGS built within the solve.
    sampling: with geometrically growing samples.
    both: with both.
  """

  underneath: str
  base: str
  lbfgs: str
  sampling: str
  both: str


ACCELERATIONS = (
  Accelerations("no preconditioner", BASELINE, "hf_lbfgs", "hf_geometric", PAPER),
  Accelerations("K-FAC", KFAC, "hf_kfac_lbfgs", "hf_kfac_geometric", "hf_kfac_lbfgs_geometric"),
)


def task_config(base: ml_collections.ConfigDict, **settings) -> ml_collections.ConfigDict:
  """One task of an ablation config: a training config and the sizes the methods differ in.

  Args:
    base: the training config of every run (:func:`hfjax.experiments.config.default_config`
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
  """One row of a table: a name, a label, the optimizer settings and ``"hf"`` or ``"optax"``.

  ``run`` holds the settings of the run's training config outside ``optimizer``.
  """

  key: str
  label: str
  optimizer: dict
  family: str
  run: dict | None = None


def methods(task: ml_collections.ConfigDict, selected: Sequence[str]) -> list[Method]:
  """The runs of one task, in table order, for the selected variant names."""
  unknown = set(selected) - set(HF_VARIANTS) - set(PEERS)
  if unknown:
    raise ValueError(f"unknown variants {sorted(unknown)}; choose from {[*HF_VARIANTS, *PEERS]}.")
  rows = []
  for key, variant in HF_VARIANTS.items():
    if key in selected:
      optimizer = {"name": "hf", **variant.optimizer(task)}
      rows.append(Method(key, variant.label, optimizer, "hf", variant.run))
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


def run_config(
  task: ml_collections.ConfigDict, method: Method, seed: int, cache: str
) -> ml_collections.ConfigDict:
  """The training config of one run."""
  config = ml_collections.ConfigDict(task.base.to_dict())
  config.optimizer.update_from_flattened_dict(_flatten(method.optimizer))
  config.update_from_flattened_dict(_flatten(method.run or {}))
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
