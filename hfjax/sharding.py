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
  params = hfjax.sharding.place(params, param_shardings)
  opt_state = hfjax.sharding.place(opt_state, state_shardings)
  step = jax.jit(train_step, out_shardings=(param_shardings, state_shardings))

Several processes (JAX's multi-controller runtime: one process per host, or per GPU): call
``jax.distributed.initialize()`` first in every process (it finds the coordinator on TPU pods
and under SLURM or Open MPI; elsewhere pass ``coordinator_address``, ``num_processes`` and
``process_id``). Then ``jax.devices()`` lists the devices of all processes, and every process
runs the same program: :func:`make_mesh`, :func:`replicate` (and :func:`place`) and the jitted
step are the same calls as above. Each process builds only the shards on its own devices (a
global array cannot be ``jax.device_put`` from one process), so what it passes must be the same
on every process: the same initial parameters (the same seed) and state; :func:`replicate` and
:func:`place` check that, and raise naming the leaves that differ. The batch comes in either
of two forms:

- the *global* batch, identical on every process: :func:`shard_batch` (the call above), each
  process keeping only its own examples;
- each process's own share, loaded by that process only: :func:`shard_local_batch` joins the
  shares along the example axis, in the order that :func:`local_share` gives each process
  (process order on CPUs; on GPUs and TPUs :func:`make_mesh` orders devices by topology).
  The global batch size is then the local one times the number of shares
  (``jax.process_count()`` for the mesh of :func:`make_mesh`)::

    jax.distributed.initialize()
    mesh = hfjax.sharding.make_mesh()
    params = hfjax.sharding.replicate(init_params(seed=0), mesh)  # same seed everywhere
    opt_state = hfjax.sharding.replicate(tx.init(params), mesh)
    index, count = hfjax.sharding.local_share(mesh)
    for inputs, targets in my_share_of_the_batches(index, count):
      batch = hfjax.sharding.shard_local_batch((inputs, targets), mesh)
      params, opt_state = step(params, opt_state, batch)

Results come back as global arrays: a replicated one is read on any process with
``np.asarray(x.addressable_data(0))``, a sharded one with
``jax.experimental.multihost_utils.process_allgather``; only one process should write files.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
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


def _data_places(mesh: Mesh) -> dict[int, tuple[int, ...]]:
  """The places on the ``"data"`` axis that hold devices of each process, by process index."""
  _data_size(mesh)
  axis = mesh.axis_names.index(DATA_AXIS)
  places = {}
  for index, device in np.ndenumerate(mesh.devices):
    places.setdefault(device.process_index, set()).add(index[axis])
  return {process: tuple(sorted(held)) for process, held in places.items()}


def local_share(mesh: Mesh) -> tuple[int, int]:
  """``(index, count)``: which share of each global batch this process loads.

  For :func:`shard_local_batch`: the global batch is ``count`` equal shares and this process
  passes share ``index``, e.g. examples ``index * n // count`` to ``(index + 1) * n // count``
  of a global batch of ``n``. Shares follow the processes' places on the ``"data"`` axis, so
  processes that share places (a ``"model"`` axis across them) get the same index, and
  ``count`` is ``jax.process_count()`` for the mesh of :func:`make_mesh`. With one process,
  ``(0, 1)``. (When a process's places on ``"data"`` are not contiguous, as some TPU meshes
  lay them out, the shares still make up the batch, with its examples in another order.)

  Args:
    mesh: from :func:`make_mesh`.

  Returns:
    This process's share index and the number of shares.
  """
  places = _data_places(mesh)
  shares = sorted(set(places.values()))
  return shares.index(places[jax.process_index()]), len(shares)


def _check_batch(batch: Any, parts: int, what: str) -> None:
  """Every leaf of ``batch`` has a leading example axis that ``parts`` divides."""
  leaves_with_paths = jax.tree_util.tree_leaves_with_path(batch)
  if not leaves_with_paths:
    raise ValueError("batch is empty: it holds no arrays.")
  for path, leaf in leaves_with_paths:
    shape = np.shape(leaf)
    name = f"batch leaf {jax.tree_util.keystr(path)}" if path else "batch"
    if not shape:
      raise ValueError(f"{name} is a scalar; it needs a leading example axis.")
    if shape[0] % parts:
      raise ValueError(
        f"{name} has {shape[0]} examples, not divisible by the {parts} {what}; pad or drop "
        "examples, or choose a batch size that divides."
      )


def shard_batch(batch: Any, mesh: Mesh) -> Any:
  """Places every leaf of ``batch`` with its examples split over the ``"data"`` axis.

  Args:
    batch: a pytree of arrays with a common leading example axis, e.g. ``(inputs, targets)``;
      the global batch, the same on every process (each process keeps only the examples of
      its own devices; to pass only those, use :func:`shard_local_batch`).
    mesh: from :func:`make_mesh`.

  Returns:
    The batch as global ``jax.Array``\\ s sharded by :func:`batch_sharding`.

  Raises:
    ValueError: when a leaf has no leading axis or its size is not a multiple of the
      ``"data"`` axis size (pad or drop examples, or pick batch sizes that divide).
  """
  data = _data_size(mesh)
  _check_batch(batch, data, f"devices of the {DATA_AXIS!r} axis")
  return _put_tree(batch, batch_sharding(mesh))


def shard_local_batch(local_batch: Any, mesh: Mesh) -> Any:
  """The global batch made of every process's own share, split over the ``"data"`` axis.

  Each process passes only the examples it loaded (its share, :func:`local_share` says which),
  and gets the same global arrays as :func:`shard_batch` of all shares joined along the
  example axis in the order of their indices. With one process, the same as
  :func:`shard_batch`. Built with ``jax.make_array_from_process_local_data``: no example
  leaves its process.

  Args:
    local_batch: a pytree of arrays with a common leading example axis: this process's share,
      with as many examples on every process (processes that share places on ``"data"``,
      e.g. along a ``"model"`` axis that spans them, pass the same share).
    mesh: from :func:`make_mesh`.

  Returns:
    Global ``jax.Array``\\ s sharded by :func:`batch_sharding`, whose leading axis is the
    local one times the number of shares (``local_share(mesh)[1]``).

  Raises:
    ValueError: when a leaf has no leading axis or its size is not a multiple of the number
      of this process's places on the ``"data"`` axis.
  """
  local = len(_data_places(mesh)[jax.process_index()])
  _check_batch(local_batch, local, f"devices of this process on the {DATA_AXIS!r} axis")
  sharding = batch_sharding(mesh)
  return jax.tree.map(
    lambda leaf: jax.make_array_from_process_local_data(sharding, leaf), local_batch
  )


def _is_key(leaf: Any) -> bool:
  return jax.dtypes.issubdtype(getattr(leaf, "dtype", None), jax.dtypes.prng_key)


def _host_copy(leaf: Any) -> np.ndarray:
  """This process's copy of ``leaf`` as a NumPy array of JAX's dtype for it (key data for keys)."""
  if _is_key(leaf):
    leaf = jax.random.key_data(leaf)
  host = np.asarray(leaf)
  return host.astype(jax.dtypes.canonicalize_dtype(host.dtype), copy=False)


def _put(leaf: Any, sharding: jax.sharding.Sharding) -> jax.Array:
  """``jax.device_put(leaf, sharding)`` for a sharding over the devices of several processes.

  There ``jax.device_put`` refuses committed arrays (the output of a jitted step) and PRNG
  keys. Instead each process builds the shards of its own devices from its copy of ``leaf``
  (which must be the same on every process), with no transfer between processes.
  """
  if sharding.is_fully_addressable or (
    isinstance(leaf, jax.Array) and not leaf.is_fully_addressable
  ):
    # Only this process's devices, or a global array already: a transfer or a reshard.
    return jax.device_put(leaf, sharding)
  host = _host_copy(leaf)
  array = jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])
  if _is_key(leaf):
    return jax.random.wrap_key_data(array, impl=jax.random.key_impl(leaf))
  return array


def _put_tree(tree: Any, shardings: Any) -> Any:
  """``jax.device_put(tree, shardings)`` with one process, :func:`_put` per leaf with several."""
  if jax.process_count() == 1:
    return jax.device_put(tree, shardings)
  if isinstance(shardings, jax.sharding.Sharding):
    return jax.tree.map(lambda leaf: _put(leaf, shardings), tree)
  return jax.tree.map(_put, tree, shardings)


def _check_same_on_every_process(tree: Any, shardings: Any) -> None:
  """Raises unless every process holds bitwise the same leaves where ``shardings`` span
  several processes (one small all-gather of checksums; none when no sharding does).

  Replicas that differ (parameters initialised from another seed on each host) would run
  without error and silently train a different model on each device.
  """
  if isinstance(shardings, jax.sharding.Sharding):
    shardings = jax.tree.map(lambda _: shardings, tree)
  spanning = [
    (path, leaf)
    for (path, leaf), sharding in zip(
      jax.tree_util.tree_leaves_with_path(tree), jax.tree.leaves(shardings), strict=True
    )
    if not sharding.is_fully_addressable
    and not (isinstance(leaf, jax.Array) and not leaf.is_fully_addressable)
  ]
  if not spanning:
    return
  checksums = np.array(
    [zlib.crc32(np.ascontiguousarray(_host_copy(leaf)).tobytes()) for _, leaf in spanning],
    dtype=np.uint32,
  )
  everywhere = np.asarray(multihost_utils.process_allgather(checksums))
  differ = [
    jax.tree_util.keystr(path) or "(the root)"
    for (path, _), column in zip(spanning, everywhere.T, strict=True)
    if np.any(column != column[0])
  ]
  if differ:
    raise ValueError(
      f"leaves {', '.join(differ)} differ between processes; every process must pass the "
      "same values (e.g. initialise the parameters from the same seed)."
    )


def place(tree: Any, shardings: Any) -> Any:
  """``jax.device_put(tree, shardings)`` that also works with several processes.

  Args:
    tree: a pytree of arrays (PRNG keys included), the same on every process.
    shardings: one :class:`~jax.sharding.Sharding` for every leaf, or a pytree of them with
      the structure of ``tree`` (from :func:`param_sharding` or :func:`state_sharding`).

  Returns:
    ``tree`` as global ``jax.Array``\\ s with those shardings.

  Raises:
    ValueError: with several processes, when a leaf placed on devices of several processes
      is not the same on every process.
  """
  if jax.process_count() > 1:
    _check_same_on_every_process(tree, shardings)
  return _put_tree(tree, shardings)


def replicate(tree: Any, mesh: Mesh) -> Any:
  """A full copy of every leaf of ``tree`` on every device of ``mesh`` (PRNG keys included).

  With several processes, ``tree`` must be the same on every process (see :func:`place`).
  """
  return place(tree, NamedSharding(mesh, P()))


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
    Shardings with the structure of ``params``, for :func:`place` (``jax.device_put`` with one
    process) or ``jax.jit``'s ``in_shardings`` / ``out_shardings``.
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
