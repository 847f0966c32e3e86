"""One process of the several-process run of tests/test_multihost.py (and its reference).

Started as ``python tests/multihost_worker.py PROCESS_ID NUM_PROCESSES PORT OUT``: the
process takes ``DEVICES_PER_PROCESS`` CPU devices, joins the others through
``jax.distributed.initialize`` on ``localhost:PORT`` with gloo CPU collectives, and runs
``STEPS`` jitted Hessian-free steps of the toy regression problem with the batch split over
the devices of all processes, for each case of ``CASES``. Process 0 writes the final
parameters and the per-step trace of each case, and the messages of the bad calls, to the
``.npz`` file ``OUT``. Imported by the test, :func:`train` gives the one-device reference.
"""

from __future__ import annotations

import functools
import sys

import jax
import numpy as np
import toy
from jax.experimental import multihost_utils

import hfjax
from hfjax import sharding

DEVICES_PER_PROCESS = 4
STEPS = 3
BATCH = 64  # global examples per step
# Backtracking compares the losses of neighbouring CG iterates, and a tie to round-off is
# decided by the order of the sums, which the device layout changes. So CG must stop before
# it converges: a small damping (a harder system) and a cap. With Martens' 45 and a cap of 4,
# L-BFGS converged in 3 steps and the choice between iterates 3 and 4 flipped in 3 of 5
# one-process layouts (2, 4, 8 devices on "data", 4 x 2, 2 x 4); with 1 and 4, in none.
MAX_CG_STEPS = 4
INITIAL_DAMPING = 1.0
# (name, preconditioner, batch form, mesh): "local" loads this process's share and calls
# shard_local_batch, "global" loads every example and calls shard_batch; mesh "data" puts
# every device on "data" with params and state replicated, "data_model" is a 4 x 2 mesh
# ("data", "model") with params and state split over "model" by param_sharding and
# state_sharding (so each process holds two places of "data").
CASES = (
  ("kfac_local", "kfac", "local", "data"),
  ("kfac_global", "kfac", "global", "data"),
  ("lbfgs_model", "lbfgs", "local", "data_model"),
)


def load_examples(step: int, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
  """Examples ``start:stop`` of the batch of ``step``; each drawn from its own seed, so a
  process can load its share without the others."""
  inputs = np.stack(
    [np.random.default_rng((step, index)).normal(size=4) for index in range(start, stop)]
  ).astype(np.float32)
  targets = np.stack([np.sin(inputs[:, 0]), inputs[:, 1] * inputs[:, 2]], axis=-1)
  return inputs, targets


@functools.cache
def optimizer(preconditioner: str):
  """The transformation and its jitted step, made once per process so that cases with the
  same preconditioner and shardings share one compilation."""
  tx = hfjax.hessian_free(
    toy.apply_fn,
    toy.loss_fn,
    preconditioner=preconditioner,
    max_cg_steps=MAX_CG_STEPS,
    initial_damping=INITIAL_DAMPING,
  )
  return tx, toy.make_step(tx)


def train(preconditioner: str, put_batch=None, put_tree=None) -> tuple[dict, list]:
  """``STEPS`` outer steps; returns the final parameters and (damping, CG steps, iterate
  chosen by backtracking, accepted) of each step, read on this process.

  ``put_batch(step)`` gives the batch of ``step`` on the devices and
  ``put_tree(params, state)`` places the parameters and state; ``None``: one device.
  """
  tx, step_fn = optimizer(preconditioner)
  params = toy.init_params(0)
  state = tx.init(params)
  if put_tree is not None:
    params, state = put_tree(params, state)
  trace = []
  for step in range(STEPS):
    batch = load_examples(step, 0, BATCH) if put_batch is None else put_batch(step)
    params, state = step_fn(params, state, batch, batch)
    info = state.info
    info = jax.tree.map(_read, (state.damping, info.cg_steps, info.chosen_iterate, info.accepted))
    trace.append((float(info[0]), int(info[1]), int(info[2]), bool(info[3])))
  return jax.tree.map(_read, params), trace


def _read(x: jax.Array) -> np.ndarray:
  """The whole value of ``x`` on this process (a collective when ``x`` is split)."""
  if x.is_fully_replicated:
    return np.asarray(x.addressable_data(0))
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _read_all(x: np.ndarray) -> np.ndarray:
  """``x`` of every process, stacked by process index (a collective)."""
  return np.asarray(multihost_utils.process_allgather(x))


def _message(call) -> str:
  try:
    call()
  except ValueError as err:
    return str(err)
  return ""


def main(process_id: int, num_processes: int, port: int, out: str) -> None:
  jax.config.update("jax_num_cpu_devices", DEVICES_PER_PROCESS)
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(
    coordinator_address=f"localhost:{port}", num_processes=num_processes, process_id=process_id
  )
  assert jax.process_count() == num_processes
  assert jax.device_count() == num_processes * DEVICES_PER_PROCESS
  meshes = {
    "data": sharding.make_mesh(),
    "data_model": sharding.make_mesh((jax.device_count() // 2, 2), ("data", "model")),
  }

  def put_tree(mesh):
    def put(params, state):
      return (
        sharding.place(params, sharding.param_sharding(params, mesh, shard_params=True)),
        sharding.place(state, sharding.state_sharding(state, params, mesh, shard_params=True)),
      )

    return put

  def my_share(step, mesh):
    index, count = sharding.local_share(mesh)
    return load_examples(step, index * BATCH // count, (index + 1) * BATCH // count)

  forms = {
    "local": lambda mesh: lambda step: sharding.shard_local_batch(my_share(step, mesh), mesh),
    "global": lambda mesh: lambda step: sharding.shard_batch(load_examples(step, 0, BATCH), mesh),
  }
  results = {}
  for name, preconditioner, form, mesh_name in CASES:
    mesh = meshes[mesh_name]
    params, trace = train(preconditioner, forms[form](mesh), put_tree(mesh))
    results.update({f"{name}/{key}": value for key, value in params.items()})
    results[f"{name}/trace"] = np.array(trace, dtype=np.float64)

  mesh = meshes["data"]
  # What jax.device_put refuses onto other processes' devices: a committed array (as a
  # jitted step returns) and a PRNG key.
  committed = jax.device_put((np.arange(3.0), jax.random.key(1)), jax.local_devices()[0])
  placed = sharding.replicate(committed, mesh)
  results["committed"] = _read(placed[0])
  results["committed_key_data"] = _read(jax.random.key_data(placed[1]))
  # On the 4 x 2 mesh, each device holds half of each parameter.
  w1 = put_tree(meshes["data_model"])(toy.init_params(0), ())[0]["w1"]
  results["model_w1_shards"] = np.array([shard.data.shape for shard in w1.addressable_shards])
  # The batch really is global, each process holding only its own examples.
  batch = sharding.shard_local_batch(my_share(0, mesh), mesh)
  results["local_rows"] = np.array([shard.data.shape[0] for shard in batch[0].addressable_shards])
  results["global_shape"] = np.array(batch[0].shape)
  # local_share of every process: by process on "data" meshes; one share for all when the
  # processes lie along "model" and each holds every place of "data".
  model_across = sharding.make_mesh((num_processes, DEVICES_PER_PROCESS), ("model", "data"))
  for name, mesh_of in {**meshes, "model_across": model_across}.items():
    results[f"share/{name}"] = _read_all(np.array(sharding.local_share(mesh_of)))
  results["error_differ"] = np.array(
    _message(lambda: sharding.replicate({"w": np.full(3, process_id, np.float32)}, mesh))
  )
  results["error_local"] = np.array(
    _message(lambda: sharding.shard_local_batch(load_examples(0, 0, 6), mesh))
  )
  if process_id == 0:
    # Onto this process's devices only: no collective, so one process may call it alone.
    local = sharding.place(np.arange(2.0), jax.sharding.SingleDeviceSharding(jax.devices()[0]))
    results["local_place"] = np.asarray(local)
    np.savez(out, **results)


if __name__ == "__main__":
  main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
