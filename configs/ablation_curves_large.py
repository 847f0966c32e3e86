"""The ablation's CURVES task with 8x the images, where growing samples have room to pay.

  OPENBLAS_NUM_THREADS=1 python -m hfjax.experiments.ablation \
    --config configs/ablation_curves_large.py --workdir runs/ablation_large

Sainath et al. (2013) sample from hundreds of hours of speech; the 1024 images of
``configs/ablation.py`` leave the growing gradient sample a dozen steps before it is the whole
set. Here: 8192 images, the baseline's curvature sample 500 (6%), the growing samples start at
512 / 50 and grow 1.15x per step (the whole set after about 20 steps), and the HF variants
that bear on the paper's claims, with no preconditioner and with K-FAC underneath, with Adam
as the peer.
"""

from hfjax.experiments import ablation_config as ablation_lib
from hfjax.experiments import config as config_lib


def get_config():
  config = config_lib.sibling_config(__file__, "ablation")
  config.tasks = "curves"
  accelerated = [key for group in ablation_lib.ACCELERATIONS for key in group[1:]]
  config.variants = ",".join([*accelerated, "adam"])
  curves = config.curves
  curves.base.dataset.num_train = 8192
  curves.base.num_steps = 400
  curves.base.budget_examples = 10_000_000
  curves.base.budget_seconds = 75.0
  curves.curvature_sample = 500
  curves.sampling.gradient_start = 512
  curves.sampling.curvature_start = 50
  return config
