"""Data parallelism with JAX's own sharding: a device mesh, a sharded batch, replicated params.

Hessian-free needs no special code for several devices: the jitted update is written for
global arrays, and XLA's SPMD partitioner splits it. With the batch sharded over the mesh
axis ``"data"`` and the parameters (and so the optimizer state) replicated, every forward
pass, Jacobian-vector product and loss Hessian product runs on each device's share of the
examples, and the reductions over examples (the loss mean, the gradient, the ``J^T`` half of
each Gauss-Newton product) become one all-reduce each. Every CG vector is then replicated,
so CG's dot products, the L-BFGS products and the diagonal preconditioners run
locally on each device with no further communication.

Example (one host; the same code runs on one device or many)::

  mesh = hfjax.sharding.make_mesh()                  # all devices on the "data" axis
  params = hfjax.sharding.replicate(params, mesh)
  opt_state = hfjax.sharding.replicate(tx.init(params), mesh)
  step = jax.jit(train_step)                         # unchanged single-device step
  for inputs, targets in batches:
    batch = hfjax.sharding.shard_batch((inputs, targets), mesh)
    params, opt_state = step(params, opt_state, batch)

Large models can also split each parameter (and the state that has its shape, such as the
warm start and the L-BFGS memory) over a second mesh axis ``"model"``::

  mesh = hfjax.sharding.make_mesh((4, 2), ("data", "model"))
  param_shardings = hfjax.sharding.param_sharding(params, mesh, shard_params=True)
  state_shardings = hfjax.sharding.state_sharding(opt_state, params, mesh, shard_params=True)
  params = jax.device_put(params, param_shardings)
  opt_state = jax.device_put(opt_state, state_shardings)
  step = jax.jit(train_step, out_shardings=(param_shardings, state_shardings))

Several hosts: call ``jax.distributed.initialize()`` first on every host (it finds the
coordinator on TPU pods and SLURM/Open MPI clusters; elsewhere pass
``coordinator_address``, ``num_processes`` and ``process_id``). Then ``jax.devices()`` lists
the devices of all hosts, and :func:`make_mesh`, :func:`replicate` and the jitted step are
the same calls on every host. :func:`shard_batch` takes the *global* batch, identical on every
host (each host keeps only its own shards). When each host loads its own share of the data
instead, build the global array from the per-host pieces with
``jax.make_array_from_process_local_data(batch_sharding(mesh), local_leaf)`` for each leaf;
the global batch size is then the local one times ``jax.process_count()``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"
MODEL_AXIS = "model"


def make_mesh(shape: Sequence[int] | None = None, axis_names: Sequence[str] = (DATA_AXIS,)) -> Mesh:
  """A mesh over all devices (of all hosts), e.g. ``(8,)`` on ``("data",)``.

  Args:
    shape: the size of each mesh axis; its product must be the number of devices. ``None``
      puts every device on the first axis (and size 1 on any other).
    axis_names: the axis names; :func:`shard_batch` splits the batch over ``"data"`` and
      :func:`param_sharding` splits parameters over ``"model"``.

  Returns:
    A :class:`jax.sharding.Mesh` whose axes are all of type ``Auto`` (XLA propagates the
    shardings, so the update needs no sharding annotations).
  """
  axis_names = tuple(axis_names)
  devices = jax.devices()
  if not axis_names or len(set(axis_names)) != len(axis_names):
    raise ValueError(f"axis_names must be distinct names, got {axis_names!r}.")
  if shape is None:
    shape = (len(devices),) + (1,) * (len(axis_names) - 1)
  shape = tuple(int(size) for size in shape)
  if len(shape) != len(axis_names):
    raise ValueError(f"mesh shape {shape} and axis_names {axis_names} differ in length.")
  if math.prod(shape) != len(devices):
    raise ValueError(
      f"mesh shape {shape} holds {math.prod(shape)} devices, but there are {len(devices)}; "
      "the product of the shape must equal the device count."
    )
  return jax.make_mesh(shape, axis_names, (AxisType.Auto,) * len(shape), devices=devices)


def _data_size(mesh: Mesh) -> int:
  if DATA_AXIS not in mesh.axis_names:
    raise ValueError(f"the mesh has no {DATA_AXIS!r} axis (axes: {mesh.axis_names}).")
  return mesh.shape[DATA_AXIS]


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Splits the leading (example) axis over the mesh axis ``"data"``; replicated elsewhere."""
  _data_size(mesh)
  return NamedSharding(mesh, P(DATA_AXIS))


def shard_batch(batch: Any, mesh: Mesh) -> Any:
  """Places every leaf of ``batch`` with its examples split over the ``"data"`` axis.

  Args:
    batch: a pytree of arrays with a common leading example axis, e.g. ``(inputs, targets)``;
      the global batch (the same on every host).
    mesh: from :func:`make_mesh`.

  Returns:
    The batch as global ``jax.Array``\\ s sharded by :func:`batch_sharding`.

  Raises:
    ValueError: when a leaf has no leading axis or its size is not a multiple of the
      ``"data"`` axis size (pad or drop examples, or pick batch sizes that divide).
  """
  data = _data_size(mesh)
  sharding = batch_sharding(mesh)
  leaves_with_paths = jax.tree_util.tree_leaves_with_path(batch)
  if not leaves_with_paths:
    raise ValueError("batch is empty: it holds no arrays.")
  for path, leaf in leaves_with_paths:
    shape = np.shape(leaf)
    name = f"batch leaf {jax.tree_util.keystr(path)}" if path else "batch"
    if not shape:
      raise ValueError(f"{name} is a scalar; it needs a leading example axis.")
    if shape[0] % data:
      raise ValueError(
        f"{name} has {shape[0]} examples, not divisible by the {data} devices of the "
        f"{DATA_AXIS!r} axis; pad or drop examples, or choose a batch size that divides."
      )
  return jax.device_put(batch, sharding)


def replicate(tree: Any, mesh: Mesh) -> Any:
  """A full copy of every leaf of ``tree`` on every device of ``mesh`` (PRNG keys included)."""
  return jax.device_put(tree, NamedSharding(mesh, P()))


def _spec(shape: tuple[int, ...], model: int) -> P:
  """Splits the largest axis that ``model`` divides (the last of equal ones) over "model"."""
  divisible = [axis for axis, size in enumerate(shape) if size >= model and size % model == 0]
  if model <= 1 or not divisible:
    return P()
  axis = max(divisible, key=lambda a: (shape[a], a))
  return P(*([None] * axis + [MODEL_AXIS]))


def _model_size(mesh: Mesh, shard_params: bool) -> int:
  return mesh.shape[MODEL_AXIS] if shard_params and MODEL_AXIS in mesh.axis_names else 1


def param_sharding(params: Any, mesh: Mesh, shard_params: bool = False) -> Any:
  """A pytree of :class:`~jax.sharding.NamedSharding` for ``params``.

  Args:
    params: the parameters (arrays or ``jax.ShapeDtypeStruct``\\ s).
    mesh: from :func:`make_mesh`.
    shard_params: ``False`` replicates every leaf (plain data parallelism). ``True``, on a
      mesh with a ``"model"`` axis, splits each leaf along its largest axis whose size the
      ``"model"`` axis divides (the last of equally large ones); leaves with no such axis
      stay replicated.

  Returns:
    Shardings with the structure of ``params``, for ``jax.device_put`` or ``jax.jit``'s
    ``in_shardings`` / ``out_shardings``.
  """
  model = _model_size(mesh, shard_params)
  return jax.tree.map(lambda leaf: NamedSharding(mesh, _spec(np.shape(leaf), model)), params)


def state_sharding(opt_state: Any, params: Any, mesh: Mesh, shard_params: bool = False) -> Any:
  """Shardings for an optimizer state that follow :func:`param_sharding` of ``params``.

  A state leaf shaped like a parameter (the warm start) is split like that parameter; one
  shaped ``(m, *parameter_shape)`` (a stacked memory such as the L-BFGS pairs) is split the
  same way along its trailing axes, so each device holds the pairs of its own parameter
  slice. Everything else (scalars, PRNG keys, schedule state) is replicated.

  Args:
    opt_state: the optimizer state, e.g. ``tx.init(params)``.
    params: the parameters it belongs to.
    mesh: from :func:`make_mesh`.
    shard_params: as in :func:`param_sharding`.

  Returns:
    Shardings with the structure of ``opt_state``.
  """
  model = _model_size(mesh, shard_params)
  shapes = {tuple(np.shape(leaf)) for leaf in jax.tree.leaves(params)}

  def sharding(leaf):
    shape = tuple(np.shape(leaf))
    if jax.dtypes.issubdtype(getattr(leaf, "dtype", None), jax.dtypes.prng_key):
      spec = P()
    elif shape in shapes:
      spec = _spec(shape, model)
    elif shape[1:] in shapes:
      spec = P(None, *_spec(shape[1:], model))
    else:
      spec = P()
    return NamedSharding(mesh, spec)

  return jax.tree.map(sharding, opt_state)
