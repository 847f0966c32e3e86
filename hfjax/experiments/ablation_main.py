"""Command line of the ablation: flags, then :func:`ablation.run_ablation`.

  python -m hfjax.experiments.ablation --config configs/ablation.py [--workdir runs/ablation]

(``python -m hfjax.experiments.ablation_main`` is the same command.)
"""

import sys

from absl import app, flags
from ml_collections import config_flags

from hfjax.experiments import ablation, cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/ablation.py", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "runs/ablation", "Output directory.")


def main(argv: list[str]) -> None:
  cli.check_argv(argv)
  if _CONFIG.value is None:
    raise app.UsageError("--config is required, e.g. --config configs/ablation.py")
  try:
    command = " ".join(["python -m hfjax.experiments.ablation", *sys.argv[1:]])
    report = ablation.run_ablation(_CONFIG.value, _WORKDIR.value, command)
  except (ValueError, TypeError, FileNotFoundError) as err:
    raise SystemExit(f"error: {err}") from None
  print(report)


if __name__ == "__main__":
  app.run(main)
