"""Several JAX processes (multi-controller), checked against one device.

Two processes of ``multihost_worker.DEVICES_PER_PROCESS`` CPU devices each join through
``jax.distributed.initialize`` on localhost, with gloo CPU collectives, and run jitted
Hessian-free steps with the batch split over all the devices of both, for each case of
``multihost_worker.CASES``: K-FAC (the default preconditioner) with each process passing only
its own share of the batch (``shard_local_batch``) and with every process passing the global
batch (``shard_batch``), params and state replicated (``replicate``); and L-BFGS on a 4 x 2
``("data", "model")`` mesh, params and state split over ``"model"`` by ``place`` with
``param_sharding`` / ``state_sharding``. Each process calls ``hfjax.sharding`` exactly as one
process would, and process 0 writes the final parameters. The one-device reference runs in
the test process while they work.

By hand: ``python tests/multihost_worker.py I 2 PORT out.npz`` for I = 0 and 1 in two shells.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import multihost_worker as worker
import numpy as np
import pytest
import toy

NUM_PROCESSES = 2
TIMEOUT_S = 240


def _free_port() -> int:
  with socket.socket() as sock:
    sock.bind(("localhost", 0))
    return sock.getsockname()[1]


def _start_workers(out: Path, logs: list[Path]) -> list[subprocess.Popen]:
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  # Each worker sets its own device count (jax_num_cpu_devices); an inherited flag would fight it.
  env["XLA_FLAGS"] = re.sub(
    r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", "")
  )
  root = str(Path(worker.__file__).parent.parent)
  env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
  port = _free_port()
  procs = []
  for process_id, log in enumerate(logs):
    with open(log, "w") as stream:
      procs.append(
        subprocess.Popen(
          [sys.executable, worker.__file__, str(process_id), str(NUM_PROCESSES), str(port), out],
          env=env,
          stdout=stream,
          stderr=subprocess.STDOUT,
        )
      )
  return procs


def _wait(procs: list[subprocess.Popen], logs: list[Path]) -> None:
  """Waits for every worker; on a time-out or a failure, kills the rest and shows their logs."""
  deadline = time.monotonic() + TIMEOUT_S
  try:
    for proc in procs:
      proc.wait(timeout=max(1.0, deadline - time.monotonic()))
  except subprocess.TimeoutExpired:
    pass
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
        proc.wait()
  failed = [(i, proc.returncode) for i, proc in enumerate(procs) if proc.returncode != 0]
  if failed:
    shown = "\n".join(
      f"--- process {i} (exit {code}, -9: killed after {TIMEOUT_S} s):\n"
      + "\n".join(line for line in logs[i].read_text().splitlines() if "[Gloo]" not in line)[-4000:]
      for i, code in failed
    )
    pytest.fail(f"multihost workers failed:\n{shown}")


def test_two_processes_match_one_device(tmp_path):
  out = tmp_path / "result.npz"
  logs = [tmp_path / f"process{i}.log" for i in range(NUM_PROCESSES)]
  procs = _start_workers(out, logs)
  try:
    references = {name: worker.train(name) for name in {case[1] for case in worker.CASES}}
    initial = jax.tree.map(np.asarray, toy.init_params(0))
  finally:
    _wait(procs, logs)
  result = np.load(out)

  for name, preconditioner, form, _ in worker.CASES:
    ref_params, ref_trace = references[preconditioner]
    errors = []
    # Damping, CG steps, the iterate backtracking chose and acceptance are discrete: equal
    # step for step. (Backtracking compares the losses of neighbouring iterates, so a near
    # tie can flip with the order of a sum; the parameters then differ by about 1e-5.)
    trace = [(float(d), int(c), int(i), bool(a)) for d, c, i, a in result[f"{name}/trace"]]
    assert trace == ref_trace, (name, trace, ref_trace)
    assert all(accepted for *_, accepted in trace), name
    for leaf, ref in ref_params.items():
      got = result[f"{name}/{leaf}"]
      error = np.max(np.abs(got - ref))
      # Relative to the parameters (1e-5 in float32), and small against what training moved
      # them, so that an update dropped or doubled anywhere could not pass.
      moved = np.max(np.abs(ref - initial[leaf]))
      assert error <= 1e-5 * np.max(np.abs(ref)), (name, form, leaf, error)
      assert error <= 1e-3 * moved, (name, form, leaf, error, moved)
      errors.append(f"{leaf} {error / np.max(np.abs(ref)):.1e} ({error / moved:.1e} of the move)")
    print(f"\n{name}: {trace}; max |error| / max |param|: {', '.join(errors)}")

  # Per-host form: each process passed 32 examples and holds 8 on each of its 4 devices of a
  # global batch of 64.
  share = worker.BATCH // NUM_PROCESSES // worker.DEVICES_PER_PROCESS
  assert result["local_rows"].tolist() == [share] * worker.DEVICES_PER_PROCESS
  assert result["global_shape"].tolist() == [worker.BATCH, 4]
  # local_share by process on "data" meshes, one share for both with "model" across them.
  assert result["share/data"].tolist() == [[0, 2], [1, 2]]
  assert result["share/data_model"].tolist() == [[0, 2], [1, 2]]
  assert result["share/model_across"].tolist() == [[0, 1], [0, 1]]
  # place() with param_sharding on the 4 x 2 mesh splits w1 (4, 8) over "model".
  assert result["model_w1_shards"].tolist() == [[4, 4]] * worker.DEVICES_PER_PROCESS
  # What jax.device_put refuses onto other processes' devices: a committed array and a key.
  np.testing.assert_array_equal(result["committed"], np.arange(3.0))
  np.testing.assert_array_equal(
    result["committed_key_data"], jax.random.key_data(jax.random.key(1))
  )
  assert re.search(r"leaves \['w'\] differ between processes", str(result["error_differ"]))
  np.testing.assert_array_equal(result["local_place"], np.arange(2.0))
  assert re.search(
    r"6 examples, not divisible by the 4 devices of this process", str(result["error_local"])
  )
