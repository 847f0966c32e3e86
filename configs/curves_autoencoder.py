"""CURVES deep autoencoder (784-400-200-100-50-25-6, mirrored) trained by HF with L-BFGS
preconditioning and growing samples (Sainath et al. 2013).

  python -m hfjax.experiments.train --config configs/curves_autoencoder.py

20000 generated training images; each outer step draws a gradient sample that grows from
1250 to 5000 images and a curvature sample a tenth of that.
"""

from hfjax.experiments import config as config_lib


def get_config():
  config = config_lib.sibling_config(__file__, "default")
  config.dataset.name = "curves"
  config.dataset.num_train = 20000
  config.dataset.num_test = 10000
  config.model.kind = "autoencoder"
  config.model.encoder_sizes = (400, 200, 100, 50, 25, 6)
  opt = config.optimizer
  opt.name = "hf"
  opt.preconditioner = "lbfgs"
  # Martens' 45 suits a loss that the model barely fits yet; on CURVES, starting at 1 leaves
  # the initial plateau in about half the steps.
  opt.initial_damping = 1.0
  opt.gradient_schedule = config_lib.schedule_config("geometric", 1250, 5000, factor=1.15)
  opt.curvature_schedule = config_lib.schedule_config("geometric", 125, 500, factor=1.15)
  config.num_steps = 60
  config.eval_every = 5
  return config
