"""Peak memory of one Hessian-free outer step, in parameter vectors.

Compiles the jitted ``hessian_free`` update (gradients, state, params and a batch in; the
step and the new state out) of a ~1M-parameter autoencoder for each L-BFGS memory size ``m``
and number of recorded CG iterates, and reads XLA's ``memory_analysis`` of the program:
temporaries, arguments and outputs. Dividing by the bytes of one parameter vector gives the
memory in parameter vectors, which is what the algorithm's choices change:

- the L-BFGS memory holds ``2 m`` vectors (``s`` and ``y``),
- CG backtracking records the iterates at steps ``ceil(1.3^j)``: all of them
  (``num_recorded_iterates=None``, 20 slots for 250 CG steps) or the newest few,
- CG itself carries ``x``, ``r``, ``p`` and the preconditioned residual.

Nothing runs; only compilation (a few seconds per variant on a CPU).

Usage: ``python -m benchmarks.bench_memory [--batch-size 100] [--max-cg-steps 250]``
"""

from __future__ import annotations

import functools
import itertools

import jax
import numpy as np
from absl import app, flags

import hfjax
from benchmarks import common
from hfjax.experiments import models

# Mirrored: 784-500-250-30-250-500-784, about 1.05M params.
MODEL = models.DeepAutoencoder((500, 250, 30))

_BATCH_SIZE = flags.DEFINE_integer("batch-size", 100, "gradient and curvature batch size")
_MAX_CG_STEPS = flags.DEFINE_integer("max-cg-steps", 250, "hessian_free's max_cg_steps")


def _slots(max_cg_steps: int, num_recorded: int | None) -> int:
  recorded = len(hfjax.martens_record_steps(max_cg_steps)) + 1
  return recorded if num_recorded is None else min(num_recorded, recorded)


def measure(params, batch, *, memory_size, num_recorded, lbfgs_pairs, max_cg_steps):
  """``memory_analysis`` of the compiled update, in bytes."""
  apply_fn = models.make_apply_fn(MODEL)
  loss = functools.partial(common.batch_loss, apply_fn=apply_fn)
  tx = hfjax.hessian_free(
    apply_fn,
    models.sigmoid_cross_entropy,
    preconditioner="lbfgs",
    memory_size=memory_size,
    lbfgs_pairs=lbfgs_pairs,
    num_recorded_iterates=num_recorded,
    max_cg_steps=max_cg_steps,
  )
  state = jax.eval_shape(tx.init, params)

  def update(grads, state, params, batch):
    return tx.update(grads, state, params, batch=batch, loss=loss(params, batch))

  compiled = jax.jit(update).lower(params, state, params, batch).compile()
  stats = compiled.memory_analysis()
  return {
    "temp": stats.temp_size_in_bytes,
    "arguments": stats.argument_size_in_bytes,
    "outputs": stats.output_size_in_bytes,
    "aliased": stats.alias_size_in_bytes,
  }


def main(argv: list[str]) -> None:
  common.check_argv(argv)
  batch_size, max_cg_steps = _BATCH_SIZE.value, _MAX_CG_STEPS.value
  common.print_header(
    "Peak memory of one hessian_free update (compiled memory_analysis)", common.script_flags()
  )

  key = jax.random.key(0)
  params = jax.eval_shape(lambda k: common.init_params(k, MODEL), key)
  batch = jax.eval_shape(lambda k: common.random_batch(k, batch_size), key)
  vector = common.vector_bytes(params)
  batch_bytes = sum(np.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(batch))
  print(
    f"# params: {common.num_params(params):,} (one vector = {vector / 2**20:.2f} MiB); "
    f"batch: {batch_size} x 784 inputs and targets = {batch_bytes / vector:.2f} vectors"
  )
  print(
    "# arguments = grads + params + state (+ batch); outputs = step + state; peak = temp + "
    "arguments + outputs - aliased; all in parameter vectors"
  )
  header = (
    f"| {'L-BFGS pairs':>12} | {'m':>3} | {'recorded':>8} | {'slots':>5} | {'temp':>6} | "
    f"{'args':>6} | {'outputs':>7} | {'peak':>6} | {'peak MiB':>8} |"
  )
  print(header)
  print("|" + "|".join("-" * (len(cell)) for cell in header.split("|")[1:-1]) + "|")
  variants = [
    ("within", m, recorded) for m, recorded in itertools.product((5, 10, 20), (None, 4))
  ] + [("previous", 10, None), ("previous", 10, 4)]
  for lbfgs_pairs, m, recorded in variants:
    stats = measure(
      params,
      batch,
      memory_size=m,
      num_recorded=recorded,
      lbfgs_pairs=lbfgs_pairs,
      max_cg_steps=max_cg_steps,
    )
    peak = stats["temp"] + stats["arguments"] + stats["outputs"] - stats["aliased"]
    print(
      f"| {lbfgs_pairs:>12} | {m:>3} | {str(recorded):>8} | "
      f"{_slots(max_cg_steps, recorded):>5} | {stats['temp'] / vector:>6.1f} | "
      f"{stats['arguments'] / vector:>6.1f} | {stats['outputs'] / vector:>7.1f} | "
      f"{peak / vector:>6.1f} | {peak / 2**20:>8.1f} |",
      flush=True,
    )


if __name__ == "__main__":
  app.run(main)
