"""The HF ablation (Sainath et al. 2013) on CURVES and digits, sized for a 2-core CPU.

  OPENBLAS_NUM_THREADS=1 python -m hfjax.experiments.ablation --config configs/ablation.py \
    [--workdir runs/ablation]
  # also on MNIST (784-1000-500-250-30 autoencoder):
  OPENBLAS_NUM_THREADS=1 python -m hfjax.experiments.ablation --config configs/ablation.py \
    --config.mnist_path=/path/to/mnist.npz

(``OPENBLAS_NUM_THREADS=1`` keeps the K-FAC variants' Cholesky inverses from OpenBLAS's
spinning threads, see ``hfjax/experiments/ablation.py``.)

Each task holds the training config of its runs (``base``, see ``configs/*.py``) and the
sizes the methods differ in (``hfjax.experiments.ablation_config.task_config`` lists them). Sizes
count examples; 0 means the whole training set.
"""

from hfjax.experiments import ablation_config as ablation_lib
from hfjax.experiments import config as config_lib


def get_config():
  curves = config_lib.sibling_config(__file__, "curves_autoencoder")
  curves.dataset.num_train = 1024
  curves.dataset.num_test = 1000
  curves.eval_train_examples = 0
  curves.eval_every = 1
  curves.num_steps = 200
  curves.budget_examples = 1_000_000
  # HF leaves the initial plateau after about 30 steps; the time cap bounds the methods
  # whose steps are dear (the per-example passes of Martens, Jacobi and the variance test).
  curves.budget_seconds = 45.0

  digits = config_lib.sibling_config(__file__, "digits_classifier")
  digits.eval_every = 1
  digits.num_steps = 200
  digits.budget_examples = 1_000_000

  mnist = config_lib.sibling_config(__file__, "mnist_autoencoder")
  mnist.eval_train_examples = 10000
  mnist.eval_every = 1
  mnist.num_steps = 100
  mnist.budget_examples = 3_000_000

  def growing(gradient_start, curvature_start):
    return {
      "gradient_start": gradient_start,
      "curvature_start": curvature_start,
      "factor": 1.15,
      "theta": 0.5,
      "grid_ratio": 2.0,
    }

  return ablation_lib.ablation_config(
    curves=ablation_lib.task_config(
      curves, curvature_sample=100, sampling=growing(128, 13), sgd_learning_rate=0.01
    ),
    digits=ablation_lib.task_config(
      digits,
      curvature_sample=150,
      sampling=growing(180, 19),
      batch_size=64,
      peer_eval_every_seconds=0.05,
    ),
    mnist=ablation_lib.task_config(
      mnist, gradient_sample=20000, curvature_sample=1000, sampling=growing(2500, 125)
    ),
  )
