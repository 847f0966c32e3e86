r"""CG steps per outer HF step, by preconditioner and damping, from a point off the plateau.

Usage::

  python -m benchmarks.bench_preconditioners [--dampings=45,1,0.1] \
    [--preconditioners=none,martens,lbfgs,kfac,kfac:exact,kfac+lbfgs] [--num_train=20000]

The MNIST-sized deep autoencoder (784-1000-500-250-30, mirrored; Martens' sparse
initialisation; sigmoid cross-entropy summed over pixels) is first trained with Adam for
``--adam_steps`` minibatch steps on generated CURVES images, which leaves the initial plateau.
From that point every (damping, preconditioner) pair takes one ``hfjax.hessian_free`` step
from a fresh state (``initial_damping`` = the damping): the gradient on the whole training
set, the Gauss-Newton products on its first ``--curvature_batch`` images, CG to Martens'
stopping rule (capped at ``--max_cg_steps``), then CG backtracking and the line search
(``kfac:exact`` is ``preconditioner="kfac"`` with ``KFACConfig(tikhonov="exact")``,
``kfac:exact:4`` the same with ``num_samples=4``). The
table gives the CG steps, the training loss after the step, and the time of the step
relative to the first row's (one jitted program each, run once after compilation; the
machine is shared, so only compare times within one run).
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags

import hfjax
from hfjax.experiments import datasets, models

_DAMPINGS = flags.DEFINE_list("dampings", ["45", "1", "0.1"], "Levenberg-Marquardt lambdas.")
_PRECONDITIONERS = flags.DEFINE_list(
  "preconditioners",
  ["none", "martens", "lbfgs", "kfac", "kfac:exact", "kfac+lbfgs", "kfac+lbfgs:exact"],
  "Preconditioners; a K-FAC one may add ':<KFACConfig.tikhonov>[:<num_samples>]'.",
)
_NUM_TRAIN = flags.DEFINE_integer("num_train", 20000, "Generated CURVES training images.")
_CURVATURE_BATCH = flags.DEFINE_integer("curvature_batch", 1000, "Curvature batch size.")
_ADAM_STEPS = flags.DEFINE_integer("adam_steps", 200, "Adam steps to leave the plateau.")
_MAX_CG_STEPS = flags.DEFINE_integer("max_cg_steps", 250, "CG step cap.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the data, the init and the Adam batches.")


def _off_plateau(apply_fn, loss_fn, params, inputs, steps: int, seed: int):
  """Adam (lr 1e-3, minibatch 128) for ``steps`` steps."""
  tx = optax.adam(1e-3)

  @jax.jit
  def step(params, opt_state, x):
    grads = jax.grad(lambda p: loss_fn(apply_fn(p, x), x))(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  opt_state = tx.init(params)
  rng = np.random.default_rng(seed)
  for _ in range(steps):
    params, opt_state = step(params, opt_state, inputs[rng.choice(len(inputs), 128, False)])
  return params


def main(argv: list[str]) -> None:
  del argv
  data = datasets.curves(num_train=_NUM_TRAIN.value, num_test=0, seed=_SEED.value)
  inputs = jnp.asarray(data.x_train)
  model = models.DeepAutoencoder(models.MNIST_ENCODER)
  apply_fn, loss_fn = models.make_apply_fn(model), models.sigmoid_cross_entropy
  params = model.init(jax.random.key(_SEED.value), inputs[:1])["params"]
  params = _off_plateau(apply_fn, loss_fn, params, inputs, _ADAM_STEPS.value, _SEED.value)
  batch = (inputs, inputs)
  curvature_batch = (inputs[: _CURVATURE_BATCH.value], inputs[: _CURVATURE_BATCH.value])
  loss, grads = jax.jit(jax.value_and_grad(lambda p: loss_fn(apply_fn(p, inputs), inputs)))(params)
  print(
    f"# {jax.devices()[0].platform}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
    f"jax {jax.__version__}; {_NUM_TRAIN.value} CURVES images, curvature batch "
    f"{_CURVATURE_BATCH.value}; loss after {_ADAM_STEPS.value} Adam steps: {float(loss):.2f}"
  )
  print("| damping | preconditioner | CG steps | stop | loss after | step time / first |")
  print("|---|---|---|---|---|---|")
  for damping in map(float, _DAMPINGS.value):
    first = None
    for name in _PRECONDITIONERS.value:
      preconditioner, *kfac_options = name.split(":")
      tikhonov = kfac_options[0] if kfac_options else "factored"
      samples = kfac_options[1] if len(kfac_options) > 1 else "1"
      tx = hfjax.hessian_free(
        apply_fn,
        loss_fn,
        preconditioner=preconditioner,
        kfac=hfjax.KFACConfig(tikhonov=tikhonov, num_samples=int(samples)),
        initial_damping=damping,
        max_cg_steps=_MAX_CG_STEPS.value,
      )
      # The batches are arguments, not constants: XLA would fold the K-FAC factors of a
      # constant batch at compile time.
      update = jax.jit(
        lambda g, s, p, b, c, tx=tx: tx.update(g, s, p, batch=b, curvature_batch=c, loss=loss)
      )
      state = tx.init(params)
      args = (grads, state, params, batch, curvature_batch)
      compiled = update.lower(*args).compile()
      start = time.perf_counter()
      _, state = jax.block_until_ready(compiled(*args))
      seconds = time.perf_counter() - start
      first = first or seconds
      info = state.info
      print(
        f"| {damping:g} | {name} | {int(info.cg_steps)} | "
        f"{hfjax.CGStopReason(int(info.cg_stop_reason)).name} | {float(info.loss_after):.2f} | "
        f"{seconds / first:.2f} |"
      )


if __name__ == "__main__":
  app.run(main)
