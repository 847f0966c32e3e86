r"""HF option sets against each other, interleaved step by step so that all see the same load.

Usage::

  OPENBLAS_NUM_THREADS=1 python -m benchmarks.compare_hf_variants --steps 60 \
    --variants='{"factored": {}, "exact": {"kfac": {"tikhonov": "exact"}}}'

On a shared machine, methods run one after another meet different loads, so their times do
not compare. Here every variant takes its step ``k`` before any takes step ``k + 1``, each on
the minibatches its own sampler draws from the same seed (so all see the same batches), and
only the steps are timed. Every ``--eval_every_steps`` steps the table gets each variant's
evaluation loss, its summed step time and its damping: compare the losses at equal steps and,
through the times, at equal time. The problem and the stochastic regime are those of
``benchmarks.compare_optimizers`` (MNIST-sized autoencoder on generated CURVES images; the
gradient and curvature on one minibatch, a second one as ``validation_batch``); each variant's
options are applied over ``--base``.
"""

from __future__ import annotations

import json
import time
from typing import Any

import jax
import jax.numpy as jnp
import optax
from absl import app, flags

import hfjax
from benchmarks import compare_optimizers as co
from hfjax.experiments import models

_STEPS = flags.DEFINE_integer("steps", 60, "Outer HF steps per variant.")
_EVAL_EVERY = flags.DEFINE_integer("eval_every_steps", 5, "Steps between evaluations.")
_BATCH = flags.DEFINE_integer("batch", 1000, "Gradient, curvature and validation batch size.")
_BASE = flags.DEFINE_string(
  "base",
  '{"max_cg_steps": 10, "initial_damping": 1.0, "damping": {"low": 0.0, "high": 0.5}}',
  "JSON keyword arguments of hfjax.hessian_free shared by every variant.",
)
_VARIANTS = flags.DEFINE_string(
  "variants",
  '{"factored": {}, "exact": {"kfac": {"tikhonov": "exact"}}}',
  "JSON object: variant name -> keyword arguments applied over --base.",
)
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the initialisation and the minibatches.")


def _variant(problem: co.Problem, options: dict[str, Any], batch: int, seed: int) -> dict:
  tx = hfjax.hessian_free(problem.apply_fn, models.sigmoid_cross_entropy, **options)
  train_step = co.hf_step(problem, tx)
  sampler = co.index_sampler(problem, seed)
  draws = iter(lambda: sampler.sample_pair(batch, batch) + (sampler.sample(batch),), None)
  params = jax.tree.map(jnp.copy, problem.params)
  state = tx.init(params)
  first = next(draws)
  compiled = jax.jit(train_step).lower(params, state, *first).compile()
  return {"step": compiled, "draws": draws, "next": first, "carry": (params, state), "time": 0.0}


def main(argv: list[str]) -> None:
  del argv
  problem = co.load_problem(
    num_train=20000, data_seed=0, eval_size=10000, seed=_SEED.value, encoder=models.MNIST_ENCODER
  )
  evaluate = co.make_evaluate(problem)
  base = json.loads(_BASE.value)
  variants = {
    name: _variant(problem, co.hf_options(json.dumps({**base, **extra})), _BATCH.value, _SEED.value)
    for name, extra in co.json_object("variants", _VARIANTS.value).items()
  }
  print(
    f"# {jax.devices()[0].platform}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
    f"jax {jax.__version__}; base {base}"
  )
  names = list(variants)
  print("| step | " + " | ".join(f"{n}: loss, s, damping" for n in names) + " |")
  print("|---" * (len(names) + 1) + "|")
  for step in range(1, _STEPS.value + 1):
    for run in variants.values():
      indices = run.pop("next", None) or next(run["draws"])
      start = time.perf_counter()
      run["carry"] = jax.block_until_ready(run["step"](*run["carry"], *indices))
      run["time"] += time.perf_counter() - start
    if step % _EVAL_EVERY.value == 0 or step == _STEPS.value:
      cells = []
      for run in variants.values():
        params, state = run["carry"]
        damping = float(optax.tree.get(state, "damping"))
        cells.append(f"{evaluate(params):.2f}, {run['time']:.0f}, {damping:.3g}")
      print(f"| {step} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
  app.run(main)
