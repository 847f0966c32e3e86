"""Cost of the K-FAC preconditioner relative to a gradient and to a Gauss-Newton product.

Run as ``python -m benchmarks.bench_kfac``. On the MNIST autoencoder
(:class:`hfjax.experiments.models.DeepAutoencoder` with ``MNIST_ENCODER``, 784-1000-500-250-30
mirrored, sigmoid cross-entropy) and a batch of random [0, 1] images it times, in interleaved
rounds, every function jitted and compiled before timing:

* one K-FAC rebuild, ``kfac_inverse(kfac_factors(...))`` (also its two halves), against one
  gradient of the batch loss;
* one ``kfac_apply`` against one Gauss-Newton product over a linearisation made once: both as
  the slope ``(T(k) - T(1)) / (k - 1)`` of ``lax.fori_loop``\\ s of ``k`` and 1 dependent
  applications (what CG pays per step), so the one-off linearisation is not counted;
* with ``--cg``, the CG steps of one damped Gauss-Newton solve without a preconditioner, with
  Martens' diagonal and with K-FAC (a count, not a time);
* with ``--decompositions``, the inverse of one SPD ``n x n`` matrix by Cholesky, by
  ``jnp.linalg.inv`` and by ``eigh``, the choice behind :func:`hfjax.kfac.kfac_inverse`.

Ratios are formed within each round and their median is printed with its range.

Run it with ``OPENBLAS_NUM_THREADS=1`` on a shared or loaded machine: XLA's CPU Cholesky and
triangular solves call SciPy's OpenBLAS, whose spinning threads made the inverse 10 to 100
times slower at random there (a 1000 x 1000 Cholesky inverse: 33-37 ms single-threaded,
33 ms to 1.8 s with the default threads, under a load of 10 on 2 cores).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import optax
from absl import app, flags

import hfjax
from benchmarks import common
from hfjax import kfac, layers
from hfjax.experiments import models

_BATCH_SIZE = flags.DEFINE_integer("batch-size", 1000, "curvature batch size")
_LOOP = flags.DEFINE_integer("loop", 9, "k: applications per timed loop", lower_bound=2)
_REPEATS = flags.DEFINE_integer("repeats", 7, "interleaved timing rounds")
_DAMPING = flags.DEFINE_float("damping", 1e-2, "damping lambda of the K-FAC inverse")
_DECOMPOSITIONS = flags.DEFINE_bool(
  "decompositions", True, "also time Cholesky, inv and eigh inverses of one n x n matrix"
)
_CG = flags.DEFINE_bool("cg", True, "also count the CG steps of one solve per preconditioner")
_SIZE = flags.DEFINE_integer("size", 1000, "n for --decompositions")
_SEED = flags.DEFINE_integer("seed", 0, "seed of the parameters, the batch and the vector")

MODEL = models.DeepAutoencoder(models.MNIST_ENCODER)
APPLY_FN = models.make_apply_fn(MODEL)
LOSS_FN = models.sigmoid_cross_entropy


def _normalised(v):
  return optax.tree.scale(1.0 / optax.tree.norm(v), v)


def _loop(step, num_steps: int):
  """A jitted ``(operator_args, v) -> v_k``: ``num_steps`` dependent, normalised applications."""

  @jax.jit
  def run(args, v):
    apply = step(*args)
    return jax.lax.fori_loop(0, num_steps, lambda _, u: _normalised(apply(u)), v)

  return run


def _cg_steps(params, batch, layout, inverse, damping: float) -> None:
  """CG steps of one damped Gauss-Newton solve (Martens' stopping rule) per preconditioner."""
  loss = lambda p: LOSS_FN(APPLY_FN(p, batch[0]), batch[1])
  b = optax.tree.scale(-1.0, jax.grad(loss)(params))
  _, sum_g2 = hfjax.squared_gradient_sum(APPLY_FN, LOSS_FN, params, batch)
  martens = optax.tree.scale(1.0 / batch[0].shape[0], sum_g2)

  @jax.jit
  def solve(params, b, inverse, martens):
    matvec = hfjax.gauss_newton_matvec(APPLY_FN, LOSS_FN, params, batch)[0]
    damped = lambda u: optax.tree.add_scale(matvec(u), damping, u)
    preconditioners = {
      "none": None,
      "martens": hfjax.diagonal_preconditioner(martens, damping),
      "kfac": lambda r: kfac.kfac_apply(inverse, r, layout),
    }
    return {
      name: hfjax.cg(damped, b, preconditioner=pre, max_steps=250)
      for name, pre in preconditioners.items()
    }

  results = solve(params, b, inverse, martens)
  print(f"\n## one CG solve of (G + {damping:g} I) x = -grad, Martens' stopping rule, cap 250")
  for name, result in results.items():
    print(f"{name:>10} steps {int(result.num_steps):4d}   phi {float(result.value):.6g}")


def _decomposition_times(n: int, repeats: int) -> None:
  x = jax.random.normal(jax.random.key(0), (2 * n, n))
  matrix = x.T @ x / (2 * n) + 1e-2 * jnp.eye(n)
  inverses = {
    # kfac_inverse's own path: one factor, no damping, a 1 x 1 partner.
    "cholesky": jax.jit(
      lambda m: kfac.kfac_inverse(
        kfac.KFACFactors((m,), (jnp.ones((1, 1)),), (), jnp.ones((), jnp.int32)), 0.0
      ).a_inverses[0]
    ),
    "inv": jax.jit(jnp.linalg.inv),
    "eigh": jax.jit(lambda m: (lambda s, u: (u / s) @ u.T)(*jnp.linalg.eigh(m))),
  }
  samples = common.time_interleaved(
    {k: (lambda f=f: f(matrix)) for k, f in inverses.items()}, repeats
  )
  print(f"\n## inverse of one SPD {n} x {n} float32 matrix, ms: median [min, max]")
  for name, times in samples.items():
    ratio = common.median(times) / common.median(samples["cholesky"])
    print(f"{name:>10} {common.spread(times)}   / cholesky: {ratio:.2f}")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  names = ("batch-size", "loop", "repeats", "damping", "cg", "decompositions", "size", "seed")
  common.print_header(
    "bench_kfac: K-FAC rebuild and apply", {n: flags.FLAGS[n].value for n in names}
  )
  print(f"# OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS', 'unset')}")
  init_key, batch_key, vector_key, sample_key = jax.random.split(jax.random.key(_SEED.value), 4)
  params = MODEL.init(init_key, jnp.zeros((1, 784)))["params"]
  inputs = jax.random.uniform(batch_key, (_BATCH_SIZE.value, 784))
  batch = (inputs, inputs)
  v = _normalised(optax.tree.random_like(vector_key, params))
  layout = layers.find_dense_layers(APPLY_FN, params, inputs)
  print(
    f"# params: {sum(x.size for x in jax.tree.leaves(params)):,}; batch: {_BATCH_SIZE.value}; "
    f"dense layers: {len(layout.layers)}, unmatched leaves: {len(layout.unmatched)}"
  )
  damping, k = _DAMPING.value, _LOOP.value

  grad = jax.jit(jax.grad(lambda p, b: LOSS_FN(APPLY_FN(p, b[0]), b[1])))
  factors_fn = jax.jit(
    lambda p, b, key: kfac.kfac_factors(APPLY_FN, LOSS_FN, p, b, key, layout=layout)
  )
  inverse_fn = jax.jit(kfac.kfac_inverse)
  rebuild = jax.jit(lambda p, b, key: inverse_fn(factors_fn(p, b, key), damping))
  factors = factors_fn(params, batch, sample_key)
  inverse = inverse_fn(factors, damping)

  def gn_step(p, b):
    matvec = hfjax.gauss_newton_matvec(APPLY_FN, LOSS_FN, p, b)[0]
    return lambda u: optax.tree.add_scale(matvec(u), damping, u)

  kfac_step = lambda inv: lambda u: kfac.kfac_apply(inv, u, layout)
  gn_1, gn_k = _loop(gn_step, 1), _loop(gn_step, k)
  kfac_1, kfac_k = _loop(kfac_step, 1), _loop(kfac_step, k)
  fns = {
    "grad": lambda: grad(params, batch),
    "rebuild": lambda: rebuild(params, batch, sample_key),
    "factors": lambda: factors_fn(params, batch, sample_key),
    "inverse": lambda: inverse_fn(factors, damping),
    "gn_loop_1": lambda: gn_1((params, batch), v),
    f"gn_loop_{k}": lambda: gn_k((params, batch), v),
    "kfac_loop_1": lambda: kfac_1((inverse,), v),
    f"kfac_loop_{k}": lambda: kfac_k((inverse,), v),
  }
  samples = common.time_interleaved(fns, _REPEATS.value)
  print("\n## raw times, ms: median [min, max]")
  for name, times in samples.items():
    print(f"{name:>14} {common.spread(times)}")

  def per_round(t):
    return {
      **t,
      "gn_step": (t[f"gn_loop_{k}"] - t["gn_loop_1"]) / (k - 1),
      "kfac_step": (t[f"kfac_loop_{k}"] - t["kfac_loop_1"]) / (k - 1),
    }

  rounds = [per_round({n: ts[r] for n, ts in samples.items()}) for r in range(_REPEATS.value)]
  rows = [
    ("K-FAC rebuild (factors + inverse) / one jitted gradient", "rebuild", "grad"),
    ("  of which factors / one jitted gradient", "factors", "grad"),
    ("  of which inverse / one jitted gradient", "inverse", "grad"),
    ("kfac_apply per application (slope) / GN product per product (slope)", "kfac_step", "gn_step"),
  ]
  fastest = per_round({n: min(ts) for n, ts in samples.items()})
  common.print_ratios(rows, rounds, fastest, width=70)
  if _CG.value:
    _cg_steps(params, batch, layout, inverse, damping)
  if _DECOMPOSITIONS.value:
    _decomposition_times(_SIZE.value, _REPEATS.value)


if __name__ == "__main__":
  app.run(main)
