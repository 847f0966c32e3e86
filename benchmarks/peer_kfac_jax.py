"""kfac-jax on the problem of :mod:`benchmarks.compare_optimizers`, under the same protocol.

Runs in the kfac-jax virtualenv (``bash benchmarks/kfac_jax_setup.sh`` builds it)::

  .venv-kfac/bin/python -m benchmarks.peer_kfac_jax --seconds 150 --out kfac.jsonl

``benchmarks.compare_optimizers`` launches it so (with its own problem flags); standalone it
takes the same flags. It writes one JSON line per evaluation, ``{method, seconds, steps,
eval_loss, compiles, learning_rate, momentum, damping, fingerprint}``, to ``--out`` or stdout.

The optimizer is ``kfac_jax.Optimizer`` as in kfac-jax's MNIST autoencoder example, with its
adaptive learning rate, momentum and damping, but with no L2 regularisation (the other methods
have none), minibatches of ``--kfac_batch`` drawn from the training set, and the initial
damping ``--kfac_initial_damping`` (the example starts from 150 on full batches). The loss is
registered with ``kfac_jax.register_sigmoid_cross_entropy_loss`` at weight 1, whose loss is
the per-example sum over pixels averaged over the batch: exactly the loss the other methods
minimise. The eight dense layers of the same Flax model are found by kfac-jax's automatic
layer tagging (each as ``dense_with_bias``); ``--kfac_options`` (JSON) overrides any keyword.

Compilation is kept off the clock by a warm-up run on a copy of the parameters (the burn-in
and enough steps to pass an inverse update and a damping adaptation); the timed run then
starts afresh from the initial parameters, burn-in included.
"""

from __future__ import annotations

import json
import sys
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import kfac_jax
from absl import app, flags, logging

from benchmarks import compare_optimizers as harness
from hfjax.experiments import models

FLAGS = flags.FLAGS

# kfac-jax's MNIST autoencoder example (examples/autoencoder_mnist/pipeline.py), less its
# l2_reg and initial_damping, which are set below.
EXAMPLE_OPTIONS = {
  "use_adaptive_learning_rate": True,
  "use_adaptive_momentum": True,
  "use_adaptive_damping": True,
  "inverse_update_period": 5,
  "damping_adaptation_interval": 5,
  "num_burnin_steps": 5,
  "curvature_ema": 0.95,
  "damping_adaptation_decay": 0.95,
  "min_damping": 1e-5,
  "max_damping": 1000.0,
}


def make_optimizer(problem: harness.Problem, options: dict[str, Any]) -> kfac_jax.Optimizer:
  """kfac-jax's optimizer on the problem's loss, registered for its curvature estimate."""

  def loss_and_aux(params: Any, images: jax.Array) -> tuple[jax.Array, dict[str, Any]]:
    logits = problem.apply_fn(params, images)
    kfac_jax.register_sigmoid_cross_entropy_loss(logits, images)
    return models.sigmoid_cross_entropy(logits, images), {}

  return kfac_jax.Optimizer(
    value_and_grad_func=jax.value_and_grad(loss_and_aux, has_aux=True),
    l2_reg=0.0,
    value_func_has_aux=True,
    multi_device=False,
    **options,
  )


def minibatches(problem: harness.Problem, batch_size: int, seed: int) -> Iterator[jax.Array]:
  """Minibatches gathered on the device from indices drawn as the other methods draw them."""
  sampler = harness.index_sampler(problem, seed)
  gather = jax.jit(lambda train, indices: train[indices])
  while True:
    yield gather(problem.train, sampler.sample(batch_size))


def train(
  problem: harness.Problem,
  *,
  batch_size: int,
  initial_damping: float,
  options: dict[str, Any],
  seed: int,
  times: Sequence[float],
) -> list[dict[str, Any]]:
  """Warms kfac-jax up on a copy of the parameters, then trains it for ``times[-1]`` seconds."""
  options = {**EXAMPLE_OPTIONS, "initial_damping": initial_damping, **options}
  optimizer = make_optimizer(problem, options)
  warmup_steps = 1 + max(options["inverse_update_period"], options["damping_adaptation_interval"])

  def start(data_seed: int) -> tuple[Any, Any, jax.Array, Iterator[jax.Array]]:
    # The step donates the parameters and the state, so each run gets its own copy.
    params = jax.tree.map(jnp.copy, problem.params)
    batches = minibatches(problem, batch_size, data_seed)
    rng, init_rng = jax.random.split(jax.random.key(seed))
    state = optimizer.init(params, init_rng, next(batches))
    return params, state, rng, batches

  params, state, rng, batches = start(seed + 1)
  for _ in range(warmup_steps):
    rng, step_rng = jax.random.split(rng)
    params, state, _ = optimizer.step(params, state, step_rng, data_iterator=batches)
  jax.block_until_ready(params)

  params, state, rng, batches = start(seed)

  def step(carry):
    params, state, rng, _ = carry
    rng, step_rng = jax.random.split(rng)
    params, state, stats = optimizer.step(params, state, step_rng, data_iterator=batches)
    return params, state, rng, stats

  def diagnostics(carry) -> dict[str, Any]:
    stats = carry[3]
    return {k: float(stats[k]) for k in ("learning_rate", "momentum", "damping") if k in stats}

  return harness.run_timed(
    "kfac_jax",
    step,
    (params, state, rng, {}),
    params_of=lambda carry: carry[0],
    evaluate=harness.make_evaluate(problem),
    times=times,
    diagnostics=diagnostics,
  )


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  # kfac-jax logs every parameter it registers at INFO; the records are what matters here.
  logging.set_verbosity(logging.WARNING)
  # kfac-jax's step donates the batch, which XLA cannot reuse for any output; nothing is lost.
  warnings.filterwarnings("ignore", "Some donated buffers were not usable")
  options = harness.json_object("kfac_options", FLAGS.kfac_options)
  reports = harness.report_times(FLAGS.seconds, FLAGS.report_seconds)
  problem = harness.load_problem(
    num_train=FLAGS.num_train,
    data_seed=FLAGS.data_seed,
    eval_size=FLAGS.eval_size,
    seed=FLAGS.seed,
    encoder=[int(size) for size in FLAGS.encoder],
  )
  records = train(
    problem,
    batch_size=FLAGS.kfac_batch,
    initial_damping=FLAGS.kfac_initial_damping,
    options=options,
    seed=FLAGS.seed,
    times=harness.eval_times(FLAGS.seconds, FLAGS.eval_every, reports),
  )
  lines = [json.dumps({**r, "fingerprint": problem.fingerprint}) for r in records]
  if FLAGS.out:
    with open(FLAGS.out, "w") as f:
      f.write("\n".join(lines) + "\n")
  else:
    sys.stdout.write("\n".join(lines) + "\n")


if __name__ == "__main__":
  harness.define_flags()
  app.run(main)
