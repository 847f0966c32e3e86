"""Command lines of the experiments: flags, then one call.

  python -m hfjax.experiments.train --config configs/curves_autoencoder.py \
    [--config.optimizer.memory_size=20 ...] [--workdir runs/curves] [--resume]
  python -m hfjax.experiments.ablation --config configs/ablation.py [--workdir runs/ablation]

``train`` runs :func:`hfjax.experiments.train.train_and_evaluate` (:func:`main`, also
``python -m hfjax.experiments.main``), ``ablation`` runs
:func:`hfjax.experiments.ablation.run_ablation` (:func:`ablation_main`). The flags are defined
here once, for both, when this module is imported; the library modules define none.
"""

import pathlib
import sys

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
    summary = train.train_and_evaluate(config, workdir, resume=_RESUME.value)
  except (ValueError, TypeError, FileNotFoundError) as err:
    raise SystemExit(f"error: {err}") from None
  except KeyboardInterrupt:
    raise SystemExit(
      f"interrupted; checkpoint saved in {workdir}/checkpoints (continue with --resume)"
    ) from None
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
