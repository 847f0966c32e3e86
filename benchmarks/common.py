"""Shared pieces of the hfjax benchmarks: the MNIST deep autoencoder and timing helpers.

The model is :class:`hfjax.experiments.models.DeepAutoencoder` with
:data:`~hfjax.experiments.models.MNIST_ENCODER`, the autoencoder of Hinton & Salakhutdinov as
used by Martens (2010): 784-1000-500-250-30, mirrored, logistic hidden units, a linear 30-unit
code layer, and :func:`~hfjax.experiments.models.sigmoid_cross_entropy` summed over the 784
pixels and averaged over the batch. Weights use the experiments' Martens sparse
initialisation (:func:`~hfjax.experiments.models.sparse_init`: 15 non-zero N(0, 1) incoming
weights per unit, zero biases); the parameters are the module's Flax params dict.

Timings follow one recipe everywhere: every variant is compiled and run once before timing,
repetitions are interleaved (each round runs every variant once, in a rotated order, so slow
spells of the shared machine hit all of them alike), every call ends in
``jax.block_until_ready``, and the median over rounds is reported.
"""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
from absl import flags

import hfjax
from hfjax import precision
from hfjax.experiments import models
from hfjax.experiments.cli import check_argv as check_argv

INPUT_SIZE = 784
MODEL = models.DeepAutoencoder(models.MNIST_ENCODER)
autoencoder_apply = models.make_apply_fn(MODEL)
sigmoid_cross_entropy = models.sigmoid_cross_entropy


def init_params(
  key: jax.Array, model: models.DeepAutoencoder = MODEL, dtype: Any = jnp.float32
) -> dict[str, Any]:
  """The Flax params of ``model`` (sparse kernels, zero biases) for 784-pixel inputs."""
  return model.init(key, jnp.zeros((1, INPUT_SIZE), dtype))["params"]


def batch_loss(
  params: Any,
  batch: tuple[jax.Array, jax.Array],
  apply_fn: Callable[[Any, jax.Array], jax.Array] = autoencoder_apply,
) -> jax.Array:
  """The autoencoder loss on ``batch = (inputs, targets)``."""
  inputs, targets = batch
  return sigmoid_cross_entropy(apply_fn(params, inputs), targets)


def random_batch(key: jax.Array, size: int, dim: int = INPUT_SIZE) -> tuple[jax.Array, jax.Array]:
  """Uniform [0, 1] float32 inputs with targets equal to the inputs."""
  inputs = jax.random.uniform(key, (size, dim), jnp.float32)
  return inputs, inputs


def setup(seed: int = 0, batch_size: int = 1000):
  """Params, a curvature batch and a random unit-norm vector shaped like the params."""
  init_key, batch_key, vector_key = jax.random.split(jax.random.key(seed), 3)
  params = init_params(init_key)
  batch = random_batch(batch_key, batch_size)
  return params, batch, _normalised(optax.tree.random_like(vector_key, params))


def vector_bytes(tree: Any) -> int:
  """Bytes of one vector shaped like ``tree``."""
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def num_params(tree: Any) -> int:
  return sum(x.size for x in jax.tree.leaves(tree))


def gn_matvec(params: Any, batch: Any):
  """The Gauss-Newton product ``v -> G v`` of the autoencoder loss (linearised once)."""
  return hfjax.gauss_newton_matvec(autoencoder_apply, sigmoid_cross_entropy, params, batch)[0]


def hessian_matvec(params: Any, batch: Any):
  """The exact Hessian product ``v -> H v`` of the autoencoder loss."""
  return hfjax.hessian_matvec(autoencoder_apply, sigmoid_cross_entropy, params, batch)[0]


def _normalised(v: Any) -> Any:
  return optax.tree.scale(1.0 / optax.tree.norm(v), v)


def matvec_loop(
  num_matvecs: int, *, exact_hessian: bool = False, damping: float = 0.0, matmul_dtype=None
):
  """A jitted ``(params, batch, v) -> v_k``: one linearisation, then ``num_matvecs`` products.

  Each product is applied to the normalised previous one (a power iteration), so no product
  is loop-invariant and XLA cannot hoist it; the normalisation costs two cheap vector passes.
  ``matmul_dtype`` rounds the products' matrix-product operands as ``hessian_free``'s
  ``curvature_matmul_dtype`` does.
  """
  build = hessian_matvec if exact_hessian else gn_matvec

  @jax.jit
  def run(params, batch, v):
    matvec = build(params, batch)
    if matmul_dtype is not None:
      matvec = precision.reduced_precision_dots(matvec, matmul_dtype)

    def body(_, u):
      return _normalised(optax.tree.add_scale(matvec(u), damping, u))

    return jax.lax.fori_loop(0, num_matvecs, body, v)

  return run


def gradient_loop(num_gradients: int):
  """A jitted ``(params, batch) -> params_k``: ``num_gradients`` dependent gradient steps.

  Each gradient is taken at params moved by a tiny step along the previous one, so none is
  loop-invariant; the update costs one cheap vector pass.
  """
  grad_fn = jax.grad(batch_loss)

  @jax.jit
  def run(params, batch):
    def body(_, p):
      return optax.tree.add_scale(p, -1e-7, grad_fn(p, batch))

    return jax.lax.fori_loop(0, num_gradients, body, params)

  return run


def time_interleaved(
  fns: dict[str, Callable[[], Any]], repeats: int, *, warmup: int = 1
) -> dict[str, list[float]]:
  """Seconds per call of each zero-argument function, over ``repeats`` interleaved rounds.

  Every function runs ``warmup`` times first (this is where jit compiles), so compile time is
  never timed.
  """
  for fn in fns.values():
    for _ in range(warmup):
      jax.block_until_ready(fn())
  names = list(fns)
  samples: dict[str, list[float]] = {name: [] for name in names}
  for round_index in range(repeats):
    shift = round_index % len(names)
    for name in names[shift:] + names[:shift]:
      start = time.perf_counter()
      jax.block_until_ready(fns[name]())
      samples[name].append(time.perf_counter() - start)
  return samples


def median(samples: Sequence[float]) -> float:
  return statistics.median(samples)


def spread(samples: Sequence[float]) -> str:
  """``median [min, max]`` in milliseconds."""
  return f"{1e3 * median(samples):9.1f} [{1e3 * min(samples):.1f}, {1e3 * max(samples):.1f}]"


def print_ratios(
  rows: Sequence[tuple[str, str, str]],
  rounds: Sequence[dict[str, float]],
  fastest: dict[str, float],
  width: int = 70,
) -> None:
  """Prints each ``(label, numerator, denominator)`` row as the median [min, max] of the
  ratio formed within each round, then the ratio of the two fastest times."""
  print(
    "\n## ratios: median [min, max] of the ratio formed within each round; then the ratio of"
    "\n## each variant's fastest time (least disturbed by other load)"
  )
  for label, numerator, denominator in rows:
    values = [r[numerator] / r[denominator] for r in rounds]
    print(
      f"{label:<{width}} {median(values):6.3f} [{min(values):.3f}, {max(values):.3f}]"
      f"  fastest: {fastest[numerator] / fastest[denominator]:.3f}"
    )


def machine_description() -> str:
  """One line with the date, host, core count and load, jax version and device."""
  now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
  device = jax.devices()[0]
  load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
  return (
    f"{now}; {platform.machine()} {platform.processor() or platform.system()}, "
    f"{os.cpu_count()} cores visible, load average {load}; python {platform.python_version()}; "
    f"jax {jax.__version__}; device {device.platform}:{device.device_kind}"
  )


def script_flags() -> dict[str, Any]:
  """The values of the absl flags that the running script defines."""
  return {flag.name: flag.value for flag in flags.FLAGS.get_key_flags_for_module(sys.argv[0])}


def print_header(title: str, args: Any) -> None:
  """Prints the title, the machine and ``args``: a mapping of flags or an argparse namespace."""
  print(f"# {title}")
  print(f"# {machine_description()}")
  print(f"# flags: {dict(args) if isinstance(args, Mapping) else vars(args)}")
