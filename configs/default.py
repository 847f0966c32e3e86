"""Every key of the training config with its default: the config the others start from.

  python -m hfjax.experiments.train --config configs/default.py

The keys, their defaults and what they mean are in ``hfjax/experiments/config.py``
(:func:`hfjax.experiments.config.default_config`): they ship with the package, so an
installed ``hfjax[examples]`` has them without this folder. The other configs here load this
file (``config_lib.sibling_config(__file__, "default")``, by path, so it works from any
directory) and override a few fields; no config imports the trainer.
"""

from hfjax.experiments import config as config_lib


def get_config():
  return config_lib.default_config()
