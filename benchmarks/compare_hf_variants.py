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
options are applied over ``--base``. A variant may also set ``"batches": {"gradient": g,
"curvature": c, "validation": v}`` (each ``--batch`` unless set; ``validation`` 0 for none): the
curvature batch is then the first ``c`` examples of the gradient batch. ``"growth": factor``
grows each of those sizes by ``factor`` per step up to the training set, as
:func:`hfjax.geometric_schedule` (grid ratio 2) would; ``"variance_test": theta`` lets the
optimizer's :func:`hfjax.variance_test_schedule` choose the gradient batch's size (read with
:func:`hfjax.sample_sizes`), and the curvature batch is the whole gradient batch;
``"held_out_growth": factor`` lets :func:`hfjax.held_out_schedule` grow both after steps that
raise the held-out loss significantly. Each new size is compiled off the clock.
"""

from __future__ import annotations

import json
import math
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
_SECONDS = flags.DEFINE_float(
  "seconds", 0.0, "Stop each variant once its steps took this long in all (0: no limit)."
)
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


_BATCH_KINDS = ("gradient", "curvature", "validation")


def _variant(problem: co.Problem, options: dict[str, Any], batch: int, seed: int) -> dict:
  sizes = {kind: batch for kind in _BATCH_KINDS} | options.pop("batches", {})
  if set(sizes) != set(_BATCH_KINDS):
    raise ValueError(f"batches takes the keys {_BATCH_KINDS}; got {sorted(sizes)}.")
  num_train, growth = problem.train.shape[0], options.pop("growth", 1.0)
  schedules = {
    kind: hfjax.geometric_schedule(size, num_train, growth) for kind, size in sizes.items() if size
  }
  targets = {kind: schedule.start for kind, schedule in schedules.items()}
  theta = options.pop("variance_test", None)
  if theta is not None:
    options["gradient_schedule"] = hfjax.variance_test_schedule(sizes["gradient"], num_train, theta)
    options["curvature_schedule"] = hfjax.fixed_schedule(sizes["curvature"])
  held_out = options.pop("held_out_growth", None)
  if held_out is not None:
    for kind in ("gradient", "curvature"):
      schedule = hfjax.held_out_schedule(sizes[kind], num_train, held_out)
      options[f"{kind}_schedule"] = schedule
  tx = hfjax.hessian_free(problem.apply_fn, models.sigmoid_cross_entropy, **options)
  sampler = co.index_sampler(problem, seed)

  def draw(carry):
    now = {kind: schedules[kind].round_up(target) for kind, target in targets.items()}
    for kind, target in targets.items():
      targets[kind] = schedules[kind].grow(target)
    if theta is not None:  # the size the variance test chose in the last step, for both
      now["gradient"] = now["curvature"] = hfjax.sample_sizes(carry[1])[0]
    if held_out is not None:
      now["gradient"], now["curvature"] = hfjax.sample_sizes(carry[1])
    pair = sampler.sample_pair(now["gradient"], now["curvature"])
    return pair + ((sampler.sample(now["validation"]),) if "validation" in now else ())

  params = jax.tree.map(jnp.copy, problem.params)
  return {
    "step": jax.jit(co.hf_step(problem, tx)),
    "compiled": {},
    "draw": draw,
    "carry": (params, tx.init(params)),
    "time": 0.0,
  }


def _compiled_step(run: dict, indices: tuple) -> Any:
  """The variant's step compiled for these batch sizes (compiling it now, off the clock)."""
  shapes = tuple(i.shape for i in indices)
  if shapes not in run["compiled"]:
    run["compiled"][shapes] = run["step"].lower(*run["carry"], *indices).compile()
  return run["compiled"][shapes]


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
  print("| step | " + " | ".join(f"{n}: loss, s, damping, batch" for n in names) + " |")
  print("|---" * (len(names) + 1) + "|")
  for step in range(1, _STEPS.value + 1):
    running = [run for run in variants.values() if run["time"] < (_SECONDS.value or math.inf)]
    if not running:
      break
    for run in running:
      indices = run["draw"](run["carry"])
      compiled = _compiled_step(run, indices)
      run["batch"] = indices[0].shape[0]
      start = time.perf_counter()
      run["carry"] = jax.block_until_ready(compiled(*run["carry"], *indices))
      run["time"] += time.perf_counter() - start
    done = all(run["time"] >= (_SECONDS.value or math.inf) for run in variants.values())
    if step % _EVAL_EVERY.value == 0 or step == _STEPS.value or done:
      cells = []
      for run in variants.values():
        params, state = run["carry"]
        damping = float(optax.tree.get(state, "damping"))
        cells.append(f"{evaluate(params):.2f}, {run['time']:.0f}, {damping:.3g}, {run['batch']}")
      print(f"| {step} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
  app.run(main)
