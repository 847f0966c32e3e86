"""MNIST deep autoencoder (784-1000-500-250-30, mirrored; Hinton & Salakhutdinov 2006,
Martens 2010) trained by HF with L-BFGS preconditioning and growing samples. Needs the data:

  python -m hfjax.experiments.train --config configs/mnist_autoencoder.py \
    --config.dataset.path=/path/to/mnist.npz

(a Keras ``mnist.npz``, a directory of the four IDX files, or ``tfds``).
"""

import ml_collections

from hfjax.experiments import train


def get_config():
  config = train.default_config()
  config.dataset = ml_collections.ConfigDict(
    {"name": "mnist", "path": ml_collections.config_dict.placeholder(str), "autoencoder": True}
  )
  config.model.kind = "autoencoder"
  config.model.encoder_sizes = (1000, 500, 250, 30)
  opt = config.optimizer
  opt.name = "hf"
  opt.preconditioner = "lbfgs"
  opt.gradient_schedule.kind = "geometric"
  opt.gradient_schedule.start = 7500
  opt.gradient_schedule.factor = 1.25
  opt.gradient_schedule.maximum = 0
  opt.curvature_schedule.kind = "geometric"
  opt.curvature_schedule.start = 750
  opt.curvature_schedule.factor = 1.25
  opt.curvature_schedule.maximum = 6000
  config.num_steps = 100
  config.eval_every = 5
  return config
