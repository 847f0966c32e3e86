"""scikit-learn digits (8x8 images, 10 classes): an MLP classifier with softmax
cross-entropy, trained by HF with L-BFGS preconditioning. Runs in under a minute on a CPU.

  python -m hfjax.experiments.train --config configs/digits_classifier.py
"""

import ml_collections

from hfjax.experiments import config as config_lib


def get_config():
  config = config_lib.sibling_config(__file__, "default")
  config.dataset = ml_collections.ConfigDict({"name": "digits", "seed": 0})
  config.model.kind = "classifier"
  config.model.hidden_sizes = (128, 64)
  config.model.activation = "sigmoid"
  opt = config.optimizer
  opt.name = "hf"
  opt.preconditioner = "lbfgs"
  # The whole training set (1437 images) for the gradient, 300 of them for the curvature.
  opt.gradient_schedule = config_lib.schedule_config("fixed", 0)
  opt.curvature_schedule = config_lib.schedule_config("fixed", 300)
  opt.batch_size = 64
  config.num_steps = 40
  config.eval_every = 1
  config.eval_train_examples = 0
  return config
