"""What the command lines of the experiments and the benchmarks share (absl flags)."""

from collections.abc import Sequence

from absl import app, flags, logging


def check_argv(argv: Sequence[str]) -> None:
  """Rejects stray arguments and, unless ``--verbosity`` is given, absl's INFO logs.

  Raises:
    app.UsageError: for an argument that is not a flag.
  """
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # JAX's start-up notes are noise here
