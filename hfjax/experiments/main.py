"""Command lines of the experiments: flags, then one call.

  python -m hfjax.experiments.train --config configs/curves_autoencoder.py \
    [--config.optimizer.memory_size=20 ...] [--workdir runs/curves] [--resume]
  python -m hfjax.experiments.ablation --config configs/ablation.py [--workdir runs/ablation]

``train`` runs :func:`hfjax.experiments.train.train_and_evaluate` (:func:`main`, also
``python -m hfjax.experiments.main``), ``ablation`` runs
:func:`hfjax.experiments.ablation.run_ablation` (:func:`ablation_main`). The flags are defined
here once, for both, when this module is imported; the library modules define none.

Several processes (JAX's multi-controller runtime, one process per host or per GPU): start
the same ``train`` command in every process, with ``--coordinator_address=HOST:PORT`` (of
process 0), ``--num_processes`` and ``--process_id``, or none of them where JAX finds them
itself (SLURM, Open MPI, Kubernetes, Cloud TPU pod slices; ``JAX_COORDINATOR_ADDRESS`` in the
environment names the coordinator too). :func:`main` then calls ``jax.distributed.initialize``
before any JAX computation; without flags and without such an environment it runs as one
process and never calls it. The run is data-parallel over every device of every process (see
:mod:`hfjax.experiments.train`).
"""

import os
import pathlib
import sys

import jax
from absl import app, flags
from ml_collections import config_flags

from hfjax.experiments import ablation, cli, train

_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "Path to a configs/*.py file with get_config().", lock_config=True
)
_WORKDIR = flags.DEFINE_string(
  "workdir", None, "Output directory (train: runs/<config name>; ablation: runs/ablation)."
)
_RESUME = flags.DEFINE_bool(
  "resume", False, "train: continue from the newest checkpoint in the workdir."
)
_COORDINATOR = flags.DEFINE_string(
  "coordinator_address", None, "train, several processes: HOST:PORT of process 0."
)
_NUM_PROCESSES = flags.DEFINE_integer(
  "num_processes", None, "train, several processes: how many there are."
)
_PROCESS_ID = flags.DEFINE_integer(
  "process_id", None, "train, several processes: this one's index, 0 to num_processes - 1."
)


def _cluster_detected() -> bool:
  """Whether ``jax.distributed.initialize()`` would find its arguments on its own."""
  if "JAX_COORDINATOR_ADDRESS" in os.environ:
    return True
  try:  # JAX's cluster detection (SLURM, Open MPI, Kubernetes, Cloud TPU), not public API
    from jax._src.clusters import ClusterEnv

    clusters = [env for env in ClusterEnv._cluster_types if not env.opt_in_only_method]
  except (ImportError, AttributeError):
    return False
  return any(env.is_env_present() for env in clusters)


def _initialize_distributed() -> None:
  """Joins the other processes (see the module docstring); a no-op for a single process."""
  given = {
    "coordinator_address": _COORDINATOR.value,
    "num_processes": _NUM_PROCESSES.value,
    "process_id": _PROCESS_ID.value,
  }
  given = {key: value for key, value in given.items() if value is not None}
  if given or _cluster_detected():
    jax.distributed.initialize(**given)


def _config(example: str):
  if _CONFIG.value is None:
    raise app.UsageError(f"--config is required, e.g. --config {example}")
  return _CONFIG.value


def main(argv: list[str]) -> None:
  """``python -m hfjax.experiments.train``."""
  cli.check_argv(argv)
  config = _config("configs/curves_autoencoder.py")
  name = pathlib.Path(config_flags.get_config_filename(flags.FLAGS["config"])).stem
  workdir = _WORKDIR.value or f"runs/{name}"
  try:
    _initialize_distributed()
    summary = train.train_and_evaluate(config, workdir, resume=_RESUME.value)
  except (ValueError, TypeError, FileNotFoundError) as err:
    raise SystemExit(f"error: {err}") from None
  except KeyboardInterrupt:
    raise SystemExit(
      f"interrupted; checkpoint saved in {workdir}/checkpoints (continue with --resume)"
    ) from None
  if jax.process_index() == 0:
    lines = ["summary:", *(f"  {key}: {value}" for key, value in summary.items())]
    print("\n".join([*lines, f"written to {workdir}/"]))


def ablation_main(argv: list[str]) -> None:
  """``python -m hfjax.experiments.ablation``: runs that finished are read back, not resumed."""
  cli.check_argv(argv)
  if _RESUME.value:
    raise app.UsageError("--resume is for the training script; the ablation reads back done runs.")
  config = _config("configs/ablation.py")
  try:
    command = " ".join(["python -m hfjax.experiments.ablation", *sys.argv[1:]])
    report = ablation.run_ablation(config, _WORKDIR.value or "runs/ablation", command)
  except (ValueError, TypeError, FileNotFoundError) as err:
    raise SystemExit(f"error: {err}") from None
  print(report)


if __name__ == "__main__":
  app.run(main)
