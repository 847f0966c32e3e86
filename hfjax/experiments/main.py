"""Command line of the training script: flags, then :func:`train.train_and_evaluate`.

  python -m hfjax.experiments.train --config configs/curves_autoencoder.py \
    [--config.optimizer.memory_size=20 ...] [--workdir runs/curves] [--resume]

(``python -m hfjax.experiments.main`` is the same command.)
"""

import pathlib

from absl import app, flags
from ml_collections import config_flags

from hfjax.experiments import cli, train

_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "Path to a configs/*.py file with get_config().", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (default: runs/<config name>).")
_RESUME = flags.DEFINE_bool("resume", False, "Continue from the newest checkpoint in the workdir.")


def main(argv: list[str]) -> None:
  cli.check_argv(argv)
  if _CONFIG.value is None:
    raise app.UsageError("--config is required, e.g. --config configs/curves_autoencoder.py")
  name = pathlib.Path(config_flags.get_config_filename(flags.FLAGS["config"])).stem
  workdir = _WORKDIR.value or f"runs/{name}"
  try:
    summary = train.train_and_evaluate(_CONFIG.value, workdir, resume=_RESUME.value)
  except (ValueError, TypeError, FileNotFoundError) as err:
    raise SystemExit(f"error: {err}") from None
  except KeyboardInterrupt:
    raise SystemExit(
      f"interrupted; checkpoint saved in {workdir}/checkpoints (continue with --resume)"
    ) from None
  print(
    "\n".join(["summary:", *(f"  {k}: {v}" for k, v in summary.items()), f"written to {workdir}/"])
  )


if __name__ == "__main__":
  app.run(main)
