"""Shared pieces of the hfjax benchmarks: the MNIST-shaped deep autoencoder and timing helpers.

The model is Hinton & Salakhutdinov's MNIST autoencoder as used by Martens (2010):
784-1000-500-250-30, mirrored, logistic hidden units, a linear 30-unit code layer, and a
sigmoid cross-entropy loss summed over the 784 pixels and averaged over the batch. Weights use
Martens' sparse initialisation (15 non-zero N(0, 1) incoming weights per unit, zero biases).

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
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

import hfjax

MNIST_ENCODER = (784, 1000, 500, 250, 30)


def layer_sizes(encoder: Sequence[int] = MNIST_ENCODER) -> tuple[int, ...]:
  """The encoder sizes followed by their mirror image: 784-...-30-...-784 for MNIST."""
  return tuple(encoder) + tuple(reversed(encoder[:-1]))


def init_autoencoder(
  key: jax.Array,
  encoder: Sequence[int] = MNIST_ENCODER,
  *,
  num_nonzero: int = 15,
  dtype: Any = jnp.float32,
) -> list[dict[str, jax.Array]]:
  """Sparse initialisation: each unit gets ``num_nonzero`` N(0, 1) incoming weights.

  Returns a list of ``{"w": (fan_in, fan_out), "b": (fan_out,)}`` layers with zero biases.
  """
  sizes = layer_sizes(encoder)
  params = []
  for layer_key, fan_in, fan_out in zip(
    jax.random.split(key, len(sizes) - 1), sizes[:-1], sizes[1:], strict=True
  ):
    pick_key, value_key = jax.random.split(layer_key)
    # A random rank per incoming connection; the num_nonzero smallest of each unit survive.
    scores = jax.random.uniform(pick_key, (fan_in, fan_out))
    kth = jnp.sort(scores, axis=0)[min(num_nonzero, fan_in) - 1]
    weights = jax.random.normal(value_key, (fan_in, fan_out), dtype)
    params.append(
      {"w": jnp.where(scores <= kth, weights, 0).astype(dtype), "b": jnp.zeros((fan_out,), dtype)}
    )
  return params


def autoencoder_apply(params: list[dict[str, jax.Array]], inputs: jax.Array) -> jax.Array:
  """Output logits of the autoencoder; the code layer (the middle one) is linear."""
  code_layer = len(params) // 2 - 1
  h = inputs
  for i, layer in enumerate(params):
    h = h @ layer["w"] + layer["b"]
    if i != code_layer and i != len(params) - 1:
      h = jax.nn.sigmoid(h)
  return h


def sigmoid_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Binary cross-entropy of ``sigmoid(logits)``, summed over pixels, mean over the batch."""
  per_pixel = jax.nn.softplus(logits) - targets * logits
  return jnp.mean(jnp.sum(per_pixel, axis=-1))


def batch_loss(params: Any, batch: tuple[jax.Array, jax.Array]) -> jax.Array:
  """The autoencoder loss on ``batch = (inputs, targets)``."""
  inputs, targets = batch
  return sigmoid_cross_entropy(autoencoder_apply(params, inputs), targets)


def random_batch(key: jax.Array, size: int, dim: int = 784) -> tuple[jax.Array, jax.Array]:
  """Uniform [0, 1] float32 inputs with targets equal to the inputs."""
  inputs = jax.random.uniform(key, (size, dim), jnp.float32)
  return inputs, inputs


def setup(seed: int = 0, batch_size: int = 1000):
  """Params, a curvature batch and a random unit-norm vector shaped like the params."""
  init_key, batch_key, vector_key = jax.random.split(jax.random.key(seed), 3)
  params = init_autoencoder(init_key)
  batch = random_batch(batch_key, batch_size)
  v = optax.tree.random_like(vector_key, params)
  v = optax.tree.scale(1.0 / optax.tree.norm(v), v)
  return params, batch, v


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


def matvec_loop(num_matvecs: int, *, exact_hessian: bool = False, damping: float = 0.0):
  """A jitted ``(params, batch, v) -> v_k``: one linearisation, then ``num_matvecs`` products.

  Each product is applied to the normalised previous one (a power iteration), so no product
  is loop-invariant and XLA cannot hoist it; the normalisation costs two cheap vector passes.
  """
  build = hessian_matvec if exact_hessian else gn_matvec

  @jax.jit
  def run(params, batch, v):
    matvec = build(params, batch)

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


def print_header(title: str, args: Any) -> None:
  print(f"# {title}")
  print(f"# {machine_description()}")
  print(f"# flags: {vars(args)}")
