"""The stochastic regime with momentum (README, "Which regime"): the MNIST-sized deep
autoencoder (784-1000-500-250-30, mirrored) on 20000 generated CURVES images, HF with K-FAC
and the adaptive warm start on one fresh 2000-image minibatch per step, for 150 s of training.

  python -m hfjax.experiments.train --config configs/curves_momentum.py

The settings are those measured against Adam and kfac-jax in ``benchmarks/RESULTS.md``
(``benchmarks.compare_optimizers``, same model and data).
"""

from hfjax.experiments import config as config_lib


def get_config():
  config = config_lib.sibling_config(__file__, "curves_autoencoder")  # its data
  config.model.encoder_sizes = (1000, 500, 250, 30)
  config.flatten_params = False  # K-FAC finds the dense layers among the parameter leaves
  opt = config.optimizer
  opt.name = "hf"
  opt.preconditioner = "kfac"
  opt.max_cg_steps = 10
  opt.initial_damping = 0.01
  opt.adaptive_warm_start = True
  opt.kfac.decay = 0.9  # factors averaged over minibatches, refreshed every step
  # Martens' 1.5 climbs too slowly from the floor when the minibatch model fails for several
  # steps in a row; 3 gets lambda to where the model holds again in a few steps.
  opt.damping.increase = 3.0
  # kfac-jax's floor. At the default 1e-8 the K-FAC preconditioner is all but undamped late in
  # training, and one seed in three stalled 2% above the others; 1e-5 costs 0.1-0.2% on the
  # two others (benchmarks/RESULTS.md, session 6).
  opt.damping.minimum = 1e-5
  # The Gauss-Newton products' matrix products on bfloat16 operands (float32 accumulation):
  # each costs 0.68 of a float32 one on this CPU (AVX512-BF16), for 1.2x the steps in 150 s
  # and the same loss per step (benchmarks/RESULTS.md, session 7). On hardware without native
  # bfloat16 products, check with benchmarks.bench_curvature first.
  opt.curvature_matmul_dtype = "bfloat16"
  # Gradient and curvature on the same fresh minibatch; rho on it too (no held-out batch).
  opt.gradient_schedule = config_lib.schedule_config("fixed", 2000)
  opt.curvature_schedule = config_lib.schedule_config("fixed", 2000)
  config.num_steps = 100000  # the time budget ends the run
  config.budget_seconds = 150.0
  config.eval_every = 10
  return config
