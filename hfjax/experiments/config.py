"""The training config: every key with its default, and the checks that need no data.

``configs/default.py`` returns :func:`default_config`, and every other ``configs/*.py`` starts
from it and overrides a few fields. The defaults live here, in the package, rather than in
``configs/`` so that an installed ``hfjax[examples]`` (a notebook on Colab) has them too;
config files import this module, never the trainer.

Sizes of samples and batches count examples, and 0 means the whole training set.

Example:

  >>> from hfjax.experiments import config as config_lib
  >>> config = config_lib.default_config()
  >>> config.optimizer.curvature_schedule.start
  200
"""

from __future__ import annotations

import importlib.util
import pathlib

import ml_collections

import hfjax
from hfjax.experiments import models

OPTIMIZERS = ("hf", "adam", "sgd", "lbfgs")
MODELS = ("autoencoder", "classifier")
SCHEDULES = ("fixed", "geometric", "variance")


def schedule_config(
  kind: str = "fixed",
  start: int = 0,
  maximum: int = 0,
  *,
  factor: float = 1.2,
  theta: float = 0.5,
  grid_ratio: float = 2.0,
) -> ml_collections.ConfigDict:
  """A sample-size schedule, every field set.

  Args:
    kind: ``"fixed"`` (``start``), ``"geometric"`` (``start * factor**k`` up to ``maximum``)
      or ``"variance"`` (Byrd et al.'s test with ``theta``; gradient sample only).
    start: The first size (0: the whole training set).
    maximum: The largest size of a growing schedule (0: the whole training set).
    factor: Growth per step of ``"geometric"``.
    theta: The variance test's threshold.
    grid_ratio: Sizes are rounded up to a grid of this ratio, so each compiles once.

  Returns:
    A ``ConfigDict`` with all six fields, so that a schedule set here never inherits a field
    from the one it replaces.
  """
  return ml_collections.ConfigDict(
    {
      "kind": kind,
      "start": start,
      "maximum": maximum,
      "factor": factor,
      "theta": theta,
      "grid_ratio": grid_ratio,
    }
  )


def default_config() -> ml_collections.ConfigDict:
  """Every key :func:`hfjax.experiments.train.train_and_evaluate` reads, with its default."""
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
  opt.preconditioner = "lbfgs"  # "none", "martens", "jacobi", "lbfgs", "kfac" or "kfac+lbfgs"
  opt.memory_size = 10  # L-BFGS pairs (also optax.lbfgs's memory)
  opt.lbfgs_pairs = "within"  # "within" the solve or from the "previous" solve
  opt.max_cg_steps = 250
  opt.initial_damping = 45.0
  opt.cg_tol = 5e-4
  opt.num_recorded_iterates = 0  # CG iterates kept for backtracking; 0: all
  # Operands of the Gauss-Newton products' matrix products rounded to this dtype ("bfloat16");
  # "" for full precision.
  opt.curvature_matmul_dtype = ""
  opt.warm_start_decay = 0.95  # CG starts from this multiple of the last solution
  opt.adaptive_warm_start = False  # True: warm_start_decay="adaptive" (best multiple, and CG
  # directions conjugate to it: the stochastic regime with momentum in the README)
  # The library's own defaults, so the two never drift apart: the damping rule
  # (hfjax.DampingConfig; ratio "martens": rho on the curvature batch over the undamped model)
  # and K-FAC's refresh period, moving average and output loss (hfjax.KFACConfig).
  opt.damping = ml_collections.ConfigDict(hfjax.DampingConfig()._asdict())
  opt.kfac = ml_collections.ConfigDict(hfjax.KFACConfig()._asdict())
  opt.kfac.inverse_every = ml_collections.config_dict.placeholder(int)  # None: with the factors
  opt.gradient_schedule = schedule_config()
  opt.curvature_schedule = schedule_config(start=200)
  # Optax peers.
  opt.learning_rate = 1e-3
  opt.momentum = 0.9  # sgd
  opt.nesterov = False  # sgd
  opt.batch_size = 256  # adam and sgd minibatch; lbfgs uses one fixed batch of this size
  # Length of the run: stops at the first of these (0: no limit).
  config.num_steps = 50
  config.budget_seconds = 0.0  # training wall time, evaluation and compilation excluded
  config.budget_examples = 0  # examples processed (see hfjax.experiments.train)
  config.max_consecutive_rejections = 20  # HF: stop when the damping cannot rescue a step
  config.target_loss = ml_collections.config_dict.placeholder(float)  # for time-to-target
  # Evaluation: every eval_every steps and every eval_every_seconds of training (0: off).
  config.eval_every = 5
  config.eval_every_seconds = 0.0
  config.eval_train_examples = 10000  # training-loss subset; 0: all
  # Steps between reads of the step diagnostics (one record per step all the same). Between
  # reads the steps run back to back on the device; budget_examples, budget_seconds and
  # max_consecutive_rejections are checked at reads, so a run may take up to log_every - 1
  # steps past them. Evaluations and checkpoints are reads too.
  config.log_every = 1
  config.seed = 0
  config.float64 = False
  config.flatten_params = True
  config.mesh_shape = ml_collections.config_dict.placeholder(tuple)  # e.g. (8,); None: one device
  config.checkpoint_every = 0  # steps; 0: only on Ctrl-C
  config.compilation_cache_dir = ""  # persistent XLA cache, e.g. ~/.cache/hfjax_xla
  config.progress = True  # tqdm bar (on a terminal)
  config.plot = True  # <workdir>/loss.png
  return config


def require(condition: bool, message: str) -> None:
  """Raises ``ValueError(message)`` unless ``condition``: a bad config value."""
  if not condition:
    raise ValueError(message)


def check_config(config: ml_collections.ConfigDict) -> None:
  """Checks the keys that need no data: names, counts and budgets.

  Raises:
    ValueError: naming the key and its allowed values.
  """
  require(config.num_steps >= 1, f"config.num_steps={config.num_steps} must be >= 1.")
  for key in ("eval_every", "checkpoint_every", "budget_seconds", "budget_examples"):
    require(config[key] >= 0, f"config.{key}={config[key]} must be >= 0 (0: off).")
  require(config.log_every >= 1, f"config.log_every={config.log_every} must be >= 1.")
  require(config.eval_every_seconds >= 0, "config.eval_every_seconds must be >= 0 (0: off).")
  require(
    config.optimizer.name in OPTIMIZERS,
    f"config.optimizer.name={config.optimizer.name!r}; choose one of {OPTIMIZERS}.",
  )
  require(
    config.model.kind in MODELS, f"config.model.kind={config.model.kind!r}; choose one of {MODELS}."
  )
  # K-FAC finds its layers as 2-D parameter leaves; in one flat vector there are none, and
  # the preconditioner would quietly become a diagonal.
  kfac = config.optimizer.name == "hf" and config.optimizer.preconditioner.startswith("kfac")
  require(
    not (kfac and config.flatten_params),
    f"config.optimizer.preconditioner={config.optimizer.preconditioner!r} needs the model's "
    "dense layers as parameter leaves: set --config.flatten_params=False.",
  )


def sibling_config(config_file: str, name: str) -> ml_collections.ConfigDict:
  """``get_config()`` of ``<name>.py`` in the folder of ``config_file``.

  Config files are loaded by path (``--config configs/x.py``), not imported from a package,
  so one that builds on another loads it by path too, from wherever the command runs:
  ``sibling_config(__file__, "curves_autoencoder")``.
  """
  path = pathlib.Path(config_file).with_name(f"{name}.py")
  spec = importlib.util.spec_from_file_location(f"hfjax_config_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()
