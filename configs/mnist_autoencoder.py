"""MNIST deep autoencoder (784-1000-500-250-30, mirrored; Hinton & Salakhutdinov 2006,
Martens 2010) trained by HF with L-BFGS preconditioning and growing samples. Needs the data:

  python -m hfjax.experiments.train --config configs/mnist_autoencoder.py \
    --config.dataset.path=/path/to/mnist.npz

(a Keras ``mnist.npz``, a directory of the four IDX files, or ``tfds``).
"""

import ml_collections

from hfjax.experiments import config as config_lib


def get_config():
  config = config_lib.sibling_config(__file__, "default")
  config.dataset = ml_collections.ConfigDict(
    {"name": "mnist", "path": ml_collections.config_dict.placeholder(str), "autoencoder": True}
  )
  config.model.kind = "autoencoder"
  config.model.encoder_sizes = (1000, 500, 250, 30)
  opt = config.optimizer
  opt.name = "hf"
  opt.preconditioner = "lbfgs"
  # The gradient sample grows to the whole training set (maximum 0).
  opt.gradient_schedule = config_lib.schedule_config("geometric", 7500, 0, factor=1.25)
  opt.curvature_schedule = config_lib.schedule_config("geometric", 750, 6000, factor=1.25)
  config.num_steps = 100
  config.eval_every = 5
  return config
