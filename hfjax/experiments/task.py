"""The task a config names: its data set, its model, the matching loss and the reported error."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.flatten_util import ravel_pytree

from hfjax.experiments import datasets, models
from hfjax.experiments.config import require


class Task(NamedTuple):
  """A data set with a model, its matching loss and its reported error."""

  data: datasets.Dataset
  apply_fn: Callable[[Any, Any], Any]
  loss_fn: Callable[[Any, Any], jax.Array]
  error_fn: Callable[[Any, Any], jax.Array]
  params: Any
  unravel: Callable[[Any], Any]


def _float_dtype(config: ml_collections.ConfigDict) -> type:
  return np.float64 if config.float64 else np.float32


def _load_data(config: ml_collections.ConfigDict) -> datasets.Dataset:
  kwargs = {k: v for k, v in config.dataset.items() if k != "name"}
  if config.dataset.name == "mnist":
    require(
      kwargs.get("path") is not None,
      "the mnist dataset needs a path: pass --config.dataset.path=/path/to/mnist.npz "
      "(or a directory of the IDX files).",
    )
  data = datasets.load(config.dataset.name, **kwargs)
  dtype = _float_dtype(config)
  if data.x_train.dtype != dtype:
    cast = {k: getattr(data, k) for k in ("x_train", "y_train", "x_test", "y_test")}
    cast = {k: v.astype(dtype) if v.dtype.kind == "f" else v for k, v in cast.items()}
    data = data._replace(**cast)
  require(len(data.x_train) > 0 and len(data.x_test) > 0, "the dataset has no train or test data.")
  return data


def _classification_error(logits: jax.Array, labels: jax.Array) -> jax.Array:
  return jnp.mean(jnp.argmax(logits, axis=-1) != labels)


def load_task(config: ml_collections.ConfigDict) -> Task:
  """The data set, model, loss and initial parameters named by the config."""
  data = _load_data(config)
  dtype = _float_dtype(config)
  kernel_init = models.sparse_init(config.model.init_nonzero, config.model.init_scale)
  if config.model.kind == "autoencoder":
    require(
      data.y_train.ndim == 2,
      f"dataset {config.dataset.name!r} has labels, not images to reconstruct "
      "(set config.dataset.autoencoder=True).",
    )
    module = models.DeepAutoencoder(tuple(config.model.encoder_sizes), kernel_init=kernel_init)
    loss_fn, error_fn = models.sigmoid_cross_entropy, models.reconstruction_error
  else:
    require(data.y_train.ndim == 1, f"dataset {config.dataset.name!r} has no class labels.")
    num_classes = int(max(data.y_train.max(), data.y_test.max())) + 1
    module = models.MLPClassifier(
      tuple(config.model.hidden_sizes),
      num_classes,
      activation=config.model.activation,
      kernel_init=kernel_init,
    )
    loss_fn, error_fn = models.softmax_cross_entropy, _classification_error
  params = module.init(jax.random.key(config.seed), jnp.zeros((1, data.x_train.shape[1]), dtype))
  params = jax.tree.map(lambda p: p.astype(dtype), params["params"])
  module_apply = models.make_apply_fn(module)
  if config.flatten_params:
    # One flat parameter vector instead of a pytree: the CG loop's vector arithmetic is then
    # one op per step instead of one per leaf, and XLA compiles the HF step of the CURVES
    # autoencoder (24 leaves) 3-4x faster on CPU. The mathematics is the same.
    flat, unravel = ravel_pytree(params)
    return Task(data, lambda p, x: module_apply(unravel(p), x), loss_fn, error_fn, flat, unravel)
  return Task(data, module_apply, loss_fn, error_fn, params, lambda p: p)


def batch_loss(task: Task) -> Callable[[Any, Any], jax.Array]:
  """``loss(params, batch)`` of the task on ``batch = (inputs, targets)``."""

  def loss(params, batch):
    inputs, targets = batch
    return task.loss_fn(task.apply_fn(params, inputs), targets)

  return loss
