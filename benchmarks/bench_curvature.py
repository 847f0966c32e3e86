"""Cost of a Gauss-Newton (and exact Hessian) vector product relative to one gradient.

Run as ``python -m benchmarks.bench_curvature``. On the MNIST autoencoder (784-1000-500-250-30,
mirrored) with a batch of random [0, 1] inputs it times, in interleaved rounds:

* one jitted gradient of the batch loss, alone and as ``k`` dependent gradients in one
  ``lax.fori_loop``;
* one jitted ``(params, batch, v) -> G v`` (linearise, then one product) and ``k`` products
  over one linearisation in a ``lax.fori_loop`` (what CG pays per step);
* the same for :func:`hfjax.hessian_matvec`;
* the loops of Gauss-Newton products again with their matrix-product operands rounded to
  bfloat16 (``hessian_free(..., curvature_matmul_dtype=jnp.bfloat16)``).

The per-product cost is the slope ``(T(k) - T(1)) / (k - 1)`` of the loops, which removes the
one-off linearisation; the linearisation is ``T(linearise + 1 product) - slope``. Every ratio
is formed within one round (so a slow spell of the shared machine scales numerator and
denominator alike) and the median over rounds is printed with its range.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from absl import app, flags

from benchmarks import common

_BATCH_SIZE = flags.DEFINE_integer("batch-size", 1000, "curvature batch size")
_LOOP = flags.DEFINE_integer(
  "loop", 9, "k: products per timed loop (the slope needs two loop lengths)", lower_bound=2
)
_REPEATS = flags.DEFINE_integer("repeats", 7, "interleaved timing rounds")
_NO_HESSIAN = flags.DEFINE_bool("no-hessian", False, "skip the exact Hessian")
_SEED = flags.DEFINE_integer("seed", 0, "seed of the parameters, the batch and the vector")


def main(argv: list[str]) -> None:
  common.check_argv(argv)
  common.print_header("bench_curvature: curvature-vector product / gradient", common.script_flags())
  params, batch, v = common.setup(_SEED.value, _BATCH_SIZE.value)
  print(f"# params: {common.num_params(params):,}; batch: {_BATCH_SIZE.value}; float32")

  k, repeats, no_hessian = _LOOP.value, _REPEATS.value, _NO_HESSIAN.value
  grad = jax.jit(jax.grad(common.batch_loss))
  grad_1, grad_k = common.gradient_loop(1), common.gradient_loop(k)
  gn_once = jax.jit(lambda p, b, u: common.gn_matvec(p, b)(u))
  gn_1, gn_k = common.matvec_loop(1), common.matvec_loop(k)
  fns = {
    "grad": lambda: grad(params, batch),
    "grad_loop_1": lambda: grad_1(params, batch),
    f"grad_loop_{k}": lambda: grad_k(params, batch),
    "gn_once": lambda: gn_once(params, batch, v),
    "gn_loop_1": lambda: gn_1(params, batch, v),
    f"gn_loop_{k}": lambda: gn_k(params, batch, v),
  }
  bf_1, bf_k = (common.matvec_loop(n, matmul_dtype=jnp.bfloat16) for n in (1, k))
  fns |= {
    "bf16_loop_1": lambda: bf_1(params, batch, v),
    f"bf16_loop_{k}": lambda: bf_k(params, batch, v),
  }
  if not no_hessian:
    h_once = jax.jit(lambda p, b, u: common.hessian_matvec(p, b)(u))
    h_1, h_k = common.matvec_loop(1, exact_hessian=True), common.matvec_loop(k, exact_hessian=True)
    fns |= {
      "hess_once": lambda: h_once(params, batch, v),
      "hess_loop_1": lambda: h_1(params, batch, v),
      f"hess_loop_{k}": lambda: h_k(params, batch, v),
    }
  samples = common.time_interleaved(fns, repeats)

  print("\n## raw times, ms: median [min, max]")
  for name, times in samples.items():
    print(f"{name:>14} {common.spread(times)}")

  def per_round(t):
    """Per-product and one-off costs of one round, seconds."""
    costs = {
      "grad": t["grad"],
      "grad_loop": t[f"grad_loop_{k}"],
      "grad_step": (t[f"grad_loop_{k}"] - t["grad_loop_1"]) / (k - 1),
    }
    for prefix in ("gn", "hess")[: 1 if no_hessian else 2]:
      step = (t[f"{prefix}_loop_{k}"] - t[f"{prefix}_loop_1"]) / (k - 1)
      costs |= {
        f"{prefix}_step": step,
        f"{prefix}_once": t[f"{prefix}_once"],
        f"{prefix}_linearise": t[f"{prefix}_once"] - step,
        f"{prefix}_loop": t[f"{prefix}_loop_{k}"],
      }
    costs["bf16_step"] = (t[f"bf16_loop_{k}"] - t["bf16_loop_1"]) / (k - 1)
    costs["bf16_loop"] = t[f"bf16_loop_{k}"]
    return costs

  rounds = [per_round({n: ts[r] for n, ts in samples.items()}) for r in range(repeats)]
  fastest = per_round({n: min(ts) for n, ts in samples.items()})
  rows = [
    ("gradient per step of a loop (slope) / one jitted gradient", "grad_step", "grad"),
    ("GN matvec per product (slope) / gradient per step (slope)", "gn_step", "grad_step"),
    ("GN matvec per product (slope) / one jitted gradient", "gn_step", "grad"),
    (f"GN loop of {k} / gradient loop of {k} (linearisation amortised)", "gn_loop", "grad_loop"),
    ("GN linearise + 1 matvec (one jit) / one jitted gradient", "gn_once", "grad"),
    ("GN one-off linearisation (once - slope) / one jitted gradient", "gn_linearise", "grad"),
    ("GN per product, bfloat16 operands / float32 (slopes)", "bf16_step", "gn_step"),
    (f"GN loop of {k}, bfloat16 operands / float32", "bf16_loop", "gn_loop"),
  ]
  if not no_hessian:
    rows += [
      ("Hessian matvec per product (slope) / gradient per step (slope)", "hess_step", "grad_step"),
      ("Hessian linearise + 1 matvec (one jit) / one jitted gradient", "hess_once", "grad"),
      ("Hessian one-off linearisation / one jitted gradient", "hess_linearise", "grad"),
      ("Hessian per product / GN per product (slopes)", "hess_step", "gn_step"),
    ]

  common.print_ratios(rows, rounds, fastest, width=68)

  amortised = common.median([c["gn_step"] / c["grad_step"] for c in rounds])
  verdict = "met" if amortised <= 1.35 else "MISSED"
  print(f"\ngoal: amortised GN matvec / gradient <= 1.35: {amortised:.3f} -> {verdict}")


if __name__ == "__main__":
  app.run(main)
